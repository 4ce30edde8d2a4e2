//! Sessions: a context's turn on the GPU, with its buffers resident.
//!
//! This module holds the session guard, its scratch and the blocking helpers; [`resident`]
//! makes a context's working set resident (pins, restores, and when a session may go
//! ahead of the line); [`future`] is the future a session is awaited through.

use crate::context::{Context, CtxInner, StreamTail};
use crate::error::{Result, RuntimeError};
use crate::event::Event;
use crate::runtime::Pressure;
use crate::Buffer;
use gpushare_device::{DevicePtr, DeviceRange, Stream};
use gpushare_pool::{Block, EvictableKey, EvictableRef, FreeEvent};
use gpushare_qos::Attempt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll, Wake, Waker};
use std::time::Instant;

mod future;
mod resident;

use future::abandoned;
pub use future::SessionFuture;
use resident::{beside_guaranteed, pin_resident, Fast};
pub(crate) use resident::{evicted_bytes, may_pass, pin_all};

/// Run a future to completion on this thread, sleeping between polls until its waker is
/// called.
///
/// Each call waits on its own signal, not on the thread's park token: a `block_on` nested
/// in a poll (the pin lock's, inside a blocking session's) would otherwise take the wake-up
/// meant for the outer future, which would then sleep for ever (the server example's test
/// hung that way).
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    loop {
        // Without a deadline this returns only with the output.
        if let Some(v) = block_on_until(f.as_mut(), None) {
            return v;
        }
    }
}

/// [`block_on`], giving up at `deadline` (then `None`, and the caller drops the future or
/// drives it again). A poll in progress at the deadline is not cut short.
pub(crate) fn block_on_until<F: Future>(
    mut f: Pin<&mut F>,
    deadline: Option<Instant>,
) -> Option<F::Output> {
    struct Signal {
        woken: parking_lot::Mutex<bool>,
        cv: parking_lot::Condvar,
    }
    impl Wake for Signal {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            *self.woken.lock() = true;
            self.cv.notify_one();
        }
    }
    let signal = Arc::new(Signal {
        woken: parking_lot::Mutex::new(false),
        cv: parking_lot::Condvar::new(),
    });
    let waker = Waker::from(signal.clone());
    let mut cx = TaskCx::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        // Checked after every poll, not only when a wait times out: a future woken during
        // each of its polls (every session's end wakes the first in line) never waits.
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let mut woken = signal.woken.lock();
        while !*woken {
            match deadline {
                Some(d) => {
                    if signal.cv.wait_until(&mut woken, d).timed_out() && !*woken {
                        return None;
                    }
                }
                None => signal.cv.wait(&mut woken),
            }
        }
        *woken = false;
    }
}

/// The buffers a session pinned when it started: the first `len` slots of its context,
/// less those dropped before doom epoch `epoch` (see [`CtxInner::end_use`]). With `rode`,
/// the context's hold keeps them pinned, and the session pinned none itself.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Prefix {
    pub len: usize,
    pub epoch: u64,
    pub rode: bool,
    /// Pinned by the general path of [`pin_all`], which may have restored buffers: the
    /// context's waiters in line may then go (see [`granted`]).
    pub general: bool,
}

impl Prefix {
    fn of(ctx: &CtxInner, slots: &[crate::context::BufSlot]) -> Self {
        Prefix {
            len: slots.len(),
            epoch: ctx.dooms.load(Ordering::Relaxed),
            rode: false,
            general: false,
        }
    }
}

/// A session of `ctx` was granted outside the line (a newcomer's try) with `p`: if its
/// try may have made the working set resident, the context's waiters in line are woken,
/// since they may now go ahead of the first in line as it did (see
/// `SessionGate::may_pass`). A session served from the line wakes them through
/// `SessionGate::served` instead.
pub(crate) fn granted(ctx: &CtxInner, p: &Prefix) {
    if p.general {
        ctx.rt.waits.granted(ctx.group());
    }
}

