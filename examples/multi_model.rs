//! Three models share one GPU through gpushare, under tokio:
//! - "llm": Guaranteed; each request runs several decode steps;
//! - "tts": Burstable; each request waits, on the GPU, for an LLM output (an event
//!   recorded by the LLM's session) before it runs;
//! - "vision": BestEffort, on a small SM partition where the driver has green contexts.
//!
//! Each model's weights are persistent buffers, and together they exceed the memory the
//! runtime is given, so weights are evicted to pinned host memory and restored as the
//! models take turns. Every request checks a window of its weights against the bytes it
//! wrote, so a bad restore would be caught. GPU work is the spin-load kernel on CUDA and
//! host spin loops on the simulated device (which this example says when it uses it).
//!
//! It ends with a per-context table (requests, latency p50/p99, peak memory, evictions,
//! restores) and a per-second timeline.
//!
//! ```text
//! cargo run --release --example multi_model -- [--seconds S] [--mib M]
//! ```

use gpushare::device::{Device, SpinLoad};
use gpushare::qos::ContextSpec;
use gpushare::{Buffer, Context, Event, Runtime};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const MIB: u64 = 1 << 20;

mod common;

struct Args {
    seconds: f64,
    mib: u64,
}

fn byte(seed: u8, i: u64) -> u8 {
    (i as u8).wrapping_mul(13) ^ seed ^ ((i >> 9) as u8)
}

struct Model {
    ctx: Context,
    weights: Vec<Buffer>,
    seed: u8,
    /// GPU work per request: launches of `blocks` blocks spinning `cycles`.
    launches: u32,
    blocks: u32,
    cycles: u64,
}

#[derive(Default, Clone)]
struct Stats {
    latencies_us: Vec<f64>,
    per_second: Vec<u32>,
    scratch_refused: u64,
}

