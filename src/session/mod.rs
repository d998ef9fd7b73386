//! Web sessions on top of the lock table: many concurrent readers per session, one end-of-request
//! update, no lost updates, any storage backend.
//!
//! # Quick start
//! ```
//! use locktable::session::SessionManager;
//! let dir = tempfile::tempdir().unwrap();
//! let mgr = SessionManager::open(dir.path()).unwrap();
//!
//! // Request 1 creates the session and stores a value.
//! let mut s = mgr.create().unwrap();
//! s.insert("user", &"ann").unwrap();
//! let cookie = s.id().to_string();
//! s.commit().unwrap();
//!
//! // Request 2 (any thread or process) reads it; a read-only request writes no data.
//! let s = mgr.load(&cookie).unwrap().expect("session exists");
//! assert_eq!(s.get::<String>("user").unwrap().as_deref(), Some("ann"));
//! s.commit().unwrap();
//!
//! // A read-modify-write that retries on conflicts (bounded, see `transact`).
//! let n = mgr
//!     .transact(&cookie, |s| {
//!         let n = s.get::<u64>("visits")?.unwrap_or(0) + 1;
//!         s.insert("visits", &n)?;
//!         Ok(n)
//!     })
//!     .unwrap();
//! assert_eq!(n, Some(1));
//!
//! // Hostile or unknown IDs are never adopted.
//! assert!(mgr.load("../../etc/passwd").unwrap().is_none());
//! ```
//!
//! # Modes
//! - **Optimistic** ([`SessionManager::load`]): the read lock is held only while the record is
//!   read. [`Session::commit`] takes the write lock briefly, re-reads the latest record, applies
//!   only this request's inserted and removed keys, and fails with [`Error::Conflict`] (writing
//!   nothing) if another request committed one of those keys since this one loaded.
//! - **Exclusive** ([`SessionManager::load_exclusive`]): the upgradable lock is held from load to
//!   commit, so the request's read-modify-write cannot conflict; plain loads continue meanwhile.
//! - **Read-only**: a request that changes nothing never writes data; it only records its access
//!   time, coalesced (see [`SessionConfig::touch_interval`]).

//! - **Write skew**: by default only the keys a request *wrote* are checked at commit, so a
//!   request that reads `a` and writes `b` may commit on a stale `a`. Read a key with
//!   [`Session::get_for_update`] to make it part of the conflict check.
//!
//! # What is guaranteed
//! - No update lost: a commit that returns `Ok` is applied exactly once, and a change to a key is
//!   never overwritten by a request that loaded before it (that request gets
//!   [`Error::Conflict`]). A commit whose outcome is unknown says so ([`Error::OutcomeUnknown`]).
//! - Nothing stuck: every wait is bounded by [`SessionConfig::lock_timeout`] (or the `*_timeout`
//!   variants) and ends in [`Error::Timeout`]; locks of dead processes are recovered.
//! - Nothing revived: a session seen expired is deleted at once; touches and commits re-check
//!   expiry atomically with their write.
//! - A visitor costs nothing until a commit stores data: [`SessionManager::create`] is lazy.
//! - A hot session is read without the store: each manager caches decoded sessions
//!   ([`SessionConfig::cache_bytes`]) and uses a copy only while a change counter shared by
//!   every process on the store says that no write of it began since the copy was read, so a
//!   commit in any process is seen by the very next load in every other one.
//!
//! Owns: the request cycle (load, merge, commit, touch, expiry, gc) over a [`Store`] and the
//! lock table; takes its locks only through `locks.rs`. May not touch: lock-table internals.

mod cache;
mod gc;
mod id;
mod locks;
#[cfg(feature = "postgres")]
mod locks_pg;
#[cfg(feature = "postgres")]
mod pg_pool;
pub mod record;
mod store;

pub use gc::{GcHandle, GcStats, GC_LOCK_ID};
pub use id::{SessionId, ID_BYTES, ID_LEN};
pub use locks::session_lock_id;
#[cfg(feature = "postgres")]
pub use locks_pg::{PgLockKeys, PgLocks, PgReadGuard, PgUpgradableGuard, PgWriteGuard};
#[cfg(feature = "postgres")]
pub use pg_pool::{PgPool, PgPoolOptions, DEFAULT_POOL_SIZE};
#[cfg(feature = "memcached")]
pub use store::MemcachedStore;
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::{
    Capabilities, ChangeCounters, ChangedValue, Clock, Cutoffs, ExpiredScan, Expiry, FileStore,
    ManualClock, MemoryStore, SessionMeta, Store, Stored, StoredHead, StoredSession, SystemClock,
    Timestamp, Touch,
};
#[cfg(feature = "lmdb")]
pub use store::{KvOptions, KvStore};
#[cfg(feature = "postgres")]
pub use store::{PgStore, PgStoreOptions};

use crate::{Error, LockTable, Result, TableOptions};
use locks::Deadline;
use record::{Head, KeyState, Record, RecordBody};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What to do when a stored record fails validation (checksum, format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptPolicy {
    /// Delete the session and treat it as absent (counted in [`ManagerStats::corrupt_invalidated`]).
    Invalidate,
    /// Return [`Error::SessionCorrupt`] to the caller and leave the record in place.
    Error,
}

/// Settings of a [`SessionManager`].
///
/// ```
/// use locktable::session::SessionConfig;
/// use std::time::Duration;
/// let cfg = SessionConfig { idle_timeout: Duration::from_secs(600), ..SessionConfig::default() };
/// assert_eq!(cfg.effective_touch_interval(), Duration::from_secs(10));
/// assert_eq!(cfg.lock_timeout, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// A session not accessed for this long expires ([`Expiry::Default`]). Default 30 minutes.
    pub idle_timeout: Duration,
    /// A session expires this long after creation, however active ([`Expiry::Default`] and
    /// [`Expiry::Idle`]). Default 24 hours.
    pub max_lifetime: Duration,
    /// A request's access is not stored when the stored time is newer than `now - touch_interval`.
    /// `None` (default): `idle_timeout / 60`. Expiry may therefore happen up to this much early.
    /// At most half of `idle_timeout` is used (a longer interval would never store the access of
    /// a session in use, which would then expire however busy it is). A session with its own
    /// [`Expiry::Idle`] uses at most a sixtieth of its own timeout.
    pub touch_interval: Option<Duration>,
    /// Largest encoded record: bigger commits fail with [`Error::TooLarge`], and the store is
    /// given the same limit for reading. Default 1 MiB.
    pub max_record_size: usize,
    /// Optimistic attempts of [`SessionManager::transact`] before its final exclusive attempt.
    /// Default 4.
    pub transact_retries: u32,
    /// Most entries one [`SessionManager::gc`] call examines (and so deletes). Default 1,000.
    pub gc_batch: usize,
    /// Most tombstones kept per record; older ones are folded into a floor version. Default 256.
    pub max_tombstones: usize,
    /// What to do with corrupt records. Default [`CorruptPolicy::Invalidate`].
    pub on_corrupt: CorruptPolicy,
    /// Time source. Default [`SystemClock`].
    pub clock: Arc<dyn Clock>,
    /// Durable saves in the embedded [`FileStore`] of [`SessionManager::open`] /
    /// [`SessionManager::new_embedded`] (see [`FileStore::with_fsync`]). Default `true`.
    pub fsync: bool,
    /// Longest wait for a lock in any one call (load, commit, transact, delete, ...), after
    /// which the call fails with [`Error::Timeout`]. Default 5 seconds.
    pub lock_timeout: Duration,
    /// Bytes (of encoded records) of decoded sessions each manager keeps to answer loads of
    /// unchanged sessions without reading the store; `0` turns the cache off. Default 64 MiB.
    /// Validated across processes by change counters where the store says
    /// ([`Store::change_counters`]): `<dir>/.versions` of a [`FileStore`] or a `KvStore`, memory
    /// for a [`MemoryStore`]; for a store that names no place (one shared by hosts) the cache
    /// stays off. With `0`, the manager still moves those counters when it writes, so the
    /// caches of other managers on the same store never serve a copy its writes replaced.
    /// See [`ManagerStats::cache_hits`].
    pub cache_bytes: usize,
    /// Sessions larger than this many bytes are stored and loaded **by key** on a store that
    /// keeps values per key ([`Capabilities::per_key`]): a load reads the session's head only,
    /// [`Session::get`] reads a value on its first use, and a commit writes the head and the
    /// changed values only. Smaller sessions (and every session of other stores) are whole
    /// records, read and written in one piece. Default 256 KiB; `u64::MAX` keeps every session
    /// whole (no `get` can then fail with a conflict, see [`Session::get`]).
    pub lazy_above: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_timeout: Duration::from_secs(30 * 60),
            max_lifetime: Duration::from_secs(24 * 3600),
            touch_interval: None,
            max_record_size: 1 << 20,
            transact_retries: 4,
            gc_batch: 1000,
            max_tombstones: 256,
            on_corrupt: CorruptPolicy::Invalidate,
            clock: Arc::new(SystemClock),
            fsync: true,
            lock_timeout: Duration::from_secs(5),
            cache_bytes: 64 << 20,
            lazy_above: 256 << 10,
        }
    }
}

impl SessionConfig {
    /// The touch interval in force for sessions with [`Expiry::Default`].
    pub fn effective_touch_interval(&self) -> Duration {
        self.touch_interval
            .unwrap_or(self.idle_timeout / 60)
            .min(self.idle_timeout / 2)
    }

