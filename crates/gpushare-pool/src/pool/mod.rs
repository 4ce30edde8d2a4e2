//! The pool: a central TLSF behind one lock, fronted by per-owner caches sharded by thread.
//!
//! This module holds the pool's state, its owners and the paths every allocation and free
//! takes; [`cache`] the owner caches; [`reclaim`] the general central path (charging,
//! waiting for stream-ordered frees, growing, evicting) and trimming; [`evictable`] the
//! evictable blocks and their pins; [`stats`] statistics, snapshots and reports.

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
    Block, EvictableId, EvictableKey, EvictableRef, FreeEvent, OwnerId, OwnerSpec, OwnerStats,
    Pinned, PoolId, PoolStats, StreamId, Tier, INHERITS,
};
use crossbeam_utils::CachePadded;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

mod cache;
mod evictable;
mod reclaim;
mod stats;

use cache::{Cached, Freed, Shard, ShardCell, NO_EVENT, PROBE_EVERY};

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

impl Central {
    /// Give the memory of `node` back: to the free lists at once if no work of `uses` may
    /// still use it, else to the pending list until that work is done.
    fn release_after_uses(
        &mut self,
        node: u32,
        size: u64,
        owner: OwnerId,
        uses: Vec<(StreamId, Arc<dyn FreeEvent>)>,
    ) {
        match Pending::after_uses(node, size, owner, uses) {
            Some(p) => self.pending.push(p),
            None => self.tlsf.free(node),
        }
    }

    /// Bytes freed in stream order whose work is still queued.
    fn pending_bytes(&self) -> u64 {
        self.pending.iter().map(|p| p.size).sum()
    }
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
    /// again (they rejoin their LRU list, which it walks afresh). By key, not slot: while
    /// the request lets the lock go, a skipped block may be freed and its slot serve a new
    /// block, which may go.
    skip: Vec<EvictableKey>,
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
    /// The commitment this request added when it was charged, where that took the
    /// commitments past the capacity (an evictable request that borrows); 0 otherwise, and
    /// while it is not charged. Its own borrowing is no reason to take another owner below
    /// its base (see [`Pool::evict_one`]).
    borrowed: u64,
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
    /// The block's last uses, waited for before its bytes move: put back if the move does
    /// not happen, so that its later free or eviction still waits for them.
    uses: Vec<(StreamId, Arc<dyn FreeEvent>)>,
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
        // Each path yields the block's scalars, and the block is built once, here. Where
        // the paths returned blocks of their own, the result was merged in memory, built
        // by 8-byte stores and read back in 16-byte loads that the CPU cannot forward;
        // built once from scalars, a block the caller uses at once stays in registers.
        // `hot_loop ... shared` went from 27.7–34.2 to 14.8–25.7 ns a pair (see
        // `docs/BENCHMARKS.md`, "One block built at the end of an allocation").
        let (offset, size, node) = 'placed: {
            if let Some(b) = self.alloc_cached(owner, size, stream) {
                break 'placed (b.offset, b.size, b.node());
            }
            let (offset, node) = self.alloc_unit_central(owner, size);
            if node != NONE {
                // The central path checked that the rounded size neither overflows nor
                // exceeds the pool's limit.
                break 'placed (offset, size.wrapping_add(UNIT - 1) & !(UNIT - 1), node);
            }
            let b = self.alloc_slow(owner, size, ALIGN_UNIT, stream)?;
            (b.offset, b.size, b.node())
        };
        Ok(Block::new(offset, size, owner, node))
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
        let ours = block.pool_id() == self.id.get();
        // The frees check no generation: a block keeps its bytes charged to its owner, and
        // `remove_owner` refuses an owner with bytes charged, so a block's owner is the one
        // in its slot. A path that handed out a block uncharged would break this, and its
        // free would land with the slot's next owner.
        debug_assert!(
            !ours || slot.gen.load(Ordering::Relaxed) == (block.owner_key >> 32) as u32,
            "a block outlived its owner"
        );
        ours.then_some((i, slot))
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
