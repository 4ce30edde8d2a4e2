//! The pool's chunk sources on a device: [`VmmSource`] maps physical chunks into one
//! reserved range; [`LinearSource`] is the fallback for devices without VMM.

use crate::{Device, DeviceError, LinearAlloc, Mapping, VaRange};
use gpushare_pool::{ChunkSource, SourceError};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

fn to_source(e: DeviceError) -> SourceError {
    match e {
        DeviceError::OutOfMemory { requested, .. } => SourceError::OutOfMemory { requested },
        e => SourceError::Other(e.to_string()),
    }
}

/// One reserved VA range of a device, grown by mapping physical chunks into it.
#[derive(Debug)]
pub struct VmmSource {
    dev: Arc<dyn Device>,
    va: VaRange,
    granularity: u64,
    maps: Mutex<BTreeMap<u64, Mapping>>,
}

/// `g`, if it is a usable allocation granularity (a power of two); else the error for a
/// device that reports it. Chunk sources and the runtime check a device's granularity
/// with this before they divide by it.
pub fn check_granularity(g: u64) -> Result<u64, DeviceError> {
    if g.is_power_of_two() {
        return Ok(g);
    }
    Err(DeviceError::Unsupported {
        what: "a device whose allocation granularity is not a power of two",
        reason: format!(
            "the device reports an allocation granularity of {g} bytes; fix the Device implementation's DeviceInfo"
        ),
    })
}

