//! The pool: a central TLSF behind one lock, fronted by per-owner caches sharded by thread.

// Errors are built lazily even where they carry no heap data: an eagerly built `PoolError`
// must be dropped through the enum's drop glue, which showed up on the hot path.
#![allow(clippy::unnecessary_lazy_evaluations)]

use crate::error::{FreeError, Holding, OomReport, PoolError, SourceError};
use crate::evict::{EvState, EvictError, Evictor, Residency, RestoreInfo, VictimInfo};
use crate::source::ChunkSource;
use crate::sync::{
    thread_index, AtomicU32, AtomicU64, Condvar, Mutex, MutexGuard, Ordering, ShardLock,
};
use crate::tlsf::{ceil_class, floor_class, Tlsf, NONE, UNIT};

const ALIGN_UNIT: u64 = UNIT;
use crate::{
    Block, EvictableId, EvictableRef, FreeEvent, OwnerId, OwnerSpec, OwnerStats, Pinned, PoolId,
    PoolStats, StreamId, Tier, INHERITS,
};
use crossbeam_utils::CachePadded;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Settings of a [`Pool`].
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Most bytes the pool maps in all; `None` for the whole reserved range.
    pub capacity: Option<u64>,
    /// Smallest growth step in bytes (rounded up to the granularity).
    pub min_grow: u64,
    /// Blocks up to this size are cached per owner and thread for O(1) reuse.
    pub cache_max_block: u64,
    /// Bytes each owner may keep cached per thread shard before frees go back to the
    /// central allocator.
    pub cache_bytes_per_shard: u64,
    /// Most owners at once.
    pub max_owners: u32,
    /// Cache shards per owner (rounded up to a power of two); 0 picks one per CPU, up to 16.
    pub shards: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            capacity: None,
            min_grow: 2 << 20,
            cache_max_block: 64 << 20,
            cache_bytes_per_shard: 64 << 20,
            max_owners: 64,
            shards: 0,
        }
    }
}

impl PoolConfig {
    /// Cap the bytes mapped.
    pub fn capacity(mut self, bytes: u64) -> Self {
        self.capacity = Some(bytes);
        self
    }
    /// Set the per-shard cache budget (0 disables caching).
    pub fn cache_bytes_per_shard(mut self, bytes: u64) -> Self {
        self.cache_bytes_per_shard = bytes;
        self
    }
    /// Set the smallest growth step.
    pub fn min_grow(mut self, bytes: u64) -> Self {
        self.min_grow = bytes;
        self
    }
    /// Set the number of cache shards per owner.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }
}

/// A block on its way into a cache: what a free hands over.
struct Freed {
    class: u32,
    node: u32,
    offset: u64,
    size: u64,
    stream: StreamId,
    event: Option<Arc<dyn FreeEvent>>,
}

