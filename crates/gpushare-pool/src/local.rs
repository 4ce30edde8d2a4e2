//! A cache of one owner's freed blocks that belongs to one thread of work: the pool's
//! fastest path, with no lock and no atomic read-modify-write.
//!
//! The pool's shared fast path ([`Pool::alloc`], [`Pool::free`]) caches blocks per owner
//! and per thread shard, behind a spin lock: any thread may use any shard, and the pool
//! flushes shards when it runs short. That costs one uncontended compare-and-swap each way,
//! which is cheap on some hosts and not on others: on the H100's host (a virtualised
//! Sapphire Rapids), the two uncontended lock/unlock pairs of an allocate+free take about
//! 22 ns, half of the shared path's pair. A thread that allocates and frees the same sizes over
//! and over (a worker's activations, a request loop's scratch) need not share its spares
//! with anyone until the pool asks for them back. [`LocalCache`] keeps them in plain
//! vectors owned by the caller (`&mut self`), so a hit is a handful of loads and stores.
//!
//! What the pool sees of a local cache, and when it gives its blocks back, is on
//! [`LocalCache`].

use crate::pool::Pool;
use crate::sync::{AtomicU64, Ordering};
use crate::tlsf::{ceil_class, floor_class, UNIT};
use crate::{Block, ChunkSource, FreeError, OwnerId, PoolError, StreamId};

/// Figures of one [`LocalCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalCacheStats {
    /// Bytes of the blocks held now.
    pub held_bytes: u64,
    /// Blocks held now.
    pub held_blocks: u64,
    /// Allocations served from the cache.
    pub hits: u64,
    /// Allocations passed on to the pool.
    pub misses: u64,
    /// Times the cache gave all its blocks back (asked for, or on the pool's request).
    pub flushes: u64,
}

/// A per-thread cache of one owner's freed blocks in front of a [`Pool`] (see
/// [`Pool::local_cache`]).
///
/// What the pool sees: the blocks a local cache holds are live blocks of its owner, charged
/// as such, exactly as if the caller held them. Its hits and frees do not reach the pool's
/// allocation and free counts ([`LocalCache::stats`] has them). The blocks come back to the
/// pool:
/// - when the cache is flushed or dropped, or a free would take it over its budget;
/// - when a request through it misses while it holds blocks, and the pool could serve the
///   request only by evicting someone's buffers, or not at all (the owner's limit, the
///   pool's capacity): the cache first asks the pool for memory without evicting, and
///   failing that gives its blocks back and asks as usual;
/// - when the pool has run short elsewhere (commitments over capacity, no room to grow) or
///   trims, or the owner's limit was short for another request: the pool moves a counter
///   (the owner's own for its limit), which each local cache reads (two relaxed loads) at
///   its next call, giving its blocks back on seeing it move.
///
/// A cache that nobody calls keeps its blocks until it is dropped, even while the pool
/// evicts buffers for other requests, so its budget bounds what it can withhold.
///
/// ```
/// use gpushare_pool::{HostSource, OwnerSpec, Pool, PoolConfig, StreamId};
///
/// let pool = Pool::new(HostSource::new(2 << 20, 1 << 30), PoolConfig::default())?;
/// let owner = pool.add_owner(OwnerSpec::new("worker", 256 << 20))?;
/// let mut cache = pool.local_cache(owner, 16 << 20)?;
/// let a = cache.alloc(64 << 10, StreamId(1))?;
/// let offset = a.offset();
/// cache.free(a).unwrap();
/// // The same block again, without the pool's locks.
/// let b = cache.alloc(64 << 10, StreamId(1))?;
/// assert_eq!(b.offset(), offset);
/// cache.free(b).unwrap();
/// drop(cache);
/// assert_eq!(pool.stats().live_bytes, 0);
/// # Ok::<(), gpushare_pool::PoolError>(())
/// ```
pub struct LocalCache<'p, S: ChunkSource> {
    pool: &'p Pool<S>,
    owner: OwnerId,
    /// Freed blocks by size class, most recent last.
    bins: Vec<Vec<Block>>,
    /// Most bytes held at once.
    budget: u64,
    /// Blocks above this size go straight back to the pool.
    max_block: u64,
    /// The owner's reclaim counter (its limit was short).
    owner_reclaims: &'p AtomicU64,
    /// The pool's and the owner's reclaim counts, summed, when the cache last looked (see
    /// [`LocalCache::asked`]).
    seen: u64,
    stats: LocalCacheStats,
}

