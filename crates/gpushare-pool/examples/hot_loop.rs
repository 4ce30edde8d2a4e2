//! A bare loop of hot allocate+free pairs, for profilers (callgrind, perf).
//!
//! ```text
//! cargo run --release -p gpushare-pool --example hot_loop -- [pairs] [size] [shared|local]
//! ```
//!
//! `local` goes through a [`gpushare_pool::LocalCache`] instead of the pool's shared path.
use gpushare_pool::{HostSource, OwnerSpec, Pool, PoolConfig, StreamId};

mod args;

fn main() {
    let mut args = args::Args::new("hot_loop [pairs] [size in bytes, up to 1 GiB] [shared|local]");
    let pairs: u64 = args.number("pairs", 10_000_000, 1, u64::MAX);
    let size: u64 = args.number("size", 4096, 1, 1 << 30);
    let local = args.choice("the path", &["shared", "local"]) == "local";
    args.done();
    let pool = match Pool::new(HostSource::new(2 << 20, 1 << 40), PoolConfig::default()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let o = pool.add_owner(OwnerSpec::new("o", 1 << 40)).expect("owner");
    let t = std::time::Instant::now();
    if local {
        let mut cache = pool.local_cache(o, 64 << 20).expect("cache");
        for _ in 0..pairs {
            let b = cache
                .alloc(std::hint::black_box(size), StreamId(0))
                .expect("alloc");
            cache.free(std::hint::black_box(b)).expect("free");
        }
    } else {
        for _ in 0..pairs {
            let b = pool
                .alloc(o, std::hint::black_box(size), StreamId(0))
                .expect("alloc");
            pool.free(std::hint::black_box(b)).expect("free");
        }
    }
    println!(
        "{:.1} ns per pair",
        t.elapsed().as_nanos() as f64 / pairs as f64
    );
}
