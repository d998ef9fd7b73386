//! A cache over any session [`Store`], with namespaces, per-key expiry and one creator per key
//! across threads, processes and (with a database lock) hosts.
//!
//! # Quick start
//! ```
//! use locktable::cache::Cache;
//! use std::time::Duration;
//! let dir = tempfile::tempdir().unwrap();
//! let cache = Cache::open(dir.path()).unwrap(); // lock table + FileStore + key in `dir`
//! let pages = cache.region("pages");
//!
//! let html: String = pages
//!     .get_or_create("/index", Duration::from_secs(60), || {
//!         // Runs in one worker at a time; the others wait for its result (or, once a value
//!         // exists and has gone stale, keep serving the stale value meanwhile).
//!         Ok::<_, locktable::Error>("<h1>hello</h1>".to_owned())
//!     })
//!     .unwrap();
//! assert_eq!(pages.get::<String>("/index").unwrap().as_deref(), Some(html.as_str()));
//!
//! pages.set("/about", &"<p>about</p>", Duration::from_secs(60)).unwrap();
//! assert!(pages.remove("/about").unwrap());
//! cache.clear("pages").unwrap(); // every key of the namespace, in one write
//! assert_eq!(pages.get::<String>("/index").unwrap(), None);
//! ```
//!
//! # What is guaranteed
//! - [`Region::get_or_create`]: a fresh value is returned as it is. A stale value (past its
//!   time-to-live, within [`CacheConfig::stale_grace`]) is returned at once when another worker
//!   is recreating it. Otherwise exactly one worker holds the key's creation claim and runs
//!   `create`; the others wait (at most [`CacheConfig::wait_timeout`], then
//!   [`Error::Timeout`]) and then read its result. A creator whose `create` fails, panics, or
//!   whose process dies releases its claim at once (the lock table's recovery for a dead
//!   process), and the next waiter takes over.
//! - Entries are stored in the session record envelope (checksum, version, size and depth
//!   limits). A corrupt entry, an entry over [`CacheConfig::max_entry_size`], or one whose key
//!   collides with another's ID is a miss (counted in [`CacheStats`]), never a panic or another
//!   key's value; writing the key replaces it.
//! - [`Cache::clear`] is one small write: each namespace has a generation entry (a random
//!   64-bit number) and a value counts only under the generation it was written with. A lost
//!   generation entry (evicted by memcached) acts as a clear, never as a revival.
//!
//! # Sharing a store
//! Entry IDs are keyed hashes (see [`IdKey`]), so a store may also hold sessions. The cache's
//! [`Cache::gc`] only removes records whose header carries a fixed expiry time that has passed.
//!
//! Owns: the cache's read, write and creation protocol, its entries and counters. Takes its
//! creation locks only through [`CreationLock`]. May not touch: lock-table internals or the
//! session manager.

mod entry;
mod key;
mod lock;

pub use key::{IdKey, ID_KEY_LEN};
pub use lock::{Claim, CreationLock};

