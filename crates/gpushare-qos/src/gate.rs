//! The protocol a session waits under for memory: when a failed attempt waits, when it
//! fails for good, and who wakes it.
//!
//! A session's attempt to get its working set resident can fail for lack of memory. Then:
//! - if a session is live, or a stream-ordered free is still pending, that release will
//!   come and wake the queue: the attempt waits in the [`WaitQueue`], in tier order;
//! - if memory was released during the attempt (the release generation moved), it retries;
//! - otherwise nothing can free memory, and waiting would be forever: it fails.
//!
//! Every release ([`SessionGate::ended`], [`SessionGate::pending_done`],
//! [`SessionGate::released`]) bumps the generation and wakes the first in line, which
//! tries again; a first in line that leaves wakes the next. A waiter registers its waker
//! ([`SessionGate::enqueue`] or [`SessionGate::is_head`]) before each attempt, so a
//! release after the attempt's check finds it.
//!
//! The generation, the number of live sessions and the number of waiters share one atomic
//! word. A session's start is one read-modify-write of it, and its end is one more that
//! bumps the generation and drops the live count together, and learns from the value it
//! read whether anyone waits; it skips the queue's lock when nobody does (the common case:
//! a session ending with no one in line). Both orders are safe: if the release's bump
//! comes first, the waiter's own increment reads it, and its next attempt sees the
//! released memory; if the waiter's increment comes first, the release sees it and wakes
//! the queue.

use crate::queue::WaitQueue;
use crate::sync::AtomicU64;

/// The fields of [`SessionGate::state`], low to high: waiters (20 bits: a million sessions
/// waiting at once; [`SessionGate::enqueue`] refuses more), live sessions (20 bits: a
/// million sessions at once; [`SessionGate::started`] refuses more), and the release
/// generation (24 bits). The generation only tells an attempt whether anything was
/// released while it ran; it would take 2^24 releases during one attempt for a wrap to
/// hide one.
const WAITERS: u64 = (1 << 20) - 1;
const LIVE: u64 = 1 << 20;
const LIVE_MASK: u64 = WAITERS * LIVE;
const GEN: u64 = 1 << 40;
const GEN_MASK: u64 = !(WAITERS | LIVE_MASK);
use std::sync::atomic::Ordering;
use std::task::Waker;
use std::time::Duration;

/// What one round of attempts ended in.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt<T, E> {
    /// Success, or a failure that waiting cannot cure.
    Done(Result<T, E>),
    /// Short of memory that a live session or a pending free will release: wait.
    Wait,
}

/// Waiting sessions, and what releases memory for them. See the module docs.
#[derive(Debug)]
pub struct SessionGate {
    queue: WaitQueue,
    /// The release generation (bumped on every release, so that an attempt can tell
    /// whether anything changed), the live sessions (each will release memory when it
    /// ends), and the waiters; see [`GEN`], [`LIVE`] and [`WAITERS`].
    state: AtomicU64,
    /// Stream-ordered frees whose work has not completed: each will release memory.
    pending: AtomicU64,
    /// How often the generation has wrapped, for [`SessionGate::clock`].
    wraps: AtomicU64,
}

impl SessionGate {
    /// A gate whose waiters rise one tier per `aging` waited.
    pub fn new(aging: Duration) -> Self {
        SessionGate {
            queue: WaitQueue::new(aging),
            state: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            wraps: AtomicU64::new(0),
        }
    }

    /// Run `attempt` until it succeeds, fails with an error `is_shortage` does not accept,
    /// or must wait (see the module docs).
    pub fn attempt<T, E>(
        &self,
        mut attempt: impl FnMut() -> Result<T, E>,
        is_shortage: impl Fn(&E) -> bool,
    ) -> Attempt<T, E> {
        loop {
            let gen = self.state.load(Ordering::Acquire) & GEN_MASK;
            match attempt() {
                Ok(t) => return Attempt::Done(Ok(t)),
                Err(e) if is_shortage(&e) => {
                    let now = self.state.load(Ordering::Acquire);
                    if now & LIVE_MASK != 0 || self.pending.load(Ordering::Acquire) > 0 {
                        return Attempt::Wait;
                    }
                    // Read again after `pending`: a free that completed in between moved
                    // the generation before it dropped its count.
                    if self.state.load(Ordering::Acquire) & GEN_MASK == gen {
                        return Attempt::Done(Err(e));
                    }
                }
                Err(e) => return Attempt::Done(Err(e)),
            }
        }
    }

