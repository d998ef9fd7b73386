//! [`KvStore`]: sessions in an LMDB environment (through `heed`), the embedded key-value store
//! that every process on one host shares: memory-mapped, ACID, crash-safe.
//!
//! Owns: the environment in its directory (`data.mdb`, `lock.mdb`) and its two databases. It
//! takes no lock of the lock table: LMDB's own single-writer lock (a robust process-shared
//! mutex in `lock.mdb`) makes every write transaction exclusive across processes, and readers
//! never block (MVCC snapshots).
//!
//! Layout, keyed by the session ID:
//! - `meta`: 41 bytes per session, version, creation and last-accessed times, expiry rule and
//!   record size (little-endian). Metadata, touches and the expiry scan read only this, never
//!   the record.
//! - `data`: the encoded record, or for a session stored **by key** its head
//!   ([`record::Head`]: versions and sizes of the keys, no values).
//! - `values`: the values of sessions stored by key, one entry per key, keyed `ID \0 key`
//!   (`ID \1` and the SHA-256 of the key for a key too long for an LMDB key; the value's
//!   CRC covers its key, so a hash collision reads as corrupt, never as another key's value).
//!
//! A session saved whole ([`Store::save`]) is one record; [`Store::save_delta`] stores it by
//! key (converting a whole one in the same transaction) and writes only the changed values and
//! the head. [`Store::load_head`] and [`Store::load_values`] read in one read transaction each
//! (a snapshot: head and values agree), and `load` of a session stored by key joins it into a
//! whole record. `meta.size` is the stored size: the record's, or the head's plus the values'.
//!
//! `save` checks the version and writes record and metadata in **one write transaction**: the
//! compare-and-swap is atomic against every process on the directory, whatever lock table each
//! uses, so [`Capabilities::atomic_cas`] holds. `touch`, `delete` and `remove_expired` each
//! check and write in one transaction too. A process killed mid-transaction leaves the last
//! committed state (LMDB never overwrites live pages; its writer mutex is robust, so the next
//! writer recovers it). The expiry scan walks `meta` from a cursor (the last ID examined), in key
//! order, within one read snapshot per call, and `data` over the same keys (at most a batch of
//! it), so that a record without metadata, which this store never writes, is found: it reads as
//! [`Error::SessionCorrupt`] (as metadata without a record does) and gc deletes it.
//!
//! The directory also holds the hot-session cache's change counters (`.versions`, owned by
//! `session/cache.rs`; [`Store::change_counters`] names the directory), so every process on it
//! caches sessions and sees every other's writes.
//!
//! May not touch: the lock table, the record format (beyond splitting and joining records and
//! heads through `record.rs`), `.versions`, or any other file of its directory except through
//! LMDB.

use super::{
    record_of_split, split_record, touch_refusal, Capabilities, ChangedValue, Cutoffs, ExpiredScan,
    Expiry, SessionMeta, Store, Stored, StoredHead, StoredSession, Timestamp, Touch,
};
use crate::session::id::SessionId;
use crate::session::record;
use crate::{Error, Result};
use heed::types::{Bytes, DecodeIgnore};
use heed::{Database, Env, EnvOpenOptions, WithoutTls};
use parking_lot::Mutex;
use std::ops::Bound;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

const META_LEN: usize = 41;
/// Longest key of a session kept inline in its value's LMDB key (LMDB's limit is 511 bytes,
/// with the ID and a separator in front).
const MAX_INLINE_KEY: usize = 400;

/// Settings of a [`KvStore`], fixed when its environment is opened.
#[derive(Debug, Clone)]
pub struct KvOptions {
    /// Size of the memory map, the most the environment can hold. Address space only: the file
    /// grows with the data. Default 1 GiB.
    pub map_size: usize,
    /// Durable commits (default `true`): each write transaction is flushed to disk before it
    /// returns. With `false`, a process crash still loses nothing committed, but a power loss
    /// may lose the latest commits.
    pub fsync: bool,
    /// Most reading threads of all processes at once (LMDB's reader table). Default 1,024.
    pub max_readers: u32,
}

impl Default for KvOptions {
    fn default() -> Self {
        KvOptions {
            map_size: 1 << 30,
            fsync: true,
            max_readers: 1024,
        }
    }
}

type Raw = Database<Bytes, Bytes>;

