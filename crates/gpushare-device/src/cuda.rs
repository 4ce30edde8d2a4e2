//! The CUDA backend, through cudarc's driver API.
//!
//! cudarc loads libcuda lazily and panics when it is missing, so [`CudaDevice::new`] checks
//! [`sys::is_culib_present`] before any other call, and checks each optional entry point
//! (green contexts) before calling it.

use crate::error::{check_granular, check_range, DeviceError, DriverCall, Result};
use crate::handles::{
    ChunkInner, EventInner, LinearInner, MappingInner, PartitionInner, PinnedInner, StreamInner,
    VaInner,
};
use crate::{
    check_lengths, check_owner, Backend, Device, DeviceId, DeviceInfo, DeviceRange, Event,
    EventFlags, HostFn, LinearAlloc, Mapping, MemInfo, PhysChunk, PinnedBuffer, PinnedSlice,
    PriorityRange, SmPartition, SmSplit, Stream, VaRange,
};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A real GPU. Cheap to clone; clones share the device.
///
/// Its calls leave the device's primary context current on the calling thread (that is one
/// `cuCtxGetCurrent` per call when it already is, where restoring the thread's earlier
/// context would add a `cuCtxSetCurrent` to each). Code on the same thread that uses the
/// CUDA runtime API on another device, or a context of its own, sets its own again
/// (`cudaSetDevice`, `cuCtxSetCurrent`) after calling into gpushare; cudarc binds its
/// context on each call and needs nothing.
#[derive(Clone, Debug)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: DeviceId,
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
    /// Live mappings and linear allocations (address to size). Copies are checked against it,
    /// because an async copy to an unmapped address is an MMU fault that poisons the whole
    /// CUDA context, not an error the caller could handle.
    regions: parking_lot::RwLock<BTreeMap<u64, u64>>,
    /// Green contexts made and not yet destroyed (see [`CudaDevice::live_partitions`]).
    green_live: Arc<AtomicUsize>,
}

fn vmm_prop(ordinal: usize) -> sys::CUmemAllocationProp {
    // SAFETY: CUmemAllocationProp is a plain C struct for which all-zero bytes are valid
    // (null pointer, zero enums); the fields that matter are set below.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal as i32;
    prop
}

/// Make `ctx` current on this thread. Unlike cudarc's `bind_to_thread`, this does not first
/// report errors that cudarc stored from earlier drops, so release paths always run.
fn make_current(ctx: &CudaContext) -> Result<()> {
    let cur = result::ctx::get_current().call("cuCtxGetCurrent")?;
    if cur != Some(ctx.cu_ctx()) {
        // SAFETY: the context is alive (borrowed from its Arc) for the duration of the call.
        unsafe { result::ctx::set_current(ctx.cu_ctx()) }.call("cuCtxSetCurrent")?;
    }
    Ok(())
}

/// Report, and clear, an error that cudarc stored while dropping one of its handles (a
/// failed destroy, say). cudarc's safe calls report such an error in place of making the
/// call; it concerns some other handle, so it is logged here and the call goes ahead. A
/// drop on another thread between this and the call can still fail the call: that only
/// fails a creation, which the caller sees as an error; waits do not go through cudarc.
fn drain_stored_error(ctx: &CudaContext) {
    if let Err(e) = ctx.check_err() {
        tracing::warn!(error = %e, "a CUDA error stored when a handle was released earlier");
    }
}

/// The driver's event flags (`CU_EVENT_*` bits, combined). cudarc's `event::create` takes
/// one flag of its enum, so an event that sleeps its waiters could not also go without
/// timestamps; timestamps cost on every record, and on the queries and cross-stream waits
/// made on the event (the driver's documentation of `CU_EVENT_DISABLE_TIMING`).
type EvFlags = std::ffi::c_uint;

/// The driver's flags for an event made with `flags`.
fn ev_flags(flags: EventFlags) -> EvFlags {
    use sys::CUevent_flags as F;
    let mut f = F::CU_EVENT_DEFAULT as EvFlags;
    if flags.blocking_sync {
        f |= F::CU_EVENT_BLOCKING_SYNC as EvFlags;
    }
    if !flags.timing {
        f |= F::CU_EVENT_DISABLE_TIMING as EvFlags;
    }
    f
}

/// A new event with `flags`, in the context current on this thread.
fn create_event(flags: EvFlags) -> Result<sys::CUevent> {
    let mut ev = std::mem::MaybeUninit::uninit();
    // SAFETY: the driver writes the new event through the pointer, which is valid for the
    // call; it is read only once the call succeeded. `flags` holds `CU_EVENT_*` bits only
    // (`ev_flags`), a combination the driver accepts.
    unsafe {
        sys::cuEventCreate(ev.as_mut_ptr(), flags)
            .result()
            .call("cuEventCreate")?;
        Ok(ev.assume_init())
    }
}

/// A new event in `ctx` (see [`drain_stored_error`]).
fn new_event(
    ctx: &Arc<CudaContext>,
    flags: sys::CUevent_flags,
) -> Result<cudarc::driver::CudaEvent> {
    drain_stored_error(ctx);
    ctx.new_event(Some(flags)).call("cuEventCreate")
}

/// Wait on the host for everything queued on `s` so far, with `primary` (the device's
/// primary context) current: a stream's handle names its context, an SM partition's
/// included (see [`GreenCtx`]). Not through cudarc's `synchronize`, which may report an
/// error stored earlier without waiting, and would make a partition's green context
/// current: callers hand memory on, or read it, once this returns.
fn sync_stream(primary: &CudaContext, s: &CudaStream) -> Result<()> {
    make_current(primary)?;
    // SAFETY: the stream is alive (borrowed); a context of its device is current.
    unsafe { result::stream::synchronize(s.cu_stream()) }.call("cuStreamSynchronize")
}

/// Record `e` on `s`, which must belong to the context `e` was made in, with the primary
/// context current (see [`GreenCtx`]).
fn record_on(e: &CtxEvent, s: &CudaStream) -> Result<()> {
    make_current(&e.primary)?;
    // SAFETY: the event and the stream are alive (borrowed) and of one context.
    unsafe { result::event::record(e.ev, s.cu_stream()) }.call("cuEventRecord")
}

/// Wait on the host for event `e` (see [`sync_stream`]).
fn sync_event(e: &CtxEvent) -> Result<()> {
    make_current(&e.primary)?;
    // SAFETY: the event is alive (borrowed).
    unsafe { result::event::synchronize(e.ev) }.call("cuEventSynchronize")
}

fn symbol_present(name: &[u8]) -> bool {
    // SAFETY: called only after `is_culib_present` returned true, so `culib` loads the
    // library instead of panicking; looking a symbol up has no side effects.
    unsafe { sys::culib().get::<unsafe extern "C" fn()>(name).is_ok() }
}

