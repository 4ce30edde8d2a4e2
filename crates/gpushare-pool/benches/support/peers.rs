//! Allocators under test and the traces that drive them, shared by the criterion bench and
//! the `pool_bench` example. Every allocator runs the same pre-generated traces.
#![allow(dead_code, clippy::new_without_default)]

use gpushare_pool::{
    Block, ChunkSource, HostSource, LocalCache, OwnerId, OwnerSpec, Pool, PoolConfig, StreamId,
};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
const UNIT: u64 = 256;

/// A single-threaded view of an allocator.
pub trait Alloc {
    type H;
    fn name(&self) -> &'static str;
    fn alloc(&mut self, size: u64) -> Option<Self::H>;
    fn free(&mut self, h: Self::H);
    /// Bytes the allocator needed from its backing memory at its peak: mapped bytes for
    /// the pool, the highest end offset ever handed out for fixed-range allocators.
    fn peak_footprint(&self) -> u64;
}

/// gpushare's pool over host memory, one owner, one stream.
pub struct Gpushare {
    pub pool: Pool<HostSource>,
    pub owner: OwnerId,
}

impl Gpushare {
    pub fn new() -> Self {
        Self::with(PoolConfig::default())
    }
    pub fn with(cfg: PoolConfig) -> Self {
        let pool = Pool::new(HostSource::new(2 * MIB, 1 << 42), cfg).expect("pool");
        let owner = pool
            .add_owner(OwnerSpec::new("bench", 1 << 42))
            .expect("owner");
        Gpushare { pool, owner }
    }
}

impl Alloc for Gpushare {
    type H = Block;
    fn name(&self) -> &'static str {
        "gpushare pool"
    }
    #[inline]
    fn alloc(&mut self, size: u64) -> Option<Block> {
        self.pool.alloc(self.owner, size, StreamId(0)).ok()
    }
    #[inline]
    fn free(&mut self, h: Block) {
        let _ = self.pool.free(h);
    }
    fn peak_footprint(&self) -> u64 {
        self.pool.stats().peak_mapped_bytes
    }
}

/// gpushare's pool through one thread's [`LocalCache`] (no lock, no atomic read-modify-write
/// on a hit), over any chunk source.
pub struct Local<'p, S: ChunkSource>(pub LocalCache<'p, S>);

impl<S: ChunkSource> Alloc for Local<'_, S> {
    type H = Block;
    fn name(&self) -> &'static str {
        "gpushare local cache"
    }
    #[inline]
    fn alloc(&mut self, size: u64) -> Option<Block> {
        self.0.alloc(size, StreamId(0)).ok()
    }
    #[inline]
    fn free(&mut self, h: Block) {
        let _ = self.0.free(h);
    }
    fn peak_footprint(&self) -> u64 {
        self.0.pool().stats().peak_mapped_bytes
    }
}

/// The `offset-allocator` crate, in 256-byte units (so up to 1 TiB fits its u32 offsets).
pub struct OffsetAlloc {
    a: offset_allocator::Allocator,
    high: u64,
}

impl OffsetAlloc {
    pub fn new() -> Self {
        OffsetAlloc {
            a: offset_allocator::Allocator::with_max_allocs(u32::MAX - 1, 1 << 20),
            high: 0,
        }
    }
}

impl Alloc for OffsetAlloc {
    type H = offset_allocator::Allocation;
    fn name(&self) -> &'static str {
        "offset-allocator"
    }
    #[inline]
    fn alloc(&mut self, size: u64) -> Option<Self::H> {
        let units = size.div_ceil(UNIT) as u32;
        let a = self.a.allocate(units)?;
        let end = (u64::from(a.offset) + u64::from(units)) * UNIT;
        if end > self.high {
            self.high = end;
        }
        Some(a)
    }
    #[inline]
    fn free(&mut self, h: Self::H) {
        self.a.free(h);
    }
    fn peak_footprint(&self) -> u64 {
        self.high
    }
}

