//! The owner caches: per-owner shards of freed blocks, one per thread index, and how the
//! pool fills, probes and empties them.

use super::*;

/// A block on its way into a cache: what a free hands over.
pub(super) struct Freed {
    pub(super) class: u32,
    pub(super) node: u32,
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) stream: StreamId,
    pub(super) event: Option<Arc<dyn FreeEvent>>,
}

impl Freed {
    /// A block freed with no stream-ordering event.
    #[inline]
    pub(super) fn plain(b: &Block) -> Self {
        Freed {
            class: b.class() as u32,
            node: b.node(),
            offset: b.offset,
            size: b.size,
            stream: StreamId(0),
            event: None,
        }
    }
}

/// One cached free block. Plain data: a stream-ordered free keeps its stream and event in
/// the shard's `ordered` table, and `ev` points there. Most cached blocks have no event,
/// and a 32-byte `Copy` entry moves through the hot path in registers, where the 48-byte
/// entry with the event inline went through the stack several times, with drop checks.
#[derive(Clone, Copy)]
pub(super) struct Cached {
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) node: u32,
    pub(super) class: u32,
    /// Index into `Shard::ordered`, or [`NO_EVENT`].
    pub(super) ev: u32,
}

/// [`Cached::ev`] of a block that any stream may reuse at once.
pub(super) const NO_EVENT: u32 = u32::MAX;

/// Each cached large block that goes back to the central allocator unused adds one to its
/// shard's debt; each large block reused from the cache pays back this much.
const HIT_CREDIT: i32 = 2;
/// While a shard's debt is at or above this, it admits no more large blocks (see
/// [`Shard::debt`]).
const DEBT_LIMIT: i32 = 32;
/// The debt of a new shard: it admits large blocks until a few go back unused.
const INITIAL_DEBT: i32 = DEBT_LIMIT - 8;
/// A shard that admits no large frees still takes one in this many, as a probe.
pub(super) const PROBE_EVERY: u32 = 16;
/// Bound on the debt either way, so that a long history neither locks the cache out nor
/// keeps it open for long after the pattern changes.
const DEBT_CAP: i32 = 64;

/// A shard of one owner's cache.
pub(super) struct Shard {
    pub(super) bins: Vec<Vec<Cached>>,
    /// The stream and event of each cached stream-ordered free (see [`Cached::ev`]).
    pub(super) ordered: slab::Slab<(StreamId, Arc<dyn FreeEvent>)>,
    /// Bit `c` set when `bins[c]` is not empty, so flushes visit only those.
    pub(super) nonempty: Vec<u64>,
    pub(super) bytes: u64,
    /// Allocations served from this shard.
    pub(super) hits: u64,
    /// Frees into this shard.
    pub(super) frees: u64,
    /// Admission control for large blocks (above `small`). A cached block is invisible to
    /// the central allocator: it cannot coalesce with its free neighbours, and requests of
    /// other sizes are placed around it. For small blocks that costs little, and they are
    /// the ones that repeat, so they are always admitted. A large block is worth caching
    /// only when its size comes back, as with repeated activations or hot allocate+free
    /// pairs. When sizes are drawn from a wide range and seldom seen again, the cache fills
    /// with large blocks nobody asks for, which spreads the heap (peak mapped ÷ peak live
    /// went from 1.054 to 1.065 on the serving replay). Its occasional hits do save central
    /// work (a quarter of the pool's instructions on that replay), but device memory is the
    /// scarcer resource, so the pool gives them up. The waste shows when those blocks go
    /// back to the central allocator unused, as they all do before the pool grows. So the
    /// shard keeps score: each large block returned unused costs 1, each large hit earns
    /// [`HIT_CREDIT`]. At [`DEBT_LIMIT`] the shard stops admitting large blocks and holds
    /// at most one, a probe (see [`Pool::probe_cache`]); hits on probes bring it back.
    pub(super) debt: i32,
    /// Blocks of at most this many bytes are small (see `debt`).
    pub(super) small: u64,
    /// The probe, if one is held: its class and node.
    pub(super) probe: Option<(u32, u32)>,
}

