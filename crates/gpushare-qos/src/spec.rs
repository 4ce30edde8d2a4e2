//! What a context asks for, and the tier that follows from it.

use crate::QosError;

/// QoS tier, after Kubernetes' QoS classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Reserves its whole budget; highest stream priority; never evicted.
    Guaranteed,
    /// Reserves a base and may burst to its maximum into unreserved memory.
    Burstable,
    /// Reserves nothing, uses spare memory, reclaimed first.
    BestEffort,
}

impl Tier {
    /// 0 for the most important tier, 2 for the least.
    pub fn rank(self) -> u32 {
        match self {
            Tier::Guaranteed => 0,
            Tier::Burstable => 1,
            Tier::BestEffort => 2,
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Guaranteed => "Guaranteed",
            Tier::Burstable => "Burstable",
            Tier::BestEffort => "BestEffort",
        })
    }
}

/// What a context asks for: a name, a VRAM budget, optionally a reserved base, an explicit
/// tier, and shares of compute and memory bandwidth.
///
/// The tier follows from the budget where it is not given: a base equal to the maximum is
/// Guaranteed, a base below it Burstable, no base BestEffort.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextSpec {
    /// Name, unique per runtime.
    pub name: String,
    /// Most VRAM the context may use, in bytes.
    pub max_vram: u64,
    /// VRAM reserved for it, in bytes.
    pub base_vram: Option<u64>,
    /// Explicit tier.
    pub tier: Option<Tier>,
    /// Fraction of the GPU's SMs, in (0, 1].
    pub compute_share: Option<f64>,
    /// Fraction of memory bandwidth, in (0, 1].
    pub bandwidth_share: Option<f64>,
    /// Partition to place the context in.
    pub partition: Option<String>,
}

impl ContextSpec {
    /// A context that may use up to `max_vram` bytes.
    pub fn new(name: impl Into<String>, max_vram: u64) -> Self {
        ContextSpec {
            name: name.into(),
            max_vram,
            base_vram: None,
            tier: None,
            compute_share: None,
            bandwidth_share: None,
            partition: None,
        }
    }
    /// Reserve `bytes` for it (0 reserves nothing, as if no base were given).
    pub fn base(mut self, bytes: u64) -> Self {
        self.base_vram = Some(bytes);
        self
    }
    /// Set the tier explicitly.
    pub fn tier(mut self, tier: Tier) -> Self {
        self.tier = Some(tier);
        self
    }
    /// Ask for a fraction of the SMs (gpushare's runtime gives the context a partition of
    /// its own, removed with it; a share below the device's smallest partition gets that
    /// partition, and admission counts it as such).
    pub fn compute(mut self, share: f64) -> Self {
        self.compute_share = Some(share);
        self
    }
    /// Declare a fraction of memory bandwidth. Admission refuses shares that add up to more
    /// than the whole, but nothing throttles a context to its share: the GPU offers no
    /// control of bandwidth per stream or per SM partition. Use it to keep the declared
    /// shares within what the workloads were measured to need.
    pub fn bandwidth(mut self, share: f64) -> Self {
        self.bandwidth_share = Some(share);
        self
    }
    /// Place it in a partition. Its contexts run on the partition's share of the SMs, so a
    /// context placed in one asks for no compute share of its own.
    pub fn partition(mut self, name: impl Into<String>) -> Self {
        self.partition = Some(name.into());
        self
    }

    /// Check the spec and work out its tier and what admission must reserve.
    pub fn resolve(&self) -> Result<Resolved, QosError> {
        let name = &self.name;
        if name.is_empty() {
            return Err(QosError::EmptyName);
        }
        if self.max_vram == 0 {
            return Err(QosError::ZeroBudget { name: name.clone() });
        }
        let base = self.base_vram.filter(|&b| b > 0);
        if let Some(b) = base {
            if b > self.max_vram {
                return Err(QosError::BaseAboveMax {
                    name: name.clone(),
                    base: b,
                    max: self.max_vram,
                });
            }
        }
        let derived = match base {
            Some(b) if b == self.max_vram => Tier::Guaranteed,
            Some(_) => Tier::Burstable,
            None => Tier::BestEffort,
        };
        let contradiction = |why: &str| QosError::Contradiction {
            name: name.clone(),
            why: why.to_string(),
        };
        let (tier, reserve) = match (self.tier, base) {
            (None, _) => (derived, base.unwrap_or(0)),
            (Some(Tier::Guaranteed), None) => (Tier::Guaranteed, self.max_vram),
            (Some(Tier::Guaranteed), Some(b)) if b == self.max_vram => (Tier::Guaranteed, b),
            (Some(Tier::Guaranteed), Some(_)) => {
                return Err(contradiction(
                    "Guaranteed reserves its whole budget: drop the base or make it equal to the maximum",
                ))
            }
            (Some(Tier::Burstable), Some(b)) if b < self.max_vram => (Tier::Burstable, b),
            (Some(Tier::Burstable), Some(_)) => {
                return Err(contradiction(
                    "a Burstable base must be below the maximum; with base = max use Guaranteed",
                ))
            }
            (Some(Tier::Burstable), None) => {
                return Err(contradiction(
                    "Burstable needs a base above zero to reserve; give one with .base()",
                ))
            }
            (Some(Tier::BestEffort), None) => (Tier::BestEffort, 0),
            (Some(Tier::BestEffort), Some(_)) => {
                return Err(contradiction("BestEffort reserves nothing: drop the base"))
            }
        };
        if self.partition.is_some() && self.compute_share.is_some() {
            return Err(contradiction(
                "a context in a named partition runs on that partition's SMs: give the compute \
                 share to the partition, or drop .partition() for a partition of its own",
            ));
        }
        for (what, share) in [
            ("compute", self.compute_share),
            ("bandwidth", self.bandwidth_share),
        ] {
            if let Some(s) = share {
                if !(s.is_finite() && (crate::MIN_SHARE..=1.0).contains(&s)) {
                    return Err(QosError::BadShare {
                        name: name.clone(),
                        what,
                        share: s,
                    });
                }
            }
        }
        Ok(Resolved {
            name: name.clone(),
            tier,
            max: self.max_vram,
            reserve,
            compute: self.compute_share.unwrap_or(0.0),
            bandwidth: self.bandwidth_share.unwrap_or(0.0),
        })
    }
}

/// A checked spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// Name.
    pub name: String,
    /// Tier.
    pub tier: Tier,
    /// Most VRAM it may use.
    pub max: u64,
    /// VRAM admission reserves: the whole budget for Guaranteed, the base for Burstable,
    /// nothing for BestEffort.
    pub reserve: u64,
    /// Compute share (0 if none asked).
    pub compute: f64,
    /// Bandwidth share (0 if none asked).
    pub bandwidth: f64,
}
