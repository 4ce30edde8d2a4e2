//! Criterion benches of the pool against its peers on the same traces (see
//! `examples/pool_bench.rs` for the full table, including churn at 100k live and thread
//! scaling).

#[path = "support/peers.rs"]
mod peers;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use peers::*;
use std::hint::black_box;

fn hot_pairs(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_pair");
    for (label, size) in [("256B", 256u64), ("64KiB", 64 * KIB), ("16MiB", 16 * MIB)] {
        let mut pool = Gpushare::new();
        g.bench_function(BenchmarkId::new("gpushare", label), |b| {
            b.iter(|| {
                let h = pool.alloc(black_box(size)).unwrap();
                pool.free(black_box(h));
            })
        });
        let shared = Gpushare::new();
        let mut local = Local(shared.pool.local_cache(shared.owner, 64 * MIB).unwrap());
        g.bench_function(BenchmarkId::new("gpushare local cache", label), |b| {
            b.iter(|| {
                let h = local.alloc(black_box(size)).unwrap();
                local.free(black_box(h));
            })
        });
        drop(local);
        let mut oa = OffsetAlloc::new();
        g.bench_function(BenchmarkId::new("offset-allocator", label), |b| {
            b.iter(|| {
                let h = oa.alloc(black_box(size)).unwrap();
                oa.free(black_box(h));
            })
        });
        let mut bf = BestFit::new();
        g.bench_function(BenchmarkId::new("best-fit", label), |b| {
            b.iter(|| {
                let h = bf.alloc(black_box(size)).unwrap();
                bf.free(black_box(h));
            })
        });
    }
    g.finish();
}

/// Steady-state churn: one allocation of a random size in place of a random live block, and
/// the free of that block.
fn churn<A: Alloc>(c: &mut Criterion, name: &str, live: usize, mut a: A) {
    let t = Churn::new(live, 1 << 16, 99);
    let mut held: Vec<A::H> = t.fill.iter().map(|&s| a.alloc(s).unwrap()).collect();
    let mut i = 0usize;
    c.bench_function(&format!("churn_{live}/{name}"), |b| {
        b.iter(|| {
            let k = t.victims[i % t.victims.len()];
            let s = t.sizes[i % t.sizes.len()];
            i += 1;
            let old = std::mem::replace(&mut held[k], a.alloc(black_box(s)).unwrap());
            a.free(old);
        })
    });
    for h in held {
        a.free(h);
    }
}

fn churns(c: &mut Criterion) {
    for live in [1_000, 10_000] {
        churn(c, "gpushare", live, Gpushare::new());
        churn(c, "offset-allocator", live, OffsetAlloc::new());
        churn(c, "best-fit", live, BestFit::new());
    }
}

fn replays(c: &mut Criterion) {
    let (trace, ids) = serving_trace(200, 32, 7);
    let mut g = c.benchmark_group("serving_replay");
    g.sample_size(10);
    g.bench_function("gpushare", |b| {
        b.iter_batched(
            Gpushare::new,
            // The allocator goes back with the result, to be dropped outside the timing.
            |mut a| (replay(&mut a, &trace, ids), a),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("offset-allocator", |b| {
        b.iter_batched(
            OffsetAlloc::new,
            // The allocator goes back with the result, to be dropped outside the timing.
            |mut a| (replay(&mut a, &trace, ids), a),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("best-fit", |b| {
        b.iter_batched(
            BestFit::new,
            // The allocator goes back with the result, to be dropped outside the timing.
            |mut a| (replay(&mut a, &trace, ids), a),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, hot_pairs, churns, replays);
criterion_main!(benches);
