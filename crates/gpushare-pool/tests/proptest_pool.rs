//! Random operation sequences; after every step: live blocks never overlap, each owner's
//! accounting equals the sum of its live blocks, no limit is exceeded, and the global
//! figures add up.

mod common;

use common::{Flag, Recorder, Work};
use gpushare_pool::FreeEvent;
use gpushare_pool::{
    Block, BlockState, ChunkSource, EvictableId, HostSource, OwnerId, OwnerSpec, Pool, PoolConfig,
    PoolError, StreamId, Tier,
};
use proptest::prelude::*;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        owner: usize,
        size: u64,
        stream: u64,
        align_log: u32,
    },
    Free {
        pick: usize,
    },
    FreeAfter {
        pick: usize,
        stream: u64,
    },
    CompleteEvents,
    AllocEvictable {
        owner: usize,
        size: u64,
    },
    Pin {
        pick: usize,
    },
    Unpin {
        pick: usize,
    },
    UnpinAfter {
        pick: usize,
        stream: u64,
    },
    FreeEvictable {
        pick: usize,
    },
    Trim,
}

/// Alignments of the requests, as powers of two: 256 B half the time, then 1 KiB to
/// 2 MiB (the granularity, the largest allowed), and 4 MiB (refused).
const ALIGN_LOGS: [u32; 12] = [8, 8, 8, 8, 8, 8, 10, 13, 16, 19, 21, 22];

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![1u64..4096, 4096u64..(256 << 10), (256u64 << 10)..(6 * MIB)];
    prop_oneof![
        4 => (0usize..3, size.clone(), 0u64..3, 0u32..12).prop_map(|(owner, size, stream, a)| Op::Alloc {
            owner, size, stream, align_log: ALIGN_LOGS[a as usize] }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 0u64..3).prop_map(|(pick, stream)| Op::FreeAfter { pick, stream }),
        1 => Just(Op::CompleteEvents),
        1 => (0usize..3, size).prop_map(|(owner, size)| Op::AllocEvictable { owner, size }),
        1 => any::<usize>().prop_map(|pick| Op::Pin { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Unpin { pick }),
        1 => (any::<usize>(), 0u64..3).prop_map(|(pick, stream)| Op::UnpinAfter { pick, stream }),
        1 => any::<usize>().prop_map(|pick| Op::FreeEvictable { pick }),
        1 => Just(Op::Trim),
    ]
}

struct Model {
    pool: Pool<HostSource>,
    owners: Vec<(OwnerId, u64)>,
    live: Vec<Block>,
    /// Handle, owner index, pins, and offset (current while pinned).
    evictable: Vec<(EvictableId, usize, u32, u64)>,
    events: Vec<Arc<Flag>>,
    /// The work of every `unpin_after`, finished at the end.
    works: Vec<Arc<Work>>,
    /// Ranges freed in stream order: offset, end, stream and event. Until the event
    /// completes, only their own stream may get them back.
    ordered: Vec<(u64, u64, u64, Arc<dyn FreeEvent>)>,
    /// Successful allocations and frees so far, of every kind.
    allocs: u64,
    frees: u64,
}

