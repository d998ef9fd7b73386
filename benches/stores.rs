//! Requests on one hot session, on every session store, in one criterion run.
//!
//! Stores (criterion function name = store): `memory` (`MemoryStore`), `file`
//! (`SessionManager::open`: `FileStore` + lock table file), `kv` (`SessionManager::open_kv`:
//! LMDB + lock table file), `redis` and `memcached` (the servers of `LOCKTABLE_REDIS_URL` and
//! `LOCKTABLE_MEMCACHED_URL`, with a lock table file; left out, with a line saying so, when
//! unset). Every store keeps its defaults: `file` and `kv` fsync their writes.
//!
//! Requests (one session of 8 keys, a few hundred bytes of JSON):
//! - `read`: `load(id)` + `get::<u64>` + `commit()` (no data write; the access time is stored at
//!   most once per touch interval, 30 s by default);
//! - `write`: `transact(id, f)` with `f` incrementing one counter (one data write each).
//!
//! Group `store_hot_session`: `<store>/<read|write>/<n>_threads` for n = 1 and 4 threads of
//! this process sharing one manager, each running the same number of requests (`iter_custom`,
//! threads released together by a `Barrier`, wall time from the first start to the last
//! finish). Throughput is set to the number of threads, so criterion's `thrpt` is requests per
//! second in total.
//!
//! Group `huge_session`: `<store>/whole_record`, one request on a session of 1,000 keys of
//! 10 KB (10 MB): `transact` that reads one key and writes one other, one thread. Today's path
//! reads, checks and parses the whole record and writes it whole; it is the baseline of the
//! per-key design (DESIGN.md, "Huge sessions, read by key"). memcached is left out: one item
//! holds at most 1 MiB by default.
//!
//! Before the criterion results, a plain loop of 1,000 read requests per store (with a clock
//! that moves one second per request, so that touches are due) counts the stored writes per
//! 1,000 read requests: data writes and touches, by the manager's counters.
//!
//! Run: `eval "$(scripts/services start)"; cargo bench --features lmdb,redis,memcached --bench
//! stores` (part of it: `... -- kv/read`).

use std::hint::black_box;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use locktable::session::{
    ManualClock, MemcachedStore, MemoryStore, RedisStore, SessionConfig, SessionManager, Timestamp,
};
use locktable::{LockTable, TableOptions};
use serde_json::{json, Value};

const READ_KEY: &str = "user_id";

fn session_data() -> Vec<(&'static str, Value)> {
    vec![
        ("user_id", json!(4242)),
        ("name", json!("Ann Example")),
        ("roles", json!(["editor", "viewer"])),
        ("cart", json!({"items": [1, 2, 3], "total": 42.5})),
        ("csrf", json!("k3j4h5g6f7d8s9a0")),
        ("theme", json!("dark")),
        ("visits", json!(17)),
        ("flash", json!(null)),
    ]
}

fn prefix() -> String {
    format!("locktable-bench:{}:", std::process::id())
}

/// A manager on the named store in `dir`, or `None` (said) when its server is not configured.
fn open(store: &str, dir: &Path, cfg: SessionConfig) -> Option<SessionManager> {
    let table = || LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    let url = |var: &str| match std::env::var(var) {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("{store}: left out ({var} is not set; eval \"$(scripts/services start)\")");
            None
        }
    };
    Some(match store {
        "memory" => SessionManager::new(
            LockTable::anonymous(&TableOptions::default()).unwrap(),
            MemoryStore::new(),
            cfg,
        ),
        "file" => SessionManager::new_embedded(dir, cfg).unwrap(),
        "kv" => SessionManager::new_kv(dir, cfg).unwrap(),
        "redis" => {
            let s = RedisStore::open(&url("LOCKTABLE_REDIS_URL")?)
                .unwrap()
                .with_prefix(prefix())
                .with_rule_of(&cfg);
            SessionManager::new(table(), s, cfg)
        }
        "memcached" => {
            let s = MemcachedStore::open(&url("LOCKTABLE_MEMCACHED_URL")?)
                .unwrap()
                .with_prefix(prefix())
                .with_rule_of(&cfg);
            SessionManager::new(table(), s, cfg)
        }
        other => panic!("unknown store {other}"),
    })
}

