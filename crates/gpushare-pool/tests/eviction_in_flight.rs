//! Evictions whose bytes move while the pool's lock is free: other requests go on, pins of
//! the victim wait for the outcome, a free of it returns at once and leaves it to the move's
//! end, and a failed or panicking move leaves the block where it was.

mod common;

use gpushare_pool::{
    Block, EvictError, EvictableId, EvictableKey, Eviction, Evictor, HostSource, OwnerId,
    OwnerSpec, Pool, PoolConfig, PoolError, RestoreInfo, StreamId, Tier, VictimInfo,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const S1: StreamId = StreamId(1);
/// Long enough for any machine; reached only when the pool holds its lock across a move.
const PATIENCE: Duration = Duration::from_secs(60);

/// How the gated evictor's moves end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Fail,
    Panic,
    /// The move ends well, but the evictor panics when told of a block freed during it.
    PanicWhenTold,
}

/// An evictor whose moves out end only when the test opens its gate.
struct Gated {
    outcome: Outcome,
    open: Arc<(Mutex<bool>, Condvar)>,
    started: Mutex<mpsc::Sender<u64>>,
    finished: Arc<AtomicUsize>,
    /// Restores wait for this gate (open unless a test closes it).
    restores_open: Arc<(Mutex<bool>, Condvar)>,
    /// Blocks the pool said were freed during their moves, with the bytes the pool had in
    /// use when it said so (read from the pool: the hook runs without its lock).
    freed: Arc<Mutex<Vec<(EvictableKey, u64)>>>,
    pool: Arc<std::sync::OnceLock<std::sync::Weak<Pool<HostSource>>>>,
}

fn wait_open(gate: &(Mutex<bool>, Condvar)) {
    let (lock, cv) = gate;
    let mut o = lock.lock().unwrap();
    while !*o {
        o = cv.wait(o).unwrap();
    }
}

fn open(gate: &(Mutex<bool>, Condvar)) {
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
}

impl Evictor for Gated {
    fn evict(&self, v: &VictimInfo) -> Result<Eviction, EvictError> {
        self.started.lock().unwrap().send(v.tag).unwrap();
        let (open, outcome, finished) = (self.open.clone(), self.outcome, self.finished.clone());
        Ok(Eviction::in_flight(move || {
            wait_open(&open);
            finished.fetch_add(1, Ordering::SeqCst);
            match outcome {
                Outcome::Ok | Outcome::PanicWhenTold => Ok(()),
                Outcome::Fail => Err(EvictError("the copy out failed".into())),
                Outcome::Panic => panic!("the copy engine caught fire"),
            }
        }))
    }
    fn restore(&self, r: &RestoreInfo) -> Result<(), EvictError> {
        self.started.lock().unwrap().send(1000 + r.tag).unwrap();
        wait_open(&self.restores_open);
        Ok(())
    }
    fn freed_while_moving(&self, id: EvictableKey) {
        let in_use = self
            .pool
            .get()
            .and_then(std::sync::Weak::upgrade)
            .map_or(u64::MAX, |p| p.stats().in_use_bytes);
        self.freed.lock().unwrap().push((id, in_use));
        if self.outcome == Outcome::PanicWhenTold {
            panic!("a bug in the evictor's bookkeeping");
        }
    }
}

struct Setup {
    pool: Arc<Pool<HostSource>>,
    open: Arc<(Mutex<bool>, Condvar)>,
    restores_open: Arc<(Mutex<bool>, Condvar)>,
    started: mpsc::Receiver<u64>,
    finished: Arc<AtomicUsize>,
    freed: Arc<Mutex<Vec<(EvictableKey, u64)>>>,
}

impl Setup {
    fn new(outcome: Outcome) -> Self {
        Self::with_restores(outcome, true)
    }

