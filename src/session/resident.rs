//! Making a context's working set resident for a session: pinning its buffers where they
//! are, restoring the evicted ones, and deciding when a session may go ahead of the line.

use super::*;

/// Whether a newcomer of `ctx` may try at once, ahead of those in line.
pub(crate) fn may_pass(ctx: &CtxInner) -> bool {
    ctx.rt.waits.may_pass(ctx.tier.rank()) || in_pressure_handler()
}

/// A buffer's size as the pool holds it.
pub(super) fn round(size: u64) -> u64 {
    size.next_multiple_of(gpushare_pool::ALIGN)
}

/// Why `ctx`'s working set can never be resident while the buffers of the other
/// Guaranteed contexts stay (they are never evicted), if it cannot.
pub(super) fn beside_guaranteed(ctx: &CtxInner) -> Option<RuntimeError> {
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
pub(super) struct Member {
    key: EvictableKey,
    size: u64,
    id: EvictableRef,
}

/// Whether compacting the working set may let it fit: a piece of `size` bytes is free in
/// all but in no one block; the memory free plus the set's own resident Offload buffers
/// covers what is `missing`; and the set was not compacted since memory was last released.
pub(super) fn may_compact(
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
pub(super) fn offload_policy(ctx: &CtxInner, set: &[Member]) -> Vec<bool> {
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
pub(super) fn offload_own(ctx: &CtxInner, set: &[Member], offload: &[bool]) -> usize {
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
pub(super) fn pin_resident(ctx: &Arc<CtxInner>, wait: bool) -> Result<Fast> {
    let slots = if wait {
        ctx.buffers.lock()
    } else {
        match ctx.buffers.try_lock() {
            Some(slots) => slots,
            None => return Ok(Fast::Busy),
        }
    };
    if !ctx.rt.waits.started() {
        return Err(too_many_sessions(ctx));
    }
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
pub(super) enum Fast {
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
/// unpins it (see [`CtxInner::free_if_unpinned`]).
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
        if !ctx.rt.waits.started() {
            let _ = ctx.rt.pool.unpin_all(pinned);
            return Err(too_many_sessions(ctx));
        }
        break;
    }
    let mut prefix = tried.succeeded();
    prefix.general = true;
    Ok(prefix)
}

/// The error of a session refused by a full live count (see
/// [`gpushare_qos::SessionGate::started`]).
fn too_many_sessions(ctx: &CtxInner) -> RuntimeError {
    RuntimeError::TooManySessions {
        context: ctx.name.clone(),
        live: gpushare_qos::SessionGate::MAX_LIVE,
    }
}

/// A try of [`pin_all`]: a use of its context from the moment it takes the working set
/// from the list. It becomes the session's use when every buffer is pinned; a try that
/// fails ends it when dropped, having unpinned what it pinned.
pub(super) struct TryUse<'a> {
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