/// A [`Store`] in an LMDB environment shared by processes; see the module docs.
///
/// ```
/// use locktable::session::{KvStore, SessionConfig, SessionManager};
/// use locktable::{LockTable, TableOptions};
/// let dir = tempfile::tempdir().unwrap();
/// let table = LockTable::open(dir.path().join("locks.table"), &TableOptions::default()).unwrap();
/// let store = KvStore::open(dir.path().join("sessions.kv")).unwrap();
/// let mgr = SessionManager::new(table, store, SessionConfig::default());
/// let mut s = mgr.create().unwrap();
/// s.insert("k", &1).unwrap();
/// let id = s.id().to_string();
/// s.commit().unwrap();
/// assert!(mgr.load(&id).unwrap().is_some());
/// ```
pub struct KvStore {
    shared: Arc<Shared>,
    /// The last ID the expiry scan examined (the next call resumes after it).
    cursor: Mutex<Option<Vec<u8>>>,
}

/// One open environment, shared by every `KvStore` of this process on its directory (LMDB
/// allows one environment per file per process; heed refuses a second open).
struct Shared {
    env: Env<WithoutTls>,
    meta: Raw,
    data: Raw,
    values: Raw,
    dir: PathBuf,
    /// The fork epoch the environment was opened in: LMDB forbids using it after `fork()`.
    fork_epoch: u64,
}

/// The environments open in this process, by canonical directory.
static OPEN: Mutex<Vec<(PathBuf, Weak<Shared>)>> = Mutex::new(Vec::new());

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// An LMDB failure as this crate's error: I/O stays I/O, LMDB's own errors (a full map, a full
/// reader table, a corrupt file) become [`Error::Io`] naming the operation.
fn lmdb(op: &'static str) -> impl Fn(heed::Error) -> Error {
    move |e| match e {
        heed::Error::Io(io) => Error::Io(io),
        other => Error::Io(std::io::Error::other(format!("lmdb {op}: {other}"))),
    }
}

fn encode_meta(m: &SessionMeta) -> [u8; META_LEN] {
    let (tag, arg) = match m.expiry {
        Expiry::Default => (0u8, 0u64),
        Expiry::Idle(d) => (1, d.as_millis().min(u128::from(u64::MAX)) as u64),
        Expiry::At(t) => (2, t.0),
    };
    let mut out = [0u8; META_LEN];
    out[0..8].copy_from_slice(&m.version.to_le_bytes());
    out[8..16].copy_from_slice(&m.created.0.to_le_bytes());
    out[16..24].copy_from_slice(&m.last_accessed.0.to_le_bytes());
    out[24] = tag;
    out[25..33].copy_from_slice(&arg.to_le_bytes());
    out[33..41].copy_from_slice(&m.size.to_le_bytes());
    out
}

fn decode_meta(b: &[u8]) -> Result<SessionMeta> {
    if b.len() != META_LEN {
        return Err(Error::SessionCorrupt(format!(
            "kv metadata of {} bytes, expected {META_LEN}",
            b.len()
        )));
    }
    let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let expiry = match b[24] {
        0 => Expiry::Default,
        1 => Expiry::Idle(Duration::from_millis(u(25))),
        2 => Expiry::At(Timestamp(u(25))),
        t => {
            return Err(Error::SessionCorrupt(format!(
                "kv metadata with expiry tag {t}"
            )))
        }
    };
    Ok(SessionMeta {
        version: u(0),
        created: Timestamp(u(8)),
        last_accessed: Timestamp(u(16)),
        expiry,
        size: u(33),
    })
}

