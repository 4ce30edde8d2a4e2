//! The simulated device: a complete backend in host memory.
//!
//! - Device memory is host memory: chunks hold real bytes, mappings place them at addresses
//!   inside reserved ranges, and copies resolve addresses the way a GPU's MMU would, failing
//!   on unmapped bytes.
//! - Each stream is a worker thread that runs its work in submission order. Events are
//!   generation counters ([`Completion`]) completed in stream order; a cross-stream wait
//!   really blocks the waiting stream's worker, never the host.
//! - Faults are injected deterministically: [`SimDevice::fail_nth`] makes the Nth next
//!   operation of a kind fail, and [`SimDevice::report_oom`] makes allocations report
//!   out-of-memory.
//! - [`SimDevice::live`] counts every live resource, so tests can show that nothing leaks.

mod completion;

pub use completion::Completion;

use crate::error::{check_granular, check_range, DeviceError, FaultOp, Result};
use crate::handles::{
    ChunkInner, EventInner, LinearInner, MappingInner, PartitionInner, PinnedInner, StreamInner,
    VaInner,
};
use crate::sync::{lock, wait, Condvar, Mutex};
use crate::{
    check_lengths, check_owner, Backend, Device, DeviceId, DeviceInfo, DeviceRange, Event,
    EventFlags, HostFn, LinearAlloc, Mapping, MemInfo, PhysChunk, PinnedBuffer, PinnedSlice,
    PriorityRange, SmPartition, SmSplit, Stream, VaRange,
};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

/// Where simulated virtual addresses start (a canonical user-space address, far from zero
/// so that a null or small pointer is never valid).
const VA_START: u64 = 0x7f00_0000_0000;

/// Configuration of a [`SimDevice`].
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Device name.
    pub name: String,
    /// Capacity in bytes; chunk creation beyond it reports out of memory.
    pub total_memory: u64,
    /// Number of SMs.
    pub sm_count: u32,
    /// Chunk granularity in bytes (a power of two).
    pub granularity: u64,
    /// Stream priority range.
    pub priority_range: PriorityRange,
    /// Whether VMM is offered; when false, only [`Device::alloc_linear`] allocates.
    pub vmm: bool,
    /// Whether SM partitions are offered.
    pub green_contexts: bool,
    /// Smallest SM partition.
    pub sm_min_partition: u32,
    /// SM partitions are multiples of this.
    pub sm_granularity: u32,
}

impl Default for SimConfig {
    /// Shaped like an H100: 132 SMs, 2 MiB granularity, priorities -5..=0, partitions in
    /// groups of 8 SMs, and 8 GiB of capacity (the bytes are allocated lazily).
    fn default() -> Self {
        SimConfig {
            name: "gpushare simulated device".into(),
            total_memory: 8 << 30,
            sm_count: 132,
            granularity: 2 << 20,
            priority_range: PriorityRange {
                greatest: -5,
                least: 0,
            },
            vmm: true,
            green_contexts: true,
            sm_min_partition: 8,
            sm_granularity: 8,
        }
    }
}

impl SimConfig {
    /// Set the capacity in bytes.
    pub fn total_memory(mut self, bytes: u64) -> Self {
        self.total_memory = bytes;
        self
    }
    /// Set the SM count.
    pub fn sm_count(mut self, n: u32) -> Self {
        self.sm_count = n;
        self
    }
    /// Set the chunk granularity (a power of two).
    pub fn granularity(mut self, bytes: u64) -> Self {
        self.granularity = bytes;
        self
    }
    /// Offer VMM or not.
    pub fn vmm(mut self, on: bool) -> Self {
        self.vmm = on;
        self
    }
    /// Offer SM partitions or not.
    pub fn green_contexts(mut self, on: bool) -> Self {
        self.green_contexts = on;
        self
    }
}

/// Counts of live resources of a [`SimDevice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveResources {
    /// Reserved VA ranges.
    pub va_ranges: i64,
    /// Physical chunks (including those kept alive only by a mapping).
    pub chunks: i64,
    /// Mappings and linear allocations.
    pub mappings: i64,
    /// Streams.
    pub streams: i64,
    /// Events.
    pub events: i64,
    /// Pinned host buffers.
    pub pinned: i64,
    /// Bytes of device memory in use.
    pub device_bytes: u64,
}

impl LiveResources {
    /// Whether nothing at all is live.
    pub fn is_empty(&self) -> bool {
        *self == LiveResources::default()
    }
}

#[derive(Debug, Default)]
struct Accounts {
    used: AtomicU64,
    va_ranges: AtomicI64,
    chunks: AtomicI64,
    mappings: AtomicI64,
    streams: AtomicI64,
    events: AtomicI64,
    /// Events made since the device was opened, live or not.
    events_made: AtomicU64,
    pinned: AtomicI64,
}

fn inc(c: &AtomicI64) {
    c.fetch_add(1, Ordering::Relaxed);
}
fn dec(c: &AtomicI64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct Faults {
    counts: [u64; 5],
    /// (absolute count that fails, the n the user gave)
    pending: Vec<(FaultOp, u64, u64)>,
    oom: bool,
    /// Pinned copies queued so far, and the counts of those that fault as they run.
    pinned_copies: u64,
    faulting_copies: Vec<u64>,
}

fn op_index(op: FaultOp) -> usize {
    match op {
        FaultOp::ChunkCreate => 0,
        FaultOp::Map => 1,
        FaultOp::Copy => 2,
        FaultOp::StreamOp => 3,
        FaultOp::PinnedAlloc => 4,
    }
}

/// Bytes of one chunk or linear allocation. Counted against capacity while alive.
#[derive(Debug)]
struct ChunkMem {
    data: Mutex<Box<[u8]>>,
    acc: Arc<Accounts>,
}

impl ChunkMem {
    /// `size` bytes, already charged; `OutOfMemory` (the charge given back) if the host
    /// cannot hold them.
    fn new(size: u64, acc: &Arc<Accounts>) -> Result<Arc<Self>> {
        let Some(data) = zeroed(size) else {
            acc.used.fetch_sub(size, Ordering::Relaxed);
            return Err(DeviceError::OutOfMemory {
                requested: size,
                free: 0,
            });
        };
        inc(&acc.chunks);
        Ok(Arc::new(ChunkMem {
            data: Mutex::new(data),
            acc: acc.clone(),
        }))
    }
}

/// `len` zeroed host bytes, or `None` if the host cannot provide them. The pages come
/// zeroed from the allocator and are touched only when used, as with `vec![0; len]`, but
/// a request the host cannot serve (a simulated device larger than the host, a pinned
/// buffer of terabytes) is an error here, where `vec!` would abort the process.
fn zeroed(len: u64) -> Option<Box<[u8]>> {
    let len = usize::try_from(len).ok()?;
    if len == 0 {
        return Some(Box::default());
    }
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    // SAFETY: the layout's size is not zero (`len > 0`).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` holds `len` zeroed bytes (valid `u8`s) from the global allocator with
    // the layout of `[u8; len]`, owned by nothing else; the box frees it with that layout.
    Some(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) })
}

