//! loom models of the wait queue sessions wait in: no lost wake-up between a waiter's check and a
//! release, the first in line goes first, and a waiter behind the first in line is woken when
//! a session of its group is served.
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_wait_queue`.
#![cfg(loom)]

use gpushare_qos::WaitQueue;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Waits in the queue until `free` is set, as a session waits for memory: it registers
/// its waker before it checks, then checks. Served, it takes the next number of `order`
/// (if given) while still in line, and returns it.
struct Wait {
    q: Arc<WaitQueue>,
    free: Arc<AtomicBool>,
    rank: u32,
    id: Option<u64>,
    order: Option<Arc<AtomicUsize>>,
}

impl Future for Wait {
    type Output = usize;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
        let head = match self.id {
            None => {
                let id = self.q.enqueue(self.rank, cx.waker());
                self.id = Some(id);
                self.q.is_head(id, cx.waker())
            }
            Some(id) => self.q.is_head(id, cx.waker()),
        };
        if head && self.free.load(Ordering::SeqCst) {
            let n = self
                .order
                .as_ref()
                .map_or(0, |o| o.fetch_add(1, Ordering::SeqCst));
            if let Some(id) = self.id.take() {
                self.q.remove(id);
            }
            return Poll::Ready(n);
        }
        Poll::Pending
    }
}

#[test]
fn a_release_after_the_check_still_wakes_the_waiter() {
    loom::model(|| {
        let q = Arc::new(WaitQueue::new(Duration::from_secs(3600)));
        let free = Arc::new(AtomicBool::new(false));
        let (q2, f2) = (q.clone(), free.clone());
        let releaser = thread::spawn(move || {
            f2.store(true, Ordering::SeqCst);
            q2.wake_head();
        });
        loom::future::block_on(Wait {
            q: q.clone(),
            free,
            rank: 2,
            id: None,
            order: None,
        });
        releaser.join().unwrap();
        assert!(q.is_empty());
    });
}

#[test]
fn the_first_in_line_goes_first() {
    // Three threads on a lock and a map: unbounded, the model runs for many minutes.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let q = Arc::new(WaitQueue::new(Duration::from_secs(3600)));
        let free = Arc::new(AtomicBool::new(false));
        let order = Arc::new(AtomicUsize::new(0));
        // Both wait before memory comes back: a high-rank waiter joins first, then a
        // low-rank (important) one, which stands ahead of it. Each registers its own waker
        // when first polled. Whatever the interleaving of the two and the release, the
        // important one must finish first: in a line in arrival order it would not.
        let noop = std::task::Waker::noop();
        let later = q.enqueue(2, noop);
        let first = q.enqueue(0, noop);
        let important = {
            let (q, free, order) = (q.clone(), free.clone(), order.clone());
            thread::spawn(move || {
                loom::future::block_on(Wait {
                    q,
                    free,
                    rank: 0,
                    id: Some(first),
                    order: Some(order),
                })
            })
        };
        let (q2, f2) = (q.clone(), free.clone());
        let releaser = thread::spawn(move || {
            f2.store(true, Ordering::SeqCst);
            q2.wake_head();
        });
        let mine = loom::future::block_on(Wait {
            q: q.clone(),
            free,
            rank: 2,
            id: Some(later),
            order: Some(order),
        });
        assert_eq!(
            important.join().unwrap(),
            0,
            "the important waiter went second"
        );
        assert_eq!(mine, 1);
        releaser.join().unwrap();
        assert!(q.is_empty());
    });
}

/// Waits behind the first in line until `resident` is set, as a waiter whose context's
/// working set is being made resident by another session: it registers its waker (through
/// `is_head`), then checks, and leaves the line once it may go.
struct Behind {
    q: Arc<WaitQueue>,
    resident: Arc<AtomicBool>,
    id: u64,
}

impl Future for Behind {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let head = self.q.is_head(self.id, cx.waker());
        assert!(!head, "the first in line never leaves in this model");
        if self.resident.load(Ordering::SeqCst) {
            self.q.remove(self.id);
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[test]
fn a_served_session_wakes_the_other_waiters_of_its_group() {
    loom::model(|| {
        let q = Arc::new(WaitQueue::new(Duration::from_secs(3600)));
        let resident = Arc::new(AtomicBool::new(false));
        // The first in line, of another group, stays for the whole model.
        let head = q.enqueue_in(0, 8, std::task::Waker::noop());
        let id = q.enqueue_in(1, 7, std::task::Waker::noop());
        let (q2, r2) = (q.clone(), resident.clone());
        let server = thread::spawn(move || {
            // A session of group 7 was served: its set is resident; wake the group.
            r2.store(true, Ordering::SeqCst);
            q2.wake_group(7);
        });
        loom::future::block_on(Behind {
            q: q.clone(),
            resident,
            id,
        });
        server.join().unwrap();
        q.remove(head);
        assert!(q.is_empty());
    });
}
