//! Atomic admission: evaluate and reserve in one step, and wait in tier order.

use crate::spec::{ContextSpec, Resolved, Tier};
use crate::sync::{Arc, Mutex};
use crate::QosError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Settings of an [`AdmissionEvaluator`].
#[derive(Clone, Debug, PartialEq)]
pub struct AdmissionConfig {
    /// Fraction of the device's memory that admission hands out (the rest is headroom for
    /// the driver and fragmentation).
    pub usable_fraction: f64,
    /// An absolute cap on usable bytes, applied after the fraction (`None`: no cap).
    pub usable_limit: Option<u64>,
    /// How far the sum of every context's maximum may exceed the usable memory: 1.0 (the
    /// default) admits only what could all be resident at once; 1.5 lets BestEffort and
    /// bursting Burstable contexts promise half as much again, to be met by eviction.
    pub overcommit: f64,
    /// A waiter rises by one tier for every `aging` it has waited, so nothing starves.
    pub aging: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            usable_fraction: 0.95,
            usable_limit: None,
            overcommit: 1.0,
            aging: Duration::from_secs(1),
        }
    }
}

impl AdmissionConfig {
    /// Set the usable fraction, in (0, 1].
    pub fn usable_fraction(mut self, f: f64) -> Self {
        self.usable_fraction = f;
        self
    }
    /// Cap usable memory at `bytes` (positive), whatever the fraction gives.
    pub fn usable_limit(mut self, bytes: u64) -> Self {
        self.usable_limit = Some(bytes);
        self
    }
    /// Set the overcommit ratio (1.0 is off).
    pub fn overcommit(mut self, ratio: f64) -> Self {
        self.overcommit = ratio;
        self
    }
    /// Set the aging period.
    pub fn aging(mut self, d: Duration) -> Self {
        self.aging = d;
        self
    }
}

/// The priority admission granted: the tier's rank, mapped onto a device's stream
/// priorities by [`Priority::stream_priority`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priority {
    /// The tier it follows.
    pub tier: Tier,
}

impl Priority {
    /// The stream priority for a device whose range is `greatest..=least` (as in CUDA,
    /// numerically lower is higher): Guaranteed gets the highest, BestEffort the lowest,
    /// Burstable the middle.
    pub fn stream_priority(&self, greatest: i32, least: i32) -> i32 {
        match self.tier {
            Tier::Guaranteed => greatest,
            // In i64: the difference of two i32 may not fit one.
            Tier::Burstable => {
                (i64::from(greatest) + (i64::from(least) - i64::from(greatest)) / 2) as i32
            }
            Tier::BestEffort => least,
        }
    }
}

/// Why admission said no, with the numbers.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The spec itself is wrong.
    #[error(transparent)]
    Invalid(#[from] QosError),
    /// Not enough unreserved memory.
    #[error("{name:?} would reserve {requested} B but only {free} B of {capacity} B are unreserved; wait, free a context, or lower its base")]
    Memory {
        /// The context.
        name: String,
        /// Bytes it reserves.
        requested: u64,
        /// Bytes still unreserved.
        free: u64,
        /// Usable bytes in all.
        capacity: u64,
    },
    /// The sum of maxima would exceed what overcommit allows.
    #[error("{name:?} would raise the sum of context maxima to {potential} B, above {allowed} B ({capacity} B × overcommit {ratio}); lower its max_vram, wait, free a context, or raise the overcommit ratio")]
    Overcommit {
        /// The context.
        name: String,
        /// Sum of maxima with it.
        potential: u64,
        /// What is allowed.
        allowed: u64,
        /// Usable bytes.
        capacity: u64,
        /// The ratio.
        ratio: f64,
    },
    /// Shares would add up to more than the whole.
    #[error("{name:?} asks for a {what} share of {requested}, but {taken} is already reserved; ask for at most the rest, or drop a context that holds a share")]
    Share {
        /// The context.
        name: String,
        /// Compute or bandwidth.
        what: &'static str,
        /// Share asked.
        requested: f64,
        /// Share already reserved.
        taken: f64,
    },
    /// The request could not be admitted even with nothing else admitted: waiting is
    /// pointless.
    #[error("{name:?} can never be admitted: {why}; lower its base, max_vram or shares")]
    NeverFits {
        /// The context.
        name: String,
        /// What does not fit, with the numbers.
        why: String,
    },
    /// Contexts of the same or a higher tier are waiting first.
    #[error("{name:?} is behind {waiting} waiting context(s) of the same or a higher tier; use admit().await to queue")]
    QueuedAhead {
        /// The context.
        name: String,
        /// Waiters ahead of it.
        waiting: usize,
    },
    /// The future was polled again after it completed.
    #[error("this admission already completed")]
    Finished,
}

