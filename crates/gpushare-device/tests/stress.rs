//! Many threads driving one simulated device at once: streams, events, copies.

use gpushare_device::{Device, EventFlags, SimDevice};
use std::sync::Arc;

#[test]
fn many_threads_copy_and_signal_without_loss() {
    let dev = Arc::new(SimDevice::new());
    let g = dev.info().granularity;
    let threads = 8;
    let va = dev.reserve_va(threads as u64 * g).unwrap();
    let chunks: Vec<_> = (0..threads).map(|_| dev.create_chunk(g).unwrap()).collect();
    let maps: Vec<_> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| dev.map_chunk(&va, i as u64 * g, c).unwrap())
        .collect();
    let ranges: Vec<_> = maps.iter().map(|m| m.range()).collect();
    std::thread::scope(|sc| {
        for t in 0..threads {
            let dev = dev.clone();
            let ranges = ranges.clone();
            sc.spawn(move || {
                let s = dev.create_stream(0).unwrap();
                let other = dev.create_stream(-1).unwrap();
                let e = dev.create_event(EventFlags::default()).unwrap();
                let mut host = dev.alloc_pinned(4096).unwrap();
                for round in 0..100u32 {
                    let val = (t as u32 * 1000 + round) as u8;
                    host.write(0, &[val; 4096]).unwrap();
                    let r = ranges[t].slice(u64::from(round % 16) * 4096, 4096).unwrap();
                    dev.copy_htod(r, host.full(), &s).unwrap();
                    dev.record_event(&e, &s).unwrap();
                    dev.wait_event(&other, &e).unwrap();
                    let mut out = vec![0u8; 4096];
                    dev.read_sync(&mut out, r, &other).unwrap();
                    assert!(out.iter().all(|&x| x == val), "thread {t} round {round}");
                }
            });
        }
    });
    drop(maps);
    drop(chunks);
    drop(va);
    assert_eq!(dev.live().mappings, 0);
    assert_eq!(dev.live().streams, 0);
}
