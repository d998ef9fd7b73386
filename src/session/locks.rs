//! Every lock the session manager takes, in one place, each with a deadline.
//!
//! Owns: the mapping from a session to its lock-table ID and the three acquisitions (read for a
//! load, upgradable for an exclusive request, write for a commit, cycle or delete), each bounded
//! by a [`Deadline`] and failing with [`Error::Timeout`] when it passes. Nothing else in the
//! session layer calls the lock table, so another lock backend (for example advisory locks of a
//! database shared by several hosts) replaces this module only.
//!
//! May not touch: the store; it only locks.

use super::id::SessionId;
use crate::{Error, LockTable, ReadGuard, Result, UpgradableReadGuard, WriteGuard};
use std::time::{Duration, Instant};

/// The instant a session-layer call gives up waiting for locks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline(Instant);

impl Deadline {
    /// `timeout` from now (saturating far in the future).
    pub(super) fn after(timeout: Duration) -> Deadline {
        let now = Instant::now();
        Deadline(
            now.checked_add(timeout)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400)),
        )
    }

    /// Time left; zero once passed (a zero wait still takes a free lock).
    fn left(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// The lock-table ID of a session's data lock (for tools and crash tests).
///
/// ```
/// use locktable::session::{session_lock_id, SessionId};
/// let id = SessionId::generate().unwrap();
/// assert!(session_lock_id(&id).len() <= 256);
/// ```
pub fn session_lock_id(id: &SessionId) -> String {
    format!("ls.d.{}", id.as_str())
}

/// Shared hold for reading a consistent record.
pub(super) fn read<'a>(t: &'a LockTable, id: &SessionId, d: Deadline) -> Result<ReadGuard<'a>> {
    t.read_timeout(session_lock_id(id), d.left())
}

/// Upgradable hold of an exclusive request (kept until its commit: an owned guard).
pub(super) fn upgradable(
    t: &LockTable,
    id: &SessionId,
    d: Deadline,
) -> Result<UpgradableReadGuard<'static>> {
    Ok(t.upgradable_read_timeout(session_lock_id(id), d.left())?
        .into_owned())
}

/// Exclusive hold of a commit, cycle, invalidation or delete.
pub(super) fn write(t: &LockTable, id: &SessionId, d: Deadline) -> Result<WriteGuard<'static>> {
    Ok(t.write_timeout(session_lock_id(id), d.left())?.into_owned())
}

/// Exclusive hold if free now, else `None` (gc never waits for a busy session).
pub(super) fn try_write<'a>(t: &'a LockTable, id: &SessionId) -> Result<Option<WriteGuard<'a>>> {
    t.try_write(session_lock_id(id))
}

/// Upgrades an exclusive request's hold; on timeout the hold is handed back unchanged.
pub(super) fn upgrade(
    g: UpgradableReadGuard<'static>,
    d: Deadline,
) -> std::result::Result<WriteGuard<'static>, (Error, UpgradableReadGuard<'static>)> {
    g.upgrade_timeout(d.left()).map_err(|g| (Error::Timeout, g))
}
