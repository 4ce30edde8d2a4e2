//! The central path's allocate+free pair over a pool whose source is not contiguous, as a
//! device without virtual memory management gives: every chunk is then a run of its own.
//! A pair costs the same however many runs there are. Prints a table.
//!
//! ```text
//! cargo run --release -p gpushare-pool --example runs_loop -- [pairs per batch]
//! ```
use gpushare_pool::{ChunkSource, HostSource, OwnerSpec, Pool, PoolConfig, SourceError, StreamId};
use std::time::Instant;

/// Host memory whose chunks are not adjacent: the pool keeps a gap between them.
struct Apart(HostSource);

impl ChunkSource for Apart {
    fn granularity(&self) -> u64 {
        self.0.granularity()
    }
    fn va_size(&self) -> u64 {
        self.0.va_size()
    }
    fn base(&self) -> u64 {
        self.0.base()
    }
    fn map(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        self.0.map(offset, size)
    }
    fn unmap(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        self.0.unmap(offset, size)
    }
    fn contiguous(&self) -> bool {
        false
    }
}

const CHUNK: u64 = 64 << 10;

/// Median ns per pair over five batches of `pairs`, with `runs` chunks mapped.
fn measure(runs: u64, pairs: u64) -> Result<f64, Box<dyn std::error::Error>> {
    let pool = Pool::new(
        Apart(HostSource::new(CHUNK, 1 << 40)),
        PoolConfig::default()
            .min_grow(CHUNK)
            .cache_bytes_per_shard(0),
    )?;
    let o = pool.add_owner(OwnerSpec::new("o", 1 << 40))?;
    // One block of a chunk's size maps a chunk; freed, each chunk stays a free run.
    let blocks = (0..runs)
        .map(|_| pool.alloc(o, CHUNK, StreamId(0)))
        .collect::<Result<Vec<_>, _>>()?;
    for b in blocks {
        pool.free(b).map_err(|e| e.to_string())?;
    }
    let mut batches = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..pairs {
            let b = pool.alloc(o, std::hint::black_box(4096), StreamId(0))?;
            pool.free(std::hint::black_box(b))
                .map_err(|e| e.to_string())?;
        }
        batches.push(t.elapsed().as_nanos() as f64 / pairs as f64);
    }
    batches.sort_by(f64::total_cmp);
    Ok(batches[2])
}

mod args;

fn main() {
    let mut args = args::Args::new("runs_loop [pairs per batch]");
    let pairs: u64 = args.number("pairs per batch", 200_000, 1, u64::MAX);
    args.done();
    println!("| runs | ns per central pair (median of 5 batches of {pairs}) |");
    println!("|---|---|");
    for runs in [1, 100, 1_000, 10_000] {
        match measure(runs, pairs) {
            Ok(ns) => println!("| {runs} | {ns:.1} |"),
            Err(e) => {
                eprintln!("runs_loop failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
