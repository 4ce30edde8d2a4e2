//! A wait queue served in tier order with aging: what sessions wait in when their buffers
//! do not fit yet.

use crate::sync::Mutex;
use std::task::Waker;
use std::time::{Duration, Instant};

struct Waiter {
    id: u64,
    rank: u32,
    since: Instant,
    waker: Option<Waker>,
}

#[derive(Default)]
struct State {
    next: u64,
    waiters: Vec<Waiter>,
}

/// Waiters ordered by rank (0 first), each rising by one rank per `aging` waited, then by
/// arrival. Only the first in line should try to proceed; every release wakes all waiters
/// so that the first in line tries again and the others refresh their place.
///
/// A waiter must register its waker (through [`WaitQueue::enqueue`] or
/// [`WaitQueue::is_head`]) *before* it checks whether it can proceed: a release that
/// happens after the registration wakes it, so no wake-up is lost.
pub struct WaitQueue {
    aging: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for WaitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitQueue")
            .field("aging", &self.aging)
            .field("len", &self.len())
            .finish()
    }
}

impl WaitQueue {
    /// An empty queue whose waiters rise one rank per `aging` waited.
    pub fn new(aging: Duration) -> Self {
        WaitQueue {
            aging,
            state: Mutex::new(State::default()),
        }
    }

    /// Join the queue with `rank` and the waker to call on releases; returns the ticket.
    pub fn enqueue(&self, rank: u32, waker: &Waker) -> u64 {
        let mut q = self.state.lock();
        let id = q.next;
        q.next += 1;
        q.waiters.push(Waiter {
            id,
            rank,
            since: Instant::now(),
            waker: Some(waker.clone()),
        });
        id
    }

    /// Register `waker` for ticket `id` and say whether it is first in line.
    pub fn is_head(&self, id: u64, waker: &Waker) -> bool {
        let mut q = self.state.lock();
        let now = Instant::now();
        let aging = self.aging.as_secs_f64().max(1e-6);
        let key = |w: &Waiter| {
            (
                f64::from(w.rank) - now.saturating_duration_since(w.since).as_secs_f64() / aging,
                w.id,
            )
        };
        let head = q
            .waiters
            .iter()
            .min_by(|a, b| {
                key(a)
                    .partial_cmp(&key(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|w| w.id);
        if let Some(w) = q.waiters.iter_mut().find(|w| w.id == id) {
            w.waker = Some(waker.clone());
        }
        head == Some(id)
    }

    /// Leave the queue (served or cancelled) and let the others move up.
    pub fn remove(&self, id: u64) {
        self.state.lock().waiters.retain(|w| w.id != id);
        self.wake_all();
    }

    /// Something was released: wake every waiter.
    pub fn wake_all(&self) {
        let wakers: Vec<Waker> = self
            .state
            .lock()
            .waiters
            .iter_mut()
            .filter_map(|w| w.waker.take())
            .collect();
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Waiters in the queue.
    pub fn len(&self) -> usize {
        self.state.lock().waiters.len()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
