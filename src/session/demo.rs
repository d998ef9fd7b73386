//! The `locktable demo` workload (issue 4, item 11), and its `--compare` baseline.
//!
//! Several workers (processes, or threads for tests) act as browser pages on a few shared
//! sessions. Each page is one writing request (increment the worker's own counter and a shared
//! counter) plus several concurrent reading requests, each doing a little simulated work. Two
//! systems run the same workload:
//! - **locktable**: the embedded default ([`SessionManager::open`]); writers use
//!   [`SessionManager::transact`], readers [`SessionManager::load`].
//! - **flock+rewrite**: a faithful model of Beaker's file backend: one JSON file per session; a
//!   request loads the file under a shared `flock`, and at its end rewrites the whole load-time
//!   snapshot, with a fresh accessed time, under an exclusive `flock`: every access is a write,
//!   and a read-only request can overwrite a concurrent update.
//!
//! At the end, every counter is compared with the number of increments the workers reported as
//! successful: the difference is the number of lost updates.
//!
//! ```no_run
//! use locktable::session::demo::{run_demo, DemoConfig, WorkerMode};
//! use std::time::Duration;
//! let cfg = DemoConfig {
//!     duration: Duration::from_millis(500),
//!     compare: true,
//!     mode: WorkerMode::Threads,
//!     ..DemoConfig::default()
//! };
//! let report = run_demo(&cfg).unwrap();
//! println!("{report}");
//! assert_eq!(report.runs[0].lost_updates, 0);
//! ```

use super::{SessionConfig, SessionManager, Timestamp};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The hidden CLI subcommand the real binary uses for worker processes.
pub const WORKER_SUBCOMMAND: &str = "__demo-worker";

/// How workers run.
#[derive(Debug, Clone)]
pub enum WorkerMode {
    /// Separate processes: `exe args_prefix... <worker args>`; the program must pass the worker
    /// args to [`demo_worker_main`].
    Processes {
        /// Program to run (usually `std::env::current_exe()`).
        exe: PathBuf,
        /// Arguments before the worker args (usually `[WORKER_SUBCOMMAND]`).
        args_prefix: Vec<String>,
    },
    /// Threads of this process sharing one manager (tests; works with any lock core).
    Threads,
}

/// Which system a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum System {
    /// This crate's session layer on its embedded default.
    LockTable,
    /// flock per session file and whole-snapshot rewrite on every access (Beaker's way).
    FlockRewrite,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::LockTable => "locktable",
            System::FlockRewrite => "flock+rewrite",
        }
    }
    fn parse(s: &str) -> Option<System> {
        [System::LockTable, System::FlockRewrite]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

/// Settings of a demo run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Worker count (pages in flight at once). Default 4.
    pub workers: usize,
    /// Reading requests per page, running concurrently with its writing request. Default 4.
    pub readers_per_page: usize,
    /// Shared sessions. Default 4.
    pub sessions: usize,
    /// How long each system runs. Default 3 s.
    pub duration: Duration,
    /// Simulated work inside each request (no lock held). Default 200 µs.
    pub work: Duration,
    /// Also run the flock+rewrite baseline.
    pub compare: bool,
    /// Print a live progress line to stderr.
    pub progress: bool,
    /// Processes or threads.
    pub mode: WorkerMode,
    /// Durable (fsynced) saves for locktable. Default `false`: the baseline
    /// does not fsync either (Beaker does not), so both sides do the same I/O.
    pub fsync: bool,
    /// Working directory (default: a fresh directory under the system temp dir, removed after).
    pub dir: Option<PathBuf>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            workers: 4,
            readers_per_page: 4,
            sessions: 4,
            duration: Duration::from_secs(3),
            work: Duration::from_micros(200),
            compare: false,
            progress: false,
            mode: WorkerMode::Threads,
            fsync: false,
            dir: None,
        }
    }
}

/// Results for one system.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemReport {
    /// Which system.
    pub system: System,
    /// Requests completed.
    pub requests: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Median request latency.
    pub p50: Duration,
    /// 99th percentile request latency.
    pub p99: Duration,
    /// Writes of session data.
    pub data_writes: u64,
    /// Writes of the access time alone.
    pub touches: u64,
    /// Commits that had to be retried (conflicts).
    pub conflicts: u64,
    /// Increments reported successful but missing from the final data.
    pub lost_updates: u64,
}

