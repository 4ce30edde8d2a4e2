//! One command for the headline figures, each beside raw CUDA measured in the same run,
//! written as a markdown table (to stdout, and to `--out FILE` if given). On the simulated
//! device the raw columns are n/a and the figures are the runtime's own costs.
//!
//! ```text
//! cargo run --release --example gpu_report -- [--out docs/gpu_report.md] [--iters N]
//! ```

mod common;
#[path = "common/isolation.rs"]
mod experiment;
#[path = "../crates/gpushare-pool/benches/support/peers.rs"]
mod peers;

use gpushare::device::{Device, DevicePtr, DeviceRange, EventFlags, SpinLoad, Stream, VmmSource};
use gpushare::pool::{Block, ChunkSource, OwnerId, OwnerSpec, Pool, PoolConfig, StreamId};
use gpushare::qos::ContextSpec;
use gpushare::{EvictPolicy, Runtime};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn med_ns(v: Vec<Duration>) -> f64 {
    med(v.into_iter().map(|d| d.as_nanos() as f64).collect())
}

/// Operations per timed batch in [`per_op`]: enough that the clock's own cost (about 40 ns
/// a read on the H100's host) is under 1% of a batch.
const BATCH: usize = 100;

/// Median time of one call of `op`, over batches of [`BATCH`] calls, `iters` calls in all
/// (at least 10 batches).
fn per_op(iters: usize, mut op: impl FnMut() -> Res<()>) -> Res<f64> {
    let mut v = Vec::with_capacity(iters / BATCH + 1);
    for _ in 0..(iters / BATCH).max(10) {
        v.push(batch(&mut op)?);
    }
    Ok(med(v))
}

/// Time of one call of `op`, over one batch of [`BATCH`] calls.
fn batch(op: &mut impl FnMut() -> Res<()>) -> Res<f64> {
    let t = Instant::now();
    for _ in 0..BATCH {
        op()?;
    }
    Ok(t.elapsed().as_nanos() as f64 / BATCH as f64)
}

/// Median times of one call of `a` and of `b`, timed in alternate batches of [`BATCH`]
/// calls, `iters` calls of each in all (at least 10 batches each).
fn per_op_alternating(
    iters: usize,
    mut a: impl FnMut() -> Res<()>,
    mut b: impl FnMut() -> Res<()>,
) -> Res<(f64, f64)> {
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    for _ in 0..(iters / BATCH).max(10) {
        va.push(batch(&mut a)?);
        vb.push(batch(&mut b)?);
    }
    Ok((med(va), med(vb)))
}

/// The pool over the device, as the pool benches' `Alloc`.
struct DevPool {
    pool: Pool<VmmSource>,
    owner: OwnerId,
}

impl peers::Alloc for DevPool {
    type H = Block;
    fn name(&self) -> &'static str {
        "gpushare pool"
    }
    fn alloc(&mut self, size: u64) -> Option<Block> {
        self.pool.alloc(self.owner, size, StreamId(1)).ok()
    }
    fn free(&mut self, h: Block) {
        let _ = self.pool.free(h);
    }
    fn peak_footprint(&self) -> u64 {
        self.pool.stats().peak_mapped_bytes
    }
}

fn dev_pool(dev: &Arc<dyn Device>, bytes: u64) -> Res<DevPool> {
    let pool = Pool::new(
        VmmSource::new(dev.clone(), bytes)?,
        PoolConfig::default().capacity(bytes),
    )?;
    let owner = pool.add_owner(OwnerSpec::new("report", bytes))?;
    Ok(DevPool { pool, owner })
}

/// Most bytes live at once in a replay trace.
fn peak_live(trace: &[peers::Ev], ids: usize) -> u64 {
    let mut sizes = vec![0u64; ids];
    let (mut live, mut peak) = (0u64, 0u64);
    for e in trace {
        match *e {
            peers::Ev::Alloc { id, size } => {
                sizes[id as usize] = size;
                live += size;
                peak = peak.max(live);
            }
            peers::Ev::Free { id } => live -= std::mem::take(&mut sizes[id as usize]),
        }
    }
    peak
}

struct Row {
    figure: String,
    ours: String,
    raw: String,
}

fn row(
    rows: &mut Vec<Row>,
    figure: impl Into<String>,
    ours: impl Into<String>,
    raw: impl Into<String>,
) {
    let r = Row {
        figure: figure.into(),
        ours: ours.into(),
        raw: raw.into(),
    };
    eprintln!("  {}: {} | {}", r.figure, r.ours, r.raw);
    rows.push(r);
}

