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

use gpushare_pool::{OwnerSpec, StreamId};
use parking_lot::Mutex;
use peers::*;

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
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let (batches, per) = if quick { (50, 1000) } else { (300, 1000) };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("# pool_bench\n");
    println!(
        "{} cores; medians over {batches} batches of {per} operations{}\n",
        cores,
        if quick { " (--quick)" } else { "" }
    );

    if run("hot") {
        println!("## Hot allocate+free pair (ns per pair, median)\n");
        println!("| size | gpushare pool | offset-allocator | mutex best-fit | pool ÷ offset-allocator |");
        println!("|---|---|---|---|---|");
        for (label, size) in [("256 B", 256), ("64 KiB", 64 * KIB), ("16 MiB", 16 * MIB)] {
            let g = hot_pair(&mut Gpushare::new(), size, batches, per);
            let o = hot_pair(&mut OffsetAlloc::new(), size, batches, per);
            let b = hot_pair(&mut BestFit::new(), size, batches, per);
            println!("| {label} | {g:.1} | {o:.1} | {b:.1} | {:.2}× |", g / o);
        }
    }
    if run("churn") {
        println!(
            "\n## Churn, mixed sizes 256 B–64 MiB (ns per free+alloc, median; footprint ÷ live)\n"
        );
        println!("| live blocks | gpushare pool | offset-allocator | mutex best-fit |");
        println!("|---|---|---|---|");
        for live in [1_000usize, 10_000, 100_000] {
            let pairs = if quick { 50_000 } else { 200_000 };
            let t = Churn::new(live, pairs, 42 + live as u64);
            let (g, gf) = t.run(&mut Gpushare::new(), per);
            let (o, of) = t.run(&mut OffsetAlloc::new(), per);
            let (b, bf) = t.run(&mut BestFit::new(), per);
            println!("| {live} | {g:.1} ({gf:.3}) | {o:.1} ({of:.3}) | {b:.1} ({bf:.3}) |");
        }
    }
    if run("replay") {
        println!("\n## Model-serving replay (ns per event, median; peak footprint ÷ peak live)\n");
        let (trace, ids) = serving_trace(if quick { 300 } else { 2000 }, 48, 7);
        println!(
            "{} events: weights of 3 models, per-request activations, KV-cache blocks, scratch\n",
            trace.len()
        );
        println!("| allocator | ns per event | footprint ÷ live |");
        println!("|---|---|---|");
        let (g, gf) = replay(&mut Gpushare::new(), &trace, ids);
        println!("| gpushare pool | {g:.1} | {gf:.3} |");
        let (o, of) = replay(&mut OffsetAlloc::new(), &trace, ids);
        println!("| offset-allocator | {o:.1} | {of:.3} |");
        let (b, bf) = replay(&mut BestFit::new(), &trace, ids);
        println!("| mutex best-fit | {b:.1} | {bf:.3} |");
    }
    if run("threads") {
        println!("\n## Thread scaling: 64 KiB hot pairs, one owner per thread (aggregate ns per pair, median)\n");
        println!("| threads | gpushare pool | offset-allocator (mutex) | mutex best-fit |");
        println!("|---|---|---|---|");
        let iters = if quick { 100_000 } else { 400_000 };
        let rounds = if quick { 3 } else { 7 };
        let mut counts = vec![1, 2, cores.max(4)];
        counts.dedup();
        for t in counts {
            let g = {
                let bench = Gpushare::new();
                let owners: Vec<_> = (0..t)
                    .map(|i| {
                        bench
                            .pool
                            .add_owner(OwnerSpec::new(format!("t{i}"), 1 << 40))
                            .unwrap()
                    })
                    .collect();
                scaling(t, iters, rounds, |i, n| {
                    for _ in 0..n {
                        let b = bench
                            .pool
                            .alloc(owners[i], 64 * KIB, StreamId(i as u64))
                            .unwrap();
                        bench.pool.free(std::hint::black_box(b)).unwrap();
                    }
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
            println!("| {t} | {g:.1} | {o:.1} | {b:.1} |");
        }
    }
}