impl KvStore {
    /// Opens (creating if needed) the environment in directory `dir` with default options. Any
    /// number of processes and stores may share `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<KvStore> {
        Self::open_with(dir, &KvOptions::default())
    }

    /// Opens the environment in `dir` with `opts`. Within one process, a second open of the
    /// same directory shares the first one's environment (it must then use the same options).
    pub fn open_with(dir: impl AsRef<Path>, opts: &KvOptions) -> Result<KvStore> {
        let dir = dir.as_ref().to_path_buf();
        // Session IDs are bearer secrets: the environment is private to its owner.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let dir = dir.canonicalize()?;
        let mut open = OPEN.lock();
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(shared) = open
            .iter()
            .find(|(d, _)| *d == dir)
            .and_then(|(_, w)| w.upgrade())
        {
            if shared.fork_epoch == crate::fork::epoch() {
                return Ok(KvStore {
                    shared,
                    cursor: Mutex::new(None),
                });
            }
        }
        let shared = Arc::new(Shared::open(dir.clone(), opts)?);
        open.push((dir, Arc::downgrade(&shared)));
        Ok(KvStore {
            shared,
            cursor: Mutex::new(None),
        })
    }

    /// The environment's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Shared {
    fn open(dir: PathBuf, opts: &KvOptions) -> Result<Shared> {
        let mut builder = EnvOpenOptions::new().read_txn_without_tls();
        builder
            .map_size(opts.map_size)
            .max_dbs(3)
            .max_readers(opts.max_readers);
        if !opts.fsync {
            // NO_SYNC only gives up durability against power loss (LMDB still writes
            // copy-on-write pages and a meta page, so no crash of a process tears anything);
            // it is not one of the flags that break LMDB's locking (NO_LOCK).
            // SAFETY: sound for the reasons just given.
            unsafe {
                builder.flags(heed::EnvFlags::NO_SYNC);
            }
        }
        let mut tries = 0;
        let env = loop {
            // the files are LMDB's own, used only through LMDB with its locking on;
            // this process opens each directory once (`OPEN`, and heed refuses a second open),
            // and the environment is never used in a forked child (`check_fork`).
            // SAFETY: sound for the reasons just given.
            match unsafe { builder.open(&dir) } {
                Ok(env) => break env,
                // The last store of this directory may be closing its environment right now:
                // that takes microseconds, so wait a little before calling it a conflict.
                Err(heed::Error::EnvAlreadyOpened) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(heed::Error::EnvAlreadyOpened) => {
                    return Err(Error::Io(std::io::Error::other(
                        "lmdb open: this directory's environment is still open in this process \
                         (inherited across fork()?): open the KvStore after forking, in the \
                         process that uses it",
                    )))
                }
                Err(e) => return Err(lmdb("open")(e)),
            }
        };
        let mut wtxn = env.write_txn().map_err(lmdb("open"))?;
        let meta = env
            .create_database(&mut wtxn, Some("meta"))
            .map_err(lmdb("open"))?;
        let data = env
            .create_database(&mut wtxn, Some("data"))
            .map_err(lmdb("open"))?;
        let values = env
            .create_database(&mut wtxn, Some("values"))
            .map_err(lmdb("open"))?;
        wtxn.commit().map_err(lmdb("open"))?;
        // Reader slots of processes that died with a read transaction open are reclaimed now
        // (LMDB also does it when the reader table fills up).
        env.clear_stale_readers().map_err(lmdb("open"))?;
        Ok(Shared {
            env,
            meta,
            data,
            values,
            dir,
            fork_epoch: crate::fork::epoch(),
        })
    }
}

impl KvStore {
    fn check_fork(&self) -> Result<()> {
        if crate::fork::epoch() != self.shared.fork_epoch {
            return Err(Error::ForkedChild);
        }
        Ok(())
    }

    fn meta_in(
        &self,
        txn: &heed::RoTxn<'_, WithoutTls>,
        id: &SessionId,
    ) -> Result<Option<SessionMeta>> {
        let key = id.as_str().as_bytes();
        match self.shared.meta.get(txn, key).map_err(lmdb("read"))? {
            // A record without metadata was not written by this store (saves and deletes write
            // both in one transaction): unreadable, so that the corruption policy and gc
            // delete it instead of leaving it invisible for ever.
            None if self.record_in(txn, key)? => {
                Err(Error::SessionCorrupt("kv record without metadata".into()))
            }
            None => Ok(None),
            Some(b) => decode_meta(b).map(Some),
        }
    }

    /// Whether `data` holds an entry at `key`, without reading the record.
    fn record_in(&self, txn: &heed::RoTxn<'_, WithoutTls>, key: &[u8]) -> Result<bool> {
        Ok(self
            .shared
            .data
            .remap_data_type::<DecodeIgnore>()
            .get(txn, key)
            .map_err(lmdb("read"))?
            .is_some())
    }

