//! The runtime: contexts, sessions, buffers, eviction, events, memory pressure and queries.
//! The suite runs on the simulated device, and on CUDA with `--ignored`; the fault-injection
//! tests at the end need the simulated device.

use gpushare::device::{
    BackendChoice, CudaDevice, Device, FaultOp, SimConfig, SimDevice, SpinLoad,
};
use gpushare::qos::{ContextSpec, Tier};
use gpushare::{EvictPolicy, Pressure, Runtime, RuntimeError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

type Open = fn() -> Arc<dyn Device>;

/// A runtime that uses `total` bytes of the device.
fn runtime(open: Open, total: u64, overcommit: f64) -> Runtime {
    Runtime::builder()
        .with_device(open())
        .memory_fraction(1.0)
        .memory_limit(total)
        .overcommit(overcommit)
        .aging(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Assert that the runtime's only context is gone: no pool owner, no snapshot row, and its
/// name and a reservation of all `capacity` bytes are free again.
fn assert_context_gone(rt: &Runtime, name: &str, capacity: u64) {
    assert_eq!(
        rt.pool_stats().owners.len(),
        0,
        "{name}'s pool owner is still there"
    );
    assert_eq!(rt.snapshot().contexts.len(), 0, "{name} is still listed");
    rt.create_context(ContextSpec::new(name, capacity).base(capacity))
        .unwrap();
}

/// A runtime over a simulated device of `total` bytes, for fault injection.
fn sim_runtime(total: u64, overcommit: f64) -> (Runtime, Arc<SimDevice>) {
    let sim = Arc::new(SimDevice::with_config(SimConfig::default().total_memory(total)).unwrap());
    let rt = Runtime::builder()
        .with_device(sim.clone())
        .memory_fraction(1.0)
        .overcommit(overcommit)
        .aging(Duration::from_secs(60))
        .build()
        .unwrap();
    (rt, sim)
}

/// Poll `done` until it holds; fail with `what` after a minute.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Two contexts, a buffer of the first and the first's stream (see [`written`]).
type TwoContexts = (
    gpushare::Context,
    gpushare::Context,
    gpushare::Buffer,
    gpushare::device::Stream,
);

/// A BestEffort context `a` whose 40 MiB buffer holds `data`, offloaded to make room for
/// another context `b`'s; with `a`'s stream, for holding it.
fn offloaded(rt: &Runtime, data: &[u8]) -> TwoContexts {
    let (a, b, buf, a_stream) = written(rt, data);
    // The other context takes its place: the buffer is offloaded.
    drop(b.create_buffer(40 * MIB).unwrap());
    assert!(!buf.is_resident());
    (a, b, buf, a_stream)
}

/// A BestEffort context "a" and a context "b" of the default tier, of 64 MiB each.
fn contexts_a_b(rt: &Runtime) -> (gpushare::Context, gpushare::Context) {
    let a = rt
        .create_context(ContextSpec::new("a", 64 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let b = rt.create_context(ContextSpec::new("b", 64 * MIB)).unwrap();
    (a, b)
}

/// A BestEffort context "a" whose 40 MiB buffer holds `data`, written in a session that
/// has ended, and a context "b" (of the default tier) that can take its place; with `a`'s
/// stream.
fn written(rt: &Runtime, data: &[u8]) -> TwoContexts {
    let (a, b) = contexts_a_b(rt);
    let buf = a.create_buffer(40 * MIB).unwrap();
    let a_stream = {
        let mut s = a.session().unwrap();
        s.write(&buf, 0, data).unwrap();
        s.stream().clone()
    };
    (a, b, buf, a_stream)
}

/// A waker that counts its wake-ups.
struct Count(AtomicUsize);

impl std::task::Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Count {
    fn wakes(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn counter() -> Arc<Count> {
    Arc::new(Count(AtomicUsize::new(0)))
}

/// Assert that the context named `name` has no evictable bytes pinned.
fn assert_nothing_pinned(rt: &Runtime, name: &str) {
    let st = rt.pool_stats();
    let owner = st.owners.iter().find(|o| o.name == name).unwrap();
    assert_eq!(owner.evictable_pinned_bytes, 0, "{st:?}");
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

macro_rules! suite {
    (sync: [$($s:ident),* $(,)?], async: [$($a:ident),* $(,)?]) => {
        mod sim {
            use super::*;
            fn open() -> Arc<dyn Device> {
                Arc::new(SimDevice::with_config(SimConfig::default().total_memory(1 << 30)).unwrap())
            }
            $( #[test] fn $s() { tests::$s(open) } )*
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $a() { tests::$a(open).await } )*
        }
        mod cuda {
            use super::*;
            fn open() -> Arc<dyn Device> {
                Arc::new(CudaDevice::new(0).expect("this test needs a CUDA GPU"))
            }
            $( #[test] #[ignore = "needs a CUDA GPU"] fn $s() { tests::$s(open) } )*
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               #[ignore = "needs a CUDA GPU"]
               async fn $a() { tests::$a(open).await } )*
        }
    };
}

suite!(
    sync: [a_session_that_cannot_fit_beside_guaranteed_buffers_fails_at_once, a_waiting_sessions_handlers_are_told_what_its_working_set_lacks, a_buffer_dropped_while_sessions_overlap_is_freed_once_none_pins_it, eviction_waits_for_work_still_running_on_the_owner_stream, a_dropped_buffer_is_reused_only_after_work_queued_on_it, a_session_borrows_another_contexts_buffer, contexts_are_admitted_with_tier_priorities, buffers_hold_bytes_across_sessions, offloaded_buffers_come_back_bit_exact_and_discarded_ones_say_so, scratch_is_freed_in_stream_order_at_session_end, pressure_handlers_run_in_order_and_panics_are_denials, snapshot_prints_and_serializes, a_context_outlives_its_handles_while_a_session_lives, a_handler_that_owns_a_buffer_goes_with_its_registration, a_context_with_its_own_compute_share_gives_it_back, a_session_that_times_out_leaves_nothing_behind_and_a_later_one_gets_in, a_session_times_out_while_other_sessions_keep_waking_the_line, a_context_keeps_its_buffers_pinned_between_sessions_until_memory_runs_short, held_buffers_go_to_eviction_least_recently_used_first, a_buffer_dropped_under_a_hold_while_sessions_overlap_is_freed_when_its_users_end, a_waiter_gets_in_while_another_contexts_sessions_never_stop_overlapping, waiters_of_a_context_just_served_go_ahead_of_the_line, a_newcomer_that_restores_its_context_wakes_its_waiters_in_line, a_pressure_handler_opens_a_session_ahead_of_a_line_that_waited_long, a_shortage_met_inside_a_pressure_handler_is_not_handed_to_the_handlers_again, a_handler_that_releases_memory_does_not_make_the_waiter_try_again_and_again],
    async: [events_order_work_across_contexts, waiting_sessions_are_served_in_tier_order, a_handler_that_releases_memory_does_not_make_an_awaited_waiter_try_again_and_again]
);

/// The backend-generic tests.
mod tests {
    use super::*;

    pub fn a_session_that_cannot_fit_beside_guaranteed_buffers_fails_at_once(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let llm = rt
            .create_context(ContextSpec::new("llm", 64 * MIB).tier(Tier::Guaranteed))
            .unwrap();
        let vision = rt
            .create_context(ContextSpec::new("vision", 64 * MIB).tier(Tier::BestEffort))
            .unwrap();
        let off = vision.create_buffer(32 * MIB).unwrap();
        vision
            .session()
            .unwrap()
            .write(&off, 0, &pattern(1024, 5))
            .unwrap();
        // Guaranteed weights push the vision buffer out, and are never evicted themselves.
        let _weights = llm.create_buffer(48 * MIB).unwrap();
        drop(llm.session().unwrap());
        assert!(!off.is_resident());
        // Asked on another thread, so that a regression fails instead of hanging.
        let ask = |v: gpushare::Context| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(v.session_timeout(Duration::from_secs(20)).map(drop));
            });
            rx.recv_timeout(Duration::from_secs(30))
                .expect("the session neither failed nor was granted")
        };
        let expect_fails = |r: Result<(), RuntimeError>| match r {
            Err(RuntimeError::WorkingSetBesideGuaranteed {
                context,
                bytes,
                guaranteed,
                capacity,
            }) => {
                assert_eq!(context, "vision");
                assert_eq!(
                    (bytes, guaranteed, capacity),
                    (32 * MIB, 48 * MIB, 64 * MIB)
                );
            }
            Err(e) => panic!("expected the set not to fit beside the weights, got {e}"),
            Ok(()) => panic!("the vision buffer cannot fit beside the weights"),
        };
        // With nothing live, the session fails at once, and does not retry for ever on the
        // release its own fast path made when it gave up.
        expect_fails(ask(vision.clone()));
        // Nor does it wait while a Guaranteed session is live: that session's end would
        // not make room (its weights stay), and the waiting session would hold up the line
        // behind it for as long as some session is live.
        let live = llm.session().unwrap();
        expect_fails(ask(vision.clone()));
        drop(live);
        assert_eq!(rt.waiting_sessions(), 0);
        assert_nothing_pinned(&rt, "vision");
    }

    pub fn a_session_that_times_out_leaves_nothing_behind_and_a_later_one_gets_in(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let data = pattern(4096, 9);
        let (a, b, buf, _) = written(&rt, &data);
        // b's buffer pushes a's out, and b's session pins it: a's set cannot come back.
        let theirs = b.create_buffer(40 * MIB).unwrap();
        assert!(!buf.is_resident());
        let held = b.session().unwrap();
        // Whoever holds b's session and asks for a's with a plain session would wait for
        // ever. (Asked on another thread, so that a regression fails instead of hanging.)
        let timeout = Duration::from_millis(100);
        let (tx, rx) = std::sync::mpsc::channel();
        let a2 = a.clone();
        std::thread::spawn(move || {
            let _ = tx.send(a2.session_timeout(timeout).map(drop));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the session neither timed out nor was granted in 20 s");
        match r {
            Err(RuntimeError::SessionTimedOut {
                context,
                waited,
                missing,
                ..
            }) => {
                assert_eq!(context, "a");
                assert!(waited >= timeout, "gave up after {waited:?}");
                assert_eq!(missing, 40 * MIB);
            }
            Err(e) => panic!("expected a timeout, got {e}"),
            Ok(()) => panic!("a's set cannot fit beside b's pinned buffer"),
        }
        // Nothing of the try is left: no waiter in line, no use of a, nothing pinned.
        assert_eq!(rt.waiting_sessions(), 0);
        let snap = rt.snapshot();
        let row = snap.contexts.iter().find(|c| c.name == "a").unwrap();
        assert_eq!(row.sessions, 0, "the timed-out session left a use: {snap}");
        assert_nothing_pinned(&rt, "a");
        // Once b's session ends (on another thread, while a waits), a gets in, its bytes
        // back.
        std::thread::scope(|scope| {
            scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                drop(held);
            });
            let mut s = a.session_timeout(Duration::from_secs(60)).unwrap();
            let mut back = vec![0u8; data.len()];
            s.read(&buf, 0, &mut back).unwrap();
            assert_eq!(back, data);
        });
        drop(theirs);
    }

    pub fn a_session_times_out_while_other_sessions_keep_waking_the_line(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let (a, b, buf, _) = written(&rt, &pattern(4096, 3));
        let _theirs = b.create_buffer(40 * MIB).unwrap();
        assert!(!buf.is_resident());
        let _held = b.session().unwrap();
        // Another thread keeps ending sessions of a third context, each of which wakes
        // the line: the waiting session tries again and again (asking the handler each
        // time), and must still time out.
        let c = rt.create_context(ContextSpec::new("c", 8 * MIB)).unwrap();
        let _small = c.create_buffer(4 * MIB).unwrap();
        let tries = Arc::new(AtomicUsize::new(0));
        let _counter = {
            let tries = tries.clone();
            rt.on_memory_pressure(move |info| {
                if info.context.name() == "a" {
                    tries.fetch_add(1, Ordering::Relaxed);
                }
                Pressure::Deny
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(a.session_timeout(Duration::from_millis(100)).map(drop));
        });
        let stop = std::sync::atomic::AtomicBool::new(false);
        let r = std::thread::scope(|scope| {
            let waking = scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    drop(c.session());
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            let r = rx.recv_timeout(Duration::from_secs(20));
            stop.store(true, Ordering::Relaxed);
            waking.join().unwrap();
            r
        });
        match r.expect("the session neither timed out nor was granted in 20 s") {
            Err(RuntimeError::SessionTimedOut { .. }) => {}
            Err(e) => panic!("expected a timeout, got {e}"),
            Ok(()) => panic!("a's set cannot fit beside b's pinned buffer"),
        }
        assert!(tries.load(Ordering::Relaxed) > 1);
        assert_eq!(rt.waiting_sessions(), 0);
    }

    /// Bytes of `name`'s evictable buffers that are pinned.
    fn pinned(rt: &Runtime, name: &str) -> u64 {
        let st = rt.pool_stats();
        let owner = st.owners.iter().find(|o| o.name == name).unwrap();
        owner.evictable_pinned_bytes
    }

    pub fn a_context_keeps_its_buffers_pinned_between_sessions_until_memory_runs_short(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let data = pattern(4096, 21);
        let (a, b, buf, _) = written(&rt, &data);
        // The session has ended; its pins stay, as the context's hold, and the next
        // sessions ride it.
        assert_eq!(pinned(&rt, "a"), 40 * MIB);
        for _ in 0..3 {
            let mut s = a.session().unwrap();
            let mut back = vec![0u8; data.len()];
            s.read(&buf, 0, &mut back).unwrap();
            assert_eq!(back, data);
        }
        assert_eq!(pinned(&rt, "a"), 40 * MIB);
        // Let go on request; the next session pins again and keeps the hold.
        rt.unpin_idle();
        assert_eq!(pinned(&rt, "a"), 0);
        drop(a.session().unwrap());
        assert_eq!(pinned(&rt, "a"), 40 * MIB);
        // A buffer made since is pinned by the next session, and held with the rest.
        let more = a.create_buffer(4 * MIB).unwrap();
        assert_eq!(pinned(&rt, "a"), 40 * MIB);
        a.session().unwrap().write(&more, 0, &data).unwrap();
        assert_eq!(pinned(&rt, "a"), 44 * MIB);
        // Dropped with no session live, a held buffer is freed at once.
        drop(more);
        assert_eq!(a.usage().resident, 40 * MIB);
        assert_eq!(pinned(&rt, "a"), 0);
        drop(a.session().unwrap());
        assert_eq!(pinned(&rt, "a"), 40 * MIB);
        // Short of memory, the pool has the hold let go before it picks a victim: the
        // BestEffort buffer goes, as it would have without the hold.
        let theirs = b.create_buffer(40 * MIB).unwrap();
        assert!(!buf.is_resident());
        assert_eq!(pinned(&rt, "a"), 0);
        drop(theirs);
        let mut s = a.session().unwrap();
        let mut back = vec![0u8; data.len()];
        s.read(&buf, 0, &mut back).unwrap();
        assert_eq!(back, data, "restored bytes differ");
        drop(s);
        // A context that goes with a hold leaves nothing behind.
        drop((buf, a));
        assert_eq!(
            rt.pool_stats().owners.len(),
            1,
            "a's pool owner is still there"
        );
    }

    pub fn a_buffer_dropped_under_a_hold_while_sessions_overlap_is_freed_when_its_users_end(
        open: Open,
    ) {
        let rt = runtime(open, 64 * MIB, 1.0);
        let ctx = rt.create_context(ContextSpec::new("m", 64 * MIB)).unwrap();
        let _w = ctx.create_buffer(4 * MIB).unwrap();
        let kv = ctx.create_buffer(8 * MIB).unwrap();
        drop(ctx.session().unwrap());
        assert_eq!(pinned(&rt, "m"), 12 * MIB, "the hold");
        // A server under load: sessions overlap, so none is ever the last to end.
        let first = ctx.session().unwrap();
        drop(kv);
        let second = ctx.session().unwrap();
        assert_eq!(
            ctx.usage().resident,
            12 * MIB,
            "the first session still uses it"
        );
        drop(first);
        // The only session that used the dropped buffer has ended: it is freed, though
        // another session is live and the hold covered it.
        assert_eq!(ctx.usage().resident, 4 * MIB);
        let third = ctx.session().unwrap();
        drop(second);
        drop(third);
        assert_eq!(ctx.usage().resident, 4 * MIB);
        // Sessions that follow keep a hold on what is left.
        drop(ctx.session().unwrap());
        assert_eq!(pinned(&rt, "m"), 4 * MIB);
    }

    pub fn held_buffers_go_to_eviction_least_recently_used_first(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let spec = |n: &str| ContextSpec::new(n, 64 * MIB).tier(Tier::BestEffort);
        let (old, new) = (
            rt.create_context(spec("old")).unwrap(),
            rt.create_context(spec("new")).unwrap(),
        );
        let (ob, nb) = (
            old.create_buffer(24 * MIB).unwrap(),
            new.create_buffer(24 * MIB).unwrap(),
        );
        // Used in this order, both hold their buffers afterwards.
        drop(old.session().unwrap());
        drop(new.session().unwrap());
        assert_eq!(pinned(&rt, "old") + pinned(&rt, "new"), 48 * MIB);
        // Room for one more: the buffer used longest ago goes, the other stays.
        let g = rt
            .create_context(ContextSpec::new("g", 24 * MIB).tier(Tier::Guaranteed))
            .unwrap();
        let _weights = g.create_buffer(24 * MIB).unwrap();
        assert!(!ob.is_resident(), "the least recently used buffer stays");
        assert!(nb.is_resident(), "the most recently used buffer went");
    }

    pub fn a_buffer_dropped_while_sessions_overlap_is_freed_once_none_pins_it(open: Open) {
        let rt = runtime(open, 64 * MIB, 1.0);
        let ctx = rt.create_context(ContextSpec::new("m", 64 * MIB)).unwrap();
        let keep = ctx.create_buffer(4 * MIB).unwrap();
        let gone = ctx.create_buffer(8 * MIB).unwrap();
        // A server under load: every session overlaps the next.
        let mut s1 = ctx.session().unwrap();
        let data = pattern(1024, 4);
        s1.write(&gone, 0, &data).unwrap();
        drop(gone);
        let s2 = ctx.session().unwrap();
        assert_eq!(
            ctx.usage().resident,
            12 * MIB,
            "the first session still uses it"
        );
        drop(s1);
        assert_eq!(
            ctx.usage().resident,
            4 * MIB,
            "freed once the session that pinned it ended, though another is live"
        );
        // A buffer made during a session and dropped unused goes at once.
        let brief = ctx.create_buffer(2 * MIB).unwrap();
        drop(brief);
        assert_eq!(ctx.usage().resident, 4 * MIB);
        // Later sessions pin only what is left, and the memory can be used again.
        let s3 = ctx.session().unwrap();
        drop(s2);
        let again = ctx.create_buffer(32 * MIB).unwrap();
        drop(s3);
        let mut s4 = ctx.session().unwrap();
        let mut back = vec![0u8; 1024];
        s4.write(&keep, 0, &data).unwrap();
        s4.read(&keep, 0, &mut back).unwrap();
        assert!(back == data);
        drop(s4);
        drop((keep, again));
        assert_eq!(ctx.usage().resident, 0);
    }

    pub fn a_dropped_buffer_is_reused_only_after_work_queued_on_it(open: Open) {
        let rt = runtime(open, 48 * MIB, 4.0);
        let a = rt.create_context(ContextSpec::new("a", 32 * MIB)).unwrap();
        let b = rt.create_context(ContextSpec::new("b", 32 * MIB)).unwrap();
        let x = a.create_buffer(32 * MIB).unwrap();
        let load = SpinLoad::new(rt.device().clone()).unwrap();
        {
            let mut s = a.session().unwrap();
            let r = s.range(&x).unwrap();
            // Still running when the session ends and the buffer is dropped: a long kernel
            // (about 50 ms), then a write of the whole buffer.
            load.launch(s.stream(), 1, 32, 75_000_000).unwrap();
            rt.device().memset(r, 0xAB, s.stream()).unwrap();
        }
        drop(x);
        // Another context's buffer can have that memory only once the work is done.
        let fill = vec![0x11u8; (32 * MIB) as usize];
        let mut tries = 0;
        let y = loop {
            match b.create_buffer(32 * MIB) {
                Ok(y) => break y,
                Err(RuntimeError::OutOfMemory { .. }) if tries < 500 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("{e}"),
            }
        };
        b.session().unwrap().write(&y, 0, &fill).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let mut got = vec![0u8; fill.len()];
        b.session().unwrap().read(&y, 0, &mut got).unwrap();
        assert!(
            got == fill,
            "work queued on a dropped buffer wrote into memory another context now holds"
        );
    }

    pub fn a_session_borrows_another_contexts_buffer(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let tts = rt
            .create_context(ContextSpec::new("tts", 16 * MIB).base(16 * MIB))
            .unwrap();
        let hog = rt
            .create_context(ContextSpec::new("hog", 64 * MIB))
            .unwrap();
        let be = rt.create_context(ContextSpec::new("be", 64 * MIB)).unwrap();
        let out = be.create_buffer(8 * MIB).unwrap(); // BestEffort: evictable
        let heard = tts.create_buffer(8 * MIB).unwrap();
        let old = pattern(out.size() as usize, 1);
        let new = pattern(out.size() as usize, 2);
        let step = {
            let mut s = be.session().unwrap();
            s.write(&out, 0, &old).unwrap();
            s.record_event().unwrap()
        };
        let load = SpinLoad::new(rt.device().clone()).unwrap();
        {
            let mut s = tts.session().unwrap();
            s.wait_event(&step).unwrap();
            let src = s.borrow(&out).unwrap();
            assert_eq!(
                s.borrow(&out).unwrap(),
                src,
                "borrowing twice is one borrow"
            );
            // While borrowed, the buffer is pinned: a hog cannot evict it.
            assert!(hog.create_buffer(56 * MIB).is_err());
            assert!(out.is_resident());
            // Read it late: after a long kernel (about 50 ms) on this stream.
            let dst = s.range(&heard).unwrap();
            load.launch(s.stream(), 1, 32, 75_000_000).unwrap();
            rt.device().copy_dtod(dst, src, s.stream()).unwrap();
            assert_eq!(be.usage().used, 8 * MIB);
        }
        // The owner writes new bytes at once; its stream waits for the borrower's reads.
        be.session().unwrap().write(&out, 0, &new).unwrap();
        let mut got = vec![0u8; heard.size() as usize];
        tts.session().unwrap().read(&heard, 0, &mut got).unwrap();
        assert!(
            got == old,
            "the owner overwrote the buffer before the borrower read it"
        );
        // `read` and `write` borrow a buffer of another context as `borrow` does.
        {
            let mut s = tts.session().unwrap();
            let mut direct = vec![0u8; 4096];
            s.read(&out, 0, &mut direct).unwrap();
            assert!(direct == new[..4096], "a read of the owner's bytes");
            s.write(&out, 0, &old[..4096]).unwrap();
        }
        let mut back = vec![0u8; 4096];
        be.session().unwrap().read(&out, 0, &mut back).unwrap();
        assert!(
            back == old[..4096],
            "the borrower's write reached the owner"
        );
        // Dropping the owner's handle while a borrow lives frees the buffer after it.
        {
            let mut s = tts.session().unwrap();
            s.borrow(&out).unwrap();
            drop(out);
            assert_eq!(be.usage().used, 8 * MIB, "still in use by the borrower");
        }
        assert_eq!(be.usage().used, 0, "freed when the borrow ended");
        // A buffer of another runtime is refused.
        let rt2 = runtime(open, 16 * MIB, 1.0);
        let other = rt2.create_context(ContextSpec::new("x", 8 * MIB)).unwrap();
        let ob = other.create_buffer(MIB).unwrap();
        assert!(matches!(
            tts.session().unwrap().borrow(&ob),
            Err(RuntimeError::Foreign { what: "buffer", .. })
        ));
        drop(heard);
    }

    pub fn eviction_waits_for_work_still_running_on_the_owner_stream(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let be = rt.create_context(ContextSpec::new("be", 64 * MIB)).unwrap();
        let g = rt
            .create_context(ContextSpec::new("g", 48 * MIB).base(48 * MIB))
            .unwrap();
        let buf = be.create_buffer(32 * MIB).unwrap();
        let load = SpinLoad::new(rt.device().clone()).unwrap();
        {
            let mut s = be.session().unwrap();
            s.write(&buf, 0, &vec![1u8; buf.size() as usize]).unwrap();
            // Work that is still running when the session ends: a long kernel (about
            // 50 ms), then a write of the whole buffer.
            let r = s.range(&buf).unwrap();
            load.launch(s.stream(), 1, 32, 75_000_000).unwrap();
            rt.device().memset(r, 0xAB, s.stream()).unwrap();
        }
        // Evict it at once: the offload must copy what the stream wrote, not what was
        // there when the session ended, and the memory must not be handed on while the
        // owner's work can still write it.
        let big = g.create_buffer(48 * MIB).unwrap();
        assert!(!buf.is_resident(), "evicted");
        g.session()
            .unwrap()
            .write(&big, 0, &vec![0x11u8; big.size() as usize])
            .unwrap();
        // Whatever was queued on the owner's stream has run by now.
        std::thread::sleep(Duration::from_millis(150));
        let mut other = vec![0u8; big.size() as usize];
        g.session().unwrap().read(&big, 0, &mut other).unwrap();
        assert!(
            other.iter().all(|&b| b == 0x11),
            "work queued before the eviction wrote into memory handed to another context"
        );
        drop(big);
        let mut s = be.session().unwrap();
        let mut back = vec![0u8; buf.size() as usize];
        s.read(&buf, 0, &mut back).unwrap();
        assert!(
            back.iter().all(|&b| b == 0xAB),
            "the eviction copied the buffer before the owner's work on it had finished"
        );
    }

    pub fn contexts_are_admitted_with_tier_priorities(open: Open) {
        let rt = runtime(open, 256 * MIB, 1.0);
        let range = rt.device().info().priority_range;
        let llm = rt
            .create_context(ContextSpec::new("llm", 64 * MIB).base(64 * MIB))
            .unwrap();
        let tts = rt
            .create_context(ContextSpec::new("tts", 64 * MIB).base(32 * MIB))
            .unwrap();
        let vis = rt
            .create_context(ContextSpec::new("vision", 64 * MIB))
            .unwrap();
        assert_eq!(
            (llm.tier(), tts.tier(), vis.tier()),
            (Tier::Guaranteed, Tier::Burstable, Tier::BestEffort)
        );
        assert_eq!(llm.stream_priority(), range.greatest);
        assert_eq!(vis.stream_priority(), range.least);
        assert!(matches!(
            rt.create_context(ContextSpec::new("llm", MIB)),
            Err(RuntimeError::DuplicateContext(_))
        ));
        match rt.create_context(ContextSpec::new("big", 128 * MIB).base(128 * MIB)) {
            Err(RuntimeError::Rejected { rejection, .. }) => {
                let msg = rejection.to_string();
                assert!(msg.contains("big"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            rt.create_context(ContextSpec::new("bad", 0)),
            Err(RuntimeError::Rejected { .. })
        ));
        let u = llm.usage();
        assert_eq!((u.reserved, u.max, u.used), (64 * MIB, 64 * MIB, 0));
        assert_eq!(rt.available_vram(), 256 * MIB);
    }

    pub fn buffers_hold_bytes_across_sessions(open: Open) {
        let rt = runtime(open, 256 * MIB, 1.0);
        let ctx = rt.create_context(ContextSpec::new("m", 64 * MIB)).unwrap();
        let w = ctx.create_buffer(3 * MIB + 5).unwrap();
        let data = pattern(w.size() as usize, 1);
        {
            let mut s = ctx.session().unwrap();
            s.write(&w, 0, &data).unwrap();
            assert!(matches!(
                s.write(&w, 1, &data),
                Err(RuntimeError::OutOfRange { .. })
            ));
        }
        let mut s = ctx.session().unwrap();
        let mut back = vec![0u8; data.len()];
        s.read(&w, 0, &mut back).unwrap();
        assert!(back == data);
        assert!(ctx.usage().resident >= w.size());
    }

    pub fn offloaded_buffers_come_back_bit_exact_and_discarded_ones_say_so(open: Open) {
        // 64 MiB device; the sum of maxima may reach 3x that.
        let rt = runtime(open, 64 * MIB, 3.0);
        let vision = rt
            .create_context(ContextSpec::new("vision", 64 * MIB))
            .unwrap();
        let llm = rt
            .create_context(ContextSpec::new("llm", 48 * MIB).base(48 * MIB))
            .unwrap();
        // Sizes that are not a multiple of the pool's 256-byte unit: the staging holds the
        // requested bytes, the pool block a little more.
        let off = vision
            .create_buffer_with(24 * MIB - 1000, EvictPolicy::Offload)
            .unwrap();
        assert_eq!(off.size(), 24 * MIB - 1000);
        let disc = vision
            .create_buffer_with(16 * MIB - 24, EvictPolicy::Discard)
            .unwrap();
        let data = pattern(off.size() as usize, 9);
        {
            let mut s = vision.session().unwrap();
            s.write(&off, 0, &data).unwrap();
            s.write(&disc, 0, &pattern(disc.size() as usize, 3))
                .unwrap();
        }
        // The Guaranteed context needs most of the device: the BestEffort buffers go.
        let weights = llm.create_buffer(48 * MIB).unwrap();
        {
            let _s = llm.session().unwrap();
            assert!(weights.is_resident());
        }
        assert!(!off.is_resident() || !disc.is_resident());
        // The next vision session restores them (evicting the llm weights, now unpinned?
        // No: Guaranteed buffers are never evicted, so vision must fit beside them).
        let u = vision.usage();
        assert!(u.evicted > 0, "{u:?}");
        drop(weights);
        let mut s = vision.session().unwrap();
        let mut back = vec![0u8; data.len()];
        s.read(&off, 0, &mut back).unwrap();
        assert!(back == data, "offloaded bytes changed");
        assert!(disc.take_discarded(), "the owner is told to reload");
        assert!(!disc.take_discarded());
        drop(s);
        let snap = rt.snapshot();
        let row = snap.contexts.iter().find(|c| c.name == "vision").unwrap();
        assert!(row.evictions >= 1 && row.restores >= 1, "{row:?}");
    }

    pub fn scratch_is_freed_in_stream_order_at_session_end(open: Open) {
        let rt = runtime(open, 256 * MIB, 1.0);
        let ctx = rt.create_context(ContextSpec::new("m", 64 * MIB)).unwrap();
        {
            let mut s = ctx.session().unwrap();
            let a = s.alloc(MIB).unwrap();
            let b = s.alloc(4 * MIB).unwrap();
            assert!(a.range.end() <= b.range.ptr.0 || b.range.end() <= a.range.ptr.0);
            assert!(matches!(
                s.alloc(128 * MIB),
                Err(RuntimeError::BudgetExceeded { .. })
            ));
            rt.device().memset(a.range, 1, s.stream()).unwrap();
        }
        let stats = rt.pool_stats();
        assert_eq!(stats.live_bytes, 0, "scratch freed when the session ended");
    }

    pub async fn events_order_work_across_contexts(open: Open) {
        let rt = runtime(open, 256 * MIB, 1.0);
        let a = rt
            .create_context(ContextSpec::new("producer", 32 * MIB))
            .unwrap();
        let b = rt
            .create_context(ContextSpec::new("consumer", 32 * MIB))
            .unwrap();
        let buf = a.create_buffer(MIB).unwrap();
        let mut sa = a.session_async().await.unwrap();
        sa.write(&buf, 0, &pattern(MIB as usize, 5)).unwrap();
        let ev = sa.record_event().unwrap();
        let sb = b.session_async().await.unwrap();
        sb.wait_event(&ev).unwrap();
        ev.wait().await.unwrap();
        assert!(ev.is_complete().unwrap());
        ev.synchronize().unwrap();
        sb.synchronize().unwrap();
        // An event of another runtime is refused.
        let rt2 = runtime(open, 64 * MIB, 1.0);
        let c = rt2.create_context(ContextSpec::new("other", MIB)).unwrap();
        let sc = c.session().unwrap();
        assert!(matches!(
            sc.wait_event(&ev),
            Err(RuntimeError::Foreign { what: "event", .. })
        ));
    }

    pub async fn waiting_sessions_are_served_in_tier_order(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let hog = rt
            .create_context(ContextSpec::new("hog", 56 * MIB))
            .unwrap();
        // The BestEffort context needs 48 MiB, so it cannot be resident beside the
        // Burstable one's 24: the two are granted one after the other, in tier order.
        let be = rt.create_context(ContextSpec::new("be", 48 * MIB)).unwrap();
        let bu = rt
            .create_context(ContextSpec::new("bu", 64 * MIB).base(8 * MIB))
            .unwrap();
        assert_eq!(bu.tier(), Tier::Burstable);
        // Buffers are evictable, so all of them exist at once though they add up to 128 MiB.
        let hb = hog.create_buffer(56 * MIB).unwrap();
        let bb = be.create_buffer(48 * MIB).unwrap();
        let ub: Vec<_> = (0..3).map(|_| bu.create_buffer(8 * MIB).unwrap()).collect();
        // The hog's session needs 56 of 64 MiB: the BestEffort buffer goes first, then the
        // Burstable ones down to (never below) the 8 MiB base.
        let held = hog.session_async().await.unwrap();
        assert!(!bb.is_resident());
        assert_eq!(
            ub.iter().filter(|b| b.is_resident()).count(),
            1,
            "the base stays"
        );
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let spawn = |ctx: gpushare::Context, name: &'static str| {
            let order = order.clone();
            tokio::spawn(async move {
                let s = ctx.session_async().await.unwrap();
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(30)).await;
                drop(s);
            })
        };
        let queued = |n: usize| {
            let rt = rt.clone();
            async move {
                for _ in 0..500 {
                    if rt.waiting_sessions() == n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                panic!(
                    "expected {n} waiting sessions, found {}",
                    rt.waiting_sessions()
                );
            }
        };
        // A waiter that joins the line tries once more at once, on a blocking thread; a
        // try begun while it was first in line may still win once memory comes back,
        // whoever is first by then. Each is given time to end its try before the next
        // comes (without it, the BestEffort try was served first about once in fifty runs
        // of the whole suite on a loaded machine).
        let settle = || tokio::time::sleep(Duration::from_millis(200));
        let t1 = spawn(be.clone(), "be");
        queued(1).await;
        settle().await;
        let t2 = spawn(bu.clone(), "bu");
        queued(2).await;
        settle().await;
        assert!(
            order.lock().unwrap().is_empty(),
            "both wait while the hog is pinned"
        );
        drop(held);
        t1.await.unwrap();
        t2.await.unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            vec!["bu", "be"],
            "Burstable first, though it came second"
        );
        drop((hb, bb, ub));
        assert_eq!(rt.pool_stats().in_use_bytes, 0);
    }

    pub fn a_waiting_sessions_handlers_are_told_what_its_working_set_lacks(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let v = rt.create_context(ContextSpec::new("v", 64 * MIB)).unwrap();
        let hog = rt
            .create_context(ContextSpec::new("hog", 64 * MIB))
            .unwrap();
        let vb = v.create_buffer(32 * MIB - 4096).unwrap();
        let hb = hog.create_buffer(48 * MIB).unwrap();
        assert!(!vb.is_resident());
        let held = hog.session().unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let _handler = {
            let asked = asked.clone();
            rt.on_memory_pressure(move |info| {
                asked.store(info.requested, Ordering::SeqCst);
                Pressure::Deny
            })
        };
        let t = {
            let v = v.clone();
            std::thread::spawn(move || v.session().map(drop))
        };
        for _ in 0..500 {
            if asked.load(Ordering::SeqCst) != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            asked.load(Ordering::SeqCst),
            vb.size(),
            "the evicted buffer's bytes"
        );
        // A denial leaves the session waiting for the hog's memory, not failed.
        drop(held);
        t.join().unwrap().unwrap();
        drop((vb, hb));
    }

    /// A context `v` whose buffer another context, `hog`, pushed out, and a handler that
    /// releases memory (it opens and ends a session of a third context) and counts its
    /// calls. Such a release moves the release generation and wakes the first in line:
    /// the waiter whose try asked the handler. The try itself saw what the handler freed;
    /// the release must not make it try again, ask again, and so on for as long as the
    /// memory it waits for stays held.
    struct ReleasingHandler {
        v: gpushare::Context,
        hog: gpushare::Context,
        calls: Arc<AtomicUsize>,
        _keep: (
            gpushare::Buffer,
            gpushare::Buffer,
            gpushare::PressureRegistration,
        ),
        rt: Runtime,
    }

    fn releasing_handler(open: Open) -> ReleasingHandler {
        let rt = runtime(open, 64 * MIB, 4.0);
        let idle = rt.create_context(ContextSpec::new("idle", MIB)).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let handler = {
            let calls = calls.clone();
            rt.on_memory_pressure(move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                drop(idle.session());
                Pressure::Allow
            })
        };
        let v = rt.create_context(ContextSpec::new("v", 64 * MIB)).unwrap();
        let hog = rt
            .create_context(ContextSpec::new("hog", 64 * MIB))
            .unwrap();
        let vb = v.create_buffer(32 * MIB - 4096).unwrap();
        let hb = hog.create_buffer(48 * MIB).unwrap();
        assert!(!vb.is_resident());
        ReleasingHandler {
            v,
            hog,
            calls,
            _keep: (vb, hb, handler),
            rt,
        }
    }

    impl ReleasingHandler {
        /// Check that the handler ran once or a few times, not in a loop.
        fn asked_only_a_few_times(&self) {
            let n = self.calls.swap(0, Ordering::SeqCst);
            assert!(
                (1..=3).contains(&n),
                "the handler was asked {n} times while nothing else was released"
            );
            assert_eq!(self.rt.waiting_sessions(), 0);
        }
    }

    pub fn a_handler_that_releases_memory_does_not_make_the_waiter_try_again_and_again(open: Open) {
        let t = releasing_handler(open);
        let held = t.hog.session().unwrap();
        let r = t.v.session_timeout(Duration::from_millis(300)).map(drop);
        assert!(
            matches!(r, Err(RuntimeError::SessionTimedOut { .. })),
            "{r:?}"
        );
        t.asked_only_a_few_times();
        // The hog's end releases its memory: the session gets in.
        drop(held);
        drop(t.v.session().unwrap());
    }

    pub async fn a_handler_that_releases_memory_does_not_make_an_awaited_waiter_try_again_and_again(
        open: Open,
    ) {
        let t = releasing_handler(open);
        let held = t.hog.session().unwrap();
        let r = tokio::time::timeout(Duration::from_millis(300), t.v.session_async()).await;
        assert!(
            r.is_err(),
            "the session got in while the hog held the memory"
        );
        t.asked_only_a_few_times();
        drop(held);
        drop(t.v.session_async().await.unwrap());
    }

    pub fn pressure_handlers_run_in_order_and_panics_are_denials(open: Open) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let cache_owner = rt
            .create_context(ContextSpec::new("cache", 64 * MIB))
            .unwrap();
        let needy = rt
            .create_context(ContextSpec::new("needy", 64 * MIB))
            .unwrap();
        let cache = Arc::new(std::sync::Mutex::new(Some(
            cache_owner.create_buffer(48 * MIB).unwrap(),
        )));
        let _pin = cache_owner.session().unwrap(); // pinned: eviction cannot take it
        let calls = Arc::new(AtomicUsize::new(0));
        let _handler = {
            let (cache, calls) = (cache.clone(), calls.clone());
            cache_owner.on_memory_pressure(move |info| {
                calls.fetch_add(1, Ordering::SeqCst);
                assert_eq!(info.context.name(), "needy");
                assert!(info.requested >= 32 * MIB);
                // Drop the KV cache; it is freed when the pinning session ends.
                cache.lock().unwrap().take();
                Pressure::Allow
            })
        };
        let err = needy.create_buffer(32 * MIB).unwrap_err();
        assert!(calls.load(Ordering::SeqCst) >= 1);
        assert!(
            matches!(
                err,
                RuntimeError::OutOfMemory { .. } | RuntimeError::PressureDenied { .. }
            ),
            "{err}"
        );
        drop(_pin);
        // Now the dropped cache is really freed and the allocation fits.
        let b = needy.create_buffer(32 * MIB).unwrap();
        drop(b);
        // A panicking handler is contained and counts as a denial.
        let rt2 = runtime(open, 16 * MIB, 4.0);
        let x = rt2.create_context(ContextSpec::new("x", 16 * MIB)).unwrap();
        let _keep = x.create_buffer(12 * MIB).unwrap();
        let _s = x.session().unwrap();
        let _bug = rt2.on_memory_pressure(|_| panic!("handler bug"));
        assert!(matches!(
            x.create_buffer(8 * MIB),
            Err(RuntimeError::PressureDenied { .. } | RuntimeError::BudgetExceeded { .. })
        ));
    }

    pub fn snapshot_prints_and_serializes(open: Open) {
        let rt = runtime(open, 256 * MIB, 1.0);
        let a = rt
            .create_context(ContextSpec::new("alpha", 64 * MIB).base(64 * MIB))
            .unwrap();
        let _b = a.create_buffer(8 * MIB).unwrap();
        let snap = rt.snapshot();
        let text = snap.to_string();
        assert!(text.contains("| alpha | Guaranteed |"), "{text}");
        let json = snap.to_json();
        assert!(json.contains("\"name\": \"alpha\""), "{json}");
        assert_eq!(snap.contexts[0].used_bytes, 8 * MIB);
        assert_eq!(rt.available_vram(), 256 * MIB - 8 * MIB);
    }

    pub fn a_context_outlives_its_handles_while_a_session_lives(open: Open) {
        let rt = runtime(open, 64 * MIB, 1.0);
        let ctx = rt
            .create_context(ContextSpec::new("m", 32 * MIB).base(16 * MIB))
            .unwrap();
        let buf = ctx.create_buffer(MIB).unwrap();
        // A session borrows the handle it was opened on, so that handle cannot go first
        // (`drop(ctx)` here does not compile); every other handle can.
        let opener = ctx.clone();
        let mut s = opener.session().unwrap();
        drop(ctx);
        s.write(&buf, 0, &[1, 2, 3]).unwrap();
        drop(buf); // freed when the session ends
        assert_eq!(rt.pool_stats().owners.len(), 1);
        drop(s);
        assert_eq!(rt.pool_stats().owners.len(), 1, "a handle is left");
        drop(opener);
        assert_context_gone(&rt, "m", 64 * MIB);
    }

    pub fn a_handler_that_owns_a_buffer_goes_with_its_registration(open: Open) {
        let rt = runtime(open, 64 * MIB, 1.0);
        let ctx = rt
            .create_context(ContextSpec::new("kv", 32 * MIB).base(16 * MIB))
            .unwrap();
        // A cache that only the handler holds: the handler owns a buffer of its context.
        let cache = Arc::new(std::sync::Mutex::new(Some(ctx.create_buffer(MIB).unwrap())));
        let calls = Arc::new(AtomicUsize::new(0));
        let registration = {
            let calls = calls.clone();
            ctx.on_memory_pressure(move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                cache.lock().unwrap().take();
                Pressure::Allow
            })
        };
        drop(ctx);
        // The registration keeps the handler, its buffer and so the context.
        assert_eq!(rt.snapshot().contexts.len(), 1);
        drop(registration);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_context_gone(&rt, "kv", 64 * MIB);
        // A dropped registration's handler no longer runs.
        let rt = runtime(open, 64 * MIB, 4.0);
        let holder = rt
            .create_context(ContextSpec::new("holder", 64 * MIB))
            .unwrap();
        let needy = rt
            .create_context(ContextSpec::new("needy", 64 * MIB))
            .unwrap();
        let _held = holder.create_buffer(48 * MIB).unwrap();
        let _pin = holder.session().unwrap(); // pinned: only handlers could free memory
        let ran = Arc::new(AtomicUsize::new(0));
        // Registered first, so it would run first (and its denial end the round).
        let gone = {
            let ran = ran.clone();
            rt.on_memory_pressure(move |_| {
                ran.fetch_add(100, Ordering::SeqCst);
                Pressure::Deny
            })
        };
        let kept = {
            let ran = ran.clone();
            rt.on_memory_pressure(move |_| {
                ran.fetch_add(1, Ordering::SeqCst);
                Pressure::Deny
            })
        };
        drop(gone);
        assert!(needy.create_buffer(32 * MIB).is_err());
        assert_eq!(ran.load(Ordering::SeqCst), 1, "only the kept handler ran");
        drop(kept);
    }

    pub fn a_waiter_gets_in_while_another_contexts_sessions_never_stop_overlapping(open: Open) {
        let rt = Runtime::builder()
            .with_device(open())
            .memory_fraction(1.0)
            .memory_limit(64 * MIB)
            .overcommit(4.0)
            .aging(Duration::from_millis(20))
            .build()
            .unwrap();
        let (a, b) = contexts_a_b(&rt);
        let _a_buf = a.create_buffer(40 * MIB).unwrap();
        let _b_buf = b.create_buffer(40 * MIB).unwrap();
        // Two threads keep sessions of `a` live without a gap: each opens its next one
        // while the other's is live, so `a`'s buffer stays pinned for as long as they go on.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let turns = Arc::new(AtomicUsize::new(0));
        let users: Vec<_> = (0..2)
            .map(|i| {
                let (a, stop, turns) = (a.clone(), stop.clone(), turns.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(1) * i);
                    while !stop.load(Ordering::SeqCst) {
                        let s = a.session_timeout(Duration::from_secs(20)).unwrap();
                        turns.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(2));
                        drop(s);
                    }
                })
            })
            .collect();
        wait_until("a's sessions started", || turns.load(Ordering::SeqCst) > 4);
        // `b` needs the memory `a`'s buffer holds. Newcomers of `a` go ahead of it for
        // one aging period (20 ms), then wait behind it; `a`'s live sessions end, and `b`
        // gets in. Before the line held newcomers back, `b` waited for as long as `a`'s
        // sessions kept coming, here until the timeout.
        let got = b.session_timeout(Duration::from_secs(10));
        stop.store(true, Ordering::SeqCst);
        let got = got.expect("b waited for as long as a's sessions came");
        drop(got);
        for u in users {
            u.join().unwrap();
        }
        assert_eq!(rt.waiting_sessions(), 0);
    }

    pub fn waiters_of_a_context_just_served_go_ahead_of_the_line(open: Open) {
        use std::future::Future;
        use std::task::{Context as TaskCx, Poll, Waker};
        let rt = runtime(open, 64 * MIB, 4.0);
        let mk = |name: &str| {
            rt.create_context(ContextSpec::new(name, 64 * MIB).tier(Tier::BestEffort))
                .unwrap()
        };
        let (a, b, c) = (mk("a"), mk("b"), mk("c"));
        let _bufs: Vec<_> = [&a, &b, &c]
            .iter()
            .map(|ctx| ctx.create_buffer(40 * MIB).unwrap())
            .collect();
        let live_b = b.session().unwrap();
        // Outside a tokio runtime the futures try in their polls. Each joins the line: a
        // first session of `a`, one of `c`, a second of `a`; all need what `b` holds.
        let (w1, wc, w2) = (counter(), counter(), counter());
        let (k1, kc, k2) = (
            Waker::from(w1.clone()),
            Waker::from(wc.clone()),
            Waker::from(w2.clone()),
        );
        let mut a1 = Box::pin(a.session_async());
        let mut on_c = Box::pin(c.session_async());
        let mut a2 = Box::pin(a.session_async());
        assert!(a1.as_mut().poll(&mut TaskCx::from_waker(&k1)).is_pending());
        assert!(on_c
            .as_mut()
            .poll(&mut TaskCx::from_waker(&kc))
            .is_pending());
        assert!(a2.as_mut().poll(&mut TaskCx::from_waker(&k2)).is_pending());
        assert_eq!(rt.waiting_sessions(), 3);
        // Each looks again, as an executor would after the wake-ups of the tries (a look
        // that finds its set not resident wakes the first in line, which looks last): all
        // registered, none woken since.
        assert!(on_c
            .as_mut()
            .poll(&mut TaskCx::from_waker(&kc))
            .is_pending());
        assert!(a2.as_mut().poll(&mut TaskCx::from_waker(&k2)).is_pending());
        assert!(a1.as_mut().poll(&mut TaskCx::from_waker(&k1)).is_pending());
        let (w1_before, w2_before) = (w1.wakes(), w2.wakes());
        drop(live_b);
        assert!(w1.wakes() > w1_before, "the first in line is woken");
        let Poll::Ready(Ok(s1)) = a1.as_mut().poll(&mut TaskCx::from_waker(&k1)) else {
            panic!("the first of `a` gets `b`'s memory");
        };
        // `c` is first in line now, and waits for memory `a`'s live session holds. The
        // second of `a` needs nothing more: it is woken, and goes ahead of `c`.
        assert!(
            w2.wakes() > w2_before,
            "the other waiter of the context just served was not woken"
        );
        let Poll::Ready(Ok(s2)) = a2.as_mut().poll(&mut TaskCx::from_waker(&k2)) else {
            panic!("the second of `a` waits behind `c`");
        };
        assert!(on_c
            .as_mut()
            .poll(&mut TaskCx::from_waker(&kc))
            .is_pending());
        drop((s1, s2));
        let Poll::Ready(Ok(s)) = on_c.as_mut().poll(&mut TaskCx::from_waker(&kc)) else {
            panic!("`c` gets in once `a`'s sessions end");
        };
        drop(s);
        assert_eq!(rt.waiting_sessions(), 0);
    }

    pub fn a_newcomer_that_restores_its_context_wakes_its_waiters_in_line(open: Open) {
        use std::future::Future;
        use std::task::{Context as TaskCx, Poll, Waker};
        let rt = runtime(open, 64 * MIB, 4.0);
        let mk = |name: &str| {
            rt.create_context(ContextSpec::new(name, 64 * MIB).tier(Tier::BestEffort))
                .unwrap()
        };
        let (a, b, c, d) = (mk("a"), mk("b"), mk("c"), mk("d"));
        let _a_buf = a.create_buffer(20 * MIB).unwrap();
        let _c_buf = c.create_buffer(60 * MIB).unwrap();
        let _b_buf = b.create_buffer(40 * MIB).unwrap();
        let d_buf = d.create_buffer(20 * MIB).unwrap();
        // `b` and `d` are live and hold 60 MiB; `a` and `c` are evicted.
        let live_b = b.session().unwrap();
        let live_d = d.session().unwrap();
        let (wc, w1) = (counter(), counter());
        let (kc, k1) = (Waker::from(wc.clone()), Waker::from(w1.clone()));
        // Outside a tokio runtime the futures try in their polls: `c` (60 MiB) waits first
        // in line, `a` (20 MiB) behind it.
        let mut on_c = Box::pin(c.session_async());
        let mut a1 = Box::pin(a.session_async());
        assert!(on_c
            .as_mut()
            .poll(&mut TaskCx::from_waker(&kc))
            .is_pending());
        assert!(a1.as_mut().poll(&mut TaskCx::from_waker(&k1)).is_pending());
        assert!(on_c
            .as_mut()
            .poll(&mut TaskCx::from_waker(&kc))
            .is_pending());
        assert_eq!(rt.waiting_sessions(), 2);
        // `d` goes: 24 MiB free, too little for `c`, which stays first and waits for `b`.
        let d_stream = live_d.stream().clone();
        drop(live_d);
        drop(d_buf);
        // Its buffer is freed in stream order: once the work queued on its stream is done.
        rt.device().synchronize_stream(&d_stream).unwrap();
        assert!(on_c
            .as_mut()
            .poll(&mut TaskCx::from_waker(&kc))
            .is_pending());
        let before = w1.wakes();
        // A newcomer of `a` goes ahead of `c` (first for less than an aging period) and
        // restores `a`'s buffer into the free memory. The waiter of `a` behind `c` is woken,
        // and goes too.
        let a2 = a.session_timeout(Duration::from_secs(20)).unwrap();
        assert!(
            w1.wakes() > before,
            "the waiter of the context the newcomer made resident was not woken"
        );
        let Poll::Ready(Ok(s1)) = a1.as_mut().poll(&mut TaskCx::from_waker(&k1)) else {
            panic!("the waiter of `a` waits behind `c` although `a` is resident");
        };
        assert!(on_c
            .as_mut()
            .poll(&mut TaskCx::from_waker(&kc))
            .is_pending());
        drop((s1, a2, live_b));
        drop(on_c);
        assert_eq!(rt.waiting_sessions(), 0);
    }

    pub fn a_pressure_handler_opens_a_session_ahead_of_a_line_that_waited_long(open: Open) {
        use std::future::Future;
        use std::task::{Context as TaskCx, Waker};
        let rt = Runtime::builder()
            .with_device(open())
            .memory_fraction(1.0)
            .memory_limit(64 * MIB)
            .overcommit(4.0)
            .aging(Duration::from_millis(20))
            .build()
            .unwrap();
        let best_effort = |name: &str| {
            rt.create_context(ContextSpec::new(name, 64 * MIB).tier(Tier::BestEffort))
                .unwrap()
        };
        let (a, b, z) = (best_effort("a"), best_effort("b"), best_effort("z"));
        // A small Guaranteed context, whose buffer is never evicted.
        let k = rt
            .create_context(ContextSpec::new("k", 4 * MIB).tier(Tier::Guaranteed))
            .unwrap();
        let _k_buf = k.create_buffer(4 * MIB).unwrap();
        let _b_buf = b.create_buffer(40 * MIB).unwrap();
        let _a_buf = a.create_buffer(40 * MIB).unwrap();
        let live_a = a.session().unwrap();
        // `b` waits first in line for `a`'s memory, for longer than an aging period: from
        // then on newcomers wait behind it.
        let mut on_b = Box::pin(b.session_async());
        assert!(on_b
            .as_mut()
            .poll(&mut TaskCx::from_waker(Waker::noop()))
            .is_pending());
        std::thread::sleep(Duration::from_millis(60));
        // A handler that needs a session of `k` to give memory back. It runs on this
        // thread, which holds `a`'s session: behind `b`, its session would wait for ever.
        let got = Arc::new(std::sync::Mutex::new(None));
        let _handler = {
            let (k, got) = (k.clone(), got.clone());
            rt.on_memory_pressure(move |_| {
                let r = k.session_timeout(Duration::from_secs(5)).map(drop);
                *got.lock().unwrap() = Some(r);
                Pressure::Deny
            })
        };
        assert!(z.create_buffer(30 * MIB).is_err());
        let got = got.lock().unwrap().take();
        assert!(
            matches!(got, Some(Ok(()))),
            "the handler's session waited behind the line: {got:?}"
        );
        drop(live_a);
        drop(on_b);
        assert_eq!(rt.waiting_sessions(), 0);
    }

    pub fn a_shortage_met_inside_a_pressure_handler_is_not_handed_to_the_handlers_again(
        open: Open,
    ) {
        let rt = runtime(open, 64 * MIB, 4.0);
        let (a, k) = contexts_a_b(&rt);
        let z = rt.create_context(ContextSpec::new("z", 64 * MIB)).unwrap();
        let _k_buf = k.create_buffer(30 * MIB).unwrap();
        let _a_buf = a.create_buffer(40 * MIB).unwrap(); // `k`'s buffer goes out
        let live_a = a.session().unwrap();
        // The handler opens a session of `k`, whose buffer cannot come back beside `a`'s.
        let calls = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(std::sync::Mutex::new(None));
        let _handler = {
            let (k, calls, got) = (k.clone(), calls.clone(), got.clone());
            rt.on_memory_pressure(move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                let r = k.session_timeout(Duration::from_millis(300)).map(drop);
                *got.lock().unwrap() = Some(r);
                Pressure::Deny
            })
        };
        assert!(z.create_buffer(30 * MIB).is_err());
        // Asking the handler again from its own session's try recursed until the stack ran
        // out.
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Nor does that session wait (here it would until its timeout): short of memory,
        // it fails at once.
        let got = got.lock().unwrap().take();
        assert!(
            matches!(got, Some(Err(RuntimeError::OutOfMemory { .. }))),
            "{got:?}"
        );
        drop(live_a);
        assert_eq!(rt.waiting_sessions(), 0);
    }

    pub fn a_context_with_its_own_compute_share_gives_it_back(open: Open) {
        let rt = runtime(open, 256 * MIB, 1.0);
        // A device without green contexts separates contexts by stream priority only.
        let splits = rt.device().info().green_contexts;
        // Each context takes 60% of the SMs; without giving the share back on drop the second
        // round could not be placed.
        for round in 0..3 {
            let c = rt
                .create_context(ContextSpec::new(format!("c{round}"), MIB).compute(0.6))
                .unwrap();
            assert!(
                match c.isolation() {
                    gpushare::qos::Isolation::SmPartition { .. } => splits,
                    gpushare::qos::Isolation::StreamPriority { .. } => !splits,
                    _ => false,
                },
                "{:?}",
                c.isolation()
            );
        }
    }
}

