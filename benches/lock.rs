//! Lock benchmarks: this crate against the anchors, all in one criterion run.
//!
//! Mechanisms (each one's `NAME` is its criterion function name):
//! - `locktable`: a file-backed [`LockTable`] in a tempdir; every operation
//!   goes by ID (keyed hash, slot lookup, lock word, guard drop).
//! - `locktable_locked`: the same with `TableOptions::asymmetric_fences(false)`
//!   (biased reads publish with locked instructions, the protocol before
//!   asymmetric fences), measured in the same run.
//! - `locktable_nobias`: the same with `TableOptions::reader_bias(false)`
//!   (reads always count in the process's lane), to show what the reader
//!   bias changes, in the same run.
//! - `parking_lot`, `std`: in-process `RwLock<()>`, pre-indexed (no ID lookup).
//! - `pthread_pshared`: a `pthread_rwlock_t` with `PTHREAD_PROCESS_SHARED`
//!   living in a `MAP_SHARED` file mapping, pre-indexed (no ID lookup).
//! - `flock_fd`: `flock(LOCK_SH|LOCK_EX)` + `flock(LOCK_UN)` on a descriptor
//!   opened once per ID and per worker.
//! - `open_flock_close`: `open` + `flock` + `flock(LOCK_UN)` + `close` per
//!   operation (the Beaker / Apache::Session way).
//!
//! Scenarios (criterion groups):
//! - `uncontended_read`, `uncontended_write`: one thread, acquire + release,
//!   always the same ID.
//! - `uncontended_read_256ids`, `uncontended_read_2048ids`: one thread
//!   reading 256 or 2048 IDs in turn. Each read is of an ID new to the
//!   CPU's L1 cache; this crate finds it in the process's lookup cache
//!   (per thread before issue #13, 512 IDs, so 2048 IDs missed it and paid
//!   the keyed hash and the bucket scan every time). For a server, the
//!   2048-ID cycle is a session new to the thread that serves the request
//!   but known to the process.
//! - `uncontended_read_new_to_process` (`locktable*` only): 2048 IDs that
//!   are in the table (another handle locked them), each read once through
//!   a handle that has never locked them (a fresh attachment for every
//!   2048 reads, opened, its mapping's pages touched and dropped outside
//!   the timing): the keyed hash,
//!   the bucket scan and the cache's refill on every read, as in a process
//!   that sees a session for the first time. The pre-indexed anchors have
//!   no lookup; their figure for a new ID is `uncontended_read_2048ids`.
//! - `same_id_2threads`: two threads reading one ID; `iter_custom`, threads
//!   released together by a `Barrier`, reported as ns per operation per thread.
//! - `distinct_ids/<mech>/<n>`: n threads, each on its own ID, ns per
//!   operation per thread (flat = perfect scaling). Thread counts come from
//!   `LOCKTABLE_BENCH_THREADS` (default `1,2`).
//! - `same_id_2procs`: the parent reads one ID while a child process (this
//!   binary re-executed, which opens the table / mapping / file itself) reads
//!   the same ID in a loop; the parent's time per operation is reported.
//! - `same_id_readers/<mech>/<n>` (threads) and `same_id_reader_procs/<mech>/<n>`
//!   (processes: re-executed children told "do N reads" through a pipe, each
//!   answering with its CLOCK_MONOTONIC start and end): n readers of one ID,
//!   ns per operation per reader from the first start to the last finish
//!   (aggregate throughput = n / that). Counts from `LOCKTABLE_BENCH_READERS`
//!   (default `1,2,4,8,16`). Processes only for `locktable` and
//!   `pthread_pshared` (the in-process locks cannot be shared).
//! - `write_beside_2_readers`: one thread's write cycle on the hot ID while
//!   two threads read it in a loop (writer latency under readers).
//! - `bias_publish`: the reader's publication primitive alone, a store to a
//!   private line then a load of a shared one: `swap` (the fenced publish)
//!   against a plain store (what the asymmetric-fence variant would do).
//!
//! On a machine shared with other work, `LOCKTABLE_BENCH_MIN_CHUNK=1000`
//! makes the `uncontended_*` groups report the fastest 1000-operation chunk
//! of each sample (see [`MIN_CHUNK_ENV`]).
//!
//! Run part of it with a criterion filter (a regex over `group/function`):
//! `cargo bench --bench lock -- uncontended_read` or `-- 'locktable|pthread'`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use crossbeam_utils::CachePadded;
use locktable::{LockTable, TableOptions};
use memmap2::{MmapOptions, MmapRaw};