impl CudaDevice {
    /// Open GPU `ordinal` (its primary context). Fails with a typed error when the driver is
    /// missing, no GPU is present, or the ordinal is out of range.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
        if !unsafe { sys::is_culib_present() } {
            return Err(DeviceError::DriverMissing);
        }
        // Failures here say that this machine's driver cannot be used at all: `Auto` then
        // falls back to the simulated device.
        let unusable = |call| {
            move |e: DeviceError| match e {
                DeviceError::Driver { source, .. } => DeviceError::DriverUnusable { call, source },
                e => e,
            }
        };
        result::init().call("cuInit").map_err(unusable("cuInit"))?;
        let count = result::device::get_count()
            .call("cuDeviceGetCount")
            .map_err(unusable("cuDeviceGetCount"))? as usize;
        if count == 0 {
            return Err(DeviceError::NoDevice);
        }
        if ordinal >= count {
            return Err(DeviceError::OrdinalOutOfRange { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
        let attr = |a| ctx.attribute(a).call("cuDeviceGetAttribute");
        use sys::CUdevice_attribute as A;
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let vmm = attr(A::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)? != 0;
        let (major, minor) = ctx.compute_capability().call("cuDeviceGetAttribute")?;
        let (least, greatest) =
            result::stream::get_priority_range().call("cuCtxGetStreamPriorityRange")?;
        let mut version = 0i32;
        // SAFETY: `version` is a valid out-pointer for the duration of the call.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .call("cuDriverGetVersion")?;
        let granularity = if vmm {
            let prop = vmm_prop(ordinal);
            let mut g = 0usize;
            // SAFETY: `g` and `prop` are valid for the call; prop is fully initialised.
            unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut g,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                )
            }
            .result()
            .call("cuMemGetAllocationGranularity")?;
            g as u64
        } else {
            2 << 20
        };
        let green = version >= 12040
            && [
                &b"cuGreenCtxCreate\0"[..],
                b"cuDevSmResourceSplitByCount\0",
                b"cuDeviceGetDevResource\0",
                b"cuDevResourceGenerateDesc\0",
                b"cuGreenCtxStreamCreate\0",
                b"cuCtxFromGreenCtx\0",
                b"cuGreenCtxDestroy\0",
                b"cuGreenCtxGetDevResource\0",
            ]
            .iter()
            .all(|s| symbol_present(s));
        let (sm_min, sm_gran) = match major {
            m if m >= 9 => (8, 8),
            8 => (4, 2),
            _ => (2, 2),
        };
        let info = DeviceInfo {
            name: ctx.name().call("cuDeviceGetName")?,
            backend: Backend::Cuda,
            ordinal,
            total_memory: ctx.total_mem().call("cuDeviceTotalMem")? as u64,
            sm_count,
            compute_capability: (major as u32, minor as u32),
            priority_range: PriorityRange { greatest, least },
            granularity,
            vmm_supported: vmm,
            green_contexts: green,
            sm_granularity: sm_gran,
            sm_min_partition: sm_min,
            driver_version: version as u32,
        };
        tracing::debug!(?info, "opened CUDA device");
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                id: DeviceId::fresh(),
                ctx,
                info,
                regions: parking_lot::RwLock::new(BTreeMap::new()),
                green_live: Arc::new(AtomicUsize::new(0)),
            }),
        })
    }

    /// The cudarc context (the device's primary context): load modules and make cuBLAS
    /// handles with it.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    fn bind(&self) -> Result<()> {
        make_current(&self.inner.ctx)
    }

    fn stream<'s>(&self, s: &'s Stream) -> Result<&'s Arc<CudaStream>> {
        check_owner(self.inner.id, "stream", s.device)?;
        match &s.inner {
            StreamInner::Cuda(c, _) => Ok(c),
            StreamInner::Sim(_) => Err(foreign("stream")),
        }
    }

    /// The stream, and its green context if it is an SM partition's.
    fn stream_in<'s>(
        &self,
        s: &'s Stream,
    ) -> Result<(&'s Arc<CudaStream>, Option<&'s Arc<GreenCtx>>)> {
        check_owner(self.inner.id, "stream", s.device)?;
        match &s.inner {
            StreamInner::Cuda(c, g) => Ok((c, g.as_deref().map(|g| &g.green))),
            StreamInner::Sim(_) => Err(foreign("stream")),
        }
    }

    fn event<'e>(&self, e: &'e Event) -> Result<&'e Arc<CudaEventSet>> {
        check_owner(self.inner.id, "event", e.device)?;
        match &e.inner {
            EventInner::Cuda(c) => Ok(c),
            EventInner::Sim(_) => Err(foreign("event")),
        }
    }

    fn pinned<'p>(&self, s: &PinnedSlice<'p>) -> Result<&'p parking_lot::Mutex<CudaPinned>> {
        check_owner(self.inner.id, "pinned buffer", s.buf.device)?;
        match &s.buf.inner {
            PinnedInner::Cuda(m) => Ok(m),
            PinnedInner::Sim(_) => Err(foreign("pinned buffer")),
        }
    }

    /// Check that the range is wholly covered by live mappings of this device.
    fn check_mapped(&self, r: DeviceRange) -> Result<()> {
        let bad = || DeviceError::InvalidAddress {
            addr: r.ptr.0,
            len: r.len,
        };
        let end = r.ptr.0.checked_add(r.len).ok_or_else(bad)?;
        let regions = self.inner.regions.read();
        let mut cur = r.ptr.0;
        while cur < end {
            let (&base, &size) = regions.range(..=cur).next_back().ok_or_else(bad)?;
            if cur >= base + size {
                return Err(bad());
            }
            cur = base + size;
        }
        Ok(())
    }

    fn oom(&self, requested: u64) -> DeviceError {
        let free = self.mem_info().map(|m| m.free).unwrap_or(0);
        DeviceError::OutOfMemory { requested, free }
    }

    fn nonzero(len: u64) -> Result<()> {
        if len == 0 {
            Err(DeviceError::ZeroSize { what: "copy" })
        } else {
            Ok(())
        }
    }
}

fn foreign(what: &'static str) -> DeviceError {
    DeviceError::Unsupported {
        what,
        reason: "the handle was made by a simulated device; use handles of this CUDA device".into(),
    }
}

fn is_oom(e: &DeviceError) -> bool {
    matches!(e, DeviceError::Driver { source, .. } if source.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)
}

/// A reserved CUDA VA range; freed on drop.
#[derive(Debug)]
pub(crate) struct CudaVa {
    ctx: Arc<CudaContext>,
    base: u64,
    size: u64,
}

impl Drop for CudaVa {
    fn drop(&mut self) {
        let _ = make_current(&self.ctx);
        // SAFETY: the range was reserved by cuMemAddressReserve with exactly this base and
        // size, and every mapping inside it holds this struct alive, so none remains (a
        // mapping that could not be unmapped keeps its hold for good: see CudaMapping).
        let r = unsafe { sys::cuMemAddressFree(self.base, self.size as usize) }.result();
        if let Err(e) = r {
            tracing::warn!(error = %e, base = self.base, "cuMemAddressFree failed");
        }
    }
}

/// A CUDA physical allocation handle; released on drop (the memory itself lives on while
/// mapped).
#[derive(Debug)]
pub(crate) struct CudaChunk {
    ctx: Arc<CudaContext>,
    handle: sys::CUmemGenericAllocationHandle,
}

impl Drop for CudaChunk {
    fn drop(&mut self) {
        let _ = make_current(&self.ctx);
        // SAFETY: the handle came from cuMemCreate and is released exactly once, here.
        if let Err(e) = unsafe { sys::cuMemRelease(self.handle) }.result() {
            tracing::warn!(error = %e, "cuMemRelease failed");
        }
    }
}

/// A CUDA mapping; unmapped on drop.
#[derive(Debug)]
pub(crate) struct CudaMapping {
    dev: CudaDevice,
    addr: u64,
    size: u64,
    done: bool,
    _va: Arc<VaInner>,
}

impl CudaMapping {
    fn do_unmap(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.dev.inner.regions.write().remove(&self.addr);
        self.dev.bind()?;
        // SAFETY: `addr..addr+size` was mapped by cuMemMap in this struct and is unmapped
        // once (guarded by `done`, set only on success); the VA range is kept alive by `_va`.
        unsafe { sys::cuMemUnmap(self.addr, self.size as usize) }
            .result()
            .call("cuMemUnmap")?;
        self.done = true;
        Ok(())
    }
    pub(crate) fn unmap(mut self) -> Result<()> {
        self.do_unmap()
    }
}

impl Drop for CudaMapping {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmap() {
            // The range is still mapped: its reservation must never be freed (a later
            // reservation could be handed the same addresses), so this mapping's hold on it
            // is kept for the rest of the process.
            std::mem::forget(self._va.clone());
            tracing::warn!(error = %e, addr = self.addr, "cuMemUnmap failed; the range stays mapped and reserved");
        }
    }
}

/// Plain CUDA memory from cuMemAlloc; freed on drop.
#[derive(Debug)]
pub(crate) struct CudaLinear {
    dev: CudaDevice,
    addr: u64,
}

impl Drop for CudaLinear {
    fn drop(&mut self) {
        self.dev.inner.regions.write().remove(&self.addr);
        let _ = self.dev.bind();
        // SAFETY: the pointer came from cuMemAlloc and is freed exactly once, here.
        if let Err(e) = unsafe { result::free_sync(self.addr) } {
            tracing::warn!(error = %e, "cuMemFree failed");
        }
    }
}

/// A green context: a set of SMs.
#[derive(Debug)]
pub(crate) struct GreenCtx {
    handle: sys::CUgreenCtx,
    /// The green context seen as an ordinary context, for cudarc. It is never dropped:
    /// cudarc would destroy it with cuCtxDestroy, but a green context must be destroyed with
    /// cuGreenCtxDestroy (below). The cost is one small allocation per partition.
    ctx: ManuallyDrop<Arc<CudaContext>>,
    primary: Arc<CudaContext>,
    /// The device's count of green contexts not yet destroyed.
    live: Arc<AtomicUsize>,
    /// Held while this layer has the green context current on a thread (see
    /// [`GreenCtx::with_current`]). Reentrant, so that a call nested in a user's closure
    /// on the same thread does not wait for itself.
    current: parking_lot::ReentrantMutex<()>,
    /// Events made in this context and no longer used, for reuse, by flags (see
    /// [`GreenCtx::event`]); destroyed with the context.
    spare: parking_lot::Mutex<Vec<(EvFlags, sys::CUevent)>>,
}

