//! `LockTable`: opening, creating and attaching to a table, and the public
//! acquisition API.
//!
//! Owns: the table file and its mapping, this handle's process record, the
//! options, and the glue between ID lookup ([`crate::index`]), lock modes
//! ([`crate::lockword`]) and recovery ([`crate::registry`]).
//!
//! May not touch: lock-word bits directly (it calls `SlotRef` methods).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use memmap2::MmapOptions;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::fork::{self, ForkSafeFile};
use crate::guard::{ReadGuard, TableRef, UpgradableReadGuard, WriteGuard};
use crate::index::{self, Tag};
use crate::layout::{
    Geometry, Header, HEADER_SIZE, INIT_LOCK_BYTE, INIT_READY, INIT_STATE_OFFSET, MAGIC,
};
use crate::lockword::{self, Fail, Fences, Granted, Host, Ident, SlotRef, Wait};
use crate::lookup_cache::{self, LookupCache, Probe as Cached};
use crate::reader_row;
use crate::recovery::SweepReport;
use crate::region::{MappedRegion, Region};
use crate::registry;
use crate::stats::{self, TableStats};
use crate::sync::{self, Ordering};
use crate::watcher::{Identity, Probe, Reaper, Watcher};

/// Longest accepted ID, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Default number of slots.
pub const DEFAULT_CAPACITY: u32 = 4096;
/// Default number of processes that may attach at once.
pub const DEFAULT_MAX_PROCESSES: u32 = 64;
/// Default liveness poll interval of waiters.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How to create or attach to a table.
///
/// Geometry left unset means "whatever the existing file has, or the default
/// when creating". Geometry set explicitly must match an existing file.
#[derive(Debug, Clone)]
pub struct TableOptions {
    capacity: Option<u32>,
    max_processes: Option<u32>,
    mode: u32,
    poll_interval: Duration,
    reap_on_attach: bool,
    reader_bias: bool,
    asymmetric_fences: bool,
    create: bool,
}

impl Default for TableOptions {
    fn default() -> Self {
        TableOptions {
            capacity: None,
            max_processes: None,
            mode: 0o600,
            poll_interval: DEFAULT_POLL_INTERVAL,
            reap_on_attach: true,
            reader_bias: true,
            asymmetric_fences: false,
            create: true,
        }
    }
}