/// Set in the environment of a re-executed child: the spec of what it reads.
const CHILD_ENV: &str = "LOCKTABLE_BENCH_CHILD";
/// Thread counts for `distinct_ids`, comma separated.
const THREADS_ENV: &str = "LOCKTABLE_BENCH_THREADS";
/// Reader counts for `same_id_readers` and `same_id_reader_procs`.
const READERS_ENV: &str = "LOCKTABLE_BENCH_READERS";
/// Set (to any value) in a child that reads in rounds commanded on stdin
/// (`same_id_reader_procs`) instead of in a free loop.
const CHILD_ROUNDS_ENV: &str = "LOCKTABLE_BENCH_CHILD_ROUNDS";
/// Diagnostic: when set to 1, every `locktable` worker opens its own handle
/// (its own attachment) instead of cloning the shared one.
const OWN_HANDLE_ENV: &str = "LOCKTABLE_BENCH_OWN_HANDLE";
/// For a machine shared with other work: when set to a number of
/// operations (e.g. 1000), each sample of the `uncontended_*` groups is
/// timed in chunks of that many operations and reports the fastest chunk's
/// time per operation (times the sample's iterations). A chunk that a
/// preemption or another process's cache traffic slowed down then does not
/// count, so the figure measures the code rather than the scheduler. Every
/// mechanism of a run is measured the same way.
const MIN_CHUNK_ENV: &str = "LOCKTABLE_BENCH_MIN_CHUNK";

/// IDs used by the benchmarks: session-cookie-like, 24 bytes each (the
/// shape of base64 over 18 random bytes). ID 0 is the "hot" ID shared by the
/// same-ID scenarios; ID i (i >= 1) belongs to worker i of `distinct_ids`.
fn session_id(i: usize) -> String {
    // Deterministic but irregular: a multiplicative hash spread over the
    // base64 alphabet, so IDs do not share long prefixes.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut s = String::with_capacity(24);
    for _ in 0..24 {
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        s.push(ALPHABET[(x >> 58) as usize] as char);
    }
    s
}

/// How many IDs `uncontended_read_256ids` cycles through.
const MANY_IDS: usize = 256;

/// The first ID of `uncontended_read_256ids` (after the hot ID and one per
/// thread).
fn many_ids_base(threads: &[usize]) -> usize {
    threads.iter().copied().max().unwrap_or(1) + 1
}

/// How many IDs `uncontended_read_2048ids` cycles through (and
/// `uncontended_read_new_to_process` reads per fresh handle): far more than
/// the L1 cache holds the lines of.
const MISS_IDS: usize = 2048;

/// The most IDs any scenario uses.
fn id_count(threads: &[usize]) -> usize {
    many_ids_base(threads) + MISS_IDS
}

/// One thread's (or process's) handle on the lock for one ID.
trait Worker: Send {
    /// Acquire for reading and release.
    fn read_cycle(&mut self);
    /// Acquire for writing and release.
    fn write_cycle(&mut self);
}

/// A lock mechanism under test, with one lock per benchmark ID.
trait Mechanism: Sync {
    type W: Worker;
    /// The worker of ID number `id`, for one thread.
    fn worker(&self, id: usize) -> Self::W;
    /// Arguments for a child process reading ID 0 (`None`: in-process only).
    fn child_spec(&self) -> Option<String>;
}

/// Workers for `count` IDs, used in turn.
struct Cycle<W> {
    workers: Vec<W>,
    next: usize,
}

impl<W: Worker> Cycle<W> {
    fn new<M: Mechanism<W = W>>(mech: &M, first_id: usize, count: usize) -> Self {
        Cycle {
            workers: (first_id..first_id + count)
                .map(|i| mech.worker(i))
                .collect(),
            next: 0,
        }
    }
    #[inline]
    fn read_cycle(&mut self) {
        self.workers[self.next].read_cycle();
        self.next = (self.next + 1) % self.workers.len();
    }
}

// ---------------------------------------------------------------- locktable

struct TableMech {
    _dir: tempfile::TempDir,
    path: PathBuf,
    table: LockTable,
    ids: Vec<String>,
    own_handles: bool,
    kind: &'static str,
}

impl TableMech {
    /// `kind`: one of the names [`table_options`] knows.
    fn new(ids: usize, kind: &'static str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("locks");
        let table = LockTable::open(&path, &table_options(kind)).expect("open table");
        TableMech {
            _dir: dir,
            path,
            table,
            ids: (0..ids).map(session_id).collect(),
            own_handles: std::env::var(OWN_HANDLE_ENV).is_ok_and(|v| v == "1"),
            kind,
        }
    }
}

/// The options of each `locktable*` mechanism (a child process opens the
/// parent's file, so the file's fences apply to it too).
fn table_options(kind: &str) -> TableOptions {
    match kind {
        // Asymmetric fences asked for: off by default since stop 19 (see
        // `TableOptions::asymmetric_fences`), measured as before.
        "locktable" => TableOptions::default().asymmetric_fences(true),
        "locktable_locked" => TableOptions::default().asymmetric_fences(false),
        "locktable_nobias" => TableOptions::default().reader_bias(false),
        other => panic!("unknown table kind {other:?}"),
    }
}