    /// The touch interval of a session with expiry rule `e`.
    fn touch_interval_for(&self, e: Expiry) -> Duration {
        match e {
            Expiry::Idle(d) => self.effective_touch_interval().min(d / 60),
            _ => self.effective_touch_interval(),
        }
    }

    /// The expiry rule in force at `now`.
    pub fn cutoffs(&self, now: Timestamp) -> Cutoffs {
        Cutoffs {
            now,
            idle_timeout: self.idle_timeout,
            max_lifetime: self.max_lifetime,
        }
    }
}

/// Counters of a manager (all processes count separately).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Sessions returned by `load`, `load_exclusive` and `create`.
    pub loads: u64,
    /// Data writes to the store (first store of a session, commit with changes, cycle).
    pub data_writes: u64,
    /// Access-time writes to the store.
    pub touches_written: u64,
    /// Access-time writes skipped by coalescing.
    pub touches_skipped: u64,
    /// Commits that failed with [`Error::Conflict`].
    pub conflicts: u64,
    /// Corrupt sessions deleted under [`CorruptPolicy::Invalidate`] or after a dead writer.
    pub corrupt_invalidated: u64,
    /// Lock acquisitions that reported a writer which died holding the lock.
    pub owner_died_seen: u64,
    /// Sessions with uncommitted changes dropped without [`Session::commit`] or
    /// [`Session::discard`] (each also logged as a `tracing` warning): a lost change.
    pub dirty_dropped: u64,
    /// Sessions a request found expired and deleted on the spot.
    pub expired_removed: u64,
    /// `load`s answered from the cache of decoded sessions (no store read, no decode).
    pub cache_hits: u64,
    /// `load`s that looked in the cache and read the store.
    pub cache_misses: u64,
}

#[derive(Debug, Default)]
struct Counters {
    loads: AtomicU64,
    data_writes: AtomicU64,
    touches_written: AtomicU64,
    touches_skipped: AtomicU64,
    conflicts: AtomicU64,
    corrupt_invalidated: AtomicU64,
    owner_died_seen: AtomicU64,
    dirty_dropped: AtomicU64,
    expired_removed: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Result of one [`SessionManager::gc`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Expired sessions deleted.
    pub deleted: usize,
    /// Sessions with an unreadable header (corrupt for sure) deleted.
    pub corrupt: usize,
    /// Corrupt candidates skipped because a request held their lock (retried by a later call).
    pub busy: usize,
    /// Candidates that turned out not to be expired (touched meanwhile).
    pub live: usize,
    /// Entries that gave an I/O error: skipped (and logged); the scan moved past them.
    pub unreadable: usize,
    /// Entries examined (at most `gc_batch`).
    pub examined: usize,
    /// Leftover temporary files removed by the store.
    pub temp_files_removed: usize,
    /// True when the batch was used up: call `gc` again to continue.
    pub more: bool,
}

#[derive(Debug)]
struct Inner {
    locks: locks::Locks,
    store: Box<dyn Store>,
    cfg: SessionConfig,
    counters: Counters,
    /// Decoded sessions of this process, validated by shared change counters (`None`: off).
    cache: Option<cache::SessionCache>,
    /// With the cache off, the store's shared change counters all the same (where it names a
    /// place shared with other managers), so that this manager's writes still drop the copies
    /// that managers with the cache on hold.
    write_counters: Option<cache::Versions>,
    /// The fork epoch this manager was made in: a forked child's copy refuses to act.
    fork_epoch: u64,
    /// The store keeps values per key ([`Capabilities::per_key`]): loads may read heads only,
    /// commits write deltas.
    per_key: bool,
}

/// Entry point of the session layer; cheap to clone and share between threads.
#[derive(Debug, Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

/// What a per-key store holds for a session, validated.
enum Latest {
    Whole(Loaded),
    ByKey(StoredHead, Head),
}

/// A record as read from the store, validated.
struct Loaded {
    /// The record; for a session loaded by key (`head` set), its body is empty.
    record: Record,
    last_accessed: Timestamp,
    /// Encoded size (what the cache's byte bound counts).
    size: usize,
    /// The head of a session loaded by key: its values are read on first use.
    head: Option<Arc<Head>>,
}

impl SessionManager {
    /// The embedded default: a [`FileStore`] in `dir/sessions` and the lock table file
    /// `dir/locks.table`, so every process that opens `dir` shares locks and data.
    pub fn open(dir: impl AsRef<Path>) -> Result<SessionManager> {
        Self::new_embedded(dir, SessionConfig::default())
    }

    /// Like [`SessionManager::open`] with a custom configuration.
    pub fn new_embedded(dir: impl AsRef<Path>, cfg: SessionConfig) -> Result<SessionManager> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let table = LockTable::open(dir.join("locks.table"), &TableOptions::default())?;
        let store = FileStore::open(dir.join("sessions"))?
            .with_fsync(cfg.fsync)
            .with_lock_timeout(cfg.lock_timeout);
        Ok(SessionManager::new(table, store, cfg))
    }

    /// Like [`SessionManager::open`], with sessions in a [`KvStore`] (LMDB) in `dir/sessions.kv`
    /// instead of one file per session: every process that opens `dir` shares locks and data,
    /// and a read-only request reads a memory map instead of opening a file.
    ///
    /// ```
    /// use locktable::session::SessionManager;
    /// let dir = tempfile::tempdir().unwrap();
    /// let mgr = SessionManager::open_kv(dir.path()).unwrap();
    /// let mut s = mgr.create().unwrap();
    /// s.insert("user", &"ann").unwrap();
    /// let cookie = s.id().to_string();
    /// s.commit().unwrap();
    /// assert!(mgr.load(&cookie).unwrap().is_some());
    /// ```
    #[cfg(feature = "lmdb")]
    pub fn open_kv(dir: impl AsRef<Path>) -> Result<SessionManager> {
        Self::new_kv(dir, SessionConfig::default())
    }

