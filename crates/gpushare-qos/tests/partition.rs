//! Partitions: validation, placement, and realising compute shares as SM splits.

use gpushare_qos::{
    ContextSpec, Isolation, PartitionConfig, PartitionLimits, PartitionManager, QosError,
    SmBackend, SplitError,
};
use std::cell::RefCell;

const GIB: u64 = 1 << 30;

/// A backend that rounds like Hopper (at least 8 SMs, in steps of 8) and remembers calls.
struct Hopper {
    sms: u32,
    calls: RefCell<Vec<Vec<u32>>>,
    unsupported: bool,
    /// Fail the next split, as a driver may.
    fail_next: std::cell::Cell<bool>,
}

impl SmBackend for Hopper {
    fn sm_count(&self) -> u32 {
        self.sms
    }
    fn sm_granularity(&self) -> (u32, u32) {
        (8, 8)
    }
    fn split(&self, counts: &[u32]) -> Result<Vec<u32>, SplitError> {
        self.calls.borrow_mut().push(counts.to_vec());
        if self.fail_next.take() {
            return Err(SplitError::Failed("the driver refused the split".into()));
        }
        if self.unsupported {
            return Err(SplitError::Unsupported(
                "driver 12.2 has no green contexts".into(),
            ));
        }
        let got: Vec<u32> = counts.iter().map(|&c| c.max(8).div_ceil(8) * 8).collect();
        if got.iter().sum::<u32>() > self.sms {
            return Err(SplitError::Failed("not enough SMs".into()));
        }
        Ok(got)
    }
}

fn hopper(unsupported: bool) -> Hopper {
    Hopper {
        sms: 132,
        calls: RefCell::new(vec![]),
        unsupported,
        fail_next: Default::default(),
    }
}

/// Give context `name` a private partition with `share` of the SMs, split, and place it.
fn add_own(m: &mut PartitionManager, hw: &Hopper, name: &str, share: f64) {
    m.create_private_partition(name, PartitionLimits::default().compute(share))
        .unwrap();
    m.realize(hw).unwrap();
    m.place(&ContextSpec::new(name, GIB).resolve().unwrap(), name)
        .unwrap();
}

/// The slot of each named partition's group.
fn slots(m: &PartitionManager, names: &[&str]) -> Vec<Option<usize>> {
    names
        .iter()
        .map(|n| m.partition(n).unwrap().split_slot())
        .collect()
}

fn manager() -> PartitionManager {
    PartitionManager::new(PartitionConfig::new(80 * GIB)).unwrap()
}

#[test]
fn bad_partitions_are_typed() {
    let mut m = manager();
    m.create_partition("a", PartitionLimits::default().compute(0.6))
        .unwrap();
    assert!(matches!(
        m.create_partition("a", PartitionLimits::default()),
        Err(QosError::DuplicatePartition(_))
    ));
    let err = m
        .create_partition("b", PartitionLimits::default().compute(0.5))
        .unwrap_err();
    assert!(
        matches!(&err, QosError::PartitionsOverfull { partition, what: "SMs", .. } if partition == "b"),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"b\""), "{err}");
    for share in [1.5, 1e-12] {
        assert!(matches!(
            m.create_partition("b", PartitionLimits::default().compute(share)),
            Err(QosError::BadShare { .. })
        ));
    }
    assert!(matches!(
        m.create_partition("b", PartitionLimits::default().memory(81 * GIB)),
        Err(QosError::PartitionsOverfull { what: "memory", .. })
    ));
    assert!(matches!(
        m.create_partition("", PartitionLimits::default()),
        Err(QosError::EmptyName)
    ));
    assert!(matches!(
        m.create_partition("z", PartitionLimits::default().memory(0)),
        Err(QosError::ZeroBudget { .. })
    ));
    let ctx = ContextSpec::new("c", GIB).resolve().unwrap();
    assert!(matches!(
        m.place(&ctx, "nope"),
        Err(QosError::UnknownPartition(_))
    ));
    assert!(matches!(
        m.remove_partition("nope"),
        Err(QosError::UnknownPartition(_))
    ));
    assert!(matches!(m.unplace("c"), Err(QosError::NotPlaced(_))));
    assert!(PartitionManager::new(PartitionConfig::new(0)).is_err());
}

