//! Evictable blocks: allocation, pins (which restore an evicted block), unpins and frees.

use super::*;

impl<S: ChunkSource> Pool<S> {
    /// Allocate an evictable block for `owner` on `stream`. It starts resident and pinned
    /// once; unpin it when not in use so that it may be evicted.
    pub fn alloc_evictable(
        &self,
        owner: OwnerId,
        size: u64,
        tag: u64,
        stream: StreamId,
    ) -> Result<(EvictableId, Pinned), PoolError> {
        self.slot(owner)?;
        let csize = self.round_request(size)?;
        let c = self.central.lock();
        self.slot(owner)?;
        let tier = c.owners[owner.slot() as usize]
            .as_ref()
            .ok_or_else(|| PoolError::UnknownOwner(owner))?
            .spec
            .tier;
        let (mut c, placed) = self.place(c, owner, csize, UNIT, stream, true, false);
        let Placed {
            node,
            offset,
            reused,
        } = placed?;
        let idx = c.ev.insert(owner, tier, csize, tag, node, offset);
        // A stream-ordered free of the owner's on this stream, whose work may still use
        // the memory: the block's eviction and free wait for it as for its own users'.
        if let Some(p) = reused {
            c.ev.last_use(idx).add(stream, p.event);
        }
        let a = c.owners[owner.slot() as usize]
            .as_mut()
            .ok_or_else(|| PoolError::UnknownOwner(owner))?;
        a.evictable_resident += csize;
        a.evictable_pinned += csize;
        a.allocs += 1;
        c.allocs += 1;
        Ok((
            c.ev.public_id(self.id, idx),
            Pinned {
                addr: self.source.addr(offset),
                size: csize,
                restored: false,
            },
        ))
    }

