//! gpushare-qos: QoS tiers, atomic admission and SM partition planning, as pure logic with
//! no CUDA in it.
//!
//! - [`ContextSpec`] says what a context asks for; its tier follows from its budget, after
//!   Kubernetes' QoS classes: Guaranteed reserves everything, Burstable a base, BestEffort
//!   nothing.
//! - [`AdmissionEvaluator::try_admit`] evaluates and reserves in one step and returns a
//!   [`Reservation`] that releases on drop, or a [`Rejection`] with the numbers;
//!   [`AdmissionEvaluator::admit`] waits, served in tier order with aging.
//! - [`PartitionManager`] checks partitions' memory limits and compute shares, places
//!   contexts, and turns shares into SM counts through an [`SmBackend`] (green contexts on
//!   CUDA), falling back to stream priorities where the backend cannot split.
//!
//! ```
//! use gpushare_qos::{AdmissionConfig, AdmissionEvaluator, ContextSpec, Tier};
//!
//! let eval = AdmissionEvaluator::new(80 << 30, AdmissionConfig::default())?;
//! let llm = eval.try_admit(&ContextSpec::new("llm", 40 << 30).base(40 << 30)).unwrap();
//! assert_eq!(llm.priority.tier, Tier::Guaranteed);
//! assert_eq!(llm.priority.stream_priority(-5, 0), -5);
//! let too_big = eval.try_admit(&ContextSpec::new("big", 40 << 30).base(40 << 30));
//! assert!(too_big.is_err()); // 95% of 80 GiB is usable, 40 GiB already reserved
//! drop(llm); // releases its reservation
//! assert_eq!(eval.usage().reserved, 0);
//! # Ok::<(), gpushare_qos::QosError>(())
//! ```

#![deny(missing_docs)]

mod admission;
mod error;
pub mod gate;
mod partition;
pub mod queue;
mod spec;
mod sync;
pub mod tier_lock;

pub use admission::{
    Admission, AdmissionConfig, AdmissionEvaluator, AdmissionUsage, Admit, Priority, Rejection,
    Reservation,
};
pub use error::QosError;

/// The smallest compute or bandwidth share: one part per billion, the unit admission counts
/// shares in. A smaller positive share would count as none there, yet still get an SM
/// partition of its own.
pub const MIN_SHARE: f64 = 1e-9;
pub use gate::{Attempt, SessionGate};
pub use partition::{
    Isolation, Partition, PartitionConfig, PartitionLimits, PartitionManager, SmBackend, SplitError,
};
pub use queue::WaitQueue;
pub use spec::{ContextSpec, Resolved, Tier};
pub use tier_lock::{Acquire, TierGuard, TierLock};
