//! The runtime: one device, one pool, admission, partitions, and the contexts on them.

use crate::context::{BufMeta, Context, CtxInner};
use crate::error::{Result, RuntimeError};
use crate::partitions::DeviceSms;
use crate::{Config, EvictPolicy};
use gpushare_device::{
    check_granularity, open, BackendChoice, Device, DevicePtr, DeviceRange, EventFlags,
    LinearSource, Stream, VmmSource,
};
use gpushare_pool::{
    ChunkSource, EvictError, EvictableKey, Eviction, Evictor, Pool, PoolConfig, RestoreInfo,
    VictimInfo,
};
use gpushare_qos::{
    AdmissionConfig, AdmissionEvaluator, ContextSpec, PartitionConfig, PartitionLimits,
    PartitionManager, QosError, SessionGate, Tier, TierLock,
};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;
use std::time::Duration;

/// The pool type the runtime uses: VMM where the device has it, plain chunks otherwise.
pub(crate) type DevPool = Pool<Box<dyn ChunkSource>>;

/// What a memory-pressure handler decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    /// It freed what it could (perhaps nothing: see [`PressureInfo::available`]); the
    /// round goes on to the next handler, and the request is tried again after the last.
    Allow,
    /// Refuse the request: the round ends here and no later handler is asked. A buffer,
    /// scratch, or restore for [`crate::Session::range`] or [`crate::Session::borrow`]
    /// fails (out of memory, with [`crate::RuntimeError::PressureDenied`]); a session's try
    /// goes on as it would without handlers: it tries again if memory was released
    /// meanwhile, else waits for memory that live sessions or queued frees release, and
    /// fails with [`crate::RuntimeError::OutOfMemory`] if there are none.
    Deny,
}

/// What a memory-pressure handler is told.
#[derive(Debug)]
pub struct PressureInfo<'a> {
    /// The context whose request ran short.
    pub context: &'a Context,
    /// Bytes it asked for.
    pub requested: u64,
    /// Bytes the runtime could still hand out, read just before this handler is called:
    /// it counts what the handlers before it in the round freed, once that memory's work
    /// on the GPU is done. A handler that finds it at least `requested` may allow without
    /// freeing anything, though the retry may still fail: the free memory may be in
    /// pieces, or reserved as other contexts' bases, or the request may exceed its
    /// context's budget.
    pub available: u64,
}

/// A memory-pressure handler: it may free memory (drop buffers, shrink a KV cache) and
/// returns whether the request may go on (see [`Pressure`]).
///
/// Handlers are the last step of the reclaim order. When a request (a buffer, scratch, a
/// session's working set, a restore for `Session::range` or `Session::borrow`) does not
/// fit, the pool first takes free cached memory, then evicts unpinned buffers: BestEffort
/// ones, then Burstable ones above their base, least recently used first; Guaranteed
/// buffers are never evicted. Only if that is not enough does a round of handlers run, on
/// the requesting thread: the contexts' handlers from BestEffort to Guaranteed (each
/// context's in registration order), then the runtime's. Each is told what the others
/// before it left available. The first [`Pressure::Deny`], or a handler's panic (logged),
/// ends the round and refuses the request. When every handler allows, the request is tried
/// again: a buffer, scratch or restore once, waiting first for memory freed behind work
/// still queued on a stream; a session's try as any try, which waits in line (for such
/// memory too) if it still does not fit. A session's try asks the handlers once.
///
/// A handler runs inside the request that ran short, perhaps that of the session first in
/// line. So what it does on its own thread meets no handlers of its own: a buffer it
/// creates or a session it opens fails with [`crate::RuntimeError::OutOfMemory`] if memory
/// is short. Such a session goes ahead of the line and never waits in it (it waits only
/// for memory freed behind queued work), whether opened with `session`,
/// `session_timeout` or a blocked-on `session_async`, whose restores then run in the
/// poll.
pub type PressureHandler = Arc<dyn Fn(&PressureInfo<'_>) -> Pressure + Send + Sync>;

/// The memory-pressure handlers of a context or of the runtime, in registration order.
#[derive(Default)]
pub(crate) struct Handlers {
    next: AtomicU64,
    list: Mutex<Vec<(u64, PressureHandler)>>,
}

impl Handlers {
    /// Register `handler` until the returned registration drops.
    pub fn register(self: &Arc<Self>, handler: PressureHandler) -> PressureRegistration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.list.lock().push((id, handler));
        PressureRegistration {
            handlers: Arc::downgrade(self),
            id,
        }
    }

    /// The handlers registered now.
    pub fn current(&self) -> Vec<PressureHandler> {
        self.list.lock().iter().map(|(_, h)| h.clone()).collect()
    }
}

/// Keeps a memory-pressure handler registered; dropping it unregisters the handler. The
/// handler, with whatever it owns, is dropped then, or, if a round of handlers is running
/// on another thread at that moment, when that round ends: the round runs the handlers
/// it started with. `let _ = ctx.on_memory_pressure(..)` unregisters the handler at once.
///
/// Handlers often own what they free, such as a cache of buffers. A buffer keeps its
/// context alive, and a context keeps its handlers, so a handler registered for good that
/// owns a buffer would keep its context, and the context's budget, reservation and
/// partition, for the life of the process. Dropping the registration ends that: keep it
/// with the model that the handler serves.
#[must_use = "the handler is unregistered when this is dropped; keep it while the handler should run"]
pub struct PressureRegistration {
    handlers: Weak<Handlers>,
    id: u64,
}

impl std::fmt::Debug for PressureRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PressureRegistration")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for PressureRegistration {
    fn drop(&mut self) {
        let Some(handlers) = self.handlers.upgrade() else {
            return;
        };
        let removed = {
            let mut list = handlers.list.lock();
            let at = list.iter().position(|(id, _)| *id == self.id);
            at.map(|i| list.remove(i))
        };
        // Dropped with the lock free: the handler may own buffers, whose release frees
        // memory (and may end its context).
        drop(removed);
    }
}

