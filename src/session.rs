//! Sessions: a context's turn on the GPU, with its buffers resident.

use crate::context::{Context, CtxInner};
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

/// Whether a newcomer of `ctx` may try at once, ahead of those in line.
pub(crate) fn may_pass(ctx: &CtxInner) -> bool {
    ctx.rt.waits.may_pass(ctx.tier.rank()) || in_pressure_handler()
}

/// A buffer's size as the pool holds it.
fn round(size: u64) -> u64 {
    size.next_multiple_of(gpushare_pool::ALIGN)
}

/// Why `ctx`'s working set can never be resident while the buffers of the other
/// Guaranteed contexts stay (they are never evicted), if it cannot.
fn beside_guaranteed(ctx: &CtxInner) -> Option<RuntimeError> {
    let bytes: u64 = {
        let slots = ctx.buffers.lock();
        slots
            .iter()
            .filter(|s| s.live())
            .map(|s| round(s.size))
            .sum()
    };
    let stats = ctx.rt.pool.stats();
    let guaranteed: u64 = stats
        .owners
        .iter()
        .filter(|o| o.id != ctx.owner && o.tier == gpushare_pool::Tier::Guaranteed)
        .map(|o| o.evictable_resident_bytes)
        .sum();
    let room = ctx.rt.capacity.saturating_sub(guaranteed);
    (bytes > room).then(|| RuntimeError::WorkingSetBesideGuaranteed {
        context: ctx.name.clone(),
        bytes,
        guaranteed,
        capacity: ctx.rt.capacity,
    })
}

/// A buffer of a working set, as a try of [`pin_all`] takes it from its context's list.
struct Member {
    key: EvictableKey,
    size: u64,
    id: EvictableRef,
}

/// Whether compacting the working set may let it fit: a piece of `size` bytes is free in
/// all but in no one block; the memory free plus the set's own resident Offload buffers
/// covers what is `missing`; and the set was not compacted since memory was last released.
fn may_compact(
    ctx: &CtxInner,
    set: &[Member],
    resident: &[bool],
    offload: &[bool],
    size: u64,
    missing: u64,
) -> bool {
    if ctx.compacted_at.load(Ordering::Relaxed) == ctx.rt.waits.generation() + 1 {
        return false;
    }
    let s = ctx.rt.pool.stats();
    if s.free_bytes < size || s.largest_free_bytes >= size {
        return false;
    }
    let own: u64 = set
        .iter()
        .zip(resident)
        .zip(offload)
        .filter(|((_, &r), &o)| r && o)
        .map(|((m, _), _)| round(m.size))
        .sum();
    s.free_bytes + own >= missing
}

/// Whether each buffer of `set` keeps its contents when evicted (Offload).
fn offload_policy(ctx: &CtxInner, set: &[Member]) -> Vec<bool> {
    let metas = ctx.rt.buffers.lock();
    set.iter()
        .map(|m| {
            metas
                .get(&m.key)
                .is_some_and(|m| m.policy == crate::EvictPolicy::Offload)
        })
        .collect()
}

/// Offload the context's own resident, unpinned buffers whose policy keeps their contents
/// (`offload`; a discarded buffer would lose them); returns how many went out.
fn offload_own(ctx: &CtxInner, set: &[Member], offload: &[bool]) -> usize {
    set.iter()
        .zip(offload)
        .filter(|(_, keep)| **keep)
        .filter(|(m, _)| ctx.rt.pool.evict(ctx.owner, m.id).unwrap_or(false))
        .count()
}

/// Bytes of the context's working set not on the device: what a session must restore.
pub(crate) fn evicted_bytes(ctx: &CtxInner) -> u64 {
    let slots = ctx.buffers.lock();
    slots
        .iter()
        .filter(|s| s.live())
        .filter_map(|s| Some((s.size, s.id.as_ref()?)))
        .filter(|(_, id)| !ctx.rt.pool.is_resident(*id).unwrap_or(true))
        .map(|(size, _)| size)
        .sum()
}

