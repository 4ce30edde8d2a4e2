//! The device layer of gpushare: one abstraction over a GPU, with two backends.
//!
//! - [`CudaDevice`] drives a real NVIDIA GPU through [`cudarc`]'s driver API: virtual memory
//!   management (reserve, create, map), streams with priorities, events, async copies, pinned
//!   host buffers and SM partitions through green contexts.
//! - [`SimDevice`] is a complete backend in host memory for machines without a GPU. Bytes
//!   really live there, copies really copy, every stream is a worker thread that runs its work
//!   in order, events complete in stream order, and faults can be injected.
//!
//! Both implement the object-safe [`Device`] trait, so the pool and the runtime are written
//! once. [`open`] picks a backend from a [`BackendChoice`] (`auto`, `cuda` or `sim`).
//!
//! ```
//! use gpushare_device::{open, BackendChoice, Device, EventFlags};
//!
//! let dev = open(BackendChoice::Sim)?;
//! let g = dev.info().granularity;
//! let va = dev.reserve_va(4 * g)?;
//! let chunk = dev.create_chunk(g)?;
//! let mapping = dev.map_chunk(&va, 0, &chunk)?;
//!
//! let stream = dev.create_stream(dev.info().priority_range.least)?;
//! let mut host = dev.alloc_pinned(1024)?;
//! host.write(0, &[7u8; 1024])?;
//! dev.copy_htod(mapping.range().slice(0, 1024)?, host.slice(0, 1024)?, &stream)?;
//! let done = dev.create_event(EventFlags::default())?;
//! dev.record_event(&done, &stream)?;
//! dev.synchronize_event(&done)?;
//! # Ok::<(), gpushare_device::DeviceError>(())
//! ```

#![deny(missing_docs)]

mod cuda;
mod error;
mod handles;
pub mod load;
mod open;
pub mod sim;
mod source;
mod sync;

pub use cuda::{CudaDevice, RawEventPair};
pub use error::{DeviceError, FaultOp, Result};
pub use handles::{
    Event, LinearAlloc, Mapping, PhysChunk, PinnedBuffer, PinnedSlice, SmPartition, SmSplit,
    Stream, VaRange,
};
pub use load::SpinLoad;
pub use open::{open, open_cuda, BackendChoice};
pub use sim::{SimConfig, SimDevice};
pub use source::{check_granularity, LinearSource, VmmSource};

/// Re-export of the `cudarc` version this crate is built against, so that callers launch
/// kernels and cuBLAS calls on [`Stream::cuda_stream`] with matching types.
pub use cudarc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A process-unique identifier of one opened device. Every handle carries the id of the
/// device that made it, so that a handle passed to another device is a typed error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(u64);

impl DeviceId {
    pub(crate) fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        DeviceId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Which backend a device runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// A real GPU through the CUDA driver.
    Cuda,
    /// The simulated device in host memory.
    Sim,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Cuda => "cuda",
            Backend::Sim => "sim",
        })
    }
}

/// The range of stream priorities a device accepts. As in CUDA, a numerically lower value
/// is a higher priority, so `greatest <= least`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriorityRange {
    /// The highest priority (numerically lowest).
    pub greatest: i32,
    /// The lowest priority, which is also the default (numerically highest).
    pub least: i32,
}

impl PriorityRange {
    /// Whether `p` lies in the range.
    pub fn contains(&self, p: i32) -> bool {
        self.greatest <= p && p <= self.least
    }

    pub(crate) fn check(&self, priority: i32) -> Result<()> {
        if self.contains(priority) {
            Ok(())
        } else {
            Err(DeviceError::InvalidPriority {
                priority,
                greatest: self.greatest,
                least: self.least,
            })
        }
    }
}

/// Static facts about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's name, for example "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// The backend.
    pub backend: Backend,
    /// The ordinal the device was opened with.
    pub ordinal: usize,
    /// Total device memory in bytes.
    pub total_memory: u64,
    /// Number of streaming multiprocessors.
    pub sm_count: u32,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Accepted stream priorities.
    pub priority_range: PriorityRange,
    /// Granularity of physical chunks and of VA reservations, in bytes (recommended
    /// granularity on CUDA, 2 MiB on an H100).
    pub granularity: u64,
    /// Whether virtual memory management (reserve + map) is available. Where it is not,
    /// [`Device::reserve_va`] and [`Device::create_chunk`] return
    /// [`DeviceError::Unsupported`], and [`Device::alloc_linear`] is the fallback: plain
    /// allocations of chunk size, each its own address range.
    pub vmm_supported: bool,
    /// Whether SM partitions through green contexts are available.
    pub green_contexts: bool,
    /// SM partitions are multiples of this many SMs (8 on Hopper).
    pub sm_granularity: u32,
    /// The smallest SM partition (8 on Hopper).
    pub sm_min_partition: u32,
    /// The driver version as CUDA encodes it (12080 for 12.8); 0 on the simulated device.
    pub driver_version: u32,
}