impl SystemReport {
    /// Requests per second.
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn per_1k(&self, n: u64) -> f64 {
        n as f64 * 1000.0 / (self.requests.max(1)) as f64
    }
}

/// The demo's result: one entry per system run.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    /// Settings summary.
    pub summary: String,
    /// locktable first, then the baseline when `compare` was set.
    pub runs: Vec<SystemReport>,
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        write!(f, "{:<26}", "")?;
        for r in &self.runs {
            write!(f, "{:>16}", r.system.name())?;
        }
        writeln!(f)?;
        type Cell = Box<dyn Fn(&SystemReport) -> String>;
        let rows: Vec<(&str, Cell)> = vec![
            (
                "requests/s",
                Box::new(|r| format!("{:.0}", r.requests_per_sec())),
            ),
            (
                "p50 latency (ms)",
                Box::new(|r| format!("{:.3}", r.p50.as_secs_f64() * 1e3)),
            ),
            (
                "p99 latency (ms)",
                Box::new(|r| format!("{:.3}", r.p99.as_secs_f64() * 1e3)),
            ),
            (
                "data writes / 1k requests",
                Box::new(|r| format!("{:.1}", r.per_1k(r.data_writes))),
            ),
            (
                "touches / 1k requests",
                Box::new(|r| format!("{:.1}", r.per_1k(r.touches))),
            ),
            ("conflicts retried", Box::new(|r| r.conflicts.to_string())),
            ("lost updates", Box::new(|r| r.lost_updates.to_string())),
        ];
        for (name, cell) in rows {
            write!(f, "{name:<26}")?;
            for r in &self.runs {
                write!(f, "{:>16}", cell(r))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Latency histogram: 8 buckets per power of two of microseconds (about 9% resolution).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Histogram {
    buckets: Vec<u64>,
}

impl Histogram {
    const SUB: u32 = 8;
    fn new() -> Self {
        Histogram {
            buckets: vec![0; 64 * Self::SUB as usize],
        }
    }
    fn bucket(us: u64) -> usize {
        let us = us.max(1);
        let p = 63 - us.leading_zeros();
        let frac = if p >= 3 {
            (us >> (p - 3)) & 7
        } else {
            (us << (3 - p)) & 7
        };
        (p * Self::SUB) as usize + frac as usize
    }
    fn upper(b: usize) -> u64 {
        let p = b as u32 / Self::SUB;
        let frac = (b as u64) % Self::SUB as u64;
        ((8 + frac + 1) << p) >> 3
    }
    fn record(&mut self, d: Duration) {
        let b = Self::bucket(d.as_micros().min(u64::MAX as u128) as u64);
        if let Some(x) = self.buckets.get_mut(b) {
            *x += 1;
        }
    }
    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
    }
    fn quantile(&self, q: f64) -> Duration {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_micros(Self::upper(b));
            }
        }
        Duration::ZERO
    }
}

/// What one worker reports at its end.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerResult {
    requests: u64,
    /// Successful increments of this worker's own counter, per session index.
    own: Vec<u64>,
    data_writes: u64,
    touches: u64,
    conflicts: u64,
    latency: Histogram,
}

/// Parameters of one worker.
#[derive(Debug, Clone)]
struct WorkerArgs {
    system: System,
    fsync: bool,
    dir: PathBuf,
    index: usize,
    duration: Duration,
    work: Duration,
    readers: usize,
    ids: Vec<String>,
}

impl WorkerArgs {
    fn to_args(&self) -> Vec<String> {
        vec![
            self.system.name().to_owned(),
            u8::from(self.fsync).to_string(),
            self.dir.display().to_string(),
            self.index.to_string(),
            self.duration.as_millis().to_string(),
            self.work.as_micros().to_string(),
            self.readers.to_string(),
            self.ids.join(","),
        ]
    }
    fn from_args(args: &[String]) -> Result<WorkerArgs> {
        let bad = || {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "usage: <system> <fsync 0|1> <dir> <index> <duration_ms> <work_us> <readers> <ids,...>",
            ))
        };
        let [system, fsync, dir, index, duration, work, readers, ids] = args else {
            return Err(bad());
        };
        let num = |s: &String| s.parse::<u64>().map_err(|_| bad());
        Ok(WorkerArgs {
            system: System::parse(system).ok_or_else(bad)?,
            fsync: match fsync.as_str() {
                "0" => false,
                "1" => true,
                _ => return Err(bad()),
            },
            dir: PathBuf::from(dir),
            index: num(index)? as usize,
            duration: Duration::from_millis(num(duration)?),
            work: Duration::from_micros(num(work)?),
            readers: num(readers)? as usize,
            ids: ids.split(',').map(str::to_owned).collect(),
        })
    }
}