impl Drop for ChunkMem {
    fn drop(&mut self) {
        let len = lock(&self.data).len() as u64;
        self.acc.used.fetch_sub(len, Ordering::Relaxed);
        dec(&self.acc.chunks);
    }
}

#[derive(Debug)]
struct Region {
    size: u64,
    mem: Arc<ChunkMem>,
}

/// One piece of a resolved device range.
struct Seg {
    mem: Arc<ChunkMem>,
    /// Where its region was mapped when the work was queued.
    base: u64,
    off: usize,
    len: usize,
}

#[derive(Debug)]
struct Shared {
    id: DeviceId,
    config: SimConfig,
    acc: Arc<Accounts>,
    regions: parking_lot::RwLock<BTreeMap<u64, Region>>,
    reservations: Mutex<BTreeMap<u64, u64>>,
    next_va: Mutex<u64>,
    faults: Mutex<Faults>,
    /// The last SM partition's context number (see `SimStream::ctx`).
    partitions_made: AtomicU64,
}

impl Shared {
    fn tick(&self, op: FaultOp) -> Result<()> {
        let mut f = lock(&self.faults);
        let i = op_index(op);
        f.counts[i] += 1;
        let now = f.counts[i];
        if let Some(pos) = f
            .pending
            .iter()
            .position(|&(o, at, _)| o == op && at == now)
        {
            let (_, _, nth) = f.pending.swap_remove(pos);
            return Err(DeviceError::InjectedFault { op, nth });
        }
        Ok(())
    }

    fn charge(&self, size: u64) -> Result<()> {
        let total = self.config.total_memory;
        if lock(&self.faults).oom {
            let used = self.acc.used.load(Ordering::Relaxed);
            return Err(DeviceError::OutOfMemory {
                requested: size,
                free: total.saturating_sub(used),
            });
        }
        self.acc
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(size).filter(|&n| n <= total)
            })
            .map(|_| ())
            .map_err(|used| DeviceError::OutOfMemory {
                requested: size,
                free: total.saturating_sub(used),
            })
    }

    fn alloc_va(&self, size: u64) -> Result<u64> {
        let mut next = lock(&self.next_va);
        let base = *next;
        // Addresses are never reused, so a stale pointer into a freed range always faults.
        // A guard gap of one granule separates ranges.
        *next = base
            .checked_add(size)
            .and_then(|e| e.checked_add(self.config.granularity))
            .ok_or(DeviceError::Unsupported {
                what: "another simulated address range",
                reason: "the simulated device never reuses addresses, and this SimDevice has used up its 64-bit address space; create a new SimDevice".into(),
            })?;
        Ok(base)
    }

    /// Resolve a device range into the chunk pieces that back it.
    fn resolve(&self, r: DeviceRange) -> Result<Vec<Seg>> {
        let bad = || DeviceError::InvalidAddress {
            addr: r.ptr.0,
            len: r.len,
        };
        let end = r.ptr.0.checked_add(r.len).ok_or_else(bad)?;
        let regions = self.regions.read();
        let mut segs = Vec::new();
        let mut cur = r.ptr.0;
        while cur < end {
            let (&base, reg) = regions.range(..=cur).next_back().ok_or_else(bad)?;
            if cur >= base + reg.size {
                return Err(bad());
            }
            let off = cur - base;
            let len = (base + reg.size - cur).min(end - cur);
            segs.push(Seg {
                mem: reg.mem.clone(),
                base,
                off: off as usize,
                len: len as usize,
            });
            cur += len;
        }
        Ok(segs)
    }

    /// Check, when queued work runs, that the memory it was queued on is still mapped
    /// where it was. If it is not, the work fails the way a GPU fault does: the message is
    /// the stream's sticky error. On a GPU, unmapping memory that queued work still uses is
    /// an illegal-address fault; without this check the simulator would quietly use the
    /// orphaned chunk and hide such a bug in the layers above.
    fn still_mapped(&self, segs: &[Seg]) -> std::result::Result<(), String> {
        let regions = self.regions.read();
        match segs.iter().find(|s| {
            !regions
                .get(&s.base)
                .is_some_and(|r| Arc::ptr_eq(&r.mem, &s.mem))
        }) {
            None => Ok(()),
            Some(s) => Err(format!(
                "illegal address: work queued on {:#x} ran after that memory was unmapped",
                s.base + s.off as u64
            )),
        }
    }
}

/// The error of an event's generation `g` whose stream had faulted before it completed.
fn failed(done: &Completion, g: u64) -> Result<()> {
    match done.failure(g) {
        Some(why) => Err(DeviceError::StreamBroken(format!(
            "the work recorded before this event did not all run: {why}"
        ))),
        None => Ok(()),
    }
}

fn read_segs(segs: &[Seg], dst: &mut [u8]) {
    let mut at = 0;
    for s in segs {
        let data = lock(&s.mem.data);
        dst[at..at + s.len].copy_from_slice(&data[s.off..s.off + s.len]);
        at += s.len;
    }
}