impl Rejection {
    /// Whether waiting can never help: true when the request cannot fit even with nothing
    /// else admitted (but memory kept for good, see [`Reservation::keep_after_drop`]), or is
    /// otherwise invalid, or the admission already completed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Rejection::Invalid(_) | Rejection::NeverFits { .. } | Rejection::Finished
        )
    }
}

/// What one admission holds. Shares are in parts per billion ([`ppb`]).
#[derive(Clone, Debug, PartialEq)]
struct Grant {
    reserve: u64,
    max: u64,
    compute: u64,
    bandwidth: u64,
}

impl Grant {
    fn of(r: &Resolved) -> Self {
        Grant {
            reserve: r.reserve,
            max: r.max,
            compute: ppb(r.compute),
            bandwidth: ppb(r.bandwidth),
        }
    }
}

/// A share (a fraction in `[0, 1]`) in whole parts per billion. The evaluator adds and
/// subtracts shares as integers, so what a context gives back is exactly what it took:
/// summed as floats, shares left rounding residue behind (0.1 and 0.2 admitted and
/// released left 2.8e-17), which grew with every admission and release. Rounding to a
/// part per billion also lets shares that add up to one, such as three thirds, fit.
fn ppb(share: f64) -> u64 {
    (share * PPB as f64).round() as u64
}

/// A whole share, in parts per billion.
const PPB: u64 = 1_000_000_000;

struct Waiter {
    id: u64,
    spec: Resolved,
    since: Instant,
    waker: Option<Waker>,
    granted: bool,
}

#[derive(Default)]
struct State {
    reserved: u64,
    potential: u64,
    /// The memory of reservations kept after their drop ([`Reservation::keep_after_drop`]),
    /// counted in `reserved` and `potential` for good: no request can have it.
    kept_reserved: u64,
    kept_potential: u64,
    /// Compute and bandwidth shares taken, in parts per billion.
    compute: u64,
    bandwidth: u64,
    admitted: usize,
    waiters: Vec<Waiter>,
    next_id: u64,
}

struct Inner {
    cfg: AdmissionConfig,
    capacity: u64,
    state: Mutex<State>,
}

impl Inner {
    fn allowed(&self) -> u64 {
        (self.capacity as f64 * self.cfg.overcommit) as u64
    }

    /// Whether `r` fits now.
    fn check(&self, st: &State, r: &Resolved) -> Result<(), Rejection> {
        if st.reserved.saturating_add(r.reserve) > self.capacity {
            return Err(Rejection::Memory {
                name: r.name.clone(),
                requested: r.reserve,
                free: self.capacity - st.reserved,
                capacity: self.capacity,
            });
        }
        // An overflowing sum can never be allowed (`allowed` saturates at `u64::MAX`).
        let overflows = st.potential.checked_add(r.max).is_none();
        let potential = st.potential.saturating_add(r.max);
        if overflows || potential > self.allowed() {
            return Err(Rejection::Overcommit {
                name: r.name.clone(),
                potential,
                allowed: self.allowed(),
                capacity: self.capacity,
                ratio: self.cfg.overcommit,
            });
        }
        for (what, have, want) in [
            ("compute", st.compute, r.compute),
            ("bandwidth", st.bandwidth, r.bandwidth),
        ] {
            if want > 0.0 && have + ppb(want) > PPB {
                return Err(Rejection::Share {
                    name: r.name.clone(),
                    what,
                    requested: want,
                    taken: have as f64 / PPB as f64,
                });
            }
        }
        Ok(())
    }

