//! A lock whose waiters are served in tier order, with aging: for work that one context at
//! a time may do and that can take long, such as restoring a working set.
//!
//! With a plain mutex, a Guaranteed context that wants the lock waits behind every
//! lower-tier context that asked first, each of which may hold it for a long time (a
//! restore copies its evicted buffers back: about 20 ms per GiB on an H100). Here, when
//! the lock is let go, the first in line by tier ([`WaitQueue`], with its aging) takes it,
//! so a higher tier waits for the holder's work only. Aging keeps a lower tier from waiting
//! for ever behind a stream of higher ones.
//!
//! The lock does not preempt: a holder keeps it until it is done. A newcomer finding it
//! free with nobody in line takes it at once.
//!
//! ```
//! use gpushare_qos::{Tier, TierLock};
//! use std::future::Future;
//! use std::task::{Context, Poll, Waker};
//! use std::time::Duration;
//!
//! let lock = TierLock::new(Duration::from_secs(1));
//! let mut cx = Context::from_waker(Waker::noop());
//! // A free lock is taken on the first poll.
//! let mut first = std::pin::pin!(lock.acquire(Tier::BestEffort.rank()));
//! let Poll::Ready(guard) = first.as_mut().poll(&mut cx) else { panic!() };
//! // Meanwhile a Guaranteed context waits in line; it is first when the guard goes.
//! let mut next = std::pin::pin!(lock.acquire(Tier::Guaranteed.rank()));
//! assert!(next.as_mut().poll(&mut cx).is_pending());
//! drop(guard);
//! assert!(next.as_mut().poll(&mut cx).is_ready());
//! ```

use crate::queue::WaitQueue;
use crate::sync::AtomicBool;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

/// A lock served in tier order with aging. See the module docs.
#[derive(Debug)]
pub struct TierLock {
    held: AtomicBool,
    queue: WaitQueue,
}

impl TierLock {
    /// A free lock whose waiters rise one tier per `aging` waited.
    pub fn new(aging: Duration) -> Self {
        TierLock {
            held: AtomicBool::new(false),
            queue: WaitQueue::new(aging),
        }
    }

    /// Wait for the lock with the tier rank `rank` (0 first: see `Tier::rank`). The
    /// future is cancellation-safe: dropped while it waits, it leaves the line.
    pub fn acquire(&self, rank: u32) -> Acquire<'_> {
        Acquire {
            lock: self,
            rank,
            id: None,
        }
    }

    /// Waiters in line.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    fn try_take(&self) -> bool {
        self.held
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
}

/// The future of [`TierLock::acquire`].
#[derive(Debug)]
#[must_use = "the lock is taken only when the future is awaited"]
pub struct Acquire<'a> {
    lock: &'a TierLock,
    rank: u32,
    /// The ticket in line, once it has one.
    id: Option<u64>,
}

impl<'a> Future for Acquire<'a> {
    type Output = TierGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TierGuard<'a>> {
        let lock = self.lock;
        let id = match self.id {
            Some(id) => id,
            None => {
                if lock.queue.is_empty() && lock.try_take() {
                    return Poll::Ready(TierGuard { lock });
                }
                let id = lock.queue.enqueue(self.rank, cx.waker());
                self.id = Some(id);
                id
            }
        };
        // The waker is registered (by `enqueue` or `is_head`) before the look at `held`: a
        // release after the look finds it in line and wakes it.
        if lock.queue.is_head(id, cx.waker()) && lock.try_take() {
            self.id = None;
            // Leaving the line wakes the next in line, which then waits for this guard.
            lock.queue.remove(id);
            return Poll::Ready(TierGuard { lock });
        }
        Poll::Pending
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.lock.queue.remove(id);
        }
    }
}

/// Holds a [`TierLock`]; lets it go when dropped, to the first in line.
#[derive(Debug)]
#[must_use = "the lock is let go when the guard is dropped"]
pub struct TierGuard<'a> {
    lock: &'a TierLock,
}

impl Drop for TierGuard<'_> {
    fn drop(&mut self) {
        self.lock.held.store(false, Ordering::Release);
        self.lock.queue.wake_head();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn poll<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    /// Take the lock, which must be free.
    fn take(lock: &TierLock, rank: u32) -> TierGuard<'_> {
        match poll(&mut lock.acquire(rank)) {
            Poll::Ready(guard) => guard,
            Poll::Pending => panic!("a free lock is taken at once"),
        }
    }

    #[test]
    fn a_higher_tier_in_line_takes_the_lock_before_a_lower_one_that_came_first() {
        let lock = TierLock::new(Duration::from_secs(3600));
        let held = take(&lock, 2);
        let mut best_effort = lock.acquire(2);
        let mut guaranteed = lock.acquire(0);
        assert!(poll(&mut best_effort).is_pending());
        assert!(poll(&mut guaranteed).is_pending());
        assert_eq!(lock.waiting(), 2);
        drop(held);
        assert!(
            poll(&mut best_effort).is_pending(),
            "the lower tier waits although it came first"
        );
        let Poll::Ready(g) = poll(&mut guaranteed) else {
            panic!("the higher tier takes the lock");
        };
        assert!(poll(&mut best_effort).is_pending(), "one holder at a time");
        drop(g);
        assert!(poll(&mut best_effort).is_ready());
        assert_eq!(lock.waiting(), 0);
    }

    #[test]
    fn a_lower_tier_that_waited_long_enough_goes_first() {
        let lock = TierLock::new(Duration::from_millis(1));
        let held = take(&lock, 0);
        let mut best_effort = lock.acquire(2);
        assert!(poll(&mut best_effort).is_pending());
        // Two tiers of aging and more.
        std::thread::sleep(Duration::from_millis(20));
        let mut guaranteed = lock.acquire(0);
        assert!(poll(&mut guaranteed).is_pending());
        drop(held);
        assert!(poll(&mut guaranteed).is_pending());
        assert!(poll(&mut best_effort).is_ready());
    }

    #[test]
    fn a_waiter_dropped_in_line_leaves_it() {
        let lock = TierLock::new(Duration::from_secs(3600));
        let held = take(&lock, 1);
        let mut first = lock.acquire(0);
        assert!(poll(&mut first).is_pending());
        let mut second = lock.acquire(1);
        assert!(poll(&mut second).is_pending());
        drop(first);
        assert_eq!(lock.waiting(), 1);
        drop(held);
        assert!(
            poll(&mut second).is_ready(),
            "the dropped waiter's place is gone"
        );
    }
}
