//! The generation counter behind simulated events.

use crate::sync::{lock, wait, Condvar, Mutex};
use std::time::Instant;

#[derive(Debug, Default)]
struct State {
    recorded: u64,
    completed: u64,
    at: Option<Instant>,
}

/// A completion marker with CUDA event semantics, built on a generation counter.
///
/// Each record takes the next generation and enqueues work that later completes it.
/// Completions may arrive out of order when an event is re-recorded on several streams; the
/// marker keeps the highest generation completed. It is complete when the latest recorded
/// generation has completed, so a never-recorded marker is complete, as in CUDA.
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
        let mut st = lock(&self.state);
        if g > st.completed {
            st.completed = g;
            st.at = Some(Instant::now());
        }
        drop(st);
        self.cv.notify_all();
    }

    /// The latest recorded generation (0 if never recorded).
    pub fn target(&self) -> u64 {
        lock(&self.state).recorded
    }

    /// Whether the latest record has completed.
    pub fn is_complete(&self) -> bool {
        let st = lock(&self.state);
        st.completed >= st.recorded
    }

    /// Block until generation `g` (or a later one) has completed.
    pub fn wait_for(&self, g: u64) {
        let mut st = lock(&self.state);
        while st.completed < g {
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
        if st.recorded > 0 && st.completed >= st.recorded {
            st.at
        } else {
            None
        }
    }
}
