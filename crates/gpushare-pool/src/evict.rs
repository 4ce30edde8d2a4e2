//! Evictable blocks: handles, pin counts, and an intrusive O(1) LRU list per owner, merged
//! into a tier's least-recently-used order when victims are chosen (a step of the merge is
//! O(the tier's owners with blocks listed)).

use crate::error::PoolError;
use crate::tlsf::NONE;
use crate::{EvictableId, EvictableKey, EvictableRef, FreeEvent, OwnerId, PoolId, StreamId, Tier};
use slab::Slab;
use std::collections::HashMap;
use std::sync::Arc;

/// What the pool tells the [`Evictor`] about a block it evicts.
#[derive(Clone, Debug)]
pub struct VictimInfo {
    /// The block.
    pub id: EvictableKey,
    /// Its owner.
    pub owner: OwnerId,
    /// Where its bytes are now.
    pub addr: u64,
    /// Its size.
    pub size: u64,
    /// The tag given at allocation (for example an offload or discard policy).
    pub tag: u64,
    /// The owner whose request caused the eviction.
    pub requested_by: OwnerId,
}

/// What the pool tells the [`Evictor`] about a block it restores.
#[derive(Clone, Debug)]
pub struct RestoreInfo {
    /// The block.
    pub id: EvictableKey,
    /// Its owner.
    pub owner: OwnerId,
    /// Its new address (possibly not the old one).
    pub addr: u64,
    /// Its size.
    pub size: u64,
    /// The tag given at allocation.
    pub tag: u64,
    /// The stream the block is pinned for: restore work ordered on it is ordered before
    /// the pinner's work.
    pub stream: StreamId,
}

/// Why an evictor failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EvictError(pub String);

/// How an eviction that an [`Evictor`] started ends.
///
/// Moving a large block out takes as long as its copy (an 8 GiB model, about 160 ms at
/// 50 GB/s), and the pool must not hold its central lock for that long: every other
/// owner's request that misses its cache would wait behind the copy. So eviction has two
/// halves. [`Evictor::evict`] runs under the lock and only starts the move (queues the
/// copy); the pool then lets the lock go and runs the [`Eviction`]'s finish, which waits
/// for the move and says whether it worked. Meanwhile the block is neither resident for
/// pins (a pin waits for the outcome) nor free (its memory is not reused until the finish
/// returns `Ok`), and other requests go on.
pub struct Eviction(pub(crate) Option<Box<dyn FnOnce() -> Result<(), EvictError> + Send>>);

impl Eviction {
    /// The bytes are out already (or were dropped): the memory may be reused at once.
    pub fn done() -> Self {
        Eviction(None)
    }

    /// The bytes are on their way out. `finish` blocks until they are out and returns
    /// whether the move worked; the pool runs it without its lock. On `Err` the block stays
    /// resident where it was, as if it had never been chosen, and the pool tries another
    /// victim. A finish that panics counts as an `Err`.
    pub fn in_flight(finish: impl FnOnce() -> Result<(), EvictError> + Send + 'static) -> Self {
        Eviction(Some(Box::new(finish)))
    }

    /// Whether the move is already over ([`Eviction::done`]).
    pub fn is_done(&self) -> bool {
        self.0.is_none()
    }
}

impl std::fmt::Debug for Eviction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_done() {
            "Eviction::done"
        } else {
            "Eviction::in_flight"
        })
    }
}