/// Builds a [`Runtime`]. Explicit settings win over `GPUSHARE_*` variables, which win over
/// the defaults.
#[derive(Default)]
pub struct RuntimeBuilder {
    device: Option<Arc<dyn Device>>,
    choice: Option<BackendChoice>,
    memory_fraction: Option<f64>,
    memory_limit: Option<u64>,
    overcommit: Option<f64>,
    policy: Option<EvictPolicy>,
    partitions: Vec<(String, PartitionLimits)>,
    aging: Option<Duration>,
}

/// A bad setting, named by the builder's method that takes it rather than by the
/// admission evaluator's field.
fn builder_setting(e: QosError) -> RuntimeError {
    match e {
        QosError::BadConfig {
            what,
            value,
            expected,
        } => RuntimeError::Qos(QosError::BadConfig {
            what: match what {
                "usable_fraction" => "RuntimeBuilder::memory_fraction",
                "usable_limit" => "RuntimeBuilder::memory_limit",
                "overcommit" => "RuntimeBuilder::overcommit",
                "aging" => "RuntimeBuilder::aging",
                w => w,
            },
            value,
            expected,
        }),
        e => e.into(),
    }
}

impl RuntimeBuilder {
    /// Pick the backend (default: `GPUSHARE_DEVICE`, else auto).
    pub fn device(mut self, choice: BackendChoice) -> Self {
        self.choice = Some(choice);
        self
    }
    /// Use this device.
    pub fn with_device(mut self, dev: Arc<dyn Device>) -> Self {
        self.device = Some(dev);
        self
    }
    /// Fraction of device memory the runtime uses (default 0.9). At most what is free when
    /// the runtime is built: memory others hold then is not the runtime's to promise.
    pub fn memory_fraction(mut self, f: f64) -> Self {
        self.memory_fraction = Some(f);
        self
    }
    /// Cap the memory the runtime uses at `bytes`, whatever the fraction allows (default: no
    /// cap). Useful on a GPU shared with other processes, and for a small runtime on a large
    /// device, as in tests.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }
    /// Admission overcommit ratio (default 1.0, off): the contexts' maxima may add up to
    /// `ratio` times the memory, to be met by evicting their buffers. Reserved bases still
    /// add up to the memory at most. Above 1.0, a base is only as good as what eviction can
    /// free: memory that other contexts hold and that cannot be evicted (live sessions'
    /// scratch, pinned buffers) is not given back until they let it go, and a request
    /// inside a base meanwhile fails with out of memory.
    pub fn overcommit(mut self, ratio: f64) -> Self {
        self.overcommit = Some(ratio);
        self
    }
    /// Default eviction policy of buffers (default offload).
    pub fn evict_policy(mut self, p: EvictPolicy) -> Self {
        self.policy = Some(p);
        self
    }
    /// Declare a partition up front; its compute share becomes an SM split at build time.
    pub fn partition(mut self, name: impl Into<String>, limits: PartitionLimits) -> Self {
        self.partitions.push((name.into(), limits));
        self
    }
    /// How fast waiting sessions and admissions rise a tier (default 1 s). It is also how
    /// long new sessions whose buffers are in place may go ahead of the first session in
    /// line before they wait behind it (longer for a higher tier than its own): a longer
    /// period switches contexts less often, a shorter one bounds a waiter's wait tighter.
    pub fn aging(mut self, d: Duration) -> Self {
        self.aging = Some(d);
        self
    }

    /// Open the device and set everything up.
    pub fn build(self) -> Result<Runtime> {
        let env = Config::from_env_except(|k| match k {
            crate::config::ENV_DEVICE => self.device.is_some() || self.choice.is_some(),
            crate::config::ENV_MEMORY_FRACTION => self.memory_fraction.is_some(),
            crate::config::ENV_OVERCOMMIT => self.overcommit.is_some(),
            crate::config::ENV_OFFLOAD => self.policy.is_some(),
            _ => false,
        })?;
        let dev = match self.device {
            Some(d) => d,
            None => open(self.choice.unwrap_or(env.device))?,
        };
        let fraction = self.memory_fraction.or(env.memory_fraction).unwrap_or(0.9);
        let overcommit = self.overcommit.or(env.overcommit).unwrap_or(1.0);
        let policy = self
            .policy
            .or(env.evict_policy)
            .unwrap_or(EvictPolicy::Offload);
        let aging = self.aging.unwrap_or(Duration::from_secs(1));
        let info = dev.info().clone();
        let admission_cfg = AdmissionConfig {
            usable_limit: self.memory_limit,
            ..AdmissionConfig::default()
        }
        .usable_fraction(fraction)
        .overcommit(overcommit)
        .aging(aging);
        let asked = AdmissionEvaluator::new(info.total_memory, admission_cfg.clone())
            .map_err(builder_setting)?
            .capacity();
        // Memory that others hold now (another process, this one's own CUDA work) is not
        // the runtime's to promise: admission would accept Guaranteed bases that the
        // device cannot back.
        let free = dev.mem_info()?.free;
        let usable = asked.min(free);
        if usable < asked {
            tracing::warn!(
                asked,
                free,
                "gpushare: less device memory is free than the fraction and limit ask for; the runtime manages what is free"
            );
        }
        let g = check_granularity(info.granularity)?;
        if usable < g {
            return Err(RuntimeError::Pool(gpushare_pool::PoolError::BadConfig(format!(
                "the usable memory ({usable} B) is less than one {g}-byte allocation granule of the device; raise the memory limit or fraction"
            ))));
        }
        // The pool maps whole granules, so admission promises only what it can map: a base
        // that fits the unrounded figure but not the pool is a rejection with the numbers,
        // and partitions are planned within the same capacity.
        let capacity = usable / g * g;
        let admission =
            AdmissionEvaluator::new(info.total_memory, admission_cfg.usable_limit(capacity))?;
        let source: Box<dyn ChunkSource> = if info.vmm_supported {
            Box::new(VmmSource::new(dev.clone(), capacity)?)
        } else {
            Box::new(LinearSource::new(dev.clone(), capacity.saturating_mul(2)))
        };
        let pool = Pool::new(source, PoolConfig::default().capacity(capacity))
            .map_err(|e| RuntimeError::from_pool(e, "runtime"))?;
        let mut parts = PartitionManager::new(PartitionConfig::new(capacity))?;
        for (name, limits) in &self.partitions {
            parts.create_partition(name, *limits)?;
        }
        let sms = DeviceSms::new(dev.clone());
        parts.realize(&sms)?;
        let copy_stream = dev.create_stream(info.priority_range.greatest)?;
        let buffers: Arc<Mutex<HashMap<EvictableKey, BufMeta>>> = Arc::default();
        let pool = Arc::new(pool);
        let waits = Arc::new(SessionGate::new(aging));
        let contexts: Arc<Mutex<Vec<Weak<CtxInner>>>> = Arc::default();
        let holds = Arc::new(Holds::default());
        pool.set_evictor(Arc::new(Offloader {
            dev: dev.clone(),
            stream: CopyStream::new(copy_stream),
            buffers: buffers.clone(),
            waits: waits.clone(),
            contexts: contexts.clone(),
            holds: holds.clone(),
            walked_at: AtomicU64::new(0),
            walked_kept: AtomicU64::new(0),
        }));
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Ok(Runtime {
            inner: Arc::new(RtInner {
                id: NEXT.fetch_add(1, Ordering::Relaxed),
                dev,
                pool,
                admission,
                parts: Mutex::new(parts),
                sms,
                capacity,
                policy,
                buffers,
                contexts,
                holds,
                handlers: Arc::default(),
                waits,
                next_stream: AtomicU64::new(1),
                pin_lock: TierLock::new(aging),
                create_lock: Mutex::new(()),
                names: Mutex::default(),
                teardowns: Arc::default(),
                handles: AtomicUsize::new(1),
            }),
        })
    }
}