fn own_key(worker: usize) -> String {
    format!("w{worker}")
}
const SHARED_KEY: &str = "hits";

// ---------- the baseline: flock + whole-snapshot rewrite ----------

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BeakerFile {
    data: BTreeMap<String, u64>,
    accessed: u64,
}

fn beaker_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.session"))
}

/// Loads under a shared flock (released before returning), as Beaker's file namespace does.
fn beaker_load(path: &Path) -> Result<BeakerFile> {
    let mut f = File::open(path)?;
    flock(&f, libc::LOCK_SH)?;
    let mut s = String::new();
    let r = f.read_to_string(&mut s);
    flock(&f, libc::LOCK_UN)?;
    r?;
    if s.is_empty() {
        return Ok(BeakerFile::default());
    }
    Ok(serde_json::from_str(&s)?)
}

/// Rewrites the whole snapshot in place under an exclusive flock.
fn beaker_save(path: &Path, snapshot: &BeakerFile) -> Result<()> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    flock(&f, libc::LOCK_EX)?;
    let bytes = serde_json::to_vec(snapshot)?;
    let r = (|| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(&bytes)
    })();
    flock(&f, libc::LOCK_UN)?;
    r?;
    Ok(())
}

/// `flock(2)` on an open file, retried on EINTR.
#[allow(unsafe_code)]
fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // `f` is an open file borrowed for the whole call, so the descriptor is valid;
        // flock takes no pointers and has no other memory effects.
        // SAFETY: sound for the reasons just given.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn now_ms() -> u64 {
    Timestamp::from_system_time(SystemTime::now()).0
}

/// The session configuration of the demo's locktable side.
fn demo_session_config(fsync: bool) -> SessionConfig {
    SessionConfig {
        fsync,
        ..SessionConfig::default()
    }
}

// ---------- the worker ----------

struct Shared {
    requests: AtomicU64,
}

fn run_worker(
    a: &WorkerArgs,
    mgr: Option<&SessionManager>,
    progress: &dyn Fn(u64),
) -> Result<WorkerResult> {
    let own_mgr;
    let shared_mgr = mgr.is_some();
    let mgr = match (a.system, mgr) {
        (System::LockTable, Some(m)) => Some(m),
        (System::LockTable, None) => {
            own_mgr = SessionManager::new_embedded(&a.dir, demo_session_config(a.fsync))?;
            Some(&own_mgr)
        }
        (System::FlockRewrite, _) => None,
    };
    let before = mgr.map(|m| m.stats());
    let shared = Shared {
        requests: AtomicU64::new(0),
    };
    let mut own = vec![0u64; a.ids.len()];
    let mut latency = Histogram::new();
    let mut beaker_writes = 0u64;
    let deadline = Instant::now() + a.duration;
    let mut last_progress = Instant::now();
    let key = own_key(a.index);
    let mut page = a.index;
    while Instant::now() < deadline {
        let s_idx = page % a.ids.len();
        page += 1;
        let id = a.ids[s_idx].as_str();
        let (writer_ok, readers) =
            std::thread::scope(|sc| -> Result<(bool, Vec<Histogram>)> {
                let handles: Vec<_> = (0..a.readers)
                    .map(|_| {
                        sc.spawn(|| -> Result<Histogram> {
                            let mut h = Histogram::new();
                            let t = Instant::now();
                            reading_request(a, mgr, id)?;
                            h.record(t.elapsed());
                            shared.requests.fetch_add(1, Ordering::Relaxed);
                            Ok(h)
                        })
                    })
                    .collect();
                let t = Instant::now();
                let ok = writing_request(a, mgr, id, &key)?;
                let mut hs = vec![{
                    let mut h = Histogram::new();
                    h.record(t.elapsed());
                    h
                }];
                shared.requests.fetch_add(1, Ordering::Relaxed);
                for h in handles {
                    hs.push(h.join().map_err(|_| {
                        Error::Io(std::io::Error::other("reader thread panicked"))
                    })??);
                }
                Ok((ok, hs))
            })?;
        if writer_ok {
            own[s_idx] += 1;
        }
        for h in &readers {
            latency.merge(h);
        }
        if a.system == System::FlockRewrite {
            beaker_writes += 1 + a.readers as u64;
        }
        if last_progress.elapsed() >= Duration::from_millis(200) {
            progress(shared.requests.load(Ordering::Relaxed));
            last_progress = Instant::now();
        }
    }
    let (data_writes, touches, conflicts) = match (mgr, before) {
        _ if shared_mgr => (0, 0, 0),
        (Some(m), Some(b)) => {
            let s = m.stats();
            (
                s.data_writes - b.data_writes,
                s.touches_written - b.touches_written,
                s.conflicts - b.conflicts,
            )
        }
        _ => (beaker_writes, 0, 0),
    };
    Ok(WorkerResult {
        requests: shared.requests.load(Ordering::Relaxed),
        own,
        data_writes,
        touches,
        conflicts,
        latency,
    })
}