use crate::session::{Clock, Cutoffs, FileStore, SessionId, Store, SystemClock, Timestamp};
use crate::{Error, LockTable, Result, TableOptions};
use entry::{Generation, ValueEntry};
use key::Kind;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of a [`Cache`].
///
/// ```
/// use locktable::cache::CacheConfig;
/// use std::time::Duration;
/// let cfg = CacheConfig { stale_grace: Duration::from_secs(5), ..CacheConfig::default() };
/// assert_eq!(cfg.wait_timeout, Duration::from_secs(30));
/// ```
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How long past its time-to-live a value may still be served while another worker
    /// recreates it. Zero: never serve stale values. Default 60 s.
    pub stale_grace: Duration,
    /// Longest wait for another worker's creation before [`Error::Timeout`]. Default 30 s.
    pub wait_timeout: Duration,
    /// Largest encoded entry: bigger values are refused by `set` ([`Error::TooLarge`]) and
    /// bigger stored entries are misses. Default 1 MiB.
    pub max_entry_size: usize,
    /// The time source (a [`crate::session::ManualClock`] in tests). Every process sharing a
    /// cache must agree on the time.
    pub clock: Arc<dyn Clock>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            stale_grace: Duration::from_secs(60),
            wait_timeout: Duration::from_secs(30),
            max_entry_size: 1 << 20,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Counters of one [`Cache`] handle (and its clones), in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found a fresh value.
    pub hits: u64,
    /// Lookups that found no usable value (absent, dead, cleared, corrupt, colliding).
    pub misses: u64,
    /// `get_or_create` calls answered with a stale value while another worker recreated it.
    pub stale_served: u64,
    /// `create` calls run by `get_or_create` in this process.
    pub creations: u64,
    /// `create` calls that returned an error (the claim was released at once).
    pub create_failures: u64,
    /// `get_or_create` calls that had to wait for another worker's claim.
    pub waits: u64,
    /// Waits that ended in [`Error::Timeout`].
    pub timeouts: u64,
    /// Entries found corrupt or over the size limit (treated as absent).
    pub corrupt: u64,
    /// Entries whose stored key differed from the one looked up (an ID collision).
    pub collisions: u64,
    /// Claims taken over from a creator that died holding them.
    pub creator_died: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale_served: AtomicU64,
    creations: AtomicU64,
    create_failures: AtomicU64,
    waits: AtomicU64,
    timeouts: AtomicU64,
    corrupt: AtomicU64,
    collisions: AtomicU64,
    creator_died: AtomicU64,
}

/// Bumps a statistics counter (no ordering with anything else is needed: it is only read
/// for reports).
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A cache handle: cheap to clone; clones share counters.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    lock: Arc<dyn CreationLock>,
    key: IdKey,
    cfg: CacheConfig,
    counters: Counters,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("store", &self.inner.store)
            .field("lock", &self.inner.lock)
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

/// One namespace of a [`Cache`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct Region {
    cache: Cache,
    namespace: String,
}

/// What a lookup found.
enum Found {
    Fresh(Value),
    Stale(Value),
    Absent,
}

/// The end of a bounded wait.
#[derive(Clone, Copy)]
struct Deadline(Instant);

