//! Specs, atomic admission, and waiting in tier order.

use gpushare_qos::{AdmissionConfig, AdmissionEvaluator, ContextSpec, QosError, Rejection, Tier};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

const GIB: u64 = 1 << 30;

fn eval(total: u64) -> AdmissionEvaluator {
    AdmissionEvaluator::new(total, AdmissionConfig::default().usable_fraction(1.0)).unwrap()
}

/// A waker that counts its wake-ups.
#[derive(Default)]
struct Count(AtomicUsize);
impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn poll<F: Future + Unpin>(f: &mut F, w: &Arc<Count>) -> Poll<F::Output> {
    let waker = Waker::from(w.clone());
    Pin::new(f).poll(&mut Context::from_waker(&waker))
}

#[test]
fn tiers_follow_from_budgets() {
    let t = |s: ContextSpec| s.resolve().map(|r| (r.tier, r.reserve));
    assert_eq!(t(ContextSpec::new("a", 8)), Ok((Tier::BestEffort, 0)));
    assert_eq!(
        t(ContextSpec::new("a", 8).base(8)),
        Ok((Tier::Guaranteed, 8))
    );
    assert_eq!(
        t(ContextSpec::new("a", 8).base(3)),
        Ok((Tier::Burstable, 3))
    );
    assert_eq!(
        t(ContextSpec::new("a", 8).tier(Tier::Guaranteed)),
        Ok((Tier::Guaranteed, 8))
    );
    assert_eq!(
        t(ContextSpec::new("a", 8).base(0)),
        Ok((Tier::BestEffort, 0))
    );
    assert_eq!(
        t(ContextSpec::new("a", 8).base(3).tier(Tier::Burstable)),
        Ok((Tier::Burstable, 3))
    );
}

#[test]
fn bad_specs_are_typed() {
    let e = |s: ContextSpec| s.resolve().unwrap_err();
    assert!(matches!(
        e(ContextSpec::new("a", 0)),
        QosError::ZeroBudget { .. }
    ));
    assert!(matches!(e(ContextSpec::new("", 8)), QosError::EmptyName));
    assert!(matches!(
        e(ContextSpec::new("a", 8).base(9)),
        QosError::BaseAboveMax {
            base: 9,
            max: 8,
            ..
        }
    ));
    for s in [
        ContextSpec::new("a", 8).base(3).tier(Tier::Guaranteed),
        ContextSpec::new("a", 8).tier(Tier::Burstable),
        ContextSpec::new("a", 8).base(8).tier(Tier::Burstable),
        ContextSpec::new("a", 8).base(3).tier(Tier::BestEffort),
        // A named partition's contexts run on its SMs: a share of their own would be
        // dropped (and counted by admission all the same).
        ContextSpec::new("a", 8).partition("p").compute(0.5),
    ] {
        assert!(matches!(e(s), QosError::Contradiction { .. }));
    }
    // Below one part per billion a share would count as none in admission, yet get an SM
    // partition of its own.
    for share in [0.0, -0.1, 1.5, f64::NAN, 1e-12, 4e-10] {
        assert!(matches!(
            e(ContextSpec::new("a", 8).compute(share)),
            QosError::BadShare { .. }
        ));
    }
    assert!(matches!(
        e(ContextSpec::new("a", 8).bandwidth(2.0)),
        QosError::BadShare { .. }
    ));
    for cfg in [
        AdmissionConfig::default().usable_fraction(0.0),
        AdmissionConfig::default().usable_fraction(1.5),
        AdmissionConfig::default().overcommit(0.5),
        AdmissionConfig::default().aging(Duration::ZERO),
        AdmissionConfig::default().usable_limit(0),
    ] {
        assert!(AdmissionEvaluator::new(GIB, cfg).is_err());
    }
    assert!(AdmissionEvaluator::new(0, AdmissionConfig::default()).is_err());
    // A limit caps what the fraction gives, and only that.
    let capped = AdmissionConfig::default()
        .usable_fraction(0.5)
        .usable_limit(GIB);
    assert_eq!(
        AdmissionEvaluator::new(8 * GIB, capped.clone())
            .unwrap()
            .capacity(),
        GIB
    );
    assert_eq!(
        AdmissionEvaluator::new(GIB, capped).unwrap().capacity(),
        GIB / 2
    );
}

