//! Behaviour of the pool through its public API.

mod common;

use common::{Flag, Recorder, Work};
use gpushare_pool::{
    BlockState, ChunkSource, EvictError, EvictableRef, Eviction, Evictor, HostSource, OwnerId,
    OwnerSpec, Pool, PoolConfig, PoolError, RestoreInfo, SourceError, StreamId, Tier, VictimInfo,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const S1: StreamId = StreamId(1);
const S2: StreamId = StreamId(2);

fn pool(cfg: PoolConfig) -> Pool<HostSource> {
    Pool::new(HostSource::new(2 * MIB, 1 << 30), cfg).unwrap()
}

#[test]
fn blocks_are_aligned_and_disjoint() {
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let mut blocks = vec![];
    for (i, size) in [1u64, 255, 256, 257, 4096, 100_000, 3 * MIB, 17]
        .iter()
        .enumerate()
    {
        let b = p.alloc(o, *size, S1).unwrap();
        assert!(b.size() >= *size && b.size().is_multiple_of(256), "{i}");
        assert_eq!(p.addr(&b) % 256, 0);
        blocks.push(b);
    }
    let a = p.alloc_aligned(o, 1000, 64 << 10, S1).unwrap();
    assert_eq!(p.addr(&a) % (64 << 10), 0);
    blocks.push(a);
    let mut spans: Vec<(u64, u64)> = blocks
        .iter()
        .map(|b| (b.offset(), b.offset() + b.size()))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlap {w:?}");
    }
    for b in blocks {
        p.free(b).unwrap();
    }
    let s = p.stats();
    assert_eq!(s.live_bytes, 0);
    assert_eq!(s.owners[0].live_bytes, 0);
}

#[test]
fn bad_input_is_typed() {
    let p = pool(PoolConfig::default().capacity(64 * MIB));
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    assert!(matches!(p.alloc(o, 0, S1), Err(PoolError::ZeroSize)));
    assert!(matches!(
        p.alloc(o, 65 * MIB, S1),
        Err(PoolError::TooLarge { .. })
    ));
    assert!(matches!(
        p.alloc(o, u64::MAX, S1),
        Err(PoolError::TooLarge { .. })
    ));
    assert!(matches!(
        p.alloc_aligned(o, 64, 3, S1),
        Err(PoolError::BadAlignment { .. })
    ));
    assert!(matches!(
        p.alloc_aligned(o, 64, 4 * MIB, S1),
        Err(PoolError::BadAlignment { .. })
    ));
    let other = pool(PoolConfig::default());
    let foreign = other.add_owner(OwnerSpec::new("x", MIB)).unwrap();
    assert!(matches!(
        p.alloc(foreign, 64, S1),
        Err(PoolError::UnknownOwner(_))
    ));
    let b = other.alloc(foreign, 64, S1).unwrap();
    let back = p.free(b).unwrap_err().block;
    other.free(back).unwrap();
    assert!(matches!(
        p.add_owner(OwnerSpec::new("z", 0)),
        Err(PoolError::BadOwner(_))
    ));
    assert!(matches!(
        p.add_owner(OwnerSpec::new("z", MIB).base(2 * MIB)),
        Err(PoolError::BadOwner(_))
    ));
    assert!(matches!(
        Pool::new(HostSource::new(3000, 1 << 20), PoolConfig::default()),
        Err(PoolError::BadConfig(_))
    ));
    assert!(matches!(
        Pool::new(
            HostSource::new(2 * MIB, 8 * MIB),
            PoolConfig::default().capacity(16 * MIB)
        ),
        Err(PoolError::BadConfig(_))
    ));
}

#[test]
fn quota_is_exact_and_reported() {
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 10 * MIB)).unwrap();
    let a = p.alloc(o, 6 * MIB, S1).unwrap();
    match p.alloc(o, 5 * MIB, S1) {
        Err(PoolError::QuotaExceeded {
            requested,
            used,
            limit,
            ..
        }) => {
            assert_eq!((requested, used, limit), (5 * MIB, 6 * MIB, 10 * MIB));
        }
        other => panic!("{other:?}"),
    }
    let b = p.alloc(o, 4 * MIB, S1).unwrap();
    p.free(a).unwrap();
    // The freed block sits in the owner's cache, yet the owner can use its whole limit:
    // the cache is returned when the limit would otherwise be hit.
    let c = p.alloc(o, 6 * MIB - 256, S1).unwrap();
    assert!(p.stats().owners[0].in_use_bytes <= 10 * MIB);
    p.free(b).unwrap();
    p.free(c).unwrap();
}

#[test]
fn mapped_free_memory_reserved_for_another_owner_is_not_handed_out() {
    // No cache, so that frees go straight back to the free lists.
    let p = pool(
        PoolConfig::default()
            .capacity(8 * MIB)
            .cache_bytes_per_shard(0),
    );
    let be = p.add_owner(OwnerSpec::new("besteffort", 8 * MIB)).unwrap();
    // Map the whole capacity, then free it: 8 MiB mapped, all of it free.
    let all: Vec<_> = (0..4).map(|_| p.alloc(be, 2 * MIB, S1).unwrap()).collect();
    for b in all {
        p.free(b).unwrap();
    }
    assert_eq!(p.stats().mapped_bytes, 8 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("guaranteed", 4 * MIB).base(4 * MIB))
        .unwrap();
    // Half of the free memory is reserved for the Guaranteed owner: the other owner
    // gets the rest, and no more, though the free lists could serve it at once.
    let a = p.alloc(be, 2 * MIB, S1).unwrap();
    let b = p.alloc(be, 2 * MIB, S1).unwrap();
    match p.alloc(be, 256, S1) {
        Err(PoolError::ReservedElsewhere { available, .. }) => assert_eq!(available, 0),
        other => panic!("{other:?}"),
    }
    let x = p.alloc(g, 4 * MIB, S1).unwrap();
    assert_eq!(p.stats().mapped_bytes, 8 * MIB);
    for blk in [a, b, x] {
        p.free(blk).unwrap();
    }
}

#[test]
fn the_hard_limit_holds_when_free_memory_could_serve_the_request() {
    let p = pool(
        PoolConfig::default()
            .capacity(8 * MIB)
            .cache_bytes_per_shard(0),
    );
    let o = p.add_owner(OwnerSpec::new("o", 8 * MIB)).unwrap();
    let all: Vec<_> = (0..4).map(|_| p.alloc(o, 2 * MIB, S1).unwrap()).collect();
    for b in all {
        p.free(b).unwrap();
    }
    let small = p.add_owner(OwnerSpec::new("small", 3 * MIB)).unwrap();
    let a = p.alloc(small, 2 * MIB, S1).unwrap();
    match p.alloc(small, 2 * MIB, S1) {
        Err(PoolError::QuotaExceeded { used, limit, .. }) => {
            assert_eq!((used, limit), (2 * MIB, 3 * MIB))
        }
        other => panic!("{other:?}"),
    }
    p.free(a).unwrap();
}

#[test]
fn reserved_bases_are_kept_for_their_owners() {
    let p = pool(PoolConfig::default().capacity(32 * MIB));
    let g = p
        .add_owner(OwnerSpec::new("guaranteed", 16 * MIB).base(16 * MIB))
        .unwrap();
    let be = p.add_owner(OwnerSpec::new("besteffort", 32 * MIB)).unwrap();
    assert_eq!(p.stats().owners[0].tier, Tier::Guaranteed);
    let x = p.alloc(be, 16 * MIB, S1).unwrap();
    match p.alloc(be, MIB, S1) {
        Err(PoolError::ReservedElsewhere { available, .. }) => assert_eq!(available, 0),
        other => panic!("{other:?}"),
    }
    let y = p.alloc(g, 16 * MIB, S1).unwrap();
    // Bases are checked against bases: 16 of 32 MiB are reserved, so a base of 17 MiB
    // cannot be promised, while one of 16 MiB can be, even though the BestEffort owner's
    // memory is in use now.
    assert!(matches!(
        p.add_owner(OwnerSpec::new("late", 17 * MIB).base(17 * MIB)),
        Err(PoolError::BadOwner(_))
    ));
    let late = p
        .add_owner(OwnerSpec::new("late", 16 * MIB).base(16 * MIB))
        .unwrap();
    // Its base is spoken for, but the memory is not free until the BestEffort owner's is.
    assert!(p.alloc(late, MIB, S1).is_err());
    p.free(x).unwrap();
    let z = p.alloc(late, 16 * MIB, S1).unwrap();
    p.free(y).unwrap();
    p.free(z).unwrap();
}

#[test]
fn growth_is_contiguous_and_trim_gives_memory_back() {
    let p = pool(PoolConfig::default().cache_bytes_per_shard(0));
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let blocks: Vec<_> = (0..64).map(|_| p.alloc(o, MIB, S1).unwrap()).collect();
    let s = p.stats();
    assert_eq!(s.mapped_bytes, 64 * MIB, "grown exactly as needed");
    assert_eq!(p.source().mapped(), 64 * MIB);
    // Free every other block: no chunk is wholly free, so trim releases nothing.
    let (odd, even): (Vec<_>, Vec<_>) = blocks
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 1);
    for (_, b) in odd {
        p.free(b).unwrap();
    }
    assert_eq!(p.trim().unwrap(), 0);
    for (_, b) in even {
        p.free(b).unwrap();
    }
    let released = p.trim().unwrap();
    assert_eq!(released, 64 * MIB);
    assert_eq!(p.source().mapped(), 0);
    assert_eq!(p.stats().mapped_bytes, 0);
    assert_eq!(p.stats().peak_mapped_bytes, 64 * MIB);
    // The pool grows again after trimming.
    let b = p.alloc(o, 5 * MIB, S1).unwrap();
    assert_eq!(p.stats().mapped_bytes, 6 * MIB);
    p.free(b).unwrap();
}