impl Shard {
    pub(super) fn new(small: u64) -> Self {
        Shard {
            bins: Vec::new(),
            ordered: slab::Slab::new(),
            nonempty: Vec::new(),
            bytes: 0,
            hits: 0,
            frees: 0,
            debt: INITIAL_DEBT,
            small,
            probe: None,
        }
    }

    /// Put a block taken by mistake back where it came from.
    pub(super) fn put(&mut self, c: Cached) {
        self.hits -= 1;
        self.frees -= 1;
        if c.size > self.small {
            self.debt = (self.debt + HIT_CREDIT).min(DEBT_CAP);
        }
        self.push(c);
    }

    /// Whether a freed block of `size` bytes may be cached here (room aside).
    #[inline]
    pub(super) fn admits_size(&self, size: u64) -> bool {
        size <= self.small || self.admits()
    }

    /// Count a cached block going back to the central allocator unused.
    pub(super) fn returned_unused(&mut self, size: u64) {
        if size > self.small {
            self.debt = (self.debt + 1).min(DEBT_CAP);
        }
    }

    /// Take the probe out, if one is held.
    pub(super) fn take_probe(&mut self) -> Option<Freed> {
        let (class, node) = self.probe.take()?;
        let bin = self.bins.get_mut(class as usize)?;
        // From the top: the probe was pushed there, and only frees of its class since
        // lie above it (a bin may hold hundreds of blocks under it).
        let i = bin.iter().rposition(|e| e.node == node)?;
        let e = bin.swap_remove(i);
        if bin.is_empty() {
            self.nonempty[class as usize / 64] &= !(1 << (class % 64));
        }
        self.bytes -= e.size;
        Some(self.detach(e))
    }

    /// Bytes of the cached blocks whose stream-ordered free's work has not completed. One
    /// look at each cached block when some carry an event, none otherwise; each event is
    /// asked once (on CUDA a query is a driver call, and the blocks one session freed share
    /// its event).
    pub(super) fn unfinished_bytes(&self) -> u64 {
        if self.ordered.is_empty() {
            return 0;
        }
        // Keyed by the event's address: every event stays in `ordered` for the whole
        // pass, so no address is reused meanwhile.
        let mut asked: std::collections::HashMap<*const (), bool> = Default::default();
        let mut unfinished = |e: &Arc<dyn FreeEvent>| {
            let key = Arc::as_ptr(e).cast::<()>();
            !*asked.entry(key).or_insert_with(|| complete(&**e))
        };
        self.bins
            .iter()
            .flatten()
            .filter(|c| c.ev != NO_EVENT)
            .filter(|c| {
                self.ordered
                    .get(c.ev as usize)
                    .is_none_or(|(_, e)| unfinished(e))
            })
            .map(|c| c.size)
            .sum()
    }

    /// Whether cached block `c` is usable on `stream` now without any wait.
    #[inline]
    pub(super) fn usable_on(
        ordered: &slab::Slab<(StreamId, Arc<dyn FreeEvent>)>,
        c: &Cached,
        stream: StreamId,
    ) -> bool {
        if c.ev == NO_EVENT {
            return true;
        }
        // Every cached `ev` has its entry (entries leave with their blocks); should one
        // be missing, the block is treated as still ordered, never as free for all.
        let entry = ordered.get(c.ev as usize);
        debug_assert!(
            entry.is_some(),
            "a cached block lost its stream-ordering event"
        );
        entry.is_some_and(|(s, e)| *s == stream || complete(&**e))
    }

    /// A block leaving the cache for good: its stream and event come out of `ordered`.
    pub(super) fn detach(&mut self, c: Cached) -> Freed {
        Self::detach_from(&mut self.ordered, c)
    }

    pub(super) fn detach_from(
        ordered: &mut slab::Slab<(StreamId, Arc<dyn FreeEvent>)>,
        c: Cached,
    ) -> Freed {
        let (stream, event) = match c.ev {
            NO_EVENT => (StreamId(0), None),
            ev => match ordered.try_remove(ev as usize) {
                Some((s, e)) => (s, Some(e)),
                None => (StreamId(0), None),
            },
        };
        Freed {
            class: c.class,
            node: c.node,
            offset: c.offset,
            size: c.size,
            stream,
            event,
        }
    }

