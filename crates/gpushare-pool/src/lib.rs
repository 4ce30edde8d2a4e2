//! gpushare-pool: an O(1) multi-tenant device allocator with stream-ordered reuse and LRU
//! eviction. It never touches the memory it manages and needs no GPU: memory comes from a
//! [`ChunkSource`] that maps chunks into one reserved virtual range.
//!
//! - **Bookkeeping**: a two-level segregated fit (TLSF) over u64 offsets, metadata in a slab
//!   outside the managed memory, bitmap search, O(1) allocate and free, coalescing. Blocks
//!   of at most one chunk are cut from the end of the free block that serves them, larger
//!   ones from its start, which keeps short-lived small blocks out of the ranges that large
//!   requests need whole; from the last free block of a run, every block is cut from its
//!   start, so that what is left stays where the next growth extends it.
//! - **Hot path**: blocks up to [`PoolConfig::cache_max_block`] are cached per owner and per
//!   thread shard by size class, so a repeated allocate/free pair takes one uncontended lock
//!   each way and never reaches the central allocator or the driver. Small blocks (up to a
//!   sixteenth of a chunk) are always cached; large ones only while cached large blocks are
//!   being reused, since a cached block cannot coalesce and spreads the heap when nobody
//!   asks for it again.
//! - **Local caches**: [`Pool::local_cache`] gives one thread of work its own cache of an
//!   owner's freed blocks ([`LocalCache`]), with no lock at all on a hit; it gives its
//!   blocks back when the pool runs short.
//! - **Owners** have a hard limit and a reserved base; every path that hands out memory
//!   (fresh, cached, restored) is charged.
//! - **Stream-ordered reuse**: [`Pool::free_after`] frees a block on a stream with an event;
//!   that stream may reuse it at once, others only once the event has completed.
//! - **Eviction**: evictable blocks are referred to by handle, pinned while in use, and kept
//!   in an intrusive LRU list per owner, merged into each tier's least-recently-used order
//!   when victims are chosen; under pressure an [`Evictor`] moves victims out and later
//!   restores them, possibly elsewhere. The bytes move with the pool's lock free (see
//!   [`Eviction`]), so other owners' requests go on meanwhile.
//!
//! ```
//! use gpushare_pool::{HostSource, OwnerSpec, Pool, PoolConfig, StreamId, Tier};
//!
//! let pool = Pool::new(HostSource::new(2 << 20, 1 << 30), PoolConfig::default())?;
//! let llm = pool.add_owner(OwnerSpec::new("llm", 512 << 20).base(256 << 20))?;
//! let s = StreamId(1);
//! let b = pool.alloc(llm, 4096, s)?;
//! assert_eq!(pool.addr(&b) % 256, 0);
//! pool.free(b).unwrap();
//! let stats = pool.stats();
//! assert_eq!(stats.owners[0].live_bytes, 0);
//! # Ok::<(), gpushare_pool::PoolError>(())
//! ```

#![deny(missing_docs)]

mod error;
mod evict;
mod local;
mod pool;
mod source;
mod sync;
mod tlsf;

pub use error::{FreeError, Holding, OomReport, PoolError, SourceError};
pub use evict::{EvictError, Eviction, Evictor, RestoreInfo, VictimInfo};
pub use local::{LocalCache, LocalCacheStats};
pub use pool::{Pool, PoolConfig};
pub use source::{ChunkSource, HostSource};

/// A pool's id, in every id and block it hands out, so that a pool refuses another's.
/// Never zero, so that `Option<Block>` is no larger than a [`Block`].
type PoolId = std::num::NonZeroU32;

/// The allocation unit and smallest alignment, in bytes.
pub const ALIGN: u64 = tlsf::UNIT;

/// A stream as the pool sees it: any number the caller uses consistently.
///
/// A block freed in stream order ([`Pool::free_after`]) goes back to the same owner at once
/// on the same stream, since work queued later there runs after the work that used it.
/// Other owners get it only once its event completes, even on a stream of the same number:
/// they cannot know what the first owner queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Completion of the work that last used a freed block (a recorded device event).
///
/// The pool asks it, and drops it, with its own locks held: it must not call into the pool
/// (which would wait for those locks for ever), and should answer quickly (an event query).
pub trait FreeEvent: Send + Sync {
    /// Whether that work has completed.
    fn is_complete(&self) -> bool;

