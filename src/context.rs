//! Contexts (one per model) and their persistent buffers.

use crate::error::{Result, RuntimeError};
use crate::runtime::{Handlers, Pressure, PressureInfo, PressureRegistration, RtInner};
use crate::session::{block_on, CtxRef, SessionFuture};
use crate::{EvictPolicy, Session};
use gpushare_device::{PinnedBuffer, Stream};
use gpushare_pool::{EvictableId, EvictableKey, OwnerId, OwnerSpec, PoolError, StreamId};
use gpushare_qos::{Admission, ContextSpec, Isolation, PartitionLimits, Tier};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the evictor knows of a buffer.
pub(crate) struct BufMeta {
    pub policy: EvictPolicy,
    pub discarded: Arc<AtomicBool>,
    /// Pinned host staging of an Offload buffer, allocated with the buffer and reused.
    /// Shared so that a restore, which runs without the pool's lock, can let this table go
    /// while it copies.
    pub host: Option<Arc<PinnedBuffer>>,
    /// The owner's stream. Work on the buffer is ordered on it (a session's work runs on
    /// it), so eviction and restore wait for its tail before they touch the memory.
    pub stream: Stream,
}

pub(crate) struct BufSlot {
    pub key: EvictableKey,
    /// `None` once freed while uses were live: the slot stays, so that their prefixes still
    /// name the same buffers, until the last use ends.
    pub id: Option<EvictableId>,
    pub size: u64,
    /// [`LIVE`] while its handle lives. Once dropped while uses are live, the value of
    /// [`CtxInner::dooms`] it was given: sessions that start later do not pin it, and it is
    /// freed as soon as no use pins it.
    pub doomed_at: u64,
}

/// What [`CtxInner::free_if_unpinned`] did with the list locked, for
/// [`CtxInner::freed`] to finish with the list let go.
#[derive(Default)]
pub(crate) struct Freed {
    /// Buffers freed.
    keys: Vec<EvictableKey>,
    /// Buffers whose last use could not be recorded: freed once the stream is done.
    stalled: Vec<EvictableKey>,
    /// Releases whose callback could not be queued: signalled once the stream is done.
    unsignalled: usize,
}

/// [`BufSlot::doomed_at`] of a buffer whose handle lives.
pub(crate) const LIVE: u64 = u64::MAX;

impl BufSlot {
    /// Whether its handle lives (sessions pin it).
    #[inline]
    pub fn live(&self) -> bool {
        self.doomed_at == LIVE
    }
    /// Whether a session that started at doom epoch `epoch` pinned it, if it is in that
    /// session's prefix.
    #[inline]
    pub fn pinned_since(&self, epoch: u64) -> bool {
        self.doomed_at > epoch
    }
}

pub(crate) struct CtxInner {
    pub rt: Arc<RtInner>,
    pub name: String,
    pub tier: Tier,
    pub max: u64,
    pub owner: OwnerId,
    pub admission: Admission,
    pub stream: Stream,
    pub stream_id: StreamId,
    pub isolation: Isolation,
    /// Whether the context's partition is its own, to be removed with it.
    pub own_partition: bool,
    pub buffers: Mutex<Vec<BufSlot>>,
    pub handlers: Arc<Handlers>,
    /// Uses of its buffers: live sessions, sessions' tries that are pinning their working
    /// sets, and borrows by other contexts' sessions. Written only with `buffers` locked
    /// (so a plain load and store, no read-modify-write); read without it for snapshots.
    pub sessions: AtomicU64,
    /// Buffers dropped while uses were live, so far: the doom epoch. Written only with
    /// `buffers` locked.
    pub dooms: AtomicU64,
    /// One more than the runtime's release generation when a session last compacted this
    /// context's working set (0: never). It compacts at most once until memory is
    /// released again.
    pub compacted_at: AtomicU64,
    /// What its events share: the device, its stream and the kept event handles.
    pub events: Arc<crate::event::EventHome>,
    /// The hold: the first `held` slots' buffers stay pinned from a session's end on, so
    /// that the next session pins nothing ([`NO_HOLD`]: none). See [`CtxInner::end_use`].
    /// Written only with `buffers` locked (or by the context's drop, which has it alone).
    pub held: AtomicUsize,
    /// [`CtxInner::dooms`] when the hold was kept: once a buffer it covers is dropped, no
    /// session rides it any more (it would keep the dropped buffer pinned).
    pub held_at: AtomicU64,
    /// Live sessions that ride the hold: it goes only when none does.
    pub riders: AtomicU64,
    /// The runtime's release clock when its last use ended: holds are let go oldest first.
    pub last_used: AtomicU64,
}

/// [`CtxInner::held`] of a context that keeps no hold.
pub(crate) const NO_HOLD: usize = usize::MAX;

impl CtxInner {
    /// The context's group in the session line (its waiters are woken together when one
    /// of them is served): its address, distinct among contexts alive at once.
    pub fn group(&self) -> u64 {
        self as *const Self as usize as u64
    }

    /// One more session or borrow; `buffers` must be locked, and its guard is asked for.
    pub fn add_use(&self, _locked: &parking_lot::MutexGuard<'_, Vec<BufSlot>>) {
        let n = self.sessions.load(Ordering::Relaxed);
        self.sessions.store(n + 1, Ordering::Relaxed);
    }

