//! Unpinning a block whose last users' work may still be queued: until that work is done,
//! the block's memory goes to no other use, through an eviction or a free.

mod common;

use common::{Flag, Recorder};
use gpushare_pool::{HostSource, OwnerSpec, Pool, PoolConfig, PoolError, StreamId, Tier};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const S1: StreamId = StreamId(1);
const S2: StreamId = StreamId(2);
/// Long enough for any machine to get a block evicted that nothing holds back.
const PATIENCE: Duration = Duration::from_secs(60);

fn pool(capacity: u64) -> (Arc<Pool<HostSource>>, Arc<Recorder>) {
    let pool = Pool::new(
        HostSource::new(2 * MIB, 1 << 30),
        PoolConfig::default().capacity(capacity),
    )
    .unwrap();
    let rec = Arc::new(Recorder::default());
    pool.set_evictor(rec.clone());
    (Arc::new(pool), rec)
}

/// A 4 MiB pool whose whole memory is a BestEffort owner's evictable block, unpinned
/// after work on `S1` that completes with `event`; and a second owner to ask for it.
fn one_block_after(
    event: Arc<dyn gpushare_pool::FreeEvent>,
) -> (
    Arc<Pool<HostSource>>,
    Arc<Recorder>,
    gpushare_pool::OwnerId,
    gpushare_pool::EvictableId,
) {
    let (pool, rec) = pool(4 * MIB);
    let a = pool
        .add_owner(OwnerSpec::new("a", 4 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let b = pool.add_owner(OwnerSpec::new("b", 4 * MIB)).unwrap();
    let (id, _) = pool.alloc_evictable(a, 4 * MIB, 7, S1).unwrap();
    pool.unpin_after(&id, S1, event).unwrap();
    (pool, rec, b, id)
}

#[test]
fn an_eviction_waits_for_the_work_of_the_last_unpin() {
    let work = Flag::new();
    let (pool, rec, b, id) = one_block_after(work.clone());

    let (tx, rx) = mpsc::channel();
    let p = pool.clone();
    let t = thread::spawn(move || tx.send(p.alloc(b, 4 * MIB, S2)).unwrap());
    // The only way to serve `b` is to evict `a`'s block, whose work is still queued: the
    // evictor must not see it, nor `b` get its memory, before that work is done.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert!(rec.evicted.lock().unwrap().is_empty());
    assert!(
        pool.is_resident(&id).unwrap(),
        "resident while its move waits"
    );

    work.set();
    let got = rx.recv_timeout(PATIENCE).expect("the eviction ended");
    let block = got.expect("b got the memory once the work was done");
    assert_eq!(rec.evicted.lock().unwrap().len(), 1);
    assert_eq!(pool.stats().evictions, 1);
    t.join().unwrap();
    pool.free(block).unwrap();
    pool.free_evictable(id).unwrap();
}

#[test]
fn a_free_after_an_unpin_with_queued_work_leaves_the_memory_pending() {
    let (pool, _) = pool(2 * MIB);
    let a = pool.add_owner(OwnerSpec::new("a", 2 * MIB)).unwrap();
    let b = pool.add_owner(OwnerSpec::new("b", 2 * MIB)).unwrap();
    let (id, _) = pool.alloc_evictable(a, 2 * MIB, 0, S1).unwrap();
    let work = Flag::new();
    pool.unpin_after(&id, S1, work.clone()).unwrap();
    pool.free_evictable(id).unwrap();
    let s = pool.stats();
    assert_eq!((s.pending_bytes, s.in_use_bytes), (2 * MIB, 0));
    // Another stream may not have it while the work is queued; the owner's own stream may,
    // its later work runs after.
    assert!(matches!(
        pool.alloc(b, 2 * MIB, S2),
        Err(PoolError::OutOfMemory { .. })
    ));
    let again = pool.alloc(a, 2 * MIB, S1).unwrap();
    pool.free_after(again, S1, work.clone()).unwrap();
    work.set();
    let other = pool.alloc(b, 2 * MIB, S2).unwrap();
    pool.free(other).unwrap();
}

#[test]
fn work_on_two_streams_holds_the_memory_until_both_are_done() {
    let (pool, _) = pool(2 * MIB);
    let a = pool.add_owner(OwnerSpec::new("a", 4 * MIB)).unwrap();
    let (id, _) = pool.alloc_evictable(a, 2 * MIB, 0, S1).unwrap();
    pool.pin(&id, S2).unwrap();
    let (w1, w2) = (Flag::new(), Flag::new());
    pool.unpin_after(&id, S1, w1.clone()).unwrap();
    pool.unpin_after(&id, S2, w2.clone()).unwrap();
    pool.free_evictable(id).unwrap();
    // Neither stream may reuse it at once: each would meet the other's work.
    for s in [S1, S2] {
        assert!(pool.alloc(a, 2 * MIB, s).is_err(), "reused on {s:?}");
    }
    w2.set();
    assert!(pool.alloc(a, 2 * MIB, S1).is_err());
    w1.set();
    let b = pool.alloc(a, 2 * MIB, S1).unwrap();
    pool.free(b).unwrap();
}

#[test]
fn a_later_event_on_a_stream_takes_the_place_of_an_earlier_one() {
    let (pool, _) = pool(2 * MIB);
    let a = pool.add_owner(OwnerSpec::new("a", 2 * MIB)).unwrap();
    let (id, _) = pool.alloc_evictable(a, 2 * MIB, 0, S1).unwrap();
    let first = Flag::new();
    pool.unpin_after(&id, S1, first.clone()).unwrap();
    pool.pin(&id, S1).unwrap();
    let second = Flag::new();
    pool.unpin_after(&id, S1, second.clone()).unwrap();
    pool.free_evictable(id).unwrap();
    // One stream's work is pending: that stream may reuse the memory at once.
    let b = pool.alloc(a, 2 * MIB, S1).unwrap();
    pool.free_after(b, S1, second.clone()).unwrap();
    second.set();
    assert_eq!(pool.wait_pending(), 0);
    assert_eq!(pool.stats().pending_bytes, 0);
}

#[test]
fn unpin_after_needs_a_pin() {
    let (pool, _) = pool(2 * MIB);
    let a = pool.add_owner(OwnerSpec::new("a", 2 * MIB)).unwrap();
    let (id, _) = pool.alloc_evictable(a, 2 * MIB, 0, S1).unwrap();
    pool.unpin(&id).unwrap();
    let work = Flag::new();
    assert!(matches!(
        pool.unpin_after(&id, S1, work),
        Err(PoolError::NotPinned)
    ));
    // Nothing was recorded: the free hands the memory back at once.
    pool.free_evictable(id).unwrap();
    assert_eq!(pool.stats().pending_bytes, 0);
}

#[test]
fn memory_whose_work_is_done_reads_as_free_before_any_allocation() {
    let (pool, _) = pool(4 * MIB);
    let a = pool.add_owner(OwnerSpec::new("a", 4 * MIB)).unwrap();
    let (id, _) = pool.alloc_evictable(a, 2 * MIB, 0, S1).unwrap();
    let work = Flag::new();
    pool.unpin_after(&id, S1, work.clone()).unwrap();
    pool.free_evictable(id).unwrap();
    assert_eq!(pool.stats().pending_bytes, 2 * MIB);
    work.set();
    // Nothing allocates in between: the statistics themselves find the work done.
    let s = pool.stats();
    assert_eq!(s.pending_bytes, 0, "{s:?}");
    assert_eq!(s.free_bytes, s.mapped_bytes, "{s:?}");
}

/// Work whose wait returns before it is done, as a failed event synchronization does.
struct Unwaitable(Arc<Flag>);

impl gpushare_pool::FreeEvent for Unwaitable {
    fn is_complete(&self) -> bool {
        self.0.is_complete()
    }
    fn wait(&self) {}
}

#[test]
fn an_eviction_whose_wait_for_the_last_work_fails_keeps_the_block_and_its_last_use() {
    use gpushare_pool::FreeEvent;
    let work = Flag::new();
    let (pool, rec, b, id) = one_block_after(Arc::new(Unwaitable(work.clone())));
    // The eviction's wait comes back with the work still queued: the bytes stay.
    assert!(matches!(
        pool.alloc(b, 4 * MIB, S2),
        Err(PoolError::OutOfMemory { .. })
    ));
    assert!(
        rec.evicted.lock().unwrap().is_empty(),
        "moved out under work"
    );
    assert!(pool.is_resident(&id).unwrap());
    // The last use is still the block's: freed, its memory waits for that work.
    pool.free_evictable(id).unwrap();
    assert_eq!(pool.stats().pending_bytes, 4 * MIB);
    assert!(!work.is_complete());
    work.set();
    let block = pool.alloc(b, 4 * MIB, S2).unwrap();
    pool.free(block).unwrap();
}
