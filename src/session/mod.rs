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

mod id;
#[cfg(feature = "postgres")]
mod locks_pg;
#[cfg(feature = "postgres")]
mod pg_pool;
pub mod record;
mod store;

pub mod demo;

pub use id::{SessionId, ID_BYTES, ID_LEN};
#[cfg(feature = "postgres")]
pub use locks_pg::{PgLockKeys, PgLocks, PgReadGuard, PgUpgradableGuard, PgWriteGuard};
#[cfg(feature = "postgres")]
pub use pg_pool::{PgPool, PgPoolOptions, DEFAULT_POOL_SIZE};
pub use store::{
    Capabilities, Clock, Cutoffs, FileStore, ManualClock, MemoryStore, Store, StoredSession,
    SystemClock, Timestamp, Touch,
};
#[cfg(feature = "postgres")]
pub use store::{PgStore, PgStoreOptions};

use crate::{Error, LockTable, Result, TableOptions, UpgradableReadGuard};
use record::{Record, RecordBody};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What to do when a stored record fails validation (checksum, format, size).
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
/// ```
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// A session not accessed for this long expires. Default 30 minutes.
    pub idle_timeout: Duration,
    /// A session expires this long after creation, however active. Default 24 hours.
    pub max_lifetime: Duration,
    /// A request's access is not stored when the stored time is newer than `now - touch_interval`.
    /// `None` (default): `idle_timeout / 60`. Expiry may therefore happen up to this much early.
    pub touch_interval: Option<Duration>,
    /// Largest encoded record; bigger commits fail with [`Error::TooLarge`]. Default 1 MiB.
    pub max_record_size: usize,
    /// Optimistic attempts of [`SessionManager::transact`] before its final exclusive attempt.
    /// Default 4.
    pub transact_retries: u32,
    /// Most sessions one [`SessionManager::gc`] call deletes. Default 1,000.
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
        }
    }
}

impl SessionConfig {
    /// The touch interval in force.
    pub fn effective_touch_interval(&self) -> Duration {
        self.touch_interval.unwrap_or(self.idle_timeout / 60)
    }

    fn cutoffs(&self, now: Timestamp) -> Cutoffs {
        Cutoffs {
            idle_before: now.saturating_sub(self.idle_timeout),
            created_before: now.saturating_sub(self.max_lifetime),
        }
    }
}

/// Counters of a manager (all processes count separately).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Sessions returned by `load`, `load_exclusive` and `create`.
    pub loads: u64,
    /// Data writes to the store (create, commit with changes, cycle).
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
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Result of one [`SessionManager::gc`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Expired sessions deleted.
    pub deleted: usize,
    /// Corrupt sessions deleted.
    pub corrupt: usize,
    /// Candidates skipped because a request held their lock (retried by a later call).
    pub busy: usize,
    /// Candidates that turned out not to be expired (touched meanwhile).
    pub live: usize,
    /// Leftover temporary files removed by the store.
    pub temp_files_removed: usize,
    /// True when the batch was full: call `gc` again to continue.
    pub more: bool,
}

#[derive(Debug)]
struct Inner {
    table: LockTable,
    store: Box<dyn Store>,
    cfg: SessionConfig,
    counters: Counters,
}

/// Entry point of the session layer; cheap to clone and share between threads.
#[derive(Debug, Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

