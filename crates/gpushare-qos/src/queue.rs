//! A wait queue served in tier order with aging: what sessions wait in when their buffers
//! do not fit yet.

use crate::sync::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::task::Waker;
use std::time::{Duration, Instant};

struct Waiter {
    rank: u32,
    /// Waiters of one group (a context's sessions) are woken together when one of them is
    /// served: see [`WaitQueue::wake_group`].
    group: u64,
    /// Called when it becomes, or is, first in line and something is released, and when
    /// a waiter of its group is served ([`WaitQueue::wake_group`]).
    waker: Option<Waker>,
}

#[derive(Default)]
struct State {
    next: u64,
    /// Waiters by place in line (see [`WaitQueue`]).
    line: BTreeMap<(u128, u64), Waiter>,
    /// Each ticket's place in `line`.
    places: HashMap<u64, u128>,
    /// When the first in line became first, in nanoseconds from the queue's epoch.
    head_since: u128,
}

impl State {
    /// Take the waker of the first in line, if it has one registered.
    fn head_waker(&mut self) -> Option<Waker> {
        self.line
            .first_entry()
            .and_then(|mut e| e.get_mut().waker.take())
    }
}

/// Waiters ordered by rank (0 first), each rising by one rank per `aging` waited, then by
/// arrival. Only the first in line should try to proceed, so a release wakes only the
/// first in line, and a first in line that leaves wakes the next.
///
/// Every waiter rises at the same rate, so a waiter's place relative to the others never
/// changes once it has joined: a waiter of rank `r` that joined at time `t` stands at
/// `r × aging + t`, whatever the time now. The line is kept sorted by that key, and each
/// operation but [`WaitQueue::wake_group`] is O(log n) in the waiters (a scan of every
/// waiter on every release, each of them woken to look again, was O(n²) per release).
///
/// A waiter must register its waker (through [`WaitQueue::enqueue`] or
/// [`WaitQueue::is_head`]) *before* it checks whether it can proceed: a release that
/// happens after the registration wakes it if it is first in line, and if it is not, the
/// waiter ahead of it wakes it when it leaves.
///
/// Some may go ahead of the first in line for a while: see [`WaitQueue::would_lead`].
pub struct WaitQueue {
    /// One rank of aging.
    aging: Duration,
    /// Times count from here.
    epoch: Instant,
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
    /// An empty queue whose waiters rise one rank per `aging` waited. With an aging of
    /// zero the line is in arrival order and nobody goes ahead of the first in line.
    pub fn new(aging: Duration) -> Self {
        WaitQueue {
            aging,
            epoch: Instant::now(),
            state: Mutex::new(State::default()),
        }
    }