struct TableWorker {
    table: LockTable,
    id: Vec<u8>,
}

impl Worker for TableWorker {
    #[inline]
    fn read_cycle(&mut self) {
        let g = self.table.read(black_box(&self.id[..])).expect("read");
        drop(black_box(g));
    }
    #[inline]
    fn write_cycle(&mut self) {
        let g = self.table.write(black_box(&self.id[..])).expect("write");
        drop(black_box(g));
    }
}

impl Mechanism for TableMech {
    type W = TableWorker;
    fn worker(&self, id: usize) -> TableWorker {
        let table = if self.own_handles {
            LockTable::open(&self.path, &table_options(self.kind)).expect("open table")
        } else {
            self.table.clone()
        };
        TableWorker {
            table,
            id: self.ids[id].clone().into_bytes(),
        }
    }
    fn child_spec(&self) -> Option<String> {
        Some(format!(
            "{}\n{}\n{}",
            self.kind,
            self.path.display(),
            self.ids[0]
        ))
    }
}

// ------------------------------------------------- in-process RwLocks

/// In-process locks, one per ID, leaked so workers hold plain `&'static`
/// references: the lock is "pre-indexed", with no bounds check or `Arc`.
fn leak_locks<T: Default>(ids: usize) -> &'static [CachePadded<T>] {
    Box::leak((0..ids).map(|_| CachePadded::new(T::default())).collect())
}

