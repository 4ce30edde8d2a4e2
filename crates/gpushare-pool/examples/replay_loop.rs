//! The model-serving replay of `pool_bench` on one allocator, in a bare loop, for
//! profilers (callgrind, perf): `pool` (gpushare's pool) or `offset` (the
//! `offset-allocator` crate). Prints the median ns per event and the footprint of each run.
//!
//! ```text
//! cargo run --release -p gpushare-pool --example replay_loop -- [pool|offset] [runs]
//! ```

#[path = "../benches/support/peers.rs"]
mod peers;

use peers::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "pool".into());
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    if which != "pool" && which != "offset" {
        eprintln!("usage: replay_loop [pool|offset] [runs]");
        std::process::exit(2);
    }
    let (trace, ids) = serving_trace(2000, 48, 7);
    println!("{} events, seed 7", trace.len());
    for _ in 0..runs {
        let (ns, footprint) = if which == "pool" {
            replay(&mut Gpushare::new(), &trace, ids)
        } else {
            replay(&mut OffsetAlloc::new(), &trace, ids)
        };
        println!("{which}: {ns:.1} ns per event, peak footprint ÷ peak live {footprint:.3}");
    }
}