#[test]
fn overcommit_allows_shares_above_one() {
    let mut m = PartitionManager::new(PartitionConfig::new(80 * GIB).overcommit(true)).unwrap();
    m.create_partition(
        "a",
        PartitionLimits::default().compute(0.8).memory(60 * GIB),
    )
    .unwrap();
    m.create_partition(
        "b",
        PartitionLimits::default().compute(0.8).memory(60 * GIB),
    )
    .unwrap();
}

#[test]
fn contexts_are_placed_within_memory_limits() {
    let mut m = manager();
    m.create_partition("serving", PartitionLimits::default().memory(10 * GIB))
        .unwrap();
    m.create_partition("open", PartitionLimits::default())
        .unwrap();
    let llm = ContextSpec::new("llm", 8 * GIB)
        .base(8 * GIB)
        .resolve()
        .unwrap();
    let tts = ContextSpec::new("tts", 6 * GIB)
        .base(3 * GIB)
        .resolve()
        .unwrap();
    m.place(&llm, "serving").unwrap();
    match m.place(&tts, "serving") {
        Err(QosError::PartitionFull { reserve, free, .. }) => {
            assert_eq!((reserve, free), (3 * GIB, 2 * GIB))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        m.place(&llm, "open"),
        Err(QosError::AlreadyPlaced(_))
    ));
    // An unset limit stays unset: any reservation fits, and nothing became the whole GPU.
    m.place(&tts, "open").unwrap();
    assert_eq!(m.partition("open").unwrap().limits().memory, None);
    assert_eq!(m.partition("serving").unwrap().reserved(), 8 * GIB);
    assert!(matches!(
        m.remove_partition("serving"),
        Err(QosError::PartitionBusy { contexts: 1, .. })
    ));
    m.unplace("llm").unwrap();
    m.remove_partition("serving").unwrap();
}

#[test]
fn compute_shares_become_sm_splits() {
    let mut m = manager();
    m.create_partition("victim", PartitionLimits::default().compute(0.12))
        .unwrap();
    m.create_partition("rest", PartitionLimits::default().compute(0.88))
        .unwrap();
    m.create_partition("mem-only", PartitionLimits::default().memory(GIB))
        .unwrap();
    assert_eq!(
        m.partition("victim").unwrap().isolation(),
        &Isolation::Pending
    );
    assert_eq!(
        m.partition("mem-only").unwrap().isolation(),
        &Isolation::None
    );
    let b = hopper(false);
    m.realize(&b).unwrap();
    // 0.12 x 132 = 15.8 -> 16; 0.88 x 132 = 116.2 -> 120, trimmed to 112 to fit 132.
    assert_eq!(b.calls.borrow()[0], vec![16, 112]);
    assert_eq!(
        m.partition("victim").unwrap().isolation(),
        &Isolation::SmPartition {
            requested: 16,
            granted: 16
        }
    );
    assert_eq!(
        m.partition("rest").unwrap().isolation(),
        &Isolation::SmPartition {
            requested: 120,
            granted: 112
        }
    );
    assert_eq!(
        m.sm_plan(132, 1, 1),
        vec![("victim".to_string(), 16), ("rest".to_string(), 116)]
    );
    assert_eq!(
        m.partition("mem-only").unwrap().isolation(),
        &Isolation::None
    );
}