impl TableOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }
    /// Number of slots: the most IDs held or waited on at once (a multiple
    /// of 8, at least 16). Default 4096.
    pub fn capacity(mut self, slots: u32) -> Self {
        self.capacity = Some(slots);
        self
    }
    /// Number of processes (handles) attached at once. Default 64, max 1024.
    /// Each slot carries one 4-byte lane per process.
    pub fn max_processes(mut self, n: u32) -> Self {
        self.max_processes = Some(n);
        self
    }
    /// Permission bits of a newly created table file (before umask).
    /// Default `0o600`.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    /// How long a waiter waits before checking that the holders it waits
    /// for are alive. Default 20 ms; at least 1 ms. This is the fallback:
    /// a holder's death is normally noticed when the kernel reports its
    /// exit to the handle's watcher thread (started when a waiter first
    /// sleeps), whatever the interval.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d.max(Duration::from_millis(1));
        self
    }

    /// Whether [`LockTable::open`] may create the table (default true): make
    /// the file if it is missing, and initialise it if it is empty or its
    /// creator died before finishing. With `false` the open only attaches to
    /// a complete table and never writes the file's header: a missing file is
    /// [`Error::Io`] (not found), an empty file or an unfinished creation is
    /// [`Error::Corrupt`]. Inspection tools (`locktable stat`, `reap`) use it,
    /// so that looking at a table never creates or rewrites one.
    ///
    /// ```
    /// use locktable::{Error, LockTable, TableOptions};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("locks");
    /// let existing = TableOptions::default().create(false);
    /// assert!(matches!(LockTable::open(&path, &existing), Err(Error::Io(_))));
    /// assert!(!path.exists());
    /// drop(LockTable::open(&path, &TableOptions::default()).unwrap());
    /// drop(LockTable::open(&path, &existing).unwrap());
    /// ```
    pub fn create(mut self, yes: bool) -> Self {
        self.create = yes;
        self
    }

    /// Whether attaching releases the holds of dead processes at once
    /// (default true). Inspection tools turn it off so that they can show
    /// dead holders (`locktable stat`) or report what they release
    /// (`locktable reap`).
    pub fn reap_on_attach(mut self, yes: bool) -> Self {
        self.reap_on_attach = yes;
        self
    }

    /// Whether this handle's reads may use the reader bias (default true):
    /// while an ID is read far more often than written, each thread
    /// publishes its reads in a cache line of its own instead of the
    /// process's shared counter, so readers of one ID scale with cores.
    /// Writers pay a scan of the readers' lines when they revoke the bias,
    /// at most about a tenth of their time. Turning it off makes this
    /// handle read through its process's counter only (its writers still
    /// revoke the bias that other handles' readers set), e.g. to compare.
    ///
    /// ```
    /// use locktable::{LockTable, TableOptions};
    /// let t = LockTable::anonymous(&TableOptions::default().reader_bias(false)).unwrap();
    /// drop(t.read("session-1").unwrap());
    /// ```
    pub fn reader_bias(mut self, yes: bool) -> Self {
        self.reader_bias = yes;
        self
    }

    /// Whether a table this call creates uses asymmetric fences (where the
    /// kernel offers `membarrier`'s expedited global barrier). Then a
    /// biased read publishes itself with a plain store instead of a locked
    /// instruction, and a writer that revokes the bias pays a
    /// `membarrier(2)` call (about a microsecond) instead: an uncontended
    /// read of a hot ID costs less than pthread's rwlock. Chosen when the
    /// file is created and recorded in it; ignored when attaching to an
    /// existing table.
    ///
    /// **Off by default.** The kernel's barrier skipped CPUs on which a
    /// thread of the process ran before it registered (DESIGN §10,
    /// "Status"), which let a writer in beside a biased reader under load.
    /// A process attaching to such a table therefore forks once, a child
    /// that visits every CPU and exits at once, so that every CPU learns of
    /// the registration. The child runs no `atfork` handler, makes only raw
    /// system calls, sends no SIGCHLD and is invisible to the
    /// application's `wait`; the fork costs a large process a page-table
    /// copy and a minor fault per page it writes next. A process under a
    /// seccomp filter (Docker's default profile included) does not fork,
    /// since a filter may kill on `clone`. Where it does not, where that
    /// child cannot run or does not finish within 2 s, or the process cannot
    /// register, its readers use locked instructions (always correct); a
    /// process that cannot even issue the barrier is refused with
    /// [`Error::Incompatible`].
    ///
    /// ```
    /// use locktable::{LockTable, TableOptions};
    /// let t = LockTable::anonymous(&TableOptions::default()).unwrap();
    /// assert!(!t.asymmetric_fences());
    /// drop(t.read("session-1").unwrap());
    /// ```
    pub fn asymmetric_fences(mut self, yes: bool) -> Self {
        self.asymmetric_fences = yes;
        self
    }

    fn geometry_for_create(&self) -> Result<Geometry> {
        let g = Geometry {
            capacity: self.capacity.unwrap_or(DEFAULT_CAPACITY),
            max_processes: self.max_processes.unwrap_or(DEFAULT_MAX_PROCESSES),
        };
        g.validate()?;
        Ok(g)
    }

    fn check_geometry(&self, g: Geometry) -> Result<()> {
        let mismatch = |what: &str, want: u32, have: u32| Error::Incompatible {
            reason: format!("table has {what} {have}, options ask for {want}"),
        };
        if let Some(c) = self.capacity.filter(|&c| c != g.capacity) {
            return Err(mismatch("capacity", c, g.capacity));
        }
        if let Some(p) = self.max_processes.filter(|&p| p != g.max_processes) {
            return Err(mismatch("max_processes", p, g.max_processes));
        }
        Ok(())
    }
}

pub(crate) struct Inner {
    pub(crate) region: MappedRegion,
    file: ForkSafeFile,
    pub(crate) me: u32,
    hash_key: [u64; 2],
    poll_interval: Duration,
    /// Reads may publish in this thread's reader row (`TableOptions::reader_bias`).
    reader_bias: bool,
    /// Serialises lease probing within this handle (OFD locks are per open
    /// file description, so two threads would both win the same lease).
    reap_lock: Mutex<()>,
    fork_epoch: u64,
    path: Option<PathBuf>,
    /// Recent ID -> slot lookups of this attachment, shared by its threads;
    /// made at the first lock (see [`Inner::hints`]).
    hints: OnceLock<LookupCache>,
    /// This attachment, for the watcher thread (which must not keep it
    /// alive).
    self_ref: Weak<Inner>,
    /// The death watcher, started by the first waiter that sleeps; `None`
    /// inside: it could not start (the poll remains).
    watcher: OnceLock<Option<Watcher>>,
}

impl Inner {
    /// The lookup cache, made at the first lock: about 1.3 MiB for 4096
    /// slots, written when made, which a handle that never locks (a CLI
    /// `stat`, a reaper, a test opening many handles) should not pay. After
    /// that, one Acquire load and a predicted branch.
    #[inline(always)]
    fn hints(&self) -> &LookupCache {
        self.hints.get_or_init(|| {
            LookupCache::new(self.region.geometry().capacity as usize, random_seed())
        })
    }