struct ParkingLotMech(&'static [CachePadded<parking_lot::RwLock<()>>]);
struct ParkingLotWorker(&'static parking_lot::RwLock<()>);

impl Worker for ParkingLotWorker {
    #[inline]
    fn read_cycle(&mut self) {
        drop(black_box(black_box(self.0).read()));
    }
    #[inline]
    fn write_cycle(&mut self) {
        drop(black_box(black_box(self.0).write()));
    }
}

impl Mechanism for ParkingLotMech {
    type W = ParkingLotWorker;
    fn worker(&self, id: usize) -> ParkingLotWorker {
        ParkingLotWorker(&self.0[id])
    }
    fn child_spec(&self) -> Option<String> {
        None
    }
}

struct StdMech(&'static [CachePadded<std::sync::RwLock<()>>]);
struct StdWorker(&'static std::sync::RwLock<()>);

impl Worker for StdWorker {
    #[inline]
    fn read_cycle(&mut self) {
        drop(black_box(black_box(self.0).read().expect("poisoned")));
    }
    #[inline]
    fn write_cycle(&mut self) {
        drop(black_box(black_box(self.0).write().expect("poisoned")));
    }
}

impl Mechanism for StdMech {
    type W = StdWorker;
    fn worker(&self, id: usize) -> StdWorker {
        StdWorker(&self.0[id])
    }
    fn child_spec(&self) -> Option<String> {
        None
    }
}

// ------------------------------------- pthread process-shared rwlock

/// Distance between two rwlocks in the mapping: two cache lines, so that
/// neighbouring IDs never share a line (nor an adjacent-line prefetch pair).
const PTHREAD_STRIDE: usize = 128;

/// A file-backed `MAP_SHARED` mapping holding one process-shared rwlock per
/// ID, `PTHREAD_STRIDE` bytes apart.
struct PthreadMech {
    _dir: tempfile::TempDir,
    path: PathBuf,
    map: Arc<MmapRaw>,
    count: usize,
}

fn map_shared(path: &Path, len: usize) -> MmapRaw {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open mapping file");
    MmapOptions::new()
        .len(len)
        .map_raw(&file)
        .expect("map shared")
}

impl PthreadMech {
    fn new(count: usize) -> Self {
        const _: () = assert!(std::mem::size_of::<libc::pthread_rwlock_t>() <= PTHREAD_STRIDE);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rwlocks");
        let len = count * PTHREAD_STRIDE;
        File::create(&path)
            .and_then(|f| f.set_len(len as u64))
            .expect("create mapping file");
        let map = map_shared(&path, len);
        let mut attr = std::mem::MaybeUninit::<libc::pthread_rwlockattr_t>::uninit();
        // `attr` is writable storage for one attribute object;
        // pthread_rwlockattr_init initialises it before anything reads it,
        // and we check its result before using the object. The rwlocks are
        // initialised at offsets i * PTHREAD_STRIDE (i < count), which lie
        // inside the `count * PTHREAD_STRIDE`-byte mapping, are 128-byte
        // aligned within a page-aligned mapping (more than the type's
        // alignment), and are not in use by anyone yet (the file is new and
        // no child has been started). The mapping outlives every pointer
        // into it: workers hold an `Arc` of it.
        // SAFETY: sound for the reasons just given.
        unsafe {
            let a = attr.as_mut_ptr();
            assert_eq!(libc::pthread_rwlockattr_init(a), 0);
            assert_eq!(
                libc::pthread_rwlockattr_setpshared(a, libc::PTHREAD_PROCESS_SHARED),
                0
            );
            for i in 0..count {
                let lock = map.as_mut_ptr().add(i * PTHREAD_STRIDE) as *mut libc::pthread_rwlock_t;
                assert_eq!(libc::pthread_rwlock_init(lock, a), 0);
            }
            libc::pthread_rwlockattr_destroy(a);
        }
        PthreadMech {
            _dir: dir,
            path,
            map: Arc::new(map),
            count,
        }
    }
}

struct PthreadWorker {
    /// Keeps the mapping alive for as long as `lock` is used.
    _map: Arc<MmapRaw>,
    lock: *mut libc::pthread_rwlock_t,
}

// the pointer targets a process-shared rwlock inside a mapping that
// the worker keeps alive through its `Arc`; pthread rwlocks are designed to
// be locked and unlocked from any thread (a worker releases on the thread
// that acquired, within one call), so moving the worker to another thread
// is sound.
// SAFETY: sound for the reasons just given.
unsafe impl Send for PthreadWorker {}

impl Worker for PthreadWorker {
    #[inline]
    fn read_cycle(&mut self) {
        // `lock` points to an initialised process-shared rwlock in a
        // live mapping (see `PthreadWorker`); we release the hold we just
        // took, on the same thread, and never hold it across calls.
        // SAFETY: sound for the reasons just given.
        unsafe {
            let rc = libc::pthread_rwlock_rdlock(black_box(self.lock));
            debug_assert_eq!(rc, 0);
            libc::pthread_rwlock_unlock(self.lock);
        }
    }
    #[inline]
    fn write_cycle(&mut self) {
        // SAFETY: as in `read_cycle`, with an exclusive hold.
        unsafe {
            let rc = libc::pthread_rwlock_wrlock(black_box(self.lock));
            debug_assert_eq!(rc, 0);
            libc::pthread_rwlock_unlock(self.lock);
        }
    }
}

impl Mechanism for PthreadMech {
    type W = PthreadWorker;
    fn worker(&self, id: usize) -> PthreadWorker {
        assert!(id < self.count);
        // `add` stays inside the mapping: id < count, and the mapping is
        // count * PTHREAD_STRIDE bytes (no dereference happens here).
        let lock = self.map.as_mut_ptr().wrapping_add(id * PTHREAD_STRIDE);
        PthreadWorker {
            _map: self.map.clone(),
            lock: lock as *mut libc::pthread_rwlock_t,
        }
    }
    fn child_spec(&self) -> Option<String> {
        Some(format!(
            "pthread\n{}\n{}",
            self.path.display(),
            self.count * PTHREAD_STRIDE
        ))
    }
}

impl Drop for PthreadMech {
    fn drop(&mut self) {
        // Every worker and child is gone once the mechanism is dropped (the
        // scenarios join their threads and wait for their children), so the
        // locks are unheld. The `Arc` count tells us nobody kept one.
        if Arc::strong_count(&self.map) == 1 {
            for i in 0..self.count {
                // the lock at this offset was initialised in `new`,
                // nothing holds or uses it any more (no other `Arc` of the
                // mapping exists and all child processes have exited), and it
                // is destroyed exactly once.
                // SAFETY: sound for the reasons just given.
                unsafe {
                    libc::pthread_rwlock_destroy(self.map.as_mut_ptr().add(i * PTHREAD_STRIDE)
                        as *mut libc::pthread_rwlock_t);
                }
            }
        }
    }
}

// ------------------------------------------------------------- flock

/// One lock file per ID in a tempdir.
struct LockFiles {
    _dir: tempfile::TempDir,
    paths: Vec<PathBuf>,
}

impl LockFiles {
    fn new(ids: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths: Vec<PathBuf> = (0..ids)
            .map(|i| dir.path().join(format!("{}.lock", session_id(i))))
            .collect();
        for p in &paths {
            File::create(p).expect("create lock file");
        }
        LockFiles { _dir: dir, paths }
    }
}

fn flock(fd: i32, op: i32) {
    // flock only reads its integer arguments; an invalid descriptor
    // would give EBADF (checked below), never undefined behaviour.
    // SAFETY: sound for the reasons just given.
    let rc = unsafe { libc::flock(fd, op) };
    if rc != 0 {
        panic!("flock: {}", std::io::Error::last_os_error());
    }
}

/// `flock` on a descriptor this worker opened once (its own open file
/// description, as another process would have).
struct FlockFdMech(LockFiles);
struct FlockFdWorker(File);

impl Worker for FlockFdWorker {
    #[inline]
    fn read_cycle(&mut self) {
        let fd = self.0.as_raw_fd();
        flock(fd, libc::LOCK_SH);
        flock(fd, libc::LOCK_UN);
    }
    #[inline]
    fn write_cycle(&mut self) {
        let fd = self.0.as_raw_fd();
        flock(fd, libc::LOCK_EX);
        flock(fd, libc::LOCK_UN);
    }
}

fn open_lock_file(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open lock file")
}

impl Mechanism for FlockFdMech {
    type W = FlockFdWorker;
    fn worker(&self, id: usize) -> FlockFdWorker {
        FlockFdWorker(open_lock_file(&self.0.paths[id]))
    }
    fn child_spec(&self) -> Option<String> {
        Some(format!("flock_fd\n{}", self.0.paths[0].display()))
    }
}

/// `open` + `flock` + unlock + `close` per operation.
struct OpenFlockMech(LockFiles);
struct OpenFlockWorker(CString);

impl OpenFlockWorker {
    fn new(path: &Path) -> Self {
        OpenFlockWorker(CString::new(path.as_os_str().as_bytes()).expect("NUL in path"))
    }
    #[inline]
    fn cycle(&mut self, op: i32) {
        // `self.0` is a valid NUL-terminated path that outlives the
        // call; open returns a new descriptor (checked) that only this
        // function uses and closes exactly once.
        // SAFETY: sound for the reasons just given.
        unsafe {
            let fd = libc::open(
                self.0.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            );
            if fd < 0 {
                panic!("open: {}", std::io::Error::last_os_error());
            }
            flock(fd, op);
            flock(fd, libc::LOCK_UN);
            libc::close(fd);
        }
    }
}

impl Worker for OpenFlockWorker {
    #[inline]
    fn read_cycle(&mut self) {
        self.cycle(libc::LOCK_SH);
    }
    #[inline]
    fn write_cycle(&mut self) {
        self.cycle(libc::LOCK_EX);
    }
}

impl Mechanism for OpenFlockMech {
    type W = OpenFlockWorker;
    fn worker(&self, id: usize) -> OpenFlockWorker {
        OpenFlockWorker::new(&self.0.paths[id])
    }
    fn child_spec(&self) -> Option<String> {
        Some(format!("open_flock_close\n{}", self.0.paths[0].display()))
    }
}

// ------------------------------------------------------------ scenarios

/// `threads` threads, worker `i` built by `make(i)`, each doing `iters`
/// read cycles once all are ready; returns the wall time from the first
/// start to the last finish, so criterion reports ns per op per thread.
fn run_threads<M: Mechanism>(
    mech: &M,
    threads: usize,
    iters: u64,
    id_of: impl Fn(usize) -> usize + Sync,
) -> Duration {
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mut w = mech.worker(id_of(t));
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        w.read_cycle();
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let first = spans.iter().map(|s| s.0).min().expect("threads");
    let last = spans.iter().map(|s| s.1).max().expect("threads");
    last - first
}

/// A re-executed copy of this binary reading ID 0 of a mechanism in a loop
/// until its stdin closes.
struct ChildReader {
    child: Child,
}

impl ChildReader {
    fn start(spec: &str) -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .env(CHILD_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child reader");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("child stdout"))
            .read_line(&mut line)
            .expect("child ready line");
        assert_eq!(line.trim(), "ready", "child reader did not start");
        ChildReader { child }
    }

    fn stop(mut self) {
        drop(self.child.stdin.take());
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        let status = self.child.wait().expect("wait child");
        assert!(status.success(), "child reader failed: {status}");
        eprintln!("  (child reader did {} read cycles)", out.trim());
    }
}

/// The child side: attach to the mechanism named in `spec` on our own
/// (own table handle, own mapping, own descriptor), say "ready", read ID 0
/// until stdin reaches EOF, then print the number of cycles done.
fn child_main(spec: &str) {
    let mut parts = spec.split('\n');
    let kind = parts.next().unwrap_or_default();
    let path = PathBuf::from(parts.next().expect("child spec: path"));
    let arg = parts.next().unwrap_or_default().to_owned();
    let mut worker: Box<dyn Worker> = match kind {
        "locktable" | "locktable_locked" | "locktable_nobias" => Box::new(TableWorker {
            table: LockTable::open(&path, &table_options(kind)).expect("child open table"),
            id: arg.into_bytes(),
        }),
        "pthread" => {
            let len: usize = arg.parse().expect("child spec: length");
            let map = Arc::new(map_shared(&path, len));
            let lock = map.as_mut_ptr() as *mut libc::pthread_rwlock_t;
            Box::new(PthreadWorker { _map: map, lock })
        }
        "flock_fd" => Box::new(FlockFdWorker(open_lock_file(&path))),
        "open_flock_close" => Box::new(OpenFlockWorker::new(&path)),
        other => panic!("unknown child kind {other:?}"),
    };
    if std::env::var_os(CHILD_ROUNDS_ENV).is_some() {
        // Stdin carries the rounds: no thread may read it to EOF.
        worker.read_cycle();
        let mut out = std::io::stdout();
        writeln!(out, "ready")
            .and_then(|_| out.flush())
            .expect("ready");
        child_rounds(&mut *worker, &mut out);
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::Relaxed);
        });
    }
    // Warm the path once before announcing readiness.
    worker.read_cycle();
    let mut out = std::io::stdout();
    writeln!(out, "ready")
        .and_then(|_| out.flush())
        .expect("ready");
    let mut cycles: u64 = 1;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            worker.read_cycle();
        }
        cycles += 64;
    }
    drop(worker);
    writeln!(out, "{cycles}")
        .and_then(|_| out.flush())
        .expect("count");
}