pub(crate) struct RtInner {
    pub id: u64,
    pub dev: Arc<dyn Device>,
    pub pool: Arc<DevPool>,
    pub admission: AdmissionEvaluator,
    pub parts: Mutex<PartitionManager>,
    pub sms: DeviceSms,
    pub capacity: u64,
    pub policy: EvictPolicy,
    pub buffers: Arc<Mutex<HashMap<EvictableKey, BufMeta>>>,
    pub contexts: Arc<Mutex<Vec<Weak<CtxInner>>>>,
    /// Contexts' holds on their buffers between sessions that the pool would let go.
    pub holds: Arc<Holds>,
    pub handlers: Arc<Handlers>,
    /// Waiting sessions, live sessions and pending frees: the protocol sessions wait under.
    /// Shared with host callbacks, which must not hold anything whose release is a device
    /// call.
    pub waits: Arc<SessionGate>,
    pub next_stream: AtomicU64,
    /// Held while a session pins its working set, so that two sessions never each hold
    /// part of what they need while waiting for the rest (hold and wait). Sessions that
    /// wait for it are served in tier order with aging: a restore can take long, and a
    /// Guaranteed context should wait for the one under way only, not for every
    /// lower-tier context that asked first.
    pub pin_lock: TierLock,
    /// Held while a context is created, so that two contexts of one name cannot both pass
    /// the check, and partitions are not split anew under a context being placed.
    pub create_lock: Mutex<()>,
    /// Names of the contexts made and not yet wholly dropped (see `Context::create`).
    pub names: Mutex<std::collections::HashSet<String>>,
    /// Contexts being torn down on threads of their own (see [`let_go`]).
    pub teardowns: Arc<Teardowns>,
    /// `Runtime` handles alive (contexts hold this state too, without a handle).
    pub handles: AtomicUsize,
}

impl RtInner {
    /// Drop the offloader's entry of a freed buffer. The entry may hold the last reference
    /// to the buffer's pinned staging, whose free (on CUDA a host-memory free that may take
    /// a while) runs once the map's lock is let go: evictions take that lock under the
    /// pool's.
    pub fn forget_buffer(&self, key: EvictableKey) {
        let meta = self.buffers.lock().remove(&key);
        drop(meta);
    }

    /// Run `f`; if memory ran short while stream-ordered frees were pending (memory whose
    /// queued work is still running), wait for those (blocking the thread) and run it once
    /// more: that memory comes back without anyone's help.
    pub fn waiting_for_frees<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        match f() {
            Err(e) if e.is_oom() && self.pool.wait_pending() > 0 => f(),
            r => r,
        }
    }

    /// Bytes the runtime could hand out now: not live, not waiting for queued work to
    /// finish with them (a stream-ordered free goes to other streams only then), and not
    /// retired after a fault. Blocks that the contexts' caches keep count as available:
    /// any request takes them when it runs short.
    pub fn available(&self) -> u64 {
        self.available_in(&self.pool.stats())
    }

    /// [`RtInner::available`] from pool statistics already taken.
    fn available_in(&self, s: &gpushare_pool::PoolStats) -> u64 {
        let unavailable = [
            s.live_bytes,
            s.pending_bytes,
            s.cached_pending_bytes,
            s.retired_bytes,
        ];
        self.capacity
            .saturating_sub(unavailable.into_iter().fold(0, u64::saturating_add))
    }

    /// Run pressure handlers in reclaim order: contexts from BestEffort to Guaranteed,
    /// then the runtime's. A panicking handler is logged and counts as a denial. `None`
    /// when no handler is registered, and when a handler is already running on this thread:
    /// a shortage met by what a handler does (a session it opens, a buffer it makes) is
    /// that handler's to handle, and asking the handlers again would recurse without end.
    pub fn relieve(&self, requester: &Context, requested: u64) -> Option<Pressure> {
        if crate::session::in_pressure_handler() {
            return None;
        }
        let mut ctxs: Vec<Arc<CtxInner>> = self
            .contexts
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        ctxs.sort_by_key(|c| std::cmp::Reverse(c.tier.rank()));
        let mut handlers: Vec<PressureHandler> =
            ctxs.iter().flat_map(|c| c.handlers.current()).collect();
        handlers.extend(self.handlers.current());
        if handlers.is_empty() {
            return None;
        }
        // A session a handler opens goes ahead of the line (see `in_pressure_handler`).
        let _scope = crate::session::HandlerScope::enter();
        let mut handlers = handlers.into_iter();
        let mut answer = Pressure::Allow;
        for h in handlers.by_ref() {
            let info = PressureInfo {
                context: requester,
                requested,
                available: self.available(),
            };
            // The handler may be the last reference to its closure (its registration was
            // dropped meanwhile, perhaps by a handler before it): its drop, here, runs the
            // drops of whatever it owns, and a panic there is contained as one in the call.
            match catch_unwind(AssertUnwindSafe(move || {
                let r = h(&info);
                drop(h);
                r
            })) {
                Ok(Pressure::Allow) => {}
                Ok(Pressure::Deny) => {
                    answer = Pressure::Deny;
                    break;
                }
                Err(_) => {
                    tracing::error!(context = %requester.name(), "a memory-pressure handler panicked; treating it as a denial");
                    answer = Pressure::Deny;
                    break;
                }
            }
        }
        // Those not asked go too: contained as well.
        if catch_unwind(AssertUnwindSafe(move || drop(handlers))).is_err() {
            tracing::error!(context = %requester.name(), "a memory-pressure handler panicked when dropped");
        }
        Some(answer)
    }

    /// Join the session queue, in the group of context `group` (see [`CtxInner::group`]);
    /// `None` if the line is full.
    pub fn enqueue(&self, tier: Tier, group: u64, waker: &Waker) -> Option<u64> {
        self.waits.enqueue(tier.rank(), group, waker)
    }

    /// Whether waiter `id` is first in line (registering its waker).
    pub fn is_head(&self, id: u64, waker: &Waker) -> bool {
        self.waits.is_head(id, waker)
    }

    /// Leave the queue (served or cancelled), waking the next in line if this was the
    /// first; when `served`, wake the other waiters of context group `group` too.
    pub fn dequeue(&self, id: u64, group: u64, served: bool) {
        if served {
            self.waits.served(id, group);
        } else {
            self.waits.remove(id);
        }
    }

    /// Memory was released: let waiting sessions try again.
    pub fn wake_waiters(&self) {
        self.waits.released();
    }
}

