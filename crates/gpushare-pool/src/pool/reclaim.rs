//! The central allocator's general path: charging an owner, finding space by waiting for
//! stream-ordered frees, flushing caches, growing and evicting; and giving memory back.

use super::*;

impl<S: ChunkSource> Pool<S> {
    /// Charge `size` to the owner, reclaiming committed memory (caches, then evictable
    /// blocks of other tiers) if the pool's capacity is spoken for. On failure nothing is
    /// charged.
    ///
    /// An evictable block may borrow memory that other owners reserved but do not use: it
    /// is evicted when they need it, so it skips the reservation check (the hard limit
    /// still applies). Not a Guaranteed owner's, which is never evicted. A Burstable
    /// block whose eviction would take its owner below its base is evicted only by
    /// [`Pool::evict_one`]'s last pass, while the commitments exceed the capacity. A borrower that is
    /// pinned gives the memory back only once unpinned: nothing takes bytes from under
    /// work that uses them, so a request inside its base meanwhile fails, its report
    /// showing the pinned bytes.
    pub(super) fn charge(
        &self,
        c: &mut Central,
        rq: &mut Reclaiming,
        owner: OwnerId,
        size: u64,
        evictable: bool,
    ) -> Result<(), Stop> {
        let i = owner.slot() as usize;
        // The owner's cache, flushed for its limit, and every owner's, flushed for the
        // pool's capacity: two flushes, each at most once. (One flag for both skipped the
        // other owners' caches after the owner's own, and went on to evict or fail while
        // they held what the request needed.)
        let (mut flushed_own, mut flushed_all) = (false, false);
        rq.borrowed = 0;
        loop {
            let a = c.owners[i]
                .as_ref()
                .ok_or_else(|| PoolError::UnknownOwner(owner))?;
            let (charged, limit, delta) = (a.charged, a.spec.limit, a.commitment_added(size));
            let borrows = evictable && a.spec.tier != Tier::Guaranteed;
            if charged.saturating_add(size) > limit {
                // The owner's own cache counts against its limit: give it back once. Its
                // local caches are asked too, and only its own (not by a spared request,
                // whose cache gives its blocks back itself). Other owners' caches count
                // against their limits, not this one's: they keep their blocks.
                self.ask_local_caches(rq.spare, Some(i));
                if !flushed_own && self.flush_owner(c, i) > 0 {
                    flushed_own = true;
                    continue;
                }
                return Err(Stop::Fail(PoolError::QuotaExceeded {
                    owner,
                    requested: size,
                    used: charged,
                    limit,
                }));
            }
            if delta == 0 || borrows || c.committed + delta <= self.limit {
                if c.committed + delta > self.limit {
                    rq.borrowed = delta;
                }
                c.committed += delta;
                let a = c.owners[i]
                    .as_mut()
                    .ok_or_else(|| PoolError::UnknownOwner(owner))?;
                // The peaks move once the request has its place (`alloc_central`): a
                // request charged here may still fail, or take its place only after its
                // victims, still charged, are gone.
                a.charged += size;
                c.in_use += size;
                return Ok(());
            }
            self.ask_local_caches(rq.spare, None);
            if !flushed_all && self.flush_all(c) > 0 {
                flushed_all = true;
                continue;
            }
            if c.evicting >= c.committed + delta - self.limit {
                return Err(Stop::Wait);
            }
            if self.evict_one(c, owner, rq, Need::Commitment)? {
                continue;
            }
            if c.in_flight > 0 {
                return Err(Stop::Wait);
            }
            let reserved_elsewhere: u64 = c
                .owners
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .filter_map(|(_, a)| a.as_ref())
                .map(|a| a.spec.base.saturating_sub(a.charged))
                .sum();
            let unused = self.limit.saturating_sub(c.in_use);
            return Err(Stop::Fail(if reserved_elsewhere > 0 && unused >= delta {
                PoolError::ReservedElsewhere {
                    owner,
                    requested: delta,
                    available: self.limit.saturating_sub(c.committed),
                }
            } else {
                PoolError::OutOfMemory {
                    requested: size,
                    owner,
                    stream: StreamId(0),
                    report: self.report_for(c, rq),
                }
            }));
        }
    }