    /// Why `r` can never be admitted, if it cannot: it would not fit an evaluator with
    /// nothing admitted but `st`'s kept reservations (whose memory never comes back), so
    /// waiting is pointless.
    fn never_fits(&self, st: &State, r: &Resolved) -> Option<Rejection> {
        let empty = State {
            reserved: st.kept_reserved,
            potential: st.kept_potential,
            ..State::default()
        };
        let kept = |bytes: u64| {
            if bytes > 0 {
                format!(" ({bytes} B of it kept by contexts whose memory could not be given back)")
            } else {
                String::new()
            }
        };
        let why = match self.check(&empty, r).err()? {
            Rejection::Memory {
                requested,
                capacity,
                ..
            } if st.kept_reserved == 0 => {
                format!("it reserves {requested} B, and only {capacity} B are usable")
            }
            Rejection::Memory {
                requested,
                free,
                capacity,
                ..
            } => format!(
                "it reserves {requested} B, and at most {free} B of the {capacity} B usable can be \
                 free: {} B are kept by contexts whose memory could not be given back",
                st.kept_reserved
            ),
            Rejection::Overcommit {
                potential,
                allowed,
                ratio,
                ..
            } => format!(
                "its maximum brings the sum of maxima to {potential} B{}, above the {allowed} B that overcommit {ratio} allows",
                kept(st.kept_potential)
            ),
            Rejection::Share {
                what, requested, ..
            } => format!("its {what} share of {requested} is more than the whole"),
            other => return Some(other),
        };
        Some(Rejection::NeverFits {
            name: r.name.clone(),
            why,
        })
    }

    fn apply(st: &mut State, g: &Grant) {
        st.reserved += g.reserve;
        st.potential += g.max;
        st.compute += g.compute;
        st.bandwidth += g.bandwidth;
        st.admitted += 1;
    }

    fn release(st: &mut State, g: &Grant) {
        st.reserved -= g.reserve;
        st.potential -= g.max;
        st.compute -= g.compute;
        st.bandwidth -= g.bandwidth;
        st.admitted -= 1;
    }

    /// A waiter's place in line: its tier rank lowered by one per aging period waited,
    /// then arrival order.
    fn key(&self, w: &Waiter, now: Instant) -> (f64, u64) {
        let aging = self.cfg.aging.as_secs_f64().max(1e-6);
        let waited = now.saturating_duration_since(w.since).as_secs_f64();
        (f64::from(w.spec.tier.rank()) - waited / aging, w.id)
    }

