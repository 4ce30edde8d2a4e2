//! Statistics, snapshots and out-of-memory reports.

use super::*;

impl<S: ChunkSource> Pool<S> {
    /// The out-of-memory report of a failed request: none for a spared one, whose caller
    /// (a local cache) gives its blocks back and asks again rather than report.
    pub(super) fn report_for(&self, c: &Central, rq: &Reclaiming) -> Box<OomReport> {
        if rq.spare {
            return Box::default();
        }
        Box::new(self.report(c, &rq.failures))
    }

    pub(super) fn report(&self, c: &Central, eviction_failures: &[String]) -> OomReport {
        let mut holdings: Vec<Holding> = c
            .owners
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let a = a.as_ref()?;
                Some(Holding {
                    owner: OwnerId::new(
                        self.id,
                        i as u32,
                        self.slots[i].gen.load(Ordering::Relaxed),
                    ),
                    name: a.spec.name.clone(),
                    in_use: a.charged,
                    pinned_evictable: a.evictable_pinned,
                    unpinned_evictable: a.evictable_resident - a.evictable_pinned,
                })
            })
            .collect();
        holdings.sort_by_key(|h| std::cmp::Reverse(h.in_use));
        OomReport {
            mapped: c.mapped,
            retired: Self::retired_bytes(c),
            capacity: Some(self.limit),
            free: c.tlsf.free_bytes(),
            largest_free: c.tlsf.largest_free(),
            pending: c.pending_bytes(),
            holdings,
            eviction_failures: eviction_failures.to_vec(),
        }
    }

    /// Statistics, global and per owner. Locks every shard briefly, and first returns the
    /// stream-ordered frees whose event has completed to the free lists (asking each
    /// pending event, through [`crate::FreeEvent::is_complete`]: not from inside a device
    /// callback where the device may not be called).
    pub fn stats(&self) -> PoolStats {
        let mut c = self.central.lock();
        // Stream-ordered frees whose work has completed are free memory: return them to
        // the free lists first, or they would read as pending (and the runtime's available
        // memory as lower) until some later allocation took the central path.
        self.retire_pending(&mut c);
        let mut owners = Vec::new();
        let (mut live, mut cached, mut cached_pending) = (0u64, 0u64, 0u64);
        let (mut allocs, mut frees, mut hits) = (c.allocs, c.frees, c.retired_hits);
        for (i, a) in c.owners.iter().enumerate() {
            let Some(a) = a else { continue };
            let mut o_cached = 0;
            let (mut o_allocs, mut o_frees) = (a.allocs, a.frees);
            for cell in self.slots[i].shards.iter() {
                let sh = cell.lock.lock();
                o_cached += sh.bytes;
                cached_pending += sh.unfinished_bytes();
                o_allocs += sh.hits;
                o_frees += sh.frees;
                hits += sh.hits;
            }
            allocs += o_allocs - a.allocs;
            frees += o_frees - a.frees;
            // Everything charged is either live or cached.
            let o_live = a.charged.saturating_sub(o_cached);
            live += o_live;
            cached += o_cached;
            owners.push(OwnerStats {
                id: OwnerId::new(self.id, i as u32, self.slots[i].gen.load(Ordering::Relaxed)),
                name: a.spec.name.clone(),
                tier: a.spec.tier,
                limit: a.spec.limit,
                base: a.spec.base,
                live_bytes: o_live,
                cached_bytes: o_cached,
                in_use_bytes: a.charged,
                peak_in_use_bytes: a.peak_charged,
                peak_live_bytes: a.peak_live.max(o_live),
                evictable_resident_bytes: a.evictable_resident,
                evictable_pinned_bytes: a.evictable_pinned,
                evicted_bytes: a.evicted_bytes,
                allocs: o_allocs,
                frees: o_frees,
                evictions: a.evictions,
                restores: a.restores,
            });
        }
        for (o, a) in owners.iter().zip(c.owners.iter_mut().flatten()) {
            a.peak_live = a.peak_live.max(o.live_bytes);
        }
        c.peak_live = c.peak_live.max(live);
        c.peak_cached = c.peak_cached.max(cached);
        let free = c.tlsf.free_bytes();
        let largest = c.tlsf.largest_free();
        PoolStats {
            mapped_bytes: c.mapped,
            retired_bytes: Self::retired_bytes(&c),
            peak_mapped_bytes: c.peak_mapped,
            live_bytes: live,
            peak_live_bytes: c.peak_live,
            cached_bytes: cached,
            cached_pending_bytes: cached_pending,
            peak_cached_bytes: c.peak_cached,
            in_use_bytes: c.in_use,
            peak_in_use_bytes: c.peak_in_use,
            free_bytes: free,
            pending_bytes: c.pending_bytes(),
            largest_free_bytes: largest,
            fragmentation: if free == 0 {
                0.0
            } else {
                1.0 - largest as f64 / free as f64
            },
            allocs,
            frees,
            cache_hits: hits,
            evictions: c.evictions,
            restores: c.restores,
            moves_in_flight: c.in_flight as u64,
            owners,
        }
    }

    /// Every block the pool knows: used (live or cached), free, and evicted sizes per owner.
    /// As [`Pool::stats`], it first returns completed stream-ordered frees to the free lists.
    pub fn snapshot(&self) -> crate::Snapshot {
        let mut c = self.central.lock();
        // As in `stats`: completed frees are free blocks.
        self.retire_pending(&mut c);
        let mut cached_nodes = std::collections::HashSet::new();
        for (i, a) in c.owners.iter().enumerate() {
            if a.is_none() {
                continue;
            }
            for cell in self.slots[i].shards.iter() {
                for e in cell.lock.lock().bins.iter().flatten() {
                    cached_nodes.insert(e.node);
                }
            }
        }
        let pending: std::collections::HashSet<u32> = c.pending.iter().map(|p| p.node).collect();
        let evictable = c.ev.resident_nodes();
        let retired = |i: u32| c.retired_blocks.contains(&i);

        let mut blocks: Vec<crate::BlockInfo> = c
            .tlsf
            .nodes_indexed()
            .map(|(i, n)| crate::BlockInfo {
                addr: self.source.addr(n.offset()),
                size: n.size(),
                owner: if n.is_free() || pending.contains(&i) || retired(i) {
                    None
                } else {
                    Some(n.owner())
                },
                state: if n.is_free() {
                    crate::BlockState::Free
                } else if pending.contains(&i) {
                    crate::BlockState::Pending
                } else if retired(i) {
                    crate::BlockState::Retired
                } else if cached_nodes.contains(&i) {
                    crate::BlockState::Cached
                } else if let Some(&pinned) = evictable.get(&i) {
                    crate::BlockState::Evictable { pinned }
                } else {
                    crate::BlockState::Live
                },
            })
            .collect();
        blocks.extend(c.retired.iter().map(|(&o, &s)| crate::BlockInfo {
            addr: self.source.addr(o),
            size: s,
            owner: None,
            state: crate::BlockState::Retired,
        }));
        blocks.sort_by_key(|b| b.addr);
        crate::Snapshot {
            blocks,
            report: self.report(&c, &c.evict_failures),
        }
    }
}
