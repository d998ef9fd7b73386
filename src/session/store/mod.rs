//! The storage interface of the session layer, small enough for memcached, Redis or an embedded
//! key-value store.
//!
//! A store keeps, per session ID: an opaque encoded record (written only by [`Store::save`], a
//! compare-and-swap on the version) and, beside it, the session's [`SessionMeta`]: version,
//! creation time, expiry rule and size (from the record's header) and a last-accessed time
//! written by [`Store::touch`] without rewriting the data. Metadata is readable without
//! decoding the record, so stores, `gc` and caches can expire and classify sessions cheaply.
//!
//! A store that keeps a session's values one per key beside a head ([`Capabilities::per_key`])
//! also implements [`Store::load_head`], [`Store::load_values`] and [`Store::save_delta`], so
//! that a huge session is read and written by key; every other store inherits their default
//! methods over `load` and `save`. [`Store::change_counters`] says where the hot-session
//! cache's change counters live for the store, if anywhere.
//!
//! Owns: the trait, its value types and the built-in stores. May not touch: locks of the
//! lock table (a store serializes its own operations).

mod file;
#[cfg(feature = "lmdb")]
mod kv;
#[cfg(feature = "memcached")]
mod memcached;
mod memory;
#[cfg(any(feature = "redis", feature = "memcached"))]
mod native_ttl;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "postgres")]
pub use self::postgres::{PgStore, PgStoreOptions};
pub use file::FileStore;
#[cfg(feature = "lmdb")]
pub use kv::{KvOptions, KvStore};
#[cfg(feature = "memcached")]
pub use memcached::MemcachedStore;
pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;

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

/// When a session expires, chosen per session with [`crate::session::Session::set_expiry`].
///
/// Stored in the record's header, so every store and `gc` can apply it without decoding the
/// record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Expiry {
    /// The manager's rule: idle for [`crate::session::SessionConfig::idle_timeout`], or older
    /// than [`crate::session::SessionConfig::max_lifetime`].
    #[default]
    Default,
    /// Idle for this long (each access restarts it), or older than the manager's
    /// `max_lifetime`, whichever comes first.
    Idle(Duration),
    /// At this time exactly, however active the session is and whatever the manager's limits
    /// (a "remember me" session, a one-time link).
    At(Timestamp),
}

/// What a store knows about a session without decoding its record: enough to expire it,
/// collect it, set a native time-to-live, or decide whether to read it at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionMeta {
    /// Record version; every data write bumps it.
    pub version: u64,
    /// Creation time of the session.
    pub created: Timestamp,
    /// Last-accessed time (kept apart from the record bytes).
    pub last_accessed: Timestamp,
    /// The session's expiry rule.
    pub expiry: Expiry,
    /// Size of the encoded record in bytes.
    pub size: u64,
}

/// A stored record as a store hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Version, times, expiry and size, as the store keeps them beside the bytes. `meta.size`
    /// equals `bytes.len()`, and `version`, `created` and `expiry` equal the record header's.
    pub meta: SessionMeta,
    /// The encoded record (see [`super::record`]), opaque to the store except for its header.
    pub bytes: Vec<u8>,
}

impl StoredSession {
    /// A stored session whose metadata is read from the record's header (and `last_accessed`).
    ///
    /// [`Error::SessionCorrupt`](crate::Error::SessionCorrupt) if the header is unreadable.
    pub fn from_record(bytes: Vec<u8>, last_accessed: Timestamp) -> crate::Result<Self> {
        let h = super::record::peek_header(&bytes)?;
        Ok(StoredSession {
            meta: SessionMeta {
                version: h.version,
                created: Timestamp(h.created),
                last_accessed,
                expiry: h.expiry,
                size: bytes.len() as u64,
            },
            bytes,
        })
    }
}

/// What a store can do, so the manager can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Sessions survive the process (files, a server).
    pub persistent: bool,
    /// The store is shared by all processes that open it.
    pub shared_across_processes: bool,
    /// The store expires sessions by itself (e.g. a TTL), so [`Store::scan_expired`] may return
    /// nothing.
    pub native_expiry: bool,
    /// [`Store::save`]'s compare-and-swap is atomic on its own, against every other user of the
    /// same storage, whatever lock table they use.
    pub atomic_cas: bool,
    /// The store keeps a session's values one per key beside its head, so that
    /// [`Store::load_head`], [`Store::load_values`] and [`Store::save_delta`] read and write
    /// about the keys asked for, not the whole session. Without it those methods are the
    /// default ones (whole records underneath) and the manager uses `load` and `save`.
    pub per_key: bool,
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
            per_key: false,
        }
    }

    /// The same set, saying whether the store keeps values per key ([`Capabilities::per_key`]).
    pub fn with_per_key(mut self, yes: bool) -> Self {
        self.per_key = yes;
        self
    }
}

