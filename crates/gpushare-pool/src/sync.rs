//! Concurrency primitives of this crate, swapped for loom's under `cfg(loom)`.

#[cfg(not(loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard};

/// A condition variable paired with [`Mutex`], taking and giving back the guard.
#[derive(Debug, Default)]
pub(crate) struct Condvar(
    #[cfg(not(loom))] parking_lot::Condvar,
    #[cfg(loom)] loom::sync::Condvar,
);

impl Condvar {
    /// Let `guard`'s lock go until notified, then take it again.
    #[cfg(not(loom))]
    pub(crate) fn wait<'a, T>(&self, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0.wait(&mut guard);
        guard
    }

    /// Let `guard`'s lock go until notified, then take it again.
    #[cfg(loom)]
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        match self.0.wait(guard) {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Let `guard`'s lock go until notified or until `dur` has passed, then take it again.
    #[cfg(not(loom))]
    pub(crate) fn wait_for<'a, T>(
        &self,
        mut guard: MutexGuard<'a, T>,
        dur: std::time::Duration,
    ) -> MutexGuard<'a, T> {
        let _ = self.0.wait_for(&mut guard, dur);
        guard
    }

    /// Let `guard`'s lock go until notified, then take it again: loom does not time out.
    #[cfg(loom)]
    pub(crate) fn wait_for<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        _dur: std::time::Duration,
    ) -> MutexGuard<'a, T> {
        self.wait(guard)
    }

    /// Wake every waiter.
    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// The lock of a cache shard. Its critical sections are a few dozen instructions, so a spin
/// lock that yields when contended beats a parking mutex: unlocking is a plain release
/// store, which saves one atomic read-modify-write per operation on the hot path.
#[cfg(not(loom))]
pub(crate) type ShardLock<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;
#[cfg(loom)]
pub(crate) type ShardLock<T> = Mutex<T>;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A loom mutex with parking_lot's interface (no poisoning).
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

#[cfg(loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(t: T) -> Self {
        Mutex(loom::sync::Mutex::new(t))
    }
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// A small per-thread number used to pick a cache shard.
#[cfg(not(loom))]
#[inline]
pub(crate) fn thread_index() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static IDX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    IDX.with(|c| {
        let v = c.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.set(v);
        v
    })
}

/// Under loom every thread uses shard 0, so that executions are deterministic.
#[cfg(loom)]
pub(crate) fn thread_index() -> usize {
    0
}
