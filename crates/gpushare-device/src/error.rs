//! Typed errors of the device layer.

use crate::DeviceId;

/// Which kind of operation an injected fault or a failure refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// Creating a physical memory chunk.
    ChunkCreate,
    /// Mapping a chunk into a reserved range.
    Map,
    /// Any async copy or memset.
    Copy,
    /// Any other stream operation: event record, wait, host callback, synchronize.
    StreamOp,
    /// Allocating pinned host memory.
    PinnedAlloc,
}

impl std::fmt::Display for FaultOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            FaultOp::ChunkCreate => "chunk creation",
            FaultOp::Map => "chunk mapping",
            FaultOp::Copy => "copy",
            FaultOp::StreamOp => "stream operation",
            FaultOp::PinnedAlloc => "pinned allocation",
        };
        f.write_str(s)
    }
}

/// Errors returned by every fallible call of the device layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// libcuda could not be loaded.
    #[error("the CUDA driver library (libcuda) was not found; install the NVIDIA driver, or set GPUSHARE_DEVICE=sim to use the simulated device")]
    DriverMissing,
    /// The driver library loaded but cannot be used: a stub library, a driver older than
    /// the CUDA version this was built for, no access to the device nodes, and the like
    /// (`cuInit` or `cuDeviceGetCount` failed).
    #[error("the CUDA driver cannot be used ({call} failed: {source}); check `nvidia-smi` and that the driver supports CUDA 12.8 or later, or set GPUSHARE_DEVICE=sim to use the simulated device")]
    DriverUnusable {
        /// The driver call that failed.
        call: &'static str,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// The driver loaded but reports no GPU.
    #[error("the CUDA driver reports no GPU; check `nvidia-smi`, or set GPUSHARE_DEVICE=sim to use the simulated device")]
    NoDevice,
    /// The requested ordinal does not exist.
    #[error("device ordinal {ordinal} is out of range: the driver reports {count} device(s), so use an ordinal below {count}")]
    OrdinalOutOfRange {
        /// Requested ordinal.
        ordinal: usize,
        /// Number of devices present.
        count: usize,
    },
    /// A size of zero was passed where a positive size is required.
    #[error("{what} must not be zero bytes; pass a positive size")]
    ZeroSize {
        /// What the size was for.
        what: &'static str,
    },
    /// A size or offset is not a multiple of the required granularity.
    #[error("{what} of {value} bytes is not a multiple of the granularity {granularity}; round it up to a multiple of {granularity}")]
    Misaligned {
        /// What was misaligned.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The granularity it must be a multiple of.
        granularity: u64,
    },
    /// An access lies outside the object it refers to.
    #[error("{what}: bytes {offset}..{end} lie outside the {limit} bytes available; keep offset + length within the object")]
    OutOfRange {
        /// What was accessed.
        what: &'static str,
        /// Start offset.
        offset: u64,
        /// End offset (exclusive), saturated on overflow.
        end: u64,
        /// Size of the object.
        limit: u64,
    },
    /// Source and destination of a copy have different lengths.
    #[error("copy source is {src} bytes but destination is {dst} bytes; copy between ranges of equal length")]
    LengthMismatch {
        /// Source length.
        src: u64,
        /// Destination length.
        dst: u64,
    },
    /// A handle created by another device was passed in.
    #[error("{what} belongs to device {found}, not to device {expected}; use handles created by the same device")]
    ForeignHandle {
        /// Kind of handle.
        what: &'static str,
        /// This device.
        expected: DeviceId,
        /// The device that created the handle.
        found: DeviceId,
    },
    /// A device address range is not (wholly) mapped.
    #[error(
        "device range {addr:#x}+{len} is not mapped; access only memory that a live mapping covers"
    )]
    InvalidAddress {
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Part of the target range is already mapped.
    #[error("range {offset:#x}+{len} of the reservation is already mapped; unmap it first or choose another offset")]
    AlreadyMapped {
        /// Offset inside the reservation.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The device has not enough free memory.
    #[error("device out of memory: {requested} bytes requested, {free} bytes free; free memory or lower the request")]
    OutOfMemory {
        /// Bytes requested.
        requested: u64,
        /// Bytes free at the time.
        free: u64,
    },
    /// A stream priority outside the device's range.
    #[error("stream priority {priority} is outside the device's range {greatest}..={least} (lower is higher priority); pick one from Device::priority_range")]
    InvalidPriority {
        /// Priority given.
        priority: i32,
        /// Highest priority (numerically lowest).
        greatest: i32,
        /// Lowest priority (numerically highest).
        least: i32,
    },
    /// An SM split that the device cannot satisfy.
    #[error("cannot split {requested} SMs into the groups asked for: the device has {available} SMs (and rounds groups to multiples of {granularity}); ask for fewer or smaller groups")]
    InvalidSmSplit {
        /// SMs requested in total (after rounding).
        requested: u32,
        /// SMs available.
        available: u32,
        /// Group granularity.
        granularity: u32,
    },
    /// The feature is not available on this device or driver.
    #[error("{what} is not supported here: {reason}")]
    Unsupported {
        /// The feature.
        what: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A fault injected into the simulated device.
    #[error("injected fault: {op} number {nth} failed as configured in the simulated device's fault plan")]
    InjectedFault {
        /// Operation kind.
        op: FaultOp,
        /// Which occurrence (1-based) failed.
        nth: u64,
    },
    /// A simulated stream failed or its worker is gone. A broken stream runs no more work
    /// that touches device memory: what was queued behind the failure is skipped.
    #[error("stream is unusable: {0}; the work queued on it after that does not run: use a new stream (a runtime context's stream lives as long as the context: drop the context and create it again)")]
    StreamBroken(String),
    /// The CUDA driver returned an error.
    #[error("CUDA driver call {call} failed: {source}; check `nvidia-smi` and the driver's log (dmesg), or set GPUSHARE_DEVICE=sim to use the simulated device")]
    Driver {
        /// The driver call.
        call: &'static str,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A configuration value could not be understood.
    #[error("invalid configuration {key}={value:?}: expected {expected}")]
    Config {
        /// Setting or environment variable.
        key: &'static str,
        /// Its value.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
}

/// Result type of the device layer.
pub type Result<T, E = DeviceError> = std::result::Result<T, E>;

/// Attach the name of a driver call to a driver result.
pub(crate) trait DriverCall<T> {
    fn call(self, call: &'static str) -> Result<T>;
}

impl<T> DriverCall<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn call(self, call: &'static str) -> Result<T> {
        self.map_err(|source| {
            use cudarc::driver::sys::CUresult;
            match source.0 {
                CUresult::CUDA_ERROR_NO_DEVICE => DeviceError::NoDevice,
                _ => DeviceError::Driver { call, source },
            }
        })
    }
}

/// Check that `offset..offset+len` lies within `limit`.
pub(crate) fn check_range(what: &'static str, offset: u64, len: u64, limit: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= limit => Ok(()),
        end => Err(DeviceError::OutOfRange {
            what,
            offset,
            end: end.unwrap_or(u64::MAX),
            limit,
        }),
    }
}

/// Check that `size` is a positive multiple of `granularity`.
pub(crate) fn check_granular(what: &'static str, size: u64, granularity: u64) -> Result<()> {
    if size == 0 {
        return Err(DeviceError::ZeroSize { what });
    }
    if !size.is_multiple_of(granularity) {
        return Err(DeviceError::Misaligned {
            what,
            value: size,
            granularity,
        });
    }
    Ok(())
}
