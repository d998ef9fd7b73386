//! Session-layer benchmarks: read-only requests on one hot session, this crate's session layer
//! against today's way, both in one criterion run.
//!
//! Systems (criterion function names):
//! - `locktable`: [`SessionManager::open`] (the embedded default: `FileStore` + lock table file in
//!   a tempdir). A request is `mgr.load(id)` + `get::<u64>(key)` + `commit()` (which stores the
//!   access time only when the stored one is older than the touch interval, 30 s by default).
//! - `flock_rewrite`: the model of Beaker's file backend from the CLI's demo
//!   (`src/bin/locktable/demo/baseline.rs`; a bench cannot use a binary's code, so it is copied
//!   here): one JSON file per session; a request opens the file,
//!   reads and parses it under a shared `flock`, reads the key, then opens the file again and
//!   rewrites the whole load-time snapshot with a fresh accessed time under an exclusive `flock`.
//!   Every access is a write.
//!
//! Both store the same session data (8 keys, a few hundred bytes of JSON), each in its own
//! tempdir.
//!
//! Group `hot_session_read`, one benchmark per system and concurrency:
//! - `<system>/<n>_threads` (n = 1, 2, 4): n threads of this process share one manager (or one
//!   file path) and each runs the same number of requests; `iter_custom`, threads released
//!   together by a `Barrier`, wall time from the first start to the last finish.
//! - `<system>/2_procs`: this process and a child (this binary re-executed with
//!   `LOCKTABLE_SESSION_BENCH_CHILD` set; it opens the session directory / file itself) each run
//!   the same number of requests; wall time from the start order to the child's "done". Each
//!   process's own loop time per request is printed when the benchmark ends.
//!
//! Throughput is set to the number of workers, so criterion's `thrpt` is total requests per
//! second.
//!
//! Outside criterion, plain loops count the stored writes per 1,000 read requests (data writes
//! and touches separately, by a counting wrapper around `FileStore`) and time the stages of one
//! request; both are printed before the criterion results.
//!
//! Run: `cargo bench --bench session`; part of it: `cargo bench --bench session -- 4_threads`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput};
use locktable::session::{
    record, session_lock_id, Clock, FileStore, ManualClock, SessionConfig, SessionId,
    SessionManager, Store, SystemClock, Timestamp, Touch,
};
use locktable::{LockTable, TableOptions};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use support::spy_store::{Answer, Call, SpyStore, Watch};

mod support;

/// Set in the environment of a re-executed child: `<system>\n<path>\n<id>`.
const CHILD_ENV: &str = "LOCKTABLE_SESSION_BENCH_CHILD";
/// The key every read request reads.
const READ_KEY: &str = "user_id";

/// A plausible web session: user, CSRF token, a small cart.
fn session_data() -> Vec<(&'static str, Value)> {
    vec![
        ("user_id", json!(48213)),
        ("user_name", json!("ann.example")),
        (
            "csrf_token",
            json!("q3V9x2LmT8bZr4KcWj0sYp6HdNf1GaUe7QiXoRvB5yE"),
        ),
        ("locale", json!("en-GB")),
        ("roles", json!(["customer", "beta"])),
        (
            "cart",
            json!([
                {"sku": "A-1001", "qty": 1, "price_cents": 1999},
                {"sku": "B-2040", "qty": 2, "price_cents": 450},
                {"sku": "C-0007", "qty": 1, "price_cents": 12900},
                {"sku": "D-3315", "qty": 3, "price_cents": 99},
            ]),
        ),
        ("last_search", json!("usb-c cable 2m")),
        ("hits", json!(0)),
    ]
}

/// One read-only request against one system.
trait Request: Sync {
    fn request(&self);
}

// ---------- this crate ----------

/// Read-only requests on the embedded default.
struct Ours {
    mgr: SessionManager,
    id: String,
}

impl Ours {
    /// Opens `dir` as the embedded default and creates the hot session in it.
    fn create(dir: &Path) -> Ours {
        Self::create_with(dir, SessionConfig::default())
    }

    /// Like [`Ours::create`] with `cfg` (the uncached variant sets `cache_bytes: 0`).
    fn create_with(dir: &Path, cfg: SessionConfig) -> Ours {
        let mgr = SessionManager::new_embedded(dir, cfg).expect("open session dir");
        let id = create_session(&mgr);
        Ours { mgr, id }
    }
}

/// The configuration of the uncached variant: every load reads the store and decodes.
fn uncached() -> SessionConfig {
    SessionConfig {
        cache_bytes: 0,
        ..SessionConfig::default()
    }
}