#[test]
fn without_green_contexts_partitions_fall_back_to_priorities() {
    let mut m = manager();
    m.create_partition("victim", PartitionLimits::default().compute(0.1))
        .unwrap();
    m.realize(&hopper(true)).unwrap();
    match m.partition("victim").unwrap().isolation() {
        Isolation::StreamPriority { reason } => assert!(reason.contains("green")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_split_is_an_error() {
    // 20 partitions of 5% each: at least 8 SMs apiece is 160 SMs, more than 132.
    let mut m = manager();
    for i in 0..20 {
        m.create_partition(&format!("p{i}"), PartitionLimits::default().compute(0.05))
            .unwrap();
    }
    assert!(matches!(
        m.realize(&hopper(false)),
        Err(QosError::BadConfig { .. })
    ));
}

#[test]
fn more_compute_partitions_than_minimum_groups_fit_are_refused_with_the_reason() {
    let mut m = manager();
    // 17 shares of 0.05 add up to 0.85, but each takes a group of at least 8 SMs: 136 > 132.
    for i in 0..17 {
        m.create_partition(&format!("p{i}"), PartitionLimits::default().compute(0.05))
            .unwrap();
    }
    let backend = hopper(false);
    match m.realize(&backend) {
        Err(QosError::BadConfig { value, .. }) => {
            assert!(value.contains("136") && value.contains("132"), "{value}")
        }
        other => panic!("{other:?}"),
    }
    // Without green contexts the same partitions fall back to priorities.
    m.realize(&hopper(true)).unwrap();
}

#[test]
fn a_partition_in_use_keeps_its_group_when_a_share_is_added() {
    let hw = hopper(false);
    let mut m = manager();
    add_own(&mut m, &hw, "a", 0.53);
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![72]);
    // Alone, 0.47 of 132 SMs rounds to 64, and 72 + 64 do not fit: the new share gets what
    // the group in use leaves, and the group in use stays as it is.
    m.create_private_partition("b", PartitionLimits::default().compute(0.47))
        .unwrap();
    m.realize(&hw).unwrap();
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![72, 56]);
    assert_eq!(
        m.partition("a").unwrap().isolation(),
        &Isolation::SmPartition {
            requested: 72,
            granted: 72
        }
    );
}

#[test]
fn a_group_removed_ahead_of_one_in_use_is_held_vacant_and_reused() {
    let hw = hopper(false);
    let mut m = manager();
    add_own(&mut m, &hw, "a", 0.3);
    add_own(&mut m, &hw, "b", 0.3);
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![40, 40]);
    // `a` goes; `b`'s streams still run on SMs 40..80, so `a`'s group stays, vacant.
    m.unplace("a").unwrap();
    m.remove_partition("a").unwrap();
    assert!(m.partition("a").is_none());
    assert_eq!(m.partitions().count(), 1);
    // A share too large for the vacancy goes after `b`, trimmed to what is left, and says
    // so.
    add_own(&mut m, &hw, "c", 0.5);
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![40, 40, 48]);
    assert_eq!(
        m.partition("c").unwrap().isolation(),
        &Isolation::SmPartition {
            requested: 64,
            granted: 48
        }
    );
    // One that fits takes the vacancy's first SMs; the rest stays vacant.
    add_own(&mut m, &hw, "d", 0.2);
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![24, 16, 40, 48]);
    assert_eq!(
        m.sm_plan(132, 8, 8),
        [
            ("d".to_string(), 24),
            ("b".to_string(), 40),
            ("c".to_string(), 48)
        ]
    );
    assert_eq!(slots(&m, &["d", "b", "c"]), [Some(0), Some(2), Some(3)]);
    // Once no group after it is in use, a vacancy goes at the next split.
    for n in ["b", "c", "d"] {
        m.unplace(n).unwrap();
        m.remove_partition(n).unwrap();
    }
    m.create_private_partition("e", PartitionLimits::default().compute(0.3))
        .unwrap();
    m.realize(&hw).unwrap();
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![40]);
    assert_eq!(m.partition("e").unwrap().split_slot(), Some(0));
}

#[test]
fn a_share_moved_into_a_vacancy_is_not_trimmed_under_a_group_in_use() {
    let hw = hopper(false);
    let mut m = PartitionManager::new(PartitionConfig::new(64 * GIB)).unwrap();
    m.create_partition("a", PartitionLimits::default().compute(0.4))
        .unwrap();
    m.create_partition("b", PartitionLimits::default().compute(0.3))
        .unwrap();
    m.realize(&hw).unwrap();
    m.place(&ContextSpec::new("x", GIB).resolve().unwrap(), "b")
        .unwrap();
    m.remove_partition("a").unwrap();
    // "c" takes the 56 SMs "a" left; "b" keeps its 40 in place; "d" gets what is left
    // (40 wanted, 32 free). Trimming "c" instead would move "b"'s group.
    m.create_partition("c", PartitionLimits::default().compute(0.4))
        .unwrap();
    m.create_partition("d", PartitionLimits::default().compute(0.3))
        .unwrap();
    m.realize(&hw).unwrap();
    assert_eq!(
        m.sm_plan(132, 8, 8),
        [
            ("c".to_string(), 56),
            ("b".to_string(), 40),
            ("d".to_string(), 32)
        ]
    );
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![56, 40, 32]);
}