impl Freed {
    /// A block freed with no stream-ordering event.
    #[inline]
    fn plain(b: &Block) -> Self {
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
struct Cached {
    offset: u64,
    size: u64,
    node: u32,
    class: u32,
    /// Index into `Shard::ordered`, or [`NO_EVENT`].
    ev: u32,
}

/// [`Cached::ev`] of a block that any stream may reuse at once.
const NO_EVENT: u32 = u32::MAX;

/// Each cached large block that goes back to the central allocator unused adds one to its
/// shard's debt; each large block reused from the cache pays back this much.
const HIT_CREDIT: i32 = 2;
/// While a shard's debt is at or above this, it admits no more large blocks (see
/// [`Shard::debt`]).
const DEBT_LIMIT: i32 = 32;
/// The debt of a new shard: it admits large blocks until a few go back unused.
const INITIAL_DEBT: i32 = DEBT_LIMIT - 8;
/// A shard that admits no large frees still takes one in this many, as a probe.
const PROBE_EVERY: u32 = 16;
/// Bound on the debt either way, so that a long history neither locks the cache out nor
/// keeps it open for long after the pattern changes.
const DEBT_CAP: i32 = 64;

/// A shard of one owner's cache.
struct Shard {
    bins: Vec<Vec<Cached>>,
    /// The stream and event of each cached stream-ordered free (see [`Cached::ev`]).
    ordered: slab::Slab<(StreamId, Arc<dyn FreeEvent>)>,
    /// Bit `c` set when `bins[c]` is not empty, so flushes visit only those.
    nonempty: Vec<u64>,
    bytes: u64,
    /// Allocations served from this shard.
    hits: u64,
    /// Frees into this shard.
    frees: u64,
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
    debt: i32,
    /// Blocks of at most this many bytes are small (see `debt`).
    small: u64,
    /// The probe, if one is held: its class and node.
    probe: Option<(u32, u32)>,
}

impl Shard {
    fn new(small: u64) -> Self {
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
    fn put(&mut self, c: Cached) {
        self.hits -= 1;
        self.frees -= 1;
        if c.size > self.small {
            self.debt = (self.debt + HIT_CREDIT).min(DEBT_CAP);
        }
        self.push(c);
    }

    /// Whether a freed block of `size` bytes may be cached here (room aside).
    #[inline]
    fn admits_size(&self, size: u64) -> bool {
        size <= self.small || self.admits()
    }

    /// Count a cached block going back to the central allocator unused.
    fn returned_unused(&mut self, size: u64) {
        if size > self.small {
            self.debt = (self.debt + 1).min(DEBT_CAP);
        }
    }

    /// Take the probe out, if one is held.
    fn take_probe(&mut self) -> Option<Freed> {
        let (class, node) = self.probe.take()?;
        let bin = self.bins.get_mut(class as usize)?;
        let i = bin.iter().position(|e| e.node == node)?;
        let e = bin.swap_remove(i);
        if bin.is_empty() {
            self.nonempty[class as usize / 64] &= !(1 << (class % 64));
        }
        self.bytes -= e.size;
        Some(self.detach(e))
    }

    /// Whether cached block `c` is usable on `stream` now without any wait.
    #[inline]
    fn usable_on(
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
    fn detach(&mut self, c: Cached) -> Freed {
        Self::detach_from(&mut self.ordered, c)
    }

    fn detach_from(ordered: &mut slab::Slab<(StreamId, Arc<dyn FreeEvent>)>, c: Cached) -> Freed {
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
    fn reused(&mut self, c: &Cached, stream: StreamId) -> Option<StreamOrder> {
        if c.ev == NO_EVENT {
            return None;
        }
        self.ordered
            .try_remove(c.ev as usize)
            .filter(|(s, _)| *s == stream)
    }

    /// Whether frees may be cached here.
    #[inline]
    fn admits(&self) -> bool {
        self.debt < DEBT_LIMIT
    }

    /// Take a cached block of at least `size` bytes (a multiple of the unit): from the
    /// size's own bin, checking sizes, else from the next bin up, where all fit.
    #[inline]
    fn take_fit(&mut self, size: u64, stream: StreamId) -> Option<Cached> {
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
    fn pop_top(&mut self, class: usize, min: u64, stream: StreamId) -> Option<Cached> {
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
    fn took(&mut self, c: &Cached) {
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
    fn take(&mut self, class: usize, stream: StreamId, min: u64) -> Option<Cached> {
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
    fn take_below(
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
    fn push_freed(&mut self, f: Freed) {
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
    fn push(&mut self, c: Cached) {
        let class = c.class as usize;
        self.bytes += c.size;
        self.frees += 1;
        self.nonempty[class / 64] |= 1 << (class % 64);
        self.bins[class].push(c);
    }
}

/// A shard and the hints that let the hot path skip its lock.
struct ShardCell {
    lock: ShardLock<Shard>,
    /// Mirrors of `Shard::nonempty` and `Shard::bytes`, written under the lock and read
    /// without it, so that a cache miss or a full shard costs no lock. A stale hint only
    /// sends a request down the slower path.
    hint_nonempty: Box<[AtomicU64]>,
    hint_bytes: AtomicU64,
    /// Mirror of [`Shard::admits`]: 1 when the shard admits large frees.
    hint_admits: AtomicU32,
    /// 1 when the shard may hold a probe (set with it, cleared when it is returned; a
    /// hit leaves it set, which costs one needless look).
    hint_probe: AtomicU32,
    /// Mirror of [`Shard::small`].
    small: u64,
    /// Frees the shard refused, to pick which ones probe it.
    frees_refused: AtomicU32,
}

impl ShardCell {
    fn new(classes: usize, small: u64) -> Self {
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
    fn may_admit(&self, size: u64, budget: u64) -> bool {
        (size <= self.small || self.hint_admits.load(Ordering::Relaxed) != 0)
            && self.hint_bytes.load(Ordering::Relaxed) + size <= budget
    }

    /// Whether the bin of `class` may hold a block.
    #[inline]
    fn may_have(&self, class: usize) -> bool {
        self.hint_nonempty
            .get(class / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (class % 64)) != 0)
    }

    /// Publish the shard's state after a block of `size` bytes and `class` went in or out
    /// (call with the lock held). Only large blocks move the admission score.
    #[inline]
    fn publish(&self, sh: &Shard, class: usize, size: u64) {
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
    fn publish_all(&self, sh: &Shard) {
        for (h, &w) in self.hint_nonempty.iter().zip(&sh.nonempty) {
            h.store(w, Ordering::Relaxed);
        }
        self.hint_bytes.store(sh.bytes, Ordering::Relaxed);
        self.hint_admits
            .store(u32::from(sh.admits()), Ordering::Relaxed);
    }

    /// Publish a shard with no blocks (call with the lock held).
    fn publish_empty(&self, sh: &Shard) {
        for h in self.hint_nonempty.iter() {
            h.store(0, Ordering::Relaxed);
        }
        self.hint_bytes.store(0, Ordering::Relaxed);
        self.hint_admits
            .store(u32::from(sh.admits()), Ordering::Relaxed);
    }
}

struct OwnerSlot {
    /// Generation; odd while the slot holds an owner.
    gen: AtomicU32,
    /// Times the owner's limit was short; its local caches give their blocks back when they
    /// see it move (see [`crate::LocalCache`]). Padded: `gen`, beside it, is read on every
    /// allocation.
    reclaims: CachePadded<AtomicU64>,
    /// Padded so that threads working on neighbouring shards do not share cache lines.
    shards: Box<[CachePadded<ShardCell>]>,
    /// The stream-ordered frees whose work may still be running in the blocks handed out
    /// on their streams, by node: the blocks marked [`INHERITS`]. Their free takes the
    /// entry back and waits for it on other streams.
    inherited: Mutex<HashMap<u32, StreamOrder>>,
}

/// A stream-ordered free: its stream, and the event that completes with its work there.
type StreamOrder = (StreamId, Arc<dyn FreeEvent>);

impl OwnerSlot {
    /// Keep `order`, a stream-ordered free of the memory of block `node` whose stream it is
    /// handed out on, until the block is freed; returns the node marked [`INHERITS`].
    #[cold]
    #[inline(never)]
    fn inherit(&self, node: u32, order: StreamOrder) -> u32 {
        self.inherited.lock().insert(node, order);
        node | INHERITS
    }
}

/// Where the central allocator placed a request.
pub(crate) struct Placed {
    pub node: u32,
    pub offset: u64,
    /// The owner's stream-ordered free it reused on the same stream, if any. Its event
    /// still orders the memory against other streams: should the request be abandoned
    /// (a failed restore), the block goes back to the pending list, not to the free lists.
    reused: Option<Pending>,
}

impl Placed {
    fn fresh((node, offset): (u32, u64)) -> Self {
        Placed {
            node,
            offset,
            reused: None,
        }
    }
}

/// An allocation waiting for its stream's work to finish before any other stream may use it.
struct Pending {
    node: u32,
    size: u64,
    /// The owner that freed it: only that owner may reuse it on `stream` before `event`
    /// completes. Another owner's request on a stream with the same number knows nothing
    /// of the work still queued there, and could hand it on with a plain free.
    owner: OwnerId,
    /// The one stream whose work `event` waits for, which may reuse the block at once;
    /// `None` when work on several streams may still use it: then none may.
    stream: Option<StreamId>,
    event: Arc<dyn FreeEvent>,
}

impl Pending {
    /// The memory of `node`, which queued work on `uses`' streams may still use (none:
    /// nothing to wait for, and `None`).
    fn after_uses(
        node: u32,
        size: u64,
        owner: OwnerId,
        mut uses: Vec<(StreamId, Arc<dyn FreeEvent>)>,
    ) -> Option<Self> {
        let (stream, event) = match uses.len() {
            0 => return None,
            1 => {
                let (s, e) = uses.swap_remove(0);
                (Some(s), e)
            }
            _ => (
                None,
                Arc::new(AllOf(uses.into_iter().map(|(_, e)| e).collect())) as Arc<dyn FreeEvent>,
            ),
        };
        Some(Pending {
            node,
            size,
            owner,
            stream,
            event,
        })
    }
}

/// The work of several events: complete when all of theirs is.
struct AllOf(Vec<Arc<dyn FreeEvent>>);

impl FreeEvent for AllOf {
    fn is_complete(&self) -> bool {
        self.0.iter().all(|e| complete(&**e))
    }

    fn wait(&self) {
        for e in &self.0 {
            wait_for(&**e);
        }
    }
}

/// Whether `e`'s work is done. The pool asks with its lock held, between steps that must
/// all happen: a panic in the user's event is taken for "not yet" (the memory it orders
/// stays where it is) rather than let unwind through them.
pub(crate) fn complete(e: &dyn FreeEvent) -> bool {
    catch_unwind(AssertUnwindSafe(|| e.is_complete())).unwrap_or_else(|_| {
        tracing::error!(
            "a free event panicked when asked whether its work is done; taken for not yet"
        );
        false
    })
}

/// Wait for `e`'s work; a panic in it is logged, and its memory stays ordered (see
/// [`complete`]).
pub(crate) fn wait_for(e: &dyn FreeEvent) {
    if catch_unwind(AssertUnwindSafe(|| e.wait())).is_err() {
        tracing::error!("a free event panicked while waited for");
    }
}

/// Whether `evictor` holds idle pins; a panic in it is taken for "none" (see [`complete`]).
fn holds_idle(evictor: &dyn Evictor) -> bool {
    catch_unwind(AssertUnwindSafe(|| evictor.holds_idle_pins())).unwrap_or_else(|_| {
        tracing::error!("the evictor panicked when asked for idle pins; taken for none");
        false
    })
}

pub(crate) struct OwnerAcct {
    pub spec: OwnerSpec,
    /// Live + cached + resident evictable bytes.
    pub charged: u64,
    pub peak_charged: u64,
    pub peak_live: u64,
    pub evictable_resident: u64,
    pub evictable_pinned: u64,
    pub evicted_bytes: u64,
    /// Resident bytes whose move out has started (still charged until it ends).
    pub evicting: u64,
    /// Of those, bytes of blocks freed during their move: freed when it ends.
    pub doomed: u64,
    pub allocs: u64,
    pub frees: u64,
    pub evictions: u64,
    pub restores: u64,
}

impl OwnerAcct {
    #[inline]
    fn committed(&self) -> u64 {
        self.charged.max(self.spec.base)
    }

    /// What charging `size` more adds to the owner's commitment: nothing while it stays
    /// within its reserved base.
    #[inline]
    fn commitment_added(&self, size: u64) -> u64 {
        (self.charged + size).max(self.spec.base) - self.committed()
    }
}

pub(crate) struct Central {
    pub tlsf: Tlsf,
    chunks: BTreeMap<u64, u64>,
    /// Whether trimming left holes between chunks (only then does growth look for one).
    holes: bool,
    /// Chunks retired after a failed unmap, by offset (see [`Pool::trim`]): still counted in
    /// `mapped` and `chunks`, never handed out.
    retired: BTreeMap<u64, u64>,
    /// Blocks retired after a restore panicked, by node: a copy it queued may still land
    /// there, so they stay used, owned by no one, and are never handed out.
    retired_blocks: Vec<u32>,
    mapped: u64,
    peak_mapped: u64,
    peak_live: u64,
    peak_cached: u64,
    pending: Vec<Pending>,
    pub owners: Vec<Option<OwnerAcct>>,
    committed: u64,
    in_use: u64,
    peak_in_use: u64,
    pub ev: EvState,
    evictor: Option<Arc<dyn Evictor>>,
    /// Evictor failures of the latest request that went down the general central path,
    /// for [`Pool::snapshot`].
    evict_failures: Vec<String>,
    /// Evictions and restores whose bytes are moving while this lock is free. A request
    /// that finds no memory waits for them to end before it reports out of memory.
    in_flight: usize,
    /// Bytes of the evictions among them: memory that is about to be free. A request
    /// whose shortfall they cover waits for them rather than evict more.
    evicting: u64,
    /// Cache hits of removed owners, so that pool-wide counts never go down.
    retired_hits: u64,
    allocs: u64,
    frees: u64,
    evictions: u64,
    restores: u64,
}

/// The allocator. `Send + Sync`; share it by reference or in an `Arc`.
pub struct Pool<S: ChunkSource> {
    id: PoolId,
    source: S,
    cfg: PoolConfig,
    granularity: u64,
    limit: u64,
    shard_mask: usize,
    cache_classes: usize,
    slots: Box<[OwnerSlot]>,
    central: Mutex<Central>,
    /// Notified whenever an eviction or restore in flight ends (see [`Residency::in_flight`]).
    moved: Condvar,
    /// Times the pool flushed its caches to find memory; local caches give their blocks
    /// back when they see it move (see [`crate::LocalCache`]).
    reclaims: CachePadded<AtomicU64>,
}

type CentralGuard<'a> = MutexGuard<'a, Central>;

/// What one request that reclaims memory keeps across the times it lets the central lock go.
#[derive(Default)]
struct Reclaiming {
    /// Why evictions failed, for the request's out-of-memory report.
    failures: Vec<String>,
    /// Victims whose eviction failed after it started: this request does not choose them
    /// again (they rejoin their LRU list, which it walks afresh).
    skip: Vec<u32>,
    /// The request evicts nothing: it fails instead (see [`Pool::alloc_sparing`]).
    spare: bool,
    /// The evictor was asked to let go of its idle pins since the request last let the
    /// lock go to wait or to finish an eviction (it asks again after those: pins that were
    /// in use when it asked may be idle by then). Also cleared for the last ask before
    /// the request fails.
    idle_released: bool,
    /// The request was about to fail for lack of memory and asked for idle pins once more
    /// (pins ridden when it last asked may have gone idle since).
    last_ask: bool,
}

impl Reclaiming {
    fn failed(&mut self, err: &EvictError) {
        tracing::warn!(error = %err, "evicting a block failed; trying the next one");
        if self.failures.len() < 8 {
            self.failures.push(err.to_string());
        }
    }
}

/// How often a request that waits for moves under way looks again at the pending
/// stream-ordered frees (see [`Pool::place`]).
const PENDING_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// What an eviction is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Room in the pool's commitments (`Σ max(charged, base)` within capacity).
    Commitment,
    /// Free address space to place a request in.
    Space,
}

/// An eviction whose bytes are moving: its finish runs without the central lock.
struct InFlight {
    idx: u32,
    finish: Box<dyn FnOnce() -> Result<(), EvictError> + Send>,
}

/// Why the central path stopped short of placing a request.
enum Stop {
    /// The request cannot be served.
    Fail(PoolError),
    /// It started an eviction whose bytes are still moving: finish that without the lock,
    /// then try again.
    Finish(InFlight),
    /// Other requests' evictions or restores are in flight, and may free what this one
    /// needs: wait for one to end, then try again.
    Wait,
    /// It is about to choose a victim while the evictor's owners keep idle pins (see
    /// [`Evictor::release_idle_pins`]): have them let go, without the lock, then try
    /// again.
    ReleaseIdle,
}

impl From<PoolError> for Stop {
    fn from(e: PoolError) -> Self {
        Stop::Fail(e)
    }
}

impl<S: ChunkSource> std::fmt::Debug for Pool<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("id", &self.id)
            .field("granularity", &self.granularity)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

fn next_pool_id() -> PoolId {
    use std::sync::atomic::{AtomicU32 as StdAtomicU32, Ordering as O};
    static NEXT: StdAtomicU32 = StdAtomicU32::new(1);
    loop {
        // Zero, once every 2^32 pools, is skipped: it is `Option<Block>`'s niche.
        if let Some(id) = PoolId::new(NEXT.fetch_add(1, O::Relaxed)) {
            return id;
        }
    }
}

enum Grow {
    Grew,
    Full,
}

impl<S: ChunkSource> Pool<S> {
    /// A pool over `source`. Nothing is mapped until the first allocation.
    pub fn new(source: S, cfg: PoolConfig) -> Result<Self, PoolError> {
        let g = source.granularity();
        if g < UNIT || !g.is_power_of_two() {
            return Err(PoolError::BadConfig(format!(
                "the source's granularity {g} must be a power of two of at least {UNIT}"
            )));
        }
        let va = source.va_size() / g * g;
        let limit = match cfg.capacity {
            Some(0) => return Err(PoolError::BadConfig("capacity must be positive".into())),
            Some(c) if c > va => {
                return Err(PoolError::BadConfig(format!(
                    "capacity {c} exceeds the source's reserved range of {va} bytes"
                )))
            }
            Some(c) => c / g * g,
            None => va,
        };
        if limit == 0 {
            return Err(PoolError::BadConfig(format!(
                "the capacity must hold at least one {g}-byte chunk"
            )));
        }
        if cfg.max_owners == 0 || cfg.max_owners > 1 << 16 {
            return Err(PoolError::BadConfig(
                "max_owners must be in 1..=65536".into(),
            ));
        }
        let shards = match cfg.shards {
            0 => std::thread::available_parallelism()
                .map_or(4, |n| n.get())
                .min(16),
            n => n.min(256),
        }
        .next_power_of_two();
        // Nothing larger than the pool can be cached, whatever the setting says.
        let mut cfg = cfg;
        cfg.cache_max_block = cfg.cache_max_block.min(limit);
        // Nor can the pool grow by more than it may map (this also keeps the rounding of
        // the step to the granularity from overflowing).
        cfg.min_grow = cfg.min_grow.min(limit);
        let cache_classes = cfg
            .cache_max_block
            .max(UNIT)
            .checked_next_multiple_of(UNIT)
            .and_then(ceil_class)
            .map_or(0, |c| c + 1);
        let slots = (0..cfg.max_owners)
            .map(|_| OwnerSlot {
                gen: AtomicU32::new(0),
                reclaims: CachePadded::new(AtomicU64::new(0)),
                shards: (0..shards)
                    .map(|_| CachePadded::new(ShardCell::new(cache_classes, g / 16)))
                    .collect(),
                inherited: Mutex::new(HashMap::new()),
            })
            .collect();
        let owners = (0..cfg.max_owners).map(|_| None).collect();
        Ok(Pool {
            id: next_pool_id(),
            granularity: g,
            limit,
            shard_mask: shards - 1,
            cache_classes,
            slots,
            central: Mutex::new(Central {
                tlsf: {
                    // Blocks that fit in one chunk count as small (see `Tlsf::alloc`).
                    let mut t = Tlsf::new();
                    t.set_back_max(g);
                    t
                },
                chunks: BTreeMap::new(),
                holes: false,
                retired: BTreeMap::new(),
                retired_blocks: Vec::new(),
                mapped: 0,
                peak_mapped: 0,
                peak_live: 0,
                peak_cached: 0,
                pending: Vec::new(),
                owners,
                committed: 0,
                in_use: 0,
                peak_in_use: 0,
                ev: EvState::default(),
                evictor: None,
                evict_failures: Vec::new(),
                in_flight: 0,
                evicting: 0,
                retired_hits: 0,
                allocs: 0,
                frees: 0,
                evictions: 0,
                restores: 0,
            }),
            moved: Condvar::default(),
            reclaims: CachePadded::new(AtomicU64::new(0)),
            source,
            cfg,
        })
    }

    /// The chunk source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The most bytes the pool will map.
    pub fn capacity(&self) -> u64 {
        self.limit
    }

    /// Address of a block.
    #[inline]
    pub fn addr(&self, block: &Block) -> u64 {
        self.source.addr(block.offset)
    }

    /// Install the hook that moves evicted blocks out and back in.
    pub fn set_evictor(&self, evictor: Arc<dyn Evictor>) {
        self.central.lock().evictor = Some(evictor);
    }

    /// Register an owner (a tenant) with a hard limit and a reserved base.
    pub fn add_owner(&self, spec: OwnerSpec) -> Result<OwnerId, PoolError> {
        if spec.limit == 0 {
            return Err(PoolError::BadOwner(format!(
                "owner {:?} has a zero limit",
                spec.name
            )));
        }
        if spec.base > spec.limit {
            return Err(PoolError::BadOwner(format!(
                "owner {:?} has a base of {} B above its limit of {} B",
                spec.name, spec.base, spec.limit
            )));
        }
        let mut c = self.central.lock();
        // Bases are checked against other bases only: memory that unreserved owners use now
        // is reclaimed (evicted, or waited for) when the new owner needs it.
        let bases: u64 = c.owners.iter().flatten().map(|a| a.spec.base).sum();
        if spec.base > 0 && spec.base > self.limit.saturating_sub(bases) {
            return Err(PoolError::BadOwner(format!(
                "owner {:?} asks to reserve {} B but only {} B of the pool's {} B are not reserved by others",
                spec.name,
                spec.base,
                self.limit.saturating_sub(bases),
                self.limit
            )));
        }
        // A slot whose generation has run out (2^31 owners came and went there) is not
        // used again: a wrapped generation would make an old owner's id valid once more.
        let Some(slot) = c
            .owners
            .iter()
            .zip(self.slots.iter())
            .position(|(a, s)| a.is_none() && s.gen.load(Ordering::Relaxed) < u32::MAX - 1)
        else {
            let live = c.owners.iter().flatten().count() as u32;
            return Err(if live < self.cfg.max_owners {
                PoolError::OwnerSlotsWornOut {
                    live,
                    max: self.cfg.max_owners,
                }
            } else {
                PoolError::TooManyOwners(self.cfg.max_owners)
            });
        };
        // Its base is committed from now on, on top of what others use: the sum may exceed
        // the capacity for a while, until usage above bases is reclaimed.
        c.committed = c.committed.saturating_add(spec.base);
        c.owners[slot] = Some(OwnerAcct {
            spec,
            charged: 0,
            peak_charged: 0,
            peak_live: 0,
            evictable_resident: 0,
            evictable_pinned: 0,
            evicted_bytes: 0,
            evicting: 0,
            doomed: 0,
            allocs: 0,
            frees: 0,
            evictions: 0,
            restores: 0,
        });
        let s = &self.slots[slot];
        let gen = s.gen.load(Ordering::Relaxed) + 1;
        s.gen.store(gen, Ordering::Release);
        Ok(OwnerId::new(self.id, slot as u32, gen))
    }

    /// Remove an owner that holds nothing (its cache is returned first). A block freed
    /// while its bytes move out is freed when the move ends, and that is waited for; any
    /// other block, moving or not, makes the owner busy at once.
    pub fn remove_owner(&self, owner: OwnerId) -> Result<(), PoolError> {
        let mut c = self.central.lock();
        let slot = self.slot(owner)?;
        let acct = loop {
            self.flush_owner(&mut c, owner.slot() as usize);
            // Completed stream-ordered frees go back now, releasing their events: an
            // owner's departure is when their holder (a stream, a context) is likely to go
            // too.
            self.retire_pending(&mut c);
            let acct = c.owners[owner.slot() as usize]
                .as_ref()
                .ok_or_else(|| PoolError::UnknownOwner(owner))?;
            // Blocks freed while their bytes move out go when the move ends (see `doom`):
            // an owner that holds nothing else is not busy, only not done yet.
            let held = acct.charged + acct.evicted_bytes - acct.doomed;
            if held > 0 {
                return Err(PoolError::OwnerBusy { owner, bytes: held });
            }
            if acct.doomed == 0 {
                break acct;
            }
            c = self.moved.wait(c);
            self.slot(owner)?;
        };
        let base = acct.spec.base;
        c.committed -= base;
        c.owners[owner.slot() as usize] = None;
        for cell in slot.shards.iter() {
            let mut sh = cell.lock.lock();
            c.allocs += sh.hits;
            c.frees += sh.frees;
            c.retired_hits += sh.hits;
            *sh = Shard::new(cell.small);
            cell.publish_empty(&sh);
        }
        slot.gen.store(owner.gen() + 1, Ordering::Release);
        Ok(())
    }

    /// The slot of `owner` if the owner is of this pool, whether or not it is still
    /// registered (the caller checks its generation); for fast paths, which build no
    /// error (the slow path reports it).
    #[inline]
    fn pool_slot(&self, owner: OwnerId) -> Option<&OwnerSlot> {
        let s = self.slots.get(owner.slot() as usize)?;
        (owner.pool == self.id).then_some(s)
    }

    #[inline]
    fn slot(&self, owner: OwnerId) -> Result<&OwnerSlot, PoolError> {
        if owner.pool != self.id {
            return Err(PoolError::UnknownOwner(owner));
        }
        let s = self
            .slots
            .get(owner.slot() as usize)
            .ok_or_else(|| PoolError::UnknownOwner(owner))?;
        if s.gen.load(Ordering::Acquire) != owner.gen() {
            return Err(PoolError::UnknownOwner(owner));
        }
        Ok(s)
    }

    #[inline]
    fn cell<'a>(&self, slot: &'a OwnerSlot) -> &'a ShardCell {
        &slot.shards[thread_index() & self.shard_mask]
    }

    /// How many times the pool has asked local caches for their blocks.
    #[inline(always)]
    pub(crate) fn reclaims(&self) -> u64 {
        self.reclaims.load(Ordering::Relaxed)
    }

    /// The counter that moves when `owner`'s limit is short (see [`OwnerSlot::reclaims`]),
    /// if `owner` is registered with this pool.
    pub(crate) fn owner_reclaims(&self, owner: OwnerId) -> Result<&AtomicU64, PoolError> {
        self.slot(owner).map(|s| &*s.reclaims)
    }

    /// The largest block the caches keep, and how many size classes that makes.
    pub(crate) fn cache_limits(&self) -> (u64, usize) {
        (self.cfg.cache_max_block, self.cache_classes)
    }

    /// Allocate `size` bytes for `owner`, to be used on `stream`, aligned to 256 bytes.
    #[inline]
    pub fn alloc(&self, owner: OwnerId, size: u64, stream: StreamId) -> Result<Block, PoolError> {
        if let Some(b) = self.alloc_cached(owner, size, stream) {
            return Ok(b);
        }
        let (offset, node) = self.alloc_unit_central(owner, size);
        if node == NONE {
            return self.alloc_slow(owner, size, ALIGN_UNIT, stream);
        }
        // The central path checked that the rounded size neither overflows nor exceeds the
        // pool's limit.
        Ok(Block::new(
            offset,
            size.wrapping_add(UNIT - 1) & !(UNIT - 1),
            owner,
            node,
        ))
    }

    /// The fast path of [`Pool::alloc`]: a block of about `size` bytes from the calling
    /// thread's shard of `owner`'s cache, usable on `stream`.
    #[inline(always)]
    fn alloc_cached(&self, owner: OwnerId, size: u64, stream: StreamId) -> Option<Block> {
        if let Some(slot) = self.pool_slot(owner) {
            let cell = self.cell(slot);
            // An empty shard (where large sizes that do not repeat go uncached) costs one
            // load, and no size class.
            if size.wrapping_sub(1) < self.cfg.cache_max_block
                && cell.hint_bytes.load(Ordering::Relaxed) != 0
            {
                let size_r = size.next_multiple_of(UNIT);
                let fc = floor_class(size_r);
                if cell.may_have(fc) || ceil_class(size_r).is_some_and(|cc| cell.may_have(cc)) {
                    let mut sh = cell.lock.lock();
                    // The owner's generation is read under the shard's lock: `remove_owner`
                    // empties the shards before it moves the generation on, so a removed
                    // owner never takes a block its slot's next owner cached.
                    if slot.gen.load(Ordering::Relaxed) == owner.gen() {
                        // The hot case: the most recent block of the size's own class.
                        // Kept apart from the general search below so that the entry
                        // stays in registers.
                        if let Some(c) = sh.pop_top(fc, size_r, stream) {
                            return Some(Self::hand_out(slot, cell, sh, c, owner, stream));
                        }
                        if let Some(c) = sh.take_fit(size_r, stream) {
                            return Some(Self::hand_out(slot, cell, sh, c, owner, stream));
                        }
                    }
                }
            }
        }
        None
    }

    /// A request at the allocation unit's alignment that missed the cache: the common
    /// case of the central path, with no alignment to check and no cache to search again.
    /// Kept apart from [`Pool::alloc_slow`], whose other cases made this one save and
    /// restore more registers: on the serving replay, where most requests come here,
    /// that cost about 40 instructions a request. It is `#[cold]` all the same, so that
    /// the cache's hits, in the caller, are laid out as the straight path.
    ///
    /// Returns the block's offset and node, or [`NONE`] for the node where the request
    /// must take [`Pool::alloc_slow`]. Sixteen bytes come back in two registers, and the
    /// caller builds the [`Block`] where it is used; a `Result<Block, PoolError>` (48
    /// bytes) came back through memory, written field by field and read back in 16-byte
    /// moves that the CPU cannot forward from those stores. On the serving replay this
    /// took a request from 39.5–40.5 to 38.0 ns (`pool_bench`, builds run alternately).
    #[cold]
    #[inline(never)]
    fn alloc_unit_central(&self, owner: OwnerId, size: u64) -> (u64, u32) {
        let (Some(slot), Some(csize)) = (
            self.pool_slot(owner),
            size.checked_next_multiple_of(UNIT)
                .filter(|&c| size != 0 && c <= self.limit),
        ) else {
            return (0, NONE);
        };
        let mut c = self.central.lock();
        // As in `alloc_slow`: the generation is checked under this lock.
        if slot.gen.load(Ordering::Relaxed) == owner.gen() {
            let cell = self.cell(slot);
            if cell.hint_probe.load(Ordering::Relaxed) != 0 {
                let _none = self.return_probe(&mut c, owner.slot() as usize, cell, None);
            }
            if let Some((node, offset)) =
                Self::alloc_within_means(&mut c, owner.slot(), csize, ALIGN_UNIT, self.limit)
            {
                return (offset, node);
            }
        }
        (0, NONE)
    }

    /// Hand a block taken from the shard behind `sh` out to `owner`: its ordering event
    /// goes, the hints follow, and the shard is unlocked before the block is built.
    #[inline(always)]
    fn hand_out(
        slot: &OwnerSlot,
        cell: &ShardCell,
        mut sh: impl std::ops::DerefMut<Target = Shard>,
        c: Cached,
        owner: OwnerId,
        stream: StreamId,
    ) -> Block {
        let order = sh.reused(&c, stream);
        cell.publish(&sh, c.class as usize, c.size);
        drop(sh);
        let node = match order {
            None => c.node,
            Some(order) => slot.inherit(c.node, order),
        };
        Block::new(c.offset, c.size, owner, node)
    }

    /// Allocate with an alignment (a power of two up to the granularity).
    pub fn alloc_aligned(
        &self,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
    ) -> Result<Block, PoolError> {
        if align <= UNIT && align.is_power_of_two() {
            return self.alloc(owner, size, stream);
        }
        self.alloc_slow(owner, size, align, stream)
    }

    /// A request's size rounded to the allocation unit, or why it cannot be served.
    fn round_request(&self, size: u64) -> Result<u64, PoolError> {
        if size == 0 {
            return Err(PoolError::ZeroSize);
        }
        size.checked_next_multiple_of(UNIT)
            .filter(|&c| c <= self.limit)
            .ok_or_else(|| PoolError::TooLarge {
                requested: size,
                capacity: self.limit,
            })
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow(
        &self,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
    ) -> Result<Block, PoolError> {
        self.alloc_general(owner, size, align, stream, false)
    }

    /// Allocate as [`Pool::alloc`] does, but evict nothing: where only an eviction would
    /// make room, fail instead. For a local cache that holds idle blocks of its own, which
    /// it gives back before anyone's buffers are moved out (see [`crate::LocalCache`]).
    pub(crate) fn alloc_sparing(
        &self,
        owner: OwnerId,
        size: u64,
        stream: StreamId,
    ) -> Result<Block, PoolError> {
        if let Some(b) = self.alloc_cached(owner, size, stream) {
            return Ok(b);
        }
        self.alloc_general(owner, size, ALIGN_UNIT, stream, true)
    }

    /// The general path of every allocation; with `spare`, one that evicts nothing.
    fn alloc_general(
        &self,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
        spare: bool,
    ) -> Result<Block, PoolError> {
        let slot = self.slot(owner)?;
        let csize = self.round_request(size)?;
        if !align.is_power_of_two() || align > self.granularity {
            return Err(PoolError::BadAlignment {
                align,
                max: self.granularity,
            });
        }
        let align = align.max(UNIT);
        if align > UNIT && csize <= self.cfg.cache_max_block {
            // Aligned requests skip the fast path; a cached block may still be aligned.
            let cell = self.cell(slot);
            let mut sh = cell.lock.lock();
            // As in `alloc`: the generation is checked under the shard's lock.
            let probe = sh.probe;
            let taken = if slot.gen.load(Ordering::Relaxed) == owner.gen() {
                sh.take_fit(csize, stream)
            } else {
                None
            };
            if let Some(c) = taken {
                if c.offset.is_multiple_of(align) {
                    return Ok(Self::hand_out(slot, cell, sh, c, owner, stream));
                }
                let (class, csz) = (c.class as usize, c.size);
                sh.put(c);
                // Taking the probe cleared its mark; it is still the probe.
                if probe.is_some_and(|(_, n)| n == c.node) {
                    sh.probe = probe;
                }
                cell.publish(&sh, class, csz);
            }
        }
        let mut c = self.central.lock();
        // The owner may have been removed (and its slot reused) since the check above;
        // generations change only under this lock (and after the owner's shards are
        // emptied under theirs).
        self.slot(owner)?;
        // A probe this request did not reuse goes back first, so that it can coalesce
        // and serve this request (see `probe_cache`).
        let cell = self.cell(slot);
        if cell.hint_probe.load(Ordering::Relaxed) != 0 {
            let _none = self.return_probe(&mut c, owner.slot() as usize, cell, None);
        }
        let (node, offset) =
            match Self::alloc_within_means(&mut c, owner.slot(), csize, align, self.limit) {
                Some(placed) => placed,
                None => {
                    let (mut c, placed) = self.place(c, owner, csize, align, stream, false, spare);
                    let Placed {
                        node,
                        offset,
                        reused,
                    } = placed?;
                    let acct = c.owners[owner.slot() as usize]
                        .as_mut()
                        .ok_or_else(|| PoolError::UnknownOwner(owner))?;
                    acct.allocs += 1;
                    c.allocs += 1;
                    drop(c);
                    // A stream-ordered free of the owner's on this stream: its work may
                    // still use the memory, ahead of the new user's.
                    let node = match reused {
                        Some(p) => slot.inherit(node, (stream, p.event)),
                        None => node,
                    };
                    (node, offset)
                }
            };
        Ok(Block::new(offset, csize, owner, node))
    }

    /// Free a block whose memory no stream uses any more: any stream may reuse it at once.
    #[inline]
    pub fn free(&self, block: Block) -> Result<(), FreeError> {
        let Some((i, slot)) = self.block_slot(&block) else {
            return Err(FreeError { block });
        };
        if block.node() & INHERITS != 0 {
            return self.free_inheriting(i, slot, block, None);
        }
        let cell = self.cell(slot);
        if block.size <= self.cfg.cache_max_block {
            // One look at the hints first, whether the shard takes blocks of this size (it
            // may refuse large ones for a long time); the checks under the lock decide.
            if block.size <= cell.small || cell.hint_admits.load(Ordering::Relaxed) != 0 {
                let mut sh = cell.lock.lock();
                let class = block.class();
                if sh.admits_size(block.size)
                    && sh.bytes + block.size <= self.cfg.cache_bytes_per_shard
                {
                    if class < sh.bins.len() {
                        sh.push(Cached {
                            offset: block.offset,
                            size: block.size,
                            node: block.node(),
                            class: class as u32,
                            ev: NO_EVENT,
                        });
                        cell.publish(&sh, class, block.size);
                        return Ok(());
                    }
                    // The shard's first block: its bins are made now.
                    if class < self.cache_classes {
                        Self::push_growing(&mut sh, self.cache_classes, Freed::plain(&block));
                        cell.publish(&sh, class, block.size);
                        return Ok(());
                    }
                }
            } else if self.refused_probes(cell) {
                return self.probe_cache(i, cell, Freed::plain(&block));
            }
        }
        self.free_central(i, block.node(), block.size);
        Ok(())
    }

    /// The owner slot of a block, by index, if the block is of this pool; a block of
    /// another pool goes back to its caller, to be freed by the pool that made it.
    #[inline(always)]
    fn block_slot(&self, block: &Block) -> Option<(usize, &OwnerSlot)> {
        let i = block.owner_key as u32 as usize;
        let slot = self.slots.get(i)?;
        (block.pool_id() == self.id.get()).then_some((i, slot))
    }

    /// Count a large free that a shard refused; true for the one in [`PROBE_EVERY`] that
    /// probes it (see [`Pool::probe_cache`]).
    #[inline]
    fn refused_probes(&self, cell: &ShardCell) -> bool {
        // A plain counter: a lost update only moves a probe.
        let n = cell.frees_refused.load(Ordering::Relaxed).wrapping_add(1);
        cell.frees_refused.store(n, Ordering::Relaxed);
        n.is_multiple_of(PROBE_EVERY)
    }

    /// Free a block's node to the central allocator: no stream uses it any more. What
    /// [`Pool::release_freed`] does for a free without an event, written out: going through
    /// it cost the serving replay 23 M instructions (about 45 a free).
    #[inline(never)]
    fn free_central(&self, slot: usize, node: u32, size: u64) {
        let mut c = self.central.lock();
        let c = &mut *c;
        Self::uncharge(c, slot, size);
        if let Some(a) = c.owners.get_mut(slot).and_then(Option::as_mut) {
            a.frees += 1;
        }
        c.frees += 1;
        c.tlsf.free(node);
    }

    /// Count a free of owner `slot`'s block and give its node back (see
    /// [`Pool::release_node`]).
    #[inline]
    fn release_freed(
        &self,
        c: &mut Central,
        slot: usize,
        node: u32,
        size: u64,
        stream: Option<StreamId>,
        event: Option<Arc<dyn FreeEvent>>,
    ) {
        if let Some(a) = c.owners[slot].as_mut() {
            a.frees += 1;
        }
        c.frees += 1;
        self.release_node(c, slot, node, size, stream, event);
    }

    /// Free a block whose last use was work on `stream` that completes when `event` does.
    /// The same owner may reuse it at once on `stream`; other streams, and other owners,
    /// only after `event` completes.
    pub fn free_after(
        &self,
        block: Block,
        stream: StreamId,
        event: Arc<dyn FreeEvent>,
    ) -> Result<(), FreeError> {
        let Some((i, slot)) = self.block_slot(&block) else {
            return Err(FreeError { block });
        };
        if block.node() & INHERITS != 0 {
            return self.free_inheriting(i, slot, block, Some((stream, event)));
        }
        let cell = self.cell(slot);
        let cached = Freed {
            stream,
            event: Some(event),
            ..Freed::plain(&block)
        };
        if block.size <= self.cfg.cache_max_block && block.class() < self.cache_classes {
            if block.size > cell.small && cell.hint_admits.load(Ordering::Relaxed) == 0 {
                if self.refused_probes(cell) {
                    return self.probe_cache(i, cell, cached);
                }
            } else if cell.may_admit(block.size, self.cfg.cache_bytes_per_shard) {
                let mut sh = cell.lock.lock();
                if sh.admits_size(block.size)
                    && sh.bytes + block.size <= self.cfg.cache_bytes_per_shard
                {
                    Self::push_growing(&mut sh, self.cache_classes, cached);
                    cell.publish(&sh, block.class(), block.size);
                    return Ok(());
                }
            }
        }
        let mut c = self.central.lock();
        self.release_freed(
            &mut c,
            i,
            cached.node,
            cached.size,
            Some(stream),
            cached.event,
        );
        Ok(())
    }

    /// Free a block marked [`INHERITS`] (of owner slot `i`), plainly or after `then`: it
    /// is ordered after the earlier free it inherited as well. On that free's stream, the
    /// work of both is in stream order, the later last; on another, neither stream may
    /// reuse it before both are done.
    #[cold]
    #[inline(never)]
    fn free_inheriting(
        &self,
        i: usize,
        slot: &OwnerSlot,
        block: Block,
        then: Option<StreamOrder>,
    ) -> Result<(), FreeError> {
        let node = block.node() & !INHERITS;
        let block = block.with_node(node);
        let earlier = slot.inherited.lock().remove(&node);
        match (earlier, then) {
            (None, None) => self.free(block),
            (Some((s, e)), None) | (None, Some((s, e))) => self.free_after(block, s, e),
            (Some((s0, _)), Some((s, e))) if s == s0 => self.free_after(block, s, e),
            (Some((_, e0)), Some((_, e))) => {
                let both: Arc<dyn FreeEvent> = Arc::new(AllOf(vec![e0, e]));
                let mut c = self.central.lock();
                self.release_freed(&mut c, i, node, block.size, None, Some(both));
                Ok(())
            }
        }
    }

    /// Cache `e` in `sh`, making room for its bin first.
    fn push_growing(sh: &mut Shard, classes: usize, e: Freed) {
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
    fn probe_cache(&self, i: usize, cell: &ShardCell, e: Freed) -> Result<(), FreeError> {
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
    fn return_probe(
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

    /// Give a block's node back to the central allocator and uncharge its owner. With an
    /// event not yet complete, the node waits in the pending list: reusable at once on
    /// `stream`, where the event's work runs, and by no stream if that is `None` (work on
    /// several streams may still use it).
    fn release_node(
        &self,
        c: &mut Central,
        slot: usize,
        node: u32,
        size: u64,
        stream: Option<StreamId>,
        event: Option<Arc<dyn FreeEvent>>,
    ) {
        Self::uncharge(c, slot, size);
        match event {
            Some(e) if !complete(&*e) => c.pending.push(Pending {
                node,
                size,
                owner: OwnerId::new(
                    self.id,
                    slot as u32,
                    self.slots[slot].gen.load(Ordering::Relaxed),
                ),
                stream,
                event: e,
            }),
            _ => c.tlsf.free(node),
        }
    }

    #[inline]
    fn uncharge(c: &mut Central, slot: usize, size: u64) {
        if let Some(a) = c.owners[slot].as_mut() {
            let before = a.committed();
            a.charged -= size;
            let after = a.committed();
            c.committed -= before - after;
            c.in_use -= size;
        }
    }

    /// Charge `size` to the owner, reclaiming committed memory (caches, then evictable
    /// blocks of other tiers) if the pool's capacity is spoken for. On failure nothing is
    /// charged.
    ///
    /// An evictable block may borrow memory that other owners reserved but do not use: it
    /// is evicted when they need it, so it skips the reservation check (the hard limit
    /// still applies). Not a Guaranteed owner's, which is never evicted. A Burstable
    /// block whose eviction would take its owner below its base is evicted only by
    /// [`Pool::evict_one`]'s last pass, while the commitments exceed the capacity. A borrower that is
    /// pinned gives the memory back only once unpinned: nothing takes bytes from under
    /// work that uses them, so a request inside its base meanwhile fails, its report
    /// showing the pinned bytes.
    fn charge(
        &self,
        c: &mut Central,
        rq: &mut Reclaiming,
        owner: OwnerId,
        size: u64,
        evictable: bool,
    ) -> Result<(), Stop> {
        let i = owner.slot() as usize;
        let mut flushed = false;
        loop {
            let a = c.owners[i]
                .as_ref()
                .ok_or_else(|| PoolError::UnknownOwner(owner))?;
            let (charged, limit, delta) = (a.charged, a.spec.limit, a.commitment_added(size));
            let borrows = evictable && a.spec.tier != Tier::Guaranteed;
            if charged.saturating_add(size) > limit {
                // The owner's own cache counts against its limit: give it back once. Its
                // local caches are asked too, and only its own (not by a spared request,
                // whose cache gives its blocks back itself). Other owners' caches count
                // against their limits, not this one's: they keep their blocks.
                self.ask_local_caches(rq.spare, Some(i));
                if !flushed && self.flush_owner(c, i) > 0 {
                    flushed = true;
                    continue;
                }
                return Err(Stop::Fail(PoolError::QuotaExceeded {
                    owner,
                    requested: size,
                    used: charged,
                    limit,
                }));
            }
            if delta == 0 || borrows || c.committed + delta <= self.limit {
                c.committed += delta;
                let a = c.owners[i]
                    .as_mut()
                    .ok_or_else(|| PoolError::UnknownOwner(owner))?;
                a.charged += size;
                a.peak_charged = a.peak_charged.max(a.charged);
                c.in_use += size;
                c.peak_in_use = c.peak_in_use.max(c.in_use);
                return Ok(());
            }
            self.ask_local_caches(rq.spare, None);
            if !flushed && self.flush_all(c) > 0 {
                flushed = true;
                continue;
            }
            if c.evicting >= c.committed + delta - self.limit {
                return Err(Stop::Wait);
            }
            if self.evict_one(c, owner, rq, Need::Commitment)? {
                continue;
            }
            if c.in_flight > 0 {
                return Err(Stop::Wait);
            }
            let reserved_elsewhere: u64 = c
                .owners
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .filter_map(|(_, a)| a.as_ref())
                .map(|a| a.spec.base.saturating_sub(a.charged))
                .sum();
            let unused = self.limit.saturating_sub(c.in_use);
            return Err(Stop::Fail(if reserved_elsewhere > 0 && unused >= delta {
                PoolError::ReservedElsewhere {
                    owner,
                    requested: delta,
                    available: self.limit.saturating_sub(c.committed),
                }
            } else {
                PoolError::OutOfMemory {
                    requested: size,
                    owner,
                    stream: StreamId(0),
                    report: self.report_for(c, rq),
                }
            }));
        }
    }

    /// The common case of the central path, kept apart from [`Pool::alloc_central`] so
    /// that it stays lean (on the serving replay, where few sizes repeat, most requests
    /// come here): the owner is within its limit, the pool's commitments leave room for
    /// what the request adds to them, and the free lists hold a block. Charges and counts
    /// the allocation. `None`, with nothing changed, sends the request down the general
    /// path, which reclaims (flushes, waits for pending frees, grows, evicts) and reports.
    #[inline]
    fn alloc_within_means(
        c: &mut Central,
        slot: u32,
        size: u64,
        align: u64,
        capacity: u64,
    ) -> Option<(u32, u64)> {
        let a = c.owners.get_mut(slot as usize)?.as_mut()?;
        if a.charged.saturating_add(size) > a.spec.limit {
            return None;
        }
        // As in `charge`.
        let delta = a.commitment_added(size);
        if delta != 0 && c.committed + delta > capacity {
            return None;
        }
        let placed = c.tlsf.alloc(size, align, slot)?;
        // The accounting of `charge`, written out to keep the one lookup of the owner
        // above: a shared helper looking it up again cost this path 14 instructions.
        a.charged += size;
        a.peak_charged = a.peak_charged.max(a.charged);
        a.allocs += 1;
        c.committed += delta;
        c.in_use += size;
        c.peak_in_use = c.peak_in_use.max(c.in_use);
        c.allocs += 1;
        Some(placed)
    }

    /// The general central path, for requests that [`Pool::alloc_within_means`] cannot
    /// serve. It lets the lock go while the bytes of an eviction it started move out (and
    /// waits, without the lock, for those of other requests where nothing else is left),
    /// so that other owners' requests go on meanwhile, and while the evictor lets go of
    /// idle pins ([`Stop::ReleaseIdle`]); it gives the lock back with the outcome. On
    /// failure nothing stays charged.
    #[allow(clippy::too_many_arguments)]
    fn place<'a>(
        &'a self,
        mut c: CentralGuard<'a>,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
        evictable: bool,
        spare: bool,
    ) -> (CentralGuard<'a>, Result<Placed, PoolError>) {
        let mut rq = Reclaiming {
            spare,
            ..Reclaiming::default()
        };
        let placed = loop {
            match self.alloc_central(&mut c, &mut rq, owner, size, align, stream, evictable) {
                Ok(p) => break Ok(p),
                // Either shortage: of memory, or of memory not reserved by others (a
                // victim that a released hold would have made could have freed either).
                Err(Stop::Fail(
                    PoolError::OutOfMemory { .. } | PoolError::ReservedElsewhere { .. },
                )) if !rq.last_ask && !rq.spare && c.evictor.as_deref().is_some_and(holds_idle) => {
                    rq.last_ask = true;
                    rq.idle_released = false;
                }
                Err(Stop::Fail(e)) => break Err(e),
                Err(Stop::Finish(f)) => {
                    rq.idle_released = false;
                    let idx = f.idx;
                    let (g, r, freed) = self.finish_eviction(c, f);
                    c = g;
                    if let Err(err) = r {
                        rq.failed(&err);
                        // A block freed during its move is gone: its slot may serve another.
                        if !freed {
                            rq.skip.push(idx);
                        }
                    }
                }
                // A spared request (see `alloc_sparing`) does not wait for others' moves
                // either: its caller has idle blocks of its own to give back first.
                Err(Stop::Wait) if rq.spare => {
                    break Err(PoolError::OutOfMemory {
                        requested: size,
                        owner,
                        stream,
                        report: Box::default(),
                    })
                }
                // Memory that pending stream-ordered frees hold comes free when their work
                // completes, which nothing signals here: look again now and then rather than
                // wait for the moves under way alone (they may wait on a long kernel, while
                // the pending memory would serve this request at once).
                Err(Stop::Wait) if !c.pending.is_empty() => {
                    rq.idle_released = false;
                    c = self.moved.wait_for(c, PENDING_POLL)
                }
                Err(Stop::Wait) => {
                    rq.idle_released = false;
                    c = self.moved.wait(c)
                }
                Err(Stop::ReleaseIdle) => {
                    rq.idle_released = true;
                    let evictor = c.evictor.clone();
                    drop(c);
                    if let Some(evictor) = evictor {
                        // The evictor unpins through the pool's own calls: the lock is free,
                        // and this request has no move under way that they could meet.
                        if catch_unwind(AssertUnwindSafe(|| evictor.release_idle_pins())).is_err() {
                            tracing::error!("the evictor panicked while letting go of idle pins");
                        }
                    }
                    c = self.central.lock();
                }
            }
            // The lock was let go: the owner may have been removed meanwhile.
            if let Err(e) = self.slot(owner) {
                break Err(e);
            }
        };
        c.evict_failures = rq.failures;
        (c, placed)
    }

    /// One attempt of [`Pool::place`]: charge, then find space, reclaiming in order:
    /// completed pending blocks, cached blocks, growth, eviction. On failure nothing stays
    /// charged.
    #[allow(clippy::too_many_arguments)]
    fn alloc_central(
        &self,
        c: &mut Central,
        rq: &mut Reclaiming,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
        evictable: bool,
    ) -> Result<Placed, Stop> {
        match self.charge(c, rq, owner, size, evictable) {
            Err(Stop::Fail(PoolError::OutOfMemory {
                requested,
                owner,
                report,
                ..
            })) => {
                return Err(Stop::Fail(PoolError::OutOfMemory {
                    requested,
                    owner,
                    stream,
                    report,
                }))
            }
            r => r?,
        }
        match self.find_space(c, rq, owner, size, align, stream) {
            Ok(r) => Ok(r),
            Err(e) => {
                Self::uncharge(c, owner.slot() as usize, size);
                Err(e)
            }
        }
    }

    /// Give back a placement that its request abandoned: uncharge it, and return its memory
    /// where it came from (a reused stream-ordered free goes back to the pending list: its
    /// event still orders the memory against other streams).
    fn give_back(c: &mut Central, owner: OwnerId, size: u64, placed: Placed) {
        Self::uncharge(c, owner.slot() as usize, size);
        match placed.reused {
            Some(p) => c.pending.push(p),
            None => c.tlsf.free(placed.node),
        }
    }

    fn find_space(
        &self,
        c: &mut Central,
        rq: &mut Reclaiming,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
    ) -> Result<Placed, Stop> {
        let slot = owner.slot();
        if let Some(r) = c.tlsf.alloc(size, align, slot) {
            return Ok(Placed::fresh(r));
        }
        // The owner's own stream-ordered free of this size on this stream: work queued
        // later on the stream runs after the work that used it.
        if let Some(i) = c.pending.iter().position(|p| {
            p.stream == Some(stream)
                && p.owner == owner
                && p.size == size
                && c.tlsf.node(p.node).offset().is_multiple_of(align)
        }) {
            let p = c.pending.swap_remove(i);
            c.tlsf.set_owner(p.node, slot);
            let offset = c.tlsf.node(p.node).offset();
            return Ok(Placed {
                node: p.node,
                offset,
                reused: Some(p),
            });
        }
        if self.retire_pending(c) > 0 {
            if let Some(r) = c.tlsf.alloc(size, align, slot) {
                return Ok(Placed::fresh(r));
            }
        }
        if self.flush_all(c) > 0 {
            if let Some(r) = c.tlsf.alloc(size, align, slot) {
                return Ok(Placed::fresh(r));
            }
        }
        // Grow while the capacity allows; then evict, and after each eviction try growing
        // again: a victim at the end of the range turns into a free tail that a smaller
        // mapping can extend.
        loop {
            let progressed = match self.grow(c, size, align)? {
                Grow::Grew => true,
                // Evictions under way free at least this much: wait for them rather than
                // evict more (each eviction costs a copy out now and a restore later).
                Grow::Full if c.evicting >= size.saturating_add(align - UNIT) => {
                    return Err(Stop::Wait)
                }
                Grow::Full => {
                    self.ask_local_caches(rq.spare, None);
                    self.evict_one(c, owner, rq, Need::Space)?
                }
            };
            if !progressed {
                break;
            }
            if let Some(r) = c.tlsf.alloc(size, align, slot) {
                return Ok(Placed::fresh(r));
            }
        }
        if c.in_flight > 0 {
            return Err(Stop::Wait);
        }
        Err(Stop::Fail(PoolError::OutOfMemory {
            requested: size,
            owner,
            stream,
            report: self.report_for(c, rq),
        }))
    }

    /// Wait for every stream-ordered free pending now to complete, then return those blocks
    /// to the free lists; returns their bytes. For a caller that would rather block than
    /// fail when the only memory left is still in use by queued work. The pool's lock is
    /// not held while waiting.
    pub fn wait_pending(&self) -> u64 {
        let events: Vec<(Arc<dyn FreeEvent>, u64)> = {
            let c = self.central.lock();
            c.pending
                .iter()
                .map(|p| (p.event.clone(), p.size))
                .collect()
        };
        let mut bytes = 0;
        for (e, size) in &events {
            wait_for(&**e);
            bytes += size;
        }
        if !events.is_empty() {
            let mut c = self.central.lock();
            self.retire_pending(&mut c);
        }
        bytes
    }

    /// Move completed pending blocks to the free lists. Returns how many.
    fn retire_pending(&self, c: &mut Central) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < c.pending.len() {
            if complete(&*c.pending[i].event) {
                let p = c.pending.swap_remove(i);
                c.tlsf.free(p.node);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }

    /// Ask local caches to give their blocks back at their next call: those of owner slot
    /// `owner`, whose limit is short, or with `None` every one (the pool is short of memory,
    /// or trims). Not for a `spare` request: its own cache gives its blocks back itself, and
    /// no other need go for it. (Nor when the pool merely grows: a growth is not a shortage,
    /// and local caches that gave back on every one would lose their blocks through a
    /// warm-up.)
    fn ask_local_caches(&self, spare: bool, owner: Option<usize>) {
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
    fn flush_all(&self, c: &mut Central) -> u64 {
        (0..self.slots.len()).map(|i| self.flush_owner(c, i)).sum()
    }

    fn flush_owner(&self, c: &mut Central, i: usize) -> u64 {
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
    fn flush_cell(&self, c: &mut Central, i: usize, cell: &ShardCell) -> u64 {
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

    /// Map more memory: enough free space for `size` bytes at an `align`-aligned start, at
    /// the end of the range or in a hole left by trimming.
    ///
    /// Chunks start at multiples of the granularity, and no alignment above it is allowed,
    /// so a new chunk needs no padding: only a free tail that the mapping extends may. (A
    /// request of a whole chunk aligned above 256 bytes used to need one more chunk than
    /// it used, and failed at the capacity.)
    fn grow(&self, c: &mut Central, size: u64, align: u64) -> Result<Grow, PoolError> {
        let g = self.granularity;
        let step = self.cfg.min_grow.next_multiple_of(g);
        // A size this close to 2^64 cannot be mapped anyway.
        let Some(need) = size.checked_next_multiple_of(g) else {
            return Ok(Grow::Full);
        };
        // Without a contiguous range, chunks stay a granule apart so no block spans two.
        let gap = if self.source.contiguous() { 0 } else { g };
        // Prefer a hole that fits; otherwise extend the end, reusing a free tail.
        let mut at = None;
        let mut prev_end = c.chunks.last_key_value().map_or(0, |(&o, &s)| o + s);
        if c.holes {
            prev_end = 0;
            for (&o, &s) in &c.chunks {
                let start = if prev_end == 0 { 0 } else { prev_end + gap };
                if o >= start + gap && o - gap - start >= need {
                    at = Some((start, need.max(step).min(o - gap - start)));
                    break;
                }
                prev_end = o + s;
            }
        }
        let (offset, size, required) = match at {
            Some((o, sz)) => (o, sz, need),
            None if gap == 0 => {
                // The block starts at the tail's first aligned offset, at or before the
                // range's end (a multiple of the granularity).
                let tail = c.tlsf.tail_free(prev_end);
                let start = prev_end - tail;
                let pad = start.next_multiple_of(align) - start;
                let want = pad
                    .saturating_add(size)
                    .saturating_sub(tail)
                    .max(1)
                    .checked_next_multiple_of(g)
                    .unwrap_or(u64::MAX);
                (prev_end, want.max(step), want)
            }
            None => (
                if prev_end == 0 { 0 } else { prev_end + gap },
                need.max(step),
                need,
            ),
        };
        let size = size.min(self.limit.saturating_sub(c.mapped));
        // Map nothing that could not satisfy the request.
        if size < required || offset.saturating_add(size) > self.source.va_size() {
            return Ok(Grow::Full);
        }
        match self.source.map(offset, size) {
            Ok(()) => {}
            Err(SourceError::OutOfMemory { .. }) => return Ok(Grow::Full),
            Err(e) => return Err(e.into()),
        }
        c.chunks.insert(offset, size);
        c.mapped += size;
        c.peak_mapped = c.peak_mapped.max(c.mapped);
        c.tlsf.add_region(offset, offset + size);
        tracing::trace!(offset, size, mapped = c.mapped, "pool grew");
        Ok(Grow::Grew)
    }

    /// Evict the least recently used block that helps with `need`. `Ok(true)` once it is
    /// out, [`Stop::Finish`] while its bytes move, `Ok(false)` if no block is eligible,
    /// [`Stop::ReleaseIdle`] first while the evictor holds idle pins and has not been asked
    /// since the request last let the lock go.
    fn evict_one(
        &self,
        c: &mut Central,
        requester: OwnerId,
        rq: &mut Reclaiming,
        need: Need,
    ) -> Result<bool, Stop> {
        if rq.spare {
            return Ok(false);
        }
        let Some(evictor) = c.evictor.clone() else {
            return Ok(false);
        };
        // Victims are chosen with every idle pin gone, so that blocks their owners keep
        // pinned only for reuse go in tier and least-recently-used order like the others.
        if !rq.idle_released && holds_idle(evictor.as_ref()) {
            return Err(Stop::ReleaseIdle);
        }
        // A last pass, while the commitments exceed the capacity (some block borrowed an
        // owner's base): a Burstable block whose eviction takes its owner below its base,
        // if its owner is above it. Its owner holds more than its base in it, memory that
        // others reserved, whose claim comes before the owner's base: such a block may
        // have borrowed with its owner below its base (a large buffer made before a small
        // one), or at it with blocks that have gone since.
        let overcommitted = c.committed > self.limit;
        for (tier, below_base) in [
            (Tier::BestEffort, false),
            (Tier::Burstable, false),
            (Tier::Burstable, true),
        ] {
            if below_base && !overcommitted {
                break;
            }
            let mut cur = c.ev.lru_head(tier);
            while let Some(idx) = cur {
                cur = c.ev.lru_next(idx);
                let e = c.ev.get(idx);
                if e.pins > 0 {
                    // Pinned since it joined the list (see `EvState::pin`).
                    c.ev.drop_pinned(idx);
                    continue;
                }
                let (e_owner, e_size, e_res) = (e.owner, e.size, e.residency);
                let oslot = e_owner.slot() as usize;
                let Some(a) = c.owners[oslot].as_ref() else {
                    continue;
                };
                // A Burstable owner keeps its base: only blocks whose eviction leaves it at or
                // above its base may go, counting the moves out already under way.
                let kept = a.charged - a.evicting;
                if tier == Tier::Burstable
                    && kept < a.spec.base.saturating_add(e_size)
                    && !(below_base && kept > a.spec.base)
                {
                    continue;
                }
                // Commitments count an owner's base whatever it holds: evicting an owner
                // that is at or below its base frees no commitment.
                if need == Need::Commitment && kept <= a.spec.base {
                    continue;
                }
                if !matches!(e_res, Residency::Resident { .. }) || rq.skip.contains(&idx) {
                    continue;
                }
                match self.start_eviction(c, &evictor, idx, requester) {
                    Ok(None) => return Ok(true),
                    Ok(Some(moving)) => return Err(Stop::Finish(moving)),
                    Err(err) => {
                        rq.failed(&err);
                        rq.skip.push(idx);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Start moving the resident, unpinned block `idx` out through `evictor`, for
    /// `requester`. `Ok(None)` once it is out; `Ok(Some)` while its bytes move, for
    /// [`Pool::finish_eviction`]. On error nothing changed.
    ///
    /// A block whose last users' work may still be queued ([`Pool::unpin_after`]) is
    /// moved once that work is done: the evictor is called then, from the finish, without
    /// the lock. Neither its copy out nor whoever gets the memory next may meet that work.
    fn start_eviction(
        &self,
        c: &mut Central,
        evictor: &Arc<dyn Evictor>,
        idx: u32,
        requester: OwnerId,
    ) -> Result<Option<InFlight>, EvictError> {
        let e = c.ev.get(idx);
        let (owner, size, tag) = (e.owner, e.size, e.tag);
        let Residency::Resident { offset, .. } = e.residency else {
            return Ok(None);
        };
        let info = VictimInfo {
            id: c.ev.public_id(self.id, idx).key(),
            owner,
            addr: self.source.addr(offset),
            size,
            tag,
            requested_by: requester,
        };
        let start = |evictor: &dyn Evictor, info: &VictimInfo| {
            catch_unwind(AssertUnwindSafe(|| evictor.evict(info)))
                .unwrap_or_else(|_| Err(EvictError("the evictor panicked".into())))
        };
        let uses = c.ev.last_use(idx).take();
        let finish: Box<dyn FnOnce() -> Result<(), EvictError> + Send> = if uses.is_empty() {
            match start(evictor.as_ref(), &info)?.0 {
                None => {
                    Self::evicted(c, idx);
                    return Ok(None);
                }
                Some(finish) => finish,
            }
        } else {
            let evictor = evictor.clone();
            Box::new(move || {
                for (_, e) in &uses {
                    wait_for(&**e);
                }
                match start(evictor.as_ref(), &info)?.0 {
                    None => Ok(()),
                    Some(finish) => finish(),
                }
            })
        };
        c.ev.mark_evicting(idx);
        c.in_flight += 1;
        c.evicting += size;
        if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
            a.evicting += size;
        }
        Ok(Some(InFlight { idx, finish }))
    }

    /// Run an eviction's finish without the central lock, then end the eviction under it:
    /// the block is evicted and its memory free, or, on failure, resident where it was.
    fn finish_eviction<'a>(
        &'a self,
        c: CentralGuard<'a>,
        moving: InFlight,
    ) -> (CentralGuard<'a>, Result<(), EvictError>, bool) {
        let InFlight { idx, finish } = moving;
        drop(c);
        let r = catch_unwind(AssertUnwindSafe(finish)).unwrap_or_else(|_| {
            Err(EvictError(
                "the evictor panicked while finishing an eviction".into(),
            ))
        });
        let mut c = self.central.lock();
        let e = c.ev.get(idx);
        let (owner, size) = (e.owner, e.size);
        c.in_flight -= 1;
        c.evicting -= size;
        if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
            a.evicting -= size;
        }
        match r {
            Ok(()) => Self::evicted(&mut c, idx),
            Err(_) => c.ev.mark_kept(idx),
        }
        // Freed while its bytes moved: evicted or kept, it goes now.
        let freed = c.ev.get(idx).doomed.then(|| {
            let key = c.ev.public_id(self.id, idx).key;
            if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                a.doomed -= size;
            }
            Self::release_entry(&mut c, idx);
            key
        });
        self.moved.notify_all();
        if let (Some(key), Some(evictor)) = (freed, c.evictor.clone()) {
            // Without the lock: the evictor's owner may wake waiters, whose wake-ups may
            // run anything.
            drop(c);
            evictor.freed_while_moving(key);
            c = self.central.lock();
        }
        (c, r, freed.is_some())
    }

    /// The block `idx` is out: free its memory and count the eviction.
    fn evicted(c: &mut Central, idx: u32) {
        let e = c.ev.get(idx);
        let (owner, size) = (e.owner, e.size);
        let (Residency::Resident { node, .. } | Residency::Evicting { node, .. }) = e.residency
        else {
            return;
        };
        let oslot = owner.slot() as usize;
        c.ev.mark_evicted(idx);
        Self::uncharge(c, oslot, size);
        c.tlsf.free(node);
        if let Some(a) = c.owners[oslot].as_mut() {
            a.evictable_resident -= size;
            a.evicted_bytes += size;
            a.evictions += 1;
        }
        c.evictions += 1;
    }

    /// Move one of `owner`'s unpinned evictable blocks out now, through the evictor,
    /// whatever its tier: for an owner that rearranges its own working set (to restore it
    /// in one piece where memory is free but scattered). Returns false if it was evicted
    /// already. Another owner's block is refused ([`PoolError::ForeignBlock`]). The pool's
    /// lock is let go while the bytes move.
    pub fn evict(&self, owner: OwnerId, id: impl Into<EvictableRef>) -> Result<bool, PoolError> {
        let id = id.into();
        let mut c = self.central.lock();
        loop {
            let idx = c.ev.lookup(self.id, id)?;
            let e = c.ev.get(idx);
            if e.owner != owner {
                return Err(PoolError::ForeignBlock {
                    what: "evictable block of another owner",
                });
            }
            if e.residency.in_flight() {
                c = self.moved.wait(c);
                continue;
            }
            if e.pins > 0 {
                return Err(PoolError::Pinned { pins: e.pins });
            }
            if !matches!(e.residency, Residency::Resident { .. }) {
                return Ok(false);
            }
            let evictor = c.evictor.clone().ok_or(PoolError::NoEvictor)?;
            let failed = |e: EvictError| PoolError::EvictFailed(e.to_string());
            if let Some(moving) = self
                .start_eviction(&mut c, &evictor, idx, owner)
                .map_err(failed)?
            {
                self.finish_eviction(c, moving).1.map_err(failed)?;
            }
            return Ok(true);
        }
    }

    /// The out-of-memory report of a failed request: none for a spared one, whose caller
    /// (a local cache) gives its blocks back and asks again rather than report.
    fn report_for(&self, c: &Central, rq: &Reclaiming) -> Box<OomReport> {
        if rq.spare {
            return Box::default();
        }
        Box::new(self.report(c, &rq.failures))
    }

    fn report(&self, c: &Central, eviction_failures: &[String]) -> OomReport {
        let mut holdings: Vec<Holding> = c
            .owners
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let a = a.as_ref()?;
                Some(Holding {
                    owner: OwnerId::new(
                        self.id,
                        i as u32,
                        self.slots[i].gen.load(Ordering::Relaxed),
                    ),
                    name: a.spec.name.clone(),
                    in_use: a.charged,
                    pinned_evictable: a.evictable_pinned,
                    unpinned_evictable: a.evictable_resident - a.evictable_pinned,
                })
            })
            .collect();
        holdings.sort_by_key(|h| std::cmp::Reverse(h.in_use));
        OomReport {
            mapped: c.mapped,
            retired: Self::retired_bytes(c),
            capacity: Some(self.limit),
            free: c.tlsf.free_bytes(),
            largest_free: c.tlsf.largest_free(),
            holdings,
            eviction_failures: eviction_failures.to_vec(),
        }
    }

    /// Unmap every chunk that is wholly free, after returning the owners' shard caches'
    /// blocks. Returns the bytes given back.
    ///
    /// A [`LocalCache`](crate::LocalCache) keeps its blocks until its next call or its
    /// drop (trim asks it to give them back then): a chunk under one of its blocks stays
    /// mapped for this trim.
    ///
    /// # Errors
    ///
    /// [`PoolError::Source`] when the source fails to unmap a chunk; trimming stops there.
    /// The chunk's state is then unknown (a device source has let go of the mapping), so
    /// the pool retires it: its bytes are never handed out again and stay counted as mapped,
    /// in [`PoolStats::retired_bytes`](crate::PoolStats::retired_bytes), in the
    /// out-of-memory report and as a [`BlockState::Retired`](crate::BlockState::Retired)
    /// block of snapshots.
    pub fn trim(&self) -> Result<u64, PoolError> {
        let mut c = self.central.lock();
        self.ask_local_caches(false, None);
        self.flush_all(&mut c);
        self.retire_pending(&mut c);
        let chunks: Vec<(u64, u64)> = c.chunks.iter().map(|(&o, &s)| (o, s)).collect();
        let mut released = 0;
        for (o, s) in chunks {
            if !c.tlsf.remove_region(o, o + s) {
                continue;
            }
            if let Err(e) = self.source.unmap(o, s) {
                // After a failed unmap the chunk may be mapped or not (a device source lets
                // go of a mapping whose unmap failed). Its offsets are not handed out again,
                // where a kernel could fault on them: the chunk stays out of the free lists
                // for good, and stays counted as mapped and in the chunk table, so growth
                // never maps over it. The chunks unmapped before it stay unmapped.
                c.retired.insert(o, s);
                self.recompute_holes(&mut c);
                tracing::error!(
                    released,
                    offset = o,
                    size = s,
                    error = %e,
                    "trim stopped: unmapping a chunk failed; the chunk is retired"
                );
                return Err(e.into());
            }
            c.chunks.remove(&o);
            c.mapped -= s;
            released += s;
        }
        self.recompute_holes(&mut c);
        Ok(released)
    }

    /// Bytes retired for good: chunks whose unmap failed and blocks of panicked restores.
    fn retired_bytes(c: &Central) -> u64 {
        let blocks: u64 = c
            .retired_blocks
            .iter()
            .map(|&n| c.tlsf.node(n).size())
            .sum();
        c.retired.values().sum::<u64>() + blocks
    }

    /// Whether any gap lies between chunks (or before the first): growth then looks for a
    /// hole to refill.
    fn recompute_holes(&self, c: &mut Central) {
        let mut expect = 0;
        c.holes = false;
        let gap = if self.source.contiguous() {
            0
        } else {
            self.granularity
        };
        for (&o, &s) in &c.chunks {
            if o > expect {
                c.holes = true;
                break;
            }
            expect = o + s + gap;
        }
    }

    /// Allocate an evictable block for `owner` on `stream`. It starts resident and pinned
    /// once; unpin it when not in use so that it may be evicted.
    pub fn alloc_evictable(
        &self,
        owner: OwnerId,
        size: u64,
        tag: u64,
        stream: StreamId,
    ) -> Result<(EvictableId, Pinned), PoolError> {
        self.slot(owner)?;
        let csize = self.round_request(size)?;
        let c = self.central.lock();
        self.slot(owner)?;
        let tier = c.owners[owner.slot() as usize]
            .as_ref()
            .ok_or_else(|| PoolError::UnknownOwner(owner))?
            .spec
            .tier;
        let (mut c, placed) = self.place(c, owner, csize, UNIT, stream, true, false);
        let Placed {
            node,
            offset,
            reused,
        } = placed?;
        let idx = c.ev.insert(owner, tier, csize, tag, node, offset);
        // A stream-ordered free of the owner's on this stream, whose work may still use
        // the memory: the block's eviction and free wait for it as for its own users'.
        if let Some(p) = reused {
            c.ev.last_use(idx).add(stream, p.event);
        }
        let a = c.owners[owner.slot() as usize]
            .as_mut()
            .ok_or_else(|| PoolError::UnknownOwner(owner))?;
        a.evictable_resident += csize;
        a.evictable_pinned += csize;
        a.allocs += 1;
        c.allocs += 1;
        Ok((
            c.ev.public_id(self.id, idx),
            Pinned {
                addr: self.source.addr(offset),
                size: csize,
                restored: false,
            },
        ))
    }

    /// Pin an evictable block for use on `stream`, restoring it first if it was evicted
    /// (possibly at a new address). While pinned it is never evicted. A block whose bytes
    /// are moving (out for another request, or back in for another pin) is pinned once
    /// they have arrived. The pool's lock is let go while the bytes move.
    pub fn pin(&self, id: impl Into<EvictableRef>, stream: StreamId) -> Result<Pinned, PoolError> {
        let id = id.into();
        let mut c = self.central.lock();
        loop {
            let idx = c.ev.lookup(self.id, id)?;
            let e = c.ev.get(idx);
            match e.residency {
                Residency::Resident { offset, .. } => {
                    let (owner, size, first) = (e.owner, e.size, e.pins == 0);
                    c.ev.pin(idx);
                    if first {
                        if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                            a.evictable_pinned += size;
                        }
                    }
                    return Ok(Pinned {
                        addr: self.source.addr(offset),
                        size,
                        restored: false,
                    });
                }
                // A failed eviction leaves it resident, a failed restore evicted: see which.
                Residency::Evicting { .. } | Residency::Restoring { .. } => {
                    c = self.moved.wait(c);
                }
                Residency::Evicted => {
                    let (owner, size) = (e.owner, e.size);
                    let evictor = c.evictor.clone().ok_or_else(|| {
                        PoolError::RestoreFailed(
                            "the block was evicted but no evictor is set".into(),
                        )
                    })?;
                    let (g, placed) = self.place(c, owner, size, UNIT, stream, true, false);
                    c = g;
                    let placed = placed?;
                    // Placing may have let the lock go, and another pin of the block may
                    // have restored it (or started to) meanwhile.
                    let settled = c.ev.lookup(self.id, id).map(|i| (i, c.ev.get(i).residency));
                    match settled {
                        Ok((idx, Residency::Evicted)) => {
                            return self.restore_into(c, evictor.as_ref(), idx, placed, stream)
                        }
                        Ok(_) => Self::give_back(&mut c, owner, size, placed),
                        Err(e) => {
                            Self::give_back(&mut c, owner, size, placed);
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    /// Restore the evicted block `idx` into `placed` (memory charged to its owner) through
    /// `evictor`, with the lock let go while the bytes move, and pin it. On failure the
    /// block stays evicted and the memory goes back.
    fn restore_into<'a>(
        &'a self,
        mut c: CentralGuard<'a>,
        evictor: &dyn Evictor,
        idx: u32,
        placed: Placed,
        stream: StreamId,
    ) -> Result<Pinned, PoolError> {
        let e = c.ev.get(idx);
        let (owner, size, tag) = (e.owner, e.size, e.tag);
        let (node, offset) = (placed.node, placed.offset);
        let addr = self.source.addr(offset);
        let info = RestoreInfo {
            id: c.ev.public_id(self.id, idx).key(),
            owner,
            addr,
            size,
            tag,
            stream,
        };
        // From here the memory is the block's: resident bytes of its owner, not evicted ones,
        // and pinned ones (nothing may evict it, and the pin it is restored for follows).
        let oslot = owner.slot() as usize;
        c.ev.mark_restoring(idx, node, offset);
        if let Some(a) = c.owners[oslot].as_mut() {
            a.evicted_bytes -= size;
            a.evictable_resident += size;
            a.evictable_pinned += size;
        }
        c.in_flight += 1;
        drop(c);
        let r = catch_unwind(AssertUnwindSafe(|| evictor.restore(&info)));
        let mut c = self.central.lock();
        c.in_flight -= 1;
        self.moved.notify_all();
        let failed = match r {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some((err.to_string(), false)),
            Err(_) => Some(("the evictor panicked while restoring".to_string(), true)),
        };
        if let Some((why, panicked)) = failed {
            c.ev.mark_evicted(idx);
            if let Some(a) = c.owners[oslot].as_mut() {
                a.evicted_bytes += size;
                a.evictable_resident -= size;
                a.evictable_pinned -= size;
            }
            if panicked {
                // A failed restore leaves no copy queued (the evictor's contract); a
                // panicked one may have queued one before it panicked. Its memory is
                // retired rather than handed to a request that the copy would overwrite.
                Self::uncharge(&mut c, oslot, size);
                c.retired_blocks.push(node);
                tracing::error!(size, "a restore panicked; its memory is retired");
            } else {
                Self::give_back(&mut c, owner, size, placed);
            }
            return Err(PoolError::RestoreFailed(why));
        }
        c.ev.mark_restored(idx, node, offset);
        // As in `alloc_evictable`: work of a reused stream-ordered free may still run.
        if let Some(p) = placed.reused {
            c.ev.last_use(idx).add(stream, p.event);
        }
        c.ev.pin(idx);
        if let Some(a) = c.owners[oslot].as_mut() {
            a.restores += 1;
        }
        c.restores += 1;
        Ok(Pinned {
            addr,
            size,
            restored: true,
        })
    }

    /// Pin every block of `ids` if all of them are resident, under one lock, and return
    /// true; if any is evicted, pin none and return false (then [`Pool::pin`] each one,
    /// which restores). This is the fast path of a working set that is already in place:
    /// one lock for the whole set instead of one per block, and nothing is held partly.
    pub fn pin_all_resident<I>(&self, ids: I) -> Result<bool, PoolError>
    where
        I: IntoIterator + Clone,
        I::Item: Into<EvictableRef>,
    {
        let mut c = self.central.lock();
        // One pass: pin while every block so far is resident; on the first that is not
        // (or a bad handle), take back the pins made so far. Nobody sees pins made and
        // taken back under one lock; the blocks only move to the most recently used end of
        // the LRU, where the caller's slow path, which pins them next, puts them anyway.
        let mut pinned = 0usize;
        let mut failed = None;
        for id in ids.clone() {
            let idx = match c.ev.lookup(self.id, id.into()) {
                Ok(idx) => idx,
                Err(e) => {
                    failed = Some(Err(e));
                    break;
                }
            };
            let e = c.ev.get(idx);
            if !matches!(e.residency, Residency::Resident { .. }) {
                failed = Some(Ok(false));
                break;
            }
            let (owner, size, first) = (e.owner, e.size, e.pins == 0);
            c.ev.pin(idx);
            if first {
                if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                    a.evictable_pinned += size;
                }
            }
            pinned += 1;
        }
        let Some(result) = failed else {
            return Ok(true);
        };
        for id in ids.into_iter().take(pinned) {
            // Pinned above under this lock: the handle is valid and the pin is there.
            if let Ok(idx) = c.ev.lookup(self.id, id.into()) {
                Self::unpin_idx(&mut c, idx)?;
            }
        }
        result
    }

    /// Drop one pin. At zero pins the block joins its tier's LRU as most recently used,
    /// and may be evicted, its memory handed to any stream, from then on: the pinner's
    /// work on it must be done, or ordered before the evictor's move by the evictor itself.
    /// Where that work may still be queued, use [`Pool::unpin_after`].
    pub fn unpin(&self, id: impl Into<EvictableRef>) -> Result<(), PoolError> {
        self.unpin_all(std::iter::once(id.into()))
    }

    /// Drop one pin, as [`Pool::unpin`], of a block that work queued on `stream` may still
    /// use: `event` completes once that work is done (record it after the last of it).
    /// Until then the block's memory goes to no other use. An eviction waits for the event
    /// before it calls the evictor (without the pool's lock), so neither the copy out nor
    /// the memory's next user meets that work; a free leaves the memory pending on it, as
    /// [`Pool::free_after`] does. Each stream's latest event takes the place of its earlier
    /// ones, and events on several streams are all waited for.
    pub fn unpin_after(
        &self,
        id: impl Into<EvictableRef>,
        stream: StreamId,
        event: Arc<dyn FreeEvent>,
    ) -> Result<(), PoolError> {
        let id = id.into();
        let mut c = self.central.lock();
        let idx = c.ev.lookup(self.id, id)?;
        if c.ev.get(idx).pins == 0 {
            return Err(PoolError::NotPinned);
        }
        c.ev.last_use(idx).add(stream, event);
        Self::unpin_idx(&mut c, idx)
    }

    /// Drop one pin of each block of `ids` under one lock. Every block is unpinned even if
    /// one of them fails; the first error is returned.
    pub fn unpin_all<I>(&self, ids: I) -> Result<(), PoolError>
    where
        I: IntoIterator,
        I::Item: Into<EvictableRef>,
    {
        let mut c = self.central.lock();
        let mut first_err = None;
        for id in ids {
            let r =
                c.ev.lookup(self.id, id.into())
                    .and_then(|idx| Self::unpin_idx(&mut c, idx));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Drop one pin of the block at `idx`, keeping its owner's pinned bytes.
    fn unpin_idx(c: &mut Central, idx: u32) -> Result<(), PoolError> {
        let (owner, size) = {
            let e = c.ev.get(idx);
            (e.owner, e.size)
        };
        if c.ev.unpin(idx)? {
            if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                a.evictable_pinned -= size;
            }
        }
        Ok(())
    }

    /// Whether an evictable block is resident now (a block whose bytes are moving out
    /// still is; one whose bytes are moving back in is not yet).
    pub fn is_resident(&self, id: impl Into<EvictableRef>) -> Result<bool, PoolError> {
        let id = id.into();
        let c = self.central.lock();
        let idx = c.ev.lookup(self.id, id)?;
        Ok(matches!(
            c.ev.get(idx).residency,
            Residency::Resident { .. } | Residency::Evicting { .. }
        ))
    }

    /// Whether a pin holds the block, or a pin is restoring it (and will hold it): what
    /// [`Pool::free_evictable`] refuses. A holder of the handle that frees it when no pin
    /// does asks this, since [`Pool::pin_count`] is 0 while a restore is under way.
    pub fn is_held(&self, id: impl Into<EvictableRef>) -> Result<bool, PoolError> {
        let id = id.into();
        let c = self.central.lock();
        let idx = c.ev.lookup(self.id, id)?;
        let e = c.ev.get(idx);
        Ok(e.pins > 0 || matches!(e.residency, Residency::Restoring { .. }))
    }

    /// How many pins an evictable block holds.
    pub fn pin_count(&self, id: impl Into<EvictableRef>) -> Result<u32, PoolError> {
        let id = id.into();
        let c = self.central.lock();
        let idx = c.ev.lookup(self.id, id)?;
        Ok(c.ev.get(idx).pins)
    }

    /// Free an evictable block. It must not be pinned; on error the handle comes back. A
    /// block whose bytes are moving out is freed when the move ends, and this returns at
    /// once, without waiting for the copy; its owner stays charged for it until then (and
    /// [`Pool::remove_owner`] waits for the move). One being restored for
    /// a pin is refused at once with [`PoolError::Restoring`]: the pin will hold it (see
    /// [`Pool::is_held`]). Memory that work recorded by [`Pool::unpin_after`] may still use
    /// stays pending until that work is done.
    pub fn free_evictable(&self, id: EvictableId) -> Result<(), (EvictableId, PoolError)> {
        self.free_evictable_inner(id, None)
    }

    /// Free an evictable block in stream order, as [`Pool::free_after`] frees a block: its
    /// memory is reusable at once on `stream`, and elsewhere once `event` has completed.
    /// For a block whose last users' work may still be queued (a session ends without
    /// waiting for the GPU): unpin it with [`Pool::unpin_after`] or [`Pool::unpin`] first,
    /// since it must not be pinned; on error the handle comes back. As
    /// [`Pool::free_evictable`], it leaves a block whose bytes are moving out to be freed
    /// when the move ends, and refuses a block being restored for a pin.
    pub fn free_evictable_after(
        &self,
        id: EvictableId,
        stream: StreamId,
        event: Arc<dyn FreeEvent>,
    ) -> Result<(), (EvictableId, PoolError)> {
        self.free_evictable_inner(id, Some((stream, event)))
    }

    fn free_evictable_inner(
        &self,
        id: EvictableId,
        after: Option<(StreamId, Arc<dyn FreeEvent>)>,
    ) -> Result<(), (EvictableId, PoolError)> {
        let mut c = self.central.lock();
        let idx = match c.ev.lookup(self.id, id.to_ref()) {
            Ok(i) => i,
            Err(e) => return Err((id, e)),
        };
        let e = c.ev.get(idx);
        if e.pins > 0 {
            let pins = e.pins;
            return Err((id, PoolError::Pinned { pins }));
        }
        // Moving back in for a pin, which will hold it: waiting would only end in `Pinned`.
        if matches!(e.residency, Residency::Restoring { .. }) {
            return Err((id, PoolError::Restoring));
        }
        let (evicting, slot, size) = (
            matches!(e.residency, Residency::Evicting { .. }),
            e.owner.slot() as usize,
            e.size,
        );
        if let Some((stream, event)) = after {
            c.ev.last_use(idx).add(stream, event);
        }
        if evicting {
            // Its bytes are moving out: the eviction's finish frees it (see `doom`). The
            // caller does not wait for the copy: on an async executor's thread that would
            // stall every task for as long as the copy takes.
            c.ev.doom(idx);
            if let Some(a) = c.owners[slot].as_mut() {
                a.doomed += size;
            }
        } else {
            Self::release_entry(&mut c, idx);
        }
        Ok(())
    }

    /// Free evictable block `idx`, resident or evicted, and count the free. A resident
    /// block's memory waits for the work of its recorded last uses (see [`LastUse`]).
    fn release_entry(c: &mut Central, idx: u32) {
        let e = c.ev.get(idx);
        let (owner, size, res) = (e.owner, e.size, e.residency);
        let slot = owner.slot() as usize;
        match res {
            Residency::Resident { node, .. } => {
                let uses = c.ev.last_use(idx).take();
                c.ev.remove(idx);
                Self::uncharge(c, slot, size);
                match Pending::after_uses(node, size, owner, uses) {
                    Some(p) => c.pending.push(p),
                    None => c.tlsf.free(node),
                }
                if let Some(a) = c.owners[slot].as_mut() {
                    a.evictable_resident -= size;
                }
            }
            Residency::Evicted => {
                c.ev.remove(idx);
                if let Some(a) = c.owners[slot].as_mut() {
                    a.evicted_bytes -= size;
                }
            }
            // Settled by the caller first.
            Residency::Evicting { .. } | Residency::Restoring { .. } => return,
        }
        if let Some(a) = c.owners[slot].as_mut() {
            a.frees += 1;
        }
        c.frees += 1;
    }

    /// Statistics, global and per owner. Locks every shard briefly.
    pub fn stats(&self) -> PoolStats {
        let mut c = self.central.lock();
        let mut owners = Vec::new();
        let (mut live, mut cached) = (0u64, 0u64);
        let (mut allocs, mut frees, mut hits) = (c.allocs, c.frees, c.retired_hits);
        for (i, a) in c.owners.iter().enumerate() {
            let Some(a) = a else { continue };
            let mut o_cached = 0;
            let (mut o_allocs, mut o_frees) = (a.allocs, a.frees);
            for cell in self.slots[i].shards.iter() {
                let sh = cell.lock.lock();
                o_cached += sh.bytes;
                o_allocs += sh.hits;
                o_frees += sh.frees;
                hits += sh.hits;
            }
            allocs += o_allocs - a.allocs;
            frees += o_frees - a.frees;
            // Everything charged is either live or cached.
            let o_live = a.charged.saturating_sub(o_cached);
            live += o_live;
            cached += o_cached;
            owners.push(OwnerStats {
                id: OwnerId::new(self.id, i as u32, self.slots[i].gen.load(Ordering::Relaxed)),
                name: a.spec.name.clone(),
                tier: a.spec.tier,
                limit: a.spec.limit,
                base: a.spec.base,
                live_bytes: o_live,
                cached_bytes: o_cached,
                in_use_bytes: a.charged,
                peak_in_use_bytes: a.peak_charged,
                peak_live_bytes: a.peak_live.max(o_live),
                evictable_resident_bytes: a.evictable_resident,
                evictable_pinned_bytes: a.evictable_pinned,
                evicted_bytes: a.evicted_bytes,
                allocs: o_allocs,
                frees: o_frees,
                evictions: a.evictions,
                restores: a.restores,
            });
        }
        for (o, a) in owners.iter().zip(c.owners.iter_mut().flatten()) {
            a.peak_live = a.peak_live.max(o.live_bytes);
        }
        c.peak_live = c.peak_live.max(live);
        c.peak_cached = c.peak_cached.max(cached);
        let free = c.tlsf.free_bytes();
        let largest = c.tlsf.largest_free();
        PoolStats {
            mapped_bytes: c.mapped,
            retired_bytes: Self::retired_bytes(&c),
            peak_mapped_bytes: c.peak_mapped,
            live_bytes: live,
            peak_live_bytes: c.peak_live,
            cached_bytes: cached,
            peak_cached_bytes: c.peak_cached,
            in_use_bytes: c.in_use,
            peak_in_use_bytes: c.peak_in_use,
            free_bytes: free,
            pending_bytes: c.pending.iter().map(|p| p.size).sum(),
            largest_free_bytes: largest,
            fragmentation: if free == 0 {
                0.0
            } else {
                1.0 - largest as f64 / free as f64
            },
            allocs,
            frees,
            cache_hits: hits,
            evictions: c.evictions,
            restores: c.restores,
            moves_in_flight: c.in_flight as u64,
            owners,
        }
    }

    /// Every block the pool knows: used (live or cached), free, and evicted sizes per owner.
    pub fn snapshot(&self) -> crate::Snapshot {
        let c = self.central.lock();
        let mut cached_nodes = std::collections::HashSet::new();
        for (i, a) in c.owners.iter().enumerate() {
            if a.is_none() {
                continue;
            }
            for cell in self.slots[i].shards.iter() {
                for e in cell.lock.lock().bins.iter().flatten() {
                    cached_nodes.insert(e.node);
                }
            }
        }
        let pending: std::collections::HashSet<u32> = c.pending.iter().map(|p| p.node).collect();
        let evictable = c.ev.resident_nodes();
        let retired = |i: u32| c.retired_blocks.contains(&i);

        let mut blocks: Vec<crate::BlockInfo> = c
            .tlsf
            .nodes_indexed()
            .map(|(i, n)| crate::BlockInfo {
                addr: self.source.addr(n.offset()),
                size: n.size(),
                owner: if n.is_free() || pending.contains(&i) || retired(i) {
                    None
                } else {
                    Some(n.owner())
                },
                state: if n.is_free() {
                    crate::BlockState::Free
                } else if pending.contains(&i) {
                    crate::BlockState::Pending
                } else if retired(i) {
                    crate::BlockState::Retired
                } else if cached_nodes.contains(&i) {
                    crate::BlockState::Cached
                } else if let Some(&pinned) = evictable.get(&i) {
                    crate::BlockState::Evictable { pinned }
                } else {
                    crate::BlockState::Live
                },
            })
            .collect();
        blocks.extend(c.retired.iter().map(|(&o, &s)| crate::BlockInfo {
            addr: self.source.addr(o),
            size: s,
            owner: None,
            state: crate::BlockState::Retired,
        }));
        blocks.sort_by_key(|b| b.addr);
        crate::Snapshot {
            blocks,
            report: self.report(&c, &c.evict_failures),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostSource;

    #[test]
    fn a_slot_whose_generation_ran_out_is_not_used_again() {
        let pool = Pool::new(
            HostSource::new(2 << 20, 1 << 30),
            PoolConfig {
                max_owners: 2,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        let a = pool.add_owner(OwnerSpec::new("a", 1 << 20)).unwrap();
        pool.remove_owner(a).unwrap();
        // As after 2^31 owners in slot 0: its next generation would wrap.
        pool.slots[0].gen.store(u32::MAX - 1, Ordering::Relaxed);
        let b = pool.add_owner(OwnerSpec::new("b", 1 << 20)).unwrap();
        assert_eq!(b.slot(), 1, "the exhausted slot 0 was skipped");
        assert!(matches!(
            pool.add_owner(OwnerSpec::new("c", 1 << 20)),
            Err(PoolError::OwnerSlotsWornOut { live: 1, max: 2 })
        ));
    }
}