    /// Whether a newcomer of tier rank `rank` may try at once, ahead of those in line
    /// (and whether a waiter behind the first in line may go ahead of it): nobody waits,
    /// or [`WaitQueue::would_lead`] says so. Otherwise it joins the line (or stays).
    ///
    /// Without this, newcomers whose working set is resident could always start: sessions
    /// of one context that overlapped without a gap kept its buffers pinned, and a waiter
    /// that needed their memory waited for as long as they kept coming. The period the
    /// first in line lets others pass lets the context in place run on for a while before
    /// the switch (each switch evicts and restores buffers), and bounds the first in
    /// line's wait for the context it waits on.
    ///
    /// One atomic load when nobody waits.
    #[inline]
    pub fn may_pass(&self, rank: u32) -> bool {
        self.state.load(Ordering::Acquire) & WAITERS == 0 || self.queue.would_lead(rank)
    }

    /// The most sessions that may be live at once (see [`SessionGate::started`]).
    pub const MAX_LIVE: u64 = LIVE_MASK / LIVE;

    /// A session started (it will release when it ends); false, and nothing counted, when
    /// [`SessionGate::MAX_LIVE`] sessions are live already (the count would carry into the
    /// generation, and a waiter would see no live session and fail for good).
    #[inline]
    #[must_use]
    pub fn started(&self) -> bool {
        let mut now = self.state.load(Ordering::Acquire);
        loop {
            if now & LIVE_MASK == LIVE_MASK {
                return false;
            }
            match self.state.compare_exchange_weak(
                now,
                now + LIVE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => now = seen,
            }
        }
    }

    /// A session ended: it released memory.
    ///
    /// The generation moves *before* the count drops: an attempt that sees no live session
    /// then also sees the new generation and retries. The other order lets an attempt see
    /// neither the memory nor a live session nor a change, and fail for nothing (loom
    /// found this: `a_session_ending_wakes_a_waiter_and_it_gets_the_memory`).
    #[inline]
    pub fn ended(&self) {
        // One step: the generation moves and the count drops together. `GEN - LIVE` is
        // positive, and the live field is at least 1, so nothing borrows across fields.
        let before = self.state.fetch_add(GEN - LIVE, Ordering::AcqRel);
        debug_assert!(
            before & LIVE_MASK != 0,
            "a session ended that never started"
        );
        self.count_wrap(before);
        self.wake(before & WAITERS);
    }

    /// A stream-ordered free was queued; [`SessionGate::pending_done`] follows when its
    /// work completes (or [`SessionGate::pending_cancelled`] if it never will).
    #[inline]
    pub fn pending_added(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// A pending free's work completed: its memory is released. As in
    /// [`SessionGate::ended`], the generation moves before the count drops.
    #[inline]
    pub fn pending_done(&self) {
        let waiters = self.bump();
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.wake(waiters);
    }

    /// A pending free will not be signalled after all. An attempt that saw it pending may
    /// have chosen to wait for it: as in [`SessionGate::pending_done`], the generation
    /// moves before the count drops, and the first in line is woken to look again (it then
    /// fails if nothing else will release memory).
    #[inline]
    pub fn pending_cancelled(&self) {
        self.pending_done();
    }

    /// Memory was released: let waiting sessions try again.
    #[inline]
    pub fn released(&self) {
        let waiters = self.bump();
        self.wake(waiters);
    }

    /// Bump the generation; returns how many waited just before.
    #[inline]
    fn bump(&self) -> u64 {
        let before = self.state.fetch_add(GEN, Ordering::AcqRel);
        self.count_wrap(before);
        before & WAITERS
    }

    /// Count a wrap of the generation, if the bump that read `before` made one.
    #[inline]
    fn count_wrap(&self, before: u64) {
        if before & GEN_MASK == GEN_MASK {
            self.wraps.fetch_add(1, Ordering::AcqRel);
        }
    }

    #[inline]
    fn wake(&self, waiters: u64) {
        if waiters > 0 {
            self.queue.wake_head();
        }
    }

    /// The most sessions that may wait at once (see [`SessionGate::enqueue`]).
    pub const MAX_WAITING: u64 = WAITERS;

    /// Join the line with the tier rank `rank`, in `group` (the waiter's context: see
    /// [`SessionGate::served`]); returns the ticket, or `None` when
    /// [`SessionGate::MAX_WAITING`] sessions wait already (the count would carry into the
    /// live sessions' field, and a release would see nobody waiting).
    pub fn enqueue(&self, rank: u32, group: u64, waker: &Waker) -> Option<u64> {
        let id = self.queue.enqueue_in(rank, group, waker);
        // After the waker is in the queue: a release that reads this sees it there.
        let mut now = self.state.load(Ordering::Acquire);
        loop {
            if now & WAITERS == WAITERS {
                self.queue.remove(id);
                return None;
            }
            match self.state.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(id),
                Err(seen) => now = seen,
            }
        }
    }