/// A session's head as a store hands it over ([`Store::load_head`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHead {
    /// Version, times, expiry as for a record; `size` is the session's stored size (head plus
    /// every value, or the whole record), what [`SessionConfig::max_record_size`] limits.
    ///
    /// [`SessionConfig::max_record_size`]: crate::session::SessionConfig::max_record_size
    pub meta: SessionMeta,
    /// The encoded head ([`super::record::encode_head`]).
    pub head: Vec<u8>,
    /// Every live key's stored value ([`super::record::encode_value`]), read in the same
    /// snapshot as the head; `None` when the store left them to [`Store::load_values`].
    pub values: Option<super::record::StoredValues>,
}

/// What [`Store::load_head`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A session stored whole (saved with [`Store::save`], or a store without
    /// [`Capabilities::per_key`]): the record, as [`Store::load`] returns it.
    Whole(StoredSession),
    /// A session stored by key: its head, with its values when small enough.
    ByKey(StoredHead),
}

impl Stored {
    /// The session's metadata.
    pub fn meta(&self) -> &SessionMeta {
        match self {
            Stored::Whole(s) => &s.meta,
            Stored::ByKey(h) => &h.meta,
        }
    }
}

/// One key of a [`Store::save_delta`]: its new stored value, or `None` for a removal.
pub type ChangedValue = (String, Option<Vec<u8>>);

/// The whole record of a session stored by key, rebuilt from its head and values (for
/// [`Store::load`] of a per-key store). `meta.size` becomes the record's length.
pub fn record_of_split(
    mut meta: SessionMeta,
    head: &[u8],
    values: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Result<StoredSession> {
    let head = super::record::decode_head(head, usize::MAX)?;
    if head.version != meta.version {
        return Err(crate::Error::SessionCorrupt(
            "stored head disagrees with its metadata".into(),
        ));
    }
    let bytes = super::record::encode(&super::record::join(&head, values)?, usize::MAX)?;
    meta.size = bytes.len() as u64;
    Ok(StoredSession { meta, bytes })
}

/// A whole record split into its encoded head and its stored values (for a per-key store that
/// holds a session saved whole and is asked for its head, or to change it by key).
pub fn split_record(bytes: &[u8]) -> Result<(Vec<u8>, super::record::StoredValues)> {
    let (head, values) = super::record::split(&super::record::decode(bytes, usize::MAX)?)?;
    Ok((super::record::encode_head(&head)?, values))
}

/// The stored values of `keys` (`None` for a key the record does not hold) in a whole record:
/// what [`Store::load_values`] answers for a session that a per-key store holds whole.
pub(crate) fn values_of_whole(bytes: &[u8], keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>> {
    let values: std::collections::BTreeMap<_, _> = split_record(bytes)?.1.into_iter().collect();
    Ok(keys.iter().map(|k| values.get(*k).cloned()).collect())
}

/// Where the change counters of the hot-session cache live for a store
/// ([`Store::change_counters`]): the cache needs every writer of the store to move the same
/// counters, so it is on only where the store says where they are.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeCounters {
    /// Nowhere: the manager could not tell the store's other users (other hosts, programs it
    /// does not know) about its writes, so it caches nothing.
    None,
    /// In this process's memory: the store is private to the one manager that owns it.
    Process,
    /// In `<dir>/.versions`, mapped by every manager that uses the store (processes of one
    /// host sharing a directory).
    Directory(std::path::PathBuf),
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
    /// The session is already expired by its stored metadata: a touch must not revive it.
    Expired,
}

/// The expiry rule in force at one instant: the current time and the manager's defaults.
/// Applied to a session's [`SessionMeta`] by every store, by `gc` and by touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    /// The current time.
    pub now: Timestamp,
    /// The manager's idle timeout (for [`Expiry::Default`]).
    pub idle_timeout: Duration,
    /// The manager's absolute lifetime (for [`Expiry::Default`] and [`Expiry::Idle`]).
    pub max_lifetime: Duration,
}

