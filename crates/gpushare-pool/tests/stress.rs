//! Many threads allocating and freeing at once, across owners and streams, with quotas.

use gpushare_pool::{
    Block, FreeEvent, HostSource, OwnerSpec, Pool, PoolConfig, PoolError, PoolStats, StreamId,
};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Every mapped byte is free, pending or in use (none is retired here).
fn assert_mapped_accounted(s: &PoolStats) {
    assert_eq!(
        s.mapped_bytes,
        s.free_bytes + s.pending_bytes + s.in_use_bytes,
        "{s:?}"
    );
}

#[test]
fn many_threads_keep_accounting_exact() {
    let pool = Arc::new(
        Pool::new(
            HostSource::new(2 << 20, 1 << 32),
            PoolConfig::default().capacity(1 << 30).shards(8),
        )
        .unwrap(),
    );
    let owners: Vec<_> = (0..4)
        .map(|i| {
            pool.add_owner(OwnerSpec::new(format!("o{i}"), 96 << 20))
                .unwrap()
        })
        .collect();
    let threads = 8;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let pool = pool.clone();
            let owners = owners.clone();
            sc.spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ t as u64;
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut live = Vec::new();
                for _ in 0..20_000 {
                    let r = next();
                    if live.len() < 64 && r % 3 != 0 {
                        let owner = owners[(r >> 8) as usize % owners.len()];
                        let size = 1 + (r >> 16) % (1 << ((r >> 40) % 21));
                        match pool.alloc(owner, size, StreamId(t as u64 % 3)) {
                            Ok(b) => live.push(b),
                            Err(
                                PoolError::QuotaExceeded { .. } | PoolError::OutOfMemory { .. },
                            ) => {}
                            Err(e) => panic!("{e}"),
                        }
                    } else if !live.is_empty() {
                        let i = (r >> 20) as usize % live.len();
                        pool.free(live.swap_remove(i)).unwrap();
                    }
                    // Now and then a thread returns every cache to the central allocator
                    // and unmaps what it can, racing the others' cached frees and probes.
                    if r % 997 == 0 {
                        pool.trim().unwrap();
                    }
                }
                for b in live {
                    pool.free(b).unwrap();
                }
            });
        }
    });
    let s = pool.stats();
    assert_eq!(s.live_bytes, 0);
    assert_eq!(s.allocs, s.frees);
    for o in &s.owners {
        assert!(o.peak_in_use_bytes <= o.limit);
        assert_eq!(o.live_bytes, 0);
    }
    assert_mapped_accounted(&s);
    pool.trim().unwrap();
    assert_eq!(pool.stats().mapped_bytes, 0);
}

/// A freed block's order: its memory may go to owner `owner` on `stream` at once, and to
/// anyone else only once `event` has completed.
#[derive(Clone)]
struct Order {
    owner: usize,
    stream: u64,
    event: Arc<Work>,
}

/// The work an event stands for, completed by the "GPU" thread in each stream's order.
#[derive(Default)]
struct Work(AtomicBool);

