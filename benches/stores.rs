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
//! - `write`: `transact(id, f)` with `f` incrementing one counter (one data write each);
//! - `read_uncached`: `read` with the hot-session cache off (`cache_bytes: 0`): the store's own
//!   read (the cache answers `read` without the store on `memory`, `file` and `kv`).
//!
//! Group `store_hot_session`: `<store>/<read|write>/<n>_threads` for n = 1 and 4 threads of
//! this process sharing one manager, each running the same number of requests (`iter_custom`,
//! threads released together by a `Barrier`, wall time from the first start to the last
//! finish). Throughput is set to the number of threads, so criterion's `thrpt` is requests per
//! second in total.
//!
//! Group `huge_session`: `<store>/<by_key|whole_record>`, one request on a session of 1,000
//! keys of 10 KB (10 MB): `transact` that reads one key (`get`) and writes one other, one
//! thread, fsync off (`file`, `kv`). `by_key` is the store as it is, with every session loaded
//! by key (`SessionConfig::lazy_above = 0`): on a store with `Capabilities::per_key` the load
//! reads the head, the `get` one value and the commit writes the head and one value.
//! `whole_record` hides the store's `per_key` capability, so the manager takes the
//! whole-record path (`load` and `save` of the whole 10 MB record). Both go through a byte
//! counter, and before criterion a line per store and path gives the bytes read and written
//! through the `Store` interface per request. A store that cannot hold the session (memcached:
//! one item holds at most 1 MiB by default) is left out with a line saying why.
//!
//! Group `store_read`: `<store>/load_head`, the store's own read of that hot session through the
//! `Store` interface (what a load of the manager asks of the store; no lock, no checksum, no
//! JSON): the part of `read_uncached` that differs between stores.
//!
//! Environment: `LOCKTABLE_BENCH_STORES=kv,file` runs only those stores, in that order (what
//! ran before shifts a figure on a shared machine: compare both orders);
//! `LOCKTABLE_BENCH_NO_HUGE=1` skips `huge_session`, whose 10 MB sessions are set up whatever
//! the filter.
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
    Capabilities, ChangedValue, Cutoffs, ExpiredScan, FileStore, KvOptions, KvStore, ManualClock,
    MemcachedStore, MemoryStore, RedisStore, SessionConfig, SessionId, SessionManager, SessionMeta,
    Store, Stored, StoredHead, StoredSession, Timestamp, Touch,
};
use locktable::{LockTable, TableOptions};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// The stores to run, in order: `LOCKTABLE_BENCH_STORES` (comma-separated, e.g. `kv,file`),
/// else all of [`STORES`]. Criterion measures one after the other, and what ran before (heap
/// state, page cache, the other store's fsyncs) shifts a figure by more than two stores differ
/// on a shared machine: a comparison runs both orders.
fn stores() -> Vec<&'static str> {
    match std::env::var("LOCKTABLE_BENCH_STORES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|s| {
                let s = s.trim();
                *STORES
                    .iter()
                    .find(|k| **k == s)
                    .unwrap_or_else(|| panic!("LOCKTABLE_BENCH_STORES: unknown store {s}"))
            })
            .collect(),
        _ => STORES.to_vec(),
    }
}