#[test]
fn compute_shares_added_later_never_oversubscribe_the_sms() {
    let (rt, sim) = sim_runtime(256 * MIB, 1.0);
    let sms = sim.info().sm_count;
    let a = rt
        .create_context(ContextSpec::new("a", MIB).compute(0.53))
        .unwrap();
    let b = rt
        .create_context(ContextSpec::new("b", MIB).compute(0.47))
        .unwrap();
    let (sa, sb) = (a.session().unwrap(), b.session().unwrap());
    let (na, nb) = (
        sa.stream().partition_sms().unwrap(),
        sb.stream().partition_sms().unwrap(),
    );
    assert!(na + nb <= sms, "{na} + {nb} SMs on a device of {sms}");
    // What each context says is what its stream runs on.
    for (ctx, n) in [(&a, na), (&b, nb)] {
        assert!(
            matches!(ctx.isolation(), gpushare::qos::Isolation::SmPartition { granted, .. } if *granted == n),
            "{:?} against {n} SMs",
            ctx.isolation()
        );
    }
    // Another context cannot join `a`'s own partition.
    let err = rt
        .create_context(ContextSpec::new("c", MIB).partition("a"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Qos(gpushare::qos::QosError::PrivatePartition { .. })
        ),
        "{err}"
    );
    // `a` goes while `b` runs: a new share takes `a`'s SMs, and `b` keeps its own.
    drop(sa);
    drop(a);
    let c = rt
        .create_context(ContextSpec::new("c", MIB).compute(0.3))
        .unwrap();
    let sc = c.session().unwrap();
    let nc = sc.stream().partition_sms().unwrap();
    assert_eq!(sb.stream().partition_sms(), Some(nb));
    assert!(nb + nc <= sms, "{nb} + {nc} SMs on a device of {sms}");
}

