//! The generation counter behind simulated events.

use crate::sync::{lock, wait, Condvar, Mutex};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

#[derive(Debug, Default)]
struct State {
    recorded: u64,
    /// Every generation up to this one has completed.
    done_below: u64,
    /// Generations above `done_below` that completed before an older one (records of one
    /// event on several streams).
    done_above: BTreeSet<u64>,
    /// When the latest record completed.
    at: Option<Instant>,
    /// Generations whose stream had faulted before they completed, with the fault: the
    /// work recorded before them did not all run. Few, and the oldest go past a bound.
    failed: BTreeMap<u64, String>,
}

/// Most failed generations a marker remembers.
const FAILED_KEPT: usize = 64;

impl State {
    fn done(&self, g: u64) -> bool {
        g <= self.done_below || self.done_above.contains(&g)
    }
}

/// A completion marker with CUDA event semantics, built on a generation counter.
///
/// Each record takes the next generation and enqueues work that later completes it.
/// Completions may arrive out of order when an event is re-recorded on several streams; the
/// marker keeps track of each generation, so a wait captured on one record is released by
/// that record's completion and not by a later record's (as a CUDA stream wait captures the
/// record it was issued after). It is complete when the latest recorded generation has
/// completed, so a never-recorded marker is complete, as in CUDA.
#[derive(Debug)]
pub struct Completion {
    state: Mutex<State>,
    cv: Condvar,
}

impl Default for Completion {
    fn default() -> Self {
        Self::new()
    }
}

impl Completion {
    /// A marker that was never recorded.
    pub fn new() -> Self {
        Completion {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    /// Record: run `enqueue` with the next generation while holding the marker, and make
    /// that generation the one to wait for only if `enqueue` succeeds. A failed enqueue
    /// leaves the marker as it was.
    pub fn record_with<E>(&self, enqueue: impl FnOnce(u64) -> Result<(), E>) -> Result<u64, E> {
        let mut st = lock(&self.state);
        let g = st.recorded + 1;
        enqueue(g)?;
        st.recorded = g;
        Ok(g)
    }

    /// Mark generation `g` complete and wake waiters.
    pub fn complete(&self, g: u64) {
        self.finish(g, None);
    }

    /// Mark generation `g` complete, but failed with `why` (its stream had faulted: the
    /// work recorded before it did not all run), and wake waiters.
    pub fn fail(&self, g: u64, why: String) {
        self.finish(g, Some(why));
    }

    fn finish(&self, g: u64, failed: Option<String>) {
        let mut st = lock(&self.state);
        if let Some(why) = failed {
            st.failed.insert(g, why);
            if st.failed.len() > FAILED_KEPT {
                st.failed.pop_first();
            }
        }
        if !st.done(g) {
            st.done_above.insert(g);
            loop {
                let next = st.done_below + 1;
                if !st.done_above.remove(&next) {
                    break;
                }
                st.done_below = next;
            }
            if g == st.recorded {
                st.at = Some(Instant::now());
            }
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Whether generation `g` has completed.
    pub fn is_done(&self, g: u64) -> bool {
        lock(&self.state).done(g)
    }

    /// The fault behind generation `g`, if it failed.
    pub fn failure(&self, g: u64) -> Option<String> {
        lock(&self.state).failed.get(&g).cloned()
    }

    /// The latest recorded generation (0 if never recorded).
    pub fn target(&self) -> u64 {
        lock(&self.state).recorded
    }

    /// Whether the latest record has completed.
    pub fn is_complete(&self) -> bool {
        let st = lock(&self.state);
        st.done(st.recorded)
    }

    /// Block until generation `g` has completed.
    pub fn wait_for(&self, g: u64) {
        let mut st = lock(&self.state);
        while !st.done(g) {
            st = wait(&self.cv, st);
        }
    }

    /// Block until the latest record has completed.
    pub fn wait_latest(&self) {
        let g = self.target();
        self.wait_for(g);
    }

    /// When the latest record completed, if it has and was ever recorded.
    pub fn completed_at(&self) -> Option<Instant> {
        let st = lock(&self.state);
        if st.recorded > 0 && st.done(st.recorded) {
            st.at
        } else {
            None
        }
    }
}
