//! Configuration from the environment. Every `GPUSHARE_*` variable is read here and
//! nowhere else.

use gpushare_device::{BackendChoice, DeviceError};

/// The environment variable that picks the backend: `auto` (default), `cuda` or `sim`.
pub const ENV_DEVICE: &str = "GPUSHARE_DEVICE";
/// Fraction of device memory the runtime uses, in (0, 1].
pub const ENV_MEMORY_FRACTION: &str = "GPUSHARE_MEMORY_FRACTION";
/// Default eviction policy of persistent buffers: `offload` or `discard`.
pub const ENV_OFFLOAD: &str = "GPUSHARE_OFFLOAD";
/// Overcommit ratio for admission (1.0 is off).
pub const ENV_OVERCOMMIT: &str = "GPUSHARE_OVERCOMMIT";

/// Every variable read here.
pub const ENV_VARS: [&str; 4] = [ENV_DEVICE, ENV_MEMORY_FRACTION, ENV_OFFLOAD, ENV_OVERCOMMIT];

/// Of `names`, those that start with `GPUSHARE_` but are none of [`ENV_VARS`]: most likely
/// misspelt, and then silently without effect.
pub fn unknown_vars<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    names
        .into_iter()
        .filter(|n| n.starts_with("GPUSHARE_") && !ENV_VARS.contains(n))
        .collect()
}

/// Settings taken from the environment. Unset variables are `None` (or `Auto`), so that
/// builders can tell them from explicit settings; a variable set to an empty value (or to
/// blanks) counts as unset, as container setups often export them so.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    /// Which device backend to open (`GPUSHARE_DEVICE`).
    pub device: BackendChoice,
    /// Usable memory fraction (`GPUSHARE_MEMORY_FRACTION`).
    pub memory_fraction: Option<f64>,
    /// Default eviction policy (`GPUSHARE_OFFLOAD`).
    pub evict_policy: Option<crate::EvictPolicy>,
    /// Overcommit ratio (`GPUSHARE_OVERCOMMIT`).
    pub overcommit: Option<f64>,
}

impl Config {
    /// Read the settings from the process environment. A value that is not UTF-8 is an
    /// error, as any other value that does not parse.
    pub fn from_env() -> Result<Self, DeviceError> {
        Self::from_env_except(|_| false)
    }

    /// The backend that `GPUSHARE_DEVICE` picks (`Auto` if unset), for code that opens a
    /// device itself and sets the rest in code: the other variables are not read.
    pub fn device_from_env() -> Result<BackendChoice, DeviceError> {
        Ok(Self::from_env_except(|k| k != ENV_DEVICE)?.device)
    }

    /// Read the settings from the process environment, skipping the variables for which
    /// `explicit` is true: a setting given in code wins, so a bad value in its variable
    /// is not an error.
    ///
    /// A variable named `GPUSHARE_*` that is none of [`ENV_VARS`] is logged as a warning.
    pub fn from_env_except(explicit: impl Fn(&str) -> bool) -> Result<Self, DeviceError> {
        let names: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect();
        for name in unknown_vars(names.iter().map(String::as_str)) {
            tracing::warn!(
                variable = name,
                "{name} is set but gpushare reads no such variable; it has no effect (gpushare reads {})",
                ENV_VARS.join(", ")
            );
        }
        Self::from_lookup(|k| {
            if explicit(k) {
                None
            } else {
                // A value that is not UTF-8 is read lossily, so that it fails to parse with
                // a typed error that shows it, rather than pass for unset.
                std::env::var_os(k).map(|v| v.to_string_lossy().into_owned())
            }
        })
    }

    /// Read the settings through `lookup`, which maps a variable name to its value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, DeviceError> {
        let lookup = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let device = match lookup(ENV_DEVICE) {
            Some(v) => v.parse()?,
            None => BackendChoice::Auto,
        };
        let number = |key: &'static str, ok: fn(f64) -> bool, expected: &'static str| {
            lookup(key)
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|&x| ok(x))
                        .ok_or(DeviceError::Config {
                            key,
                            value: v.clone(),
                            expected,
                        })
                })
                .transpose()
        };
        let memory_fraction = number(
            ENV_MEMORY_FRACTION,
            |x| x > 0.0 && x <= 1.0,
            "a fraction in (0, 1]",
        )?;
        let overcommit = number(
            ENV_OVERCOMMIT,
            |x| x.is_finite() && x >= 1.0,
            "a ratio of at least 1.0 (1.0 is off)",
        )?;
        let evict_policy = match lookup(ENV_OFFLOAD) {
            None => None,
            Some(v) => Some(match v.trim().to_ascii_lowercase().as_str() {
                "offload" => crate::EvictPolicy::Offload,
                "discard" => crate::EvictPolicy::Discard,
                _ => {
                    return Err(DeviceError::Config {
                        key: ENV_OFFLOAD,
                        value: v,
                        expected: "offload or discard",
                    })
                }
            }),
        };
        Ok(Config {
            device,
            memory_fraction,
            evict_policy,
            overcommit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: Option<&str>) -> Result<Config, DeviceError> {
        Config::from_lookup(|k| {
            if k == ENV_DEVICE {
                v.map(str::to_string)
            } else {
                None
            }
        })
    }

    #[test]
    fn runtime_settings_are_parsed_and_checked() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            Config::from_lookup(move |k| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        let c = env(&[
            (ENV_MEMORY_FRACTION, "0.8"),
            (ENV_OFFLOAD, "Discard"),
            (ENV_OVERCOMMIT, "1.5"),
        ])
        .unwrap();
        assert_eq!(c.memory_fraction, Some(0.8));
        assert_eq!(c.evict_policy, Some(crate::EvictPolicy::Discard));
        assert_eq!(c.overcommit, Some(1.5));
        for bad in [
            &[(ENV_MEMORY_FRACTION, "1.5")][..],
            &[(ENV_MEMORY_FRACTION, "x")][..],
            &[(ENV_OVERCOMMIT, "0.5")][..],
            &[(ENV_OFFLOAD, "swap")][..],
        ] {
            assert!(matches!(env(bad), Err(DeviceError::Config { .. })));
        }
        assert_eq!(env(&[]).unwrap(), Config::default());
        // Empty values count as unset.
        let empty = env(&[
            (ENV_DEVICE, ""),
            (ENV_MEMORY_FRACTION, ""),
            (ENV_OFFLOAD, " "),
            (ENV_OVERCOMMIT, ""),
        ]);
        assert_eq!(empty.unwrap(), Config::default());
    }

    #[test]
    fn unknown_gpushare_variables_are_found() {
        let names = [
            "GPUSHARE_MEMORY_FRACTON",
            "GPUSHARE_DEVICE",
            "PATH",
            "GPUSHARE_OFFLOAD",
            "GPUSHARE_OVERCOMIT",
        ];
        assert_eq!(
            unknown_vars(names),
            ["GPUSHARE_MEMORY_FRACTON", "GPUSHARE_OVERCOMIT"]
        );
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