/// A record as read from the store, validated.
struct Loaded {
    record: Record,
    last_accessed: Timestamp,
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

use session_lock_id as lock_key;

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
        let store = FileStore::open(dir.join("sessions"), table.clone())?.with_fsync(cfg.fsync);
        Ok(SessionManager::new(table, store, cfg))
    }

    /// A manager over any lock table and store.
    pub fn new(table: LockTable, store: impl Store + 'static, cfg: SessionConfig) -> Self {
        SessionManager {
            inner: Arc::new(Inner {
                table,
                store: Box::new(store),
                cfg,
                counters: Counters::default(),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.cfg
    }

    /// The store.
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
        }
    }

    /// Creates a new, empty session with a fresh random ID (written at once).
    pub fn create(&self) -> Result<Session> {
        let inner = &self.inner;
        let now = inner.cfg.clock.now();
        let record = Record {
            version: 1,
            created: now.0,
            body: RecordBody::default(),
        };
        let bytes = record::encode(&record, inner.cfg.max_record_size)?;
        // A collision of 192 random bits is not expected; retry a few times rather than loop.
        for _ in 0..4 {
            let id = SessionId::generate()?;
            let stored = StoredSession {
                version: 1,
                created: now,
                last_accessed: now,
                bytes: bytes.clone(),
            };
            if inner.store.save(&id, None, &stored)? {
                bump(&inner.counters.data_writes);
                bump(&inner.counters.loads);
                return Ok(Session::new(
                    Arc::clone(inner),
                    id,
                    Loaded {
                        record: record.clone(),
                        last_accessed: now,
                    },
                    now,
                    None,
                ));
            }
        }
        Err(Error::Random("four generated session IDs collided".into()))
    }

    /// Loads a session for an optimistic or read-only request.
    ///
    /// The read lock is held only while the record is read. Returns `Ok(None)` for an unknown,
    /// expired or malformed ID (so a cookie can be passed in as it came); use
    /// [`SessionId::parse`] to tell a malformed one apart.
    pub fn load(&self, id: &str) -> Result<Option<Session>> {
        let Ok(id) = SessionId::parse(id) else {
            return Ok(None);
        };
        let inner = &self.inner;
        let now = inner.cfg.clock.now();
        let guard = inner.table.read(lock_key(&id))?;
        let died = guard.previous_owner_died();
        let loaded = inner.read_validated(&id, died);
        drop(guard);
        let Some(loaded) = inner.handle_corrupt(&id, loaded, died)? else {
            return Ok(None);
        };
        if inner.is_expired(&loaded, now, Timestamp(0)) {
            return Ok(None);
        }
        bump(&inner.counters.loads);
        Ok(Some(Session::new(Arc::clone(inner), id, loaded, now, None)))
    }

    /// Loads a session for an exclusive request: the session's upgradable lock is held until
    /// the session is committed, invalidated or dropped.
    ///
    /// Other `load`s proceed meanwhile; other exclusive loads and all commits of this session
    /// wait. Do not load the same session exclusively twice in one thread (it would wait for
    /// itself), and do not commit an optimistic session of the same ID while holding this one.
    pub fn load_exclusive(&self, id: &str) -> Result<Option<Session>> {
        let Ok(id) = SessionId::parse(id) else {
            return Ok(None);
        };
        let inner = &self.inner;
        // Kept in the session until commit: an owned guard.
        let guard = inner.table.upgradable_read(lock_key(&id))?.into_owned();
        let now = inner.cfg.clock.now();
        let died = guard.previous_owner_died();
        let loaded = inner.read_validated(&id, died);
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                drop(guard);
                inner.handle_corrupt(&id, Err(e), died)?;
                return Ok(None);
            }
        };
        let Some(loaded) = loaded else {
            return Ok(None);
        };
        if inner.is_expired(&loaded, now, Timestamp(0)) {
            return Ok(None);
        }
        bump(&inner.counters.loads);
        Ok(Some(Session::new(
            Arc::clone(inner),
            id,
            loaded,
            now,
            Some(guard),
        )))
    }

    /// Runs `f` on the session and commits, re-running it on fresh data after a conflict.
    ///
    /// `f` runs at most `transact_retries + 1` times: the first `transact_retries` attempts are
    /// optimistic; the last one loads the session exclusively, which cannot conflict. Returns
    /// `Ok(None)` if the session does not exist (or stopped existing), and `f`'s first error as is.
    pub fn transact<R>(
        &self,
        id: &str,
        mut f: impl FnMut(&mut Session) -> Result<R>,
    ) -> Result<Option<R>> {
        let retries = self.inner.cfg.transact_retries;
        // `f` may move the session to a new ID (`cycle_id`, at login): a
        // retry must load the session where it now lives.
        let mut id = id.to_owned();
        for attempt in 0..=retries {
            let exclusive = attempt == retries;
            let loaded = if exclusive {
                self.load_exclusive(&id)?
            } else {
                self.load(&id)?
            };
            let Some(mut s) = loaded else {
                return Ok(None);
            };
            let r = f(&mut s)?;
            id = s.id().as_str().to_owned();
            match s.commit() {
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

    /// Deletes a session at once; `Ok(false)` if it did not exist or the ID is malformed.
    pub fn delete(&self, id: &str) -> Result<bool> {
        let Ok(id) = SessionId::parse(id) else {
            return Ok(false);
        };
        let _w = self.inner.table.write(lock_key(&id))?;
        self.inner.store.delete(&id)
    }

    /// Deletes up to `gc_batch` expired (or corrupt) sessions and removes leftover temporary
    /// files. Call it periodically; when [`GcReport::more`] is set, call it again.
    pub fn gc(&self) -> Result<GcReport> {
        let inner = &self.inner;
        let mut report = GcReport {
            temp_files_removed: inner.store.cleanup()?,
            ..GcReport::default()
        };
        let now = inner.cfg.clock.now();
        let cutoffs = inner.cfg.cutoffs(now);
        let ids = inner.store.list_expired(cutoffs, inner.cfg.gc_batch)?;
        report.more = ids.len() >= inner.cfg.gc_batch;
        for id in ids {
            let Some(_w) = inner.table.try_write(lock_key(&id))? else {
                report.busy += 1;
                continue;
            };
            match inner.store.load(&id) {
                Ok(None) => {}
                Ok(Some(st)) if cutoffs.expired(st.created, st.last_accessed) => {
                    inner.store.delete(&id)?;
                    report.deleted += 1;
                }
                Ok(Some(_)) => report.live += 1,
                Err(Error::SessionCorrupt(_)) | Err(Error::TooLarge { .. }) => {
                    inner.store.delete(&id)?;
                    report.corrupt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}

impl Inner {
    /// Reads and fully validates a record (checksum included, always; a dead previous writer is
    /// counted and makes a corrupt record be invalidated whatever the policy).
    fn read_validated(&self, id: &SessionId, owner_died: bool) -> Result<Option<Loaded>> {
        if owner_died {
            bump(&self.counters.owner_died_seen);
        }
        let Some(st) = self.store.load(id)? else {
            return Ok(None);
        };
        let record = record::decode(&st.bytes, self.cfg.max_record_size)?;
        if record.version != st.version || record.created != st.created.0 {
            return Err(Error::SessionCorrupt(
                "store metadata disagrees with the record".into(),
            ));
        }
        Ok(Some(Loaded {
            record,
            last_accessed: st.last_accessed,
        }))
    }

    /// Applies the corruption policy to the result of [`Inner::read_validated`] (no lock held).
    fn handle_corrupt(
        &self,
        id: &SessionId,
        r: Result<Option<Loaded>>,
        owner_died: bool,
    ) -> Result<Option<Loaded>> {
        match r {
            Err(Error::SessionCorrupt(m))
                if self.cfg.on_corrupt == CorruptPolicy::Invalidate || owner_died =>
            {
                let _ = m;
                let _w = self.table.write(lock_key(id))?;
                // Re-check under the write lock: a concurrent commit may have repaired it.
                if let Err(Error::SessionCorrupt(_)) = self.read_validated(id, false) {
                    self.store.delete(id)?;
                    bump(&self.counters.corrupt_invalidated);
                }
                Ok(None)
            }
            other => other,
        }
    }

    /// Expired at `now`, counting `accessed` (this request's own access) as an access.
    fn is_expired(&self, l: &Loaded, now: Timestamp, accessed: Timestamp) -> bool {
        let la = l.last_accessed.max(accessed);
        self.cfg
            .cutoffs(now)
            .expired(Timestamp(l.record.created), la)
    }
}

/// One request's view of a session.
///
/// Changes are kept in memory until [`Session::commit`]. Dropping a session without committing
/// records the access (best effort) and writes no data.
#[derive(Debug)]
pub struct Session {
    mgr: Arc<Inner>,
    id: SessionId,
    base_version: u64,
    created: Timestamp,
    stored_last_accessed: Timestamp,
    accessed: Timestamp,
    data: BTreeMap<String, Value>,
    delta: BTreeMap<String, Option<Value>>,
    exclusive: Option<UpgradableReadGuard<'static>>,
    finished: bool,
}

impl Session {
    fn new(
        mgr: Arc<Inner>,
        id: SessionId,
        loaded: Loaded,
        now: Timestamp,
        exclusive: Option<UpgradableReadGuard<'static>>,
    ) -> Session {
        Session {
            mgr,
            id,
            base_version: loaded.record.version,
            created: Timestamp(loaded.record.created),
            stored_last_accessed: loaded.last_accessed,
            accessed: now.max(loaded.last_accessed),
            data: loaded.record.body.data,
            delta: BTreeMap::new(),
            exclusive,
            finished: false,
        }
    }

    /// The session ID (changes after [`Session::cycle_id`]).
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// The record version this request loaded.
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

    /// True when this request changed something (so `commit` will write).
    pub fn is_dirty(&self) -> bool {
        !self.delta.is_empty()
    }

    /// Reads a value; `Ok(None)` if absent, [`Error::Serialize`] if it has another type.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.data.get(key) {
            None => Ok(None),
            Some(v) => Ok(Some(T::deserialize(v)?)),
        }
    }

    /// Sets a value (written at commit).
    pub fn insert<T: Serialize + ?Sized>(
        &mut self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<()> {
        let key = key.into();
        let v = serde_json::to_value(value)?;
        self.data.insert(key.clone(), v.clone());
        self.delta.insert(key, Some(v));
        Ok(())
    }

    /// Removes a key (a tombstone at commit); returns whether it was present. Removing an absent
    /// key changes nothing.
    pub fn remove(&mut self, key: &str) -> bool {
        if self.data.remove(key).is_some() {
            self.delta.insert(key.to_owned(), None);
            true
        } else {
            false
        }
    }

    /// The keys present, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.data.keys().map(String::as_str)
    }

    fn check_open(&self) -> Result<()> {
        if self.finished {
            Err(Error::SessionFinished)
        } else {
            Ok(())
        }
    }

    /// Takes the write lock: upgrades the exclusive hold or takes a fresh one.
    fn write_lock(&mut self) -> Result<crate::WriteGuard<'static>> {
        match self.exclusive.take() {
            Some(u) => Ok(u.upgrade()),
            None => Ok(self.mgr.table.write(lock_key(&self.id))?.into_owned()),
        }
    }

    /// Re-reads the latest record under a write lock; `SessionGone` if absent or expired.
    fn latest(&self, w: &crate::WriteGuard<'_>) -> Result<Loaded> {
        let died = w.previous_owner_died();
        let r = self.mgr.read_validated(&self.id, died);
        let latest = match r {
            Err(Error::SessionCorrupt(m)) => {
                if self.mgr.cfg.on_corrupt == CorruptPolicy::Invalidate || died {
                    self.mgr.store.delete(&self.id)?;
                    bump(&self.mgr.counters.corrupt_invalidated);
                    return Err(Error::SessionGone);
                }
                return Err(Error::SessionCorrupt(m));
            }
            other => other?,
        };
        let Some(latest) = latest else {
            return Err(Error::SessionGone);
        };
        // Strict: the session must still be alive by its stored times. This request's own
        // access has not been stored yet and does not revive a session that expired meanwhile.
        let now = self.mgr.cfg.clock.now();
        if self.mgr.is_expired(&latest, now, Timestamp(0)) {
            return Err(Error::SessionGone);
        }
        Ok(latest)
    }

    /// Ends the request: writes this request's changes (if any) as one delta, or else records
    /// the access (coalesced). See the module docs for the conflict rule.
    ///
    /// On [`Error::Conflict`] nothing was written; the access is still recorded when the session
    /// is dropped.
    pub fn commit(mut self) -> Result<()> {
        self.check_open()?;
        if self.delta.is_empty() {
            self.finished = true;
            self.exclusive = None;
            return self.record_access();
        }
        let w = self.write_lock()?;
        let latest = self.latest(&w)?;
        let cfg = &self.mgr.cfg;
        let latest_version = latest.record.version;
        let mut record = latest.record;
        let base = self.base_version;
        for key in self.delta.keys() {
            let changed_since = match record.body.changed.get(key) {
                Some(&v) => v > base,
                None => record.body.floor > base,
            };
            if changed_since {
                bump(&self.mgr.counters.conflicts);
                return Err(Error::Conflict { key: key.clone() });
            }
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
        prune_tombstones(&mut record.body, cfg.max_tombstones);
        record.version = new_version;
        let bytes = record::encode(&record, cfg.max_record_size)?;
        let stored = StoredSession {
            version: new_version,
            created: Timestamp(record.created),
            last_accessed: latest.last_accessed.max(self.accessed),
            bytes,
        };
        if !self
            .mgr
            .store
            .save(&self.id, Some(latest_version), &stored)?
        {
            // Someone wrote without the lock (a foreign process or a misconfigured table).
            bump(&self.mgr.counters.conflicts);
            return Err(Error::Conflict { key: first_key });
        }
        bump(&self.mgr.counters.data_writes);
        self.finished = true;
        drop(w);
        Ok(())
    }

    /// Records this request's access time unless the stored one is recent enough, or the
    /// session expired (by its stored times) while the request ran: an access is stored only
    /// while the session is alive, so a session once seen expired stays expired.
    fn record_access(&self) -> Result<()> {
        let c = &self.mgr.counters;
        let cfg = &self.mgr.cfg;
        let interval = cfg.effective_touch_interval();
        if self.stored_last_accessed >= self.accessed.saturating_sub(interval) {
            bump(&c.touches_skipped);
            return Ok(());
        }
        let cutoffs = cfg.cutoffs(cfg.clock.now());
        if cutoffs.expired(self.created, self.stored_last_accessed) {
            // Maybe only our snapshot is stale: ask the store for the current time (cheap).
            match self.mgr.store.last_accessed(&self.id)? {
                Some(la) if !cutoffs.expired(self.created, la) => {}
                _ => return Ok(()),
            }
        }
        // The store re-checks idle expiry atomically with the write, so a
        // session that expired since the check above is not revived.
        match self
            .mgr
            .store
            .touch(&self.id, self.accessed, interval, cutoffs.idle_before)?
        {
            Touch::Written => bump(&c.touches_written),
            Touch::Skipped => bump(&c.touches_skipped),
            Touch::Missing | Touch::Expired => {}
        }
        Ok(())
    }

    /// Moves the session to a fresh ID atomically (under the write lock) and deletes the old
    /// one; use it at login to prevent session fixation. Pending changes stay pending and are
    /// committed to the new ID.
    pub fn cycle_id(&mut self) -> Result<()> {
        self.check_open()?;
        let was_exclusive = self.exclusive.is_some();
        let w = self.write_lock()?;
        let latest = self.latest(&w)?;
        let bytes = record::encode(&latest.record, self.mgr.cfg.max_record_size)?;
        let stored = StoredSession {
            version: latest.record.version,
            created: Timestamp(latest.record.created),
            last_accessed: latest.last_accessed.max(self.accessed),
            bytes,
        };
        for _ in 0..4 {
            let new_id = SessionId::generate()?;
            let new_guard = if was_exclusive {
                Some(
                    self.mgr
                        .table
                        .upgradable_read(lock_key(&new_id))?
                        .into_owned(),
                )
            } else {
                None
            };
            if self.mgr.store.save(&new_id, None, &stored)? {
                bump(&self.mgr.counters.data_writes);
                self.mgr.store.delete(&self.id)?;
                drop(w);
                self.id = new_id;
                self.exclusive = new_guard;
                return Ok(());
            }
        }
        Err(Error::Random("four generated session IDs collided".into()))
    }

    /// Deletes the session at once (e.g. at logout) and ends the request.
    pub fn invalidate(mut self) -> Result<()> {
        self.check_open()?;
        self.finished = true;
        let _w = self.write_lock()?;
        self.mgr.store.delete(&self.id)?;
        Ok(())
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
        if !self.finished {
            // Best effort: a failed access-time write must not turn into a panic.
            let _ = self.record_access();
        }
    }
}

#[cfg(test)]
mod tests;
