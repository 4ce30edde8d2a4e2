//! How long a request that needs a victim takes when a Burstable owner at its base holds
//! many unpinned evictable blocks, which no eviction may take. Prints a table.
//!
//! ```text
//! cargo run --release -p gpushare-pool --example victim_walk
//! ```
use gpushare_pool::{
    EvictError, Eviction, Evictor, HostSource, OwnerSpec, Pool, PoolConfig, RestoreInfo, StreamId,
    Tier, VictimInfo,
};
use std::sync::Arc;
use std::time::Instant;

mod args;

/// Drops what it evicts (nothing here is ever evicted).
struct Discard;

impl Evictor for Discard {
    fn evict(&self, _: &VictimInfo) -> Result<Eviction, EvictError> {
        Ok(Eviction::done())
    }
    fn restore(&self, _: &RestoreInfo) -> Result<(), EvictError> {
        Ok(())
    }
}

/// Median µs of a request that finds no victim, over five batches of 200, with `n` blocks
/// of 4 KiB held by a Burstable owner at its base.
fn measure(n: u64) -> Result<f64, Box<dyn std::error::Error>> {
    let base = 4096 * n;
    let cap = (base + (64 << 20)).next_multiple_of(2 << 20);
    let pool = Pool::new(
        HostSource::new(2 << 20, 1 << 40),
        PoolConfig::default().capacity(cap),
    )?;
    pool.set_evictor(Arc::new(Discard));
    let bu = pool.add_owner(OwnerSpec::new("bu", cap).tier(Tier::Burstable).base(base))?;
    let g = pool.add_owner(OwnerSpec::new("g", cap).tier(Tier::Guaranteed))?;
    for _ in 0..n {
        let (id, _) = pool.alloc_evictable(bu, 4096, 0, StreamId(1))?;
        pool.unpin(&id)?;
    }
    // The Guaranteed owner takes the rest; its next request needs a victim and finds none.
    let mut held = Vec::new();
    while let Ok(b) = pool.alloc(g, 1 << 20, StreamId(1)) {
        held.push(b);
    }
    let mut batches = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..200 {
            if pool.alloc(g, 1 << 20, StreamId(1)).is_ok() {
                return Err("a request found memory it should not have".into());
            }
        }
        batches.push(t.elapsed().as_secs_f64() * 1e6 / 200.0);
    }
    batches.sort_by(f64::total_cmp);
    Ok(batches[2])
}

fn main() {
    args::Args::new("victim_walk (no arguments)").done();
    println!("| blocks of a Burstable owner at its base | µs per request that finds no victim (median of 5 batches) |");
    println!("|---|---|");
    for n in [1_000, 10_000, 100_000] {
        match measure(n) {
            Ok(us) => println!("| {n} | {us:.2} |"),
            Err(e) => {
                eprintln!("victim_walk failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
