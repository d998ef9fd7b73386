//! The hot-session cache: decoded sessions kept per process, validated across processes by
//! change counters in a small shared mapping of the session layer's own.
//!
//! A [`SessionCache`] has two parts:
//! - [`Versions`]: one 64-bit change counter per hash bucket of the session ID (a keyed SipHash,
//!   so buckets do not depend on the build), in `<store root>/.versions` for a [`FileStore`]
//!   (mapped by every manager on that store) or on the heap for a store private to this process.
//!   Every store write that changes what a load returns (a commit with changes, a delete, an
//!   invalidation, a cycled ID's old record, an expiry removal, gc) runs inside
//!   [`Versions::write`], which takes the bucket's write lock and brackets the write with
//!   [`crate::versions::begin`] and [`crate::versions::end`]. The protocol on a word is
//!   `crate::versions` (model-checked by `loom-tests/versions.rs`).
//! - The per-process map of decoded sessions, bounded in bytes (of encoded records) and evicted
//!   by a clock (second chance), in shards so that threads rarely meet on one mutex.
//!
//! A load looks the ID up; an entry is used only while its bucket's word still has the value
//! read before the store read that filled it. Aliasing IDs in one bucket cost a false
//! invalidation, never a missed one.
//!
//! Owns: the `.versions` file (header, size, bucket locks) and the cache map. May not touch: the
//! lock table or its file, the store's data (it only brackets the manager's store writes).
//!
//! [`FileStore`]: super::FileStore

use super::id::SessionId;
use super::store::{Expiry, Timestamp};
use crate::fork::{self, AttachWindow, ForkSafeFile};
use crate::registry::ofd_lock;
use crate::sync::AtomicU64;
use crate::versions;
use crate::{Error, Result};
use memmap2::MmapRaw;
use serde_json::Value;
use siphasher::sip::SipHasher13;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// Name of the counter file in a [`super::FileStore`]'s root.
pub const VERSIONS_FILE: &str = ".versions";
const MAGIC: &[u8; 8] = b"LTSVER1\n";
/// Header: magic (8), bucket count (u32 LE), reserved (u32), hash key (2 x u64 LE), zeros.
const HEADER_LEN: usize = 64;
/// Buckets of a new file: 128 KiB of counters.
const BUCKETS: u32 = 16_384;
const MAX_BUCKETS: u32 = 1 << 24;
/// Process-local mutexes in front of the OFD bucket locks (which do not exclude the threads of
/// one process: they share the open file description).
const STRIPES: usize = 64;
const SHARDS: usize = 16;

/// The change counters of one store.
pub struct Versions {
    words: Words,
    mask: usize,
    key: [u64; 2],
    stripes: Vec<Mutex<()>>,
}

enum Words {
    /// `<root>/.versions`, mapped shared; the file also carries the OFD bucket locks.
    Mapped { map: MmapRaw, file: ForkSafeFile },
    /// A store private to this process: the counters need not be shared.
    Heap(Vec<AtomicU64>),
}

impl std::fmt::Debug for Versions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.words {
            Words::Mapped { .. } => "mapped",
            Words::Heap(_) => "heap",
        };
        write!(f, "Versions({kind}, {} buckets)", self.mask + 1)
    }
}

/// Opens `path` for reading and writing and registers the descriptor for
/// closing in forked children, inside an attach window (no fork between
/// the two), and nothing else inside it.
fn open_registered(path: &Path) -> std::io::Result<ForkSafeFile> {
    let _window = AttachWindow::enter();
    open_rw(path).map(ForkSafeFile::new)
}

