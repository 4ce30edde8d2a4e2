//! Events: points in a context's work that other contexts can wait for.

use crate::context::CtxInner;
use crate::error::{Result, RuntimeError};
use crate::runtime::RtInner;
use gpushare_device::{Device, EventFlags, Stream};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// What the events of one context share: one reference per event instead of three.
pub(crate) struct EventHome {
    pub dev: Arc<dyn Device>,
    /// This context's recent event handles, handed out again by [`Event::record`] once no
    /// one else holds them. Declared before `stream` so that its device events are
    /// destroyed before the stream (and with it the partition).
    pub recent: Mutex<Recent>,
    pub stream: Stream,
}

impl EventHome {
    pub(crate) fn new(dev: Arc<dyn Device>, stream: Stream) -> Self {
        EventHome {
            dev,
            recent: Mutex::new(Recent {
                handles: VecDeque::new(),
            }),
            stream,
        }
    }
}

/// Most handles a context keeps for reuse.
const RECENT: usize = 256;
/// Handles looked at, from the front, before a record makes a new one.
const SCAN: usize = 8;

/// Event handles kept for reuse. Reusing the whole handle, not only its device event,
/// spares a record and the last drop of its handle an allocation, a free and four atomic
/// read-modify-writes (a lock each way, the home's count; about 11 ns each on the H100's
/// host).
///
/// Each handle refers to its home, so the list and its home keep each other alive: the
/// context empties the list when it is dropped (events recorded on a partition's stream
/// were made in that partition's green context, and must not outlive it in a list).
pub(crate) struct Recent {
    /// Least recently handed out first: the front is the likeliest to be free again.
    handles: VecDeque<Arc<Inner>>,
}

impl Recent {
    /// Let go of every kept handle (those still held elsewhere live on with their home).
    pub(crate) fn clear(&mut self) {
        self.handles.clear();
    }

    /// A kept handle that no one else holds, claimed (counted once more) for a record; it
    /// goes to the back. Busy handles looked at go to the back too, so that handles held
    /// for long (markers a user keeps, events of stream-ordered frees) do not stay in front
    /// of the free ones; with the list full, the first one met leaves it instead (its
    /// holders keep it; at most one per record), making room for handles that come back.
    /// Otherwise a list full of held handles would keep cycling them, and a record would
    /// make a new device event nearly every time.
    fn claim(&mut self) -> Option<Arc<Inner>> {
        for _ in 0..self.handles.len().min(SCAN) {
            let h = self.handles.pop_front()?;
            // Held only by this list: every other handle was dropped, and no new one can
            // appear but through this list, whose lock is held. No `Weak` is ever made.
            if Arc::strong_count(&h) == 1 {
                self.handles.push_back(h);
                // Pairs with the release of the last other handle's drop: whatever its
                // holder did with the event happens before the event is recorded again.
                fence(Ordering::Acquire);
                return self.handles.back().cloned();
            }
            if self.handles.len() + 1 < RECENT {
                self.handles.push_back(h);
            }
        }
        None
    }

    /// Keep a new handle. A record that found no free one has made room already (see
    /// [`Recent::claim`]); should another record have filled the list meanwhile, the front
    /// one goes to make room, and its holders, if any, keep it.
    fn keep(&mut self, h: &Arc<Inner>) {
        if self.handles.len() >= RECENT {
            self.handles.pop_front();
        }
        self.handles.push_back(h.clone());
    }
}

struct Inner {
    rt: u64,
    ev: gpushare_device::Event,
    /// Not the context itself: events are dropped in places (the pool's pending frees,
    /// under its lock) where ending a context would deadlock.
    home: Arc<EventHome>,
}

/// A recorded point in a context's work. `Send + Sync`, cheap to clone.
#[derive(Clone)]
pub struct Event {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("runtime", &self.inner.rt)
            .finish()
    }
}

impl Event {
    /// Record an event at the current end of `ctx`'s stream. A handle of the context's that
    /// no one holds any more is recorded again (waits already queued on it captured its
    /// earlier record); otherwise a new one is made.
    pub(crate) fn record(ctx: &Arc<CtxInner>) -> Result<Event> {
        let home = &ctx.events;
        let claimed = home.recent.lock().claim();
        let inner = match claimed {
            Some(inner) => inner,
            None => {
                let inner = Arc::new(Inner {
                    rt: ctx.rt.id,
                    ev: home.dev.create_event(EventFlags::default())?,
                    home: home.clone(),
                });
                home.recent.lock().keep(&inner);
                inner
            }
        };
        home.dev.record_event(&inner.ev, &home.stream)?;
        Ok(Event { inner })
    }

