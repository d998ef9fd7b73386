//! One worker: a loop of browser pages (one writing request and several
//! concurrent reading requests) on one of the two systems, as a thread of
//! the driver or as a process of its own.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use locktable::session::{ManagerStats, SessionConfig, SessionManager};
use locktable::{Error, Result};
use serde::{Deserialize, Serialize};

use super::baseline::{beaker_load, beaker_path, beaker_save, now_ms};
use super::histogram::Histogram;
use super::report::System;
use super::store::StoreSpec;

/// The hidden subcommand under which the binary runs a worker process.
pub(super) const WORKER_SUBCOMMAND: &str = "__demo-worker";

/// What one worker reports at its end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct WorkerResult {
    pub(super) requests: u64,
    /// Successful increments of this worker's own counter, per session index.
    pub(super) own: Vec<u64>,
    pub(super) data_writes: u64,
    pub(super) touches: u64,
    pub(super) conflicts: u64,
    /// Loads answered from the session cache, and loads that looked in it.
    #[serde(default)]
    pub(super) cache: (u64, u64),
    pub(super) latency: Histogram,
}

/// Parameters of one worker.
#[derive(Debug, Clone)]
pub(super) struct WorkerArgs {
    pub(super) system: System,
    pub(super) fsync: bool,
    pub(super) dir: PathBuf,
    pub(super) index: usize,
    pub(super) duration: Duration,
    pub(super) work: Duration,
    pub(super) readers: usize,
    pub(super) ids: Vec<String>,
    /// The locktable side's store, and the key prefix of this run on a server.
    pub(super) store: StoreSpec,
    pub(super) prefix: String,
}

impl WorkerArgs {
    pub(super) fn to_args(&self) -> Vec<String> {
        vec![
            self.system.name().to_owned(),
            u8::from(self.fsync).to_string(),
            self.dir.display().to_string(),
            self.index.to_string(),
            self.duration.as_millis().to_string(),
            self.work.as_micros().to_string(),
            self.readers.to_string(),
            self.ids.join(","),
            self.store.to_arg(),
            self.prefix.clone(),
        ]
    }
    fn from_args(args: &[String]) -> Result<WorkerArgs> {
        let bad = || {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "usage: <system> <fsync 0|1> <dir> <index> <duration_ms> <work_us> <readers> <ids,...> <store> <prefix>",
            ))
        };
        let [system, fsync, dir, index, duration, work, readers, ids, store, prefix] = args else {
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
            store: StoreSpec::parse(store).map_err(|_| bad())?,
            prefix: prefix.clone(),
        })
    }
}

pub(super) fn own_key(worker: usize) -> String {
    format!("w{worker}")
}
pub(super) const SHARED_KEY: &str = "hits";

/// The session configuration of the demo's locktable side.
pub(super) fn demo_session_config(fsync: bool) -> SessionConfig {
    SessionConfig {
        fsync,
        ..SessionConfig::default()
    }
}

struct Shared {
    requests: AtomicU64,
}

pub(super) fn run_worker(
    a: &WorkerArgs,
    mgr: Option<&SessionManager>,
    progress: &dyn Fn(u64),
) -> Result<WorkerResult> {
    let own_mgr;
    let shared_mgr = mgr.is_some();
    let mgr = match (a.system, mgr) {
        (System::LockTable, Some(m)) => Some(m),
        (System::LockTable, None) => {
            own_mgr = a
                .store
                .open(&a.dir, demo_session_config(a.fsync), &a.prefix)?;
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
    let (data_writes, touches, conflicts, cache) = match (mgr, before) {
        _ if shared_mgr => (0, 0, 0, (0, 0)),
        (Some(m), Some(b)) => {
            let s = m.stats();
            (
                s.data_writes - b.data_writes,
                s.touches_written - b.touches_written,
                s.conflicts - b.conflicts,
                cache_counts(&s, &b),
            )
        }
        _ => (beaker_writes, 0, 0, (0, 0)),
    };
    Ok(WorkerResult {
        requests: shared.requests.load(Ordering::Relaxed),
        own,
        data_writes,
        touches,
        conflicts,
        cache,
        latency,
    })
}

/// (hits, lookups) of the session cache between two snapshots of a manager's counters.
pub(super) fn cache_counts(now: &ManagerStats, before: &ManagerStats) -> (u64, u64) {
    let hits = now.cache_hits - before.cache_hits;
    (hits, hits + now.cache_misses - before.cache_misses)
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

/// Entry point of a worker process: `args` are the arguments after [`WORKER_SUBCOMMAND`].
/// Prints `progress <n>` lines and one final `result <json>` line on stdout.
pub(super) fn worker_main(args: &[String]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            store: StoreSpec::Kv(Some("/tmp/kv".into())),
            prefix: "p:".into(),
        };
        let b = WorkerArgs::from_args(&a.to_args()).unwrap();
        assert_eq!(b.to_args(), a.to_args());
        assert!(WorkerArgs::from_args(&["x".into()]).is_err());
        assert!(worker_main(&[]).is_err());
    }
}