/// The fast path of [`pin_all`]: if the whole working set is resident, pin it and return
/// which buffers; if not, pin nothing and return `None`.
///
/// Pinning a resident set takes one pool lock (none when it rides the context's hold, see
/// [`CtxInner::end_use`]) and waits for nothing; it holds nothing
/// partly, so it needs no `pin_lock`, and it takes no memory from anyone. The session
/// counts as live from before it pins: a session short of memory meanwhile then waits for
/// this one instead of failing. If this path gives up, `ended` moves the release
/// generation and wakes the first in line, so that such a session tries again. The first
/// in line does not take it: its failed try would wake itself, and it would spin. A
/// waiter behind it takes it when woken to go ahead (see `SessionFuture::poll`); its
/// failed try wakes the first in line once.
///
/// Without `wait` it tries nothing ([`Fast::Busy`]) if the context's buffer list is
/// locked: whoever holds it holds it briefly (a try that restores lets it go, see
/// [`pin_all`]), but a future's poll does not wait for another thread at all; its caller
/// tries again where it may wait. While another session's try restores, a newcomer's fast
/// path finds the set not whole and gives up; its `ended` moves the release generation, so
/// a waiting session may try once more than it needs to, once per newcomer.
fn pin_resident(ctx: &Arc<CtxInner>, wait: bool) -> Result<Fast> {
    let slots = if wait {
        ctx.buffers.lock()
    } else {
        match ctx.buffers.try_lock() {
            Some(slots) => slots,
            None => return Ok(Fast::Busy),
        }
    };
    ctx.rt.waits.started();
    // The hold keeps every buffer pinned (none was made or dropped since it was kept):
    // ride it.
    if ctx.ride(&slots) {
        ctx.add_use(&slots);
        return Ok(Fast::Pinned(Prefix {
            rode: true,
            ..Prefix::of(ctx, &slots)
        }));
    }
    let live = slots
        .iter()
        .filter(|s| s.live())
        .filter_map(|s| s.id.as_ref());
    match ctx.rt.pool.pin_all_resident(live) {
        Ok(true) => {
            ctx.add_use(&slots);
            Ok(Fast::Pinned(Prefix::of(ctx, &slots)))
        }
        not_all => {
            drop(slots);
            ctx.rt.waits.ended();
            not_all
                .map(|_| Fast::NotResident)
                .map_err(|e| RuntimeError::from_pool(e, &ctx.name))
        }
    }
}

/// What [`pin_resident`] found.
enum Fast {
    /// The working set, pinned.
    Pinned(Prefix),
    /// Not all of it resident: nothing pinned.
    NotResident,
    /// The context's buffer list was locked (only without `wait`): nothing tried.
    Busy,
}