/// Stored writes per 1,000 read requests, with a clock that makes touches due.
fn print_writes_per_1k_reads() {
    println!(
        "stored writes per 1,000 read requests (clock +1 s per request, touch interval 30 s):"
    );
    for store in stores() {
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
    for store in stores() {
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
        // The same read request with the hot-session cache off: what the store's read costs.
        let cfg = SessionConfig {
            cache_bytes: 0,
            ..SessionConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let Some(mgr) = open(store, dir.path(), cfg) else {
            continue;
        };
        let id = create_session(&mgr);
        for n in [1usize, 4] {
            g.throughput(Throughput::Elements(n as u64));
            let read = || read_request(&mgr, &id);
            let name = format!("read_uncached/{n}_threads");
            g.bench_function(BenchmarkId::new(store, name), |b| {
                b.iter_custom(|iters| run_threads(&read, n, iters))
            });
        }
        mgr.delete(&id).unwrap();
    }
    g.finish();
    store_read(&mut c);
    // Setting up the 10 MB sessions takes seconds whatever the filter: skippable.
    if std::env::var_os("LOCKTABLE_BENCH_NO_HUGE").is_none() {
        huge_session(&mut c);
    }
    c.final_summary();
}

const HUGE_KEYS: usize = 1000;
const HUGE_VALUE: usize = 10 * 1024;
/// Requests run outside criterion to count the bytes of one request.
const COUNTED_REQUESTS: u64 = 10;

/// Bytes through the `Store` interface (read: loads; written: saves), shared with the bench.
#[derive(Debug, Default)]
struct Bytes {
    read: AtomicU64,
    written: AtomicU64,
}

/// A store seen through a byte counter; `whole`: its `per_key` capability hidden, so that the
/// manager takes today's whole-record path (`load` and `save` only).
#[derive(Debug)]
struct Counted {
    inner: Box<dyn Store>,
    whole: bool,
    bytes: Arc<Bytes>,
}

impl Counted {
    fn read(&self, n: usize) {
        self.bytes.read.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn wrote(&self, n: usize) {
        self.bytes.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Store for Counted {
    fn capabilities(&self) -> Capabilities {
        let c = self.inner.capabilities();
        c.with_per_key(c.per_key && !self.whole)
    }
    fn load(&self, id: &SessionId, max: usize) -> locktable::Result<Option<StoredSession>> {
        let r = self.inner.load(id, max)?;
        self.read(r.as_ref().map_or(0, |s| s.bytes.len()));
        Ok(r)
    }
    fn save(&self, id: &SessionId, e: Option<u64>, new: &StoredSession) -> locktable::Result<bool> {
        self.wrote(new.bytes.len());
        self.inner.save(id, e, new)
    }
    fn meta(&self, id: &SessionId) -> locktable::Result<Option<SessionMeta>> {
        self.inner.meta(id)
    }
    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> locktable::Result<Touch> {
        self.inner.touch(id, at, coalesce, cutoffs)
    }
    fn delete(&self, id: &SessionId) -> locktable::Result<bool> {
        self.inner.delete(id)
    }
    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> locktable::Result<bool> {
        self.inner.remove_expired(id, cutoffs)
    }
    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> locktable::Result<ExpiredScan> {
        self.inner.scan_expired(cutoffs, budget)
    }
    fn load_head(
        &self,
        id: &SessionId,
        max: usize,
        up_to: u64,
    ) -> locktable::Result<Option<Stored>> {
        let r = self.inner.load_head(id, max, up_to)?;
        match &r {
            Some(Stored::ByKey(h)) => {
                let values = h
                    .values
                    .iter()
                    .flatten()
                    .map(|(_, v)| v.len())
                    .sum::<usize>();
                self.read(h.head.len() + values);
            }
            Some(Stored::Whole(w)) => self.read(w.bytes.len()),
            None => {}
        }
        Ok(r)
    }
    fn load_values(
        &self,
        id: &SessionId,
        version: u64,
        keys: &[&str],
    ) -> locktable::Result<Option<Vec<Option<Vec<u8>>>>> {
        let r = self.inner.load_values(id, version, keys)?;
        let n = r.iter().flatten().flatten().map(Vec::len).sum();
        self.read(n);
        Ok(r)
    }
    fn save_delta(
        &self,
        id: &SessionId,
        e: Option<u64>,
        new: &StoredHead,
        changed: &[ChangedValue],
    ) -> locktable::Result<bool> {
        let values: usize = changed
            .iter()
            .filter_map(|(_, v)| v.as_ref())
            .map(Vec::len)
            .sum();
        self.wrote(new.head.len() + values);
        self.inner.save_delta(id, e, new, changed)
    }
}

/// The named store itself (not a manager), for wrapping; `None` (said) without its server.
fn open_store(store: &str, dir: &Path, tag: &str) -> Option<Box<dyn Store>> {
    let url = |var: &str| match std::env::var(var) {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("{store}: left out ({var} is not set; eval \"$(scripts/services start)\")");
            None
        }
    };
    Some(match store {
        "memory" => Box::new(MemoryStore::new()),
        "file" => Box::new(
            FileStore::open(dir.join("sessions"))
                .unwrap()
                .with_fsync(false),
        ),
        "kv" => {
            let opts = KvOptions {
                fsync: false,
                ..KvOptions::default()
            };
            Box::new(KvStore::open_with(dir.join("sessions.kv"), &opts).unwrap())
        }
        "redis" => Box::new(
            RedisStore::open(&url("LOCKTABLE_REDIS_URL")?)
                .unwrap()
                .with_prefix(format!("{}{tag}:", prefix())),
        ),
        "memcached" => Box::new(
            MemcachedStore::open(&url("LOCKTABLE_MEMCACHED_URL")?)
                .unwrap()
                .with_prefix(format!("{}{tag}:", prefix())),
        ),
        other => panic!("unknown store {other}"),
    })
}

/// One request of the huge-session benchmark: load, one `get`, a one-key commit.
fn huge_request(mgr: &SessionManager, id: &str, n: &AtomicU64) {
    let done = mgr
        .transact(id, |s| {
            black_box(s.get::<String>("k7")?.expect("k7"));
            s.insert("counter", &n.fetch_add(1, Ordering::Relaxed))
        })
        .unwrap();
    assert!(done.is_some());
}

fn huge_session(c: &mut Criterion) {
    let mut g = c.benchmark_group("huge_session");
    g.throughput(Throughput::Elements(1));
    // Every session by key on a per-key store; the whole path never asks for it.
    let cfg = || SessionConfig {
        max_record_size: 16 << 20,
        lazy_above: 0,
        ..SessionConfig::default()
    };
    println!("huge session ({HUGE_KEYS} keys x {HUGE_VALUE} B): store bytes per request");
    for store in stores() {
        for path in ["by_key", "whole_record"] {
            let dir = tempfile::tempdir().unwrap();
            let Some(inner) = open_store(store, dir.path(), path) else {
                continue;
            };
            let bytes = Arc::new(Bytes::default());
            let counted = Counted {
                inner,
                whole: path == "whole_record",
                bytes: bytes.clone(),
            };
            let table =
                LockTable::open(dir.path().join("locks.table"), &TableOptions::default()).unwrap();
            let mgr = SessionManager::new(table, counted, cfg());
            let mut s = mgr.create().unwrap();
            let value = "v".repeat(HUGE_VALUE);
            for k in 0..HUGE_KEYS {
                s.insert(format!("k{k}"), &value).unwrap();
            }
            let id = s.id().to_string();
            if let Err(e) = s.commit() {
                println!("  {store:<10} {path:<13} left out: the session cannot be stored ({e})");
                continue;
            }
            let n = AtomicU64::new(0);
            let (r0, w0) = (
                bytes.read.load(Ordering::Relaxed),
                bytes.written.load(Ordering::Relaxed),
            );
            for _ in 0..COUNTED_REQUESTS {
                huge_request(&mgr, &id, &n);
            }
            let per = |a: &AtomicU64, b: u64| (a.load(Ordering::Relaxed) - b) / COUNTED_REQUESTS;
            println!(
                "  {store:<10} {path:<13} read {:>9} B   written {:>9} B",
                per(&bytes.read, r0),
                per(&bytes.written, w0)
            );
            g.bench_function(BenchmarkId::new(store, path), |b| {
                b.iter(|| huge_request(&mgr, &id, &n))
            });
            mgr.delete(&id).unwrap();
        }
    }
    g.finish();
}

/// Group `store_read`: `<store>/load_head`, the store's own read of the hot session of
/// `store_hot_session` through the `Store` interface, as a load of the manager calls it (no
/// lock, no decode, no manager): what `read_uncached` spends in the store, the rest of that
/// request being the same on every store. The embedded stores only (`memory`, `file`, `kv`,
/// opened as `SessionManager::open` and `open_kv` open them); the server stores' reads are
/// round trips, seen in `read_uncached` already.
fn store_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_read");
    g.throughput(Throughput::Elements(1));
    for store in stores() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        match store {
            "memory" => bench_load_head(&mut g, store, d, MemoryStore::new()),
            "file" => bench_load_head(&mut g, store, d, FileStore::open(d.join("s")).unwrap()),
            "kv" => bench_load_head(&mut g, store, d, KvStore::open(d.join("s.kv")).unwrap()),
            _ => println!("store_read: {store} left out (a server store)"),
        }
    }
    g.finish();
}

fn bench_load_head<S: Store + 'static>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    dir: &Path,
    store: S,
) {
    let cfg = SessionConfig::default();
    let (max, up_to) = (cfg.max_record_size, cfg.lazy_above);
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    let mgr = SessionManager::new(table, store, cfg);
    let id = SessionId::parse(&create_session(&mgr)).unwrap();
    let st = mgr.store();
    assert!(st.load_head(&id, max, up_to).unwrap().is_some());
    g.bench_function(BenchmarkId::new(name, "load_head"), |b| {
        b.iter(|| black_box(st.load_head(&id, max, up_to).unwrap()))
    });
    mgr.delete(id.as_str()).unwrap();
}