    /// The common case of the central path, kept apart from [`Pool::alloc_central`] so
    /// that it stays lean (on the serving replay, where few sizes repeat, most requests
    /// come here): the owner is within its limit, the pool's commitments leave room for
    /// what the request adds to them, and the free lists hold a block. Charges and counts
    /// the allocation. `None`, with nothing changed, sends the request down the general
    /// path, which reclaims (flushes, waits for pending frees, grows, evicts) and reports.
    #[inline]
    pub(super) fn alloc_within_means(
        c: &mut Central,
        slot: u32,
        size: u64,
        align: u64,
        capacity: u64,
    ) -> Option<(u32, u64)> {
        let a = c.owners.get_mut(slot as usize)?.as_mut()?;
        if a.charged.saturating_add(size) > a.spec.limit {
            return None;
        }
        // As in `charge`.
        let delta = a.commitment_added(size);
        if delta != 0 && c.committed + delta > capacity {
            return None;
        }
        let placed = c.tlsf.alloc(size, align, slot)?;
        // The accounting of `charge`, written out to keep the one lookup of the owner
        // above: a shared helper looking it up again cost this path 14 instructions.
        a.charged += size;
        a.peak_charged = a.peak_charged.max(a.charged);
        a.allocs += 1;
        c.committed += delta;
        c.in_use += size;
        c.peak_in_use = c.peak_in_use.max(c.in_use);
        c.allocs += 1;
        Some(placed)
    }