/// Free and total device memory at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemInfo {
    /// Free bytes.
    pub free: u64,
    /// Total bytes.
    pub total: u64,
}

/// A device address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    /// The address `offset` bytes further on, or `None` on overflow.
    pub fn checked_add(self, offset: u64) -> Option<DevicePtr> {
        self.0.checked_add(offset).map(DevicePtr)
    }
}

impl std::fmt::Display for DevicePtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A range of device memory: an address and a length in bytes. Copies take ranges and
/// check that both sides have the same length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceRange {
    /// Start address.
    pub ptr: DevicePtr,
    /// Length in bytes.
    pub len: u64,
}

impl DeviceRange {
    /// A range of `len` bytes at `ptr`.
    pub fn new(ptr: DevicePtr, len: u64) -> Self {
        DeviceRange { ptr, len }
    }

    /// The sub-range `offset..offset + len`, checked against this range.
    pub fn slice(&self, offset: u64, len: u64) -> Result<DeviceRange> {
        error::check_range("device range", offset, len, self.len)?;
        let ptr = self
            .ptr
            .0
            .checked_add(offset)
            .ok_or(DeviceError::OutOfRange {
                what: "device address",
                offset,
                end: u64::MAX,
                limit: u64::MAX - self.ptr.0,
            })?;
        Ok(DeviceRange {
            ptr: DevicePtr(ptr),
            len,
        })
    }

    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.ptr.0.saturating_add(self.len)
    }
}

/// Options of a new event. Start from [`EventFlags::default`] or a constructor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventFlags {
    /// Record timestamps so that [`Device::elapsed`] works. Timing costs a little on CUDA,
    /// so it is off by default.
    pub timing: bool,
    /// A host thread that waits for the event ([`Device::synchronize_event`]) sleeps until
    /// it completes, instead of spinning on a core. The wake-up costs some microseconds;
    /// use it for long waits, such as for a large copy. It records timestamps only if
    /// `timing` is set too.
    pub blocking_sync: bool,
}

impl EventFlags {
    /// Flags for an event that records timestamps.
    pub fn timing() -> Self {
        EventFlags {
            timing: true,
            ..Self::default()
        }
    }

    /// Flags for an event whose waiters sleep rather than spin (see
    /// [`EventFlags::blocking_sync`](EventFlags#structfield.blocking_sync)).
    pub fn blocking_sync() -> Self {
        EventFlags {
            blocking_sync: true,
            ..Self::default()
        }
    }
}

/// A boxed host closure run in stream order by [`Device::host_callback`].
pub type HostFn = Box<dyn FnOnce() + Send + 'static>;

/// One GPU, real or simulated.
///
/// Every method checks its input and returns a typed [`DeviceError`]; none panics. Handles
/// release what they hold when dropped; the explicit `release`/`unmap` methods on them exist
/// to observe errors.
pub trait Device: Send + Sync + std::fmt::Debug {
    /// The id every handle of this device carries.
    fn id(&self) -> DeviceId;
    /// Static facts about the device.
    fn info(&self) -> &DeviceInfo;
    /// Free and total memory now.
    fn mem_info(&self) -> Result<MemInfo>;

    /// Reserve `size` bytes of virtual address space (a positive multiple of the
    /// granularity), aligned to the granularity.
    fn reserve_va(&self, size: u64) -> Result<VaRange>;
    /// Create a physical chunk of `size` bytes (a positive multiple of the granularity).
    fn create_chunk(&self, size: u64) -> Result<PhysChunk>;
    /// Map `chunk` at `offset` inside `va` with read-write access for this device.
    /// `offset` must be a multiple of the granularity and the chunk must fit.
    fn map_chunk(&self, va: &VaRange, offset: u64, chunk: &PhysChunk) -> Result<Mapping>;
    /// Fallback allocation for devices without VMM: `size` bytes of plain device memory
    /// (a positive multiple of the granularity) at an address the driver chooses.
    fn alloc_linear(&self, size: u64) -> Result<LinearAlloc>;