    /// A session (or a borrow by another context's session) stops using buffers: those of
    /// the first `prefix` slots it pinned (all but the ones dropped before doom epoch
    /// `epoch`, when it started) and those of `extra`. Unpin them, and free the dropped
    /// buffers no use pins any more. (While any use is live, slots are only appended,
    /// never removed or reordered, so a prefix of them stays the same buffers; the last
    /// use clears out the freed ones.)
    ///
    /// `rode`: the use pinned none of its prefix itself, the context's hold kept it pinned.
    ///
    /// The last use to end keeps what it pinned, as the hold, when that is every buffer
    /// (none made since it began, none dropped, none pinned on the way): the next session
    /// then rides the hold and pins nothing, and neither end takes the pool's lock. Held
    /// buffers are not evicted; so that memory goes as before, the pool has the runtime let
    /// go of every hold not in use before it chooses a victim (see
    /// [`gpushare_pool::Evictor::release_idle_pins`]), oldest first, which puts those buffers
    /// in least-recently-used order behind the ones unpinned earlier.
    pub fn end_use(&self, prefix: usize, epoch: u64, rode: bool, extra: &[EvictableKey]) {
        let slots = self.buffers.lock();
        self.last_used
            .store(self.rt.waits.clock(), Ordering::Relaxed);
        if rode {
            let riders = self.riders.load(Ordering::Relaxed) - 1;
            self.riders.store(riders, Ordering::Relaxed);
            // The last rider of a hold that covers a dropped buffer lets it go, so that the
            // buffer is freed once the uses that pinned it themselves end too.
            if riders == 0 {
                if self.held_at.load(Ordering::Relaxed) != self.dooms.load(Ordering::Relaxed) {
                    self.drop_hold(&slots);
                } else {
                    self.hold_went_idle();
                }
            }
            if extra.is_empty() {
                // It pinned nothing: the pool is not asked.
                return self.release_use(slots, prefix, epoch, extra);
            }
        } else if extra.is_empty()
            && prefix == slots.len()
            && self.sessions.load(Ordering::Relaxed) == 1
            && slots.iter().all(BufSlot::live)
        {
            self.keep_hold(&slots);
            self.sessions.store(0, Ordering::Relaxed);
            return;
        }
        let (head, tail) = slots.split_at(prefix.min(slots.len()));
        let head = if rode { &head[..0] } else { head };
        let unpinned = self.rt.pool.unpin_all(
            head.iter()
                .filter(|s| s.pinned_since(epoch))
                .chain(tail.iter().filter(|s| extra.contains(&s.key)))
                .filter_map(|s| s.id.as_ref()),
        );
        if let Err(e) = unpinned {
            tracing::error!(context = %self.name, error = %e, "unpinning buffers failed");
        }
        self.release_use(slots, prefix, epoch, extra);
    }

    /// A borrow of buffer `key` by another context's session ends. Its work on stream
    /// `after.0` may still use the buffer until `after.1` completes: the buffer is unpinned
    /// with that work as a last use, so that the pool lets the memory go (evicted or
    /// freed) only after it, whatever becomes of this context's own stream. Without
    /// `after` (its event could not be recorded), the borrower has waited for its stream.
    pub fn end_borrow(
        &self,
        key: EvictableKey,
        after: Option<(StreamId, Arc<dyn gpushare_pool::FreeEvent>)>,
    ) {
        let Some((stream, done)) = after else {
            return self.end_use(0, 0, false, &[key]);
        };
        let slots = self.buffers.lock();
        self.last_used
            .store(self.rt.waits.clock(), Ordering::Relaxed);
        if let Some(id) = slots
            .iter()
            .find(|s| s.key == key)
            .and_then(|s| s.id.as_ref())
        {
            if let Err(e) = self.rt.pool.unpin_after(id, stream, done) {
                tracing::error!(context = %self.name, error = %e, "unpinning a borrowed buffer failed");
            }
        }
        self.release_use(slots, 0, 0, &[key]);
    }

    /// Whether a new session can ride the hold: it covers every buffer (none made since),
    /// and none of them was dropped since it was kept. If so, it counts the rider.
    pub fn ride(&self, slots: &[BufSlot]) -> bool {
        if self.held.load(Ordering::Relaxed) != slots.len()
            || self.held_at.load(Ordering::Relaxed) != self.dooms.load(Ordering::Relaxed)
        {
            return false;
        }
        let riders = self.riders.load(Ordering::Relaxed);
        self.riders.store(riders + 1, Ordering::Relaxed);
        true
    }

    /// Whether a hold of `h` slots counts among the runtime's holds, those the pool has
    /// let go before it evicts: a hold of nothing has nothing to let go, and Guaranteed
    /// buffers are never evicted.
    fn counted(&self, h: usize) -> bool {
        h != NO_HOLD && h > 0 && self.tier != Tier::Guaranteed
    }