/// A peer behind a mutex, locked once per call, as an allocator shared between threads
/// must be: the like-for-like comparison for the pool, which is `Send + Sync`.
pub struct Locked<A>(pub Mutex<A>, &'static str);

impl<A> Locked<A> {
    pub fn new(a: A, name: &'static str) -> Self {
        Locked(Mutex::new(a), name)
    }
}

impl<A: Alloc> Alloc for Locked<A> {
    type H = A::H;
    fn name(&self) -> &'static str {
        self.1
    }
    #[inline]
    fn alloc(&mut self, size: u64) -> Option<Self::H> {
        // Through a shared reference, as other threads would.
        let m: &Mutex<A> = std::hint::black_box(&self.0);
        m.lock().alloc(size)
    }
    #[inline]
    fn free(&mut self, h: Self::H) {
        let m: &Mutex<A> = std::hint::black_box(&self.0);
        m.lock().free(h);
    }
    fn peak_footprint(&self) -> u64 {
        self.0.lock().peak_footprint()
    }
}

/// A peer whose handle is padded to the 32 bytes of the pool's [`Block`] (which carries the
/// offset, size, node, owner and pool that a checked free needs), the padding written on
/// allocation and read on free as a handle's fields would be: it shows what a trace's
/// handle table and moves cost apart from the allocator's own work.
pub struct Wide<A>(pub A);

impl<A: Alloc> Alloc for Wide<A> {
    type H = (A::H, [u64; 3]);
    fn name(&self) -> &'static str {
        "offset-allocator, 32-byte handle"
    }
    #[inline]
    fn alloc(&mut self, size: u64) -> Option<Self::H> {
        let h = self.0.alloc(size)?;
        Some((h, [size, size ^ 1, size ^ 2]))
    }
    #[inline]
    fn free(&mut self, (h, pad): Self::H) {
        std::hint::black_box(pad);
        self.0.free(h);
    }
    fn peak_footprint(&self) -> u64 {
        self.0.peak_footprint()
    }
}

/// A plain best-fit allocator: free blocks in ordered sets, coalescing, behind a mutex.
pub struct BestFit {
    inner: Mutex<BestFitInner>,
}

struct BestFitInner {
    by_size: BTreeSet<(u64, u64)>,
    by_off: BTreeMap<u64, u64>,
    high: u64,
}

impl BestFit {
    pub fn new() -> Self {
        let cap = 1u64 << 42;
        let mut by_size = BTreeSet::new();
        by_size.insert((cap, 0));
        let mut by_off = BTreeMap::new();
        by_off.insert(0, cap);
        BestFit {
            inner: Mutex::new(BestFitInner {
                by_size,
                by_off,
                high: 0,
            }),
        }
    }

    pub fn alloc_shared(&self, size: u64) -> Option<(u64, u64)> {
        let size = size.div_ceil(UNIT) * UNIT;
        let mut g = self.inner.lock();
        let &(s, o) = g.by_size.range((size, 0)..).next()?;
        g.by_size.remove(&(s, o));
        g.by_off.remove(&o);
        if s > size {
            g.by_size.insert((s - size, o + size));
            g.by_off.insert(o + size, s - size);
        }
        g.high = g.high.max(o + size);
        Some((o, size))
    }

    pub fn free_shared(&self, (mut o, mut s): (u64, u64)) {
        let mut g = self.inner.lock();
        if let Some(&ns) = g.by_off.get(&(o + s)) {
            g.by_off.remove(&(o + s));
            g.by_size.remove(&(ns, o + s));
            s += ns;
        }
        if let Some((&po, &ps)) = g.by_off.range(..o).next_back() {
            if po + ps == o {
                g.by_off.remove(&po);
                g.by_size.remove(&(ps, po));
                o = po;
                s += ps;
            }
        }
        g.by_off.insert(o, s);
        g.by_size.insert((s, o));
    }
}