    fn with_restores(outcome: Outcome, restores_open: bool) -> Self {
        let pool = Pool::new(
            HostSource::new(2 * MIB, 1 << 30),
            PoolConfig::default()
                .capacity(8 * MIB)
                .cache_bytes_per_shard(0),
        )
        .unwrap();
        let (tx, started) = mpsc::channel();
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let finished = Arc::new(AtomicUsize::new(0));
        let restores_open = Arc::new((Mutex::new(restores_open), Condvar::new()));
        let freed = Arc::default();
        let weak = Arc::new(std::sync::OnceLock::new());
        pool.set_evictor(Arc::new(Gated {
            outcome,
            open: open.clone(),
            started: Mutex::new(tx),
            finished: finished.clone(),
            restores_open: restores_open.clone(),
            freed: Arc::clone(&freed),
            pool: Arc::clone(&weak),
        }));
        let pool = Arc::new(pool);
        let _ = weak.set(Arc::downgrade(&pool));
        Setup {
            pool,
            open,
            restores_open,
            started,
            finished,
            freed,
        }
    }

    fn open_gate(&self) {
        open(&self.open);
    }

    /// A BestEffort owner with one unpinned evictable block of `size` (tagged `tag`), and
    /// a Guaranteed owner to request its memory.
    fn victim(&self, size: u64, tag: u64) -> (OwnerId, OwnerId, EvictableId) {
        let p = &self.pool;
        let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
        let g = p
            .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
            .unwrap();
        let (id, _) = p.alloc_evictable(be, size, tag, S1).unwrap();
        p.unpin(&id).unwrap();
        (be, g, id)
    }

    /// A 6 MiB victim whose move out a Guaranteed owner's request of 4 MiB has started
    /// (held at the gate): its owner, the block and the request.
    fn moving(
        &self,
    ) -> (
        OwnerId,
        EvictableId,
        thread::JoinHandle<Result<Block, PoolError>>,
    ) {
        let (be, g, id) = self.victim(6 * MIB, 0);
        let requester = self.request(g, 4 * MIB);
        self.started.recv().unwrap();
        (be, id, requester)
    }

    /// `owner` requests `size` bytes on another thread.
    fn request(&self, owner: OwnerId, size: u64) -> thread::JoinHandle<Result<Block, PoolError>> {
        let p = self.pool.clone();
        thread::spawn(move || p.alloc(owner, size, S1))
    }
}

/// Free `id`, failing the test unless it returns at once (its bytes may be moving out).
fn freed_at_once(p: &Arc<Pool<HostSource>>, id: EvictableId) {
    let p = p.clone();
    assert!(within_patience("a free of a moving block", move || {
        p.free_evictable(id).is_ok()
    }));
}

/// Run `f` on another thread and wait for it, failing the test if it does not return.
fn within_patience<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("{what} waited for an eviction's bytes to move"))
}

/// Give `t` time to reach its wait, and check that it waits: a thread that did not wait for
/// the move would have nothing else to hold it up.
fn waiting<T>(t: &thread::JoinHandle<T>) {
    thread::sleep(Duration::from_millis(50));
    assert!(!t.is_finished(), "it did not wait for the move to end");
}

#[test]
fn other_owners_requests_go_on_while_an_evictions_bytes_move() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let (_, g, id) = s.victim(6 * MIB, 7);
    let c = p.add_owner(OwnerSpec::new("c", 8 * MIB)).unwrap();
    let filler = p.alloc(c, 2 * MIB, S1).unwrap();
    p.free(filler).unwrap();
    assert_eq!(p.stats().mapped_bytes, 8 * MIB);

    // Needs 4 MiB with 2 MiB free: evicts the BestEffort block, whose move blocks.
    let requester = s.request(g, 4 * MIB);
    assert_eq!(s.started.recv().unwrap(), 7);

    // Meanwhile another owner's central-path request (aligned, so no cache) is served
    // from the free 2 MiB, and the pool answers queries.
    let id = Arc::new(id);
    let (p2, id2) = (p.clone(), id.clone());
    let (b, resident, st) = within_patience("another owner's request", move || {
        let b = p2.alloc_aligned(c, MIB, 64 << 10, S1).unwrap();
        (b, p2.is_resident(&*id2).unwrap(), p2.stats())
    });
    // Still resident, and not counted, until its bytes are out.
    assert!(resident);
    assert_eq!((st.evictions, st.moves_in_flight), (0, 1));
    assert_eq!(st.owners[0].in_use_bytes, 6 * MIB);
    assert_eq!(s.finished.load(Ordering::SeqCst), 0);

    s.open_gate();
    let x = requester.join().unwrap().unwrap();
    let st = p.stats();
    assert_eq!((st.evictions, st.moves_in_flight), (1, 0));
    assert_eq!(st.owners[0].evicted_bytes, 6 * MIB);
    assert_eq!(st.owners[0].in_use_bytes, 0);
    assert_eq!(st.owners[1].in_use_bytes, 4 * MIB);
    p.free(x).unwrap();
    p.free(b).unwrap();
    let id = Arc::into_inner(id).unwrap();
    within_patience("freeing the evicted block", move || {
        p.free_evictable(id).unwrap();
        assert_eq!(p.stats().in_use_bytes, 0);
    });
}