#[test]
fn trim_releases_a_hole_in_the_middle() {
    let p = pool(PoolConfig::default().cache_bytes_per_shard(0));
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let a = p.alloc(o, 2 * MIB, S1).unwrap();
    let b = p.alloc(o, 2 * MIB, S1).unwrap();
    let c = p.alloc(o, 2 * MIB, S1).unwrap();
    p.free(b).unwrap();
    assert_eq!(p.trim().unwrap(), 2 * MIB);
    assert_eq!(p.stats().mapped_bytes, 4 * MIB);
    // The hole is mapped again when needed, and blocks never span a hole.
    let d = p.alloc(o, 2 * MIB, S1).unwrap();
    assert_eq!(p.stats().mapped_bytes, 6 * MIB);
    for x in [a, c, d] {
        p.free(x).unwrap();
    }
    assert_eq!(p.trim().unwrap(), 6 * MIB);
}

/// A host source whose next unmap fails after letting the chunk go, as a device source
/// does when the driver refuses an unmap: the chunk's state is then unknown.
struct LosesChunkOnFailedUnmap {
    inner: HostSource,
    mapped: parking_lot::Mutex<std::collections::BTreeMap<u64, u64>>,
    fail_next_unmap: std::sync::atomic::AtomicBool,
}

impl LosesChunkOnFailedUnmap {
    fn covers(&self, offset: u64, size: u64) -> bool {
        let m = self.mapped.lock();
        m.range(..=offset)
            .next_back()
            .is_some_and(|(&o, &s)| offset + size <= o + s)
    }
}

impl ChunkSource for LosesChunkOnFailedUnmap {
    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }
    fn va_size(&self) -> u64 {
        self.inner.va_size()
    }
    fn base(&self) -> u64 {
        self.inner.base()
    }
    fn map(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        self.inner.map(offset, size)?;
        self.mapped.lock().insert(offset, size);
        Ok(())
    }
    fn unmap(&self, offset: u64, size: u64) -> Result<(), SourceError> {
        self.inner.unmap(offset, size)?;
        self.mapped.lock().remove(&offset);
        if self.fail_next_unmap.swap(false, Ordering::Relaxed) {
            return Err(SourceError::Other("the driver refused the unmap".into()));
        }
        Ok(())
    }
}

#[test]
fn a_chunk_whose_unmap_failed_is_never_handed_out_again() {
    let src = LosesChunkOnFailedUnmap {
        inner: HostSource::new(2 * MIB, 1 << 30),
        mapped: Default::default(),
        fail_next_unmap: Default::default(),
    };
    let p = Pool::new(src, PoolConfig::default().cache_bytes_per_shard(0)).unwrap();
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let a = p.alloc(o, 2 * MIB, S1).unwrap();
    let b = p.alloc(o, 2 * MIB, S1).unwrap();
    let c = p.alloc(o, 2 * MIB, S1).unwrap();
    p.free(b).unwrap();
    p.source().fail_next_unmap.store(true, Ordering::Relaxed);
    assert!(matches!(p.trim(), Err(PoolError::Source(_))));
    // The lost chunk's offsets are not used again: the next block comes from a new chunk.
    let d = p.alloc(o, 2 * MIB, S1).unwrap();
    assert!(
        p.source().covers(d.offset(), d.size()),
        "a block at offset {} lies in memory that is not mapped",
        d.offset()
    );
    // It stays counted as mapped, since it may be, and says so; later trims leave it alone.
    let s = p.stats();
    assert_eq!((s.mapped_bytes, s.retired_bytes), (8 * MIB, 2 * MIB));
    assert_eq!(
        s.mapped_bytes,
        s.free_bytes + s.pending_bytes + s.in_use_bytes + s.retired_bytes
    );
    let snap = p.snapshot();
    assert_eq!(snap.report.retired, 2 * MIB);
    assert!(snap.report.to_string().contains("retired"));
    let retired: Vec<_> = snap
        .blocks
        .iter()
        .filter(|b| b.state == BlockState::Retired)
        .map(|b| (b.addr - p.source().base(), b.size))
        .collect();
    assert_eq!(retired, [(2 * MIB, 2 * MIB)]);
    assert_eq!(
        snap.blocks.iter().map(|b| b.size).sum::<u64>(),
        s.mapped_bytes
    );
    for x in [a, c, d] {
        p.free(x).unwrap();
    }
    assert_eq!(p.trim().unwrap(), 6 * MIB);
    assert_eq!(p.stats().mapped_bytes, 2 * MIB);
}

#[test]
fn aligned_whole_chunks_fill_the_capacity() {
    // Chunks start at multiples of the granularity: a chunk-sized request aligned to any
    // allowed alignment needs one chunk, not two.
    let p = pool(PoolConfig::default().capacity(4 * MIB));
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let a = p.alloc_aligned(o, 2 * MIB, 2 * MIB, S1).unwrap();
    let b = p.alloc_aligned(o, 2 * MIB, 512, S1).unwrap();
    assert_eq!(p.stats().mapped_bytes, 4 * MIB);
    for blk in [&a, &b] {
        assert_eq!(p.addr(blk) % 512, 0);
    }
    p.free(a).unwrap();
    p.free(b).unwrap();
    // A free block of exactly the size, already aligned, is used whole.
    let c = p.alloc_aligned(o, 2 * MIB, 2 * MIB, S1).unwrap();
    let d = p.alloc_aligned(o, 2 * MIB, 2 * MIB, S1).unwrap();
    assert_eq!(p.stats().mapped_bytes, 4 * MIB);
    p.free(c).unwrap();
    p.free(d).unwrap();
}

#[test]
fn an_aligned_request_extends_a_free_tail_by_what_it_lacks() {
    // An aligned request is cut from the start of its block: 1 MiB used, 1 MiB free at the
    // end of the first chunk. 3 MiB aligned to 64 KiB then needs one more chunk (the tail's
    // start is aligned already), which the capacity allows; asking for the request's
    // worst-case padding on top would need two.
    let p = pool(PoolConfig::default().capacity(4 * MIB));
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let head = p.alloc_aligned(o, MIB, 512, S1).unwrap();
    let big = p.alloc_aligned(o, 3 * MIB, 64 * 1024, S1).unwrap();
    assert_eq!(p.addr(&big) % (64 * 1024), 0);
    assert_eq!(p.stats().mapped_bytes, 4 * MIB);
    p.free(head).unwrap();
    p.free(big).unwrap();
}

#[test]
fn an_aligned_request_finds_a_free_block_the_quick_search_passes_over() {
    // 1 MiB aligned to 2 MiB: the quick search looks in the bins of 1 MiB and of 3 MiB
    // (the size plus the worst padding) and above. The one free block, 2 MiB at offset 0,
    // lies between them, and the capacity leaves no room to grow.
    let p = pool(PoolConfig::default().capacity(2 * MIB));
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let warm = p.alloc(o, 2 * MIB, S1).unwrap();
    p.free(warm).unwrap();
    let b = p
        .alloc_aligned(o, MIB, 2 * MIB, S1)
        .expect("a free 2 MiB block at offset 0 holds it");
    assert_eq!(p.addr(&b) % (2 * MIB), 0);
    p.free(b).unwrap();
    // Without a capacity, the pool maps nothing it does not need.
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let b = p.alloc_aligned(o, MIB, 2 * MIB, S1).unwrap();
    assert_eq!(p.stats().mapped_bytes, 2 * MIB);
    p.free(b).unwrap();
}

#[test]
fn a_fitting_block_deep_in_its_bin_is_used_before_anything_is_evicted() {
    // Twelve free blocks share one bin: eleven of 1 MiB + 8 KiB, one (the oldest, at the
    // end of the bin's list) of 1 MiB + 16 KiB. A request of 1 MiB + 12 KiB fits only the
    // last; the quick search looks at a few of the bin's blocks and at larger bins.
    // Without caches, each free goes to the head of its bin's list at once.
    let (small, large, want) = (MIB + 8 * 1024, MIB + 16 * 1024, MIB + 12 * 1024);
    let p = pool(
        PoolConfig::default()
            .capacity(32 * MIB)
            .cache_bytes_per_shard(0),
    );
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let mut keep = Vec::new();
    let mut holes = Vec::new();
    holes.push(p.alloc(o, large, S1).unwrap());
    keep.push(p.alloc(o, 256, S1).unwrap());
    for _ in 0..11 {
        holes.push(p.alloc(o, small, S1).unwrap());
        keep.push(p.alloc(o, 256, S1).unwrap());
    }
    // The rest of the capacity, taken to the last unit: no free memory is left beside a
    // hole to merge with it when it is freed.
    let mut fill = Vec::new();
    for size in [256 * 1024, 4096, 256] {
        while let Ok(b) = p.alloc(o, size, S1) {
            fill.push(b);
        }
    }
    assert_eq!(p.stats().in_use_bytes, 32 * MIB);
    for b in holes {
        p.free(b).unwrap();
    }
    let b = p
        .alloc(o, want, S1)
        .expect("the free block of 1 MiB + 16 KiB holds it");
    p.free(b).unwrap();
    for b in keep.into_iter().chain(fill) {
        p.free(b).unwrap();
    }
}

