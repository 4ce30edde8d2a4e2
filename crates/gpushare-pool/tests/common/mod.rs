//! Helpers shared by the pool's integration tests.
#![allow(dead_code)]

use gpushare_pool::{EvictError, Evictor, FreeEvent, RestoreInfo, VictimInfo};
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

/// An evictor that records what it was asked to do and can be told to fail.
#[derive(Default)]
pub struct Recorder {
    pub evicted: Mutex<Vec<VictimInfo>>,
    pub restored: Mutex<Vec<RestoreInfo>>,
    pub fail_evict: AtomicBool,
    pub fail_restore: AtomicBool,
}

impl Evictor for Recorder {
    fn evict(&self, v: &VictimInfo) -> Result<(), EvictError> {
        if self.fail_evict.load(Ordering::SeqCst) {
            return Err(EvictError("refused".into()));
        }
        self.evicted.lock().unwrap().push(v.clone());
        Ok(())
    }
    fn restore(&self, r: &RestoreInfo) -> Result<(), EvictError> {
        if self.fail_restore.load(Ordering::SeqCst) {
            return Err(EvictError("refused".into()));
        }
        self.restored.lock().unwrap().push(r.clone());
        Ok(())
    }
}