thread_local! {
    /// Memory-pressure handlers running on this thread (see [`in_pressure_handler`]).
    static IN_HANDLER: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether a memory-pressure handler is running on this thread. A session it opens goes
/// ahead of the line whatever `SessionGate::may_pass` says: the handler may run inside the
/// try of the first in line, which would otherwise wait behind itself.
pub(crate) fn in_pressure_handler() -> bool {
    IN_HANDLER.with(|n| n.get() > 0)
}

/// Marks this thread as running a memory-pressure handler while it lives.
pub(crate) struct HandlerScope(());

impl HandlerScope {
    pub(crate) fn enter() -> Self {
        IN_HANDLER.with(|n| n.set(n.get() + 1));
        HandlerScope(())
    }
}

impl Drop for HandlerScope {
    fn drop(&mut self) {
        IN_HANDLER.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// A memory range a session allocated; freed in stream order when the session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scratch {
    /// The memory.
    pub range: DeviceRange,
}

/// Completion of the session's last work, for stream-ordered frees.
struct Done(Event);

impl FreeEvent for Done {
    /// As [`crate::context`]'s stream tails: an event that reports its stream's fault
    /// counts as complete, as that stream touches no more memory.
    fn is_complete(&self) -> bool {
        self.0.is_complete().unwrap_or(true)
    }
    /// Polls the event with a growing sleep (20 µs up to 1 ms) rather than synchronising
    /// with it: session events are recorded without blocking sync, which keeps records
    /// cheap, and on CUDA a synchronisation with such an event spins a core for as long as
    /// the other session's kernels run. A request short of memory waits here.
    fn wait(&self) {
        let mut nap = std::time::Duration::from_micros(20);
        loop {
            match self.0.is_complete() {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for a session's scratch to be released failed");
                    return;
                }
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(std::time::Duration::from_millis(1));
        }
    }
}

/// A context's turn on the GPU: its buffers stay resident and pinned until the session
/// ends. Ending it (dropping it) frees its scratch memory in stream order and unpins; the
/// last session of a context may instead leave its buffers pinned as the context's hold,
/// for the next session, until memory runs short (see [`crate::Runtime::unpin_idle`]).
///
/// It borrows the [`Context`] handle it was opened on, as a lock's guard borrows its lock:
/// opening and ending one counts no reference to the context (two atomic
/// read-modify-writes, each about 11 ns on an H100's host, that a session does not
/// make). A server task owns its `Context` clone and opens sessions on it.
pub struct Session<'a> {
    ctx: CtxRef<'a>,
    /// The buffers this session pinned when it started...
    pinned: Prefix,
    /// ...and what else it holds, allocated on first use: most sessions hold nothing else,
    /// and then creating and ending one moves and drops no lists.
    more: Option<Box<Held>>,
}

/// What a session holds besides a prefix of its context's buffers.
#[derive(Default)]
struct Held {
    /// Buffers made after the session started and used through it, pinned.
    extra: Vec<EvictableKey>,
    scratch: Vec<Block>,
    /// Buffers of other contexts this session uses (see [`Session::borrow`]).
    borrowed: Vec<(Arc<CtxInner>, EvictableKey)>,
}

/// The context of a session: the handle it was opened on, or, for a session opened on a
/// blocking thread for an async caller, a reference of its own.
pub(crate) enum CtxRef<'a> {
    Borrowed(&'a Context),
    Owned(Context),
}

impl CtxRef<'_> {
    /// The handle, for calls that take one (pressure handlers are given it).
    #[inline]
    fn handle(&self) -> &Context {
        match self {
            CtxRef::Borrowed(c) => c,
            CtxRef::Owned(c) => c,
        }
    }
}

impl std::ops::Deref for CtxRef<'_> {
    type Target = Arc<CtxInner>;
    #[inline]
    fn deref(&self) -> &Arc<CtxInner> {
        &self.handle().inner
    }
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (extra, scratch) = self
            .more
            .as_ref()
            .map_or((0, 0), |m| (m.extra.len(), m.scratch.len()));
        f.debug_struct("Session")
            .field("context", &self.ctx.name)
            .field("pinned", &(self.pinned.len + extra))
            .field("scratch", &scratch)
            .finish()
    }
}

impl<'a> Session<'a> {
    pub(crate) fn new(ctx: CtxRef<'a>, pinned: Prefix) -> Self {
        Session {
            ctx,
            pinned,
            more: None,
        }
    }

    fn more(&mut self) -> &mut Held {
        self.more.get_or_insert_with(Box::default)
    }

    fn holds_extra(&self, key: &EvictableKey) -> bool {
        self.more.as_ref().is_some_and(|m| m.extra.contains(key))
    }

    /// The context's stream. On CUDA, launch kernels and cuBLAS calls on its cudarc
    /// stream inside `stream().with_cuda_stream(|cs| ...)`, which makes an SM partition's
    /// context current for them, one thread at a time.
    pub fn stream(&self) -> &Stream {
        &self.ctx.stream
    }

    /// The context.
    pub fn context(&self) -> Context {
        self.ctx.handle().clone()
    }

