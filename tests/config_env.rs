//! `GPUSHARE_*` variables against explicit builder settings. One test in its own binary:
//! it sets the process environment, which no other test here may read meanwhile.

use gpushare::device::{BackendChoice, DeviceError};
use gpushare::{Runtime, RuntimeError};

#[test]
fn explicit_settings_win_over_bad_variables_and_unset_ones_are_checked() {
    std::env::set_var("GPUSHARE_DEVICE", "tpu");
    std::env::set_var("GPUSHARE_OVERCOMMIT", "0.5");
    let rt = Runtime::builder()
        .device(BackendChoice::Sim)
        .overcommit(2.0)
        .build()
        .expect("explicit settings are not overridden by bad variables");
    drop(rt);
    // Without the explicit overcommit, its bad variable is an error that names it.
    match Runtime::builder().device(BackendChoice::Sim).build() {
        Err(RuntimeError::Device(e)) => {
            assert!(e.to_string().contains("GPUSHARE_OVERCOMMIT"), "{e}")
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    std::env::remove_var("GPUSHARE_DEVICE");
    std::env::remove_var("GPUSHARE_OVERCOMMIT");
    // A value that is not UTF-8 is an error too, not a variable left unset.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        std::env::set_var(
            "GPUSHARE_MEMORY_FRACTION",
            std::ffi::OsStr::from_bytes(b"0.\xff5"),
        );
        match Runtime::builder().device(BackendChoice::Sim).build() {
            Err(RuntimeError::Device(e)) => {
                assert!(e.to_string().contains("GPUSHARE_MEMORY_FRACTION"), "{e}")
            }
            other => panic!("expected a configuration error, got {other:?}"),
        }
        assert!(
            matches!(
                gpushare::Config::from_env(),
                Err(DeviceError::Config { .. })
            ),
            "Config::from_env reads a value that is not UTF-8 as unset"
        );
        // Code that reads only the device ignores the other variables.
        assert_eq!(
            gpushare::Config::device_from_env().unwrap(),
            BackendChoice::Auto
        );
        std::env::remove_var("GPUSHARE_MEMORY_FRACTION");
    }
}