#[test]
fn an_oom_report_does_not_count_the_failed_request_as_held() {
    let p = pool(PoolConfig::default().capacity(8 * MIB));
    let hog = p.add_owner(OwnerSpec::new("hog", 1 << 30)).unwrap();
    let needy = p.add_owner(OwnerSpec::new("needy", 1 << 30)).unwrap();
    let blocks: Vec<_> = (0..4).map(|_| p.alloc(hog, 2 * MIB, S1).unwrap()).collect();
    let mut blocks = blocks.into_iter();
    let (first, kept1, third, kept2) = (
        blocks.next().unwrap(),
        blocks.next().unwrap(),
        blocks.next().unwrap(),
        blocks.next().unwrap(),
    );
    p.free(first).unwrap();
    p.free(third).unwrap();
    // 4 MiB are free, in two pieces: the request is charged, but finds no place.
    match p.alloc(needy, 4 * MIB, S1) {
        Err(PoolError::OutOfMemory { report, .. }) => {
            let held = |name| {
                report
                    .holdings
                    .iter()
                    .find(|h| h.name == name)
                    .map(|h| h.in_use)
            };
            assert_eq!(held("hog"), Some(4 * MIB), "{report}");
            assert_eq!(held("needy").unwrap_or(0), 0, "{report}");
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    // Nor do the peaks: the request never had its bytes.
    let st = p.stats();
    assert_eq!((st.in_use_bytes, st.peak_in_use_bytes), (4 * MIB, 8 * MIB));
    assert_eq!(st.owners[1].peak_in_use_bytes, 0, "{st:?}");
    p.free(kept1).unwrap();
    p.free(kept2).unwrap();
}

#[test]
fn capacity_caps_mapping_and_oom_reports_holders() {
    let p = pool(PoolConfig::default().capacity(8 * MIB));
    let o = p.add_owner(OwnerSpec::new("hog", 1 << 30)).unwrap();
    let a = p.alloc(o, 6 * MIB, S1).unwrap();
    match p.alloc(o, 4 * MIB, S1) {
        Err(PoolError::OutOfMemory {
            requested, report, ..
        }) => {
            assert_eq!(requested, 4 * MIB);
            // Refused before mapping anything more.
            assert_eq!(report.mapped, 6 * MIB);
            assert_eq!(report.capacity, Some(8 * MIB));
            assert_eq!(report.holdings[0].name, "hog");
            assert_eq!(report.holdings[0].in_use, 6 * MIB);
            let msg = format!(
                "{}",
                PoolError::OutOfMemory {
                    requested,
                    owner: o,
                    stream: S1,
                    report
                }
            );
            assert!(msg.contains("hog"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    // A failed allocation leaves nothing charged.
    assert_eq!(p.stats().owners[0].in_use_bytes, 6 * MIB);
    p.free(a).unwrap();
}

#[test]
fn an_owner_over_its_limit_leaves_other_owners_caches_alone() {
    let p = pool(PoolConfig::default());
    let a = p.add_owner(OwnerSpec::new("a", MIB)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 1 << 30)).unwrap();
    p.free(p.alloc(b, 64 * 1024, S1).unwrap()).unwrap();
    let cached = p.stats().owners[1].cached_bytes;
    assert!(cached > 0, "b's freed block is cached");
    let held = p.alloc(a, 768 * 1024, S1).unwrap();
    assert!(matches!(
        p.alloc(a, 512 * 1024, S1),
        Err(PoolError::QuotaExceeded { .. })
    ));
    p.free(held).unwrap();
    assert_eq!(
        p.stats().owners[1].cached_bytes,
        cached,
        "a's request over its own limit emptied b's cache"
    );
}

#[test]
fn a_host_chunk_the_host_cannot_allocate_is_out_of_memory() {
    let src = HostSource::new(2 * MIB, 1 << 62);
    assert!(matches!(
        src.map(0, 1 << 61),
        Err(SourceError::OutOfMemory { .. })
    ));
    assert_eq!(src.mapped(), 0);
    src.map(0, 2 * MIB).unwrap();
    src.unmap(0, 2 * MIB).unwrap();
}

#[test]
fn source_out_of_memory_is_handled() {
    let src = HostSource::new(2 * MIB, 1 << 30).with_limit(4 * MIB);
    let p = Pool::new(src, PoolConfig::default()).unwrap();
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let a = p.alloc(o, 4 * MIB, S1).unwrap();
    assert!(matches!(
        p.alloc(o, MIB, S1),
        Err(PoolError::OutOfMemory { .. })
    ));
    p.free(a).unwrap();
    let b = p.alloc(o, MIB, S1).unwrap();
    p.free(b).unwrap();
}

#[test]
fn stream_ordered_reuse_through_the_cache() {
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let a = p.alloc(o, 4096, S1).unwrap();
    let off = a.offset();
    let ev = Flag::new();
    p.free_after(a, S1, ev.clone()).unwrap();
    // Another stream must not get it while the event is pending.
    let b = p.alloc(o, 4096, S2).unwrap();
    assert_ne!(b.offset(), off);
    // The same stream gets it at once.
    let c = p.alloc(o, 4096, S1).unwrap();
    assert_eq!(c.offset(), off);
    p.free_after(c, S1, ev.clone()).unwrap();
    ev.set();
    // Once the event completes, any stream may take it.
    let d = p.alloc(o, 4096, S2).unwrap();
    assert_eq!(d.offset(), off);
    p.free(b).unwrap();
    p.free(d).unwrap();
}

#[test]
fn a_cache_whose_large_blocks_are_not_reused_stops_taking_them_and_takes_them_again() {
    let p = pool(PoolConfig::default().shards(1));
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    // Sizes that never come back (all above the small-block size of 128 KiB, for 2 MiB
    // chunks): 60 MiB, within the cache's budget.
    let distinct = |p: &Pool<HostSource>, from: u64| {
        let blocks: Vec<_> = (from..from + 100)
            .map(|i| p.alloc(o, 256 * 1024 + i * 8192, S1).unwrap())
            .collect();
        let biggest = blocks.iter().map(|b| b.size()).max().unwrap();
        for b in blocks {
            p.free(b).unwrap();
        }
        biggest
    };
    distinct(&p, 0);
    assert!(p.stats().owners[0].cached_bytes > 20 * MIB);
    // Trimming returns them unused: the cache now refuses large blocks...
    p.trim().unwrap();
    let biggest = distinct(&p, 100);
    let s = p.stats();
    assert!(
        s.owners[0].cached_bytes <= biggest,
        "{} B cached",
        s.owners[0].cached_bytes
    );
    // ...but small ones are still cached at once.
    let small = p.alloc(o, 4096, S1).unwrap();
    let off = small.offset();
    p.free(small).unwrap();
    let again = p.alloc(o, 4096, S1).unwrap();
    assert_eq!(again.offset(), off);
    p.free(again).unwrap();
    // A large size that repeats brings large blocks back: most later pairs hit.
    let hits = s.cache_hits;
    for _ in 0..1000 {
        let b = p.alloc(o, MIB, S1).unwrap();
        p.free(b).unwrap();
    }
    let s = p.stats();
    assert!(s.cache_hits - hits >= 500, "{} hits", s.cache_hits - hits);
    assert_eq!(s.owners[0].live_bytes, 0);
    assert_eq!(s.allocs, s.frees);
    assert_eq!(
        s.mapped_bytes,
        s.free_bytes + s.pending_bytes + s.in_use_bytes
    );
}

#[test]
fn stream_ordered_reuse_through_the_central_allocator() {
    // Caching off: frees go straight to the central allocator.
    let p = pool(
        PoolConfig::default()
            .cache_bytes_per_shard(0)
            .capacity(8 * MIB),
    );
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let a = p.alloc(o, 6 * MIB, S1).unwrap();
    let off = a.offset();
    let ev = Flag::new();
    p.free_after(a, S1, ev.clone()).unwrap();
    assert_eq!(p.stats().pending_bytes, 6 * MIB);
    // Stream 2 cannot have the pending memory, and there is no other room.
    assert!(matches!(
        p.alloc(o, 6 * MIB, S2),
        Err(PoolError::OutOfMemory { .. })
    ));
    // Stream 1 can.
    let b = p.alloc(o, 6 * MIB, S1).unwrap();
    assert_eq!(b.offset(), off);
    p.free_after(b, S1, ev.clone()).unwrap();
    ev.set();
    let c = p.alloc(o, 6 * MIB, S2).unwrap();
    assert_eq!(c.offset(), off);
    p.free(c).unwrap();
}

#[test]
fn another_owner_does_not_reuse_a_pending_block_on_a_stream_of_the_same_number() {
    let p = pool(
        PoolConfig::default()
            .cache_bytes_per_shard(0)
            .capacity(8 * MIB),
    );
    let a = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 1 << 30)).unwrap();
    let x = p.alloc(a, 6 * MIB, S1).unwrap();
    let off = x.offset();
    let ev = Flag::new();
    p.free_after(x, S1, ev.clone()).unwrap();
    // b knows nothing of the work a queued: it could free the block plainly, and hand
    // memory still in use to any stream.
    assert!(matches!(
        p.alloc(b, 6 * MIB, S1),
        Err(PoolError::OutOfMemory { .. })
    ));
    let y = p.alloc(a, 6 * MIB, S1).unwrap();
    assert_eq!(y.offset(), off, "the owner itself reuses it on its stream");
    p.free(y).unwrap();
}

#[test]
fn a_failed_restore_keeps_a_reused_pending_block_ordered() {
    let (p, rec) = evicting_pool(4 * MIB);
    let a = p.add_owner(OwnerSpec::new("a", 4 * MIB)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 4 * MIB)).unwrap();
    let (e, _) = p.alloc_evictable(a, 2 * MIB, 0, S1).unwrap();
    p.unpin(&e).unwrap();
    // b's request evicts it.
    p.free(p.alloc(b, 4 * MIB, S2).unwrap()).unwrap();
    assert!(!p.is_resident(&e).unwrap());
    // a frees a block of the same size in order on S1; b holds the rest.
    let x = p.alloc(a, 2 * MIB, S1).unwrap();
    let y = p.alloc(b, 2 * MIB, S2).unwrap();
    let ev = Flag::new();
    p.free_after(x, S1, ev.clone()).unwrap();
    // The restore takes that block on S1 and fails: the block must stay ordered.
    rec.fail_restore.store(true, Ordering::SeqCst);
    assert!(matches!(p.pin(&e, S1), Err(PoolError::RestoreFailed(_))));
    assert_eq!(p.stats().pending_bytes, 2 * MIB);
    assert!(
        matches!(p.alloc(b, 2 * MIB, S2), Err(PoolError::OutOfMemory { .. })),
        "another stream got memory whose work is still queued"
    );
    ev.set();
    rec.fail_restore.store(false, Ordering::SeqCst);
    p.free(y).unwrap();
    assert!(p.pin(&e, S1).unwrap().restored);
    p.unpin(&e).unwrap();
    p.free_evictable(e).unwrap();
}

#[test]
fn removing_an_owner_retires_its_completed_pending_frees() {
    let p = pool(
        PoolConfig::default()
            .cache_bytes_per_shard(0)
            .capacity(8 * MIB),
    );
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let ev = Flag::new();
    p.free_after(p.alloc(o, MIB, S1).unwrap(), S1, ev.clone())
        .unwrap();
    assert_eq!(p.stats().pending_bytes, MIB);
    ev.set();
    // The pool held the event; removing the owner lets it go with the block.
    let held = Arc::strong_count(&ev);
    p.remove_owner(o).unwrap();
    assert_eq!(p.stats().pending_bytes, 0);
    assert_eq!(Arc::strong_count(&ev), held - 1, "the event was released");
}

#[test]
fn an_evictable_block_freed_in_stream_order_waits_for_its_event() {
    let (p, _rec) = evicting_pool(8 * MIB);
    let o = p.add_owner(OwnerSpec::new("o", 8 * MIB)).unwrap();
    let (id, _) = p.alloc_evictable(o, 6 * MIB, 0, S1).unwrap();
    p.unpin(&id).unwrap();
    let ev = Flag::new();
    p.free_evictable_after(id, S1, ev.clone()).unwrap();
    let s = p.stats();
    assert_eq!((s.owners[0].live_bytes, s.pending_bytes), (0, 6 * MIB));
    // Another stream cannot have the memory while the work is queued...
    assert!(matches!(
        p.alloc(o, 6 * MIB, S2),
        Err(PoolError::OutOfMemory { .. })
    ));
    // ...and gets it once the caller waits for that work.
    let waiter = {
        let ev = ev.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            ev.set();
        })
    };
    assert_eq!(p.wait_pending(), 6 * MIB);
    waiter.join().unwrap();
    let b = p.alloc(o, 6 * MIB, S2).unwrap();
    p.free(b).unwrap();
    assert_eq!(p.stats().pending_bytes, 0);
}