    /// Take the event of a block handed out for reuse on `stream`. Usable there, it was
    /// freed on that stream (its work may still run, ahead of the new user's: returned,
    /// for the block to inherit) or its event has completed (dropped).
    #[inline]
    pub(super) fn reused(&mut self, c: &Cached, stream: StreamId) -> Option<StreamOrder> {
        if c.ev == NO_EVENT {
            return None;
        }
        self.ordered
            .try_remove(c.ev as usize)
            .filter(|(s, _)| *s == stream)
    }

    /// Whether frees may be cached here.
    #[inline]
    pub(super) fn admits(&self) -> bool {
        self.debt < DEBT_LIMIT
    }

    /// Take a cached block of at least `size` bytes (a multiple of the unit): from the
    /// size's own bin, checking sizes, else from the next bin up, where all fit.
    #[inline]
    pub(super) fn take_fit(&mut self, size: u64, stream: StreamId) -> Option<Cached> {
        let fc = floor_class(size);
        if let Some(c) = self.take(fc, stream, size) {
            return Some(c);
        }
        match ceil_class(size) {
            Some(cc) if cc != fc => self.take(cc, stream, size),
            _ => None,
        }
    }

    /// The most recent cached block of `class`, if it has at least `min` bytes and is
    /// usable on `stream`.
    #[inline(always)]
    pub(super) fn pop_top(&mut self, class: usize, min: u64, stream: StreamId) -> Option<Cached> {
        let bin = self.bins.get_mut(class)?;
        let top = bin.last()?;
        if top.size < min || !Self::usable_on(&self.ordered, top, stream) {
            return None;
        }
        let c = bin.pop()?;
        if bin.is_empty() {
            self.nonempty[class / 64] &= !(1 << (class % 64));
        }
        self.took(&c);
        Some(c)
    }

    /// Account for a block taken out of the cache.
    #[inline(always)]
    pub(super) fn took(&mut self, c: &Cached) {
        self.bytes -= c.size;
        self.hits += 1;
        if c.size > self.small {
            self.debt = (self.debt - HIT_CREDIT).max(-DEBT_CAP);
            if self.probe.is_some_and(|(_, n)| n == c.node) {
                self.probe = None;
            }
        }
    }

    /// Take a cached block of `class`, at least `min` bytes, usable on `stream`: the most
    /// recent one if it is, else one of the few below it.
    #[inline(never)]
    pub(super) fn take(&mut self, class: usize, stream: StreamId, min: u64) -> Option<Cached> {
        let bin = self.bins.get_mut(class)?;
        let top = bin.last()?;
        let c = if top.size >= min && Self::usable_on(&self.ordered, top, stream) {
            bin.pop()?
        } else {
            Self::take_below(bin, &self.ordered, stream, min)?
        };
        if bin.is_empty() {
            self.nonempty[class / 64] &= !(1 << (class % 64));
        }
        self.took(&c);
        Some(c)
    }

    #[cold]
    pub(super) fn take_below(
        bin: &mut Vec<Cached>,
        ordered: &slab::Slab<(StreamId, Arc<dyn FreeEvent>)>,
        stream: StreamId,
        min: u64,
    ) -> Option<Cached> {
        let n = bin.len();
        let i = (n.saturating_sub(4)..n.saturating_sub(1))
            .rev()
            .find(|&i| bin[i].size >= min && Self::usable_on(ordered, &bin[i], stream))?;
        Some(bin.swap_remove(i))
    }

    /// Cache a freed block that may carry a stream-ordering event (its bin must exist).
    pub(super) fn push_freed(&mut self, f: Freed) {
        let ev = match f.event {
            Some(e) => self.ordered.insert((f.stream, e)) as u32,
            None => NO_EVENT,
        };
        self.push(Cached {
            offset: f.offset,
            size: f.size,
            node: f.node,
            class: f.class,
            ev,
        });
    }

    /// Cache a freed block (its bin must exist).
    #[inline(always)]
    pub(super) fn push(&mut self, c: Cached) {
        let class = c.class as usize;
        self.bytes += c.size;
        self.frees += 1;
        self.nonempty[class / 64] |= 1 << (class % 64);
        self.bins[class].push(c);
    }
}