    #[inline]
    pub(crate) fn forked(&self) -> bool {
        fork::epoch() != self.fork_epoch
    }

    #[inline]
    pub(crate) fn slot(&self, index: u32) -> SlotRef<'_> {
        self.region.slot(index as usize)
    }

    pub(crate) fn reap(&self, index: u32) -> io::Result<Option<SweepReport>> {
        let _g = self.reap_lock.lock();
        registry::reap(&self.region, &self.file, index, self.me)
    }

    /// A try found slot `slot` busy: if this thread has not probed within
    /// the last poll interval, checks whether the processes named by the
    /// slot are alive and releases the holds of dead ones. True if it
    /// released anything (the caller tries once more). The rate limit keeps
    /// a loop of failing tries at a few nanoseconds per try; a dead holder
    /// delays try users by at most one poll interval.
    pub(crate) fn sweep_for_try(&self, slot: u32) -> bool {
        thread_local! {
            static NEXT_PROBE: std::cell::Cell<Option<std::time::Instant>> =
                const { std::cell::Cell::new(None) };
        }
        let now = std::time::Instant::now();
        let due = NEXT_PROBE.with(|n| match n.get() {
            Some(t) if now < t => false,
            _ => {
                n.set(now.checked_add(self.poll_interval));
                true
            }
        });
        due && self.recover_stalled(self.slot(slot))
    }

    pub(crate) fn lease_held_by_other(&self, index: u32) -> bool {
        index == self.me || registry::lease_held_by_other(&self.file, index).unwrap_or(true)
    }
}

impl Host for Inner {
    fn poll_interval(&self) -> Option<Duration> {
        Some(self.poll_interval)
    }
    fn me(&self) -> u32 {
        self.me
    }
    fn recover_process(&self, p: u32) -> bool {
        matches!(self.reap(p), Ok(Some(_)))
    }
    fn watch_holders(&self, slot: SlotRef<'_>) {
        let watcher = self
            .watcher
            .get_or_init(|| Watcher::start(self.self_ref.clone()).ok());
        if let Some(w) = watcher {
            let me = self.me;
            let named = slot.named_processes();
            w.watch(self, named.into_iter().filter(|&p| p != me));
        }
    }
}

impl Reaper for Inner {
    fn identity(&self, index: u32) -> Option<Identity> {
        if index >= self.region.geometry().max_processes {
            return None;
        }
        let rec = self.region.record(index as usize);
        // Acquire: pairs with attach's Release store of LIVE, after which
        // pid and attach time are the new owner's.
        if rec.state.load(Ordering::Acquire) != registry::RECORD_LIVE {
            return None;
        }
        Some(Identity {
            pid: rec.pid.load(Ordering::Relaxed),
            attached_ms: rec.attached_ms.load(Ordering::Relaxed),
        })
    }
    fn probe_and_reap(&self, index: u32) -> Probe {
        match self.reap(index) {
            Ok(Some(_)) => Probe::Gone,
            // Nothing released: alive, or already reaped or detached.
            Ok(None) if self.lease_held_by_other(index) => Probe::Alive,
            Ok(None) => Probe::Gone,
            // The probe itself failed: leave it to the poll.
            Err(_) => Probe::Gone,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.forked() {
            // The child's copy of a watcher has no thread; only the parent
            // signals its own.
            if let Some(Some(w)) = self.watcher.get() {
                w.stop();
            }
            registry::detach(&self.region, &self.file, self.me);
        }
    }
}

/// A table of per-ID reader/writer locks shared by threads and processes.
///
/// Cloning is cheap and shares one attachment (one process record).
/// Opening the same file again, even in the same process, makes another
/// attachment that behaves exactly like another process.
///
/// ```
/// use locktable::{LockTable, TableOptions};
/// let dir = tempfile::tempdir().unwrap();
/// let table = LockTable::open(dir.path().join("locks"), &TableOptions::default()).unwrap();
/// {
///     let r1 = table.read("session-1").unwrap();
///     let r2 = table.read("session-1").unwrap(); // readers share
///     assert!(table.try_write("session-1").unwrap().is_none());
/// }
/// let w = table.write("session-1").unwrap();
/// assert!(!w.previous_owner_died());
/// ```
#[derive(Clone)]
pub struct LockTable {
    pub(crate) inner: Arc<Inner>,
}

impl Drop for LockTable {
    /// The last handle's drop detaches on the dropping thread, even while
    /// the death watcher is in a round (which holds a strong reference for
    /// its duration): it waits for the round to end and stops the watcher,
    /// so the attachment is released before `drop` returns and a process
    /// may exit right after. Not in a forked child: its copy of the watcher
    /// has no thread, and the round's lock may have been copied held.
    fn drop(&mut self) {
        if self.inner.forked() {
            return;
        }
        if let Some(Some(w)) = self.inner.watcher.get() {
            w.stop_if_last(|| Arc::strong_count(&self.inner) == 1);
        }
    }
}

impl std::fmt::Debug for LockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockTable")
            .field("path", &self.inner.path)
            .field("process_index", &self.inner.me)
            .field("geometry", &self.inner.region.geometry())
            .finish()
    }
}

