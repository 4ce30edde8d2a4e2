//! Runs gpushare's pool and its peers (the `offset-allocator` crate and a mutex-guarded
//! best-fit allocator) side by side on the same traces, and prints markdown tables:
//! hot allocate+free pairs, churn at 1k/10k/100k live blocks, a model-serving replay, and
//! thread scaling. Figures are medians over batches; fragmentation is peak footprint ÷
//! peak live bytes (footprint: bytes mapped by the pool, highest end offset for the peers).
//!
//! ```text
//! cargo run --release -p gpushare-pool --example pool_bench [-- --quick] [--only hot|churn|replay|threads]
//! ```

#[path = "../benches/support/peers.rs"]
mod peers;

use gpushare_pool::{OwnerId, OwnerSpec, StreamId};
use parking_lot::Mutex;
use peers::*;

/// Seeds of the serving traces: footprint depends on the exact sequence, so one trace
/// alone would rank allocators by luck.
const REPLAY_SEEDS: [u64; 5] = [7, 1, 2, 3, 4];

/// Replay every trace on a fresh allocator from `make` and print one table row.
fn replay_row<A: Alloc>(traces: &[(Vec<Ev>, usize)], make: impl Fn() -> A) {
    let mut ns = Vec::new();
    let mut frag = Vec::new();
    let mut name = "";
    for (trace, ids) in traces {
        let mut a = make();
        name = a.name();
        let (n, f) = replay(&mut a, trace, *ids);
        ns.push(n);
        frag.push(f);
    }
    let mean = frag.iter().sum::<f64>() / frag.len() as f64;
    let worst = frag.iter().copied().fold(0.0, f64::max);
    let each: Vec<String> = frag.iter().map(|f| format!("{f:.3}")).collect();
    println!(
        "| {name} | {:.1} | {mean:.3} | {worst:.3} | {} |",
        median(ns),
        each.join(" ")
    );
}

/// A pool with `n` owners, one per thread.
/// `n` hot pairs of 64 KiB on the shared path. One function for both columns that use it,
/// so that both run the same code: as two closures, rustc compiled them differently, and
/// one column ran 7 ns a pair slower than the other (and than `hot_loop`).
#[inline(never)]
fn shared_pairs(
    pool: &gpushare_pool::Pool<gpushare_pool::HostSource>,
    owner: OwnerId,
    stream: StreamId,
    n: usize,
) {
    for _ in 0..n {
        let b = pool.alloc(owner, 64 * KIB, stream).unwrap();
        pool.free(std::hint::black_box(b)).unwrap();
    }
}