/// A shard and the hints that let the hot path skip its lock.
pub(super) struct ShardCell {
    pub(super) lock: ShardLock<Shard>,
    /// Mirrors of `Shard::nonempty` and `Shard::bytes`, written under the lock and read
    /// without it, so that a cache miss or a full shard costs no lock. A stale hint only
    /// sends a request down the slower path.
    pub(super) hint_nonempty: Box<[AtomicU64]>,
    pub(super) hint_bytes: AtomicU64,
    /// Mirror of [`Shard::admits`]: 1 when the shard admits large frees.
    pub(super) hint_admits: AtomicU32,
    /// 1 when the shard may hold a probe (set with it, cleared when it is returned; a
    /// hit leaves it set, which costs one needless look).
    pub(super) hint_probe: AtomicU32,
    /// Mirror of [`Shard::small`].
    pub(super) small: u64,
    /// Frees the shard refused, to pick which ones probe it.
    pub(super) frees_refused: AtomicU32,
}

impl ShardCell {
    pub(super) fn new(classes: usize, small: u64) -> Self {
        ShardCell {
            lock: ShardLock::new(Shard::new(small)),
            hint_nonempty: (0..classes.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            hint_bytes: AtomicU64::new(0),
            hint_admits: AtomicU32::new(1),
            hint_probe: AtomicU32::new(0),
            small,
            frees_refused: AtomicU32::new(0),
        }
    }

    /// Whether a free of `size` bytes may find room in this shard, judging by the hints.
    #[inline]
    pub(super) fn may_admit(&self, size: u64, budget: u64) -> bool {
        (size <= self.small || self.hint_admits.load(Ordering::Relaxed) != 0)
            && self.hint_bytes.load(Ordering::Relaxed) + size <= budget
    }

    /// Whether the bin of `class` may hold a block.
    #[inline]
    pub(super) fn may_have(&self, class: usize) -> bool {
        self.hint_nonempty
            .get(class / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (class % 64)) != 0)
    }

    /// Publish the shard's state after a block of `size` bytes and `class` went in or out
    /// (call with the lock held). Only large blocks move the admission score.
    #[inline]
    pub(super) fn publish(&self, sh: &Shard, class: usize, size: u64) {
        if let (Some(h), Some(&w)) = (
            self.hint_nonempty.get(class / 64),
            sh.nonempty.get(class / 64),
        ) {
            h.store(w, Ordering::Relaxed);
        }
        self.hint_bytes.store(sh.bytes, Ordering::Relaxed);
        if size > self.small {
            self.hint_admits
                .store(u32::from(sh.admits()), Ordering::Relaxed);
        }
    }

    /// Publish the whole state of a shard (call with the lock held).
    pub(super) fn publish_all(&self, sh: &Shard) {
        for (h, &w) in self.hint_nonempty.iter().zip(&sh.nonempty) {
            h.store(w, Ordering::Relaxed);
        }
        self.hint_bytes.store(sh.bytes, Ordering::Relaxed);
        self.hint_admits
            .store(u32::from(sh.admits()), Ordering::Relaxed);
    }

    /// Publish a shard with no blocks (call with the lock held).
    pub(super) fn publish_empty(&self, sh: &Shard) {
        for h in self.hint_nonempty.iter() {
            h.store(0, Ordering::Relaxed);
        }
        self.hint_bytes.store(0, Ordering::Relaxed);
        self.hint_admits
            .store(u32::from(sh.admits()), Ordering::Relaxed);
    }
}

impl<S: ChunkSource> Pool<S> {
    /// Cache `e` in `sh`, making room for its bin first.
    pub(super) fn push_growing(sh: &mut Shard, classes: usize, e: Freed) {
        if sh.bins.len() <= e.class as usize {
            sh.bins.resize_with(classes, Vec::new);
            sh.nonempty.resize(classes.div_ceil(64), 0);
        }
        sh.push_freed(e);
    }