fn write_segs(segs: &[Seg], src: &[u8]) {
    let mut at = 0;
    for s in segs {
        let mut data = lock(&s.mem.data);
        data[s.off..s.off + s.len].copy_from_slice(&src[at..at + s.len]);
        at += s.len;
    }
}

/// Device memory as seen by a host kernel ([`SimDevice::launch_host`]).
pub struct SimMemory<'a> {
    shared: &'a Shared,
}

impl SimMemory<'_> {
    /// Read device bytes into `dst`; lengths must match.
    pub fn read(&self, src: DeviceRange, dst: &mut [u8]) -> Result<()> {
        check_lengths(src.len, dst.len() as u64)?;
        let segs = self.shared.resolve(src)?;
        read_segs(&segs, dst);
        Ok(())
    }
    /// Write `src` to device bytes; lengths must match.
    pub fn write(&self, dst: DeviceRange, src: &[u8]) -> Result<()> {
        check_lengths(src.len() as u64, dst.len)?;
        let segs = self.shared.resolve(dst)?;
        write_segs(&segs, src);
        Ok(())
    }
}

/// A reserved simulated VA range.
#[derive(Debug)]
pub(crate) struct SimVa {
    shared: Arc<Shared>,
    base: u64,
}

impl Drop for SimVa {
    fn drop(&mut self) {
        lock(&self.shared.reservations).remove(&self.base);
        dec(&self.shared.acc.va_ranges);
    }
}

/// A simulated physical chunk.
#[derive(Debug)]
pub(crate) struct SimChunk {
    mem: Arc<ChunkMem>,
}

/// A simulated mapping (or linear allocation): removes its region when dropped.
#[derive(Debug)]
pub(crate) struct SimMapping {
    shared: Arc<Shared>,
    addr: u64,
    _va: Option<Arc<VaInner>>,
}

impl SimMapping {
    pub(crate) fn unmap(self) -> Result<()> {
        drop(self);
        Ok(())
    }
}

impl Drop for SimMapping {
    fn drop(&mut self) {
        self.shared.regions.write().remove(&self.addr);
        dec(&self.shared.acc.mappings);
    }
}

type Op = Box<dyn FnOnce() + Send + 'static>;

/// A simulated stream: a worker thread running its work in order.
pub(crate) struct SimStream {
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    worker_id: ThreadId,
    error: Arc<Mutex<Option<String>>>,
    /// The context the stream belongs to: 0 for the device's, else its SM partition's
    /// (events recorded in different contexts cannot be timed against each other).
    ctx: u64,
    acc: Arc<Accounts>,
}

impl std::fmt::Debug for SimStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimStream")
            .field("worker", &self.worker_id)
            .finish()
    }
}

impl SimStream {
    fn spawn(acc: &Arc<Accounts>, priority: i32, ctx: u64) -> Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Op>();
        let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let err = error.clone();
        let handle = std::thread::Builder::new()
            .name(format!("gpushare-sim-stream(p{priority})"))
            .spawn(move || {
                for op in rx {
                    if let Err(p) = catch_unwind(AssertUnwindSafe(op)) {
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "host work panicked".into());
                        lock(&err).get_or_insert(msg);
                    }
                }
            })
            .map_err(|e| DeviceError::StreamBroken(format!("cannot start a worker thread: {e}")))?;
        inc(&acc.streams);
        Ok(Arc::new(SimStream {
            tx: Mutex::new(Some(tx)),
            worker_id: handle.thread().id(),
            worker: Mutex::new(Some(handle)),
            error,
            ctx,
            acc: acc.clone(),
        }))
    }

    fn check(&self) -> Result<()> {
        match &*lock(&self.error) {
            Some(e) => Err(DeviceError::StreamBroken(e.clone())),
            None => Ok(()),
        }
    }

    fn submit(&self, op: Op) -> Result<()> {
        self.check()?;
        let tx = lock(&self.tx);
        match tx.as_ref() {
            Some(tx) => tx
                .send(op)
                .map_err(|_| DeviceError::StreamBroken("its worker thread has stopped".into())),
            None => Err(DeviceError::StreamBroken("it was destroyed".into())),
        }
    }

    /// Queue work that touches memory. Once the stream has faulted, queued work no longer
    /// runs, as on a GPU, where a fault is sticky: it would run on results that were never
    /// produced. Completions, waits and host callbacks still run, so nothing waits forever.
    /// The fault stays with its stream: events recorded behind it still complete (and
    /// report the fault to the host's questions) and streams that wait on them carry on. On a GPU the whole context would be lost; the
    /// simulator keeps the other streams (and the runtime's other contexts) usable, so that
    /// tests can check that one context's fault loses nothing of the others'.
    fn submit_work(&self, op: Op) -> Result<()> {
        let error = self.error.clone();
        self.submit(Box::new(move || {
            if lock(&error).is_none() {
                op()
            }
        }))
    }

    fn fail(&self, msg: String) {
        lock(&self.error).get_or_insert(msg);
    }

    /// Block until everything submitted so far has run.
    fn drain(&self) -> Result<()> {
        let done = Arc::new(Completion::new());
        let g = {
            let d = done.clone();
            done.record_with(|g| self.submit(Box::new(move || d.complete(g))))?
        };
        done.wait_for(g);
        self.check()
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(h) = lock(&self.worker).take() {
            // The last handle may be dropped by work running on the worker itself; the
            // worker then ends on its own once the queue is empty.
            if std::thread::current().id() != self.worker_id {
                let _ = h.join();
            }
        }
        dec(&self.acc.streams);
    }
}

/// A simulated event.
#[derive(Debug)]
pub(crate) struct SimEvent {
    done: Arc<Completion>,
    /// The context of the stream it was last recorded on (see `SimStream::ctx`).
    ctx: AtomicU64,
    acc: Arc<Accounts>,
}

impl Drop for SimEvent {
    fn drop(&mut self) {
        dec(&self.acc.events);
    }
}

