//! The bridge between the QoS partition planner and the device's SM partitions.

use gpushare_device::{Device, DeviceError, SmPartition};
use gpushare_qos::{SmBackend, SplitError};
use parking_lot::Mutex;
use std::sync::Arc;

/// Splits a device's SMs for [`gpushare_qos::PartitionManager::realize`], keeping the
/// partitions it made (green contexts on CUDA) so that streams can be created in them.
#[derive(Debug)]
pub struct DeviceSms {
    dev: Arc<dyn Device>,
    made: Mutex<Vec<SmPartition>>,
    remainder: Mutex<Option<SmPartition>>,
}

impl DeviceSms {
    /// A backend over `dev`.
    pub fn new(dev: Arc<dyn Device>) -> Self {
        DeviceSms {
            dev,
            made: Mutex::new(Vec::new()),
            remainder: Mutex::new(None),
        }
    }

    /// The partitions made by the last split, in the order asked.
    pub fn partitions(&self) -> Vec<SmPartition> {
        self.made.lock().clone()
    }

    /// The SMs the last split left over, if any.
    pub fn remainder(&self) -> Option<SmPartition> {
        self.remainder.lock().clone()
    }
}

impl SmBackend for DeviceSms {
    fn sm_count(&self) -> u32 {
        self.dev.info().sm_count
    }

    fn sm_granularity(&self) -> (u32, u32) {
        let i = self.dev.info();
        (i.sm_min_partition, i.sm_granularity)
    }

    fn split(&self, sm_counts: &[u32]) -> Result<Vec<u32>, SplitError> {
        match self.dev.split_sms(sm_counts) {
            // A split of another shape is refused before it replaces the current one: the
            // partitions' slots index into the split that is kept.
            Ok(split) if split.partitions.len() != sm_counts.len() => {
                Err(SplitError::Failed(format!(
                    "the device made {} groups where {} were asked for",
                    split.partitions.len(),
                    sm_counts.len()
                )))
            }
            Ok(split) => {
                let got = split.partitions.iter().map(|p| p.sm_count()).collect();
                *self.made.lock() = split.partitions;
                *self.remainder.lock() = split.remainder;
                Ok(got)
            }
            Err(DeviceError::Unsupported { reason, .. }) => Err(SplitError::Unsupported(reason)),
            Err(e) => Err(SplitError::Failed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpushare_device::{SimConfig, SimDevice};
    use gpushare_qos::{Isolation, PartitionConfig, PartitionLimits, PartitionManager};

    #[test]
    fn shares_become_sim_partitions() {
        let dev: Arc<dyn Device> = Arc::new(SimDevice::new());
        let sms = DeviceSms::new(dev.clone());
        let mut m = PartitionManager::new(PartitionConfig::new(dev.info().total_memory)).unwrap();
        m.create_partition("victim", PartitionLimits::default().compute(0.12))
            .unwrap();
        m.create_partition("neighbour", PartitionLimits::default().compute(0.88))
            .unwrap();
        m.realize(&sms).unwrap();
        assert_eq!(
            m.partition("victim").unwrap().isolation(),
            &Isolation::SmPartition {
                requested: 16,
                granted: 16
            }
        );
        let parts = sms.partitions();
        assert_eq!(parts.len(), 2);
        let s = dev
            .create_stream_in(&parts[0], dev.info().priority_range.greatest)
            .unwrap();
        assert_eq!(s.partition_sms(), Some(16));
    }

    #[test]
    fn no_green_contexts_means_priorities_only() {
        let dev: Arc<dyn Device> =
            Arc::new(SimDevice::with_config(SimConfig::default().green_contexts(false)).unwrap());
        let sms = DeviceSms::new(dev.clone());
        let mut m = PartitionManager::new(PartitionConfig::new(dev.info().total_memory)).unwrap();
        m.create_partition("victim", PartitionLimits::default().compute(0.25))
            .unwrap();
        m.realize(&sms).unwrap();
        assert!(matches!(
            m.partition("victim").unwrap().isolation(),
            Isolation::StreamPriority { .. }
        ));
    }
}