#[test]
fn admission_reserves_atomically_and_releases_on_drop() {
    let ev = eval(10 * GIB);
    let g = ev
        .try_admit(&ContextSpec::new("llm", 6 * GIB).base(6 * GIB))
        .unwrap();
    assert_eq!(g.priority.tier, Tier::Guaranteed);
    assert_eq!(g.reservation.reserved(), 6 * GIB);
    let b = ev
        .try_admit(&ContextSpec::new("tts", 4 * GIB).base(2 * GIB))
        .unwrap();
    assert_eq!(b.priority.stream_priority(-5, 0), -3);
    match ev.try_admit(&ContextSpec::new("x", 3 * GIB).base(3 * GIB)) {
        Err(Rejection::Memory {
            requested,
            free,
            capacity,
            ..
        }) => {
            assert_eq!((requested, free, capacity), (3 * GIB, 2 * GIB, 10 * GIB));
        }
        other => panic!("{other:?}"),
    }
    // Without overcommit the sum of maxima may not exceed capacity.
    match ev.try_admit(&ContextSpec::new("vision", GIB)) {
        Err(Rejection::Overcommit {
            potential, allowed, ..
        }) => {
            assert_eq!((potential, allowed), (11 * GIB, 10 * GIB));
        }
        other => panic!("{other:?}"),
    }
    drop(b);
    let u = ev.usage();
    assert_eq!((u.reserved, u.potential, u.admitted), (6 * GIB, 6 * GIB, 1));
    drop(g);
    assert_eq!(ev.usage().reserved, 0);
}

#[test]
fn overcommit_lets_best_effort_promise_more() {
    let ev = AdmissionEvaluator::new(
        10 * GIB,
        AdmissionConfig::default()
            .usable_fraction(1.0)
            .overcommit(1.5),
    )
    .unwrap();
    let _g = ev
        .try_admit(&ContextSpec::new("llm", 8 * GIB).base(8 * GIB))
        .unwrap();
    let be = ev.try_admit(&ContextSpec::new("vision", 6 * GIB)).unwrap();
    assert_eq!(be.priority.tier, Tier::BestEffort);
    assert_eq!(be.priority.stream_priority(-5, 0), 0);
    assert!(ev.try_admit(&ContextSpec::new("more", 2 * GIB)).is_err());
}

#[test]
fn shares_add_up_to_at_most_one() {
    let ev = eval(10 * GIB);
    let _a = ev
        .try_admit(&ContextSpec::new("a", GIB).compute(0.75))
        .unwrap();
    assert!(matches!(
        ev.try_admit(&ContextSpec::new("b", GIB).compute(0.5)),
        Err(Rejection::Share {
            what: "compute",
            ..
        })
    ));
    let _b = ev
        .try_admit(&ContextSpec::new("b", GIB).compute(0.25).bandwidth(1.0))
        .unwrap();
}

#[test]
fn shares_given_back_leave_nothing_behind() {
    let ev = eval(10 * GIB);
    // Thirds add up to one.
    let thirds: Vec<_> = (0..3)
        .map(|i| {
            ev.try_admit(&ContextSpec::new(format!("t{i}"), GIB).compute(1.0 / 3.0))
                .unwrap()
        })
        .collect();
    drop(thirds);
    // What is given back is exactly what was taken, however many times.
    for _ in 0..1000 {
        let a = ev
            .try_admit(&ContextSpec::new("a", GIB).compute(0.1).bandwidth(0.7))
            .unwrap();
        let b = ev
            .try_admit(&ContextSpec::new("b", GIB).compute(0.2).bandwidth(0.3))
            .unwrap();
        drop((a, b));
    }
    let u = ev.usage();
    assert_eq!((u.compute, u.bandwidth, u.admitted), (0.0, 0.0, 0));
}