    /// Set the hold to `h` slots, keeping the runtime's count of holds.
    fn set_hold(&self, h: usize) {
        let before = self.held.load(Ordering::Relaxed);
        match (self.counted(before), self.counted(h)) {
            (false, true) => {
                self.rt.holds.count.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.rt.holds.count.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.held.store(h, Ordering::Relaxed);
    }

    /// Make the pins of the last use, which ends now and pinned every buffer, the hold. A
    /// hold kept already covers a prefix of them: the use's own pins there go.
    fn keep_hold(&self, slots: &[BufSlot]) {
        let h = self.held.load(Ordering::Relaxed);
        if h != NO_HOLD {
            self.unpin_first(slots, h);
        }
        self.held_at
            .store(self.dooms.load(Ordering::Relaxed), Ordering::Relaxed);
        self.set_hold(slots.len());
        self.hold_went_idle();
    }

    /// The hold, if it counts, has no session left: idle from now, before the session
    /// gate's clock moves (the use that ended calls `ended` after). A walk for idle holds
    /// that saw the clock where it is would miss it without
    /// [`Holds::kept`](crate::runtime::Holds::kept).
    fn hold_went_idle(&self) {
        if self.counted(self.held.load(Ordering::Relaxed)) {
            self.rt.holds.kept.fetch_add(1, Ordering::Release);
        }
    }

    /// Let go of the hold if there is one and no session rides it (sessions that pinned
    /// their buffers themselves do not need it); `slots`: the locked list.
    pub fn release_hold(&self, slots: &[BufSlot]) {
        if self.riders.load(Ordering::Relaxed) == 0 {
            self.drop_hold(slots);
        }
    }

    /// Unpin what the hold keeps, if there is one. Only once no session rides it.
    fn drop_hold(&self, slots: &[BufSlot]) {
        let h = self.held.load(Ordering::Relaxed);
        if h != NO_HOLD {
            self.set_hold(NO_HOLD);
            self.unpin_first(slots, h);
        }
    }

    /// Drop one pin of each buffer of the first `n` slots (the hold's).
    fn unpin_first(&self, slots: &[BufSlot], n: usize) {
        let first = slots.get(..n).unwrap_or(slots);
        if let Err(e) = self
            .rt
            .pool
            .unpin_all(first.iter().filter_map(|s| s.id.as_ref()))
        {
            tracing::error!(context = %self.name, error = %e, "unpinning held buffers failed");
        }
    }

    /// The rest of [`CtxInner::end_use`], for a use whose pins are gone already (or that
    /// made none): count it out, and free the dropped buffers of its slots that no use
    /// pins any more.
    pub fn release_use(
        &self,
        mut slots: parking_lot::MutexGuard<'_, Vec<BufSlot>>,
        prefix: usize,
        epoch: u64,
        extra: &[EvictableKey],
    ) {
        let prefix = prefix.min(slots.len());
        let left = self.sessions.load(Ordering::Relaxed) - 1;
        self.sessions.store(left, Ordering::Relaxed);
        let mut free = Vec::new();
        if left == 0 {
            if slots.iter().any(|s| !s.live()) {
                // The hold may keep dropped buffers pinned, for uses that ended now.
                self.drop_hold(&slots);
                slots.retain_mut(|s| {
                    if !s.live() {
                        free.extend(s.id.take().map(|id| (s.key, id)));
                    }
                    s.live()
                });
            }
        } else {
            // Buffers dropped since this use began, or that it pinned on the way, may have
            // lost their last pin here.
            let since = if extra.is_empty() { epoch } else { 0 };
            if self.dooms.load(Ordering::Relaxed) > since {
                let mut freed = Freed::default();
                for (i, s) in slots.iter_mut().enumerate() {
                    let mine = if i < prefix {
                        s.pinned_since(epoch)
                    } else {
                        extra.contains(&s.key)
                    };
                    if mine && !s.live() {
                        self.free_if_unpinned(s, &mut freed);
                    }
                }
                drop(slots);
                self.freed(freed);
                return;
            }
        }
        drop(slots);
        if !free.is_empty() {
            self.free_doomed(free);
        }
    }

    /// Free the dropped buffer of slot `s` now, with the list locked (`s` is in it), if no
    /// use pins it nor is restoring it; its key goes into `freed`, for [`CtxInner::freed`]
    /// once the list is let go. The slot stays, with no handle.
    ///
    /// Under the list's lock: a session's try pins without the list (see `pin_all`), so it
    /// may pin the buffer between the check and the free, and the pool then refuses the
    /// free. The handle stays in its slot, where the use that pinned it finds it when it
    /// ends (every use that ends, and every try that fails, unpins through its slots and
    /// then looks at its dropped slots, under the list's lock). Were the handle out of the
    /// slot with the list let go, as it was, a try could pin the buffer, run its session
    /// and end it meanwhile, unpinning nothing (it unpins through the slots): the buffer
    /// stayed pinned for good, and its context could never give its memory back.
    ///
    /// Nothing here waits for the stream: where recording the last use, or queueing the
    /// release's callback, fails, the wait for the stream is left to [`CtxInner::freed`],
    /// with the list let go (a session of the context ending meanwhile would wait for it).
    fn free_if_unpinned(&self, s: &mut BufSlot, freed: &mut Freed) {
        let Some(id) = s.id.take() else {
            return;
        };
        if !self.rt.pool.is_held(&id).is_ok_and(|held| !held) {
            s.id = Some(id);
            return;
        }
        let done = match StreamTail::record(&self.rt.dev, &self.stream) {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(context = %self.name, error = %e, "recording a dropped buffer's last use failed; it is freed once its stream is done");
                s.id = Some(id);
                freed.stalled.push(s.key);
                return;
            }
        };
        let release = self.stream_release();
        let r = self.rt.pool.free_evictable_after(id, self.stream_id, done);
        if r.is_ok() && !release.try_arm() {
            freed.unsignalled += 1;
        }
        match self.held_back(r) {
            Ok(()) => freed.keys.push(s.key),
            Err(id) => s.id = Some(id),
        }
    }

    /// After [`CtxInner::free_if_unpinned`], with the list let go: the buffers' entries go
    /// (their staging's free may take a while), and waiting sessions try again. Where a
    /// device call failed there, the stream is waited for now; then the releases whose
    /// callback could not be queued are signalled, and the buffers whose last use could
    /// not be recorded are freed (under the list again, where a pin made meanwhile keeps
    /// its handle in the slot).
    fn freed(&self, mut freed: Freed) {
        if freed.unsignalled > 0 || !freed.stalled.is_empty() {
            if let Err(e) = self.rt.dev.synchronize_stream(&self.stream) {
                tracing::error!(context = %self.name, error = %e, "waiting for the stream of freed buffers failed");
            }
            for _ in 0..freed.unsignalled {
                self.rt.waits.pending_done();
            }
            let mut slots = self.buffers.lock();
            for key in std::mem::take(&mut freed.stalled) {
                let Some(s) = slots.iter_mut().find(|s| s.key == key) else {
                    continue;
                };
                let Some(id) = s.id.take() else {
                    continue;
                };
                if !self.rt.pool.is_held(&id).is_ok_and(|held| !held) {
                    s.id = Some(id);
                    continue;
                }
                match self.held_back(self.rt.pool.free_evictable(id)) {
                    Ok(()) => freed.keys.push(key),
                    Err(id) => s.id = Some(id),
                }
            }
        }
        for key in &freed.keys {
            self.rt.forget_buffer(*key);
        }
        if !freed.keys.is_empty() {
            self.rt.wake_waiters();
        }
    }

    /// Free dropped buffers whose slots are gone: no use is live, so nothing can pin them
    /// (every pin is made under a use), and a refusal cannot come back.
    pub fn free_doomed(&self, free: Vec<(EvictableKey, EvictableId)>) {
        for (key, id) in free {
            if let Err(id) = self.free_buffer(key, id) {
                tracing::error!(context = %self.name, key = ?id.key(), "a dropped buffer stays pinned with no use left; it is not freed");
            }
        }
    }

    /// Memory is about to be freed in order on this context's stream: count it as pending
    /// in the session gate *before* the pool has it, so that a session's try that finds
    /// the memory pending meanwhile waits for its release instead of failing for good. Then
    /// call [`StreamRelease::armed`] once the free is done (or let the guard drop if it
    /// failed).
    pub fn stream_release(&self) -> StreamRelease<'_> {
        self.rt.waits.pending_added();
        StreamRelease {
            ctx: self,
            armed: false,
        }
    }