impl Cutoffs {
    /// The last instant at which a session with these times is still alive.
    pub fn expires_at(&self, created: Timestamp, last_accessed: Timestamp, e: Expiry) -> Timestamp {
        let end_of_life = created.saturating_add(self.max_lifetime);
        match e {
            Expiry::Default => last_accessed
                .saturating_add(self.idle_timeout)
                .min(end_of_life),
            Expiry::Idle(d) => last_accessed.saturating_add(d).min(end_of_life),
            Expiry::At(t) => t,
        }
    }

    /// True when a session with these times and rule is expired at `now`.
    pub fn expired(&self, created: Timestamp, last_accessed: Timestamp, e: Expiry) -> bool {
        self.now > self.expires_at(created, last_accessed, e)
    }

    /// [`Cutoffs::expired`] of a session's metadata.
    pub fn meta_expired(&self, m: &SessionMeta) -> bool {
        self.expired(m.created, m.last_accessed, m.expiry)
    }
}

/// The part of [`Store::touch`]'s contract that every store decides alike from the session's
/// stored metadata `m` (read under the store's own serialization): [`Touch::Skipped`] when the
/// stored time is already `>= at - coalesce`, else [`Touch::Expired`] when the session is
/// expired under `cutoffs`; `None` when the touch is to be written.
pub(crate) fn touch_refusal(
    m: &SessionMeta,
    at: Timestamp,
    coalesce: Duration,
    cutoffs: &Cutoffs,
) -> Option<Touch> {
    if m.last_accessed >= at.saturating_sub(coalesce) {
        Some(Touch::Skipped)
    } else if cutoffs.meta_expired(m) {
        Some(Touch::Expired)
    } else {
        None
    }
}

/// Result of one [`Store::scan_expired`] call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpiredScan {
    /// Sessions found expired by their metadata (re-checked by [`Store::remove_expired`]).
    pub expired: Vec<SessionId>,
    /// Entries whose metadata (header) cannot be parsed: corrupt for sure, since saves are
    /// atomic. The manager re-checks them under the session's lock before deleting.
    pub corrupt: Vec<SessionId>,
    /// Entries that gave an I/O error (skipped, logged; the scan moved past them).
    pub unreadable: usize,
    /// Entries examined (at most the budget).
    pub examined: usize,
    /// Leftover temporary files removed on the way (stores that have them).
    pub temp_files_removed: usize,
    /// True when the budget ran out before a full pass: call again to continue.
    pub more: bool,
}

/// Storage backend of the session layer. Object-safe: the manager holds a `Box<dyn Store>`.
///
/// Contract (checked by the conformance suite in `tests/session_conformance.rs`):
/// - `load` returns a consistent record (never a torn one) with its [`SessionMeta`], or
///   [`Error::TooLarge`](crate::Error::TooLarge) without reading it when the record is larger
///   than `max_size` (the manager's limit) or than a limit of the store's own.
/// - `save` is a compare-and-swap: it writes only when the stored version equals `expected`
///   (`None`: the session must not exist), and stores `last_accessed` as the maximum of the stored
///   and the given one. It returns `Ok(false)`, writing nothing, when the comparison fails. A
///   store with a size limit of its own refuses bigger records here with `TooLarge`, so that
///   nothing it accepts is unreadable later. When the outcome is unknown (the record may have
///   been written but a later step failed) it returns
///   [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown), never a plain error.
/// - `meta` reads the metadata without the record (cheap: a header or a small side record).
/// - `touch` never moves the last-accessed time backwards, never changes the record, and skips
///   the write when the stored time is already `>= at - coalesce`. It writes nothing and returns
///   [`Touch::Expired`] when the session is expired under `cutoffs` by its stored metadata,
///   checked atomically with the write, so that no touch revives a session another request saw
///   expired.
/// - `delete` removes record, access time and any leftover of the session (temporary files).
/// - `remove_expired` deletes the session only if it is expired under `cutoffs`, checked
///   atomically with the delete (and with touches), and says whether it did.
/// - `scan_expired` examines at most `budget` entries, reading metadata only, and never fails
///   because of one bad entry: it counts it as unreadable and moves on. Successive calls cover
///   every entry.
pub trait Store: Send + Sync + fmt::Debug {
    /// What this store can do.
    fn capabilities(&self) -> Capabilities;
    /// Loads a session; see the trait docs.
    fn load(&self, id: &SessionId, max_size: usize) -> Result<Option<StoredSession>>;
    /// Compare-and-swap save; see the trait docs.
    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool>;
    /// The session's metadata without its record.
    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>>;
    /// Records an access without rewriting the data; see the trait docs.
    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> Result<Touch>;
    /// The stored last-accessed time, cheaply (no record read).
    fn last_accessed(&self, id: &SessionId) -> Result<Option<Timestamp>> {
        Ok(self.meta(id)?.map(|m| m.last_accessed))
    }
    /// Deletes a session and its leftovers; `Ok(true)` if it existed.
    fn delete(&self, id: &SessionId) -> Result<bool>;
    /// Deletes the session if it is expired under `cutoffs` (atomic check and delete).
    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool>;
    /// Examines up to `budget` entries from a rotating cursor; see the trait docs.
    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> Result<ExpiredScan>;
    /// Housekeeping (e.g. leftover temporary files); returns how many items were removed.
    fn cleanup(&self) -> Result<usize> {
        Ok(0)
    }

