//! The storage interface of the session layer, small enough for memcached, Redis or an embedded
//! key-value store.
//!
//! A store keeps, per session ID: an opaque encoded record with its version and creation time
//! (written only by [`Store::save`], a compare-and-swap on the version), and a last-accessed time
//! kept apart from the record (written by [`Store::touch`] without rewriting the data).

mod file;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;

#[cfg(feature = "postgres")]
pub use self::postgres::{PgStore, PgStoreOptions};
pub use file::FileStore;
pub use memory::MemoryStore;

use super::id::SessionId;
use crate::Result;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: milliseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(u64::MAX as u128) as u64),
        )
    }
    /// `self - d`, saturating at 0.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(d.as_millis().min(u64::MAX as u128) as u64),
        )
    }
    /// Converts to a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
    /// Converts from a [`SystemTime`] (times before 1970 become 0).
    pub fn from_system_time(t: SystemTime) -> Timestamp {
        Timestamp(
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
                .unwrap_or(0),
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// A source of the current time (replaceable in tests).
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// A clock that moves only when told to; for tests.
///
/// ```
/// use locktable::session::{Clock, ManualClock, Timestamp};
/// use std::time::Duration;
/// let c = ManualClock::new(Timestamp(1_000));
/// c.advance(Duration::from_secs(1));
/// assert_eq!(c.now(), Timestamp(2_000));
/// ```
#[derive(Debug)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    /// A clock showing `t`.
    pub fn new(t: Timestamp) -> Self {
        ManualClock(std::sync::atomic::AtomicU64::new(t.0))
    }
    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(
            d.as_millis().min(u64::MAX as u128) as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }
    /// Sets the clock (may go backwards: the session layer must cope).
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// A stored record as a store hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Record version; every data write bumps it.
    pub version: u64,
    /// Creation time of the session.
    pub created: Timestamp,
    /// Last-accessed time (kept apart from `bytes`).
    pub last_accessed: Timestamp,
    /// The encoded record (see [`super::record`]), opaque to the store.
    pub bytes: Vec<u8>,
}

/// What a store can do, so the manager can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Sessions survive the process (files, a server).
    pub persistent: bool,
    /// The store is shared by all processes that open it.
    pub shared_across_processes: bool,
    /// The store expires sessions by itself (e.g. a TTL), so [`Store::list_expired`] may return
    /// nothing.
    pub native_expiry: bool,
    /// [`Store::save`]'s compare-and-swap is atomic on its own, without the manager's lock.
    pub atomic_cas: bool,
}

impl Capabilities {
    /// Builds a capability set (the struct is non-exhaustive).
    pub fn new(
        persistent: bool,
        shared_across_processes: bool,
        native_expiry: bool,
        atomic_cas: bool,
    ) -> Self {
        Capabilities {
            persistent,
            shared_across_processes,
            native_expiry,
            atomic_cas,
        }
    }
}

/// Outcome of [`Store::touch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// A new last-accessed time was stored.
    Written,
    /// The stored time was already recent enough; nothing was written.
    Skipped,
    /// No such session.
    Missing,
    /// The stored last-accessed time was already older than the idle
    /// cut-off: the session is expired and a touch must not revive it.
    Expired,
}

/// Expiry cut-offs for [`Store::list_expired`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    /// Sessions last accessed before this are idle-expired.
    pub idle_before: Timestamp,
    /// Sessions created before this exceeded their absolute lifetime.
    pub created_before: Timestamp,
}

impl Cutoffs {
    /// True when a session with these times is expired.
    pub fn expired(&self, created: Timestamp, last_accessed: Timestamp) -> bool {
        last_accessed < self.idle_before || created < self.created_before
    }
}

/// Storage backend of the session layer.
///
/// Contract (checked by the conformance suite in `tests/session_conformance.rs`):
/// - `load` returns a consistent record (never a torn one) with its version and times.
/// - `save` is a compare-and-swap: it writes only when the stored version equals `expected`
///   (`None`: the session must not exist), and stores `last_accessed` as the maximum of the stored
///   and the given one. It returns `Ok(false)`, writing nothing, when the comparison fails.
/// - `touch` never moves the last-accessed time backwards, never changes the record, and skips
///   the write when the stored time is already `>= at - coalesce`. It writes nothing and returns
///   [`Touch::Expired`] when the stored time is older than `idle_before`, checked atomically
///   with the write, so that no touch revives a session another request already saw expired.
/// - `delete` removes record and access time; `list_expired` returns at most `limit` IDs whose
///   sessions are expired under `cutoffs` (it may include unreadable entries, which the manager
///   validates and removes).
pub trait Store: Send + Sync + fmt::Debug {
    /// What this store can do.
    fn capabilities(&self) -> Capabilities;
    /// Loads a session.
    fn load(&self, id: &SessionId) -> Result<Option<StoredSession>>;
    /// Compare-and-swap save; see the trait docs.
    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool>;
    /// Records an access without rewriting the data; see the trait docs.
    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        idle_before: Timestamp,
    ) -> Result<Touch>;
    /// The stored last-accessed time, cheaply (no record read).
    fn last_accessed(&self, id: &SessionId) -> Result<Option<Timestamp>>;
    /// Deletes a session; `Ok(true)` if it existed.
    fn delete(&self, id: &SessionId) -> Result<bool>;
    /// Up to `limit` expired sessions.
    fn list_expired(&self, cutoffs: Cutoffs, limit: usize) -> Result<Vec<SessionId>>;
    /// Housekeeping (e.g. leftover temporary files); returns how many items were removed.
    fn cleanup(&self) -> Result<usize> {
        Ok(0)
    }
}