    /// Free a buffer slot (no session may hold it pinned), in stream order: work queued on
    /// this context's stream may still use the buffer (a session ends without waiting for
    /// the GPU, and a borrower's reads are ordered before this stream's tail), so the
    /// memory is reusable elsewhere only once that work is done. Waiting sessions are woken
    /// then. If a pin holds the buffer after all, or is restoring it, the handle comes back.
    pub fn free_buffer(&self, key: EvictableKey, id: EvictableId) -> Result<(), EvictableId> {
        self.free_after_stream(id)?;
        self.rt.forget_buffer(key);
        self.rt.wake_waiters();
        Ok(())
    }

    /// Free an evictable block once the work queued so far on this context's stream is
    /// done: that work may still use its memory. If a pin holds it, or is restoring it,
    /// the handle comes back; other failures are logged.
    pub fn free_after_stream(&self, id: gpushare_pool::EvictableId) -> Result<(), EvictableId> {
        let dev = &self.rt.dev;
        let freed = match StreamTail::record(dev, &self.stream) {
            Ok(done) => {
                let release = self.stream_release();
                let r = self.rt.pool.free_evictable_after(id, self.stream_id, done);
                if r.is_ok() {
                    release.armed();
                }
                r
            }
            Err(e) => {
                tracing::warn!(context = %self.name, error = %e, "recording a buffer's last use failed; waiting for its stream");
                let _ = dev.synchronize_stream(&self.stream);
                self.rt.pool.free_evictable(id)
            }
        };
        self.held_back(freed)
    }

    /// The outcome of a buffer's free: the handle back where a pin holds the buffer or is
    /// restoring it; otherwise it is gone from the pool (a failure is logged), and its
    /// entry is to go too.
    fn held_back(
        &self,
        freed: std::result::Result<(), (EvictableId, PoolError)>,
    ) -> std::result::Result<(), EvictableId> {
        match freed {
            Ok(()) => Ok(()),
            Err((id, PoolError::Pinned { .. } | PoolError::Restoring)) => Err(id),
            Err((_, e)) => {
                tracing::error!(context = %self.name, error = %e, "freeing a buffer failed");
                Ok(())
            }
        }
    }
}

/// A stream-ordered free counted as pending in the session gate (see
/// [`CtxInner::stream_release`]).
pub(crate) struct StreamRelease<'a> {
    ctx: &'a CtxInner,
    armed: bool,
}

impl StreamRelease<'_> {
    /// The memory was freed in order on the stream: wake waiting sessions once the work
    /// queued so far has completed. The callback holds only the wait state, whose release
    /// makes no device call. If it cannot be queued, the stream is waited for here and the
    /// release signalled at once: a session that waits for it is then woken all the same.
    pub fn armed(self) {
        let c = self.ctx;
        if !self.try_arm() {
            let _ = c.rt.dev.synchronize_stream(&c.stream);
            c.rt.waits.pending_done();
        }
    }

    /// As [`StreamRelease::armed`], but where the callback cannot be queued, leave the
    /// wait for the stream and the release's signal to the caller (it returns false): for
    /// a caller that must not wait here.
    fn try_arm(mut self) -> bool {
        self.armed = true;
        let c = self.ctx;
        let waits = c.rt.waits.clone();
        let queued =
            c.rt.dev
                .host_callback(&c.stream, Box::new(move || waits.pending_done()));
        match queued {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(context = %c.name, error = %e, "queueing a release callback failed; waiting for the stream");
                false
            }
        }
    }
}

impl Drop for StreamRelease<'_> {
    fn drop(&mut self) {
        if !self.armed {
            // The free failed: nothing will be released.
            self.ctx.rt.waits.pending_cancelled();
        }
    }
}

/// A request placing a pinned block, counted in the session gate (see
/// [`gpushare_qos::SessionGate`]) as a pending release while this lives: its drop releases
/// it, which moves the release generation and wakes the first in line. See
/// [`Context::create_buffer_with`].
struct Placing<'a> {
    gate: &'a gpushare_qos::SessionGate,
}

impl<'a> Placing<'a> {
    fn new(gate: &'a gpushare_qos::SessionGate) -> Self {
        gate.pending_added();
        Placing { gate }
    }
}

impl Drop for Placing<'_> {
    fn drop(&mut self) {
        self.gate.pending_done();
    }
}