    pub(crate) fn check(&self, rt: &RtInner) -> Result<()> {
        if self.inner.rt == rt.id {
            Ok(())
        } else {
            Err(RuntimeError::Foreign {
                what: "event",
                owner: "runtime",
            })
        }
    }

    pub(crate) fn device_event(&self) -> &gpushare_device::Event {
        &self.inner.ev
    }

    /// Whether the recorded work has completed.
    pub fn is_complete(&self) -> Result<bool> {
        Ok(self.inner.home.dev.query_event(self.device_event())?)
    }

    /// Once the callback queued behind the event has run: whether the recorded work ran,
    /// or the fault that stopped it (the callback runs after a fault too).
    fn outcome(&self) -> Result<()> {
        self.is_complete().map(|_| ())
    }

    /// Block until the recorded work has completed.
    ///
    /// On CUDA this may spin a core until then: session events are recorded without
    /// blocking sync, which keeps a record cheap, and the driver's default is to spin. For
    /// work that may run long, await [`Event::wait`], or poll [`Event::is_complete`] with
    /// a sleep in between.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.inner.home.dev.synchronize_event(self.device_event())?)
    }

    /// Wait for the recorded work without blocking a thread: a host callback queued on the
    /// recording stream wakes the task. The callback runs after all the work queued on that
    /// stream when the future is first polled, so if more was queued after the record, the
    /// task wakes when that is done too; [`Event::is_complete`] and
    /// [`Event::synchronize`] see the event itself.
    ///
    /// Each future that finds the event not yet complete queues its own callback, and
    /// dropping the future does not take it back: the recording stream's later work waits
    /// for each callback to run on the host. Await one future per waiter rather than a
    /// fresh one on every turn of a loop (as `tokio::time::timeout(d, e.wait())` in a loop
    /// would make). A callback is not allowed while the recording stream is being captured
    /// into a CUDA graph.
    ///
    /// The task is woken from the driver's callback thread. Its next poll asks the device
    /// how the work ended, a call CUDA forbids on that thread: an executor whose waker
    /// polls the task right there, inside `wake`, would see that call fail. tokio's
    /// wakers, and those of the common executors, only schedule the task.
    pub fn wait(&self) -> EventWait {
        EventWait {
            ev: self.clone(),
            signal: None,
        }
    }
}

struct Signal {
    done: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

/// The future of [`Event::wait`].
pub struct EventWait {
    ev: Event,
    signal: Option<Arc<Signal>>,
}

impl Drop for EventWait {
    fn drop(&mut self) {
        // The callback stays queued until the stream gets there, with the signal: the
        // waker goes now, so that a dropped wait neither keeps its task until then nor
        // wakes it for nothing.
        if let Some(s) = &self.signal {
            let waker = s.waker.lock().take();
            drop(waker);
        }
    }
}

impl Future for EventWait {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(s) = &self.signal {
            if s.done.load(Ordering::Acquire) {
                return Poll::Ready(self.ev.outcome());
            }
            *s.waker.lock() = Some(cx.waker().clone());
            // The callback may have fired between the check and storing the waker.
            if s.done.load(Ordering::Acquire) {
                return Poll::Ready(self.ev.outcome());
            }
            return Poll::Pending;
        }
        match self.ev.is_complete() {
            Ok(true) => return Poll::Ready(Ok(())),
            Ok(false) => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
        let s = Arc::new(Signal {
            done: AtomicBool::new(false),
            waker: Mutex::new(Some(cx.waker().clone())),
        });
        let s2 = s.clone();
        let i = &self.ev.inner;
        // Runs after everything queued on the stream so far, which includes the recorded
        // work. It only sets a flag and wakes a task, which is allowed in a driver callback.
        let r = i.home.dev.host_callback(
            &i.home.stream,
            Box::new(move || {
                s2.done.store(true, Ordering::Release);
                // Woken with the lock released: a waker that polls at once must not find
                // it held.
                let w = s2.waker.lock().take();
                if let Some(w) = w {
                    w.wake();
                }
            }),
        );
        if let Err(e) = r {
            return Poll::Ready(Err(e.into()));
        }
        self.signal = Some(s);
        Poll::Pending
    }
}
