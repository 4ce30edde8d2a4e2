//! Typed errors of the pool.

use crate::{OwnerId, StreamId};

/// Why a chunk source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The device has no memory left for the chunk.
    #[error("the device is out of memory for a {requested}-byte chunk; free device memory held outside the pool, or give the pool a smaller capacity")]
    OutOfMemory {
        /// Chunk size.
        requested: u64,
    },
    /// Any other failure of the source, with its message.
    #[error("{0}")]
    Other(String),
}

/// One owner's holdings, for out-of-memory reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    /// The owner.
    pub owner: OwnerId,
    /// Its name.
    pub name: String,
    /// Bytes in use (live and cached).
    pub in_use: u64,
    /// Bytes of resident evictable blocks, pinned.
    pub pinned_evictable: u64,
    /// Bytes of resident evictable blocks, not pinned.
    pub unpinned_evictable: u64,
}

/// Who holds what when an allocation fails.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OomReport {
    /// Bytes mapped by the pool.
    pub mapped: u64,
    /// Of those, bytes retired for good, which the pool never hands out: chunks whose
    /// unmap failed (see [`Pool::trim`](crate::Pool::trim)) and blocks of restores that
    /// panicked.
    pub retired: u64,
    /// The pool's capacity, if it has one.
    pub capacity: Option<u64>,
    /// Free bytes inside the mapped range.
    pub free: u64,
    /// Largest free block.
    pub largest_free: u64,
    /// Bytes freed in stream order whose work is still queued: free once it is done
    /// ([`Pool::wait_pending`](crate::Pool::wait_pending) waits for it).
    pub pending: u64,
    /// Per-owner holdings, largest first.
    pub holdings: Vec<Holding>,
    /// Evictions the evictor refused or failed during this request, with its reasons (in a
    /// [`Snapshot`](crate::Snapshot): during the latest request that had to reclaim memory).
    pub eviction_failures: Vec<String>,
}

impl std::fmt::Display for OomReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mapped {} B (capacity {}), free {} B (largest block {} B)",
            self.mapped,
            self.capacity
                .map_or_else(|| "unbounded".to_string(), |c| format!("{c} B")),
            self.free,
            self.largest_free
        )?;
        if self.pending > 0 {
            write!(
                f,
                ", {} B freed behind work still queued (free once it is done)",
                self.pending
            )?;
        }
        if self.retired > 0 {
            write!(
                f,
                ", {} B retired after a failed unmap or a panicked restore (create a new pool to get them back)",
                self.retired
            )?;
        }
        for e in &self.eviction_failures {
            write!(f, "; eviction failed: {e}")?;
        }
        for h in &self.holdings {
            write!(
                f,
                "; {} ({}): {} B in use, {} B evictable pinned, {} B evictable unpinned",
                h.name, h.owner, h.in_use, h.pinned_evictable, h.unpinned_evictable
            )?;
        }
        Ok(())
    }
}