fn reading_request(a: &WorkerArgs, mgr: Option<&SessionManager>, id: &str) -> Result<()> {
    match mgr {
        Some(m) => {
            let s = m.load(id)?.ok_or(Error::SessionGone)?;
            let _hits = s.get::<u64>(SHARED_KEY)?;
            std::thread::sleep(a.work);
            s.commit()
        }
        None => {
            let path = beaker_path(&a.dir, id);
            let mut snap = beaker_load(&path)?;
            let _hits = snap.data.get(SHARED_KEY);
            std::thread::sleep(a.work);
            snap.accessed = now_ms();
            beaker_save(&path, &snap)
        }
    }
}

/// Increments the worker's own counter and the shared one; true when it took effect.
fn writing_request(
    a: &WorkerArgs,
    mgr: Option<&SessionManager>,
    id: &str,
    key: &str,
) -> Result<bool> {
    match mgr {
        Some(m) => {
            let r = m.transact(id, |s| {
                let own = s.get::<u64>(key)?.unwrap_or(0);
                let hits = s.get::<u64>(SHARED_KEY)?.unwrap_or(0);
                std::thread::sleep(a.work);
                s.insert(key, &(own + 1))?;
                s.insert(SHARED_KEY, &(hits + 1))
            })?;
            Ok(r.is_some())
        }
        None => {
            let path = beaker_path(&a.dir, id);
            let mut snap = beaker_load(&path)?;
            std::thread::sleep(a.work);
            *snap.data.entry(key.to_owned()).or_default() += 1;
            *snap.data.entry(SHARED_KEY.to_owned()).or_default() += 1;
            snap.accessed = now_ms();
            beaker_save(&path, &snap)?;
            Ok(true)
        }
    }
}

/// Entry point of a worker process: `args` are the arguments after the hidden subcommand.
/// Prints `progress <n>` lines and one final `result <json>` line on stdout.
pub fn demo_worker_main(args: &[String]) -> Result<()> {
    let a = WorkerArgs::from_args(args)?;
    let out = std::io::stdout();
    let progress = |n: u64| {
        let mut o = out.lock();
        let _ = writeln!(o, "progress {n}");
        let _ = o.flush();
    };
    let r = run_worker(&a, None, &progress)?;
    let mut o = out.lock();
    writeln!(o, "result {}", serde_json::to_string(&r)?)?;
    o.flush()?;
    Ok(())
}

// ---------- the driver ----------

/// A directory removed on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn fresh_dir() -> Result<TempDir> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| Error::Random(e.to_string()))?;
    let p = std::env::temp_dir().join(format!(
        "locktable-demo-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(r)
    ));
    fs::create_dir_all(&p)?;
    Ok(TempDir(p))
}

