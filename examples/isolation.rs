//! The victim/neighbour experiment of the reference figures (`docs/BENCHMARKS.md`,
//! "Reference figures"), through gpushare's own API.
//!
//! A Guaranteed context ("victim", a small compute share) runs short kernels of about
//! 50 µs on 16 blocks, and its latency is measured with events:
//! 1. alone;
//! 2. next to a BestEffort neighbour that saturates the GPU, both on plain streams (the
//!    victim on the highest priority), without partitions;
//! 3. the same, with each context on its own SM partition (green contexts on CUDA).
//!
//! Target on an H100: with partitions the victim's p99 is at most 1.15× its solo p99.
//! On the simulated device the flow runs with host spin loops and no SM contention is
//! modelled, so the table shows the mechanics, not isolation.
//!
//! ```text
//! cargo run --release --example isolation -- [--iters N] [--victim-us US] [--share F]
//! ```

use experiment::{measure, pct};
use gpushare::device::open;
use gpushare::qos::Isolation;

mod common;
#[path = "common/isolation.rs"]
mod experiment;

struct Args {
    iters: usize,
    victim_us: f64,
    share: f64,
}

fn main() {
    common::init_tracing("warn");
    let f = common::Flags::parse(
        &["--iters", "--victim-us", "--share"],
        "usage: isolation [--iters N] [--victim-us US] [--share F]",
    );
    let args = Args {
        iters: f.count("--iters", 3000) as usize,
        victim_us: f.positive("--victim-us", 50.0),
        share: f.positive("--share", 0.12),
    };
    if args.share >= 1.0 {
        common::fail("--share must be below 1, leaving SMs for the neighbour");
    }
    if let Err(e) = run(&args) {
        eprintln!("isolation failed: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let dev = open(gpushare::Config::device_from_env()?)?;
    let info = dev.info().clone();
    let out = measure(dev, args.share, args.iters, args.victim_us)?;
    let (isolation, solo, shared, partitioned) =
        (out.isolation, out.solo, out.shared, out.partitioned);
    println!("# isolation on {} ({})\n", info.name, info.backend);
    match &isolation {
        Some(Isolation::SmPartition { requested, granted }) => println!(
            "victim partition: {granted} of {} SMs (asked {requested}); neighbour: the rest\n",
            info.sm_count
        ),
        Some(other) => println!("victim partition: {other:?}\n"),
        None => {}
    }
    println!("| victim ({} iterations, ~{:.0} µs kernel on 16 blocks) | p50 µs | p99 µs | p99 ÷ solo p99 |", args.iters, args.victim_us);
    println!("|---|---|---|---|");
    let solo_p99 = pct(&solo, 0.99);
    let row = |name: &str, v: &[f64]| {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}× |",
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 0.99) / solo_p99
        )
    };
    row("alone", &solo);
    row(
        "next to a saturating neighbour, plain streams (victim at top priority)",
        &shared,
    );
    match &partitioned {
        Some(v) => row("next to a saturating neighbour, SM partitions", v),
        None => println!(
            "| next to a saturating neighbour, SM partitions | n/a: no SM partitions here | | |"
        ),
    }
    if info.backend == gpushare::device::Backend::Sim {
        println!(
            "\nSimulated device: kernels are host spin loops and SM contention is not modelled."
        );
    }
    Ok(())
}