/// Moves evicted buffers out to pinned host memory (or drops them) and back.
///
/// A session's work on a buffer may still be running on its context's stream after the
/// session has ended (ending one does not wait for the GPU). So before it touches a
/// buffer's memory, the offloader fences on the tail of the owner's stream: an offload
/// copies what that work wrote, a discard hands the memory on only once that work is done,
/// and a restore writes only after whatever that stream was still doing with the memory
/// it reuses. The cost, one event record and wait, falls on eviction and restore only.
struct Offloader {
    dev: Arc<dyn Device>,
    stream: CopyStream,
    buffers: Arc<Mutex<HashMap<EvictableKey, BufMeta>>>,
    /// Woken when a buffer dropped while its bytes moved out has gone (see
    /// [`Evictor::freed_while_moving`]): its drop woke waiting sessions before that.
    waits: Arc<SessionGate>,
    /// The runtime's contexts, and how many keep a hold the pool could use: the holds no
    /// session rides go before the pool chooses a victim.
    contexts: Arc<Mutex<Vec<Weak<CtxInner>>>>,
    holds: Arc<Holds>,
    /// One more than the session gate's release clock at the last walk of the contexts
    /// for idle holds (0: none yet). A hold goes idle only at a session's end, which moves
    /// the clock after it: with the clock where it was, a walk would find nothing new, so
    /// none is made (a request waiting on pending frees asks every millisecond).
    walked_at: AtomicU64,
    /// [`Holds::kept`] at the last walk: a hold kept since then went idle before the clock
    /// moved (the session that kept it ends after), so the walk may have missed it.
    walked_kept: AtomicU64,
}

/// The stream of the offload and restore copies, shared by every context's moves.
///
/// A copy that faults as it runs breaks its stream for good where the device keeps faults
/// to their stream (the simulated device does): the next move then gets a new stream, so
/// that one bad copy does not fail every later offload and restore of every context. On
/// CUDA a fault comes back as the driver's error, not a broken stream, and loses the
/// whole context, which no new stream brings back: nothing is replaced there.
#[derive(Clone)]
struct CopyStream(Arc<Mutex<Stream>>);

impl CopyStream {
    fn new(stream: Stream) -> Self {
        CopyStream(Arc::new(Mutex::new(stream)))
    }

    /// The stream to queue a move on now.
    fn get(&self) -> Stream {
        self.0.lock().clone()
    }

    /// Queue a copy on the stream with `queue` and wait for it (see [`copy_and_wait`]); if
    /// the stream turns out broken, replace it (unless another move already did).
    fn copy(
        &self,
        dev: &dyn Device,
        queue: impl FnOnce(&Stream) -> gpushare_device::Result<()>,
    ) -> gpushare_device::Result<()> {
        let used = self.get();
        let r = copy_and_wait(dev, &used, || queue(&used));
        if let Err(gpushare_device::DeviceError::StreamBroken(why)) = &r {
            let mut s = self.0.lock();
            if s.same_stream(&used) {
                match dev.create_stream(used.priority()) {
                    Ok(fresh) => {
                        tracing::warn!(error = %why, "a copy broke the runtime's copy stream; later moves use a new one");
                        let broken = std::mem::replace(&mut *s, fresh);
                        // Let go with the lock free: other moves may still hold it.
                        drop(s);
                        drop(broken);
                    }
                    Err(e) => {
                        tracing::error!(error = %why, renew = %e, "a copy broke the runtime's copy stream, and no new one can be made");
                    }
                }
            }
        }
        r
    }
}

/// Contexts that keep a hold on their buffers between sessions (see
/// [`CtxInner::end_use`]) that the pool would have let go: holds of Guaranteed contexts and
/// empty ones do not count.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    /// How many there are. Changed only when a hold is kept, grows from nothing or is let
    /// go, not per session.
    pub count: AtomicUsize,
    /// How many times one was kept.
    pub kept: AtomicU64,
}

/// Let go of the holds of the contexts of `contexts` that no use relies on, the least
/// recently used first: their buffers join the pool's least-recently-used order in that
/// order, behind the buffers unpinned before (whose last use came before every hold).
/// Without `all`, Guaranteed contexts keep theirs: their buffers are never evicted, so
/// letting go would only make their next session pin again.
///
/// Returns the references it took. A context whose other handles all went meanwhile goes
/// with them: the pool's request that asked drops them at once, with no lock held that the
/// context's drop takes, so that its memory is back before the retry; a bystander hands
/// them to [`let_go`].
pub(crate) fn release_holds(
    contexts: &Mutex<Vec<Weak<CtxInner>>>,
    all: bool,
) -> Vec<Arc<CtxInner>> {
    let ctxs: Vec<Arc<CtxInner>> = contexts.lock().iter().filter_map(Weak::upgrade).collect();
    let mut held: Vec<&Arc<CtxInner>> = ctxs
        .iter()
        .filter(|c| all || c.tier != Tier::Guaranteed)
        .filter(|c| c.held.load(Ordering::Relaxed) != crate::context::NO_HOLD)
        .collect();
    held.sort_by_key(|c| c.last_used.load(Ordering::Relaxed));
    for c in held {
        let slots = c.buffers.lock();
        c.release_hold(&slots);
    }
    ctxs
}

