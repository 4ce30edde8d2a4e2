//! gpushare lets several AI models share one GPU inside one process.
//!
//! A runtime creates execution contexts, one per model, each with a VRAM budget, a QoS tier
//! and its own stream; all device memory comes from one LRU-evicting pool. This crate is the
//! facade over the layers:
//!
//! - [`device`]: the [`Device`](device::Device) trait with a CUDA backend (cudarc) and a
//!   simulated backend for machines without a GPU;
//! - [`pool`]: the allocator;
//! - [`qos`]: tiers, admission and partitions.
//!
//! Open whatever device this machine has, as `GPUSHARE_DEVICE` says:
//!
//! ```
//! let dev = gpushare::device::open(gpushare::Config::device_from_env()?)?;
//! println!("{} on {}", dev.info().name, dev.info().backend);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod config;
mod context;
mod error;
mod event;
pub mod partitions;
mod runtime;
mod session;

pub use config::Config;
pub use context::{Buffer, Context, Usage};
pub use error::{Result, RuntimeError};
pub use event::{Event, EventWait};
pub use gpushare_device as device;
pub use gpushare_pool as pool;
pub use gpushare_qos as qos;
pub use partitions::DeviceSms;
pub use runtime::{
    ContextRow, Pressure, PressureHandler, PressureInfo, PressureRegistration, Runtime,
    RuntimeBuilder, Snapshot,
};
pub use session::{Scratch, Session, SessionFuture};

/// What happens to a persistent buffer when it is evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum EvictPolicy {
    /// Copy it to pinned host memory; the next session restores it bit-exact.
    Offload,
    /// Drop its contents; the owner sees [`Buffer::take_discarded`] and reloads.
    Discard,
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