/// One request: a session (restoring the weights if they were evicted), a check of the
/// weights, scratch, and the model's GPU work.
async fn request(
    m: &Model,
    load: &SpinLoad,
    wait_for: Option<Event>,
    started: Instant,
    stats: &mut Stats,
) -> Result<Event, Box<dyn std::error::Error + Send + Sync>> {
    let t = Instant::now();
    let mut s = m.ctx.session_async().await?;
    if let Some(e) = &wait_for {
        s.wait_event(e)?;
    }
    let w = &m.weights[(t.elapsed().subsec_nanos() as usize) % m.weights.len()];
    let off = (t.elapsed().subsec_nanos() as u64 * 4096) % (w.size() - 4096);
    let mut got = vec![0u8; 4096];
    s.read(w, off, &mut got)?;
    if got
        .iter()
        .enumerate()
        .any(|(i, &b)| b != byte(m.seed, off + i as u64))
    {
        return Err(format!("{}: weights changed across eviction", m.ctx.name()).into());
    }
    // Activations: scratch freed in stream order when the session ends. A BestEffort model
    // may find no unreserved memory left for it; it then runs without (and we count it).
    match s.alloc(4 * MIB) {
        Ok(scratch) => m
            .ctx
            .session_device()
            .memset(scratch.range, 0, s.stream())?,
        Err(_) => stats.scratch_refused += 1,
    }
    for _ in 0..m.launches {
        load.launch(s.stream(), m.blocks, 128, m.cycles)?;
    }
    let done = s.record_event()?;
    drop(s);
    done.wait().await?;
    stats.latencies_us.push(t.elapsed().as_secs_f64() * 1e6);
    let sec = started.elapsed().as_secs() as usize;
    if stats.per_second.len() <= sec {
        stats.per_second.resize(sec + 1, 0);
    }
    stats.per_second[sec] += 1;
    Ok(done)
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
        &["--seconds", "--mib"],
        "usage: multi_model [--seconds S] [--mib M]",
    );
    let args = Args {
        seconds: f.positive("--seconds", 5.0).min(600.0),
        mib: f.positive("--mib", 512.0) as u64,
    };
    if args.mib < 256 {
        common::fail("--mib must be at least 256");
    }
    if let Err(e) = run(args).await {
        eprintln!("multi_model failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The runtime gets `--mib` of the device; weights add up to more than that.
    let dev: Arc<dyn Device> = gpushare::device::open(gpushare::Config::from_env()?.device)?;
    let fraction = (args.mib * MIB) as f64 / dev.info().total_memory as f64;
    if fraction > 1.0 {
        return Err(format!("the device has only {} MiB", dev.info().total_memory / MIB).into());
    }
    let rt = Runtime::builder()
        .with_device(dev.clone())
        .memory_fraction(fraction)
        .overcommit(3.0)
        .build()?;
    let cap = rt.capacity();
    let sim = dev.as_sim().is_some();
    println!(
        "# multi_model on {} ({})",
        dev.info().name,
        dev.info().backend
    );
    if sim {
        println!("simulated device: GPU work is host spin loops; the memory flow is real");
    }
    println!("runtime memory {} MiB\n", cap / MIB);

    let q = cap / 16;
    let llm = rt.create_context(ContextSpec::new("llm", 6 * q).base(6 * q))?;
    let tts = rt.create_context(ContextSpec::new("tts", 6 * q).base(2 * q))?;
    let vision = rt.create_context(ContextSpec::new("vision", 8 * q).compute(0.25))?;
    let load = Arc::new(SpinLoad::new(dev.clone())?);
    let mut models = Vec::new();
    for (ctx, n, seed, launches, blocks, cycles) in [
        (llm, 5u64, 1u8, 6u32, 64u32, 30_000u64),
        (tts, 5, 2, 3, 32, 60_000),
        (vision, 7, 3, 2, 128, 90_000),
    ] {
        // Weights: n tensors of q - 1 MiB each, so each context stays inside its budget
        // with room for scratch; together (17 q) they exceed the runtime's memory (16 q).
        let size = q - MIB;
        let mut weights = Vec::new();
        let data: Vec<u8> = (0..size).map(|j| byte(seed, j)).collect();
        for _ in 0..n {
            let b = ctx.create_buffer(size)?;
            let mut s = ctx.session()?;
            s.write(&b, 0, &data)?;
            drop(s);
            weights.push(b);
        }
        models.push(Arc::new(Model {
            ctx,
            weights,
            seed,
            launches,
            blocks,
            cycles,
        }));
    }
    let t = q - MIB;
    println!(
        "weights: llm {} MiB, tts {} MiB, vision {} MiB: {} MiB in all, more than the runtime holds\n",
        5 * t / MIB,
        5 * t / MIB,
        7 * t / MIB,
        17 * t / MIB
    );

    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let (tx, mut rx) = mpsc::channel::<Event>(4);
    let llm_task = {
        let (m, load) = (models[0].clone(), load.clone());
        tokio::spawn(async move {
            let mut st = Stats::default();
            while Instant::now() < until {
                let e = request(&m, &load, None, started, &mut st).await?;
                // The LLM's output feeds the TTS; drop it if the TTS lags.
                let _ = tx.try_send(e);
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(st)
        })
    };
    let tts_task = {
        let (m, load) = (models[1].clone(), load.clone());
        tokio::spawn(async move {
            let mut st = Stats::default();
            while Instant::now() < until {
                let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
                else {
                    continue;
                };
                request(&m, &load, Some(e), started, &mut st).await?;
            }
            Ok(st)
        })
    };
    let vision_task = {
        let (m, load) = (models[2].clone(), load.clone());
        tokio::spawn(async move {
            let mut st = Stats::default();
            while Instant::now() < until {
                request(&m, &load, None, started, &mut st).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(st)
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
    println!("| context | tier | requests | p50 ms | p99 ms | peak MiB | evictions | restores | scratch refused |");
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
            st.scratch_refused,
        );
    }
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