impl Versions {
    /// Counters for a store that only this process uses.
    pub fn in_heap() -> Result<Versions> {
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).map_err(|e| Error::Random(e.to_string()))?;
        Ok(Versions {
            words: Words::Heap((0..BUCKETS).map(|_| AtomicU64::new(0)).collect()),
            mask: BUCKETS as usize - 1,
            key: split_key(&key),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Maps `<dir>/.versions`, creating it (atomically, complete) if absent. A file that is not
    /// a valid counter file is [`Error::Corrupt`].
    pub fn open(dir: &Path) -> Result<Versions> {
        let path = dir.join(VERSIONS_FILE);
        let file = match open_registered(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Outside any attach window: creating writes and links a
                // file, and a fork must not wait for that.
                create(dir, &path)?;
                open_registered(&path)?
            }
            Err(e) => return Err(e.into()),
        };
        let (buckets, key) = read_header(&file)?;
        let map = MmapRaw::map_raw(&*file)?;
        if map.len() != file_len(buckets) || map.as_ptr() as usize % 8 != 0 {
            return Err(Error::Corrupt(
                ".versions: mapping has the wrong size".into(),
            ));
        }
        Ok(Versions {
            words: Words::Mapped { map, file },
            mask: buckets as usize - 1,
            key,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// The bucket of `id` (keyed by the file's key, the same in every process).
    pub fn bucket(&self, id: &SessionId) -> usize {
        self.bucket_of(self.hash(id))
    }

    /// The keyed 64-bit hash of `id`: its bucket's bits, and the cache map's key.
    fn hash(&self, id: &SessionId) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.key[0], self.key[1]);
        h.write(id.as_str().as_bytes());
        h.finish()
    }

    fn bucket_of(&self, hash: u64) -> usize {
        (hash as usize) & self.mask
    }

    fn word(&self, bucket: usize) -> &AtomicU64 {
        match &self.words {
            Words::Heap(v) => &v[bucket],
            Words::Mapped { map, .. } => {
                assert!(bucket <= self.mask);
                let offset = HEADER_LEN + 8 * bucket;
                // The mapping spans the whole validated file (HEADER_LEN + 8 * buckets bytes,
                // checked in `open`) and is page aligned, so `offset` is inside it and 8-aligned;
                // AtomicU64 has the size and alignment of u64. Every process accesses these
                // bytes only atomically, and the mapping lives as long as `self`, which the
                // returned reference borrows.
                // SAFETY: sound for the reasons just given.
                unsafe { &*(map.as_ptr().add(offset) as *const AtomicU64) }
            }
        }
    }

    /// The stamp a copy of `id` read from the store *after* this call may be cached under.
    pub fn fill_stamp(&self, bucket: usize) -> Option<u64> {
        versions::fill_stamp(self.word(bucket))
    }

    /// True while no write of `bucket` began since `stamp` was read.
    pub fn is_current(&self, bucket: usize, stamp: u64) -> bool {
        versions::is_current(self.word(bucket), stamp)
    }

    /// Runs the store write `f` of session `id` inside its bucket's write section: bucket lock
    /// (at most `timeout`, else [`Error::Timeout`] and `f` does not run), `begin`, `f`, `end`,
    /// unlock. Returns `f`'s result and the word's value after `end` (the stamp of what `f`
    /// left in the store).
    pub fn write<R>(
        &self,
        id: &SessionId,
        timeout: Duration,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<(R, u64)> {
        let bucket = self.bucket(id);
        let lock = self.lock(bucket, timeout)?;
        let section = Section {
            word: self.word(bucket),
            started: versions::begin(self.word(bucket)),
        };
        let r = f();
        let after = section.started.wrapping_add(1);
        drop(section);
        drop(lock);
        Ok((r?, after))
    }

    fn lock(&self, bucket: usize, timeout: Duration) -> Result<BucketLock<'_>> {
        let deadline = crate::session::locks::instant_after(timeout);
        let stripe = lock_until(&self.stripes[bucket % STRIPES], deadline)?;
        let file = match &self.words {
            Words::Heap(_) => None,
            Words::Mapped { file, .. } => {
                if fork::epoch() != file.epoch() {
                    return Err(Error::ForkedChild);
                }
                let byte = (HEADER_LEN + 8 * bucket) as i64;
                let mut pause = Duration::from_micros(20);
                while !ofd_lock(file, byte, libc::F_WRLCK, false)? {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::Timeout);
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(1));
                }
                Some((&**file, byte))
            }
        };
        Ok(BucketLock {
            file,
            _stripe: stripe,
        })
    }
}

/// `begin` done; `end` on drop (also when the store write failed or panicked: it is over, and
/// whatever it left is what the next fill reads). Only a killed process leaves the word odd.
struct Section<'a> {
    word: &'a AtomicU64,
    started: u64,
}

impl Drop for Section<'_> {
    fn drop(&mut self) {
        versions::end(self.word, self.started);
    }
}

/// A held bucket write lock: the stripe mutex and, for a mapped file, the OFD lock of the
/// bucket's byte (released by the kernel if the process dies).
struct BucketLock<'a> {
    file: Option<(&'a File, i64)>,
    _stripe: MutexGuard<'a, ()>,
}