#[test]
fn a_pin_waits_for_a_failed_move_and_finds_the_block_where_it_was() {
    let s = Setup::new(Outcome::Fail);
    let p = s.pool.clone();
    let (_, g, id) = s.victim(6 * MIB, 3);
    let first = p.pin(&id, S1).unwrap();
    p.unpin(&id).unwrap();
    let before = p.stats();

    let requester = s.request(g, 4 * MIB);
    assert_eq!(s.started.recv().unwrap(), 3);
    let id = Arc::new(id);
    let (p2, id2) = (p.clone(), id.clone());
    let pinner = thread::spawn(move || p2.pin(&*id2, S1));
    waiting(&pinner);
    s.open_gate();

    // The victim's move failed: the request tried it once, found nothing else, and says why.
    match requester.join().unwrap() {
        Err(PoolError::OutOfMemory { report, .. }) => {
            assert_eq!(report.eviction_failures, ["the copy out failed"]);
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    assert_eq!(
        s.finished.load(Ordering::SeqCst),
        1,
        "tried once, not again"
    );
    // The pin got the block where it was, with its bytes never moved.
    let pin = pinner.join().unwrap().unwrap();
    assert!(!pin.restored);
    assert_eq!(pin.addr, first.addr);
    let st = p.stats();
    assert_eq!(st.evictions, 0);
    assert_eq!(st.owners[0].evictable_resident_bytes, 6 * MIB);
    assert_eq!(st.owners[0].evictable_pinned_bytes, 6 * MIB);
    assert_eq!(st.in_use_bytes, before.in_use_bytes);
    p.unpin(&*id).unwrap();
    // Unpinned again, it is a victim like any other.
    assert_eq!(p.stats().owners[0].evictable_pinned_bytes, 0);
    let id = Arc::into_inner(id).unwrap();
    p.free_evictable(id).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn a_free_of_a_moving_block_returns_at_once_and_the_block_goes_when_its_bytes_are_out() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let (be, g, id) = s.victim(6 * MIB, 0);
    let r = id.to_ref();
    let requester = s.request(g, 4 * MIB);
    s.started.recv().unwrap();
    // The copy is held up; the free does not wait for it.
    let p2 = p.clone();
    within_patience("a free of a moving block", move || {
        p2.free_evictable(id).map_err(|(_, e)| e)
    })
    .unwrap();
    // Gone for every reference at once, though its owner is charged until the move ends.
    assert!(matches!(p.is_resident(r), Err(PoolError::DoubleFree)));
    assert!(matches!(p.pin(r, S1), Err(PoolError::DoubleFree)));
    assert_eq!(p.stats().owners[0].in_use_bytes, 6 * MIB);
    s.open_gate();
    let x = requester.join().unwrap().unwrap();
    let st = p.stats();
    assert_eq!(st.evictions, 1);
    assert_eq!(st.owners[0].evicted_bytes, 0);
    assert_eq!(st.owners[0].in_use_bytes, 0);
    assert_eq!(st.owners[0].frees, 1);
    p.free(x).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
    p.remove_owner(be).unwrap();
}

#[test]
fn the_evictor_hears_of_a_block_freed_during_its_move_once_it_is_gone() {
    for outcome in [Outcome::Ok, Outcome::Fail] {
        let s = Setup::new(outcome);
        let p = s.pool.clone();
        let (be, id, requester) = s.moving();
        let key = id.key();
        freed_at_once(&p, id);
        // Not yet: the block is still there, its bytes moving.
        assert!(s.freed.lock().unwrap().is_empty());
        s.open_gate();
        let x = within_patience("the request behind the move", move || requester.join())
            .unwrap()
            .unwrap();
        // Told once, with the pool's lock free (the hook read its statistics), and once
        // the block's memory was freed: the request's 4 MiB is all that was in use then
        // (before it took them, nothing).
        let freed = s.freed.lock().unwrap().clone();
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0].0, key);
        assert!(freed[0].1 <= 4 * MIB, "{} B in use when told", freed[0].1);
        p.free(x).unwrap();
        p.remove_owner(be).unwrap();
    }
    // A move whose block is not freed tells nothing.
    let s = Setup::new(Outcome::Ok);
    let (_, id, requester) = s.moving();
    s.open_gate();
    let x = requester.join().unwrap().unwrap();
    assert!(s.freed.lock().unwrap().is_empty());
    s.pool.free(x).unwrap();
    s.pool.free_evictable(id).unwrap();
    assert!(s.freed.lock().unwrap().is_empty());
}

