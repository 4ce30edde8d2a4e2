//! Configuration from the environment. Every `GPUSHARE_*` variable is read here and
//! nowhere else.

use gpushare_device::{BackendChoice, DeviceError};

/// The environment variable that picks the backend: `auto` (default), `cuda` or `sim`.
pub const ENV_DEVICE: &str = "GPUSHARE_DEVICE";

/// Settings taken from the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Which device backend to open (`GPUSHARE_DEVICE`).
    pub device: BackendChoice,
}

impl Config {
    /// Read the settings from the process environment.
    pub fn from_env() -> Result<Self, DeviceError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read the settings through `lookup`, which maps a variable name to its value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, DeviceError> {
        let device = match lookup(ENV_DEVICE) {
            Some(v) => v.parse()?,
            None => BackendChoice::Auto,
        };
        Ok(Config { device })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: Option<&str>) -> Result<Config, DeviceError> {
        Config::from_lookup(|k| {
            assert_eq!(k, ENV_DEVICE);
            v.map(str::to_string)
        })
    }

    #[test]
    fn device_choice_is_parsed() {
        assert_eq!(with(None).unwrap().device, BackendChoice::Auto);
        assert_eq!(with(Some("sim")).unwrap().device, BackendChoice::Sim);
        assert_eq!(with(Some(" CUDA ")).unwrap().device, BackendChoice::Cuda);
        assert_eq!(with(Some("auto")).unwrap().device, BackendChoice::Auto);
        match with(Some("tpu")) {
            Err(DeviceError::Config { key, value, .. }) => {
                assert_eq!((key, value.as_str()), (ENV_DEVICE, "tpu"));
            }
            other => panic!("{other:?}"),
        }
    }
}
