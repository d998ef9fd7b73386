//! Async acquisition of the lock table's holds, for tokio users (feature `axum`).
//!
//! Owns: turning a blocking lock wait into a future that never blocks a runtime worker and that
//! is safe to drop. May not touch: the lock word or guards' internals; it only calls the public
//! `try_*` and `*_timeout` methods of [`LockTable`].
//!
//! How: a non-blocking `try_*` first (the common, uncontended case costs nothing more than the
//! blocking call). When the ID is busy, the wait moves to tokio's blocking pool, where it waits in
//! short slices and checks between them whether the future was dropped. Dropping the future
//! therefore ends the wait within one slice; a hold that the waiter was granted after the future
//! was dropped is released at once (the guard is dropped with the unreceived result). A dropped
//! request never ends up holding a lock.
//!
//! The price of the slices: each one leaves the wait and joins it again, so a waiter that
//! arrived later through the blocking API may be granted first. Use the blocking calls on your
//! own threads where strict arrival order matters.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> locktable::Result<()> {
//! use locktable::asynclock::AsyncLockTable;
//! use locktable::{LockTable, TableOptions};
//! use std::time::Duration;
//! let table = LockTable::anonymous(&TableOptions::default())?;
//! let r = table.read_async("cart:1", Duration::from_secs(1)).await?;
//! assert!(table.try_write("cart:1")?.is_none());
//! drop(r);
//! let w = table.write_async("cart:1", Duration::from_secs(1)).await?;
//! # drop(w);
//! # Ok(()) }
//! ```

use crate::{Error, LockTable, ReadGuard, Result, UpgradableReadGuard, WriteGuard};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one blocking slice of a wait lasts before the waiter checks whether its future was
/// dropped. Short enough that an abandoned wait ends quickly, long enough to cost nothing.
const WAIT_SLICE: Duration = Duration::from_millis(25);

/// Waits that had to leave the fast path, since the start of the process (for metrics).
static SLOW_WAITS: AtomicU64 = AtomicU64::new(0);

/// Number of acquisitions that found their ID busy and waited on the blocking pool.
pub fn slow_waits() -> u64 {
    SLOW_WAITS.load(Ordering::Relaxed)
}

