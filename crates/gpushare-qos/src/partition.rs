//! Partitions: memory limits and compute shares, contexts placed in them, and the SM split
//! that makes a compute share real.

use crate::spec::Resolved;
use crate::QosError;
use std::collections::BTreeMap;

/// Splits a device's SMs. Implemented over the device layer (green contexts on CUDA); the
/// QoS logic itself never touches a device.
pub trait SmBackend {
    /// SMs on the device.
    fn sm_count(&self) -> u32;
    /// The smallest group and the step between group sizes the hardware allows (8 and 8
    /// on Hopper).
    fn sm_granularity(&self) -> (u32, u32) {
        (1, 1)
    }
    /// Split off disjoint groups of (at least) these many SMs; returns the SMs each got,
    /// after the hardware's rounding.
    fn split(&self, sm_counts: &[u32]) -> Result<Vec<u32>, SplitError>;
}

/// Why a split did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// The driver or device cannot split SMs; partitions fall back to stream priorities.
    #[error("SM partitions are unsupported: {0}")]
    Unsupported(String),
    /// The split was attempted and failed.
    #[error("splitting SMs failed: {0}")]
    Failed(String),
}

/// Settings of a [`PartitionManager`].
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionConfig {
    /// Device memory the partitions' limits are checked against.
    pub total_memory: u64,
    /// Allow compute shares to add up to more than 1 and memory limits to more than the
    /// device has.
    pub allow_overcommit: bool,
}

impl PartitionConfig {
    /// Partitions of a device with `total_memory` bytes, overcommit off.
    pub fn new(total_memory: u64) -> Self {
        PartitionConfig {
            total_memory,
            allow_overcommit: false,
        }
    }
    /// Allow overcommit.
    pub fn overcommit(mut self, on: bool) -> Self {
        self.allow_overcommit = on;
        self
    }
}

/// Limits of one partition. Unset limits stay unset: they do not silently become the
/// whole GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PartitionLimits {
    /// Bytes its contexts may reserve in all.
    pub memory: Option<u64>,
    /// Fraction of the SMs, in (0, 1].
    pub compute: Option<f64>,
}

impl PartitionLimits {
    /// Limit memory.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = Some(bytes);
        self
    }
    /// Ask for a compute share.
    pub fn compute(mut self, share: f64) -> Self {
        self.compute = Some(share);
        self
    }
}

/// How a partition's compute is isolated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// No compute share was asked for.
    None,
    /// Not split yet: call [`PartitionManager::realize`].
    Pending,
    /// Its own SMs (a green context on CUDA).
    SmPartition {
        /// SMs the share asked for.
        requested: u32,
        /// SMs it really got.
        granted: u32,
    },
    /// The backend cannot split SMs; only stream priorities separate it.
    StreamPriority {
        /// Why.
        reason: String,
    },
}

/// A partition and the contexts placed in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Partition {
    name: String,
    limits: PartitionLimits,
    contexts: BTreeMap<String, u64>,
    isolation: Isolation,
    /// Made for the context of the same name alone (see
    /// [`PartitionManager::create_private_partition`]).
    private: bool,
    /// The group of SMs the last split that gave it one made for it.
    group: Option<Group>,
    /// A vacancy: the group of a removed partition, held so that the groups after it,
    /// which streams use, keep their place (see [`PartitionManager::remove_partition`]).
    /// Nameless, and not listed.
    vacant: bool,
}

/// The group of SMs a split made for a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    /// Its place among the split's groups: an index into what the backend returned.
    slot: usize,
    /// Its first SM: the SMs granted to the groups ahead of it.
    first: u32,
    /// SMs asked for.
    requested: u32,
    /// SMs granted.
    granted: u32,
}