    /// Block until that work has completed ([`Pool::wait_pending`]). The default polls
    /// [`FreeEvent::is_complete`], yielding the thread in between; implement it with a
    /// real wait (an event synchronization) where there is one.
    fn wait(&self) {
        while !self.is_complete() {
            std::thread::yield_now();
        }
    }
}

/// QoS tier of an owner, which decides the order of eviction: BestEffort blocks go first,
/// then Burstable blocks of owners above their base; Guaranteed blocks are never evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Never evicted.
    Guaranteed,
    /// Evicted only while its owner is above its base.
    Burstable,
    /// Evicted first.
    BestEffort,
}

/// Settings of an owner (a tenant of the pool).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerSpec {
    /// Name, for reports.
    pub name: String,
    /// Hard limit in bytes; exceeding it is [`PoolError::QuotaExceeded`].
    pub limit: u64,
    /// Bytes reserved for this owner: other owners never use them.
    pub base: u64,
    /// Eviction tier.
    pub tier: Tier,
}

impl OwnerSpec {
    /// A BestEffort owner with a limit and no reserved base.
    pub fn new(name: impl Into<String>, limit: u64) -> Self {
        OwnerSpec {
            name: name.into(),
            limit,
            base: 0,
            tier: Tier::BestEffort,
        }
    }
    /// Reserve a base: equal to the limit makes the owner Guaranteed, below it Burstable.
    pub fn base(mut self, bytes: u64) -> Self {
        self.base = bytes;
        self.tier = if bytes == 0 {
            Tier::BestEffort
        } else if bytes >= self.limit {
            Tier::Guaranteed
        } else {
            Tier::Burstable
        };
        self
    }
    /// Set the tier explicitly.
    pub fn tier(mut self, tier: Tier) -> Self {
        self.tier = tier;
        self
    }
}

/// An owner of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OwnerId {
    /// The slot in the low half, its generation in the high half. Two scalar fields make
    /// the id a scalar pair, which Rust passes and returns in registers: a three-field id
    /// went through the stack on every call, and reading it back stalled store forwarding
    /// on the allocation hot path.
    key: u64,
    pool: PoolId,
}

impl OwnerId {
    #[inline]
    pub(crate) fn new(pool: PoolId, slot: u32, gen: u32) -> Self {
        OwnerId {
            key: u64::from(slot) | u64::from(gen) << 32,
            pool,
        }
    }
    /// The owner's slot in its pool.
    #[inline]
    pub(crate) fn slot(&self) -> u32 {
        self.key as u32
    }
    /// The slot's generation when the owner was added.
    #[inline]
    pub(crate) fn gen(&self) -> u32 {
        (self.key >> 32) as u32
    }
}

impl std::fmt::Display for OwnerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "owner#{}.{}", self.slot(), self.gen() / 2)
    }
}

/// An allocated block. Not `Clone`: [`Pool::free`] consumes it, so it cannot be freed
/// twice. A block dropped without being freed stays charged to its owner.
///
/// A block is 32 bytes, four 8-byte scalars: callers keep and move blocks by the million
/// (tables of live blocks, handles in tensors), so it holds only what a free needs without
/// a lock. Its size class is computed again from its size, and the size requested is the
/// caller's to keep.
///
/// The node and the pool's id share one 8-byte field, the last (`repr(C)` keeps it there),
/// which is also the niche of `Option<Block>` and `Result<Block, _>`. How a block moves
/// through memory follows from its layout: with the niche last, the other 24 bytes move as
/// 16 and 8, in step with the 16-byte stores that built them, so the CPU forwards each
/// copy's loads from the stores of the copy before. Other layouts (the node and the pool's
/// id in two 4-byte fields, or the niche first) make copies whose loads straddle those
/// stores, and cost the serving replay about 5 ns an event (`docs/BENCHMARKS.md`, "The
/// block's layout, and a plain vector of nodes").
#[derive(PartialEq, Eq)]
#[must_use = "a block must be freed with Pool::free or Pool::free_after"]
#[repr(C)]
pub struct Block {
    offset: u64,
    size: u64,
    /// The owner's key ([`OwnerId`]'s first field), apart from its pool: an [`OwnerId`]
    /// field would bring its padding and make the block 40 bytes.
    owner_key: u64,
    /// The block's node in the low half; its top bit ([`INHERITS`]) is set while the block
    /// may still be in use by work queued before it was handed out (see [`INHERITS`]). The
    /// pool's id in the high half.
    tag: std::num::NonZeroU64,
}

