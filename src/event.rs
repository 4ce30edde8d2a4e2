//! Events: points in a context's work that other contexts can wait for.

use crate::context::{CtxInner, Spares};
use crate::error::{Result, RuntimeError};
use crate::runtime::RtInner;
use gpushare_device::{Device, EventFlags, Stream};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

struct Inner {
    rt: u64,
    dev: Arc<dyn Device>,
    /// Always `Some` until dropped, when it goes back to its context's spares.
    ev: Option<gpushare_device::Event>,
    stream: Stream,
    /// The spare list of the context whose stream it was recorded on. Device events are
    /// reused only within one context: one recorded on a partition's stream is made in that
    /// partition's green context and must not outlive the partition in another context's
    /// hands. A `Weak` to the list, not to the context: this is dropped in places (the
    /// pool's pending frees, under its lock) where ending a context would deadlock.
    spares: Weak<Spares>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Recording a device event again is safe once no handle refers to it: waits
        // already queued captured the earlier record.
        if let (Some(ev), Some(list)) = (self.ev.take(), self.spares.upgrade()) {
            let mut spares = list.lock();
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
        let rt = &ctx.rt;
        let spare = ctx.spare_events.lock().pop();
        let ev = match spare {
            Some(e) => e,
            None => rt.dev.create_event(EventFlags::default())?,
        };
        rt.dev.record_event(&ev, &ctx.stream)?;
        Ok(Event {
            inner: Arc::new(Inner {
                rt: rt.id,
                dev: rt.dev.clone(),
                ev: Some(ev),
                stream: ctx.stream.clone(),
                spares: Arc::downgrade(&ctx.spare_events),
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
        Ok(self.inner.dev.query_event(self.device_event()?)?)
    }

    /// Block until the recorded work has completed.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.inner.dev.synchronize_event(self.device_event()?)?)
    }

    /// Wait for the recorded work without blocking a thread: a host callback queued on the
    /// recording stream wakes the task.
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
        let r = i.dev.host_callback(
            &i.stream,
            Box::new(move || {
                s2.done.store(true, Ordering::Release);
                if let Some(w) = s2.waker.lock().take() {
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