/// The work queued so far on a stream, as a pool's [`gpushare_pool::FreeEvent`]: a freed
/// buffer's memory, or a borrowed one's, waits for it.
pub(crate) struct StreamTail {
    dev: Arc<dyn gpushare_device::Device>,
    pub ev: gpushare_device::Event,
}

impl StreamTail {
    /// An event recorded now on `stream`. A request short of memory may wait for it
    /// (`Pool::wait_pending`), for as long as the stream's queued kernels run: it sleeps
    /// rather than spin a core.
    pub fn record(
        dev: &Arc<dyn gpushare_device::Device>,
        stream: &Stream,
    ) -> gpushare_device::Result<Arc<Self>> {
        let ev = dev.create_event(gpushare_device::EventFlags::blocking_sync())?;
        dev.record_event(&ev, stream)?;
        Ok(Arc::new(StreamTail {
            dev: dev.clone(),
            ev,
        }))
    }
}

impl gpushare_pool::FreeEvent for StreamTail {
    /// An event that reports a fault of its stream counts as complete: the stream runs no
    /// more work that touches memory, so the memory is free to go (a context whose kernel
    /// faulted keeps nothing that others need).
    fn is_complete(&self) -> bool {
        self.dev.query_event(&self.ev).unwrap_or(true)
    }
    fn wait(&self) {
        if let Err(e) = self.dev.synchronize_event(&self.ev) {
            tracing::warn!(error = %e, "waiting for a freed buffer's last use failed");
        }
    }
}

impl Drop for CtxInner {
    fn drop(&mut self) {
        // No session and no buffer can be alive: each holds the context. Its stream's work
        // is waited for, so that its stream-ordered frees complete and release the events
        // they hold (on a partition's stream, these hold the partition's context).
        if let Err(e) = self.rt.dev.synchronize_stream(&self.stream) {
            tracing::warn!(context = %self.name, error = %e, "waiting for a dropped context's stream failed");
        }
        // Its sessions' borrows left their ends as last uses of other contexts' buffers
        // (see `end_borrow`); that work is done, or never runs. Their events would keep
        // this context's stream's partition alive for as long as those buffers live.
        self.rt.pool.forget_stream(self.stream_id);
        let slots = std::mem::take(&mut *self.buffers.lock());
        self.drop_hold(&slots);
        for s in slots {
            if let Some(id) = s.id {
                // Nothing pins a buffer of a context going away (every pin is made under a
                // use of it, or its hold, dropped above); should the pool refuse, say so.
                if let Err((_, e)) = self.rt.pool.free_evictable(id) {
                    tracing::error!(context = %self.name, error = %e, "a buffer of a dropped context could not be freed");
                }
            }
            self.rt.forget_buffer(s.key);
        }
        if let Err(e) = self.rt.pool.remove_owner(self.owner) {
            // The pool still counts the owner's base and bytes: admission keeps the
            // reservation too, so that it does not promise them to another context.
            tracing::error!(context = %self.name, error = %e, "removing the context's pool owner failed; its reservation stays taken");
            self.admission.reservation.keep_after_drop();
        }
        // The kept event handles and their home refer to each other: let them go. (Events
        // recorded on a partition's stream were made in its green context, which they
        // would keep alive too.)
        self.events.recent.lock().clear();
        let mut parts = self.rt.parts.lock();
        let _ = parts.unplace(&self.name);
        if self.own_partition {
            let _ = parts.remove_partition(&self.name);
        }
        drop(parts);
        // The reservation goes before the name: a context of the same name made once the
        // name is free must find the memory free too.
        self.admission.reservation.release_now();
        self.rt.names.lock().remove(&self.name);
        self.rt.wake_waiters();
    }
}

/// A context: one model's budget, tier, stream and buffers. Cheap to clone; `Send + Sync`.
/// A [`Session`] borrows the handle it was opened on: a server task owns a clone and opens
/// its sessions on that.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<CtxInner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.inner.name)
            .field("tier", &self.inner.tier)
            .finish_non_exhaustive()
    }
}

/// A context's memory use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in use (buffers resident, scratch live, cached).
    pub used: u64,
    /// Bytes reserved by admission.
    pub reserved: u64,
    /// The budget.
    pub max: u64,
    /// Peak of `used`.
    pub peak: u64,
    /// Bytes of its buffers on the device.
    pub resident: u64,
    /// Bytes of its buffers evicted.
    pub evicted: u64,
}

/// `spec`, with a compute share for a partition of its own raised to the device's smallest
/// SM partition where the device makes partitions: the partition it gets all the same.
/// Admission then counts that. Counted as asked, a few contexts of tiny shares took every SM
/// while admission showed almost none taken, and the next one failed in the partition
/// manager rather than in admission.
fn floor_compute_share(mut spec: ContextSpec, info: &gpushare_device::DeviceInfo) -> ContextSpec {
    if let (None, Some(share)) = (&spec.partition, spec.compute_share) {
        if info.green_contexts && info.sm_count > 0 && share >= gpushare_qos::MIN_SHARE {
            // Rounded down to a part per billion, the unit admission counts in: rounded up,
            // the last of the partitions that fit would be refused (72 SMs of 4: 18 shares
            // of 55,555,556 parts add up to more than a billion).
            let floor = ((f64::from(info.sm_min_partition) / f64::from(info.sm_count)).min(1.0)
                * 1e9)
                .floor()
                / 1e9;
            if share < floor {
                tracing::debug!(context = %spec.name, share, floor, "a compute share below the smallest SM partition is counted as that partition");
                spec.compute_share = Some(floor);
            }
        }
    }
    spec
}

