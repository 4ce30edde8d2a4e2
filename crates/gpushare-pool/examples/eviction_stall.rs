//! How long one owner's requests wait while another owner's block is evicted.
//!
//! A BestEffort owner holds one large evictable block; a Guaranteed owner's request needs
//! its memory, so the pool evicts it, again and again. The evictor's move is a real host
//! copy of the block's size (a stand-in for the device-to-host copy of an offload). Between
//! evictions the block is pinned back (restored, with a copy the other way). Meanwhile a
//! bystander owner runs allocate+free pairs of a size that misses its cache, so every pair
//! takes the pool's central lock. The two evictors, run side by side on the same pool set-up:
//!
//! - `under the lock`: the copy runs inside `Evictor::evict` and returns
//!   `Eviction::done()`, as an evictor whose move cannot run apart from the request does;
//! - `two halves`: `evict` only starts the move and returns `Eviction::in_flight`, whose
//!   finish does the copy; the pool runs it with its lock free;
//! - `no pool (control)`: the same copies, both ways, run outside the pool, which evicts
//!   nothing. The bystander's pairs then wait only for the machine (the copies' use of the
//!   cores and memory, the scheduler), so its latencies are the floor of the other rows.
//!
//! The table gives the median move time and the bystander's pair latencies while a move
//! is under way (median, p99, max) and the count of pairs it completed.
//!
//! ```text
//! cargo run --release -p gpushare-pool --example eviction_stall -- [--mib N] [--rounds R]
//! ```

use gpushare_pool::{
    EvictError, Eviction, Evictor, HostSource, OwnerSpec, Pool, PoolConfig, RestoreInfo, StreamId,
    Tier, VictimInfo,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Copies a block's worth of bytes between two host buffers, in `evict` or in the finish.
struct Copier {
    two_halves: bool,
    device: Arc<Mutex<Vec<u8>>>,
    host: Arc<Mutex<Vec<u8>>>,
    /// When each move started and ended.
    moves: Mutex<Vec<(Instant, Instant)>>,
    log: Arc<Mutex<Vec<(Instant, Instant)>>>,
}

fn copy(from: &Mutex<Vec<u8>>, to: &Mutex<Vec<u8>>) {
    let from = from.lock().unwrap_or_else(|p| p.into_inner());
    let mut to = to.lock().unwrap_or_else(|p| p.into_inner());
    to.copy_from_slice(&from);
}

impl Evictor for Copier {
    fn evict(&self, _: &VictimInfo) -> Result<Eviction, EvictError> {
        let start = Instant::now();
        if !self.two_halves {
            copy(&self.device, &self.host);
            self.moves.lock().unwrap().push((start, Instant::now()));
            return Ok(Eviction::done());
        }
        let (device, host, log) = (self.device.clone(), self.host.clone(), self.log.clone());
        Ok(Eviction::in_flight(move || {
            copy(&device, &host);
            log.lock().unwrap().push((start, Instant::now()));
            Ok(())
        }))
    }
    fn restore(&self, _: &RestoreInfo) -> Result<(), EvictError> {
        copy(&self.host, &self.device);
        Ok(())
    }
}

struct Row {
    moves: Vec<Duration>,
    during: Vec<Duration>,
}

/// Where the block's bytes move.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    UnderLock,
    TwoHalves,
    /// The same copies outside the pool (a control).
    NoPool,
}