impl GreenCtx {
    /// Run `f` with the green context current on this thread, and the primary context
    /// current again after it, under this green context's lock.
    ///
    /// The driver documents that a green context can be current to one thread at a time,
    /// with no synchronisation of calls that reach it from several threads. So this layer
    /// makes it current only where a call takes its context from the thread: making an
    /// event in it, and work a user runs on a partition's stream through cudarc
    /// (`Stream::with_cuda_stream`, `SpinLoad`). Every other call on its handles
    /// (recording, querying, waiting for and destroying events, waiting for and destroying
    /// streams, copies, waits between streams, host callbacks) names its context through
    /// the handle and runs with the primary context current.
    ///
    /// Under the lock, this layer's own calls take no other lock of gpushare's but
    /// `SpinLoad`'s cache of loaded functions, which is never held while the lock is
    /// taken. A user's closure must keep to that (see `Stream::with_cuda_stream`): the
    /// runtime may make a partition's event while holding the pool's lock (an eviction's
    /// fence), so a closure that waited for the pool would deadlock with it. Made events
    /// are reused ([`GreenCtx::event`]), so such a wait is rare.
    ///
    /// After `f` (or its panic), the context current before is current again if it was
    /// this one (a nested call), and the primary context otherwise.
    pub(crate) fn with_current<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        struct Back<'a>(&'a GreenCtx, bool);
        impl Drop for Back<'_> {
            fn drop(&mut self) {
                let to: &CudaContext = if self.1 { &self.0.ctx } else { &self.0.primary };
                if let Err(e) = make_current(to) {
                    tracing::warn!(error = %e, "making a context current again failed");
                }
            }
        }
        // Nested if this thread holds the lock already: the green context being current is
        // not enough, for a cudarc drop outside the lock may have left it so.
        let nested = self.current.is_owned_by_current_thread();
        let _one = self.current.lock();
        let _back = Back(self, nested);
        make_current(&self.ctx)?;
        f()
    }

    /// An event of this context with `flags`: a spare one if there is one, else a new one
    /// (made with the context current, under its lock).
    fn event(&self, flags: EvFlags) -> Result<sys::CUevent> {
        let spare = {
            let mut spare = self.spare.lock();
            let i = spare.iter().position(|&(f, _)| f == flags);
            i.map(|i| spare.swap_remove(i).1)
        };
        match spare {
            Some(ev) => Ok(ev),
            // An event is made in the context current on the thread.
            None => self.with_current(|| create_event(flags)),
        }
    }

    /// Keep an event of this context, no longer used, for reuse. A wait already queued on
    /// it is not affected by its next record.
    fn give_back(&self, flags: EvFlags, ev: sys::CUevent) {
        self.spare.lock().push((flags, ev));
    }
}

// SAFETY: a CUgreenCtx is an opaque driver handle, valid on any thread until destroyed
// (once, in Drop). This layer makes the green context current on one thread at a time
// (`with_current`), as the driver requires, and makes the calls that take the green
// context's own handle (creating a stream in it) under the same lock. It takes the calls
// that name one of its streams or events by that handle (records, waits, queries, copies,
// callbacks, destroys) not to reach the green context in the sense of that rule: they run
// from many threads with the primary context current. The GPU tests
// `partition_events_from_many_threads` and `partition_work_leaves_the_primary_context_current`
// exercise exactly that.
unsafe impl Send for GreenCtx {}
// SAFETY: as above; its other state is behind locks, and the spare events are opaque
// driver handles too.
unsafe impl Sync for GreenCtx {}

impl Drop for GreenCtx {
    fn drop(&mut self) {
        // Anything cudarc made in this context (a module, a slice, a clone of a stream)
        // holds its context alive; destroying the green context under it would leave it
        // dangling, so then the context is left to the process instead.
        if Arc::strong_count(&self.ctx) > 1 {
            tracing::warn!("an SM partition is still referenced through cudarc; not destroying it");
            return;
        }
        let _ = make_current(&self.primary);
        for (_, ev) in self.spare.get_mut().drain(..) {
            // SAFETY: a spare event of this context, unused since it was given back, and
            // destroyed once, here.
            if let Err(e) = unsafe { result::event::destroy(ev) } {
                tracing::warn!(error = %e, "cuEventDestroy failed");
            }
        }
        // SAFETY: the handle came from cuGreenCtxCreate; no stream, event or cudarc object
        // refers to it any more (checked above, and every GreenStream and every event made
        // in it hold this struct alive); it is destroyed once, here.
        match unsafe { sys::cuGreenCtxDestroy(self.handle) }.result() {
            Ok(()) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "cuGreenCtxDestroy failed"),
        }
    }
}

/// Run `f`, which makes cudarc calls on a stream whose owner is `green` if the stream is
/// an SM partition's: then with its green context current, one thread at a time (see
/// [`GreenCtx::with_current`], and its rule for `f`), for cudarc makes a stream's context
/// current for its calls.
pub(crate) fn in_stream_context<T>(
    green: Option<&GreenStream>,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match green {
        Some(g) => g.green.with_current(f),
        None => f(),
    }
}

/// Owner of a stream created in a green context (cudarc's wrapper of it does not own it).
#[derive(Debug)]
pub(crate) struct GreenStream {
    cuda: Arc<CudaStream>,
    stream: sys::CUstream,
    green: Arc<GreenCtx>,
}

impl GreenStream {
    /// The partition's green context.
    pub(crate) fn green(&self) -> &Arc<GreenCtx> {
        &self.green
    }
}

// SAFETY: a CUstream is an opaque driver handle usable from any thread.
unsafe impl Send for GreenStream {}
// SAFETY: as above.
unsafe impl Sync for GreenStream {}

impl Drop for GreenStream {
    fn drop(&mut self) {
        // A caller may have cloned the cudarc stream; destroying the CUstream would leave
        // that clone dangling, so then it stays alive (and so does its green context).
        if Arc::strong_count(&self.cuda) > 1 {
            tracing::warn!(
                "a partition stream is still referenced through cudarc; not destroying it"
            );
            return;
        }
        // Its pending work runs first, waited for outside the green context's lock.
        if let Err(e) = sync_stream(&self.green.primary, &self.cuda) {
            tracing::warn!(error = %e, "cuStreamSynchronize failed");
        }
        // SAFETY: created by cuGreenCtxStreamCreate, referenced by nothing but `self.cuda`
        // (checked above, and dropped right after this), and destroyed once, here, after
        // its pending work has run and before its green context (held by `green`). The
        // primary context is current (`sync_stream`): the handle names its context.
        if let Err(e) = unsafe { sys::cuStreamDestroy_v2(self.stream) }.result() {
            tracing::warn!(error = %e, "cuStreamDestroy failed");
        }
    }
}

/// A CUDA event and what keeps its context alive: for an event made in an SM partition,
/// the partition's green context. Declared after the event, so that the green context
/// can only go once the event is destroyed; a green context whose last user is an event
/// is then destroyed with it, where the partition's own end would have found it still in
/// use and left it to the process.
///
/// The event is a raw handle, not cudarc's `CudaEvent`, whose calls and drop make the
/// event's context current: for a partition's event, its green context (see [`GreenCtx`]).
#[derive(Debug)]
struct CtxEvent {
    ev: sys::CUevent,
    /// The context the event was made in, to compare with streams' contexts.
    ctx: sys::CUcontext,
    /// The device's primary context, current for the calls on the event.
    primary: Arc<CudaContext>,
    /// The partition's green context, which takes the event back for reuse.
    green: Option<Arc<GreenCtx>>,
    flags: EvFlags,
}

// SAFETY: a CUevent is an opaque driver handle usable from any thread. It is destroyed
// once: in Drop, or, for a partition's event, given back to the partition in Drop and
// destroyed with it (`GreenCtx::drop`). The calls on it are the driver's, which synchronise
// themselves.
unsafe impl Send for CtxEvent {}
// SAFETY: as above; `ctx` is only compared, never used as a context.
unsafe impl Sync for CtxEvent {}

