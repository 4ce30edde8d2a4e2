//! Helpers shared by the pool's integration tests.
#![allow(dead_code)]

use gpushare_pool::{EvictError, Eviction, Evictor, FreeEvent, RestoreInfo, VictimInfo};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// An event the test completes by hand.
#[derive(Default)]
pub struct Flag(pub AtomicBool);

impl Flag {
    pub fn new() -> Arc<Self> {
        Arc::new(Flag::default())
    }
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl FreeEvent for Flag {
    fn is_complete(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Queued work that runs to its end when someone waits for it, as a GPU's would: a
/// [`Flag`] whose `wait` sets it, and counts that it did.
#[derive(Default)]
pub struct Work {
    pub done: AtomicBool,
    pub waited: AtomicBool,
}

impl Work {
    pub fn new() -> Arc<Self> {
        Arc::new(Work::default())
    }
}

impl FreeEvent for Work {
    fn is_complete(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
    fn wait(&self) {
        self.waited.store(true, Ordering::SeqCst);
        self.done.store(true, Ordering::SeqCst);
    }
}

/// An evictor that records what it was asked to do and can be told to fail.
#[derive(Default)]
pub struct Recorder {
    pub evicted: Mutex<Vec<VictimInfo>>,
    pub restored: Mutex<Vec<RestoreInfo>>,
    pub fail_evict: AtomicBool,
    pub fail_restore: AtomicBool,
    /// Evict in two halves: the pool finishes each eviction with its lock let go.
    pub two_halves: AtomicBool,
}

impl Recorder {
    /// A recorder whose evictions end in two halves (see `two_halves`).
    pub fn two_halves() -> Self {
        let r = Recorder::default();
        r.two_halves.store(true, Ordering::SeqCst);
        r
    }
}

impl Evictor for Recorder {
    fn evict(&self, v: &VictimInfo) -> Result<Eviction, EvictError> {
        if self.fail_evict.load(Ordering::SeqCst) {
            return Err(EvictError("refused".into()));
        }
        self.evicted.lock().unwrap().push(v.clone());
        if self.two_halves.load(Ordering::SeqCst) {
            return Ok(Eviction::in_flight(|| Ok(())));
        }
        Ok(Eviction::done())
    }
    fn restore(&self, r: &RestoreInfo) -> Result<(), EvictError> {
        if self.fail_restore.load(Ordering::SeqCst) {
            return Err(EvictError("refused".into()));
        }
        self.restored.lock().unwrap().push(r.clone());
        Ok(())
    }
}
