//! [`FileStore`]: one file per session in sharded directories.
//!
//! Owns: the files under its root. It takes no lock of the lock table: its compare-and-swap is
//! made atomic by locks of its own (below), so it holds whatever lock tables its users have.
//!
//! Layout: `<root>/<first two ID characters>/<ID>` holds the encoded record; the file's
//! modification time is the session's last-accessed time, so a touch changes metadata only and
//! never rewrites data. The record's header (first line, at most
//! [`record::MAX_HEADER_LEN`] bytes) holds its version, creation time and expiry rule, so
//! metadata costs one small read, never the whole record. A save writes a unique temporary file
//! `.tmp.<ID>.<random>` in the same directory, fsyncs it, renames it over the record and fsyncs
//! the directory: a crash leaves the old or the new record, never a torn one, plus at most a
//! temporary file that `delete`, `remove_expired`, the expiry scan or [`Store::cleanup`] removes.
//!
//! A session stored **by key** ([`Store::save_delta`]) is one file too: its head
//! ([`record::Head`], `LTH1`: versions and sizes of the keys) followed by the values of its live
//! keys in key order, so each value's offset follows from the head. [`Store::load_head`] reads
//! the head only and [`Store::load_values`] one `pread` per value, from one open file (a file is
//! replaced whole by a rename, so an open file is one version: the version in its header is
//! checked, and a request never mixes versions). A commit still writes the whole file (one
//! rename is what makes a save atomic): it copies the unchanged values from the current file
//! without decoding them. A file holding a whole record (`LTS2`, `LTS1`) is still read; a
//! program older than this layout reads an `LTH1` file as an unknown format.
//!
//! Saves, touches and deletes of one session serialize on a short *ID lock*: an OFD lock on one
//! byte (chosen by a hash of the ID) of `<root>/.locks`, plus a process-local mutex for the
//! threads sharing this store's descriptor (OFD locks do not exclude each other within one open
//! file description). OFD locks are released by the kernel when a process dies, and the
//! descriptor is closed in a forked child. Every process on the root therefore excludes every
//! other, whatever lock table it was given, which is why [`Capabilities::atomic_cas`] holds.

use super::{
    record_of_split, split_record, touch_refusal, values_of_whole, Capabilities, ChangedValue,
    Cutoffs, ExpiredScan, SessionMeta, Store, Stored, StoredHead, StoredSession, Timestamp, Touch,
};
use crate::fork::{self, AttachWindow, ForkSafeFile};
use crate::registry::ofd_lock;
use crate::session::id::{SessionId, ID_LEN};
use crate::session::record;
use crate::{Error, Result};
use parking_lot::{Mutex, MutexGuard};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

const TMP_PREFIX: &str = ".tmp.";
const LOCK_FILE: &str = ".locks";
/// ID locks hash onto this many bytes of the lock file (a collision only makes two sessions
/// share a microsecond-long lock).
const LOCK_BYTES: u64 = 1 << 16;
/// Process-local stripes in front of the OFD locks.
const STRIPES: usize = 256;

/// A [`Store`] keeping one file per session; see the module docs for the layout.
///
/// ```
/// use locktable::session::{FileStore, SessionConfig, SessionManager};
/// use locktable::{LockTable, TableOptions};
/// let dir = tempfile::tempdir().unwrap();
/// let table = LockTable::anonymous(&TableOptions::default()).unwrap();
/// let store = FileStore::open(dir.path()).unwrap();
/// let mgr = SessionManager::new(table, store, SessionConfig::default());
/// let mut s = mgr.create().unwrap();
/// s.insert("k", &1).unwrap();
/// let id = s.id().to_string();
/// s.commit().unwrap();
/// assert!(mgr.load(&id).unwrap().is_some());
/// ```
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    locks: LockFile,
    max_file_size: u64,
    temp_grace: Duration,
    lock_timeout: Duration,
    /// Where the next expiry scan resumes: shard index and last name examined in it.
    scan_cursor: Mutex<(usize, Option<String>)>,
    /// fsync temp files and directories (see [`FileStore::with_fsync`]).
    fsync: bool,
    /// Shard directories whose entry in the root this store has fsynced.
    synced_shards: Mutex<std::collections::HashSet<PathBuf>>,
    /// Test hook: the next directory fsync after a rename fails.
    #[cfg(test)]
    fail_dir_sync: std::sync::atomic::AtomicBool,
}

