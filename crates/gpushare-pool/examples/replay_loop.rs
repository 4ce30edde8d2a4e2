//! The model-serving replay of `pool_bench` on one allocator, in a bare loop, for
//! profilers (callgrind, perf): `pool` (gpushare's pool), `offset` (the
//! `offset-allocator` crate) or `wide` (that crate with its handle padded to the pool's
//! 32 bytes). Prints the median ns per event and the footprint of each run.
//!
//! ```text
//! cargo run --release -p gpushare-pool --example replay_loop -- [pool|offset|wide] [runs]
//! ```

#[path = "../benches/support/peers.rs"]
mod peers;

use peers::*;

mod args;

fn main() {
    let mut args = args::Args::new("replay_loop [pool|offset|wide] [runs]");
    let which = args.choice("the allocator", &["pool", "offset", "wide"]);
    let runs: usize = args.number("runs", 3, 1, 1000);
    args.done();
    let (trace, ids) = serving_trace(2000, 48, 7);
    println!("{} events, seed 7", trace.len());
    for _ in 0..runs {
        let (ns, footprint) = match which {
            "pool" => replay(&mut Gpushare::new(), &trace, ids),
            "offset" => replay(&mut OffsetAlloc::new(), &trace, ids),
            _ => replay(&mut Wide(OffsetAlloc::new()), &trace, ids),
        };
        println!("{which}: {ns:.1} ns per event, peak footprint ÷ peak live {footprint:.3}");
    }
}
