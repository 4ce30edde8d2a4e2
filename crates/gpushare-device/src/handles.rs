//! Handles to device resources. Each carries the id of the device that made it and releases
//! what it holds when dropped.

use crate::error::{check_range, Result};
use crate::{cuda, sim, DeviceId, DevicePtr, DeviceRange, EventFlags};
use std::sync::Arc;

/// A reserved range of device virtual addresses. Freed when dropped and when every
/// [`Mapping`] inside it is gone.
#[derive(Debug)]
pub struct VaRange {
    pub(crate) device: DeviceId,
    pub(crate) base: u64,
    pub(crate) size: u64,
    pub(crate) inner: Arc<VaInner>,
}

/// Held only so that its `Drop` frees the range once the last mapping is gone.
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) enum VaInner {
    Cuda(cuda::CudaVa),
    Sim(sim::SimVa),
}

impl VaRange {
    /// The device that made it.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// First address.
    pub fn base(&self) -> DevicePtr {
        DevicePtr(self.base)
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The whole range.
    pub fn range(&self) -> DeviceRange {
        DeviceRange::new(self.base(), self.size)
    }
}

/// A physical memory chunk, not yet visible at any address until mapped. Its memory is
/// released when the chunk and all its mappings are dropped.
#[derive(Debug)]
pub struct PhysChunk {
    pub(crate) device: DeviceId,
    pub(crate) size: u64,
    pub(crate) inner: Arc<ChunkInner>,
}

#[derive(Debug)]
pub(crate) enum ChunkInner {
    Cuda(cuda::CudaChunk),
    Sim(sim::SimChunk),
}

impl PhysChunk {
    /// The device that made it.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A chunk mapped into a [`VaRange`] with read-write access. Unmapped when dropped; use
/// [`Mapping::unmap`] to see errors.
#[derive(Debug)]
pub struct Mapping {
    pub(crate) device: DeviceId,
    pub(crate) addr: u64,
    pub(crate) size: u64,
    pub(crate) inner: Option<MappingInner>,
}

#[derive(Debug)]
pub(crate) enum MappingInner {
    Cuda(cuda::CudaMapping),
    Sim(sim::SimMapping),
}

impl MappingInner {
    fn unmap(self) -> Result<()> {
        match self {
            MappingInner::Cuda(m) => m.unmap(),
            MappingInner::Sim(m) => m.unmap(),
        }
    }
}

impl Mapping {
    /// The device that made it.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// The mapped device memory.
    pub fn range(&self) -> DeviceRange {
        DeviceRange::new(DevicePtr(self.addr), self.size)
    }
    /// Unmap now and report any error.
    pub fn unmap(mut self) -> Result<()> {
        match self.inner.take() {
            Some(m) => m.unmap(),
            None => Ok(()),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some(m) = self.inner.take() {
            if let Err(e) = m.unmap() {
                tracing::warn!(error = %e, addr = self.addr, "unmapping a dropped mapping failed");
            }
        }
    }
}

/// Plain device memory for devices without VMM (see [`crate::DeviceInfo::vmm_supported`]).
/// Freed when dropped.
#[derive(Debug)]
pub struct LinearAlloc {
    pub(crate) device: DeviceId,
    pub(crate) addr: u64,
    pub(crate) size: u64,
    pub(crate) _inner: LinearInner,
}

/// Held only so that its `Drop` frees the memory.
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) enum LinearInner {
    Cuda(cuda::CudaLinear),
    Sim(sim::SimMapping),
}

impl LinearAlloc {
    /// The device that made it.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// The allocated device memory.
    pub fn range(&self) -> DeviceRange {
        DeviceRange::new(DevicePtr(self.addr), self.size)
    }
}

/// A stream: work submitted to it runs in order. Cheap to clone; destroyed when the last
/// clone is dropped, after its pending work has run.
#[derive(Clone, Debug)]
pub struct Stream {
    pub(crate) device: DeviceId,
    pub(crate) priority: i32,
    pub(crate) partition_sms: Option<u32>,
    pub(crate) inner: StreamInner,
}

#[derive(Clone, Debug)]
#[allow(dead_code)] // the stream owner is held only for its `Drop`
pub(crate) enum StreamInner {
    /// cudarc's stream, and for a stream in an SM partition its owner (cudarc's wrapper of
    /// such a stream does not destroy it).
    Cuda(
        Arc<cudarc::driver::CudaStream>,
        Option<Arc<cuda::GreenStream>>,
    ),
    Sim(Arc<sim::SimStream>),
}

impl Stream {
    /// The device that made it.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// Its priority (lower is higher, as in CUDA).
    pub fn priority(&self) -> i32 {
        self.priority
    }
    /// SMs of the partition it runs in, when it was made by [`crate::Device::create_stream_in`].
    pub fn partition_sms(&self) -> Option<u32> {
        self.partition_sms
    }
    /// Whether `other` is a handle of this very stream (a clone of it), not another one.
    pub fn same_stream(&self, other: &Stream) -> bool {
        match (&self.inner, &other.inner) {
            (StreamInner::Cuda(a, _), StreamInner::Cuda(b, _)) => Arc::ptr_eq(a, b),
            (StreamInner::Sim(a), StreamInner::Sim(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
    /// The cudarc stream, on the CUDA backend: launch kernels and cuBLAS calls on it. Its
    /// context is the one to load modules into.
    ///
    /// On a stream of an SM partition, that context is the partition's green context, and
    /// cudarc makes it current on the thread that calls it. CUDA allows a green context to
    /// be current on one thread at a time, so launch on a partition's stream inside
    /// [`Stream::with_cuda_stream`], which takes care of that.
    ///
    /// A capture of this stream into a CUDA graph must end before gpushare queues its own
    /// work behind it: a recorded event's wait, or the stream-ordered release of memory
    /// freed on it (a session's scratch, at the latest when the session ends). The driver
    /// refuses the host callbacks that work uses while a capture is under way.
    pub fn cuda_stream(&self) -> Option<&Arc<cudarc::driver::CudaStream>> {
        match &self.inner {
            StreamInner::Cuda(s, _) => Some(s),
            StreamInner::Sim(_) => None,
        }
    }

    /// Run `f` with the cudarc stream, on the CUDA backend (`Ok(None)` on the simulated
    /// device): load modules, make cuBLAS handles and launch work on it there. On a stream
    /// of an SM partition, `f` runs with the partition's green context current on this
    /// thread and no other thread's gpushare call in that context meanwhile, as CUDA
    /// requires (a green context can be current on one thread at a time); the primary
    /// context is current again afterwards, even if `f` panics. Elsewhere it just calls
    /// `f`.
    ///
    /// Keep `f` to launching work through cudarc (or cuBLAS, or your own driver calls):
    /// no gpushare calls in it (allocating or freeing, recording or waiting for events,
    /// copies, dropping buffers, scratch or sessions). The runtime may hold the memory
    /// pool's lock while it waits for the partition's context to make an event (an
    /// eviction's fence), so an `f` that waited for the pool would wait for ever; and
    /// while `f` runs, such an eviction waits for it. Make slow one-time set-up (a first
    /// module load, a cuBLAS handle) short or early.
    ///
    /// cudarc makes an object's context current when it drops the object, so drop what
    /// `f` makes in a partition (modules, slices, cuBLAS handles, events) inside a
    /// `with_cuda_stream` of that partition's stream as well. A clone of the stream kept
    /// past `f` keeps the stream, and its partition, alive until it goes.
    pub fn with_cuda_stream<R>(
        &self,
        f: impl FnOnce(&Arc<cudarc::driver::CudaStream>) -> R,
    ) -> crate::Result<Option<R>> {
        match &self.inner {
            StreamInner::Cuda(s, green) => {
                cuda::in_stream_context(green.as_deref(), || Ok(f(s))).map(Some)
            }
            StreamInner::Sim(_) => Ok(None),
        }
    }
    /// Whether two handles refer to the same stream.
    pub fn same_as(&self, other: &Stream) -> bool {
        match (&self.inner, &other.inner) {
            (StreamInner::Cuda(a, _), StreamInner::Cuda(b, _)) => Arc::ptr_eq(a, b),
            (StreamInner::Sim(a), StreamInner::Sim(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// An event: a marker recorded into a stream. Cheap to clone; clones share the event, and
/// each record replaces what it marks.
#[derive(Clone, Debug)]
pub struct Event {
    pub(crate) device: DeviceId,
    pub(crate) flags: EventFlags,
    pub(crate) inner: EventInner,
}

#[derive(Clone, Debug)]
pub(crate) enum EventInner {
    Cuda(Arc<cuda::CudaEventSet>),
    Sim(Arc<sim::SimEvent>),
}

impl Event {
    /// The device that made it.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// The flags it was made with.
    pub fn flags(&self) -> EventFlags {
        self.flags
    }
}

/// Page-locked host memory for async copies. Host access through [`read`](Self::read) and
/// [`write`](Self::write) first waits for copies that use the buffer. Dropping it waits for
/// them too.
#[derive(Debug)]
pub struct PinnedBuffer {
    pub(crate) device: DeviceId,
    pub(crate) len: u64,
    pub(crate) inner: PinnedInner,
}

pub(crate) enum PinnedInner {
    Cuda(parking_lot::Mutex<cuda::CudaPinned>),
    Sim(Arc<sim::SimPinned>),
}

impl std::fmt::Debug for PinnedInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PinnedInner::Cuda(_) => "Cuda",
            PinnedInner::Sim(_) => "Sim",
        })
    }
}

impl PinnedBuffer {
    /// The device that made it.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether it is empty (never, since zero-sized buffers are rejected).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The bytes `offset..offset + len`, for a copy.
    pub fn slice(&self, offset: u64, len: u64) -> Result<PinnedSlice<'_>> {
        check_range("pinned buffer", offset, len, self.len)?;
        Ok(PinnedSlice {
            buf: self,
            offset,
            len,
        })
    }
    /// The whole buffer, for a copy.
    pub fn full(&self) -> PinnedSlice<'_> {
        PinnedSlice {
            buf: self,
            offset: 0,
            len: self.len,
        }
    }
    /// Copy bytes out of the buffer, after the copies that use it have completed.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        check_range("pinned buffer read", offset, dst.len() as u64, self.len)?;
        let o = offset as usize;
        match &self.inner {
            PinnedInner::Cuda(m) => {
                let g = m.lock();
                dst.copy_from_slice(&g.bytes()?[o..o + dst.len()]);
                Ok(())
            }
            PinnedInner::Sim(p) => p.read(o, dst),
        }
    }
    /// Copy bytes into the buffer, after the copies that use it have completed.
    pub fn write(&mut self, offset: u64, src: &[u8]) -> Result<()> {
        check_range("pinned buffer write", offset, src.len() as u64, self.len)?;
        let o = offset as usize;
        match &self.inner {
            PinnedInner::Cuda(m) => {
                let mut g = m.lock();
                g.bytes_mut()?[o..o + src.len()].copy_from_slice(src);
                Ok(())
            }
            PinnedInner::Sim(p) => p.write(o, src),
        }
    }
}

/// A byte range of a [`PinnedBuffer`], the host side of a copy.
#[derive(Clone, Copy, Debug)]
pub struct PinnedSlice<'a> {
    pub(crate) buf: &'a PinnedBuffer,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl PinnedSlice<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Offset inside the buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// A set of SMs that streams can be confined to (a green context on CUDA).
#[derive(Clone, Debug)]
pub struct SmPartition {
    pub(crate) device: DeviceId,
    pub(crate) requested: u32,
    pub(crate) sm_count: u32,
    pub(crate) inner: PartitionInner,
}

#[derive(Clone, Debug)]
pub(crate) enum PartitionInner {
    Cuda(Arc<cuda::GreenCtx>),
    /// The simulated partition's context: a number of its own, as a green context is a
    /// context of its own (0 is the device's primary context).
    Sim(u64),
}

impl SmPartition {
    /// The device that made it.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// SMs asked for (0 for a remainder).
    pub fn requested(&self) -> u32 {
        self.requested
    }
    /// SMs it really got.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
}

/// The result of [`crate::Device::split_sms`]: one partition per request, and the SMs left.
#[derive(Clone, Debug)]
pub struct SmSplit {
    /// Partitions in the order requested.
    pub partitions: Vec<SmPartition>,
    /// The SMs no partition took, if any.
    pub remainder: Option<SmPartition>,
}