impl CtxEvent {
    /// A new event in the context of `stream`, whose green context is `green` if any.
    fn on(stream: &CudaStream, green: Option<&Arc<GreenCtx>>, flags: EvFlags) -> Result<Self> {
        let (ev, primary) = match green {
            Some(g) => (g.event(flags)?, g.primary.clone()),
            None => {
                // An event is made in the context current on the thread.
                make_current(stream.context())?;
                let ev = create_event(flags)?;
                (ev, stream.context().clone())
            }
        };
        Ok(CtxEvent {
            ev,
            ctx: stream.context().cu_ctx(),
            primary,
            green: green.cloned(),
            flags,
        })
    }
}

impl Drop for CtxEvent {
    fn drop(&mut self) {
        // A partition's event goes back to its context for reuse: making one takes the
        // context's lock, which a drop under other locks must not wait for.
        if let Some(g) = &self.green {
            g.give_back(self.flags, self.ev);
            return;
        }
        let _ = make_current(&self.primary);
        // SAFETY: the event came from cuEventCreate in `on` and is destroyed once, here;
        // the driver lets an event go while work it was recorded behind is still queued.
        if let Err(e) = unsafe { result::event::destroy(self.ev) } {
            tracing::warn!(error = %e, "cuEventDestroy failed");
        }
    }
}

/// A device-level event: one CUDA event per context it has been recorded in (an event can
/// only be recorded on a stream of its own context), and which one was recorded last.
///
/// Nearly every event is recorded in one context only (a runtime context records its events
/// on its own stream), so the first context's event, `home`, is recorded, waited on and
/// queried without a lock once made: a record there is a `cuCtxGetCurrent` (to make the
/// primary context current if it is not), one `cuEventRecord` and a store, a wait one
/// load, a `cuCtxGetCurrent` and one `cuStreamWaitEvent`. The first record makes the home
/// event under the lock. Events of other contexts sit behind a lock. Records of
/// one event from several threads at once race, as CUDA's own do: whichever ends last is
/// the one waited for.
#[derive(Debug)]
pub(crate) struct CudaEventSet {
    flags: EvFlags,
    /// The event of the first context it was recorded in; set once, under `others`' lock.
    home: OnceLock<CtxEvent>,
    /// Which event was recorded last: [`NEVER`], [`HOME`], or [`OTHER`] plus its index in
    /// `others`.
    last: AtomicUsize,
    /// Events of the other contexts it was recorded in. Shared, so that a wait on one
    /// (a blocking `cuEventSynchronize`, say) runs with the lock released.
    others: parking_lot::Mutex<Vec<Arc<CtxEvent>>>,
}

/// [`CudaEventSet::last`]: never recorded.
const NEVER: usize = 0;
/// [`CudaEventSet::last`]: the home event.
const HOME: usize = 1;
/// [`CudaEventSet::last`]: `OTHER + i` is `others[i]`.
const OTHER: usize = 2;

