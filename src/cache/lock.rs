//! The creation lock of [`super::Cache::get_or_create`]: the seam between the cache and whatever
//! makes one worker the creator of a key.
//!
//! Owns: the [`CreationLock`] trait, the [`Claim`] it hands out, and its lock-table
//! implementation (the write lock on `lc.<entry ID>`, one host). A backend for several hosts
//! (PostgreSQL advisory locks: `try_write` / `write_timeout` on the same lock name) implements
//! the same two methods; nothing else in the cache names a lock call.
//!
//! May not touch: the store (it only locks).

use crate::{LockTable, Result};
use std::fmt;
use std::time::Duration;

/// Makes one worker at a time the creator of a cache key, across every thread, process (and,
/// for a database backend, host) that shares the cache.
///
/// Contract:
/// - at most one [`Claim`] on a name exists at a time, everywhere;
/// - dropping the claim releases it at once, and so does the death of the process (or
///   connection) that holds it, within the backend's recovery time;
/// - [`claim_timeout`](CreationLock::claim_timeout) waits at most `timeout` and then fails
///   with [`Error::Timeout`](crate::Error::Timeout);
/// - [`try_claim`](CreationLock::try_claim) never waits.
///
/// ```
/// use locktable::cache::CreationLock;
/// use locktable::{LockTable, TableOptions};
/// use std::time::Duration;
/// let table = LockTable::anonymous(&TableOptions::default()).unwrap();
/// let claim = table.try_claim("lc.example").unwrap().expect("free");
/// assert!(table.try_claim("lc.example").unwrap().is_none());
/// assert!(table.claim_timeout("lc.example", Duration::from_millis(1)).is_err());
/// drop(claim);
/// assert!(table.try_claim("lc.example").unwrap().is_some());
/// ```
pub trait CreationLock: Send + Sync + fmt::Debug {
    /// Claims `name` if nobody holds it; `Ok(None)` when somebody does.
    fn try_claim(&self, name: &str) -> Result<Option<Claim>>;
    /// Claims `name`, waiting at most `timeout` ([`Error::Timeout`](crate::Error::Timeout)).
    fn claim_timeout(&self, name: &str, timeout: Duration) -> Result<Claim>;
}

/// A held creation claim; dropping it releases the claim.
#[must_use = "the claim is released when it is dropped"]
pub struct Claim {
    /// The backend's guard, kept only for its `Drop`.
    _hold: Box<dyn Send>,
    previous_owner_died: bool,
}

impl Claim {
    /// Wraps a backend's guard. `previous_owner_died`: the previous holder died holding the
    /// claim (the lock table reports it; a backend that cannot tell says `false`).
    pub fn new(hold: impl Send + 'static, previous_owner_died: bool) -> Claim {
        Claim {
            _hold: Box::new(hold),
            previous_owner_died,
        }
    }

    /// True when the previous holder died while it held the claim (mid-creation).
    pub fn previous_owner_died(&self) -> bool {
        self.previous_owner_died
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("previous_owner_died", &self.previous_owner_died)
            .finish()
    }
}

/// The lock table's write lock on the name. The waiters of `claim_timeout` check the holder's
/// liveness every poll interval, so a creator that was killed is released within one interval
/// (DESIGN.md section 7). `try_claim` does not check liveness: a dead creator's claim is found
/// by the next caller that waits.
impl CreationLock for LockTable {
    fn try_claim(&self, name: &str) -> Result<Option<Claim>> {
        Ok(self.try_write(name)?.map(|g| {
            let died = g.previous_owner_died();
            Claim::new(g.into_owned(), died)
        }))
    }

    fn claim_timeout(&self, name: &str, timeout: Duration) -> Result<Claim> {
        let g = self.write_timeout(name, timeout)?;
        let died = g.previous_owner_died();
        Ok(Claim::new(g.into_owned(), died))
    }
}

/// The claim as a PostgreSQL exclusive advisory lock (on a keyed hash of the claim's name), for
/// caches that several hosts share through one database: the server queues the waiters, bounds
/// the wait with `lock_timeout`, and releases the claim when the creator's connection dies. A
/// database has no "previous owner died" state (a dead client's statements committed whole or
/// not at all), so the flag is always `false`.
#[cfg(feature = "postgres")]
impl CreationLock for crate::session::PgLocks {
    fn try_claim(&self, name: &str) -> Result<Option<Claim>> {
        Ok(self.try_write(name)?.map(|g| Claim::new(g, false)))
    }

    fn claim_timeout(&self, name: &str, timeout: Duration) -> Result<Claim> {
        Ok(Claim::new(self.write_timeout(name, timeout)?, false))
    }
}