/// Simulated pinned memory: host bytes plus a count of copies in flight.
#[derive(Debug)]
pub(crate) struct SimPinned {
    data: Mutex<Box<[u8]>>,
    in_flight: Mutex<u64>,
    idle: Condvar,
    /// Why the last copy of the buffer to end did not run (it faulted, or its stream had):
    /// reads and writes fail until a copy runs, as on CUDA, where they wait for the last
    /// copy's event and meet the context's error.
    failure: Mutex<Option<String>>,
    acc: Arc<Accounts>,
}

impl SimPinned {
    fn wait_idle(&self) {
        let mut n = lock(&self.in_flight);
        while *n > 0 {
            n = wait(&self.idle, n);
        }
    }
    fn begin(&self) {
        *lock(&self.in_flight) += 1;
    }
    fn end(&self) {
        let mut n = lock(&self.in_flight);
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }
    /// Wait for the copies in flight; fail if the last to end did not run.
    fn settled(&self) -> Result<()> {
        self.wait_idle();
        match &*lock(&self.failure) {
            Some(why) => Err(DeviceError::StreamBroken(format!(
                "the last copy of this pinned buffer did not run ({why}), as on CUDA, where the context's error stops its reads and writes: copy again on a stream that works"
            ))),
            None => Ok(()),
        }
    }
    pub(crate) fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        self.settled()?;
        dst.copy_from_slice(&lock(&self.data)[off..off + dst.len()]);
        Ok(())
    }
    pub(crate) fn write(&self, off: usize, src: &[u8]) -> Result<()> {
        self.settled()?;
        lock(&self.data)[off..off + src.len()].copy_from_slice(src);
        Ok(())
    }
}

impl Drop for SimPinned {
    fn drop(&mut self) {
        dec(&self.acc.pinned);
    }
}

/// The simulated device. Cheap to clone; clones share the device.
#[derive(Clone, Debug)]
pub struct SimDevice {
    shared: Arc<Shared>,
    info: DeviceInfo,
}