impl Offloader {
    /// An event at the current tail of `owner`. A fresh one each time: an event recorded
    /// on a partition's stream holds the partition's context, which must be able to go
    /// with its runtime context.
    ///
    /// `None` when `owner` is broken: a broken stream runs no more work that touches memory
    /// (see [`DeviceError::StreamBroken`](gpushare_device::DeviceError::StreamBroken)), so
    /// there is nothing to wait for, and a context whose kernel faulted must not keep
    /// memory that other contexts (a Guaranteed one's base, say) need.
    fn fence(&self, owner: &Stream) -> gpushare_device::Result<Option<gpushare_device::Event>> {
        // Waiting for the owner's work may take as long as its longest kernel: the thread
        // that waits sleeps (several eviction finishes may wait at once).
        let fence = self.dev.create_event(EventFlags::blocking_sync())?;
        match self.dev.record_event(&fence, owner) {
            Ok(()) => Ok(Some(fence)),
            Err(gpushare_device::DeviceError::StreamBroken(why)) => {
                tracing::debug!(%why, "the owner's stream is broken; nothing to fence on");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Block until everything queued on `owner` so far has run.
    fn wait_owner(&self, owner: &Stream) -> gpushare_device::Result<()> {
        match self.fence(owner)? {
            Some(fence) => wait_fence(self.dev.as_ref(), &fence),
            None => Ok(()),
        }
    }
}

/// Wait on the host for a fence recorded on an owner's stream. A fence recorded before
/// the stream faulted, and reached after, reports the fault; that stream runs no more work
/// that touches memory either way, so there is nothing left to wait for (see
/// [`Offloader::fence`]).
fn wait_fence(dev: &dyn Device, fence: &gpushare_device::Event) -> gpushare_device::Result<()> {
    match dev.synchronize_event(fence) {
        Err(gpushare_device::DeviceError::StreamBroken(why)) => {
            tracing::debug!(%why, "the owner's stream faulted; nothing to fence on");
            Ok(())
        }
        r => r,
    }
}

/// Queue a copy on the copy stream `copies` with `queue`, and wait for it (and for the copies
/// queued before it there) through an event: not the whole stream, to which other moves may
/// add meanwhile.
///
/// It returns only once the copy is over, error or not: the pool hands a failed restore's
/// memory to other requests, where a copy still landing would overwrite their bytes. If
/// the event cannot be made, recorded or waited for, it waits for the whole stream. Should
/// that fail too, the device has failed (a CUDA context with a sticky error runs nothing
/// more), and the error is logged. The first error is what comes back even when the
/// stream's wait shows the copy done: a restore is then reported failed, and the buffer
/// stays evicted, which errs on the safe side.
fn copy_and_wait(
    dev: &dyn Device,
    copies: &Stream,
    queue: impl FnOnce() -> gpushare_device::Result<()>,
) -> gpushare_device::Result<()> {
    queue()?;
    // A large copy takes milliseconds (8 GiB, about 160 ms): the thread sleeps meanwhile.
    let waited = dev
        .create_event(EventFlags::blocking_sync())
        .and_then(|done| {
            dev.record_event(&done, copies)?;
            dev.synchronize_event(&done)
        });
    if let Err(e) = &waited {
        if let Err(again) = dev.synchronize_stream(copies) {
            tracing::error!(error = %e, wait = %again, "a queued copy could not be waited for");
        }
    }
    waited
}

/// Eviction runs in two halves (see [`Eviction`]): under the pool's lock `evict` only
/// records a fence on the owner's stream; the finish, which the pool runs with its lock
/// free, waits for that fence on the host and then copies. Restore is called without the
/// pool's lock and does the same. Nothing waits for an owner's work on the GPU side of the
/// shared copy stream: that would hold up every other context's moves behind it.
impl Evictor for Offloader {
    fn evict(&self, v: &VictimInfo) -> std::result::Result<Eviction, EvictError> {
        let e = |e: gpushare_device::DeviceError| EvictError(format!("offloading failed: {e}"));
        let bufs = self.buffers.lock();
        let Some(meta) = bufs.get(&v.id) else {
            return Err(EvictError("unknown buffer".into()));
        };
        let fence = self.fence(&meta.stream).map_err(e)?;
        let dev = self.dev.clone();
        match meta.policy {
            EvictPolicy::Discard => {
                // The memory is handed on once the eviction ends: the owner's work must be
                // done by then.
                let discarded = meta.discarded.clone();
                Ok(Eviction::in_flight(move || {
                    if let Some(fence) = fence {
                        wait_fence(dev.as_ref(), &fence).map_err(e)?;
                    }
                    discarded.store(true, Ordering::Release);
                    Ok(())
                }))
            }
            EvictPolicy::Offload => {
                // Staging was pinned with the buffer, so eviction only copies. The finish
                // holds it: it outlives the copy whatever happens to the buffer's entry.
                let host = meta
                    .host
                    .clone()
                    .ok_or_else(|| EvictError("the buffer has no pinned staging".into()))?;
                // The staging holds the requested bytes; the block may be a little larger
                // (the pool rounds to its unit), and the tail past the request is not data.
                let src = DeviceRange::new(DevicePtr(v.addr), host.len().min(v.size));
                let copies = self.stream.clone();
                Ok(Eviction::in_flight(move || {
                    if let Some(fence) = fence {
                        wait_fence(dev.as_ref(), &fence).map_err(e)?;
                    }
                    copies
                        .copy(dev.as_ref(), |s| dev.copy_dtoh(host.full(), src, s))
                        .map_err(e)
                }))
            }
        }
    }

    fn freed_while_moving(&self, _: EvictableKey) {
        // The buffer's entry went with its drop; its staging goes with the eviction's finish.
        self.waits.released();
    }

    fn holds_idle_pins(&self) -> bool {
        self.holds.count.load(Ordering::Relaxed) > 0
            && (self.walked_at.load(Ordering::Relaxed) != self.waits.clock() + 1
                || self.walked_kept.load(Ordering::Relaxed)
                    != self.holds.kept.load(Ordering::Acquire))
    }

    fn release_idle_pins(&self) {
        // The clock is read before the walk: a session that ends during it moves the clock
        // again, and the next ask walks. It is stored after the walk: a request that asks
        // while another's walk is under way walks too (what the first has let go, it finds
        // let go), where seeing the walk as done it would pick its victims, or give up,
        // with the idle holds still pinned.
        let (clock, kept) = (self.waits.clock(), self.holds.kept.load(Ordering::Acquire));
        drop(release_holds(&self.contexts, false));
        self.walked_at.store(clock + 1, Ordering::Relaxed);
        self.walked_kept.store(kept, Ordering::Relaxed);
    }

    fn restore(&self, r: &RestoreInfo) -> std::result::Result<(), EvictError> {
        let e = |e: gpushare_device::DeviceError| EvictError(format!("restoring failed: {e}"));
        // Take what the copy needs and let the table go: an eviction that another request
        // starts meanwhile (under the pool's lock) looks its victim up there.
        let (policy, host, owner) = {
            let bufs = self.buffers.lock();
            let Some(meta) = bufs.get(&r.id) else {
                return Err(EvictError("unknown buffer".into()));
            };
            (meta.policy, meta.host.clone(), meta.stream.clone())
        };
        // The pool may reuse memory freed in order on the owner's stream, and a borrower
        // uses it on another: the owner's work queued so far goes first.
        self.wait_owner(&owner).map_err(e)?;
        match (policy, host) {
            (EvictPolicy::Offload, Some(host)) => {
                let dst = DeviceRange::new(DevicePtr(r.addr), host.len().min(r.size));
                self.stream
                    .copy(self.dev.as_ref(), |s| {
                        self.dev.copy_htod(dst, host.full(), s)
                    })
                    .map_err(e)
            }
            // Discarded contents are gone; the owner sees the flag and reloads.
            (EvictPolicy::Discard, _) => Ok(()),
            (EvictPolicy::Offload, None) => {
                Err(EvictError("the buffer has no pinned staging".into()))
            }
        }
    }
}

/// The runtime: contexts on one device sharing one pool. Cheap to clone.
pub struct Runtime {
    pub(crate) inner: Arc<RtInner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("device", &self.inner.dev.info().name)
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

/// One row of a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContextRow {
    /// Name.
    pub name: String,
    /// Tier.
    pub tier: String,
    /// Budget.
    pub max_bytes: u64,
    /// Reserved by admission.
    pub reserved_bytes: u64,
    /// In use now (live and cached).
    pub used_bytes: u64,
    /// Peak of `used_bytes`.
    pub peak_bytes: u64,
    /// Bytes of its buffers on the device.
    pub resident_bytes: u64,
    /// Bytes of its buffers evicted.
    pub evicted_bytes: u64,
    /// Live sessions, sessions pinning (restoring) their working sets, and borrows of its
    /// buffers by other contexts' sessions.
    pub sessions: u64,
    /// Evictions of its buffers.
    pub evictions: u64,
    /// Restores of its buffers.
    pub restores: u64,
}

/// The runtime at one moment: device, memory and a row per context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Device name.
    pub device: String,
    /// Backend.
    pub backend: String,
    /// Device memory.
    pub total_bytes: u64,
    /// Memory the runtime manages.
    pub capacity_bytes: u64,
    /// Memory it could still hand out.
    pub available_bytes: u64,
    /// Contexts.
    pub contexts: Vec<ContextRow>,
}

impl Snapshot {
    /// As JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "{} ({}): {:.0} MiB managed of {:.0} MiB, {:.0} MiB available",
            self.device,
            self.backend,
            mib(self.capacity_bytes),
            mib(self.total_bytes),
            mib(self.available_bytes)
        )?;
        writeln!(f, "| context | tier | max MiB | reserved MiB | used MiB | peak MiB | resident MiB | evicted MiB | live uses | evictions | restores |")?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for c in &self.contexts {
            writeln!(
                f,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                c.name,
                c.tier,
                mib(c.max_bytes),
                mib(c.reserved_bytes),
                mib(c.used_bytes),
                mib(c.peak_bytes),
                mib(c.resident_bytes),
                mib(c.evicted_bytes),
                c.sessions,
                c.evictions,
                c.restores
            )?;
        }
        Ok(())
    }
}