#[test]
fn a_block_reused_on_the_stream_of_a_pending_free_passes_its_order_on() {
    // Through the owner's cache, and through the central allocator's pending frees.
    for cfg in [
        PoolConfig::default(),
        PoolConfig::default().cache_bytes_per_shard(0),
    ] {
        let p = pool(cfg);
        let a = p.add_owner(OwnerSpec::new("a", 64 * MIB)).unwrap();
        let b = p.add_owner(OwnerSpec::new("b", 64 * MIB)).unwrap();
        let first = p.alloc(a, 2 * MIB, S1).unwrap();
        let off = first.offset();
        let work = Flag::new();
        p.free_after(first, S1, work.clone()).unwrap();
        // Reused at once on its stream, behind the work queued there...
        let again = p.alloc(a, 2 * MIB, S1).unwrap();
        assert_eq!(again.offset(), off, "not reused: the test tests nothing");
        // ...and freed by a user who never used it: as far as it knows, no stream does.
        p.free(again).unwrap();
        // The earlier work may still run there: neither another stream nor another owner
        // may have the memory yet.
        let elsewhere = p.alloc(a, 2 * MIB, S2).unwrap();
        let theirs = p.alloc(b, 2 * MIB, S2).unwrap();
        assert_ne!(elsewhere.offset(), off, "another stream reused it");
        assert_ne!(theirs.offset(), off, "another owner reused it");
        // Its own stream still may.
        let on_s1 = p.alloc(a, 2 * MIB, S1).unwrap();
        assert_eq!(on_s1.offset(), off);
        // Freed in stream order on another stream too: both streams' work may use it.
        let later = Flag::new();
        p.free_after(on_s1, S2, later.clone()).unwrap();
        let s1 = p.alloc(a, 2 * MIB, S1).unwrap();
        let s2 = p.alloc(a, 2 * MIB, S2).unwrap();
        assert_ne!(s1.offset(), off, "reused on S1 before S2's work was done");
        assert_ne!(s2.offset(), off, "reused on S2 before S1's work was done");
        work.set();
        later.set();
        for blk in [elsewhere, theirs, s1, s2] {
            p.free(blk).unwrap();
        }
        p.wait_pending();
        let st = p.stats();
        assert_eq!(st.owners.iter().map(|o| o.live_bytes).sum::<u64>(), 0);
        assert_eq!(st.pending_bytes, 0);
    }
}

#[test]
fn a_local_cache_does_not_keep_a_block_that_inherits_a_stream_order() {
    let p = pool(PoolConfig::default().cache_bytes_per_shard(0));
    let a = p.add_owner(OwnerSpec::new("a", 64 * MIB)).unwrap();
    let first = p.alloc(a, 2 * MIB, S1).unwrap();
    let off = first.offset();
    let work = Flag::new();
    p.free_after(first, S1, work.clone()).unwrap();
    let mut local = p.local_cache(a, 64 * MIB).unwrap();
    let again = local.alloc(2 * MIB, S1).unwrap();
    assert_eq!(again.offset(), off, "not reused: the test tests nothing");
    local.free(again).unwrap();
    // A held block serves any stream at once: this one was not held.
    let elsewhere = local.alloc(2 * MIB, S2).unwrap();
    assert_ne!(elsewhere.offset(), off);
    work.set();
    local.free(elsewhere).unwrap();
}

#[test]
fn an_evictable_block_placed_in_a_pending_free_waits_for_its_work_before_it_goes() {
    let p = pool(
        PoolConfig::default()
            .capacity(2 * MIB)
            .cache_bytes_per_shard(0),
    );
    let rec = Arc::new(Recorder::default());
    p.set_evictor(rec.clone());
    let a = p
        .add_owner(OwnerSpec::new("a", 2 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 2 * MIB)).unwrap();
    let first = p.alloc(a, 2 * MIB, S1).unwrap();
    let off = first.offset();
    let work = Work::new();
    p.free_after(first, S1, work.clone()).unwrap();
    let (id, pinned) = p.alloc_evictable(a, 2 * MIB, 7, S1).unwrap();
    assert_eq!(
        p.source().addr(off),
        pinned.addr,
        "not reused: the test tests nothing"
    );
    p.unpin(&id).unwrap();
    // The only memory is that block's: `b`'s request evicts it, once the work queued on
    // it before it was handed out is done.
    let blk = p.alloc(b, 2 * MIB, S2).unwrap();
    assert_eq!(rec.evicted.lock().unwrap().len(), 1);
    assert!(
        work.waited.load(Ordering::SeqCst),
        "evicted while the work of the free it reused might still run"
    );
    p.free(blk).unwrap();
    p.free_evictable(id).unwrap();
}

/// A free event whose every question panics.
struct Panicky;

impl gpushare_pool::FreeEvent for Panicky {
    fn is_complete(&self) -> bool {
        panic!("the event cannot say")
    }
}

#[test]
fn a_free_event_that_panics_is_taken_for_work_not_done_and_leaves_the_accounting_whole() {
    let p = pool(
        PoolConfig::default()
            .capacity(2 * MIB)
            .cache_bytes_per_shard(0),
    );
    let a = p.add_owner(OwnerSpec::new("a", 2 * MIB)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 2 * MIB)).unwrap();
    let blk = p.alloc(a, 2 * MIB, S1).unwrap();
    p.free_after(blk, S1, Arc::new(Panicky)).unwrap();
    // The only memory is held behind an event that cannot say whether its work is done:
    // another owner's request is refused, typed, and charges nothing.
    assert!(matches!(
        p.alloc(b, 2 * MIB, S2),
        Err(PoolError::OutOfMemory { .. })
    ));
    let st = p.stats();
    assert_eq!(st.pending_bytes, 2 * MIB);
    assert!(st.owners.iter().all(|o| o.in_use_bytes == 0), "{st:?}");
    // The owner goes, and so may the other: nothing is left charged.
    p.remove_owner(b).unwrap();
}

/// A pool whose evictor ends its evictions in two halves, as the runtime's does (the
/// proptest covers evictions that end at once too).
fn evicting_pool(cap: u64) -> (Pool<HostSource>, Arc<Recorder>) {
    let p = pool(PoolConfig::default().capacity(cap).cache_bytes_per_shard(0));
    let r = Arc::new(Recorder::two_halves());
    p.set_evictor(r.clone());
    (p, r)
}

#[test]
fn eviction_takes_best_effort_lru_first_and_restore_brings_it_back() {
    let (p, rec) = evicting_pool(8 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let mut ids = vec![];
    for tag in 0..4 {
        let (id, pin) = p.alloc_evictable(be, 2 * MIB, tag, S1).unwrap();
        assert!(!pin.restored);
        ids.push(id);
    }
    for id in &ids {
        p.unpin(id).unwrap();
    }
    // Touch block 0 so that block 1 is now the least recently used.
    p.pin(&ids[0], S1).unwrap();
    p.unpin(&ids[0]).unwrap();
    let x = p.alloc(g, 2 * MIB, S1).unwrap();
    {
        let ev = rec.evicted.lock().unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].tag, 1, "least recently used goes first");
        assert_eq!(ev[0].requested_by, g);
    }
    assert!(!p.is_resident(&ids[1]).unwrap());
    let s = p.stats();
    assert_eq!(s.evictions, 1);
    assert_eq!(s.owners[1].evicted_bytes, 2 * MIB);
    // Pinning the evicted block restores it (evicting another BestEffort block for room).
    let pin = p.pin(&ids[1], S2).unwrap();
    assert!(pin.restored);
    let r = rec.restored.lock().unwrap()[0].clone();
    assert_eq!((r.tag, r.stream, r.addr), (1, S2, pin.addr));
    assert_eq!(rec.evicted.lock().unwrap()[1].tag, 2);
    assert_eq!(p.stats().restores, 1);
    p.unpin(&ids[1]).unwrap();
    p.free(x).unwrap();
    for id in ids {
        p.free_evictable(id).unwrap();
    }
    let s = p.stats();
    assert_eq!(s.owners[1].evicted_bytes, 0);
    assert_eq!(s.in_use_bytes, 0);
}