impl Context {
    pub(crate) fn create(rt: Arc<RtInner>, spec: ContextSpec) -> Result<Context> {
        let name = spec.name.clone();
        let _one_at_a_time = rt.create_lock.lock();
        // A name stays taken until its context's drop has ended: a drop under way (waiting
        // for its stream) still has its placement in a partition to undo, by name.
        if rt.names.lock().contains(&name) {
            return Err(RuntimeError::DuplicateContext(name));
        }
        let spec = floor_compute_share(spec, rt.dev.info());
        let admission =
            rt.admission
                .try_admit(&spec)
                .map_err(|rejection| RuntimeError::Rejected {
                    name: name.clone(),
                    rejection,
                })?;
        let r = admission.reservation.spec().clone();
        let tier = r.tier;
        let owner = rt
            .pool
            .add_owner(
                OwnerSpec::new(name.clone(), r.max)
                    .base(r.reserve)
                    .tier(match tier {
                        Tier::Guaranteed => gpushare_pool::Tier::Guaranteed,
                        Tier::Burstable => gpushare_pool::Tier::Burstable,
                        Tier::BestEffort => gpushare_pool::Tier::BestEffort,
                    }),
            )
            .map_err(|e| RuntimeError::from_pool(e, &name))?;
        let undo_owner = |e: RuntimeError| {
            let _ = rt.pool.remove_owner(owner);
            e
        };
        let range = rt.dev.info().priority_range;
        let prio = admission
            .priority
            .stream_priority(range.greatest, range.least);
        // Place it in its partition (its own, if it asks for a compute share alone).
        // A compute share without a named partition gets a partition of its own, removed
        // with the context (or at once if setting up fails).
        let own_partition = spec.partition.is_none() && r.compute > 0.0;
        let undo_partition = |placed: bool| {
            let mut parts = rt.parts.lock();
            if placed {
                let _ = parts.unplace(&name);
            }
            if own_partition {
                let _ = parts.remove_partition(&name);
            }
        };
        let (stream, isolation) = (|| -> Result<(Stream, Isolation)> {
            // The partition is made, split for and placed in under one hold of the lock:
            // until it is placed, a context dropped meanwhile would see no group in use
            // behind its own, remove its partition outright rather than leave a vacancy,
            // and leave this one's group out of place.
            let mut parts = rt.parts.lock();
            let p = match (&spec.partition, own_partition) {
                (Some(p), _) => p.clone(),
                (None, true) => {
                    parts.create_private_partition(
                        &name,
                        PartitionLimits::default().compute(r.compute),
                    )?;
                    if let Err(e) = parts.realize(&rt.sms) {
                        drop(parts);
                        undo_partition(false);
                        return Err(e.into());
                    }
                    name.clone()
                }
                (None, false) => {
                    drop(parts);
                    return Ok((rt.dev.create_stream(prio)?, Isolation::None));
                }
            };
            if let Err(e) = parts.place(&r, &p) {
                drop(parts);
                undo_partition(false);
                return Err(e.into());
            }
            let (index, iso) = parts
                .partition(&p)
                .map(|q| (q.split_slot(), q.isolation().clone()))
                .unwrap_or((None, Isolation::None));
            // Read with the partitions locked: the index is into this very split (only a
            // context's creation splits again, and creations take turns).
            let made = rt.sms.partitions();
            drop(parts);
            let stream = match (&iso, index.and_then(|i| made.get(i))) {
                (Isolation::SmPartition { .. }, Some(sm)) => rt.dev.create_stream_in(sm, prio),
                _ => rt.dev.create_stream(prio),
            };
            match stream {
                Ok(s) => Ok((s, iso)),
                Err(e) => {
                    undo_partition(true);
                    Err(e.into())
                }
            }
        })()
        .map_err(undo_owner)?;
        if let Isolation::SmPartition { requested, granted } = isolation {
            // Groups in use never move: a share that fits neither a vacancy nor the SMs
            // after the last group in use is trimmed to those, however many SMs the
            // shares leave free in all.
            if own_partition && granted < requested {
                tracing::warn!(
                    context = %name,
                    requested,
                    granted,
                    "the context's compute share got fewer SMs than it asked for: groups in use keep their SMs, and the share fit neither a vacated group nor the SMs after the last group in use; ask for a share that fits a vacated group, or create the contexts with large shares first"
                );
            }
        }
        let inner = Arc::new(CtxInner {
            stream_id: StreamId(rt.next_stream.fetch_add(1, Ordering::Relaxed)),
            rt: rt.clone(),
            name,
            tier,
            max: r.max,
            owner,
            admission,
            events: Arc::new(crate::event::EventHome::new(rt.dev.clone(), stream.clone())),
            stream,
            isolation,
            own_partition,
            buffers: Mutex::new(Vec::new()),
            handlers: Arc::default(),
            sessions: AtomicU64::new(0),
            dooms: AtomicU64::new(0),
            compacted_at: AtomicU64::new(0),
            held: AtomicUsize::new(NO_HOLD),
            held_at: AtomicU64::new(0),
            riders: AtomicU64::new(0),
            last_used: AtomicU64::new(0),
        });
        rt.names.lock().insert(inner.name.clone());
        let mut live = rt.contexts.lock();
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&inner));
        Ok(Context { inner })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The device it runs on.
    pub fn session_device(&self) -> &Arc<dyn gpushare_device::Device> {
        &self.inner.rt.dev
    }

    /// Its tier.
    pub fn tier(&self) -> Tier {
        self.inner.tier
    }

    /// Its stream's priority.
    pub fn stream_priority(&self) -> i32 {
        self.inner.stream.priority()
    }

    /// How its compute is isolated.
    pub fn isolation(&self) -> &Isolation {
        &self.inner.isolation
    }

    /// Register a handler called when memory runs short (the request of any context);
    /// contexts' handlers run in reclaim order, BestEffort first, after the pool has
    /// evicted what it may (see [`crate::PressureHandler`]). It stays registered until the
    /// returned registration drops (see [`PressureRegistration`]: why it does not stay for
    /// good, and what `let _ =` does).
    pub fn on_memory_pressure(
        &self,
        handler: impl Fn(&PressureInfo<'_>) -> Pressure + Send + Sync + 'static,
    ) -> PressureRegistration {
        self.inner.handlers.register(Arc::new(handler))
    }

    /// Its memory use.
    pub fn usage(&self) -> Usage {
        let stats = self.inner.rt.pool.stats();
        let o = stats.owners.iter().find(|o| o.id == self.inner.owner);
        Usage {
            used: o.map_or(0, |o| o.in_use_bytes),
            reserved: self.inner.admission.reservation.reserved(),
            max: self.inner.max,
            peak: o.map_or(0, |o| o.peak_in_use_bytes),
            resident: o.map_or(0, |o| o.evictable_resident_bytes),
            evicted: o.map_or(0, |o| o.evicted_bytes),
        }
    }

    /// A persistent buffer of `size` bytes with the runtime's default eviction policy.
    pub fn create_buffer(&self, size: u64) -> Result<Buffer> {
        self.create_buffer_with(size, self.inner.rt.policy)
    }

    /// A persistent buffer of `size` bytes that is evicted per `policy` under pressure.
    ///
    /// Blocks the thread: an `Offload` buffer gets its pinned host staging now (about
    /// 0.6 s per GiB on an H100), and making room may evict other contexts' buffers and
    /// wait for their copies out. Async code calls it in `tokio::task::spawn_blocking`.
    pub fn create_buffer_with(&self, size: u64, policy: EvictPolicy) -> Result<Buffer> {
        let c = &self.inner;
        // The new block stays pinned while its staging is allocated (slow): from just
        // before it is placed until then, it counts as a pending release, so that a
        // session short of memory meanwhile waits for this pin to go rather than failing
        // for good, and is woken when it goes. (A count of its own, not the live sessions':
        // those are bounded, and a buffer's creation is no session.)
        let (id, _, _placing) = self.with_relief(size, || {
            let placing = Placing::new(&c.rt.waits);
            let (id, pinned) =
                c.rt.pool
                    .alloc_evictable(c.owner, size, 0, c.stream_id)
                    .map_err(|e| RuntimeError::from_pool(e, &c.name))?;
            Ok((id, pinned, placing))
        })?;
        let key = id.key();
        let discarded = Arc::new(AtomicBool::new(false));
        // Its entry for the offloader.
        let meta = |policy, host| BufMeta {
            policy,
            discarded: discarded.clone(),
            host,
            stream: c.stream.clone(),
        };
        // Pinned staging for offloading is allocated now, once: pinning is slow (about 0.6 s
        // per GiB on an H100) and eviction runs on the path of another context's request.
        let host = match policy {
            EvictPolicy::Offload => match c.rt.dev.alloc_pinned(size) {
                Ok(h) => Some(Arc::new(h)),
                Err(e) => {
                    // Unpinned, the block may be picked to make room before it is freed: it
                    // is listed meanwhile as a buffer to discard (it holds no data yet), so
                    // that the eviction drops it rather than fail on an unknown buffer.
                    c.rt.buffers
                        .lock()
                        .insert(key, meta(EvictPolicy::Discard, None));
                    let _ = c.rt.pool.unpin(&id);
                    // The block may be memory this context freed in order on its stream,
                    // reused at once on the same stream: work queued there may still use it.
                    // Nothing else has seen the block, so no pin can hold it. Its entry
                    // goes as a dropped buffer's does (an eviction whose finish asks for
                    // it later fails, and the block is freed when that move ends).
                    if let Err(id) = c.free_buffer(key, id) {
                        tracing::error!(context = %c.name, key = ?id.key(), "a new buffer is held by a pin; it is not freed");
                    }
                    return Err(e.into());
                }
            },
            EvictPolicy::Discard => None,
        };
        c.rt.buffers.lock().insert(key, meta(policy, host));
        // Allocated pinned once: sessions pin it when they use it.
        if let Err(e) = c.rt.pool.unpin(&id) {
            tracing::error!(error = %e, "unpinning a new buffer failed");
        }
        c.buffers.lock().push(BufSlot {
            key,
            id: Some(id),
            size,
            doomed_at: LIVE,
        });
        Ok(Buffer {
            ctx: self.inner.clone(),
            key,
            size,
            policy,
            discarded,
        })
    }

    /// Run `f`; if memory ran short, run the pressure handlers and retry once.
    pub(crate) fn with_relief<T>(&self, requested: u64, f: impl Fn() -> Result<T>) -> Result<T> {
        // Memory freed in stream order whose work is still queued comes back once that
        // work is done: wait for it rather than fail (the caller blocks anyway). So too
        // after the handlers: a buffer one of them dropped may still be in use by work
        // queued on its context's stream.
        let try_waiting = || self.inner.rt.waiting_for_frees(&f);
        match try_waiting() {
            Err(e) if e.is_oom() => match self.inner.rt.relieve(self, requested) {
                None => Err(e),
                Some(Pressure::Allow) => try_waiting(),
                Some(Pressure::Deny) => Err(match e {
                    RuntimeError::OutOfMemory { .. } | RuntimeError::ReservedElsewhere { .. } => {
                        RuntimeError::PressureDenied {
                            context: self.inner.name.clone(),
                            requested,
                            available: self.inner.rt.available(),
                            shortage: Box::new(e),
                        }
                    }
                    e => e,
                }),
            },
            r => r,
        }
    }

    /// Wait (blocking the thread) until the context's buffers are resident, and open a
    /// session on it. Inside a memory-pressure handler it does not wait in line (see
    /// [`crate::PressureHandler`]); nor, inside a handler, do [`Context::session_timeout`]
    /// and [`Context::session_async`].
    pub fn session(&self) -> Result<Session<'_>> {
        match self.session_at_once() {
            Some(r) => r,
            None => block_on(SessionFuture::blocking(self)),
        }
    }

    /// The blocking calls' first try: most sessions are granted at once, so they try
    /// before building a future and a waker (unless the line has waited too long for a
    /// newcomer to go first). `None` when the session must wait.
    fn session_at_once(&self) -> Option<Result<Session<'_>>> {
        if !crate::session::may_pass(&self.inner) {
            return None;
        }
        match crate::session::pin_all(&self.inner, true, None) {
            Ok(n) => {
                crate::session::granted(&self.inner, &n);
                Some(Ok(Session::new(CtxRef::Borrowed(self), n)))
            }
            Err(e) if !e.is_oom() => Some(Err(e)),
            Err(_) => None,
        }
    }

    /// [`Context::session`], waiting at most about `timeout`: then it fails with
    /// [`RuntimeError::SessionTimedOut`], leaving nothing pinned or queued. A thread that
    /// holds a session (of this context or another) and asks for another cannot wait for
    /// its own session to end, nor behind a waiter that needs that session's memory (once
    /// the first in line has waited an aging period, newcomers wait behind it); with this
    /// call it gets an error instead of waiting for ever.
    ///
    /// The time is checked between tries, not within one: a try waits for the restores of
    /// other contexts' sessions under way (one at a time, in tier order), and if it
    /// restores buffers itself it finishes those copies, before the timeout can end it.
    ///
    /// For [`Context::session_async`], `tokio::time::timeout` bounds the wait the same way.
    /// There the future may be dropped while a blocking thread restores for it: that try
    /// keeps its pins until its copies are done, then ends the session it opened.
    pub fn session_timeout(&self, timeout: Duration) -> Result<Session<'_>> {
        let start = Instant::now();
        if let Some(r) = self.session_at_once() {
            return r;
        }
        let future = std::pin::pin!(SessionFuture::blocking(self));
        match crate::session::block_on_until(future, start.checked_add(timeout)) {
            Some(r) => r,
            None => Err(RuntimeError::SessionTimedOut {
                context: self.inner.name.clone(),
                waited: start.elapsed(),
                missing: crate::session::evicted_bytes(&self.inner),
                available: self.inner.rt.available(),
            }),
        }
    }

    /// Wait until the context's buffers are resident, and open a session on it.
    /// Cancellation-safe: dropping the future leaves nothing queued, and nothing pinned but
    /// by a try that restores on a blocking thread (below), which ends the session it
    /// opens once its copies are done.
    ///
    /// Waiting for memory does not block the thread. Neither does restoring evicted
    /// buffers inside a tokio runtime: a try whose working set is not all resident runs on
    /// a blocking thread (`tokio::task::spawn_blocking`), where the copies back from host
    /// memory run and are waited for (about 20 ms per GiB on an H100). Outside a tokio
    /// runtime the try runs in the poll. A working set already in place is pinned in the
    /// poll, without a thread hop.
    pub fn session_async(&self) -> SessionFuture<'_> {
        SessionFuture::new(self)
    }
}