/// CLOCK_MONOTONIC in ns: comparable between processes (`Instant` is not
/// printable).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec for the whole call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A child in rounds: for each line "N" on stdin, N read cycles, then the
/// line "start end" (monotonic ns) on stdout; returns at EOF.
fn child_rounds(worker: &mut dyn Worker, out: &mut std::io::Stdout) {
    for line in std::io::stdin().lines() {
        let n: u64 = line.expect("round").trim().parse().expect("round count");
        let start = monotonic_ns();
        for _ in 0..n {
            worker.read_cycle();
        }
        let end = monotonic_ns();
        writeln!(out, "{start} {end}")
            .and_then(|_| out.flush())
            .expect("round result");
    }
}

/// `n` re-executed children reading ID 0 in rounds.
struct ReaderProcs {
    children: Vec<(Child, BufReader<std::process::ChildStdout>)>,
}

impl ReaderProcs {
    fn start(spec: &str, n: usize) -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let children = (0..n)
            .map(|_| {
                let mut child = Command::new(&exe)
                    .env(CHILD_ENV, spec)
                    .env(CHILD_ROUNDS_ENV, "1")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("spawn reader process");
                let mut out = BufReader::new(child.stdout.take().expect("child stdout"));
                let mut line = String::new();
                out.read_line(&mut line).expect("child ready line");
                assert_eq!(line.trim(), "ready", "reader process did not start");
                (child, out)
            })
            .collect();
        ReaderProcs { children }
    }

    /// Every child does `iters` reads; the span from the first start to the
    /// last end.
    fn round(&mut self, iters: u64) -> Duration {
        for (c, _) in &mut self.children {
            let stdin = c.stdin.as_mut().expect("child stdin");
            writeln!(stdin, "{iters}")
                .and_then(|_| stdin.flush())
                .expect("command a round");
        }
        let (mut first, mut last) = (u64::MAX, 0);
        for (_, out) in &mut self.children {
            let mut line = String::new();
            out.read_line(&mut line).expect("round result");
            let mut it = line
                .split_whitespace()
                .map(|v| v.parse::<u64>().expect("ns"));
            first = first.min(it.next().expect("start"));
            last = last.max(it.next().expect("end"));
        }
        Duration::from_nanos(last.saturating_sub(first))
    }

    fn stop(self) {
        for (mut c, _) in self.children {
            drop(c.stdin.take());
            let status = c.wait().expect("wait reader process");
            assert!(status.success(), "reader process failed: {status}");
        }
    }
}