impl VmmSource {
    /// Reserve `va_size` bytes (rounded up to the granularity) on `dev`.
    pub fn new(dev: Arc<dyn Device>, va_size: u64) -> Result<Self, DeviceError> {
        let g = check_granularity(dev.info().granularity)?;
        let size = va_size
            .max(1)
            .checked_next_multiple_of(g)
            .ok_or(DeviceError::OutOfRange {
                what: "address range to reserve",
                offset: 0,
                end: va_size,
                limit: u64::MAX / g * g,
            })?;
        let va = dev.reserve_va(size)?;
        Ok(VmmSource {
            dev,
            va,
            granularity: g,
            maps: Mutex::new(BTreeMap::new()),
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }
}

impl ChunkSource for VmmSource {
    fn granularity(&self) -> u64 {
        self.granularity
    }
    fn va_size(&self) -> u64 {
        self.va.size()
    }
    fn base(&self) -> u64 {
        self.va.base().0
    }
    fn map(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        let chunk = self.dev.create_chunk(size).map_err(to_source)?;
        let m = self
            .dev
            .map_chunk(&self.va, offset, &chunk)
            .map_err(to_source)?;
        // The mapping keeps the physical memory; the chunk handle may go.
        self.maps.lock().insert(offset, m);
        Ok(())
    }
    fn unmap(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        let mut maps = self.maps.lock();
        match maps.get(&offset) {
            Some(m) if m.range().len == size => {}
            _ => {
                return Err(SourceError::Other(format!(
                    "no chunk of {size} bytes is mapped at offset {offset}"
                )))
            }
        }
        let m = maps
            .remove(&offset)
            .ok_or_else(|| SourceError::Other("vanished".into()))?;
        m.unmap().map_err(to_source)
    }
}

/// Plain allocations as a chunk source, for devices without VMM. Each chunk lives at an
/// address the driver picks, so the pool keeps blocks from spanning chunks and cannot
/// compact across them; otherwise it behaves the same.
#[derive(Debug)]
pub struct LinearSource {
    dev: Arc<dyn Device>,
    va_size: u64,
    granularity: u64,
    chunks: Mutex<BTreeMap<u64, LinearAlloc>>,
}

impl LinearSource {
    /// A source of up to `va_size` bytes of offsets (the pool leaves gaps between chunks, so
    /// give it about twice the memory it should hold).
    pub fn new(dev: Arc<dyn Device>, va_size: u64) -> Self {
        let g = dev.info().granularity;
        LinearSource {
            dev,
            // Rounded down where rounding up would overflow: the range is only ever offsets.
            // (A granularity of zero, which no device should report, leaves it as given:
            // the pool refuses such a source.)
            va_size: va_size
                .checked_next_multiple_of(g)
                .unwrap_or_else(|| u64::MAX.checked_div(g).map_or(va_size, |q| q * g)),
            granularity: g,
            chunks: Mutex::new(BTreeMap::new()),
        }
    }
}

impl ChunkSource for LinearSource {
    fn granularity(&self) -> u64 {
        self.granularity
    }
    fn va_size(&self) -> u64 {
        self.va_size
    }
    fn base(&self) -> u64 {
        0
    }
    fn contiguous(&self) -> bool {
        false
    }
    fn addr(&self, offset: u64) -> u64 {
        let chunks = self.chunks.lock();
        match chunks.range(..=offset).next_back() {
            Some((&o, a)) if offset < o + a.range().len => a.range().ptr.0 + (offset - o),
            // The pool asks only for offsets inside mapped chunks.
            _ => 0,
        }
    }
    fn map(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        let end = offset
            .checked_add(size)
            .filter(|&e| e <= self.va_size)
            .ok_or_else(|| {
                SourceError::Other(format!(
                    "offsets {offset}+{size} lie outside the source's {} bytes",
                    self.va_size
                ))
            })?;
        let taken = |c: &BTreeMap<u64, LinearAlloc>| {
            c.range(..end)
                .next_back()
                .is_some_and(|(&o, a)| o + a.range().len > offset)
        };
        if taken(&self.chunks.lock()) {
            return Err(SourceError::Other(format!(
                "offsets {offset}+{size} overlap a chunk already allocated; unmap it first"
            )));
        }
        let a = self.dev.alloc_linear(size).map_err(to_source)?;
        // The pool's alignments hold for addresses only if chunks start aligned (CUDA
        // promises 256 bytes for cuMemAlloc, and gives chunk-sized allocations more).
        if a.range()
            .ptr
            .0
            .checked_rem(self.granularity)
            .is_some_and(|r| r != 0)
        {
            return Err(SourceError::Other(format!(
                "the device placed a chunk at {:#x}, not aligned to the {}-byte granularity \
                 that the pool's alignments need; use a device with virtual memory management",
                a.range().ptr.0,
                self.granularity
            )));
        }
        let mut c = self.chunks.lock();
        // Looked at again: another map may have taken the offsets while this one allocated
        // (its allocation is freed as it goes).
        if taken(&c) {
            return Err(SourceError::Other(format!(
                "offsets {offset}+{size} overlap a chunk already allocated; unmap it first"
            )));
        }
        c.insert(offset, a);
        Ok(())
    }
    fn unmap(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        let mut c = self.chunks.lock();
        match c.get(&offset) {
            Some(a) if a.range().len == size => {
                c.remove(&offset);
                Ok(())
            }
            _ => Err(SourceError::Other(format!(
                "no chunk of {size} bytes is allocated at offset {offset}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_power_of_two_is_a_granularity() {
        for g in [1, 256, 2 << 20, 1 << 63] {
            assert_eq!(check_granularity(g).ok(), Some(g));
        }
        for g in [0, 3, 3 << 20, u64::MAX] {
            match check_granularity(g) {
                Err(DeviceError::Unsupported { reason, .. }) => {
                    assert!(reason.contains(&g.to_string()), "{reason}");
                }
                other => panic!("granularity {g}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_linear_source_refuses_offsets_it_already_holds_or_lacks() {
        let dev: Arc<dyn Device> = Arc::new(crate::SimDevice::new());
        let g = dev.info().granularity;
        let src = LinearSource::new(dev.clone(), 8 * g);
        src.map(0, 2 * g).unwrap();
        // The same offsets, or a part of them, would drop the allocation under its blocks.
        assert!(src.map(0, g).is_err());
        assert!(src.map(g, g).is_err());
        assert!(src.map(7 * g, 2 * g).is_err(), "past the end of the source");
        src.map(2 * g, g).unwrap();
        assert_eq!(
            src.addr(g + 5),
            src.addr(0) + g + 5,
            "the first allocation stayed"
        );
        src.unmap(0, 2 * g).unwrap();
        src.unmap(2 * g, g).unwrap();
    }
}
