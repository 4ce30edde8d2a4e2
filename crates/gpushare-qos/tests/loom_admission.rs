//! loom models of admission.
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_admission`.
#![cfg(loom)]

use gpushare_qos::{AdmissionConfig, AdmissionEvaluator, ContextSpec};
use loom::thread;

fn eval() -> AdmissionEvaluator {
    AdmissionEvaluator::new(100, AdmissionConfig::default().usable_fraction(1.0)).unwrap()
}

#[test]
fn concurrent_try_admit_and_drop_never_overbook() {
    loom::model(|| {
        let ev = eval();
        let hs: Vec<_> = (0..2)
            .map(|i| {
                let ev = ev.clone();
                thread::spawn(move || {
                    let a = ev.try_admit(&ContextSpec::new(format!("c{i}"), 60).base(60));
                    let u = ev.usage();
                    assert!(u.reserved <= u.capacity);
                    a.is_ok()
                })
            })
            .collect();
        let admitted: usize = hs.into_iter().map(|h| usize::from(h.join().unwrap())).sum();
        // 60 + 60 > 100: at most one fits at a time; both may have fitted one after another.
        assert!(admitted >= 1);
        assert_eq!(ev.usage().reserved, 0);
    });
}

#[test]
fn a_waiter_is_woken_by_a_release() {
    loom::model(|| {
        let ev = eval();
        let first = ev.try_admit(&ContextSpec::new("a", 80).base(80)).unwrap();
        let ev2 = ev.clone();
        let t = thread::spawn(move || {
            let a = loom::future::block_on(ev2.admit(ContextSpec::new("b", 50).base(50)));
            a.unwrap().reservation.reserved()
        });
        drop(first);
        assert_eq!(t.join().unwrap(), 50);
        assert_eq!(ev.usage().reserved, 0);
    });
}