/// What `tracing` logs while `f` runs on this thread.
fn logs_of(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = sink.0.lock().unwrap().clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn a_compute_share_trimmed_to_the_sms_left_says_so() {
    let (rt, sim) = sim_runtime(256 * MIB, 1.0);
    let quarter = sim.info().sm_count / 4;
    let share = |name: &str, share: f64| {
        rt.create_context(ContextSpec::new(name, MIB).compute(share))
            .unwrap()
    };
    let (a, b, c) = (share("a", 0.25), share("b", 0.25), share("c", 0.25));
    // `b`'s group is vacated; half the SMs are free, but not in one piece.
    drop(b);
    let mut d = None;
    let logs = logs_of(|| d = Some(share("d", 0.5)));
    let d = d.unwrap();
    match d.isolation() {
        gpushare::qos::Isolation::SmPartition { requested, granted } => {
            assert!(
                granted < requested && *granted <= quarter,
                "{:?}",
                d.isolation()
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        logs.contains("fewer SMs than it asked for") && logs.contains("d"),
        "{logs}"
    );
    // A share that gets what it asks for says nothing.
    drop(d);
    let logs = logs_of(|| drop(share("e", 0.25)));
    assert!(!logs.contains("fewer SMs"), "{logs}");
    drop((a, c));
}

#[test]
fn an_offload_copy_that_faults_as_it_runs_loses_no_data() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let vision = rt
        .create_context(ContextSpec::new("vision", 64 * MIB))
        .unwrap();
    let llm = rt
        .create_context(ContextSpec::new("llm", 48 * MIB).base(48 * MIB))
        .unwrap();
    let buf = vision.create_buffer(40 * MIB).unwrap();
    let data = pattern(buf.size() as usize, 78);
    vision.session().unwrap().write(&buf, 0, &data).unwrap();
    // The copy out is queued without error, and faults on the copy stream as it runs.
    sim.fault_copy_as_it_runs(1);
    let err = llm.create_buffer(40 * MIB).unwrap_err();
    assert!(
        err.to_string().contains("injected fault"),
        "the copy's fault reaches the caller: {err}"
    );
    assert!(buf.is_resident(), "the buffer stays where it was");
    let mut back = vec![0u8; data.len()];
    vision.session().unwrap().read(&buf, 0, &mut back).unwrap();
    assert!(back == data);
    let st = rt.pool_stats();
    assert_eq!((st.evictions, st.in_use_bytes), (0, buf.size()));
    // The fault broke the copy stream it ran on, not the runtime's moves: the next
    // offload and restore run on a new one, and the data comes back whole.
    let other = llm.create_buffer(40 * MIB).unwrap();
    assert!(!buf.is_resident());
    drop(other);
    vision.session().unwrap().read(&buf, 0, &mut back).unwrap();
    assert!(back == data);
}

#[test]
fn a_failed_offload_copy_loses_no_data() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let vision = rt
        .create_context(ContextSpec::new("vision", 64 * MIB))
        .unwrap();
    let llm = rt
        .create_context(ContextSpec::new("llm", 48 * MIB).base(48 * MIB))
        .unwrap();
    let buf = vision.create_buffer(40 * MIB).unwrap();
    let data = pattern(buf.size() as usize, 77);
    vision.session().unwrap().write(&buf, 0, &data).unwrap();
    sim.fail_nth(FaultOp::Copy, 1);
    let err = llm.create_buffer(40 * MIB).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("injected"),
        "the copy error reaches the caller: {msg}"
    );
    assert!(buf.is_resident(), "the buffer stays where it was");
    let mut back = vec![0u8; data.len()];
    vision.session().unwrap().read(&buf, 0, &mut back).unwrap();
    assert!(back == data);
    // Without the fault the eviction goes through.
    let w = llm.create_buffer(40 * MIB).unwrap();
    assert!(!buf.is_resident());
    drop(w);
}