#[test]
fn two_shares_split_for_at_once_each_take_a_vacancy() {
    let hw = hopper(false);
    let mut m = manager();
    for n in ["a", "b", "c"] {
        add_own(&mut m, &hw, n, 0.3);
    }
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![40, 40, 40]);
    // `a` and `b` go; `c` still runs on SMs 80..120, so theirs stay, vacant.
    for n in ["a", "b"] {
        m.unplace(n).unwrap();
        m.remove_partition(n).unwrap();
    }
    // Two shares that fit them, split for together: each takes one.
    for n in ["e", "f"] {
        m.create_private_partition(n, PartitionLimits::default().compute(0.3))
            .unwrap();
    }
    m.realize(&hw).unwrap();
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![40, 40, 40]);
    assert_eq!(slots(&m, &["e", "f", "c"]), [Some(0), Some(1), Some(2)]);
}

#[test]
fn no_other_context_joins_a_private_partition() {
    let mut m = manager();
    m.create_private_partition("p", PartitionLimits::default().compute(0.5))
        .unwrap();
    let q = ContextSpec::new("q", GIB).resolve().unwrap();
    assert!(matches!(
        m.place(&q, "p"),
        Err(QosError::PrivatePartition { ref partition, ref context }) if partition == "p" && context == "q"
    ));
    m.place(&ContextSpec::new("p", GIB).resolve().unwrap(), "p")
        .unwrap();
    m.unplace("p").unwrap();
    m.remove_partition("p").unwrap();
}

#[test]
fn groups_ahead_of_one_in_use_stay_even_when_idle() {
    let hw = hopper(false);
    let mut m = manager();
    m.create_partition("d", PartitionLimits::default().compute(0.53))
        .unwrap();
    m.create_private_partition("x", PartitionLimits::default().compute(0.03))
        .unwrap();
    m.realize(&hw).unwrap();
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![72, 8]);
    m.place(&ContextSpec::new("x", GIB).resolve().unwrap(), "x")
        .unwrap();
    // `d` is idle, but shrinking it would move `x`'s group: the new share is trimmed.
    m.create_private_partition("y", PartitionLimits::default().compute(0.44))
        .unwrap();
    m.realize(&hw).unwrap();
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![72, 8, 48]);
    assert_eq!(slots(&m, &["d", "x", "y"]), [Some(0), Some(1), Some(2)]);
}

#[test]
fn a_partitions_group_is_found_by_its_slot_after_one_ahead_goes() {
    let hw = hopper(false);
    let mut m = manager();
    m.create_private_partition("a", PartitionLimits::default().compute(0.3))
        .unwrap();
    m.create_partition("p", PartitionLimits::default().compute(0.3))
        .unwrap();
    m.realize(&hw).unwrap();
    m.remove_partition("a").unwrap();
    // `p` is now the first partition with a compute share, but its group is still the
    // second of the split.
    assert_eq!(m.partition("p").unwrap().split_slot(), Some(1));
}

#[test]
fn a_failed_split_leaves_the_partitions_as_they_were() {
    let hw = hopper(false);
    let mut m = manager();
    add_own(&mut m, &hw, "a", 0.3);
    add_own(&mut m, &hw, "b", 0.3);
    m.unplace("a").unwrap();
    m.remove_partition("a").unwrap();
    // A share that fits `a`'s vacancy, whose split fails: it is taken out again, as a
    // context's creation does on failure.
    m.create_private_partition("c", PartitionLimits::default().compute(0.2))
        .unwrap();
    hw.fail_next.set(true);
    assert!(m.realize(&hw).is_err());
    m.remove_partition("c").unwrap();
    // The vacancy is whole again, so the next share still fits it.
    add_own(&mut m, &hw, "d", 0.2);
    assert_eq!(hw.calls.borrow().last().unwrap(), &vec![24, 16, 40]);
}