    /// Register `waker` for ticket `id`, and say whether it is first in line.
    pub fn is_head(&self, id: u64, waker: &Waker) -> bool {
        self.queue.is_head(id, waker)
    }

    /// Whether ticket `id` is first in line, without registering a waker: for a try that
    /// runs apart from its waiter's future (on another thread), which must not take the
    /// turn of a waiter that became first since the try was started.
    pub fn leads(&self, id: u64) -> bool {
        self.queue.leads(id)
    }

    /// Put a waiter back in line after an attempt that ran away from it (on another
    /// thread, while the waiter's future waited for that thread) ended in
    /// [`Attempt::Wait`]: registers `waker` for ticket `id`, and says whether memory was
    /// released since `since`, the [`SessionGate::generation`] read before that attempt
    /// began. If so, the caller must try again: the release's wake-up may have been spent
    /// on a poll that found the attempt still running.
    ///
    /// The waker goes back first, then the generation is read: a later release either
    /// finds the waker in line or has moved the generation by the time it is read.
    pub fn rejoin(&self, id: u64, waker: &Waker, since: u64) -> bool {
        self.queue.is_head(id, waker);
        self.generation() != since
    }

    /// Leave the line (cancelled, or served and failed). A ticket already removed is
    /// ignored, and does not count as a waiter leaving twice.
    pub fn remove(&self, id: u64) {
        if self.queue.remove(id) {
            self.state.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Leave the line with a session granted: the others of `group` are woken too, as
    /// they may now go ahead of the line if [`SessionGate::may_pass`] lets them (their
    /// working set is the one just made resident).
    pub fn served(&self, id: u64, group: u64) {
        self.remove(id);
        self.queue.wake_group(group);
    }

    /// A session of `group` was granted outside the line and may have made its working
    /// set resident: wake the group's waiters, if anyone waits, as [`SessionGate::served`]
    /// does.
    #[inline]
    pub fn granted(&self, group: u64) {
        if self.state.load(Ordering::Acquire) & WAITERS != 0 {
            self.queue.wake_group(group);
        }
    }

    /// The release generation: it moves on every release, so a caller can tell whether
    /// anything was released since it last looked.
    #[inline]
    pub fn generation(&self) -> u64 {
        (self.state.load(Ordering::Acquire) & GEN_MASK) / GEN
    }

    /// Releases so far, counting the generation's wraps (it has 24 bits, and wraps after
    /// 16 million releases): a clock that orders what happened at releases, such as the
    /// ends of sessions, over any span. Three loads and no read-modify-write. Read in the
    /// few nanoseconds between a wrap and its count, it is 2^24 short; it is meant for
    /// ordering heuristics, not for the waiting protocol.
    pub fn clock(&self) -> u64 {
        loop {
            let wraps = self.wraps.load(Ordering::Acquire);
            let gen = self.generation();
            if self.wraps.load(Ordering::Acquire) == wraps {
                return (wraps << 24) | gen;
            }
        }
    }

    /// Sessions waiting.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Live sessions.
    pub fn live(&self) -> u64 {
        (self.state.load(Ordering::Acquire) & LIVE_MASK) / LIVE
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::queue::tests::{counter, woken};

    #[test]
    fn a_cancelled_pending_free_wakes_a_waiter_that_waited_for_it() {
        let gate = SessionGate::new(Duration::from_secs(1));
        gate.pending_added();
        // Short of memory, nobody live, a free pending: wait for it.
        assert_eq!(gate.attempt(|| Err::<(), ()>(()), |_| true), Attempt::Wait);
        let (count, waker) = counter();
        let id = gate.enqueue(1, 0, &waker).unwrap();
        gate.pending_cancelled();
        assert_eq!(woken(&count), 1, "the waiter sleeps on");
        // Looking again, it finds nothing that will release memory, and fails.
        assert_eq!(
            gate.attempt(|| Err::<(), ()>(()), |_| true),
            Attempt::Done(Err(()))
        );
        gate.remove(id);
    }

    #[test]
    fn a_full_line_refuses_a_waiter_and_still_wakes_its_head() {
        let gate = SessionGate::new(Duration::from_secs(1));
        let (count, waker) = counter();
        let head = gate.enqueue(0, 0, &waker).unwrap();
        for _ in 1..SessionGate::MAX_WAITING {
            gate.enqueue(1, 0, Waker::noop()).unwrap();
        }
        assert_eq!(gate.waiting() as u64, SessionGate::MAX_WAITING);
        // One more would carry into the live count, and hide the waiters from releases.
        assert_eq!(gate.enqueue(1, 0, Waker::noop()), None);
        assert_eq!(gate.waiting() as u64, SessionGate::MAX_WAITING);
        assert_eq!(gate.live(), 0);
        gate.released();
        assert_eq!(woken(&count), 1, "a release did not wake the first in line");
        gate.remove(head);
        assert!(gate.enqueue(1, 0, Waker::noop()).is_some());
    }

    #[test]
    fn a_full_live_count_refuses_a_session_and_waiters_still_wait() {
        let gate = SessionGate::new(Duration::from_secs(1));
        for _ in 0..SessionGate::MAX_LIVE {
            assert!(gate.started());
        }
        // One more would carry into the generation and leave no live session counted.
        assert!(!gate.started());
        assert_eq!(gate.live(), SessionGate::MAX_LIVE);
        assert_eq!(gate.attempt(|| Err::<(), ()>(()), |_| true), Attempt::Wait);
        gate.ended();
        assert!(gate.started());
        for _ in 0..SessionGate::MAX_LIVE {
            gate.ended();
        }
        assert_eq!(gate.live(), 0);
    }

    #[test]
    fn a_ticket_removed_twice_leaves_once() {
        let gate = SessionGate::new(Duration::from_secs(1));
        let id = gate.enqueue(1, 0, Waker::noop()).unwrap();
        gate.remove(id);
        gate.remove(id);
        gate.served(id, 0);
        assert_eq!((gate.live(), gate.waiting()), (0, 0));
        // A release finds no waiter to wake and no live session was invented.
        assert_eq!(
            gate.attempt(|| Err::<(), ()>(()), |_| true),
            Attempt::Done(Err(()))
        );
    }

    #[test]
    fn the_clock_counts_releases_across_the_generations_wrap() {
        let gate = SessionGate::new(Duration::from_secs(1));
        let mut last = gate.clock();
        // Sessions and releases, past the 24-bit generation's wrap.
        let n = (1u64 << 24) + 3;
        for i in 0..n {
            if i % 2 == 0 {
                assert!(gate.started());
                gate.ended();
            } else {
                gate.released();
            }
            if i % 4096 == 0 || i + 8 > n {
                let now = gate.clock();
                assert!(
                    now > last,
                    "the clock went from {last} to {now} at release {i}"
                );
                last = now;
            }
        }
        assert_eq!(gate.clock(), n);
        assert!(gate.generation() < 8, "the generation wrapped");
    }
}
