//! Choosing a backend.

use crate::error::{DeviceError, Result};
use crate::{CudaDevice, Device, SimDevice};
use std::str::FromStr;
use std::sync::Arc;

/// Which backend to open: the value of `GPUSHARE_DEVICE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// CUDA when a usable driver and a GPU are found, otherwise the simulated device
    /// (missing driver, [`crate::DeviceError::DriverUnusable`], or no GPU).
    #[default]
    Auto,
    /// CUDA, or an error saying why not.
    Cuda,
    /// The simulated device.
    Sim,
}

impl FromStr for BackendChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(BackendChoice::Auto),
            "cuda" | "gpu" => Ok(BackendChoice::Cuda),
            "sim" | "simulated" => Ok(BackendChoice::Sim),
            _ => Err(DeviceError::Config {
                key: "GPUSHARE_DEVICE",
                value: s.to_string(),
                expected: "auto, cuda or sim",
            }),
        }
    }
}

/// Open CUDA device 0.
pub fn open_cuda() -> Result<Arc<dyn Device>> {
    Ok(Arc::new(CudaDevice::new(0)?))
}

/// Open a device as `choice` says. `Auto` falls back to a default [`SimDevice`] when no
/// driver or GPU is found, or the driver cannot be used, and logs the choice once per
/// process.
pub fn open(choice: BackendChoice) -> Result<Arc<dyn Device>> {
    match choice {
        BackendChoice::Cuda => open_cuda(),
        BackendChoice::Sim => Ok(Arc::new(SimDevice::new())),
        BackendChoice::Auto => match CudaDevice::new(0) {
            Ok(d) => {
                log_once(
                    || tracing::info!(device = %d.info().name, "gpushare: using the CUDA device"),
                );
                Ok(Arc::new(d))
            }
            Err(
                e @ (DeviceError::DriverMissing
                | DeviceError::DriverUnusable { .. }
                | DeviceError::NoDevice),
            ) => {
                log_once(
                    || tracing::warn!(reason = %e, "gpushare: no usable GPU, falling back to the simulated device"),
                );
                Ok(Arc::new(SimDevice::new()))
            }
            Err(e) => Err(e),
        },
    }
}

fn log_once(f: impl FnOnce()) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(f);
}