    /// Nanoseconds from the epoch to now.
    fn now(&self) -> u128 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos()
    }

    /// The place of rank `rank` at time `at`. A rank is under 2^32 and a Duration under
    /// 2^94 ns, so this does not overflow; an aging of zero orders by time alone.
    fn place(&self, rank: u32, at: u128) -> u128 {
        u128::from(rank)
            .saturating_mul(self.aging.as_nanos())
            .saturating_add(at)
    }

    /// Join the queue with `rank` and the waker to call on releases; returns the ticket.
    pub fn enqueue(&self, rank: u32, waker: &Waker) -> u64 {
        self.enqueue_in(rank, 0, waker)
    }

    /// [`WaitQueue::enqueue`], in `group` (see [`WaitQueue::wake_group`]).
    pub fn enqueue_in(&self, rank: u32, group: u64, waker: &Waker) -> u64 {
        let mut q = self.state.lock();
        let id = q.next;
        q.next += 1;
        // Read under the lock, so that arrival order and ticket order agree.
        let now = self.now();
        let place = self.place(rank, now);
        q.line.insert(
            (place, id),
            Waiter {
                rank,
                group,
                waker: Some(waker.clone()),
            },
        );
        q.places.insert(id, place);
        if q.line.first_key_value().map(|(&(_, head), _)| head) == Some(id) {
            q.head_since = now;
        }
        id
    }

    /// Register `waker` for ticket `id` and say whether it is first in line.
    pub fn is_head(&self, id: u64, waker: &Waker) -> bool {
        let mut q = self.state.lock();
        let Some(&place) = q.places.get(&id) else {
            return false;
        };
        if let Some(w) = q.line.get_mut(&(place, id)) {
            match &w.waker {
                Some(old) if old.will_wake(waker) => {}
                _ => w.waker = Some(waker.clone()),
            }
        }
        q.line.first_key_value().map(|(&(_, head), _)| head) == Some(id)
    }

    /// Whether ticket `id` is first in line (its waker is left as it is).
    pub fn leads(&self, id: u64) -> bool {
        let q = self.state.lock();
        q.line.first_key_value().map(|(&(_, head), _)| head) == Some(id)
    }

    /// Whether a newcomer of rank `rank` may go ahead of the first in line: true when the
    /// line is empty, or when the newcomer would stand ahead of the first in line if the
    /// newcomer had waited one aging period and the first had joined when it became first.
    /// A tie goes to the first in line.
    ///
    /// So while the first in line has been first for less than one period, newcomers of
    /// its rank go ahead of it; those of a better rank, for one period more per rank;
    /// those of a worse rank, never. Waiters behind it may use the same test: what they
    /// are allowed is what a newcomer of their rank is.
    ///
    /// Counting from when the first became first, not from when it joined, matters when
    /// the line is long: a waiter that spent its wait behind others has not yet waited
    /// for what stops it now, and letting what keeps it waiting (the sessions of a
    /// context that is in place) run for a while saves a switch per session.
    pub fn would_lead(&self, rank: u32) -> bool {
        let q = self.state.lock();
        let Some((_, head)) = q.line.first_key_value() else {
            return true;
        };
        let mine = self
            .place(rank, self.now())
            .saturating_sub(self.aging.as_nanos());
        mine < self.place(head.rank, q.head_since)
    }

    /// Leave the queue (served or cancelled); if it was first in line, the next is woken.
    /// Returns whether the ticket was in line (false for one already removed).
    pub fn remove(&self, id: u64) -> bool {
        let next = {
            let mut q = self.state.lock();
            let Some(place) = q.places.remove(&id) else {
                return false;
            };
            let was_head = q.line.first_key_value().map(|(&k, _)| k) == Some((place, id));
            q.line.remove(&(place, id));
            if was_head {
                q.head_since = self.now();
                q.head_waker()
            } else {
                None
            }
        };
        if let Some(w) = next {
            w.wake();
        }
        true
    }

    /// Something was released: wake the first in line, if it is not awake already.
    pub fn wake_head(&self) {
        let head = self.state.lock().head_waker();
        if let Some(w) = head {
            w.wake();
        }
    }

    /// Wake every waiter of `group` not awake already: one of them was served, and the
    /// others may now go as it did (a context's sessions share its working set). O(n) in
    /// the waiters.
    pub fn wake_group(&self, group: u64) {
        let wakers: Vec<Waker> = self
            .state
            .lock()
            .line
            .values_mut()
            .filter(|w| w.group == group)
            .filter_map(|w| w.waker.take())
            .collect();
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Waiters in the queue.
    pub fn len(&self) -> usize {
        self.state.lock().line.len()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(all(test, not(loom)))]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    /// A waker that counts its wake-ups (the gate's tests use it too).
    pub(crate) struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(crate) fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    pub(crate) fn woken(c: &Count) -> usize {
        c.0.load(Ordering::SeqCst)
    }

    #[test]
    fn leads_tells_the_first_in_line_and_keeps_its_waker() {
        let q = WaitQueue::new(Duration::from_secs(3600));
        let (low, low_w) = counter();
        let a = q.enqueue(2, &low_w);
        assert!(q.leads(a));
        // A better rank comes: it leads now, and the first's waker is still the one woken
        // when it leads again.
        let (_, high_w) = counter();
        let b = q.enqueue(0, &high_w);
        assert!(q.leads(b) && !q.leads(a));
        q.remove(b);
        assert_eq!(woken(&low), 1);
        assert!(q.leads(a));
        q.remove(a);
        assert!(!q.leads(a));
    }

    #[test]
    fn a_release_wakes_the_first_in_line_only_and_a_leaving_head_wakes_the_next() {
        let q = WaitQueue::new(Duration::from_secs(3600));
        let (low, low_w) = counter();
        let (high, high_w) = counter();
        let (mid, mid_w) = counter();
        let a = q.enqueue(2, &low_w);
        let b = q.enqueue(0, &high_w);
        let c = q.enqueue(1, &mid_w);
        assert!(q.is_head(b, &high_w));
        assert!(!q.is_head(a, &low_w));
        assert!(!q.is_head(c, &mid_w));

        q.wake_head();
        assert_eq!((woken(&high), woken(&mid), woken(&low)), (1, 0, 0));
        // Woken and not yet looked again: a second release has nobody new to wake.
        q.wake_head();
        assert_eq!((woken(&high), woken(&mid), woken(&low)), (1, 0, 0));

        // A waiter behind the head leaves: nobody is woken.
        q.remove(a);
        assert_eq!((woken(&high), woken(&mid), woken(&low)), (1, 0, 0));
        // The head leaves: the next in line is woken, and is first.
        q.remove(b);
        assert_eq!(woken(&mid), 1);
        assert!(q.is_head(c, &mid_w));
        q.remove(c);
        assert!(q.is_empty());
        // Unknown and removed tickets are neither first nor an error.
        assert!(!q.is_head(b, &high_w));
        assert!(!q.remove(b));
    }

    #[test]
    fn the_line_is_ordered_by_rank_then_arrival_and_aging_moves_a_waiter_up() {
        let q = WaitQueue::new(Duration::from_millis(1));
        let w = Waker::noop();
        let old = q.enqueue(2, w);
        // Two ranks of aging and more.
        std::thread::sleep(Duration::from_millis(20));
        let fresh = q.enqueue(0, w);
        let later = q.enqueue(0, w);
        assert!(q.is_head(old, w), "the long waiter rose past rank 0");
        q.remove(old);
        assert!(q.is_head(fresh, w), "same rank: arrival order");
        q.remove(fresh);
        assert!(q.is_head(later, w));
    }

    #[test]
    fn a_newcomer_leads_a_waiter_of_its_rank_for_one_aging_period_and_a_better_one_never() {
        let q = WaitQueue::new(Duration::from_millis(50));
        let w = Waker::noop();
        assert!(q.would_lead(2), "nobody waits");
        let best_effort = q.enqueue(2, w);
        assert!(q.would_lead(2), "a waiter of the same rank that just came");
        assert!(q.would_lead(0));
        let guaranteed = q.enqueue(0, w);
        assert!(!q.would_lead(1), "a waiter of a better rank");
        assert!(
            q.would_lead(0),
            "a waiter of its rank that has waited less than a period"
        );
        q.remove(guaranteed);
        // More than one period: a newcomer of the waiter's rank stands behind it, one of a
        // better rank still leads it (until three periods).
        std::thread::sleep(Duration::from_millis(80));
        assert!(!q.would_lead(2));
        assert!(q.would_lead(0));
        q.remove(best_effort);
        assert!(q.would_lead(2));
    }

    #[test]
    fn the_period_counts_from_when_the_first_in_line_became_first() {
        let q = WaitQueue::new(Duration::from_millis(50));
        let w = Waker::noop();
        let first = q.enqueue(1, w);
        let second = q.enqueue(1, w);
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            !q.would_lead(1),
            "the first has been first for over a period"
        );
        q.remove(first);
        assert!(q.is_head(second, w));
        assert!(
            q.would_lead(1),
            "the second waited as long, but has just become first"
        );
    }

    #[test]
    fn serving_one_of_a_group_wakes_the_others_of_it_and_only_them() {
        let q = WaitQueue::new(Duration::from_secs(3600));
        let (a1, a1_w) = counter();
        let (b1, b1_w) = counter();
        let (a2, a2_w) = counter();
        let ids = [
            q.enqueue_in(1, 7, &a1_w),
            q.enqueue_in(1, 8, &b1_w),
            q.enqueue_in(1, 7, &a2_w),
        ];
        q.remove(ids[0]);
        assert_eq!(
            (woken(&a1), woken(&b1), woken(&a2)),
            (0, 1, 0),
            "the next head"
        );
        q.wake_group(7);
        assert_eq!((woken(&a1), woken(&b1), woken(&a2)), (0, 1, 1));
        // Woken and not looked again: nothing more to wake.
        q.wake_group(7);
        assert_eq!(woken(&a2), 1);
    }

    #[test]
    fn a_long_line_drains_in_order() {
        let q = WaitQueue::new(Duration::from_secs(3600));
        let w = Waker::noop();
        let ids: Vec<(u32, u64)> = (0..10_000u32)
            .map(|i| {
                let rank = i % 3;
                (rank, q.enqueue(rank, w))
            })
            .collect();
        let mut expected = ids.clone();
        expected.sort();
        for (_, id) in expected {
            assert!(q.is_head(id, w));
            q.remove(id);
        }
        assert!(q.is_empty());
    }
}