impl Model {
    /// A range `[off, end)` was just handed out for `stream`: it must not overlap a range
    /// freed on another stream whose event is pending. Records it overlaps stay until
    /// their events complete: handed out on their own stream, the range may still be in
    /// use by their work, whatever its next user does with it (a plain free says only
    /// that the new user is done).
    fn handed_out(&mut self, off: u64, end: u64, stream: u64) -> Result<(), TestCaseError> {
        for (o, e, s, ev) in &self.ordered {
            if *o < end && off < *e && *s != stream {
                prop_assert!(
                    ev.is_complete(),
                    "[{}, {}) freed on stream {} before its event completed went to stream {}",
                    o,
                    e,
                    s,
                    stream
                );
            }
        }
        self.ordered
            .retain(|(o, e, _, ev)| !(*o < end && off < *e && ev.is_complete()));
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let s = self.pool.stats();
        prop_assert_eq!((s.allocs, s.frees), (self.allocs, self.frees));
        // No overlap among live blocks and resident evictable blocks.
        let mut spans: Vec<(u64, u64)> = self
            .live
            .iter()
            .map(|b| (b.offset(), b.offset() + b.size()))
            .collect();
        let snap = self.pool.snapshot();
        for b in &snap.blocks {
            if let gpushare_pool::BlockState::Evictable { .. } = b.state {
                let o = b.addr - self.pool.source().base();
                spans.push((o, o + b.size));
            }
        }
        spans.sort();
        for w in spans.windows(2) {
            prop_assert!(w[0].1 <= w[1].0, "overlap {:?}", w);
        }
        // Each live block shows in the snapshot at its address, live, under one owner slot
        // per owner, and different owners under different slots.
        let mut slot_of = std::collections::HashMap::new();
        for b in &self.live {
            let addr = self.pool.addr(b);
            let i = snap.blocks.partition_point(|x| x.addr < addr);
            let info = snap.blocks.get(i).filter(|x| x.addr == addr);
            prop_assert!(
                info.is_some_and(|x| x.state == gpushare_pool::BlockState::Live
                    && x.size == b.size()
                    && x.owner.is_some()),
                "live block at {} shows as {:?}",
                addr,
                info
            );
            let slot = info.and_then(|x| x.owner);
            let before = slot_of.insert(b.owner(), slot);
            prop_assert!(
                before.is_none() || before == Some(slot),
                "one owner, two slots"
            );
        }
        let slots: std::collections::HashSet<_> = slot_of.values().collect();
        prop_assert_eq!(slots.len(), slot_of.len(), "two owners share a slot");
        for (i, &(id, limit)) in self.owners.iter().enumerate() {
            let o = s.owners.iter().find(|o| o.id == id).unwrap();
            let mine: u64 = self
                .live
                .iter()
                .filter(|b| b.owner() == id)
                .map(|b| b.size())
                .sum();
            prop_assert_eq!(
                o.live_bytes - o.evictable_resident_bytes,
                mine,
                "owner {} live",
                i
            );
            prop_assert!(o.in_use_bytes <= limit, "owner {} over its limit", i);
            prop_assert_eq!(o.in_use_bytes, o.live_bytes + o.cached_bytes);
        }
        prop_assert_eq!(
            s.mapped_bytes,
            s.free_bytes + s.pending_bytes + s.in_use_bytes + s.retired_bytes
        );
        let total: u64 = snap.blocks.iter().map(|b| b.size).sum();
        prop_assert_eq!(total, s.mapped_bytes);
        prop_assert!(s.mapped_bytes <= self.pool.capacity());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn invariants_hold_after_every_step(
        ops in proptest::collection::vec(op(), 1..120),
        two_halves in any::<bool>(),
    ) {
        let pool = Pool::new(
            HostSource::new(2 * MIB, 1 << 30),
            PoolConfig::default().capacity(48 * MIB).cache_bytes_per_shard(4 * MIB),
        ).unwrap();
        pool.set_evictor(Arc::new(if two_halves {
            Recorder::two_halves()
        } else {
            Recorder::default()
        }));
        let specs = [
            OwnerSpec::new("g", 16 * MIB).base(16 * MIB),
            OwnerSpec::new("b", 24 * MIB).base(8 * MIB),
            OwnerSpec::new("e", 32 * MIB).tier(Tier::BestEffort),
        ];
        let owners = specs.iter().map(|s| (pool.add_owner(s.clone()).unwrap(), s.limit)).collect();
        let mut m = Model {
            pool, owners, live: vec![], evictable: vec![], events: vec![], works: vec![], ordered: vec![],
            allocs: 0, frees: 0,
        };
        // A pool that refused every request would keep every invariant: first, each owner
        // gets a block inside its base or the unreserved memory.
        for &(id, _) in &m.owners {
            let b = m.pool.alloc(id, MIB, StreamId(0));
            prop_assert!(b.is_ok(), "{:?}", b);
            m.pool.free(b.unwrap()).unwrap();
            m.allocs += 1;
            m.frees += 1;
        }
        m.check()?;
        for op in ops {
            match op {
                Op::Alloc { owner, size, stream, align_log } => {
                    let (id, limit) = m.owners[owner];
                    match m.pool.alloc_aligned(id, size, 1 << align_log, StreamId(stream)) {
                        Ok(b) => {
                            prop_assert!(b.size() >= size);
                            prop_assert_eq!(m.pool.addr(&b) % (1 << align_log), 0);
                            m.handed_out(b.offset(), b.offset() + b.size(), stream)?;
                            m.live.push(b);
                            m.allocs += 1;
                        }
                        // Refused for the limit only if it is over: its figures are the
                        // owner's, and what it holds is what the pool says it holds (its
                        // cache was given back first).
                        Err(PoolError::QuotaExceeded { used, requested, limit: l, .. }) => {
                            prop_assert_eq!(l, limit);
                            prop_assert!(requested >= size && used + requested > limit);
                            let st = m.pool.stats();
                            let o = st.owners.iter().find(|o| o.id == id).unwrap();
                            prop_assert_eq!(o.cached_bytes, 0);
                            prop_assert_eq!(o.in_use_bytes, used);
                        }
                        Err(PoolError::BadAlignment { align, max }) => {
                            prop_assert!(align == 1 << align_log && align > max);
                        }
                        // Out of memory only if no free block holds the request, from an
                        // aligned start.
                        Err(PoolError::OutOfMemory { .. }) => {
                            let (size, align) = (size.next_multiple_of(256), 1u64 << align_log);
                            for b in m.pool.snapshot().blocks {
                                let holds = b.addr.next_multiple_of(align) + size <= b.addr + b.size;
                                prop_assert!(
                                    !(b.state == BlockState::Free && holds),
                                    "out of memory for {} B aligned to {} beside a free block of {} B at {:#x}",
                                    size, align, b.size, b.addr
                                );
                            }
                        }
                        Err(PoolError::ReservedElsewhere { .. }) => {}
                        Err(e) => prop_assert!(false, "unexpected error: {}", e),
                    }
                }
                Op::Free { pick } if !m.live.is_empty() => {
                    let b = m.live.swap_remove(pick % m.live.len());
                    m.pool.free(b).unwrap();
                    m.frees += 1;
                }
                Op::FreeAfter { pick, stream } if !m.live.is_empty() => {
                    let b = m.live.swap_remove(pick % m.live.len());
                    let e = Flag::new();
                    m.events.push(e.clone());
                    m.ordered.push((b.offset(), b.offset() + b.size(), stream, e.clone()));
                    m.pool.free_after(b, StreamId(stream), e).unwrap();
                    m.frees += 1;
                }
                Op::CompleteEvents => m.events.drain(..).for_each(|e| e.set()),
                Op::AllocEvictable { owner, size } => {
                    let (id, _) = m.owners[owner];
                    if let Ok((e, pinned)) = m.pool.alloc_evictable(id, size, 0, StreamId(0)) {
                        let off = pinned.addr - m.pool.source().base();
                        m.handed_out(off, off + pinned.size, 0)?;
                        m.evictable.push((e, owner, 1, off));
                        m.allocs += 1;
                    }
                }
                Op::Pin { pick } if !m.evictable.is_empty() => {
                    let i = pick % m.evictable.len();
                    if let Ok(pinned) = m.pool.pin(&m.evictable[i].0, StreamId(0)) {
                        m.evictable[i].2 += 1;
                        let off = pinned.addr - m.pool.source().base();
                        m.evictable[i].3 = off;
                        if pinned.restored {
                            m.handed_out(off, off + pinned.size, 0)?;
                        }
                    }
                }
                Op::Unpin { pick } if !m.evictable.is_empty() => {
                    let i = pick % m.evictable.len();
                    let r = m.pool.unpin(&m.evictable[i].0);
                    prop_assert_eq!(r.is_ok(), m.evictable[i].2 > 0);
                    if r.is_ok() { m.evictable[i].2 -= 1; }
                }
                // The block's last users' work stays queued until an eviction waits for it:
                // neither the evictor nor another stream may get the range before then.
                Op::UnpinAfter { pick, stream } if !m.evictable.is_empty() => {
                    let i = pick % m.evictable.len();
                    let (id, _, pins, off) = &m.evictable[i];
                    let size = m.pool.snapshot().blocks.iter()
                        .find(|b| b.addr == m.pool.source().base() + off)
                        .map_or(0, |b| b.size);
                    let work = Work::new();
                    let r = m.pool.unpin_after(id, StreamId(stream), work.clone());
                    prop_assert_eq!(r.is_ok(), *pins > 0);
                    if r.is_ok() {
                        m.ordered.push((*off, off + size, stream, work.clone()));
                        m.works.push(work);
                        m.evictable[i].2 -= 1;
                    }
                }
                Op::FreeEvictable { pick } if !m.evictable.is_empty() => {
                    let i = pick % m.evictable.len();
                    let (e, o, pins, off) = m.evictable.swap_remove(i);
                    match m.pool.free_evictable(e) {
                        Ok(()) => {
                            prop_assert_eq!(pins, 0);
                            m.frees += 1;
                        }
                        Err((e, _)) => { prop_assert!(pins > 0); m.evictable.push((e, o, pins, off)); }
                    }
                }
                Op::Trim => { m.pool.trim().unwrap(); }
                _ => {}
            }
            m.check()?;
        }
        m.events.drain(..).for_each(|e| e.set());
        m.works.drain(..).for_each(|w| w.wait());
        for b in m.live.drain(..) { m.pool.free(b).unwrap(); }
        for (e, _, pins, _) in m.evictable.drain(..) {
            for _ in 0..pins { m.pool.unpin(&e).unwrap(); }
            m.pool.free_evictable(e).unwrap();
        }
        m.pool.trim().unwrap();
        let s = m.pool.stats();
        prop_assert_eq!(s.mapped_bytes, 0);
        prop_assert_eq!(s.in_use_bytes, 0);
        prop_assert_eq!(m.pool.source().mapped(), 0);
    }
}