#[test]
fn a_block_freed_while_its_move_fails_is_freed_where_it_stayed() {
    let s = Setup::new(Outcome::Fail);
    let p = s.pool.clone();
    let (be, id, requester) = s.moving();
    freed_at_once(&p, id);
    s.open_gate();
    // The failed move left the block where it was, and the free took it from there: the
    // request finds the memory free.
    let x = requester.join().unwrap().unwrap();
    let st = p.stats();
    assert_eq!(st.evictions, 0);
    assert_eq!(st.owners[0].in_use_bytes, 0);
    assert_eq!(st.owners[0].evictable_resident_bytes, 0);
    p.free(x).unwrap();
    p.remove_owner(be).unwrap();
}

#[test]
fn removing_an_owner_waits_for_the_move_of_a_block_it_freed() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let (be, id, requester) = s.moving();
    freed_at_once(&p, id);
    let p2 = p.clone();
    let remover = thread::spawn(move || p2.remove_owner(be));
    waiting(&remover);
    s.open_gate();
    remover.join().unwrap().unwrap();
    p.free(requester.join().unwrap().unwrap()).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn removing_an_owner_whose_block_is_moving_out_and_not_freed_is_refused_at_once() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let (be, id, requester) = s.moving();
    // The block will still be the owner's once out (evicted): no use waiting for the move.
    let p2 = p.clone();
    let removed = within_patience("removing an owner busy with a move", move || {
        p2.remove_owner(be)
    });
    assert!(
        matches!(removed, Err(PoolError::OwnerBusy { .. })),
        "{removed:?}"
    );
    s.open_gate();
    p.free(requester.join().unwrap().unwrap()).unwrap();
    p.free_evictable(id).unwrap();
    p.remove_owner(be).unwrap();
}

#[test]
fn a_request_waiting_for_a_move_takes_memory_a_pending_free_releases_meanwhile() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let (_be, g, _id) = s.victim(6 * MIB, 0);
    // Another owner's 2 MiB, freed in order on a stream whose work is still running.
    let other = p.add_owner(OwnerSpec::new("other", 8 * MIB)).unwrap();
    let work = common::Flag::new();
    let b = p.alloc(other, 2 * MIB, S1).unwrap();
    p.free_after(b, S1, work.clone()).unwrap();
    // The pool is full; a move out is under way, held at the gate.
    let requester = s.request(g, 4 * MIB);
    s.started.recv().unwrap();
    // A request on another stream waits for the move, which covers it...
    let p2 = p.clone();
    let waiter = thread::spawn(move || p2.alloc(other, 2 * MIB, StreamId(2)));
    waiting(&waiter);
    // ...until the pending free's work completes: then it takes that memory, while the move
    // is still held.
    work.set();
    let b = within_patience("a request served by a completed pending free", move || {
        waiter.join().unwrap()
    })
    .unwrap();
    p.free(b).unwrap();
    s.open_gate();
    p.free(requester.join().unwrap().unwrap()).unwrap();
}

