//! The per-thread local cache in front of a pool: what it keeps, what it gives back and when.

mod common;

use gpushare_pool::{
    Block, HostSource, LocalCache, OwnerId, OwnerSpec, Pool, PoolConfig, PoolError, StreamId,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, Mutex};

const MIB: u64 = 1 << 20;
const S1: StreamId = StreamId(1);

fn pool(cfg: PoolConfig) -> Pool<HostSource> {
    Pool::new(HostSource::new(2 * MIB, 1 << 30), cfg).unwrap()
}

fn live(p: &Pool<HostSource>, o: OwnerId) -> u64 {
    p.stats()
        .owners
        .iter()
        .find(|s| s.id == o)
        .map_or(0, |s| s.live_bytes)
}

/// Allocate `n` blocks of `size` through the cache and free them back into it.
fn fill(c: &mut LocalCache<'_, HostSource>, n: usize, size: u64) {
    let blocks: Vec<Block> = (0..n).map(|_| c.alloc(size, S1).unwrap()).collect();
    for b in blocks {
        c.free(b).unwrap();
    }
}

#[test]
fn a_freed_block_comes_back_from_the_cache_without_the_pool() {
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 64 * MIB)).unwrap();
    let mut c = p.local_cache(o, 8 * MIB).unwrap();
    let a = c.alloc(64 << 10, S1).unwrap();
    let offset = a.offset();
    c.free(a).unwrap();
    let allocs = p.stats().allocs;
    for _ in 0..100 {
        let b = c.alloc(64 << 10, S1).unwrap();
        assert_eq!(b.offset(), offset);
        c.free(b).unwrap();
    }
    assert_eq!(p.stats().allocs, allocs, "hits never reach the pool");
    let s = c.stats();
    assert_eq!((s.hits, s.misses), (100, 1));
    assert_eq!((s.held_blocks, s.held_bytes), (1, 64 << 10));
}

#[test]
fn held_blocks_count_as_the_owners_and_go_back_when_the_cache_is_dropped() {
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 64 * MIB)).unwrap();
    let mut c = p.local_cache(o, 8 * MIB).unwrap();
    fill(&mut c, 4, MIB);
    assert_eq!(live(&p, o), 4 * MIB);
    assert!(matches!(
        p.remove_owner(o),
        Err(PoolError::OwnerBusy { bytes, .. }) if bytes == 4 * MIB
    ));
    drop(c);
    assert_eq!(live(&p, o), 0);
    p.remove_owner(o).unwrap();
    assert_eq!(p.stats().live_bytes, 0);
}

#[test]
fn the_budget_bounds_what_the_cache_holds() {
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 64 * MIB)).unwrap();
    let mut c = p.local_cache(o, MIB).unwrap();
    fill(&mut c, 3, 512 << 10);
    assert_eq!(c.stats().held_bytes, MIB);
    assert_eq!(live(&p, o), MIB, "the third block went back to the pool");
    assert_eq!(c.flush(), MIB);
    assert_eq!(live(&p, o), 0);
    assert_eq!(c.stats().flushes, 1);
}

#[test]
fn a_request_over_the_owners_limit_gives_the_held_blocks_back_and_is_served() {
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 8 * MIB)).unwrap();
    let mut c = p.local_cache(o, 8 * MIB).unwrap();
    fill(&mut c, 4, 2 * MIB);
    // All 8 MiB of the limit are held by the cache; a request of another size needs them.
    let big = c.alloc(6 * MIB, S1).unwrap();
    assert_eq!(c.stats().held_bytes, 0);
    assert_eq!(live(&p, o), 6 * MIB);
    c.free(big).unwrap();
}

#[test]
fn a_request_the_pool_cannot_place_gives_the_held_blocks_back_and_is_served() {
    let p = pool(PoolConfig::default().capacity(8 * MIB));
    let a = p.add_owner(OwnerSpec::new("a", 64 * MIB)).unwrap();
    let mut c = p.local_cache(a, 8 * MIB).unwrap();
    fill(&mut c, 8, MIB);
    let big = c.alloc(7 * MIB, S1).unwrap();
    assert_eq!(big.size(), 7 * MIB);
    c.free(big).unwrap();
}