fn run(mode: Mode, block: u64, rounds: usize) -> Result<Row, Box<dyn std::error::Error>> {
    let pool = Arc::new(Pool::new(
        HostSource::new(2 * MIB, 1 << 40),
        PoolConfig::default()
            .capacity(block + 64 * MIB)
            .cache_bytes_per_shard(0),
    )?);
    let log = Arc::new(Mutex::new(Vec::new()));
    let copier = Arc::new(Copier {
        two_halves: mode == Mode::TwoHalves,
        device: Arc::new(Mutex::new(vec![1u8; block as usize])),
        host: Arc::new(Mutex::new(vec![0u8; block as usize])),
        moves: Mutex::new(Vec::new()),
        log: log.clone(),
    });
    pool.set_evictor(copier.clone());
    let be = pool.add_owner(OwnerSpec::new("best-effort", block).tier(Tier::BestEffort))?;
    let g = pool.add_owner(OwnerSpec::new("guaranteed", block).tier(Tier::Guaranteed))?;
    let by = pool.add_owner(OwnerSpec::new("bystander", 32 * MIB))?;
    let (id, _) = pool.alloc_evictable(be, block, 0, StreamId(1))?;
    pool.unpin(&id)?;

    let stop = Arc::new(AtomicBool::new(false));
    let bystander = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut pairs = Vec::with_capacity(1 << 20);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                // Nothing is cached (see the config): each pair takes the central lock.
                match pool.alloc_aligned(by, MIB, 64 << 10, StreamId(3)) {
                    Ok(b) => {
                        let _ = pool.free(b);
                    }
                    Err(e) => eprintln!("bystander: {e}"),
                }
                pairs.push((t, Instant::now()));
            }
            pairs
        })
    };
    for _ in 0..rounds {
        if mode == Mode::NoPool {
            let start = Instant::now();
            copy(&copier.device, &copier.host);
            copier.moves.lock().unwrap().push((start, Instant::now()));
            copy(&copier.host, &copier.device);
            continue;
        }
        // The Guaranteed request takes the whole block's memory: an eviction.
        let b = pool.alloc(g, block, StreamId(2))?;
        pool.free(b)?;
        // Back in (a restore) and out of the way again.
        pool.pin(&id, StreamId(1))?;
        pool.unpin(&id)?;
    }
    stop.store(true, Ordering::Relaxed);
    let pairs = bystander.join().map_err(|_| "the bystander panicked")?;
    pool.free_evictable(id).map_err(|(_, e)| e)?;

    let mut moves = copier.moves.lock().unwrap().clone();
    moves.extend(log.lock().unwrap().iter().copied());
    // A pair counts as during a move if it overlapped one.
    let during: Vec<Duration> = pairs
        .iter()
        .filter(|(s, e)| moves.iter().any(|(ms, me)| s < me && e > ms))
        .map(|(s, e)| *e - *s)
        .collect();
    Ok(Row {
        moves: moves.iter().map(|(s, e)| *e - *s).collect(),
        during,
    })
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mut mib = 256u64;
    let mut rounds = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), v) {
            // The block is filled in host memory: at most 64 GiB.
            ("--mib", Some(v)) if (16..=65_536).contains(&v) => mib = v,
            ("--rounds", Some(v)) if (1..=1_000_000).contains(&v) => rounds = v as usize,
            _ => {
                eprintln!(
                    "usage: eviction_stall [--mib N (16 to 65536)] [--rounds R (1 to 1000000)]"
                );
                std::process::exit(2);
            }
        }
    }
    println!(
        "block {mib} MiB, {rounds} evictions per evictor; bystander pairs overlapping a move:"
    );
    println!(
        "| evictor | move, median ms | pairs during moves | pair p50 µs | pair p99 µs | pair max µs |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, mode) in [
        ("under the lock", Mode::UnderLock),
        ("two halves", Mode::TwoHalves),
        ("no pool (control)", Mode::NoPool),
    ] {
        match run(mode, mib * MIB, rounds) {
            Ok(mut r) => {
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                println!(
                    "| {name} | {:.1} | {} | {:.1} | {:.1} | {:.1} |",
                    pct(&mut r.moves, 0.5).as_secs_f64() * 1e3,
                    r.during.len(),
                    us(pct(&mut r.during, 0.5)),
                    us(pct(&mut r.during, 0.99)),
                    us(pct(&mut r.during, 1.0)),
                );
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        }
    }
}