    /// Runs `f` in one write transaction and commits it when `f` returns `Ok`.
    fn write<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut heed::RwTxn<'_>) -> Result<R>,
    ) -> Result<R> {
        self.check_fork()?;
        let mut wtxn = self.shared.env.write_txn().map_err(lmdb(op))?;
        let r = f(&mut wtxn)?;
        wtxn.commit().map_err(lmdb(op))?;
        Ok(r)
    }

    fn remove_in(&self, wtxn: &mut heed::RwTxn<'_>, id: &SessionId) -> Result<bool> {
        let key = id.as_str().as_bytes();
        let had_meta = self.shared.meta.delete(wtxn, key).map_err(lmdb("delete"))?;
        let had_data = self.shared.data.delete(wtxn, key).map_err(lmdb("delete"))?;
        self.remove_values_in(wtxn, id)?;
        Ok(had_meta || had_data)
    }

    /// Deletes every stored value of `id` (`ID \0 ...` and `ID \1 ...`).
    fn remove_values_in(&self, wtxn: &mut heed::RwTxn<'_>, id: &SessionId) -> Result<()> {
        let (mut lo, mut hi) = (
            id.as_str().as_bytes().to_vec(),
            id.as_str().as_bytes().to_vec(),
        );
        lo.push(0);
        hi.push(2);
        let range = (Bound::Included(&lo[..]), Bound::Excluded(&hi[..]));
        self.shared
            .values
            .delete_range(wtxn, &range)
            .map_err(lmdb("delete"))?;
        Ok(())
    }

    /// The record or head of `id` and its metadata, checked against `max_size`, in `txn`.
    fn entry_in<'t>(
        &self,
        txn: &'t heed::RoTxn<'_, WithoutTls>,
        id: &SessionId,
        max_size: usize,
    ) -> Result<Option<(SessionMeta, &'t [u8])>> {
        let Some(meta) = self.meta_in(txn, id)? else {
            return Ok(None);
        };
        if meta.size > max_size as u64 {
            return Err(Error::TooLarge {
                size: usize::try_from(meta.size).unwrap_or(usize::MAX),
                limit: max_size,
            });
        }
        let Some(bytes) = self
            .shared
            .data
            .get(txn, id.as_str().as_bytes())
            .map_err(lmdb("read"))?
        else {
            return Err(Error::SessionCorrupt("kv metadata without a record".into()));
        };
        if !record::is_head(bytes) && bytes.len() as u64 != meta.size {
            return Err(Error::SessionCorrupt(
                "kv record size disagrees with its metadata".into(),
            ));
        }
        Ok(Some((meta, bytes)))
    }

    /// The stored values of the live keys of a session stored by key (`head`), in `txn`.
    fn values_in(
        &self,
        txn: &heed::RoTxn<'_, WithoutTls>,
        id: &SessionId,
        head: &[u8],
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>> {
        let head = record::decode_head(head, usize::MAX)?;
        let mut out = std::collections::BTreeMap::new();
        for k in head.live_keys() {
            if let Some(v) = self.value_in(txn, id, k)? {
                out.insert(k.to_owned(), v.to_vec());
            }
        }
        Ok(out)
    }

    fn value_in<'t>(
        &self,
        txn: &'t heed::RoTxn<'_, WithoutTls>,
        id: &SessionId,
        key: &str,
    ) -> Result<Option<&'t [u8]>> {
        self.shared
            .values
            .get(txn, &value_key(id, key))
            .map_err(lmdb("read"))
    }
}

/// The LMDB key of one value of a session stored by key.
fn value_key(id: &SessionId, key: &str) -> Vec<u8> {
    let mut k = id.as_str().as_bytes().to_vec();
    if key.len() <= MAX_INLINE_KEY {
        k.push(0);
        k.extend_from_slice(key.as_bytes());
    } else {
        // SHA-256, not a keyed hash with a key in the source: keys may come from users, and
        // with a public key anyone could choose two keys that share one entry.
        use sha2::Digest;
        k.push(1);
        k.extend_from_slice(&sha2::Sha256::digest(key.as_bytes()));
    }
    k
}

