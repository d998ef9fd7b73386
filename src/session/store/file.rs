//! [`FileStore`]: one file per session in sharded directories.
//!
//! Layout: `<root>/<first two ID characters>/<ID>` holds the encoded record; the file's
//! modification time is the session's last-accessed time, so a touch changes metadata only and
//! never rewrites data. A save writes a unique temporary file `.tmp.<ID>.<random>` in the same
//! directory, fsyncs it, renames it over the record and fsyncs the directory: a crash leaves the
//! old or the new record, never a torn one, plus at most a temporary file that
//! [`Store::cleanup`] removes later.
//!
//! Saves, touches and deletes of one session serialize on a short store lock in the lock table
//! (ID `ls.f.<ID>`, separate from the session's data lock), which makes the compare-and-swap and
//! the never-backwards rule of the access time hold across processes.

use super::{Capabilities, Cutoffs, Store, StoredSession, Timestamp, Touch};
use crate::session::id::{SessionId, ID_LEN};
use crate::session::record;
use crate::{Error, LockTable, Result};
use parking_lot::Mutex;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const TMP_PREFIX: &str = ".tmp.";

/// A [`Store`] keeping one file per session; see the module docs for the layout.
///
/// ```
/// use locktable::session::{FileStore, SessionConfig, SessionManager};
/// use locktable::{LockTable, TableOptions};
/// let dir = tempfile::tempdir().unwrap();
/// let table = LockTable::anonymous(&TableOptions::default()).unwrap();
/// let store = FileStore::open(dir.path(), table.clone()).unwrap();
/// let mgr = SessionManager::new(table, store, SessionConfig::default());
/// let s = mgr.create().unwrap();
/// assert!(mgr.load(s.id().as_str()).unwrap().is_some());
/// ```
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    table: LockTable,
    max_file_size: u64,
    temp_grace: Duration,
    /// Where the next expiry scan starts (index into the sorted shard list).
    scan_cursor: Mutex<usize>,
    /// fsync temp files and directories (see [`FileStore::with_fsync`]).
    fsync: bool,
    /// Shard directories whose entry in the root this store has fsynced.
    synced_shards: Mutex<std::collections::HashSet<PathBuf>>,
}