#[test]
fn the_pool_running_short_elsewhere_makes_the_cache_give_back_at_its_next_call() {
    let p = pool(PoolConfig::default().capacity(8 * MIB));
    let a = p.add_owner(OwnerSpec::new("a", 8 * MIB)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 8 * MIB)).unwrap();
    let mut c = p.local_cache(a, 8 * MIB).unwrap();
    fill(&mut c, 6, MIB);
    // Owner b needs more than is left: the pool asks, but the cache is not called.
    assert!(p.alloc(b, 4 * MIB, S1).is_err());
    assert_eq!(live(&p, a), 6 * MIB);
    // At its next call the cache gives everything back first, then serves the request
    // from the pool.
    let small = c.alloc(256, S1).unwrap();
    assert_eq!(c.stats().flushes, 1);
    assert_eq!(c.stats().held_bytes, 0);
    assert_eq!(live(&p, a), 256);
    let x = p.alloc(b, 4 * MIB, S1).unwrap();
    p.free(x).unwrap();
    c.free(small).unwrap();
    // A trim asks too; a free is a call.
    p.trim().unwrap();
    let y = c.alloc(MIB, S1).unwrap();
    c.free(y).unwrap();
    assert_eq!(c.stats().flushes, 2);
}

#[test]
fn an_owners_limit_asks_only_that_owners_caches() {
    let p = pool(PoolConfig::default());
    let a = p.add_owner(OwnerSpec::new("a", 4 * MIB)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 64 * MIB)).unwrap();
    let mut ca = p.local_cache(a, 8 * MIB).unwrap();
    let mut cb = p.local_cache(b, 8 * MIB).unwrap();
    fill(&mut ca, 2, MIB);
    fill(&mut cb, 2, MIB);
    // `a` asks past its limit, its cache holding half of it.
    assert!(matches!(
        p.alloc(a, 3 * MIB, S1),
        Err(PoolError::QuotaExceeded { .. })
    ));
    // `b`'s cache keeps its blocks; `a`'s gives them back at its next call.
    let x = cb.alloc(MIB, S1).unwrap();
    assert_eq!((cb.stats().flushes, cb.stats().hits), (0, 1));
    let y = ca.alloc(256, S1).unwrap();
    assert_eq!(ca.stats().flushes, 1);
    assert_eq!(live(&p, a), 256);
    cb.free(x).unwrap();
    ca.free(y).unwrap();
}

#[test]
fn a_miss_gives_the_caches_blocks_back_before_anyones_buffer_is_evicted() {
    let p = pool(
        PoolConfig::default()
            .capacity(8 * MIB)
            .cache_bytes_per_shard(0),
    );
    let rec = Arc::new(common::Recorder::default());
    p.set_evictor(rec.clone());
    let a = p.add_owner(OwnerSpec::new("a", 16 * MIB)).unwrap();
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let (victim, _) = p.alloc_evictable(be, 2 * MIB, 0, S1).unwrap();
    p.unpin(&victim).unwrap();
    let mut c = p.local_cache(a, 8 * MIB).unwrap();
    // The pool is full: 6 MiB idle in the cache, 2 MiB of `be`'s evictable buffer.
    fill(&mut c, 3, 2 * MIB);
    let big = c.alloc(4 * MIB, S1).unwrap();
    assert!(
        rec.evicted.lock().unwrap().is_empty(),
        "evicted for idle blocks"
    );
    assert!(p.is_resident(&victim).unwrap());
    assert_eq!(c.stats().held_bytes, 0);
    c.free(big).unwrap();
    drop(c);
    p.free_evictable(victim).map_err(|(_, e)| e).unwrap();
}

#[test]
fn blocks_of_other_owners_go_to_the_pool_and_of_other_pools_come_back() {
    let p = pool(PoolConfig::default());
    let a = p.add_owner(OwnerSpec::new("a", 64 * MIB)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 64 * MIB)).unwrap();
    let mut c = p.local_cache(a, 8 * MIB).unwrap();
    let theirs = p.alloc(b, MIB, S1).unwrap();
    c.free(theirs).unwrap();
    assert_eq!(live(&p, b), 0);
    assert_eq!(c.stats().held_blocks, 0);

    let q = pool(PoolConfig::default());
    let qo = q.add_owner(OwnerSpec::new("q", 64 * MIB)).unwrap();
    let foreign = q.alloc(qo, MIB, S1).unwrap();
    let back = c.free(foreign).unwrap_err().block;
    q.free(back).unwrap();
    assert_eq!(c.stats().held_blocks, 0);
}

#[test]
fn an_unknown_owner_is_refused() {
    let p = pool(PoolConfig::default());
    let a = p.add_owner(OwnerSpec::new("a", 64 * MIB)).unwrap();
    p.remove_owner(a).unwrap();
    assert!(matches!(
        p.local_cache(a, MIB),
        Err(PoolError::UnknownOwner(_))
    ));
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(u64),
    Free(usize),
    Flush,
    Direct(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u64..=3 * MIB).prop_map(Op::Alloc),
        1 => prop::sample::select(vec![256u64, 4096, 64 << 10, MIB]).prop_map(Op::Alloc),
        5 => any::<usize>().prop_map(Op::Free),
        1 => Just(Op::Flush),
        1 => (1u64..=2 * MIB).prop_map(Op::Direct),
    ]
}