    /// Create a stream with `priority`, which must lie in [`DeviceInfo::priority_range`].
    fn create_stream(&self, priority: i32) -> Result<Stream>;
    /// Create an event.
    fn create_event(&self, flags: EventFlags) -> Result<Event>;
    /// Record `event` at the current end of `stream`'s work.
    fn record_event(&self, event: &Event, stream: &Stream) -> Result<()>;
    /// Make `stream` wait, on the device and without blocking the host, until the work
    /// captured by the last record of `event` has completed.
    fn wait_event(&self, stream: &Stream, event: &Event) -> Result<()>;
    /// Whether the work captured by `event` has completed. A never-recorded event is complete.
    fn query_event(&self, event: &Event) -> Result<bool>;
    /// Block the calling thread until `event` completes.
    fn synchronize_event(&self, event: &Event) -> Result<()>;
    /// Time between two completed events that were created with timing.
    fn elapsed(&self, start: &Event, end: &Event) -> Result<Duration>;
    /// Block until all work on `stream` has completed.
    fn synchronize_stream(&self, stream: &Stream) -> Result<()>;
    /// Run `f` on a host thread once all earlier work on `stream` is done; later work on the
    /// stream waits for it. On CUDA `f` runs on the driver's callback thread, where device
    /// calls are forbidden: `f` must not call into the device (the simulated device refuses
    /// such a call with [`DeviceError::Unsupported`], as CUDA does), nor drop the last
    /// handle of a device resource (a stream, an event, a buffer), whose release is a
    /// device call.
    /// Once queued, `f` runs in every case: where earlier work failed (a simulated stream
    /// broken by a fault, a CUDA context that met an error), it runs all the same, so that
    /// whatever it wakes finds the error when it next asks the device.
    fn host_callback(&self, stream: &Stream, f: HostFn) -> Result<()>;

    /// Allocate `len` bytes of page-locked host memory for fast async copies. This is
    /// expensive (about 0.6 s per GiB on an H100): allocate once and reuse.
    fn alloc_pinned(&self, len: u64) -> Result<PinnedBuffer>;
    /// Async copy host to device in stream order. Lengths must match.
    fn copy_htod(&self, dst: DeviceRange, src: PinnedSlice<'_>, stream: &Stream) -> Result<()>;
    /// Async copy device to host in stream order. Lengths must match. The host side is
    /// readable through [`PinnedBuffer::read`], which waits for the copy.
    fn copy_dtoh(&self, dst: PinnedSlice<'_>, src: DeviceRange, stream: &Stream) -> Result<()>;
    /// Async copy device to device in stream order. Lengths must match.
    fn copy_dtod(&self, dst: DeviceRange, src: DeviceRange, stream: &Stream) -> Result<()>;
    /// Async fill of `dst` with `value` in stream order.
    fn memset(&self, dst: DeviceRange, value: u8, stream: &Stream) -> Result<()>;
    /// Copy pageable host bytes to the device in stream order and wait for the copy.
    fn write_sync(&self, dst: DeviceRange, src: &[u8], stream: &Stream) -> Result<()>;
    /// Copy device bytes to pageable host memory in stream order and wait for the copy.
    fn read_sync(&self, dst: &mut [u8], src: DeviceRange, stream: &Stream) -> Result<()>;

    /// Split the device's SMs into disjoint partitions of (at least) the given sizes; what is
    /// left forms the remainder. Sizes are rounded up to [`DeviceInfo::sm_granularity`]; each
    /// partition reports the SMs it really got. Without green contexts this is
    /// [`DeviceError::Unsupported`].
    fn split_sms(&self, sm_counts: &[u32]) -> Result<SmSplit>;
    /// Create a stream whose kernels run only on `partition`'s SMs.
    fn create_stream_in(&self, partition: &SmPartition, priority: i32) -> Result<Stream>;

    /// The CUDA backend, when this is one: the way to its cudarc context.
    fn as_cuda(&self) -> Option<&CudaDevice> {
        None
    }
    /// The simulated backend, when this is one: the way to fault injection and host kernels.
    fn as_sim(&self) -> Option<&SimDevice> {
        None
    }
}

/// Check that a handle belongs to `dev`.
pub(crate) fn check_owner(dev: DeviceId, what: &'static str, found: DeviceId) -> Result<()> {
    if dev == found {
        Ok(())
    } else {
        Err(DeviceError::ForeignHandle {
            what,
            expected: dev,
            found,
        })
    }
}

/// Check that a copy's two sides have the same length.
pub(crate) fn check_lengths(src: u64, dst: u64) -> Result<()> {
    if src == dst {
        Ok(())
    } else {
        Err(DeviceError::LengthMismatch { src, dst })
    }
}
