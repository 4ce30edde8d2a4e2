//! loom models of the pool's concurrency.
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_pool`.
#![cfg(loom)]

use gpushare_pool::{
    EvictError, EvictableId, Eviction, Evictor, FreeEvent, HostSource, OwnerId, OwnerSpec, Pool,
    PoolConfig, PoolError, PoolStats, RestoreInfo, StreamId, Tier, VictimInfo,
};
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

const G: u64 = 64 << 10;

/// Every mapped byte is free, pending or in use (none is retired in these models).
fn assert_mapped_accounted(st: &PoolStats) {
    assert_eq!(
        st.mapped_bytes,
        st.free_bytes + st.pending_bytes + st.in_use_bytes,
        "{st:?}"
    );
}

fn small_pool(cap: u64) -> Pool<HostSource> {
    Pool::new(
        HostSource::new(G, 1 << 20),
        PoolConfig::default()
            .capacity(cap)
            .shards(1)
            .max_owners_for_loom(),
    )
    .unwrap()
}

trait ForLoom {
    fn max_owners_for_loom(self) -> Self;
}
impl ForLoom for PoolConfig {
    fn max_owners_for_loom(mut self) -> Self {
        self.max_owners = 2;
        self
    }
}

#[test]
fn concurrent_alloc_and_free_under_a_quota() {
    loom::model(|| {
        let pool = Arc::new(small_pool(4 * G));
        // Room for one of the two blocks at a time: the two requests race for it.
        let o = pool.add_owner(OwnerSpec::new("o", G)).unwrap();
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                thread::spawn(move || match pool.alloc(o, G, StreamId(0)) {
                    Ok(b) => {
                        pool.free(b).unwrap();
                        true
                    }
                    Err(PoolError::QuotaExceeded { .. }) => false,
                    Err(e) => panic!("unexpected error: {e}"),
                })
            })
            .collect();
        let served = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&ok| ok)
            .count();
        // One of them held the quota first; the other got it after, or was refused.
        assert!(served >= 1, "both requests were refused");
        let s = pool.stats();
        assert_eq!(s.live_bytes, 0);
        assert!(s.owners[0].peak_in_use_bytes <= G, "the limit was exceeded");
        // The block is cached, yet the owner can still use its whole limit.
        let a = pool.alloc(o, G, StreamId(0)).unwrap();
        assert!(matches!(
            pool.alloc(o, G, StreamId(0)),
            Err(PoolError::QuotaExceeded { .. })
        ));
        pool.free(a).unwrap();
    });
}

/// Records, rather than panics on, a pinned block moving out: the pool contains an
/// evictor's panic (treating it as a failed eviction), which would hide the violation.
struct Guarded {
    in_use: Arc<AtomicBool>,
    evictions: Arc<AtomicUsize>,
    violated: Arc<AtomicBool>,
}

impl Guarded {
    fn new(in_use: Arc<AtomicBool>) -> Self {
        Guarded {
            in_use,
            evictions: Arc::new(AtomicUsize::new(0)),
            violated: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Evictor for Guarded {
    /// The move out finishes without the pool's lock, racing whatever runs meanwhile: the
    /// block must not be pinned (in use) when it starts, nor while its bytes move.
    fn evict(&self, _: &VictimInfo) -> Result<Eviction, EvictError> {
        if self.in_use.load(Ordering::SeqCst) {
            self.violated.store(true, Ordering::SeqCst);
        }
        let (in_use, evictions, violated) = (
            self.in_use.clone(),
            self.evictions.clone(),
            self.violated.clone(),
        );
        Ok(Eviction::in_flight(move || {
            if in_use.load(Ordering::SeqCst) {
                violated.store(true, Ordering::SeqCst);
            }
            evictions.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }))
    }
    fn restore(&self, _: &RestoreInfo) -> Result<(), EvictError> {
        Ok(())
    }
}

/// Give `pool` the evictor `guarded`, a BestEffort owner with one unpinned evictable block
/// of the whole pool, and a Guaranteed owner to ask for its memory.
fn one_victim(pool: &Pool<HostSource>, guarded: Guarded) -> (OwnerId, OwnerId, EvictableId) {
    pool.set_evictor(std::sync::Arc::new(guarded));
    let be = pool.add_owner(OwnerSpec::new("be", G)).unwrap();
    let g = pool
        .add_owner(OwnerSpec::new("g", G).tier(Tier::Guaranteed))
        .unwrap();
    let (id, _) = pool.alloc_evictable(be, G, 0, StreamId(0)).unwrap();
    pool.unpin(&id).unwrap();
    (be, g, id)
}

#[test]
fn eviction_racing_a_pin() {
    loom::model(|| {
        let pool = Arc::new(small_pool(G));
        let in_use = Arc::new(AtomicBool::new(false));
        let guarded = Guarded::new(in_use.clone());
        let violated = guarded.violated.clone();
        let (be, g, id) = one_victim(&pool, guarded);
        let p2 = pool.clone();
        let flag = in_use.clone();
        let t = thread::spawn(move || {
            // Pin (restoring if needed), use, unpin.
            let pinned = match p2.pin(&id, StreamId(1)) {
                Ok(pin) => {
                    flag.store(true, Ordering::SeqCst);
                    assert!(pin.size == G);
                    flag.store(false, Ordering::SeqCst);
                    p2.unpin(&id).unwrap();
                    true
                }
                Err(_) => false,
            };
            (id, pinned)
        });
        // Needs the whole pool: succeeds only by evicting the unpinned block.
        let r = pool.alloc(g, G, StreamId(0));
        let (id, pinned) = t.join().unwrap();
        assert!(
            !violated.load(Ordering::SeqCst),
            "a pinned block was evicted, or its bytes moved out while pinned"
        );
        // The memory went to one of them, whichever came first.
        assert!(r.is_ok() || pinned, "both the pin and the request failed");
        if let Ok(b) = r {
            pool.free(b).unwrap();
        }
        let _ = pool.free_evictable(id);
        // Whichever way the race went, the victim's owner is charged for nothing now.
        let stats = pool.stats();
        let victim = stats.owners.iter().find(|o| o.id == be).unwrap();
        assert_eq!((victim.live_bytes, victim.in_use_bytes), (0, 0));
    });
}

#[test]
fn a_request_waits_for_another_requests_eviction_in_flight() {
    loom::model(|| {
        let pool = Arc::new(
            Pool::new(
                HostSource::new(G, 1 << 20),
                PoolConfig {
                    max_owners: 3,
                    ..PoolConfig::default().capacity(2 * G).shards(1)
                },
            )
            .unwrap(),
        );
        let guarded = Guarded::new(Arc::new(AtomicBool::new(false)));
        let evictions = guarded.evictions.clone();
        pool.set_evictor(std::sync::Arc::new(guarded));
        let be = pool.add_owner(OwnerSpec::new("be", 2 * G)).unwrap();
        let (id, _) = pool.alloc_evictable(be, 2 * G, 0, StreamId(0)).unwrap();
        pool.unpin(&id).unwrap();
        let gs: Vec<_> = ["g1", "g2"]
            .iter()
            .map(|n| {
                pool.add_owner(OwnerSpec::new(*n, G).tier(Tier::Guaranteed))
                    .unwrap()
            })
            .collect();
        // Both need the one victim's memory. Whichever comes second, while the first one's
        // eviction moves the victim's bytes with the lock free, finds no other victim and
        // must wait for that move to end, not report out of memory.
        let t = {
            let pool = pool.clone();
            let g = gs[1];
            thread::spawn(move || pool.alloc(g, G, StreamId(2)))
        };
        let a = pool.alloc(gs[0], G, StreamId(1)).unwrap();
        let b = t.join().unwrap().unwrap();
        assert_eq!(evictions.load(Ordering::SeqCst), 1);
        let st = pool.stats();
        assert_eq!(st.owners[0].evicted_bytes, 2 * G);
        assert_eq!(st.in_use_bytes, 2 * G);
        pool.free(a).unwrap();
        pool.free(b).unwrap();
        pool.free_evictable(id).unwrap();
    });
}

struct LoomFlag(AtomicBool);
impl FreeEvent for LoomFlag {
    fn is_complete(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[test]
fn stream_ordered_reuse_across_two_streams() {
    loom::model(|| {
        let pool = Arc::new(small_pool(4 * G));
        let o = pool.add_owner(OwnerSpec::new("o", 4 * G)).unwrap();
        let a = pool.alloc(o, 4096, StreamId(1)).unwrap();
        let off = a.offset();
        let ev = std::sync::Arc::new(LoomFlag(AtomicBool::new(false)));
        pool.free_after(a, StreamId(1), ev.clone()).unwrap();
        let ev2 = ev.clone();
        let t = thread::spawn(move || ev2.0.store(true, Ordering::SeqCst));
        let b = pool.alloc(o, 4096, StreamId(2)).unwrap();
        if b.offset() == off {
            // Stream 2 may only have it once stream 1's work has completed.
            assert!(ev.0.load(Ordering::SeqCst));
        }
        t.join().unwrap();
        pool.free(b).unwrap();
    });
}

#[test]
fn a_probe_racing_a_cache_miss_keeps_accounting_exact() {
    loom::model(|| {
        let pool = Arc::new(small_pool(16 * G));
        let o = pool.add_owner(OwnerSpec::new("o", 16 * G)).unwrap();
        let s = StreamId(0);
        // Large blocks here are above 4 KiB (a sixteenth of a chunk). Eight of them cached
        // and returned unused make the shard refuse large blocks...
        let blocks: Vec<_> = (0..8u64)
            .map(|i| pool.alloc(o, 8192 + i * 1024, s).unwrap())
            .collect();
        for b in blocks {
            pool.free(b).unwrap();
        }
        pool.trim().unwrap();
        // ...so these frees go to the central allocator, and the next one is a probe.
        for _ in 0..15 {
            let b = pool.alloc(o, 8192, s).unwrap();
            pool.free(b).unwrap();
        }
        assert_eq!(pool.stats().cached_bytes, 0);
        let probe = pool.alloc(o, 8192, s).unwrap();
        let t = {
            let pool = pool.clone();
            // The probe goes in while a request of another size misses the cache and
            // returns whatever probe it finds.
            thread::spawn(move || pool.free(probe).unwrap())
        };
        let other = pool.alloc(o, 12 * 1024, s).unwrap();
        t.join().unwrap();
        pool.free(other).unwrap();
        let st = pool.stats();
        assert_eq!(st.live_bytes, 0);
        assert_eq!(st.allocs, st.frees);
        assert_mapped_accounted(&st);
        assert!(st.cached_bytes <= 12 * 1024);
        pool.trim().unwrap();
        assert_eq!(pool.stats().mapped_bytes, 0);
    });
}

#[test]
fn a_removed_owner_never_takes_its_successors_cached_block() {
    loom::model(|| {
        let pool = Arc::new(small_pool(4 * G));
        let old = pool.add_owner(OwnerSpec::new("old", 2 * G)).unwrap();
        // A cached block, so that `old`'s request takes the fast path.
        pool.free(pool.alloc(old, G, StreamId(0)).unwrap()).unwrap();
        let t = {
            let pool = pool.clone();
            thread::spawn(move || pool.alloc(old, G, StreamId(0)))
        };
        // The owner goes and another takes its slot and caches a block of the same size.
        let removed = pool.remove_owner(old).is_ok();
        let new = removed.then(|| {
            let new = pool.add_owner(OwnerSpec::new("new", 2 * G)).unwrap();
            pool.free(pool.alloc(new, G, StreamId(0)).unwrap()).unwrap();
            new
        });
        let got = t.join().unwrap();
        match (got, new) {
            // The request ran first: the owner held a block and could not be removed.
            (Ok(b), None) => pool.free(b).unwrap(),
            (Ok(b), Some(_)) => panic!("a removed owner took a block at {}", b.offset()),
            (Err(e), _) => assert!(matches!(e, PoolError::UnknownOwner(_)), "{e}"),
        }
        let s = pool.stats();
        assert_eq!(s.live_bytes, 0);
    });
}

#[test]
fn a_local_cache_and_another_owner_short_of_memory() {
    loom::model(|| {
        let pool = Arc::new(small_pool(2 * G));
        let a = pool.add_owner(OwnerSpec::new("a", 2 * G)).unwrap();
        let b = pool.add_owner(OwnerSpec::new("b", 2 * G)).unwrap();
        let t = {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut cache = pool.local_cache(a, 2 * G).unwrap();
                // Each block is held by the cache once freed; a call after `b` ran short
                // gives it back first.
                for _ in 0..2 {
                    match cache.alloc(G, StreamId(0)) {
                        Ok(x) => cache.free(x).unwrap(),
                        Err(e) => assert!(matches!(e, PoolError::OutOfMemory { .. }), "{e}"),
                    }
                }
            })
        };
        // `b` needs the whole pool: it gets it only while `a` holds nothing.
        match pool.alloc(b, 2 * G, StreamId(0)) {
            Ok(x) => pool.free(x).unwrap(),
            Err(e) => assert!(matches!(e, PoolError::OutOfMemory { .. }), "{e}"),
        }
        t.join().unwrap();
        // Whatever the order, the pool never handed out more than it has, and the cache
        // gave everything back when it was dropped: the whole pool is `b`'s again.
        let s = pool.stats();
        assert_eq!(s.live_bytes, 0);
        assert!(s.peak_in_use_bytes <= 2 * G);
        pool.free(pool.alloc(b, 2 * G, StreamId(0)).unwrap())
            .unwrap();
    });
}

#[test]
fn a_free_racing_an_evictions_move() {
    loom::model(|| {
        let pool = Arc::new(small_pool(G));
        let guarded = Guarded::new(Arc::new(AtomicBool::new(false)));
        let evictions = guarded.evictions.clone();
        let (be, g, id) = one_victim(&pool, guarded);
        let r = id.to_ref();
        // The free runs before, during or after the move out that the request starts.
        let t = {
            let pool = pool.clone();
            thread::spawn(move || pool.free_evictable(id).map_err(|(_, e)| e))
        };
        let got = pool.alloc(g, G, StreamId(0));
        t.join().unwrap().unwrap();
        // Freed once, whatever the order: gone for its reference, nothing of it charged.
        assert!(matches!(pool.is_resident(r), Err(PoolError::DoubleFree)));
        let s = pool.stats();
        assert_eq!(s.owners[0].in_use_bytes + s.owners[0].evicted_bytes, 0);
        assert!(evictions.load(Ordering::SeqCst) <= 1);
        // The request had the pool, or finds it free now.
        let b = got.or_else(|_| pool.alloc(g, G, StreamId(0))).unwrap();
        pool.free(b).unwrap();
        pool.remove_owner(be).unwrap();
    });
}

#[test]
fn removing_an_owner_races_the_free_of_its_last_block() {
    loom::model(|| {
        let pool = Arc::new(small_pool(4 * G));
        let o = pool.add_owner(OwnerSpec::new("o", 2 * G)).unwrap();
        let b = pool.alloc(o, G, StreamId(0)).unwrap();
        let t = {
            let pool = pool.clone();
            thread::spawn(move || pool.free(b).unwrap())
        };
        let removed = pool.remove_owner(o);
        t.join().unwrap();
        match removed {
            // The free came first, into the owner's cache, which the removal flushed.
            Ok(()) => {}
            // The block was still out: once it is back, the owner goes.
            Err(PoolError::OwnerBusy { .. }) => pool.remove_owner(o).unwrap(),
            Err(e) => panic!("unexpected error: {e}"),
        }
        // Nothing of the old owner is left behind: a new one in its slot gets all of it.
        let n = pool.add_owner(OwnerSpec::new("n", 4 * G)).unwrap();
        let whole = pool.alloc(n, 4 * G, StreamId(0)).unwrap();
        pool.free(whole).unwrap();
        let st = pool.stats();
        assert_eq!((st.live_bytes, st.allocs, st.frees), (0, 2, 2));
        assert_mapped_accounted(&st);
        pool.remove_owner(n).unwrap();
        pool.trim().unwrap();
        assert_eq!(pool.stats().mapped_bytes, 0);
    });
}

#[test]
fn a_stream_ordered_free_on_one_thread_and_a_request_on_another_stream_on_another() {
    loom::model(|| {
        let pool = Arc::new(small_pool(4 * G));
        let o = pool.add_owner(OwnerSpec::new("o", 4 * G)).unwrap();
        let a = pool.alloc(o, 4096, StreamId(1)).unwrap();
        let off = a.offset();
        let ev = std::sync::Arc::new(LoomFlag(AtomicBool::new(false)));
        let freer = {
            let (pool, ev) = (pool.clone(), ev.clone());
            thread::spawn(move || pool.free_after(a, StreamId(1), ev).unwrap())
        };
        let user = {
            let (pool, ev) = (pool.clone(), ev.clone());
            thread::spawn(move || {
                let b = pool.alloc(o, 4096, StreamId(2)).unwrap();
                // Stream 2 may have the memory only once stream 1's work has completed.
                assert!(b.offset() != off || ev.0.load(Ordering::SeqCst));
                pool.free(b).unwrap();
            })
        };
        ev.0.store(true, Ordering::SeqCst);
        freer.join().unwrap();
        user.join().unwrap();
        let st = pool.stats();
        assert_eq!(st.live_bytes, 0);
        assert_mapped_accounted(&st);
    });
}
