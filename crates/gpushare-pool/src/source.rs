//! Where the pool's memory comes from.

use crate::error::SourceError;
use crate::sync::Mutex;
use std::collections::BTreeMap;

/// A source of memory: one reserved virtual range into which the pool maps and unmaps
/// chunks as it grows and trims. Offsets are relative to [`base`](Self::base); sizes and
/// offsets passed to `map` and `unmap` are multiples of [`granularity`](Self::granularity).
///
/// `gpushare-device` implements it for both device backends; [`HostSource`] serves benches
/// and tests.
pub trait ChunkSource: Send + Sync {
    /// Mapping granularity in bytes (a power of two, at least 256).
    fn granularity(&self) -> u64;
    /// Size of the reserved range in bytes.
    fn va_size(&self) -> u64;
    /// Address of offset 0.
    fn base(&self) -> u64;
    /// Map `size` bytes at `offset`.
    fn map(&self, offset: u64, size: u64) -> Result<(), SourceError>;
    /// Unmap `size` bytes at `offset`, exactly as one earlier `map` call mapped them. After
    /// an error the pool takes the chunk's state as unknown: it never hands out or maps
    /// those offsets again, and never asks to unmap them again.
    fn unmap(&self, offset: u64, size: u64) -> Result<(), SourceError>;
    /// Whether chunks mapped at adjacent offsets are adjacent in memory, so that a block may
    /// span them. True for a reserved virtual range. A source without one (plain
    /// allocations, each at an address the driver picks) returns false; the pool then
    /// keeps a gap between chunks so that no block spans two.
    fn contiguous(&self) -> bool {
        true
    }
    /// The address of `offset`. By default `base() + offset`.
    ///
    /// The address of each mapped chunk's first byte must be a multiple of the
    /// granularity: the pool aligns offsets, and an alignment (up to the granularity)
    /// holds for addresses only if chunks start aligned.
    fn addr(&self, offset: u64) -> u64 {
        self.base() + offset
    }
}

impl<S: ChunkSource + ?Sized> ChunkSource for Box<S> {
    fn granularity(&self) -> u64 {
        (**self).granularity()
    }
    fn va_size(&self) -> u64 {
        (**self).va_size()
    }
    fn base(&self) -> u64 {
        (**self).base()
    }
    fn map(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        (**self).map(offset, size)
    }
    fn unmap(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        (**self).unmap(offset, size)
    }
    fn contiguous(&self) -> bool {
        (**self).contiguous()
    }
    fn addr(&self, offset: u64) -> u64 {
        (**self).addr(offset)
    }
}

/// Host memory as a chunk source: each mapped chunk is a real host allocation, freed on
/// unmap. Addresses are offsets from a fixed base. The pool never touches the memory it
/// manages, so chunks are left uninitialised: zeroing them would make growth cost a memset
/// of every new chunk, which is not what a device's mapping costs.
#[derive(Debug)]
pub struct HostSource {
    granularity: u64,
    va_size: u64,
    limit: Option<u64>,
    chunks: Mutex<BTreeMap<u64, Vec<u8>>>,
    mapped: std::sync::atomic::AtomicU64,
}

impl HostSource {
    /// A source of up to `va_size` bytes mapped in `granularity` steps.
    pub fn new(granularity: u64, va_size: u64) -> Self {
        HostSource {
            granularity,
            va_size,
            limit: None,
            chunks: Mutex::new(BTreeMap::new()),
            mapped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Make `map` report out of memory once more than `bytes` would be mapped.
    pub fn with_limit(mut self, bytes: u64) -> Self {
        self.limit = Some(bytes);
        self
    }

    /// Bytes mapped now.
    pub fn mapped(&self) -> u64 {
        self.mapped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ChunkSource for HostSource {
    fn granularity(&self) -> u64 {
        self.granularity
    }
    fn va_size(&self) -> u64 {
        self.va_size
    }
    fn base(&self) -> u64 {
        0x1000_0000_0000
    }
    fn map(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        let mut c = self.chunks.lock();
        let mapped = self.mapped();
        if self.limit.is_some_and(|l| mapped.saturating_add(size) > l) {
            return Err(SourceError::OutOfMemory { requested: size });
        }
        if offset.checked_add(size).is_none_or(|e| e > self.va_size) {
            return Err(SourceError::Other(format!(
                "range {offset}+{size} lies outside the reserved {} bytes",
                self.va_size
            )));
        }
        if c.range(..offset + size)
            .next_back()
            .is_some_and(|(&o, b)| o + b.capacity() as u64 > offset)
        {
            return Err(SourceError::Other(format!(
                "range {offset}+{size} is already mapped"
            )));
        }
        // A chunk the host cannot allocate is out of memory, not an abort.
        let mut chunk = Vec::new();
        usize::try_from(size)
            .ok()
            .and_then(|bytes| chunk.try_reserve_exact(bytes).ok())
            .ok_or(SourceError::OutOfMemory { requested: size })?;
        c.insert(offset, chunk);
        self.mapped
            .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn unmap(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        let mut c = self.chunks.lock();
        let Some(end) = offset.checked_add(size) else {
            return Err(SourceError::Other(format!(
                "range {offset}+{size} runs past the end of the address space"
            )));
        };
        let keys: Vec<u64> = c.range(offset..end).map(|(&k, _)| k).collect();
        let total: u64 = keys.iter().map(|k| c[k].capacity() as u64).sum();
        if total != size {
            return Err(SourceError::Other(format!(
                "range {offset}+{size} is not exactly covered by mapped chunks"
            )));
        }
        for k in keys {
            c.remove(&k);
        }
        self.mapped
            .fetch_sub(size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
