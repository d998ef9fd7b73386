//! The driver: sets up the sessions of each system, starts the workers
//! (threads, or processes of this binary), collects their results and counts
//! lost updates.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use locktable::session::SessionId;
use locktable::{Error, Result};

use super::baseline::{beaker_load, beaker_path, BeakerFile};
use super::histogram::Histogram;
use super::report::{DemoReport, System, SystemReport};
use super::store::{run_prefix, StoreSpec};
use super::worker::{
    demo_session_config, own_key, run_worker, WorkerArgs, WorkerResult, SHARED_KEY,
    WORKER_SUBCOMMAND,
};

/// How workers run.
#[derive(Debug, Clone)]
pub(super) enum WorkerMode {
    /// Separate processes: `exe __demo-worker <worker args>`, where `exe` is this binary.
    Processes {
        /// This binary (`std::env::current_exe()`).
        exe: PathBuf,
    },
    /// Threads of this process sharing one manager (tests; works with any lock core).
    Threads,
}

/// Settings of a demo run.
#[derive(Debug, Clone)]
pub(super) struct DemoConfig {
    /// Worker count (pages in flight at once). Default 4.
    pub(super) workers: usize,
    /// Reading requests per page, running concurrently with its writing request. Default 4.
    pub(super) readers_per_page: usize,
    /// Shared sessions. Default 4.
    pub(super) sessions: usize,
    /// How long each system runs. Default 3 s.
    pub(super) duration: Duration,
    /// Simulated work inside each request (no lock held). Default 200 µs.
    pub(super) work: Duration,
    /// Also run the flock+rewrite baseline.
    pub(super) compare: bool,
    /// Print a live progress line to stderr.
    pub(super) progress: bool,
    /// Processes or threads.
    pub(super) mode: WorkerMode,
    /// Durable (fsynced) saves for locktable. Default `false`: the baseline
    /// does not fsync either (Beaker does not), so both sides do the same I/O.
    pub(super) fsync: bool,
    /// Working directory (default: a fresh directory under the system temp dir, removed after).
    pub(super) dir: Option<PathBuf>,
    /// The session store of the locktable side (default: the file store).
    pub(super) store: StoreSpec,
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
            store: StoreSpec::File(None),
        }
    }
}

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
pub(super) fn run_demo(cfg: &DemoConfig) -> Result<DemoReport> {
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
            "{} worker {mode} x (1 writing + {} reading requests per page), {} sessions, {:.1} s per system, {} µs work per request\nlocktable store: {}",
            cfg.workers,
            cfg.readers_per_page,
            cfg.sessions,
            cfg.duration.as_secs_f64(),
            cfg.work.as_micros(),
            cfg.store.describe(cfg.fsync),
        ),
        runs,
    })
}

fn run_system(cfg: &DemoConfig, system: System, dir: &Path) -> Result<SystemReport> {
    let sessions = cfg.sessions.max(1);
    let prefix = run_prefix()?;
    let dir = match system {
        System::LockTable => cfg.store.system_dir(dir),
        System::FlockRewrite => dir.to_path_buf(),
    };
    let dir = dir.as_path();
    fs::create_dir_all(dir)?;
    let mgr = match system {
        System::LockTable => Some(
            cfg.store
                .open(dir, demo_session_config(cfg.fsync), &prefix)?,
        ),
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
                let id = SessionId::generate()?.to_string();
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
            store: cfg.store.clone(),
            prefix: prefix.clone(),
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
                        WorkerMode::Processes { exe } => spawn_worker(exe, a, &progress[a.index]),
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
        first.cache = super::worker::cache_counts(&s, &before);
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
    if let Some(m) = &mgr {
        // Leave nothing behind on a server or in a directory named with --store.
        for id in &ids {
            m.delete(id)?;
        }
    }
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
        cache: results
            .iter()
            .fold((0, 0), |(h, l), r| (h + r.cache.0, l + r.cache.1)),
        lost_updates: lost,
    })
}

fn spawn_worker(exe: &Path, a: &WorkerArgs, progress: &AtomicU64) -> Result<WorkerResult> {
    let mut child = Command::new(exe)
        .arg(WORKER_SUBCOMMAND)
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
        // The hit rate of the session cache is reported (the baseline has none).
        assert!(text.contains("cache hit rate"), "{text}");
        assert!(lt.cache.1 > 0 && lt.cache.0 <= lt.cache.1, "{text}");
        assert_eq!(bk.cache, (0, 0));
    }
}