/// Errors of the pool. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A zero-byte request.
    #[error("cannot allocate zero bytes; request at least one byte")]
    ZeroSize,
    /// A request larger than the pool can ever hold.
    #[error("{requested} bytes exceed the pool's capacity of {capacity} bytes; raise the capacity or split the allocation")]
    TooLarge {
        /// Bytes requested.
        requested: u64,
        /// The pool's capacity (or address range).
        capacity: u64,
    },
    /// An alignment that is not a power of two or exceeds the chunk granularity.
    #[error("alignment {align} is invalid: it must be a power of two no larger than {max}")]
    BadAlignment {
        /// Alignment given.
        align: u64,
        /// Largest alignment the pool honours.
        max: u64,
    },
    /// The owner does not exist in this pool (never added, removed, or of another pool).
    #[error("owner {0} is not registered with this pool; add it with Pool::add_owner")]
    UnknownOwner(OwnerId),
    /// The block or handle was made by another pool.
    #[error("the {what} belongs to another pool; free it with the pool that allocated it")]
    ForeignBlock {
        /// Block or evictable handle.
        what: &'static str,
    },
    /// The evictable handle was already freed.
    #[error("the evictable block was already freed")]
    DoubleFree,
    /// An owner's hard limit would be exceeded.
    #[error("owner {owner} would exceed its limit: {used} B in use + {requested} B requested > {limit} B; free memory or raise the limit")]
    QuotaExceeded {
        /// The owner.
        owner: OwnerId,
        /// Bytes requested (after rounding).
        requested: u64,
        /// Bytes in use before the request.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// The request would eat into memory reserved for other owners.
    #[error("owner {owner} cannot burst by {requested} B: only {available} B are neither used nor reserved by other owners; wait for other owners to free memory, or give this owner a larger base")]
    ReservedElsewhere {
        /// The owner.
        owner: OwnerId,
        /// Bytes beyond the owner's base that were needed.
        requested: u64,
        /// Unreserved bytes left.
        available: u64,
    },
    /// Nothing could be reclaimed: the report says who holds what.
    #[error("out of memory for {requested} B requested by {owner} on stream {stream}: {report}; free blocks of the owners listed, or raise the pool's capacity")]
    OutOfMemory {
        /// Bytes requested (after rounding).
        requested: u64,
        /// The owner.
        owner: OwnerId,
        /// The stream.
        stream: StreamId,
        /// Who holds what.
        report: Box<OomReport>,
    },
    /// Bad owner settings.
    #[error("invalid owner settings: {0}")]
    BadOwner(String),
    /// Bad pool settings.
    #[error("invalid pool settings: {0}")]
    BadConfig(String),
    /// The owner still holds memory.
    #[error("owner {owner} still holds {bytes} B; free its blocks before removing it")]
    OwnerBusy {
        /// The owner.
        owner: OwnerId,
        /// Bytes it holds.
        bytes: u64,
    },
    /// Too many owners.
    #[error("the pool already has its maximum of {0} owners; remove one or raise PoolConfig::max_owners")]
    TooManyOwners(u32),
    /// Every free owner slot has served 2^31 owners; its generation would wrap and make
    /// old owner ids valid again, so it is not used any more.
    #[error("the pool has {live} of its {max} owners, but its free owner slots have each served 2^31 owners and are retired; create a new pool, or raise PoolConfig::max_owners")]
    OwnerSlotsWornOut {
        /// Owners registered now.
        live: u32,
        /// The pool's maximum.
        max: u32,
    },
    /// An evictable block is pinned where it must not be.
    #[error("the evictable block is pinned {pins} time(s); unpin it first")]
    Pinned {
        /// Pin count.
        pins: u32,
    },
    /// Freeing an evictable block that is being restored for a pin: the pin will hold it.
    #[error("the evictable block is being restored for a pin; free it once that pin is dropped")]
    Restoring,
    /// A block pinned as many times as a pin count holds (2^32 − 1).
    #[error("the evictable block is pinned 4294967295 times, the most a pin count holds; unpin it before pinning it again")]
    TooManyPins,
    /// Unpinning a block that is not pinned.
    #[error("the evictable block is not pinned")]
    NotPinned,
    /// The evictor failed to restore a block.
    #[error("restoring an evicted block failed: {0}")]
    RestoreFailed(String),

    /// The evictor could not move a block out; it stays where it was.
    #[error("evicting a block failed (it stays resident): {0}")]
    EvictFailed(String),

    /// No evictor is set, so nothing can be evicted.
    #[error("no evictor is set; install one with Pool::set_evictor")]
    NoEvictor,
    /// The chunk source failed.
    #[error("the chunk source failed: {0}")]
    Source(#[from] SourceError),
}

/// A block given to a pool that did not allocate it. The block comes back, so nothing is
/// lost: free it with the pool that made it.
#[derive(Debug, thiserror::Error)]
#[error("the block belongs to another pool; free it with the pool that allocated it")]
pub struct FreeError {
    /// The block, returned to the caller.
    pub block: crate::Block,
}
