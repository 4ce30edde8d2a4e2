//! Three models share one GPU through gpushare, under tokio:
//! - "llm": Guaranteed. A request is a decode step over a batch of tokens: one cuBLAS SGEMM
//!   per transformer layer (`d×d` weights times `d×batch` activations).
//! - "tts": Burstable. A request takes an LLM step's output: it waits, on the GPU, for the
//!   event the LLM's session recorded after the step, borrows the LLM's output buffer
//!   (`Session::borrow`) and runs an NVRTC FIR filter (the vocoder, its taps are weights)
//!   over it, beside its own SGEMM layers.
//! - "vision": BestEffort, on a small SM partition where the driver has green contexts.
//!   A request runs an NVRTC 3×3 convolution per weight tensor over an image.
//!
//! Every weight tensor is a persistent, evictable buffer, and together they exceed the
//! memory the runtime is given, so weights are offloaded to pinned host memory and restored
//! (perhaps at a new address) as the models take turns. Weights are multiples of 1/64, so
//! every result is exact in f32, and every request checks part of its output against the
//! value computed on the host at start-up: a bad restore, or work that ran before its
//! inputs were ready, would be caught.
//!
//! On the simulated device the same kernels run as host code on the streams' workers (and
//! the example says so); the batch is 1 there to keep host matmuls short.
//!
//! It ends with a per-context table (requests, latency p50/p99, peak memory, evictions,
//! restores) and a per-second timeline.
//!
//! ```text
//! cargo run --release --example llm_tts_vision -- [--seconds S] [--mib M] [--batch B]
//! ```

#[path = "../common/mod.rs"]
mod common;
mod kernels;

use gpushare::device::{Device, DeviceRange};
use gpushare::qos::ContextSpec;
use gpushare::{Buffer, Context, Event, Runtime, RuntimeError, Session};
use kernels::{read_back, to_bytes, Kernels};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// LLM outputs in flight to the TTS: a ring of buffers, more than the channel holds plus
/// the one the TTS is reading, so the LLM never writes a slot the TTS may still read.
const RING: usize = 8;
const QUEUE: usize = 4;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MIB: u64 = 1 << 20;
/// FIR taps of the vocoder.
const TAPS: usize = 32;
/// Vision: filters per convolution, and the image side.
const C_OUT: usize = 16;
const SIDE: usize = 256;

struct Args {
    seconds: f64,
    mib: u64,
    batch: usize,
}

/// Weight `(i, j)` of tensor `l` of model `seed`: a multiple of 1/64 in [-1/8, 1/8].
fn weight(seed: usize, l: usize, i: usize, j: usize) -> f32 {
    (((i * 7 + j * 13 + l * 29 + seed * 5) % 17) as f32 - 8.0) / 64.0
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Llm,
    Tts,
    Vision,
}

struct Tensor {
    buf: Buffer,
    /// Row sums: what `W · ones` gives.
    row_sums: Vec<f32>,
}

struct Model {
    kind: Kind,
    ctx: Context,
    tensors: Vec<Tensor>,
    /// Tensors are `d×d`, column-major.
    d: usize,
    seed: usize,
    batch: usize,
    /// TTS: the FIR output expected over an LLM output of value 1 (scaled by the step's
    /// value).
    fir_expected: Vec<f32>,
    /// LLM: the ring its published outputs go to; TTS: the same ring, read.
    ring: Arc<Vec<Buffer>>,
}

/// An LLM step published to the TTS: its output is in `ring[slot % RING]`, `value` times
/// the row sums of the LLM's last layer, once `done` has completed.
struct Step {
    done: Event,
    slot: usize,
    value: f32,
}

#[derive(Default, Clone)]
struct Stats {
    latencies_us: Vec<f64>,
    per_second: Vec<u32>,
    refused: u64,
}

fn check(what: &str, got: &[f32], want: &[f32]) -> Res<()> {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() || (g - w).abs() > 1e-3 * w.abs().max(1.0) {
            return Err(format!("{what}: element {i} is {g}, expected {w}").into());
        }
    }
    Ok(())
}