#[test]
fn a_failed_staging_pin_leaves_nothing_behind() {
    let (rt, sim) = sim_runtime(64 * MIB, 1.0);
    let c = rt.create_context(ContextSpec::new("c", 32 * MIB)).unwrap();
    sim.fail_nth(FaultOp::PinnedAlloc, 1);
    assert!(matches!(
        c.create_buffer(8 * MIB),
        Err(RuntimeError::Device(_))
    ));
    assert_eq!(c.usage().used, 0, "the device memory went back");
    // Discard buffers need no staging.
    sim.fail_nth(FaultOp::PinnedAlloc, 1);
    let d = c.create_buffer_with(8 * MIB, EvictPolicy::Discard).unwrap();
    assert_eq!(
        sim.op_count(FaultOp::PinnedAlloc),
        1,
        "only the failed Offload buffer pinned"
    );
    sim.clear_faults();
    let o = c.create_buffer(8 * MIB).unwrap();
    drop((d, o));
    assert_eq!(c.usage().used, 0);
}

#[test]
fn a_buffer_whose_staging_pin_fails_is_freed_after_work_queued_on_its_memory() {
    let (rt, sim) = sim_runtime(160 * MIB, 2.0);
    let a = rt.create_context(ContextSpec::new("a", 96 * MIB)).unwrap();
    let b = rt.create_context(ContextSpec::new("b", 96 * MIB)).unwrap();
    let load = SpinLoad::new(rt.device().clone()).unwrap();
    let (old, done) = {
        // Scratch too large for the pool's caches: at the session's end it waits, in
        // order on a's stream, for a spin of about 50 ms.
        let mut s = a.session().unwrap();
        let scratch = s.alloc(80 * MIB).unwrap();
        load.launch(s.stream(), 1, 32, 75_000_000).unwrap();
        (scratch.range, s.record_event().unwrap())
    };
    let avail = rt.available_vram();
    if !done.is_complete().unwrap() {
        assert_eq!(
            avail,
            rt.capacity() - 80 * MIB,
            "memory still used by queued work is not available"
        );
    }
    // a's next buffer reuses that memory on a's stream, as it may; its staging then fails,
    // and the memory must not go to another stream before a's work is done.
    sim.fail_nth(FaultOp::PinnedAlloc, 1);
    assert!(matches!(
        a.create_buffer(80 * MIB),
        Err(RuntimeError::Device(_))
    ));
    let y = b.create_buffer(80 * MIB).unwrap();
    let running = !done.is_complete().unwrap();
    let at = b.session().unwrap().range(&y).unwrap();
    let overlaps = at.ptr.0 < old.end() && old.ptr.0 < at.end();
    assert!(
        !(overlaps && running),
        "b got memory that work still running on a's stream uses"
    );
}