/// `<root>/.locks` and the local stripes in front of its OFD locks.
struct LockFile {
    file: ForkSafeFile,
    stripes: Vec<Mutex<()>>,
}

impl std::fmt::Debug for LockFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockFile")
    }
}

/// One held ID lock; released on drop.
struct IdLock<'a> {
    file: &'a File,
    byte: i64,
    _stripe: MutexGuard<'a, ()>,
}

impl Drop for IdLock<'_> {
    fn drop(&mut self) {
        // An unlock of a lock we hold cannot fail for a reason we could act on.
        let _ = ofd_lock(self.file, self.byte, libc::F_UNLCK, false);
    }
}

fn lock_byte(id: &SessionId) -> u64 {
    // FNV-1a: IDs are random already; this only spreads them over the bytes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_str().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h % LOCK_BYTES
}

impl LockFile {
    fn open(root: &Path) -> Result<LockFile> {
        // No fork between opening the descriptor and registering it for closing in children.
        let _window = AttachWindow::enter();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(root.join(LOCK_FILE))?;
        Ok(LockFile {
            file: ForkSafeFile::new(f),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Takes the ID lock of `id`, waiting at most `timeout`.
    fn lock(&self, id: &SessionId, timeout: Duration) -> Result<IdLock<'_>> {
        if fork::epoch() != self.file.epoch() {
            return Err(Error::ForkedChild);
        }
        let deadline = crate::session::locks::instant_after(timeout);
        let byte = lock_byte(id);
        let stripe = self.stripes[(byte as usize) % STRIPES]
            .try_lock_until(deadline)
            .ok_or(Error::Timeout)?;
        let mut pause = Duration::from_micros(20);
        loop {
            if ofd_lock(&self.file, byte as i64, libc::F_WRLCK, false)? {
                return Ok(IdLock {
                    file: &self.file,
                    byte: byte as i64,
                    _stripe: stripe,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn mtime(md: &fs::Metadata) -> Timestamp {
    md.modified()
        .map(Timestamp::from_system_time)
        .unwrap_or_default()
}

fn is_shard_name(name: &str) -> bool {
    name.len() == 2
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn not_found<T>(r: std::io::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens a record file for reading without blocking on what is not one: `open(2)` of a FIFO
/// waits for a writer, so a FIFO named like a session (planted by another program) would hang
/// every call that opens it, gc included. `O_NONBLOCK` has no effect on a regular file; callers
/// refuse anything else ([`regular`]).
fn open_record(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// `md` if it describes a regular file; anything else named like a session (a directory, a
/// FIFO, a device) is an I/O error: not a record, and not this store's to delete as corrupt.
fn regular(md: fs::Metadata) -> Result<fs::Metadata> {
    if md.is_file() {
        Ok(md)
    } else {
        Err(std::io::Error::other("not a regular file").into())
    }
}

/// The metadata of an open record file: `fstat` plus its header (one small read).
fn meta_of(f: &File) -> Result<SessionMeta> {
    let md = regular(f.metadata()?)?;
    let mut head = [0u8; record::MAX_HEADER_LEN];
    let mut n = 0;
    let mut r = f;
    while n < head.len() {
        match r.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let h = record::peek_header(&head[..n])?;
    Ok(SessionMeta {
        version: h.version,
        created: Timestamp(h.created),
        last_accessed: mtime(&md),
        expiry: h.expiry,
        size: md.len(),
    })
}

/// Reads exactly `len` bytes at `offset` (a file too short for what its head says is corrupt).
fn read_at(f: &File, offset: u64, len: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(len).map_err(|_| Error::SessionCorrupt("bad length".into()))?;
    let mut buf = vec![0; len];
    match f.read_exact_at(&mut buf, offset) {
        Ok(()) => Ok(buf),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(Error::SessionCorrupt(
            "file shorter than its head says (truncated)".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// The head of an open file stored by key, or `None` for a file holding a whole record.
fn head_of(f: &File, file_len: u64) -> Result<Option<Vec<u8>>> {
    let prefix = read_at(f, 0, file_len.min(record::MAX_HEADER_LEN as u64))?;
    if !record::is_head(&prefix) {
        return Ok(None);
    }
    let len = record::framed_len(&prefix)? as u64;
    if len > file_len {
        return Err(Error::SessionCorrupt("head longer than its file".into()));
    }
    read_at(f, 0, len).map(Some)
}

/// Where each live key's value lies in a file of `file_len` bytes that holds a head of
/// `head_len` bytes followed by the values. The sizes come from the file itself, so they bound
/// nothing until checked: unless they add up, without overflow, to exactly the file's length,
/// the file is `SessionCorrupt` (and no read or allocation of a stated size happens).
fn offsets_in_file(
    h: &record::Head,
    head_len: u64,
    file_len: u64,
) -> Result<Vec<(&str, u64, u64)>> {
    let end = h
        .keys
        .values()
        .filter_map(|k| k.size)
        .try_fold(head_len, u64::checked_add);
    if end != Some(file_len) {
        return Err(Error::SessionCorrupt(
            "file length disagrees with its head".into(),
        ));
    }
    Ok(record::value_offsets(h, head_len))
}

/// Every live key's value in the bytes of a whole file stored by key (`head` = its start).
fn values_of(file: &[u8], head: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let h = record::decode_head(head, usize::MAX)?;
    let offsets = offsets_in_file(&h, head.len() as u64, file.len() as u64)?;
    Ok(offsets
        .into_iter()
        .map(|(k, o, n)| (k.to_owned(), file[o as usize..(o + n) as usize].to_vec()))
        .collect())
}

impl FileStore {
    /// Opens the record file of `id` with its metadata, refusing one over `max_size` (or the
    /// store's own limit) with `TooLarge`.
    fn open_checked(
        &self,
        id: &SessionId,
        max_size: usize,
    ) -> Result<Option<(File, fs::Metadata)>> {
        let Some(f) = not_found(open_record(&self.path_of(id)))? else {
            return Ok(None);
        };
        // Length and times come from the open file, so they match the bytes read even if the
        // file is replaced meanwhile.
        let md = regular(f.metadata()?)?;
        let limit = self.max_file_size.min(max_size as u64);
        if md.len() > limit {
            return Err(Error::TooLarge {
                size: usize::try_from(md.len()).unwrap_or(usize::MAX),
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            });
        }
        Ok(Some((f, md)))
    }

    /// Opens (creating if needed) a store rooted at `root`. Any number of processes and stores
    /// may share `root`; they exclude each other through `<root>/.locks`.
    pub fn open(root: impl AsRef<Path>) -> Result<FileStore> {
        let root = root.as_ref().to_path_buf();
        // Session IDs are bearer secrets and file names: the store is private
        // to its owner (directories 0700, files 0600), like the lock table.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        Ok(FileStore {
            locks: LockFile::open(&root)?,
            root,
            max_file_size: u64::MAX,
            temp_grace: Duration::from_secs(600),
            lock_timeout: Duration::from_secs(5),
            scan_cursor: Mutex::new((0, None)),
            fsync: true,
            synced_shards: Mutex::new(std::collections::HashSet::new()),
            #[cfg(test)]
            fail_dir_sync: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A size limit of the store's own, on top of the manager's: records larger than this are
    /// refused by `save` and reported by `load` as [`Error::TooLarge`], so nothing this store
    /// accepts is unreadable later. Default: none (the manager's
    /// [`crate::session::SessionConfig::max_record_size`] is the limit).
    pub fn with_max_file_size(mut self, bytes: u64) -> Self {
        self.max_file_size = bytes;
        self
    }

    /// Whether saves and deletes are durable (default `true`): the temporary
    /// file is fsynced before the rename and the directory after it. With
    /// `false`, a save is still atomic (write, rename: no process crash can
    /// leave a torn record), but a power loss may lose the latest saves, as
    /// with Beaker's or PHP's file sessions.
    pub fn with_fsync(mut self, yes: bool) -> Self {
        self.fsync = yes;
        self
    }

    /// Temporary files older than this are removed by the expiry scan and [`Store::cleanup`].
    /// Default 10 minutes.
    pub fn with_temp_grace(mut self, d: Duration) -> Self {
        self.temp_grace = d;
        self
    }

    /// Longest wait for a session's ID lock before [`Error::Timeout`]. Default 5 s; the
    /// embedded manager sets it to its [`crate::session::SessionConfig::lock_timeout`].
    pub fn with_lock_timeout(mut self, d: Duration) -> Self {
        self.lock_timeout = d;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn shard(&self, id: &SessionId) -> PathBuf {
        self.root.join(&id.as_str()[..2])
    }

    /// The file of a session (the ID was validated, so it is a plain file name).
    pub fn path_of(&self, id: &SessionId) -> PathBuf {
        self.shard(id).join(id.as_str())
    }

    fn lock(&self, id: &SessionId) -> Result<IdLock<'_>> {
        self.locks.lock(id, self.lock_timeout)
    }

    /// `fsync` the directory when durability is on.
    fn sync_dir(&self, dir: &Path) -> Result<()> {
        #[cfg(test)]
        if self
            .fail_dir_sync
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(std::io::Error::from_raw_os_error(libc::EIO).into());
        }
        if self.fsync {
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// Writes `bytes` as the file of `id` if its stored version is `expected`: temporary file
    /// (fsynced), then under the ID lock the version check, the mtime (`la_new` or the stored
    /// time, whichever is later) and the rename, then the directory fsync.
    fn put(
        &self,
        id: &SessionId,
        expected: Option<u64>,
        bytes: &[u8],
        la_new: Timestamp,
    ) -> Result<bool> {
        if bytes.len() as u64 > self.max_file_size {
            return Err(Error::TooLarge {
                size: bytes.len(),
                limit: usize::try_from(self.max_file_size).unwrap_or(usize::MAX),
            });
        }
        let dir = self.shard(id);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        // The shard's entry in the root must be durable before a record in
        // it is reported saved, whoever created the shard (its creator may
        // have crashed before its own fsync): fsync the root once per shard
        // per store.
        if self.fsync && !self.synced_shards.lock().contains(&dir) {
            sync_dir(&self.root)?;
            self.synced_shards.lock().insert(dir.clone());
        }
        let path = self.path_of(id);
        // The slow part (write + fsync) happens before taking the ID lock.
        let (tmp, tmp_file) = self.write_temp(&dir, id, bytes)?;
        let outcome = (|| -> Result<bool> {
            let _lock = self.lock(id)?;
            let current = match self.meta_at(&path) {
                Ok(m) => m,
                // A corrupt file never matches: delete it first.
                Err(Error::SessionCorrupt(_)) => return Ok(false),
                Err(e) => return Err(e),
            };
            if current.map(|m| m.version) != expected {
                return Ok(false);
            }
            let la = current.map_or(la_new, |m| m.last_accessed.max(la_new));
            tmp_file.set_modified(la.to_system_time())?;
            match fs::rename(&tmp, &path) {
                Ok(()) => Ok(true),
                // The temp file was removed by a delete of this session meanwhile.
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e.into()),
            }
        })();
        match outcome {
            Ok(true) => {
                // The new record is in place; only its durability is in doubt now.
                self.sync_dir(&dir)
                    .map_err(|e| Error::OutcomeUnknown(format!("directory fsync failed: {e}")))?;
                Ok(true)
            }
            other => {
                let _ = fs::remove_file(&tmp);
                other
            }
        }
    }

    fn meta_at(&self, path: &Path) -> Result<Option<SessionMeta>> {
        match not_found(open_record(path))? {
            None => Ok(None),
            Some(f) => meta_of(&f).map(Some),
        }
    }

    fn shards(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root)? {
            let e = e?;
            if e.file_name().to_str().is_some_and(is_shard_name) && e.file_type()?.is_dir() {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    fn write_temp(&self, dir: &Path, id: &SessionId, bytes: &[u8]) -> Result<(PathBuf, File)> {
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| Error::Random(e.to_string()))?;
        let name = format!(
            "{TMP_PREFIX}{}.{:016x}",
            id.as_str(),
            u64::from_le_bytes(rnd)
        );
        let path = dir.join(name);
        let mut f = OpenOptions::new()
            .mode(0o600)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let r = f
            .write_all(bytes)
            .and_then(|()| if self.fsync { f.sync_all() } else { Ok(()) });
        if let Err(e) = r {
            let _ = fs::remove_file(&path);
            return Err(e.into());
        }
        Ok((path, f))
    }

    /// Removes the record and every temporary file of `id` (under its ID lock).
    fn remove_locked(&self, id: &SessionId) -> Result<bool> {
        let existed = not_found(fs::remove_file(self.path_of(id)))?.is_some();
        let prefix = format!("{TMP_PREFIX}{}.", id.as_str());
        let mut removed_temp = false;
        if let Some(entries) = not_found(fs::read_dir(self.shard(id)))? {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix)
                    && fs::remove_file(e.path()).is_ok()
                {
                    removed_temp = true;
                }
            }
        }
        if existed || removed_temp {
            self.sync_dir(&self.shard(id))?;
        }
        Ok(existed)
    }

    /// Removes `path` if it is a temporary file older than the grace period.
    fn remove_if_stale_temp(&self, path: &Path, now: SystemTime) -> bool {
        let Ok(md) = fs::symlink_metadata(path) else {
            return false;
        };
        // ctime cannot be set by anyone, so a temporary file's age is real.
        let changed =
            std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(md.ctime()).unwrap_or(0));
        md.is_file()
            && now.duration_since(changed).unwrap_or_default() >= self.temp_grace
            && fs::remove_file(path).is_ok()
    }

    /// Examines the entries of one shard after `after`, until the budget is spent.
    fn scan_shard(
        &self,
        shard: &Path,
        after: &mut Option<String>,
        cutoffs: &Cutoffs,
        budget: usize,
        scan: &mut ExpiredScan,
    ) -> Result<bool> {
        let entries = match fs::read_dir(shard) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(true),
            Err(e) => {
                tracing::warn!(shard = %shard.display(), error = %e, "session gc: shard unreadable");
                scan.unreadable += 1;
                return Ok(true);
            }
        };
        let now = SystemTime::now();
        let mut names: Vec<String> = Vec::new();
        for e in entries.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                if self.remove_if_stale_temp(&e.path(), now) {
                    scan.temp_files_removed += 1;
                }
            } else if name.len() == ID_LEN && after.as_ref().map_or(true, |a| name > *a) {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let Ok(id) = SessionId::parse(&name) else {
                continue;
            };
            if scan.examined == budget {
                return Ok(false);
            }
            scan.examined += 1;
            *after = Some(name);
            match self.meta_at(&shard.join(id.as_str())) {
                Ok(None) => {}
                Ok(Some(m)) if cutoffs.meta_expired(&m) => scan.expired.push(id),
                Ok(Some(_)) => {}
                Err(Error::SessionCorrupt(_)) => scan.corrupt.push(id),
                Err(e) => {
                    tracing::warn!(session = ?id, error = %e, "session gc: entry unreadable, skipped");
                    scan.unreadable += 1;
                }
            }
        }
        Ok(true)
    }
}

impl Store for FileStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, false, true).with_per_key(true)
    }

    fn change_counters(&self) -> super::ChangeCounters {
        super::ChangeCounters::Directory(self.root.clone())
    }

    fn load(&self, id: &SessionId, max_size: usize) -> Result<Option<StoredSession>> {
        let Some((f, md)) = self.open_checked(id, max_size)? else {
            return Ok(None);
        };
        let mut bytes = Vec::with_capacity(md.len() as usize);
        f.take(md.len().saturating_add(1)).read_to_end(&mut bytes)?;
        let st = StoredSession::from_record(bytes, mtime(&md))?;
        if !record::is_head(&st.bytes) {
            return Ok(Some(st));
        }
        let head_len = record::framed_len(&st.bytes)?.min(st.bytes.len());
        let head = &st.bytes[..head_len];
        let values = values_of(&st.bytes, head)?.into_iter().collect();
        record_of_split(st.meta, head, &values).map(Some)
    }

    fn load_head(
        &self,
        id: &SessionId,
        max_size: usize,
        values_up_to: u64,
    ) -> Result<Option<Stored>> {
        let Some((f, md)) = self.open_checked(id, max_size)? else {
            return Ok(None);
        };
        let meta_of_head = |head: &[u8]| -> Result<SessionMeta> {
            let h = record::peek_header(head)?;
            Ok(SessionMeta {
                version: h.version,
                created: Timestamp(h.created),
                last_accessed: mtime(&md),
                expiry: h.expiry,
                size: md.len(),
            })
        };
        if md.len() > values_up_to {
            if let Some(head) = head_of(&f, md.len())? {
                // The head only: the values stay on disk until asked for.
                let meta = meta_of_head(&head)?;
                return Ok(Some(Stored::ByKey(StoredHead {
                    meta,
                    head,
                    values: None,
                })));
            }
        }
        // Everything, in one read: a small session, or a whole record.
        let bytes = read_at(&f, 0, md.len())?;
        if !record::is_head(&bytes) {
            return StoredSession::from_record(bytes, mtime(&md)).map(|s| Some(Stored::Whole(s)));
        }
        let head = bytes[..record::framed_len(&bytes)?.min(bytes.len())].to_vec();
        let values = values_of(&bytes, &head)?;
        Ok(Some(Stored::ByKey(StoredHead {
            meta: meta_of_head(&head)?,
            head,
            values: Some(values),
        })))
    }

    fn load_values(
        &self,
        id: &SessionId,
        version: u64,
        keys: &[&str],
    ) -> Result<Option<Vec<Option<Vec<u8>>>>> {
        let Some((f, md)) = self.open_checked(id, usize::MAX)? else {
            return Ok(None);
        };
        // One open file is one version: check it, then read from this file only.
        let prefix = read_at(&f, 0, md.len().min(record::MAX_HEADER_LEN as u64))?;
        if record::peek_header(&prefix)?.version != version {
            return Ok(None);
        }
        let Some(head) = head_of(&f, md.len())? else {
            return values_of_whole(&read_at(&f, 0, md.len())?, keys).map(Some);
        };
        let h = record::decode_head(&head, usize::MAX)?;
        let offsets = offsets_in_file(&h, head.len() as u64, md.len())?;
        let at = |key: &str| offsets.iter().find(|(k, _, _)| *k == key);
        keys.iter()
            .map(|k| at(k).map(|&(_, o, n)| read_at(&f, o, n)).transpose())
            .collect::<Result<_>>()
            .map(Some)
    }

    fn save_delta(
        &self,
        id: &SessionId,
        expected: Option<u64>,
        new: &StoredHead,
        changed: &[ChangedValue],
    ) -> Result<bool> {
        // The unchanged values come from the current file (read before the ID lock, like the
        // temporary file's write; the version check under the lock proves it was the one).
        let mut values = std::collections::BTreeMap::new();
        if let Some(v) = expected {
            match self.load_head(id, usize::MAX, u64::MAX)? {
                Some(cur) if cur.meta().version != v => return Ok(false),
                Some(Stored::Whole(cur)) => values.extend(split_record(&cur.bytes)?.1),
                Some(Stored::ByKey(cur)) => values.extend(cur.values.unwrap_or_default()),
                None => return Ok(false),
            }
        }
        for (k, v) in changed {
            match v {
                Some(b) => values.insert(k.clone(), b.clone()),
                None => values.remove(k),
            };
        }
        let h = record::decode_head(&new.head, usize::MAX)?;
        let mut bytes = new.head.clone();
        for (k, _, n) in record::value_offsets(&h, 0) {
            match values.get(k) {
                Some(v) if v.len() as u64 == n => bytes.extend_from_slice(v),
                _ => {
                    return Err(Error::SessionCorrupt(
                        "a live key's value is missing or of another size".into(),
                    ))
                }
            }
        }
        self.put(id, expected, &bytes, new.meta.last_accessed)
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        self.put(id, expected, &new.bytes, new.meta.last_accessed)
    }
    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        self.meta_at(&self.path_of(id))
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> Result<Touch> {
        let path = self.path_of(id);
        // Unlocked pre-check: the common, coalesced case costs one stat.
        match not_found(fs::metadata(&path))? {
            None => return Ok(Touch::Missing),
            Some(md) if mtime(&md) >= at.saturating_sub(coalesce) => return Ok(Touch::Skipped),
            Some(_) => {}
        }
        let _lock = self.lock(id)?;
        let Some(f) = not_found(open_record(&path))? else {
            return Ok(Touch::Missing);
        };
        if let Some(refused) = touch_refusal(&meta_of(&f)?, at, coalesce, cutoffs) {
            return Ok(refused);
        }
        f.set_modified(at.to_system_time())?;
        Ok(Touch::Written)
    }

    fn last_accessed(&self, id: &SessionId) -> Result<Option<Timestamp>> {
        Ok(not_found(fs::metadata(self.path_of(id)))?.map(|md| mtime(&md)))
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        let _lock = self.lock(id)?;
        self.remove_locked(id)
    }

    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool> {
        let _lock = self.lock(id)?;
        match self.meta(id)? {
            Some(m) if cutoffs.meta_expired(&m) => self.remove_locked(id),
            _ => Ok(false),
        }
    }

    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> Result<ExpiredScan> {
        let shards = self.shards()?;
        let mut scan = ExpiredScan::default();
        let mut cursor = self.scan_cursor.lock();
        let (ref mut idx, ref mut after) = *cursor;
        while *idx < shards.len() {
            if !self.scan_shard(&shards[*idx], after, cutoffs, budget, &mut scan)? {
                scan.more = true;
                return Ok(scan);
            }
            *idx += 1;
            *after = None;
        }
        // A full pass: the next one starts from the first shard.
        *idx = 0;
        Ok(scan)
    }

    fn cleanup(&self) -> Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        for shard in self.shards()? {
            let Some(entries) = not_found(fs::read_dir(&shard))? else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                    && self.remove_if_stale_temp(&e.path(), now)
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(version: u64, note: &str) -> StoredSession {
        let mut r = record::Record {
            version,
            created: 1,
            expiry: Default::default(),
            body: Default::default(),
        };
        r.body.data.insert("n".into(), note.into());
        r.body.changed.insert("n".into(), version);
        StoredSession::from_record(record::encode(&r, 1 << 20).unwrap(), Timestamp(1)).unwrap()
    }

    /// A save whose rename happened but whose directory fsync failed is not a plain I/O error
    /// (which would invite a replay): it is `OutcomeUnknown`, and the record is in place.
    #[test]
    fn a_failed_directory_fsync_after_the_rename_is_an_unknown_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let id = SessionId::generate().unwrap();
        assert!(store.save(&id, None, &stored(1, "a")).unwrap());
        store
            .fail_dir_sync
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let r = store.save(&id, Some(1), &stored(2, "b"));
        assert!(matches!(r, Err(Error::OutcomeUnknown(_))), "{r:?}");
        assert_eq!(store.meta(&id).unwrap().unwrap().version, 2);
    }

    /// The ID lock is bounded: a holder that never lets go makes others time out.
    #[test]
    fn the_id_lock_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileStore::open(dir.path()).unwrap();
        let b = FileStore::open(dir.path())
            .unwrap()
            .with_lock_timeout(Duration::from_millis(30));
        let id = SessionId::generate().unwrap();
        let _held = a.lock(&id).unwrap();
        assert!(matches!(b.delete(&id), Err(Error::Timeout)));
    }
    /// A file stored by key that was cut short or grown is a typed error for every read of
    /// it, never a wrong value; other sessions are untouched.
    #[test]
    fn a_damaged_file_stored_by_key_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut r = record::Record {
            version: 1,
            created: 1,
            expiry: Default::default(),
            body: Default::default(),
        };
        for k in ["a", "b"] {
            r.body.data.insert(k.into(), "x".repeat(100).into());
            r.body.changed.insert(k.into(), 1);
        }
        let (head, values) = record::split(&r).unwrap();
        let head_bytes = record::encode_head(&head).unwrap();
        let new = StoredHead {
            meta: SessionMeta {
                version: 1,
                created: Timestamp(1),
                last_accessed: Timestamp(1),
                expiry: Default::default(),
                size: head_bytes.len() as u64 + head.values_size(),
            },
            head: head_bytes,
            values: None,
        };
        let changed: Vec<ChangedValue> = values.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let (id, other) = (
            SessionId::generate().unwrap(),
            SessionId::generate().unwrap(),
        );
        assert!(store.save_delta(&id, None, &new, &changed).unwrap());
        assert!(store.save_delta(&other, None, &new, &changed).unwrap());
        let path = store.path_of(&id);
        let full = fs::read(&path).unwrap();
        let corrupt = |r: Result<()>| assert!(matches!(r, Err(Error::SessionCorrupt(_))), "{r:?}");
        for bytes in [&full[..full.len() - 10], &[&full[..], b"junk"].concat()[..]] {
            fs::write(&path, bytes).unwrap();
            corrupt(store.load(&id, 1 << 20).map(drop));
            corrupt(store.load_head(&id, 1 << 20, u64::MAX).map(drop));
        }
        fs::write(&path, &full[..full.len() - 10]).unwrap();
        // The head alone is intact; the cut value is not readable.
        assert!(store.load_head(&id, 1 << 20, 0).unwrap().is_some());
        corrupt(store.load_values(&id, 1, &["b"]).map(drop));
        assert!(store.load(&other, 1 << 20).unwrap().is_some());
    }

    /// A head whose value sizes are lies (planted by another program, with a correct CRC,
    /// which is no MAC) is `SessionCorrupt` for every read: sizes that overflow the file's
    /// offsets do not panic, and a size of a terabyte is not allocated.
    #[test]
    fn a_head_with_lying_value_sizes_is_a_typed_error_and_allocates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let id = SessionId::generate().unwrap();
        let head_with = |sizes: &[(&str, u64)]| {
            let keys = sizes
                .iter()
                .map(|&(k, n)| {
                    let state = record::KeyState {
                        changed: 1,
                        size: Some(n),
                    };
                    (k.to_owned(), state)
                })
                .collect();
            let head = record::Head {
                version: 1,
                created: 1,
                expiry: Default::default(),
                keys,
                floor: 0,
            };
            record::encode_head(&head).unwrap()
        };
        let corrupt = |what: &str, r: Result<()>| {
            assert!(matches!(r, Err(Error::SessionCorrupt(_))), "{what}: {r:?}")
        };
        let padding = vec![b'x'; 300 << 10];
        fs::create_dir_all(store.shard(&id)).unwrap();
        for sizes in [
            &[("a", 1u64 << 40)][..],
            &[("a", u64::MAX)],
            &[("a", u64::MAX), ("b", 1)],
            &[("a", 1), ("b", u64::MAX - 200), ("c", 400)],
        ] {
            let file = [&head_with(sizes)[..], &padding].concat();
            fs::write(store.path_of(&id), &file).unwrap();
            let keys: Vec<&str> = sizes.iter().map(|&(k, _)| k).collect();
            corrupt("load", store.load(&id, usize::MAX).map(drop));
            corrupt(
                "load_head",
                store.load_head(&id, usize::MAX, u64::MAX).map(drop),
            );
            corrupt("load_values", store.load_values(&id, 1, &keys).map(drop));
        }
    }
}