impl Model {
    /// Scratch of `n` floats, or `None` when no memory is left for it (a BestEffort model
    /// may find all unreserved memory taken; the request is then refused, and counted).
    /// Any other error ends the run.
    fn scratch(s: &mut Session, n: usize) -> Res<Option<DeviceRange>> {
        match s.alloc(n as u64 * 4) {
            Ok(sc) => Ok(Some(sc.range)),
            Err(
                RuntimeError::OutOfMemory { .. }
                | RuntimeError::ReservedElsewhere { .. }
                | RuntimeError::PressureDenied { .. }
                | RuntimeError::BudgetExceeded { .. },
            ) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The model's GPU work for one request, checked. Returns false if it was refused.
    /// `value` fills the LLM's input; `publish` is the ring slot its output goes to; `feed`
    /// is the LLM step the TTS reads.
    fn work(
        &self,
        k: &Kernels,
        s: &mut Session,
        pick: usize,
        value: f32,
        publish: Option<usize>,
        feed: Option<&Step>,
    ) -> Res<bool> {
        let dev = self.ctx.session_device().clone();
        let (d, b) = (self.d, self.batch);
        match self.kind {
            Kind::Llm | Kind::Tts => {
                let layers = match self.kind {
                    Kind::Llm => self.tensors.len(),
                    _ => self.tensors.len() - 1, // the last one holds the vocoder taps
                };
                let (Some(x), Some(y), Some(f)) = (
                    Self::scratch(s, d * b)?,
                    Self::scratch(s, layers * d * b)?,
                    Self::scratch(s, d)?,
                ) else {
                    return Ok(false);
                };
                if let Some(step) = feed {
                    // The LLM's output, on the GPU, once the LLM's step is done there. It
                    // comes first, while the LLM's copy into the ring slot may still be
                    // queued behind a delay (see below): without the wait, the vocoder
                    // would read the slot's previous step, of another value, and fail.
                    s.wait_event(&step.done)?;
                    let input = s.borrow(&self.ring[step.slot % RING])?;
                    let taps = s.range(&self.tensors[layers].buf)?;
                    k.fir(
                        s.stream(),
                        input.ptr,
                        taps.ptr,
                        f.ptr,
                        d as u32,
                        TAPS as u32,
                    )?;
                    let got = read_back(&*dev, s.stream(), f, self.fir_expected.len())?;
                    let want: Vec<f32> = self.fir_expected.iter().map(|v| v * step.value).collect();
                    check("vocoder over the LLM's output", &got, &want)?;
                }
                k.fill(s.stream(), x.ptr, (d * b) as u64, value)?;
                let mut outs = Vec::with_capacity(layers);
                for t in &self.tensors[..layers] {
                    let w = s.range(&t.buf)?;
                    let out = y.slice((outs.len() * d * b * 4) as u64, (d * b * 4) as u64)?;
                    k.gemm(s.stream(), d, b, d, w.ptr, x.ptr, out.ptr)?;
                    outs.push(out);
                }
                let l = pick % layers;
                let got = read_back(&*dev, s.stream(), outs[l], d)?;
                let want: Vec<f32> = self.tensors[l].row_sums.iter().map(|r| r * value).collect();
                check("matmul", &got, &want)?;
                if let Some(slot) = publish {
                    // The last layer's first column is the step's output. Its copy into the
                    // ring slot waits behind a delay, and nothing here waits for it: the
                    // TTS gets the step at once, so only its GPU-side wait on the step's
                    // event keeps it from reading the slot too early.
                    k.delay(s.stream(), Duration::from_micros(500))?;
                    let dst = s.range(&self.ring[slot % RING])?;
                    dev.copy_dtod(dst, outs[layers - 1].slice(0, dst.len)?, s.stream())?;
                }
            }
            Kind::Vision => {
                let (Some(img), Some(out)) = (
                    Self::scratch(s, SIDE * SIDE)?,
                    Self::scratch(s, C_OUT * SIDE * SIDE)?,
                ) else {
                    return Ok(false);
                };
                k.fill(s.stream(), img.ptr, (SIDE * SIDE) as u64, value)?;
                for t in &self.tensors {
                    let w = s.range(&t.buf)?;
                    k.conv3x3(
                        s.stream(),
                        img.ptr,
                        w.ptr,
                        out.ptr,
                        C_OUT as u32,
                        SIDE as u32,
                        SIDE as u32,
                    )?;
                }
                // Plane c, row 1 of the last convolution: interior pixels are the sum of
                // the filter's nine weights (the first floats of the tensor's column 0).
                // A plane whose weights sum to zero would be checked against zeros: the next
                // plane is taken instead.
                let l = self.tensors.len() - 1;
                let sum =
                    |c: usize| -> f32 { (0..9).map(|i| weight(self.seed, l, c * 9 + i, 0)).sum() };
                let c = (0..C_OUT)
                    .map(|i| (pick + i) % C_OUT)
                    .find(|&c| sum(c) != 0.0)
                    .unwrap_or(pick % C_OUT);
                let want = sum(c) * value;
                let row = out.slice(((c * SIDE + 1) * SIDE * 4) as u64, (SIDE * 4) as u64)?;
                let got = read_back(&*dev, s.stream(), row, SIDE)?;
                check("convolution", &got[1..SIDE - 1], &vec![want; SIDE - 2])?;
            }
        }
        Ok(true)
    }
}

/// One request: a session (restoring the weights if they were evicted), the model's work
/// and its check, then an event at the end of the work, awaited without blocking.
#[allow(clippy::too_many_arguments)]
async fn request(
    m: &Model,
    k: &Kernels,
    started: Instant,
    n: usize,
    value: f32,
    publish: Option<(usize, mpsc::Permit<'_, Step>)>,
    feed: Option<&Step>,
    stats: &mut Stats,
) -> Res<Option<Event>> {
    let t = Instant::now();
    let mut s = m.ctx.session_async().await?;
    // The work blocks its thread: scratch allocations may evict and wait for copies, and
    // the checks wait for reads. tokio hands this worker's other tasks to another thread
    // meanwhile.
    let slot = publish.as_ref().map(|p| p.0);
    if !tokio::task::block_in_place(|| m.work(k, &mut s, n, value, slot, feed))? {
        stats.refused += 1;
        return Ok(None);
    }
    let done = s.record_event()?;
    drop(s);
    // The TTS gets the step before this host waits for it: its session's work waits for
    // the event on the GPU, so a missing wait would show as a wrong output there.
    if let Some((slot, permit)) = publish {
        permit.send(Step {
            done: done.clone(),
            slot,
            value,
        });
    }
    done.wait().await?;
    stats.latencies_us.push(t.elapsed().as_secs_f64() * 1e6);
    let sec = started.elapsed().as_secs() as usize;
    if stats.per_second.len() <= sec {
        stats.per_second.resize(sec + 1, 0);
    }
    stats.per_second[sec] += 1;
    Ok(Some(done))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    common::init_tracing("warn");
    let f = common::Flags::parse(
        &["--seconds", "--mib", "--batch"],
        "usage: llm_tts_vision [--seconds S (at most 600)] [--mib M (at least 256)] [--batch B (1 to 1024)]",
    );
    let args = Args {
        seconds: f.positive("--seconds", 5.0),
        mib: f.count("--mib", 512),
        batch: f.count("--batch", 16) as usize,
    };
    if args.mib < 256 {
        common::fail("--mib must be at least 256");
    }
    if args.seconds > 600.0 {
        common::fail("--seconds must be at most 600");
    }
    if args.batch > 1024 {
        common::fail("--batch must be at most 1024");
    }
    if let Err(e) = run(args).await {
        eprintln!("llm_tts_vision failed: {e}");
        std::process::exit(1);
    }
}

/// Make `n` weight tensors of `d×d` for model `seed` in `ctx`, written through sessions.
fn tensors(ctx: &Context, n: usize, d: usize, seed: usize) -> Res<Vec<Tensor>> {
    let mut out = Vec::with_capacity(n);
    for l in 0..n {
        let mut host = vec![0f32; d * d];
        let mut row_sums = vec![0f32; d];
        for j in 0..d {
            for (i, (h, r)) in host[j * d..(j + 1) * d]
                .iter_mut()
                .zip(row_sums.iter_mut())
                .enumerate()
            {
                *h = weight(seed, l, i, j);
                *r += *h;
            }
        }
        let buf = ctx.create_buffer((d * d * 4) as u64)?;
        ctx.session()?.write(&buf, 0, &to_bytes(&host))?;
        out.push(Tensor { buf, row_sums });
    }
    Ok(out)
}

async fn run(args: Args) -> Res<()> {
    // The runtime gets `--mib` of the device; the weights add up to more than that.
    let dev: Arc<dyn Device> = gpushare::device::open(gpushare::Config::device_from_env()?)?;
    if args
        .mib
        .checked_mul(MIB)
        .is_none_or(|b| b > dev.info().total_memory)
    {
        return Err(format!(
            "--mib {} is more than the device's {} MiB; give a smaller --mib",
            args.mib,
            dev.info().total_memory / MIB
        )
        .into());
    }
    let rt = Runtime::builder()
        .with_device(dev.clone())
        .memory_fraction(1.0)
        .memory_limit(args.mib * MIB)
        .overcommit(3.0)
        // The weights are checked after every restore: their bytes must come back, whatever
        // GPUSHARE_OFFLOAD says.
        .evict_policy(gpushare::EvictPolicy::Offload)
        .build()?;
    let cap = rt.capacity();
    let sim = dev.as_sim().is_some();
    let batch = if sim { 1 } else { args.batch };
    println!(
        "# llm_tts_vision on {} ({})\n",
        dev.info().name,
        dev.info().backend
    );
    if sim {
        println!("simulated device: the kernels run as host code on the streams' workers (batch 1); the memory flow is real\n");
    }

    // Budgets in sixteenths of the runtime's memory. Tensors are d×d f32 with d a multiple
    // of 64, the smallest that makes the 17 of them exceed the runtime's memory.
    let q = cap / 16;
    let d = ((cap as f64 / (17.0 * 4.0)).sqrt() / 64.0).floor() as usize * 64 + 64;
    let tensor = (d * d * 4) as u64;
    debug_assert!(17 * tensor > cap);
    // The largest working set, vision's 7 tensors, must fit its budget of 8 sixteenths
    // with room for its image.
    if 7 * tensor + 4 * MIB > 8 * q {
        common::fail(&format!(
            "--mib {} leaves no room for the weights' rounding; pick a larger --mib",
            args.mib
        ));
    }
    // A request's scratch (its input, each layer's output, the vocoder's output) must fit
    // beside the weights in the LLM's and the TTS's budgets of 6 sixteenths: the LLM's,
    // with 5 layers and the published outputs, needs the most.
    let units = |bytes: usize| (bytes as u64).div_ceil(256) * 256;
    let llm_needs = 5 * tensor
        + RING as u64 * units(d * 4)
        + units(d * batch * 4)
        + units(5 * d * batch * 4)
        + units(d * 4);
    if llm_needs > 6 * q {
        common::fail(&format!(
            "--batch {batch} needs {} MiB for the LLM's weights and a request's scratch, more than its budget of {} MiB (6/16 of --mib {}); lower --batch or raise --mib",
            llm_needs.div_ceil(MIB),
            6 * q / MIB,
            args.mib
        ));
    }
    let llm = rt.create_context(ContextSpec::new("llm", 6 * q).base(6 * q))?;
    let tts = rt.create_context(ContextSpec::new("tts", 6 * q).base(2 * q))?;
    let vision = rt.create_context(ContextSpec::new("vision", 8 * q).compute(0.25))?;
    let t0 = Instant::now();
    // The LLM's published outputs: one column of its last layer each.
    let ring: Arc<Vec<Buffer>> = Arc::new(
        (0..RING)
            .map(|_| llm.create_buffer((d * 4) as u64))
            .collect::<Result<_, _>>()?,
    );
    let mut models: Vec<Arc<Model>> = Vec::new();
    for (kind, ctx, n, seed) in [
        (Kind::Llm, llm, 5, 1),
        (Kind::Tts, tts, 5, 2),
        (Kind::Vision, vision, 7, 3),
    ] {
        let tensors = tensors(&ctx, n, d, seed)?;
        let fir_expected = if kind == Kind::Tts {
            // Over the LLM's output for an input of ones: its last layer's row sums.
            let input = &models[0].tensors[models[0].tensors.len() - 1].row_sums;
            let taps: Vec<f32> = (0..TAPS).map(|i| weight(seed, n - 1, i, 0)).collect();
            (0..=d - TAPS)
                .map(|t| taps.iter().zip(&input[t..]).map(|(a, b)| a * b).sum())
                .collect()
        } else {
            Vec::new()
        };
        let ring = match kind {
            Kind::Vision => Arc::new(Vec::new()),
            _ => ring.clone(),
        };
        models.push(Arc::new(Model {
            kind,
            ctx,
            tensors,
            d,
            seed,
            batch,
            fir_expected,
            ring,
        }));
    }
    let tensor_mib = (d * d * 4) as f64 / MIB as f64;
    println!(
        "runtime memory {} MiB; weights: {} tensors of {d}×{d} f32 ({tensor_mib:.1} MiB each): llm 5, tts 5, vision 7, {:.0} MiB in all; made in {:.1} s\n",
        cap / MIB,
        17,
        17.0 * tensor_mib,
        t0.elapsed().as_secs_f64()
    );
    let vision_iso = models[2].ctx.isolation();
    println!("vision isolation: {vision_iso:?}\n");

    let k = Arc::new(Kernels::new(dev.clone())?);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let (tx, mut rx) = mpsc::channel::<Step>(QUEUE);
    let llm_task = {
        let (m, k) = (models[0].clone(), k.clone());
        tokio::spawn(async move {
            let mut st = Stats::default();
            let (mut n, mut published) = (0, 0);
            while Instant::now() < until {
                n += 1;
                // Publish the step to the TTS if it has room for one (a free ring slot is
                // then guaranteed); otherwise the step's output stays the LLM's own.
                match tx.try_reserve() {
                    Ok(permit) => {
                        let value = (published % 7 + 1) as f32;
                        let publish = Some((published, permit));
                        let done =
                            request(&m, &k, started, n, value, publish, None, &mut st).await?;
                        if done.is_some() {
                            published += 1;
                        }
                    }
                    Err(_) => {
                        // Each request's input differs from the one before, so that a result
                        // left in reused scratch by an earlier request cannot pass the check.
                        let value = (n % 5 + 1) as f32;
                        request(&m, &k, started, n, value, None, None, &mut st).await?;
                    }
                }
                // A request whose session and event are ready at once never returns
                // Pending, so give the TTS task (woken by the send) its turn.
                tokio::task::yield_now().await;
            }
            Res::Ok(st)
        })
    };
    let tts_task = {
        let (m, k) = (models[1].clone(), k.clone());
        tokio::spawn(async move {
            let mut st = Stats::default();
            let mut n = 0;
            while Instant::now() < until {
                let Ok(Some(step)) =
                    tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
                else {
                    continue;
                };
                n += 1;
                let value = (n % 5 + 1) as f32;
                request(&m, &k, started, n, value, None, Some(&step), &mut st).await?;
                tokio::task::yield_now().await;
            }
            Res::Ok(st)
        })
    };
    let vision_task = {
        let (m, k) = (models[2].clone(), k.clone());
        tokio::spawn(async move {
            let mut st = Stats::default();
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                let value = (n % 5 + 1) as f32;
                request(&m, &k, started, n, value, None, None, &mut st).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Res::Ok(st)
        })
    };
    let mut all = Vec::new();
    for (name, t) in [
        ("llm", llm_task),
        ("tts", tts_task),
        ("vision", vision_task),
    ] {
        all.push((name, t.await??));
    }

    let snap = rt.snapshot();
    println!("| context | tier | requests | p50 ms | p99 ms | peak MiB | evictions | restores | refused (no scratch) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, st) in &mut all {
        let row = snap.contexts.iter().find(|c| c.name == *name);
        let n = st.latencies_us.len();
        println!(
            "| {name} | {} | {n} | {:.2} | {:.2} | {:.0} | {} | {} | {} |",
            row.map_or("?".into(), |r| r.tier.clone()),
            pct(&mut st.latencies_us, 0.5) / 1e3,
            pct(&mut st.latencies_us, 0.99) / 1e3,
            row.map_or(0, |r| r.peak_bytes) as f64 / MIB as f64,
            row.map_or(0, |r| r.evictions),
            row.map_or(0, |r| r.restores),
            st.refused,
        );
    }
    if let Some((name, _)) = all.iter().find(|(_, st)| st.latencies_us.is_empty()) {
        return Err(format!(
            "the {name} model completed no request, so its outputs went unchecked; run for longer (--seconds) or give the runtime more memory (--mib)"
        )
        .into());
    }
    println!("\nEvery request's output matched the host's reference values, the TTS's vocoder output\nincluded: it ran over the LLM's published output, read from the LLM's buffer.");
    println!("\ntimeline (requests completed per second):\n");
    println!("| second | llm | tts | vision |");
    println!("|---|---|---|---|");
    let secs = all
        .iter()
        .map(|(_, s)| s.per_second.len())
        .max()
        .unwrap_or(0);
    for sec in 0..secs {
        let c = |i: usize| all[i].1.per_second.get(sec).copied().unwrap_or(0);
        println!("| {sec} | {} | {} | {} |", c(0), c(1), c(2));
    }
    println!("\n{snap}");
    Ok(())
}