/// Pin every buffer of the context whose handle lives, or none, and return which: the
/// session holds them (see [`CtxInner::end_use`]).
///
/// The try takes the working set from the context's list and counts as a use of the
/// context from then on ([`TryUse`]). While a use is live, slots are only appended and
/// doomed, never removed or reordered, so the set stays the first slots of the list, and
/// the list's lock is let go while the set is pinned. Restoring waits for copies (about 20
/// ms per GiB on an H100), and whoever else takes the list, such as a session of the
/// context ending or a buffer dropped on an async executor's thread, does not wait for
/// them. A buffer dropped meanwhile is left out: freed before its pin, it fails to pin as
/// already freed (and counts neither as resident nor as missing); pinned first, or being
/// restored when dropped, the pool refuses to free it, and the session frees it when it
/// unpins it (see [`CtxInner::free_doomed`]).
///
/// With `fast`, a path that does not take `pin_lock` is tried first; the first in line
/// skips it (see [`pin_resident`]), so that its failed tries never wake itself.
///
/// `dropped`: set when the future that asked for the session was dropped. Checked once the
/// pin lock is held and before each pin, so that a try whose future is gone restores
/// nothing more (it would evict other contexts' buffers, and hold the lock, for a session
/// that ends at once).
pub(crate) fn pin_all(
    ctx: &Arc<CtxInner>,
    fast: bool,
    dropped: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Prefix> {
    let gone = || dropped.is_some_and(|d| d.load(Ordering::Acquire));
    if fast {
        if let Fast::Pinned(p) = pin_resident(ctx, true)? {
            return Ok(p);
        }
    }
    let _one_at_a_time = block_on(ctx.rt.pin_lock.acquire(ctx.tier.rank()));
    if gone() {
        return Err(abandoned());
    }
    let (set, tried) = TryUse::start(ctx);
    let total: u64 = set.iter().map(|m| m.size).sum();
    if total > ctx.rt.capacity {
        return Err(RuntimeError::WorkingSetTooLarge {
            context: ctx.name.clone(),
            bytes: total,
            capacity: ctx.rt.capacity,
        });
    }
    let mut compacted = false;
    'attempt: loop {
        let mut pinned = Vec::with_capacity(set.len());
        // Resident buffers first: pinning them allocates nothing, and once pinned they
        // cannot be chosen as victims while the evicted ones are restored.
        // `None`: freed since the set was taken.
        let residency: Vec<Option<bool>> = set
            .iter()
            .map(|m| match ctx.rt.pool.is_resident(m.id) {
                Err(gpushare_pool::PoolError::DoubleFree) => None,
                r => Some(r.unwrap_or(false)),
            })
            .collect();
        let resident: Vec<bool> = residency.iter().map(|r| *r == Some(true)).collect();
        let missing: u64 = set
            .iter()
            .zip(&residency)
            .filter(|(_, &r)| r == Some(false))
            .map(|(m, _)| round(m.size))
            .sum();
        let order = set
            .iter()
            .zip(&residency)
            .filter(|(_, &r)| r == Some(true))
            .chain(
                set.iter()
                    .zip(&residency)
                    .filter(|(_, &r)| r == Some(false)),
            )
            .map(|(m, _)| m);
        for m in order {
            if gone() {
                let _ = ctx.rt.pool.unpin_all(pinned);
                return Err(abandoned());
            }
            match ctx.rt.pool.pin(m.id, ctx.stream_id) {
                Ok(_) => pinned.push(m.id),
                // Dropped since the set was taken, and freed: no longer part of it.
                Err(gpushare_pool::PoolError::DoubleFree) => {}
                Err(e) => {
                    let _ = ctx.rt.pool.unpin_all(pinned);
                    // Memory may be free but scattered: enough in all, no piece large
                    // enough, and the set's own resident buffers among the pieces. Then,
                    // once until memory is released again, move those out (offload
                    // copies, their contents kept) and restore the whole set in one go.
                    if !compacted && matches!(e, gpushare_pool::PoolError::OutOfMemory { .. }) {
                        let offload = offload_policy(ctx, &set);
                        if may_compact(ctx, &set, &resident, &offload, round(m.size), missing) {
                            let gen = ctx.rt.waits.generation();
                            ctx.compacted_at.store(gen + 1, Ordering::Relaxed);
                            if offload_own(ctx, &set, &offload) > 0 {
                                compacted = true;
                                continue 'attempt;
                            }
                        }
                    }
                    return Err(RuntimeError::from_pool(e, &ctx.name));
                }
            }
        }
        break;
    }
    let mut prefix = tried.succeeded();
    prefix.general = true;
    ctx.rt.waits.started();
    Ok(prefix)
}

/// A try of [`pin_all`]: a use of its context from the moment it takes the working set
/// from the list. It becomes the session's use when every buffer is pinned; a try that
/// fails ends it when dropped, having unpinned what it pinned.
struct TryUse<'a> {
    ctx: &'a CtxInner,
    prefix: Prefix,
    succeeded: bool,
}

impl<'a> TryUse<'a> {
    /// Take the context's working set (its buffers whose handles live) and count the try
    /// as a use, under one lock of the list.
    fn start(ctx: &'a CtxInner) -> (Vec<Member>, Self) {
        let slots = ctx.buffers.lock();
        // Pinned one by one below, and its own resident buffers may have to move out to
        // make room for the rest in one piece (`offload_own`): a hold no use relies on goes.
        ctx.release_hold(&slots);
        let set = slots
            .iter()
            .filter(|s| s.live())
            .filter_map(|s| {
                Some(Member {
                    key: s.key,
                    size: s.size,
                    id: s.id.as_ref()?.to_ref(),
                })
            })
            .collect();
        ctx.add_use(&slots);
        let prefix = Prefix::of(ctx, &slots);
        (
            set,
            TryUse {
                ctx,
                prefix,
                succeeded: false,
            },
        )
    }