/// Readers of one ID: `n` threads, and (for mechanisms that can be shared
/// between processes) `n` processes; a writer beside two reading threads.
fn bench_readers_of_one_id<M: Mechanism>(
    c: &mut Criterion,
    name: &str,
    mech: &M,
    readers: &[usize],
) {
    {
        let mut g = c.benchmark_group("same_id_readers");
        for &n in readers {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter_custom(|iters| run_threads(mech, n, iters, |_| 0))
            });
        }
    }
    if let Some(spec) = mech.child_spec().filter(|_| !name.contains("flock")) {
        let mut g = c.benchmark_group("same_id_reader_procs");
        for &n in readers {
            // Children start only when the filter selects the benchmark.
            let mut procs: Option<ReaderProcs> = None;
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                let p = procs.get_or_insert_with(|| ReaderProcs::start(&spec, n));
                b.iter_custom(|iters| p.round(iters))
            });
            if let Some(p) = procs {
                p.stop();
            }
        }
    }
    c.benchmark_group("write_beside_2_readers")
        .bench_function(name, |b| {
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let mut r = mech.worker(0);
                    let stop = &stop;
                    s.spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            r.read_cycle();
                        }
                    });
                }
                let mut w = mech.worker(0);
                b.iter(|| w.write_cycle());
                stop.store(true, Ordering::Relaxed);
            });
        });
}