fn create_session(mgr: &SessionManager) -> String {
    let mut s = mgr.create().unwrap();
    for (k, v) in session_data() {
        s.insert(k, &v).unwrap();
    }
    let id = s.id().to_string();
    s.commit().unwrap();
    id
}

fn read_request(mgr: &SessionManager, id: &str) {
    let s = mgr.load(id).unwrap().expect("session exists");
    black_box(s.get::<u64>(READ_KEY).unwrap());
    s.commit().unwrap();
}

fn write_request(mgr: &SessionManager, id: &str) {
    let done = mgr
        .transact(id, |s| {
            let n = s.get::<u64>("visits")?.unwrap_or(0);
            s.insert("visits", &(n + 1))
        })
        .unwrap();
    assert!(done.is_some());
}

/// `n` threads each run `iters` requests; wall time from the first start to the last finish.
fn run_threads(f: &(dyn Fn() + Sync), n: usize, iters: u64) -> Duration {
    let barrier = Barrier::new(n);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                sc.spawn(|| {
                    barrier.wait();
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        f();
                    }
                    (t0, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    last - first
}

const STORES: [&str; 5] = ["memory", "file", "kv", "redis", "memcached"];

/// Stored writes per 1,000 read requests, with a clock that makes touches due.
fn print_writes_per_1k_reads() {
    println!(
        "stored writes per 1,000 read requests (clock +1 s per request, touch interval 30 s):"
    );
    for store in STORES {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_system_time(
            std::time::SystemTime::now(),
        )));
        let cfg = SessionConfig {
            clock: clock.clone(),
            ..SessionConfig::default()
        };
        let Some(mgr) = open(store, dir.path(), cfg) else {
            continue;
        };
        let id = create_session(&mgr);
        let before = mgr.stats();
        for _ in 0..1000 {
            clock.advance(Duration::from_secs(1));
            read_request(&mgr, &id);
        }
        let after = mgr.stats();
        println!(
            "  {store:<10} data writes {:>4}   touches {:>4}",
            after.data_writes - before.data_writes,
            after.touches_written - before.touches_written
        );
        mgr.delete(&id).unwrap();
    }
}

fn main() {
    print_writes_per_1k_reads();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(10)
        .configure_from_args();
    let mut g = c.benchmark_group("store_hot_session");
    for store in STORES {
        let dir = tempfile::tempdir().unwrap();
        let Some(mgr) = open(store, dir.path(), SessionConfig::default()) else {
            continue;
        };
        let id = create_session(&mgr);
        for n in [1usize, 4] {
            g.throughput(Throughput::Elements(n as u64));
            let read = || read_request(&mgr, &id);
            g.bench_function(BenchmarkId::new(store, format!("read/{n}_threads")), |b| {
                b.iter_custom(|iters| run_threads(&read, n, iters))
            });
            let write = || write_request(&mgr, &id);
            g.bench_function(BenchmarkId::new(store, format!("write/{n}_threads")), |b| {
                b.iter_custom(|iters| run_threads(&write, n, iters))
            });
        }
        mgr.delete(&id).unwrap();
    }
    g.finish();
    huge_session(&mut c);
    c.final_summary();
}

const HUGE_KEYS: usize = 1000;
const HUGE_VALUE: usize = 10 * 1024;

fn huge_session(c: &mut Criterion) {
    let mut g = c.benchmark_group("huge_session");
    g.throughput(Throughput::Elements(1));
    let cfg = || SessionConfig {
        max_record_size: 16 << 20,
        ..SessionConfig::default()
    };
    for store in ["memory", "file", "kv", "redis"] {
        let dir = tempfile::tempdir().unwrap();
        let Some(mgr) = open(store, dir.path(), cfg()) else {
            continue;
        };
        let mut s = mgr.create().unwrap();
        let value = "v".repeat(HUGE_VALUE);
        for k in 0..HUGE_KEYS {
            s.insert(format!("k{k}"), &value).unwrap();
        }
        let id = s.id().to_string();
        s.commit().unwrap();
        g.bench_function(BenchmarkId::new(store, "whole_record"), |b| {
            b.iter(|| {
                let done = mgr
                    .transact(&id, |s| {
                        black_box(s.get::<String>("k7")?);
                        let n = s.get::<u64>("counter")?.unwrap_or(0);
                        s.insert("counter", &(n + 1))
                    })
                    .unwrap();
                assert!(done.is_some());
            })
        });
        mgr.delete(&id).unwrap();
    }
    g.finish();
}