fn store_lock_key(id: &SessionId) -> String {
    format!("ls.f.{}", id.as_str())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl FileStore {
    /// `fsync` the directory when durability is on.
    fn sync_dir(&self, dir: &Path) -> Result<()> {
        if self.fsync {
            sync_dir(dir)?;
        }
        Ok(())
    }
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

impl FileStore {
    /// Opens (creating if needed) a store rooted at `root`. `table` provides the short store
    /// locks; processes sharing `root` must share the table.
    pub fn open(root: impl AsRef<Path>, table: LockTable) -> Result<FileStore> {
        let root = root.as_ref().to_path_buf();
        // Session IDs are bearer secrets and file names: the store is private
        // to its owner (directories 0700, files 0600), like the lock table.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        Ok(FileStore {
            root,
            table,
            max_file_size: 16 << 20,
            temp_grace: Duration::from_secs(600),
            scan_cursor: Mutex::new(0),
            fsync: true,
            synced_shards: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Files larger than this are reported as [`Error::TooLarge`] instead of being read.
    /// Default 16 MiB.
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

    /// Temporary files older than this are removed by [`Store::cleanup`]. Default 10 minutes.
    pub fn with_temp_grace(mut self, d: Duration) -> Self {
        self.temp_grace = d;
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

    /// Reads the version, creation time and mtime of the current file, if any.
    fn current(&self, path: &Path) -> Result<Option<(Option<u64>, Timestamp)>> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let la = mtime(&f.metadata()?);
        let mut head = [0u8; 128];
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..])? {
                0 => break,
                k => n += k,
            }
        }
        let version = record::peek_header(&head[..n]).ok().map(|h| h.version);
        Ok(Some((version, la)))
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
}

impl Store for FileStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, false, true)
    }

    fn load(&self, id: &SessionId) -> Result<Option<StoredSession>> {
        let path = self.path_of(id);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Length and times come from the open file, so they match the bytes read even if the
        // file is replaced meanwhile.
        let md = f.metadata()?;
        if md.len() > self.max_file_size {
            return Err(Error::TooLarge {
                size: usize::try_from(md.len()).unwrap_or(usize::MAX),
                limit: usize::try_from(self.max_file_size).unwrap_or(usize::MAX),
            });
        }
        let mut bytes = Vec::with_capacity(md.len() as usize);
        f.take(self.max_file_size.saturating_add(1))
            .read_to_end(&mut bytes)?;
        let header = record::peek_header(&bytes)?;
        Ok(Some(StoredSession {
            version: header.version,
            created: Timestamp(header.created),
            last_accessed: mtime(&md),
            bytes,
        }))
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
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
        // The slow part (write + fsync) happens before taking the store lock.
        let (tmp, tmp_file) = self.write_temp(&dir, id, &new.bytes)?;
        let outcome = (|| -> Result<bool> {
            let _lock = self.table.write(store_lock_key(id))?;
            let current = self.current(&path)?;
            let current_version = current.and_then(|(v, _)| v);
            if current.is_some() && current_version.is_none() {
                // A corrupt file never matches: delete it first.
                return Ok(false);
            }
            if current_version != expected {
                return Ok(false);
            }
            let la = current.map_or(new.last_accessed, |(_, la)| la.max(new.last_accessed));
            tmp_file.set_modified(la.to_system_time())?;
            fs::rename(&tmp, &path)?;
            Ok(true)
        })();
        match outcome {
            Ok(true) => {
                self.sync_dir(&dir)?;
                Ok(true)
            }
            other => {
                let _ = fs::remove_file(&tmp);
                other
            }
        }
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        idle_before: Timestamp,
    ) -> Result<Touch> {
        let path = self.path_of(id);
        let check = |path: &Path| -> Result<Option<Touch>> {
            match fs::metadata(path) {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Some(Touch::Missing)),
                Err(e) => Err(e.into()),
                Ok(md) if mtime(&md) >= at.saturating_sub(coalesce) => Ok(Some(Touch::Skipped)),
                Ok(md) if mtime(&md) < idle_before => Ok(Some(Touch::Expired)),
                Ok(_) => Ok(None),
            }
        };
        // Unlocked pre-check: the common, coalesced case costs one stat.
        if let Some(t) = check(&path)? {
            return Ok(t);
        }
        let _lock = self.table.write(store_lock_key(id))?;
        if let Some(t) = check(&path)? {
            return Ok(t);
        }
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Touch::Missing),
            Err(e) => return Err(e.into()),
        };
        f.set_modified(at.to_system_time())?;
        Ok(Touch::Written)
    }

    fn last_accessed(&self, id: &SessionId) -> Result<Option<Timestamp>> {
        match fs::metadata(self.path_of(id)) {
            Ok(md) => Ok(Some(mtime(&md))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        let _lock = self.table.write(store_lock_key(id))?;
        match fs::remove_file(self.path_of(id)) {
            Ok(()) => {
                self.sync_dir(&self.shard(id))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn list_expired(&self, cutoffs: Cutoffs, limit: usize) -> Result<Vec<SessionId>> {
        let shards = self.shards()?;
        let mut out = Vec::new();
        if shards.is_empty() || limit == 0 {
            return Ok(out);
        }
        let mut cursor = self.scan_cursor.lock();
        let start = *cursor % shards.len();
        for step in 0..shards.len() {
            let idx = (start + step) % shards.len();
            *cursor = idx;
            let entries = match fs::read_dir(&shards[idx]) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for e in entries {
                let e = e?;
                let Some(id) = e
                    .file_name()
                    .to_str()
                    .filter(|n| n.len() == ID_LEN)
                    .and_then(|n| SessionId::parse(n).ok())
                else {
                    continue;
                };
                let path = e.path();
                let expired = match self.current(&path)? {
                    None => false,
                    // Unreadable header: let the manager validate and remove it.
                    Some((None, _)) => true,
                    Some((Some(_), la)) if la < cutoffs.idle_before => true,
                    Some((Some(_), _)) => match self.load(&id) {
                        Ok(Some(s)) => cutoffs.expired(s.created, s.last_accessed),
                        Ok(None) => false,
                        Err(_) => true,
                    },
                };
                if expired {
                    out.push(id);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            *cursor = idx + 1;
        }
        Ok(out)
    }

    fn cleanup(&self) -> Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        for shard in self.shards()? {
            let entries = match fs::read_dir(&shard) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for e in entries {
                let e = e?;
                if !e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    continue;
                }
                let Ok(md) = e.metadata() else { continue };
                // ctime cannot be set by anyone, so a temporary file's age is real.
                let changed = std::time::UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(md.ctime()).unwrap_or(0));
                if now.duration_since(changed).unwrap_or_default() >= self.temp_grace
                    && fs::remove_file(e.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}