    /// Pin an evictable block for use on `stream`, restoring it first if it was evicted
    /// (possibly at a new address). While pinned it is never evicted. A block whose bytes
    /// are moving (out for another request, or back in for another pin) is pinned once
    /// they have arrived. The pool's lock is let go while the bytes move.
    pub fn pin(&self, id: impl Into<EvictableRef>, stream: StreamId) -> Result<Pinned, PoolError> {
        let id = id.into();
        let mut c = self.central.lock();
        loop {
            let idx = c.ev.lookup(self.id, id)?;
            let e = c.ev.get(idx);
            match e.residency {
                Residency::Resident { offset, .. } => {
                    let (owner, size, first) = (e.owner, e.size, e.pins == 0);
                    c.ev.pin(idx)?;
                    if first {
                        if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                            a.evictable_pinned += size;
                        }
                    }
                    return Ok(Pinned {
                        addr: self.source.addr(offset),
                        size,
                        restored: false,
                    });
                }
                // A failed eviction leaves it resident, a failed restore evicted: see which.
                Residency::Evicting { .. } | Residency::Restoring { .. } => {
                    c = self.moved.wait(c);
                }
                Residency::Evicted => {
                    let (owner, size) = (e.owner, e.size);
                    let evictor = c.evictor.clone().ok_or_else(|| {
                        PoolError::RestoreFailed(
                            "the block was evicted but no evictor is set".into(),
                        )
                    })?;
                    let (g, placed) = self.place(c, owner, size, UNIT, stream, true, false);
                    c = g;
                    // Placing may have let the lock go, and another pin of the block may
                    // have restored it (or started to) meanwhile: then this pin takes it
                    // as it is, whether or not this placing found room (the other pin's
                    // restore may have taken the room it looked for).
                    let settled = c.ev.lookup(self.id, id).map(|i| (i, c.ev.get(i).residency));
                    match (settled, placed) {
                        (Ok((idx, Residency::Evicted)), Ok(placed)) => {
                            return self.restore_into(c, evictor.as_ref(), idx, placed, stream)
                        }
                        (Ok((_, Residency::Evicted)), Err(e)) => return Err(e),
                        (Ok(_), Ok(placed)) => Self::give_back(&mut c, owner, size, placed),
                        (Ok(_), Err(_)) => {}
                        (Err(e), placed) => {
                            if let Ok(placed) = placed {
                                Self::give_back(&mut c, owner, size, placed);
                            }
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    /// Restore the evicted block `idx` into `placed` (memory charged to its owner) through
    /// `evictor`, with the lock let go while the bytes move, and pin it. On failure the
    /// block stays evicted and the memory goes back.
    pub(super) fn restore_into<'a>(
        &'a self,
        mut c: CentralGuard<'a>,
        evictor: &dyn Evictor,
        idx: u32,
        placed: Placed,
        stream: StreamId,
    ) -> Result<Pinned, PoolError> {
        let e = c.ev.get(idx);
        let (owner, size, tag) = (e.owner, e.size, e.tag);
        let (node, offset) = (placed.node, placed.offset);
        let addr = self.source.addr(offset);
        let info = RestoreInfo {
            id: c.ev.public_id(self.id, idx).key(),
            owner,
            addr,
            size,
            tag,
            stream,
        };
        // From here the memory is the block's: resident bytes of its owner, not evicted ones,
        // and pinned ones (nothing may evict it, and the pin it is restored for follows).
        let oslot = owner.slot() as usize;
        c.ev.mark_restoring(idx, node, offset);
        if let Some(a) = c.owners[oslot].as_mut() {
            a.evicted_bytes -= size;
            a.evictable_resident += size;
            a.evictable_pinned += size;
        }
        c.in_flight += 1;
        drop(c);
        let r = catch_unwind(AssertUnwindSafe(|| evictor.restore(&info)));
        let mut c = self.central.lock();
        c.in_flight -= 1;
        self.moved.notify_all();
        let failed = match r {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some((err.to_string(), false)),
            Err(_) => Some(("the evictor panicked while restoring".to_string(), true)),
        };
        if let Some((why, panicked)) = failed {
            c.ev.mark_evicted(idx);
            if let Some(a) = c.owners[oslot].as_mut() {
                a.evicted_bytes += size;
                a.evictable_resident -= size;
                a.evictable_pinned -= size;
            }
            if panicked {
                // A failed restore leaves no copy queued (the evictor's contract); a
                // panicked one may have queued one before it panicked. Its memory is
                // retired rather than handed to a request that the copy would overwrite.
                Self::uncharge(&mut c, oslot, size);
                c.retired_blocks.push(node);
                tracing::error!(size, "a restore panicked; its memory is retired");
            } else {
                Self::give_back(&mut c, owner, size, placed);
            }
            return Err(PoolError::RestoreFailed(why));
        }
        c.ev.mark_restored(idx, node, offset);
        // As in `alloc_evictable`: work of a reused stream-ordered free may still run.
        if let Some(p) = placed.reused {
            c.ev.last_use(idx).add(stream, p.event);
        }
        // An evicted block had no pins (a pinned one is never evicted): this is its first.
        let _first = c.ev.pin(idx);
        if let Some(a) = c.owners[oslot].as_mut() {
            a.restores += 1;
        }
        c.restores += 1;
        Ok(Pinned {
            addr,
            size,
            restored: true,
        })
    }

    /// Pin every block of `ids` if all of them are resident, under one lock, and return
    /// true; if any is evicted, pin none and return false (then [`Pool::pin`] each one,
    /// which restores). This is the fast path of a working set that is already in place:
    /// one lock for the whole set instead of one per block, and nothing is held partly.
    pub fn pin_all_resident<I>(&self, ids: I) -> Result<bool, PoolError>
    where
        I: IntoIterator + Clone,
        I::Item: Into<EvictableRef>,
    {
        let mut c = self.central.lock();
        // One pass: pin while every block so far is resident; on the first that is not
        // (or a bad handle), take back the pins made so far. Nobody sees pins made and
        // taken back under one lock; the blocks only move to the most recently used end of
        // the LRU, where the caller's slow path, which pins them next, puts them anyway.
        let mut pinned = 0usize;
        let mut failed = None;
        for id in ids.clone() {
            let idx = match c.ev.lookup(self.id, id.into()) {
                Ok(idx) => idx,
                Err(e) => {
                    failed = Some(Err(e));
                    break;
                }
            };
            let e = c.ev.get(idx);
            if !matches!(e.residency, Residency::Resident { .. }) {
                failed = Some(Ok(false));
                break;
            }
            let (owner, size, first) = (e.owner, e.size, e.pins == 0);
            if let Err(e) = c.ev.pin(idx) {
                failed = Some(Err(e));
                break;
            }
            if first {
                if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                    a.evictable_pinned += size;
                }
            }
            pinned += 1;
        }
        let Some(result) = failed else {
            return Ok(true);
        };
        for id in ids.into_iter().take(pinned) {
            // Pinned above under this lock: the handle is valid and the pin is there.
            if let Ok(idx) = c.ev.lookup(self.id, id.into()) {
                Self::unpin_idx(&mut c, idx)?;
            }
        }
        result
    }

    /// Drop one pin. At zero pins the block joins its tier's LRU as most recently used,
    /// and may be evicted, its memory handed to any stream, from then on: the pinner's
    /// work on it must be done, or ordered before the evictor's move by the evictor itself.
    /// Where that work may still be queued, use [`Pool::unpin_after`].
    pub fn unpin(&self, id: impl Into<EvictableRef>) -> Result<(), PoolError> {
        self.unpin_all(std::iter::once(id.into()))
    }

    /// Drop one pin, as [`Pool::unpin`], of a block that work queued on `stream` may still
    /// use: `event` completes once that work is done (record it after the last of it).
    /// Until then the block's memory goes to no other use. An eviction waits for the event
    /// before it calls the evictor (without the pool's lock), so neither the copy out nor
    /// the memory's next user meets that work; a free leaves the memory pending on it, as
    /// [`Pool::free_after`] does. Each stream's latest event takes the place of its earlier
    /// ones, and events on several streams are all waited for.
    ///
    /// Whoever unpins (the block's owner, or another owner that pinned it to read it) names
    /// its stream by number, and work on streams of one number is taken to run in one
    /// order: the latest event there stands for all, and the block's owner may reuse the
    /// memory of a free pending on that number at once on its own stream of the number.
    /// So the callers that unpin a block must not use one number for two streams (the
    /// gpushare runtime numbers every stream apart).
    pub fn unpin_after(
        &self,
        id: impl Into<EvictableRef>,
        stream: StreamId,
        event: Arc<dyn FreeEvent>,
    ) -> Result<(), PoolError> {
        let id = id.into();
        let mut c = self.central.lock();
        let idx = c.ev.lookup(self.id, id)?;
        if c.ev.get(idx).pins == 0 {
            return Err(PoolError::NotPinned);
        }
        c.ev.last_use(idx).add(stream, event);
        Self::unpin_idx(&mut c, idx)
    }

    /// Forget the last uses recorded on `stream` ([`Pool::unpin_after`]) of every
    /// evictable block, once the stream's work is all done or will never run, as when the
    /// stream goes: their events may hold what the stream's owner must let go (on a GPU, a
    /// partition's context). O(evictable blocks); the events are dropped after the pool's
    /// lock is let go.
    pub fn forget_stream(&self, stream: StreamId) {
        let gone = self.central.lock().ev.forget_stream(stream);
        drop(gone);
    }

    /// Drop one pin of each block of `ids` under one lock. Every block is unpinned even if
    /// one of them fails; the first error is returned.
    pub fn unpin_all<I>(&self, ids: I) -> Result<(), PoolError>
    where
        I: IntoIterator,
        I::Item: Into<EvictableRef>,
    {
        let mut c = self.central.lock();
        let mut first_err = None;
        for id in ids {
            let r =
                c.ev.lookup(self.id, id.into())
                    .and_then(|idx| Self::unpin_idx(&mut c, idx));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Drop one pin of the block at `idx`, keeping its owner's pinned bytes.
    pub(super) fn unpin_idx(c: &mut Central, idx: u32) -> Result<(), PoolError> {
        let (owner, size) = {
            let e = c.ev.get(idx);
            (e.owner, e.size)
        };
        if c.ev.unpin(idx)? {
            if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                a.evictable_pinned -= size;
            }
        }
        Ok(())
    }

    /// Whether an evictable block is resident now (a block whose bytes are moving out
    /// still is; one whose bytes are moving back in is not yet).
    pub fn is_resident(&self, id: impl Into<EvictableRef>) -> Result<bool, PoolError> {
        let id = id.into();
        let c = self.central.lock();
        let idx = c.ev.lookup(self.id, id)?;
        Ok(matches!(
            c.ev.get(idx).residency,
            Residency::Resident { .. } | Residency::Evicting { .. }
        ))
    }

    /// Whether a pin holds the block, or a pin is restoring it (and will hold it): what
    /// [`Pool::free_evictable`] refuses. A holder of the handle that frees it when no pin
    /// does asks this, since [`Pool::pin_count`] is 0 while a restore is under way.
    pub fn is_held(&self, id: impl Into<EvictableRef>) -> Result<bool, PoolError> {
        let id = id.into();
        let c = self.central.lock();
        let idx = c.ev.lookup(self.id, id)?;
        let e = c.ev.get(idx);
        Ok(e.pins > 0 || matches!(e.residency, Residency::Restoring { .. }))
    }

    /// How many pins an evictable block holds.
    pub fn pin_count(&self, id: impl Into<EvictableRef>) -> Result<u32, PoolError> {
        let id = id.into();
        let c = self.central.lock();
        let idx = c.ev.lookup(self.id, id)?;
        Ok(c.ev.get(idx).pins)
    }

    /// Free an evictable block. It must not be pinned; on error the handle comes back. A
    /// block whose bytes are moving out is freed when the move ends, and this returns at
    /// once, without waiting for the copy; its owner stays charged for it until then (and
    /// [`Pool::remove_owner`] waits for the move). One being restored for
    /// a pin is refused at once with [`PoolError::Restoring`]: the pin will hold it (see
    /// [`Pool::is_held`]). Memory that work recorded by [`Pool::unpin_after`] may still use
    /// stays pending until that work is done.
    pub fn free_evictable(&self, id: EvictableId) -> Result<(), (EvictableId, PoolError)> {
        self.free_evictable_inner(id, None)
    }

    /// Free an evictable block in stream order, as [`Pool::free_after`] frees a block: its
    /// memory is reusable at once on `stream`, and elsewhere once `event` has completed.
    /// For a block whose last users' work may still be queued (a session ends without
    /// waiting for the GPU): unpin it with [`Pool::unpin_after`] or [`Pool::unpin`] first,
    /// since it must not be pinned; on error the handle comes back. As
    /// [`Pool::free_evictable`], it leaves a block whose bytes are moving out to be freed
    /// when the move ends, and refuses a block being restored for a pin.
    pub fn free_evictable_after(
        &self,
        id: EvictableId,
        stream: StreamId,
        event: Arc<dyn FreeEvent>,
    ) -> Result<(), (EvictableId, PoolError)> {
        self.free_evictable_inner(id, Some((stream, event)))
    }

    pub(super) fn free_evictable_inner(
        &self,
        id: EvictableId,
        after: Option<(StreamId, Arc<dyn FreeEvent>)>,
    ) -> Result<(), (EvictableId, PoolError)> {
        let mut c = self.central.lock();
        let idx = match c.ev.lookup(self.id, id.to_ref()) {
            Ok(i) => i,
            Err(e) => return Err((id, e)),
        };
        let e = c.ev.get(idx);
        if e.pins > 0 {
            let pins = e.pins;
            return Err((id, PoolError::Pinned { pins }));
        }
        // Moving back in for a pin, which will hold it: waiting would only end in `Pinned`.
        if matches!(e.residency, Residency::Restoring { .. }) {
            return Err((id, PoolError::Restoring));
        }
        let (evicting, slot, size) = (
            matches!(e.residency, Residency::Evicting { .. }),
            e.owner.slot() as usize,
            e.size,
        );
        if let Some((stream, event)) = after {
            c.ev.last_use(idx).add(stream, event);
        }
        if evicting {
            // Its bytes are moving out: the eviction's finish frees it (see `doom`). The
            // caller does not wait for the copy: on an async executor's thread that would
            // stall every task for as long as the copy takes.
            c.ev.doom(idx);
            if let Some(a) = c.owners[slot].as_mut() {
                a.doomed += size;
            }
        } else {
            Self::release_entry(&mut c, idx);
        }
        Ok(())
    }

    /// Free evictable block `idx`, resident or evicted, and count the free. A resident
    /// block's memory waits for the work of its recorded last uses (see
    /// [`LastUse`](crate::evict::LastUse)).
    pub(super) fn release_entry(c: &mut Central, idx: u32) {
        let e = c.ev.get(idx);
        let (owner, size, res) = (e.owner, e.size, e.residency);
        let slot = owner.slot() as usize;
        match res {
            Residency::Resident { node, .. } => {
                let uses = c.ev.last_use(idx).take();
                c.ev.remove(idx);
                Self::uncharge(c, slot, size);
                c.release_after_uses(node, size, owner, uses);
                if let Some(a) = c.owners[slot].as_mut() {
                    a.evictable_resident -= size;
                }
            }
            Residency::Evicted => {
                c.ev.remove(idx);
                if let Some(a) = c.owners[slot].as_mut() {
                    a.evicted_bytes -= size;
                }
            }
            // Settled by the caller first.
            Residency::Evicting { .. } | Residency::Restoring { .. } => return,
        }
        if let Some(a) = c.owners[slot].as_mut() {
            a.frees += 1;
        }
        c.frees += 1;
    }
}