    /// The general central path, for requests that [`Pool::alloc_within_means`] cannot
    /// serve. It lets the lock go while the bytes of an eviction it started move out (and
    /// waits, without the lock, for those of other requests where nothing else is left),
    /// so that other owners' requests go on meanwhile, and while the evictor lets go of
    /// idle pins ([`Stop::ReleaseIdle`]); it gives the lock back with the outcome. On
    /// failure nothing stays charged.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn place<'a>(
        &'a self,
        mut c: CentralGuard<'a>,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
        evictable: bool,
        spare: bool,
    ) -> (CentralGuard<'a>, Result<Placed, PoolError>) {
        let mut rq = Reclaiming {
            spare,
            ..Reclaiming::default()
        };
        let placed = loop {
            match self.alloc_central(&mut c, &mut rq, owner, size, align, stream, evictable) {
                Ok(p) => break Ok(p),
                // Either shortage: of memory, or of memory not reserved by others (a
                // victim that a released hold would have made could have freed either).
                Err(Stop::Fail(
                    PoolError::OutOfMemory { .. } | PoolError::ReservedElsewhere { .. },
                )) if !rq.last_ask && !rq.spare && c.evictor.as_deref().is_some_and(holds_idle) => {
                    rq.last_ask = true;
                    rq.idle_released = false;
                }
                Err(Stop::Fail(e)) => break Err(e),
                Err(Stop::Finish(f)) => {
                    rq.idle_released = false;
                    let key = c.ev.key(f.idx);
                    let (g, r, freed) = self.finish_eviction(c, f);
                    c = g;
                    if let Err(err) = r {
                        rq.failed(&err);
                        // A block freed during its move is gone: its slot may serve another.
                        if !freed {
                            rq.skip.push(key);
                        }
                    }
                }
                // A spared request (see `alloc_sparing`) does not wait for others' moves
                // either: its caller has idle blocks of its own to give back first.
                Err(Stop::Wait) if rq.spare => {
                    break Err(PoolError::OutOfMemory {
                        requested: size,
                        owner,
                        stream,
                        report: Box::default(),
                    })
                }
                // Memory that pending stream-ordered frees hold comes free when their work
                // completes, which nothing signals here: look again now and then rather than
                // wait for the moves under way alone (they may wait on a long kernel, while
                // the pending memory would serve this request at once).
                Err(Stop::Wait) if !c.pending.is_empty() => {
                    rq.idle_released = false;
                    c = self.moved.wait_for(c, PENDING_POLL)
                }
                Err(Stop::Wait) => {
                    rq.idle_released = false;
                    c = self.moved.wait(c)
                }
                Err(Stop::ReleaseIdle) => {
                    rq.idle_released = true;
                    let evictor = c.evictor.clone();
                    drop(c);
                    if let Some(evictor) = evictor {
                        // The evictor unpins through the pool's own calls: the lock is free,
                        // and this request has no move under way that they could meet.
                        if catch_unwind(AssertUnwindSafe(|| evictor.release_idle_pins())).is_err() {
                            tracing::error!("the evictor panicked while letting go of idle pins");
                        }
                    }
                    c = self.central.lock();
                }
            }
            // The lock was let go: the owner may have been removed meanwhile.
            if let Err(e) = self.slot(owner) {
                break Err(e);
            }
        };
        c.evict_failures = rq.failures;
        (c, placed)
    }

    /// One attempt of [`Pool::place`]: charge, then find space, reclaiming in order:
    /// completed pending blocks, cached blocks, growth, eviction. On failure nothing stays
    /// charged.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn alloc_central(
        &self,
        c: &mut Central,
        rq: &mut Reclaiming,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
        evictable: bool,
    ) -> Result<Placed, Stop> {
        match self.charge(c, rq, owner, size, evictable) {
            Err(Stop::Fail(PoolError::OutOfMemory {
                requested,
                owner,
                report,
                ..
            })) => {
                return Err(Stop::Fail(PoolError::OutOfMemory {
                    requested,
                    owner,
                    stream,
                    report,
                }))
            }
            r => r?,
        }
        match self.find_space(c, rq, owner, size, align, stream) {
            Ok(r) => {
                if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                    a.peak_charged = a.peak_charged.max(a.charged);
                }
                c.peak_in_use = c.peak_in_use.max(c.in_use);
                Ok(r)
            }
            Err(e) => {
                Self::uncharge(c, owner.slot() as usize, size);
                rq.borrowed = 0;
                // The report is taken again, uncharged: it says who holds what, and the
                // request holds nothing (it showed the requester holding what it asked for).
                Err(match e {
                    Stop::Fail(PoolError::OutOfMemory {
                        requested, stream, ..
                    }) => Stop::Fail(PoolError::OutOfMemory {
                        requested,
                        owner,
                        stream,
                        report: self.report_for(c, rq),
                    }),
                    e => e,
                })
            }
        }
    }

    /// Give back a placement that its request abandoned: uncharge it, and return its memory
    /// where it came from (a reused stream-ordered free goes back to the pending list: its
    /// event still orders the memory against other streams).
    pub(super) fn give_back(c: &mut Central, owner: OwnerId, size: u64, placed: Placed) {
        Self::uncharge(c, owner.slot() as usize, size);
        match placed.reused {
            Some(p) => c.pending.push(p),
            None => c.tlsf.free(placed.node),
        }
    }

    pub(super) fn find_space(
        &self,
        c: &mut Central,
        rq: &mut Reclaiming,
        owner: OwnerId,
        size: u64,
        align: u64,
        stream: StreamId,
    ) -> Result<Placed, Stop> {
        let slot = owner.slot();
        if let Some(r) = c.tlsf.alloc(size, align, slot) {
            return Ok(Placed::fresh(r));
        }
        // The owner's own stream-ordered free of this size on this stream: work queued
        // later on the stream runs after the work that used it.
        if let Some(i) = c.pending.iter().position(|p| {
            p.stream == Some(stream)
                && p.owner == owner
                && p.size == size
                && c.tlsf.node(p.node).offset().is_multiple_of(align)
        }) {
            let p = c.pending.swap_remove(i);
            c.tlsf.set_owner(p.node, slot);
            let offset = c.tlsf.node(p.node).offset();
            return Ok(Placed {
                node: p.node,
                offset,
                reused: Some(p),
            });
        }
        if self.retire_pending(c) > 0 {
            if let Some(r) = c.tlsf.alloc(size, align, slot) {
                return Ok(Placed::fresh(r));
            }
        }
        self.flush_all(c);
        // Before mapping or evicting: any free block that holds the request, including
        // those the O(1) search passes over (see `Tlsf::alloc`). `grow` maps only what
        // the request lacks, and the block it extends may be one of those.
        if let Some(r) = c.tlsf.alloc_thorough(size, align, slot) {
            return Ok(Placed::fresh(r));
        }
        // Grow while the capacity allows; then evict, and after each eviction try growing
        // again: a victim at the end of the range turns into a free tail that a smaller
        // mapping can extend.
        loop {
            let progressed = match self.grow(c, size, align)? {
                Grow::Grew => true,
                // Evictions under way free at least this much: wait for them rather than
                // evict more (each eviction costs a copy out now and a restore later).
                Grow::Full if c.evicting >= size.saturating_add(align - UNIT) => {
                    return Err(Stop::Wait)
                }
                Grow::Full => {
                    self.ask_local_caches(rq.spare, None);
                    self.evict_one(c, owner, rq, Need::Space)?
                }
            };
            if !progressed {
                break;
            }
            if let Some(r) = c.tlsf.alloc_thorough(size, align, slot) {
                return Ok(Placed::fresh(r));
            }
        }
        if c.in_flight > 0 {
            return Err(Stop::Wait);
        }
        Err(Stop::Fail(PoolError::OutOfMemory {
            requested: size,
            owner,
            stream,
            report: self.report_for(c, rq),
        }))
    }

    /// Wait for every stream-ordered free pending now to complete, then return those blocks
    /// to the free lists; returns their bytes. For a caller that would rather block than
    /// fail when the only memory left is still in use by queued work. The pool's lock is
    /// not held while waiting.
    pub fn wait_pending(&self) -> u64 {
        let events: Vec<(Arc<dyn FreeEvent>, u64)> = {
            let c = self.central.lock();
            c.pending
                .iter()
                .map(|p| (p.event.clone(), p.size))
                .collect()
        };
        let mut bytes = 0;
        for (e, size) in &events {
            wait_for(&**e);
            bytes += size;
        }
        if !events.is_empty() {
            let mut c = self.central.lock();
            self.retire_pending(&mut c);
        }
        bytes
    }

    /// Move completed pending blocks to the free lists. Returns how many.
    pub(super) fn retire_pending(&self, c: &mut Central) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < c.pending.len() {
            if complete(&*c.pending[i].event) {
                let p = c.pending.swap_remove(i);
                c.tlsf.free(p.node);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }

    /// Map more memory: enough free space for `size` bytes at an `align`-aligned start, at
    /// the end of the range or in a hole left by trimming.
    ///
    /// Chunks start at multiples of the granularity, and no alignment above it is allowed,
    /// so a new chunk needs no padding: only a free tail that the mapping extends may. (A
    /// request of a whole chunk aligned above 256 bytes used to need one more chunk than
    /// it used, and failed at the capacity.)
    pub(super) fn grow(&self, c: &mut Central, size: u64, align: u64) -> Result<Grow, PoolError> {
        let g = self.granularity;
        let step = self.cfg.min_grow.next_multiple_of(g);
        // A size this close to 2^64 cannot be mapped anyway.
        let Some(need) = size.checked_next_multiple_of(g) else {
            return Ok(Grow::Full);
        };
        // Without a contiguous range, chunks stay a granule apart so no block spans two.
        let gap = if self.source.contiguous() { 0 } else { g };
        // Prefer a hole that fits; otherwise extend the end, reusing a free tail.
        let mut at = None;
        let mut prev_end = c.chunks.last_key_value().map_or(0, |(&o, &s)| o + s);
        if c.holes {
            prev_end = 0;
            for (&o, &s) in &c.chunks {
                let start = if prev_end == 0 { 0 } else { prev_end + gap };
                if o >= start + gap && o - gap - start >= need {
                    at = Some((start, need.max(step).min(o - gap - start)));
                    break;
                }
                prev_end = o + s;
            }
        }
        let (offset, size, required) = match at {
            Some((o, sz)) => (o, sz, need),
            None if gap == 0 => {
                // The block starts at the tail's first aligned offset, at or before the
                // range's end (a multiple of the granularity).
                let tail = c.tlsf.tail_free(prev_end);
                let start = prev_end - tail;
                let pad = start.next_multiple_of(align) - start;
                let want = pad
                    .saturating_add(size)
                    .saturating_sub(tail)
                    .max(1)
                    .checked_next_multiple_of(g)
                    .unwrap_or(u64::MAX);
                (prev_end, want.max(step), want)
            }
            None => (
                if prev_end == 0 { 0 } else { prev_end + gap },
                need.max(step),
                need,
            ),
        };
        let size = size.min(self.limit.saturating_sub(c.mapped));
        // Map nothing that could not satisfy the request.
        if size < required || offset.saturating_add(size) > self.source.va_size() {
            return Ok(Grow::Full);
        }
        match self.source.map(offset, size) {
            Ok(()) => {}
            Err(SourceError::OutOfMemory { .. }) => return Ok(Grow::Full),
            Err(e) => return Err(e.into()),
        }
        c.chunks.insert(offset, size);
        c.mapped += size;
        c.peak_mapped = c.peak_mapped.max(c.mapped);
        c.tlsf.add_region(offset, offset + size);
        tracing::trace!(offset, size, mapped = c.mapped, "pool grew");
        Ok(Grow::Grew)
    }

    /// Evict the least recently used block that helps with `need`. `Ok(true)` once it is
    /// out, [`Stop::Finish`] while its bytes move, `Ok(false)` if no block is eligible,
    /// [`Stop::ReleaseIdle`] first while the evictor holds idle pins and has not been asked
    /// since the request last let the lock go.
    pub(super) fn evict_one(
        &self,
        c: &mut Central,
        requester: OwnerId,
        rq: &mut Reclaiming,
        need: Need,
    ) -> Result<bool, Stop> {
        if rq.spare {
            return Ok(false);
        }
        let Some(evictor) = c.evictor.clone() else {
            return Ok(false);
        };
        // Victims are chosen with every idle pin gone, so that blocks their owners keep
        // pinned only for reuse go in tier and least-recently-used order like the others.
        if !rq.idle_released && holds_idle(evictor.as_ref()) {
            return Err(Stop::ReleaseIdle);
        }
        // A last pass, while the commitments exceed the capacity (some block borrowed an
        // owner's base): a Burstable block whose eviction takes its owner below its base,
        // if its owner is above it. Its owner holds more than its base in it, memory that
        // others reserved, whose claim comes before the owner's base: such a block may
        // have borrowed with its owner below its base (a large buffer made before a small
        // one), or at it with blocks that have gone since.
        // Not counting what this request borrowed itself: its borrowing may take what
        // others reserved but do not use, never a base in use.
        let overcommitted = c.committed.saturating_sub(rq.borrowed) > self.limit;
        for (tier, below_base) in [
            (Tier::BestEffort, false),
            (Tier::Burstable, false),
            (Tier::Burstable, true),
        ] {
            if below_base && !overcommitted {
                break;
            }
            // The tier's owners that may give a block, each with a cursor in its list. An
            // owner at or below its base gives nothing in these passes when it is
            // Burstable, nor when the request needs commitment freed: its list is skipped
            // whole (see `EvState`).
            let mut cursors: Vec<(usize, u32)> = c
                .owners
                .iter()
                .enumerate()
                .filter_map(|(i, a)| {
                    let a = a.as_ref().filter(|a| a.spec.tier == tier)?;
                    let gives = a.charged - a.evicting > a.spec.base;
                    if !gives && (tier == Tier::Burstable || need == Need::Commitment) {
                        return None;
                    }
                    Some((i, c.ev.lru_head_of(i)?))
                })
                .collect();
            // The owners' lists merged into the tier's least-recently-used order.
            while let Some(k) = (0..cursors.len()).min_by_key(|&k| c.ev.stamp(cursors[k].1)) {
                let idx = cursors[k].1;
                match c.ev.lru_next(idx) {
                    Some(next) => cursors[k].1 = next,
                    None => {
                        cursors.swap_remove(k);
                    }
                }
                let e = c.ev.get(idx);
                if e.pins > 0 {
                    // Pinned since it joined the list (see `EvState::pin`).
                    c.ev.drop_pinned(idx);
                    continue;
                }
                let (e_owner, e_size, e_res) = (e.owner, e.size, e.residency);
                let oslot = e_owner.slot() as usize;
                let Some(a) = c.owners[oslot].as_ref() else {
                    continue;
                };
                // A Burstable owner keeps its base: only blocks whose eviction leaves it at or
                // above its base may go, counting the moves out already under way.
                let kept = a.charged - a.evicting;
                if tier == Tier::Burstable
                    && kept < a.spec.base.saturating_add(e_size)
                    && !(below_base && kept > a.spec.base)
                {
                    continue;
                }
                // Commitments count an owner's base whatever it holds: evicting an owner
                // that is at or below its base frees no commitment.
                if need == Need::Commitment && kept <= a.spec.base {
                    continue;
                }
                if !matches!(e_res, Residency::Resident { .. }) || rq.skip.contains(&c.ev.key(idx))
                {
                    continue;
                }
                match self.start_eviction(c, &evictor, idx, requester) {
                    Ok(None) => return Ok(true),
                    Ok(Some(moving)) => return Err(Stop::Finish(moving)),
                    Err(err) => {
                        rq.failed(&err);
                        rq.skip.push(c.ev.key(idx));
                    }
                }
            }
        }
        Ok(false)
    }

    /// Start moving the resident, unpinned block `idx` out through `evictor`, for
    /// `requester`. `Ok(None)` once it is out; `Ok(Some)` while its bytes move, for
    /// [`Pool::finish_eviction`]. On error nothing changed.
    ///
    /// A block whose last users' work may still be queued ([`Pool::unpin_after`]) is
    /// moved once that work is done: the evictor is called then, from the finish, without
    /// the lock. Neither its copy out nor whoever gets the memory next may meet that work.
    pub(super) fn start_eviction(
        &self,
        c: &mut Central,
        evictor: &Arc<dyn Evictor>,
        idx: u32,
        requester: OwnerId,
    ) -> Result<Option<InFlight>, EvictError> {
        let e = c.ev.get(idx);
        let (owner, size, tag) = (e.owner, e.size, e.tag);
        let Residency::Resident { offset, .. } = e.residency else {
            return Ok(None);
        };
        let info = VictimInfo {
            id: c.ev.public_id(self.id, idx).key(),
            owner,
            addr: self.source.addr(offset),
            size,
            tag,
            requested_by: requester,
        };
        let start = |evictor: &dyn Evictor, info: &VictimInfo| {
            catch_unwind(AssertUnwindSafe(|| evictor.evict(info)))
                .unwrap_or_else(|_| Err(EvictError("the evictor panicked".into())))
        };
        let uses = c.ev.last_use(idx).take();
        let finish: Box<dyn FnOnce() -> Result<(), EvictError> + Send> = if uses.is_empty() {
            match start(evictor.as_ref(), &info)?.0 {
                None => {
                    Self::evicted(c, idx);
                    return Ok(None);
                }
                Some(finish) => finish,
            }
        } else {
            let (evictor, waits) = (evictor.clone(), uses.clone());
            Box::new(move || {
                for (_, e) in &waits {
                    wait_for(&**e);
                }
                // A wait that returned early (it failed, or panicked) leaves the work
                // running: the bytes stay where they are.
                if !waits.iter().all(|(_, e)| complete(&**e)) {
                    return Err(EvictError(
                        "the work that last used the block could not be waited for".into(),
                    ));
                }
                match start(evictor.as_ref(), &info)?.0 {
                    None => Ok(()),
                    Some(finish) => finish(),
                }
            })
        };
        c.ev.mark_evicting(idx);
        c.in_flight += 1;
        c.evicting += size;
        if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
            a.evicting += size;
        }
        Ok(Some(InFlight { idx, finish, uses }))
    }

    /// Run an eviction's finish without the central lock, then end the eviction under it:
    /// the block is evicted and its memory free, or, on failure, resident where it was.
    pub(super) fn finish_eviction<'a>(
        &'a self,
        c: CentralGuard<'a>,
        moving: InFlight,
    ) -> (CentralGuard<'a>, Result<(), EvictError>, bool) {
        let InFlight { idx, finish, uses } = moving;
        drop(c);
        let r = catch_unwind(AssertUnwindSafe(finish)).unwrap_or_else(|_| {
            Err(EvictError(
                "the evictor panicked while finishing an eviction".into(),
            ))
        });
        let mut c = self.central.lock();
        let e = c.ev.get(idx);
        let (owner, size) = (e.owner, e.size);
        c.in_flight -= 1;
        c.evicting -= size;
        if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
            a.evicting -= size;
        }
        match r {
            Ok(()) => Self::evicted(&mut c, idx),
            Err(_) => {
                c.ev.mark_kept(idx);
                c.ev.last_use(idx).put_back(uses);
            }
        }
        // Freed while its bytes moved: evicted or kept, it goes now.
        let freed = c.ev.get(idx).doomed.then(|| {
            let key = c.ev.public_id(self.id, idx).key;
            if let Some(a) = c.owners[owner.slot() as usize].as_mut() {
                a.doomed -= size;
            }
            Self::release_entry(&mut c, idx);
            key
        });
        self.moved.notify_all();
        if let (Some(key), Some(evictor)) = (freed, c.evictor.clone()) {
            // Without the lock: the evictor's owner may wake waiters, whose wake-ups may
            // run anything.
            drop(c);
            // A panic in the hook is the evictor's, not this caller's, who only happened
            // to end the move: contained and logged, as for the other hooks.
            if catch_unwind(AssertUnwindSafe(|| evictor.freed_while_moving(key))).is_err() {
                tracing::error!("the evictor panicked when told of a block freed during its move");
            }
            c = self.central.lock();
        }
        (c, r, freed.is_some())
    }

    /// The block `idx` is out: free its memory and count the eviction.
    pub(super) fn evicted(c: &mut Central, idx: u32) {
        let e = c.ev.get(idx);
        let (owner, size) = (e.owner, e.size);
        let (Residency::Resident { node, .. } | Residency::Evicting { node, .. }) = e.residency
        else {
            return;
        };
        let oslot = owner.slot() as usize;
        // Uses recorded while the bytes moved (a free after work on a stream, of a block
        // being evicted) order the memory's reuse, as any free's do.
        let uses = c.ev.last_use(idx).take();
        c.ev.mark_evicted(idx);
        Self::uncharge(c, oslot, size);
        c.release_after_uses(node, size, owner, uses);
        if let Some(a) = c.owners[oslot].as_mut() {
            a.evictable_resident -= size;
            a.evicted_bytes += size;
            a.evictions += 1;
        }
        c.evictions += 1;
    }

    /// Move one of `owner`'s unpinned evictable blocks out now, through the evictor,
    /// whatever its tier: for an owner that rearranges its own working set (to restore it
    /// in one piece where memory is free but scattered). Returns false if it was evicted
    /// already. Another owner's block is refused ([`PoolError::ForeignBlock`]). The pool's
    /// lock is let go while the bytes move.
    pub fn evict(&self, owner: OwnerId, id: impl Into<EvictableRef>) -> Result<bool, PoolError> {
        let id = id.into();
        let mut c = self.central.lock();
        loop {
            let idx = c.ev.lookup(self.id, id)?;
            let e = c.ev.get(idx);
            if e.owner != owner {
                return Err(PoolError::ForeignBlock {
                    what: "evictable block of another owner",
                });
            }
            if e.residency.in_flight() {
                c = self.moved.wait(c);
                continue;
            }
            if e.pins > 0 {
                return Err(PoolError::Pinned { pins: e.pins });
            }
            if !matches!(e.residency, Residency::Resident { .. }) {
                return Ok(false);
            }
            let evictor = c.evictor.clone().ok_or(PoolError::NoEvictor)?;
            let failed = |e: EvictError| PoolError::EvictFailed(e.to_string());
            if let Some(moving) = self
                .start_eviction(&mut c, &evictor, idx, owner)
                .map_err(failed)?
            {
                self.finish_eviction(c, moving).1.map_err(failed)?;
            }
            return Ok(true);
        }
    }

    /// Unmap every chunk that is wholly free, after returning the owners' shard caches'
    /// blocks. Returns the bytes given back.
    ///
    /// A [`LocalCache`](crate::LocalCache) keeps its blocks until its next call or its
    /// drop (trim asks it to give them back then): a chunk under one of its blocks stays
    /// mapped for this trim.
    ///
    /// # Errors
    ///
    /// [`PoolError::Source`] when the source fails to unmap a chunk; trimming stops there.
    /// The chunk's state is then unknown (a device source has let go of the mapping), so
    /// the pool retires it: its bytes are never handed out again and stay counted as mapped,
    /// in [`PoolStats::retired_bytes`](crate::PoolStats::retired_bytes), in the
    /// out-of-memory report and as a [`BlockState::Retired`](crate::BlockState::Retired)
    /// block of snapshots.
    pub fn trim(&self) -> Result<u64, PoolError> {
        let mut c = self.central.lock();
        self.ask_local_caches(false, None);
        self.flush_all(&mut c);
        self.retire_pending(&mut c);
        let chunks: Vec<(u64, u64)> = c.chunks.iter().map(|(&o, &s)| (o, s)).collect();
        let mut released = 0;
        for (o, s) in chunks {
            if !c.tlsf.remove_region(o, o + s) {
                continue;
            }
            if let Err(e) = self.source.unmap(o, s) {
                // After a failed unmap the chunk may be mapped or not (a device source lets
                // go of a mapping whose unmap failed). Its offsets are not handed out again,
                // where a kernel could fault on them: the chunk stays out of the free lists
                // for good, and stays counted as mapped and in the chunk table, so growth
                // never maps over it. The chunks unmapped before it stay unmapped.
                c.retired.insert(o, s);
                self.recompute_holes(&mut c);
                tracing::error!(
                    released,
                    offset = o,
                    size = s,
                    error = %e,
                    "trim stopped: unmapping a chunk failed; the chunk is retired"
                );
                return Err(e.into());
            }
            c.chunks.remove(&o);
            c.mapped -= s;
            released += s;
        }
        self.recompute_holes(&mut c);
        Ok(released)
    }

    /// Bytes retired for good: chunks whose unmap failed and blocks of panicked restores.
    pub(super) fn retired_bytes(c: &Central) -> u64 {
        let blocks: u64 = c
            .retired_blocks
            .iter()
            .map(|&n| c.tlsf.node(n).size())
            .sum();
        c.retired.values().sum::<u64>() + blocks
    }

    /// Whether any gap lies between chunks (or before the first): growth then looks for a
    /// hole to refill.
    pub(super) fn recompute_holes(&self, c: &mut Central) {
        let mut expect = 0;
        c.holes = false;
        let gap = if self.source.contiguous() {
            0
        } else {
            self.granularity
        };
        for (&o, &s) in &c.chunks {
            if o > expect {
                c.holes = true;
                break;
            }
            expect = o + s + gap;
        }
    }
}
