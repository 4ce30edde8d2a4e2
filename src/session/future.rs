//! The future a session is awaited through: its tries, its place in the line, and what
//! dropping it gives back.

use super::*;

/// The outcome of a try on a blocking thread.
pub(super) enum Restored {
    Done(Result<Session<'static>>),
    /// It has to wait. `since`: the release generation when the try began. A release
    /// after the try gave up wakes this future while it still waits for the task, and that
    /// wake is spent; the future tries again if the generation has moved since.
    Wait {
        since: u64,
    },
    /// It did not try: its waiter was no longer first in line when the task started. The
    /// wake-up meant to make it try once it is first again may come, and be spent, while
    /// the future still waits for the task: the future looks again at once.
    NotFirst,
}

pub(super) enum State {
    Start,
    /// In line with ticket `.0`. `.1`: the release generation its latest try began at
    /// (after the pressure handlers it asked, if any), or `None` if it has not tried since
    /// it joined or since a try that did not happen. First in line, it tries again only
    /// once the generation has moved past that: a poll that no release caused (its own
    /// handlers' releases, or a spurious wake-up) would make the same try, ask the handlers
    /// again, and, where they release something, wake itself for ever.
    Waiting(u64, Option<u64>),
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
    ///
    /// `line`: the waiter's ticket, when it is first in line. The thread may start late,
    /// after a waiter of a higher tier has become first: it then does not try, and the
    /// waiter waits for its turn again. (A try started at once could take memory that comes
    /// back meanwhile, ahead of the new first in line.)
    fn restore_off_thread(&self, ctx: &Context, fast: bool, line: Option<u64>) -> Option<State> {
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
            if gone.load(Ordering::Acquire) {
                // Nobody reads it: the future was dropped.
                return Restored::Wait {
                    since: ctx.inner.rt.waits.generation(),
                };
            }
            if line.is_some_and(|id| !ctx.inner.rt.waits.leads(id)) {
                return Restored::NotFirst;
            }
            match Self::try_now(&ctx, Some(&*gone)) {
                Step::Done(r) => {
                    Restored::Done(r.map(|pinned| Session::new(CtxRef::Owned(ctx), pinned)))
                }
                // A try always runs here, so the generation it began at is known.
                Step::Wait(since) => Restored::Wait {
                    since: since.unwrap_or_else(|| ctx.inner.rt.waits.generation()),
                },
            }
        });
        let id = match self.state {
            State::Waiting(id, _) => Some(id),
            _ => None,
        };
        Some(State::Restoring { id, task, dropped })
    }

    /// One try. Short of memory, the pressure handlers are asked for what the working
    /// set lacks (its evicted buffers), if `ask` (then cleared); if they allow, it tries
    /// again. A denial does not fail the session: it waits for memory that live sessions
    /// release, as without handlers.
    ///
    /// A set that cannot be resident beside the buffers of Guaranteed contexts, which are
    /// never evicted, fails here instead of waiting: no session's end would make room for
    /// it, and at the head of the line it would hold up those behind it for as long as
    /// some session is live.
    ///
    /// `since` is set to the release generation when the try begins. If anything was
    /// released by the time the handlers it asked have returned (by them or by anyone), or
    /// they allowed, it tries once more and `since` moves to the generation read before
    /// that try: what it saw must not count as a release that the session waits for (see
    /// [`State::Waiting`]), and what it did not see must.
    fn attempt(
        ctx: &Context,
        dropped: Option<&std::sync::atomic::AtomicBool>,
        ask: &mut bool,
        since: &std::cell::Cell<u64>,
    ) -> Result<Prefix> {
        let c = &ctx.inner;
        since.set(c.rt.waits.generation());
        let r = match pin_all(c, false, dropped) {
            // A try whose future was dropped asks no handler to free memory for it.
            Err(e) if e.is_oom() && *ask && !dropped.is_some_and(|d| d.load(Ordering::Acquire)) => {
                *ask = false;
                let answer = c.rt.relieve(ctx, evicted_bytes(c));
                let now = c.rt.waits.generation();
                if answer == Some(Pressure::Allow) || now != since.get() {
                    since.set(now);
                    pin_all(c, false, dropped)
                } else {
                    Err(e)
                }
            }
            r => r,
        };
        match r {
            Err(e) if e.is_oom() => Err(beside_guaranteed(c).unwrap_or(e)),
            r => r,
        }
    }

    /// The one try of a session that a memory-pressure handler opens, in the poll: it
    /// never waits in line. The handler runs inside another request's try, perhaps that
    /// of the first in line, and a session in line behind it would wait for that try to
    /// end, or for wake-ups that go to it, for ever. Only stream-ordered frees still
    /// queued are waited for: their work ends without anyone's help.
    fn attempt_in_handler(ctx: &Context) -> Result<Prefix> {
        // No handler is asked from inside one (see `RtInner::relieve`).
        let ask = &mut false;
        let since = &std::cell::Cell::new(0);
        let r = ctx
            .inner
            .rt
            .waiting_for_frees(|| Self::attempt(ctx, None, ask, since));
        if let Ok(p) = &r {
            granted(&ctx.inner, p);
        }
        r
    }

    /// Try until it succeeds, fails for good, or has to wait (see
    /// [`gpushare_qos::gate`]).
    ///
    /// The fast path ([`pin_resident`]) is not tried here. When it gives up it ends the
    /// session it started, which moves the release generation; the gate would take that
    /// for memory released by someone else and try again, and a session short of memory
    /// with no other session live would loop here for ever. A newcomer takes it once,
    /// before its first try.
    ///
    /// For the same reason the pressure handlers are asked once here, on the first try
    /// short of memory: a handler that opens a session moves the generation too, and the
    /// gate's next try would ask it again, for as long as nothing is live.
    fn try_now(ctx: &Context, dropped: Option<&std::sync::atomic::AtomicBool>) -> Step {
        let ask = &mut true;
        let since = &std::cell::Cell::new(0);
        match ctx.inner.rt.waits.attempt(
            || Self::attempt(ctx, dropped, ask, since),
            RuntimeError::is_oom,
        ) {
            Attempt::Done(r) => Step::Done(r),
            Attempt::Wait => Step::Wait(Some(since.get())),
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
pub(super) fn abandoned() -> RuntimeError {
    RuntimeError::SessionFuture("it was dropped while its try ran")
}

/// The error of a session future polled again after it completed.
pub(super) fn completed() -> RuntimeError {
    RuntimeError::SessionFuture(
        "it was polled again after it completed; poll a session future until it is ready, once (fuse it where a select! loop polls it again)",
    )
}

pub(super) enum Step {
    Done(Result<Prefix>),
    /// Wait in line; with the generation the last try began at, if one ran (see
    /// [`State::Waiting`]).
    Wait(Option<u64>),
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
            State::Start if !may_pass(&ctx.inner) => Step::Wait(None),
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
                if in_pressure_handler() {
                    return this.finish(Self::attempt_in_handler(ctx));
                }
                if let Some(restoring) = this.restore_off_thread(ctx, busy, None) {
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
            State::Waiting(id, since) => {
                let (id, since) = (*id, *since);
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
                // First in line, its waker registered (`is_head`): nothing was released
                // since its last try failed, so a try now would fail too. A release after
                // this look wakes it.
                if since.is_some_and(|s| rt.waits.generation() == s) {
                    return Poll::Pending;
                }
                if let Some(restoring) = this.restore_off_thread(ctx, false, Some(id)) {
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
                        Restored::Done(Err(RuntimeError::SessionFuture(if join.is_panic() {
                            "the restore of its buffers, on a blocking thread, panicked (see the log); ask for a new session"
                        } else {
                            "the restore of its buffers, on a blocking thread, was cancelled (its tokio runtime is shutting down); ask for a new session on a runtime that runs"
                        })))
                    }
                };
                match (outcome, id) {
                    (Restored::Done(r), id) => {
                        match (id, &r) {
                            (Some(id), _) => rt.dequeue(id, ctx.inner.group(), r.is_ok()),
                            (None, Ok(s)) => granted(&ctx.inner, &s.pinned),
                            (None, Err(_)) => {}
                        }
                        this.state = State::Done;
                        this.ctx = None;
                        return Poll::Ready(r);
                    }
                    // Back in line, it looks again at once: registering its waker and
                    // asking whether it is first are one step (`is_head`), so a first in
                    // line that leaves later wakes it, and one that left already is seen.
                    (Restored::NotFirst, Some(id)) => {
                        this.state = State::Waiting(id, None);
                        return Pin::new(&mut *this).poll(cx);
                    }
                    (Restored::Wait { since }, Some(id)) => {
                        this.state = State::Waiting(id, Some(since));
                        if rt.waits.rejoin(id, cx.waker(), since) {
                            cx.waker().wake_by_ref();
                        }
                        return Poll::Pending;
                    }
                    // Not in line yet: it joins the line below, and tries again at once.
                    (Restored::NotFirst, None) => {
                        this.state = State::Start;
                        Step::Wait(None)
                    }
                    (Restored::Wait { since }, None) => {
                        this.state = State::Start;
                        Step::Wait(Some(since))
                    }
                }
            }
        };
        match (step, &this.state) {
            (Step::Done(r), State::Waiting(id, _)) => {
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
            (Step::Wait(since), State::Waiting(id, _)) => {
                this.state = State::Waiting(*id, since);
                Poll::Pending
            }
            (Step::Wait(since), _) => {
                let Some(id) = rt.enqueue(ctx.inner.tier, ctx.inner.group(), cx.waker()) else {
                    return this.finish(Err(RuntimeError::LineFull {
                        context: ctx.inner.name.clone(),
                        waiting: gpushare_qos::SessionGate::MAX_WAITING,
                    }));
                };
                this.state = State::Waiting(id, since);
                // Memory may have been freed between the attempt and joining the line:
                // the next poll tries again if so (or if it made no try).
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
            State::Waiting(id, _) | State::Restoring { id: Some(id), .. } => *id,
            _ => return,
        };
        if let Some(ctx) = self.ctx {
            ctx.inner.rt.dequeue(id, ctx.inner.group(), false);
        }
    }
}
