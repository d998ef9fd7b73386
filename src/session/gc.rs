//! Background garbage collection of expired sessions: [`SessionManager::spawn_gc`].
//!
//! Every process of an app may start one; they take turns. A round first takes the write lock on
//! [`GC_LOCK_ID`] in the manager's lock table *without waiting*: the process that gets it sweeps
//! (calls [`SessionManager::gc`] until it reports no more work), the others skip the round. So
//! there is one sweep at a time across all processes sharing the table, and no process ever
//! blocks on another's sweep. A sweeper that dies holding the lock does not stop gc elsewhere: a
//! process that finds the lock busy first releases the holds of dead processes
//! ([`LockTable::reap`](crate::LockTable::reap)) and tries once more.
//!
//! Owns: the gc thread, its stop signal, its counters and the [`GC_LOCK_ID`] lock. May not touch:
//! the store or the session locks directly (it only calls `gc()`).

use super::SessionManager;
use crate::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The lock-table ID whose write lock is held for a whole gc round by
/// [`SessionManager::spawn_gc`]'s thread (one sweep at a time across processes). Tools may take
/// it to keep the background gc out for a while.
pub const GC_LOCK_ID: &str = "ls.gc";

/// Shortest pause between two rounds; a smaller interval is raised to it, so that a zero
/// interval cannot turn the thread into a busy loop over the store.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Counters of one gc thread (see [`GcHandle::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Rounds in which this thread held the gc lock and swept.
    pub rounds_swept: u64,
    /// Rounds skipped because another thread or process was sweeping.
    pub rounds_skipped: u64,
    /// Rounds that ended with an error (logged with `tracing`; the next round runs as usual,
    /// except after [`Error::ForkedChild`] or [`Error::ForkedSessionManager`], which end the thread).
    pub rounds_failed: u64,
    /// Expired and corrupt sessions this thread deleted.
    pub deleted: u64,
}

/// The running gc thread of [`SessionManager::spawn_gc`]. Dropping it stops the thread and waits
/// for it (at most for the `gc()` batch in progress, never for the rest of an interval).
///
/// The thread keeps a clone of the manager, so the manager's lock-table attachment lives until
/// the handle is dropped.
#[derive(Debug)]
#[must_use = "dropping the handle stops the gc thread"]
pub struct GcHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The fork epoch the thread was started in: a forked child has a copy of the handle but
    /// not the thread.
    epoch: u64,
}

#[derive(Debug, Default)]
struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    // Plain event counters, read only for reporting: Relaxed (no other memory depends on them).
    rounds_swept: AtomicU64,
    rounds_skipped: AtomicU64,
    rounds_failed: AtomicU64,
    deleted: AtomicU64,
}

impl Shared {
    fn stop_requested(&self) -> bool {
        *self.stop.lock()
    }

    /// Sleeps for `d` or until a stop is requested; returns true when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let mut stop = self.stop.lock();
        if !*stop {
            // A spurious or early wake-up only starts the next round sooner.
            let _ = self.wake.wait_for(&mut stop, d);
        }
        *stop
    }
}

fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What one round did.
enum Round {
    /// This thread swept; this many sessions were deleted.
    Swept { deleted: u64 },
    /// Another thread or process held the gc lock.
    Skipped,
}

impl GcHandle {
    /// This thread's counters so far.
    pub fn stats(&self) -> GcStats {
        let s = &self.shared;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GcStats {
            rounds_swept: g(&s.rounds_swept),
            rounds_skipped: g(&s.rounds_skipped),
            rounds_failed: g(&s.rounds_failed),
            deleted: g(&s.deleted),
        }
    }
}

impl Drop for GcHandle {
    fn drop(&mut self) {
        if crate::fork::epoch() != self.epoch {
            // In a forked child the thread does not exist, and the stop mutex may have been
            // copied locked: touch neither, and leak the copy of the join handle.
            std::mem::forget(self.thread.take());
            return;
        }
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            // A panic of the thread (a bug in a custom store) is not re-raised in the dropper.
            let _ = t.join();
        }
    }
}

