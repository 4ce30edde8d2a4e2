//! A bare loop of hot allocate+free pairs, for profilers (callgrind, perf).
//!
//! ```text
//! cargo run --release -p gpushare-pool --example hot_loop -- [pairs] [size] [shared|local]
//! ```
//!
//! `local` goes through a [`gpushare_pool::LocalCache`] instead of the pool's shared path.
use gpushare_pool::{HostSource, OwnerSpec, Pool, PoolConfig, StreamId};

fn main() {
    let mut args = std::env::args().skip(1);
    let pairs: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let size: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4096);
    let pool = match Pool::new(HostSource::new(2 << 20, 1 << 40), PoolConfig::default()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let o = pool.add_owner(OwnerSpec::new("o", 1 << 40)).expect("owner");
    let local = args.next().is_some_and(|a| a == "local");
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