/// Async variants of [`LockTable`]'s acquisitions. Each returns an owned (`'static`) guard, as
/// a future may move between threads and outlive the borrow.
///
/// Every method gives [`Error::Timeout`] once `timeout` has passed without the hold. Must be
/// called inside a tokio runtime (the slow path uses `spawn_blocking`).
pub trait AsyncLockTable {
    /// [`LockTable::read`] without blocking the runtime.
    fn read_async(
        &self,
        id: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> impl Future<Output = Result<ReadGuard<'static>>> + Send;
    /// [`LockTable::upgradable_read`] without blocking the runtime.
    fn upgradable_read_async(
        &self,
        id: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> impl Future<Output = Result<UpgradableReadGuard<'static>>> + Send;
    /// [`LockTable::write`] without blocking the runtime.
    fn write_async(
        &self,
        id: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> impl Future<Output = Result<WriteGuard<'static>>> + Send;
}

/// One of the three acquisitions, as plain functions so the slow path can call them on any
/// thread.
trait Acquire: Send + 'static {
    type Guard: Send + 'static;
    fn try_now(table: &LockTable, id: &[u8]) -> Result<Option<Self::Guard>>;
    fn wait(table: &LockTable, id: &[u8], slice: Duration) -> Result<Self::Guard>;
}

struct Read;
struct Upgradable;
struct Write;

impl Acquire for Read {
    type Guard = ReadGuard<'static>;
    fn try_now(t: &LockTable, id: &[u8]) -> Result<Option<Self::Guard>> {
        Ok(t.try_read(id)?.map(ReadGuard::into_owned))
    }
    fn wait(t: &LockTable, id: &[u8], slice: Duration) -> Result<Self::Guard> {
        Ok(t.read_timeout(id, slice)?.into_owned())
    }
}

impl Acquire for Upgradable {
    type Guard = UpgradableReadGuard<'static>;
    fn try_now(t: &LockTable, id: &[u8]) -> Result<Option<Self::Guard>> {
        Ok(t.try_upgradable_read(id)?
            .map(UpgradableReadGuard::into_owned))
    }
    fn wait(t: &LockTable, id: &[u8], slice: Duration) -> Result<Self::Guard> {
        Ok(t.upgradable_read_timeout(id, slice)?.into_owned())
    }
}

impl Acquire for Write {
    type Guard = WriteGuard<'static>;
    fn try_now(t: &LockTable, id: &[u8]) -> Result<Option<Self::Guard>> {
        Ok(t.try_write(id)?.map(WriteGuard::into_owned))
    }
    fn wait(t: &LockTable, id: &[u8], slice: Duration) -> Result<Self::Guard> {
        Ok(t.write_timeout(id, slice)?.into_owned())
    }
}

/// Set when the future that started a wait is dropped; the waiter stops at its next slice.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        // Relaxed: the flag carries no data; a late look only costs one more slice.
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn acquire<A: Acquire>(table: LockTable, id: Vec<u8>, timeout: Duration) -> Result<A::Guard> {
    if let Some(g) = A::try_now(&table, &id)? {
        return Ok(g);
    }
    SLOW_WAITS.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!("lock_wait", timeout_ms = timeout.as_millis() as u64);
    let cancelled = Arc::new(AtomicBool::new(false));
    let cancel = CancelOnDrop(Arc::clone(&cancelled));
    // A timeout past `Instant`'s range (`Duration::MAX`) means no deadline, as for the
    // blocking `*_timeout` calls; `Instant + Duration` would panic.
    let deadline = Instant::now().checked_add(timeout);
    let waiter = tokio::task::spawn_blocking(move || loop {
        let left = deadline.map_or(WAIT_SLICE, |d| d.saturating_duration_since(Instant::now()));
        if left.is_zero() || cancelled.load(Ordering::Relaxed) {
            return Err(Error::Timeout);
        }
        match A::wait(&table, &id, left.min(WAIT_SLICE)) {
            Err(Error::Timeout) => continue,
            other => return other,
        }
    });
    let r = match tracing::Instrument::instrument(waiter, span).await {
        Ok(r) => r,
        // The waiter panicked or the runtime is shutting down: no hold was kept.
        Err(e) => Err(Error::Io(std::io::Error::other(e.to_string()))),
    };
    drop(cancel);
    r
}

impl AsyncLockTable for LockTable {
    fn read_async(
        &self,
        id: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> impl Future<Output = Result<ReadGuard<'static>>> + Send {
        acquire::<Read>(self.clone(), id.as_ref().to_vec(), timeout)
    }
    fn upgradable_read_async(
        &self,
        id: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> impl Future<Output = Result<UpgradableReadGuard<'static>>> + Send {
        acquire::<Upgradable>(self.clone(), id.as_ref().to_vec(), timeout)
    }
    fn write_async(
        &self,
        id: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> impl Future<Output = Result<WriteGuard<'static>>> + Send {
        acquire::<Write>(self.clone(), id.as_ref().to_vec(), timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TableOptions;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_id_times_out_with_a_typed_error() {
        let t = LockTable::anonymous(&TableOptions::default()).unwrap();
        let _w = t.write("x").unwrap();
        let e = t
            .read_async("x", Duration::from_millis(60))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Timeout), "{e:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_wait_never_keeps_the_lock() {
        let t = LockTable::anonymous(&TableOptions::default()).unwrap();
        let w = t.write("x").unwrap();
        let fut = t.write_async("x", Duration::from_secs(30));
        // Start waiting, then abandon the wait.
        let r = tokio::time::timeout(Duration::from_millis(50), fut).await;
        assert!(r.is_err(), "the wait cannot finish while the writer holds");
        drop(w);
        // The abandoned waiter stops within a slice, or takes the hold in the slice it was in
        // and releases it at once: soon nobody holds anything.
        tokio::time::sleep(WAIT_SLICE * 3).await;
        let start = Instant::now();
        while !t.stats().unwrap().holders.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "abandoned waiter kept the lock"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(t.try_write("x").unwrap().is_some());
    }

    /// A timeout past `Instant`'s range (`Duration::MAX`, "no deadline") on a busy ID panicked
    /// in the waiter (`Instant + Duration` overflow) and the future gave `Error::Io`; now it
    /// waits without a deadline, as the blocking `*_timeout` calls do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timeout_past_the_clocks_range_waits_without_a_deadline() {
        let t = LockTable::anonymous(&TableOptions::default()).unwrap();
        let w = t.write("x").unwrap();
        let (t1, t2) = (t.clone(), t.clone());
        let r = tokio::spawn(async move { t1.read_async("x", Duration::MAX).await.map(drop) });
        let w2 = tokio::spawn(async move { t2.write_async("x", Duration::MAX).await.map(drop) });
        tokio::time::sleep(WAIT_SLICE * 3).await;
        assert!(
            !r.is_finished() && !w2.is_finished(),
            "a waiter gave up early"
        );
        drop(w);
        for h in [r, w2] {
            let got = tokio::time::timeout(Duration::from_secs(5), h).await;
            got.expect("the waiter hung")
                .expect("the waiter panicked")
                .unwrap();
        }
        assert!(t.try_write("x").unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiter_gets_the_lock_when_released() {
        let t = LockTable::anonymous(&TableOptions::default()).unwrap();
        let u = t.upgradable_read("x").unwrap();
        let t2 = t.clone();
        let h = tokio::spawn(
            async move { t2.upgradable_read_async("x", Duration::from_secs(5)).await },
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
        drop(u);
        let g = h.await.unwrap().unwrap();
        assert!(t.try_upgradable_read("x").unwrap().is_none());
        drop(g);
    }
}