#[test]
fn a_waiter_is_admitted_when_memory_is_released() {
    let ev = eval(10 * GIB);
    let first = ev
        .try_admit(&ContextSpec::new("a", 8 * GIB).base(8 * GIB))
        .unwrap();
    let w = Arc::new(Count::default());
    let mut f = ev.admit(ContextSpec::new("b", 4 * GIB).base(4 * GIB));
    assert!(poll(&mut f, &w).is_pending());
    assert_eq!(ev.usage().waiting, 1);
    drop(first);
    assert_eq!(w.0.load(Ordering::SeqCst), 1, "the release woke the waiter");
    let a = match poll(&mut f, &w) {
        Poll::Ready(Ok(a)) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!(a.reservation.reserved(), 4 * GIB);
    assert_eq!(ev.usage().waiting, 0);
    assert_eq!(
        ev.usage().reserved,
        4 * GIB,
        "the admission holds until dropped"
    );
    assert!(matches!(
        poll(&mut f, &w),
        Poll::Ready(Err(Rejection::Finished))
    ));
}

#[test]
fn waiters_are_served_in_tier_order() {
    let ev = eval(10 * GIB);
    let hog = ev
        .try_admit(&ContextSpec::new("hog", 10 * GIB).base(10 * GIB))
        .unwrap();
    let (wb, wg) = (Arc::new(Count::default()), Arc::new(Count::default()));
    let mut be = ev.admit(ContextSpec::new("be", 6 * GIB));
    let mut g = ev.admit(ContextSpec::new("g", 6 * GIB).base(6 * GIB));
    assert!(poll(&mut be, &wb).is_pending());
    assert!(poll(&mut g, &wg).is_pending());
    // A BestEffort try_admit may not overtake the queue.
    assert!(matches!(
        ev.try_admit(&ContextSpec::new("late", GIB)),
        Err(Rejection::QueuedAhead { .. })
    ));
    drop(hog);
    // Only one fits; the Guaranteed one came second but goes first.
    let got = poll(&mut g, &wg);
    assert!(matches!(got, Poll::Ready(Ok(_))));
    assert!(poll(&mut be, &wb).is_pending());
    drop(got);
    assert!(
        matches!(poll(&mut be, &wb), Poll::Ready(Ok(_))),
        "then the next in line"
    );
}

#[test]
fn aging_lets_a_long_waiter_go_first() {
    let ev = AdmissionEvaluator::new(
        10 * GIB,
        AdmissionConfig::default()
            .usable_fraction(1.0)
            .aging(Duration::from_millis(10)),
    )
    .unwrap();
    let hog = ev
        .try_admit(&ContextSpec::new("hog", 10 * GIB).base(10 * GIB))
        .unwrap();
    let w = Arc::new(Count::default());
    let mut be = ev.admit(ContextSpec::new("be", 6 * GIB));
    assert!(poll(&mut be, &w).is_pending());
    // Two tiers' worth of aging and more: BestEffort now outranks a fresh Guaranteed.
    std::thread::sleep(Duration::from_millis(50));
    let mut g = ev.admit(ContextSpec::new("g", 6 * GIB).base(6 * GIB));
    assert!(poll(&mut g, &w).is_pending());
    drop(hog);
    let got = poll(&mut be, &w);
    assert!(matches!(got, Poll::Ready(Ok(_))));
    assert!(poll(&mut g, &w).is_pending());
}

#[test]
fn dropping_the_future_leaves_nothing_reserved() {
    let ev = eval(10 * GIB);
    let hog = ev
        .try_admit(&ContextSpec::new("hog", 8 * GIB).base(8 * GIB))
        .unwrap();
    let w = Arc::new(Count::default());
    // Dropped while waiting.
    let mut a = ev.admit(ContextSpec::new("a", 4 * GIB).base(4 * GIB));
    assert!(poll(&mut a, &w).is_pending());
    drop(a);
    assert_eq!(ev.usage().waiting, 0);
    // Dropped after being granted but before being polled again.
    let mut b = ev.admit(ContextSpec::new("b", 4 * GIB).base(4 * GIB));
    assert!(poll(&mut b, &w).is_pending());
    drop(hog);
    assert_eq!(ev.usage().reserved, 4 * GIB, "granted to the waiter");
    drop(b);
    let u = ev.usage();
    assert_eq!((u.reserved, u.admitted, u.waiting), (0, 0, 0));
}

#[test]
fn a_request_that_can_never_fit_fails_at_once() {
    let ev = eval(10 * GIB);
    let w = Arc::new(Count::default());
    let mut f = ev.admit(ContextSpec::new("huge", 11 * GIB).base(11 * GIB));
    match poll(&mut f, &w) {
        Poll::Ready(Err(e @ Rejection::NeverFits { .. })) => {
            assert!(e.is_permanent(), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("11811160064 B") && !msg.contains("wait"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut bad = ev.admit(ContextSpec::new("bad", 0));
    assert!(matches!(
        poll(&mut bad, &w),
        Poll::Ready(Err(Rejection::Invalid(_)))
    ));
}

#[test]
fn many_threads_admit_and_release() {
    let ev = eval(64 * GIB);
    std::thread::scope(|s| {
        for t in 0..8 {
            let ev = ev.clone();
            s.spawn(move || {
                for i in 0..500 {
                    let spec = ContextSpec::new(format!("c{t}-{i}"), (1 + i % 7) * GIB).base(GIB);
                    if let Ok(a) = ev.try_admit(&spec) {
                        let u = ev.usage();
                        assert!(u.reserved <= u.capacity && u.potential <= u.capacity);
                        drop(a);
                    }
                }
            });
        }
    });
    let u = ev.usage();
    assert_eq!((u.reserved, u.potential, u.admitted), (0, 0, 0));
}

#[test]
fn try_admit_respects_aged_waiters() {
    let ev = AdmissionEvaluator::new(
        10 * GIB,
        AdmissionConfig::default()
            .usable_fraction(1.0)
            // Long enough that a thread descheduled between the calls below does not see
            // the waiter age (on a loaded CI machine 10 ms was not).
            .aging(Duration::from_millis(500)),
    )
    .unwrap();
    let hog = ev
        .try_admit(&ContextSpec::new("hog", 9 * GIB).base(9 * GIB))
        .unwrap();
    let w = Arc::new(Count::default());
    let mut be = ev.admit(ContextSpec::new("be", 5 * GIB));
    assert!(poll(&mut be, &w).is_pending());
    // A fresh Burstable request outranks the BestEffort waiter at first...
    let first = ev
        .try_admit(&ContextSpec::new("b1", GIB).base(GIB / 2))
        .unwrap();
    drop(first);
    // ...but not once the waiter has aged past it.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(matches!(
        ev.try_admit(&ContextSpec::new("b2", GIB).base(GIB / 2)),
        Err(Rejection::QueuedAhead { .. })
    ));
    drop(hog);
}

#[test]
fn huge_budgets_are_refused_not_wrapped() {
    // An overcommit so large that the allowed sum saturates: two maxima whose sum
    // overflows must be refused, not wrap to a small number that lets everything in.
    let ev = AdmissionEvaluator::new(
        10 * GIB,
        AdmissionConfig::default()
            .usable_fraction(1.0)
            .overcommit(1e12),
    )
    .unwrap();
    let _a = ev.try_admit(&ContextSpec::new("a", u64::MAX)).unwrap();
    assert!(matches!(
        ev.try_admit(&ContextSpec::new("b", 1)),
        Err(Rejection::Overcommit { .. })
    ));
}

#[test]
fn stream_priorities_never_overflow() {
    let p = gpushare_qos::Priority {
        tier: Tier::Burstable,
    };
    assert_eq!(p.stream_priority(i32::MIN, i32::MAX), -1);
    assert_eq!(p.stream_priority(-5, 0), -3);
}

#[test]
fn a_waiter_that_a_kept_reservation_leaves_no_chance_fails_and_frees_the_line() {
    let e = eval(10 * GIB);
    let w = Arc::new(Count::default());
    let mut stuck = e
        .try_admit(&ContextSpec::new("stuck", 6 * GIB).base(6 * GIB))
        .unwrap();
    // Waits for the 6 GiB to come back, and a small one waits behind it.
    let mut big = e.admit(ContextSpec::new("big", 6 * GIB).base(6 * GIB));
    assert!(poll(&mut big, &w).is_pending());
    let mut small = e.admit(ContextSpec::new("small", 2 * GIB).base(GIB));
    assert!(poll(&mut small, &w).is_pending(), "behind the first waiter");
    // The memory is kept for good: the first waiter can never fit.
    stuck.reservation.keep_after_drop();
    drop(stuck);
    match poll(&mut big, &w) {
        Poll::Ready(Err(r)) => assert!(r.is_permanent(), "{r}"),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(poll(&mut small, &w), Poll::Ready(Ok(_))),
        "the line stayed blocked"
    );
}

#[test]
fn a_kept_reservation_stays_taken_after_its_drop() {
    let e = eval(10 * GIB);
    let spec = ContextSpec::new("stuck", 6 * GIB)
        .base(6 * GIB)
        .compute(0.6);
    let mut a = e.try_admit(&spec).unwrap();
    a.reservation.keep_after_drop();
    drop(a);
    // Its memory is still counted: a second context of that size does not fit, and never
    // will (waiting in `admit` would be for ever).
    match e.try_admit(&ContextSpec::new("next", 6 * GIB).base(6 * GIB)) {
        Err(r) => {
            assert!(r.is_permanent(), "{r}");
            assert!(r.to_string().contains("kept"), "{r}");
        }
        Ok(_) => panic!("the kept memory was handed out"),
    }
    // Its compute share is given back.
    drop(
        e.try_admit(&ContextSpec::new("compute", GIB).compute(0.6))
            .unwrap(),
    );
    // An ordinary reservation is given back on drop.
    drop(
        e.try_admit(&ContextSpec::new("small", 4 * GIB).base(4 * GIB))
            .unwrap(),
    );
    e.try_admit(&ContextSpec::new("again", 4 * GIB).base(4 * GIB))
        .unwrap();
}
