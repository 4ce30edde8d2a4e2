//! loom models of [`TierLock`]: one holder at a time, and a release always reaches a
//! waiter. Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_tier_lock`.
#![cfg(loom)]

use gpushare_qos::TierLock;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use std::time::Duration;

/// Take the lock with `rank`, check that nobody else holds it, and let it go.
fn hold(lock: &TierLock, inside: &AtomicUsize, rank: u32) {
    let guard = loom::future::block_on(lock.acquire(rank));
    assert_eq!(
        inside.fetch_add(1, Ordering::AcqRel),
        0,
        "two holders at once"
    );
    inside.fetch_sub(1, Ordering::AcqRel);
    drop(guard);
}

#[test]
fn two_tiers_take_the_lock_one_at_a_time_and_neither_is_left_waiting() {
    loom::model(|| {
        let lock = Arc::new(TierLock::new(Duration::from_secs(3600)));
        let inside = Arc::new(AtomicUsize::new(0));
        let (l2, i2) = (lock.clone(), inside.clone());
        let other = thread::spawn(move || hold(&l2, &i2, 0));
        hold(&lock, &inside, 2);
        other.join().unwrap();
        assert_eq!(lock.waiting(), 0);
    });
}

#[test]
fn a_release_reaches_both_waiters_in_line() {
    let mut model = loom::model::Builder::new();
    // Three threads: the full search did not end in 5 minutes; three preemptions take
    // about a second, and one covers a release between a waiter's registration and its
    // look at the lock.
    model.preemption_bound = Some(3);
    model.check(|| {
        let lock = Arc::new(TierLock::new(Duration::from_secs(3600)));
        let inside = Arc::new(AtomicUsize::new(0));
        let held = loom::future::block_on(lock.acquire(1));
        let waiters: Vec<_> = [0, 2]
            .into_iter()
            .map(|rank| {
                let (l, i) = (lock.clone(), inside.clone());
                thread::spawn(move || hold(&l, &i, rank))
            })
            .collect();
        drop(held);
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(lock.waiting(), 0);
    });
}