impl SessionManager {
    /// Starts a background thread that collects expired sessions: it calls [`SessionManager::gc`]
    /// until that reports no more work ([`GcReport::more`](super::GcReport::more) unset, or a
    /// batch that deleted nothing), then sleeps `interval`, and again. The first round runs at
    /// once. Dropping the returned handle stops the thread.
    ///
    /// Safe to run in every process that opens the session directory: a round runs only in the
    /// process that gets the write lock on [`GC_LOCK_ID`] without waiting; the others skip it, so
    /// there is one sweep at a time across processes. An error is logged (a `tracing` warning,
    /// sent to the subscriber that was current where `spawn_gc` was called) and counted in
    /// [`GcStats::rounds_failed`]; the thread goes on with the next round, except after
    /// [`Error::ForkedSessionManager`] (a manager inherited across `fork()`), which ends it. An `interval`
    /// under 1 ms counts as 1 ms.
    ///
    /// A forked child does not inherit the thread; dropping its copy of the handle does nothing.
    ///
    /// Fails if the thread cannot be started, and with [`Error::ForkedSessionManager`] in a
    /// forked child that inherited this manager (as every call does there): a thread started
    /// there would stop at its first round, and the child would collect nothing while its
    /// caller believes gc runs. Open the manager again in the child.
    ///
    /// ```
    /// use locktable::session::SessionManager;
    /// use std::time::Duration;
    /// # let dir = tempfile::tempdir()?;
    /// # let dir = dir.path();
    /// let mgr = SessionManager::open(dir)?;
    /// // Once per process, for as long as it serves requests:
    /// let gc = mgr.spawn_gc(Duration::from_secs(60))?;
    /// // ...
    /// drop(gc); // stops the thread (at shutdown)
    /// # Ok::<(), locktable::Error>(())
    /// ```
    pub fn spawn_gc(&self, interval: Duration) -> Result<GcHandle> {
        self.inner.check_fork()?;
        let interval = interval.max(MIN_INTERVAL);
        let shared = Arc::new(Shared::default());
        let mgr = self.clone();
        let thread_shared = Arc::clone(&shared);
        // The thread logs where the caller would: a scoped subscriber of the caller applies too.
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let thread = std::thread::Builder::new()
            .name("locktable-gc".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    mgr.gc_loop(&thread_shared, interval);
                });
            })?;
        Ok(GcHandle {
            shared,
            thread: Some(thread),
            epoch: crate::fork::epoch(),
        })
    }

    /// The body of the gc thread: rounds separated by `interval`, until stopped.
    fn gc_loop(&self, shared: &Shared, interval: Duration) {
        while !shared.stop_requested() {
            match self.gc_round(shared) {
                Ok(Round::Swept { deleted }) => {
                    count(&shared.rounds_swept, 1);
                    count(&shared.deleted, deleted);
                    tracing::debug!(deleted, "session gc round done");
                }
                Ok(Round::Skipped) => {
                    count(&shared.rounds_skipped, 1);
                    tracing::trace!("session gc round skipped: another process is sweeping");
                }
                Err(e @ (Error::ForkedChild | Error::ForkedSessionManager)) => {
                    // Permanent: the manager belongs to the parent process.
                    count(&shared.rounds_failed, 1);
                    tracing::error!(error = %e, "session gc thread stopped");
                    return;
                }
                Err(e) => {
                    count(&shared.rounds_failed, 1);
                    tracing::warn!(error = %e, ?interval, "session gc round failed; retrying after the interval");
                }
            }
            if shared.sleep(interval) {
                break;
            }
        }
    }

    /// One round: sweep under the gc lock if it is free, else skip.
    fn gc_round(&self, shared: &Shared) -> Result<Round> {
        let locks = &self.inner.locks;
        let lock = match super::locks::try_write_named(locks, GC_LOCK_ID)? {
            Some(lock) => lock,
            None => {
                // Busy: maybe by a sweeper that died holding it. `try_write` does not wait, so
                // it never runs the waiters' liveness check: release dead processes' holds here.
                super::locks::reap_dead(locks)?;
                match super::locks::try_write_named(locks, GC_LOCK_ID)? {
                    Some(lock) => lock,
                    None => return Ok(Round::Skipped),
                }
            }
        };
        let mut deleted = 0u64;
        loop {
            let report = self.gc()?;
            let removed = (report.deleted + report.corrupt) as u64;
            deleted += removed;
            // A full batch of busy or revived sessions would be listed again at once: wait for
            // the next round rather than spin on it.
            if !report.more || removed == 0 || shared.stop_requested() {
                break;
            }
        }
        drop(lock);
        Ok(Round::Swept { deleted })
    }
}

#[cfg(test)]
mod tests;
