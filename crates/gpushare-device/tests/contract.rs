//! The device contract: one suite, run against both backends. The simulated device always
//! runs it; CUDA runs the same functions with `--ignored` on a machine with a GPU.

use gpushare_device::{
    CudaDevice, Device, DeviceError, DeviceRange, EventFlags, SimDevice, Stream,
};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

type Open = fn() -> Arc<dyn Device>;

fn low(dev: &dyn Device) -> Stream {
    dev.create_stream(dev.info().priority_range.least)
        .expect("create stream")
}

/// Hold `stream` with a host callback until the returned sender sends (or is dropped).
fn hold(dev: &dyn Device, stream: &Stream) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    dev.host_callback(
        stream,
        Box::new(move || {
            let _ = rx.recv();
        }),
    )
    .unwrap();
    tx
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

mod contract {
    use super::*;

    pub fn info_is_sane(open: Open) {
        let dev = open();
        let i = dev.info();
        assert!(i.granularity.is_power_of_two());
        assert!(i.sm_count > 0);
        assert!(i.priority_range.greatest <= i.priority_range.least);
        let m = dev.mem_info().unwrap();
        assert_eq!(m.total, i.total_memory);
        assert!(m.free <= m.total);
    }

    pub fn roundtrip_across_chunk_boundary(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        let va = dev.reserve_va(4 * g).unwrap();
        let c0 = dev.create_chunk(g).unwrap();
        let c1 = dev.create_chunk(g).unwrap();
        let m0 = dev.map_chunk(&va, 0, &c0).unwrap();
        let m1 = dev.map_chunk(&va, g, &c1).unwrap();
        assert_eq!(
            m1.range().ptr.0,
            m0.range().end(),
            "mappings are contiguous"
        );
        let s = low(&*dev);
        // 64 KiB straddling the boundary between the two chunks.
        let n = 64 << 10;
        let dst = va.range().slice(g - n / 2, n).unwrap();
        let data = pattern(n as usize, 3);
        let mut up = dev.alloc_pinned(n).unwrap();
        up.write(0, &data).unwrap();
        dev.copy_htod(dst, up.full(), &s).unwrap();
        let down = dev.alloc_pinned(n).unwrap();
        dev.copy_dtoh(down.full(), dst, &s).unwrap();
        let mut back = vec![0u8; n as usize];
        down.read(0, &mut back).unwrap();
        assert_eq!(back, data);
    }

    pub fn bad_vmm_input_is_typed(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        assert!(matches!(
            dev.reserve_va(0),
            Err(DeviceError::ZeroSize { .. })
        ));
        assert!(matches!(
            dev.reserve_va(g + 1),
            Err(DeviceError::Misaligned { .. })
        ));
        assert!(matches!(
            dev.create_chunk(0),
            Err(DeviceError::ZeroSize { .. })
        ));
        assert!(matches!(
            dev.create_chunk(g / 2),
            Err(DeviceError::Misaligned { .. })
        ));
        let va = dev.reserve_va(2 * g).unwrap();
        let c = dev.create_chunk(g).unwrap();
        assert!(matches!(
            dev.map_chunk(&va, g / 2, &c),
            Err(DeviceError::Misaligned { .. })
        ));
        assert!(matches!(
            dev.map_chunk(&va, 2 * g, &c),
            Err(DeviceError::OutOfRange { .. })
        ));
        let big = dev.create_chunk(2 * g).unwrap();
        assert!(matches!(
            dev.map_chunk(&va, g, &big),
            Err(DeviceError::OutOfRange { .. })
        ));
        let _m = dev.map_chunk(&va, 0, &c).unwrap();
        let c2 = dev.create_chunk(g).unwrap();
        assert!(matches!(
            dev.map_chunk(&va, 0, &c2),
            Err(DeviceError::AlreadyMapped { .. })
        ));
        assert!(matches!(
            dev.alloc_linear(0),
            Err(DeviceError::ZeroSize { .. })
        ));
    }

