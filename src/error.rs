//! Typed errors of the runtime.

use gpushare_device::DeviceError;
use gpushare_pool::{OomReport, PoolError};
use gpushare_qos::{QosError, Rejection};

/// Errors of the runtime. Each says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The device failed, or a `GPUSHARE_*` variable holds a value that cannot be used
    /// (the message names the variable and what it expects).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The pool refused for a reason other than memory.
    #[error(transparent)]
    Pool(PoolError),
    /// Bad QoS input.
    #[error(transparent)]
    Qos(#[from] QosError),
    /// Admission said no.
    #[error("admission of context {name:?} was rejected: {rejection}")]
    Rejected {
        /// The context.
        name: String,
        /// Why, with the numbers.
        rejection: Rejection,
    },
    /// A context name in use (by a live context, or by one whose drop has not ended).
    #[error("a context named {0:?} already exists (or is still being dropped); choose another name, or drop the old context first")]
    DuplicateContext(String),
    /// A context would exceed its budget.
    #[error("context {context:?} would exceed its budget: {used} B in use + {requested} B > {limit} B; free buffers or raise max_vram")]
    BudgetExceeded {
        /// The context.
        context: String,
        /// Bytes requested.
        requested: u64,
        /// Bytes in use.
        used: u64,
        /// Its budget.
        limit: u64,
    },
    /// Nothing could be reclaimed; the report says who holds what.
    #[error("out of memory for {requested} B requested by {context:?}: {report}; end sessions or drop buffers of the contexts listed, or raise the runtime's memory fraction or limit")]
    OutOfMemory {
        /// The context.
        context: String,
        /// Bytes requested.
        requested: u64,
        /// Who holds what.
        report: Box<OomReport>,
    },
    /// Memory is free, but reserved as other contexts' bases: a request beyond this
    /// context's own base may not take it.
    #[error("{context:?} cannot take {requested} B beyond its reserved base: only {available} B are neither in use nor reserved for other contexts; wait for other contexts to free memory, give this context a larger reserved base, or lower the others'")]
    ReservedElsewhere {
        /// The context.
        context: String,
        /// Bytes needed beyond the context's reserved base.
        requested: u64,
        /// Bytes neither in use nor reserved for other contexts.
        available: u64,
    },
    /// A memory-pressure handler denied the allocation (or panicked, which counts as a
    /// denial and is logged).
    #[error(
        "a memory-pressure handler denied {requested} B for {context:?} ({available} B available); what it was asked about: {shortage}"
    )]
    PressureDenied {
        /// The context.
        context: String,
        /// Bytes requested.
        requested: u64,
        /// Bytes available.
        available: u64,
        /// The shortage the handlers were asked about: [`RuntimeError::OutOfMemory`],
        /// whose report says who holds what, or [`RuntimeError::ReservedElsewhere`].
        shortage: Box<RuntimeError>,
    },
    /// [`Context::session_timeout`](crate::Context::session_timeout) ran out of time: the
    /// context's working set did not fit beside what live sessions pin and what is
    /// reserved for other contexts, or sessions ahead of it in line were served first.
    #[error(
        "no session on {context:?} within {waited:?}: {missing} B of its buffers are not resident and {available} B are free (the rest pinned by live sessions, reserved for other contexts, or in use); end a session this thread holds, if any (waiting on it would never end), or try again later"
    )]
    SessionTimedOut {
        /// The context.
        context: String,
        /// How long it waited.
        waited: std::time::Duration,
        /// Bytes of its buffers not on the device when it gave up.
        missing: u64,
        /// Bytes free in the runtime then.
        available: u64,
    },
    /// Too many sessions wait for memory already: the line holds about a million.
    #[error("{waiting} sessions wait for memory already, as many as the line holds; {context:?} cannot join it: bound the requests in flight (with a semaphore, say), or retry later")]
    LineFull {
        /// The context.
        context: String,
        /// Sessions waiting.
        waiting: u64,
    },
    /// Too many sessions are live at once: the runtime counts about a million.
    #[error("{live} sessions are live already, as many as the runtime counts; {context:?} cannot start another: end some first, or bound the requests in flight (with a semaphore, say)")]
    TooManySessions {
        /// The context.
        context: String,
        /// Sessions live.
        live: u64,
    },
    /// A context's persistent buffers can never all be resident.
    #[error("the buffers of {context:?} take {bytes} B but the runtime holds only {capacity} B; free some or raise the memory fraction")]
    WorkingSetTooLarge {
        /// The context.
        context: String,
        /// Bytes of its buffers.
        bytes: u64,
        /// Runtime capacity.
        capacity: u64,
    },
    /// A context's persistent buffers cannot all be resident beside the buffers of the
    /// Guaranteed contexts, which are never evicted: no session's end would make room.
    #[error("the buffers of {context:?} take {bytes} B, but Guaranteed contexts' buffers, which are never evicted, hold {guaranteed} B of the runtime's {capacity} B; free buffers of either, or raise the memory fraction")]
    WorkingSetBesideGuaranteed {
        /// The context.
        context: String,
        /// Bytes of its buffers.
        bytes: u64,
        /// Bytes of the other Guaranteed contexts' resident buffers.
        guaranteed: u64,
        /// Runtime capacity.
        capacity: u64,
    },
    /// A handle of another runtime or context.
    #[error(
        "the {what} belongs to another {owner}; use it with the runtime and context that made it"
    )]
    Foreign {
        /// Event or buffer.
        what: &'static str,
        /// Runtime or context.
        owner: &'static str,
    },
    /// A session future that gives no session: polled again after it completed, or its
    /// restore on a blocking thread panicked or was cancelled. The reason says what to do.
    #[error("the session future gives no session: {0}")]
    SessionFuture(&'static str),
    /// A range outside a buffer.
    #[error("bytes {offset}..{end} lie outside the buffer of {len} B; keep offset + length within the buffer's size")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// End.
        end: u64,
        /// Buffer length.
        len: u64,
    },
}

impl RuntimeError {
    pub(crate) fn from_pool(e: PoolError, context: &str) -> Self {
        match e {
            PoolError::QuotaExceeded {
                requested,
                used,
                limit,
                ..
            } => RuntimeError::BudgetExceeded {
                context: context.to_string(),
                requested,
                used,
                limit,
            },
            PoolError::OutOfMemory {
                requested, report, ..
            } => RuntimeError::OutOfMemory {
                context: context.to_string(),
                requested,
                report,
            },
            PoolError::ReservedElsewhere {
                requested,
                available,
                ..
            } => RuntimeError::ReservedElsewhere {
                context: context.to_string(),
                requested,
                available,
            },
            e => RuntimeError::Pool(e),
        }
    }

    pub(crate) fn is_oom(&self) -> bool {
        matches!(
            self,
            RuntimeError::OutOfMemory { .. } | RuntimeError::ReservedElsewhere { .. }
        )
    }
}

/// Result type of the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