/// A persistent buffer (weights, a cache) of a context. It is evictable: between sessions
/// the runtime may offload it to pinned host memory (restored bit-exact, perhaps at a new
/// address) or discard it (see [`Buffer::take_discarded`]). Freed when dropped.
pub struct Buffer {
    pub(crate) ctx: Arc<CtxInner>,
    pub(crate) key: EvictableKey,
    size: u64,
    policy: EvictPolicy,
    discarded: Arc<AtomicBool>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("context", &self.ctx.name)
            .field("size", &self.size)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Buffer {
    /// Its size in bytes (as requested).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Its eviction policy.
    pub fn policy(&self) -> EvictPolicy {
        self.policy
    }
    /// Whether its contents were discarded by an eviction since the last call; if so the
    /// owner must write them again (a cold restart).
    pub fn take_discarded(&self) -> bool {
        self.discarded.swap(false, Ordering::AcqRel)
    }
    /// Whether it is on the device now.
    pub fn is_resident(&self) -> bool {
        let slots = self.ctx.buffers.lock();
        slots
            .iter()
            .find(|s| s.key == self.key)
            .and_then(|s| s.id.as_ref())
            .is_some_and(|id| self.ctx.rt.pool.is_resident(id).unwrap_or(false))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut slots = self.ctx.buffers.lock();
        let Some(i) = slots.iter().position(|s| s.key == self.key) else {
            return;
        };
        if self.ctx.sessions.load(Ordering::Relaxed) > 0 {
            // Live uses may pin it: sessions that start from now on leave it out, and it
            // is freed when no use pins it, which may be now. Its slot stays while any use
            // is live, as their prefixes count slots.
            let epoch = self.ctx.dooms.load(Ordering::Relaxed) + 1;
            self.ctx.dooms.store(epoch, Ordering::Relaxed);
            slots[i].doomed_at = epoch;
            // With no session riding it, the hold goes now (the live uses pinned their
            // buffers themselves); otherwise its last rider lets it go.
            self.ctx.release_hold(&slots);
            let mut freed = Freed::default();
            self.ctx.free_if_unpinned(&mut slots[i], &mut freed);
            drop(slots);
            self.ctx.freed(freed);
            return;
        }
        // No use is live: the hold, if any, goes, and with it the only pin that is not made
        // under a use. (The slots are reordered below, and the hold names a prefix of them.)
        self.ctx.release_hold(&slots);
        let slot = slots.swap_remove(i);
        drop(slots);
        // No use is live, and every pin is made under a use: none can hold it.
        if let Some(id) = slot.id {
            self.ctx.free_doomed(vec![(slot.key, id)]);
        }
    }
}