impl CudaEventSet {
    fn new(flags: EvFlags) -> Self {
        CudaEventSet {
            flags,
            home: OnceLock::new(),
            last: AtomicUsize::new(NEVER),
            others: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// The CUDA event recorded last, if any.
    fn with_last<T>(&self, f: impl FnOnce(&CtxEvent) -> Result<T>) -> Result<Option<T>> {
        // Acquire: pairs with the store after a record, so that the home event it names
        // is set.
        match self.last.load(Ordering::Acquire) {
            NEVER => Ok(None),
            HOME => self.home.get().map(f).transpose(),
            i => {
                // Taken out of the list, so that a record in another context does not wait
                // for `f`, which may block until the GPU gets there.
                let e = self.others.lock().get(i - OTHER).cloned();
                e.map(|e| f(&e)).transpose()
            }
        }
    }

    /// Record on `stream`, whose green context is `green` if it is an SM partition's.
    fn record(&self, stream: &Arc<CudaStream>, green: Option<&Arc<GreenCtx>>) -> Result<()> {
        let ctx = stream.context();
        if let Some(home) = self.home.get() {
            if home.ctx == ctx.cu_ctx() {
                record_on(home, stream)?;
                self.last.store(HOME, Ordering::Release);
                return Ok(());
            }
        }
        let mut others = self.others.lock();
        // Under the lock, where the home event is set: another thread's first record may
        // have set it since the look above.
        let home = match self.home.get() {
            Some(home) => home,
            None => {
                let ev = CtxEvent::on(stream, green, self.flags)?;
                self.home.get_or_init(|| ev)
            }
        };
        if home.ctx == ctx.cu_ctx() {
            record_on(home, stream)?;
            self.last.store(HOME, Ordering::Release);
            return Ok(());
        }
        let i = match others.iter().position(|e| e.ctx == ctx.cu_ctx()) {
            Some(i) => i,
            None => {
                others.push(Arc::new(CtxEvent::on(stream, green, self.flags)?));
                others.len() - 1
            }
        };
        record_on(&others[i], stream)?;
        self.last.store(OTHER + i, Ordering::Release);
        Ok(())
    }
}

/// Pinned host memory with its own record of the last copy that used it. cudarc's own
/// tracking cannot follow streams of green contexts, so this keeps an event per buffer,
/// made in the context of the stream that last used it.
pub(crate) struct CudaPinned {
    ptr: *mut u8,
    len: usize,
    last: Option<CtxEvent>,
    /// Set when a copy could be neither recorded nor waited for: it may still be using the
    /// bytes, so they are never read, written or freed again.
    untracked: Option<String>,
    /// The device's primary context, current when the allocation is freed.
    ctx: Arc<CudaContext>,
    /// Owns the allocation; freed by `Drop::drop` below once it has waited for `last`, and
    /// leaked if that wait fails (a copy may still be using it).
    slice: std::mem::ManuallyDrop<cudarc::driver::PinnedHostSlice<u8>>,
}

// SAFETY: the pointer is owned by `slice` (page-locked host memory valid on any thread);
// all access goes through the Mutex that wraps this struct.
unsafe impl Send for CudaPinned {}
// SAFETY: as above.
unsafe impl Sync for CudaPinned {}

impl CudaPinned {
    /// Wait for the last copy.
    fn wait_idle(&self) -> Result<()> {
        if let Some(why) = &self.untracked {
            return Err(DeviceError::StreamBroken(format!(
                "a copy of this pinned buffer may still be running ({why}); the buffer cannot be used again"
            )));
        }
        self.last.as_ref().map_or(Ok(()), sync_event)
    }

    /// The bytes, once every copy that used them has completed.
    pub(crate) fn bytes(&self) -> Result<&[u8]> {
        self.wait_idle()?;
        // SAFETY: `ptr..ptr+len` is the live allocation owned by `slice`; no copy is in
        // flight (waited above) and new copies need `&mut self`, which this borrow excludes.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }

    /// The bytes for writing, once every copy that used them has completed.
    pub(crate) fn bytes_mut(&mut self) -> Result<&mut [u8]> {
        self.wait_idle()?;
        // SAFETY: as in `bytes`, with exclusive access through `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }

    /// Order `stream` after earlier copies of this buffer.
    fn before_copy(&self, stream: &CudaStream) -> Result<()> {
        if let Some(e) = &self.last {
            make_current(&self.ctx)?;
            // SAFETY: both handles are alive; waiting across contexts of a device is allowed.
            unsafe {
                result::stream::wait_event(
                    stream.cu_stream(),
                    e.ev,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
            .call("cuStreamWaitEvent")?;
        }
        Ok(())
    }

    /// Remember that a copy on `stream` uses the buffer. The copy is already queued: if it
    /// cannot be recorded, the stream is waited for here, so that no copy runs untracked
    /// while the buffer is rewritten or freed. A copy waited for so is complete, and the
    /// copy succeeds; if the wait fails too, the record's error is returned.
    fn after_copy(
        &mut self,
        stream: &Arc<CudaStream>,
        green: Option<&Arc<GreenCtx>>,
    ) -> Result<()> {
        let Err(recorded) = self.record_last(stream, green) else {
            return Ok(());
        };
        match sync_stream(&self.ctx, stream) {
            Ok(()) => {
                tracing::warn!(error = %recorded, "recording a pinned buffer's copy failed; the copy was waited for instead");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "waiting for an untracked copy of a pinned buffer failed");
                self.untracked = Some(e.to_string());
                Err(recorded)
            }
        }
    }

    fn record_last(
        &mut self,
        stream: &Arc<CudaStream>,
        green: Option<&Arc<GreenCtx>>,
    ) -> Result<()> {
        let ctx = stream.context();
        match &self.last {
            Some(e) if e.ctx == ctx.cu_ctx() => record_on(e, stream),
            _ => {
                // The last copy ran in another context (a partition's), or none ran yet.
                // Replacing its event loses no track of it: `before_copy` made this stream
                // wait for that event, so the new one completes only after the old copy
                // did. The old one goes only once the new one is recorded: should the
                // record fail, `last` still tracks the earlier copies.
                let e = CtxEvent::on(stream, green, ev_flags(EventFlags::default()))?;
                record_on(&e, stream)?;
                self.last = Some(e);
                Ok(())
            }
        }
    }
}

impl Drop for CudaPinned {
    fn drop(&mut self) {
        match self.wait_idle() {
            Ok(()) => {
                // cudarc frees the memory in the context current now, and skips making its
                // own current if it holds an error stored by another handle's release.
                let _ = make_current(&self.ctx);
                drain_stored_error(&self.ctx);
                // SAFETY: dropped exactly once, here, and never used again.
                unsafe { std::mem::ManuallyDrop::drop(&mut self.slice) }
            }
            Err(e) => tracing::error!(
                error = %e,
                bytes = self.len,
                "a copy of a pinned buffer may still be running; its memory is leaked rather than freed under it"
            ),
        }
    }
}

/// The callback of [`Device::host_callback`], added with `cuStreamAddCallback`. Not
/// `cuLaunchHostFunc`, which the driver skips once its context has met an error: the
/// callback's box would leak, and whatever it wakes (an event's waiting task, the pool's
/// waiters for stream-ordered frees) would wait for ever. The driver calls this one with
/// the error instead, so it runs in every case, and what it wakes finds the error when it
/// next asks the device.
///
/// The status is taken as the plain `unsigned int` that the driver passes, not as cudarc's
/// `CUresult` enum: a code that a newer driver knows and the enum does not would be an
/// invalid value of the enum, which Rust does not allow to exist.
unsafe extern "C" fn run_host_fn(_stream: sys::CUstream, status: u32, data: *mut c_void) {
    if status != sys::CUresult::CUDA_SUCCESS as u32 {
        tracing::warn!(
            cu_result = status,
            "a host callback runs after an error in its CUDA context"
        );
    }
    // SAFETY: `data` is the pointer made by Box::into_raw in `host_callback`, and the driver
    // calls this function exactly once per callback added.
    let f: Box<HostFn> = unsafe { Box::from_raw(data as *mut HostFn) };
    // A panic must not unwind into the driver.
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        tracing::error!("a host callback panicked");
    }
}

fn sm_resource_count(r: &sys::CUdevResource) -> u32 {
    // SAFETY: the resource was filled by the driver as an SM resource, so `sm` is the
    // active union member.
    unsafe { r.__bindgen_anon_1.sm.smCount }
}

impl Device for CudaDevice {
    fn id(&self) -> DeviceId {
        self.inner.id
    }

    fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    fn mem_info(&self) -> Result<MemInfo> {
        drain_stored_error(&self.inner.ctx);
        let (free, total) = self.inner.ctx.mem_get_info().call("cuMemGetInfo")?;
        Ok(MemInfo {
            free: free as u64,
            total: total as u64,
        })
    }

    fn reserve_va(&self, size: u64) -> Result<VaRange> {
        let info = &self.inner.info;
        if !info.vmm_supported {
            return Err(no_vmm());
        }
        check_granular("VA reservation", size, info.granularity)?;
        self.bind()?;
        let mut base = 0u64;
        // SAFETY: `base` is a valid out-pointer; size and alignment are multiples of the
        // granularity as the driver requires.
        unsafe {
            sys::cuMemAddressReserve(&mut base, size as usize, info.granularity as usize, 0, 0)
        }
        .result()
        .call("cuMemAddressReserve")?;
        Ok(VaRange {
            device: self.inner.id,
            base,
            size,
            inner: Arc::new(VaInner::Cuda(CudaVa {
                ctx: self.inner.ctx.clone(),
                base,
                size,
            })),
        })
    }

    fn create_chunk(&self, size: u64) -> Result<PhysChunk> {
        let info = &self.inner.info;
        if !info.vmm_supported {
            return Err(no_vmm());
        }
        check_granular("chunk size", size, info.granularity)?;
        self.bind()?;
        let prop = vmm_prop(info.ordinal);
        let mut handle = 0;
        // SAFETY: valid out-pointer and fully initialised properties.
        let r = unsafe { sys::cuMemCreate(&mut handle, size as usize, &prop, 0) }
            .result()
            .call("cuMemCreate");
        match r {
            Err(e) if is_oom(&e) => return Err(self.oom(size)),
            r => r?,
        }
        Ok(PhysChunk {
            device: self.inner.id,
            size,
            inner: Arc::new(ChunkInner::Cuda(CudaChunk {
                ctx: self.inner.ctx.clone(),
                handle,
            })),
        })
    }

    fn map_chunk(&self, va: &VaRange, offset: u64, chunk: &PhysChunk) -> Result<Mapping> {
        let id = self.inner.id;
        check_owner(id, "VA range", va.device)?;
        check_owner(id, "chunk", chunk.device)?;
        let g = self.inner.info.granularity;
        if !offset.is_multiple_of(g) {
            return Err(DeviceError::Misaligned {
                what: "mapping offset",
                value: offset,
                granularity: g,
            });
        }
        check_range("mapping", offset, chunk.size, va.size)?;
        let handle = match &*chunk.inner {
            ChunkInner::Cuda(c) => c.handle,
            ChunkInner::Sim(_) => return Err(foreign("chunk")),
        };
        let addr = va.base + offset;
        {
            let regions = self.inner.regions.read();
            if regions
                .range(..addr + chunk.size)
                .next_back()
                .is_some_and(|(&b, &s)| b + s > addr)
            {
                return Err(DeviceError::AlreadyMapped {
                    offset,
                    len: chunk.size,
                });
            }
        }
        self.bind()?;
        let size = chunk.size as usize;
        // SAFETY: addr..addr+size lies inside a live reservation (checked above) and is not
        // mapped; the handle is live and exactly `size` bytes.
        unsafe { sys::cuMemMap(addr, size, 0, handle, 0) }
            .result()
            .call("cuMemMap")?;
        let mut m = CudaMapping {
            dev: self.clone(),
            addr,
            size: chunk.size,
            done: true,
            _va: va.inner.clone(),
        };
        let desc = sys::CUmemAccessDesc {
            location: vmm_prop(self.inner.info.ordinal).location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range was just mapped; desc is valid for the call.
        let r = unsafe { sys::cuMemSetAccess(addr, size, &desc, 1) }
            .result()
            .call("cuMemSetAccess");
        m.done = false;
        if let Err(e) = r {
            // Unmap before reporting, so that nothing leaks.
            drop(m);
            return Err(e);
        }
        self.inner.regions.write().insert(addr, chunk.size);
        Ok(Mapping {
            device: id,
            addr,
            size: chunk.size,
            inner: Some(MappingInner::Cuda(m)),
        })
    }

    fn alloc_linear(&self, size: u64) -> Result<LinearAlloc> {
        check_granular("linear allocation", size, self.inner.info.granularity)?;
        self.bind()?;
        // SAFETY: plain allocation of `size` bytes; freed by CudaLinear's Drop.
        let addr = match unsafe { result::malloc_sync(size as usize) }.call("cuMemAlloc") {
            Err(e) if is_oom(&e) => return Err(self.oom(size)),
            r => r?,
        };
        self.inner.regions.write().insert(addr, size);
        Ok(LinearAlloc {
            device: self.inner.id,
            addr,
            size,
            _inner: LinearInner::Cuda(CudaLinear {
                dev: self.clone(),
                addr,
            }),
        })
    }

    fn create_stream(&self, priority: i32) -> Result<Stream> {
        self.inner.info.priority_range.check(priority)?;
        drain_stored_error(&self.inner.ctx);
        let s = self
            .inner
            .ctx
            .new_stream_with_priority(priority)
            .call("cuStreamCreateWithPriority")?;
        Ok(Stream {
            device: self.inner.id,
            priority,
            partition_sms: None,
            inner: StreamInner::Cuda(s, None),
        })
    }

    fn create_event(&self, flags: EventFlags) -> Result<Event> {
        let f = ev_flags(flags);
        // The CUDA events are made on first record, each in the context of the stream it
        // is recorded on (the primary one, or an SM partition's).
        Ok(Event {
            device: self.inner.id,
            flags,
            inner: EventInner::Cuda(Arc::new(CudaEventSet::new(f))),
        })
    }

    fn record_event(&self, event: &Event, stream: &Stream) -> Result<()> {
        let (e, (s, green)) = (self.event(event)?, self.stream_in(stream)?);
        e.record(s, green)
    }

    fn wait_event(&self, stream: &Stream, event: &Event) -> Result<()> {
        let (e, s) = (self.event(event)?, self.stream(stream)?);
        e.with_last(|ev| {
            self.bind()?;
            // SAFETY: both handles are alive; waiting across contexts of one device is
            // allowed.
            unsafe {
                result::stream::wait_event(
                    s.cu_stream(),
                    ev.ev,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
            .call("cuStreamWaitEvent")
        })
        .map(|_| ())
    }

    fn query_event(&self, event: &Event) -> Result<bool> {
        Ok(self
            .event(event)?
            .with_last(|ev| {
                make_current(&ev.primary)?;
                // SAFETY: the event is alive (borrowed).
                match unsafe { result::event::query(ev.ev) } {
                    Ok(()) => Ok(true),
                    Err(cudarc::driver::DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => {
                        Ok(false)
                    }
                    Err(e) => Err(e).call("cuEventQuery"),
                }
            })?
            .unwrap_or(true))
    }

    fn synchronize_event(&self, event: &Event) -> Result<()> {
        self.event(event)?.with_last(sync_event).map(|_| ())
    }

    fn elapsed(&self, start: &Event, end: &Event) -> Result<Duration> {
        let (a, b) = (self.event(start)?, self.event(end)?);
        if !start.flags.timing || !end.flags.timing {
            return Err(DeviceError::Unsupported {
                what: "elapsed time",
                reason: "both events must be created with EventFlags::timing()".into(),
            });
        }
        let never = || DeviceError::Unsupported {
            what: "elapsed time",
            reason: "both events must have been recorded".into(),
        };
        // The last recorded CUDA event of each, once complete, and its context.
        let synced = |set: &CudaEventSet| {
            set.with_last(|e| sync_event(e).map(|()| (e.ev, e.ctx)))?
                .ok_or_else(never)
        };
        let ((ea, ca), (eb, cb)) = (synced(a)?, synced(b)?);
        if ca != cb {
            // The driver times only events of one context.
            return Err(DeviceError::Unsupported {
                what: "elapsed time",
                reason: "the two events were last recorded on streams of different contexts (an SM partition's and another's); record both on the same stream".into(),
            });
        }
        self.bind()?;
        // SAFETY: both events are alive (held by the Event handles borrowed here) and
        // complete.
        let ms = unsafe { result::event::elapsed(ea, eb) }.call("cuEventElapsedTime")?;
        Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }

    fn synchronize_stream(&self, stream: &Stream) -> Result<()> {
        sync_stream(&self.inner.ctx, self.stream(stream)?)
    }

    fn host_callback(&self, stream: &Stream, f: HostFn) -> Result<()> {
        let s = self.stream(stream)?;
        self.bind()?;
        let data = Box::into_raw(Box::new(f)) as *mut c_void;
        type StatusAsU32 = unsafe extern "C" fn(sys::CUstream, u32, *mut c_void);
        type StatusAsEnum = unsafe extern "C" fn(sys::CUstream, sys::CUresult, *mut c_void);
        // SAFETY: only the driver calls this pointer, through the C ABI, in which its
        // `CUresult` parameter is an `unsigned int`: the same as `run_host_fn`'s `u32`
        // (cudarc's enum is `repr(u32)`). Rust never calls it through the enum's type.
        let callback =
            Some(unsafe { std::mem::transmute::<StatusAsU32, StatusAsEnum>(run_host_fn) });
        // SAFETY: `run_host_fn` takes back ownership of `data` exactly once when the driver
        // calls it, which it does after an error too; if adding it fails the driver never
        // calls it and we free it below. Flags must be 0.
        let r = unsafe { sys::cuStreamAddCallback(s.cu_stream(), callback, data, 0) }
            .result()
            .call("cuStreamAddCallback");
        if r.is_err() {
            // SAFETY: adding it failed, so the driver holds no copy of `data`.
            drop(unsafe { Box::from_raw(data as *mut HostFn) });
        }
        r
    }

    fn alloc_pinned(&self, len: u64) -> Result<PinnedBuffer> {
        if len == 0 {
            return Err(DeviceError::ZeroSize {
                what: "pinned buffer",
            });
        }
        if len >= isize::MAX as u64 {
            return Err(DeviceError::OutOfMemory {
                requested: len,
                free: isize::MAX as u64,
            });
        }
        drain_stored_error(&self.inner.ctx);
        // SAFETY: the memory is zeroed below before any reference to it exists. Flags 0:
        // plain page-locked memory (not write-combined, which is slow to read back).
        let mut p = unsafe {
            self.inner
                .ctx
                .alloc_pinned_with_flags::<u8>(len as usize, 0)
        }
        .call("cuMemHostAlloc")?;
        let ptr = p.as_mut_ptr().call("cuEventSynchronize")?;
        // SAFETY: `ptr` points to `len` bytes just allocated and owned by `p`.
        unsafe { std::ptr::write_bytes(ptr, 0, len as usize) };
        Ok(PinnedBuffer {
            device: self.inner.id,
            len,
            inner: PinnedInner::Cuda(parking_lot::Mutex::new(CudaPinned {
                ptr,
                len: len as usize,
                last: None,
                untracked: None,
                ctx: self.inner.ctx.clone(),
                slice: std::mem::ManuallyDrop::new(p),
            })),
        })
    }

    fn copy_htod(&self, dst: DeviceRange, src: PinnedSlice<'_>, stream: &Stream) -> Result<()> {
        check_lengths(src.len, dst.len)?;
        Self::nonzero(dst.len)?;
        let m = self.pinned(&src)?;
        let (s, green) = self.stream_in(stream)?;
        self.check_mapped(dst)?;
        let mut g = m.lock();
        g.before_copy(s)?;
        self.bind()?;
        let (o, n) = (src.offset as usize, src.len as usize);
        // SAFETY: the device range is mapped (checked). The host bytes stay valid until the
        // copy completes: `after_copy` records an event that host access, later copies and
        // the buffer's drop all wait for; the lock keeps host access out meanwhile.
        let host = unsafe { std::slice::from_raw_parts(g.ptr.add(o), n) };
        // SAFETY: as above.
        unsafe { result::memcpy_htod_async(dst.ptr.0, host, s.cu_stream()) }
            .call("cuMemcpyHtoDAsync")?;
        g.after_copy(s, green)
    }

    fn copy_dtoh(&self, dst: PinnedSlice<'_>, src: DeviceRange, stream: &Stream) -> Result<()> {
        check_lengths(src.len, dst.len)?;
        Self::nonzero(src.len)?;
        let m = self.pinned(&dst)?;
        let (s, green) = self.stream_in(stream)?;
        self.check_mapped(src)?;
        let mut g = m.lock();
        g.before_copy(s)?;
        self.bind()?;
        let (o, n) = (dst.offset as usize, dst.len as usize);
        // SAFETY: as in copy_htod; the device writes the host bytes until the recorded
        // event completes, and every host access waits for it first.
        let host = unsafe { std::slice::from_raw_parts_mut(g.ptr.add(o), n) };
        // SAFETY: as above.
        unsafe { result::memcpy_dtoh_async(host, src.ptr.0, s.cu_stream()) }
            .call("cuMemcpyDtoHAsync")?;
        g.after_copy(s, green)
    }

    fn copy_dtod(&self, dst: DeviceRange, src: DeviceRange, stream: &Stream) -> Result<()> {
        check_lengths(src.len, dst.len)?;
        Self::nonzero(src.len)?;
        let s = self.stream(stream)?;
        self.check_mapped(src)?;
        self.check_mapped(dst)?;
        self.bind()?;
        // SAFETY: both ranges are mapped device memory of this device (checked).
        unsafe { result::memcpy_dtod_async(dst.ptr.0, src.ptr.0, src.len as usize, s.cu_stream()) }
            .call("cuMemcpyDtoDAsync")
    }

    fn memset(&self, dst: DeviceRange, value: u8, stream: &Stream) -> Result<()> {
        Self::nonzero(dst.len)?;
        let s = self.stream(stream)?;
        self.check_mapped(dst)?;
        self.bind()?;
        // SAFETY: the range is mapped device memory of this device (checked).
        unsafe { result::memset_d8_async(dst.ptr.0, value, dst.len as usize, s.cu_stream()) }
            .call("cuMemsetD8Async")
    }

    fn write_sync(&self, dst: DeviceRange, src: &[u8], stream: &Stream) -> Result<()> {
        check_lengths(src.len() as u64, dst.len)?;
        Self::nonzero(dst.len)?;
        let s = self.stream(stream)?;
        self.check_mapped(dst)?;
        self.bind()?;
        // SAFETY: pageable source: the driver stages it before returning, and we wait for
        // the stream before returning, so `src` outlives the copy.
        unsafe { result::memcpy_htod_async(dst.ptr.0, src, s.cu_stream()) }
            .call("cuMemcpyHtoDAsync")?;
        sync_stream(&self.inner.ctx, s)
    }

    fn read_sync(&self, dst: &mut [u8], src: DeviceRange, stream: &Stream) -> Result<()> {
        check_lengths(src.len, dst.len() as u64)?;
        Self::nonzero(src.len)?;
        let s = self.stream(stream)?;
        self.check_mapped(src)?;
        self.bind()?;
        // SAFETY: `dst` is borrowed mutably until the stream is synchronized below.
        unsafe { result::memcpy_dtoh_async(dst, src.ptr.0, s.cu_stream()) }
            .call("cuMemcpyDtoHAsync")?;
        sync_stream(&self.inner.ctx, s)
    }

    fn split_sms(&self, sm_counts: &[u32]) -> Result<SmSplit> {
        let info = &self.inner.info;
        if !info.green_contexts {
            return Err(DeviceError::Unsupported {
                what: "SM partitions",
                reason: format!(
                    "green contexts need CUDA 12.4 or later; the driver is {}.{}; use stream priorities",
                    info.driver_version / 1000,
                    info.driver_version % 1000 / 10
                ),
            });
        }
        let want = crate::sim::round_sm_counts(sm_counts, info)?;
        self.bind()?;
        let dev = self.inner.ctx.cu_device();
        let mut input = MaybeUninit::<sys::CUdevResource>::zeroed();
        // SAFETY: valid out-pointer; SM is a resource type every green-context driver has.
        unsafe {
            sys::cuDeviceGetDevResource(
                dev,
                input.as_mut_ptr(),
                sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
            )
        }
        .result()
        .call("cuDeviceGetDevResource")?;
        // SAFETY: initialised by the call above (and zeroed before it).
        let mut input = unsafe { input.assume_init() };
        let mut partitions = Vec::with_capacity(want.len());
        // The SMs not yet given out, as a green context: the result of a split cannot be
        // split again, so each further split starts from this context's resource.
        let mut rest_green: Option<Arc<GreenCtx>> = None;
        let too_many = || DeviceError::InvalidSmSplit {
            requested: want.iter().sum(),
            available: info.sm_count,
            granularity: info.sm_granularity,
        };
        for (&requested, &count) in sm_counts.iter().zip(&want) {
            let mut group = MaybeUninit::<sys::CUdevResource>::zeroed();
            let mut rest = MaybeUninit::<sys::CUdevResource>::zeroed();
            let mut n = 1u32;
            // SAFETY: all pointers are valid for the call; one group is asked for.
            unsafe {
                sys::cuDevSmResourceSplitByCount(
                    group.as_mut_ptr(),
                    &mut n,
                    &input,
                    rest.as_mut_ptr(),
                    0,
                    count,
                )
            }
            .result()
            .call("cuDevSmResourceSplitByCount")?;
            if n < 1 {
                return Err(too_many());
            }
            // SAFETY: both were written by the driver (and zeroed before).
            let (mut group, mut rest) = unsafe { (group.assume_init(), rest.assume_init()) };
            let got = sm_resource_count(&group);
            partitions.push(SmPartition {
                device: self.inner.id,
                requested,
                sm_count: got,
                inner: PartitionInner::Cuda(self.make_green(&mut group)?),
            });
            if sm_resource_count(&rest) == 0 {
                rest_green = None;
                if partitions.len() < want.len() {
                    return Err(too_many());
                }
                break;
            }
            let g = self.make_green(&mut rest)?;
            let mut next = MaybeUninit::<sys::CUdevResource>::zeroed();
            // SAFETY: `g` is a live green context; valid out-pointer.
            unsafe {
                sys::cuGreenCtxGetDevResource(
                    g.handle,
                    next.as_mut_ptr(),
                    sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
                )
            }
            .result()
            .call("cuGreenCtxGetDevResource")?;
            // SAFETY: written by the driver (and zeroed before).
            input = unsafe { next.assume_init() };
            rest_green = Some(g);
        }
        let remainder = rest_green.map(|g| SmPartition {
            device: self.inner.id,
            requested: 0,
            sm_count: sm_resource_count(&input),
            inner: PartitionInner::Cuda(g),
        });
        Ok(SmSplit {
            partitions,
            remainder,
        })
    }

    fn create_stream_in(&self, partition: &SmPartition, priority: i32) -> Result<Stream> {
        check_owner(self.inner.id, "SM partition", partition.device)?;
        self.inner.info.priority_range.check(priority)?;
        let green = match &partition.inner {
            PartitionInner::Cuda(g) => g.clone(),
            PartitionInner::Sim(_) => return Err(foreign("SM partition")),
        };
        let mut raw: sys::CUstream = std::ptr::null_mut();
        {
            // A call on the green context's own handle: one thread at a time (see
            // `GreenCtx::with_current`), though it needs no current context.
            let _one = green.current.lock();
            // SAFETY: valid out-pointer; the green context is alive (held by `green`).
            unsafe {
                sys::cuGreenCtxStreamCreate(
                    &mut raw,
                    green.handle,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                    priority,
                )
            }
            .result()
            .call("cuGreenCtxStreamCreate")?;
        }
        // SAFETY: `raw` belongs to the green context that `green.ctx` wraps; GreenStream
        // destroys it only once no clone of this wrapper remains.
        let s = unsafe { green.ctx.wrap_borrowed_stream(raw) };
        let owner = Arc::new(GreenStream {
            cuda: s.clone(),
            stream: raw,
            green: green.clone(),
        });
        Ok(Stream {
            device: self.inner.id,
            priority,
            partition_sms: Some(partition.sm_count),
            inner: StreamInner::Cuda(s, Some(owner)),
        })
    }

    fn as_cuda(&self) -> Option<&CudaDevice> {
        Some(self)
    }
}

/// Raw driver allocation costs, measured for comparison with the pool in the same run.
impl CudaDevice {
    /// Time `iters` `cuMemAlloc` + `cuMemFree` pairs of `size` bytes, one duration per pair.
    pub fn time_raw_alloc_pairs(&self, size: u64, iters: usize) -> Result<Vec<Duration>> {
        if size == 0 {
            return Err(DeviceError::ZeroSize { what: "allocation" });
        }
        self.bind()?;
        let mut v = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = std::time::Instant::now();
            // SAFETY: a plain allocation freed right after; nothing else refers to it.
            unsafe {
                let p = result::malloc_sync(size as usize).call("cuMemAlloc")?;
                result::free_sync(p).call("cuMemFree")?;
            }
            v.push(t.elapsed());
        }
        Ok(v)
    }

    /// Time `iters` `cuMemAllocAsync` + `cuMemFreeAsync` pairs of `size` bytes on `stream`
    /// (the device's default memory pool, warmed up first). The pairs are timed in batches
    /// of 10, as the pool's are, so that reading the clock (tens of ns, against about a
    /// microsecond per pair) does not count; one duration per batch, divided by 10.
    pub fn time_raw_alloc_async_pairs(
        &self,
        stream: &Stream,
        size: u64,
        iters: usize,
    ) -> Result<Vec<Duration>> {
        if size == 0 {
            return Err(DeviceError::ZeroSize { what: "allocation" });
        }
        let s = self.stream(stream)?.cu_stream();
        self.bind()?;
        let pair = || -> Result<()> {
            // SAFETY: stream-ordered allocation freed on the same stream right after;
            // nothing else refers to it.
            unsafe {
                let p = result::malloc_async(s, size as usize).call("cuMemAllocAsync")?;
                result::free_async(p, s).call("cuMemFreeAsync")
            }
        };
        for _ in 0..16 {
            pair()?;
        }
        const BATCH: u32 = 10;
        let mut v = Vec::with_capacity(iters.div_ceil(BATCH as usize));
        for _ in 0..iters.div_ceil(BATCH as usize).max(1) {
            let t = std::time::Instant::now();
            for _ in 0..BATCH {
                pair()?;
            }
            v.push(t.elapsed() / BATCH);
        }
        sync_stream(&self.inner.ctx, self.stream(stream)?)?;
        Ok(v)
    }
}

/// Two streams and an event of the primary context, for timing the bare driver calls of an
/// event record and a cross-stream wait: the raw pair a runtime's events are compared with.
/// Made by [`CudaDevice::raw_event_pair`].
pub struct RawEventPair {
    ev: cudarc::driver::CudaEvent,
    a: Arc<CudaStream>,
    b: Arc<CudaStream>,
}

impl std::fmt::Debug for RawEventPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawEventPair")
    }
}

impl RawEventPair {
    /// Record the event on the first stream and make the second wait for it:
    /// `cuEventRecord` and `cuStreamWaitEvent`, with no context check, lock or count around
    /// them. Call it on a thread whose current context is the device's primary one (as
    /// [`CudaDevice::raw_event_pair`] leaves it, and as gpushare's own calls leave it).
    pub fn record_and_wait(&self) -> Result<()> {
        // SAFETY: the event and both streams are alive (owned here) and belong to the
        // primary context; waiting on an event of the same context is allowed.
        unsafe {
            result::event::record(self.ev.cu_event(), self.a.cu_stream()).call("cuEventRecord")?;
            result::stream::wait_event(
                self.b.cu_stream(),
                self.ev.cu_event(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .call("cuStreamWaitEvent")
        }
    }

    /// Wait on the host for both streams' work.
    pub fn synchronize(&self) -> Result<()> {
        sync_stream(self.a.context(), &self.a)?;
        sync_stream(self.b.context(), &self.b)
    }
}

impl CudaDevice {
    /// How many green contexts (the driver's SM partitions) this device has made and not
    /// yet destroyed: those of live splits, streams and events (a pinned buffer's last
    /// copy in a partition keeps an event there until its next copy), plus any left to the
    /// process because a cudarc handle made in one outlived it (a module loaded into a
    /// partition's context, say; logged when the partition ends).
    pub fn live_partitions(&self) -> usize {
        self.inner.green_live.load(Ordering::Relaxed)
    }

    /// Two new streams and an event of the primary context, for [`RawEventPair`]; leaves
    /// the primary context current on this thread.
    pub fn raw_event_pair(&self) -> Result<RawEventPair> {
        drain_stored_error(&self.inner.ctx);
        let a = self.inner.ctx.new_stream().call("cuStreamCreate")?;
        let b = self.inner.ctx.new_stream().call("cuStreamCreate")?;
        let ev = new_event(&self.inner.ctx, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        self.bind()?;
        Ok(RawEventPair { ev, a, b })
    }
}

impl CudaDevice {
    /// Churn through the driver's stream-ordered pool: allocate `fill` live blocks, then
    /// for each `(victim, size)` free that live block and allocate a new one in its place.
    /// Returns the time per free+alloc over each batch of `batch` steps.
    pub fn time_raw_async_churn(
        &self,
        stream: &Stream,
        fill: &[u64],
        steps: &[(usize, u64)],
        batch: usize,
    ) -> Result<Vec<Duration>> {
        if fill.is_empty()
            || fill.contains(&0)
            || steps.iter().any(|&(v, s)| s == 0 || v >= fill.len())
        {
            return Err(DeviceError::ZeroSize {
                what: "churn trace",
            });
        }
        let s = self.stream(stream)?.cu_stream();
        self.bind()?;
        let mut live = Vec::with_capacity(fill.len());
        let mut out = Vec::new();
        let mut run = || -> Result<()> {
            for &size in fill {
                // SAFETY: stream-ordered allocation, freed below on the same stream.
                live.push(Some(
                    unsafe { result::malloc_async(s, size as usize) }.call("cuMemAllocAsync")?,
                ));
            }
            for chunk in steps.chunks(batch.max(1)) {
                let t = std::time::Instant::now();
                for &(v, size) in chunk {
                    // SAFETY: `live[v]` came from cuMemAllocAsync on this stream; it is taken
                    // out before it is freed, so that a failure of the allocation after it
                    // leaves nothing to free twice.
                    unsafe {
                        if let Some(p) = live[v].take() {
                            result::free_async(p, s).call("cuMemFreeAsync")?;
                        }
                        live[v] =
                            Some(result::malloc_async(s, size as usize).call("cuMemAllocAsync")?);
                    }
                }
                // A chunk is never empty; its length may not fit a u32.
                out.push(t.elapsed().div_f64(chunk.len() as f64));
            }
            Ok(())
        };
        let r = run();
        for p in live.into_iter().flatten() {
            // SAFETY: each pointer is a live allocation of this stream, freed once.
            let _ = unsafe { result::free_async(p, s) };
        }
        sync_stream(&self.inner.ctx, self.stream(stream)?)?;
        r.map(|()| out)
    }

    fn make_green(&self, res: &mut sys::CUdevResource) -> Result<Arc<GreenCtx>> {
        let mut desc: sys::CUdevResourceDesc = std::ptr::null_mut();
        // SAFETY: `res` is an SM resource filled by the driver; desc is an out-pointer.
        unsafe { sys::cuDevResourceGenerateDesc(&mut desc, res, 1) }
            .result()
            .call("cuDevResourceGenerateDesc")?;
        let mut handle: sys::CUgreenCtx = std::ptr::null_mut();
        let dev = self.inner.ctx.cu_device();
        // SAFETY: valid descriptor and out-pointer.
        unsafe {
            sys::cuGreenCtxCreate(
                &mut handle,
                desc,
                dev,
                sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as u32,
            )
        }
        .result()
        .call("cuGreenCtxCreate")?;
        let mut raw_ctx: sys::CUcontext = std::ptr::null_mut();
        // cudarc's wrapper (below) makes the context current and reads an attribute of the
        // device, and drops itself if either fails, destroying the context with
        // cuCtxDestroy, which a green context's handle must never go through. So both are
        // done here first, where a failure destroys the green context the right way.
        let checked = (|| {
            // SAFETY: `handle` is a live green context; out-pointer valid.
            unsafe { sys::cuCtxFromGreenCtx(&mut raw_ctx, handle) }
                .result()
                .call("cuCtxFromGreenCtx")?;
            // SAFETY: `raw_ctx` is the live green context's handle, made current on this
            // thread only for the calls below.
            unsafe { result::ctx::set_current(raw_ctx) }.call("cuCtxSetCurrent")?;
            // SAFETY: `dev` is this device's handle, valid while the driver is loaded.
            unsafe {
                result::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED,
                )
            }
            .call("cuDeviceGetAttribute")
        })();
        if let Err(e) = checked {
            // Not current on this thread when it goes.
            let _ = self.bind();
            // SAFETY: created above and not shared; destroyed once.
            let _ = unsafe { sys::cuGreenCtxDestroy(handle) };
            return Err(e);
        }
        // SAFETY: `raw_ctx` is a valid context of this device. Its wrapper is never dropped
        // (see GreenCtx::ctx), so cudarc never destroys it.
        let ctx = match unsafe {
            CudaContext::from_raw_context(self.inner.info.ordinal, dev, raw_ctx)
        } {
            Ok(c) => ManuallyDrop::new(c),
            Err(e) => {
                // The same two calls just succeeded, so this is not expected. cudarc has
                // dropped its wrapper, which may have destroyed the context already: it
                // is left alone rather than destroyed twice.
                tracing::error!(error = %e, "wrapping a green context failed; it is left to the process");
                let _ = self.bind();
                return Err(DeviceError::Driver {
                    call: "CudaContext::from_raw_context (cuCtxSetCurrent, cuDeviceGetAttribute)",
                    source: e,
                });
            }
        };
        self.inner.green_live.fetch_add(1, Ordering::Relaxed);
        let green = Arc::new(GreenCtx {
            handle,
            ctx,
            primary: self.inner.ctx.clone(),
            live: self.inner.green_live.clone(),
            current: parking_lot::ReentrantMutex::new(()),
            spare: parking_lot::Mutex::new(Vec::new()),
        });
        // Leave the primary context current for the caller's next calls.
        self.bind()?;
        Ok(green)
    }
}

fn no_vmm() -> DeviceError {
    DeviceError::Unsupported {
        what: "virtual memory management",
        reason: "the device does not support it; use Device::alloc_linear".into(),
    }
}