impl Partition {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its limits.
    pub fn limits(&self) -> PartitionLimits {
        self.limits
    }
    /// How its compute is isolated.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }
    /// Contexts placed in it, with the bytes each reserves.
    pub fn contexts(&self) -> impl Iterator<Item = (&str, u64)> {
        self.contexts.iter().map(|(n, &b)| (n.as_str(), b))
    }
    /// Which of the groups of the last split that gave it one is its own: an index into
    /// the groups [`SmBackend::split`] returned. Partitions that went since leave the
    /// index as it was, where a partition's position among those left would not be.
    pub fn split_slot(&self) -> Option<usize> {
        self.group.map(|g| g.slot)
    }
    /// Whether it is in use and has a group: streams run on that group.
    fn holds_group(&self) -> bool {
        self.in_use() && self.group.is_some()
    }
    /// Whether contexts are placed in it: their streams then run on its group of SMs,
    /// which a new split must leave where it is.
    fn in_use(&self) -> bool {
        !self.contexts.is_empty()
    }
    /// Bytes its contexts reserve.
    pub fn reserved(&self) -> u64 {
        self.contexts
            .values()
            .fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// Keeps partitions consistent: shares and limits that fit, unique names, contexts within
/// their partition's memory limit, and the SM split behind each compute share.
#[derive(Clone, Debug)]
pub struct PartitionManager {
    cfg: PartitionConfig,
    partitions: Vec<Partition>,
}

impl PartitionManager {
    /// A manager with no partitions.
    pub fn new(cfg: PartitionConfig) -> Result<Self, QosError> {
        if cfg.total_memory == 0 {
            return Err(QosError::BadConfig {
                what: "total_memory",
                value: "0".into(),
                expected: "a positive byte count",
            });
        }
        Ok(PartitionManager {
            cfg,
            partitions: Vec::new(),
        })
    }

    /// Create a partition.
    pub fn create_partition(
        &mut self,
        name: &str,
        limits: PartitionLimits,
    ) -> Result<(), QosError> {
        if name.is_empty() {
            return Err(QosError::EmptyName);
        }
        if self.partition(name).is_some() {
            return Err(QosError::DuplicatePartition(name.to_string()));
        }
        if let Some(s) = limits.compute {
            if !(s.is_finite() && (crate::MIN_SHARE..=1.0).contains(&s)) {
                return Err(QosError::BadShare {
                    name: name.to_string(),
                    what: "compute",
                    share: s,
                });
            }
        }
        if limits.memory == Some(0) {
            return Err(QosError::ZeroBudget {
                name: name.to_string(),
            });
        }
        if !self.cfg.allow_overcommit {
            let compute: f64 = self
                .partitions
                .iter()
                .filter_map(|p| p.limits.compute)
                .chain(limits.compute)
                .sum();
            if compute > 1.0 + 1e-9 {
                return Err(QosError::PartitionsOverfull {
                    partition: name.to_string(),
                    what: "SMs",
                    total: compute,
                    limit: 1.0,
                });
            }
            let memory: u64 = self
                .partitions
                .iter()
                .filter_map(|p| p.limits.memory)
                .chain(limits.memory)
                .fold(0u64, u64::saturating_add);
            if memory > self.cfg.total_memory {
                return Err(QosError::PartitionsOverfull {
                    partition: name.to_string(),
                    what: "memory",
                    total: memory as f64,
                    limit: self.cfg.total_memory as f64,
                });
            }
        }
        self.partitions.push(Partition {
            name: name.to_string(),
            limits,
            contexts: BTreeMap::new(),
            private: false,
            group: None,
            vacant: false,
            isolation: if limits.compute.is_some() {
                Isolation::Pending
            } else {
                Isolation::None
            },
        });
        Ok(())
    }

    /// Create a partition for the context `name` alone, such as one for a context's own
    /// compute share: no other context may be placed in it, so it goes with that context.
    pub fn create_private_partition(
        &mut self,
        name: &str,
        limits: PartitionLimits,
    ) -> Result<(), QosError> {
        self.create_partition(name, limits).map_err(|e| match e {
            QosError::DuplicatePartition(n) => QosError::PrivatePartitionNameTaken(n),
            e => e,
        })?;
        if let Some(p) = self.partitions.last_mut() {
            p.private = true;
        }
        Ok(())
    }

    /// Remove an empty partition.
    ///
    /// Where its group of SMs lies ahead of a group in use, the group stays behind as a
    /// vacancy: a split gives groups in order, and streams run on the groups after it, so
    /// later splits must keep it in place. Its SMs stay idle until no group after it is in
    /// use, when the next split drops it.
    pub fn remove_partition(&mut self, name: &str) -> Result<Partition, QosError> {
        let i = self.index(name)?;
        let n = self.partitions[i].contexts.len();
        if n > 0 {
            return Err(QosError::PartitionBusy {
                name: name.to_string(),
                contexts: n,
            });
        }
        let gone = match self.partitions[i].group {
            Some(group) if self.partitions[i + 1..].iter().any(Partition::holds_group) => {
                let vacancy = Partition {
                    name: String::new(),
                    limits: PartitionLimits::default(),
                    contexts: BTreeMap::new(),
                    isolation: Isolation::None,
                    private: true,
                    group: Some(group),
                    vacant: true,
                };
                std::mem::replace(&mut self.partitions[i], vacancy)
            }
            _ => self.partitions.remove(i),
        };
        self.drop_idle_vacancies();
        Ok(gone)
    }

    /// Drop the vacancies that no group in use follows.
    fn drop_idle_vacancies(&mut self) {
        let last = self.partitions.iter().rposition(Partition::holds_group);
        let mut i = 0;
        self.partitions.retain(|p| {
            i += 1;
            !p.vacant || last.is_some_and(|l| i - 1 < l)
        });
    }

    fn index(&self, name: &str) -> Result<usize, QosError> {
        self.partitions
            .iter()
            .position(|p| !p.vacant && p.name == name)
            .ok_or_else(|| QosError::UnknownPartition(name.to_string()))
    }

    /// A partition by name.
    pub fn partition(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| !p.vacant && p.name == name)
    }

    /// All partitions, in creation order.
    pub fn partitions(&self) -> impl Iterator<Item = &Partition> {
        self.partitions.iter().filter(|p| !p.vacant)
    }

    /// Place an admitted context in a partition, within its memory limit.
    pub fn place(&mut self, context: &Resolved, partition: &str) -> Result<(), QosError> {
        let i = self.index(partition)?;
        if self
            .partitions
            .iter()
            .any(|p| p.contexts.contains_key(&context.name))
        {
            return Err(QosError::AlreadyPlaced(context.name.clone()));
        }
        let p = &mut self.partitions[i];
        if p.private && p.name != context.name {
            return Err(QosError::PrivatePartition {
                partition: p.name.clone(),
                context: context.name.clone(),
            });
        }
        if let Some(limit) = p.limits.memory {
            let used = p.reserved();
            if used.saturating_add(context.reserve) > limit {
                return Err(QosError::PartitionFull {
                    context: context.name.clone(),
                    partition: partition.to_string(),
                    reserve: context.reserve,
                    free: limit.saturating_sub(used),
                });
            }
        }
        p.contexts.insert(context.name.clone(), context.reserve);
        Ok(())
    }

    /// Take a context out of its partition.
    pub fn unplace(&mut self, context: &str) -> Result<(), QosError> {
        for p in &mut self.partitions {
            if p.contexts.remove(context).is_some() {
                return Ok(());
            }
        }
        Err(QosError::NotPlaced(context.to_string()))
    }

    /// The SMs each compute share asks for on a device with `sm_count` SMs whose groups
    /// are at least `min` SMs in steps of `step`: each share rounded to the nearest allowed
    /// size, then the largest groups trimmed a step at a time until the plan fits the device
    /// (shares that add up to 1 could otherwise round past it). With more partitions than
    /// minimum-sized groups fit, every group ends at the minimum and the plan still does
    /// not fit; [`PartitionManager::realize`] refuses such a plan.
    ///
    /// A partition in use (contexts placed in it, whose streams run on its group) keeps
    /// the group it has, and so do the partitions ahead of it, whose groups decide where
    /// its group starts: only the partitions after the last one in use are trimmed, so a
    /// share asked for later gets what the groups in use leave.
    ///
    /// Vacancies (see [`PartitionManager::remove_partition`]) are left out of the list,
    /// though their SMs count against the device's.
    pub fn sm_plan(&self, sm_count: u32, min: u32, step: u32) -> Vec<(String, u32)> {
        self.plan(sm_count, min, step)
            .into_iter()
            .filter(|&(i, _)| !self.partitions[i].vacant)
            .map(|(i, n)| (self.partitions[i].name.clone(), n))
            .collect()
    }

    /// [`PartitionManager::sm_plan`] by index into `partitions`, vacancies included.
    fn plan(&self, sm_count: u32, min: u32, step: u32) -> Vec<(usize, u32)> {
        let (min, step) = (min.max(1), step.max(1));
        let kept = self.kept_groups();
        let mut plan: Vec<(usize, u32, bool)> = self
            .partitions
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                p.limits.compute.is_some() || (p.vacant && kept.is_some_and(|k| *i < k))
            })
            .map(|(i, p)| {
                // Up to the last group in use, nothing may change size: that would move
                // the group. A share moved into a vacancy there has no group yet, and takes
                // the SMs it asked for (as the vacancy was cut for it).
                let fixed = kept.is_some_and(|k| i <= k);
                let n = p
                    .group
                    .filter(|_| fixed)
                    .map(|g| g.requested)
                    .unwrap_or_else(|| {
                        Self::wanted(p.limits.compute.unwrap_or(0.0), sm_count, min, step)
                    });
                (i, n, fixed)
            })
            .collect();
        while plan.iter().map(|(_, n, _)| u64::from(*n)).sum::<u64>() > u64::from(sm_count) {
            match plan
                .iter_mut()
                .filter(|(_, n, fixed)| !fixed && *n >= min.saturating_add(step))
                .max_by_key(|(_, n, _)| *n)
            {
                Some((_, n, _)) => *n -= step,
                None => break,
            }
        }
        plan.into_iter().map(|(i, n, _)| (i, n)).collect()
    }

    /// The SMs a share asks for: rounded to the nearest size the device allows.
    fn wanted(share: f64, sm_count: u32, min: u32, step: u32) -> u32 {
        let (min, step) = (min.max(1), step.max(1));
        ((share * f64::from(sm_count) / f64::from(step)).round() as u32)
            .saturating_mul(step)
            .max(min)
    }

    /// Move each compute share without a group into the first vacancy it fits, ahead of
    /// the groups in use, instead of after them; what it leaves of the vacancy stays
    /// vacant if the device can make a group of it (else the vacancy is kept whole for
    /// a share that fits it better).
    fn fill_vacancies(&mut self, sm_count: u32, min: u32, step: u32) {
        let (min, step) = (min.max(1), step.max(1));
        let mut i = 0;
        while i < self.partitions.len() {
            let p = &self.partitions[i];
            let share = match p.limits.compute {
                Some(share) if p.group.is_none() && !p.vacant => share,
                _ => {
                    i += 1;
                    continue;
                }
            };
            let want = Self::wanted(share, sm_count, min, step);
            let fits = self.partitions[..i].iter().position(|v| {
                v.vacant
                    && v.group.is_some_and(|g| {
                        g.requested == want || g.requested >= want.saturating_add(min)
                    })
            });
            let Some(at) = fits else {
                i += 1;
                continue;
            };
            let moved = self.partitions.remove(i);
            self.partitions.insert(at, moved);
            // The vacancy now follows the share: it keeps the rest, or goes.
            let v = at + 1;
            // The share went from `i` to `at`, ahead of the vacancy, which is now at
            // `at + 1`: the partitions after `i` kept their places if the vacancy stays,
            // and moved back one if it goes.
            match self.partitions[v].group {
                Some(g) if g.requested > want => {
                    self.partitions[v].group = Some(Group {
                        slot: g.slot,
                        first: g.first.saturating_add(want),
                        requested: g.requested - want,
                        granted: g.granted.saturating_sub(want),
                    });
                    i += 1;
                }
                _ => {
                    self.partitions.remove(v);
                }
            }
        }
    }

    /// The index in `partitions` of the last partition in use with a group: the groups up
    /// to it must stay as they are.
    fn kept_groups(&self) -> Option<usize> {
        self.partitions.iter().rposition(Partition::holds_group)
    }

    /// Make the compute shares real: split the SMs through `backend`. Where the backend
    /// cannot split, each partition records that it falls back to stream priorities.
    ///
    /// A split divides the device's SMs into groups in the partitions' order. The streams
    /// of a partition in use run on the group its last split made, so a new split must
    /// give that partition the same SMs: the same count (see [`PartitionManager::sm_plan`])
    /// at the same place. A partition removed ahead of it leaves a vacancy that keeps the
    /// place (see [`PartitionManager::remove_partition`]); one ahead of it without a group
    /// yet would move it, and this refuses the split rather than let two groups overlap.
    ///
    /// On error the partitions are as they were (a share moved into a vacancy goes back).
    pub fn realize(&mut self, backend: &dyn SmBackend) -> Result<(), QosError> {
        let before = self.partitions.clone();
        let r = self.split_afresh(backend);
        if r.is_err() {
            self.partitions = before;
        }
        r
    }

    /// [`PartitionManager::realize`], leaving the partitions as they are on error.
    fn split_afresh(&mut self, backend: &dyn SmBackend) -> Result<(), QosError> {
        let (min, step) = backend.sm_granularity();
        let sm_count = backend.sm_count();
        self.drop_idle_vacancies();
        self.fill_vacancies(sm_count, min, step);
        let plan = self.plan(sm_count, min, step);
        if plan.is_empty() {
            return Ok(());
        }
        // The kept groups start where the granted groups ahead of them end.
        let kept = self.kept_groups();
        let mut at = 0u32;
        for &(i, n) in &plan {
            let p = &self.partitions[i];
            let name = &p.name;
            match p.group.filter(|_| kept.is_some_and(|k| i <= k)) {
                Some(g) if g.first == at => at = at.saturating_add(g.granted),
                Some(g) if p.in_use() => {
                    return Err(QosError::BadConfig {
                        what: "SM split",
                        value: format!(
                            "a new split would start partition {name}'s group at SM {at}, where its contexts' streams run on the {} SMs from SM {}",
                            g.granted, g.first
                        ),
                        expected: "groups in use that keep their place: a partition ahead of one in use has no group yet; split before placing contexts, or declare partitions up front",
                    });
                }
                _ => at = at.saturating_add(n),
            }
        }
        // A plan that does not fit is still offered: a backend that cannot split at all
        // says so, and the partitions fall back to priorities; one that can fails, and the
        // error then says why.
        let total: u64 = plan.iter().map(|(_, n)| u64::from(*n)).sum();
        let counts: Vec<u32> = plan.iter().map(|(_, n)| *n).collect();
        match backend.split(&counts) {
            Ok(granted) if granted.len() == plan.len() => {
                let mut first = 0u32;
                for (slot, ((i, requested), got)) in plan.into_iter().zip(granted).enumerate() {
                    if !self.partitions[i].vacant {
                        // What the share asked for, before the plan trimmed it to the SMs
                        // left: the caller can tell that it got less.
                        let asked = self.partitions[i]
                            .limits
                            .compute
                            .map_or(requested, |share| Self::wanted(share, sm_count, min, step));
                        self.partitions[i].isolation = Isolation::SmPartition {
                            requested: asked,
                            granted: got,
                        };
                    }
                    self.partitions[i].group = Some(Group {
                        slot,
                        first,
                        requested,
                        granted: got,
                    });
                    first = first.saturating_add(got);
                }
                Ok(())
            }
            Ok(granted) => Err(QosError::BadConfig {
                what: "SM split",
                value: format!("{} groups for {} partitions", granted.len(), plan.len()),
                expected: "one group per partition with a compute share",
            }),
            Err(SplitError::Unsupported(reason)) => {
                for (i, _) in plan {
                    if !self.partitions[i].vacant {
                        self.partitions[i].isolation = Isolation::StreamPriority {
                            reason: reason.clone(),
                        };
                    }
                }
                Ok(())
            }
            Err(SplitError::Failed(_)) if total > u64::from(sm_count) => Err(QosError::BadConfig {
                what: "SM split",
                value: format!(
                    "{} partitions with a compute share need at least {total} SMs, the device has {sm_count}",
                    counts.len()
                ),
                expected: "fewer partitions with a compute share (each takes a group of at least the device's minimum)",
            }),
            Err(SplitError::Failed(msg)) => Err(QosError::BadConfig {
                what: "SM split",
                value: msg,
                expected: "shares the device can split; lower them or check the driver",
            }),
        }
    }
}
