//! Every lock the session manager takes, in one place, each with a deadline.
//!
//! Owns: the mapping from a session to its lock-table ID and the three acquisitions (read for a
//! load, upgradable for an exclusive request, write for a commit, cycle or delete), each bounded
//! by a [`Deadline`] and failing with [`Error::Timeout`] when it passes. Nothing else in the
//! session layer calls the lock table. [`Locks`] picks the backend: the lock table, or (feature
//! `postgres`) advisory locks of a database shared by several hosts.
//!
//! May not touch: the store; it only locks.

use super::id::SessionId;
#[cfg(feature = "postgres")]
use super::locks_pg::{PgLocks, PgUpgradableGuard, PgWriteGuard};
use crate::{Error, LockTable, ReadGuard, Result, UpgradableReadGuard, WriteGuard};
use std::time::{Duration, Instant};

/// The instant a session-layer call gives up waiting for locks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline(Instant);

/// `now + timeout`, saturating at a century from now (`Duration::MAX` means "no bound", and
/// `Instant + Duration` panics on overflow).
pub(super) fn instant_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

impl Deadline {
    /// `timeout` from now (saturating far in the future).
    pub(super) fn after(timeout: Duration) -> Deadline {
        Deadline(instant_after(timeout))
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

/// The lock backend of a manager: the lock table (one host) or, with the `postgres` feature,
/// advisory locks of a PostgreSQL database shared by several hosts.
#[derive(Debug, Clone)]
pub(super) enum Locks {
    /// The lock table: every mode is a lock-table lock on [`session_lock_id`].
    Table(LockTable),
    /// Advisory locks (see `locks_pg.rs` for the mode mapping). Loads of optimistic requests
    /// take none: each `PgStore` load is one statement reading one snapshot, never torn.
    #[cfg(feature = "postgres")]
    Pg(PgLocks),
}

/// A read hold (released when dropped).
pub(super) enum ReadHold<'a> {
    Table(ReadGuard<'a>),
    /// Nothing to hold: the store's reads are atomic on their own.
    #[cfg(feature = "postgres")]
    Free,
}

/// An upgradable hold, kept by an exclusive request until its commit.
pub(super) enum UpgradableHold {
    Table(UpgradableReadGuard<'static>),
    #[cfg(feature = "postgres")]
    Pg(PgUpgradableGuard),
}

/// A write hold.
pub(super) enum WriteHold<'a> {
    Table(WriteGuard<'a>),
    /// Held for its `Drop`, which releases the advisory locks.
    #[cfg(feature = "postgres")]
    Pg(#[allow(dead_code)] PgWriteGuard),
}

impl std::fmt::Debug for UpgradableHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradableHold::Table(g) => g.fmt(f),
            #[cfg(feature = "postgres")]
            UpgradableHold::Pg(g) => g.fmt(f),
        }
    }
}

impl ReadHold<'_> {
    /// The previous holder died while holding the write lock (the lock table reports it; the
    /// database has no such state: a dead client's statement committed whole or not at all).
    pub(super) fn previous_owner_died(&self) -> bool {
        match self {
            ReadHold::Table(g) => g.previous_owner_died(),
            #[cfg(feature = "postgres")]
            ReadHold::Free => false,
        }
    }
}

impl UpgradableHold {
    /// See [`ReadHold::previous_owner_died`].
    pub(super) fn previous_owner_died(&self) -> bool {
        match self {
            UpgradableHold::Table(g) => g.previous_owner_died(),
            #[cfg(feature = "postgres")]
            UpgradableHold::Pg(_) => false,
        }
    }
}

impl WriteHold<'_> {
    /// See [`ReadHold::previous_owner_died`].
    pub(super) fn previous_owner_died(&self) -> bool {
        match self {
            WriteHold::Table(g) => g.previous_owner_died(),
            #[cfg(feature = "postgres")]
            WriteHold::Pg(_) => false,
        }
    }
}

