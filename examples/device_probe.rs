//! Prints the device's facts and measures the device layer's basic costs on whichever
//! backend `GPUSHARE_DEVICE` selects (default: CUDA if present, else the simulated device):
//! chunk create/map/unmap/release, event record, record+wait and record+synchronize, event
//! query, and pinned copy bandwidth in both directions. The H100 column repeats the
//! reference figures of `docs/BENCHMARKS.md`, measured with raw CUDA on an H100.
//!
//! ```text
//! cargo run --release --example device_probe -- [--iters N] [--copy-mib N]
//! ```

use gpushare::device::{open, DeviceError, EventFlags};
use std::time::{Duration, Instant};

mod common;

struct Args {
    iters: usize,
    copy_mib: Option<u64>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn ns(d: Duration) -> String {
    format!("{:.0} ns", d.as_secs_f64() * 1e9)
}

/// Median over `iters` runs of `f`, each timing a batch of `batch` calls divided by `batch`.
fn per_call(
    iters: usize,
    batch: u32,
    mut f: impl FnMut() -> Result<(), DeviceError>,
) -> Result<Duration, DeviceError> {
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        for _ in 0..batch {
            f()?;
        }
        v.push(t.elapsed() / batch);
    }
    Ok(median(v))
}

fn main() {
    common::init_tracing("info");
    let f = common::Flags::parse(
        &["--iters", "--copy-mib"],
        "usage: device_probe [--iters N] [--copy-mib N]",
    );
    let args = Args {
        iters: f.count("--iters", 200) as usize,
        copy_mib: Some(f.count("--copy-mib", 0)).filter(|&m| m > 0),
    };
    if let Err(e) = run(&args) {
        eprintln!("device_probe failed: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let dev = open(gpushare::Config::device_from_env()?)?;
    let info = dev.info().clone();
    println!("# device_probe\n");
    println!("| fact | value |\n|---|---|");
    println!("| backend | {} |", info.backend);
    println!("| name | {} |", info.name);
    println!(
        "| memory | {:.1} GiB |",
        info.total_memory as f64 / (1u64 << 30) as f64
    );
    println!("| SMs | {} |", info.sm_count);
    println!(
        "| compute capability | {}.{} |",
        info.compute_capability.0, info.compute_capability.1
    );
    println!(
        "| stream priorities | {}..={} |",
        info.priority_range.greatest, info.priority_range.least
    );
    println!("| VMM granularity | {} MiB |", info.granularity >> 20);
    println!("| VMM | {} |", info.vmm_supported);
    println!(
        "| green contexts | {} (partitions of {}+ SMs in steps of {}) |",
        info.green_contexts, info.sm_min_partition, info.sm_granularity
    );
    println!();

    let mut rows: Vec<(String, String, &str)> = Vec::new();
    let it = args.iters;

    // Chunk lifecycle at the granularity and at 64 MiB.
    for (size, base) in [
        (info.granularity, "17 / 35 / 40 µs (2 MiB)"),
        (64 << 20, "34 / 54 / 83 µs (64 MiB)"),
    ] {
        let va = dev.reserve_va(size)?;
        let (mut c, mut m, mut u) = (vec![], vec![], vec![]);
        for _ in 0..it.min(100) {
            let t = Instant::now();
            let chunk = dev.create_chunk(size)?;
            c.push(t.elapsed());
            let t = Instant::now();
            let map = dev.map_chunk(&va, 0, &chunk)?;
            m.push(t.elapsed());
            let t = Instant::now();
            map.unmap()?;
            drop(chunk);
            u.push(t.elapsed());
        }
        rows.push((
            format!(
                "chunk create / map+access / unmap+release, {} MiB",
                size >> 20
            ),
            format!("{} / {} / {}", us(median(c)), us(median(m)), us(median(u))),
            base,
        ));
    }

    let s = dev.create_stream(info.priority_range.least)?;
    let s2 = dev.create_stream(info.priority_range.least)?;
    let e = dev.create_event(EventFlags::default())?;
    dev.synchronize_stream(&s)?;
    let rec = per_call(it, 100, || dev.record_event(&e, &s))?;
    dev.synchronize_stream(&s)?;
    rows.push(("event record".into(), ns(rec), "385 ns"));
    let rw = per_call(it, 100, || {
        dev.record_event(&e, &s)?;
        dev.wait_event(&s2, &e)
    })?;
    dev.synchronize_stream(&s2)?;
    rows.push((
        "event record + wait on another stream".into(),
        ns(rw),
        "787 ns",
    ));
    let rs = per_call(it, 20, || {
        dev.record_event(&e, &s)?;
        dev.synchronize_event(&e)
    })?;
    rows.push((
        "event record + synchronize, idle stream".into(),
        ns(rs),
        "960 ns",
    ));
    let q = per_call(it, 100, || dev.query_event(&e).map(|_| ()))?;
    rows.push(("event query".into(), ns(q), "267 ns"));
    let sc = per_call(it.min(50), 1, || {
        dev.create_stream(info.priority_range.least).map(drop)
    })?;
    rows.push(("stream create + destroy".into(), us(sc), "6.0 µs"));
    let mi = per_call(it, 10, || dev.mem_info().map(|_| ()))?;
    rows.push(("memory info".into(), us(mi), "6.6 µs"));

    // Pinned copy bandwidth.
    let mib = args.copy_mib.unwrap_or(match info.backend {
        gpushare::device::Backend::Cuda => 1024,
        gpushare::device::Backend::Sim => 128,
    });
    let bytes = mib
        .checked_mul(1 << 20)
        .filter(|&b| b <= info.total_memory)
        .ok_or_else(|| {
            format!(
                "--copy-mib {mib} is more than the device's {} MiB",
                info.total_memory >> 20
            )
        })?;
    let g = info.granularity;
    let rounded = bytes.div_ceil(g) * g;
    let va = dev.reserve_va(rounded)?;
    let chunk = dev.create_chunk(rounded)?;
    let map = dev.map_chunk(&va, 0, &chunk)?;
    let dst = map.range().slice(0, bytes)?;
    let t = Instant::now();
    let host = dev.alloc_pinned(bytes)?;
    let pin_time = t.elapsed();
    rows.push((
        format!("pinned host allocation, {mib} MiB"),
        format!("{:.1} ms", pin_time.as_secs_f64() * 1e3),
        "614 ms (1 GiB)",
    ));
    let t0 = dev.create_event(EventFlags::timing())?;
    let t1 = dev.create_event(EventFlags::timing())?;
    let reps = 5;
    let mut h2d = vec![];
    let mut d2h = vec![];
    for _ in 0..reps {
        dev.record_event(&t0, &s)?;
        dev.copy_htod(dst, host.full(), &s)?;
        dev.record_event(&t1, &s)?;
        h2d.push(dev.elapsed(&t0, &t1)?);
        dev.record_event(&t0, &s)?;
        dev.copy_dtoh(host.full(), dst, &s)?;
        dev.record_event(&t1, &s)?;
        d2h.push(dev.elapsed(&t0, &t1)?);
    }
    let gbps = |d: Duration| format!("{:.1} GB/s", bytes as f64 / d.as_secs_f64() / 1e9);
    rows.push((
        format!("pinned copy host→device, {mib} MiB"),
        gbps(median(h2d)),
        "54.7 GB/s (1 GiB)",
    ));
    rows.push((
        format!("pinned copy device→host, {mib} MiB"),
        gbps(median(d2h)),
        "54.9 GB/s (1 GiB)",
    ));

    println!(
        "| figure ({} backend, median) | measured | H100 raw CUDA |",
        info.backend
    );
    println!("|---|---|---|");
    for (name, val, base) in rows {
        println!("| {name} | {val} | {base} |");
    }
    Ok(())
}