    /// Allocate scratch memory, freed in stream order when the session ends.
    ///
    /// Usually a cache hit that takes nanoseconds, but short of memory it blocks the
    /// thread: it may wait for memory freed in stream order, run the pressure handlers,
    /// and evict other contexts' buffers, waiting for their copies out.
    pub fn alloc(&mut self, size: u64) -> Result<Scratch> {
        let c = &self.ctx;
        let b = c.handle().with_relief(size, || {
            c.rt.pool
                .alloc(c.owner, size, c.stream_id)
                .map_err(|e| RuntimeError::from_pool(e, &c.name))
        })?;
        let range = DeviceRange::new(DevicePtr(c.rt.pool.addr(&b)), size);
        self.more().scratch.push(b);
        Ok(Scratch { range })
    }

    fn check(&self, buf: &Buffer) -> Result<()> {
        if !Arc::ptr_eq(&buf.ctx, &self.ctx) {
            return Err(RuntimeError::Foreign {
                what: "buffer",
                owner: "context",
            });
        }
        Ok(())
    }

    /// Where `buf` is for the rest of the session (pinning it if it was created after the
    /// session started).
    ///
    /// Blocks the thread if it has to restore the buffer (one made after the session
    /// started, and evicted since), and, short of memory for that, runs the pressure
    /// handlers. The context's buffer list is not held meanwhile.
    pub fn range(&mut self, buf: &Buffer) -> Result<DeviceRange> {
        self.check(buf)?;
        let (id, held) = {
            let slots = self.ctx.buffers.lock();
            let (i, slot, id) = slots
                .iter()
                .enumerate()
                .find(|(_, s)| s.key == buf.key)
                .and_then(|(i, s)| Some((i, s, s.id.as_ref()?)))
                .ok_or(RuntimeError::Foreign {
                    what: "buffer",
                    owner: "context",
                })?;
            let at_start = i < self.pinned.len && slot.pinned_since(self.pinned.epoch);
            (id.to_ref(), at_start || self.holds_extra(&buf.key))
        };
        // `buf` lives, so its slot does, and its block is not freed under the pin. A
        // restore short of memory asks the pressure handlers, as an allocation does.
        let c = &self.ctx;
        let p = c.handle().with_relief(buf.size(), || {
            c.rt.pool
                .pin(id, c.stream_id)
                .map_err(|e| RuntimeError::from_pool(e, &c.name))
        })?;
        if held {
            // Already pinned by this session: drop the extra pin.
            let _ = self.ctx.rt.pool.unpin(id);
        } else {
            self.more().extra.push(buf.key);
        }
        Ok(DeviceRange::new(DevicePtr(p.addr), buf.size()))
    }

    /// Use a buffer of another context of the same runtime in this session, as a pipeline
    /// stage reads the output of the stage before it. The buffer is pinned (restored first
    /// if it was evicted, charged to its owner) until this session ends, and counts as in
    /// use by its owner until then, so dropping its handle meanwhile frees it only after.
    /// A restore short of memory runs the pressure handlers, with this session's context
    /// as the requester.
    ///
    /// Ordering stays with events, as on a GPU: wait on an event the owner recorded after
    /// writing the buffer ([`Session::wait_event`]) before reading it. When this session
    /// ends, the owner's stream waits (on the GPU) for this session's work, so the owner's
    /// later writes come after this session's reads; and the buffer keeps this session's
    /// work as a last use, so no eviction or free of it comes before that work is done.
    /// A buffer of this session's own context is simply [`Session::range`].
    pub fn borrow(&mut self, buf: &Buffer) -> Result<DeviceRange> {
        if Arc::ptr_eq(&buf.ctx, &self.ctx) {
            return self.range(buf);
        }
        if !Arc::ptr_eq(&buf.ctx.rt, &self.ctx.rt) {
            return Err(RuntimeError::Foreign {
                what: "buffer",
                owner: "runtime",
            });
        }
        let owner = &buf.ctx;
        let already = self.more.as_ref().is_some_and(|m| {
            m.borrowed
                .iter()
                .any(|(c, k)| Arc::ptr_eq(c, owner) && *k == buf.key)
        });
        let id = {
            let slots = owner.buffers.lock();
            let id = slots
                .iter()
                .find(|s| s.key == buf.key && s.live())
                .and_then(|s| s.id.as_ref())
                .ok_or(RuntimeError::Foreign {
                    what: "buffer",
                    owner: "context",
                })?
                .to_ref();
            // A use of the owner from here on, so that its list is let go while the pin
            // below restores: its slots stay put (see `pin_all`).
            if !already {
                owner.add_use(&slots);
            }
            id
        };
        // Pinned for use on the owner's stream: a restore is ordered after the owner's
        // work, and this session orders its own work with events. A restore short of
        // memory asks the pressure handlers, as this session's allocations do.
        let pinned = self.ctx.handle().with_relief(buf.size(), || {
            owner
                .rt
                .pool
                .pin(id, owner.stream_id)
                .map_err(|e| RuntimeError::from_pool(e, &owner.name))
        });
        match (&pinned, already) {
            // Already pinned by this session: drop the extra pin.
            (Ok(_), true) => drop(owner.rt.pool.unpin(id)),
            (Ok(_), false) => self.more().borrowed.push((owner.clone(), buf.key)),
            (Err(_), true) => {}
            (Err(_), false) => {
                owner.release_use(owner.buffers.lock(), 0, 0, std::slice::from_ref(&buf.key))
            }
        }
        let p = pinned?;
        Ok(DeviceRange::new(DevicePtr(p.addr), buf.size()))
    }