/// Runs the workload on locktable (and the baseline with `compare`) and reports.
pub fn run_demo(cfg: &DemoConfig) -> Result<DemoReport> {
    let tmp;
    let root = match &cfg.dir {
        Some(d) => {
            fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = fresh_dir()?;
            tmp.0.clone()
        }
    };
    let mut runs = vec![run_system(cfg, System::LockTable, &root.join("locktable"))?];
    if cfg.compare {
        runs.push(run_system(cfg, System::FlockRewrite, &root.join("flock"))?);
    }
    let mode = match cfg.mode {
        WorkerMode::Processes { .. } => "processes",
        WorkerMode::Threads => "threads",
    };
    Ok(DemoReport {
        summary: format!(
            "{} worker {mode} x (1 writing + {} reading requests per page), {} sessions, {:.1} s per system, {} µs work per request\nlocktable saves: atomic rename{}",
            cfg.workers,
            cfg.readers_per_page,
            cfg.sessions,
            cfg.duration.as_secs_f64(),
            cfg.work.as_micros(),
            if cfg.fsync {
                " + fsync of file and directory (durable; the baseline does not fsync)"
            } else {
                ", no fsync (like the baseline; --fsync for durable saves)"
            }
        ),
        runs,
    })
}

fn run_system(cfg: &DemoConfig, system: System, dir: &Path) -> Result<SystemReport> {
    fs::create_dir_all(dir)?;
    let sessions = cfg.sessions.max(1);
    let mgr = match system {
        System::LockTable => Some(SessionManager::new_embedded(
            dir,
            demo_session_config(cfg.fsync),
        )?),
        System::FlockRewrite => None,
    };
    let mut ids = Vec::new();
    for _ in 0..sessions {
        match &mgr {
            Some(m) => {
                let mut s = m.create()?;
                s.insert(SHARED_KEY, &0u64)?;
                ids.push(s.id().to_string());
                s.commit()?;
            }
            None => {
                let id = super::SessionId::generate()?.to_string();
                fs::write(
                    beaker_path(dir, &id),
                    serde_json::to_vec(&BeakerFile::default())?,
                )?;
                ids.push(id);
            }
        }
    }
    let args: Vec<WorkerArgs> = (0..cfg.workers.max(1))
        .map(|index| WorkerArgs {
            system,
            fsync: cfg.fsync,
            dir: dir.to_path_buf(),
            index,
            duration: cfg.duration,
            work: cfg.work,
            readers: cfg.readers_per_page,
            ids: ids.clone(),
        })
        .collect();
    let before = mgr.as_ref().map(|m| m.stats()).unwrap_or_default();
    let progress: Arc<Vec<AtomicU64>> = Arc::new(args.iter().map(|_| AtomicU64::new(0)).collect());
    let start = Instant::now();
    let done = AtomicU64::new(0);
    let results = std::thread::scope(|sc| -> Result<Vec<WorkerResult>> {
        let handles: Vec<_> = args
            .iter()
            .map(|a| {
                let progress = Arc::clone(&progress);
                let mgr = mgr.as_ref();
                let done = &done;
                sc.spawn(move || {
                    let r = match &cfg.mode {
                        WorkerMode::Threads => {
                            run_worker(a, mgr, &|n| progress[a.index].store(n, Ordering::Relaxed))
                        }
                        WorkerMode::Processes { exe, args_prefix } => {
                            spawn_worker(exe, args_prefix, a, &progress[a.index])
                        }
                    };
                    done.fetch_add(1, Ordering::Relaxed);
                    r
                })
            })
            .collect();
        if cfg.progress {
            let n = handles.len() as u64;
            while done.load(Ordering::Relaxed) < n {
                let total: u64 = progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
                let secs = start.elapsed().as_secs_f64();
                eprint!(
                    "\r  {:<14} {secs:5.1} s  {total:>9} requests  {:>8.0} req/s   ",
                    system.name(),
                    total as f64 / secs.max(1e-3)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!();
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| Error::Io(std::io::Error::other("worker thread panicked")))?
            })
            .collect()
    })?;
    let elapsed = start.elapsed();
    let mut results = results;
    if let (WorkerMode::Threads, Some(m), Some(first)) = (&cfg.mode, &mgr, results.first_mut()) {
        // Threads share one manager: its counters cover all workers, so count them once.
        let s = m.stats();
        first.data_writes = s.data_writes - before.data_writes;
        first.touches = s.touches_written - before.touches_written;
        first.conflicts = s.conflicts - before.conflicts;
    }
    // Lost updates: compare counters with the increments reported as successful.
    let finals: Vec<BTreeMap<String, u64>> = ids
        .iter()
        .map(|id| -> Result<BTreeMap<String, u64>> {
            match &mgr {
                Some(m) => {
                    let s = m.load(id)?.ok_or(Error::SessionGone)?;
                    let mut out = BTreeMap::new();
                    for k in s.keys() {
                        out.insert(k.to_owned(), s.get::<u64>(k)?.unwrap_or(0));
                    }
                    drop(s);
                    Ok(out)
                }
                None => Ok(beaker_load(&beaker_path(dir, id))?.data),
            }
        })
        .collect::<Result<_>>()?;
    let mut lost = 0u64;
    for (s_idx, fin) in finals.iter().enumerate() {
        let mut shared_expected = 0;
        for (w, r) in results.iter().enumerate() {
            let expected = r.own.get(s_idx).copied().unwrap_or(0);
            shared_expected += expected;
            let got = fin.get(&own_key(w)).copied().unwrap_or(0);
            lost += expected.abs_diff(got);
        }
        let got = fin.get(SHARED_KEY).copied().unwrap_or(0);
        lost += shared_expected.abs_diff(got);
    }
    let mut latency = Histogram::new();
    for r in &results {
        latency.merge(&r.latency);
    }
    Ok(SystemReport {
        system,
        requests: results.iter().map(|r| r.requests).sum(),
        elapsed,
        p50: latency.quantile(0.50),
        p99: latency.quantile(0.99),
        data_writes: results.iter().map(|r| r.data_writes).sum(),
        touches: results.iter().map(|r| r.touches).sum(),
        conflicts: results.iter().map(|r| r.conflicts).sum(),
        lost_updates: lost,
    })
}