    /// The waiter first in line that has not been granted.
    fn head(&self, st: &State, now: Instant) -> Option<usize> {
        st.waiters
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.granted)
            .min_by(|(_, a), (_, b)| {
                self.key(a, now)
                    .partial_cmp(&self.key(b, now))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map(|(i, _)| i)
    }

    /// Grant waiters in line while the first one fits; return the wakers to call.
    fn pump(&self, st: &mut State) -> Vec<Waker> {
        let now = Instant::now();
        let mut wake = Vec::new();
        while let Some(i) = self.head(st, now) {
            if self.check(st, &st.waiters[i].spec).is_err() {
                break;
            }
            let g = Grant::of(&st.waiters[i].spec);
            Self::apply(st, &g);
            let w = &mut st.waiters[i];
            w.granted = true;
            if let Some(k) = w.waker.take() {
                wake.push(k);
            }
        }
        wake
    }
}

/// Decides whether contexts fit, and reserves what they need atomically.
///
/// Guaranteed contexts reserve their whole budget, Burstable ones their base, BestEffort
/// nothing. The sum of every admitted context's maximum may exceed usable memory only by
/// the overcommit ratio. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct AdmissionEvaluator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AdmissionEvaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionEvaluator")
            .field("capacity", &self.inner.capacity)
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// What admission has handed out.
#[derive(Clone, Debug, PartialEq)]
pub struct AdmissionUsage {
    /// Usable bytes.
    pub capacity: u64,
    /// Bytes reserved.
    pub reserved: u64,
    /// Sum of admitted maxima.
    pub potential: u64,
    /// Compute share reserved.
    pub compute: f64,
    /// Bandwidth share reserved.
    pub bandwidth: f64,
    /// Contexts admitted.
    pub admitted: usize,
    /// Contexts waiting.
    pub waiting: usize,
}

impl AdmissionEvaluator {
    /// An evaluator over a device with `total_memory` bytes.
    pub fn new(total_memory: u64, cfg: AdmissionConfig) -> Result<Self, QosError> {
        let bad = |what, value: String, expected| QosError::BadConfig {
            what,
            value,
            expected,
        };
        if total_memory == 0 {
            return Err(bad("total_memory", "0".into(), "a positive byte count"));
        }
        if !(cfg.usable_fraction.is_finite()
            && cfg.usable_fraction > 0.0
            && cfg.usable_fraction <= 1.0)
        {
            return Err(bad(
                "usable_fraction",
                cfg.usable_fraction.to_string(),
                "a fraction in (0, 1]",
            ));
        }
        if cfg.usable_limit == Some(0) {
            return Err(bad("usable_limit", "0".into(), "a positive byte count"));
        }
        if !(cfg.overcommit.is_finite() && cfg.overcommit >= 1.0) {
            return Err(bad(
                "overcommit",
                cfg.overcommit.to_string(),
                "a ratio of at least 1.0 (1.0 is off)",
            ));
        }
        if cfg.aging.is_zero() {
            return Err(bad("aging", "0s".into(), "a positive duration"));
        }
        let capacity = ((total_memory as f64 * cfg.usable_fraction) as u64)
            .min(cfg.usable_limit.unwrap_or(u64::MAX));
        Ok(AdmissionEvaluator {
            inner: Arc::new(Inner {
                cfg,
                capacity,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// Usable bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// What has been handed out.
    pub fn usage(&self) -> AdmissionUsage {
        let st = self.inner.state.lock();
        AdmissionUsage {
            capacity: self.inner.capacity,
            reserved: st.reserved,
            potential: st.potential,
            compute: st.compute as f64 / PPB as f64,
            bandwidth: st.bandwidth as f64 / PPB as f64,
            admitted: st.admitted,
            waiting: st.waiters.iter().filter(|w| !w.granted).count(),
        }
    }

    /// Evaluate and reserve in one step. Waiting contexts of the same or a higher tier go
    /// first, so this never overtakes them.
    pub fn try_admit(&self, spec: &ContextSpec) -> Result<Admission, Rejection> {
        let r = spec.resolve()?;
        let mut st = self.inner.state.lock();
        if let Some(never) = self.inner.never_fits(&st, &r) {
            return Err(never);
        }
        // Waiters rise with age exactly as in `admit`, so repeated tries cannot starve them.
        let now = Instant::now();
        let rank = f64::from(r.tier.rank());
        let ahead = st
            .waiters
            .iter()
            .filter(|w| !w.granted && self.inner.key(w, now).0 <= rank)
            .count();
        if ahead > 0 {
            return Err(Rejection::QueuedAhead {
                name: r.name,
                waiting: ahead,
            });
        }
        self.inner.check(&st, &r)?;
        let g = Grant::of(&r);
        Inner::apply(&mut st, &g);
        drop(st);
        Ok(self.admission(r, g))
    }

    fn admission(&self, r: Resolved, grant: Grant) -> Admission {
        Admission {
            priority: Priority { tier: r.tier },
            reservation: Reservation {
                inner: self.inner.clone(),
                grant,
                spec: r,
                kept: false,
                released: false,
            },
        }
    }

    /// Wait until the context can be admitted, then reserve. Waiters are served in tier
    /// order, with aging; a request that could never fit fails at once. Dropping the future
    /// leaves nothing reserved.
    pub fn admit(&self, spec: ContextSpec) -> Admit {
        Admit {
            eval: self.clone(),
            spec: Some(spec),
            id: None,
            done: false,
        }
    }
}

/// A successful admission.
#[derive(Debug)]
pub struct Admission {
    /// What is reserved; released on drop.
    pub reservation: Reservation,
    /// The priority granted.
    pub priority: Priority,
}

/// Memory and shares reserved for one context. Released when dropped, which may admit
/// waiting contexts.
pub struct Reservation {
    inner: Arc<Inner>,
    grant: Grant,
    spec: Resolved,
    /// Set by [`Reservation::keep_after_drop`].
    kept: bool,
    /// Set once it has been given back ([`Reservation::release_now`] or the drop).
    released: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// The checked spec it was made for.
    pub fn spec(&self) -> &Resolved {
        &self.spec
    }
    /// The tier.
    pub fn tier(&self) -> Tier {
        self.spec.tier
    }
    /// Bytes reserved.
    pub fn reserved(&self) -> u64 {
        self.grant.reserve
    }
    /// Keep the memory reserved when this is dropped (its compute and bandwidth shares are
    /// given back). For a context whose memory could not be given back (its pool owner
    /// still holds bytes): admission must not promise that memory to another context
    /// while the pool still counts it.
    pub fn keep_after_drop(&mut self) {
        self.kept = true;
    }

    /// Give the reservation back now (as its drop would, keeping the memory if
    /// [`Reservation::keep_after_drop`] was called); its drop then gives back nothing.
    /// For an owner that must know the reservation is gone before it lets go of something
    /// else, such as the context's name.
    pub fn release_now(&mut self) {
        if !self.released {
            self.released = true;
            self.give_back();
        }
    }

    fn give_back(&self) {
        // A kept reservation gives back its compute and bandwidth shares and its place
        // among the admitted, but not its memory.
        let grant = if self.kept {
            Grant {
                reserve: 0,
                max: 0,
                ..self.grant.clone()
            }
        } else {
            self.grant.clone()
        };
        let wake = {
            let mut st = self.inner.state.lock();
            Inner::release(&mut st, &grant);
            let mut wake = Vec::new();
            if self.kept {
                st.kept_reserved += self.grant.reserve;
                st.kept_potential += self.grant.max;
                // Waiters look again: some may never fit now (see `Admit::poll`).
                wake.extend(st.waiters.iter_mut().filter_map(|w| w.waker.take()));
            }
            wake.extend(self.inner.pump(&mut st));
            wake
        };
        wake.into_iter().for_each(Waker::wake);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release_now();
    }
}

/// The future of [`AdmissionEvaluator::admit`]. Cancellation-safe: dropping it removes it
/// from the queue and releases anything granted to it.
pub struct Admit {
    eval: AdmissionEvaluator,
    spec: Option<ContextSpec>,
    id: Option<u64>,
    done: bool,
}

impl Future for Admit {
    type Output = Result<Admission, Rejection>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(Err(Rejection::Finished));
        }
        let inner = &this.eval.inner;
        match this.id {
            None => {
                let Some(spec) = this.spec.take() else {
                    this.done = true;
                    return Poll::Ready(Err(Rejection::Finished));
                };
                let mut st = inner.state.lock();
                // Checked with the state locked: a reservation kept meanwhile counts.
                let r = match spec
                    .resolve()
                    .map_err(Rejection::from)
                    .and_then(|r| inner.never_fits(&st, &r).map_or(Ok(r), Err))
                {
                    Ok(r) => r,
                    Err(e) => {
                        this.done = true;
                        return Poll::Ready(Err(e));
                    }
                };
                let now = Instant::now();
                let rank = f64::from(r.tier.rank());
                let ahead = st
                    .waiters
                    .iter()
                    .any(|w| !w.granted && inner.key(w, now).0 <= rank);
                if !ahead && inner.check(&st, &r).is_ok() {
                    let g = Grant::of(&r);
                    Inner::apply(&mut st, &g);
                    drop(st);
                    this.done = true;
                    return Poll::Ready(Ok(this.eval.admission(r, g)));
                }
                let id = st.next_id;
                st.next_id += 1;
                st.waiters.push(Waiter {
                    id,
                    spec: r,
                    since: now,
                    waker: Some(cx.waker().clone()),
                    granted: false,
                });
                this.id = Some(id);
                Poll::Pending
            }
            Some(id) => {
                let mut st = inner.state.lock();
                let Some(i) = st.waiters.iter().position(|w| w.id == id) else {
                    this.done = true;
                    return Poll::Ready(Err(Rejection::Finished));
                };
                if st.waiters[i].granted {
                    let w = st.waiters.swap_remove(i);
                    drop(st);
                    this.done = true;
                    this.id = None;
                    let g = Grant::of(&w.spec);
                    return Poll::Ready(Ok(this.eval.admission(w.spec, g)));
                }
                // A reservation kept for good since it joined may leave it no chance.
                if let Some(never) = inner.never_fits(&st, &st.waiters[i].spec) {
                    st.waiters.swap_remove(i);
                    // It may have held up the line.
                    let wake = inner.pump(&mut st);
                    drop(st);
                    wake.into_iter().for_each(Waker::wake);
                    this.done = true;
                    this.id = None;
                    return Poll::Ready(Err(never));
                }
                st.waiters[i].waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Admit {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let inner = &self.eval.inner;
        let wake = {
            let mut st = inner.state.lock();
            match st.waiters.iter().position(|w| w.id == id) {
                Some(i) => {
                    let w = st.waiters.swap_remove(i);
                    if w.granted {
                        Inner::release(&mut st, &Grant::of(&w.spec));
                    }
                    // Whether it held a grant or blocked the line, others may go now.
                    inner.pump(&mut st)
                }
                None => Vec::new(),
            }
        };
        wake.into_iter().for_each(Waker::wake);
    }
}