#[test]
fn a_reference_works_as_its_handle_until_the_block_is_freed() {
    let (p, _rec) = evicting_pool(4 * MIB);
    let be = p.add_owner(OwnerSpec::new("be", 4 * MIB)).unwrap();
    let (id, _) = p.alloc_evictable(be, MIB, 0, S1).unwrap();
    let r = id.to_ref();
    assert_eq!(r.key(), id.key());
    p.unpin(r).unwrap();
    assert!(p.evict(be, r).unwrap());
    assert!(!p.is_resident(r).unwrap());
    assert!(p.pin(r, S1).unwrap().restored);
    assert_eq!(p.pin_count(&id).unwrap(), 1);
    p.unpin_all([r]).unwrap();
    p.free_evictable(id).unwrap();
    // The next block takes the freed one's slot; the old reference still names the old
    // block, and touches nothing.
    let (next, _) = p.alloc_evictable(be, MIB, 1, S1).unwrap();
    assert_ne!(next.key(), r.key());
    for failed in [
        p.pin(r, S1).err(),
        p.unpin(r).err(),
        p.is_resident(r).err(),
        p.evict(be, r).err(),
    ] {
        assert!(matches!(failed, Some(PoolError::DoubleFree)), "{failed:?}");
    }
    assert_eq!(p.pin_count(&next).unwrap(), 1);
    // A reference into another pool is refused.
    let (other, _) = evicting_pool(4 * MIB);
    assert!(matches!(
        other.pin(next.to_ref(), S1),
        Err(PoolError::ForeignBlock { .. })
    ));
    p.unpin(&next).unwrap();
    p.free_evictable(next).unwrap();
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn a_resident_set_is_pinned_whole_or_not_at_all() {
    let (p, _rec) = evicting_pool(4 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 4 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let be = p.add_owner(OwnerSpec::new("be", 4 * MIB)).unwrap();
    let (a, _) = p.alloc_evictable(be, MIB, 0, S1).unwrap();
    let (b, _) = p.alloc_evictable(be, MIB, 1, S1).unwrap();
    p.unpin_all([&a, &b]).unwrap();
    assert_eq!(p.stats().owners[1].evictable_pinned_bytes, 0);
    // Both resident: both pinned under one call, counted once each.
    assert!(p.pin_all_resident([&a, &b]).unwrap());
    assert_eq!(p.stats().owners[1].evictable_pinned_bytes, 2 * MIB);
    p.unpin_all([&a, &b]).unwrap();
    // Evict `a` (least recently used); the set is no longer whole, so nothing is pinned.
    let x = p.alloc(g, 2 * MIB, S1).unwrap();
    let x1 = p.alloc(g, MIB, S1).unwrap();
    assert!(!p.is_resident(&a).unwrap() && p.is_resident(&b).unwrap());
    assert!(!p.pin_all_resident([&a, &b]).unwrap());
    assert_eq!(
        p.stats().owners[1].evictable_pinned_bytes,
        0,
        "nothing held partly"
    );
    // The same with the resident block first: its pin is taken back.
    assert!(!p.pin_all_resident([&b, &a]).unwrap());
    assert_eq!(
        p.stats().owners[1].evictable_pinned_bytes,
        0,
        "nothing held partly"
    );
    // So `b` can still be evicted.
    let y = p.alloc(g, MIB, S1).unwrap();
    assert!(!p.is_resident(&b).unwrap());
    // Unpinning what is not pinned is an error, but every other block is still unpinned.
    p.free(y).unwrap();
    let (c, _) = p.alloc_evictable(be, MIB, 2, S1).unwrap();
    assert!(matches!(p.unpin_all([&a, &c]), Err(PoolError::NotPinned)));
    assert_eq!(p.stats().owners[1].evictable_pinned_bytes, 0);
    p.free(x).unwrap();
    p.free(x1).unwrap();
    for id in [a, b, c] {
        p.free_evictable(id).unwrap();
    }
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn pinned_and_guaranteed_blocks_are_never_evicted() {
    let (p, rec) = evicting_pool(4 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 4 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let be = p.add_owner(OwnerSpec::new("be", 4 * MIB)).unwrap();
    let (gid, _) = p.alloc_evictable(g, 2 * MIB, 0, S1).unwrap();
    p.unpin(&gid).unwrap();
    let (bid, _) = p.alloc_evictable(be, 2 * MIB, 1, S1).unwrap(); // stays pinned
    match p.alloc(g, 2 * MIB, S1) {
        Err(PoolError::OutOfMemory { report, .. }) => {
            let be_h = report.holdings.iter().find(|h| h.name == "be").unwrap();
            assert_eq!(be_h.pinned_evictable, 2 * MIB);
        }
        other => panic!("{other:?}"),
    }
    assert!(rec.evicted.lock().unwrap().is_empty());
    let bid = match p.free_evictable(bid) {
        Err((id, PoolError::Pinned { pins: 1 })) => id,
        other => panic!("{other:?}"),
    };
    p.unpin(&bid).unwrap();
    assert!(matches!(p.unpin(&bid), Err(PoolError::NotPinned)));
    // A refusing evictor leaves the block resident, and the allocation fails cleanly.
    rec.fail_evict.store(true, Ordering::SeqCst);
    assert!(matches!(
        p.alloc(g, 2 * MIB, S1),
        Err(PoolError::OutOfMemory { .. })
    ));
    assert!(p.is_resident(&bid).unwrap());
    rec.fail_evict.store(false, Ordering::SeqCst);
    let x = p.alloc(g, 2 * MIB, S1).unwrap();
    assert!(!p.is_resident(&bid).unwrap());
    assert!(p.is_resident(&gid).unwrap());
    // A failed restore leaves the block evicted and charges nothing.
    p.free(x).unwrap();
    rec.fail_restore.store(true, Ordering::SeqCst);
    let before = p.stats().in_use_bytes;
    assert!(matches!(p.pin(&bid, S1), Err(PoolError::RestoreFailed(_))));
    assert_eq!(p.stats().in_use_bytes, before);
    rec.fail_restore.store(false, Ordering::SeqCst);
    assert!(p.pin(&bid, S1).unwrap().restored);
    p.unpin(&bid).unwrap();
    p.free_evictable(bid).unwrap();
    p.free_evictable(gid).unwrap();
}

#[test]
fn burstable_blocks_are_evicted_only_above_base() {
    let (p, rec) = evicting_pool(8 * MIB);
    let b = p
        .add_owner(OwnerSpec::new("burst", 8 * MIB).base(2 * MIB))
        .unwrap();
    let g = p
        .add_owner(OwnerSpec::new("g", 6 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let h = p.add_owner(OwnerSpec::new("h", 8 * MIB)).unwrap();
    assert_eq!(p.stats().owners[0].tier, Tier::Burstable);
    let (a, _) = p.alloc_evictable(b, 2 * MIB, 0, S1).unwrap();
    let (c, _) = p.alloc_evictable(b, 2 * MIB, 1, S1).unwrap();
    p.unpin(&a).unwrap();
    p.unpin(&c).unwrap();
    let x = p.alloc(g, 2 * MIB, S1).unwrap();
    let y = p.alloc(g, 2 * MIB, S1).unwrap();
    assert!(
        rec.evicted.lock().unwrap().is_empty(),
        "room without eviction"
    );
    // 4 MiB used by the Burstable owner, base 2 MiB: one block may go.
    let z = p.alloc(g, 2 * MIB, S1).unwrap();
    assert_eq!(rec.evicted.lock().unwrap().len(), 1);
    assert_eq!(rec.evicted.lock().unwrap()[0].tag, 0, "least recently used");
    assert_eq!(p.stats().owners[0].in_use_bytes, 2 * MIB);
    // At its base the owner keeps the rest.
    assert!(matches!(
        p.alloc(h, 2 * MIB, S1),
        Err(PoolError::OutOfMemory { .. })
    ));
    assert_eq!(rec.evicted.lock().unwrap().len(), 1);
    for blk in [x, y, z] {
        p.free(blk).unwrap();
    }
    for id in [a, c] {
        p.free_evictable(id).unwrap();
    }
}

#[test]
fn stats_and_snapshot_agree() {
    let p = pool(PoolConfig::default());
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let a = p.alloc(o, 4096, S1).unwrap();
    let b = p.alloc(o, 8192, S1).unwrap();
    let (e, _) = p.alloc_evictable(o, MIB, 0, S1).unwrap();
    p.free(b).unwrap();
    let s = p.stats();
    assert_eq!(s.owners[0].live_bytes, 4096 + MIB);
    assert_eq!(s.owners[0].cached_bytes, 8192);
    assert_eq!(s.owners[0].in_use_bytes, 4096 + 8192 + MIB);
    assert_eq!(
        s.mapped_bytes,
        s.free_bytes + s.pending_bytes + s.in_use_bytes + s.retired_bytes
    );
    assert_eq!(s.allocs, 3);
    assert_eq!(s.frees, 1);
    assert!(s.fragmentation >= 0.0 && s.fragmentation < 1.0);
    let snap = p.snapshot();
    let count = |st: BlockState| snap.blocks.iter().filter(|b| b.state == st).count();
    assert_eq!(count(BlockState::Live), 1);
    assert_eq!(count(BlockState::Cached), 1);
    assert_eq!(count(BlockState::Evictable { pinned: true }), 1);
    let total: u64 = snap.blocks.iter().map(|b| b.size).sum();
    assert_eq!(total, s.mapped_bytes);
    p.free(a).unwrap();
    p.unpin(&e).unwrap();
    p.free_evictable(e).unwrap();
}

#[test]
fn owners_are_removed_only_when_empty() {
    let p = pool(PoolConfig {
        max_owners: 2,
        ..PoolConfig::default()
    });
    let a = p.add_owner(OwnerSpec::new("a", MIB)).unwrap();
    let _b = p.add_owner(OwnerSpec::new("b", MIB)).unwrap();
    assert!(matches!(
        p.add_owner(OwnerSpec::new("c", MIB)),
        Err(PoolError::TooManyOwners(2))
    ));
    let x = p.alloc(a, 1000, S1).unwrap();
    assert!(matches!(
        p.remove_owner(a),
        Err(PoolError::OwnerBusy { bytes: 1024, .. })
    ));
    p.free(x).unwrap();
    p.remove_owner(a).unwrap();
    assert!(matches!(
        p.alloc(a, 10, S1),
        Err(PoolError::UnknownOwner(_))
    ));
    let c = p.add_owner(OwnerSpec::new("c", MIB)).unwrap();
    assert_ne!(a, c, "a reused slot gets a new identity");
    // `c` caches a small block, so that the fast path has one to give.
    p.free(p.alloc(c, 10, S1).unwrap()).unwrap();
    assert!(p.stats().cached_bytes > 0);
    // The removed owner's id names the slot that `c` now holds: it must not allocate
    // there, from the cache, the central free lists or an aligned request, nor be
    // charged to `c`.
    for size in [10, 300 * 1024] {
        assert!(matches!(
            p.alloc(a, size, S1),
            Err(PoolError::UnknownOwner(_))
        ));
        assert!(matches!(
            p.alloc_aligned(a, size, 4096, S1),
            Err(PoolError::UnknownOwner(_))
        ));
    }
    assert_eq!(p.stats().live_bytes, 0);
}

#[test]
fn caching_everything_is_a_valid_setting() {
    let p = pool(PoolConfig {
        cache_max_block: u64::MAX,
        ..PoolConfig::default()
    });
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    for size in [256, 4096, 3 * MIB, 300 * MIB] {
        let b = p.alloc(o, size, S1).unwrap();
        p.free(b).unwrap();
    }
    assert!(matches!(
        p.add_owner(OwnerSpec::new("huge", u64::MAX).base(u64::MAX)),
        Err(PoolError::BadOwner(_))
    ));
}

#[test]
fn a_growth_step_above_the_capacity_maps_the_capacity() {
    let p = pool(PoolConfig::default().capacity(8 * MIB).min_grow(u64::MAX));
    let o = p.add_owner(OwnerSpec::new("a", 1 << 30)).unwrap();
    let b = p.alloc(o, MIB, S1).unwrap();
    assert_eq!(p.stats().mapped_bytes, 8 * MIB);
    p.free(b).unwrap();
}

#[test]
fn a_block_pinned_in_place_is_skipped_then_ranks_by_its_last_unpin() {
    let (p, rec) = evicting_pool(8 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let be = p.add_owner(OwnerSpec::new("be", 8 * MIB)).unwrap();
    let ids: Vec<_> = (0..4)
        .map(|tag| p.alloc_evictable(be, 2 * MIB, tag, S1).unwrap().0)
        .collect();
    for id in &ids {
        p.unpin(id).unwrap();
    }
    // Block 0 is the least recently used, and pinned: eviction passes it by.
    p.pin(&ids[0], S1).unwrap();
    let x = p.alloc(g, 2 * MIB, S1).unwrap();
    assert_eq!(rec.evicted.lock().unwrap()[0].tag, 1);
    assert!(p.is_resident(&ids[0]).unwrap());
    // Unpinned, it is the most recently used: blocks 2 and 3 go before it.
    p.unpin(&ids[0]).unwrap();
    let y = p.alloc(g, 4 * MIB, S1).unwrap();
    let tags = rec_tags(&rec);
    assert_eq!(tags, vec![1, 2, 3]);
    assert!(p.is_resident(&ids[0]).unwrap());
    // Pinned and unpinned again while it is the most recent, it stays the most recent.
    p.pin(&ids[0], S1).unwrap();
    p.unpin(&ids[0]).unwrap();
    p.free(x).unwrap();
    p.free(y).unwrap();
    for id in ids {
        p.free_evictable(id).unwrap();
    }
    assert_eq!(p.stats().in_use_bytes, 0);
}

#[test]
fn an_owner_can_evict_its_own_unpinned_block() {
    let (p, rec) = evicting_pool(8 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let (id, _) = p.alloc_evictable(g, 2 * MIB, 5, S1).unwrap();
    let other = p.add_owner(OwnerSpec::new("other", MIB)).unwrap();
    assert!(matches!(
        p.evict(g, &id),
        Err(PoolError::Pinned { pins: 1 })
    ));
    p.unpin(&id).unwrap();
    assert!(matches!(
        p.evict(other, &id),
        Err(PoolError::ForeignBlock { .. })
    ));
    // Whatever its tier: the owner asks for it.
    assert!(p.evict(g, &id).unwrap());
    assert_eq!(rec.evicted.lock().unwrap()[0].tag, 5);
    assert!(!p.evict(g, &id).unwrap(), "already out");
    let s = p.stats();
    assert_eq!((s.owners[0].evicted_bytes, s.evictions), (2 * MIB, 1));
    assert!(p.pin(&id, S1).unwrap().restored);
    p.unpin(&id).unwrap();
    rec.fail_evict.store(true, Ordering::SeqCst);
    assert!(matches!(p.evict(g, &id), Err(PoolError::EvictFailed(_))));
    assert!(
        p.is_resident(&id).unwrap(),
        "a failed eviction leaves it in place"
    );
    p.free_evictable(id).unwrap();
    let q = pool(PoolConfig::default());
    let o = q.add_owner(OwnerSpec::new("o", MIB << 4)).unwrap();
    let (id, _) = q.alloc_evictable(o, MIB, 0, S1).unwrap();
    q.unpin(&id).unwrap();
    assert!(matches!(q.evict(o, &id), Err(PoolError::NoEvictor)));
    q.free_evictable(id).unwrap();
}

#[test]
fn a_host_source_refuses_ranges_that_overflow() {
    let src = HostSource::new(2 * MIB, 1 << 40).with_limit(8 * MIB);
    src.map(0, 2 * MIB).unwrap();
    assert!(matches!(
        src.map(2 * MIB, u64::MAX),
        Err(SourceError::OutOfMemory { .. })
    ));
    assert!(matches!(
        src.unmap(512, u64::MAX),
        Err(SourceError::Other(_))
    ));
    src.unmap(0, 2 * MIB).unwrap();
}

#[test]
fn a_guaranteed_owners_evictable_block_does_not_borrow_a_base_it_would_never_give_back() {
    let p = pool(PoolConfig::default().capacity(4 * MIB));
    p.set_evictor(Arc::new(Recorder::default()));
    let r = p
        .add_owner(OwnerSpec::new("r", 2 * MIB).base(2 * MIB))
        .unwrap();
    let g = p
        .add_owner(OwnerSpec::new("g", 4 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    // Guaranteed blocks are never evicted, so `r`'s base would stay taken for good.
    assert!(matches!(
        p.alloc_evictable(g, 4 * MIB, 0, S1),
        Err(PoolError::ReservedElsewhere { .. })
    ));
    let (id, _) = p.alloc_evictable(g, 2 * MIB, 0, S1).unwrap();
    p.unpin(&id).unwrap();
    let b = p.alloc(r, MIB, S2).unwrap();
    p.free(b).unwrap();
    p.free_evictable(id).unwrap();
}

/// A pool of `cap` bytes with an evictor, a Guaranteed owner `r` whose base and limit are
/// `r_base`, and a Burstable owner `b` with base `b_base` and the whole pool as its limit.
fn base_and_borrower(
    cap: u64,
    r_base: u64,
    b_base: u64,
) -> (Pool<HostSource>, Arc<Recorder>, OwnerId, OwnerId) {
    let p = pool(PoolConfig::default().capacity(cap));
    let rec = Arc::new(Recorder::default());
    p.set_evictor(rec.clone());
    let r = p
        .add_owner(
            OwnerSpec::new("r", r_base)
                .base(r_base)
                .tier(Tier::Guaranteed),
        )
        .unwrap();
    let b = p.add_owner(OwnerSpec::new("b", cap).base(b_base)).unwrap();
    (p, rec, r, b)
}

#[test]
fn a_block_that_borrowed_a_base_below_its_owners_goes_when_the_base_is_claimed() {
    let (p, rec, r, b) = base_and_borrower(4 * MIB, 2 * MIB, MIB);
    // `b` borrows 2 MiB of `r`'s base for a block whose eviction takes it below its own.
    let (id, _) = p.alloc_evictable(b, 3 * MIB, 0, S1).unwrap();
    p.unpin(&id).unwrap();
    // `r` claims its base: the block goes all the same.
    let blk = p.alloc(r, 2 * MIB, S2).unwrap();
    assert_eq!(rec.evicted.lock().unwrap().len(), 1);
    assert!(!p.is_resident(&id).unwrap());
    p.free(blk).unwrap();
    p.free_evictable(id).unwrap();
}

#[test]
fn a_block_that_borrowed_a_base_goes_when_its_owner_is_left_below_its_own() {
    let (p, rec, r, b) = base_and_borrower(8 * MIB, 4 * MIB, 2 * MIB);
    // At its base, `b` borrows 4 MiB of `r`'s base for a block it could give back...
    let (small, _) = p.alloc_evictable(b, 2 * MIB, 0, S1).unwrap();
    let (big, _) = p.alloc_evictable(b, 6 * MIB, 1, S1).unwrap();
    p.unpin(&big).unwrap();
    // ...until its other block goes: evicting the big one now takes `b` below its base.
    p.unpin(&small).unwrap();
    p.free_evictable(small).unwrap();
    // `r` asks for its base all the same: the block that borrowed it goes.
    let blk = p.alloc(r, 4 * MIB, S2).unwrap();
    assert_eq!(rec.evicted.lock().unwrap().len(), 1);
    assert_eq!(rec.evicted.lock().unwrap()[0].tag, 1);
    assert!(!p.is_resident(&big).unwrap());
    p.free(blk).unwrap();
    p.free_evictable(big).unwrap();
}

#[test]
fn a_borrower_does_not_take_a_burstable_owner_below_its_base_for_its_own_borrowing() {
    let p = pool(PoolConfig::default().capacity(8 * MIB));
    let rec = Arc::new(Recorder::default());
    p.set_evictor(rec.clone());
    let b = p
        .add_owner(OwnerSpec::new("b", 8 * MIB).base(5 * MIB))
        .unwrap();
    let e = p
        .add_owner(OwnerSpec::new("e", 8 * MIB).tier(Tier::BestEffort))
        .unwrap();
    // `b` holds 6 MiB, 1 MiB above its base; `e` borrows the last 2 MiB: the commitments
    // reach the capacity, and nothing has borrowed past it.
    let (big, _) = p.alloc_evictable(b, 4 * MIB, 0, S1).unwrap();
    let (small, _) = p.alloc_evictable(b, 2 * MIB, 1, S1).unwrap();
    p.unpin(&big).unwrap();
    p.unpin(&small).unwrap();
    let (kept, _) = p.alloc_evictable(e, 2 * MIB, 2, S2).unwrap();
    // `e` borrows more: only its own borrowing would exceed the capacity, and every block
    // of `b` that could go takes it below its base. `e` is refused; `b` keeps its memory.
    match p.alloc_evictable(e, 2 * MIB, 3, S2) {
        Err(PoolError::OutOfMemory { .. }) => {}
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    assert!(rec.evicted.lock().unwrap().is_empty());
    assert!(p.is_resident(&big).unwrap() && p.is_resident(&small).unwrap());
    p.unpin(&kept).unwrap();
    for id in [big, small, kept] {
        p.free_evictable(id).unwrap();
    }
}

#[test]
fn making_room_in_the_commitments_evicts_nothing_that_frees_none() {
    let p = pool(PoolConfig::default().capacity(4 * MIB));
    let rec = Arc::new(Recorder::default());
    p.set_evictor(rec.clone());
    // `x` holds no more than its base: evicting its blocks leaves its commitment as it is.
    let x = p
        .add_owner(
            OwnerSpec::new("x", 4 * MIB)
                .base(2 * MIB)
                .tier(Tier::BestEffort),
        )
        .unwrap();
    let y = p
        .add_owner(OwnerSpec::new("y", 4 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let ids: Vec<_> = (0..2)
        .map(|_| {
            let (id, _) = p.alloc_evictable(x, MIB, 0, S1).unwrap();
            p.unpin(&id).unwrap();
            id
        })
        .collect();
    assert!(p.alloc(y, 3 * MIB, S2).is_err());
    assert_eq!(p.stats().evictions, 0);
    assert!(rec.evicted.lock().unwrap().is_empty());
    for id in ids {
        assert!(p.is_resident(&id).unwrap());
        p.free_evictable(id).unwrap();
    }
}

/// Evicts at once; panics on restore, perhaps after queuing a copy.
struct PanicsOnRestore;

impl gpushare_pool::Evictor for PanicsOnRestore {
    fn evict(
        &self,
        _: &gpushare_pool::VictimInfo,
    ) -> Result<gpushare_pool::Eviction, gpushare_pool::EvictError> {
        Ok(gpushare_pool::Eviction::done())
    }
    fn restore(&self, _: &gpushare_pool::RestoreInfo) -> Result<(), gpushare_pool::EvictError> {
        panic!("the copy engine caught fire")
    }
}

#[test]
fn the_memory_of_a_restore_that_panicked_is_never_handed_out() {
    let p = pool(PoolConfig::default().capacity(4 * MIB));
    p.set_evictor(Arc::new(PanicsOnRestore));
    let a = p
        .add_owner(OwnerSpec::new("a", 4 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 4 * MIB)).unwrap();
    let (id, _) = p.alloc_evictable(a, 2 * MIB, 0, S1).unwrap();
    p.unpin(&id).unwrap();
    let big = p.alloc(b, 4 * MIB, S2).unwrap();
    assert!(!p.is_resident(&id).unwrap());
    p.free(big).unwrap();

    assert!(matches!(p.pin(&id, S1), Err(PoolError::RestoreFailed(_))));
    let s = p.stats();
    assert_eq!((s.retired_bytes, s.in_use_bytes), (2 * MIB, 0));
    assert_eq!(
        s.mapped_bytes,
        s.free_bytes + s.pending_bytes + s.in_use_bytes + s.retired_bytes
    );
    let snap = p.snapshot();
    assert!(snap
        .blocks
        .iter()
        .any(|x| x.state == BlockState::Retired && x.size == 2 * MIB && x.owner.is_none()));
    // Only the other half of the pool is left to hand out.
    assert!(p.alloc(b, 4 * MIB, S2).is_err());
    let half = p.alloc(b, 2 * MIB, S2).unwrap();
    p.free(half).unwrap();
    // The block is still evicted, and can be freed.
    p.free_evictable(id).unwrap();
}

/// An evictor whose owners keep some blocks pinned between uses (idle pins, as the
/// runtime's contexts do between sessions), letting them go in the order they were kept.
struct IdleKeeper {
    rec: Recorder,
    pool: std::sync::OnceLock<std::sync::Weak<Pool<HostSource>>>,
    idle: std::sync::Mutex<Vec<EvictableRef>>,
    releases: std::sync::atomic::AtomicUsize,
    /// Asks to let go that find the idle pins still in use (they are let go only after).
    busy_asks: std::sync::atomic::AtomicUsize,
}

impl Evictor for IdleKeeper {
    fn evict(&self, v: &VictimInfo) -> Result<Eviction, EvictError> {
        self.rec.evict(v)
    }
    fn restore(&self, r: &RestoreInfo) -> Result<(), EvictError> {
        self.rec.restore(r)
    }
    fn holds_idle_pins(&self) -> bool {
        !self.idle.lock().unwrap().is_empty()
    }
    fn release_idle_pins(&self) {
        self.releases.fetch_add(1, Ordering::SeqCst);
        if self
            .busy_asks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return;
        }
        let idle = std::mem::take(&mut *self.idle.lock().unwrap());
        let pool = self.pool.get().and_then(std::sync::Weak::upgrade).unwrap();
        pool.unpin_all(idle).unwrap();
    }
}

fn idle_keeping_pool(cap: u64) -> (Arc<Pool<HostSource>>, Arc<IdleKeeper>) {
    idle_keeping_pool_with(cap, Recorder::two_halves())
}

fn idle_keeping_pool_with(cap: u64, rec: Recorder) -> (Arc<Pool<HostSource>>, Arc<IdleKeeper>) {
    let p = Arc::new(pool(
        PoolConfig::default().capacity(cap).cache_bytes_per_shard(0),
    ));
    let keeper = Arc::new(IdleKeeper {
        rec,
        pool: std::sync::OnceLock::new(),
        idle: std::sync::Mutex::new(Vec::new()),
        releases: std::sync::atomic::AtomicUsize::new(0),
        busy_asks: std::sync::atomic::AtomicUsize::new(0),
    });
    keeper.pool.set(Arc::downgrade(&p)).unwrap();
    p.set_evictor(keeper.clone());
    (p, keeper)
}

#[test]
fn idle_pins_are_let_go_before_a_victim_is_chosen_oldest_first() {
    let (p, keeper) = idle_keeping_pool(8 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let be1 = p.add_owner(OwnerSpec::new("be1", 8 * MIB)).unwrap();
    let be2 = p.add_owner(OwnerSpec::new("be2", 8 * MIB)).unwrap();
    // `a` is unpinned, then `b` and `c` are kept pinned, idle, in that order.
    let (a, _) = p.alloc_evictable(be1, 2 * MIB, 0, S1).unwrap();
    let (b, _) = p.alloc_evictable(be2, 2 * MIB, 1, S1).unwrap();
    let (c, _) = p.alloc_evictable(be1, 2 * MIB, 2, S1).unwrap();
    p.unpin(&a).unwrap();
    keeper.idle.lock().unwrap().extend([b.to_ref(), c.to_ref()]);
    let x = p.alloc(g, 2 * MIB, S1).unwrap();
    // Room is there: nothing is evicted, and the idle pins stay.
    assert!(rec_tags(&keeper.rec).is_empty());
    assert_eq!(keeper.releases.load(Ordering::SeqCst), 0);
    assert_eq!(p.stats().owners[2].evictable_pinned_bytes, 2 * MIB);
    // Short of room, the idle pins go before a victim is chosen, and the blocks join the
    // least-recently-used order behind the one unpinned before them, oldest first.
    let y = p.alloc(g, 2 * MIB, S1).unwrap();
    assert_eq!(keeper.releases.load(Ordering::SeqCst), 1);
    assert_eq!(rec_tags(&keeper.rec), [0]);
    let z = p.alloc(g, 2 * MIB, S1).unwrap();
    assert_eq!(rec_tags(&keeper.rec), [0, 1]);
    assert!(p.is_resident(&c).unwrap());
    for blk in [x, y, z] {
        p.free(blk).unwrap();
    }
    for id in [a, b, c] {
        p.free_evictable(id).unwrap();
    }
}

/// The last ask before failing comes for a request short of memory that others reserved,
/// as for one short of memory: an idle pin released then lets the request evict the block
/// that borrowed the reservation.
#[test]
fn a_request_short_of_unreserved_memory_asks_again_for_idle_pins_before_it_fails() {
    let (p, keeper) = idle_keeping_pool_with(8 * MIB, Recorder::default());
    let _r = p
        .add_owner(
            OwnerSpec::new("r", 4 * MIB)
                .base(4 * MIB)
                .tier(Tier::Guaranteed),
        )
        .unwrap();
    let be = p
        .add_owner(OwnerSpec::new("be", 8 * MIB).tier(Tier::BestEffort))
        .unwrap();
    let q = p
        .add_owner(OwnerSpec::new("q", 8 * MIB).tier(Tier::BestEffort))
        .unwrap();
    // `be` holds 2 MiB pinned, idle; with `r`'s 4 MiB reserved, 2 MiB are left to `q`.
    let (b, _) = p.alloc_evictable(be, 2 * MIB, 1, S1).unwrap();
    keeper.idle.lock().unwrap().push(b.to_ref());
    // `b` is still in use at the first ask; at the last one it is idle, and goes.
    keeper.busy_asks.store(1, Ordering::SeqCst);
    let x = p.alloc(q, 4 * MIB, S2).unwrap();
    assert_eq!(keeper.releases.load(Ordering::SeqCst), 2);
    assert_eq!(rec_tags(&keeper.rec), [1]);
    p.free(x).unwrap();
    p.free_evictable(b).unwrap();
}

fn rec_tags(rec: &Recorder) -> Vec<u64> {
    rec.evicted.lock().unwrap().iter().map(|v| v.tag).collect()
}

/// A request whose first ask for idle pins found them in use asks again before it gives
/// up: with evictions whose bytes move with the lock free, and with evictions that end at
/// once (then it never waits nor finishes one later, and only the last ask before failing
/// is left; the test fails without it).
#[test]
fn a_request_asks_again_for_idle_pins_after_an_eviction_or_before_it_fails() {
    for rec in [Recorder::two_halves(), Recorder::default()] {
        asks_again_for_idle_pins(rec);
    }
}

fn asks_again_for_idle_pins(rec: Recorder) {
    let (p, keeper) = idle_keeping_pool_with(8 * MIB, rec);
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let be1 = p.add_owner(OwnerSpec::new("be1", 8 * MIB)).unwrap();
    let be2 = p.add_owner(OwnerSpec::new("be2", 8 * MIB)).unwrap();
    let (a, _) = p.alloc_evictable(be1, 2 * MIB, 0, S1).unwrap();
    let (b, _) = p.alloc_evictable(be2, 2 * MIB, 1, S1).unwrap();
    p.unpin(&a).unwrap();
    keeper.idle.lock().unwrap().push(b.to_ref());
    let x = p.alloc(g, 4 * MIB, S1).unwrap();
    // `b` is still in use at the first ask; once `a` is out, the request asks again, and
    // `b` goes too.
    keeper.busy_asks.store(1, Ordering::SeqCst);
    let y = p.alloc(g, 4 * MIB, S1).unwrap();
    assert_eq!(keeper.releases.load(Ordering::SeqCst), 2);
    assert_eq!(rec_tags(&keeper.rec), [0, 1]);
    p.free(x).unwrap();
    p.free(y).unwrap();
    p.free_evictable(a).unwrap();
    p.free_evictable(b).unwrap();
}

#[test]
fn a_request_over_its_own_limit_and_the_capacity_flushes_other_owners_caches_too() {
    // The whole capacity is mapped at once, so growth never flushes the caches.
    let p = pool(PoolConfig::default().capacity(8 * MIB).min_grow(8 * MIB));
    let c = p.add_owner(OwnerSpec::new("c", 8 * MIB)).unwrap();
    let a = p.add_owner(OwnerSpec::new("a", 4 * MIB)).unwrap();
    let cache = |o: OwnerId, n: usize| {
        let v: Vec<_> = (0..n).map(|_| p.alloc(o, 64 << 10, S1).unwrap()).collect();
        for b in v {
            p.free(b).unwrap();
        }
    };
    cache(c, 96); // 6 MiB cached by c
    cache(a, 16); // 1 MiB cached by a
    assert_eq!(p.stats().cached_bytes, 7 * MIB);
    // 1 + 3.5 MiB exceed a's limit: its own cache goes first. Then 6 + 3.5 MiB exceed the
    // capacity: c's cache must go too.
    let b = p.alloc(a, 3584 << 10, S1).unwrap();
    assert_eq!(p.stats().cached_bytes, 0);
    p.free(b).unwrap();
}

#[test]
fn a_tiers_blocks_go_in_least_recently_used_order_across_its_owners() {
    let (p, rec) = evicting_pool(8 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let a = p.add_owner(OwnerSpec::new("a", 8 * MIB)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 8 * MIB)).unwrap();
    // Unpinned in the order a0, b1, a2, b3, then a0 touched: b1 a2 b3 a0.
    let ids: Vec<_> = [(a, 0), (b, 1), (a, 2), (b, 3)]
        .into_iter()
        .map(|(o, tag)| p.alloc_evictable(o, 2 * MIB, tag, S1).unwrap().0)
        .collect();
    for id in &ids {
        p.unpin(id).unwrap();
    }
    p.pin(&ids[0], S1).unwrap();
    p.unpin(&ids[0]).unwrap();
    let taken: Vec<_> = (0..4).map(|_| p.alloc(g, 2 * MIB, S1).unwrap()).collect();
    let order = rec_tags(&rec);
    assert_eq!(order, [1, 2, 3, 0]);
    for x in taken {
        p.free(x).unwrap();
    }
    for id in ids {
        p.free_evictable(id).unwrap();
    }
}

#[test]
fn a_block_touched_again_goes_behind_other_owners_blocks_touched_since() {
    let (p, rec) = evicting_pool(8 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let a = p.add_owner(OwnerSpec::new("a", 8 * MIB)).unwrap();
    let b = p.add_owner(OwnerSpec::new("b", 8 * MIB)).unwrap();
    let a0 = p.alloc_evictable(a, 2 * MIB, 0, S1).unwrap().0;
    let b1 = p.alloc_evictable(b, 2 * MIB, 1, S1).unwrap().0;
    p.unpin(&a0).unwrap();
    p.unpin(&b1).unwrap();
    // a0 is still the last of its owner's list, but b1 was unpinned after it: touched
    // again, a0 becomes the most recent of the tier.
    p.pin(&a0, S1).unwrap();
    p.unpin(&a0).unwrap();
    let taken: Vec<_> = (0..4).map(|_| p.alloc(g, 2 * MIB, S1).unwrap()).collect();
    let order = rec_tags(&rec);
    assert_eq!(order, [1, 0]);
    for x in taken {
        p.free(x).unwrap();
    }
    p.free_evictable(a0).unwrap();
    p.free_evictable(b1).unwrap();
}

#[test]
fn a_burstable_owner_at_its_base_is_passed_over_for_another_above_it() {
    let (p, rec) = evicting_pool(8 * MIB);
    let g = p
        .add_owner(OwnerSpec::new("g", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();
    let at = p
        .add_owner(
            OwnerSpec::new("at", 8 * MIB)
                .tier(Tier::Burstable)
                .base(4 * MIB),
        )
        .unwrap();
    let above = p
        .add_owner(
            OwnerSpec::new("above", 8 * MIB)
                .tier(Tier::Burstable)
                .base(0),
        )
        .unwrap();
    // The owner at its base was unpinned first (least recently used), the other after.
    let mut ids = vec![];
    for (o, tag) in [(at, 0), (at, 1), (above, 2)] {
        ids.push(p.alloc_evictable(o, 2 * MIB, tag, S1).unwrap().0);
    }
    for id in &ids {
        p.unpin(id).unwrap();
    }
    let x = p.alloc(g, 4 * MIB, S1).unwrap();
    let order = rec_tags(&rec);
    assert_eq!(order, [2], "the owner at its base keeps its blocks");
    p.free(x).unwrap();
    for id in ids {
        p.free_evictable(id).unwrap();
    }
}

#[test]
fn blocks_of_most_of_a_chunk_in_a_row_map_little_more_than_they_use() {
    // A fresh 2 MiB chunk that a block is cut from keeps its free part at the end of the
    // range, where the next growth extends it: a hundred blocks of 1 MiB + 8 KiB once
    // mapped a chunk each (1.98 times their size).
    for size in [MIB + 8 * 1024, 1536 * 1024, 600 * 1024, 300 * 1024] {
        let p = pool(PoolConfig::default());
        let o = p.add_owner(OwnerSpec::new("a", 1 << 40)).unwrap();
        let blocks: Vec<_> = (0..100).map(|_| p.alloc(o, size, S1).unwrap()).collect();
        let st = p.stats();
        let ratio = st.mapped_bytes as f64 / st.live_bytes as f64;
        assert!(
            ratio <= 1.03,
            "{size} B blocks: {ratio:.3} mapped per byte live"
        );
        for b in blocks {
            p.free(b).unwrap();
        }
    }
}

/// Refuses to evict the block tagged 1. The block tagged 2 moves out in two halves; in
/// between, with the pool's lock free, the block tagged 1 is freed and a new block
/// (tagged 3) takes its slot, unpinned.
struct SlotReuser {
    pool: std::sync::OnceLock<std::sync::Weak<Pool<HostSource>>>,
    refused: std::sync::Mutex<Option<gpushare_pool::EvictableId>>,
    owner: std::sync::OnceLock<OwnerId>,
    made: Arc<std::sync::Mutex<Vec<gpushare_pool::EvictableId>>>,
}

impl Evictor for SlotReuser {
    fn evict(&self, v: &VictimInfo) -> Result<Eviction, EvictError> {
        match v.tag {
            1 => Err(EvictError("refused".into())),
            2 => {
                let pool = self.pool.get().and_then(|w| w.upgrade()).unwrap();
                let refused = self.refused.lock().unwrap().take().unwrap();
                let owner = *self.owner.get().unwrap();
                let made = self.made.clone();
                Ok(Eviction::in_flight(move || {
                    pool.free_evictable(refused).unwrap();
                    let (z, _) = pool.alloc_evictable(owner, 2 * MIB, 3, S1).unwrap();
                    pool.unpin(&z).unwrap();
                    made.lock().unwrap().push(z);
                    Ok(())
                }))
            }
            _ => Ok(Eviction::done()),
        }
    }
    fn restore(&self, _: &RestoreInfo) -> Result<(), EvictError> {
        Ok(())
    }
}

#[test]
fn a_refused_victims_slot_serves_a_block_that_may_go() {
    let p = Arc::new(pool(PoolConfig::default().capacity(4 * MIB)));
    let ev = Arc::new(SlotReuser {
        pool: Default::default(),
        refused: Default::default(),
        owner: Default::default(),
        made: Default::default(),
    });
    ev.pool.set(Arc::downgrade(&p)).unwrap();
    p.set_evictor(ev.clone());
    let e = p
        .add_owner(OwnerSpec::new("e", 4 * MIB).tier(Tier::BestEffort))
        .unwrap();
    ev.owner.set(e).unwrap();
    let g = p
        .add_owner(
            OwnerSpec::new("g", 4 * MIB)
                .base(4 * MIB)
                .tier(Tier::Guaranteed),
        )
        .unwrap();
    let (x, _) = p.alloc_evictable(e, 2 * MIB, 1, S1).unwrap();
    let (y, _) = p.alloc_evictable(e, 2 * MIB, 2, S1).unwrap();
    p.unpin(&x).unwrap();
    p.unpin(&y).unwrap();
    *ev.refused.lock().unwrap() = Some(x);
    // `g` needs all 4 MiB: `x` refuses to go, `y` goes, and meanwhile the new block takes
    // `x`'s slot and memory. It is no block the request was refused, and it goes too.
    let blk = p.alloc(g, 4 * MIB, S2);
    assert!(blk.is_ok(), "{blk:?}");
    p.free(blk.unwrap()).unwrap();
    let z = ev.made.lock().unwrap().pop().unwrap();
    assert!(!p.is_resident(&z).unwrap());
    for id in [y, z] {
        p.free_evictable(id).unwrap();
    }
}