fn create_session(mgr: &SessionManager) -> String {
    support::create_session(mgr, session_data())
}

fn our_request(mgr: &SessionManager, id: &str) {
    let s = mgr.load(id).expect("load").expect("session exists");
    black_box(s.get::<u64>(READ_KEY).expect("get"));
    s.commit().expect("commit");
}

impl Request for Ours {
    fn request(&self) {
        our_request(&self.mgr, &self.id);
    }
}

/// Counts what reaches the store: the bench's view of stored writes, independent of the
/// manager's own counters.
#[derive(Debug, Default)]
struct StoreCounts {
    loads: AtomicU64,
    saves: AtomicU64,
    touch_calls: AtomicU64,
    touches_written: AtomicU64,
}

impl StoreCounts {
    fn snapshot(&self) -> [u64; 4] {
        [
            self.loads.load(Ordering::Relaxed),
            self.saves.load(Ordering::Relaxed),
            self.touch_calls.load(Ordering::Relaxed),
            self.touches_written.load(Ordering::Relaxed),
        ]
    }
}

/// Counts loads and touch calls whatever they answered, saves and touches that wrote.
impl Watch for StoreCounts {
    fn after(&self, _: &dyn Store, call: Call, answer: Answer) -> locktable::Result<()> {
        match call {
            Call::Load => self.loads.fetch_add(1, Ordering::Relaxed),
            Call::Save if answer == Answer::Saved(true) => {
                self.saves.fetch_add(1, Ordering::Relaxed)
            }
            Call::Touch => {
                if answer == Answer::Touched(Touch::Written) {
                    self.touches_written.fetch_add(1, Ordering::Relaxed);
                }
                self.touch_calls.fetch_add(1, Ordering::Relaxed)
            }
            _ => 0,
        };
        Ok(())
    }
}

/// The same layout as `SessionManager::new_embedded` (lock table `dir/locks.table`, store
/// `dir/sessions`), with the store wrapped in counters.
fn open_counting(dir: &Path, cfg: SessionConfig) -> (SessionManager, Arc<StoreCounts>, FileStore) {
    fs::create_dir_all(dir).expect("mkdir");
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).expect("table");
    let store = FileStore::open(dir.join("sessions")).expect("store");
    // A second handle on the same directory, only for `path_of`.
    let probe = FileStore::open(dir.join("sessions")).expect("store");
    let counts = Arc::new(StoreCounts::default());
    let wrapped = SpyStore::new(store, Arc::clone(&counts));
    (SessionManager::new(table, wrapped, cfg), counts, probe)
}

// ---------- the baseline: flock + whole-snapshot rewrite (the demo's baseline.rs) ----------

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BeakerFile {
    data: BTreeMap<String, Value>,
    accessed: u64,
}

/// Loads under a shared flock (released before returning), as Beaker's file namespace does.
fn beaker_load(path: &Path) -> BeakerFile {
    let mut f = File::open(path).expect("open session file");
    flock(&f, libc::LOCK_SH);
    let mut s = String::new();
    let r = f.read_to_string(&mut s);
    flock(&f, libc::LOCK_UN);
    r.expect("read session file");
    serde_json::from_str(&s).expect("parse session file")
}

/// Rewrites the whole snapshot in place under an exclusive flock.
fn beaker_save(path: &Path, snapshot: &BeakerFile) {
    write_under_flock(path, snapshot, |f, bytes| {
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(bytes)
    });
}

/// Not part of the baseline: `beaker_save` without the truncate (the snapshot has the same
/// length every time), to show what the truncate costs on the file system at hand (on ext4 a
/// file truncated to zero and rewritten is flushed at close, `auto_da_alloc`).
fn overwrite_in_place(path: &Path, snapshot: &BeakerFile) {
    write_under_flock(path, snapshot, |f, bytes| f.write_all(bytes));
}

/// Opens the session file, serializes `snapshot` and hands the bytes to `write` under an
/// exclusive flock (released before a failure is reported).
fn write_under_flock(
    path: &Path,
    snapshot: &BeakerFile,
    write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open session file");
    flock(&f, libc::LOCK_EX);
    let bytes = serde_json::to_vec(snapshot).expect("serialize");
    let r = write(&mut f, &bytes);
    flock(&f, libc::LOCK_UN);
    r.expect("write session file");
}