#[test]
fn contexts_of_one_name_created_at_once_are_admitted_once() {
    let (rt, _sim) = sim_runtime(256 * MIB, 8.0);
    for round in 0..20 {
        let name = format!("m{round}");
        let go = Arc::new(std::sync::Barrier::new(8));
        let made: Vec<_> = (0..8)
            .map(|_| {
                let (rt, go, name) = (rt.clone(), go.clone(), name.clone());
                std::thread::spawn(move || {
                    go.wait();
                    rt.create_context(ContextSpec::new(name, 8 * MIB))
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let ok = made.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {ok} contexts named {name}");
        assert!(made
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, RuntimeError::DuplicateContext(_))));
    }
}

#[test]
fn a_bad_builder_setting_is_named_as_the_builder_names_it() {
    for (builder, named) in [
        (Runtime::builder().memory_fraction(1.5), "memory_fraction"),
        (Runtime::builder().memory_limit(0), "memory_limit"),
        (Runtime::builder().overcommit(0.5), "overcommit"),
        (Runtime::builder().aging(Duration::ZERO), "aging"),
    ] {
        match builder.device(BackendChoice::Sim).build() {
            Err(e @ RuntimeError::Qos(_)) => assert!(
                e.to_string().contains(&format!("RuntimeBuilder::{named}")),
                "{e}"
            ),
            other => panic!("expected a bad {named}, got {other:?}"),
        }
    }
}

#[test]
fn a_memory_limit_below_one_granule_is_refused() {
    let sim =
        Arc::new(SimDevice::with_config(SimConfig::default().total_memory(64 * MIB)).unwrap());
    let r = Runtime::builder()
        .with_device(sim)
        .memory_fraction(1.0)
        .memory_limit(4096)
        .build();
    match r {
        Err(RuntimeError::Pool(e)) => assert!(e.to_string().contains("granule"), "{e}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn buffers_made_and_dropped_by_many_threads_during_sessions_leave_nothing_behind() {
    let (rt, _sim) = sim_runtime(256 * MIB, 2.0);
    let ctx = rt.create_context(ContextSpec::new("m", 128 * MIB)).unwrap();
    let keep = Arc::new(ctx.create_buffer(8 * MIB).unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let (ctx, keep) = (ctx.clone(), keep.clone());
            std::thread::spawn(move || {
                let mut r = 0x2545_F491_4F6C_DD1Du64 ^ u64::from(t);
                let mut rand = move || {
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    r
                };
                let mut mine: Vec<gpushare::Buffer> = Vec::new();
                for i in 0..300u32 {
                    match rand() % 4 {
                        0 => {
                            if let Ok(b) = ctx.create_buffer(64 * 1024 + rand() % MIB) {
                                mine.push(b);
                            }
                        }
                        1 if !mine.is_empty() => {
                            let k = (rand() % mine.len() as u64) as usize;
                            drop(mine.swap_remove(k));
                        }
                        _ => {
                            let mut s = ctx.session().unwrap();
                            let data = [t, i as u8, 7, 9];
                            s.write(&keep, u64::from(t) * 16, &data).unwrap();
                            if let Some(b) = mine.last() {
                                // Pinned through the session if made after it started.
                                s.write(b, 0, &data).unwrap();
                                let mut back = [0u8; 4];
                                s.read(b, 0, &mut back).unwrap();
                                assert_eq!(back, data);
                            }
                            // Another thread may drop its buffers meanwhile.
                            std::thread::yield_now();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let keep = Arc::try_unwrap(keep).ok().unwrap();
    assert_eq!(
        ctx.usage().resident,
        keep.size(),
        "only the kept buffer is left"
    );
    drop(keep);
    let s = rt.pool_stats();
    assert_eq!((s.live_bytes, s.in_use_bytes), (0, 0), "{s:?}");
}

#[test]
fn a_working_set_restores_in_one_piece_when_its_own_buffers_split_the_free_memory() {
    let (rt, _sim) = sim_runtime(80 * MIB, 4.0);
    let v = rt.create_context(ContextSpec::new("v", 80 * MIB)).unwrap();
    let u = rt.create_context(ContextSpec::new("u", 80 * MIB)).unwrap();
    let g = rt
        .create_context(ContextSpec::new("g", 16 * MIB).base(16 * MIB))
        .unwrap();
    // Laid out from the bottom: v's W (32 MiB), v's A, u's T and v's B (16 MiB each).
    let w = v.create_buffer(32 * MIB).unwrap();
    let a = v.create_buffer(16 * MIB).unwrap();
    let t = u.create_buffer(16 * MIB).unwrap();
    let b = v.create_buffer(16 * MIB).unwrap();
    let (dw, da, db) = (pattern(4096, 1), pattern(4096, 2), pattern(4096, 3));
    {
        let mut s = v.session().unwrap();
        s.write(&w, 0, &dw).unwrap();
        s.write(&a, 0, &da).unwrap();
        s.write(&b, 0, &db).unwrap();
    }
    // u's buffer is used last, so W is the least recently used.
    drop(u.session().unwrap());
    // The Guaranteed weights push W out and take its lower half; u's buffer goes. The
    // 32 MiB free are now two holes of 16 MiB, with v's A between them.
    let x = g.create_buffer(16 * MIB).unwrap();
    assert!(!w.is_resident() && a.is_resident() && b.is_resident());
    drop(t);
    let s = rt.pool_stats();
    // (u's buffer may still wait for its stream's tail before it counts as free.)
    assert_eq!(s.free_bytes + s.pending_bytes, 32 * MIB, "{s:?}");
    assert_eq!(s.largest_free_bytes, 16 * MIB, "{s:?}");
    // v's next session moves its own buffers out and restores the whole set in one piece.
    let mut s = v.session().unwrap();
    let mut back = vec![0u8; 4096];
    for (buf, want) in [(&w, &dw), (&a, &da), (&b, &db)] {
        s.read(buf, 0, &mut back).unwrap();
        assert!(&back == want);
    }
    drop(s);
    drop((w, a, b, x, u));
}

/// Run a kernel that touches unmapped memory in a session of `ctx`: its stream breaks.
fn fault_in_a_session(sim: &SimDevice, ctx: &gpushare::Context) {
    let s = ctx.session().unwrap();
    let bad = gpushare::device::DeviceRange::new(gpushare::device::DevicePtr(8), 8);
    sim.launch_host(s.stream(), move |mem| mem.write(bad, &[0; 8]))
        .unwrap();
    let err = s.synchronize().unwrap_err();
    assert!(err.to_string().contains("unusable"), "{err}");
}

#[test]
fn a_faulting_kernel_in_one_context_costs_the_others_nothing() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let faulty = rt
        .create_context(ContextSpec::new("faulty", 16 * MIB))
        .unwrap();
    let healthy = rt
        .create_context(ContextSpec::new("healthy", 64 * MIB))
        .unwrap();
    let other = rt
        .create_context(ContextSpec::new("other", 48 * MIB).base(48 * MIB))
        .unwrap();
    let buf = healthy.create_buffer(40 * MIB).unwrap();
    let data = pattern(buf.size() as usize, 31);
    healthy.session().unwrap().write(&buf, 0, &data).unwrap();

    // A kernel of the faulty context touches memory that is not mapped.
    fault_in_a_session(&sim, &faulty);

    // The healthy context's buffer is offloaded for another context and comes back intact.
    let w = other.create_buffer(40 * MIB).unwrap();
    assert!(!buf.is_resident());
    drop(w);
    let mut back = vec![0u8; data.len()];
    healthy.session().unwrap().read(&buf, 0, &mut back).unwrap();
    assert!(back == data, "restored bytes differ");
}

#[test]
fn a_context_whose_kernel_faulted_gives_its_memory_up_to_others() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let faulty = rt
        .create_context(ContextSpec::new("faulty", 64 * MIB))
        .unwrap();
    let guaranteed = rt
        .create_context(ContextSpec::new("guaranteed", 48 * MIB).base(48 * MIB))
        .unwrap();
    let buf = faulty.create_buffer(40 * MIB).unwrap();
    let data = pattern(buf.size() as usize, 5);
    faulty.session().unwrap().write(&buf, 0, &data).unwrap();
    fault_in_a_session(&sim, &faulty);
    // Its broken stream runs nothing more, so its buffer is offloaded without a fence on
    // it, and the Guaranteed context gets its base.
    let w = guaranteed.create_buffer(40 * MIB).unwrap();
    assert!(!buf.is_resident());
    // The contents written before the fault were kept: a session restores them (on the
    // runtime's copy stream), though the context's own stream can run nothing more.
    drop(w);
    let mut s = faulty.session().unwrap();
    let range = s.range(&buf).unwrap();
    let mut back = vec![0u8; data.len()];
    sim.peek(range, &mut back).unwrap();
    assert!(back == data, "the offloaded bytes came back");
    assert!(
        s.read(&buf, 0, &mut back).is_err(),
        "its stream stays broken"
    );
}

/// Run `fut` on a runtime of one thread, on a thread of its own, and return its output.
/// Panics with `stuck` if it takes a minute: something blocked the runtime's only thread.
fn on_one_thread<T: Send + 'static>(
    stuck: &str,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let exec = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _ = tx.send(exec.block_on(fut));
    });
    rx.recv_timeout(Duration::from_secs(60)).expect(stuck)
}

/// Whether a session of `ctx`, awaited, reads `data` back from `buf`.
async fn reads_back(
    ctx: gpushare::Context,
    buf: &gpushare::Buffer,
    data: &[u8],
) -> Result<bool, RuntimeError> {
    let mut s = ctx.session_async().await?;
    let mut back = vec![0u8; data.len()];
    s.read(buf, 0, &mut back)?;
    Ok(back == data)
}

/// Return once the pool has a move (an eviction's or a restore's copy) under way, letting
/// other tasks of a one-thread runtime run meanwhile.
async fn a_move_in_flight(rt: &Runtime) {
    while rt.pool_stats().moves_in_flight == 0 {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Queue on `stream` a kernel that runs until the returned sender sends or is dropped.
fn hold(sim: &SimDevice, stream: &gpushare::device::Stream) -> std::sync::mpsc::Sender<()> {
    let (go, gate) = std::sync::mpsc::channel::<()>();
    sim.launch_host(stream, move |_| {
        let _ = gate.recv();
        Ok(())
    })
    .unwrap();
    go
}

#[test]
fn a_dropped_event_wait_lets_its_waker_go() {
    use std::future::Future;
    struct Wakes;
    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {}
    }
    let (rt, sim) = sim_runtime(64 * MIB, 1.0);
    let a = rt.create_context(ContextSpec::new("a", 8 * MIB)).unwrap();
    let s = a.session().unwrap();
    let go = hold(&sim, s.stream());
    let ev = s.record_event().unwrap();
    let wakes = Arc::new(Wakes);
    let waker = std::task::Waker::from(wakes.clone());
    let mut wait = Box::pin(ev.wait());
    let pending = wait
        .as_mut()
        .poll(&mut std::task::Context::from_waker(&waker));
    assert!(pending.is_pending());
    drop(waker);
    assert_eq!(
        Arc::strong_count(&wakes),
        2,
        "the waiting future keeps its waker"
    );
    // Dropped while the stream is still held: its callback has not run, and the task
    // that polled it is not kept, nor woken, until it does.
    drop(wait);
    assert_eq!(
        Arc::strong_count(&wakes),
        1,
        "a dropped wait kept its waker"
    );
    drop(go);
    s.synchronize().unwrap();
}

/// An event recorded before its stream's fault, and reached after it, reports the fault:
/// to a blocked thread, to an awaiting task and to a query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_behind_a_fault_reports_it() {
    let (rt, sim) = sim_runtime(64 * MIB, 1.0);
    let a = rt.create_context(ContextSpec::new("a", 16 * MIB)).unwrap();
    let s = a.session().unwrap();
    let go = hold(&sim, s.stream());
    let bad = gpushare::device::DeviceRange::new(gpushare::device::DevicePtr(8), 8);
    sim.launch_host(s.stream(), move |mem| mem.write(bad, &[0; 8]))
        .unwrap();
    let ev = s.record_event().unwrap();
    let waiting = tokio::spawn({
        let ev = ev.clone();
        async move { ev.wait().await }
    });
    drop(go);
    assert!(matches!(
        waiting.await.unwrap(),
        Err(RuntimeError::Device(
            gpushare::device::DeviceError::StreamBroken(_)
        ))
    ));
    assert!(ev.synchronize().is_err());
    assert!(ev.is_complete().is_err());
}

/// A context's name stays taken until its drop has ended: a drop waiting for its stream
/// still has its placement to undo, by name, and must not undo a new context's.
#[test]
fn a_name_is_taken_until_its_contexts_drop_has_ended() {
    let (rt, sim) = sim_runtime(64 * MIB, 1.0);
    let old = rt.create_context(ContextSpec::new("llm", 8 * MIB)).unwrap();
    let stream = old.session().unwrap().stream().clone();
    let go = hold(&sim, &stream);
    drop(stream);
    let dropping = std::thread::spawn(move || drop(old));
    wait_until("the old context is no longer listed", || {
        rt.snapshot().contexts.is_empty()
    });
    // Its drop waits for the held stream.
    std::thread::sleep(Duration::from_millis(20));
    assert!(matches!(
        rt.create_context(ContextSpec::new("llm", 8 * MIB)),
        Err(RuntimeError::DuplicateContext(_))
    ));
    drop(go);
    dropping.join().unwrap();
    // A snapshot that listed the context as its last handle went lets it go on a thread
    // of its own, whose teardown may end a moment after the join.
    wait_until("the name is free once the drop has ended", || {
        rt.create_context(ContextSpec::new("llm", 8 * MIB)).is_ok()
    });
}

/// Contexts `g` (Burstable), `a` and `b` (BestEffort) in 64 MiB: `g` keeps its 40 MiB (its
/// base), `b`'s 28 MiB went out for them, and 24 MiB are free, so neither 30 MiB for `a`
/// nor `b`'s set fits. With `b`'s buffer and `g`'s.
fn a_base_kept_and_a_set_out(
    rt: &Runtime,
) -> (
    gpushare::Context,
    gpushare::Context,
    gpushare::Context,
    [gpushare::Buffer; 2],
) {
    let g = rt
        .create_context(
            ContextSpec::new("g", 64 * MIB)
                .base(40 * MIB)
                .tier(Tier::Burstable),
        )
        .unwrap();
    let best_effort = |name: &str| {
        rt.create_context(ContextSpec::new(name, 64 * MIB).tier(Tier::BestEffort))
            .unwrap()
    };
    let (a, b) = (best_effort("a"), best_effort("b"));
    let theirs = b.create_buffer(28 * MIB).unwrap();
    let kept = g.create_buffer(40 * MIB).unwrap();
    assert!(!theirs.is_resident());
    (g, a, b, [theirs, kept])
}

/// A pressure handler that opens another context's session, called for a buffer's
/// creation, does not wait for the very creation that called it.
#[test]
fn a_pressure_handler_of_a_buffers_creation_may_open_a_session() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let (_g, a, b, _buffers) = a_base_kept_and_a_set_out(&rt);
    let outcome = Arc::new(std::sync::Mutex::new(None));
    let _handler = {
        let (b, outcome) = (b.clone(), outcome.clone());
        rt.on_memory_pressure(move |info| {
            if info.context.name() == "a" {
                let t = std::time::Instant::now();
                let r = b.session_timeout(Duration::from_secs(5)).map(drop);
                *outcome.lock().unwrap() = Some((r, t.elapsed()));
            }
            Pressure::Deny
        })
    };
    assert!(a.create_buffer(30 * MIB).is_err());
    let (r, took) = outcome.lock().unwrap().take().expect("the handler ran");
    assert!(
        !matches!(r, Err(RuntimeError::SessionTimedOut { .. })),
        "the handler's session waited for the creation that called it ({took:?})"
    );
}

/// A session that a pressure handler opens is tried once and never waits in line: the
/// handler runs inside another request's try, so it could wait for ever (here for a
/// session that the thread which called the handler holds).
#[test]
fn a_session_a_pressure_handler_opens_fails_rather_than_waits() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let (g, a, b, _buffers) = a_base_kept_and_a_set_out(&rt);
    let outcome = Arc::new(std::sync::Mutex::new(None));
    let _handler = {
        let (b, outcome) = (b.clone(), outcome.clone());
        rt.on_memory_pressure(move |info| {
            if info.context.name() == "a" {
                *outcome.lock().unwrap() = Some(b.session().map(drop));
            }
            Pressure::Deny
        })
    };
    // A live session of `g`, held by the thread that asks for `a`'s buffer: the only
    // session whose end could make room for `b`'s set.
    let (tx, rx) = std::sync::mpsc::channel();
    let asker = std::thread::spawn(move || {
        let live = g.session().unwrap();
        tx.send(a.create_buffer(30 * MIB).map(drop)).unwrap();
        drop(live);
    });
    let asked = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the handler's session waited in line for a session its own thread holds");
    assert!(asked.is_err(), "the handler denied");
    let r = outcome.lock().unwrap().take().expect("the handler ran");
    assert!(matches!(r, Err(RuntimeError::OutOfMemory { .. })), "{r:?}");
    asker.join().unwrap();
}

/// A handler that opens a session (which moves the session gate's release generation)
/// is asked once per try: the gate, seeing the generation moved with nothing live, tried
/// again, asked the handler again, and so on for ever.
#[test]
fn a_handler_that_opens_sessions_is_asked_once_per_try() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let z = rt
        .create_context(ContextSpec::new("z", 64 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let k = rt
        .create_context(ContextSpec::new("k", 4 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let g = rt
        .create_context(
            ContextSpec::new("g", 64 * MIB)
                .base(40 * MIB)
                .tier(Tier::Burstable),
        )
        .unwrap();
    let _k_buf = k.create_buffer(4 * MIB).unwrap();
    let _z_buf = z.create_buffer(28 * MIB).unwrap();
    let _g_buf = g.create_buffer(40 * MIB).unwrap(); // `z`'s buffer goes out
    assert!(!_z_buf.is_resident());
    let calls = Arc::new(AtomicUsize::new(0));
    let _handler = {
        let (k, calls) = (k.clone(), calls.clone());
        rt.on_memory_pressure(move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            drop(k.session());
            Pressure::Deny
        })
    };
    // Nothing is live and 20 MiB are free: `z`'s 28 MiB cannot come back.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        tx.send(z.session_timeout(Duration::from_secs(1)).map(drop))
            .unwrap()
    });
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the try asked the handler again and again");
    assert!(matches!(r, Err(RuntimeError::OutOfMemory { .. })), "{r:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A pressure handler that drops a buffer whose last work is still queued on its
/// context's stream makes room for the request that called it: the retry waits for that
/// work rather than fail.
#[test]
fn memory_a_handler_frees_behind_queued_work_serves_the_retry() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let keeper = rt
        .create_context(ContextSpec::new("keeper", 48 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let needy = rt
        .create_context(ContextSpec::new("needy", 48 * MIB).tier(Tier::BestEffort))
        .unwrap();
    // Never evicted (Guaranteed): only its handler can give it up.
    let cache = keeper.create_buffer(48 * MIB).unwrap();
    let go = {
        let mut s = keeper.session().unwrap();
        s.write(&cache, 0, &[7; 64]).unwrap();
        // Work queued after the write: the buffer's last use ends only with it.
        hold(&sim, s.stream())
    };
    let cache = Arc::new(std::sync::Mutex::new(Some(cache)));
    let _handler = {
        let cache = cache.clone();
        keeper.on_memory_pressure(move |_| {
            let dropped = cache.lock().unwrap().take();
            drop(dropped);
            // The queued work ends a moment after the handler has returned.
            let go = go.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                let _ = go.send(());
            });
            Pressure::Allow
        })
    };
    let buf = needy
        .create_buffer(32 * MIB)
        .expect("the dropped cache's memory, once its work was done");
    assert!(cache.lock().unwrap().is_none());
    drop(buf);
    assert_eq!(rt.pool_stats().in_use_bytes, 0);
}

#[test]
fn a_context_named_as_a_declared_partition_is_told_why_it_cannot_have_its_own_share() {
    let sim = Arc::new(SimDevice::with_config(SimConfig::default()).unwrap());
    let rt = Runtime::builder()
        .with_device(sim)
        .partition(
            "serving",
            gpushare::qos::PartitionLimits::default().compute(0.5),
        )
        .build()
        .unwrap();
    let err = rt
        .create_context(ContextSpec::new("serving", MIB).compute(0.3))
        .unwrap_err();
    assert!(
        matches!(
            &err,
            RuntimeError::Qos(gpushare::qos::QosError::PrivatePartitionNameTaken(n)) if n == "serving"
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("ContextSpec::partition"), "{err}");
    // Nothing of it is left: the name is free, and the declared partition takes it.
    rt.create_context(ContextSpec::new("serving", MIB).partition("serving"))
        .unwrap();
}

#[test]
fn a_runtime_promises_only_the_memory_that_is_free_when_it_is_built() {
    let sim =
        Arc::new(SimDevice::with_config(SimConfig::default().total_memory(256 * MIB)).unwrap());
    let build = || {
        Runtime::builder()
            .with_device(sim.clone())
            .memory_fraction(1.0)
            .build()
            .unwrap()
    };
    let first = build();
    let held = first
        .create_context(ContextSpec::new("held", 96 * MIB))
        .unwrap()
        .create_buffer(96 * MIB)
        .unwrap();
    // A second runtime on the device (or any other user of it) finds 96 MiB taken.
    let second = build();
    assert_eq!(second.capacity(), 160 * MIB);
    let err = second
        .create_context(ContextSpec::new("g", 200 * MIB).base(200 * MIB))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Rejected { .. }), "{err}");
    drop(held);
}

#[test]
fn admission_and_partitions_promise_only_what_the_pool_can_map() {
    // 65 MiB usable on a device of 2 MiB granules: the pool maps 64 MiB.
    let sim =
        Arc::new(SimDevice::with_config(SimConfig::default().total_memory(256 * MIB)).unwrap());
    let build = |b: gpushare::RuntimeBuilder| {
        b.with_device(sim.clone())
            .memory_fraction(1.0)
            .memory_limit(65 * MIB)
            .build()
    };
    let rt = build(Runtime::builder()).unwrap();
    assert_eq!(rt.snapshot().capacity_bytes, 64 * MIB);
    let err = rt
        .create_context(ContextSpec::new("big", 65 * MIB).base(65 * MIB))
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Rejected { .. }), "{err}");
    rt.create_context(ContextSpec::new("fits", 64 * MIB).base(64 * MIB))
        .unwrap();
    // A partition may not promise more memory than the runtime has.
    let over = build(Runtime::builder().partition(
        "p",
        gpushare::qos::PartitionLimits::default().memory(65 * MIB),
    ));
    assert!(
        over.is_err(),
        "a partition of 65 MiB in a 64 MiB runtime was accepted"
    );
    build(Runtime::builder().partition(
        "p",
        gpushare::qos::PartitionLimits::default().memory(64 * MIB),
    ))
    .unwrap();
}

#[test]
fn the_snapshot_and_available_vram_agree_while_a_free_waits_for_the_stream() {
    let (rt, sim) = sim_runtime(256 * MIB, 1.0);
    let ctx = rt.create_context(ContextSpec::new("c", 128 * MIB)).unwrap();
    let mut s = ctx.session().unwrap();
    let go = hold(&sim, s.stream());
    // Scratch larger than the pool's caches take: freed in stream order as the session
    // ends, it waits in the pool for the held stream.
    s.alloc(96 * MIB).unwrap();
    drop(s);
    let pending = rt.pool_stats().pending_bytes;
    assert!(pending >= 96 * MIB, "the scratch waits for the held stream");
    assert_eq!(rt.available_vram(), 256 * MIB - pending);
    assert_eq!(rt.snapshot().available_bytes, rt.available_vram());
    go.send(()).unwrap();
}

#[test]
fn scratch_kept_in_a_cache_counts_as_available_once_its_work_is_done() {
    let (rt, sim) = sim_runtime(256 * MIB, 2.0);
    let ctx = rt.create_context(ContextSpec::new("c", 128 * MIB)).unwrap();
    let mut s = ctx.session().unwrap();
    let go = hold(&sim, s.stream());
    // Small enough for the context's cache: freed in stream order as the session ends,
    // it stays there, charged to the context.
    s.alloc(64 << 10).unwrap();
    drop(s);
    let st = rt.pool_stats();
    assert_eq!(
        (st.cached_bytes, st.cached_pending_bytes),
        (64 << 10, 64 << 10)
    );
    assert_eq!(
        rt.available_vram(),
        256 * MIB - (64 << 10),
        "its work still runs"
    );
    go.send(()).unwrap();
    ctx.session().unwrap().synchronize().unwrap();
    // Its work done, any request may take it (the cache gives it back when memory runs
    // short), though the context's usage still counts it.
    assert_eq!(rt.pool_stats().cached_pending_bytes, 0);
    assert_eq!(rt.available_vram(), 256 * MIB);
    assert_eq!(rt.snapshot().available_bytes, 256 * MIB);
    assert_eq!(ctx.usage().used, 64 << 10);
    let other = rt.create_context(ContextSpec::new("o", 256 * MIB)).unwrap();
    drop(other.create_buffer(256 * MIB).unwrap());
}

#[test]
fn an_offload_waiting_on_its_owners_gpu_work_holds_up_no_other_context() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let busy = rt
        .create_context(ContextSpec::new("busy", 64 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let needy = rt
        .create_context(ContextSpec::new("needy", 64 * MIB))
        .unwrap();
    let bystander = rt
        .create_context(ContextSpec::new("bystander", 16 * MIB).tier(Tier::BestEffort))
        .unwrap();
    // The bystander's buffer (placed next to the free memory, and least recently used) is
    // offloaded first, while nothing is busy.
    let buf = busy.create_buffer(40 * MIB).unwrap();
    let mine = bystander.create_buffer(8 * MIB).unwrap();
    let my_data = pattern(mine.size() as usize, 3);
    bystander
        .session()
        .unwrap()
        .write(&mine, 0, &my_data)
        .unwrap();
    let data = pattern(buf.size() as usize, 77);
    busy.session().unwrap().write(&buf, 0, &data).unwrap();
    drop(needy.create_buffer(24 * MIB).unwrap());
    assert!(!mine.is_resident(), "{:?}", rt.snapshot());
    assert!(buf.is_resident(), "{:?}", rt.snapshot());

    // A long kernel of the busy context: its stream's tail, which an offload of its buffer
    // must wait for, ends only when the test says so. Its session ends at once, as a
    // session does, without waiting for the GPU.
    let go = hold(&sim, busy.session().unwrap().stream());

    // The needy context's buffer takes the busy one's place: its offload waits for the
    // kernel, and the request waits for the offload with the pool's lock free.
    let needy2 = needy.clone();
    let taker = std::thread::spawn(move || needy2.create_buffer(40 * MIB));

    // Meanwhile the bystander allocates from the free memory and restores its own buffer
    // through the shared copy stream, within a bounded time.
    let (tx, rx) = std::sync::mpsc::channel();
    let (rt2, by) = (rt.clone(), bystander.clone());
    std::thread::spawn(move || {
        wait_until("no offload started", || {
            rt2.pool_stats().moves_in_flight > 0
        });
        let fresh = by.create_buffer(4 * MIB).map(|b| b.size());
        let mut back = vec![0u8; mine.size() as usize];
        let read = by.session().and_then(|mut s| s.read(&mine, 0, &mut back));
        let _ = tx.send((fresh, read.map(|()| back)));
    });
    let (fresh, back) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("another context's requests waited for an offload");
    assert_eq!(fresh.unwrap(), 4 * MIB);
    assert!(
        back.unwrap() == my_data,
        "the bystander's restored bytes differ"
    );

    go.send(()).unwrap();
    let w = taker.join().unwrap().unwrap();
    assert!(!buf.is_resident());
    drop(w);
    let mut back = vec![0u8; data.len()];
    busy.session().unwrap().read(&buf, 0, &mut back).unwrap();
    assert!(back == data, "restored bytes differ");
}

#[test]
fn an_async_session_restores_on_a_blocking_thread_and_leaves_the_executor_free() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let data = pattern(40 * MIB as usize, 9);
    let (a, _b, buf, a_stream) = offloaded(&rt, &data);

    // A kernel holds the context's stream until the executor's other task releases it, and
    // restoring the buffer waits for that stream's tail.
    let go = hold(&sim, &a_stream);
    let intact = on_one_thread("the restore held the executor's only thread", async move {
        let session = tokio::spawn(async move { reads_back(a, &buf, &data).await });
        // This runs only if the session's restore leaves the executor's one thread free.
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        session.await.unwrap()
    });
    assert!(intact.unwrap(), "restored bytes differ");
}

#[test]
fn a_second_async_session_does_not_block_the_executor_while_the_first_restores() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let data = pattern(40 * MIB as usize, 4);
    let (a, _b, buf, a_stream) = offloaded(&rt, &data);
    let go = hold(&sim, &a_stream);
    let rt2 = rt.clone();
    let stuck = "the second session's poll held the executor's only thread";
    let intact = on_one_thread(stuck, async move {
        let a2 = a.clone();
        let first = tokio::spawn(async move { a2.session_async().await.map(drop) });
        // The first session's try restores on a blocking thread, its copy waiting for the
        // held kernel.
        a_move_in_flight(&rt2).await;
        let a3 = a.clone();
        let second = tokio::spawn(async move { reads_back(a3, &buf, &data).await });
        // This runs only if the second session's first poll left the executor's one
        // thread free.
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        first.await.unwrap()?;
        second.await.unwrap()
    });
    assert!(intact.unwrap(), "restored bytes differ");
}