fn with_owners(n: usize) -> (Gpushare, Vec<OwnerId>) {
    let bench = Gpushare::new();
    let owners = (0..n)
        .map(|i| {
            bench
                .pool
                .add_owner(OwnerSpec::new(format!("t{i}"), 1 << 40))
                .unwrap()
        })
        .collect();
    (bench, owners)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: pool_bench [--quick] [--only hot|churn|replay|threads]");
        return;
    }
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| args.get(i + 1).cloned());
    let only = match only {
        Some(Some(o)) if ["hot", "churn", "replay", "threads"].contains(&o.as_str()) => Some(o),
        Some(_) => {
            eprintln!("--only needs one of hot, churn, replay, threads");
            std::process::exit(2);
        }
        None => None,
    };
    // Anything else is a mistyped flag, not to be ignored.
    let mut rest = args.iter().filter(|a| *a != "--quick");
    while let Some(a) = rest.next() {
        if a == "--only" {
            rest.next();
        } else {
            eprintln!("unknown argument {a:?}\nusage: pool_bench [--quick] [--only hot|churn|replay|threads]");
            std::process::exit(2);
        }
    }
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let (batches, per) = if quick { (50, 1000) } else { (300, 1000) };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("# pool_bench\n");
    println!(
        "{} cores{}; each table says what its medians are taken over\n",
        cores,
        if quick { " (--quick)" } else { "" }
    );

    if run("hot") {
        println!("## Hot allocate+free pair (ns per pair, median)\n");
        println!("Medians over {batches} batches of {per} pairs.\n");
        println!("| size | gpushare pool | gpushare local cache | offset-allocator | mutex best-fit | pool ÷ offset-allocator | local cache ÷ offset-allocator |");
        println!("|---|---|---|---|---|---|---|");
        for (label, size) in [("256 B", 256), ("64 KiB", 64 * KIB), ("16 MiB", 16 * MIB)] {
            let g = hot_pair(&mut Gpushare::new(), size, batches, per);
            let l = {
                let bench = Gpushare::new();
                let mut local = Local(bench.pool.local_cache(bench.owner, 64 * MIB).unwrap());
                hot_pair(&mut local, size, batches, per)
            };
            let o = hot_pair(&mut OffsetAlloc::new(), size, batches, per);
            let b = hot_pair(&mut BestFit::new(), size, batches, per);
            println!(
                "| {label} | {g:.1} | {l:.1} | {o:.1} | {b:.1} | {:.2}× | {:.2}× |",
                g / o,
                l / o
            );
        }
    }
    if run("churn") {
        println!(
            "\n## Churn, mixed sizes 256 B–64 MiB (ns per free+alloc, median; footprint ÷ live)\n"
        );
        let pairs = if quick { 50_000 } else { 200_000 };
        println!(
            "Medians over {} batches of {per} pairs, after each allocator is filled.\n",
            pairs / per
        );
        println!("| live blocks | gpushare pool | offset-allocator | mutex best-fit |");
        println!("|---|---|---|---|");
        for live in [1_000usize, 10_000, 100_000] {
            let t = Churn::new(live, pairs, 42 + live as u64);
            let (g, gf) = t.run(&mut Gpushare::new(), per);
            let (o, of) = t.run(&mut OffsetAlloc::new(), per);
            let (b, bf) = t.run(&mut BestFit::new(), per);
            println!("| {live} | {g:.1} ({gf:.3}) | {o:.1} ({of:.3}) | {b:.1} ({bf:.3}) |");
        }
    }
    if run("replay") {
        println!("\n## Model-serving replay (ns per event; peak footprint ÷ peak live)\n");
        let requests = if quick { 300 } else { 2000 };
        let traces: Vec<_> = REPLAY_SEEDS
            .iter()
            .map(|&seed| serving_trace(requests, 48, seed))
            .collect();
        println!(
            "{} traces (seeds {REPLAY_SEEDS:?}) of about {} events: weights of 3 models, \
             per-request activations, KV-cache blocks, scratch. ns: median over the traces of \
             each trace's median batch of 1000 events; footprint: mean and worst over the \
             traces.\n",
            traces.len(),
            traces[0].0.len()
        );
        println!("| allocator | ns per event | footprint ÷ live, mean | worst | per seed |");
        println!("|---|---|---|---|---|");
        replay_row(&traces, Gpushare::new);
        replay_row(&traces, OffsetAlloc::new);
        replay_row(&traces, || {
            Locked::new(OffsetAlloc::new(), "offset-allocator + mutex")
        });
        replay_row(&traces, BestFit::new);
    }
    if run("threads") {
        println!("\n## Thread scaling: 64 KiB hot pairs (aggregate ns per pair, median)\n");
        let iters = if quick { 100_000 } else { 400_000 };
        let rounds = if quick { 3 } else { 7 };
        println!(
            "Medians over {rounds} rounds of {iters} pairs per thread. The pool's first two \
             columns give each thread an owner of its own (a tenant: nothing shared but the \
             central allocator, which hot pairs do not reach); the third puts every thread \
             on one owner, whose per-thread cache shards it then shares. The peers are one \
             allocator behind one lock.\n"
        );
        println!("| threads | gpushare pool, owner per thread | gpushare local caches, owner per thread | gpushare pool, one owner | offset-allocator (mutex) | mutex best-fit |");
        println!("|---|---|---|---|---|---|");
        let mut counts = vec![1, 2, cores.max(4)];
        counts.dedup();
        for t in counts {
            let g = {
                let (bench, owners) = with_owners(t);
                scaling(t, iters, rounds, |i, n| {
                    shared_pairs(&bench.pool, owners[i], StreamId(i as u64), n)
                })
            };
            let l = {
                let (bench, owners) = with_owners(t);
                scaling(t, iters, rounds, |i, n| {
                    let mut cache = bench.pool.local_cache(owners[i], 64 * MIB).unwrap();
                    for _ in 0..n {
                        let b = cache.alloc(64 * KIB, StreamId(i as u64)).unwrap();
                        cache.free(std::hint::black_box(b)).unwrap();
                    }
                })
            };
            let one = {
                let (bench, owners) = with_owners(1);
                scaling(t, iters, rounds, |i, n| {
                    shared_pairs(&bench.pool, owners[0], StreamId(i as u64), n)
                })
            };
            let o = {
                let a = Mutex::new(OffsetAlloc::new());
                scaling(t, iters, rounds, |_, n| {
                    for _ in 0..n {
                        let h = a.lock().alloc(64 * KIB).unwrap();
                        a.lock().free(std::hint::black_box(h));
                    }
                })
            };
            let b = {
                let a = BestFit::new();
                scaling(t, iters, rounds, |_, n| {
                    for _ in 0..n {
                        let h = a.alloc_shared(64 * KIB).unwrap();
                        a.free_shared(std::hint::black_box(h));
                    }
                })
            };
            println!("| {t} | {g:.1} | {l:.1} | {one:.1} | {o:.1} | {b:.1} |");
        }
    }
}