    /// Where the hot-session cache's change counters live for this store. The default,
    /// [`ChangeCounters::None`], turns the cache off; a store may name a place only if every
    /// writer of its data goes through a `SessionManager` that maps the same counters.
    fn change_counters(&self) -> ChangeCounters {
        ChangeCounters::None
    }

    /// The session as it is stored: a whole record ([`Stored::Whole`], as `load` returns it),
    /// or for a session stored by key its head ([`Stored::ByKey`]: what conflicts and expiry
    /// need, without the values), with the values (`values`) in the same snapshot when the
    /// store read them anyway or the session's stored size is at most `values_up_to`.
    /// [`Error::TooLarge`](crate::Error::TooLarge) when the session's stored size (head plus
    /// values) exceeds `max_size`, as for `load`.
    ///
    /// The default is `load`: right for any store that keeps whole records. A store that keeps
    /// values per key ([`Capabilities::per_key`]) reads the head alone.
    fn load_head(
        &self,
        id: &SessionId,
        max_size: usize,
        values_up_to: u64,
    ) -> Result<Option<Stored>> {
        let _ = values_up_to;
        Ok(self.load(id, max_size)?.map(Stored::Whole))
    }

    /// The stored values of `keys` at head version `version` (`None` for a key without a live
    /// value), or `Ok(None)` when the session is no longer at that version (or gone): a caller
    /// never mixes versions. Head check and reads are one atomic step.
    ///
    /// The default reads the whole record with `load`.
    fn load_values(
        &self,
        id: &SessionId,
        version: u64,
        keys: &[&str],
    ) -> Result<Option<Vec<Option<Vec<u8>>>>> {
        let Some(st) = self.load(id, usize::MAX)? else {
            return Ok(None);
        };
        if st.meta.version != version {
            return Ok(None);
        }
        let record = super::record::decode(&st.bytes, usize::MAX)?;
        let value = |k: &str| -> Result<Option<Vec<u8>>> {
            match (record.body.data.get(k), record.body.changed.get(k)) {
                (Some(v), Some(&tag)) => super::record::encode_value(k, tag, v).map(Some),
                _ => Ok(None),
            }
        };
        keys.iter()
            .map(|k| value(k))
            .collect::<Result<_>>()
            .map(Some)
    }

    /// Compare-and-swap of a session by key: like `save` (same `expected` rule, same
    /// last-accessed maximum, `OutcomeUnknown` and `TooLarge` alike), writing the new head
    /// (`new.values` is ignored) and only the `changed` values (`None`: the key's value is
    /// deleted), atomically. `new.meta.size` is the session's new stored size.
    ///
    /// The default reads the current record with `load`, applies the change and writes the
    /// whole record with `save` (whose compare-and-swap still guards it).
    fn save_delta(
        &self,
        id: &SessionId,
        expected: Option<u64>,
        new: &StoredHead,
        changed: &[ChangedValue],
    ) -> Result<bool> {
        let mut values = std::collections::BTreeMap::new();
        if let Some(v) = expected {
            match self.load(id, usize::MAX)? {
                Some(cur) if cur.meta.version == v => {
                    values.extend(split_record(&cur.bytes)?.1);
                }
                _ => return Ok(false),
            }
        }
        for (k, v) in changed {
            match v {
                Some(bytes) => values.insert(k.clone(), bytes.clone()),
                None => values.remove(k),
            };
        }
        let whole = record_of_split(new.meta, &new.head, &values)?;
        self.save(id, expected, &whole)
    }
}
