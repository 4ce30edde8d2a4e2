//! Typed errors of the QoS layer.

/// Invalid input to the QoS layer. Each says how to fix it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QosError {
    /// A context or partition without a name.
    #[error("a name is required; give the context or partition a non-empty name")]
    EmptyName,
    /// A zero VRAM budget.
    #[error("context {name:?} has a zero VRAM budget; give it a positive max_vram")]
    ZeroBudget {
        /// The context.
        name: String,
    },
    /// A base above the maximum.
    #[error("context {name:?} reserves {base} B but may use only {max} B; lower the base or raise the maximum")]
    BaseAboveMax {
        /// The context.
        name: String,
        /// Base given.
        base: u64,
        /// Maximum given.
        max: u64,
    },
    /// An explicit tier that contradicts the budget.
    #[error("context {name:?}: {why}")]
    Contradiction {
        /// The context.
        name: String,
        /// What contradicts what.
        why: String,
    },
    /// A share outside [1e-9, 1] ([`crate::MIN_SHARE`]: one part per billion, the unit
    /// shares are counted in).
    #[error("{name:?}: a {what} share of {share} is invalid; use a fraction from 1e-9 (one part per billion) to 1")]
    BadShare {
        /// The context or partition.
        name: String,
        /// Compute or bandwidth.
        what: &'static str,
        /// The share.
        share: f64,
    },
    /// A bad evaluator or manager setting.
    #[error("invalid setting {what} = {value}: {expected}")]
    BadConfig {
        /// The setting.
        what: &'static str,
        /// Its value.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A partition name used twice.
    #[error("a partition named {0:?} already exists; choose another name")]
    DuplicatePartition(String),
    /// A context asks for a compute share of its own, whose partition is named after it,
    /// and a partition of that name exists already.
    #[error("context {0:?} asks for a compute share of its own, in a partition named after it, but a partition of that name exists already; give the context another name, or place it in that partition (ContextSpec::partition)")]
    PrivatePartitionNameTaken(String),
    /// A partition that does not exist.
    #[error("no partition is named {0:?}; declare it first (RuntimeBuilder::partition, before build, or PartitionManager::create_partition)")]
    UnknownPartition(String),
    /// Shares or memory limits that do not fit.
    #[error("partition {partition:?} would bring the partitions' {what} to {total} (at most {limit}); {}", overfull_hint(what))]
    PartitionsOverfull {
        /// The partition that did not fit.
        partition: String,
        /// Compute (`"SMs"`, as a share of them) or memory (bytes).
        what: &'static str,
        /// What they would add up to.
        total: f64,
        /// The limit.
        limit: f64,
    },
    /// A context asked to join a partition made for another context alone.
    #[error("partition {partition:?} belongs to context {partition:?} alone (made for its compute share), so context {context:?} cannot join it; place contexts that share SMs in a partition declared for them (gpushare's RuntimeBuilder::partition)")]
    PrivatePartition {
        /// The partition (named after its context).
        partition: String,
        /// The context that asked to join it.
        context: String,
    },
    /// A partition with contexts still placed in it.
    #[error("partition {name:?} still holds {contexts} context(s); remove them first")]
    PartitionBusy {
        /// The partition.
        name: String,
        /// Contexts placed.
        contexts: usize,
    },
    /// A context that does not fit its partition's memory limit.
    #[error("context {context:?} reserves {reserve} B but partition {partition:?} has only {free} B of its limit left; lower the context's base, place it elsewhere, or raise the partition's memory limit")]
    PartitionFull {
        /// The context.
        context: String,
        /// The partition.
        partition: String,
        /// Bytes the context reserves.
        reserve: u64,
        /// Bytes left in the partition.
        free: u64,
    },
    /// A context name placed twice.
    #[error("context {0:?} is already placed; remove it first")]
    AlreadyPlaced(String),
    /// A context that was never placed.
    #[error(
        "context {0:?} is not placed in any partition; place it first (PartitionManager::place)"
    )]
    NotPlaced(String),
}

/// What to do about [`QosError::PartitionsOverfull`] of `what`.
fn overfull_hint(what: &str) -> &'static str {
    if what == "memory" {
        "lower its memory limit or the other partitions' (in a runtime, the memory is its capacity: its memory fraction of the device memory free when it was built)"
    } else {
        "lower its compute share or the other partitions' (a PartitionManager of your own may allow overcommit)"
    }
}