impl Drop for BucketLock<'_> {
    fn drop(&mut self) {
        if let Some((file, byte)) = self.file {
            // An unlock of a lock we hold cannot fail for a reason we could act on.
            let _ = ofd_lock(file, byte, libc::F_UNLCK, false);
        }
    }
}

fn lock_until(m: &Mutex<()>, deadline: Instant) -> Result<MutexGuard<'_, ()>> {
    let mut pause = Duration::from_micros(5);
    loop {
        match m.try_lock() {
            Ok(g) => return Ok(g),
            // The mutex guards nothing but the OFD lock: a panic elsewhere changes nothing here.
            Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

fn split_key(k: &[u8; 16]) -> [u64; 2] {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&k[..8]);
    b.copy_from_slice(&k[8..]);
    [u64::from_le_bytes(a), u64::from_le_bytes(b)]
}

fn file_len(buckets: u32) -> usize {
    HEADER_LEN + 8 * buckets as usize
}

fn open_rw(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Writes a complete file under a temporary name and links it into place, so that no process
/// ever maps a half-written header; the first creator wins, the others use its file.
fn create(dir: &Path, path: &Path) -> Result<()> {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| Error::Random(e.to_string()))?;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&BUCKETS.to_le_bytes());
    header[16..32].copy_from_slice(&raw);
    let tmp = dir.join(format!(
        ".versions.tmp.{}.{:016x}",
        std::process::id(),
        u64::from_le_bytes(raw[..8].try_into().unwrap_or_default())
    ));
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(&header)?;
        f.set_len(file_len(BUCKETS) as u64)?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.into()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

fn read_header(file: &File) -> Result<(u32, [u64; 2])> {
    use std::os::unix::fs::FileExt;
    let bad = |what: &str| Error::Corrupt(format!(".versions: {what}"));
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, 0)
        .map_err(|_| bad("shorter than its header"))?;
    if &h[..8] != MAGIC {
        return Err(bad("not a session counter file (magic)"));
    }
    let buckets = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if !buckets.is_power_of_two() || buckets > MAX_BUCKETS {
        return Err(bad("bucket count is not a power of two up to 2^24"));
    }
    if file.metadata()?.len() != file_len(buckets) as u64 {
        return Err(bad("size does not match its bucket count"));
    }
    let key: [u8; 16] = h[16..32].try_into().unwrap_or_default();
    Ok((buckets, split_key(&key)))
}

/// A decoded session as a cache hit hands it out.
#[derive(Debug)]
pub struct Cached {
    /// Record version.
    pub version: u64,
    /// Creation time.
    pub created: Timestamp,
    /// Expiry rule.
    pub expiry: Expiry,
    /// The data, shared with the sessions built from it (copied on their first write).
    pub data: Arc<BTreeMap<String, Value>>,
    /// The session (the map's key is its hash; two IDs with one hash replace each other).
    id: SessionId,
    /// A lower bound of the stored last-accessed time (touches do not invalidate; every touch
    /// this process writes or sees skipped raises it).
    last_accessed: std::sync::atomic::AtomicU64,
    stamp: u64,
    size: usize,
    referenced: AtomicBool,
}

impl Cached {
    /// The cached lower bound of the stored last-accessed time.
    pub fn last_accessed(&self) -> Timestamp {
        Timestamp(self.last_accessed.load(Ordering::Relaxed))
    }
}

/// What a fill is about to cache (read from the store after [`SessionCache::fill_stamp`]).
pub struct Fill {
    pub version: u64,
    pub created: Timestamp,
    pub expiry: Expiry,
    pub data: Arc<BTreeMap<String, Value>>,
    pub last_accessed: Timestamp,
    /// Encoded record size: what the byte bound counts.
    pub size: usize,
}

/// The map's hasher: its keys are keyed SipHashes already.
#[derive(Default)]
struct AlreadyHashed(u64);

impl Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a u64); fold anything else in all the same.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default)]
struct Shard {
    /// Keyed by the ID's keyed SipHash (computed once per lookup for the bucket anyway).
    map: HashMap<u64, Arc<Cached>, BuildHasherDefault<AlreadyHashed>>,
    /// The clock hand's queue: exactly the keys of `map`.
    clock: VecDeque<u64>,
    bytes: usize,
}