/// The biased reader's publication primitive against a plain store: a
/// store to a line only this thread writes, then a load of a shared word
/// (the re-check of the state), then the release store.
fn bench_bias_publish(c: &mut Criterion) {
    use std::sync::atomic::{AtomicU32, AtomicU64};
    let entry = CachePadded::new(AtomicU32::new(0));
    let state = CachePadded::new(AtomicU64::new(1));
    let mut g = c.benchmark_group("bias_publish");
    g.bench_function("swap_seqcst", |b| {
        b.iter(|| {
            entry.swap(7, Ordering::SeqCst);
            black_box(state.load(Ordering::SeqCst));
            entry.store(0, Ordering::SeqCst);
            black_box(state.load(Ordering::SeqCst));
        })
    });
    g.bench_function("plain_store", |b| {
        b.iter(|| {
            entry.store(7, Ordering::Relaxed);
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            black_box(state.load(Ordering::Relaxed));
            entry.store(0, Ordering::Release);
            black_box(state.load(Ordering::Relaxed));
        })
    });
    g.finish();
}

fn reader_counts() -> Vec<usize> {
    let spec = std::env::var(READERS_ENV).unwrap_or_else(|_| "1,2,4,8,16".to_owned());
    let v: Vec<usize> = spec
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{READERS_ENV}: bad count {s:?}"))
        })
        .filter(|&n| n > 0)
        .collect();
    assert!(!v.is_empty(), "{READERS_ENV} lists no reader count");
    v
}

/// The chunk size of [`MIN_CHUNK_ENV`], if set.
fn min_chunk() -> Option<u64> {
    let v = std::env::var(MIN_CHUNK_ENV).ok()?;
    let n: u64 = v
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{MIN_CHUNK_ENV}: bad chunk size {v:?}"));
    Some(n.max(1))
}

/// Times `iters` runs of `op`: plainly, or (with a chunk size) as the
/// fastest chunk's time per run, times `iters`.
fn time_runs(iters: u64, chunk: Option<u64>, mut op: impl FnMut()) -> Duration {
    let Some(chunk) = chunk else {
        let start = Instant::now();
        for _ in 0..iters {
            op();
        }
        return start.elapsed();
    };
    let mut best = f64::INFINITY;
    let mut done = 0;
    while done < iters {
        let n = chunk.min(iters - done);
        let start = Instant::now();
        for _ in 0..n {
            op();
        }
        best = best.min(start.elapsed().as_secs_f64() / n as f64);
        done += n;
    }
    Duration::from_secs_f64(best * iters as f64)
}

/// `uncontended_read_new_to_process`: reads of IDs the table holds but the
/// reading handle has never locked (see the module doc). With a chunk size
/// ([`MIN_CHUNK_ENV`]), the fastest fresh handle's time per read counts.
fn bench_new_to_process(c: &mut Criterion, name: &str, mech: &TableMech, first_id: usize) {
    let ids: Vec<&[u8]> = mech.ids[first_id..first_id + MISS_IDS]
        .iter()
        .map(|s| s.as_bytes())
        .collect();
    // In the table, whatever ran before.
    for id in &ids {
        drop(mech.table.read(id).expect("read"));
    }
    let chunked = min_chunk().is_some();
    c.benchmark_group("uncontended_read_new_to_process")
        .bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (mut total, mut best, mut done) = (Duration::ZERO, f64::INFINITY, 0);
                while done < iters {
                    let fresh =
                        LockTable::open(&mech.path, &table_options(mech.kind)).expect("open");
                    // A new mapping's pages fault on first touch: a cost of
                    // opening, not of a new ID. A snapshot reads every slot,
                    // and one read of the hot ID writes this handle's row.
                    fresh.stats().expect("stats");
                    drop(fresh.read(&mech.ids[0]).expect("read"));
                    let n = (iters - done).min(MISS_IDS as u64);
                    let start = Instant::now();
                    for id in &ids[..n as usize] {
                        drop(black_box(fresh.read(black_box(*id)).expect("read")));
                    }
                    let took = start.elapsed();
                    total += took;
                    best = best.min(took.as_secs_f64() / n as f64);
                    done += n;
                }
                if chunked {
                    Duration::from_secs_f64(best * iters as f64)
                } else {
                    total
                }
            })
        });
}

