//! The pool on the device `GPUSHARE_DEVICE` selects, next to the driver's own allocators
//! measured in the same run: hot allocate+free pairs and churn at 10k live blocks. On CUDA
//! the raw columns are `cuMemAlloc`+`cuMemFree` and a warm `cuMemAllocAsync`+`cuMemFreeAsync`
//! pair; on the simulated device they are n/a.
//!
//! ```text
//! cargo run --release --example pool_device -- [--iters N]
//! ```

use gpushare::device::{open, Device, VmmSource};
use gpushare::pool::{OwnerSpec, Pool, PoolConfig, StreamId};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn median_ns(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_nanos() as f64
}

/// The median of per-call times in ns, kept as fractions: a `Duration` divided by the
/// batch would round each down to whole nanoseconds.
fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

mod common;

fn main() {
    common::init_tracing("warn");
    let f = common::Flags::parse(&["--iters"], "usage: pool_device [--iters N]");
    let iters = f.count("--iters", 2000) as usize;
    if let Err(e) = run(iters) {
        eprintln!("pool_device failed: {e}");
        std::process::exit(1);
    }
}

fn run(iters: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dev: Arc<dyn Device> = open(gpushare::Config::device_from_env()?)?;
    let info = dev.info().clone();
    let src = VmmSource::new(dev.clone(), 16 << 30)?;
    let pool = Pool::new(src, PoolConfig::default().capacity(8 << 30))?;
    let owner = pool.add_owner(OwnerSpec::new("bench", 8 << 30))?;
    let stream = dev.create_stream(info.priority_range.least)?;
    println!("# pool_device on {} ({})\n", info.name, info.backend);
    println!("| figure (median) | gpushare pool | cuMemAlloc+Free | cuMemAllocAsync+FreeAsync | pool speed-up vs async |");
    println!("|---|---|---|---|---|");
    for (label, size) in [
        ("256 B", 256u64),
        ("64 KiB", 64 << 10),
        ("16 MiB", 16 << 20),
    ] {
        // Batches of 100 pairs, so the clock's own cost does not dominate.
        let mut v = Vec::with_capacity(iters / 10 + 1);
        for _ in 0..(iters / 10).max(10) {
            let t = Instant::now();
            for _ in 0..100 {
                let b = pool.alloc(owner, std::hint::black_box(size), StreamId(1))?;
                pool.free(b).map_err(|e| e.to_string())?;
            }
            v.push(t.elapsed().as_nanos() as f64 / 100.0);
        }
        let ours = median_f64(v);
        // The same pairs through one thread's local cache (no lock on a hit).
        let mut cache = pool.local_cache(owner, 64 << 20)?;
        let mut v = Vec::with_capacity(iters / 10 + 1);
        for _ in 0..(iters / 10).max(10) {
            let t = Instant::now();
            for _ in 0..100 {
                let b = cache.alloc(std::hint::black_box(size), StreamId(1))?;
                cache.free(b).map_err(|e| e.to_string())?;
            }
            v.push(t.elapsed().as_nanos() as f64 / 100.0);
        }
        drop(cache);
        let local = median_f64(v);
        let (raw, raw_async) = match dev.as_cuda() {
            Some(cuda) => (
                format!(
                    "{:.0} ns",
                    median_ns(cuda.time_raw_alloc_pairs(size, iters.min(500))?)
                ),
                Some(median_ns(
                    cuda.time_raw_alloc_async_pairs(&stream, size, iters)?,
                )),
            ),
            None => ("n/a".to_string(), None),
        };
        println!(
            "| allocate+free pair, {label} | {ours:.1} ns | {raw} | {} | {} |",
            raw_async.map_or("n/a".into(), |a| format!("{a:.0} ns")),
            raw_async.map_or("n/a".into(), |a| format!("{:.0}×", a / ours)),
        );
        println!(
            "| allocate+free pair, {label}, through a local cache | {local:.1} ns | {raw} | {} | {} |",
            raw_async.map_or("n/a".into(), |a| format!("{a:.0} ns")),
            raw_async.map_or("n/a".into(), |a| format!("{:.0}×", a / local)),
        );
    }
    // Churn at 10k live blocks of mixed sizes, the same trace for both.
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let size = |r: u64| match r % 1000 {
        0..=949 => 256 + (r >> 10) % (64 << 10),
        950..=994 => (64 << 10) + (r >> 10) % (4 << 20),
        _ => (4 << 20) + (r >> 10) % (60 << 20),
    };
    let live_n = 10_000;
    let fill: Vec<u64> = (0..live_n).map(|_| size(next())).collect();
    let steps: Vec<(usize, u64)> = (0..100_000)
        .map(|_| ((next() % live_n as u64) as usize, size(next())))
        .collect();
    let mut live = Vec::with_capacity(live_n);
    for &s in &fill {
        live.push(pool.alloc(owner, s, StreamId(1))?);
    }
    let mut v = vec![];
    for chunk in steps.chunks(1000) {
        let t = Instant::now();
        for &(i, s) in chunk {
            let b = pool.alloc(owner, s, StreamId(1))?;
            let old = std::mem::replace(&mut live[i], b);
            pool.free(old).map_err(|e| e.to_string())?;
        }
        v.push(t.elapsed().as_nanos() as f64 / chunk.len() as f64);
    }
    let churn = median_f64(v);
    let churn_async = match dev.as_cuda() {
        Some(cuda) => Some(median_ns(
            cuda.time_raw_async_churn(&stream, &fill, &steps, 1000)?,
        )),
        None => None,
    };
    println!(
        "| churn at 10k live, free+alloc | {churn:.1} ns | n/a | {} | {} |",
        churn_async.map_or("n/a".into(), |a| format!("{a:.0} ns")),
        churn_async.map_or("n/a".into(), |a| format!("{:.0}×", a / churn)),
    );
    for b in live {
        pool.free(b).map_err(|e| e.to_string())?;
    }
    let s = pool.stats();
    println!(
        "\npeak mapped {:.1} MiB, trim released {:.1} MiB",
        s.peak_mapped_bytes as f64 / (1 << 20) as f64,
        pool.trim()? as f64 / (1 << 20) as f64
    );
    Ok(())
}