/// Set in [`Block::node`] when the block was handed out on the stream of a stream-ordered
/// free whose work may still be running: the pool keeps that free's event in its owner's
/// table until the block is freed, and its free waits for it on other streams (a plain
/// free, which says that no stream uses the block, knows nothing of that earlier work).
/// Node indices stay below it: the TLSF refuses to grow its table that far.
pub(crate) const INHERITS: u32 = 1 << 31;

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("offset", &self.offset)
            .field("size", &self.size)
            .field("owner", &self.owner())
            .field("node", &(self.node() & !INHERITS))
            .finish()
    }
}

// What the docs of `Block` and `PoolId` promise.
const _: () = assert!(std::mem::size_of::<Block>() == 32);
const _: () = assert!(std::mem::size_of::<Option<Block>>() == 32);
const _: () = assert!(std::mem::offset_of!(Block, tag) == 24);

impl Block {
    /// A block of `owner` at `offset`, of `size` bytes, on `node` (its [`INHERITS`] bit
    /// included).
    #[inline(always)]
    pub(crate) fn new(offset: u64, size: u64, owner: OwnerId, node: u32) -> Block {
        let tag = (u64::from(owner.pool.get()) << 32) | u64::from(node);
        Block {
            offset,
            size,
            owner_key: owner.key,
            // The pool's id is not zero, so neither is the tag.
            tag: std::num::NonZeroU64::new(tag).unwrap_or(std::num::NonZeroU64::MIN),
        }
    }
    /// The node, with its [`INHERITS`] bit.
    #[inline(always)]
    pub(crate) fn node(&self) -> u32 {
        self.tag.get() as u32
    }
    /// The block on another node (its [`INHERITS`] bit cleared or set).
    #[inline(always)]
    pub(crate) fn with_node(self, node: u32) -> Block {
        Block::new(self.offset, self.size, self.owner(), node)
    }
    /// The id of the pool that made it.
    #[inline(always)]
    pub(crate) fn pool_id(&self) -> u32 {
        (self.tag.get() >> 32) as u32
    }
    /// Offset from the pool's base address.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Bytes reserved (the request rounded up to its size class).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The owner it is charged to.
    pub fn owner(&self) -> OwnerId {
        OwnerId {
            key: self.owner_key,
            pool: PoolId::new(self.pool_id()).unwrap_or(PoolId::MIN),
        }
    }
    /// The cache's size class of the block.
    #[inline]
    pub(crate) fn class(&self) -> usize {
        crate::tlsf::floor_class(self.size)
    }
}

/// A copyable key naming an evictable block, for evictors and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EvictableKey {
    idx: u32,
    /// The pool's count of evictable blocks made, when this one was: 64 bits, so that no
    /// later block in the same slot takes a stale key's generation (a 32-bit count would
    /// wrap after four billion blocks, and a stale handle could then pin or free another
    /// owner's block).
    gen: u64,
}

/// A handle to an evictable block. Not `Clone`: [`Pool::free_evictable`] consumes it.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an evictable block must be freed with Pool::free_evictable"]
pub struct EvictableId {
    pool: PoolId,
    key: EvictableKey,
}

impl EvictableId {
    /// Its key.
    pub fn key(&self) -> EvictableKey {
        self.key
    }

    /// A copyable reference to the block, to pin, unpin, query or evict it where the handle
    /// itself cannot go (see [`EvictableRef`]).
    pub fn to_ref(&self) -> EvictableRef {
        EvictableRef {
            pool: self.pool,
            key: self.key,
        }
    }
}

/// A copyable reference to an evictable block: what every [`Pool`] call but a free takes.
///
/// A holder of an [`EvictableId`] keeps it where it belongs (in a table under a lock, say)
/// and works on the block through a reference, without holding that lock while a pin
/// restores the block. It cannot free the block. Once the block is freed, a call with a
/// reference to it fails with [`PoolError::DoubleFree`], even when the pool has since
/// handed its slot to another block: the reference carries the slot's generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EvictableRef {
    pool: PoolId,
    key: EvictableKey,
}

impl EvictableRef {
    /// The block's key.
    pub fn key(&self) -> EvictableKey {
        self.key
    }
}

impl From<&EvictableId> for EvictableRef {
    fn from(id: &EvictableId) -> Self {
        id.to_ref()
    }
}