/// The per-process cache of decoded sessions.
#[derive(Debug)]
pub struct SessionCache {
    versions: Versions,
    shards: Vec<Mutex<Shard>>,
    shard_bytes: usize,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shard({} entries, {} bytes)", self.map.len(), self.bytes)
    }
}

impl SessionCache {
    /// A cache of at most about `bytes` (of encoded records) over `versions`.
    pub fn new(versions: Versions, bytes: usize) -> SessionCache {
        SessionCache {
            versions,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_bytes: (bytes / SHARDS).max(1),
            hits: Default::default(),
            misses: Default::default(),
        }
    }

    /// The counters (for the write sections of the manager).
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// (hits, misses) so far.
    pub fn hit_counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn shard(&self, bucket: usize) -> MutexGuard<'_, Shard> {
        // A shard is consistent after every statement that a panic could interrupt.
        self.shards[bucket % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The current decoded copy of `id`, if this process has one. `count_miss`: a miss is
    /// counted only where the caller then reads the store (a non-blocking probe that falls
    /// back to a load would otherwise count it twice).
    pub fn get(&self, id: &SessionId, count_miss: bool) -> Option<Arc<Cached>> {
        let hash = self.versions.hash(id);
        let bucket = self.versions.bucket_of(hash);
        let e = self.shard(bucket).map.get(&hash).cloned();
        match e {
            Some(e) if e.id == *id && self.versions.is_current(bucket, e.stamp) => {
                e.referenced.store(true, Ordering::Relaxed);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(e)
            }
            _ => {
                if count_miss {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// Read before the store read of a fill: `(bucket, stamp)`, or `None` while a write of the
    /// bucket is in progress (nothing may be cached then).
    pub fn fill_stamp(&self, id: &SessionId) -> Option<(usize, u64)> {
        let bucket = self.versions.bucket(id);
        self.versions.fill_stamp(bucket).map(|s| (bucket, s))
    }

    /// Caches what was read after `stamp` was taken. A copy under a newer stamp is kept.
    pub fn insert(&self, id: &SessionId, (bucket, stamp): (usize, u64), fill: Fill) {
        if fill.size > self.shard_bytes {
            return;
        }
        let hash = self.versions.hash(id);
        let entry = Arc::new(Cached {
            version: fill.version,
            created: fill.created,
            expiry: fill.expiry,
            data: fill.data,
            id: id.clone(),
            last_accessed: fill.last_accessed.0.into(),
            stamp,
            size: fill.size,
            referenced: AtomicBool::new(false),
        });
        let mut shard = self.shard(bucket);
        match shard.map.get(&hash) {
            Some(old) if old.id == *id && old.stamp >= stamp => {
                old.last_accessed
                    .fetch_max(fill.last_accessed.0, Ordering::Relaxed);
                return;
            }
            Some(old) => {
                let old_size = old.size;
                shard.bytes -= old_size;
            }
            None => shard.clock.push_back(hash),
        }
        shard.bytes += entry.size;
        shard.map.insert(hash, entry);
        self.evict(&mut shard);
    }

    /// Second-chance clock: drops unreferenced entries until the shard fits its budget.
    fn evict(&self, shard: &mut Shard) {
        while shard.bytes > self.shard_bytes {
            let Some(key) = shard.clock.pop_front() else {
                return;
            };
            let Some(e) = shard.map.get(&key) else {
                continue;
            };
            if e.referenced.swap(false, Ordering::Relaxed) {
                shard.clock.push_back(key);
            } else if let Some(e) = shard.map.remove(&key) {
                shard.bytes -= e.size;
            }
        }
    }

    /// This process stored (or saw stored) an access of `id` at `at`: the stored time is at
    /// least `at` now, and stays so (stores never move it backwards).
    pub fn note_access(&self, id: &SessionId, at: Timestamp) {
        let hash = self.versions.hash(id);
        if let Some(e) = self.shard(self.versions.bucket_of(hash)).map.get(&hash) {
            if e.id == *id {
                e.last_accessed.fetch_max(at.0, Ordering::Relaxed);
            }
        }
    }
}

/// The cache for `store` with a budget of `bytes` (`0`: off), its counters where
/// [`super::Store::change_counters`] says (a directory's `.versions`, or this process's memory
/// for a store owned by this manager alone); none (off) for a store that names no place, whose
/// other users this manager could not tell about its writes. A counter file that cannot be
/// opened turns the cache off with a warning; sessions work as without it.
pub fn for_store<S: super::Store + 'static>(store: &S, bytes: usize) -> Option<SessionCache> {
    if bytes == 0 {
        return None;
    }
    let versions = match store.change_counters() {
        super::ChangeCounters::Directory(dir) => Versions::open(&dir),
        super::ChangeCounters::Process => Versions::in_heap(),
        _ => return None,
    };
    match versions {
        Ok(v) => Some(SessionCache::new(v, bytes)),
        Err(e) => {
            tracing::warn!(error = %e, "session cache off: its change counters are unusable");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{SessionConfig, SessionManager};

    fn mgr(dir: &Path) -> SessionManager {
        let cfg = SessionConfig {
            fsync: false,
            ..SessionConfig::default()
        };
        SessionManager::new_embedded(dir, cfg).unwrap()
    }

    fn stored(mgr: &SessionManager, n: u64) -> SessionId {
        let mut s = mgr.create().unwrap();
        s.insert("n", &n).unwrap();
        let id = s.id().clone();
        s.commit().unwrap();
        id
    }

    fn read(mgr: &SessionManager, id: &SessionId) -> Option<u64> {
        let s = mgr.load(id.as_str()).unwrap()?;
        let n = s.get("n").unwrap();
        s.commit().unwrap();
        n
    }

    #[test]
    fn a_writer_killed_mid_write_leaves_its_bucket_uncached_until_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let m = mgr(dir.path());
        let id = stored(&m, 1);
        assert_eq!(read(&m, &id), Some(1));
        assert_eq!(read(&m, &id), Some(1));
        let hits = m.stats().cache_hits;
        assert_eq!(hits, 1);
        // Another "process" (a second mapping) begins a write and dies: no `end`.
        let other = Versions::open(&dir.path().join("sessions")).unwrap();
        let b = other.bucket(&id);
        versions::begin(other.word(b));
        for _ in 0..3 {
            assert_eq!(read(&m, &id), Some(1));
        }
        assert_eq!(
            m.stats().cache_hits,
            hits,
            "a copy validated under an odd word"
        );
        // The next write of the bucket completes the word: caching resumes.
        let mut s = m.load(id.as_str()).unwrap().unwrap();
        s.insert("n", &2u64).unwrap();
        s.commit().unwrap();
        assert_eq!(read(&m, &id), Some(2));
        assert_eq!(read(&m, &id), Some(2));
        assert_eq!(m.stats().cache_hits, hits + 1);
    }

    #[test]
    fn a_write_of_another_session_in_the_bucket_is_a_false_invalidation_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = mgr(dir.path());
        let id = stored(&m, 1);
        let v = Versions::open(&dir.path().join("sessions")).unwrap();
        let alias = loop {
            let other = stored(&m, 5);
            if v.bucket(&other) == v.bucket(&id) {
                break other;
            }
            m.delete(other.as_str()).unwrap();
        };
        assert_eq!(read(&m, &id), Some(1));
        assert_eq!(read(&m, &alias), Some(5));
        let hits = m.stats().cache_hits;
        assert_eq!(read(&m, &id), Some(1));
        assert_eq!(m.stats().cache_hits, hits + 1);
        assert!(m.delete(alias.as_str()).unwrap());
        // The alias's delete moved the shared word: a miss, and the right answer.
        assert_eq!(read(&m, &id), Some(1));
        assert_eq!(m.stats().cache_hits, hits + 1);
        assert_eq!(read(&m, &alias), None);
        assert_eq!(read(&m, &id), Some(1));
        assert_eq!(m.stats().cache_hits, hits + 2);
    }

    #[test]
    fn the_counter_file_is_created_once_and_rejected_when_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let a = Versions::open(dir.path()).unwrap();
        let b = Versions::open(dir.path()).unwrap();
        let id = SessionId::generate().unwrap();
        assert_eq!(a.bucket(&id), b.bucket(&id), "one key for every opener");
        let (_, after) = a.write(&id, Duration::from_secs(1), || Ok(())).unwrap();
        assert!(b.is_current(b.bucket(&id), after));
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join(VERSIONS_FILE), vec![0u8; file_len(BUCKETS)]).unwrap();
        assert!(matches!(Versions::open(bad.path()), Err(Error::Corrupt(_))));
    }
}