thread_local! {
    /// Whether this thread is running a host callback (see [`SimDevice::callable`]).
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the thread as running a host callback while it lives, panic or not.
struct InCallback(bool);

impl InCallback {
    fn enter() -> Self {
        InCallback(IN_CALLBACK.with(|c| c.replace(true)))
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        IN_CALLBACK.with(|c| c.set(self.0));
    }
}

impl SimDevice {
    /// Refuse a device call made from a host callback, as CUDA does on its callback
    /// thread (`CUDA_ERROR_NOT_PERMITTED`): code that does so here would fail on a GPU.
    fn callable(&self) -> Result<()> {
        if IN_CALLBACK.with(|c| c.get()) {
            return Err(DeviceError::Unsupported {
                what: "a device call from a host callback",
                reason: "CUDA forbids device calls on the thread that runs host callbacks; make the call from another thread, which the callback may wake".into(),
            });
        }
        Ok(())
    }

    /// A device shaped like an H100 (see [`SimConfig::default`]).
    pub fn new() -> Self {
        // The default configuration is valid, so this cannot fail; build it directly.
        Self::build(SimConfig::default())
    }

    /// A device with the given configuration, which is checked.
    pub fn with_config(config: SimConfig) -> Result<Self> {
        let bad = |key, value: String, expected| DeviceError::Config {
            key,
            value,
            expected,
        };
        if config.granularity == 0 || !config.granularity.is_power_of_two() {
            return Err(bad(
                "granularity",
                config.granularity.to_string(),
                "a power of two",
            ));
        }
        if config.total_memory == 0 {
            return Err(bad("total_memory", "0".into(), "a positive byte count"));
        }
        if config.sm_count == 0 {
            return Err(bad("sm_count", "0".into(), "a positive SM count"));
        }
        if config.sm_granularity == 0 || config.sm_min_partition == 0 {
            return Err(bad(
                "sm_granularity",
                config.sm_granularity.to_string(),
                "positive SM granularity and minimum partition",
            ));
        }
        if config.priority_range.greatest > config.priority_range.least {
            return Err(bad(
                "priority_range",
                format!("{:?}", config.priority_range),
                "greatest <= least",
            ));
        }
        Ok(Self::build(config))
    }

    fn build(config: SimConfig) -> Self {
        let id = DeviceId::fresh();
        let info = DeviceInfo {
            name: config.name.clone(),
            backend: Backend::Sim,
            ordinal: 0,
            total_memory: config.total_memory,
            sm_count: config.sm_count,
            compute_capability: (9, 0),
            priority_range: config.priority_range,
            granularity: config.granularity,
            vmm_supported: config.vmm,
            green_contexts: config.green_contexts,
            sm_granularity: config.sm_granularity,
            sm_min_partition: config.sm_min_partition,
            driver_version: 0,
        };
        SimDevice {
            shared: Arc::new(Shared {
                id,
                config,
                acc: Arc::new(Accounts::default()),
                regions: parking_lot::RwLock::new(BTreeMap::new()),
                reservations: Mutex::new(BTreeMap::new()),
                next_va: Mutex::new(VA_START),
                partitions_made: AtomicU64::new(0),
                faults: Mutex::new(Faults::default()),
            }),
            info,
        }
    }

    /// Make the `n`th next operation of kind `op` fail (n = 1 is the very next). Several
    /// faults may be pending at once; one asked for an operation that already has one fails
    /// the next operation without one.
    pub fn fail_nth(&self, op: FaultOp, n: u64) {
        let mut f = lock(&self.shared.faults);
        // A fault past u64::MAX operations never fires; saturating keeps it pending.
        let mut at = f.counts[op_index(op)].saturating_add(n.max(1));
        while at < u64::MAX && f.pending.iter().any(|&(o, a, _)| o == op && a == at) {
            at += 1;
        }
        f.pending.push((op, at, n.max(1)));
    }

    /// Make the `n`th next pinned copy (`copy_htod` or `copy_dtoh`; n = 1 is the very next)
    /// queue without error and fault as it runs, as a copy that hits a bad address does:
    /// it moves no bytes, its stream reports [`DeviceError::StreamBroken`] from then on,
    /// and the work queued behind it does not run. A copy skipped behind an earlier fault
    /// of its stream, or refused because that stream is broken already, uses up its turn
    /// all the same; one refused for a bad address or by [`SimDevice::fail_nth`] is not
    /// counted.
    pub fn fault_copy_as_it_runs(&self, n: u64) {
        let mut f = lock(&self.shared.faults);
        let at = f.pinned_copies.saturating_add(n.max(1));
        f.faulting_copies.push(at);
    }

    /// While on, every chunk creation and linear allocation reports out of memory.
    pub fn report_oom(&self, on: bool) {
        lock(&self.shared.faults).oom = on;
    }

    /// Drop all pending faults and stop reporting out of memory.
    pub fn clear_faults(&self) {
        let mut f = lock(&self.shared.faults);
        f.pending.clear();
        f.faulting_copies.clear();
        f.oom = false;
    }

    /// How many operations of kind `op` have been attempted.
    pub fn op_count(&self, op: FaultOp) -> u64 {
        lock(&self.shared.faults).counts[op_index(op)]
    }

    /// Events made since the device was opened, live or not: how often a caller that
    /// reuses its events still had to make one.
    pub fn events_made(&self) -> u64 {
        self.shared.acc.events_made.load(Ordering::Relaxed)
    }

    /// Counts of live resources, for leak checks.
    pub fn live(&self) -> LiveResources {
        let a = &self.shared.acc;
        LiveResources {
            va_ranges: a.va_ranges.load(Ordering::Relaxed),
            chunks: a.chunks.load(Ordering::Relaxed),
            mappings: a.mappings.load(Ordering::Relaxed),
            streams: a.streams.load(Ordering::Relaxed),
            events: a.events.load(Ordering::Relaxed),
            pinned: a.pinned.load(Ordering::Relaxed),
            device_bytes: a.used.load(Ordering::Relaxed),
        }
    }

    /// Read device memory right now, outside any stream order (a debugger's view).
    pub fn peek(&self, src: DeviceRange, dst: &mut [u8]) -> Result<()> {
        SimMemory {
            shared: &self.shared,
        }
        .read(src, dst)
    }

    /// Run a host kernel in stream order. It sees device memory through [`SimMemory`]. An
    /// error it returns, or a panic, breaks the stream as a faulting kernel would: later
    /// submissions and synchronizations report [`DeviceError::StreamBroken`], and work
    /// already queued behind it does not run.
    pub fn launch_host<F>(&self, stream: &Stream, kernel: F) -> Result<()>
    where
        F: FnOnce(&SimMemory<'_>) -> Result<()> + Send + 'static,
    {
        self.callable()?;
        let s = self.sim_stream(stream)?;
        self.shared.tick(FaultOp::StreamOp)?;
        let shared = self.shared.clone();
        let s2 = s.clone();
        s.submit_work(Box::new(move || {
            if let Err(e) = kernel(&SimMemory { shared: &shared }) {
                s2.fail(format!("host kernel failed: {e}"));
            }
        }))
    }

    /// Queue on `s` a copy between pinned buffer `p` and the device memory `segs`; `copy`
    /// moves the bytes, given the pinned buffer's. The buffer counts the copy in flight
    /// until it has run or been skipped. As other memory work, it is skipped once the
    /// stream has faulted (see `SimStream::submit_work`), and faults the stream if the
    /// memory was unmapped meanwhile.
    fn submit_pinned_copy(
        &self,
        s: &SimStream,
        p: Arc<SimPinned>,
        segs: Vec<Seg>,
        copy: impl FnOnce(&[Seg], &mut [u8]) + Send + 'static,
    ) -> Result<()> {
        let faults = {
            let mut f = lock(&self.shared.faults);
            f.pinned_copies += 1;
            let now = f.pinned_copies;
            let before = f.faulting_copies.len();
            f.faulting_copies.retain(|&at| at != now);
            f.faulting_copies.len() != before
        };
        p.begin();
        let p2 = p.clone();
        let sh = self.shared.clone();
        let broken = s.error.clone();
        let r = s.submit(Box::new(move || {
            let run = if lock(&broken).is_some() {
                Ok(false)
            } else if faults {
                Err("injected fault: the copy faulted as it ran".to_string())
            } else {
                sh.still_mapped(&segs).map(|()| true)
            };
            if run == Ok(true) {
                copy(&segs, &mut lock(&p2.data));
            }
            *lock(&p2.failure) = match &run {
                Ok(true) => None,
                Ok(false) => Some("its stream had faulted before it".to_string()),
                Err(e) => Some(e.clone()),
            };
            p2.end();
            if let Err(e) = run {
                panic!("{e}");
            }
        }));
        if r.is_err() {
            p.end();
        }
        r
    }

    /// A stream of the device's context, or of `partition`'s.
    fn stream_in(&self, priority: i32, partition: Option<&SmPartition>) -> Result<Stream> {
        self.info.priority_range.check(priority)?;
        let ctx = match partition.map(|p| &p.inner) {
            None => 0,
            Some(PartitionInner::Sim(ctx)) => *ctx,
            Some(PartitionInner::Cuda(_)) => return Err(foreign_backend("SM partition")),
        };
        self.shared.tick(FaultOp::StreamOp)?;
        Ok(Stream {
            device: self.shared.id,
            priority,
            partition_sms: partition.map(|p| p.sm_count),
            inner: StreamInner::Sim(SimStream::spawn(&self.shared.acc, priority, ctx)?),
        })
    }

    fn sim_stream(&self, stream: &Stream) -> Result<Arc<SimStream>> {
        check_owner(self.shared.id, "stream", stream.device)?;
        match &stream.inner {
            StreamInner::Sim(s) => Ok(s.clone()),
            StreamInner::Cuda(..) => Err(foreign_backend("stream")),
        }
    }

    fn sim_event(&self, event: &Event) -> Result<Arc<SimEvent>> {
        check_owner(self.shared.id, "event", event.device)?;
        match &event.inner {
            EventInner::Sim(e) => Ok(e.clone()),
            EventInner::Cuda(_) => Err(foreign_backend("event")),
        }
    }

    fn sim_pinned(&self, s: &PinnedSlice<'_>) -> Result<Arc<SimPinned>> {
        check_owner(self.shared.id, "pinned buffer", s.buf.device)?;
        match &s.buf.inner {
            PinnedInner::Sim(p) => Ok(p.clone()),
            PinnedInner::Cuda(_) => Err(foreign_backend("pinned buffer")),
        }
    }

    fn zero_check(len: u64) -> Result<()> {
        if len == 0 {
            Err(DeviceError::ZeroSize { what: "copy" })
        } else {
            Ok(())
        }
    }

    fn map_region(
        &self,
        addr: u64,
        size: u64,
        mem: Arc<ChunkMem>,
        va: Option<Arc<VaInner>>,
    ) -> SimMapping {
        self.shared
            .regions
            .write()
            .insert(addr, Region { size, mem });
        inc(&self.shared.acc.mappings);
        SimMapping {
            shared: self.shared.clone(),
            addr,
            _va: va,
        }
    }
}

impl Default for SimDevice {
    fn default() -> Self {
        Self::new()
    }
}

fn foreign_backend(what: &'static str) -> DeviceError {
    DeviceError::Unsupported {
        what,
        reason: "the handle was made by a CUDA device; use handles of the simulated device".into(),
    }
}

impl Device for SimDevice {
    fn id(&self) -> DeviceId {
        self.shared.id
    }

    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn mem_info(&self) -> Result<MemInfo> {
        self.callable()?;
        let used = self.shared.acc.used.load(Ordering::Relaxed);
        Ok(MemInfo {
            free: self.info.total_memory.saturating_sub(used),
            total: self.info.total_memory,
        })
    }

    fn reserve_va(&self, size: u64) -> Result<VaRange> {
        self.callable()?;
        if !self.info.vmm_supported {
            return Err(no_vmm());
        }
        check_granular("VA reservation", size, self.info.granularity)?;
        // Keep one reservation within 2^46 bytes, as a real GPU's 48-bit address space
        // would. (Addresses are never reused, so a device that reserves without end
        // runs out of them: see `alloc_va`.)
        if size > (1 << 46) {
            return Err(DeviceError::OutOfMemory {
                requested: size,
                free: 1 << 46,
            });
        }
        let base = self.shared.alloc_va(size)?;
        lock(&self.shared.reservations).insert(base, size);
        inc(&self.shared.acc.va_ranges);
        Ok(VaRange {
            device: self.shared.id,
            base,
            size,
            inner: Arc::new(VaInner::Sim(SimVa {
                shared: self.shared.clone(),
                base,
            })),
        })
    }

    fn create_chunk(&self, size: u64) -> Result<PhysChunk> {
        self.callable()?;
        if !self.info.vmm_supported {
            return Err(no_vmm());
        }
        check_granular("chunk size", size, self.info.granularity)?;
        self.shared.tick(FaultOp::ChunkCreate)?;
        self.shared.charge(size)?;
        Ok(PhysChunk {
            device: self.shared.id,
            size,
            inner: Arc::new(ChunkInner::Sim(SimChunk {
                mem: ChunkMem::new(size, &self.shared.acc)?,
            })),
        })
    }

    fn map_chunk(&self, va: &VaRange, offset: u64, chunk: &PhysChunk) -> Result<Mapping> {
        self.callable()?;
        check_owner(self.shared.id, "VA range", va.device)?;
        check_owner(self.shared.id, "chunk", chunk.device)?;
        if !offset.is_multiple_of(self.info.granularity) {
            return Err(DeviceError::Misaligned {
                what: "mapping offset",
                value: offset,
                granularity: self.info.granularity,
            });
        }
        check_range("mapping", offset, chunk.size, va.size)?;
        let mem = match &*chunk.inner {
            ChunkInner::Sim(c) => c.mem.clone(),
            ChunkInner::Cuda(_) => return Err(foreign_backend("chunk")),
        };
        let addr = va.base + offset;
        let overlaps = |regions: &BTreeMap<u64, Region>| {
            regions
                .range(..addr + chunk.size)
                .next_back()
                .is_some_and(|(&b, r)| b + r.size > addr)
        };
        let already = || DeviceError::AlreadyMapped {
            offset,
            len: chunk.size,
        };
        if overlaps(&self.shared.regions.read()) {
            return Err(already());
        }
        self.shared.tick(FaultOp::Map)?;
        let m = {
            // Checked again with the map locked for writing, as CUDA refuses a second
            // mapping of a range that another thread mapped meanwhile.
            let mut regions = self.shared.regions.write();
            if overlaps(&regions) {
                return Err(already());
            }
            regions.insert(
                addr,
                Region {
                    size: chunk.size,
                    mem,
                },
            );
            inc(&self.shared.acc.mappings);
            SimMapping {
                shared: self.shared.clone(),
                addr,
                _va: Some(va.inner.clone()),
            }
        };
        Ok(Mapping {
            device: self.shared.id,
            addr,
            size: chunk.size,
            inner: Some(MappingInner::Sim(m)),
        })
    }

    fn alloc_linear(&self, size: u64) -> Result<LinearAlloc> {
        self.callable()?;
        check_granular("linear allocation", size, self.info.granularity)?;
        self.shared.tick(FaultOp::ChunkCreate)?;
        let addr = self.shared.alloc_va(size)?;
        self.shared.charge(size)?;
        let mem = ChunkMem::new(size, &self.shared.acc)?;
        let m = self.map_region(addr, size, mem, None);
        Ok(LinearAlloc {
            device: self.shared.id,
            addr,
            size,
            _inner: LinearInner::Sim(m),
        })
    }

    fn create_stream(&self, priority: i32) -> Result<Stream> {
        self.callable()?;
        self.stream_in(priority, None)
    }

    fn create_event(&self, flags: EventFlags) -> Result<Event> {
        self.callable()?;
        inc(&self.shared.acc.events);
        self.shared.acc.events_made.fetch_add(1, Ordering::Relaxed);
        Ok(Event {
            device: self.shared.id,
            flags,
            inner: EventInner::Sim(Arc::new(SimEvent {
                done: Arc::new(Completion::new()),
                ctx: AtomicU64::new(0),
                acc: self.shared.acc.clone(),
            })),
        })
    }

    fn record_event(&self, event: &Event, stream: &Stream) -> Result<()> {
        self.callable()?;
        let e = self.sim_event(event)?;
        let s = self.sim_stream(stream)?;
        self.shared.tick(FaultOp::StreamOp)?;
        let done = e.done.clone();
        // Behind a fault the record still completes (so that nothing waits for ever), but
        // failed: the work before it did not all run, and the host's questions say so.
        let broken = s.error.clone();
        e.done
            .record_with(|g| {
                s.submit(Box::new(move || {
                    // The stream's error lock is let go first: a record holds the event's
                    // lock while it takes the stream's.
                    let why = lock(&broken).clone();
                    match why {
                        Some(why) => done.fail(g, why),
                        None => done.complete(g),
                    }
                }))?;
                // Under the event's lock, as the record's generation is taken.
                e.ctx.store(s.ctx, Ordering::Relaxed);
                Ok(())
            })
            .map(|_| ())
    }

    fn wait_event(&self, stream: &Stream, event: &Event) -> Result<()> {
        self.callable()?;
        let e = self.sim_event(event)?;
        let s = self.sim_stream(stream)?;
        self.shared.tick(FaultOp::StreamOp)?;
        let g = e.done.target();
        if g == 0 {
            return Ok(());
        }
        let done = e.done.clone();
        s.submit(Box::new(move || done.wait_for(g)))
    }

    fn query_event(&self, event: &Event) -> Result<bool> {
        self.callable()?;
        let e = self.sim_event(event)?;
        let g = e.done.target();
        if !e.done.is_done(g) {
            return Ok(false);
        }
        failed(&e.done, g).map(|()| true)
    }

    fn synchronize_event(&self, event: &Event) -> Result<()> {
        self.callable()?;
        let e = self.sim_event(event)?;
        let g = e.done.target();
        e.done.wait_for(g);
        failed(&e.done, g)
    }

    fn elapsed(&self, start: &Event, end: &Event) -> Result<Duration> {
        self.callable()?;
        let (a, b) = (self.sim_event(start)?, self.sim_event(end)?);
        if !start.flags.timing || !end.flags.timing {
            return Err(DeviceError::Unsupported {
                what: "elapsed time",
                reason: "both events must be created with EventFlags::timing()".into(),
            });
        }
        let (ga, gb) = (a.done.target(), b.done.target());
        a.done.wait_for(ga);
        b.done.wait_for(gb);
        failed(&a.done, ga)?;
        failed(&b.done, gb)?;
        match (a.done.completed_at(), b.done.completed_at()) {
            // As the driver, which times only events of one context.
            (Some(_), Some(_)) if a.ctx.load(Ordering::Relaxed) != b.ctx.load(Ordering::Relaxed) => {
                Err(DeviceError::Unsupported {
                    what: "elapsed time",
                    reason: "the two events were last recorded on streams of different contexts (an SM partition's and another's); record both on the same stream".into(),
                })
            }
            (Some(t0), Some(t1)) => Ok(t1.saturating_duration_since(t0)),
            _ => Err(DeviceError::Unsupported {
                what: "elapsed time",
                reason: "both events must have been recorded".into(),
            }),
        }
    }

    fn synchronize_stream(&self, stream: &Stream) -> Result<()> {
        self.callable()?;
        let s = self.sim_stream(stream)?;
        self.shared.tick(FaultOp::StreamOp)?;
        s.drain()
    }

    fn host_callback(&self, stream: &Stream, f: HostFn) -> Result<()> {
        self.callable()?;
        let s = self.sim_stream(stream)?;
        self.shared.tick(FaultOp::StreamOp)?;
        s.submit(Box::new(move || {
            let _in = InCallback::enter();
            f()
        }))
    }

    fn alloc_pinned(&self, len: u64) -> Result<PinnedBuffer> {
        self.callable()?;
        if len == 0 {
            return Err(DeviceError::ZeroSize {
                what: "pinned buffer",
            });
        }
        self.shared.tick(FaultOp::PinnedAlloc)?;
        let data = zeroed(len).ok_or(DeviceError::OutOfMemory {
            requested: len,
            free: 0,
        })?;
        inc(&self.shared.acc.pinned);
        Ok(PinnedBuffer {
            device: self.shared.id,
            len,
            inner: PinnedInner::Sim(Arc::new(SimPinned {
                data: Mutex::new(data),
                in_flight: Mutex::new(0),
                failure: Mutex::new(None),
                idle: Condvar::new(),
                acc: self.shared.acc.clone(),
            })),
        })
    }

    fn copy_htod(&self, dst: DeviceRange, src: PinnedSlice<'_>, stream: &Stream) -> Result<()> {
        self.callable()?;
        check_lengths(src.len, dst.len)?;
        Self::zero_check(dst.len)?;
        let p = self.sim_pinned(&src)?;
        let s = self.sim_stream(stream)?;
        let segs = self.shared.resolve(dst)?;
        self.shared.tick(FaultOp::Copy)?;
        let off = src.offset as usize;
        self.submit_pinned_copy(&s, p, segs, move |segs, data| {
            write_segs(segs, &data[off..])
        })
    }

    fn copy_dtoh(&self, dst: PinnedSlice<'_>, src: DeviceRange, stream: &Stream) -> Result<()> {
        self.callable()?;
        check_lengths(src.len, dst.len)?;
        Self::zero_check(src.len)?;
        let p = self.sim_pinned(&dst)?;
        let s = self.sim_stream(stream)?;
        let segs = self.shared.resolve(src)?;
        self.shared.tick(FaultOp::Copy)?;
        let (off, len) = (dst.offset as usize, dst.len as usize);
        self.submit_pinned_copy(&s, p, segs, move |segs, data| {
            read_segs(segs, &mut data[off..off + len])
        })
    }

    fn copy_dtod(&self, dst: DeviceRange, src: DeviceRange, stream: &Stream) -> Result<()> {
        self.callable()?;
        check_lengths(src.len, dst.len)?;
        Self::zero_check(src.len)?;
        let s = self.sim_stream(stream)?;
        let from = self.shared.resolve(src)?;
        let to = self.shared.resolve(dst)?;
        self.shared.tick(FaultOp::Copy)?;
        let len = src.len as usize;
        let sh = self.shared.clone();
        s.submit_work(Box::new(move || {
            if let Err(e) = sh.still_mapped(&from).and(sh.still_mapped(&to)) {
                panic!("{e}");
            }
            // Through a bounce buffer: never two chunk locks at once, and overlapping
            // ranges copy as memmove does.
            let mut tmp = vec![0u8; len];
            read_segs(&from, &mut tmp);
            write_segs(&to, &tmp);
        }))
    }

    fn memset(&self, dst: DeviceRange, value: u8, stream: &Stream) -> Result<()> {
        self.callable()?;
        Self::zero_check(dst.len)?;
        let s = self.sim_stream(stream)?;
        let segs = self.shared.resolve(dst)?;
        self.shared.tick(FaultOp::Copy)?;
        let sh = self.shared.clone();
        s.submit_work(Box::new(move || {
            if let Err(e) = sh.still_mapped(&segs) {
                panic!("{e}");
            }
            for sg in &segs {
                lock(&sg.mem.data)[sg.off..sg.off + sg.len].fill(value);
            }
        }))
    }

    fn write_sync(&self, dst: DeviceRange, src: &[u8], stream: &Stream) -> Result<()> {
        self.callable()?;
        check_lengths(src.len() as u64, dst.len)?;
        Self::zero_check(dst.len)?;
        let s = self.sim_stream(stream)?;
        let segs = self.shared.resolve(dst)?;
        self.shared.tick(FaultOp::Copy)?;
        let bytes = src.to_vec();
        let sh = self.shared.clone();
        s.submit_work(Box::new(move || {
            if let Err(e) = sh.still_mapped(&segs) {
                panic!("{e}");
            }
            write_segs(&segs, &bytes)
        }))?;
        s.drain()
    }

    fn read_sync(&self, dst: &mut [u8], src: DeviceRange, stream: &Stream) -> Result<()> {
        self.callable()?;
        check_lengths(src.len, dst.len() as u64)?;
        Self::zero_check(src.len)?;
        let s = self.sim_stream(stream)?;
        let segs = self.shared.resolve(src)?;
        self.shared.tick(FaultOp::Copy)?;
        let out = Arc::new(Mutex::new(vec![0u8; dst.len()]));
        let o2 = out.clone();
        let sh = self.shared.clone();
        s.submit_work(Box::new(move || {
            if let Err(e) = sh.still_mapped(&segs) {
                panic!("{e}");
            }
            read_segs(&segs, &mut lock(&o2))
        }))?;
        s.drain()?;
        dst.copy_from_slice(&lock(&out));
        Ok(())
    }

    fn split_sms(&self, sm_counts: &[u32]) -> Result<SmSplit> {
        self.callable()?;
        if !self.info.green_contexts {
            return Err(DeviceError::Unsupported {
                what: "SM partitions",
                reason: "this simulated device was configured without green contexts; use stream priorities".into(),
            });
        }
        let got = round_sm_counts(sm_counts, &self.info)?;
        let used: u32 = got.iter().sum();
        let mk = |requested, sm_count| SmPartition {
            device: self.shared.id,
            requested,
            sm_count,
            inner: PartitionInner::Sim(
                self.shared.partitions_made.fetch_add(1, Ordering::Relaxed) + 1,
            ),
        };
        let partitions = sm_counts
            .iter()
            .zip(&got)
            .map(|(&r, &g)| mk(r, g))
            .collect();
        let rest = self.info.sm_count - used;
        Ok(SmSplit {
            partitions,
            remainder: (rest > 0).then(|| mk(0, rest)),
        })
    }

    fn create_stream_in(&self, partition: &SmPartition, priority: i32) -> Result<Stream> {
        self.callable()?;
        check_owner(self.shared.id, "SM partition", partition.device)?;
        self.stream_in(priority, Some(partition))
    }

    fn as_sim(&self) -> Option<&SimDevice> {
        Some(self)
    }
}

fn no_vmm() -> DeviceError {
    DeviceError::Unsupported {
        what: "virtual memory management",
        reason: "the device does not support it; use Device::alloc_linear".into(),
    }
}

/// Round requested SM counts to what the hardware allows and check that they fit.
pub(crate) fn round_sm_counts(sm_counts: &[u32], info: &DeviceInfo) -> Result<Vec<u32>> {
    if sm_counts.is_empty() {
        return Err(DeviceError::ZeroSize {
            what: "SM split (no partitions asked for)",
        });
    }
    let g = info.sm_granularity.max(1);
    let mut got = Vec::with_capacity(sm_counts.len());
    let mut total: u64 = 0;
    for &c in sm_counts {
        if c == 0 {
            return Err(DeviceError::ZeroSize {
                what: "SM partition",
            });
        }
        // In u64: rounding a count near `u32::MAX` up to the granularity would overflow.
        let r = u64::from(c.max(info.sm_min_partition)).div_ceil(u64::from(g)) * u64::from(g);
        total = total.saturating_add(r);
        got.push(u32::try_from(r).unwrap_or(u32::MAX));
    }
    if total > u64::from(info.sm_count) {
        return Err(DeviceError::InvalidSmSplit {
            requested: total.min(u64::from(u32::MAX)) as u32,
            available: info.sm_count,
            granularity: g,
        });
    }
    Ok(got)
}