    /// Every buffer is pinned: the use is the session's, and this is what it holds.
    fn succeeded(mut self) -> Prefix {
        self.succeeded = true;
        self.prefix
    }
}

impl Drop for TryUse<'_> {
    fn drop(&mut self) {
        if !self.succeeded {
            let slots = self.ctx.buffers.lock();
            self.ctx
                .release_use(slots, self.prefix.len, self.prefix.epoch, &[]);
        }
    }
}

/// The outcome of a try on a blocking thread.
enum Restored {
    Done(Result<Session<'static>>),
    /// It has to wait. `since`: the release generation when the try began. A release
    /// after the try gave up wakes this future while it still waits for the task, and that
    /// wake is spent; the future tries again if the generation has moved since.
    Wait {
        since: u64,
    },
}

enum State {
    Start,
    Waiting(u64),
    /// A try whose working set is not all resident runs on a blocking thread: restoring
    /// evicted buffers copies them back and waits for the copies (about 20 ms per GiB on
    /// an H100), which would stall the executor's thread. `id`: the session's place in
    /// line, if it has one. The task owns what it takes: if this future is dropped, the
    /// session it may have opened is dropped (ended) with the task's output.
    Restoring {
        id: Option<u64>,
        task: tokio::task::JoinHandle<Restored>,
        /// Set when the future is dropped: a task that has not begun its try skips it.
        dropped: Arc<std::sync::atomic::AtomicBool>,
    },
    Done,
}

/// The future of [`Context::session_async`]. Sessions that cannot get their buffers
/// resident wait in line, in tier order with aging.
pub struct SessionFuture<'a> {
    /// The context, borrowed (as the session it grants borrows it): neither the future
    /// nor the session counts a reference to it. `None` once the future is done.
    ctx: Option<&'a Context>,
    state: State,
    /// Whether tries that restore run on blocking threads (inside a tokio runtime, for
    /// futures that are awaited rather than blocked on).
    offload_restores: bool,
}