/// Checks after every step: each live block is at least its request and overlaps no other,
/// and the owner's live bytes in the pool are what the caller holds plus what the cache
/// holds.
fn check(p: &Pool<HostSource>, o: OwnerId, c: &LocalCache<'_, HostSource>, held: &[(Block, u64)]) {
    let mut spans: Vec<(u64, u64)> = held
        .iter()
        .map(|(b, req)| {
            assert!(b.size() >= *req);
            (b.offset(), b.offset() + b.size())
        })
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "live blocks overlap: {w:?}");
    }
    let mine: u64 = held.iter().map(|(b, _)| b.size()).sum();
    assert_eq!(live(p, o), mine + c.stats().held_bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn the_cache_never_hands_out_a_block_twice_and_accounts_exactly(
        ops in prop::collection::vec(op(), 1..200),
        budget in prop::sample::select(vec![0u64, MIB, 8 * MIB]),
    ) {
        let p = pool(PoolConfig::default().capacity(32 * MIB));
        let o = p.add_owner(OwnerSpec::new("a", 24 * MIB)).unwrap();
        let mut c = p.local_cache(o, budget).unwrap();
        let mut held: Vec<(Block, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(size) => match c.alloc(size, S1) {
                    Ok(b) => held.push((b, size)),
                    Err(PoolError::QuotaExceeded { .. } | PoolError::OutOfMemory { .. }) => {
                        // Refused only once the cache holds nothing more to give back.
                        prop_assert_eq!(c.stats().held_bytes, 0);
                    }
                    Err(e) => panic!("unexpected error {e}"),
                },
                Op::Direct(size) => {
                    if let Ok(b) = p.alloc(o, size, S1) {
                        held.push((b, size));
                    }
                }
                Op::Free(i) if !held.is_empty() => {
                    let (b, _) = held.swap_remove(i % held.len());
                    c.free(b).unwrap();
                }
                Op::Free(_) => {}
                Op::Flush => {
                    c.flush();
                }
            }
            check(&p, o, &c, &held);
        }
        for (b, _) in held {
            c.free(b).unwrap();
        }
        drop(c);
        prop_assert_eq!(p.stats().live_bytes, 0);
    }
}

#[test]
fn many_threads_with_their_own_caches_share_a_pool_that_runs_short() {
    const THREADS: usize = 8;
    let p = Arc::new(pool(PoolConfig::default().capacity(64 * MIB)));
    let owners: Vec<OwnerId> = (0..THREADS)
        .map(|i| {
            p.add_owner(OwnerSpec::new(format!("t{i}"), 24 * MIB))
                .unwrap()
        })
        .collect();
    // Every live block, by offset: a block handed out twice shows as an overlap.
    let spans = Arc::new(Mutex::new(BTreeMap::<u64, u64>::new()));
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = owners
        .iter()
        .enumerate()
        .map(|(t, &o)| {
            let (p, spans, start) = (p.clone(), spans.clone(), start.clone());
            std::thread::spawn(move || {
                let mut c = p.local_cache(o, 4 * MIB).unwrap();
                let mut mine: Vec<Block> = Vec::new();
                let mut x = t as u64 * 7919 + 1;
                start.wait();
                for _ in 0..20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if !x.is_multiple_of(3) || mine.is_empty() {
                        let size = [256, 4096, 64 << 10, MIB, 3 * MIB][(x >> 8) as usize % 5];
                        if let Ok(b) = c.alloc(size, S1) {
                            let mut s = spans.lock().unwrap();
                            let (lo, hi) = (b.offset(), b.offset() + b.size());
                            if let Some((&o2, &e2)) = s.range(..hi).next_back() {
                                assert!(e2 <= lo || o2 >= hi, "overlap at {lo}");
                            }
                            s.insert(lo, hi);
                            drop(s);
                            mine.push(b);
                        }
                    } else {
                        let b = mine.swap_remove((x >> 16) as usize % mine.len());
                        spans.lock().unwrap().remove(&b.offset());
                        c.free(b).unwrap();
                    }
                    if mine.len() > 12 {
                        let b = mine.swap_remove(0);
                        spans.lock().unwrap().remove(&b.offset());
                        c.free(b).unwrap();
                    }
                }
                for b in mine {
                    spans.lock().unwrap().remove(&b.offset());
                    c.free(b).unwrap();
                }
                c.stats()
            })
        })
        .collect();
    let (mut hits, mut flushes) = (0, 0);
    for t in threads {
        let s = t.join().unwrap();
        hits += s.hits;
        flushes += s.flushes;
    }
    assert!(hits > 0);
    // The pool ran short and the caches gave back (each flushes once more when dropped).
    assert!(flushes > THREADS as u64, "{flushes} flushes");
    let s = p.stats();
    assert_eq!(s.live_bytes, 0);
    for o in owners {
        p.remove_owner(o).unwrap();
    }
}