    /// Like [`SessionManager::open_kv`] with a custom configuration ([`SessionConfig::fsync`]
    /// applies to the key-value store's commits).
    #[cfg(feature = "lmdb")]
    pub fn new_kv(dir: impl AsRef<Path>, cfg: SessionConfig) -> Result<SessionManager> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let table = LockTable::open(dir.join("locks.table"), &TableOptions::default())?;
        let opts = KvOptions {
            fsync: cfg.fsync,
            ..KvOptions::default()
        };
        let store = KvStore::open_with(dir.join("sessions.kv"), &opts)?;
        Ok(SessionManager::new(table, store, cfg))
    }

    /// A manager over any lock table and store. Every process using the same store must use the
    /// same lock table for exclusive requests to exclude each other (commits stay safe either
    /// way when the store's [`Capabilities::atomic_cas`] holds).
    pub fn new(table: LockTable, store: impl Store + 'static, cfg: SessionConfig) -> Self {
        let cache = cache::for_store(&store, cfg.cache_bytes);
        // A manager with its cache off must still move the counters that other managers of
        // the same store validate their copies with.
        let write_counters = match (&cache, store.change_counters()) {
            (None, ChangeCounters::Directory(dir)) => match cache::Versions::open(&dir) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(error = %e, "session change counters unusable");
                    None
                }
            },
            _ => None,
        };
        Self::with_locks(
            locks::Locks::Table(table),
            Box::new(store),
            cache,
            write_counters,
            cfg,
        )
    }

    /// Sessions and locks on one PostgreSQL database, shared by every host that uses the same
    /// `url`, with the default [`PgStoreOptions`] and [`SessionConfig`].
    ///
    /// Loads of optimistic requests take no lock (one query each: the store's compare-and-set
    /// guards commits); commits, exclusive requests, `cycle_id`, `invalidate` and `delete` take
    /// advisory locks. Calls block: never make them on an async runtime's worker thread.
    ///
    /// ```no_run
    /// let mgr = locktable::session::SessionManager::postgres("postgres://app@db/app").unwrap();
    /// # let _ = mgr;
    /// ```
    #[cfg(feature = "postgres")]
    pub fn postgres(url: &str) -> Result<SessionManager> {
        Self::postgres_with(url, PgStoreOptions::default(), SessionConfig::default())
    }

    /// [`SessionManager::postgres`] with explicit options. The store and the locks get separate
    /// pools: an exclusive request keeps a lock connection for its whole life and must never wait
    /// for it to do its store calls. The lock keys' secret is generated once per table set and
    /// kept in the database, so every host derives the same keys.
    #[cfg(feature = "postgres")]
    pub fn postgres_with(
        url: &str,
        opts: PgStoreOptions,
        cfg: SessionConfig,
    ) -> Result<SessionManager> {
        let store = PgStore::with_pool(PgPool::connect(url)?, opts)?;
        let lock_pool = PgPool::connect_with(
            url,
            PgPoolOptions {
                max_connections: 4 * DEFAULT_POOL_SIZE,
                ..PgPoolOptions::default()
            },
        )?;
        let locks = PgLocks::with_pool(lock_pool, store.lock_secret());
        Ok(Self::with_pg(store, locks, cfg))
    }

    /// A manager over a [`PgStore`] and [`PgLocks`] built by the caller. Give them separate
    /// pools (see [`SessionManager::postgres_with`]) and the same secret on every host
    /// ([`PgStore::lock_secret`]).
    #[cfg(feature = "postgres")]
    pub fn with_pg(store: PgStore, locks: PgLocks, cfg: SessionConfig) -> SessionManager {
        // No session cache: its change counters live beside a file store's files, and several
        // hosts share no memory.
        Self::with_locks(locks::Locks::Pg(locks), Box::new(store), None, None, cfg)
    }

    fn with_locks(
        locks: locks::Locks,
        store: Box<dyn Store>,
        cache: Option<cache::SessionCache>,
        write_counters: Option<cache::Versions>,
        cfg: SessionConfig,
    ) -> Self {
        SessionManager {
            inner: Arc::new(Inner {
                locks,
                per_key: store.capabilities().per_key,
                store,
                cfg,
                counters: Counters::default(),
                cache,
                write_counters,
                fork_epoch: crate::fork::epoch(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.cfg
    }

    /// The store. Writes made directly through it bypass the session cache's change counters:
    /// managers that hold a decoded copy of that session keep answering loads from it until the
    /// session's next write through a manager (commits are unaffected: they always re-read the
    /// store). Set [`SessionConfig::cache_bytes`] to `0` where other writers use the store.
    pub fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    /// This manager's counters.
    pub fn stats(&self) -> ManagerStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ManagerStats {
            loads: g(&c.loads),
            data_writes: g(&c.data_writes),
            touches_written: g(&c.touches_written),
            touches_skipped: g(&c.touches_skipped),
            conflicts: g(&c.conflicts),
            corrupt_invalidated: g(&c.corrupt_invalidated),
            owner_died_seen: g(&c.owner_died_seen),
            dirty_dropped: g(&c.dirty_dropped),
            expired_removed: g(&c.expired_removed),
            cache_hits: self.inner.cache.as_ref().map_or(0, |c| c.hit_counts().0),
            cache_misses: self.inner.cache.as_ref().map_or(0, |c| c.hit_counts().1),
        }
    }

    /// Starts a new, empty session with a fresh random ID. **Lazy**: nothing is stored until
    /// [`Session::commit`] has data to write (or [`Session::persist`] was called), so a visitor
    /// that never gets data (a crawler) costs no store write at all.
    pub fn create(&self) -> Result<Session> {
        let inner = &self.inner;
        inner.check_fork()?;
        let now = inner.cfg.clock.now();
        let loaded = Loaded {
            record: Record {
                version: 0,
                created: now.0,
                expiry: Expiry::Default,
                body: RecordBody::default(),
            },
            last_accessed: now,
            size: 0,
            head: None,
        };
        bump(&inner.counters.loads);
        let mut s = Session::new(
            Arc::clone(inner),
            SessionId::generate()?,
            loaded,
            None,
            now,
            None,
        );
        s.stored = false;
        Ok(s)
    }

    /// Loads a session for an optimistic or read-only request, waiting at most
    /// [`SessionConfig::lock_timeout`] for its lock.
    ///
    /// The read lock is held only while the record is read. Returns `Ok(None)` for an unknown,
    /// expired or malformed ID (so a cookie can be passed in as it came); use
    /// [`SessionId::parse`] to tell a malformed one apart. A session found expired is deleted
    /// then and there, so no later clock step can bring it back.
    pub fn load(&self, id: &str) -> Result<Option<Session>> {
        self.load_timeout(id, self.inner.cfg.lock_timeout)
    }

    /// [`SessionManager::load`] with its own bound on the wait ([`Error::Timeout`]).
    pub fn load_timeout(&self, id: &str, timeout: Duration) -> Result<Option<Session>> {
        self.load_with(id, false, Deadline::after(timeout))
    }

    /// [`SessionManager::load`] answered only from this process's cache of decoded sessions:
    /// `Ok(Some(session))` exactly as `load` would return it, or `Ok(None)` when the session
    /// is not cached here (not cached yet, changed since, found expired by its cached times,
    /// malformed ID, or no cache): then call [`load`](Self::load), which decides.
    ///
    /// **It never blocks**: no store I/O, no session lock, no wait (only a short in-memory
    /// critical section of the cache), so an async caller may run it on a runtime worker and
    /// go to a blocking thread only when it returns `Ok(None)`. Everything `load` guarantees
    /// holds for what it returns: the copy is the current one (no write of the session
    /// anywhere since it was cached), expiry is re-checked at this call, a forked child's
    /// copy of the manager is refused ([`Error::ForkedSessionManager`]) and it counts as a
    /// load and a cache hit. A `None` is not a cache miss (the `load` that follows counts it).
    ///
    /// Ending the returned session may still write its access time (see
    /// [`Session::access_write_due`]).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let mgr = locktable::session::SessionManager::open(dir.path()).unwrap();
    /// # let mut s = mgr.create().unwrap();
    /// # s.insert("n", &1u64).unwrap();
    /// # let cookie = s.id().to_string();
    /// # s.commit().unwrap();
    /// let session = match mgr.try_load_cached(&cookie)? {
    ///     Some(s) => Some(s),
    ///     None => mgr.load(&cookie)?, // may wait: off an async runtime's workers
    /// };
    /// assert_eq!(session.unwrap().get::<u64>("n")?, Some(1));
    /// # Ok::<(), locktable::Error>(())
    /// ```
    pub fn try_load_cached(&self, id: &str) -> Result<Option<Session>> {
        self.inner.check_fork()?;
        let Ok(id) = SessionId::parse(id) else {
            return Ok(None);
        };
        Ok(self.inner.load_cached(&id, false))
    }

    /// [`SessionManager::try_load_cached`] of an ID parsed already (the web layer's hot read
    /// path: no second validation of the text).
    #[cfg(feature = "axum")]
    pub(crate) fn try_load_cached_id(&self, id: &SessionId) -> Result<Option<Session>> {
        self.inner.check_fork()?;
        Ok(self.inner.load_cached(id, false))
    }

    /// Loads a session for an exclusive request: the session's upgradable lock is held until
    /// the session is committed, invalidated or dropped.
    ///
    /// Other `load`s proceed meanwhile; other exclusive loads and all commits of this session
    /// wait, at most [`SessionConfig::lock_timeout`]. Two exclusive requests that take two
    /// sessions in opposite orders end in [`Error::Timeout`] for at least one of them.
    pub fn load_exclusive(&self, id: &str) -> Result<Option<Session>> {
        self.load_exclusive_timeout(id, self.inner.cfg.lock_timeout)
    }

    /// [`SessionManager::load_exclusive`] with its own bound on the wait.
    pub fn load_exclusive_timeout(&self, id: &str, timeout: Duration) -> Result<Option<Session>> {
        self.load_with(id, true, Deadline::after(timeout))
    }

    fn load_with(&self, id: &str, exclusive: bool, d: Deadline) -> Result<Option<Session>> {
        let inner = &self.inner;
        inner.check_fork()?;
        let Ok(id) = SessionId::parse(id) else {
            return Ok(None);
        };
        if !exclusive {
            if let Some(s) = inner.load_cached(&id, true) {
                return Ok(Some(s));
            }
        }
        let (loaded, hold) = if exclusive {
            let g = locks::upgradable(&inner.locks, &id, d)?;
            let died = g.previous_owner_died();
            let loaded = inner.read_for_load(&id, died);
            if loaded.is_err() {
                // The corruption policy may need the write lock: let go first.
                drop(g);
                (inner.handle_corrupt(&id, loaded, died, d)?, None)
            } else {
                (loaded?, Some(g))
            }
        } else {
            let g = locks::read(&inner.locks, &id, d)?;
            let died = g.previous_owner_died();
            let stamp = inner.cache.as_ref().and_then(|c| c.fill_stamp(&id));
            let loaded = inner.read_for_load(&id, died);
            drop(g);
            if let (Some(stamp), Ok(Some(l))) = (stamp, &loaded) {
                // Only whole sessions: a copy loaded by key lacks its values.
                if l.head.is_none() {
                    inner.cache_fill(&id, stamp, l);
                }
            }
            (inner.handle_corrupt(&id, loaded, died, d)?, None)
        };
        let Some(loaded) = loaded else {
            return Ok(None);
        };
        let now = inner.cfg.clock.now();
        if inner.is_expired(&loaded, now) {
            drop(hold);
            inner.remove_seen_expired(&id, now);
            return Ok(None);
        }
        bump(&inner.counters.loads);
        Ok(Some(Session::new(
            Arc::clone(inner),
            id,
            loaded,
            None,
            now,
            hold,
        )))
    }

    /// Runs `f` on the session and commits, re-running it on fresh data after a conflict.
    ///
    /// `f` runs at most `transact_retries + 1` times: the first `transact_retries` attempts are
    /// optimistic; the last one loads the session exclusively, which cannot conflict. Returns
    /// `Ok(None)` if the session does not exist (or stopped existing), and `f`'s first error as
    /// is. [`Error::OutcomeUnknown`] is returned as is, never retried (a retry could apply the
    /// change twice). The whole call waits at most [`SessionConfig::lock_timeout`] for locks.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let mgr = locktable::session::SessionManager::open(dir.path()).unwrap();
    /// # let mut s = mgr.create().unwrap();
    /// # s.insert("visits", &0u64).unwrap();
    /// # let cookie = s.id().to_string();
    /// # s.commit().unwrap();
    /// match mgr.transact(&cookie, |s| {
    ///     let n = s.get::<u64>("visits")?.unwrap_or(0) + 1;
    ///     s.insert("visits", &n)?;
    ///     Ok(n)
    /// })? {
    ///     Some(n) => println!("visit {n}"),
    ///     None => println!("session gone: start a new one"),
    /// }
    /// # Ok::<(), locktable::Error>(())
    /// ```
    pub fn transact<R>(
        &self,
        id: &str,
        f: impl FnMut(&mut Session) -> Result<R>,
    ) -> Result<Option<R>> {
        self.transact_timeout(id, self.inner.cfg.lock_timeout, f)
    }

    /// [`SessionManager::transact`] with its own bound on the waits of the whole call.
    pub fn transact_timeout<R>(
        &self,
        id: &str,
        timeout: Duration,
        mut f: impl FnMut(&mut Session) -> Result<R>,
    ) -> Result<Option<R>> {
        let d = Deadline::after(timeout);
        let retries = self.inner.cfg.transact_retries;
        // `f` may move the session to a new ID (`cycle_id`, at login): a
        // retry must load the session where it now lives.
        let mut id = id.to_owned();
        for attempt in 0..=retries {
            let exclusive = attempt == retries;
            let Some(mut s) = self.load_with(&id, exclusive, d)? else {
                return Ok(None);
            };
            let r = match f(&mut s) {
                Ok(r) => r,
                // A value of the loaded version was gone (another commit replaced it): run
                // `f` again on fresh data, as after a conflicting commit.
                Err(Error::Conflict { .. }) if s.saw_stale_value() && !exclusive => {
                    s.discard();
                    continue;
                }
                Err(e) => {
                    s.discard();
                    return Err(e);
                }
            };
            id = s.id().as_str().to_owned();
            match s.commit_by(d) {
                Ok(()) => return Ok(Some(r)),
                Err(Error::Conflict { .. }) if !exclusive => {
                    // Brief randomized pause so racing requests spread out.
                    let mut b = [0u8; 1];
                    let _ = getrandom::fill(&mut b);
                    std::thread::sleep(Duration::from_micros(
                        (u64::from(b[0]) + 1) << attempt.min(4),
                    ));
                }
                Err(Error::SessionGone) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        // The exclusive attempt returned above in every case.
        Err(Error::SessionGone)
    }

    /// Deletes a session at once; `Ok(false)` if it did not exist, is malformed, or is expired
    /// (an expired session is deleted too, but it was already gone for `load`, so `delete`
    /// agrees: it did not exist). A session whose stored record is unreadable
    /// ([`Error::SessionCorrupt`], even in the metadata that says whether it expired) is deleted
    /// whatever [`SessionConfig::on_corrupt`] says, and counts as present (`Ok(true)`), as one
    /// that is corrupt only in its body always did.
    pub fn delete(&self, id: &str) -> Result<bool> {
        self.delete_timeout(id, self.inner.cfg.lock_timeout)
    }

    /// [`SessionManager::delete`] with its own bound on the wait.
    pub fn delete_timeout(&self, id: &str, timeout: Duration) -> Result<bool> {
        let inner = &self.inner;
        inner.check_fork()?;
        let Ok(id) = SessionId::parse(id) else {
            return Ok(false);
        };
        let _w = locks::write(&inner.locks, &id, Deadline::after(timeout))?;
        let now = inner.cfg.clock.now();
        inner.changing(&id, || {
            match inner.store.remove_expired(&id, &inner.cfg.cutoffs(now)) {
                Ok(true) => {
                    bump(&inner.counters.expired_removed);
                    return Ok(false);
                }
                Ok(false) => {}
                // Whether it expired cannot be told; the caller wants it gone either way.
                Err(Error::SessionCorrupt(m)) => {
                    tracing::warn!(session = ?id, reason = %m, "corrupt session record deleted");
                }
                Err(e) => return Err(e),
            }
            inner.store.delete(&id)
        })
    }

    /// Examines up to `gc_batch` entries of the store, reading metadata only, and deletes the
    /// expired sessions among them (re-checked atomically with the delete, so a touch that
    /// lands meanwhile keeps its session), records with an unreadable header, and leftover
    /// temporary files. Never waits for a busy session and never fails because of one bad
    /// entry (it is skipped, counted in [`GcReport::unreadable`] and logged). Call it
    /// periodically; when [`GcReport::more`] is set, call it again.
    pub fn gc(&self) -> Result<GcReport> {
        let inner = &self.inner;
        inner.check_fork()?;
        let cutoffs = inner.cfg.cutoffs(inner.cfg.clock.now());
        // A batch of 0 would never make progress: examine at least one entry.
        let scan = inner
            .store
            .scan_expired(&cutoffs, inner.cfg.gc_batch.max(1))?;
        let mut report = GcReport {
            unreadable: scan.unreadable,
            examined: scan.examined,
            temp_files_removed: scan.temp_files_removed,
            more: scan.more,
            ..GcReport::default()
        };
        for id in &scan.expired {
            match inner.changing(id, || inner.store.remove_expired(id, &cutoffs)) {
                Ok(true) => report.deleted += 1,
                Ok(false) => report.live += 1,
                Err(e) => inner.skip_unreadable(id, &e, &mut report),
            }
        }
        for id in &scan.corrupt {
            match inner.remove_if_corrupt(id) {
                Ok(Some(true)) => report.corrupt += 1,
                Ok(Some(false)) => report.live += 1,
                Ok(None) => report.busy += 1,
                Err(e) => inner.skip_unreadable(id, &e, &mut report),
            }
        }
        Ok(report)
    }
}

impl Inner {
    /// The lock table, for unit tests of a manager built on one.
    #[cfg(test)]
    fn table(&self) -> &LockTable {
        match &self.locks {
            locks::Locks::Table(t) => t,
            #[cfg(feature = "postgres")]
            locks::Locks::Pg(_) => panic!("this manager has no lock table"),
        }
    }

    /// A cache hit: the current decoded copy of `id`, alive by its cached times at this load's
    /// time (which proves it alive by the stored ones, see DESIGN.md section 11). `None`: read
    /// the store.
    fn load_cached(self: &Arc<Self>, id: &SessionId, count_miss: bool) -> Option<Session> {
        let c = self.cache.as_ref()?.get(id, count_miss)?;
        let now = self.cfg.clock.now();
        let la = c.last_accessed();
        if self.cfg.cutoffs(now).expired(c.created, la, c.expiry) {
            return None;
        }
        bump(&self.counters.loads);
        Some(Session::new(
            Arc::clone(self),
            id.clone(),
            Loaded {
                record: Record {
                    version: c.version,
                    created: c.created.0,
                    expiry: c.expiry,
                    body: RecordBody::default(),
                },
                last_accessed: la,
                size: 0,
                head: None,
            },
            Some(Arc::clone(&c.data)),
            now,
            None,
        ))
    }

    /// Caches a record read (validated) after `stamp` was taken.
    fn cache_fill(&self, id: &SessionId, stamp: (usize, u64), l: &Loaded) {
        if let Some(c) = &self.cache {
            let fill = cache::Fill {
                version: l.record.version,
                created: Timestamp(l.record.created),
                expiry: l.record.expiry,
                data: Arc::new(l.record.body.data.clone()),
                last_accessed: l.last_accessed,
                size: l.size,
            };
            c.insert(id, stamp, fill);
        }
    }

    /// Runs a store write that changes what a load of `id` returns, inside its bucket's write
    /// section of the cache's change counters (so every process's copy of `id` is dropped).
    fn changing<R>(&self, id: &SessionId, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let versions = match &self.cache {
            Some(c) => Some(c.versions()),
            None => self.write_counters.as_ref(),
        };
        match versions {
            Some(v) => Ok(v.write(id, self.cfg.lock_timeout, f)?.0),
            None => f(),
        }
    }

    /// Raises the cached copy's last-accessed time (a lower bound of the stored one) to `at`, or
    /// (`None`: the store skipped a touch as recent) to the stored time, so that later requests
    /// coalesce their touches without asking the store.
    fn note_access(&self, id: &SessionId, at: Option<Timestamp>) {
        let Some(c) = &self.cache else { return };
        let at = match at {
            Some(t) => Some(t),
            None => self.store.last_accessed(id).ok().flatten(),
        };
        if let Some(t) = at {
            c.note_access(id, t);
        }
    }

    /// Refuses a forked child's inherited copy of the manager.
    fn check_fork(&self) -> Result<()> {
        if crate::fork::epoch() != self.fork_epoch {
            return Err(Error::ForkedSessionManager);
        }
        Ok(())
    }

    /// Reads and fully validates a record (checksum included, always; a dead previous writer is
    /// counted and makes a corrupt record be invalidated whatever the policy).
    fn read_validated(&self, id: &SessionId, owner_died: bool) -> Result<Option<Loaded>> {
        if owner_died {
            bump(&self.counters.owner_died_seen);
        }
        match self.store.load(id, self.cfg.max_record_size)? {
            None => Ok(None),
            Some(st) => self.validated(st).map(Some),
        }
    }

    /// A whole stored record, validated (checksum, JSON, agreement with its metadata).
    fn validated(&self, st: StoredSession) -> Result<Loaded> {
        let record = record::decode(&st.bytes, self.cfg.max_record_size)?;
        let m = &st.meta;
        if record.version != m.version || record.created != m.created.0 || record.expiry != m.expiry
        {
            return Err(Error::SessionCorrupt(
                "store metadata disagrees with the record".into(),
            ));
        }
        Ok(Loaded {
            record,
            last_accessed: m.last_accessed,
            size: st.bytes.len(),
            head: None,
        })
    }

    /// What a load reads: the whole record, or on a per-key store what it holds: a whole
    /// record, or a head, with the values when the session is at most
    /// [`SessionConfig::lazy_above`] bytes (then it is loaded whole), else without.
    fn read_for_load(&self, id: &SessionId, owner_died: bool) -> Result<Option<Loaded>> {
        if !self.per_key {
            return self.read_validated(id, owner_died);
        }
        if owner_died {
            bump(&self.counters.owner_died_seen);
        }
        let (st, head) = match self.read_head(id, self.cfg.lazy_above)? {
            None => return Ok(None),
            Some(Latest::Whole(l)) => return Ok(Some(l)),
            Some(Latest::ByKey(st, head)) => (st, head),
        };
        let size = usize::try_from(st.meta.size).unwrap_or(usize::MAX);
        let lazy = st.values.is_none();
        let record = match st.values {
            Some(values) => record::join(&head, &values.into_iter().collect())?,
            None => Record {
                version: head.version,
                created: head.created,
                expiry: head.expiry,
                body: RecordBody::default(),
            },
        };
        Ok(Some(Loaded {
            record,
            last_accessed: st.meta.last_accessed,
            size,
            head: lazy.then(|| Arc::new(head)),
        }))
    }

    /// Reads and validates what a per-key store holds for `id`: a whole record, or a head (and
    /// its values when the store gives them).
    fn read_head(&self, id: &SessionId, values_up_to: u64) -> Result<Option<Latest>> {
        let max = self.cfg.max_record_size;
        let st = match self.store.load_head(id, max, values_up_to)? {
            None => return Ok(None),
            Some(Stored::Whole(st)) => return self.validated(st).map(|l| Some(Latest::Whole(l))),
            Some(Stored::ByKey(st)) => st,
        };
        if st.meta.size > max as u64 {
            return Err(Error::TooLarge {
                size: usize::try_from(st.meta.size).unwrap_or(usize::MAX),
                limit: max,
            });
        }
        let head = record::decode_head(&st.head, max)?;
        let m = &st.meta;
        if head.version != m.version || head.created != m.created.0 || head.expiry != m.expiry {
            return Err(Error::SessionCorrupt(
                "store metadata disagrees with the head".into(),
            ));
        }
        Ok(Some(Latest::ByKey(st, head)))
    }

    /// Applies the corruption policy to the result of [`Inner::read_validated`] (no lock held).
    fn handle_corrupt(
        &self,
        id: &SessionId,
        r: Result<Option<Loaded>>,
        owner_died: bool,
        d: Deadline,
    ) -> Result<Option<Loaded>> {
        match r {
            Err(Error::SessionCorrupt(m))
                if self.cfg.on_corrupt == CorruptPolicy::Invalidate || owner_died =>
            {
                tracing::warn!(session = ?id, reason = %m, "corrupt session record invalidated");
                let _w = locks::write(&self.locks, id, d)?;
                // Re-check under the write lock: a concurrent commit may have repaired it.
                if let Err(Error::SessionCorrupt(_)) = self.read_validated(id, false) {
                    self.changing(id, || self.store.delete(id))?;
                    bump(&self.counters.corrupt_invalidated);
                }
                Ok(None)
            }
            other => other,
        }
    }

    /// Expired at `now` by its stored times and rule.
    fn is_expired(&self, l: &Loaded, now: Timestamp) -> bool {
        self.cfg.cutoffs(now).expired(
            Timestamp(l.record.created),
            l.last_accessed,
            l.record.expiry,
        )
    }

    /// A request saw the session expired at `now`: delete it then and there (the store
    /// re-checks with the same `now`, atomically), so that no later clock step revives it.
    /// Best effort: a failure is logged and gc collects the session later.
    fn remove_seen_expired(&self, id: &SessionId, now: Timestamp) {
        match self.changing(id, || self.store.remove_expired(id, &self.cfg.cutoffs(now))) {
            Ok(true) => bump(&self.counters.expired_removed),
            Ok(false) => {}
            Err(e) => tracing::warn!(session = ?id, error = %e, "expired session not deleted"),
        }
    }

    /// Deletes a record whose header is unreadable, re-checked under the session's write lock
    /// (taken only if free). `None`: busy; `Some(false)`: not corrupt after all.
    fn remove_if_corrupt(&self, id: &SessionId) -> Result<Option<bool>> {
        let Some(_w) = locks::try_write(&self.locks, id)? else {
            return Ok(None);
        };
        match self.store.meta(id) {
            Err(Error::SessionCorrupt(m)) => {
                tracing::warn!(session = ?id, reason = %m, "gc: corrupt session record deleted");
                self.changing(id, || self.store.delete(id))?;
                Ok(Some(true))
            }
            Err(e) => Err(e),
            Ok(_) => Ok(Some(false)),
        }
    }

    fn skip_unreadable(&self, id: &SessionId, e: &Error, report: &mut GcReport) {
        tracing::warn!(session = ?id, error = %e, "gc: entry skipped");
        report.unreadable += 1;
    }
}

/// One request's view of a session.
///
/// Changes are kept in memory until [`Session::commit`]. Dropping a session without committing
/// records the access (best effort) and writes no data; if it had changes, the loss is logged
/// (a `tracing` warning) and counted in [`ManagerStats::dirty_dropped`]. Use
/// [`Session::discard`] to drop changes on purpose.
#[derive(Debug)]
pub struct Session {
    mgr: Arc<Inner>,
    id: SessionId,
    /// False for a session from `create` that no commit has stored yet.
    stored: bool,
    /// `create`d session to be stored even without data ([`Session::persist`]).
    persist: bool,
    base_version: u64,
    created: Timestamp,
    stored_last_accessed: Timestamp,
    accessed: Timestamp,
    expiry: Expiry,
    expiry_changed: bool,
    /// Shared with the cache entry it came from (copied on this request's first write).
    data: Arc<BTreeMap<String, Value>>,
    delta: BTreeMap<String, Option<Value>>,
    /// Keys read with `get_for_update`: checked for conflicts like written ones.
    reads: BTreeSet<String>,
    exclusive: Option<locks::UpgradableHold>,
    finished: bool,
    /// A commit was attempted (and failed): dropping it is no silent loss.
    commit_tried: bool,
    /// Loaded by key: the head, and the values read so far.
    lazy: Option<Lazy>,
    /// A value of the loaded version was gone when `get` asked for it (see [`Session::get`]).
    stale: std::sync::atomic::AtomicBool,
}

/// The by-key part of a session loaded by key.
#[derive(Debug)]
struct Lazy {
    head: Arc<Head>,
    /// Values read so far (all of the loaded version).
    fetched: parking_lot::Mutex<BTreeMap<String, Arc<Value>>>,
}

/// How many values [`Session::shared_data`] asks a store for in one call (a Redis script
/// passes them as arguments, and Lua's `unpack` has a limit of a few thousand).
#[cfg(feature = "axum")]
const LAZY_BATCH: usize = 512;

impl Session {
    /// `shared`: the data of a cache hit (then `loaded`'s body is empty and ignored).
    fn new(
        mgr: Arc<Inner>,
        id: SessionId,
        loaded: Loaded,
        shared: Option<Arc<BTreeMap<String, Value>>>,
        now: Timestamp,
        exclusive: Option<locks::UpgradableHold>,
    ) -> Session {
        Session {
            mgr,
            id,
            stored: true,
            persist: false,
            base_version: loaded.record.version,
            created: Timestamp(loaded.record.created),
            stored_last_accessed: loaded.last_accessed,
            accessed: now.max(loaded.last_accessed),
            expiry: loaded.record.expiry,
            expiry_changed: false,
            data: shared.unwrap_or_else(|| Arc::new(loaded.record.body.data)),
            delta: BTreeMap::new(),
            reads: BTreeSet::new(),
            exclusive,
            finished: false,
            commit_tried: false,
            lazy: loaded.head.map(|head| Lazy {
                head,
                fetched: Default::default(),
            }),
            stale: Default::default(),
        }
    }

    /// The session ID (changes after [`Session::cycle_id`]).
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// The record version this request loaded (0 for a session not stored yet).
    pub fn version(&self) -> u64 {
        self.base_version
    }

    /// Creation time.
    pub fn created(&self) -> Timestamp {
        self.created
    }

    /// The stored last-accessed time when this request loaded the session (the previous access).
    pub fn last_accessed(&self) -> Timestamp {
        self.stored_last_accessed
    }

    /// True when loaded with [`SessionManager::load_exclusive`].
    pub fn is_exclusive(&self) -> bool {
        self.exclusive.is_some()
    }

    /// True for a session from [`SessionManager::create`] that is not stored yet.
    pub fn is_new(&self) -> bool {
        !self.stored
    }

    /// True when this request changed something (so `commit` will write). A new session is
    /// dirty only once it holds data (or [`Session::persist`] was called): an expiry rule alone
    /// does not make a visitor cost a store write.
    pub fn is_dirty(&self) -> bool {
        if !self.stored {
            return self.persist || self.delta.values().any(Option::is_some);
        }
        !self.delta.is_empty() || self.expiry_changed
    }

    /// This session's expiry rule.
    pub fn expiry(&self) -> Expiry {
        self.expiry
    }

    /// Sets this session's expiry rule (written at commit; the last commit's rule wins).
    ///
    /// ```
    /// use locktable::session::{Expiry, SessionManager};
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let mgr = SessionManager::open(dir.path()).unwrap();
    /// let mut s = mgr.create().unwrap();
    /// s.set_expiry(Expiry::Idle(Duration::from_secs(7 * 86_400))); // "remember me"
    /// s.commit().unwrap();
    /// ```
    pub fn set_expiry(&mut self, e: Expiry) {
        if e != self.expiry {
            self.expiry = e;
            self.expiry_changed = true;
        }
    }

    /// When this session expires if nothing else accesses it (for a cookie's `Max-Age`).
    pub fn expires_at(&self) -> Timestamp {
        let cutoffs = self.mgr.cfg.cutoffs(self.accessed);
        cutoffs.expires_at(self.created, self.accessed, self.expiry)
    }

    /// The session's whole data as this request sees it: the web layer's read-only snapshots
    /// hold it. Shared rather than copied for a session loaded whole (a cache hit's map is the
    /// cache entry's own); a session loaded **by key** has only the values read so far in
    /// `data`, so the rest are read here, in batches of one store call each, at the loaded
    /// version ([`Error::Conflict`] if that version's values are gone, as for [`Session::get`]).
    #[cfg(feature = "axum")]
    pub(crate) fn shared_data(&self) -> Result<Arc<BTreeMap<String, Value>>> {
        if self.lazy.is_none() {
            return Ok(Arc::clone(&self.data));
        }
        let missing: Vec<String> = self
            .keys()
            .filter(|k| !self.data.contains_key(*k))
            .map(str::to_owned)
            .collect();
        let mut all = (*self.data).clone();
        for batch in missing.chunks(LAZY_BATCH) {
            let keys: Vec<&str> = batch.iter().map(String::as_str).collect();
            for (key, v) in batch.iter().zip(self.lazy_values(&keys)?) {
                if let Some(v) = v {
                    all.insert(key.clone(), (*v).clone());
                }
            }
        }
        Ok(Arc::new(all))
    }

    /// Makes `commit` store this new session even if it holds no data (a session from
    /// [`SessionManager::create`] is otherwise stored at its first commit with data).
    pub fn persist(&mut self) {
        self.persist = true;
    }

    /// Reads a value; `Ok(None)` if absent, [`Error::Serialize`] if it has another type.
    ///
    /// A session loaded **by key** (a large session on a store that keeps values per key, see
    /// [`SessionConfig::lazy_above`]) reads each value from the store on its first `get`, at the
    /// version this request loaded. If another commit replaced that value since (the store no
    /// longer has it), the `get` fails with [`Error::Conflict`] for its key: a request never
    /// sees values of two versions. [`SessionManager::transact`] then runs its function again on
    /// fresh data, and [`Session::commit`] of such a session fails with the same conflict.
    ///
    /// ```
    /// use locktable::session::{SessionConfig, SessionManager};
    /// let dir = tempfile::tempdir().unwrap();
    /// // Every session loaded by key (the default loads only big ones that way).
    /// let cfg = SessionConfig { lazy_above: 0, ..SessionConfig::default() };
    /// let mgr = SessionManager::new_embedded(dir.path(), cfg).unwrap(); // a `FileStore`
    /// let mut s = mgr.create().unwrap();
    /// s.insert("big", &"x".repeat(10_000)).unwrap();
    /// s.insert("small", &1).unwrap();
    /// let cookie = s.id().to_string();
    /// s.commit().unwrap();
    /// // This load reads the head only; the get reads one value.
    /// let s = mgr.load(&cookie).unwrap().unwrap();
    /// assert_eq!(s.get::<u32>("small").unwrap(), Some(1));
    /// assert_eq!(s.keys().collect::<Vec<_>>(), ["big", "small"]);
    /// ```
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        if let Some(v) = self.data.get(key) {
            return Ok(Some(T::deserialize(v)?));
        }
        match self.lazy_value(key)? {
            None => Ok(None),
            Some(v) => Ok(Some(T::deserialize(&*v)?)),
        }
    }

    /// The loaded version's value of a key this request did not write, read on first use
    /// (sessions loaded by key only).
    fn lazy_value(&self, key: &str) -> Result<Option<Arc<Value>>> {
        Ok(self.lazy_values(&[key])?.pop().flatten())
    }

    /// [`Self::lazy_value`] of several keys, with one store call for those not read yet.
    fn lazy_values(&self, keys: &[&str]) -> Result<Vec<Option<Arc<Value>>>> {
        let Some(lazy) = &self.lazy else {
            return Ok(vec![None; keys.len()]);
        };
        let mut out: Vec<Option<Arc<Value>>> = vec![None; keys.len()];
        let mut to_read: Vec<(usize, &str, &record::KeyState)> = Vec::new();
        {
            let fetched = lazy.fetched.lock();
            for (i, &key) in keys.iter().enumerate() {
                if self.delta.contains_key(key) {
                    // Written by this request: `data` has it, or it was removed.
                    continue;
                }
                let Some(state) = lazy.head.keys.get(key).filter(|k| k.size.is_some()) else {
                    continue;
                };
                match fetched.get(key) {
                    Some(v) => out[i] = Some(Arc::clone(v)),
                    None => to_read.push((i, key, state)),
                }
            }
        }
        if to_read.is_empty() {
            return Ok(out);
        }
        self.mgr.check_fork()?;
        let names: Vec<&str> = to_read.iter().map(|&(_, k, _)| k).collect();
        let read = self
            .mgr
            .store
            .load_values(&self.id, self.base_version, &names)?;
        let Some(values) = read else {
            // The session moved on (or is gone): this version's values may no longer exist.
            self.stale.store(true, Ordering::Relaxed);
            bump(&self.mgr.counters.conflicts);
            return Err(Error::Conflict {
                key: names[0].to_owned(),
            });
        };
        if values.len() != names.len() {
            return Err(Error::SessionCorrupt(format!(
                "the store gave {} values for {} keys",
                values.len(),
                names.len()
            )));
        }
        for ((i, key, state), bytes) in to_read.into_iter().zip(values) {
            let bytes = bytes.ok_or_else(|| {
                Error::SessionCorrupt("a live key's stored value is missing".into())
            })?;
            let v = Arc::new(record::decode_value(key, state, &bytes)?);
            lazy.fetched.lock().insert(key.to_owned(), Arc::clone(&v));
            out[i] = Some(v);
        }
        Ok(out)
    }

    /// True when a [`Session::get`] of this session found its loaded version's value gone.
    fn saw_stale_value(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// True when `key` holds a value in this request's view.
    fn contains(&self, key: &str) -> bool {
        self.data.contains_key(key)
            || self.lazy.as_ref().is_some_and(|l| {
                !self.delta.contains_key(key)
                    && l.head.keys.get(key).is_some_and(|k| k.size.is_some())
            })
    }

    /// Reads a value and makes the key part of the commit's conflict check: the commit fails
    /// with [`Error::Conflict`] if another request changed this key since this one loaded, even
    /// if this request does not write it. This closes write skew (deciding on a stale key `a`
    /// while writing `b`). A read-only request is never checked.
    pub fn get_for_update<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        self.reads.insert(key.to_owned());
        self.get(key)
    }

    /// Sets a value (written at commit). A value nested deeper than [`record::MAX_DEPTH`] is
    /// refused with [`Error::TooDeep`], and one whose encoding alone exceeds
    /// [`SessionConfig::max_record_size`] with [`Error::TooLarge`]; the session is unchanged.
    pub fn insert<T: Serialize + ?Sized>(
        &mut self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<()> {
        let key = key.into();
        let v = serde_json::to_value(value)?;
        record::check_depth(&v)?;
        let size = encoded_len(&v)?.saturating_add(key.len());
        let limit = self.mgr.cfg.max_record_size;
        if size > limit {
            return Err(Error::TooLarge { size, limit });
        }
        Arc::make_mut(&mut self.data).insert(key.clone(), v.clone());
        self.delta.insert(key, Some(v));
        Ok(())
    }

    /// Removes a key (a tombstone at commit); returns whether it was present. Removing an absent
    /// key changes nothing.
    pub fn remove(&mut self, key: &str) -> bool {
        if self.contains(key) {
            Arc::make_mut(&mut self.data).remove(key);
            self.delta.insert(key.to_owned(), None);
            true
        } else {
            false
        }
    }

    /// The keys present, in order (for a session loaded by key, from its head: no value is
    /// read).
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        let mut keys: Vec<&str> = self.data.keys().map(String::as_str).collect();
        if let Some(l) = &self.lazy {
            keys.extend(l.head.live_keys().filter(|k| !self.delta.contains_key(*k)));
            keys.sort_unstable();
            keys.dedup();
        }
        keys.into_iter()
    }

    fn check_open(&self) -> Result<()> {
        self.mgr.check_fork()?;
        if self.finished {
            Err(Error::SessionFinished)
        } else {
            Ok(())
        }
    }

    /// Takes the write lock: upgrades the exclusive hold or takes a fresh one.
    fn write_lock(&mut self, d: Deadline) -> Result<locks::WriteHold<'static>> {
        match self.exclusive.take() {
            Some(u) => locks::upgrade(u, d).map_err(|(e, u)| {
                self.exclusive = Some(u);
                e
            }),
            None => locks::write(&self.mgr.locks, &self.id, d),
        }
    }

    /// Re-reads the latest record under a write lock; `SessionGone` if absent or expired (an
    /// expired one is deleted on the spot).
    fn latest(&self, w: &locks::WriteHold<'_>) -> Result<Loaded> {
        let died = w.previous_owner_died();
        let r = self.mgr.read_validated(&self.id, died);
        let latest = self.present_or_gone(r, died)?;
        self.alive_or_gone(
            Timestamp(latest.record.created),
            latest.last_accessed,
            latest.record.expiry,
        )?;
        Ok(latest)
    }

    /// [`Session::latest`] on a per-key store: a whole record, or the head only (a commit by
    /// key needs no value).
    fn latest_head(&self, w: &locks::WriteHold<'_>) -> Result<Latest> {
        let died = w.previous_owner_died();
        if died {
            bump(&self.mgr.counters.owner_died_seen);
        }
        let r = self.mgr.read_head(&self.id, 0);
        let latest = self.present_or_gone(r, died)?;
        match &latest {
            Latest::Whole(l) => self.alive_or_gone(
                Timestamp(l.record.created),
                l.last_accessed,
                l.record.expiry,
            )?,
            Latest::ByKey(st, _) => {
                self.alive_or_gone(st.meta.created, st.meta.last_accessed, st.meta.expiry)?
            }
        }
        Ok(latest)
    }

    /// A read under the write lock: a corrupt session is handled by the policy (and gone when
    /// invalidated), an absent one is gone.
    fn present_or_gone<T>(&self, r: Result<Option<T>>, died: bool) -> Result<T> {
        let latest = match r {
            Err(Error::SessionCorrupt(m)) => {
                if self.mgr.cfg.on_corrupt == CorruptPolicy::Invalidate || died {
                    self.mgr
                        .changing(&self.id, || self.mgr.store.delete(&self.id))?;
                    bump(&self.mgr.counters.corrupt_invalidated);
                    return Err(Error::SessionGone);
                }
                return Err(Error::SessionCorrupt(m));
            }
            other => other?,
        };
        latest.ok_or(Error::SessionGone)
    }

    /// Strict: the session must still be alive by its stored times. This request's own access
    /// has not been stored yet and does not revive a session that expired meanwhile.
    fn alive_or_gone(&self, created: Timestamp, la: Timestamp, expiry: Expiry) -> Result<()> {
        let now = self.mgr.cfg.clock.now();
        if self.mgr.cfg.cutoffs(now).expired(created, la, expiry) {
            self.mgr.remove_seen_expired(&self.id, now);
            return Err(Error::SessionGone);
        }
        Ok(())
    }

    /// Ends the request: writes this request's changes (if any) as one delta, or else records
    /// the access (coalesced), waiting at most [`SessionConfig::lock_timeout`] for the lock.
    /// See the module docs for the conflict rule.
    ///
    /// - [`Error::Conflict`]: nothing was written; the access is still recorded.
    /// - [`Error::SessionGone`]: the session expired, was deleted or moved; nothing written.
    /// - [`Error::Timeout`]: the lock was not granted in time; nothing written.
    /// - [`Error::OutcomeUnknown`]: the write may have been applied; reload before retrying.
    pub fn commit(self) -> Result<()> {
        let d = Deadline::after(self.mgr.cfg.lock_timeout);
        self.commit_by(d)
    }

    /// [`Session::commit`] with its own bound on the wait.
    pub fn commit_timeout(self, timeout: Duration) -> Result<()> {
        self.commit_by(Deadline::after(timeout))
    }

    fn commit_by(mut self, d: Deadline) -> Result<()> {
        self.check_open()?;
        self.commit_tried = true;
        if !self.is_dirty() {
            self.finished = true;
            self.exclusive = None;
            return self.record_access();
        }
        if self.saw_stale_value() {
            // A `get` of this request failed: what it decided may rest on a missing value.
            let key = self.delta.keys().next().cloned().unwrap_or_default();
            return Err(Error::Conflict { key });
        }
        if !self.stored {
            return self.commit_new();
        }
        let w = self.write_lock(d)?;
        if !self.mgr.per_key {
            let latest = self.latest(&w)?;
            return self.commit_whole(w, latest);
        }
        match self.latest_head(&w)? {
            Latest::Whole(latest) => self.commit_whole(w, latest),
            Latest::ByKey(st, head) => self.commit_by_key(w, st.meta, head),
        }
    }

    /// A commit that merges the delta into the latest whole record and writes it whole (on a
    /// per-key store: by key once the record is larger than [`SessionConfig::lazy_above`]).
    fn commit_whole(&mut self, w: locks::WriteHold<'_>, latest: Loaded) -> Result<()> {
        let latest_version = latest.record.version;
        let mut record = latest.record;
        let body = &record.body;
        if let Some(key) = self.first_conflict(|k| body.changed.get(k).copied(), body.floor) {
            bump(&self.mgr.counters.conflicts);
            return Err(Error::Conflict { key });
        }
        // A record at the top of the version range cannot be the work of
        // this library (a version per commit): refuse it rather than wrap.
        let new_version = record
            .version
            .checked_add(1)
            .ok_or_else(|| Error::SessionCorrupt("record version at its maximum".into()))?;
        let first_key = self.delta.keys().next().cloned().unwrap_or_default();
        for (key, v) in std::mem::take(&mut self.delta) {
            match v {
                Some(v) => {
                    record.body.data.insert(key.clone(), v);
                }
                None => {
                    record.body.data.remove(&key);
                }
            }
            record.body.changed.insert(key, new_version);
        }
        if self.expiry_changed {
            record.expiry = self.expiry;
        }
        prune_tombstones(&mut record.body, self.mgr.cfg.max_tombstones);
        record.version = new_version;
        let la = latest.last_accessed.max(self.accessed);
        let stored = self.stored_session(&record, la)?;
        let saved = if self.by_key_now(&stored) {
            // Grown past `lazy_above`: stored by key from now on (the store converts it in
            // the same compare-and-swap).
            let (head, values) = record::split(&record)?;
            let new = self.stored_head(&head, la)?;
            let all: Vec<ChangedValue> = values.into_iter().map(|(k, v)| (k, Some(v))).collect();
            self.mgr.changing(&self.id, || {
                self.mgr
                    .store
                    .save_delta(&self.id, Some(latest_version), &new, &all)
            })?
        } else {
            self.mgr.changing(&self.id, || {
                self.mgr.store.save(&self.id, Some(latest_version), &stored)
            })?
        };
        self.saved(saved, first_key, w)
    }

    /// Whether a session whose whole record is `stored` is to be stored by key: on a per-key
    /// store, once it is larger than [`SessionConfig::lazy_above`] (smaller ones stay whole
    /// records, read and written in one piece as before).
    fn by_key_now(&self, stored: &StoredSession) -> bool {
        self.mgr.per_key && stored.bytes.len() as u64 > self.mgr.cfg.lazy_above
    }

    /// The end of a commit's compare-and-swap.
    fn saved(&mut self, saved: bool, first_key: String, w: locks::WriteHold<'_>) -> Result<()> {
        if !saved {
            // Deleted meanwhile by a request or gc that saw it expired, or written by someone
            // without the shared lock table (the store's CAS caught it).
            if self.mgr.store.meta(&self.id)?.is_none() {
                return Err(Error::SessionGone);
            }
            bump(&self.mgr.counters.conflicts);
            return Err(Error::Conflict { key: first_key });
        }
        bump(&self.mgr.counters.data_writes);
        self.finished = true;
        drop(w);
        Ok(())
    }

    /// A commit on a store that keeps values per key: the delta is merged into the latest
    /// head (the same rules as a whole record's merge), and only the changed values are
    /// written, with the head, in one compare-and-swap.
    fn commit_by_key(
        &mut self,
        w: locks::WriteHold<'_>,
        meta: SessionMeta,
        mut head: Head,
    ) -> Result<()> {
        let latest_version = head.version;
        let keys = &head.keys;
        if let Some(key) = self.first_conflict(|k| keys.get(k).map(|s| s.changed), head.floor) {
            bump(&self.mgr.counters.conflicts);
            return Err(Error::Conflict { key });
        }
        let new_version = head
            .version
            .checked_add(1)
            .ok_or_else(|| Error::SessionCorrupt("record version at its maximum".into()))?;
        let first_key = self.delta.keys().next().cloned().unwrap_or_default();
        let mut changed = Vec::with_capacity(self.delta.len());
        for (key, v) in std::mem::take(&mut self.delta) {
            let bytes = v
                .map(|v| record::encode_value(&key, new_version, &v))
                .transpose()?;
            let size = bytes.as_ref().map(|b| b.len() as u64);
            head.keys.insert(
                key.clone(),
                KeyState {
                    changed: new_version,
                    size,
                },
            );
            changed.push((key, bytes));
        }
        if self.expiry_changed {
            head.expiry = self.expiry;
        }
        prune_head_tombstones(&mut head, self.mgr.cfg.max_tombstones);
        head.version = new_version;
        let la = meta.last_accessed.max(self.accessed);
        let new = self.stored_head(&head, la)?;
        let saved = self.mgr.changing(&self.id, || {
            self.mgr
                .store
                .save_delta(&self.id, Some(latest_version), &new, &changed)
        })?;
        self.saved(saved, first_key, w)
    }

    /// An encoded head with its metadata; [`Error::TooLarge`] when head and values together
    /// exceed [`SessionConfig::max_record_size`].
    fn stored_head(&self, head: &Head, la: Timestamp) -> Result<StoredHead> {
        let bytes = record::encode_head(head)?;
        let size = (bytes.len() as u64).saturating_add(head.values_size());
        let limit = self.mgr.cfg.max_record_size;
        if size > limit as u64 {
            return Err(Error::TooLarge {
                size: usize::try_from(size).unwrap_or(usize::MAX),
                limit,
            });
        }
        Ok(StoredHead {
            meta: SessionMeta {
                version: head.version,
                created: Timestamp(head.created),
                last_accessed: la,
                expiry: head.expiry,
                size,
            },
            head: bytes,
            values: None,
        })
    }

    /// The first key this request wrote or read for update that another commit changed since
    /// this request's load, by the latest change versions (`changed`) and tombstone floor.
    fn first_conflict(&self, changed: impl Fn(&str) -> Option<u64>, floor: u64) -> Option<String> {
        let base = self.base_version;
        let changed_since = |key: &str| match changed(key) {
            Some(v) => v > base,
            None => floor > base,
        };
        self.delta
            .keys()
            .chain(self.reads.iter())
            .find(|k| changed_since(k))
            .cloned()
    }

    /// First store of a session from `create` (nobody else can know its ID's record yet).
    fn commit_new(&mut self) -> Result<()> {
        let mut record = Record {
            version: 1,
            created: self.created.0,
            expiry: self.expiry,
            body: RecordBody::default(),
        };
        for (key, v) in std::mem::take(&mut self.delta) {
            if let Some(v) = v {
                record.body.changed.insert(key.clone(), 1);
                record.body.data.insert(key, v);
            }
        }
        let stored = self.stored_session(&record, self.accessed)?;
        let saved = if self.by_key_now(&stored) {
            let (head, values) = record::split(&record)?;
            let new = self.stored_head(&head, self.accessed)?;
            let values: Vec<ChangedValue> = values.into_iter().map(|(k, v)| (k, Some(v))).collect();
            self.mgr.store.save_delta(&self.id, None, &new, &values)?
        } else {
            self.mgr.store.save(&self.id, None, &stored)?
        };
        if !saved {
            return Err(Error::Random(
                "a generated session ID was already taken".into(),
            ));
        }
        bump(&self.mgr.counters.data_writes);
        self.finished = true;
        self.stored = true;
        Ok(())
    }

    fn stored_session(&self, record: &Record, la: Timestamp) -> Result<StoredSession> {
        let bytes = record::encode(record, self.mgr.cfg.max_record_size)?;
        Ok(StoredSession {
            meta: SessionMeta {
                version: record.version,
                created: Timestamp(record.created),
                last_accessed: la,
                expiry: record.expiry,
                size: bytes.len() as u64,
            },
            bytes,
        })
    }

    /// Records this request's access time unless the stored one is recent enough, or the
    /// session expired (by its stored times) while the request ran: an access is stored only
    /// while the session is alive, so a session once seen expired stays expired.
    /// Whether ending this session without changes (a `commit` of no changes, or a drop) may
    /// write its access time. `false` guarantees that such an end does no store I/O and takes
    /// no lock (the touch is coalesced away), so it may run on an async runtime's worker.
    pub fn access_write_due(&self) -> bool {
        let interval = self.mgr.cfg.touch_interval_for(self.expiry);
        self.stored && self.stored_last_accessed < self.accessed.saturating_sub(interval)
    }

    fn record_access(&self) -> Result<()> {
        if !self.stored {
            return Ok(());
        }
        let c = &self.mgr.counters;
        let cfg = &self.mgr.cfg;
        if !self.access_write_due() {
            bump(&c.touches_skipped);
            return Ok(());
        }
        let interval = cfg.touch_interval_for(self.expiry);
        let cutoffs = cfg.cutoffs(cfg.clock.now());
        if cutoffs.expired(self.created, self.stored_last_accessed, self.expiry) {
            // Maybe only our snapshot is stale: ask the store (cheap, metadata only).
            match self.mgr.store.meta(&self.id)? {
                Some(m) if !cutoffs.meta_expired(&m) => {}
                _ => return Ok(()),
            }
        }
        // The store re-checks expiry atomically with the write, so a session
        // that expired since the check above is not revived.
        match self
            .mgr
            .store
            .touch(&self.id, self.accessed, interval, &cutoffs)?
        {
            Touch::Written => {
                bump(&c.touches_written);
                self.mgr.note_access(&self.id, Some(self.accessed));
            }
            Touch::Skipped => {
                bump(&c.touches_skipped);
                self.mgr.note_access(&self.id, None);
            }
            Touch::Missing | Touch::Expired => {}
        }
        Ok(())
    }

    /// Moves the session to a fresh ID atomically (under the write lock) and deletes the old
    /// one; use it at login to prevent session fixation. Pending changes stay pending and are
    /// committed to the new ID. Waits at most [`SessionConfig::lock_timeout`].
    pub fn cycle_id(&mut self) -> Result<()> {
        self.cycle_id_timeout(self.mgr.cfg.lock_timeout)
    }

    /// [`Session::cycle_id`] with its own bound on the wait.
    pub fn cycle_id_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.check_open()?;
        if !self.stored {
            // Nothing stored under the old ID: a fresh ID is all it takes.
            self.id = SessionId::generate()?;
            return Ok(());
        }
        let d = Deadline::after(timeout);
        let was_exclusive = self.exclusive.is_some();
        let w = self.write_lock(d)?;
        let latest = self.latest(&w)?;
        // Copied verbatim (same version, so conflict detection still works).
        let stored =
            self.stored_session(&latest.record, latest.last_accessed.max(self.accessed))?;
        for _ in 0..4 {
            let new_id = SessionId::generate()?;
            let new_guard = if was_exclusive {
                Some(locks::upgradable(&self.mgr.locks, &new_id, d)?)
            } else {
                None
            };
            if self.mgr.store.save(&new_id, None, &stored)? {
                bump(&self.mgr.counters.data_writes);
                self.mgr
                    .changing(&self.id, || self.mgr.store.delete(&self.id))?;
                drop(w);
                self.id = new_id;
                self.exclusive = new_guard;
                return Ok(());
            }
        }
        Err(Error::Random("four generated session IDs collided".into()))
    }

    /// Deletes the session at once (e.g. at logout), with its leftovers, and ends the request.
    ///
    /// [`Error::SessionGone`] if there was nothing to delete under this ID: the session
    /// expired, was deleted, or another request moved it with [`Session::cycle_id`] (then the
    /// session lives on under the new ID, which that request handed out, and was *not* logged
    /// out by this call).
    pub fn invalidate(self) -> Result<()> {
        let timeout = self.mgr.cfg.lock_timeout;
        self.invalidate_timeout(timeout)
    }

    /// [`Session::invalidate`] with its own bound on the wait.
    pub fn invalidate_timeout(mut self, timeout: Duration) -> Result<()> {
        self.check_open()?;
        self.finished = true;
        if !self.stored {
            return Ok(());
        }
        let _w = self.write_lock(Deadline::after(timeout))?;
        if self
            .mgr
            .changing(&self.id, || self.mgr.store.delete(&self.id))?
        {
            Ok(())
        } else {
            Err(Error::SessionGone)
        }
    }

    /// Ends the request without writing its changes, on purpose (no warning). The access is
    /// still recorded.
    pub fn discard(mut self) {
        self.commit_tried = true;
    }
}

/// Length of a value's JSON encoding, without keeping the encoding.
fn encoded_len(v: &Value) -> Result<usize> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, v)?;
    Ok(c.0)
}