impl<'a> SessionFuture<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        SessionFuture {
            ctx: Some(ctx),
            state: State::Start,
            offload_restores: true,
        }
    }

    /// For [`Context::session`], which blocks its thread anyway: tries run in the poll.
    pub(crate) fn blocking(ctx: &'a Context) -> Self {
        SessionFuture {
            ctx: Some(ctx),
            state: State::Start,
            offload_restores: false,
        }
    }

    /// A try that must restore, on a blocking thread of the current tokio runtime; `None`
    /// outside one (the try then runs in the poll). With `fast`, a newcomer's fast path
    /// found the context's buffer list locked: the thread tries it first, waiting for the
    /// lock. Without that second look, a set that is whole and pinned by the context's
    /// hold would take the general path whenever a session of the same context was
    /// ending at the moment of the poll: a blocking thread, the runtime's restore lock
    /// behind other contexts' restores, and the hold let go.
    fn restore_off_thread(&self, ctx: &Context, fast: bool) -> Option<State> {
        if !self.offload_restores {
            return None;
        }
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let ctx = ctx.clone();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gone = dropped.clone();
        let task = handle.spawn_blocking(move || {
            if fast && !gone.load(Ordering::Acquire) {
                match pin_resident(&ctx.inner, true) {
                    Ok(Fast::Pinned(pinned)) => {
                        return Restored::Done(Ok(Session::new(CtxRef::Owned(ctx), pinned)))
                    }
                    Err(e) => return Restored::Done(Err(e)),
                    Ok(_) => {}
                }
            }
            // Read after the fast path, whose giving up moved the generation.
            let since = ctx.inner.rt.waits.generation();
            if gone.load(Ordering::Acquire) {
                return Restored::Wait { since };
            }
            match Self::try_now(&ctx, Some(&*gone)) {
                Step::Done(r) => {
                    Restored::Done(r.map(|pinned| Session::new(CtxRef::Owned(ctx), pinned)))
                }
                Step::Wait => Restored::Wait { since },
            }
        });
        let id = match self.state {
            State::Waiting(id) => Some(id),
            _ => None,
        };
        Some(State::Restoring { id, task, dropped })
    }

    /// One try. Short of memory, the pressure handlers are asked for what the working
    /// set lacks (its evicted buffers); if they allow, it tries again. A denial does not
    /// fail the session: it waits for memory that live sessions release, as without
    /// handlers.
    ///
    /// A set that cannot be resident beside the buffers of Guaranteed contexts, which are
    /// never evicted, fails here instead of waiting: no session's end would make room for
    /// it, and at the head of the line it would hold up those behind it for as long as
    /// some session is live.
    fn attempt(ctx: &Context, dropped: Option<&std::sync::atomic::AtomicBool>) -> Result<Prefix> {
        let c = &ctx.inner;
        let r = match pin_all(c, false, dropped) {
            // A try whose future was dropped asks no handler to free memory for it.
            Err(e) if e.is_oom() && !dropped.is_some_and(|d| d.load(Ordering::Acquire)) => {
                match c.rt.relieve(ctx, evicted_bytes(c)) {
                    Some(Pressure::Allow) => pin_all(c, false, dropped),
                    _ => Err(e),
                }
            }
            r => r,
        };
        match r {
            Err(e) if e.is_oom() => Err(beside_guaranteed(c).unwrap_or(e)),
            r => r,
        }
    }

    /// Try until it succeeds, fails for good, or has to wait (see
    /// [`gpushare_qos::gate`]).
    ///
    /// The fast path ([`pin_resident`]) is not tried here. When it gives up it ends the
    /// session it started, which moves the release generation; the gate would take that
    /// for memory released by someone else and try again, and a session short of memory
    /// with no other session live would loop here for ever. A newcomer takes it once,
    /// before its first try.
    fn try_now(ctx: &Context, dropped: Option<&std::sync::atomic::AtomicBool>) -> Step {
        match ctx
            .inner
            .rt
            .waits
            .attempt(|| Self::attempt(ctx, dropped), RuntimeError::is_oom)
        {
            Attempt::Done(r) => Step::Done(r),
            Attempt::Wait => Step::Wait,
        }
    }

    /// The outcome of a finished round: the session, borrowing the context's handle.
    fn finish(&mut self, r: Result<Prefix>) -> Poll<Result<Session<'a>>> {
        self.state = State::Done;
        let ctx = self.ctx.take();
        Poll::Ready(r.and_then(|pinned| match ctx {
            Some(ctx) => Ok(Session::new(CtxRef::Borrowed(ctx), pinned)),
            None => Err(completed()),
        }))
    }
}

/// The error of a try whose future was dropped: nobody reads it.
fn abandoned() -> RuntimeError {
    RuntimeError::Foreign {
        what: "session future",
        owner: "dropped future",
    }
}

fn completed() -> RuntimeError {
    RuntimeError::Foreign {
        what: "session future",
        owner: "completed poll",
    }
}

enum Step {
    Done(Result<Prefix>),
    Wait,
}