impl Deadline {
    fn after(d: Duration) -> Deadline {
        let now = Instant::now();
        Deadline(
            now.checked_add(d)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400)),
        )
    }
    fn left(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

impl Cache {
    /// The embedded default, shared by every process that opens `dir`: the lock table
    /// `dir/locks.table`, a [`FileStore`] in `dir/cache` (without fsync: a cache can be
    /// recomputed, and saves stay atomic) and the ID secret `dir/cache.key`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Cache> {
        Self::open_with(dir, CacheConfig::default())
    }

    /// [`Cache::open`] with settings.
    pub fn open_with(dir: impl AsRef<Path>, cfg: CacheConfig) -> Result<Cache> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let table = LockTable::open(dir.join("locks.table"), &TableOptions::default())?;
        let store = FileStore::open(dir.join("cache"))?.with_fsync(false);
        let key = IdKey::load_or_create(dir.join("cache.key"))?;
        Ok(Cache::new(Arc::new(table), Arc::new(store), key, cfg))
    }

    /// A cache over `store`, making creators with `lock` (a [`LockTable`] for one host).
    ///
    /// ```
    /// use locktable::cache::{Cache, CacheConfig, IdKey};
    /// use locktable::session::MemoryStore;
    /// use locktable::{LockTable, TableOptions};
    /// use std::sync::Arc;
    /// let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    /// let cache = Cache::new(
    ///     Arc::new(table),
    ///     Arc::new(MemoryStore::new()),
    ///     IdKey::generate().unwrap(),
    ///     CacheConfig::default(),
    /// );
    /// let r = cache.region("r");
    /// r.set("k", &1u32, std::time::Duration::from_secs(1)).unwrap();
    /// assert_eq!(r.get::<u32>("k").unwrap(), Some(1));
    /// ```
    pub fn new(
        lock: Arc<dyn CreationLock>,
        store: Arc<dyn Store>,
        key: IdKey,
        cfg: CacheConfig,
    ) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                store,
                lock,
                key,
                cfg,
                counters: Counters::default(),
            }),
        }
    }

    /// The namespace `name`.
    pub fn region(&self, name: impl Into<String>) -> Region {
        Region {
            cache: self.clone(),
            namespace: name.into(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.cfg
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    /// Counters of this handle and its clones.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            stale_served: get(&c.stale_served),
            creations: get(&c.creations),
            create_failures: get(&c.create_failures),
            waits: get(&c.waits),
            timeouts: get(&c.timeouts),
            corrupt: get(&c.corrupt),
            collisions: get(&c.collisions),
            creator_died: get(&c.creator_died),
        }
    }

    /// Invalidates every key of `namespace` with one write (a new random generation). Entries
    /// written before it are never returned again; they are replaced when their key is set and
    /// collected by [`Cache::gc`] once past their stale grace.
    pub fn clear(&self, namespace: &str) -> Result<()> {
        let id = self.inner.key.derive(Kind::Generation, namespace, "");
        let g = Generation(random_u64()?);
        let now = self.now();
        // A lost compare-and-swap means another writer changed the generation during this
        // call, which invalidates the same entries: done either way.
        self.cas_write(&id, |v| {
            entry::encode_generation(namespace, g, v, now, self.inner.cfg.max_entry_size)
        })?;
        Ok(())
    }

    /// Examines up to `budget` stored records and removes the entries whose stale grace has
    /// passed. Only records with a fixed expiry time that has passed are removed, so sessions
    /// sharing the store are left alone, except those whose own `Expiry::At` has passed
    /// (expired for the session layer too). Returns how many were removed and whether to call
    /// again (the store's scan resumes where it stopped).
    pub fn gc(&self, budget: usize) -> Result<(usize, bool)> {
        let cutoffs = Cutoffs {
            now: self.now(),
            idle_timeout: Duration::MAX,
            max_lifetime: Duration::MAX,
        };
        let scan = self.inner.store.scan_expired(&cutoffs, budget)?;
        let mut removed = 0;
        for id in &scan.expired {
            if self.inner.store.remove_expired(id, &cutoffs)? {
                removed += 1;
            }
        }
        Ok((removed, scan.more))
    }

    /// The creation lock's name of a key: `lc.` and the entry's ID (37 bytes, within any
    /// lock backend's ID limit; keys whose IDs collide merely share a lock).
    fn claim_name(&self, namespace: &str, key: &str) -> String {
        let id = self.inner.key.derive(Kind::Value, namespace, key);
        format!("lc.{}", id.as_str())
    }

    fn now(&self) -> Timestamp {
        self.inner.cfg.clock.now()
    }

    fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Loads `id`; corrupt or oversize records are counted and are `None`.
    fn load_bytes(&self, id: &SessionId) -> Result<Option<Vec<u8>>> {
        match self.inner.store.load(id, self.inner.cfg.max_entry_size) {
            Ok(s) => Ok(s.map(|s| s.bytes)),
            Err(Error::SessionCorrupt(_) | Error::TooLarge { .. }) => {
                bump(&self.counters().corrupt);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The namespace's current generation; `None` when it has none (nothing in it is valid).
    fn generation(&self, namespace: &str) -> Result<Option<Generation>> {
        let id = self.inner.key.derive(Kind::Generation, namespace, "");
        let Some(bytes) = self.load_bytes(&id)? else {
            return Ok(None);
        };
        match entry::decode_generation(&bytes, self.inner.cfg.max_entry_size, namespace) {
            Ok(g) => Ok(Some(g)),
            Err(_) => {
                bump(&self.counters().corrupt);
                Ok(None)
            }
        }
    }

    /// The namespace's generation, creating one if it has none (racing creators agree: the
    /// store's compare-and-swap lets one win and the others read it).
    fn generation_or_create(&self, namespace: &str, now: Timestamp) -> Result<Generation> {
        let id = self.inner.key.derive(Kind::Generation, namespace, "");
        for _ in 0..4 {
            if let Some(g) = self.generation(namespace)? {
                return Ok(g);
            }
            // None usable: read the version, then look again, and the write below expects that
            // version. So it replaces only the absent or unusable entry found after the version
            // was read, never a generation that another writer created since (and may already
            // have stored values under). The common case, a generation there, costs one read.
            let seen = self.seen_version(&id)?;
            if let Some(g) = self.generation(namespace)? {
                return Ok(g);
            }
            let g = Generation(random_u64()?);
            let max = self.inner.cfg.max_entry_size;
            let new = entry::encode_generation(
                namespace,
                g,
                seen.unwrap_or(0).saturating_add(1),
                now,
                max,
            )?;
            if self.inner.store.save(&id, seen, &new)? {
                return Ok(g);
            }
        }
        Err(Error::Conflict {
            key: format!("generation of cache namespace {namespace:?}"),
        })
    }

    /// The stored version of `id`, for a compare-and-swap over it; a record whose metadata is
    /// corrupt is deleted (`None`).
    fn seen_version(&self, id: &SessionId) -> Result<Option<u64>> {
        match self.inner.store.meta(id) {
            Ok(m) => Ok(m.map(|m| m.version)),
            Err(Error::SessionCorrupt(_)) => {
                self.inner.store.delete(id)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// One compare-and-swap write of `id` over whatever version is stored (a corrupt record is
    /// deleted first). `Ok(false)`: another writer got in between, and its write stands.
    fn cas_write(
        &self,
        id: &SessionId,
        make: impl Fn(u64) -> Result<crate::session::StoredSession>,
    ) -> Result<bool> {
        let expected = self.seen_version(id)?;
        let new = make(expected.unwrap_or(0).saturating_add(1))?;
        self.inner.store.save(id, expected, &new)
    }

    fn lookup(&self, namespace: &str, key: &str) -> Result<Found> {
        let now = self.now();
        let Some(generation) = self.generation(namespace)? else {
            return Ok(Found::Absent);
        };
        let id = self.inner.key.derive(Kind::Value, namespace, key);
        let Some(bytes) = self.load_bytes(&id)? else {
            return Ok(Found::Absent);
        };
        let e = match entry::decode_value(&bytes, self.inner.cfg.max_entry_size) {
            Ok(e) => e,
            Err(_) => {
                bump(&self.counters().corrupt);
                return Ok(Found::Absent);
            }
        };
        if e.namespace != namespace || e.key != key {
            bump(&self.counters().collisions);
            return Ok(Found::Absent);
        }
        let stale_until = e.fresh_until.saturating_add(self.inner.cfg.stale_grace);
        Ok(match () {
            _ if e.generation != generation.0 || now > e.last_usable => Found::Absent,
            _ if now < e.fresh_until => Found::Fresh(e.value),
            _ if now < stale_until => Found::Stale(e.value),
            _ => Found::Absent,
        })
    }

    fn store_value(&self, namespace: &str, key: &str, value: Value, ttl: Duration) -> Result<()> {
        let now = self.now();
        let generation = self.generation_or_create(namespace, now)?;
        let fresh_until = now.saturating_add(ttl);
        let e = ValueEntry {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            generation: generation.0,
            fresh_until,
            // Usable while `now < fresh_until + grace`, so the last usable instant is one
            // millisecond before (with no grace: dead as soon as it is stale).
            last_usable: fresh_until
                .saturating_add(self.inner.cfg.stale_grace)
                .saturating_sub(Duration::from_millis(1)),
            value,
        };
        let id = self.inner.key.derive(Kind::Value, namespace, key);
        let max = self.inner.cfg.max_entry_size;
        // A lost compare-and-swap: a concurrent write of the key won; this one is ordered
        // just before it (last writer wins).
        self.cas_write(&id, |v| entry::encode_value(&e, v, now, max))?;
        Ok(())
    }

    /// Holding the claim: re-check (a creator may have just finished), else create and store.
    fn create_claimed<T, E, F>(
        &self,
        claim: Claim,
        namespace: &str,
        key: &str,
        ttl: Duration,
        create: F,
    ) -> std::result::Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> std::result::Result<T, E>,
    {
        if claim.previous_owner_died() {
            bump(&self.counters().creator_died);
            tracing::warn!(
                namespace,
                "cache: the previous creator of a key died mid-creation; taking over"
            );
        }
        if let Found::Fresh(v) = self.lookup(namespace, key)? {
            drop(claim);
            return Ok(from_value(v)?);
        }
        bump(&self.counters().creations);
        let value = match create() {
            Ok(v) => v,
            Err(e) => {
                drop(claim);
                bump(&self.counters().create_failures);
                return Err(e);
            }
        };
        let json = serde_json::to_value(&value).map_err(Error::from)?;
        // Every later caller reads the value back as `T`: one that does not (a NaN or an
        // infinity becomes JSON `null`) would fail them all until it expires. Refuse it here.
        from_value::<T>(json.clone())?;
        self.store_value(namespace, key, json, ttl)?;
        drop(claim);
        Ok(value)
    }

    fn get_or_create<T, E, F>(
        &self,
        namespace: &str,
        key: &str,
        ttl: Duration,
        create: F,
    ) -> std::result::Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> std::result::Result<T, E>,
    {
        let deadline = Deadline::after(self.inner.cfg.wait_timeout);
        let name = self.claim_name(namespace, key);
        let c = self.counters();
        match self.lookup(namespace, key)? {
            Found::Fresh(v) => {
                bump(&c.hits);
                return Ok(from_value(v)?);
            }
            Found::Stale(v) => match self.inner.lock.try_claim(&name)? {
                None => {
                    bump(&c.stale_served);
                    return Ok(from_value(v)?);
                }
                Some(claim) => {
                    bump(&c.misses);
                    return self.create_claimed(claim, namespace, key, ttl, create);
                }
            },
            Found::Absent => bump(&c.misses),
        }
        let claim = match self.inner.lock.try_claim(&name)? {
            Some(claim) => claim,
            None => {
                bump(&c.waits);
                match self.inner.lock.claim_timeout(&name, deadline.left()) {
                    Ok(claim) => claim,
                    Err(e) => {
                        if matches!(e, Error::Timeout) {
                            bump(&c.timeouts);
                        }
                        return Err(e.into());
                    }
                }
            }
        };
        self.create_claimed(claim, namespace, key, ttl, create)
    }
}

fn from_value<T: DeserializeOwned>(v: Value) -> Result<T> {
    Ok(serde_json::from_value(v)?)
}

fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(u64::from_le_bytes(b))
}

impl Region {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.namespace
    }

    /// The cache this region belongs to.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The fresh value of `key`, if any (a stale value is `None`). A stored value that does not
    /// deserialize as `T` is [`Error::Serialize`].
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let c = self.cache.counters();
        match self.cache.lookup(&self.namespace, key)? {
            Found::Fresh(v) => {
                bump(&c.hits);
                from_value(v).map(Some)
            }
            Found::Stale(_) | Found::Absent => {
                bump(&c.misses);
                Ok(None)
            }
        }
    }

    /// Stores `value`, fresh for `ttl` (`Duration::MAX`: never stale). [`Error::TooLarge`]
    /// or [`Error::TooDeep`] when it is over the limits; nothing is written then.
    pub fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T, ttl: Duration) -> Result<()> {
        let json = serde_json::to_value(value)?;
        self.cache.store_value(&self.namespace, key, json, ttl)
    }

    /// Removes `key`; `Ok(true)` if an entry (live or not) was stored under its ID.
    pub fn remove(&self, key: &str) -> Result<bool> {
        let id = self
            .cache
            .inner
            .key
            .derive(Kind::Value, &self.namespace, key);
        self.cache.inner.store.delete(&id)
    }

    /// Every key of this namespace; see [`Cache::clear`].
    pub fn clear(&self) -> Result<()> {
        self.cache.clear(&self.namespace)
    }

    /// The fresh value of `key`, or one worker's new value from `create`; see the module docs
    /// for who waits, who gets a stale value and what happens when a creator fails or dies.
    ///
    /// `create` runs while this worker holds the key's creation claim: it must not call
    /// `get_or_create` on the same key (it would wait for itself until the timeout). Its error
    /// is returned as it is; the cache's own errors ([`Error::Timeout`] when the wait runs out,
    /// store errors, [`Error::TooLarge`] for a created value over the limit, [`Error::Serialize`]
    /// for one that does not read back as `T`, such as a NaN) are converted with
    /// `E: From<Error>`. A created value is returned only once it is stored.
    pub fn get_or_create<T, E, F>(
        &self,
        key: &str,
        ttl: Duration,
        create: F,
    ) -> std::result::Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> std::result::Result<T, E>,
    {
        self.cache.get_or_create(&self.namespace, key, ttl, create)
    }
}

#[cfg(test)]
mod tests;