/// [`prune_tombstones`] of a head.
fn prune_head_tombstones(head: &mut Head, max: usize) {
    let mut tombs: Vec<(u64, String)> = head
        .keys
        .iter()
        .filter(|(_, s)| s.size.is_none())
        .map(|(k, s)| (s.changed, k.clone()))
        .collect();
    if tombs.len() <= max {
        return;
    }
    tombs.sort();
    let excess = tombs.len() - max;
    for (v, k) in tombs.into_iter().take(excess) {
        head.keys.remove(&k);
        head.floor = head.floor.max(v);
    }
}

/// Keeps at most `max` tombstones, folding the oldest into `floor`.
fn prune_tombstones(body: &mut RecordBody, max: usize) {
    let mut tombs: Vec<(u64, String)> = body
        .changed
        .iter()
        .filter(|(k, _)| !body.data.contains_key(*k))
        .map(|(k, &v)| (v, k.clone()))
        .collect();
    if tombs.len() <= max {
        return;
    }
    tombs.sort();
    let excess = tombs.len() - max;
    for (v, k) in tombs.into_iter().take(excess) {
        body.changed.remove(&k);
        body.floor = body.floor.max(v);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.finished || self.mgr.check_fork().is_err() {
            return;
        }
        if self.is_dirty() && !self.commit_tried {
            bump(&self.mgr.counters.dirty_dropped);
            tracing::warn!(
                session = ?self.id,
                keys = self.delta.len(),
                "session dropped with uncommitted changes (call commit() or discard())"
            );
        }
        // Best effort: a failed access-time write must not turn into a panic.
        let _ = self.record_access();
    }
}

#[cfg(test)]
mod tests;