impl Store for KvStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, false, true).with_per_key(true)
    }

    fn change_counters(&self) -> super::ChangeCounters {
        super::ChangeCounters::Directory(self.shared.dir.clone())
    }

    fn load(&self, id: &SessionId, max_size: usize) -> Result<Option<StoredSession>> {
        self.check_fork()?;
        // One snapshot: metadata, record (or head) and values agree.
        let rtxn = self.shared.env.read_txn().map_err(lmdb("read"))?;
        let Some((meta, bytes)) = self.entry_in(&rtxn, id, max_size)? else {
            return Ok(None);
        };
        if record::is_head(bytes) {
            let values = self.values_in(&rtxn, id, bytes)?;
            return record_of_split(meta, bytes, &values).map(Some);
        }
        Ok(Some(StoredSession {
            meta,
            bytes: bytes.to_vec(),
        }))
    }

    fn load_head(
        &self,
        id: &SessionId,
        max_size: usize,
        values_up_to: u64,
    ) -> Result<Option<Stored>> {
        self.check_fork()?;
        let rtxn = self.shared.env.read_txn().map_err(lmdb("read"))?;
        let Some((meta, bytes)) = self.entry_in(&rtxn, id, max_size)? else {
            return Ok(None);
        };
        if !record::is_head(bytes) {
            return Ok(Some(Stored::Whole(StoredSession {
                meta,
                bytes: bytes.to_vec(),
            })));
        }
        let values = if meta.size <= values_up_to {
            Some(self.values_in(&rtxn, id, bytes)?.into_iter().collect())
        } else {
            None
        };
        Ok(Some(Stored::ByKey(StoredHead {
            meta,
            head: bytes.to_vec(),
            values,
        })))
    }

    fn load_values(
        &self,
        id: &SessionId,
        version: u64,
        keys: &[&str],
    ) -> Result<Option<Vec<Option<Vec<u8>>>>> {
        self.check_fork()?;
        let rtxn = self.shared.env.read_txn().map_err(lmdb("read"))?;
        let Some((meta, bytes)) = self.entry_in(&rtxn, id, usize::MAX)? else {
            return Ok(None);
        };
        if meta.version != version {
            return Ok(None);
        }
        if !record::is_head(bytes) {
            // Saved whole (a copy by `cycle_id`, or an older layout): split it.
            let values: std::collections::BTreeMap<_, _> =
                split_record(bytes)?.1.into_iter().collect();
            return Ok(Some(keys.iter().map(|k| values.get(*k).cloned()).collect()));
        }
        let out = keys
            .iter()
            .map(|k| Ok(self.value_in(&rtxn, id, k)?.map(<[u8]>::to_vec)))
            .collect::<Result<_>>()?;
        Ok(Some(out))
    }

    fn save_delta(
        &self,
        id: &SessionId,
        expected: Option<u64>,
        new: &StoredHead,
        changed: &[ChangedValue],
    ) -> Result<bool> {
        self.write("save", |wtxn| {
            let current = match self.meta_in(wtxn, id) {
                Ok(m) => m,
                Err(Error::SessionCorrupt(_)) => return Ok(false),
                Err(e) => return Err(e),
            };
            if current.map(|m| m.version) != expected {
                return Ok(false);
            }
            let key = id.as_str().as_bytes();
            if current.is_some() {
                let whole = match self.shared.data.get(wtxn, key).map_err(lmdb("save"))? {
                    Some(b) if !record::is_head(b) => Some(b.to_vec()),
                    _ => None,
                };
                if let Some(whole) = whole {
                    // Stored whole so far: from now on by key, every value written once.
                    for (k, v) in split_record(&whole)?.1 {
                        self.shared
                            .values
                            .put(wtxn, &value_key(id, &k), &v)
                            .map_err(lmdb("save"))?;
                    }
                }
            }
            for (k, v) in changed {
                let vk = value_key(id, k);
                match v {
                    Some(v) => self.shared.values.put(wtxn, &vk, v),
                    None => self.shared.values.delete(wtxn, &vk).map(|_| ()),
                }
                .map_err(lmdb("save"))?;
            }
            let mut meta = new.meta;
            if let Some(c) = current {
                meta.last_accessed = meta.last_accessed.max(c.last_accessed);
            }
            self.shared
                .data
                .put(wtxn, key, &new.head)
                .map_err(lmdb("save"))?;
            self.shared
                .meta
                .put(wtxn, key, &encode_meta(&meta))
                .map_err(lmdb("save"))?;
            Ok(true)
        })
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        self.write("save", |wtxn| {
            let current = match self.meta_in(wtxn, id) {
                Ok(m) => m,
                // Unreadable metadata never matches: delete the session first.
                Err(Error::SessionCorrupt(_)) => return Ok(false),
                Err(e) => return Err(e),
            };
            if current.map(|m| m.version) != expected {
                return Ok(false);
            }
            let mut meta = new.meta;
            meta.size = new.bytes.len() as u64;
            if let Some(c) = current {
                meta.last_accessed = meta.last_accessed.max(c.last_accessed);
            }
            let key = id.as_str().as_bytes();
            // Saved whole: any values it had by key are dropped.
            self.remove_values_in(wtxn, id)?;
            self.shared
                .data
                .put(wtxn, key, &new.bytes)
                .map_err(lmdb("save"))?;
            self.shared
                .meta
                .put(wtxn, key, &encode_meta(&meta))
                .map_err(lmdb("save"))?;
            Ok(true)
        })
    }

    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        self.check_fork()?;
        let rtxn = self.shared.env.read_txn().map_err(lmdb("read"))?;
        self.meta_in(&rtxn, id)
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> Result<Touch> {
        let fresh = at.saturating_sub(coalesce);
        // The common, coalesced case reads a snapshot and takes no writer lock.
        match self.meta(id)? {
            None => return Ok(Touch::Missing),
            Some(m) if m.last_accessed >= fresh => return Ok(Touch::Skipped),
            Some(_) => {}
        }
        self.write("touch", |wtxn| {
            let Some(mut m) = self.meta_in(wtxn, id)? else {
                return Ok(Touch::Missing);
            };
            if let Some(refused) = touch_refusal(&m, at, coalesce, cutoffs) {
                return Ok(refused);
            }
            m.last_accessed = at;
            self.shared
                .meta
                .put(wtxn, id.as_str().as_bytes(), &encode_meta(&m))
                .map_err(lmdb("touch"))?;
            Ok(Touch::Written)
        })
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        self.write("delete", |wtxn| self.remove_in(wtxn, id))
    }

    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool> {
        self.write("remove_expired", |wtxn| match self.meta_in(wtxn, id)? {
            Some(m) if cutoffs.meta_expired(&m) => self.remove_in(wtxn, id),
            _ => Ok(false),
        })
    }

    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> Result<ExpiredScan> {
        self.check_fork()?;
        let rtxn = self.shared.env.read_txn().map_err(lmdb("scan"))?;
        let mut cursor = self.cursor.lock();
        let start: Bound<&[u8]> = match cursor.as_deref() {
            Some(last) => Bound::Excluded(last),
            None => Bound::Unbounded,
        };
        let mut scan = ExpiredScan::default();
        let mut last: Option<Vec<u8>> = None;
        let range = (start, Bound::Unbounded);
        for entry in self
            .shared
            .meta
            .range(&rtxn, &range)
            .map_err(lmdb("scan"))?
        {
            if scan.examined == budget {
                scan.more = true;
                break;
            }
            let (key, value) = match entry {
                Ok(kv) => kv,
                Err(e) => {
                    tracing::warn!(error = %e, "session gc: kv entry unreadable, scan ends here");
                    scan.unreadable += 1;
                    break;
                }
            };
            scan.examined += 1;
            last = Some(key.to_vec());
            let Some(id) = std::str::from_utf8(key)
                .ok()
                .and_then(|k| SessionId::parse(k).ok())
            else {
                // Not written by this store: skipped, and counted as unreadable.
                scan.unreadable += 1;
                continue;
            };
            match decode_meta(value) {
                Ok(m) if cutoffs.meta_expired(&m) => scan.expired.push(id),
                Ok(_) => {}
                Err(_) => scan.corrupt.push(id),
            }
        }
        // Records without metadata (another program's) are not in `meta`: walk `data` over the
        // same stretch of keys, at most `budget` entries of it (keys and small records only:
        // LMDB hands out a large record without reading it), and offer each orphan to gc as
        // corrupt. Where that walk stops short, the next call resumes there.
        let end = match (&last, scan.more) {
            (Some(l), true) => Bound::Included(&l[..]),
            _ => Bound::Unbounded,
        };
        let mut walked_last: Option<Vec<u8>> = None;
        let mut cut_short = false;
        for (walked, entry) in self
            .shared
            .data
            .remap_data_type::<DecodeIgnore>()
            .range(&rtxn, &(start, end))
            .map_err(lmdb("scan"))?
            .enumerate()
        {
            let key = match entry {
                Ok((key, ())) => key,
                Err(e) => {
                    tracing::warn!(error = %e, "session gc: kv entry unreadable, scan ends here");
                    scan.unreadable += 1;
                    break;
                }
            };
            if walked == budget {
                cut_short = true;
                break;
            }
            walked_last = Some(key.to_vec());
            if self
                .shared
                .meta
                .get(&rtxn, key)
                .map_err(lmdb("scan"))?
                .is_some()
            {
                continue;
            }
            scan.examined += 1;
            match std::str::from_utf8(key)
                .ok()
                .and_then(|k| SessionId::parse(k).ok())
            {
                Some(id) => scan.corrupt.push(id),
                None => scan.unreadable += 1,
            }
        }
        // A full pass restarts from the first key; otherwise resume after the last one seen
        // (of `data` if its walk stopped short: the metadata after it is examined again).
        *cursor = if cut_short {
            scan.more = true;
            walked_last
        } else if scan.more {
            last
        } else {
            None
        };
        Ok(scan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// heed refuses a second environment on one path in a process: stores of one directory,
    /// opened and dropped by several threads at once, share one and never get that refusal.
    /// (The window in which a drop is still closing the environment is too short for this test
    /// to hit reliably; the retry in `Shared::open` covers it.)
    #[test]
    fn stores_of_one_directory_open_and_close_concurrently() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..50 {
                        let s = KvStore::open(dir.path()).unwrap();
                        assert!(s.meta(&SessionId::generate().unwrap()).unwrap().is_none());
                    }
                });
            }
        });
    }

    /// Damaged metadata is `SessionCorrupt` for readers, offered to gc as corrupt, never
    /// matched by a save, and deletable.
    #[test]
    fn corrupt_metadata_is_reported_and_deletable() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(dir.path()).unwrap();
        let id = SessionId::generate().unwrap();
        let mut wtxn = store.shared.env.write_txn().unwrap();
        store
            .shared
            .meta
            .put(&mut wtxn, id.as_str().as_bytes(), b"junk")
            .unwrap();
        wtxn.commit().unwrap();
        let cut = Cutoffs {
            now: Timestamp(10),
            idle_timeout: Duration::from_secs(1),
            max_lifetime: Duration::from_secs(1),
        };
        assert!(matches!(
            store.load(&id, 1 << 20),
            Err(Error::SessionCorrupt(_))
        ));
        assert!(matches!(store.meta(&id), Err(Error::SessionCorrupt(_))));
        assert!(matches!(
            store.touch(&id, Timestamp(5), Duration::ZERO, &cut),
            Err(Error::SessionCorrupt(_))
        ));
        assert_eq!(
            store.scan_expired(&cut, 10).unwrap().corrupt,
            vec![id.clone()]
        );
        let rec = StoredSession {
            meta: SessionMeta {
                version: 1,
                created: Timestamp(1),
                last_accessed: Timestamp(1),
                expiry: Expiry::Default,
                size: 1,
            },
            bytes: vec![b'x'],
        };
        assert!(!store.save(&id, None, &rec).unwrap());
        assert!(store.delete(&id).unwrap());
        assert!(store.meta(&id).unwrap().is_none());
    }

    /// A record (`data`) without metadata, planted by another program: `SessionCorrupt` for
    /// readers, found by gc's scan (a batch at a time) and deleted by it; other sessions stay.
    #[test]
    fn a_record_without_metadata_is_corrupt_and_collected() {
        use crate::session::{SessionConfig, SessionManager};
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(dir.path()).unwrap();
        let mgr = SessionManager::new(
            crate::LockTable::anonymous(&crate::TableOptions::default()).unwrap(),
            KvStore::open(dir.path()).unwrap(),
            SessionConfig {
                gc_batch: 2,
                ..SessionConfig::default()
            },
        );
        let mut live = mgr.create().unwrap();
        live.insert("n", &1).unwrap();
        let live_id = live.id().as_str().to_owned();
        live.commit().unwrap();
        let orphans: Vec<SessionId> = (0..5).map(|_| SessionId::generate().unwrap()).collect();
        let mut wtxn = store.shared.env.write_txn().unwrap();
        for id in &orphans {
            store
                .shared
                .data
                .put(&mut wtxn, id.as_str().as_bytes(), b"junk")
                .unwrap();
        }
        wtxn.commit().unwrap();
        let id = &orphans[0];
        assert!(matches!(store.meta(id), Err(Error::SessionCorrupt(_))));
        assert!(matches!(
            store.load(id, 1 << 20),
            Err(Error::SessionCorrupt(_))
        ));
        let cut = SessionConfig::default().cutoffs(Timestamp(10));
        let scan = store.scan_expired(&cut, 2).unwrap();
        assert!(scan.corrupt.len() <= 2 && scan.more, "bounded: {scan:?}");
        // gc, called while it says there is more, deletes every one of them.
        let mut collected = 0;
        for _ in 0..20 {
            let r = mgr.gc().unwrap();
            collected += r.corrupt;
            if !r.more {
                break;
            }
        }
        assert_eq!(collected, orphans.len());
        let rtxn = store.shared.env.read_txn().unwrap();
        for id in &orphans {
            let left = store
                .shared
                .data
                .get(&rtxn, id.as_str().as_bytes())
                .unwrap();
            assert!(left.is_none());
        }
        drop(rtxn);
        let s = mgr
            .load(&live_id)
            .unwrap()
            .expect("the other session stays");
        assert_eq!(s.get::<i32>("n").unwrap(), Some(1));
    }

    #[test]
    fn metadata_round_trips_for_every_expiry_rule() {
        for expiry in [
            Expiry::Default,
            Expiry::Idle(Duration::from_millis(1234)),
            Expiry::At(Timestamp(u64::MAX)),
        ] {
            let m = SessionMeta {
                version: u64::MAX - 1,
                created: Timestamp(7),
                last_accessed: Timestamp(9),
                expiry,
                size: 42,
            };
            assert_eq!(decode_meta(&encode_meta(&m)).unwrap(), m);
        }
        assert!(matches!(
            decode_meta(&[0; 3]),
            Err(Error::SessionCorrupt(_))
        ));
        let mut bad = encode_meta(&SessionMeta {
            version: 1,
            created: Timestamp(1),
            last_accessed: Timestamp(1),
            expiry: Expiry::Default,
            size: 1,
        });
        bad[24] = 9;
        assert!(matches!(decode_meta(&bad), Err(Error::SessionCorrupt(_))));
    }
    /// Keys of any bytes and length, stored by key: a key too long for an LMDB key is hashed,
    /// and each value is still read under its own key; deleting the session deletes them all.
    #[test]
    fn hostile_and_long_keys_are_stored_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(dir.path()).unwrap();
        let long = "k".repeat(5000);
        let keys = ["a", "a\0b", "\0", long.as_str(), "\u{1F600}\n"];
        let mut r = record::Record {
            version: 1,
            created: 1,
            expiry: Expiry::Default,
            body: Default::default(),
        };
        for (i, k) in keys.iter().enumerate() {
            r.body.data.insert((*k).into(), i.into());
            r.body.changed.insert((*k).into(), 1);
        }
        let (head, values) = record::split(&r).unwrap();
        let bytes = record::encode_head(&head).unwrap();
        let new = StoredHead {
            meta: SessionMeta {
                version: 1,
                created: Timestamp(1),
                last_accessed: Timestamp(1),
                expiry: Expiry::Default,
                size: bytes.len() as u64 + head.values_size(),
            },
            head: bytes,
            values: None,
        };
        let changed: Vec<ChangedValue> = values.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let id = SessionId::generate().unwrap();
        assert!(store.save_delta(&id, None, &new, &changed).unwrap());
        let got = store.load_values(&id, 1, &keys).unwrap().unwrap();
        for (i, (k, v)) in keys.iter().zip(got).enumerate() {
            let v = record::decode_value(k, &head.keys[*k], &v.unwrap()).unwrap();
            assert_eq!(v, serde_json::Value::from(i));
        }
        let whole = store.load(&id, 1 << 20).unwrap().unwrap();
        assert_eq!(record::decode(&whole.bytes, 1 << 20).unwrap(), r);
        assert!(store.delete(&id).unwrap());
        let rtxn = store.shared.env.read_txn().unwrap();
        assert_eq!(
            store.shared.values.len(&rtxn).unwrap(),
            0,
            "no value left behind"
        );
    }
}