/// Where a pinned evictable block lives while pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    /// Address.
    pub addr: u64,
    /// Size.
    pub size: u64,
    /// Whether this pin restored it from eviction.
    pub restored: bool,
}

/// Per-owner statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnerStats {
    /// The owner.
    pub id: OwnerId,
    /// Its name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Its limit.
    pub limit: u64,
    /// Its reserved base.
    pub base: u64,
    /// Bytes of blocks handed out and not freed (including resident evictable blocks).
    pub live_bytes: u64,
    /// Bytes freed into its caches.
    pub cached_bytes: u64,
    /// Live plus cached: what counts against the limit.
    pub in_use_bytes: u64,
    /// Peak of `in_use_bytes` (exact).
    pub peak_in_use_bytes: u64,
    /// Peak of `live_bytes` as sampled by `stats` calls.
    pub peak_live_bytes: u64,
    /// Resident evictable bytes.
    pub evictable_resident_bytes: u64,
    /// Pinned evictable bytes.
    pub evictable_pinned_bytes: u64,
    /// Evicted bytes (not resident).
    pub evicted_bytes: u64,
    /// Allocations.
    pub allocs: u64,
    /// Frees.
    pub frees: u64,
    /// Evictions of its blocks.
    pub evictions: u64,
    /// Restores of its blocks.
    pub restores: u64,
}

/// Statistics of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStats {
    /// Bytes mapped from the source.
    pub mapped_bytes: u64,
    /// Bytes retired for good, never handed out again: chunks whose unmap failed (see
    /// [`Pool::trim`]) and blocks of restores that panicked. Part of `mapped_bytes`, which
    /// is `free_bytes + pending_bytes + in_use_bytes + retired_bytes`.
    pub retired_bytes: u64,
    /// Peak of `mapped_bytes` (exact).
    pub peak_mapped_bytes: u64,
    /// Bytes live.
    pub live_bytes: u64,
    /// Peak of `live_bytes` as sampled by `stats` calls.
    pub peak_live_bytes: u64,
    /// Bytes in owner caches. Any owner's request may take them: the caches give their
    /// blocks back when memory runs short.
    pub cached_bytes: u64,
    /// Of `cached_bytes`, those of blocks freed in stream order whose work has not
    /// completed yet (at the time of the call): until it does, only their own owner and
    /// stream may reuse them, as for `pending_bytes`.
    pub cached_pending_bytes: u64,
    /// Peak of `cached_bytes` as sampled by `stats` calls.
    pub peak_cached_bytes: u64,
    /// Live plus cached bytes, charged to owners.
    pub in_use_bytes: u64,
    /// Peak of `in_use_bytes` (exact).
    pub peak_in_use_bytes: u64,
    /// Free bytes in the central allocator.
    pub free_bytes: u64,
    /// Bytes freed with an event that has not completed yet (at the time of the call:
    /// those whose event has completed are counted as free).
    pub pending_bytes: u64,
    /// Largest free block.
    pub largest_free_bytes: u64,
    /// 1 − largest free block ÷ free bytes (0 when nothing is free).
    pub fragmentation: f64,
    /// Allocations.
    pub allocs: u64,
    /// Frees.
    pub frees: u64,
    /// Allocations served from a cache.
    pub cache_hits: u64,
    /// Evictions.
    pub evictions: u64,
    /// Restores.
    pub restores: u64,
    /// Evictions and restores whose bytes are moving now. The pool's lock is free while
    /// they move; their blocks' memory stays in use until they end.
    pub moves_in_flight: u64,
    /// Per owner.
    pub owners: Vec<OwnerStats>,
}

/// State of one block in a [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockState {
    /// Handed out.
    Live,
    /// Freed into an owner's cache.
    Cached,
    /// Freed with an event still pending.
    Pending,
    /// Free in the central allocator.
    Free,
    /// A resident evictable block.
    Evictable {
        /// Whether it is pinned.
        pinned: bool,
    },
    /// Memory retired for good: a chunk whose unmap failed (see [`Pool::trim`]), or the
    /// block of a restore that panicked, where a copy it queued may still land.
    Retired,
}

/// One block in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// Address.
    pub addr: u64,
    /// Size.
    pub size: u64,
    /// Owner slot, for used blocks.
    pub owner: Option<u32>,
    /// State.
    pub state: BlockState,
}

/// Every block of the mapped range, in address order, plus who holds what.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Blocks.
    pub blocks: Vec<BlockInfo>,
    /// Holdings.
    pub report: OomReport,
}