impl Runtime {
    /// Start building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.inner.dev
    }

    /// The pool, for statistics.
    pub fn pool_stats(&self) -> gpushare_pool::PoolStats {
        self.inner.pool.stats()
    }

    /// Bytes the runtime manages.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Bytes the runtime could hand out now: its capacity less what is live, what
    /// stream-ordered frees still wait on (their memory comes back when the work queued
    /// before them completes), and what was retired after a fault. Memory that contexts'
    /// caches keep after their scratch was freed counts as available: a request that runs
    /// short takes it back. So this can exceed the capacity less every context's
    /// [`crate::Usage::used`], which counts those cached bytes.
    pub fn available_vram(&self) -> u64 {
        self.inner.available()
    }

    /// Let go of the buffers that contexts keep pinned between their sessions. A context
    /// whose last session ended keeps its buffers pinned (when that session pinned them
    /// all), so that its next session pins nothing; the pool has them let go, oldest first,
    /// before it evicts anything, so this changes no eviction. It only makes the pool's
    /// pinned figures ([`Runtime::pool_stats`]) count the pins of live sessions alone. The
    /// next session of each context pins again.
    ///
    /// A context whose last handle goes meanwhile is torn down on a thread of its own, as
    /// for [`Runtime::snapshot`]: its teardown waits for its stream's work.
    pub fn unpin_idle(&self) {
        let ctxs = crate::runtime::release_holds(&self.inner.contexts, true);
        let_go(ctxs, &self.inner.teardowns);
    }

    /// Sessions waiting for their buffers to fit (the queue depth).
    pub fn waiting_sessions(&self) -> usize {
        self.inner.waits.waiting()
    }

    /// Sessions waiting for another session's restore to end before they restore their own
    /// working set (restores run one at a time, and the waiting ones are served in tier
    /// order with aging).
    pub fn waiting_restores(&self) -> usize {
        self.inner.pin_lock.waiting()
    }

    /// Admit a context and set up its budget, stream and partition.
    pub fn create_context(&self, spec: ContextSpec) -> Result<Context> {
        Context::create(self.inner.clone(), spec)
    }

    /// Register a handler called when any context runs short of memory, after the
    /// contexts' own handlers, unless one of those denied (see [`PressureHandler`] for
    /// the round). It stays registered until the returned registration drops (see
    /// [`PressureRegistration`]; `let _ =` drops it at once).
    pub fn on_memory_pressure(
        &self,
        handler: impl Fn(&PressureInfo<'_>) -> Pressure + Send + Sync + 'static,
    ) -> PressureRegistration {
        self.inner.handlers.register(Arc::new(handler))
    }

    /// A per-context table of memory use.
    pub fn snapshot(&self) -> Snapshot {
        let info = self.inner.dev.info();
        let stats = self.inner.pool.stats();
        let ctxs: Vec<Arc<CtxInner>> = self
            .inner
            .contexts
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let contexts = ctxs
            .iter()
            .map(|c| {
                let o = stats.owners.iter().find(|o| o.id == c.owner);
                ContextRow {
                    name: c.name.clone(),
                    tier: c.tier.to_string(),
                    max_bytes: c.max,
                    reserved_bytes: c.admission.reservation.reserved(),
                    used_bytes: o.map_or(0, |o| o.in_use_bytes),
                    peak_bytes: o.map_or(0, |o| o.peak_in_use_bytes),
                    resident_bytes: o.map_or(0, |o| o.evictable_resident_bytes),
                    evicted_bytes: o.map_or(0, |o| o.evicted_bytes),
                    sessions: c.sessions.load(Ordering::Relaxed),
                    evictions: o.map_or(0, |o| o.evictions),
                    restores: o.map_or(0, |o| o.restores),
                }
            })
            .collect();
        let_go(ctxs, &self.inner.teardowns);
        Snapshot {
            device: info.name.clone(),
            backend: info.backend.to_string(),
            total_bytes: info.total_memory,
            capacity_bytes: self.inner.capacity,
            available_bytes: self.inner.available_in(&stats),
            contexts,
        }
    }
}