impl<'a> Future for SessionFuture<'a> {
    type Output = Result<Session<'a>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(ctx) = this.ctx else {
            return Poll::Ready(Err(completed()));
        };
        let rt = &ctx.inner.rt;
        let step = match &mut this.state {
            State::Done => return Poll::Ready(Err(completed())),
            // A newcomer tries at once, before any in line, unless the first in line has
            // waited too long for that (`SessionGate::may_pass`): then it joins the line.
            // Making every newcomer that needs memory join the line was tried: with
            // everyone in line and nobody live, a head whose set did not fit a fragmented
            // pool failed for good where it used to wait for a live session, and the
            // stress test's failed sessions went from a handful to thousands a run.
            // Eviction takes lower tiers first, so a newcomer cannot take a higher tier's
            // buffers.
            State::Start if !may_pass(&ctx.inner) => Step::Wait,
            State::Start => {
                // A working set already in place is pinned here, without restoring (and
                // without waiting for another session's restore: that try goes on below).
                // A blocked thread may wait for the buffer list's lock; an executor's poll
                // does not.
                let busy = match pin_resident(&ctx.inner, !this.offload_restores) {
                    Ok(Fast::Pinned(pinned)) => return this.finish(Ok(pinned)),
                    Err(e) => return this.finish(Err(e)),
                    Ok(Fast::NotResident) => false,
                    Ok(Fast::Busy) => true,
                };
                if let Some(restoring) = this.restore_off_thread(ctx, busy) {
                    this.state = restoring;
                    return Pin::new(&mut *this).poll(cx);
                }
                if busy {
                    // Outside a tokio runtime, where the try runs in the poll anyway.
                    match pin_resident(&ctx.inner, true) {
                        Ok(Fast::Pinned(pinned)) => return this.finish(Ok(pinned)),
                        Err(e) => return this.finish(Err(e)),
                        Ok(_) => {}
                    }
                }
                Self::try_now(ctx, None)
            }
            State::Waiting(id) => {
                let id = *id;
                if !rt.is_head(id, cx.waker()) {
                    // Behind the first in line, a waiter whose working set is in place may
                    // go ahead as a newcomer may. It is woken for this when a session of
                    // its context is served from the line or granted to a newcomer whose
                    // try may have restored the set (`granted`), and it leaves without
                    // waking its context's others: what woke it woke them. A new first in
                    // line opens a new period, and wakes nobody behind it: they go at their
                    // context's next grant or at their turn.
                    if may_pass(&ctx.inner) {
                        match pin_resident(&ctx.inner, !this.offload_restores) {
                            Ok(Fast::Pinned(pinned)) => {
                                rt.dequeue(id, ctx.inner.group(), false);
                                return this.finish(Ok(pinned));
                            }
                            // The context's list was locked for a moment: look again soon.
                            Ok(Fast::Busy) => cx.waker().wake_by_ref(),
                            // Its turn at the head of the line will tell.
                            Ok(Fast::NotResident) | Err(_) => {}
                        }
                    }
                    return Poll::Pending;
                }
                if let Some(restoring) = this.restore_off_thread(ctx, false) {
                    this.state = restoring;
                    return Pin::new(&mut *this).poll(cx);
                }
                Self::try_now(ctx, None)
            }
            State::Restoring { id, task, .. } => {
                let id = *id;
                let outcome = match Pin::new(task).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(outcome)) => outcome,
                    Poll::Ready(Err(join)) => {
                        tracing::error!(context = %ctx.inner.name, error = %join, "a session's try on a blocking thread did not finish");
                        Restored::Done(Err(RuntimeError::Foreign {
                            what: "session restore",
                            owner: if join.is_panic() {
                                "a panicked blocking task"
                            } else {
                                "a cancelled blocking task"
                            },
                        }))
                    }
                };
                match outcome {
                    Restored::Done(r) => {
                        match (id, &r) {
                            (Some(id), _) => rt.dequeue(id, ctx.inner.group(), r.is_ok()),
                            (None, Ok(s)) => granted(&ctx.inner, &s.pinned),
                            (None, Err(_)) => {}
                        }
                        this.state = State::Done;
                        this.ctx = None;
                        return Poll::Ready(r);
                    }
                    Restored::Wait { since } => match id {
                        Some(id) => {
                            this.state = State::Waiting(id);
                            if rt.waits.rejoin(id, cx.waker(), since) {
                                cx.waker().wake_by_ref();
                            }
                            return Poll::Pending;
                        }
                        // It joins the line below, and tries again at once.
                        None => {
                            this.state = State::Start;
                            Step::Wait
                        }
                    },
                }
            }
        };
        match (step, &this.state) {
            (Step::Done(r), State::Waiting(id)) => {
                rt.dequeue(*id, ctx.inner.group(), r.is_ok());
                this.finish(r)
            }
            (Step::Done(r), _) => {
                if let Ok(p) = &r {
                    granted(&ctx.inner, p);
                }
                this.finish(r)
            }
            // Its waker is in line (`is_head` above).
            (Step::Wait, State::Waiting(_)) => Poll::Pending,
            (Step::Wait, _) => {
                let id = rt.enqueue(ctx.inner.tier, ctx.inner.group(), cx.waker());
                this.state = State::Waiting(id);
                // Memory may have been freed between the attempt and joining the line.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

impl Drop for SessionFuture<'_> {
    fn drop(&mut self) {
        if let State::Restoring { dropped, .. } = &self.state {
            dropped.store(true, Ordering::Release);
        }
        let id = match &self.state {
            State::Waiting(id) | State::Restoring { id: Some(id), .. } => *id,
            _ => return,
        };
        if let Some(ctx) = self.ctx {
            ctx.inner.rt.dequeue(id, ctx.inner.group(), false);
        }
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
/// read-modify-writes fewer per session, each about 11 ns on an H100's host). A server
/// task owns its `Context` clone and opens sessions on it.
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
    /// started, and evicted since). The context's buffer list is not held meanwhile.
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
        // `buf` lives, so its slot does, and its block is not freed under the pin.
        let p = self
            .ctx
            .rt
            .pool
            .pin(id, self.ctx.stream_id)
            .map_err(|e| RuntimeError::from_pool(e, &self.ctx.name))?;
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
    ///
    /// Ordering stays with events, as on a GPU: wait on an event the owner recorded after
    /// writing the buffer ([`Session::wait_event`]) before reading it. When this session
    /// ends, the owner's stream waits (on the GPU) for this session's work, so the owner's
    /// later writes, and any eviction of the buffer, come after this session's reads.
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
        // work, and this session orders its own work with events.
        let pinned = owner.rt.pool.pin(id, owner.stream_id);
        match (&pinned, already) {
            // Already pinned by this session: drop the extra pin.
            (Ok(_), true) => drop(owner.rt.pool.unpin(id)),
            (Ok(_), false) => self.more().borrowed.push((owner.clone(), buf.key)),
            (Err(_), true) => {}
            (Err(_), false) => {
                owner.release_use(owner.buffers.lock(), 0, 0, std::slice::from_ref(&buf.key))
            }
        }
        let p = pinned.map_err(|e| RuntimeError::from_pool(e, &owner.name))?;
        Ok(DeviceRange::new(DevicePtr(p.addr), buf.size()))
    }

    /// End this session's borrows: each owner's stream waits for this session's work, then
    /// the buffers are unpinned.
    fn end_borrows(&self, borrowed: Vec<(Arc<CtxInner>, EvictableKey)>) {
        let rt = &self.ctx.rt;
        let fence = rt
            .dev
            .create_event(gpushare_device::EventFlags::default())
            .and_then(|ev| rt.dev.record_event(&ev, &self.ctx.stream).map(|_| ev));
        for (i, (owner, key)) in borrowed.iter().enumerate() {
            let first = borrowed[..i].iter().all(|(c, _)| !Arc::ptr_eq(c, owner));
            if first {
                let ordered = match &fence {
                    Ok(ev) => rt
                        .dev
                        .wait_event(&owner.stream, ev)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = ordered {
                    tracing::warn!(error = %e, "ordering a borrow's end failed; waiting for the stream");
                    let _ = rt.dev.synchronize_stream(&self.ctx.stream);
                }
            }
            owner.end_use(0, 0, false, std::slice::from_ref(key));
        }
    }

    /// Write bytes into a buffer at `offset`, in stream order, and wait for the copy.
    pub fn write(&mut self, buf: &Buffer, offset: u64, bytes: &[u8]) -> Result<()> {
        let r = self.sub(buf, offset, bytes.len() as u64)?;
        Ok(self.ctx.rt.dev.write_sync(r, bytes, &self.ctx.stream)?)
    }

    /// Read bytes from a buffer at `offset`, in stream order, and wait for the copy.
    pub fn read(&mut self, buf: &Buffer, offset: u64, out: &mut [u8]) -> Result<()> {
        let r = self.sub(buf, offset, out.len() as u64)?;
        Ok(self.ctx.rt.dev.read_sync(out, r, &self.ctx.stream)?)
    }

    fn sub(&mut self, buf: &Buffer, offset: u64, len: u64) -> Result<DeviceRange> {
        let r = self.range(buf)?;
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