    pub fn bad_copy_input_is_typed(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        let va = dev.reserve_va(2 * g).unwrap();
        let c = dev.create_chunk(g).unwrap();
        let m = dev.map_chunk(&va, 0, &c).unwrap();
        let s = low(&*dev);
        let host = dev.alloc_pinned(4096).unwrap();
        let r = m.range();
        let e = dev.copy_htod(r.slice(0, 100).unwrap(), host.slice(0, 99).unwrap(), &s);
        assert!(matches!(
            e,
            Err(DeviceError::LengthMismatch { src: 99, dst: 100 })
        ));
        let e = dev.copy_dtod(r.slice(0, 10).unwrap(), r.slice(10, 20).unwrap(), &s);
        assert!(matches!(e, Err(DeviceError::LengthMismatch { .. })));
        assert!(matches!(
            host.slice(4000, 100),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(
            r.slice(g - 1, 2),
            Err(DeviceError::OutOfRange { .. })
        ));
        // The second granule of the reservation is not mapped.
        let unmapped = va.range().slice(g, 4096).unwrap();
        let e = dev.copy_htod(unmapped, host.full(), &s);
        assert!(
            matches!(e, Err(DeviceError::InvalidAddress { .. })),
            "{e:?}"
        );
        let straddle = va.range().slice(g - 2048, 4096).unwrap();
        let e = dev.copy_dtoh(host.full(), straddle, &s);
        assert!(
            matches!(e, Err(DeviceError::InvalidAddress { .. })),
            "{e:?}"
        );
        let e = dev.memset(r.slice(0, 0).unwrap(), 0, &s);
        assert!(matches!(e, Err(DeviceError::ZeroSize { .. })));
        // After unmapping, the addresses are invalid.
        m.unmap().unwrap();
        let e = dev.copy_htod(r.slice(0, 4096).unwrap(), host.full(), &s);
        assert!(
            matches!(e, Err(DeviceError::InvalidAddress { .. })),
            "{e:?}"
        );
        assert!(matches!(
            dev.alloc_pinned(0),
            Err(DeviceError::ZeroSize { .. })
        ));
        let mut h = dev.alloc_pinned(16).unwrap();
        assert!(matches!(
            h.write(10, &[0; 10]),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(
            h.read(17, &mut []),
            Err(DeviceError::OutOfRange { .. })
        ));
    }

    pub fn foreign_handles_are_rejected(open: Open) {
        let a = open();
        let b = open();
        assert_ne!(a.id(), b.id());
        let g = a.info().granularity;
        let va = a.reserve_va(g).unwrap();
        let c = b.create_chunk(g).unwrap();
        let e = a.map_chunk(&va, 0, &c);
        assert!(
            matches!(e, Err(DeviceError::ForeignHandle { what: "chunk", .. })),
            "{e:?}"
        );
        let sb = low(&*b);
        let ea = a.create_event(EventFlags::default()).unwrap();
        assert!(matches!(
            a.record_event(&ea, &sb),
            Err(DeviceError::ForeignHandle { .. })
        ));
        assert!(matches!(
            b.query_event(&ea),
            Err(DeviceError::ForeignHandle { .. })
        ));
        let hb = b.alloc_pinned(64).unwrap();
        let ca = a.create_chunk(g).unwrap();
        let ma = a.map_chunk(&va, 0, &ca).unwrap();
        let sa = low(&*a);
        let e = a.copy_htod(ma.range().slice(0, 64).unwrap(), hb.full(), &sa);
        assert!(matches!(e, Err(DeviceError::ForeignHandle { .. })), "{e:?}");
    }

    pub fn stream_runs_work_in_order(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        let va = dev.reserve_va(g).unwrap();
        let c = dev.create_chunk(g).unwrap();
        let m = dev.map_chunk(&va, 0, &c).unwrap();
        let s = low(&*dev);
        let n = 1 << 20;
        let a = m.range().slice(0, n).unwrap();
        let b = m.range().slice(n, n).unwrap();
        let data = pattern(n as usize, 9);
        let mut host = dev.alloc_pinned(n).unwrap();
        host.write(0, &data).unwrap();
        dev.memset(a, 0xAB, &s).unwrap();
        dev.copy_htod(a, host.full(), &s).unwrap();
        dev.copy_dtod(b, a, &s).unwrap();
        dev.memset(a, 0, &s).unwrap();
        let mut out = vec![0u8; n as usize];
        dev.read_sync(&mut out, b, &s).unwrap();
        assert_eq!(out, data);
        dev.read_sync(&mut out, a, &s).unwrap();
        assert!(out.iter().all(|&x| x == 0));
        let calls = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let c = calls.clone();
            dev.host_callback(&s, Box::new(move || c.lock().unwrap().push(i)))
                .unwrap();
        }
        dev.synchronize_stream(&s).unwrap();
        assert_eq!(*calls.lock().unwrap(), vec![0, 1, 2]);
    }

    pub fn events_complete_and_time(open: Open) {
        let dev = open();
        let s = low(&*dev);
        let never = dev.create_event(EventFlags::default()).unwrap();
        assert!(
            dev.query_event(&never).unwrap(),
            "a never-recorded event is complete"
        );
        dev.synchronize_event(&never).unwrap();
        let t0 = dev.create_event(EventFlags::timing()).unwrap();
        let t1 = dev.create_event(EventFlags::timing()).unwrap();
        dev.record_event(&t0, &s).unwrap();
        dev.host_callback(
            &s,
            Box::new(|| std::thread::sleep(Duration::from_millis(20))),
        )
        .unwrap();
        dev.record_event(&t1, &s).unwrap();
        dev.synchronize_event(&t1).unwrap();
        assert!(dev.query_event(&t1).unwrap());
        let dt = dev.elapsed(&t0, &t1).unwrap();
        assert!(dt >= Duration::from_millis(15), "elapsed {dt:?}");
        let plain = dev.create_event(EventFlags::default()).unwrap();
        dev.record_event(&plain, &s).unwrap();
        assert!(matches!(
            dev.elapsed(&t0, &plain),
            Err(DeviceError::Unsupported { .. })
        ));
        // Clones share the event.
        let c = t1.clone();
        assert!(dev.query_event(&c).unwrap());
        // A blocking event orders like any other; its waiter sleeps instead of spinning.
        let blocking = dev.create_event(EventFlags::blocking_sync()).unwrap();
        assert!(blocking.flags().blocking_sync);
        let (go, gate) = std::sync::mpsc::channel::<()>();
        dev.host_callback(
            &s,
            Box::new(move || {
                let _ = gate.recv();
            }),
        )
        .unwrap();
        dev.record_event(&blocking, &s).unwrap();
        assert!(
            !dev.query_event(&blocking).unwrap(),
            "held behind the callback"
        );
        go.send(()).unwrap();
        dev.synchronize_event(&blocking).unwrap();
        assert!(dev.query_event(&blocking).unwrap());
    }

    pub fn cross_stream_wait_orders_work_without_blocking_host(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        let va = dev.reserve_va(g).unwrap();
        let c = dev.create_chunk(g).unwrap();
        let m = dev.map_chunk(&va, 0, &c).unwrap();
        let (a, b) = (low(&*dev), low(&*dev));
        let n = 1 << 16;
        let src = m.range().slice(0, n).unwrap();
        let dst = m.range().slice(n, n).unwrap();
        dev.memset(src, 1, &a).unwrap();
        dev.memset(dst, 0, &a).unwrap();
        dev.synchronize_stream(&a).unwrap();
        // Stream A is held by a host callback until the test releases it.
        let tx = hold(&*dev, &a);
        dev.memset(src, 2, &a).unwrap();
        let e = dev.create_event(EventFlags::default()).unwrap();
        dev.record_event(&e, &a).unwrap();
        let t = Instant::now();
        dev.wait_event(&b, &e).unwrap();
        dev.copy_dtod(dst, src, &b).unwrap();
        let after = dev.create_event(EventFlags::default()).unwrap();
        dev.record_event(&after, &b).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "wait_event blocked the host"
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(!dev.query_event(&e).unwrap());
        assert!(!dev.query_event(&after).unwrap(), "B ran past its wait");
        tx.send(()).unwrap();
        dev.synchronize_event(&after).unwrap();
        let mut out = vec![0u8; n as usize];
        dev.read_sync(&mut out, dst, &b).unwrap();
        assert!(out.iter().all(|&x| x == 2), "B copied before A's memset");
    }

    pub fn a_stream_wait_waits_for_the_record_it_saw_not_a_later_one(open: Open) {
        let dev = open();
        let (a, b, c) = (low(&*dev), low(&*dev), low(&*dev));
        // A is held until the test releases it; then it sets a flag.
        let tx = hold(&*dev, &a);
        let a_done = Arc::new(Mutex::new(false));
        let flag = a_done.clone();
        dev.host_callback(&a, Box::new(move || *flag.lock().unwrap() = true))
            .unwrap();
        let e = dev.create_event(EventFlags::default()).unwrap();
        dev.record_event(&e, &a).unwrap();
        dev.wait_event(&c, &e).unwrap();
        // The same event again, on an idle stream: it completes at once, but C waits for
        // the record it was queued after, on A.
        dev.record_event(&e, &b).unwrap();
        dev.synchronize_stream(&b).unwrap();
        let seen = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        let a2 = a_done.clone();
        dev.host_callback(
            &c,
            Box::new(move || *s2.lock().unwrap() = Some(*a2.lock().unwrap())),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(*seen.lock().unwrap(), None, "C ran past its wait");
        tx.send(()).unwrap();
        dev.synchronize_stream(&c).unwrap();
        assert_eq!(*seen.lock().unwrap(), Some(true));
    }

    pub fn one_range_is_mapped_once_when_two_threads_race(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        let va = Arc::new(dev.reserve_va(g).unwrap());
        for _ in 0..50 {
            let go = Arc::new(std::sync::Barrier::new(2));
            let maps: Vec<_> = (0..2)
                .map(|_| {
                    let (dev, va, go) = (dev.clone(), va.clone(), go.clone());
                    std::thread::spawn(move || {
                        let c = dev.create_chunk(g).unwrap();
                        go.wait();
                        dev.map_chunk(&va, 0, &c)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let ok = maps.iter().filter(|m| m.is_ok()).count();
            assert_eq!(ok, 1, "{maps:?}");
        }
    }

    pub fn priorities_are_checked(open: Open) {
        let dev = open();
        let r = dev.info().priority_range;
        let hi = dev.create_stream(r.greatest).unwrap();
        assert_eq!(hi.priority(), r.greatest);
        dev.create_stream(r.least).unwrap();
        assert!(matches!(
            dev.create_stream(r.greatest - 1),
            Err(DeviceError::InvalidPriority { .. })
        ));
        assert!(matches!(
            dev.create_stream(r.least + 1),
            Err(DeviceError::InvalidPriority { .. })
        ));
    }

    pub fn sm_partitions(open: Open) {
        let dev = open();
        let info = dev.info().clone();
        if !info.green_contexts {
            assert!(matches!(
                dev.split_sms(&[16]),
                Err(DeviceError::Unsupported { .. })
            ));
            return;
        }
        let split = dev.split_sms(&[16, 3]).unwrap();
        assert_eq!(split.partitions.len(), 2);
        let p = &split.partitions[0];
        assert!(p.sm_count() >= 16);
        assert_eq!(p.requested(), 16);
        assert!(split.partitions[1].sm_count() >= info.sm_min_partition);
        let used: u32 = split.partitions.iter().map(|p| p.sm_count()).sum();
        let rest = split.remainder.as_ref().map_or(0, |r| r.sm_count());
        assert_eq!(used + rest, info.sm_count);
        let s = dev
            .create_stream_in(p, info.priority_range.greatest)
            .unwrap();
        assert_eq!(s.partition_sms(), Some(p.sm_count()));
        // Work runs on a partition's stream and orders with an ordinary stream via events.
        let g = info.granularity;
        let va = dev.reserve_va(g).unwrap();
        let c = dev.create_chunk(g).unwrap();
        let m = dev.map_chunk(&va, 0, &c).unwrap();
        let r = m.range().slice(0, 4096).unwrap();
        dev.memset(r, 5, &s).unwrap();
        let e = dev.create_event(EventFlags::default()).unwrap();
        dev.record_event(&e, &s).unwrap();
        let plain = low(&*dev);
        dev.wait_event(&plain, &e).unwrap();
        let mut out = vec![0u8; 4096];
        dev.read_sync(&mut out, r, &plain).unwrap();
        assert!(out.iter().all(|&x| x == 5));
        // The same event recorded in turn in the other context (the primary one) and back
        // in the partition's: each wait follows the latest record, whichever context's.
        // Each record is held behind a callback, so an event that answered for an earlier
        // (completed) record would be seen complete.
        let gate = hold(&*dev, &plain);
        dev.memset(r, 6, &plain).unwrap();
        dev.record_event(&e, &plain).unwrap();
        assert!(
            !dev.query_event(&e).unwrap(),
            "the record in the primary context"
        );
        dev.wait_event(&s, &e).unwrap();
        gate.send(()).unwrap();
        dev.read_sync(&mut out, r, &s).unwrap();
        assert!(out.iter().all(|&x| x == 6));
        let gate = hold(&*dev, &s);
        dev.memset(r, 7, &s).unwrap();
        dev.record_event(&e, &s).unwrap();
        assert!(
            !dev.query_event(&e).unwrap(),
            "the record back in the partition"
        );
        dev.wait_event(&plain, &e).unwrap();
        gate.send(()).unwrap();
        dev.read_sync(&mut out, r, &plain).unwrap();
        assert!(out.iter().all(|&x| x == 7));
        assert!(dev.query_event(&e).unwrap());
        // Events time against each other within one context only.
        let timed = |stream: &Stream| {
            let t = dev.create_event(EventFlags::timing()).unwrap();
            dev.record_event(&t, stream).unwrap();
            dev.synchronize_event(&t).unwrap();
            t
        };
        let (in_part, in_part2, in_plain) = (timed(&s), timed(&s), timed(&plain));
        dev.elapsed(&in_part, &in_part2).unwrap();
        assert!(matches!(
            dev.elapsed(&in_part, &in_plain),
            Err(DeviceError::Unsupported { .. })
        ));
        let other = dev
            .create_stream_in(&split.partitions[1], info.priority_range.least)
            .unwrap();
        assert!(matches!(
            dev.elapsed(&in_part, &timed(&other)),
            Err(DeviceError::Unsupported { .. })
        ));
        // Recorded again in the partition, it times against the partition's events.
        dev.record_event(&in_plain, &s).unwrap();
        dev.synchronize_event(&in_plain).unwrap();
        dev.elapsed(&in_part, &in_plain).unwrap();
        assert!(matches!(
            dev.split_sms(&[info.sm_count + 1]),
            Err(DeviceError::InvalidSmSplit { .. })
        ));
        assert!(matches!(
            dev.split_sms(&[0]),
            Err(DeviceError::ZeroSize { .. })
        ));
        assert!(matches!(
            dev.split_sms(&[]),
            Err(DeviceError::ZeroSize { .. })
        ));
    }

    /// Events of SM partitions recorded, queried, waited for and synchronised from many
    /// threads at once, each thread's work checked after every wait.
    pub fn partition_events_from_many_threads(open: Open) {
        let dev = open();
        let info = dev.info().clone();
        if !info.green_contexts {
            return;
        }
        let split = dev.split_sms(&[16, 16]).unwrap();
        let g = info.granularity;
        let va = dev.reserve_va(g).unwrap();
        let c = dev.create_chunk(g).unwrap();
        let m = dev.map_chunk(&va, 0, &c).unwrap();
        let n = 4096u64;
        std::thread::scope(|scope| {
            for t in 0..8usize {
                let (dev, split, m) = (&dev, &split, &m);
                let least = info.priority_range.least;
                scope.spawn(move || {
                    // Each thread writes in one partition and reads in the other.
                    let s = dev
                        .create_stream_in(&split.partitions[t % 2], least)
                        .unwrap();
                    let o = dev
                        .create_stream_in(&split.partitions[(t + 1) % 2], least)
                        .unwrap();
                    let e = dev.create_event(EventFlags::default()).unwrap();
                    let r = m.range().slice(t as u64 * n, n).unwrap();
                    let mut out = vec![0u8; n as usize];
                    for i in 0..200u32 {
                        let v = (i as u8).wrapping_mul(7).wrapping_add(t as u8);
                        dev.memset(r, v, &s).unwrap();
                        dev.record_event(&e, &s).unwrap();
                        dev.query_event(&e).unwrap();
                        dev.wait_event(&o, &e).unwrap();
                        if i % 4 == 0 {
                            dev.synchronize_event(&e).unwrap();
                            assert!(dev.query_event(&e).unwrap(), "thread {t}, round {i}");
                        }
                        dev.read_sync(&mut out, r, &o).unwrap();
                        assert!(out.iter().all(|&x| x == v), "thread {t}, round {i}");
                    }
                });
            }
        });
    }

    pub fn linear_fallback_allocation(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        let a = dev.alloc_linear(g).unwrap();
        let s = low(&*dev);
        let data = pattern(8192, 1);
        let r = a.range().slice(100, 8192).unwrap();
        dev.write_sync(r, &data, &s).unwrap();
        let mut out = vec![0u8; 8192];
        dev.read_sync(&mut out, r, &s).unwrap();
        assert_eq!(out, data);
        assert!(matches!(
            dev.alloc_linear(g + 1),
            Err(DeviceError::Misaligned { .. })
        ));
    }

    pub fn mappings_outlive_dropped_handles(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        let va = dev.reserve_va(g).unwrap();
        let c = dev.create_chunk(g).unwrap();
        let m = dev.map_chunk(&va, 0, &c).unwrap();
        // The reservation and the chunk handle may go first; the mapping keeps both alive.
        drop(va);
        drop(c);
        let s = low(&*dev);
        let r = m.range().slice(0, 4096).unwrap();
        let data = pattern(4096, 7);
        dev.write_sync(r, &data, &s).unwrap();
        let mut out = vec![0u8; 4096];
        dev.read_sync(&mut out, r, &s).unwrap();
        assert_eq!(out, data);
    }

    pub fn spin_load_runs_in_stream_order(open: Open) {
        let dev = open();
        let load = gpushare_device::SpinLoad::new(dev.clone()).unwrap();
        let s = low(&*dev);
        let (t0, t1) = (
            dev.create_event(EventFlags::timing()).unwrap(),
            dev.create_event(EventFlags::timing()).unwrap(),
        );
        dev.record_event(&t0, &s).unwrap();
        // 15M cycles: 10 ms at 1.5 GHz, several ms at any GPU clock.
        load.launch(&s, 4, 64, 15_000_000).unwrap();
        dev.record_event(&t1, &s).unwrap();
        let dt = dev.elapsed(&t0, &t1).unwrap();
        assert!(
            dt >= Duration::from_millis(3),
            "the load did not spin: {dt:?}"
        );
        assert!(matches!(
            load.launch(&s, 0, 64, 1),
            Err(DeviceError::ZeroSize { .. })
        ));
        assert!(matches!(
            load.launch(&s, 1, 4096, 1),
            Err(DeviceError::OutOfRange { .. })
        ));
        if dev.info().green_contexts {
            let split = dev.split_sms(&[8]).unwrap();
            let ps = dev
                .create_stream_in(&split.partitions[0], dev.info().priority_range.least)
                .unwrap();
            load.launch(&ps, 1, 32, 1000).unwrap();
            dev.synchronize_stream(&ps).unwrap();
        }
    }

    pub fn memory_is_accounted(open: Open) {
        let dev = open();
        let g = dev.info().granularity;
        let before = dev.mem_info().unwrap().free;
        let chunks: Vec<_> = (0..8).map(|_| dev.create_chunk(g).unwrap()).collect();
        let during = dev.mem_info().unwrap().free;
        assert!(during + 8 * g <= before + g, "free {before} -> {during}");
        drop(chunks);
        let after = dev.mem_info().unwrap().free;
        assert!(
            after + g >= before,
            "free {before} -> {after} after release"
        );
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sim {
            use super::*;
            fn open() -> Arc<dyn Device> {
                Arc::new(SimDevice::new())
            }
            $( #[test] fn $name() { contract::$name(open) } )*
        }
        mod cuda {
            use super::*;
            fn open() -> Arc<dyn Device> {
                Arc::new(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
            }
            $( #[test] #[ignore = "needs a CUDA GPU"] fn $name() { contract::$name(open) } )*
        }
    };
}

suite!(
    info_is_sane,
    roundtrip_across_chunk_boundary,
    bad_vmm_input_is_typed,
    bad_copy_input_is_typed,
    foreign_handles_are_rejected,
    stream_runs_work_in_order,
    events_complete_and_time,
    cross_stream_wait_orders_work_without_blocking_host,
    a_stream_wait_waits_for_the_record_it_saw_not_a_later_one,
    one_range_is_mapped_once_when_two_threads_race,
    priorities_are_checked,
    sm_partitions,
    partition_events_from_many_threads,
    linear_fallback_allocation,
    mappings_outlive_dropped_handles,
    memory_is_accounted,
    spin_load_runs_in_stream_order,
);

/// Opening CUDA where there is none is a typed error, never a panic.
#[test]
fn cuda_open_never_panics() {
    match CudaDevice::new(0) {
        Ok(d) => assert!(d.info().sm_count > 0),
        Err(e) => assert!(matches!(
            e,
            DeviceError::DriverMissing
                | DeviceError::DriverUnusable { .. }
                | DeviceError::NoDevice
                | DeviceError::Driver { .. }
        )),
    }
    if let Err(e) = CudaDevice::new(10_000) {
        assert!(!matches!(e, DeviceError::ForeignHandle { .. }));
    }
}

/// The bare driver pair that benchmarks compare gpushare's events with runs on the thread
/// that made it: a thousand records and waits without a driver error, then both streams
/// finish. (Their order is the driver's to keep; the pair is a yardstick.)
#[test]
#[ignore = "needs a CUDA GPU"]
fn the_raw_event_pair_records_and_waits() {
    let dev = CudaDevice::new(0).expect("this test needs a CUDA GPU");
    let pair = dev.raw_event_pair().unwrap();
    for _ in 0..1000 {
        pair.record_and_wait().unwrap();
    }
    pair.synchronize().unwrap();
}

/// An event recorded in an SM partition keeps the partition's green context until the
/// event goes, and no longer: the partition's own end finds it in use, and the event's
/// end destroys it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn an_event_keeps_its_partition_until_it_goes() {
    let dev = CudaDevice::new(0).expect("this test needs a CUDA GPU");
    if !dev.info().green_contexts {
        return;
    }
    let before = dev.live_partitions();
    let split = dev.split_sms(&[16]).unwrap();
    let s = dev
        .create_stream_in(&split.partitions[0], dev.info().priority_range.least)
        .unwrap();
    let e = dev.create_event(EventFlags::default()).unwrap();
    dev.record_event(&e, &s).unwrap();
    assert!(dev.live_partitions() > before);
    drop(s);
    drop(split);
    dev.synchronize_event(&e).unwrap();
    assert!(dev.query_event(&e).unwrap());
    assert_eq!(
        dev.live_partitions(),
        before + 1,
        "the event's partition stays while the event lives"
    );
    drop(e);
    assert_eq!(
        dev.live_partitions(),
        before,
        "the partition goes with its event"
    );
}

/// Work launched in an SM partition from several threads at once runs with the partition's
/// green context current inside `Stream::with_cuda_stream` (and inside `SpinLoad::launch`),
/// one thread at a time, and leaves the primary context current on every thread, as every
/// call on a partition's events and streams does.
#[test]
#[ignore = "needs a CUDA GPU"]
fn partition_work_leaves_the_primary_context_current() {
    use gpushare_device::cudarc::driver::result::ctx::get_current;
    use std::sync::atomic::{AtomicU32, Ordering};
    let cuda = CudaDevice::new(0).expect("this test needs a CUDA GPU");
    if !cuda.info().green_contexts {
        return;
    }
    // As an address: a raw pointer does not cross threads.
    let primary = cuda.context().cu_ctx() as usize;
    let current = || get_current().unwrap().map(|c| c as usize);
    let dev: Arc<dyn Device> = Arc::new(cuda);
    let split = dev.split_sms(&[16]).unwrap();
    let load = gpushare_device::SpinLoad::new(dev.clone()).unwrap();
    let inside = AtomicU32::new(0);
    // The threads enter each round together, so that they contend for the context. A
    // round's failure is collected rather than unwound, so that no thread is left waiting
    // at the barrier for one that is gone.
    let round = std::sync::Barrier::new(4);
    let failures = Mutex::new(Vec::new());
    let least = dev.info().priority_range.least;
    let work: Vec<_> = (0..4)
        .map(|_| {
            let s = dev.create_stream_in(&split.partitions[0], least).unwrap();
            (s, dev.create_event(EventFlags::default()).unwrap())
        })
        .collect();
    std::thread::scope(|scope| {
        for (t, (s, e)) in work.into_iter().enumerate() {
            let (dev, load, inside, current, round, failures) =
                (&dev, &load, &inside, &current, &round, &failures);
            scope.spawn(move || {
                for i in 0..50 {
                    round.wait();
                    let one_round = || {
                        let green = s
                            .with_cuda_stream(|cs| {
                                // One thread at a time in here.
                                let others = inside.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_micros(200));
                                let now = current();
                                inside.fetch_sub(1, Ordering::SeqCst);
                                assert_eq!(others, 0, "two threads inside one partition's context");
                                (now, cs.context().cu_ctx() as usize)
                            })
                            .unwrap()
                            .unwrap();
                        assert_eq!(green.0, Some(green.1), "the partition's context is current");
                        assert_ne!(green.1, primary);
                        assert_eq!(current(), Some(primary));
                        load.launch(&s, 1, 32, 10_000).unwrap();
                        assert_eq!(current(), Some(primary));
                        dev.record_event(&e, &s).unwrap();
                        dev.query_event(&e).unwrap();
                        dev.synchronize_event(&e).unwrap();
                        assert_eq!(current(), Some(primary));
                    };
                    if let Err(p) =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(one_round))
                    {
                        let why = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("thread {t}, round {i}: {why}"));
                    }
                }
                dev.synchronize_stream(&s).unwrap();
                drop(e);
                drop(s);
                assert_eq!(current(), Some(primary));
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A range helper used by the suite is itself checked.
#[test]
fn device_range_slicing() {
    let r = DeviceRange::new(gpushare_device::DevicePtr(4096), 100);
    assert_eq!(r.slice(10, 90).unwrap().end(), 4196);
    assert!(r.slice(10, 91).is_err());
    assert!(r.slice(u64::MAX, 2).is_err());
}

#[test]
fn huge_inputs_are_errors_not_overflows() {
    let dev = SimDevice::new();
    assert!(dev.split_sms(&[u32::MAX]).is_err());
    let r = DeviceRange::new(gpushare_device::DevicePtr(u64::MAX - 10), 100);
    assert!(r.slice(50, 10).is_err());
}

#[test]
fn simulated_work_on_memory_unmapped_before_it_ran_faults_its_stream() {
    let dev: Arc<dyn Device> = Arc::new(SimDevice::new());
    let g = dev.info().granularity;
    let va = dev.reserve_va(g).unwrap();
    let c = dev.create_chunk(g).unwrap();
    let m = dev.map_chunk(&va, 0, &c).unwrap();
    let s = low(&*dev);
    let tx = hold(&*dev, &s);
    dev.memset(m.range(), 7, &s).unwrap();
    drop(m);
    tx.send(()).unwrap();
    match dev.synchronize_stream(&s) {
        Err(e) => assert!(e.to_string().contains("illegal address"), "{e}"),
        Ok(()) => panic!("the memset ran on unmapped memory without a fault"),
    }
}