/// Contexts being torn down on threads of their own (see [`let_go`]).
#[derive(Default)]
pub(crate) struct Teardowns {
    running: Mutex<usize>,
    done: parking_lot::Condvar,
}

thread_local! {
    /// Whether this thread is tearing a context down for [`let_go`], of any runtime. Not
    /// per runtime: a teardown of runtime A's context may drop runtime B's last handle,
    /// and one of B's teardowns A's; each waiting for the other's teardowns, the two
    /// threads would wait for each other. So a runtime whose last handle goes inside any
    /// teardown does not wait for its own teardown threads (they end on their own).
    static TEARING_DOWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Teardowns {
    /// Wait until no context is being torn down on a thread of its own. Not from inside
    /// such a teardown: the last `Runtime` handle, held by a context's handler say, may go
    /// there, and would wait for itself.
    fn wait(&self) {
        if TEARING_DOWN.with(|t| t.get()) {
            return;
        }
        let mut running = self.running.lock();
        while *running > 0 {
            self.done.wait(&mut running);
        }
    }
}

/// A context to tear down, counted in [`Teardowns`] until its drop has ended, whether it
/// ends on the thread made for it, on the caller's (no thread could be made), or with a
/// panic.
struct Teardown {
    ctx: Option<CtxInner>,
    teardowns: Arc<Teardowns>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        struct Ended<'a>(&'a Teardowns, bool);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                TEARING_DOWN.with(|t| t.set(self.1));
                *self.0.running.lock() -= 1;
                self.0.done.notify_all();
            }
        }
        let _ended = Ended(&self.teardowns, TEARING_DOWN.with(|t| t.replace(true)));
        drop(self.ctx.take());
    }
}

