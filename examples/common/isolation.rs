//! The victim/neighbour experiment of the reference figures (`docs/BENCHMARKS.md`),
//! shared by the `isolation` and `gpu_report` examples.

use gpushare::device::{Device, EventFlags, SpinLoad, Stream};
use gpushare::qos::{
    AdmissionConfig, AdmissionEvaluator, ContextSpec, Isolation, PartitionConfig, PartitionLimits,
    PartitionManager,
};
use gpushare::DeviceSms;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Victim latencies in µs, each sorted.
pub struct Outcome {
    /// How the victim's partition was isolated.
    pub isolation: Option<Isolation>,
    /// Alone.
    pub solo: Vec<f64>,
    /// Next to the neighbour, plain streams.
    pub shared: Vec<f64>,
    /// Next to the neighbour, each on its own SM partition (`None` without partitions).
    pub partitioned: Option<Vec<f64>>,
}

/// Latency of `iters` victim launches on `s`, in µs, sorted.
fn victim_latencies(
    dev: &dyn Device,
    load: &SpinLoad,
    s: &Stream,
    cycles: u64,
    iters: usize,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let (a, b) = (
        dev.create_event(EventFlags::timing())?,
        dev.create_event(EventFlags::timing())?,
    );
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        // A gate kernel of about the victim's length first, on one block: by the time the
        // GPU reaches the first event, the host has queued the kernel and the second event,
        // so the interval measures the GPU, not how promptly this thread was scheduled.
        load.launch(s, 1, 32, cycles)?;
        dev.record_event(&a, s)?;
        load.launch(s, 16, 128, cycles)?;
        dev.record_event(&b, s)?;
        v.push(dev.elapsed(&a, &b)?.as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

pub fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Keep `s` saturated with long, wide spin kernels until `stop` is set.
fn neighbour(
    dev: Arc<dyn Device>,
    load: Arc<SpinLoad>,
    s: Stream,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let sms = dev.info().sm_count;
    let e = dev
        .create_event(EventFlags::default())
        .map_err(|e| e.to_string())?;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..4 {
            // About 2 ms per launch at GPU clocks, 8 blocks of 1024 threads per SM.
            load.launch(&s, sms * 8, 1024, 3_000_000)
                .map_err(|e| e.to_string())?;
        }
        dev.record_event(&e, &s).map_err(|e| e.to_string())?;
        dev.synchronize_event(&e).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn with_neighbour<T>(
    dev: &Arc<dyn Device>,
    load: &Arc<SpinLoad>,
    s: Stream,
    f: impl FnOnce() -> T,
) -> Result<T, Box<dyn std::error::Error>> {
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let (dev, load, stop) = (dev.clone(), load.clone(), stop.clone());
        std::thread::spawn(move || neighbour(dev, load, s, stop))
    };
    // Let the neighbour fill the GPU first.
    std::thread::sleep(Duration::from_millis(50));
    let out = f();
    stop.store(true, Ordering::Relaxed);
    h.join().map_err(|_| "the neighbour thread panicked")??;
    Ok(out)
}

/// Run the experiment on `dev`: the victim gets `share` of the SMs and runs `iters` kernels
/// of about `victim_us` µs in each setting.
pub fn measure(
    dev: Arc<dyn Device>,
    share: f64,
    iters: usize,
    victim_us: f64,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let info = dev.info().clone();
    let load = Arc::new(SpinLoad::new(dev.clone())?);

    // Admission: a Guaranteed victim with a small compute share, a BestEffort neighbour.
    let eval = AdmissionEvaluator::new(info.total_memory, AdmissionConfig::default())?;
    let gib = 1u64 << 30;
    let victim = eval.try_admit(&ContextSpec::new("victim", gib).base(gib).compute(share))?;
    let neigh = eval.try_admit(&ContextSpec::new("neighbour", gib).compute(1.0 - share))?;
    let range = info.priority_range;
    let (vp, np) = (
        victim.priority.stream_priority(range.greatest, range.least),
        neigh.priority.stream_priority(range.greatest, range.least),
    );

    // Partitions: one per context, their shares turned into SM splits.
    let mut parts = PartitionManager::new(PartitionConfig::new(info.total_memory))?;
    parts.create_partition("victim", PartitionLimits::default().compute(share))?;
    parts.create_partition("neighbour", PartitionLimits::default().compute(1.0 - share))?;
    parts.place(victim.reservation.spec(), "victim")?;
    parts.place(neigh.reservation.spec(), "neighbour")?;
    let sms = DeviceSms::new(dev.clone());
    parts.realize(&sms)?;

    // Calibrate the victim kernel to about the asked length, alone on a plain stream.
    let plain_v = dev.create_stream(vp)?;
    let mut cycles = 75_000u64;
    for _ in 0..3 {
        let v = victim_latencies(&*dev, &load, &plain_v, cycles, 21)?;
        let med = pct(&v, 0.5).max(1.0);
        cycles = ((cycles as f64) * victim_us / med).clamp(1_000.0, 1e9) as u64;
    }

    let solo = victim_latencies(&*dev, &load, &plain_v, cycles, iters)?;
    let plain_n = dev.create_stream(np)?;
    let shared = with_neighbour(&dev, &load, plain_n, || {
        victim_latencies(&*dev, &load, &plain_v, cycles, iters)
    })??;

    let isolation = parts.partition("victim").map(|p| p.isolation().clone());
    let partitioned = match (&isolation, sms.partitions().as_slice()) {
        (Some(Isolation::SmPartition { .. }), [pv, pn]) => {
            let sv = dev.create_stream_in(pv, vp)?;
            let sn = dev.create_stream_in(pn, np)?;
            Some(with_neighbour(&dev, &load, sn, || {
                victim_latencies(&*dev, &load, &sv, cycles, iters)
            })??)
        }
        _ => None,
    };
    // The kernel loaded into each partition's context holds that context: let it go
    // before the partitions, so that they are destroyed rather than left to the process.
    drop(load);
    drop(sms);
    Ok(Outcome {
        isolation,
        solo,
        shared,
        partitioned,
    })
}