#[test]
fn a_panicking_move_counts_as_a_failed_eviction() {
    let s = Setup::new(Outcome::Panic);
    let p = s.pool.clone();
    let (_, g, id) = s.victim(6 * MIB, 0);
    s.open_gate();
    match p.alloc(g, 4 * MIB, S1) {
        Err(PoolError::OutOfMemory { report, .. }) => {
            assert_eq!(report.eviction_failures.len(), 1);
            assert!(report.eviction_failures[0].contains("panicked"));
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    assert!(p.is_resident(&id).unwrap());
    // The pool is whole: a request that fits is served, and everything goes back.
    let b = p.alloc(g, 2 * MIB, S1).unwrap();
    p.free(b).unwrap();
    p.free_evictable(id).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn an_explicit_eviction_lets_the_lock_go_while_its_bytes_move() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let c = p.add_owner(OwnerSpec::new("c", 8 * MIB)).unwrap();
    let (id, _) = p.alloc_evictable(be, 4 * MIB, 5, S1).unwrap();
    p.unpin(&id).unwrap();
    let id = Arc::new(id);
    let (p1, id1) = (p.clone(), id.clone());
    let evicting = thread::spawn(move || p1.evict(be, &*id1));
    assert_eq!(s.started.recv().unwrap(), 5);
    let p2 = p.clone();
    let b = within_patience("another owner's request", move || {
        p2.alloc_aligned(c, MIB, 64 << 10, S1).unwrap()
    });
    s.open_gate();
    assert!(evicting.join().unwrap().unwrap());
    assert!(!p.is_resident(&*id).unwrap());
    assert!(!p.evict(be, &*id).unwrap(), "already out");
    p.free(b).unwrap();
    p.free_evictable(Arc::into_inner(id).unwrap()).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn a_pin_of_a_moving_block_waits_and_restores_it_once_it_is_out() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let held = p.alloc(g, 4 * MIB, S1).unwrap();
    let (old, _) = p.alloc_evictable(be, 2 * MIB, 1, S1).unwrap();
    let (new, _) = p.alloc_evictable(be, 2 * MIB, 2, S1).unwrap();
    p.unpin(&old).unwrap();
    p.unpin(&new).unwrap();

    let p1 = p.clone();
    let requester = thread::spawn(move || p1.alloc(g, 2 * MIB, S1));
    assert_eq!(s.started.recv().unwrap(), 1, "least recently used first");
    let old = Arc::new(old);
    let (p2, old2) = (p.clone(), old.clone());
    let pinner = thread::spawn(move || p2.pin(&*old2, S1));
    waiting(&pinner);
    s.open_gate();
    let x = requester.join().unwrap().unwrap();
    // The pin waited for the move, then restored the block (evicting the other one).
    let pin = pinner.join().unwrap().unwrap();
    assert!(pin.restored);
    assert_eq!(s.started.recv().unwrap(), 2);
    let st = p.stats();
    assert_eq!((st.evictions, st.restores), (2, 1));
    assert_eq!(st.owners[0].evictable_pinned_bytes, 2 * MIB);
    assert_eq!(st.owners[0].evicted_bytes, 2 * MIB);
    assert!(!p.is_resident(&new).unwrap());
    p.unpin(&*old).unwrap();
    p.free_evictable(Arc::into_inner(old).unwrap()).unwrap();
    p.free_evictable(new).unwrap();
    p.free(x).unwrap();
    p.free(held).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn a_restore_lets_the_lock_go_and_a_second_pin_waits_for_it() {
    let s = Setup::with_restores(Outcome::Ok, false);
    s.open_gate();
    let p = s.pool.clone();
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let c = p.add_owner(OwnerSpec::new("c", 8 * MIB)).unwrap();
    let (id, _) = p.alloc_evictable(be, 4 * MIB, 9, S1).unwrap();
    p.unpin(&id).unwrap();
    assert!(p.evict(be, &id).unwrap());
    assert_eq!(s.started.recv().unwrap(), 9);

    let id = Arc::new(id);
    let (p1, id1) = (p.clone(), id.clone());
    let first = thread::spawn(move || p1.pin(&*id1, S1));
    assert_eq!(s.started.recv().unwrap(), 1009);
    // The block's new memory is set aside and charged; its bytes are not back yet.
    assert!(!p.is_resident(&*id).unwrap());
    let (p2, id2) = (p.clone(), id.clone());
    let second = thread::spawn(move || p2.pin(&*id2, S1));
    waiting(&second);
    let p3 = p.clone();
    let (b, st) = within_patience("another owner's request", move || {
        (p3.alloc_aligned(c, MIB, 64 << 10, S1).unwrap(), p3.stats())
    });
    assert_eq!(st.owners[0].in_use_bytes, 4 * MIB);
    assert_eq!(st.owners[0].evicted_bytes, 0);
    assert_eq!((st.restores, st.moves_in_flight), (0, 1));

    open(&s.restores_open);
    let a = first.join().unwrap().unwrap();
    let b2 = second.join().unwrap().unwrap();
    assert!(a.restored);
    assert!(
        !b2.restored,
        "the second pin found it back, and restored nothing"
    );
    assert_eq!(a.addr, b2.addr);
    assert_eq!(p.pin_count(&*id).unwrap(), 2);
    let st = p.stats();
    assert_eq!(st.restores, 1);
    assert_eq!(st.owners[0].evictable_pinned_bytes, 4 * MIB);
    p.unpin(&*id).unwrap();
    p.unpin(&*id).unwrap();
    p.free(b).unwrap();
    p.free_evictable(Arc::into_inner(id).unwrap()).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn a_block_being_restored_for_a_pin_is_held_and_its_free_is_refused_at_once() {
    let s = Setup::with_restores(Outcome::Ok, false);
    s.open_gate();
    let p = s.pool.clone();
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let (id, _) = p.alloc_evictable(be, 4 * MIB, 9, S1).unwrap();
    p.unpin(&id).unwrap();
    assert!(!p.is_held(&id).unwrap());
    assert!(p.evict(be, &id).unwrap());
    assert_eq!(s.started.recv().unwrap(), 9);
    // The pin goes through a reference; the handle stays here.
    let (p1, r) = (p.clone(), id.to_ref());
    let pinning = thread::spawn(move || p1.pin(r, S1));
    assert_eq!(s.started.recv().unwrap(), 1009);
    assert_eq!(
        p.pin_count(&id).unwrap(),
        0,
        "not pinned until the bytes are back"
    );
    assert!(p.is_held(&id).unwrap());
    // The free does not wait for the restore, which would end in a pin.
    let (id, e) = within_patience("a free of a block being restored", move || {
        p.free_evictable(id).unwrap_err()
    });
    assert!(matches!(e, PoolError::Restoring), "{e:?}");
    open(&s.restores_open);
    assert!(pinning.join().unwrap().unwrap().restored);
    let p = s.pool.clone();
    assert!(p.is_held(&id).unwrap());
    p.unpin(&id).unwrap();
    p.free_evictable(id).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn a_failed_restore_gives_the_memory_back_and_leaves_the_block_evicted() {
    struct Refusing;
    impl Evictor for Refusing {
        fn evict(&self, _: &VictimInfo) -> Result<Eviction, EvictError> {
            Ok(Eviction::in_flight(|| Ok(())))
        }
        fn restore(&self, _: &RestoreInfo) -> Result<(), EvictError> {
            Err(EvictError("the copy in failed".into()))
        }
    }
    let p = Pool::new(
        HostSource::new(2 * MIB, 1 << 30),
        PoolConfig::default().capacity(8 * MIB),
    )
    .unwrap();
    p.set_evictor(Arc::new(Refusing));
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let (id, _) = p.alloc_evictable(be, 4 * MIB, 0, S1).unwrap();
    p.unpin(&id).unwrap();
    assert!(p.evict(be, &id).unwrap());
    match p.pin(&id, S1) {
        Err(PoolError::RestoreFailed(why)) => assert!(why.contains("the copy in failed")),
        other => panic!("expected a failed restore, got {other:?}"),
    }
    let st = p.stats();
    assert_eq!(st.owners[0].in_use_bytes, 0);
    assert_eq!(st.owners[0].evicted_bytes, 4 * MIB);
    assert_eq!(st.owners[0].evictable_resident_bytes, 0);
    assert!(!p.is_resident(&id).unwrap());
    p.free_evictable(id).unwrap();
    assert_eq!(p.stats().owners[0].evicted_bytes, 0);
}

#[test]
fn concurrent_evictions_leave_a_burstable_owner_its_base() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let bu = p
        .add_owner(
            OwnerSpec::new("bu", 8 * MIB)
                .base(4 * MIB)
                .tier(Tier::Burstable),
        )
        .unwrap();
    let g: Vec<_> = (0..3)
        .map(|i| {
            p.add_owner(OwnerSpec::new(format!("g{i}"), 4 * MIB).tier(Tier::Guaranteed))
                .unwrap()
        })
        .collect();
    let ids: Vec<_> = (0..3)
        .map(|t| p.alloc_evictable(bu, 2 * MIB, t, S1).unwrap().0)
        .collect();
    for id in &ids {
        p.unpin(id).unwrap();
    }
    let filler = p.alloc(g[0], 2 * MIB, S1).unwrap();
    // Above its base by one block: one may go, and only one.
    let p1 = p.clone();
    let (g1, g2) = (g[1], g[2]);
    let first = thread::spawn(move || p1.alloc(g1, 2 * MIB, S1));
    assert_eq!(s.started.recv().unwrap(), 0);
    // More than the move under way frees, so this one looks for a victim of its own.
    let p2 = p.clone();
    let second = thread::spawn(move || p2.alloc(g2, 4 * MIB, S1));
    waiting(&second);
    s.open_gate();
    let a = first.join().unwrap().unwrap();
    assert!(second.join().unwrap().is_err());
    let st = p.stats();
    assert_eq!(st.evictions, 1);
    assert_eq!(
        st.owners[0].in_use_bytes,
        4 * MIB,
        "the owner keeps its base"
    );
    p.free(a).unwrap();
    p.free(filler).unwrap();
    for id in ids {
        p.free_evictable(id).unwrap();
    }
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn a_request_that_an_eviction_under_way_covers_waits_for_it_and_evicts_nothing_more() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let g: Vec<_> = (0..2)
        .map(|i| {
            p.add_owner(OwnerSpec::new(format!("g{i}"), 2 * MIB).tier(Tier::Guaranteed))
                .unwrap()
        })
        .collect();
    let ids: Vec<_> = (0..2)
        .map(|t| p.alloc_evictable(be, 4 * MIB, t, S1).unwrap().0)
        .collect();
    for id in &ids {
        p.unpin(id).unwrap();
    }
    let p1 = p.clone();
    let (g0, g1) = (g[0], g[1]);
    let first = thread::spawn(move || p1.alloc(g0, MIB, S1));
    assert_eq!(s.started.recv().unwrap(), 0);
    // The 4 MiB on their way out cover this one too.
    let p2 = p.clone();
    let second = thread::spawn(move || p2.alloc(g1, MIB, S1));
    waiting(&second);
    s.open_gate();
    let a = first.join().unwrap().unwrap();
    let b = second.join().unwrap().unwrap();
    assert_eq!(p.stats().evictions, 1, "one eviction served both");
    assert!(p.is_resident(&ids[1]).unwrap());
    p.free(a).unwrap();
    p.free(b).unwrap();
    for id in ids {
        p.free_evictable(id).unwrap();
    }
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn a_block_freed_after_work_while_it_moves_out_is_reused_only_after_that_work() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let (be, id, requester) = s.moving();
    let g = p.stats().owners[1].id;
    // Freed after work still queued on another stream, while its bytes move out.
    let work = common::Flag::new();
    p.free_evictable_after(id, StreamId(2), work.clone())
        .map_err(|(_, e)| e)
        .unwrap();
    s.open_gate();
    // The move is done, but the memory waits for that work: the request may not have it.
    let r = within_patience("the request behind the move", move || requester.join()).unwrap();
    match r {
        // The report shows where the memory is.
        Err(PoolError::OutOfMemory { report, .. }) => assert_eq!(report.pending, 6 * MIB),
        r => panic!("the request took memory that work on another stream may still use: {r:?}"),
    }
    assert_eq!(p.stats().pending_bytes, 6 * MIB);
    work.set();
    let x = p.alloc(g, 4 * MIB, S1).unwrap();
    p.free(x).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
    p.remove_owner(be).unwrap();
}

#[test]
fn a_panic_in_the_evictors_freed_hook_does_not_reach_the_request_that_ended_the_move() {
    let s = Setup::new(Outcome::PanicWhenTold);
    let p = s.pool.clone();
    let (be, id, requester) = s.moving();
    freed_at_once(&p, id);
    s.open_gate();
    let x = within_patience("the request behind the move", move || requester.join())
        .unwrap()
        .expect("the request that ended the move got its memory");
    assert_eq!(s.freed.lock().unwrap().len(), 1, "the evictor was told");
    p.free(x).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
    p.remove_owner(be).unwrap();
}

#[test]
fn a_pin_whose_room_went_to_another_pins_restore_takes_the_block_restored() {
    let s = Setup::new(Outcome::Ok);
    let p = s.pool.clone();
    let owner = |name| {
        p.add_owner(OwnerSpec::new(name, 8 * MIB).tier(Tier::BestEffort))
            .unwrap()
    };
    let (a, b, c) = (owner("a"), owner("b"), owner("c"));
    // a's block is out; b's fills the half that c's plain block leaves.
    s.open_gate();
    let (x, _) = p.alloc_evictable(a, 4 * MIB, 1, S1).unwrap();
    p.unpin(&x).unwrap();
    assert!(p.evict(a, &x).unwrap());
    assert_eq!(s.started.recv().unwrap(), 1);
    let (y, _) = p.alloc_evictable(b, 4 * MIB, 2, S1).unwrap();
    p.unpin(&y).unwrap();
    let kept = p.alloc(c, 4 * MIB, S1).unwrap();
    // Close the gate again: the first pin's eviction of b's block waits there.
    *s.open.0.lock().unwrap() = false;
    let x = Arc::new(x);
    let pin = |x: &Arc<EvictableId>| {
        let (p, x) = (p.clone(), x.clone());
        thread::spawn(move || p.pin(&*x, S1))
    };
    let first = pin(&x);
    assert_eq!(s.started.recv().unwrap(), 2);
    // The second finds the block still out, and waits for that eviction too.
    let second = pin(&x);
    waiting(&second);
    s.open_gate();
    // One pin restores the block into b's memory; the other finds no room left, and
    // takes the block as the first restored it.
    let (r1, r2) = (first.join().unwrap(), second.join().unwrap());
    let (r1, r2) = (r1.expect("first pin"), r2.expect("second pin"));
    assert_eq!(r1.addr, r2.addr);
    assert!(r1.restored != r2.restored, "one restore, not two");
    assert_eq!(p.pin_count(&*x).unwrap(), 2);
    p.unpin(&*x).unwrap();
    p.unpin(&*x).unwrap();
    p.free(kept).unwrap();
    p.free_evictable(Arc::into_inner(x).unwrap()).unwrap();
    let _ = p.free_evictable(y);
}
