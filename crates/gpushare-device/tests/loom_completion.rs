//! loom models of the generation counter behind simulated events.
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_completion`.
#![cfg(loom)]

use gpushare_device::sim::Completion;
use loom::sync::Arc;
use loom::thread;

#[test]
fn a_waiter_is_woken_by_completion() {
    loom::model(|| {
        let c = Arc::new(Completion::new());
        let g = c.record_with(|_| Ok::<(), ()>(())).unwrap();
        let c2 = c.clone();
        let t = thread::spawn(move || c2.complete(g));
        c.wait_for(g);
        assert!(c.is_complete());
        t.join().unwrap();
    });
}

#[test]
fn out_of_order_completions_keep_the_latest_record() {
    loom::model(|| {
        let c = Arc::new(Completion::new());
        let g1 = c.record_with(|_| Ok::<(), ()>(())).unwrap();
        let g2 = c.record_with(|_| Ok::<(), ()>(())).unwrap();
        let (a, b) = (c.clone(), c.clone());
        let t1 = thread::spawn(move || a.complete(g1));
        let t2 = thread::spawn(move || b.complete(g2));
        t1.join().unwrap();
        // Only the latest record decides completion, whatever the order.
        t2.join().unwrap();
        assert!(c.is_complete());
        c.wait_for(g1);
    });
}

#[test]
fn completing_an_older_record_alone_is_not_complete() {
    loom::model(|| {
        let c = Arc::new(Completion::new());
        let g1 = c.record_with(|_| Ok::<(), ()>(())).unwrap();
        let _g2 = c.record_with(|_| Ok::<(), ()>(())).unwrap();
        let a = c.clone();
        let t = thread::spawn(move || a.complete(g1));
        t.join().unwrap();
        assert!(!c.is_complete());
    });
}

#[test]
fn a_failed_record_while_racing_a_completion_changes_nothing() {
    loom::model(|| {
        let c = Arc::new(Completion::new());
        let g1 = c.record_with(|_| Ok::<(), ()>(())).unwrap();
        let a = c.clone();
        let t = thread::spawn(move || a.complete(g1));
        assert!(c.record_with(|_| Err::<(), ()>(())).is_err());
        t.join().unwrap();
        assert!(c.is_complete());
        assert_eq!(c.target(), g1);
    });
}

#[test]
fn a_newer_record_completing_does_not_release_a_wait_on_an_older_one() {
    loom::model(|| {
        let c = Arc::new(Completion::new());
        let g1 = c.record_with(|_| Ok::<(), ()>(())).unwrap();
        let g2 = c.record_with(|_| Ok::<(), ()>(())).unwrap();
        let a = c.clone();
        let t = thread::spawn(move || a.complete(g2));
        t.join().unwrap();
        assert!(c.is_complete(), "the latest record is done");
        assert!(
            !c.is_done(g1),
            "a wait captured on the first record still waits"
        );
        let b = c.clone();
        let t = thread::spawn(move || b.complete(g1));
        c.wait_for(g1);
        t.join().unwrap();
    });
}