impl Alloc for BestFit {
    type H = (u64, u64);
    fn name(&self) -> &'static str {
        "mutex best-fit"
    }
    #[inline]
    fn alloc(&mut self, size: u64) -> Option<(u64, u64)> {
        self.alloc_shared(size)
    }
    #[inline]
    fn free(&mut self, h: (u64, u64)) {
        self.free_shared(h)
    }
    fn peak_footprint(&self) -> u64 {
        self.inner.lock().high
    }
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Log-uniform in lo..hi.
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        let x = a + (b - a) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (x.exp() as u64).clamp(lo, hi)
    }
    /// The churn mix: mostly small, some medium, a few large, 256 B to 64 MiB.
    pub fn mixed_size(&mut self) -> u64 {
        match self.below(1000) {
            0..=949 => self.log_uniform(256, 64 * KIB),
            950..=994 => self.log_uniform(64 * KIB, 4 * MIB),
            _ => self.log_uniform(4 * MIB, 64 * MIB),
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median ns of one allocate+free pair of `size`, over `batches` batches of `per` pairs.
pub fn hot_pair<A: Alloc>(a: &mut A, size: u64, batches: usize, per: usize) -> f64 {
    // Warm up: the first pair may map memory.
    for _ in 0..100 {
        let h = a.alloc(size).expect("alloc");
        a.free(h);
    }
    let mut v = Vec::with_capacity(batches);
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..per {
            let h = a.alloc(std::hint::black_box(size)).expect("alloc");
            a.free(std::hint::black_box(h));
        }
        v.push(t.elapsed().as_nanos() as f64 / per as f64);
    }
    median(v)
}

/// A pre-generated churn trace: `live` blocks, then `pairs` steps that each allocate a block
/// of a new random size in place of a random live block, then free that block.
pub struct Churn {
    pub live: usize,
    pub fill: Vec<u64>,
    pub victims: Vec<usize>,
    pub sizes: Vec<u64>,
}

impl Churn {
    pub fn new(live: usize, pairs: usize, seed: u64) -> Self {
        let mut r = Rng::new(seed);
        Churn {
            live,
            fill: (0..live).map(|_| r.mixed_size()).collect(),
            victims: (0..pairs).map(|_| r.below(live as u64) as usize).collect(),
            sizes: (0..pairs).map(|_| r.mixed_size()).collect(),
        }
    }

    /// Median ns per alloc+free pair over batches of `per` pairs, and peak footprint ÷ peak
    /// live bytes. The new block and the one it replaces are both live for a moment, and
    /// that moment counts towards the peak (each step's, not only each batch's).
    pub fn run<A: Alloc>(&self, a: &mut A, per: usize) -> (f64, f64) {
        let mut live: Vec<(A::H, u64)> = Vec::with_capacity(self.live);
        let mut bytes = 0u64;
        let mut peak = 0u64;
        for &s in &self.fill {
            live.push((a.alloc(s).expect("fill"), s));
            bytes += s;
        }
        peak = peak.max(bytes);
        let mut v = Vec::new();
        for (vi, si) in self.victims.chunks(per).zip(self.sizes.chunks(per)) {
            let t = Instant::now();
            for (&i, &s) in vi.iter().zip(si) {
                let (h, old) = std::mem::replace(&mut live[i], (a.alloc(s).expect("churn"), s));
                peak = peak.max(bytes + s);
                a.free(h);
                bytes = bytes - old + s;
            }
            v.push(t.elapsed().as_nanos() as f64 / vi.len() as f64);
        }
        for (h, _) in live {
            a.free(h);
        }
        (median(v), a.peak_footprint() as f64 / peak as f64)
    }
}

/// One step of the model-serving replay.
#[derive(Clone, Copy, Debug)]
pub enum Ev {
    Alloc { id: u32, size: u64 },
    Free { id: u32 },
}

/// A model-serving replay: three models' weights allocated once; requests that allocate
/// activations at the start, grow a KV cache one block per generated token batch, use
/// per-step scratch, and free everything at the end.
pub fn serving_trace(requests: usize, slots: usize, seed: u64) -> (Vec<Ev>, usize) {
    let mut r = Rng::new(seed);
    let mut ev = Vec::new();
    let mut next = 0u32;
    let mut id = || {
        next += 1;
        next - 1
    };
    // Weights: 3 models x 24 tensors of 4..64 MiB.
    for _ in 0..3 {
        for _ in 0..24 {
            let size = r.log_uniform(4 * MIB, 64 * MIB);
            ev.push(Ev::Alloc { id: id(), size });
        }
    }
    struct Req {
        left: u32,
        model: usize,
        held: Vec<u32>,
    }
    let kv_block = [2 * MIB, 512 * KIB, MIB];
    let mut active: Vec<Req> = Vec::new();
    let mut started = 0;
    while started < requests || !active.is_empty() {
        while active.len() < slots && started < requests {
            started += 1;
            let model = r.below(3) as usize;
            let mut held = vec![];
            for _ in 0..4 {
                let i = id();
                ev.push(Ev::Alloc {
                    id: i,
                    size: r.log_uniform(MIB, 32 * MIB),
                });
                held.push(i);
            }
            active.push(Req {
                left: 8 + r.below(248) as u32,
                model,
                held,
            });
        }
        let mut k = 0;
        while k < active.len() {
            let req = &mut active[k];
            let i = id();
            ev.push(Ev::Alloc {
                id: i,
                size: kv_block[req.model],
            });
            req.held.push(i);
            let scratch = id();
            ev.push(Ev::Alloc {
                id: scratch,
                size: r.log_uniform(256 * KIB, 8 * MIB),
            });
            ev.push(Ev::Free { id: scratch });
            req.left -= 1;
            if req.left == 0 {
                for &h in &req.held {
                    ev.push(Ev::Free { id: h });
                }
                active.swap_remove(k);
            } else {
                k += 1;
            }
        }
    }
    (ev, next as usize)
}

/// Run the replay: (median ns per event over batches, peak footprint ÷ peak live).
pub fn replay<A: Alloc>(a: &mut A, trace: &[Ev], ids: usize) -> (f64, f64) {
    let mut slots: Vec<Option<(A::H, u64)>> = (0..ids).map(|_| None).collect();
    let (mut bytes, mut peak) = (0u64, 0u64);
    let mut v = Vec::new();
    for batch in trace.chunks(1000) {
        let t = Instant::now();
        for e in batch {
            match *e {
                Ev::Alloc { id, size } => {
                    slots[id as usize] = Some((a.alloc(size).expect("replay alloc"), size));
                    bytes += size;
                    peak = peak.max(bytes);
                }
                Ev::Free { id } => {
                    if let Some((h, s)) = slots[id as usize].take() {
                        a.free(h);
                        bytes -= s;
                    }
                }
            }
        }
        v.push(t.elapsed().as_nanos() as f64 / batch.len() as f64);
    }
    for (h, _) in slots.into_iter().flatten() {
        a.free(h);
    }
    (median(v), a.peak_footprint() as f64 / peak as f64)
}

/// Thread scaling: `threads` threads each doing `iters` hot pairs of `size`; returns the
/// median over `rounds` of the aggregate ns per pair (wall time ÷ total pairs).
pub fn scaling<F>(threads: usize, iters: usize, rounds: usize, work: F) -> f64
where
    F: Fn(usize, usize) + Sync,
{
    let mut v = vec![];
    for _ in 0..rounds {
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 0..threads {
                let work = &work;
                s.spawn(move || work(i, iters));
            }
        });
        let el: Duration = t.elapsed();
        v.push(el.as_nanos() as f64 / (threads * iters) as f64);
    }
    median(v)
}