#[test]
fn a_session_that_fails_leaves_no_use_of_its_context_behind() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let a = rt
        .create_context(ContextSpec::new("a", 128 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let first = a.create_buffer(40 * MIB).unwrap();
    let second = a.create_buffer(40 * MIB).unwrap();
    assert!(matches!(
        a.session(),
        Err(RuntimeError::WorkingSetTooLarge { .. })
    ));
    let snap = rt.snapshot();
    let row = snap.contexts.iter().find(|c| c.name == "a").unwrap();
    assert_eq!(row.sessions, 0, "the failed session left a use: {snap}");
    // With one buffer gone, the set fits, and its sessions work.
    drop(first);
    a.session().unwrap().write(&second, 0, &[7; 64]).unwrap();
}

#[test]
fn a_borrow_that_cannot_restore_its_buffer_leaves_no_use_of_the_owner_behind() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let spec = |n: &str| ContextSpec::new(n, 64 * MIB).tier(Tier::BestEffort);
    let owner = rt.create_context(spec("owner")).unwrap();
    let hog = rt.create_context(spec("hog")).unwrap();
    let reader = rt.create_context(spec("reader")).unwrap();
    let out = owner.create_buffer(40 * MIB).unwrap();
    let big = hog.create_buffer(40 * MIB).unwrap();
    assert!(!out.is_resident());
    // The hog's session pins its buffer: there is no room to bring `out` back.
    let hogging = hog.session().unwrap();
    let failed = reader.session().unwrap().borrow(&out);
    assert!(
        matches!(failed, Err(RuntimeError::OutOfMemory { .. })),
        "{failed:?}"
    );
    // No use of the owner is left, and its buffer is freed at once when dropped.
    let snap = rt.snapshot();
    let row = snap.contexts.iter().find(|c| c.name == "owner").unwrap();
    assert_eq!(row.sessions, 0, "the failed borrow left a use: {snap}");
    drop(out);
    assert_eq!(
        owner.usage().evicted,
        0,
        "the failed borrow kept the buffer"
    );
    drop((hogging, big));
}

#[test]
fn a_buffer_dropped_on_the_executor_while_its_context_restores_does_not_wait_for_the_copy() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let (a, b) = contexts_a_b(&rt);
    let buf = a.create_buffer(40 * MIB).unwrap();
    let small = a.create_buffer(MIB).unwrap();
    let data = pattern(40 * MIB as usize, 8);
    let a_stream = {
        let mut s = a.session().unwrap();
        s.write(&buf, 0, &data).unwrap();
        s.stream().clone()
    };
    // The least recently unpinned of the two goes out to make room: `buf`.
    drop(b.create_buffer(40 * MIB).unwrap());
    assert!(!buf.is_resident() && small.is_resident());
    let go = hold(&sim, &a_stream);
    let (rt2, a2) = (rt.clone(), a.clone());
    let stuck = "dropping a buffer held the executor's only thread until its context's restore";
    let intact = on_one_thread(stuck, async move {
        let first =
            tokio::spawn(async move { reads_back(a2, &buf, &data).await.map(|ok| (ok, buf)) });
        // The session's try restores `buf` on a blocking thread; the copy waits for the
        // held kernel, which goes on only once the drop below has returned.
        a_move_in_flight(&rt2).await;
        drop(small);
        go.send(()).unwrap();
        first.await.unwrap()
    });
    let (intact, _buf) = intact.unwrap();
    assert!(intact, "restored bytes differ");
    // The session pinned the dropped buffer before the drop: it was freed when the
    // session ended.
    assert_eq!(a.usage().resident + a.usage().evicted, 40 * MIB);
    assert_nothing_pinned(&rt, "a");
}