/// `flock(2)` on an open file, retried on EINTR.
fn flock(f: &File, op: libc::c_int) {
    use std::os::fd::AsRawFd;
    loop {
        // `f` is an open file borrowed for the whole call, so the descriptor is valid;
        // flock takes no pointers and has no other memory effects.
        // SAFETY: sound for the reasons just given.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "flock: {e}");
    }
}

fn now_ms() -> u64 {
    Timestamp::from_system_time(SystemTime::now()).0
}

/// Read-only requests the flock+rewrite way.
struct Baseline {
    path: PathBuf,
    /// Whole-file rewrites done by this process (one per request).
    writes: AtomicU64,
}

impl Baseline {
    fn create(dir: &Path) -> Baseline {
        let id = SessionId::generate().expect("id");
        let path = dir.join(format!("{}.session", id.as_str()));
        let file = BeakerFile {
            data: session_data()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            accessed: now_ms(),
        };
        fs::write(&path, serde_json::to_vec(&file).expect("json")).expect("write session");
        Baseline::at(path)
    }
    fn at(path: PathBuf) -> Baseline {
        Baseline {
            path,
            writes: AtomicU64::new(0),
        }
    }
}

impl Request for Baseline {
    fn request(&self) {
        let mut snap = beaker_load(&self.path);
        black_box(snap.data.get(READ_KEY).and_then(Value::as_u64));
        snap.accessed = now_ms();
        beaker_save(&self.path, &snap);
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------- workers ----------

/// `n` threads each run `iters` requests; wall time from the first start to the last finish.
fn run_threads(r: &dyn Request, n: usize, iters: u64) -> Duration {
    if n == 1 {
        let t = Instant::now();
        for _ in 0..iters {
            r.request();
        }
        return t.elapsed();
    }
    let barrier = Barrier::new(n);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                sc.spawn(|| {
                    barrier.wait();
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        r.request();
                    }
                    (t0, Instant::now())
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

/// A re-executed copy of this binary that runs `n` requests each time it is told to.
struct ChildWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildWorker {
    fn start(spec: &str) -> ChildWorker {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .env(CHILD_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child worker");
        let stdin = child.stdin.take().expect("child stdin");
        let stdout = BufReader::new(child.stdout.take().expect("child stdout"));
        let mut w = ChildWorker {
            child,
            stdin,
            stdout,
        };
        assert_eq!(w.line(), "ready", "child worker did not start");
        w
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("child line");
        line.trim().to_owned()
    }

    fn go(&mut self, n: u64) {
        writeln!(self.stdin, "{n}")
            .and_then(|()| self.stdin.flush())
            .expect("order child");
    }

    /// Waits for "done <ns>"; returns the child's own loop time.
    fn wait(&mut self) -> Duration {
        let line = self.line();
        let ns = line
            .strip_prefix("done ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("child worker failed: {line:?}"));
        Duration::from_nanos(ns)
    }

    /// Closes its stdin; returns its final line (its own counts).
    fn stop(self) -> String {
        let ChildWorker {
            mut child,
            stdin,
            mut stdout,
        } = self;
        drop(stdin);
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        let status = child.wait().expect("wait child");
        assert!(status.success(), "child worker failed: {status}");
        out.trim().to_owned()
    }
}

/// The child side: open the system named in `spec` on our own, say "ready", then for each line
/// `n` on stdin run `n` requests and say "done"; at EOF print this process's counts.
fn child_main(spec: &str) {
    let mut parts = spec.split('\n');
    let kind = parts.next().unwrap_or_default();
    let path = PathBuf::from(parts.next().expect("child spec: path"));
    let mut out = std::io::stdout();
    let mut say = |s: &str| {
        writeln!(out, "{s}")
            .and_then(|()| out.flush())
            .expect("child stdout");
    };
    let (worker, ours): (Box<dyn Request>, Option<SessionManager>) = match kind {
        "locktable" | "locktable_uncached" => {
            let cfg = if kind == "locktable" {
                SessionConfig::default()
            } else {
                uncached()
            };
            let mgr = SessionManager::new_embedded(&path, cfg).expect("child open session dir");
            let id = parts.next().expect("child spec: id").to_owned();
            (
                Box::new(Ours {
                    mgr: mgr.clone(),
                    id,
                }),
                Some(mgr),
            )
        }
        "flock_rewrite" => (Box::new(Baseline::at(path)), None),
        other => panic!("unknown child kind {other:?}"),
    };
    worker.request();
    say("ready");
    let mut requests = 1u64;
    for line in std::io::stdin().lock().lines() {
        let n: u64 = line
            .expect("child stdin")
            .trim()
            .parse()
            .expect("child: count");
        let t = Instant::now();
        for _ in 0..n {
            worker.request();
        }
        let ns = t.elapsed().as_nanos();
        requests += n;
        say(&format!("done {ns}"));
    }
    let (data_writes, touches, hits) = match &ours {
        Some(m) => {
            let s = m.stats();
            (s.data_writes, s.touches_written, s.cache_hits)
        }
        None => (requests, 0, 0),
    };
    say(&format!(
        "requests {requests} data_writes {data_writes} touches {touches} cache_hits {hits}"
    ));
}

// ---------- stored writes per 1,000 read requests (plain loops) ----------

struct WriteCount {
    what: &'static str,
    requests: u64,
    data_writes: u64,
    touch_calls: u64,
    touches: u64,
}

impl WriteCount {
    /// What the store counted between two [`StoreCounts::snapshot`]s, over `requests` requests.
    fn between(what: &'static str, requests: u64, before: [u64; 4], after: [u64; 4]) -> Self {
        WriteCount {
            what,
            requests,
            data_writes: after[1] - before[1],
            touch_calls: after[2] - before[2],
            touches: after[3] - before[3],
        }
    }
}

/// A write-count scenario of `n` requests, made by `requests` on a fresh session of a counting
/// manager (see [`open_counting`]) with a manual clock that the scenario moves.
fn count_with_clock(
    what: &'static str,
    n: u64,
    requests: impl FnOnce(SessionManager, String, &ManualClock),
) -> WriteCount {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let cfg = SessionConfig {
        clock: clock.clone(),
        ..SessionConfig::default()
    };
    let (mgr, counts, _probe) = open_counting(dir.path(), cfg);
    let id = create_session(&mgr);
    let before = counts.snapshot();
    requests(mgr, id, &clock);
    WriteCount::between(what, n, before, counts.snapshot())
}

/// File identity and times, to show that a read-only request leaves the file alone.
fn file_state(path: &Path) -> (u64, u64, i64, i64) {
    let md = fs::metadata(path).expect("stat session file");
    (md.ino(), md.len(), md.mtime(), md.mtime_nsec())
}

fn count_writes() -> Vec<WriteCount> {
    const N: u64 = 1000;
    let mut out = Vec::new();
    let interval = SessionConfig::default().effective_touch_interval();

    // 0. The cache on (the default): the embedded manager's own counters, since the cache works
    // with the `FileStore` itself, not with the counting wrapper of the scenarios below.
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = Ours::create(dir.path());
        let probe = FileStore::open(dir.path().join("sessions")).expect("store");
        let path = probe.path_of(&SessionId::parse(&ours.id).expect("id"));
        let before = ours.mgr.stats();
        let file_before = file_state(&path);
        for _ in 0..N {
            ours.request();
        }
        let after = ours.mgr.stats();
        assert_eq!(
            file_state(&path),
            file_before,
            "a read-only request changed the session file"
        );
        println!(
            "\nCache on, 1,000 reads, 1 thread: {} store reads (cache misses), {} hits",
            after.cache_misses - before.cache_misses,
            after.cache_hits - before.cache_hits
        );
        out.push(WriteCount {
            what: "locktable (cache on), 1,000 reads, 1 thread, last touch < interval ago",
            requests: N,
            data_writes: after.data_writes - before.data_writes,
            touch_calls: 0,
            touches: after.touches_written - before.touches_written,
        });
    }

    // 1. Steady state: the session was touched less than one interval ago.
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mgr, counts, probe) = open_counting(dir.path(), SessionConfig::default());
        let id = create_session(&mgr);
        let path = probe.path_of(&SessionId::parse(&id).expect("id"));
        let before = counts.snapshot();
        let file_before = file_state(&path);
        for _ in 0..N {
            our_request(&mgr, &id);
        }
        let after = counts.snapshot();
        assert_eq!(
            file_state(&path),
            file_before,
            "a read-only request changed the session file"
        );
        assert_eq!(after[0] - before[0], N, "one store load per request");
        out.push(WriteCount::between(
            "locktable, 1,000 reads, 1 thread, last touch < interval ago",
            N,
            before,
            after,
        ));
    }

    // 2. The stored access time is older than the interval; 4 threads x 250 reads at once.
    out.push(count_with_clock(
        "locktable, 1,000 reads, 4 threads at once, last touch > interval ago",
        N,
        |mgr, id, clock| {
            clock.advance(interval + Duration::from_secs(1));
            run_threads(&Ours { mgr, id }, 4, N / 4);
        },
    ));

    // 3. One read every 100 ms of (simulated) time: 1,000 reads span 100 s.
    out.push(count_with_clock(
        "locktable, 1,000 reads, 1 thread, one every 100 ms (100 s)",
        N,
        |mgr, id, clock| {
            for _ in 0..N {
                clock.advance(Duration::from_millis(100));
                our_request(&mgr, &id);
            }
        },
    ));

    // 4. The baseline: every access rewrites the file.
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = Baseline::create(dir.path());
        let ino = file_state(&b.path).0;
        for _ in 0..N {
            b.request();
        }
        assert_eq!(file_state(&b.path).0, ino);
        out.push(WriteCount {
            what: "flock_rewrite, 1,000 reads, 1 thread",
            requests: N,
            data_writes: b.writes.load(Ordering::Relaxed),
            touch_calls: 0,
            touches: 0,
        });
    }
    println!(
        "\nStored writes per 1,000 read requests (touch interval {} s):",
        interval.as_secs()
    );
    println!(
        "  {:<72} {:>11} {:>11} {:>9}",
        "scenario", "data writes", "touch calls", "touches"
    );
    for w in &out {
        let per_k = |x: u64| x as f64 * 1000.0 / w.requests as f64;
        println!(
            "  {:<72} {:>11} {:>11} {:>9}",
            w.what,
            per_k(w.data_writes),
            per_k(w.touch_calls),
            per_k(w.touches)
        );
    }
    println!("  (touch calls: requests that asked the store to touch; touches: stored touches)");
    out
}

// ---------- where one request's time goes (plain loops) ----------

fn time_per_op(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn stage_breakdown() {
    const N: u32 = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = Ours::create(dir.path());
    let cold_dir = tempfile::tempdir().expect("tempdir");
    let cold = Ours::create_with(cold_dir.path(), uncached());
    let sid = SessionId::parse(&ours.id).expect("id");
    let table =
        LockTable::open(dir.path().join("locks.table"), &TableOptions::default()).expect("table");
    let store = FileStore::open(dir.path().join("sessions")).expect("store");
    let bytes = store
        .load(&sid, 1 << 20)
        .expect("load")
        .expect("exists")
        .bytes;
    let lock_id = session_lock_id(&sid);
    println!(
        "\nOne read-only request, stages timed alone (1 thread, ns per op, {N} ops each; record {} bytes):",
        bytes.len()
    );
    let rows: Vec<(&str, f64)> = vec![
        (
            "SessionId::parse",
            time_per_op(N, || {
                black_box(SessionId::parse(black_box(&ours.id)).expect("id"));
            }),
        ),
        (
            "lock table: read lock + release on the session's ID",
            time_per_op(N, || {
                drop(black_box(table.read(&lock_id).expect("read lock")));
            }),
        ),
        (
            "FileStore::load (open, fstat, read, close, header)",
            time_per_op(N, || {
                black_box(store.load(&sid, 1 << 20).expect("load"));
            }),
        ),
        (
            "record::decode (checksum + JSON)",
            time_per_op(N, || {
                black_box(record::decode(black_box(&bytes), 1 << 20).expect("decode"));
            }),
        ),
        (
            "locktable: load + commit (all of the above + Session, no get)",
            time_per_op(N, || {
                let s = ours.mgr.load(&ours.id).expect("load").expect("exists");
                black_box(&s);
                s.commit().expect("commit");
            }),
        ),
        (
            "locktable: whole request (load + get + commit), cache hit",
            time_per_op(N, || ours.request()),
        ),
        (
            "locktable: whole request, cache off (cache_bytes: 0)",
            time_per_op(N, || cold.request()),
        ),
    ];
    let bdir = tempfile::tempdir().expect("tempdir");
    let base = Baseline::create(bdir.path());
    let snap = beaker_load(&base.path);
    let rows_b: Vec<(&str, f64)> = vec![
        (
            "flock_rewrite: load (open, flock SH, read, unlock, JSON)",
            time_per_op(N, || {
                black_box(beaker_load(&base.path));
            }),
        ),
        (
            "flock_rewrite: save (open, flock EX, truncate, write, unlock)",
            time_per_op(N, || beaker_save(&base.path, &snap)),
        ),
        (
            "  for comparison: the same save without the truncate (same length)",
            time_per_op(N, || overwrite_in_place(&base.path, &snap)),
        ),
        (
            "flock_rewrite: whole request (load + get + save)",
            time_per_op(N, || base.request()),
        ),
    ];
    for (name, ns) in rows.iter().chain(&rows_b) {
        println!("  {name:<64} {ns:>9.0}");
    }
}

// ---------- criterion ----------

fn bench_hot_session(
    c: &mut Criterion,
    (ours, our_dir): (&Ours, &Path),
    (cold, cold_dir): (&Ours, &Path),
    base: &Baseline,
) {
    let mut g = c.benchmark_group("hot_session_read");
    for n in [1usize, 2, 4] {
        g.throughput(Throughput::Elements(n as u64));
        let id = format!("{n}_threads");
        g.bench_function(BenchmarkId::new("locktable", &id), |b| {
            b.iter_custom(|iters| run_threads(ours, n, iters))
        });
        g.bench_function(BenchmarkId::new("locktable_uncached", &id), |b| {
            b.iter_custom(|iters| run_threads(cold, n, iters))
        });
        g.bench_function(BenchmarkId::new("flock_rewrite", &id), |b| {
            b.iter_custom(|iters| run_threads(base, n, iters))
        });
    }
    g.throughput(Throughput::Elements(2));
    let specs: [(&str, &dyn Request, String); 3] = [
        (
            "locktable",
            ours,
            format!("locktable\n{}\n{}", our_dir.display(), ours.id),
        ),
        (
            "locktable_uncached",
            cold,
            format!("locktable_uncached\n{}\n{}", cold_dir.display(), cold.id),
        ),
        (
            "flock_rewrite",
            base,
            format!("flock_rewrite\n{}", base.path.display()),
        ),
    ];
    for (name, req, spec) in specs {
        // Only start a child when the filter selects this benchmark.
        let mut child: Option<ChildWorker> = None;
        // Requests, and each process's own loop time, over all calls.
        let (mut total, mut parent_t, mut child_t) = (0u64, Duration::ZERO, Duration::ZERO);
        g.bench_function(BenchmarkId::new(name, "2_procs"), |b| {
            let ch = child.get_or_insert_with(|| ChildWorker::start(&spec));
            b.iter_custom(|iters| {
                let t = Instant::now();
                ch.go(iters);
                for _ in 0..iters {
                    req.request();
                }
                parent_t += t.elapsed();
                child_t += ch.wait();
                total += iters;
                t.elapsed()
            })
        });
        if let Some(ch) = child {
            let per = |d: Duration| d.as_nanos() as f64 / total.max(1) as f64 / 1e3;
            eprintln!(
                "  ({name} child: {}; own loop time per request: parent {:.2} µs, child {:.2} µs)",
                ch.stop(),
                per(parent_t),
                per(child_t)
            );
        }
    }
    g.finish();
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child_main(&spec);
        return;
    }
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(20)
        .configure_from_args();

    count_writes();
    if bench_mode {
        stage_breakdown();
    }
    println!();

    let our_dir = tempfile::tempdir().expect("tempdir");
    let base_dir = tempfile::tempdir().expect("tempdir");
    let cold_dir = tempfile::tempdir().expect("tempdir");
    let ours = Ours::create(our_dir.path());
    let cold = Ours::create_with(cold_dir.path(), uncached());
    let base = Baseline::create(base_dir.path());
    let stats_before = ours.mgr.stats();

    bench_hot_session(
        &mut c,
        (&ours, our_dir.path()),
        (&cold, cold_dir.path()),
        &base,
    );

    // Whole-run totals of this process (the 2-process children print their own above).
    let s = ours.mgr.stats();
    println!(
        "\nThis process, whole criterion run: locktable {} requests, {} data writes, {} touches, \
         {} cache hits, {} misses; flock_rewrite {} requests, {} whole-file writes",
        s.loads - stats_before.loads,
        s.data_writes - stats_before.data_writes,
        s.touches_written - stats_before.touches_written,
        s.cache_hits - stats_before.cache_hits,
        s.cache_misses - stats_before.cache_misses,
        base.writes.load(Ordering::Relaxed),
        base.writes.load(Ordering::Relaxed),
    );
    // Both sessions must still hold their data.
    let check = ours.mgr.load(&ours.id).expect("load").expect("exists");
    assert_eq!(check.get::<u64>(READ_KEY).expect("get"), Some(48213));
    check.commit().expect("commit");
    assert_eq!(
        beaker_load(&base.path)
            .data
            .get(READ_KEY)
            .and_then(Value::as_u64),
        Some(48213)
    );

    c.final_summary();
}
