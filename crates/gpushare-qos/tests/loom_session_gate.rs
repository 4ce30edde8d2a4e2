//! loom models of the protocol sessions wait under ([`SessionGate`]): a session short of
//! memory waits while a live session or a pending free will release some, is woken by that
//! release, and fails only when nothing can release memory.
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom_session_gate`.
#![cfg(loom)]

use gpushare_qos::{Attempt, SessionGate};
use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// A session waiting for memory, as the runtime's `SessionFuture` does: attempt; on
/// `Wait`, join the line and poll again; once in line, register before each attempt.
struct Session {
    gate: Arc<SessionGate>,
    free: Arc<AtomicBool>,
    id: Option<u64>,
}

impl Session {
    fn attempt(&self) -> Attempt<(), &'static str> {
        let free = self.free.clone();
        self.gate.attempt(
            move || {
                if free.load(Ordering::Acquire) {
                    Ok(())
                } else {
                    Err("out of memory")
                }
            },
            |_| true,
        )
    }
}

impl Future for Session {
    type Output = Result<(), &'static str>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.id {
            None => match self.attempt() {
                Attempt::Done(r) => Poll::Ready(r),
                Attempt::Wait => {
                    self.id = Some(self.gate.enqueue(1, cx.waker()));
                    // Memory may have come between the attempt and joining the line.
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            },
            Some(id) => {
                if !self.gate.is_head(id, cx.waker()) {
                    return Poll::Pending;
                }
                match self.attempt() {
                    Attempt::Wait => Poll::Pending,
                    Attempt::Done(r) => {
                        self.gate.remove(id);
                        self.id = None;
                        Poll::Ready(r)
                    }
                }
            }
        }
    }
}

fn setup() -> (Arc<SessionGate>, Arc<AtomicBool>) {
    (
        Arc::new(SessionGate::new(Duration::from_secs(3600))),
        Arc::new(AtomicBool::new(false)),
    )
}

#[test]
fn a_session_ending_wakes_a_waiter_and_it_gets_the_memory() {
    loom::model(|| {
        let (gate, free) = setup();
        gate.started(); // the session holding the memory
        let (g2, f2) = (gate.clone(), free.clone());
        let holder = thread::spawn(move || {
            f2.store(true, Ordering::Release);
            g2.ended();
        });
        let r = loom::future::block_on(Session {
            gate: gate.clone(),
            free,
            id: None,
        });
        holder.join().unwrap();
        assert_eq!(r, Ok(()), "a live session's release must reach the waiter");
        assert_eq!(gate.waiting(), 0);
    });
}

#[test]
fn a_pending_free_completing_wakes_a_waiter() {
    loom::model(|| {
        let (gate, free) = setup();
        gate.pending_added(); // scratch freed in stream order, its work not done yet
        let (g2, f2) = (gate.clone(), free.clone());
        let callback = thread::spawn(move || {
            f2.store(true, Ordering::Release);
            g2.pending_done();
        });
        let r = loom::future::block_on(Session {
            gate: gate.clone(),
            free,
            id: None,
        });
        callback.join().unwrap();
        assert_eq!(r, Ok(()));
    });
}

#[test]
fn with_nothing_to_release_a_session_fails_instead_of_waiting_forever() {
    loom::model(|| {
        let (gate, free) = setup();
        let r = loom::future::block_on(Session {
            gate: gate.clone(),
            free,
            id: None,
        });
        assert_eq!(r, Err("out of memory"));
        assert_eq!(gate.waiting(), 0);
    });
}