/// Moves evicted blocks out and back in.
///
/// Neither `evict` nor `restore`, nor an [`Eviction`]'s finish, may call back into the
/// pool: a call that meets the block being moved would wait for that very move to end.
/// [`Evictor::release_idle_pins`] may (it runs with no move of its request under way).
pub trait Evictor: Send + Sync {
    /// Start moving the block's bytes out (offload) or dropping them (discard). The pool
    /// calls this with its central lock held, so it should only queue the work, and
    /// return an [`Eviction`] whose finish waits for it; the pool runs that without the
    /// lock. (For a block unpinned with [`crate::Pool::unpin_after`] whose work is still
    /// queued, the pool calls it once that work is done, without the lock.) Once the
    /// eviction has ended well the block's memory may be reused by any stream at once, so
    /// the evictor's own work on it must be over by then. On `Err` (here or from the
    /// finish) the block stays resident and the pool tries the next victim.
    fn evict(&self, victim: &VictimInfo) -> Result<Eviction, EvictError>;
    /// Bring the bytes back at `info.addr` and return once they are there: the block is
    /// then resident for every pin, whatever its stream, and a pin on another stream
    /// returns at once with nothing to order it after the copy. (Work queued on
    /// `info.stream` before the pin may still use the memory the pool chose: order the
    /// copy after it.) The pool calls
    /// this without its lock: the block's new memory is set aside for it, and other pins of
    /// the block wait for the outcome. On `Err` the block stays evicted and the pin fails;
    /// the evictor must then leave no work queued that touches that memory, which the pool
    /// hands on to other requests.
    fn restore(&self, info: &RestoreInfo) -> Result<(), EvictError>;
    /// Block `id`, freed while its bytes were moving out ([`crate::Pool::free_evictable`]
    /// returns at once then), has now been freed, its memory or its evicted copy released:
    /// drop anything kept for it, and wake whoever waits for memory (the free came before
    /// the memory). Called without the pool's lock.
    fn freed_while_moving(&self, id: EvictableKey) {
        let _ = id;
    }
    /// Whether the evictor's owners keep blocks pinned that they do not use now, only to
    /// skip pinning them again (a runtime keeps a context's buffers pinned between its
    /// sessions). Asked under the pool's lock before a victim is chosen, and before a
    /// request fails for lack of memory: keep it to a few loads.
    fn holds_idle_pins(&self) -> bool {
        false
    }
    /// Let go of those pins, oldest first, through [`crate::Pool::unpin_all`] or the like,
    /// so that their blocks are chosen as victims in tier and least-recently-used order.
    /// Called without the pool's lock when [`Evictor::holds_idle_pins`] said so and a
    /// request is about to choose a victim: once, again after each time the request
    /// waited for moves under way or finished an eviction, and once more before it fails
    /// for lack of memory.
    fn release_idle_pins(&self) {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Residency {
    Resident {
        node: u32,
        offset: u64,
    },
    /// Chosen as a victim; its bytes are moving out while the pool's lock is free. It is
    /// out of its LRU list and unpinned, and its memory is still charged and used.
    Evicting {
        node: u32,
        offset: u64,
    },
    Evicted,
    /// Being restored into `node` while the pool's lock is free; that memory is charged.
    Restoring {
        node: u32,
        offset: u64,
    },
}

impl Residency {
    /// Between two states, with the pool's lock let go: whoever needs it settled waits.
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            Residency::Evicting { .. } | Residency::Restoring { .. }
        )
    }
}

/// Work that may still use an unpinned block: the event of each stream's last use, from
/// [`crate::Pool::unpin_after`]. Until they complete the block's memory goes to no other
/// use: an eviction waits for them before its evictor moves the bytes, and a free leaves
/// the memory pending on them.
#[derive(Default)]
pub(crate) struct LastUse(Vec<(StreamId, Arc<dyn FreeEvent>)>);

impl std::fmt::Debug for LastUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(s, _)| s))
            .finish()
    }
}

impl LastUse {
    /// Record the last use on `stream`. A later event on a stream completes after the
    /// earlier ones there, so it takes their place: one entry per stream.
    pub fn add(&mut self, stream: StreamId, event: Arc<dyn FreeEvent>) {
        self.0
            .retain(|(s, e)| *s != stream && !crate::pool::complete(&**e));
        if !crate::pool::complete(&*event) {
            self.0.push((stream, event));
        }
    }

    /// Take out the use recorded on `stream`, if any.
    pub fn forget(&mut self, stream: StreamId) -> Option<Arc<dyn FreeEvent>> {
        let i = self.0.iter().position(|(s, _)| *s == stream)?;
        Some(self.0.swap_remove(i).1)
    }

    /// Put back uses taken out (by [`LastUse::take`]) for a move that did not happen:
    /// each stream's entry stays the one recorded since, if any (it is the later).
    pub fn put_back(&mut self, uses: Vec<(StreamId, Arc<dyn FreeEvent>)>) {
        for (stream, event) in uses {
            if !self.0.iter().any(|(s, _)| *s == stream) && !crate::pool::complete(&*event) {
                self.0.push((stream, event));
            }
        }
    }

    /// The uses not yet complete, leaving none recorded.
    pub fn take(&mut self) -> Vec<(StreamId, Arc<dyn FreeEvent>)> {
        let mut uses = std::mem::take(&mut self.0);
        uses.retain(|(_, e)| !crate::pool::complete(&**e));
        uses
    }
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub owner: OwnerId,
    pub tier: Tier,
    pub size: u64,
    pub tag: u64,
    pub residency: Residency,
    pub pins: u32,
    /// Queued work that may still use the block (see [`LastUse`]).
    pub last_use: LastUse,
    /// Freed while its bytes were moving out: the eviction's finish frees it, evicted or
    /// kept. Its handle is gone, and every reference to it fails as already freed.
    pub doomed: bool,
    gen: u64,
    prev: u32,
    next: u32,
    in_lru: bool,
    /// When it last joined its owner's list: the order of blocks across owners' lists.
    stamp: u64,
}