/// Let go of references to contexts that a bystander (a snapshot) took for a moment. A
/// context whose handles all went meanwhile would be torn down here, and its teardown
/// waits for the work queued on its stream, which may be work that the calling thread is
/// itself to let finish: it hung a test whose thread held that stream. Such a context is
/// torn down on a thread of its own. The drop of the last `Runtime` handle waits for those
/// threads: the pool's memory goes back with the runtime, and no driver call is left
/// running at exit.
///
/// A round of pressure handlers and the pool's release of idle holds let go of theirs
/// inline: there, a context that a handler dropped gives its memory back before the retry.
fn let_go(ctxs: Vec<Arc<CtxInner>>, teardowns: &Arc<Teardowns>) {
    for c in ctxs {
        let Some(last) = Arc::into_inner(c) else {
            continue;
        };
        let name = last.name.clone();
        *teardowns.running.lock() += 1;
        let teardown = Teardown {
            ctx: Some(last),
            teardowns: teardowns.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("gpushare-context-drop".into())
            .spawn(move || drop(teardown));
        if let Err(e) = spawned {
            // The teardown went with the closure, on this thread.
            tracing::warn!(context = %name, error = %e, "no thread for a context's teardown; it ran on the caller's");
        }
    }
}

impl Clone for Runtime {
    fn clone(&self) -> Self {
        self.inner.handles.fetch_add(1, Ordering::Relaxed);
        Runtime {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // The last handle: contexts may still hold the runtime's state, but no user can
        // reach it now.
        if self.inner.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.teardowns.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpushare_device::{FaultOp, SimDevice};

    /// A runtime on a simulated device, with one context, `m`.
    fn one_context() -> (SimDevice, Runtime, Context) {
        let sim = SimDevice::new();
        let rt = Runtime::builder()
            .with_device(Arc::new(sim.clone()))
            .build()
            .unwrap();
        let ctx = rt
            .create_context(gpushare_qos::ContextSpec::new("m", 1 << 20))
            .unwrap();
        (sim, rt, ctx)
    }

    /// Hold `stream`: the work queued on it after this waits until the returned sender
    /// sends (or goes).
    fn hold(sim: &SimDevice, stream: &Stream) -> std::sync::mpsc::Sender<()> {
        let (go, gate) = std::sync::mpsc::channel::<()>();
        sim.launch_host(stream, move |_| {
            let _ = gate.recv();
            Ok(())
        })
        .unwrap();
        go
    }

    /// A failed wait for a queued copy must not return while the copy may still land.
    #[test]
    fn a_copy_whose_wait_fails_is_over_when_the_error_comes_back() {
        let sim = SimDevice::new();
        let dev: Arc<dyn Device> = Arc::new(sim.clone());
        let copies = dev.create_stream(0).unwrap();
        let reader = dev.create_stream(0).unwrap();
        let n = 64 << 10;
        let mem = dev.alloc_linear(dev.info().granularity).unwrap();
        let dst = mem.range().slice(0, n).unwrap();
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 + 1).collect();
        let mut host = dev.alloc_pinned(n).unwrap();
        host.write(0, &data).unwrap();
        // The copy stream is held, so the copy stays queued until `go`.
        let go = hold(&sim, &copies);
        // The wait's event record fails.
        sim.fail_nth(FaultOp::StreamOp, 1);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let r = copy_and_wait(dev.as_ref(), &copies, || {
                    dev.copy_htod(dst, host.full(), &copies)
                });
                // What the memory holds once the error is back.
                let mut now = vec![0u8; n as usize];
                dev.read_sync(&mut now, dst, &reader).unwrap();
                done_tx.send((r.is_err(), now == data)).unwrap();
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            go.send(()).unwrap();
            let (failed, landed) = done_rx.recv().unwrap();
            assert!(failed, "the injected fault reaches the caller");
            assert!(
                landed,
                "the error came back while the copy was still queued"
            );
        });
    }

    /// A bystander that holds a context's last reference lets it go at once; the
    /// context's teardown, which waits for its stream, runs on a thread of its own, and a
    /// `Runtime` handle's drop waits for it.
    #[test]
    fn a_bystanders_last_reference_is_torn_down_elsewhere() {
        let (sim, rt, ctx) = one_context();
        let go = hold(&sim, &ctx.inner.stream);
        let bystander = ctx.inner.clone();
        drop(ctx);
        let (tx, rx) = std::sync::mpsc::channel();
        let teardowns = rt.inner.teardowns.clone();
        // Inline, the teardown would wait here for the held stream.
        std::thread::spawn(move || {
            let_go(vec![bystander], &teardowns);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("let_go waited for the context's teardown");
        assert!(rt.inner.names.lock().contains("m"), "torn down already");
        // Another handle's drop does not wait; the last one's does.
        drop(rt.clone());
        let (inner, dropped) = (rt.inner.clone(), Arc::new(AtomicUsize::new(0)));
        let waiter = {
            let dropped = dropped.clone();
            std::thread::spawn(move || {
                drop(rt);
                dropped.store(1, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "the last drop waits");
        go.send(()).unwrap();
        waiter.join().unwrap();
        assert!(inner.names.lock().is_empty(), "the teardown ended");
    }

    #[test]
    fn unpin_idle_tears_a_context_whose_last_handle_went_down_elsewhere() {
        let (sim, rt, ctx) = one_context();
        // Its session ends with the context keeping its (empty) set as a hold.
        drop(ctx.session().unwrap());
        assert_ne!(
            ctx.inner.held.load(Ordering::Relaxed),
            crate::context::NO_HOLD
        );
        let go = hold(&sim, &ctx.inner.stream);
        // `unpin_idle` takes a reference and waits for the context's list; meanwhile the
        // last handle goes.
        let inner = ctx.inner.clone();
        let list = inner.buffers.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let rt2 = rt.clone();
        std::thread::spawn(move || {
            rt2.unpin_idle();
            tx.send(()).unwrap();
        });
        while Arc::strong_count(&inner) < 3 {
            std::thread::yield_now();
        }
        drop(ctx);
        drop(list);
        drop(inner);
        // Inline, the teardown would wait here for the held stream.
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("unpin_idle waited for the context's teardown");
        go.send(()).unwrap();
    }

    /// A teardown whose thread could not be made, or that panicked, still counts as
    /// ended; and the last `Runtime` handle going inside it does not wait for itself.
    #[test]
    fn a_teardown_ends_its_count_however_it_ends() {
        let (_sim, rt, ctx) = one_context();
        // The context's handler holds the last handle once `rt` goes.
        let _kept = ctx.on_memory_pressure({
            let rt = rt.clone();
            move |_| {
                let _ = &rt;
                Pressure::Allow
            }
        });
        let (inner, teardowns) = (ctx.inner.clone(), rt.inner.teardowns.clone());
        drop((ctx, rt));
        *teardowns.running.lock() += 1;
        let ctx = Arc::into_inner(inner).expect("the last reference");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // As when no thread could be made: the teardown runs where it is dropped.
            drop(Teardown {
                ctx: Some(ctx),
                teardowns,
            });
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("the last handle, dropped in the teardown, waited for it");
        // A teardown that panics (here a handler's drop) ends its count too.
        struct Boom;
        impl Drop for Boom {
            fn drop(&mut self) {
                panic!("a handler's drop panicked");
            }
        }
        let rt = Runtime::builder()
            .with_device(Arc::new(SimDevice::new()))
            .build()
            .unwrap();
        let ctx = rt
            .create_context(gpushare_qos::ContextSpec::new("p", 1 << 20))
            .unwrap();
        let _kept = ctx.on_memory_pressure({
            let boom = Boom;
            move |_| {
                let _ = &boom;
                Pressure::Allow
            }
        });
        let (inner, teardowns) = (ctx.inner.clone(), rt.inner.teardowns.clone());
        drop(ctx);
        *teardowns.running.lock() += 1;
        let ctx = Arc::into_inner(inner).expect("the last reference");
        let t = teardowns.clone();
        let panicked = std::thread::spawn(move || {
            drop(Teardown {
                ctx: Some(ctx),
                teardowns: t,
            })
        })
        .join();
        assert!(panicked.is_err(), "the handler's drop panicked");
        assert_eq!(*teardowns.running.lock(), 0);
    }
}
