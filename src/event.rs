//! Events: points in a context's work that other contexts can wait for.

use crate::context::CtxInner;
use crate::error::{Result, RuntimeError};
use crate::runtime::RtInner;
use gpushare_device::{Device, EventFlags, Stream};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// What the events of one context share: one reference per event instead of three.
pub(crate) struct EventHome {
    pub dev: Arc<dyn Device>,
    /// Device events no handle uses any more, recorded again on this context's stream
    /// rather than created anew. Device events are reused only within one context: one
    /// recorded on a partition's stream is made in that partition's green context, and
    /// must not outlive the partition in another context's hands. Declared before
    /// `stream` so that, when the last event of a dropped context goes, they are destroyed
    /// before the stream (and with it the partition).
    pub spares: Mutex<Vec<gpushare_device::Event>>,
    pub stream: Stream,
}

struct Inner {
    rt: u64,
    /// Always `Some` until dropped, when it goes back to its context's spares.
    ev: Option<gpushare_device::Event>,
    /// Not the context itself: events are dropped in places (the pool's pending frees,
    /// under its lock) where ending a context would deadlock.
    home: Arc<EventHome>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Recording a device event again is safe once no handle refers to it: waits
        // already queued captured the earlier record.
        if let Some(ev) = self.ev.take() {
            let mut spares = self.home.spares.lock();
            if spares.len() < 256 {
                spares.push(ev);
            }
        }
    }
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
    /// Record an event at the current end of `ctx`'s stream.
    pub(crate) fn record(ctx: &Arc<CtxInner>) -> Result<Event> {
        let home = &ctx.events;
        let spare = home.spares.lock().pop();
        let ev = match spare {
            Some(e) => e,
            None => home.dev.create_event(EventFlags::default())?,
        };
        home.dev.record_event(&ev, &home.stream)?;
        Ok(Event {
            inner: Arc::new(Inner {
                rt: ctx.rt.id,
                ev: Some(ev),
                home: home.clone(),
            }),
        })
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

    pub(crate) fn device_event(&self) -> Result<&gpushare_device::Event> {
        self.inner.ev.as_ref().ok_or(RuntimeError::Foreign {
            what: "event",
            owner: "dropped runtime",
        })
    }

    /// Whether the recorded work has completed.
    pub fn is_complete(&self) -> Result<bool> {
        Ok(self.inner.home.dev.query_event(self.device_event()?)?)
    }

    /// Block until the recorded work has completed.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self
            .inner
            .home
            .dev
            .synchronize_event(self.device_event()?)?)
    }

    /// Wait for the recorded work without blocking a thread: a host callback queued on the
    /// recording stream wakes the task. The callback runs after all the work queued on that
    /// stream when the future is first polled, so if more was queued after the record, the
    /// task wakes when that is done too; [`Event::is_complete`] and
    /// [`Event::synchronize`] see the event itself.
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

impl Future for EventWait {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(s) = &self.signal {
            if s.done.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
            *s.waker.lock() = Some(cx.waker().clone());
            // The callback may have fired between the check and storing the waker.
            if s.done.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
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