#[test]
fn a_buffer_dropped_while_a_session_restores_it_is_freed_when_the_session_ends() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let data = pattern(40 * MIB as usize, 10);
    let (a, _b, buf, a_stream) = offloaded(&rt, &data);
    let go = hold(&sim, &a_stream);
    let (rt2, a2) = (rt.clone(), a.clone());
    let stuck = "dropping a buffer that a session restores held the executor's only thread";
    let granted = on_one_thread(stuck, async move {
        let first = tokio::spawn(async move { a2.session_async().await.map(drop) });
        a_move_in_flight(&rt2).await;
        // The buffer being restored: the pool refuses to free it, since the session's pin
        // will hold it, and the drop leaves it to the session.
        drop(buf);
        go.send(()).unwrap();
        first.await.unwrap()
    });
    granted.unwrap();
    let u = a.usage();
    assert_eq!((u.used, u.resident, u.evicted), (0, 0, 0), "{u:?}");
    assert_nothing_pinned(&rt, "a");
}

#[test]
fn a_session_ended_on_the_executor_while_another_of_its_context_restores_does_not_wait() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let (a, b) = contexts_a_b(&rt);
    let small = a.create_buffer(MIB).unwrap();
    // The first session is ended on the executor: it goes into a task, with the handle it
    // borrows (leaked, so that the task can hold it for good if the test fails).
    let a_first: &'static gpushare::Context = Box::leak(Box::new(a.clone()));
    let first = a_first.session().unwrap();
    // Made while the first session lives, which does not pin it; written through a
    // second session.
    let big = a.create_buffer(40 * MIB).unwrap();
    let data = pattern(40 * MIB as usize, 9);
    a.session().unwrap().write(&big, 0, &data).unwrap();
    drop(b.create_buffer(40 * MIB).unwrap());
    assert!(!big.is_resident() && small.is_resident());
    let go = hold(&sim, first.stream());
    let (rt2, a2) = (rt.clone(), a.clone());
    let stuck = "ending a session held the executor's only thread until another's restore";
    let intact = on_one_thread(stuck, async move {
        let second = tokio::spawn(async move { reads_back(a2, &big, &data).await });
        a_move_in_flight(&rt2).await;
        drop(first);
        go.send(()).unwrap();
        second.await.unwrap()
    });
    assert!(intact.unwrap(), "restored bytes differ");
    assert_nothing_pinned(&rt, "a");
    drop(small);
}

#[test]
fn a_session_waits_for_a_freed_buffer_whose_release_callback_could_not_be_queued() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let data = pattern(40 * MIB as usize, 6);
    let (a, b, buf, _) = offloaded(&rt, &data);
    let taken = b.create_buffer(40 * MIB).unwrap();
    let b_stream = b.session().unwrap().stream().clone();
    // Work still queued on b's stream when its buffer goes: the memory is pending on it.
    // The buffer's free records its last use (one stream operation), then queues the
    // callback that tells waiting sessions of the release (the next): that one fails.
    let go = hold(&sim, &b_stream);
    sim.fail_nth(FaultOp::StreamOp, 2);
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        go.send(()).unwrap();
    });
    drop(taken);
    // The session needs that memory: it comes back once b's work is done, and the
    // session gets it rather than failing for lack of a wake-up.
    let mut s = a
        .session()
        .expect("the session had the pending memory once b's work was done");
    let mut back = vec![0u8; data.len()];
    s.read(&buf, 0, &mut back).unwrap();
    assert!(back == data, "restored bytes differ");
    release.join().unwrap();
}

#[test]
fn an_async_session_dropped_while_its_try_waits_for_the_pin_lock_restores_nothing() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let spec = |n: &str| ContextSpec::new(n, 64 * MIB).tier(Tier::BestEffort);
    let (a, b) = (
        rt.create_context(spec("a")).unwrap(),
        rt.create_context(spec("b")).unwrap(),
    );
    let c = rt.create_context(ContextSpec::new("c", 64 * MIB)).unwrap();
    let a_buf = a.create_buffer(20 * MIB).unwrap();
    let b_buf = b.create_buffer(20 * MIB).unwrap();
    let a_stream = a.session().unwrap().stream().clone();
    // A large buffer of c's sends both out; then there is room for both to come back.
    drop(c.create_buffer(50 * MIB).unwrap());
    assert!(!a_buf.is_resident() && !b_buf.is_resident());

    let exec = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let go = hold(&sim, &a_stream);
    exec.block_on(async {
        let a2 = a.clone();
        let first = tokio::spawn(async move { a2.session_async().await.map(drop) });
        // a's restore holds the pin lock while it waits for the held kernel.
        a_move_in_flight(&rt).await;
        let b2 = b.clone();
        let second = tokio::spawn(async move { b2.session_async().await.map(drop) });
        while rt.waiting_restores() == 0 {
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
        // b's try waits for the lock on a blocking thread: drop its future.
        second.abort();
        assert!(second.await.unwrap_err().is_cancelled());
        go.send(()).unwrap();
        first.await.unwrap().unwrap();
    });
    // Dropping the executor waits for its blocking threads, b's try among them.
    drop(exec);
    assert!(
        !b_buf.is_resident(),
        "a dropped session's buffer was restored"
    );
    assert_nothing_pinned(&rt, "b");
    assert_eq!(rt.waiting_sessions(), 0);
}

#[test]
fn an_async_session_dropped_while_it_restores_leaves_nothing_pinned() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let (a, b, buf, a_stream) = offloaded(&rt, &pattern(40 * MIB as usize, 5));
    // Made before the gate: on a failure, the gate's sender is dropped first, the kernel
    // ends, and dropping the executor (which waits for its blocking threads) can finish.
    let exec = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let go = hold(&sim, &a_stream);

    exec.block_on(async {
        let a2 = a.clone();
        let session = tokio::spawn(async move { a2.session_async().await.map(drop) });
        // Let it start (its try goes to a blocking thread, where the restore waits for the
        // held kernel), then drop it.
        tokio::task::yield_now().await;
        session.abort();
        assert!(session.await.unwrap_err().is_cancelled());
    });
    go.send(()).unwrap();
    // Dropping the executor waits for its blocking threads: the restore either ended there,
    // with the session it opened ending with its output, or never began (the dropped
    // future told the task to skip it).
    drop(exec);
    // A session that ended there kept its pins as the context's hold, which no session
    // rides: let it go. Pins left by a try that was cut short are no hold, and stay.
    rt.unpin_idle();
    assert_nothing_pinned(&rt, "a");
    assert_eq!(rt.waiting_sessions(), 0);
    // Nothing holds the buffer: another context's request can take its memory again.
    drop(b.create_buffer(40 * MIB).unwrap());
    assert!(!buf.is_resident());
}

#[test]
fn an_async_session_dropped_while_it_restores_at_the_head_of_the_line_leaves_it() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let a = rt
        .create_context(ContextSpec::new("a", 64 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let c = rt
        .create_context(ContextSpec::new("c", 64 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let buf = a.create_buffer(40 * MIB).unwrap();
    let a_stream = a.session().unwrap().stream().clone();
    let theirs = c.create_buffer(40 * MIB).unwrap();
    assert!(!buf.is_resident());
    // Made before the gate, as in the test above.
    let exec = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let go = hold(&sim, &a_stream);

    // The other context's live session holds its buffer: this session waits in line.
    let held = c.session().unwrap();
    let a2 = a.clone();
    let task = exec.spawn(async move { a2.session_async().await.map(drop) });
    wait_until("the session joins the line", || rt.waiting_sessions() == 1);
    // Released, the head restores (offloading the other buffer), and its restore waits
    // for the held kernel.
    drop(held);
    wait_until("the head starts its restore", || {
        !theirs.is_resident() && rt.pool_stats().moves_in_flight == 1
    });
    task.abort();
    assert!(exec.block_on(task).unwrap_err().is_cancelled());
    let waiting = rt.waiting_sessions();
    // Let the restore end before anything can fail: dropping the executor waits for it.
    go.send(()).unwrap();
    drop(exec);
    assert_eq!(waiting, 0, "the dropped head left the line");
    // Nothing of it stays pinned: the other context's session gets its buffer back.
    let mut s = c.session().unwrap();
    let mut back = vec![0u8; 16];
    s.read(&theirs, 0, &mut back).unwrap();
    drop(s);
    assert_nothing_pinned(&rt, "a");
}

#[test]
fn a_device_without_vmm_and_with_memory_near_u64_max_builds() {
    // Without VMM the pool's chunk source gets twice the capacity in offsets, which
    // overflowed here.
    let dev = SimDevice::with_config(SimConfig::default().vmm(false).total_memory(u64::MAX))
        .expect("sim device");
    let rt = Runtime::builder()
        .with_device(Arc::new(dev))
        .build()
        .expect("runtime");
    assert!(rt.available_vram() > u64::MAX / 2);
}

#[test]
fn a_higher_tier_restores_before_a_lower_one_that_asked_first() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let ctx = |name: &str, tier| {
        rt.create_context(ContextSpec::new(name, 64 * MIB).base(0).tier(tier))
            .unwrap()
    };
    let holder = ctx("holder", Tier::BestEffort);
    let late = ctx("late", Tier::BestEffort);
    // A Burstable context keeps its base resident: its buffer within the base stays, and
    // the other can be offloaded.
    let burst = rt
        .create_context(
            ContextSpec::new("burst", 64 * MIB)
                .base(MIB)
                .tier(Tier::Burstable),
        )
        .unwrap();
    // Guaranteed: its buffers are never victims, so it evicts the others'.
    let big = rt
        .create_context(ContextSpec::new("big", 62 * MIB).base(62 * MIB))
        .unwrap();
    let bufs: Vec<_> = [&holder, &late, &burst]
        .iter()
        .map(|c| c.create_buffer(8 * MIB).unwrap())
        .collect();
    let _kept = burst.create_buffer(MIB).unwrap();
    let holder_stream = holder.session().unwrap().stream().clone();
    let late_stream = late.session().unwrap().stream().clone();
    // The big context takes the memory, a MiB at a time, until the three 8 MiB buffers
    // are offloaded; then it lets it go.
    let mut taken = Vec::new();
    while bufs.iter().any(|b| b.is_resident()) {
        taken.push(big.create_buffer(MIB).unwrap());
    }
    drop(taken);
    assert!(_kept.is_resident(), "{}", rt.snapshot());

    // The holder's restore waits for a kernel on its stream, holding the restore lock. So
    // does the late context's, once it has the lock: if it took the lock before the
    // Burstable context, the Burstable one would wait until the test lets it go.
    let go = hold(&sim, &holder_stream);
    let late_go = hold(&sim, &late_stream);
    let (tx, rx) = std::sync::mpsc::channel();
    let start = |c: &gpushare::Context| {
        let (c, tx) = (c.clone(), tx.clone());
        std::thread::spawn(move || {
            let granted = c.session().map(|_| ());
            let _ = tx.send((c.name().to_string(), granted));
        })
    };
    let mut threads = vec![start(&holder)];
    wait_until("the holder's restore did not start", || {
        rt.pool_stats().moves_in_flight > 0
    });
    // The BestEffort context asks first, the Burstable one second.
    threads.push(start(&late));
    wait_until("the late context did not wait for the restore lock", || {
        rt.waiting_restores() == 1
    });
    threads.push(start(&burst));
    wait_until(
        "the Burstable context did not wait for the restore lock",
        || rt.waiting_restores() == 2,
    );
    let next = |what: &str| {
        let (name, granted) = rx.recv_timeout(Duration::from_secs(30)).expect(what);
        granted.unwrap();
        name
    };
    go.send(()).unwrap();
    assert_eq!(next("the holder's session did not start"), "holder");
    assert_eq!(
        next("the Burstable context waited for the BestEffort one that asked first"),
        "burst"
    );
    late_go.send(()).unwrap();
    assert_eq!(next("the late context's session did not start"), "late");
    for t in threads {
        t.join().unwrap();
    }
    assert!(bufs.iter().all(|b| b.is_resident()));
}

#[test]
fn event_handles_are_reused_and_go_with_their_context() {
    let (rt, sim) = sim_runtime(256 * MIB, 1.0);
    let before = sim.live();
    let ctx = rt.create_context(ContextSpec::new("events", MIB)).unwrap();
    let other = rt.create_context(ContextSpec::new("waiter", MIB)).unwrap();
    let with_contexts = sim.live();
    {
        let (s, w) = (ctx.session().unwrap(), other.session().unwrap());
        // One event at a time: one device event, recorded again and again.
        for _ in 0..1000 {
            let e = s.record_event().unwrap();
            w.wait_event(&e).unwrap();
        }
        assert_eq!(sim.live().events, with_contexts.events + 1);
        // Ten held at once need ten; once they are dropped, the next ten reuse them.
        let held: Vec<_> = (0..10).map(|_| s.record_event().unwrap()).collect();
        assert_eq!(sim.live().events, with_contexts.events + 10);
        drop(held);
        let again: Vec<_> = (0..10).map(|_| s.record_event().unwrap()).collect();
        assert_eq!(sim.live().events, with_contexts.events + 10);
        // A clone keeps its handle from being handed out again.
        let kept = again[0].clone();
        drop(again);
        let fresh: Vec<_> = (0..10).map(|_| s.record_event().unwrap()).collect();
        assert_eq!(sim.live().events, with_contexts.events + 11);
        s.synchronize().unwrap();
        assert!(kept.is_complete().unwrap() && fresh[9].is_complete().unwrap());
    }
    // An event outlives its context, and its device event goes with it.
    let late = ctx.session().unwrap().record_event().unwrap();
    drop(ctx);
    late.synchronize().unwrap();
    assert!(late.is_complete().unwrap());
    drop(late);
    drop(other);
    // The kept handles and the stream they were recorded on went with their contexts.
    let after = sim.live();
    assert_eq!(
        (after.events, after.streams),
        (before.events, before.streams),
        "{after:?}"
    );
}

#[test]
fn event_handles_held_for_long_do_not_stop_the_reuse_of_the_others() {
    let (rt, sim) = sim_runtime(256 * MIB, 1.0);
    let ctx = rt.create_context(ContextSpec::new("events", MIB)).unwrap();
    let base = sim.live().events;
    let s = ctx.session().unwrap();
    // The first handles, kept (as markers, or by stream-ordered frees).
    let kept: Vec<_> = (0..6).map(|_| s.record_event().unwrap()).collect();
    for _ in 0..1000 {
        drop(s.record_event().unwrap());
    }
    // A handle or two beside the kept ones, not one per record (nor a full list).
    let made = sim.live().events - base;
    assert!(made <= kept.len() as i64 + 2, "{made} device events");
    // Ten in flight at a time, the oldest let go first (as stream-ordered frees complete).
    let mut window = std::collections::VecDeque::new();
    for _ in 0..20_000 {
        window.push_back(s.record_event().unwrap());
        if window.len() > 10 {
            window.pop_front();
        }
    }
    // Busy handles in front are passed over, a few at a time: a handful more than are held,
    // however long it runs.
    let made = sim.live().events - base;
    assert!(made <= 2 * (kept.len() as i64 + 10), "{made} device events");
}

#[test]
fn a_context_whose_kept_event_handles_are_all_held_keeps_new_ones_instead() {
    let (rt, sim) = sim_runtime(256 * MIB, 1.0);
    let ctx = rt.create_context(ContextSpec::new("events", MIB)).unwrap();
    let s = ctx.session().unwrap();
    // More handles held for long than the context keeps: its list is full of busy ones.
    let held: Vec<_> = (0..300).map(|_| s.record_event().unwrap()).collect();
    let before = sim.events_made();
    for _ in 0..5000 {
        drop(s.record_event().unwrap());
    }
    // Held handles met at the front of the full list leave it, a few per record, and new
    // handles are kept and reused in their place: a few dozen device events in all (32
    // here), not one per record (4828 when held handles went round the list for ever).
    let made = sim.events_made() - before;
    assert!(made <= 64, "{made} device events made for 5000 records");
    drop(held);
}

#[test]
fn a_buffer_dropped_on_the_executor_while_its_bytes_move_out_does_not_wait_for_the_copy() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let (a, b, buf, a_stream) = written(&rt, &pattern(40 * MIB as usize, 12));
    // The eviction fences on `a`'s stream: its bytes stay in flight until the held kernel
    // goes on, which is only once the drop below has returned.
    let go = hold(&sim, &a_stream);
    let b2 = b.clone();
    let maker = std::thread::spawn(move || b2.create_buffer(40 * MIB));
    let rt2 = rt.clone();
    let stuck = "dropping a buffer whose bytes were moving out held the executor's only thread";
    on_one_thread(stuck, async move {
        a_move_in_flight(&rt2).await;
        drop(buf);
        go.send(()).unwrap();
    });
    let made = maker.join().unwrap().unwrap();
    // The dropped buffer went when its move ended: nothing of it is left.
    let u = a.usage();
    assert_eq!((u.resident, u.evicted, u.used), (0, 0, 0), "{u:?}");
    assert!(made.is_resident());
    drop(made);
    drop((a, b));
    assert_eq!(rt.pool_stats().in_use_bytes, 0);
}

#[test]
fn a_request_into_other_contexts_bases_names_its_context_and_what_to_do() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let _g = rt
        .create_context(ContextSpec::new("g", 48 * MIB).base(48 * MIB))
        .unwrap();
    let be = rt
        .create_context(ContextSpec::new("be", 64 * MIB).tier(Tier::BestEffort))
        .unwrap();
    // 64 MiB are free, but 48 of them are g's base: be may take 16 at most.
    let e = be.session().unwrap().alloc(32 * MIB).unwrap_err();
    match &e {
        RuntimeError::ReservedElsewhere {
            context,
            requested,
            available,
        } => assert_eq!(
            (context.as_str(), *requested, *available),
            ("be", 32 * MIB, 16 * MIB)
        ),
        other => panic!("expected ReservedElsewhere, got {other:?}"),
    }
    assert!(e.to_string().contains("reserved base"), "{e}");
    // A handler that denies makes it a denial, as for memory in use.
    let _deny = rt.on_memory_pressure(|_| Pressure::Deny);
    let mut s = be.session().unwrap();
    match s.alloc(32 * MIB) {
        Err(RuntimeError::PressureDenied {
            context, shortage, ..
        }) => {
            assert_eq!(context, "be");
            assert!(
                matches!(*shortage, RuntimeError::ReservedElsewhere { available, .. } if available == 16 * MIB),
                "the denial keeps the shortage it was asked about: {shortage:?}"
            );
        }
        other => panic!("expected PressureDenied, got {other:?}"),
    }
}