    /// Free a large block into a shard that admits none (see [`Shard::debt`]), one free in
    /// [`PROBE_EVERY`]: the block becomes the shard's probe, and the previous probe goes
    /// back to the central allocator. The next allocation that misses the cache returns
    /// it too (in `alloc_unit_central` or `alloc_slow`), so a probe never sits in the way. A hit on it counts
    /// towards admitting large frees again, so the cache takes them again when their sizes
    /// start to repeat.
    #[cold]
    pub(super) fn probe_cache(
        &self,
        i: usize,
        cell: &ShardCell,
        e: Freed,
    ) -> Result<(), FreeError> {
        let mut c = self.central.lock();
        if let Some(e) = self.return_probe(&mut c, i, cell, Some(e)) {
            // No room for it: an ordinary free.
            self.release_freed(&mut c, i, e.node, e.size, Some(e.stream), e.event);
        }
        Ok(())
    }

    /// Return the probe of a shard of owner `i` to the central allocator, if it holds one,
    /// and make `next` (a block being freed) the new probe if the shard has room for it;
    /// if not, `next` comes back.
    pub(super) fn return_probe(
        &self,
        c: &mut Central,
        i: usize,
        cell: &ShardCell,
        next: Option<Freed>,
    ) -> Option<Freed> {
        let mut sh = cell.lock.lock();
        if let Some(old) = sh.take_probe() {
            sh.returned_unused(old.size);
            self.release_node(c, i, old.node, old.size, Some(old.stream), old.event);
        }
        cell.hint_probe.store(0, Ordering::Relaxed);
        let left = match next {
            Some(e) if sh.bytes + e.size <= self.cfg.cache_bytes_per_shard => {
                sh.probe = Some((e.class, e.node));
                Self::push_growing(&mut sh, self.cache_classes, e);
                cell.hint_probe.store(1, Ordering::Relaxed);
                None
            }
            other => other,
        };
        cell.publish_all(&sh);
        left
    }

    /// Ask local caches to give their blocks back at their next call: those of owner slot
    /// `owner`, whose limit is short, or with `None` every one (the pool is short of memory,
    /// or trims). Not for a `spare` request: its own cache gives its blocks back itself, and
    /// no other need go for it. (Nor when the pool merely grows: a growth is not a shortage,
    /// and local caches that gave back on every one would lose their blocks through a
    /// warm-up.)
    pub(super) fn ask_local_caches(&self, spare: bool, owner: Option<usize>) {
        if spare {
            return;
        }
        let counter = match owner {
            Some(i) => &*self.slots[i].reclaims,
            None => &*self.reclaims,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Return every owner's cached blocks to the central allocator. Returns bytes returned.
    pub(super) fn flush_all(&self, c: &mut Central) -> u64 {
        (0..self.slots.len()).map(|i| self.flush_owner(c, i)).sum()
    }

    pub(super) fn flush_owner(&self, c: &mut Central, i: usize) -> u64 {
        if c.owners[i].is_none() {
            return 0;
        }
        self.slots[i]
            .shards
            .iter()
            .filter(|cell| cell.hint_bytes.load(Ordering::Relaxed) != 0)
            .map(|cell| self.flush_cell(c, i, cell))
            .sum()
    }

    /// Return the blocks of one shard of owner `i` to the central allocator. Returns the
    /// bytes returned.
    pub(super) fn flush_cell(&self, c: &mut Central, i: usize, cell: &ShardCell) -> u64 {
        let mut sh = cell.lock.lock();
        let mut total = 0;
        // Blocks go back with the shard's lock held (the central lock is taken first, as
        // everywhere): no list to collect them in, and the shard is not seen half-flushed.
        let shr = &mut *sh;
        for (w, word) in shr.nonempty.iter_mut().enumerate() {
            while *word != 0 {
                let b = word.trailing_zeros() as usize;
                *word &= *word - 1;
                for e in shr.bins[w * 64 + b].drain(..) {
                    let e = Shard::detach_from(&mut shr.ordered, e);
                    total += e.size;
                    if e.size > shr.small {
                        shr.debt = (shr.debt + 1).min(DEBT_CAP);
                    }
                    self.release_node(c, i, e.node, e.size, Some(e.stream), e.event);
                }
            }
        }
        sh.bytes = 0;
        sh.probe = None;
        cell.hint_probe.store(0, Ordering::Relaxed);
        cell.publish_empty(&sh);
        total
    }
}