/// Wall time of `n` launches spread over `streams` round-robin, waiting for all.
fn run_kernels(
    dev: &dyn Device,
    load: &SpinLoad,
    streams: &[Stream],
    n: usize,
    cycles: u64,
) -> Res<f64> {
    let t = Instant::now();
    for i in 0..n {
        load.launch(&streams[i % streams.len()], 1, 32, cycles)?;
    }
    for s in streams {
        dev.synchronize_stream(s)?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn main() {
    common::init_tracing("warn");
    let f = common::Flags::parse(
        &["--out", "--iters"],
        "usage: gpu_report [--out FILE] [--iters N]",
    );
    let out = f.text("--out", "");
    let iters = f.count("--iters", 2000);
    if iters > 10_000_000 {
        common::fail(&format!("--iters is at most 10000000, not {iters}"));
    }
    let iters = iters as usize;
    match run(iters) {
        Ok(md) => {
            println!("{md}");
            if !out.is_empty() {
                if let Err(e) = std::fs::write(&out, &md) {
                    eprintln!("cannot write {out}: {e}");
                    std::process::exit(1);
                }
            }
        }
        Err(e) => {
            eprintln!("gpu_report failed: {e}");
            std::process::exit(1);
        }
    }
}

fn run(iters: usize) -> Res<String> {
    let dev = gpushare::device::open(gpushare::Config::device_from_env()?)?;
    let info = dev.info().clone();
    let cuda = dev.as_cuda().cloned();
    let na = || "n/a".to_string();
    let mut rows = Vec::new();
    eprintln!("measuring on {} ({})", info.name, info.backend);

    // 1. Hot pairs.
    {
        let mut p = dev_pool(&dev, 4 << 30)?;
        let s = dev.create_stream(info.priority_range.least)?;
        for (label, size) in [
            ("256 B", 256u64),
            ("64 KiB", 64 << 10),
            ("16 MiB", 16 << 20),
        ] {
            let ours = peers::hot_pair(&mut p, size, (iters / 100).max(20), 100);
            let local = {
                let mut l = peers::Local(p.pool.local_cache(p.owner, 64 << 20)?);
                peers::hot_pair(&mut l, size, (iters / 100).max(20), 100)
            };
            let raw = match &cuda {
                Some(c) => {
                    let a = med_ns(c.time_raw_alloc_pairs(size, 200)?);
                    let b = med_ns(c.time_raw_alloc_async_pairs(&s, size, iters)?);
                    format!(
                        "cuMemAlloc {:.0} ns, cuMemAllocAsync {b:.0} ns ({:.0}× the shared path, {:.0}× the local cache)",
                        a,
                        b / ours,
                        b / local
                    )
                }
                None => na(),
            };
            row(
                &mut rows,
                format!("allocate+free pair, {label}: shared path / local cache"),
                format!("{ours:.1} ns / {local:.1} ns"),
                raw,
            );
        }
    }

    // 2. Churn at 10k live.
    {
        let trace = peers::Churn::new(10_000, 100_000, 5);
        let mut p = dev_pool(
            &dev,
            info.total_memory / 10 * 7 / info.granularity * info.granularity,
        )?;
        let (ours, _) = trace.run(&mut p, 1000);
        let raw = match &cuda {
            Some(c) => {
                let s = dev.create_stream(info.priority_range.least)?;
                let steps: Vec<(usize, u64)> = trace
                    .victims
                    .iter()
                    .copied()
                    .zip(trace.sizes.iter().copied())
                    .collect();
                let v = c.time_raw_async_churn(&s, &trace.fill, &steps, 1000)?;
                format!("cuMemAllocAsync {:.0} ns", med_ns(v))
            }
            None => na(),
        };
        row(
            &mut rows,
            "churn at 10k live, free+alloc",
            format!("{ours:.1} ns"),
            raw,
        );
    }

    // 3. Fragmentation on the serving replay.
    {
        // As many concurrent requests as fit in 70% of the device.
        let budget = info.total_memory / 10 * 7;
        let mut slots = 48;
        let (trace, ids) = loop {
            let (t, ids) = peers::serving_trace(500, slots, 7);
            if peak_live(&t, ids) <= budget || slots <= 2 {
                break (t, ids);
            }
            slots /= 2;
        };
        if peak_live(&trace, ids) <= budget {
            let mut p = dev_pool(&dev, budget / info.granularity * info.granularity)?;
            let (_, frag) = peers::replay(&mut p, &trace, ids);
            row(
                &mut rows,
                format!("peak mapped ÷ peak live, serving replay ({slots} concurrent requests)"),
                format!("{frag:.3}"),
                na(),
            );
        } else {
            row(
                &mut rows,
                "peak mapped ÷ peak live, serving replay",
                "n/a: device too small",
                na(),
            );
        }
    }

    // 4-6 and 8 go through the runtime.
    if info.total_memory < 4 << 30 {
        return Err(format!(
            "the runtime rows need 4 GiB of device memory; this device has {} MiB",
            info.total_memory >> 20
        )
        .into());
    }
    let rt = Runtime::builder()
        .with_device(dev.clone())
        .memory_fraction(1.0)
        .memory_limit(4 << 30)
        .overcommit(4.0)
        .build()?;
    {
        let ctx = rt.create_context(ContextSpec::new("session", 64 << 20))?;
        let _w = ctx.create_buffer(1 << 20)?;
        // Sessions take ~100 ns: 25 times the iterations, as few milliseconds as the rest.
        let n = iters * 25;
        let sync = per_op(n, || {
            drop(ctx.session()?);
            Ok(())
        })?;
        // Inside one task, as a server awaits sessions; entering the executor is not counted.
        let tokio = tokio::runtime::Builder::new_current_thread().build()?;
        let v = tokio.block_on(async {
            let mut v = Vec::with_capacity(n / BATCH);
            for _ in 0..(n / BATCH).max(10) {
                let t = Instant::now();
                for _ in 0..BATCH {
                    drop(ctx.session_async().await?);
                }
                v.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
            }
            Ok::<_, gpushare::RuntimeError>(v)
        })?;
        row(
            &mut rows,
            "session acquire+release, sync / async",
            format!("{sync:.0} ns / {:.0} ns", med(v)),
            na(),
        );
    }
    {
        let a = rt.create_context(ContextSpec::new("ev-a", 16 << 20))?;
        let b = rt.create_context(ContextSpec::new("ev-b", 16 << 20))?;
        let (sa, sb) = (a.session()?, b.session()?);
        // As many as the sessions above: the figure is the difference of two ~400 ns ones.
        let n = iters * 25;
        let (s1, s2) = (dev.create_stream(0)?, dev.create_stream(0)?);
        let ev = dev.create_event(EventFlags::default())?;
        // On CUDA the bare driver calls (`cuEventRecord`, `cuStreamWaitEvent`); on the
        // simulated device, its own pair through the device layer.
        let raw_cuda = cuda.as_ref().map(|c| c.raw_event_pair()).transpose()?;
        // Batches of the two alternate, so that both see the same host and queues: timed
        // one after the other, the raw pair's figure moved by ±150 ns from run to run.
        let (ours, raw) = per_op_alternating(
            n,
            || {
                let e = sa.record_event()?;
                sb.wait_event(&e)?;
                Ok(())
            },
            || {
                match &raw_cuda {
                    Some(pair) => pair.record_and_wait()?,
                    None => {
                        dev.record_event(&ev, &s1)?;
                        dev.wait_event(&s2, &ev)?;
                    }
                }
                Ok(())
            },
        )?;
        sa.synchronize()?;
        sb.synchronize()?;
        // On CUDA, the device layer's own pair against the bare calls too: what of the
        // difference above is the device layer's, and what the runtime's.
        let layer = match &raw_cuda {
            Some(pair) => {
                let (layer, bare) = per_op_alternating(
                    n,
                    || {
                        dev.record_event(&ev, &s1)?;
                        dev.wait_event(&s2, &ev)?;
                        Ok(())
                    },
                    || Ok(pair.record_and_wait()?),
                )?;
                dev.synchronize_stream(&s2)?;
                pair.synchronize()?;
                Some((layer, bare))
            }
            None => None,
        };
        let label = if cuda.is_some() {
            "raw CUDA pair"
        } else {
            "raw device pair"
        };
        row(
            &mut rows,
            "event record + cross-context wait",
            format!("{ours:.0} ns"),
            format!("{label} {raw:.0} ns ({:+.0} ns)", ours - raw),
        );
        if let Some((layer, bare)) = layer {
            row(
                &mut rows,
                "device layer's event record + wait",
                format!("{layer:.0} ns"),
                format!("{label} {bare:.0} ns ({:+.0} ns)", layer - bare),
            );
        }
    }
    {
        // 150 kernels of ~20 µs on one block: serialized on one stream, over three
        // gpushare contexts' streams, and over three raw streams.
        let load = SpinLoad::new(dev.clone())?;
        let one = dev.create_stream(0)?;
        let mut cycles = 30_000u64;
        for _ in 0..3 {
            let ms = run_kernels(&*dev, &load, std::slice::from_ref(&one), 20, cycles)?;
            cycles = ((cycles as f64) * 0.020 * 20.0 / ms.max(1e-3)).clamp(1e3, 1e8) as u64;
        }
        let serial = run_kernels(&*dev, &load, std::slice::from_ref(&one), 150, cycles)?;
        let ctxs: Vec<_> = (0..3)
            .map(|i| rt.create_context(ContextSpec::new(format!("k{i}"), 16 << 20)))
            .collect::<Result<_, _>>()?;
        let sessions: Vec<_> = ctxs.iter().map(|c| c.session()).collect::<Result<_, _>>()?;
        let streams: Vec<Stream> = sessions.iter().map(|s| s.stream().clone()).collect();
        let ours = run_kernels(&*dev, &load, &streams, 150, cycles)?;
        let raw_streams: Vec<Stream> = (0..3)
            .map(|_| dev.create_stream(0))
            .collect::<Result<_, _>>()?;
        let raw = run_kernels(&*dev, &load, &raw_streams, 150, cycles)?;
        row(
            &mut rows,
            "150 ~20 µs kernels: overlap over 3 contexts vs 1 stream",
            format!("{:.2}× ({ours:.2} ms vs {serial:.2} ms)", serial / ours),
            format!("3 raw streams {:.2}× ({raw:.2} ms)", serial / raw),
        );
    }
    {
        // Offload and restore of a 256 MiB buffer, against a pinned copy of the same size.
        let size = 256u64 << 20;
        let victim = rt.create_context(ContextSpec::new("victim", size + (16 << 20)))?;
        let buf = victim.create_buffer_with(size, EvictPolicy::Offload)?;
        drop(victim.session()?);
        let cap = rt.capacity();
        let hog = rt.create_context(ContextSpec::new("hog", cap).base(cap))?;
        // Map the whole pool first, beside the victim, so that the timed allocation below
        // costs the eviction and not the growth. The hog's buffers are Discard: an Offload
        // buffer would pin host staging of its own size when made.
        drop(hog.create_buffer_with(cap - size - (64 << 20), EvictPolicy::Discard)?);
        let t = Instant::now();
        let big = hog.create_buffer_with(cap - (64 << 20), EvictPolicy::Discard)?;
        let offload = t.elapsed();
        if buf.is_resident() {
            return Err("the victim's buffer was not evicted".into());
        }
        drop(big);
        let t = Instant::now();
        drop(victim.session()?);
        let restore = t.elapsed();
        let gbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e9;
        // The same bytes through a plain pinned copy.
        let g = info.granularity;
        let src = VmmSource::new(dev.clone(), size.next_multiple_of(g))?;
        src.map(0, size.next_multiple_of(g))?;
        let host = dev.alloc_pinned(size)?;
        let s = dev.create_stream(0)?;
        let range = DeviceRange::new(DevicePtr(src.base()), size);
        let t = Instant::now();
        dev.copy_dtoh(host.full(), range, &s)?;
        dev.synchronize_stream(&s)?;
        let d2h = t.elapsed();
        let t = Instant::now();
        dev.copy_htod(range, host.full(), &s)?;
        dev.synchronize_stream(&s)?;
        let h2d = t.elapsed();
        row(
            &mut rows,
            "offload / restore, 256 MiB",
            format!("{:.1} / {:.1} GB/s", gbps(offload), gbps(restore)),
            format!(
                "pinned copy d→h {:.1} / h→d {:.1} GB/s",
                gbps(d2h),
                gbps(h2d)
            ),
        );
        drop(buf);
    }
    {
        // The `isolation` experiment: a victim on 12% of the SMs next to a saturating
        // neighbour, 1.5 × --iters kernels of ~50 µs per setting (3000 by default).
        let out = experiment::measure(dev.clone(), 0.12, (iters * 3 / 2).max(300), 50.0)?;
        let solo = experiment::pct(&out.solo, 0.99);
        let ratio = |v: &[f64]| experiment::pct(v, 0.99) / solo;
        let with = match (&out.partitioned, &out.isolation) {
            (Some(v), Some(gpushare::qos::Isolation::SmPartition { granted, .. })) => {
                format!("{:.2}× with partitions (victim on {granted} SMs)", ratio(v))
            }
            _ => "n/a: no SM partitions here".into(),
        };
        row(
            &mut rows,
            "victim p99 ÷ solo p99 next to a saturating neighbour",
            format!("{with}, {:.2}× without", ratio(&out.shared)),
            na(),
        );
    }

    let mut md = format!(
        "# gpu_report\n\n{} ({}), {} SMs, driver {}; {}\n\n| figure | gpushare | raw, same run |\n|---|---|---|\n",
        info.name,
        info.backend,
        info.sm_count,
        info.driver_version,
        if cuda.is_none() { "simulated device: raw CUDA columns are n/a" } else { "CUDA" }
    );
    for r in rows {
        md.push_str(&format!("| {} | {} | {} |\n", r.figure, r.ours, r.raw));
    }
    Ok(md)
}