impl<S: ChunkSource> std::fmt::Debug for LocalCache<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("owner", &self.owner)
            .field("budget", &self.budget)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<'p, S: ChunkSource> LocalCache<'p, S> {
    pub(crate) fn new(
        pool: &'p Pool<S>,
        owner: OwnerId,
        owner_reclaims: &'p AtomicU64,
        budget: u64,
    ) -> Self {
        // The pool's shards keep the same sizes.
        let (max_block, classes) = pool.cache_limits();
        let seen = pool
            .reclaims()
            .wrapping_add(owner_reclaims.load(Ordering::Relaxed));
        LocalCache {
            pool,
            owner,
            owner_reclaims,
            bins: (0..classes).map(|_| Vec::new()).collect(),
            budget,
            max_block,
            seen,
            stats: LocalCacheStats::default(),
        }
    }

    /// The owner whose blocks the cache holds.
    pub fn owner(&self) -> OwnerId {
        self.owner
    }

    /// The pool behind the cache.
    pub fn pool(&self) -> &'p Pool<S> {
        self.pool
    }

    /// The cache's figures.
    pub fn stats(&self) -> LocalCacheStats {
        self.stats
    }

    /// How many times the pool (short of memory, or trimming) and the owner's limit have
    /// asked for cached blocks back. Both counts only grow, so their sum moves whenever
    /// either does.
    #[inline(always)]
    fn asked(&self) -> u64 {
        self.pool
            .reclaims()
            .wrapping_add(self.owner_reclaims.load(Ordering::Relaxed))
    }

    /// Allocate `size` bytes for the cache's owner, to be used on `stream`: a held block of
    /// the size's class if there is one, else from the pool ([`Pool::alloc`]). While the
    /// cache holds blocks, it asks the pool first for memory that takes no eviction; where
    /// the pool or the owner's limit is short of that, it gives its blocks back and asks as
    /// [`Pool::alloc`] does (which may evict other owners' buffers).
    #[inline]
    pub fn alloc(&mut self, size: u64, stream: StreamId) -> Result<Block, PoolError> {
        // Built once from either path's fields (see `Pool::alloc`).
        let b = 'got: {
            if self.asked() == self.seen {
                if let Some(b) = self.take(size) {
                    break 'got b;
                }
            }
            self.alloc_miss(size, stream)?
        };
        Ok(Block::new(b.offset, b.size, self.owner, b.node()))
    }

    /// The most recent held block of `size`'s class, if it is large enough.
    #[inline(always)]
    fn take(&mut self, size: u64) -> Option<Block> {
        if size.wrapping_sub(1) >= self.max_block {
            return None;
        }
        let size_r = size.next_multiple_of(UNIT);
        let bin = self.bins.get_mut(floor_class(size_r))?;
        if bin.last()?.size < size_r {
            return None;
        }
        let b = bin.pop()?;
        self.took(&b);
        Some(b)
    }

    /// Count a block handed out from the cache.
    #[inline(always)]
    fn took(&mut self, b: &Block) {
        self.stats.held_bytes -= b.size;
        self.stats.held_blocks -= 1;
        self.stats.hits += 1;
    }

    #[cold]
    #[inline(never)]
    fn alloc_miss(&mut self, size: u64, stream: StreamId) -> Result<Block, PoolError> {
        if self.asked() != self.seen {
            self.flush();
        } else if let Some(b) = self.take_above(size) {
            return Ok(b);
        }
        self.stats.misses += 1;
        if self.stats.held_blocks == 0 {
            return self.pool.alloc(self.owner, size, stream);
        }
        // The cache's idle blocks go back before anyone's buffers are moved out for this
        // request: first a try that evicts nothing.
        match self.pool.alloc_sparing(self.owner, size, stream) {
            Err(
                PoolError::OutOfMemory { .. }
                | PoolError::QuotaExceeded { .. }
                | PoolError::ReservedElsewhere { .. },
            ) => {
                self.flush();
                self.pool.alloc(self.owner, size, stream)
            }
            r => r,
        }
    }

    /// A held block of the class above `size`'s, where every block fits it.
    fn take_above(&mut self, size: u64) -> Option<Block> {
        let size_r = size.checked_next_multiple_of(UNIT)?;
        if size == 0 || size_r > self.max_block {
            return None;
        }
        let bin = self.bins.get_mut(ceil_class(size_r)?)?;
        let b = bin.pop()?;
        self.took(&b);
        Some(b)
    }

    /// Free a block that no stream uses any more: the cache keeps it for its next request of
    /// the size if it is the cache owner's, of at most the largest cached size, and within
    /// the budget; otherwise it goes to [`Pool::free`] (which refuses a block of another
    /// pool, returning it).
    #[inline]
    pub fn free(&mut self, block: Block) -> Result<(), FreeError> {
        // A block that inherits a stream order goes to the pool, which keeps its event:
        // a held block serves any stream at once.
        if block.pool_id() == self.owner.pool.get()
            && block.owner_key == self.owner.key
            && block.node() & crate::INHERITS == 0
            && block.size <= self.max_block
            && self.stats.held_bytes + block.size <= self.budget
            && self.asked() == self.seen
        {
            if let Some(bin) = self.bins.get_mut(block.class()) {
                self.stats.held_bytes += block.size;
                self.stats.held_blocks += 1;
                bin.push(block);
                return Ok(());
            }
        }
        self.free_miss(block)
    }

    #[cold]
    #[inline(never)]
    fn free_miss(&mut self, block: Block) -> Result<(), FreeError> {
        if self.asked() != self.seen {
            self.flush();
        }
        self.pool.free(block)
    }

    /// Give every held block back to the pool. Returns the bytes given back.
    pub fn flush(&mut self) -> u64 {
        self.seen = self.asked();
        let bytes = self.stats.held_bytes;
        if self.stats.held_blocks == 0 {
            return 0;
        }
        for bin in &mut self.bins {
            for b in bin.drain(..) {
                // Every held block is of this pool (checked by `free`), which therefore
                // takes it back.
                if let Err(e) = self.pool.free(b) {
                    tracing::error!(error = %e, "a local cache's block was refused by its pool");
                }
            }
        }
        self.stats.held_bytes = 0;
        self.stats.held_blocks = 0;
        self.stats.flushes += 1;
        bytes
    }
}

impl<S: ChunkSource> Drop for LocalCache<'_, S> {
    fn drop(&mut self) {
        self.flush();
    }
}

impl<S: ChunkSource> Pool<S> {
    /// A cache of `owner`'s freed blocks for one thread of work, holding at most `budget`
    /// bytes (see [`LocalCache`]). Blocks up to [`PoolConfig::cache_max_block`] are cached.
    /// Its blocks count as the owner's live blocks, so drop it (or [`LocalCache::flush`]
    /// it) before [`Pool::remove_owner`].
    ///
    /// [`PoolConfig::cache_max_block`]: crate::PoolConfig::cache_max_block
    pub fn local_cache(&self, owner: OwnerId, budget: u64) -> Result<LocalCache<'_, S>, PoolError> {
        let owner_reclaims = self.owner_reclaims(owner)?;
        Ok(LocalCache::new(self, owner, owner_reclaims, budget))
    }
}