fn classify_open_error(e: io::Error, path: &Path) -> Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => Error::Incompatible {
            reason: format!(
                "{} is a symbolic link (refused: O_NOFOLLOW)",
                path.display()
            ),
        },
        Some(libc::EISDIR) => Error::Incompatible {
            reason: format!("{} is a directory", path.display()),
        },
        _ => Error::Io(e),
    }
}

fn random_key() -> Result<[u64; 2]> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    let mut k0 = [0u8; 8];
    let mut k1 = [0u8; 8];
    k0.copy_from_slice(&b[..8]);
    k1.copy_from_slice(&b[8..]);
    Ok([u64::from_ne_bytes(k0), u64::from_ne_bytes(k1)])
}

/// Holds the init lock (an OFD lock on a byte far past EOF) while a table
/// is created, validated and attached; released on drop.
struct InitLock<'f>(&'f File);

impl<'f> InitLock<'f> {
    fn take(file: &'f File) -> Result<Self> {
        registry::ofd_lock(file, INIT_LOCK_BYTE, libc::F_WRLCK, true)?;
        Ok(InitLock(file))
    }
}

impl Drop for InitLock<'_> {
    fn drop(&mut self) {
        let _ = registry::ofd_lock(self.0, INIT_LOCK_BYTE, libc::F_UNLCK, false);
    }
}

/// True if the file looks like a creation of ours that died before READY:
/// what is there is a prefix of our magic (or nothing), and READY is unset.
fn is_abandoned_creation(file: &File, len: u64) -> io::Result<bool> {
    let mut head = [0u8; 8];
    let n = file.read_at(&mut head, 0)?;
    if !MAGIC.starts_with(&head[..n.min(8)]) {
        return Ok(false);
    }
    if len < INIT_STATE_OFFSET + 4 {
        return Ok(true);
    }
    let mut st = [0u8; 4];
    file.read_exact_at(&mut st, INIT_STATE_OFFSET)?;
    Ok(u32::from_ne_bytes(st) != INIT_READY)
}

fn create_in(file: &File, opts: &TableOptions) -> Result<Header> {
    let header = Header {
        geometry: opts.geometry_for_create()?,
        hash_key: random_key()?,
        created_ms: registry::now_ms(),
        // Only if the creator itself can issue the barrier (not only see
        // it offered): else its own attach below would be refused.
        asymmetric_fences: opts.asymmetric_fences
            && sync::membarrier::expedited_available()
            && sync::membarrier::can_issue(),
    };
    file.set_len(0)?;
    // The header goes in before the file grows, READY goes in last: a
    // creator killed at any point leaves either a prefix of our magic or a
    // full header without READY, both of which the next open recreates.
    file.write_all_at(&header.encode(), 0)?;
    file.set_len(header.geometry.file_size())?;
    allocate(file, header.geometry.file_size())?;
    file.write_all_at(&INIT_READY.to_ne_bytes(), INIT_STATE_OFFSET)?;
    Ok(header)
}

/// Reserves the file's blocks now, so that a full disk is an error at
/// creation rather than a SIGBUS at the first touch of a sparse page of the
/// mapping. A file system without the call (EOPNOTSUPP) keeps the sparse
/// file, as before.
fn allocate(file: &File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: a plain system call on a descriptor borrowed for its duration.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        match rc {
            0 | libc::EOPNOTSUPP | libc::EINVAL => return Ok(()),
            libc::EINTR => continue,
            e => return Err(Error::Io(io::Error::from_raw_os_error(e))),
        }
    }
}

fn read_header(file: &File, len: u64) -> Result<Header> {
    let mut buf = vec![0u8; HEADER_SIZE.min(len) as usize];
    file.read_exact_at(&mut buf, 0)?;
    Header::decode(&buf, len)
}

/// How this process fences its biased reads in a table with `header`.
/// In a table of asymmetric fences, the process registers for the
/// expedited barrier before it attaches (so before its first plain
/// publish); if it cannot, its readers publish with locked instructions
/// (always safe), but its writers must still be able to issue the barrier
/// that other processes' plain publishes rely on.
fn fences_for(header: &Header) -> Result<Fences> {
    if !header.asymmetric_fences {
        return Ok(Fences::LOCKED);
    }
    if !sync::membarrier::can_issue() {
        return Err(Error::Incompatible {
            reason: "the table uses asymmetric fences and membarrier(2) is not available to this \
                     process (seccomp or an old kernel); create the table with \
                     TableOptions::asymmetric_fences(false)"
                .into(),
        });
    }
    Ok(Fences {
        plain_reads: sync::membarrier::register(),
        barrier_before_scan: true,
    })
}