fn bench_mechanism<M: Mechanism>(c: &mut Criterion, name: &str, mech: &M, threads: &[usize]) {
    let chunk = min_chunk();
    {
        let mut w = mech.worker(0);
        c.benchmark_group("uncontended_read")
            .bench_function(name, |b| {
                b.iter_custom(|iters| time_runs(iters, chunk, || w.read_cycle()))
            });
    }
    c.benchmark_group("uncontended_read_256ids")
        .bench_function(name, |b| {
            let mut w = Cycle::new(mech, many_ids_base(threads), MANY_IDS);
            b.iter_custom(|iters| time_runs(iters, chunk, || w.read_cycle()))
        });
    // Not for the flock anchors: one descriptor per ID would pass the
    // descriptor limit, and they cost the same per ID anyway.
    if !name.contains("flock") {
        c.benchmark_group("uncontended_read_2048ids")
            .bench_function(name, |b| {
                let mut w = Cycle::new(mech, many_ids_base(threads), MISS_IDS);
                b.iter_custom(|iters| time_runs(iters, chunk, || w.read_cycle()))
            });
    }
    {
        let mut w = mech.worker(0);
        c.benchmark_group("uncontended_write")
            .bench_function(name, |b| {
                b.iter_custom(|iters| time_runs(iters, chunk, || w.write_cycle()))
            });
    }
    c.benchmark_group("same_id_2threads")
        .bench_function(name, |b| {
            b.iter_custom(|iters| run_threads(mech, 2, iters, |_| 0))
        });
    {
        let mut g = c.benchmark_group("distinct_ids");
        for &n in threads {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter_custom(|iters| run_threads(mech, n, iters, |t| t + 1))
            });
        }
    }
    if let Some(spec) = mech.child_spec() {
        let mut g = c.benchmark_group("same_id_2procs");
        // Only start a child when the filter selects this benchmark.
        let mut w = mech.worker(0);
        let mut child = None;
        g.bench_function(name, |b| {
            if child.is_none() {
                child = Some(ChildReader::start(&spec));
            }
            b.iter(|| w.read_cycle())
        });
        g.finish();
        if let Some(ch) = child {
            ch.stop();
        }
    }
}

fn thread_counts() -> Vec<usize> {
    let spec = std::env::var(THREADS_ENV).unwrap_or_else(|_| "1,2".to_owned());
    let v: Vec<usize> = spec
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{THREADS_ENV}: bad count {s:?}"))
        })
        .filter(|&n| n > 0)
        .collect();
    assert!(!v.is_empty(), "{THREADS_ENV} lists no thread count");
    v
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_main(&spec);
        return;
    }
    let threads = thread_counts();
    let ids = id_count(&threads);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(20)
        .configure_from_args();

    let readers = reader_counts();
    let table = TableMech::new(ids, "locktable");
    assert!(
        table.table.asymmetric_fences(),
        "no expedited membarrier here: `locktable` would measure the locked protocol"
    );
    bench_mechanism(&mut c, "locktable", &table, &threads);
    bench_new_to_process(&mut c, "locktable", &table, many_ids_base(&threads));
    bench_readers_of_one_id(&mut c, "locktable", &table, &readers);
    let locked = TableMech::new(ids, "locktable_locked");
    bench_mechanism(&mut c, "locktable_locked", &locked, &threads);
    bench_new_to_process(&mut c, "locktable_locked", &locked, many_ids_base(&threads));
    bench_readers_of_one_id(&mut c, "locktable_locked", &locked, &readers);
    let unbiased = TableMech::new(ids, "locktable_nobias");
    bench_mechanism(&mut c, "locktable_nobias", &unbiased, &threads);
    bench_readers_of_one_id(&mut c, "locktable_nobias", &unbiased, &readers);
    let parking_lot = ParkingLotMech(leak_locks(ids));
    bench_mechanism(&mut c, "parking_lot", &parking_lot, &threads);
    bench_readers_of_one_id(&mut c, "parking_lot", &parking_lot, &readers);
    let std_locks = StdMech(leak_locks(ids));
    bench_mechanism(&mut c, "std", &std_locks, &threads);
    bench_readers_of_one_id(&mut c, "std", &std_locks, &readers);
    let pthread = PthreadMech::new(ids);
    bench_mechanism(&mut c, "pthread_pshared", &pthread, &threads);
    bench_readers_of_one_id(&mut c, "pthread_pshared", &pthread, &readers);
    bench_bias_publish(&mut c);
    bench_mechanism(
        &mut c,
        "flock_fd",
        &FlockFdMech(LockFiles::new(ids)),
        &threads,
    );
    bench_mechanism(
        &mut c,
        "open_flock_close",
        &OpenFlockMech(LockFiles::new(ids)),
        &threads,
    );

    c.final_summary();
}