fn spawn_worker(
    exe: &Path,
    prefix: &[String],
    a: &WorkerArgs,
    progress: &AtomicU64,
) -> Result<WorkerResult> {
    let mut child = Command::new(exe)
        .args(prefix)
        .args(a.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Io(std::io::Error::other("no worker stdout")))?;
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(n) = line.strip_prefix("progress ") {
            if let Ok(n) = n.trim().parse() {
                progress.store(n, Ordering::Relaxed);
            }
        } else if let Some(json) = line.strip_prefix("result ") {
            result = Some(serde_json::from_str::<WorkerResult>(json)?);
        }
    }
    let status = child.wait()?;
    match result {
        Some(r) if status.success() => Ok(r),
        _ => Err(Error::Io(std::io::Error::other(format!(
            "demo worker {} failed: {status}",
            a.index
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((500.0..=560.0).contains(&p50), "{p50}");
        assert!((990.0..=1100.0).contains(&p99), "{p99}");
        assert_eq!(Histogram::new().quantile(0.5), Duration::ZERO);
    }

    #[test]
    fn worker_args_roundtrip_and_reject_garbage() {
        let a = WorkerArgs {
            system: System::FlockRewrite,
            fsync: true,
            dir: "/tmp/x".into(),
            index: 3,
            duration: Duration::from_millis(1500),
            work: Duration::from_micros(250),
            readers: 2,
            ids: vec!["a".into(), "b".into()],
        };
        let b = WorkerArgs::from_args(&a.to_args()).unwrap();
        assert_eq!(b.to_args(), a.to_args());
        assert!(WorkerArgs::from_args(&["x".into()]).is_err());
        assert!(demo_worker_main(&[]).is_err());
    }

    #[test]
    fn threaded_demo_loses_nothing_and_baseline_writes_every_access() {
        let cfg = DemoConfig {
            workers: 2,
            readers_per_page: 3,
            sessions: 1,
            duration: Duration::from_millis(400),
            compare: true,
            ..DemoConfig::default()
        };
        let report = run_demo(&cfg).unwrap();
        let text = report.to_string();
        assert!(text.contains("lost updates"), "{text}");
        let lt = &report.runs[0];
        let bk = &report.runs[1];
        assert_eq!(lt.system, System::LockTable);
        assert!(lt.requests > 0 && bk.requests > 0);
        assert_eq!(lt.lost_updates, 0, "{text}");
        // Only writing requests (1 in 4) write data on locktable; every access writes on the
        // baseline.
        assert!(lt.data_writes * 4 <= lt.requests + 4, "{text}");
        assert_eq!(bk.data_writes, bk.requests);
        assert!(lt.p50 > Duration::ZERO);
    }
}
