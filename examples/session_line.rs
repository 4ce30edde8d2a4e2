//! Sessions of two contexts whose working sets do not fit together, with many tasks in
//! line: what the session queue costs as the line grows.
//!
//! Each context has one buffer of 5 MiB (`Discard`, so that a switch costs no copy) on a
//! device of 8 MiB, so a session of one context waits while any session of the other is
//! live, and every switch evicts the other's buffer. Half the tasks use each context; each
//! task opens a session, yields once inside it (so that others pile up in line), and ends
//! it, for a fixed number of rounds. The table gives the rate of sessions, the median and
//! worst time from asking for a session to getting it, and how often the device switched
//! from one context's buffer to the other's. Both contexts are BestEffort: a waiter is
//! passed by newcomers of the other context for one aging period at most.
//!
//! ```text
//! cargo run --release --example session_line -- [--tasks N,N,...] [--sessions N] [--aging-ms MS]
//! ```

use gpushare::device::{SimConfig, SimDevice};
use gpushare::qos::ContextSpec;
use gpushare::{EvictPolicy, Runtime};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

const MIB: u64 = 1 << 20;

/// What one run measured.
struct Row {
    /// Sessions per second.
    rate: f64,
    median: Duration,
    worst: Duration,
    /// Evictions: each switch from one context to the other evicts one buffer.
    switches: u64,
}

/// One run with `tasks` tasks and about `sessions` sessions in all.
fn run(tasks: usize, sessions: usize, aging: Duration) -> Row {
    let sim = SimDevice::with_config(SimConfig::default().total_memory(8 * MIB))
        .unwrap_or_else(|e| common::fail(&format!("simulated device: {e}")));
    let rt = Runtime::builder()
        .with_device(Arc::new(sim))
        .memory_fraction(1.0)
        .memory_limit(8 * MIB)
        .overcommit(4.0)
        .aging(aging)
        .build()
        .unwrap_or_else(|e| common::fail(&format!("runtime: {e}")));
    let models: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let ctx = rt
                .create_context(ContextSpec::new(*name, 6 * MIB))
                .unwrap_or_else(|e| common::fail(&format!("context {name}: {e}")));
            let buf = ctx
                .create_buffer_with(5 * MIB, EvictPolicy::Discard)
                .unwrap_or_else(|e| common::fail(&format!("buffer of {name}: {e}")));
            Arc::new((ctx, buf))
        })
        .collect();
    let rounds = sessions.div_ceil(tasks);
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| common::fail(&format!("tokio: {e}")));
    let start = Instant::now();
    let waits = tokio.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let m = models[t % 2].clone();
                tokio::spawn(async move {
                    let mut waits = Vec::with_capacity(rounds);
                    for _ in 0..rounds {
                        let t0 = Instant::now();
                        let s = m.0.session_async().await.unwrap_or_else(|e| {
                            common::fail(&format!("session of {}: {e}", m.0.name()))
                        });
                        waits.push(t0.elapsed());
                        tokio::task::yield_now().await;
                        drop(s);
                    }
                    waits
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(
                h.await
                    .unwrap_or_else(|e| common::fail(&format!("task: {e}"))),
            );
        }
        all
    });
    let elapsed = start.elapsed();
    let switches = rt.snapshot().contexts.iter().map(|c| c.evictions).sum();
    let mut waits = waits;
    waits.sort();
    Row {
        rate: waits.len() as f64 / elapsed.as_secs_f64(),
        median: waits[waits.len() / 2],
        worst: waits[waits.len() - 1],
        switches,
    }
}

fn main() {
    common::init_tracing("warn");
    let f = common::Flags::parse(
        &["--tasks", "--sessions", "--aging-ms"],
        "usage: session_line [--tasks N,N,...] [--sessions N] [--aging-ms MS]",
    );
    let tasks: Vec<usize> = f
        .text("--tasks", "16,128,1024")
        .split(',')
        .map(|t| match t.trim().parse::<usize>() {
            Ok(n) if n >= 2 => n,
            _ => common::fail(&format!(
                "--tasks needs whole numbers of at least 2, not {t:?}"
            )),
        })
        .collect();
    let sessions = f.count("--sessions", 200_000) as usize;
    let aging =
        Duration::try_from_secs_f64(f.positive("--aging-ms", 5.0) / 1e3).unwrap_or_else(|_| {
            common::fail("--aging-ms is too large for a duration; give at most a few hours")
        });
    println!("aging {aging:?}, about {sessions} sessions a run");
    println!("| tasks | sessions/s | median wait | worst wait | switches |");
    println!("|---|---|---|---|---|");
    for n in tasks {
        let r = run(n, sessions, aging);
        println!(
            "| {n} | {:.0} | {:.2?} | {:.2?} | {} |",
            r.rate, r.median, r.worst, r.switches
        );
    }
}