/// A thread of `ctx` holding a session with `bytes` of scratch (which no eviction can
/// take) until asked to end it; the channels ask and wait for the end.
fn scratch_hog(ctx: &gpushare::Context, bytes: u64) -> (Sender<()>, Receiver<()>) {
    let (ctx, (ask, asked), (done, ended), (ready, started)) =
        (ctx.clone(), channel(), channel(), channel());
    std::thread::spawn(move || {
        let mut s = ctx.session().unwrap();
        s.alloc(bytes).unwrap();
        ready.send(()).unwrap();
        let _ = asked.recv();
        drop(s);
        let _ = done.send(());
    });
    started.recv().unwrap();
    (ask, ended)
}

#[test]
fn restores_for_a_borrow_and_a_range_ask_the_pressure_handlers() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let be = |name| {
        rt.create_context(ContextSpec::new(name, 64 * MIB).tier(Tier::BestEffort))
            .unwrap()
    };
    let (a, b, c) = (be("a"), be("b"), be("c"));
    // The handler ends the hog's session: its scratch is freed.
    let hog = Arc::new(std::sync::Mutex::new(None::<(Sender<()>, Receiver<()>)>));
    let calls = Arc::new(AtomicUsize::new(0));
    let _handler = {
        let (hog, calls) = (hog.clone(), calls.clone());
        rt.on_memory_pressure(move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            if let Some((ask, ended)) = hog.lock().unwrap().take() {
                ask.send(()).unwrap();
                ended.recv().unwrap();
            }
            Pressure::Allow
        })
    };
    // a's buffer goes out for c's scratch; b borrows it back.
    let data = pattern(4096, 21);
    let theirs = a.create_buffer(32 * MIB).unwrap();
    a.session().unwrap().write(&theirs, 0, &data).unwrap();
    *hog.lock().unwrap() = Some(scratch_hog(&c, 48 * MIB));
    assert!(!theirs.is_resident());
    let mut s = b.session().unwrap();
    s.borrow(&theirs).unwrap();
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        1,
        "the borrow's restore asked"
    );
    let mut back = vec![0; data.len()];
    s.read(&theirs, 0, &mut back).unwrap();
    assert_eq!(back, data);
    drop(s);
    // A buffer of b made during its session goes out for c's scratch; the session's
    // range brings it back.
    let mut s = b.session().unwrap();
    let mine = b.create_buffer(32 * MIB).unwrap();
    *hog.lock().unwrap() = Some(scratch_hog(&c, 48 * MIB));
    assert!(!mine.is_resident());
    s.range(&mine).unwrap();
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        1,
        "the range's restore asked"
    );
    assert!(mine.is_resident());
}

#[test]
fn a_session_tries_again_after_a_denying_handler_released_what_it_needs() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let be = |name| {
        rt.create_context(ContextSpec::new(name, 64 * MIB).tier(Tier::BestEffort))
            .unwrap()
    };
    let (h, l1, l2) = (be("h"), be("l1"), be("l2"));
    let data = pattern(4096, 33);
    let mine = h.create_buffer(32 * MIB).unwrap();
    h.session().unwrap().write(&mine, 0, &data).unwrap();
    // l1's scratch pushes h's buffer out; a session of l2 stays live throughout.
    let hog = Arc::new(std::sync::Mutex::new(Some(scratch_hog(&l1, 48 * MIB))));
    assert!(!mine.is_resident());
    let _live = l2.session().unwrap();
    // The handler ends l1's session, freeing what h needs, and denies all the same. It
    // returns once every release of that end has landed (the scratch's comes from the
    // stream), so that none of them can wake the session after it returned.
    let rt2 = rt.clone();
    let _handler = rt.on_memory_pressure(move |_| {
        if let Some((ask, ended)) = hog.lock().unwrap().take() {
            ask.send(()).unwrap();
            ended.recv().unwrap();
            wait_until("the scratch's release", || {
                rt2.pool_stats().pending_bytes == 0
            });
            std::thread::sleep(Duration::from_millis(20));
        }
        Pressure::Deny
    });
    // The try sees that release (it was not there when the try began), and gets in; it
    // does not wait for l2's session, which would never end here.
    let mut s = h
        .session_timeout(Duration::from_secs(20))
        .expect("the memory the handler released");
    let mut back = vec![0; data.len()];
    s.read(&mine, 0, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn a_handler_whose_drop_panics_counts_as_a_denial() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let hog = rt
        .create_context(ContextSpec::new("hog", 64 * MIB))
        .unwrap();
    let needy = rt
        .create_context(ContextSpec::new("needy", 64 * MIB))
        .unwrap();
    let _kept = hog.create_buffer(48 * MIB).unwrap();
    let _pin = hog.session().unwrap();
    struct Boom;
    impl Drop for Boom {
        fn drop(&mut self) {
            panic!("a handler's drop panicked");
        }
    }
    // The second handler owns a value whose drop panics; the first drops the second's
    // registration, so the round's reference to it is the last, dropped in the round.
    let second = Arc::new(std::sync::Mutex::new(None));
    let _first = {
        let second = second.clone();
        rt.on_memory_pressure(move |_| {
            drop(second.lock().unwrap().take());
            Pressure::Allow
        })
    };
    let boom = Boom;
    *second.lock().unwrap() = Some(rt.on_memory_pressure(move |_| {
        let _ = &boom;
        Pressure::Allow
    }));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        needy.create_buffer(32 * MIB).map(drop)
    }));
    match r {
        Ok(Err(RuntimeError::PressureDenied { .. })) => {}
        Ok(other) => panic!("expected a denial, got {other:?}"),
        Err(_) => panic!("the handler's panic reached the caller"),
    }
}

#[test]
fn a_denial_keeps_the_report_of_who_holds_what() {
    let (rt, _sim) = sim_runtime(64 * MIB, 4.0);
    let hog = rt
        .create_context(ContextSpec::new("hog", 64 * MIB))
        .unwrap();
    let needy = rt
        .create_context(ContextSpec::new("needy", 64 * MIB))
        .unwrap();
    let _kept = hog.create_buffer(48 * MIB).unwrap();
    let _pin = hog.session().unwrap(); // pinned: nothing can be evicted
    let _deny = rt.on_memory_pressure(|_| Pressure::Deny);
    let e = needy.create_buffer(32 * MIB).unwrap_err();
    let RuntimeError::PressureDenied { shortage, .. } = &e else {
        panic!("expected PressureDenied, got {e:?}");
    };
    let RuntimeError::OutOfMemory { report, .. } = &**shortage else {
        panic!("expected the out-of-memory error it was asked about, got {shortage:?}");
    };
    assert_eq!(report.holdings[0].name, "hog", "{report}");
    assert!(e.to_string().contains("hog"), "{e}");
}

#[test]
fn a_borrowers_work_holds_the_buffer_after_its_owners_stream_faulted() {
    use std::sync::mpsc::channel;
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let owner = rt
        .create_context(ContextSpec::new("owner", 64 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let reader = rt
        .create_context(ContextSpec::new("reader", 16 * MIB))
        .unwrap();
    let taker = rt
        .create_context(ContextSpec::new("taker", 48 * MIB).base(48 * MIB))
        .unwrap();
    let buf = owner.create_buffer(32 * MIB).unwrap();
    owner
        .session()
        .unwrap()
        .write(&buf, 0, &pattern(4096, 3))
        .unwrap();
    // The owner's kernel faults when told to; the borrower's writes when told to.
    let (fault, fault_rx) = channel::<()>();
    let (write, write_rx) = channel::<()>();
    let s = owner.session().unwrap();
    sim.launch_host(s.stream(), move |_| {
        let _ = fault_rx.recv();
        Err(gpushare::device::DeviceError::StreamBroken(
            "the owner's kernel faulted".into(),
        ))
    })
    .unwrap();
    {
        let mut b = reader.session().unwrap();
        let r = b.borrow(&buf).unwrap().slice(0, 4096).unwrap();
        sim.launch_host(b.stream(), move |mem| {
            let _ = write_rx.recv();
            mem.write(r, &[0xBB; 4096])
        })
        .unwrap();
    } // The borrow ends with its write still queued.
    drop(s);
    fault.send(()).unwrap();
    // (Its stream's later work, the wait for the borrower included, never runs; a
    // synchronisation would wait for that wait.)
    wait_until("the owner's stream faults", || {
        owner.session().unwrap().record_event().is_err()
    });
    // Another context needs the buffer's memory: its eviction must wait for the write.
    let rt2 = taker.clone();
    let took = std::thread::spawn(move || rt2.create_buffer(40 * MIB).map(drop));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !took.is_finished(),
        "the buffer went while the borrower's write was still queued"
    );
    write.send(()).unwrap();
    took.join().unwrap().unwrap();
    assert!(!buf.is_resident());
    // The offloaded bytes include the borrower's write.
    let mut s = owner.session().unwrap();
    let range = s.range(&buf).unwrap().slice(0, 4096).unwrap();
    let mut back = vec![0u8; 4096];
    sim.peek(range, &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0xBB),
        "the borrower's write was lost"
    );
}

#[test]
fn a_dropped_borrowers_last_uses_of_other_buffers_go_with_it() {
    let (rt, sim) = sim_runtime(64 * MIB, 4.0);
    let owner = rt
        .create_context(ContextSpec::new("owner", 32 * MIB))
        .unwrap();
    let weights = owner.create_buffer(8 * MIB).unwrap();
    owner
        .session()
        .unwrap()
        .write(&weights, 0, &[7; 64])
        .unwrap();
    let events = sim.live().events;
    let reader = rt
        .create_context(ContextSpec::new("reader", 16 * MIB))
        .unwrap();
    {
        let mut s = reader.session().unwrap();
        let mut got = [0u8; 64];
        s.read(&weights, 0, &mut got).unwrap();
        assert_eq!(got, [7; 64]);
    }
    drop(reader);
    // The borrow's end was kept as a last use of the owner's buffer; it goes with the
    // borrower (on a GPU its event would keep the borrower's partition alive).
    assert_eq!(
        sim.live().events,
        events,
        "an event of the dropped borrower lives on"
    );
    drop(weights);
}

#[test]
fn a_session_future_polled_again_after_it_completed_says_so() {
    use std::future::Future;
    use std::task::{Context as TaskCx, Poll, Waker};
    let (rt, _sim) = sim_runtime(64 * MIB, 1.0);
    let ctx = rt.create_context(ContextSpec::new("m", 8 * MIB)).unwrap();
    let mut f = Box::pin(ctx.session_async());
    let mut cx = TaskCx::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(s)) => drop(s),
        other => panic!("expected a session, got {:?}", other.map(|r| r.err())),
    }
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(Err(RuntimeError::SessionFuture(why))) => {
            assert!(why.contains("polled again"), "{why}")
        }
        other => panic!("expected SessionFuture, got {:?}", other.map(|r| r.err())),
    };
}

#[test]
fn a_buffer_dropped_while_its_last_use_cannot_be_recorded_holds_up_no_session_of_its_context() {
    let (rt, sim) = sim_runtime(64 * MIB, 1.0);
    let ctx = rt.create_context(ContextSpec::new("c", 32 * MIB)).unwrap();
    let kept = ctx.create_buffer(MIB).unwrap();
    // Two live sessions; the buffer made after them is pinned by neither, and its drop
    // frees it at once, while uses are live.
    let live = ctx.session().unwrap();
    let other = ctx.session().unwrap();
    let doomed = ctx.create_buffer(4 * MIB).unwrap();
    let stream = live.stream().clone();
    let go = hold(&sim, &stream);
    // The free's record of the buffer's last use fails: it must wait for the stream.
    sim.fail_nth(FaultOp::StreamOp, 1);
    std::thread::scope(|sc| {
        let dropper = sc.spawn(move || drop(doomed));
        std::thread::sleep(Duration::from_millis(100));
        // The wait for the held stream does not hold the context's buffer list: the
        // session ends at once.
        let (tx, rx) = channel();
        sc.spawn(move || {
            drop(live);
            tx.send(()).unwrap();
        });
        let ended = rx.recv_timeout(Duration::from_secs(5)).is_ok();
        go.send(()).unwrap();
        assert!(
            ended,
            "ending a session waited for another thread's wait for the stream"
        );
        dropper.join().unwrap();
    });
    // Once the stream was done, the drop freed the buffer itself: the session still live
    // did not pin it, and nothing else would have.
    assert_eq!(ctx.usage().used, kept.size());
    drop(other);
    assert_nothing_pinned(&rt, "c");
}

#[test]
fn compute_shares_below_the_smallest_partition_count_as_that_partition_in_admission() {
    let (rt, sim) = sim_runtime(256 * MIB, 4.0);
    let info = sim.info().clone();
    let smallest = f64::from(info.sm_min_partition) / f64::from(info.sm_count);
    let fit = (1.0 / smallest).floor() as usize;
    let tiny = |name: String| rt.create_context(ContextSpec::new(name, MIB).compute(0.001));
    let admitted: Vec<_> = (0..fit)
        .map(|i| tiny(format!("c{i}")).expect("a smallest partition is free"))
        .collect();
    for c in &admitted {
        match c.isolation() {
            gpushare::qos::Isolation::SmPartition { granted, .. } => {
                assert_eq!(*granted, info.sm_min_partition)
            }
            other => panic!("{other:?}"),
        }
    }
    // Every SM is taken: admission, which counted each share as the partition it got,
    // refuses the next.
    match tiny("one more".into()) {
        Err(RuntimeError::Rejected {
            rejection:
                gpushare::qos::Rejection::Share {
                    what: "compute", ..
                },
            ..
        }) => {}
        other => panic!("expected admission's refusal, got {:?}", other.err()),
    }
    drop(admitted);
    tiny("after".into()).expect("the shares went with their contexts");
}

#[test]
fn every_smallest_partition_that_fits_is_admitted_however_the_share_rounds() {
    // 72 SMs in groups of 4: eighteen smallest partitions fit, and each share (1/18) does
    // not fall on a whole part per billion.
    let sim = Arc::new(
        SimDevice::with_config(SimConfig {
            sm_count: 72,
            sm_min_partition: 4,
            sm_granularity: 2,
            ..SimConfig::default().total_memory(256 * MIB)
        })
        .unwrap(),
    );
    let rt = Runtime::builder()
        .with_device(sim)
        .memory_fraction(1.0)
        .overcommit(4.0)
        .build()
        .unwrap();
    let admitted: Vec<_> = (0..18)
        .map(|i| {
            rt.create_context(ContextSpec::new(format!("c{i}"), MIB).compute(0.001))
                .unwrap_or_else(|e| panic!("partition {i} of 18 refused: {e}"))
        })
        .collect();
    assert!(rt
        .create_context(ContextSpec::new("one more", MIB).compute(0.001))
        .is_err());
    drop(admitted);
}