/// Shared hold for reading a consistent record.
pub(super) fn read<'a>(t: &'a Locks, id: &SessionId, d: Deadline) -> Result<ReadHold<'a>> {
    match t {
        Locks::Table(t) => Ok(ReadHold::Table(
            t.read_timeout(session_lock_id(id), d.left())?,
        )),
        #[cfg(feature = "postgres")]
        Locks::Pg(_) => Ok(ReadHold::Free),
    }
}

/// Upgradable hold of an exclusive request (kept until its commit: an owned guard).
pub(super) fn upgradable(t: &Locks, id: &SessionId, d: Deadline) -> Result<UpgradableHold> {
    match t {
        Locks::Table(t) => Ok(UpgradableHold::Table(
            t.upgradable_read_timeout(session_lock_id(id), d.left())?
                .into_owned(),
        )),
        #[cfg(feature = "postgres")]
        Locks::Pg(p) => Ok(UpgradableHold::Pg(
            p.upgradable_timeout(id.as_str(), d.left())?,
        )),
    }
}

/// Exclusive hold of a commit, cycle, invalidation or delete.
///
/// On PostgreSQL too: a commit waits for an exclusive request's upgradable hold (so an
/// exclusive request cannot conflict), and `cycle_id`'s copy-then-delete excludes commits to the
/// old ID (so none is lost by the delete).
pub(super) fn write(t: &Locks, id: &SessionId, d: Deadline) -> Result<WriteHold<'static>> {
    match t {
        Locks::Table(t) => Ok(WriteHold::Table(
            t.write_timeout(session_lock_id(id), d.left())?.into_owned(),
        )),
        #[cfg(feature = "postgres")]
        Locks::Pg(p) => Ok(WriteHold::Pg(p.write_timeout(id.as_str(), d.left())?)),
    }
}

/// Exclusive hold if free now, else `None` (gc never waits for a busy session).
pub(super) fn try_write<'a>(t: &'a Locks, id: &SessionId) -> Result<Option<WriteHold<'a>>> {
    match t {
        Locks::Table(t) => Ok(t.try_write(session_lock_id(id))?.map(WriteHold::Table)),
        #[cfg(feature = "postgres")]
        Locks::Pg(p) => Ok(p.try_write(id.as_str())?.map(WriteHold::Pg)),
    }
}

/// Exclusive hold of a lock that names no session (e.g. the background gc's), if free now.
pub(super) fn try_write_named<'a>(t: &'a Locks, name: &str) -> Result<Option<WriteHold<'a>>> {
    match t {
        Locks::Table(t) => Ok(t.try_write(name)?.map(WriteHold::Table)),
        #[cfg(feature = "postgres")]
        Locks::Pg(p) => Ok(p.try_write(name)?.map(WriteHold::Pg)),
    }
}

/// Releases the holds of dead processes now. The lock table does it here (a `try_*` runs no
/// waiter's liveness check); the PostgreSQL server does it by itself when a client dies.
pub(super) fn reap_dead(t: &Locks) -> Result<()> {
    match t {
        Locks::Table(t) => t.reap().map(drop),
        #[cfg(feature = "postgres")]
        Locks::Pg(_) => Ok(()),
    }
}

/// Upgrades an exclusive request's hold; on timeout the hold is handed back unchanged.
pub(super) fn upgrade(
    g: UpgradableHold,
    d: Deadline,
) -> std::result::Result<WriteHold<'static>, (Error, UpgradableHold)> {
    match g {
        UpgradableHold::Table(g) => g
            .upgrade_timeout(d.left())
            .map(WriteHold::Table)
            .map_err(|g| (Error::Timeout, UpgradableHold::Table(g))),
        #[cfg(feature = "postgres")]
        UpgradableHold::Pg(g) => g
            .upgrade_timeout(d.left())
            .map(WriteHold::Pg)
            .map_err(|(e, g)| (e, UpgradableHold::Pg(g))),
    }
}
