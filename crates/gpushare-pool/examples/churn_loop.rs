//! The churn of `pool_bench` at one number of live blocks on one allocator, in a bare
//! loop, for profilers (callgrind, perf): `pool` (gpushare's pool), `offset` (the
//! `offset-allocator` crate) or `wide` (that crate with its handle padded to the pool's
//! 32 bytes). Prints the median ns per free+alloc pair and the footprint.
//!
//! ```text
//! cargo run --release -p gpushare-pool --example churn_loop -- [pool|offset|wide] [live] [runs]
//! ```

#[path = "../benches/support/peers.rs"]
mod peers;

use peers::*;

mod args;

fn main() {
    let mut args = args::Args::new("churn_loop [pool|offset|wide] [live blocks] [runs]");
    let which = args.choice("the allocator", &["pool", "offset", "wide"]);
    // At most pool_bench's largest: past it, offset-allocator as `OffsetAlloc` builds it
    // (2^20 nodes, 1 TiB) runs out while it is filled with these sizes.
    let live: usize = args.number("live blocks", 100_000, 1, 100_000);
    let runs: usize = args.number("runs", 3, 1, 1000);
    args.done();
    // The trace of `pool_bench` at this number of live blocks.
    let trace = Churn::new(live, 200_000, 42 + live as u64);
    println!("{live} live blocks, 200000 free+alloc pairs");
    for _ in 0..runs {
        let (ns, footprint) = match which {
            "pool" => trace.run(&mut Gpushare::new(), 1000),
            "offset" => trace.run(&mut OffsetAlloc::new(), 1000),
            _ => trace.run(&mut Wide(OffsetAlloc::new()), 1000),
        };
        println!("{which}: {ns:.1} ns per pair, peak footprint ÷ peak live {footprint:.3}");
    }
}