/// A random seed for a lookup cache's index hash (std's per-process random
/// keys, varied per call).
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u64)
}

/// The lookup-cache hint for slot `slot` serving `ident`.
#[inline(always)]
fn hint_at(slot: usize, ident: Ident) -> lookup_cache::Hint {
    lookup_cache::Hint {
        slot: slot as u32,
        gen: ident.gen,
        tag: ident.tag,
    }
}

/// A blocking acquisition never reports "busy"; should it ever, the caller
/// gets a timeout rather than a panic.
fn granted<G>(g: Option<G>) -> Result<G> {
    g.ok_or(Error::Timeout)
}

impl LockTable {
    /// Creates the table file at `path`, or attaches to the existing one.
    ///
    /// Several processes opening the same new path at once end up on one
    /// table: creation happens under an OFD lock on the file. The path is
    /// opened with `O_NOFOLLOW` (a symlink planted in a shared directory is
    /// refused) and a new file gets mode `0o600` unless the options say
    /// otherwise. Anything that is not a valid table of this format gives a
    /// typed error, and the file is validated with `pread` before it is
    /// mapped.
    pub fn open(path: impl AsRef<Path>, opts: &TableOptions) -> Result<LockTable> {
        let path = path.as_ref();
        let file = {
            // No fork between the open and the registration (see `fork`).
            // Nothing in this window blocks: the init lock is waited for
            // after it.
            let _window = fork::AttachWindow::enter();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(opts.create)
                .truncate(false)
                .mode(opts.mode)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| classify_open_error(e, path))?;
            ForkSafeFile::new(file)
        };
        Self::attach_file(file, opts, Some(path.to_path_buf()))
    }

    /// A table in private memory (a `memfd`), for the threads of one process.
    pub fn anonymous(opts: &TableOptions) -> Result<LockTable> {
        let file = {
            // No fork between the creation and the registration.
            let _window = fork::AttachWindow::enter();
            // The name is a valid NUL-terminated string; memfd_create
            // returns a new descriptor that we take ownership of below.
            // SAFETY: sound for the reasons just given.
            let fd = unsafe { libc::memfd_create(c"locktable".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(Error::Io(io::Error::last_os_error()));
            }
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            ForkSafeFile::new(file)
        };
        Self::attach_file(file, opts, None)
    }

    /// Attaches through `file`, already registered for closing in forked
    /// children (so before any lock is taken on it, see `fork`).
    fn attach_file(
        file: ForkSafeFile,
        opts: &TableOptions,
        path: Option<PathBuf>,
    ) -> Result<LockTable> {
        let meta = file.metadata()?;
        let ft = meta.file_type();
        if !ft.is_file() {
            let what = if ft.is_dir() {
                "a directory"
            } else if ft.is_fifo() || ft.is_socket() || ft.is_char_device() || ft.is_block_device()
            {
                "a device, fifo or socket"
            } else {
                "not a regular file"
            };
            return Err(Error::Incompatible {
                reason: format!("table path is {what}"),
            });
        }
        let init = InitLock::take(&file)?;
        let len = file.metadata()?.len();
        let header = if len == 0 || is_abandoned_creation(&file, len)? {
            if !opts.create {
                return Err(Error::Corrupt(if len == 0 {
                    "empty file: no table was ever created here".into()
                } else {
                    "the table's creation never finished (its creator died)".into()
                }));
            }
            create_in(&file, opts)?
        } else {
            read_header(&file, len)?
        };
        opts.check_geometry(header.geometry)?;
        let fences = fences_for(&header)?;
        let region = {
            // No fork between the mmap and MADV_DONTFORK (in `new`).
            let _window = fork::AttachWindow::enter();
            let map = MmapOptions::new()
                .len(header.geometry.file_size() as usize)
                .map_raw(&*file)?;
            MappedRegion::new(map, header.geometry, fences)
        }
        .ok_or_else(|| Error::Corrupt("mapping shorter than the table".into()))?;
        if region.init_state().load(Ordering::Acquire) != INIT_READY {
            return Err(Error::Corrupt(
                "table initialisation never completed".into(),
            ));
        }
        let me = registry::attach(&region, &file)?;
        let me = match me {
            Some(i) => i,
            None => {
                return Err(Error::TooManyProcesses {
                    max_processes: header.geometry.max_processes as usize,
                })
            }
        };
        drop(init);
        let fork_epoch = file.epoch();
        let table = LockTable {
            inner: Arc::new_cyclic(|self_ref| Inner {
                region,
                file,
                me,
                hash_key: header.hash_key,
                poll_interval: opts.poll_interval,
                reader_bias: opts.reader_bias,
                reap_lock: Mutex::new(()),
                fork_epoch,
                path,
                hints: OnceLock::new(),
                self_ref: self_ref.clone(),
                watcher: OnceLock::new(),
            }),
        };
        // Recovery also runs on attach: free the records of dead processes.
        if opts.reap_on_attach {
            table.reap()?;
        }
        Ok(table)
    }

    /// The geometry of this table.
    pub fn geometry(&self) -> Geometry {
        self.inner.region.geometry()
    }

    /// Whether this handle's biased reads publish with plain stores (the
    /// table uses asymmetric fences, this process registered for
    /// `membarrier`, and its run-queue refresh ran; see
    /// [`TableOptions::asymmetric_fences`]). False: they use locked
    /// instructions, as on a table created without them; on a table with
    /// asymmetric fences that means the process could not register, runs
    /// under a seccomp filter (where it does not fork), or its refresh
    /// child failed or took over 2 s.
    pub fn asymmetric_fences(&self) -> bool {
        self.inner.region.fences().plain_reads
    }

    /// This handle's process index (its record and lane in every slot).
    pub fn process_index(&self) -> u32 {
        self.inner.me
    }

    /// Releases the holds of every dead process. Returns, per reclaimed
    /// record, its index, its last PID (display only) and what was released.
    pub fn reap(&self) -> Result<Vec<(u32, u32, SweepReport)>> {
        self.check_fork()?;
        let mut out = Vec::new();
        for i in 0..self.geometry().max_processes {
            let rec = self.inner.region.record(i as usize);
            if i == self.inner.me || rec.state.load(Ordering::Acquire) == registry::RECORD_FREE {
                continue;
            }
            let pid = rec.pid.load(Ordering::Relaxed);
            if let Some(r) = self.inner.reap(i)? {
                out.push((i, pid, r));
            }
        }
        Ok(out)
    }

    /// A snapshot of the table: slots, processes, holders and waiters.
    pub fn stats(&self) -> Result<TableStats> {
        self.check_fork()?;
        Ok(stats::collect(&self.inner))
    }

    #[inline]
    fn check_fork(&self) -> Result<()> {
        if self.inner.forked() {
            Err(Error::ForkedChild)
        } else {
            Ok(())
        }
    }

    #[inline]
    fn tag(&self, id: &[u8]) -> Result<Tag> {
        if id.is_empty() {
            return Err(Error::InvalidId { reason: "empty" });
        }
        if id.len() > MAX_ID_LEN {
            return Err(Error::InvalidId {
                reason: "longer than MAX_ID_LEN (256) bytes",
            });
        }
        Ok(index::tag_of(self.inner.hash_key, id))
    }

    /// Looks up (or assigns) the slot of `id` and runs `op` on it until it
    /// does not report a stale slot. The lookup cache is tried first; on a
    /// miss the lock-free table lookup runs and refills the way the probe
    /// chose (an ID that must be inserted fills it after the insertion). `op`
    /// re-checks the slot's identity (generation, then tag) after announcing
    /// or claiming, so a stale hint only costs a retry through the full
    /// lookup. The bucket locks of an insertion honour `wait` too.
    #[inline]
    fn acquire(
        &self,
        id: &[u8],
        wait: Wait,
        op: impl Fn(SlotRef<'_>, Ident) -> std::result::Result<Granted, Fail>,
    ) -> Result<Option<(u32, Granted)>> {
        self.check_fork()?;
        let inner = &*self.inner;
        // The identity comes as scalars, not as an `Ident`: this closure is
        // called out of line, and an `Ident` argument goes through memory,
        // written as 8-byte fields by the caller and copied here as one
        // 16-byte load, which the CPU cannot forward from two stores (perf
        // annotate: the largest stall of a new-ID read, DESIGN §5).
        let attempt = |slot: u32, gen: u32, t0: u64, t1: u64| {
            let ident = Ident { gen, tag: [t0, t1] };
            let r = op(inner.slot(slot), ident);
            if wait.is_none() && r == Err(Fail::Busy) && inner.sweep_for_try(slot) {
                op(inner.slot(slot), ident)
            } else {
                r
            }
        };
        // Where a refill of the lookup cache goes (an ID missed, or its
        // hint was stale), and the tag once computed, for the insertion
        // path below.
        let mut key = None;
        let mut tag = None;
        let hint = match inner.hints().probe(id) {
            Cached::Hit(hint) => Some(hint),
            Cached::Miss(k) => {
                key = Some(k);
                let t = self.tag(id)?;
                tag = Some(t);
                let found = index::find(&inner.region, t).map(|(slot, ident)| hint_at(slot, ident));
                if let Some(hint) = found {
                    inner.hints().put(&k, id, hint);
                }
                found
            }
            Cached::Uncached => None,
        };
        if let Some(hint) = hint {
            // A cheap early look at the tag; `op` re-checks it after the
            // hold is announced, which is what makes the hint safe.
            let same_id = inner.slot(hint.slot).has_tag(hint.tag);
            #[cfg(test)]
            tests::hooks::after_lookup(inner, hint.slot, id);
            match same_id.then(|| attempt(hint.slot, hint.gen, hint.tag[0], hint.tag[1])) {
                // Stale: the full path's result overwrites the entry.
                Some(Err(Fail::Stale)) | None => key = inner.hints().key(id),
                Some(other) => return Self::outcome(hint.slot, other),
            }
        }
        let tag = match tag {
            Some(t) => t,
            None => self.tag(id)?,
        };
        let mut reaped = false;
        loop {
            let (slot, ident) =
                match index::find_or_insert(&inner.region, tag, inner.me, inner, wait) {
                    Ok(Some(found)) => found,
                    Ok(None) if !reaped => {
                        reaped = true;
                        self.reap()?;
                        continue;
                    }
                    Ok(None) => {
                        return Err(Error::TableFull {
                            capacity: self.geometry().capacity as usize,
                        })
                    }
                    Err(fail) => return Self::outcome(0, Err(fail)),
                };
            let slot = slot as u32;
            #[cfg(test)]
            tests::hooks::after_lookup(inner, slot, id);
            match attempt(slot, ident.gen, ident.tag[0], ident.tag[1]) {
                Err(Fail::Stale) => continue,
                other => {
                    if let Some(k) = &key {
                        inner.hints().put(k, id, hint_at(slot as usize, ident));
                    }
                    return Self::outcome(slot, other);
                }
            }
        }
    }

    #[inline]
    fn outcome(slot: u32, r: std::result::Result<Granted, Fail>) -> Result<Option<(u32, Granted)>> {
        match r {
            Ok(granted) => Ok(Some((slot, granted))),
            Err(Fail::Busy) => Ok(None),
            Err(Fail::Timeout) => Err(Error::Timeout),
            Err(Fail::HoldLimit) => Err(Error::HoldLimit {
                limit: lockword::MAX_READS_PER_PROCESS,
            }),
            Err(Fail::Stale) => unreachable!("stale slots are retried by the caller"),
        }
    }

    #[inline]
    fn deadline(timeout: Duration) -> Wait {
        Some(crate::sync::now().checked_add(timeout))
    }

    #[inline]
    fn read_with(&self, id: &[u8], wait: Wait) -> Result<Option<ReadGuard<'_>>> {
        let inner = &*self.inner;
        Ok(self
            .acquire(id, wait, |s, g| {
                let row = if inner.reader_bias {
                    reader_row::reader_row()
                } else {
                    None
                };
                s.read(inner.me, row, g, wait, inner)
            })?
            .map(|(slot, gr)| ReadGuard::granted(TableRef::Borrowed(&self.inner), slot, gr)))
    }

    #[inline]
    fn upgradable_with(&self, id: &[u8], wait: Wait) -> Result<Option<UpgradableReadGuard<'_>>> {
        let inner = &*self.inner;
        Ok(self
            .acquire(id, wait, |s, g| s.upgradable(inner.me, g, wait, inner))?
            .map(|(slot, gr)| {
                UpgradableReadGuard::new(TableRef::Borrowed(&self.inner), slot, gr.owner_died)
            }))
    }

    #[inline]
    fn write_with(&self, id: &[u8], wait: Wait) -> Result<Option<WriteGuard<'_>>> {
        let inner = &*self.inner;
        Ok(self
            .acquire(id, wait, |s, g| s.write(inner.me, g, wait, inner))?
            .map(|(slot, gr)| {
                WriteGuard::new(TableRef::Borrowed(&self.inner), slot, gr.owner_died)
            }))
    }

    /// Blocks until `id` is held for reading (shared with other readers and
    /// with one upgradable holder).
    #[inline]
    pub fn read(&self, id: impl AsRef<[u8]>) -> Result<ReadGuard<'_>> {
        let id = id.as_ref();
        if let Some(guard) = self.read_cached_biased(id) {
            return Ok(guard);
        }
        self.read_with(id, Some(None)).and_then(granted)
    }

    /// The fast path of a read: one biased attempt through this thread's
    /// reader row on the slot the lookup cache names, or, on a cache miss,
    /// the slot the lock-free table lookup finds (which refills the cache,
    /// as the full path does). `None` for anything else (an ID not in the
    /// table yet, a slot that is not biased, a writer, a stale hint, a full
    /// row, a forked child, an invalid or uncacheable ID): the caller takes
    /// the full path, which decides. The attempt validates the slot exactly
    /// as the full path does (state, generation and tag after the publish),
    /// so taking this path first changes no outcome, only the cost.
    #[inline(always)]
    fn read_cached_biased(&self, id: &[u8]) -> Option<ReadGuard<'_>> {
        let inner = &*self.inner;
        if !inner.reader_bias || inner.forked() {
            return None;
        }
        let row = reader_row::reader_row()?;
        let hint = match inner.hints().probe(id) {
            Cached::Hit(hint) => hint,
            Cached::Miss(key) => self.look_up_missed(&key, id)?,
            Cached::Uncached => return None,
        };
        #[cfg(test)]
        tests::hooks::after_lookup(inner, hint.slot, id);
        let granted = inner.slot(hint.slot).try_read_biased(
            inner.me,
            row,
            Ident {
                gen: hint.gen,
                tag: hint.tag,
            },
        )?;
        Some(ReadGuard::granted(
            TableRef::Borrowed(&self.inner),
            hint.slot,
            granted,
        ))
    }

    /// The fast path's cache miss: the keyed tag and the lock-free table
    /// lookup, then the refill into the way the probe chose (`None`: the ID
    /// is not in the table or is invalid; the full path inserts or reports).
    #[inline(never)]
    fn look_up_missed(&self, key: &lookup_cache::Key, id: &[u8]) -> Option<lookup_cache::Hint> {
        let inner = &*self.inner;
        let tag = self.tag(id).ok()?;
        let (slot, ident) = index::find(&inner.region, tag)?;
        let hint = hint_at(slot, ident);
        inner.hints().put(key, id, hint);
        Some(hint)
    }

    /// Takes a read hold if that needs no waiting; `Ok(None)` when busy.
    ///
    /// A try never waits for a holder. It may spin for microseconds while
    /// another process updates the ID's bucket (inserting another ID), and
    /// returns `Ok(None)` if that process stays. A try that finds the ID
    /// held by a dead process releases the dead holds first (at most one
    /// such check per thread per poll interval).
    #[inline]
    pub fn try_read(&self, id: impl AsRef<[u8]>) -> Result<Option<ReadGuard<'_>>> {
        self.read_with(id.as_ref(), None)
    }
    /// Like [`read`](Self::read), but gives up with [`Error::Timeout`]. The
    /// deadline covers the whole acquisition, including the wait for the
    /// ID's bucket, and a zero timeout does not spin.
    #[inline]
    pub fn read_timeout(&self, id: impl AsRef<[u8]>, timeout: Duration) -> Result<ReadGuard<'_>> {
        self.read_with(id.as_ref(), Self::deadline(timeout))
            .and_then(granted)
    }

    /// Blocks until `id` is held upgradable: shared with readers, exclusive
    /// against writers and other upgradable holders.
    ///
    /// A writer that already waits goes first: new upgradable holds are not
    /// granted while one does. Returns [`Error::HoldLimit`] if this process
    /// holds more reads of `id` than [`read`](Self::read) allows (possible
    /// only through downgrades), because this hold's own downgrade would
    /// have no room.
    #[inline]
    pub fn upgradable_read(&self, id: impl AsRef<[u8]>) -> Result<UpgradableReadGuard<'_>> {
        self.upgradable_with(id.as_ref(), Some(None))
            .and_then(granted)
    }
    /// Non-blocking [`upgradable_read`](Self::upgradable_read).
    #[inline]
    pub fn try_upgradable_read(
        &self,
        id: impl AsRef<[u8]>,
    ) -> Result<Option<UpgradableReadGuard<'_>>> {
        self.upgradable_with(id.as_ref(), None)
    }
    /// [`upgradable_read`](Self::upgradable_read) with a deadline.
    #[inline]
    pub fn upgradable_read_timeout(
        &self,
        id: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<UpgradableReadGuard<'_>> {
        self.upgradable_with(id.as_ref(), Self::deadline(timeout))
            .and_then(granted)
    }

    /// Blocks until `id` is held exclusively.
    #[inline]
    pub fn write(&self, id: impl AsRef<[u8]>) -> Result<WriteGuard<'_>> {
        self.write_with(id.as_ref(), Some(None)).and_then(granted)
    }
    /// Non-blocking [`write`](Self::write), with the semantics of
    /// [`try_read`](Self::try_read). While readers hold the ID it fails
    /// without leaving any trace (no concurrent `try_read` fails because of
    /// it).
    #[inline]
    pub fn try_write(&self, id: impl AsRef<[u8]>) -> Result<Option<WriteGuard<'_>>> {
        self.write_with(id.as_ref(), None)
    }
    /// [`write`](Self::write) with a deadline.
    #[inline]
    pub fn write_timeout(&self, id: impl AsRef<[u8]>, timeout: Duration) -> Result<WriteGuard<'_>> {
        self.write_with(id.as_ref(), Self::deadline(timeout))
            .and_then(granted)
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