/// All evictable blocks of a pool.
///
/// Each owner keeps its unpinned resident blocks in a list of its own, least recently
/// used first; an owner's tier is fixed, so a tier's blocks are its owners' lists, and
/// eviction merges them by [`Entry::stamp`] into the tier's least-recently-used order. With
/// one list per tier, eviction stepped over every block of an owner that can give none (a
/// Burstable owner at its base), on every eviction and under the pool's lock: half a
/// millisecond a request with 100,000 such blocks. Now such an owner's list is skipped
/// whole.
#[derive(Debug)]
pub(crate) struct EvState {
    entries: Slab<Entry>,
    /// Each owner slot's list: head (least recently used) and tail.
    lists: Vec<(u32, u32)>,
    next_stamp: u64,
    next_gen: u64,
}

impl Default for EvState {
    fn default() -> Self {
        EvState {
            entries: Slab::new(),
            lists: Vec::new(),
            next_stamp: 0,
            next_gen: 1,
        }
    }
}

impl EvState {
    /// Insert a resident block, pinned once.
    pub fn insert(
        &mut self,
        owner: OwnerId,
        tier: Tier,
        size: u64,
        tag: u64,
        node: u32,
        offset: u64,
    ) -> u32 {
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1);
        self.entries.insert(Entry {
            owner,
            tier,
            size,
            tag,
            residency: Residency::Resident { node, offset },
            pins: 1,
            last_use: LastUse::default(),
            doomed: false,
            gen,
            prev: NONE,
            next: NONE,
            in_lru: false,
            stamp: 0,
        }) as u32
    }

    pub fn public_id(&self, pool: PoolId, idx: u32) -> EvictableId {
        EvictableId {
            pool,
            key: self.key(idx),
        }
    }

    /// The key of block `idx`: its slot and generation, which no later block in the slot
    /// shares.
    #[inline]
    pub fn key(&self, idx: u32) -> EvictableKey {
        EvictableKey {
            idx,
            gen: self.entries[idx as usize].gen,
        }
    }

    #[inline]
    pub fn lookup(&self, pool: PoolId, id: EvictableRef) -> Result<u32, PoolError> {
        if id.pool != pool {
            return Err(PoolError::ForeignBlock {
                what: "evictable block",
            });
        }
        match self.entries.get(id.key.idx as usize) {
            Some(e) if e.gen == id.key.gen && !e.doomed => Ok(id.key.idx),
            _ => Err(PoolError::DoubleFree),
        }
    }

    /// Mark block `idx`, whose bytes are moving out, to be freed when the move ends.
    pub fn doom(&mut self, idx: u32) {
        self.entries[idx as usize].doomed = true;
    }

    #[inline]
    pub fn get(&self, idx: u32) -> &Entry {
        &self.entries[idx as usize]
    }

    /// The recorded uses of block `idx` (see [`LastUse`]).
    pub fn last_use(&mut self, idx: u32) -> &mut LastUse {
        &mut self.entries[idx as usize].last_use
    }

    /// Take out every block's use recorded on `stream`.
    pub fn forget_stream(&mut self, stream: StreamId) -> Vec<Arc<dyn FreeEvent>> {
        self.entries
            .iter_mut()
            .filter_map(|(_, e)| e.last_use.forget(stream))
            .collect()
    }

    fn unlink(&mut self, idx: u32) {
        let (l, prev, next) = {
            let e = &self.entries[idx as usize];
            if !e.in_lru {
                return;
            }
            (e.owner.slot() as usize, e.prev, e.next)
        };
        if prev != NONE {
            self.entries[prev as usize].next = next;
        } else {
            self.lists[l].0 = next;
        }
        if next != NONE {
            self.entries[next as usize].prev = prev;
        } else {
            self.lists[l].1 = prev;
        }
        let e = &mut self.entries[idx as usize];
        e.in_lru = false;
        e.prev = NONE;
        e.next = NONE;
    }

    /// Append as most recently used. Guaranteed blocks are never evicted, so they never
    /// join a list.
    fn push_mru(&mut self, idx: u32) {
        let (tier, l) = {
            let e = &self.entries[idx as usize];
            (e.tier, e.owner.slot() as usize)
        };
        if tier == Tier::Guaranteed {
            return;
        }
        if self.lists.len() <= l {
            self.lists.resize(l + 1, (NONE, NONE));
        }
        let tail = self.lists[l].1;
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        {
            let e = &mut self.entries[idx as usize];
            e.prev = tail;
            e.next = NONE;
            e.in_lru = true;
            e.stamp = stamp;
        }
        if tail != NONE {
            self.entries[tail as usize].next = idx;
        } else {
            self.lists[l].0 = idx;
        }
        self.lists[l].1 = idx;
    }

    /// Pin. A pinned block may stay in its LRU list: eviction skips it and takes it out
    /// then ([`EvState::drop_pinned`]), and its last unpin moves it to the most recent end.
    /// So a session that pins and unpins a working set does not unlink and relink every
    /// block twice, and each block leaves a list at most once per pin: still O(1),
    /// amortized. The unpinned blocks keep exact LRU order (that of their last unpin).
    ///
    /// Pins are counted in a `u32`: one more than that many is refused rather than wrapped
    /// to zero, which would leave the block evictable while in use.
    #[inline]
    pub fn pin(&mut self, idx: u32) -> Result<(), PoolError> {
        let pins = &mut self.entries[idx as usize].pins;
        *pins = pins.checked_add(1).ok_or(PoolError::TooManyPins)?;
        Ok(())
    }

    /// Drop a pin; returns true when it was the last one.
    #[inline]
    pub fn unpin(&mut self, idx: u32) -> Result<bool, PoolError> {
        let e = &mut self.entries[idx as usize];
        if e.pins == 0 {
            return Err(PoolError::NotPinned);
        }
        e.pins -= 1;
        if e.pins == 0 {
            if matches!(e.residency, Residency::Resident { .. }) {
                let l = e.owner.slot() as usize;
                // Already the most recent: nothing to move.
                if !(e.in_lru && self.lists[l].1 == idx && e.stamp + 1 == self.next_stamp) {
                    self.unlink(idx);
                    self.push_mru(idx);
                }
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Take a pinned block that eviction met out of its LRU list.
    pub fn drop_pinned(&mut self, idx: u32) {
        debug_assert!(self.entries[idx as usize].pins > 0);
        self.unlink(idx);
    }

    pub fn mark_evicted(&mut self, idx: u32) {
        self.unlink(idx);
        self.entries[idx as usize].residency = Residency::Evicted;
    }

    /// A resident, unpinned block whose move out has started: it leaves its LRU list.
    pub fn mark_evicting(&mut self, idx: u32) {
        self.unlink(idx);
        let e = &mut self.entries[idx as usize];
        debug_assert_eq!(e.pins, 0);
        if let Residency::Resident { node, offset } = e.residency {
            e.residency = Residency::Evicting { node, offset };
        }
    }

    /// An eviction that failed after it started: the block is resident where it was, and
    /// joins its LRU list as most recently used (the request that chose it moves on to
    /// other victims).
    pub fn mark_kept(&mut self, idx: u32) {
        let e = &mut self.entries[idx as usize];
        if let Residency::Evicting { node, offset } = e.residency {
            e.residency = Residency::Resident { node, offset };
            if e.pins == 0 {
                self.push_mru(idx);
            }
        }
    }

    pub fn mark_restoring(&mut self, idx: u32, node: u32, offset: u64) {
        self.entries[idx as usize].residency = Residency::Restoring { node, offset };
    }

    pub fn mark_restored(&mut self, idx: u32, node: u32, offset: u64) {
        self.entries[idx as usize].residency = Residency::Resident { node, offset };
    }

    pub fn remove(&mut self, idx: u32) {
        self.unlink(idx);
        self.entries.remove(idx as usize);
    }

    /// The least recently used block of owner slot `slot`'s list.
    pub fn lru_head_of(&self, slot: usize) -> Option<u32> {
        self.lists.get(slot).map(|l| l.0).filter(|&h| h != NONE)
    }

    /// When block `idx` last joined its owner's list (see [`EvState`]).
    pub fn stamp(&self, idx: u32) -> u64 {
        self.entries[idx as usize].stamp
    }

    pub fn lru_next(&self, idx: u32) -> Option<u32> {
        Some(self.entries[idx as usize].next).filter(|&n| n != NONE)
    }

    /// Nodes that hold evictable blocks, and whether each is pinned (a block being
    /// restored counts as pinned: nothing may evict it).
    pub fn resident_nodes(&self) -> HashMap<u32, bool> {
        self.entries
            .iter()
            .filter_map(|(_, e)| match e.residency {
                Residency::Resident { node, .. } | Residency::Evicting { node, .. } => {
                    Some((node, e.pins > 0))
                }
                Residency::Restoring { node, .. } => Some((node, true)),
                Residency::Evicted => None,
            })
            .collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_pin_past_the_counts_limit_is_refused_and_leaves_the_block_pinned() {
        let mut ev = EvState::default();
        let owner = OwnerId::new(PoolId::new(1).unwrap(), 0, 0);
        let idx = ev.insert(owner, Tier::BestEffort, 256, 0, 0, 0);
        ev.entries[idx as usize].pins = u32::MAX - 1;
        assert!(ev.pin(idx).is_ok());
        assert!(matches!(ev.pin(idx), Err(PoolError::TooManyPins)));
        assert_eq!(ev.entries[idx as usize].pins, u32::MAX, "it wrapped");
    }
}