    /// End this session's borrows. This session's work may use the borrowed buffers until
    /// it is done: each owner's stream waits for it on the GPU, so the owner's later writes
    /// come after its reads; and each buffer is unpinned with it as a last use, so that no
    /// eviction or free lets the memory go before it. The owner's stream alone would not
    /// do: after a fault there it runs none of its later work, the wait included, and an
    /// eviction finds nothing on it to wait for.
    fn end_borrows(&self, borrowed: Vec<(Arc<CtxInner>, EvictableKey)>) {
        let rt = &self.ctx.rt;
        let fence = match StreamTail::record(&rt.dev, &self.ctx.stream) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "recording the end of a session's borrows failed; waiting for its stream");
                let _ = rt.dev.synchronize_stream(&self.ctx.stream);
                None
            }
        };
        for (i, (owner, key)) in borrowed.iter().enumerate() {
            let first = borrowed[..i].iter().all(|(c, _)| !Arc::ptr_eq(c, owner));
            if let (true, Some(f)) = (first, &fence) {
                if let Err(e) = rt.dev.wait_event(&owner.stream, &f.ev) {
                    tracing::warn!(error = %e, "ordering a borrow's end failed; waiting for the stream");
                    let _ = rt.dev.synchronize_stream(&self.ctx.stream);
                }
            }
            let after = fence
                .clone()
                .map(|f| (self.ctx.stream_id, f as Arc<dyn FreeEvent>));
            owner.end_borrow(*key, after);
        }
    }

    /// Write bytes into a buffer at `offset`, in stream order, and wait for the copy.
    ///
    /// A buffer of another context of this runtime is borrowed first (see
    /// [`Session::borrow`]); order the write after its owner's work with an event.
    pub fn write(&mut self, buf: &Buffer, offset: u64, bytes: &[u8]) -> Result<()> {
        let r = self.sub(buf, offset, bytes.len() as u64)?;
        Ok(self.ctx.rt.dev.write_sync(r, bytes, &self.ctx.stream)?)
    }

    /// Read bytes from a buffer at `offset`, in stream order, and wait for the copy.
    ///
    /// A buffer of another context of this runtime is borrowed first (see
    /// [`Session::borrow`]): wait on an event its owner recorded after writing it
    /// ([`Session::wait_event`]) before reading it.
    pub fn read(&mut self, buf: &Buffer, offset: u64, out: &mut [u8]) -> Result<()> {
        let r = self.sub(buf, offset, out.len() as u64)?;
        Ok(self.ctx.rt.dev.read_sync(out, r, &self.ctx.stream)?)
    }

    fn sub(&mut self, buf: &Buffer, offset: u64, len: u64) -> Result<DeviceRange> {
        let r = self.borrow(buf)?;
        let end = offset.checked_add(len).filter(|&e| e <= r.len);
        match end {
            Some(_) => Ok(DeviceRange::new(DevicePtr(r.ptr.0 + offset), len)),
            None => Err(RuntimeError::OutOfRange {
                offset,
                end: offset.saturating_add(len),
                len: r.len,
            }),
        }
    }

    /// Record an event at the current end of the session's work.
    pub fn record_event(&self) -> Result<Event> {
        Event::record(&self.ctx)
    }

    /// Make this session's later work wait, on the GPU, for `event`. Never blocks the host.
    pub fn wait_event(&self, event: &Event) -> Result<()> {
        event.check(&self.ctx.rt)?;
        Ok(self
            .ctx
            .rt
            .dev
            .wait_event(&self.ctx.stream, event.device_event())?)
    }

    /// Block until the session's work is done.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.ctx.rt.dev.synchronize_stream(&self.ctx.stream)?)
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let Some(more) = self.more.take() else {
            // Nothing but the prefix: the common case.
            self.ctx
                .end_use(self.pinned.len, self.pinned.epoch, self.pinned.rode, &[]);
            self.ctx.rt.waits.ended();
            return;
        };
        let Held {
            extra,
            mut scratch,
            borrowed,
        } = *more;
        let rt = &self.ctx.rt;
        // Scratch is freed in stream order: reusable at once on this stream, elsewhere
        // once the work recorded here has completed.
        if !scratch.is_empty() {
            match Event::record(&self.ctx) {
                Ok(ev) => {
                    let done: Arc<dyn FreeEvent> = Arc::new(Done(ev));
                    let release = self.ctx.stream_release();
                    for b in scratch.drain(..) {
                        if let Err(e) = rt.pool.free_after(b, self.ctx.stream_id, done.clone()) {
                            tracing::error!(error = %e, "freeing scratch failed");
                        }
                    }
                    // Other streams may reuse the scratch once this stream's work is done:
                    // wake the waiters then.
                    release.armed();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "recording the end of a session failed; waiting for its stream");
                    let _ = rt.dev.synchronize_stream(&self.ctx.stream);
                    for b in scratch.drain(..) {
                        let _ = rt.pool.free(b);
                    }
                }
            }
        }
        if !borrowed.is_empty() {
            self.end_borrows(borrowed);
        }
        self.ctx
            .end_use(self.pinned.len, self.pinned.epoch, self.pinned.rode, &extra);
        self.ctx.rt.waits.ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// Ready once `ready` is set; `start` runs on its first poll.
    struct Flagged<S: FnOnce(Waker)> {
        ready: Arc<AtomicBool>,
        start: Option<S>,
    }

    impl<S: FnOnce(Waker) + Unpin> Future for Flagged<S> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<()> {
            if self.ready.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            if let Some(start) = self.start.take() {
                start(cx.waker().clone());
            }
            Poll::Pending
        }
    }

    /// A newcomer whose poll finds its context's buffer list locked (a session of the
    /// context ending, say) still rides the context's hold, from a blocking thread that
    /// waits for the lock, instead of taking the general path that lets the hold go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_async_session_that_finds_its_buffer_list_locked_still_rides_the_hold() {
        let rt = crate::Runtime::builder()
            .device(gpushare_device::BackendChoice::Sim)
            .build()
            .unwrap();
        let ctx = rt
            .create_context(gpushare_qos::ContextSpec::new("a", 64 << 20))
            .unwrap();
        let _buf = ctx.create_buffer(1 << 20).unwrap();
        drop(ctx.session_async().await.unwrap());
        // The ended session kept its pins as the context's hold.
        assert!(ctx.session_async().await.unwrap().pinned.rode);
        let (locked, unlock) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let inner = ctx.inner.clone();
        let holder = std::thread::spawn(move || {
            let _slots = inner.buffers.lock();
            let _ = tx.send(());
            let _ = unlock.recv_timeout(Duration::from_millis(100));
        });
        rx.recv().unwrap();
        let s = ctx.session_async().await.unwrap();
        assert!(s.pinned.rode, "the session took the general path");
        drop(locked);
        holder.join().unwrap();
    }

    #[test]
    fn a_nested_block_on_leaves_the_outer_futures_wake_up_to_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outer_ready = Arc::new(AtomicBool::new(false));
            let ready = outer_ready.clone();
            // The outer future's first poll blocks on an inner one. A thread wakes the
            // outer future, then completes the inner one: the outer wake-up comes while
            // the inner block_on waits.
            block_on(Flagged {
                ready,
                start: Some(move |outer: Waker| {
                    let inner_ready = Arc::new(AtomicBool::new(false));
                    let ready = inner_ready.clone();
                    block_on(Flagged {
                        ready,
                        start: Some(move |inner: Waker| {
                            std::thread::spawn(move || {
                                outer_ready.store(true, Ordering::Release);
                                outer.wake();
                                inner_ready.store(true, Ordering::Release);
                                inner.wake();
                            });
                        }),
                    });
                }),
            });
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the outer future's wake-up was lost to the inner block_on");
    }
}