impl FreeEvent for Work {
    fn is_complete(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the pool has handed out, and the orders that freed memory still carries; every
/// allocation is checked against both.
#[derive(Default)]
struct Checker {
    /// Live blocks by offset: their end, and the orders they inherited.
    live: BTreeMap<u64, (u64, Vec<Order>)>,
    /// Freed memory whose orders may not have completed: start, end, order.
    pending: Vec<(u64, u64, Order)>,
}

impl Checker {
    fn handed_out(&mut self, b: &Block, owner: usize, stream: u64) {
        let (start, end) = (b.offset(), b.offset() + b.size());
        if let Some((&s, &(e, _))) = self.live.range(..end).next_back() {
            assert!(
                e <= start,
                "{start:#x}..{end:#x} overlaps live {s:#x}..{e:#x}"
            );
        }
        let mut inherited = Vec::new();
        self.pending.retain(|(s, e, o)| {
            if *e <= start || *s >= end {
                return true;
            }
            if !o.event.is_complete() {
                assert!(
                    o.owner == owner && o.stream == stream,
                    "{start:#x}..{end:#x} went to owner {owner} on stream {stream} before the work of owner {} on stream {} that freed it completed",
                    o.owner,
                    o.stream
                );
                inherited.push(o.clone());
            }
            false
        });
        self.live.insert(start, (end, inherited));
    }

    /// Before `b` goes back: its memory keeps the orders it inherited, and `then`'s.
    fn giving_back(&mut self, b: &Block, then: Option<Order>) {
        let (end, inherited) = self.live.remove(&b.offset()).expect("a live block");
        for o in inherited.into_iter().chain(then) {
            self.pending.push((b.offset(), end, o));
        }
    }
}

#[test]
fn blocks_passed_between_threads_and_freed_in_stream_order_are_never_reused_early() {
    const STREAMS: u64 = 3;
    let pool = Arc::new(
        Pool::new(
            HostSource::new(2 << 20, 1 << 32),
            PoolConfig::default().capacity(256 << 20).shards(4),
        )
        .unwrap(),
    );
    let owners: Vec<_> = (0..2)
        .map(|i| {
            pool.add_owner(OwnerSpec::new(format!("o{i}"), 160 << 20))
                .unwrap()
        })
        .collect();
    let checker = Mutex::new(Checker::default());
    // Blocks one thread made and another frees, with their owner's index.
    let passed: Mutex<Vec<(Block, usize)>> = Mutex::new(Vec::new());
    // Each stream's work, in its order: the "GPU" completes the oldest first.
    let queues: Vec<Mutex<VecDeque<Arc<Work>>>> =
        (0..STREAMS).map(|_| Mutex::new(VecDeque::new())).collect();
    let stop = AtomicBool::new(false);
    let record = |stream: u64| {
        let w = Arc::new(Work::default());
        queues[stream as usize].lock().unwrap().push_back(w.clone());
        w
    };
    /// Stops the "GPU" when the workers are done, or one of them panicked.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    std::thread::scope(|sc| {
        let _stop = Stop(&stop);
        // The GPU: completes each stream's work in order, a little at a time.
        sc.spawn(|| {
            let mut k = 0usize;
            while !stop.load(Ordering::Acquire) {
                k += 1;
                let mut q = queues[k % STREAMS as usize].lock().unwrap();
                // Up to three of that stream's events (a count that does not follow the
                // stream: each stream's work completes during the run).
                for _ in 0..(k / STREAMS as usize) % 4 {
                    if let Some(w) = q.pop_front() {
                        w.0.store(true, Ordering::Release);
                    }
                }
                drop(q);
                std::thread::yield_now();
            }
        });
        let workers: Vec<_> = (0..6u64)
            .map(|t| {
                let (pool, owners, checker, passed, record) =
                    (&pool, &owners, &checker, &passed, &record);
                sc.spawn(move || {
                    let stream = t % STREAMS;
                    let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ (t + 1).wrapping_mul(0x9E37_79B9);
                    let mut next = || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    let mut live: Vec<(Block, usize)> = Vec::new();
                    for _ in 0..6_000 {
                        let r = next();
                        match r % 8 {
                            0..=3 if live.len() < 48 => {
                                let oi = (r >> 8) as usize % owners.len();
                                let size = 1 + (r >> 16) % (1 << (8 + (r >> 40) % 13));
                                let align = [256, 256, 4096, 65536][(r >> 24) as usize % 4];
                                match pool.alloc_aligned(owners[oi], size, align, StreamId(stream))
                                {
                                    Ok(b) => {
                                        assert_eq!(pool.addr(&b) % align, 0);
                                        checker.lock().unwrap().handed_out(&b, oi, stream);
                                        live.push((b, oi));
                                    }
                                    Err(
                                        PoolError::QuotaExceeded { .. }
                                        | PoolError::OutOfMemory { .. },
                                    ) => {}
                                    Err(e) => panic!("{e}"),
                                }
                            }
                            // Pass a block to whichever thread frees it.
                            4 if !live.is_empty() => {
                                let i = (r >> 20) as usize % live.len();
                                passed.lock().unwrap().push(live.swap_remove(i));
                            }
                            _ => {
                                let from_others = r % 2 == 0;
                                let taken = if from_others {
                                    passed.lock().unwrap().pop()
                                } else if live.is_empty() {
                                    None
                                } else {
                                    let i = (r >> 20) as usize % live.len();
                                    Some(live.swap_remove(i))
                                };
                                let Some((b, oi)) = taken else { continue };
                                if r % 3 == 0 {
                                    checker.lock().unwrap().giving_back(&b, None);
                                    pool.free(b).unwrap();
                                } else {
                                    // Its last use is work queued on this thread's stream.
                                    let event = record(stream);
                                    let order = Order {
                                        owner: oi,
                                        stream,
                                        event: event.clone(),
                                    };
                                    checker.lock().unwrap().giving_back(&b, Some(order));
                                    pool.free_after(b, StreamId(stream), event).unwrap();
                                }
                            }
                        }
                    }
                    for (b, _) in live {
                        checker.lock().unwrap().giving_back(&b, None);
                        pool.free(b).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    });
    for (b, _) in passed.into_inner().unwrap() {
        checker.lock().unwrap().giving_back(&b, None);
        pool.free(b).unwrap();
    }
    for q in &queues {
        for w in q.lock().unwrap().drain(..) {
            w.0.store(true, Ordering::Release);
        }
    }
    let s = pool.stats();
    assert_eq!((s.live_bytes, s.allocs), (0, s.frees));
    for o in &s.owners {
        assert!(o.peak_in_use_bytes <= o.limit);
    }
    assert_mapped_accounted(&s);
    pool.trim().unwrap();
    let s = pool.stats();
    assert_eq!((s.mapped_bytes, s.pending_bytes), (0, 0));
}
