//! Random admissions and releases: reservations never exceed capacity, and dropping every
//! guard returns to zero.

use gpushare_qos::{AdmissionConfig, AdmissionEvaluator, ContextSpec, Tier};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

proptest! {
    #[test]
    fn reservations_never_exceed_capacity(
        ops in proptest::collection::vec((0u8..4, 1u64..4096, 0u64..4096, 0usize..64), 1..150),
        overcommit in prop_oneof![Just(1.0f64), Just(1.5), Just(3.0)],
    ) {
        let ev = AdmissionEvaluator::new(
            8 << 30,
            AdmissionConfig::default().overcommit(overcommit),
        ).unwrap();
        let mut held = Vec::new();
        for (op, max, base, pick) in ops {
            if op == 0 && !held.is_empty() {
                held.swap_remove(pick % held.len());
            } else {
                let (max, base) = (max * MIB, (base * MIB).min(max * MIB));
                let spec = match op {
                    1 => ContextSpec::new("g", max).tier(Tier::Guaranteed),
                    2 => ContextSpec::new("b", max).base(base),
                    _ => ContextSpec::new("e", max),
                };
                if let Ok(a) = ev.try_admit(&spec) {
                    held.push(a);
                }
            }
            let u = ev.usage();
            let sum: u64 = held.iter().map(|a| a.reservation.reserved()).sum();
            prop_assert_eq!(u.reserved, sum);
            prop_assert!(u.reserved <= u.capacity);
            prop_assert!(u.potential as f64 <= u.capacity as f64 * overcommit + 1.0);
            prop_assert_eq!(u.admitted, held.len());
        }
        held.clear();
        let u = ev.usage();
        prop_assert_eq!((u.reserved, u.potential, u.admitted), (0, 0, 0));
    }
}
