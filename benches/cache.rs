//! Cache benchmarks (criterion, short runs: the development machine is shared).
//!
//! Stores (`<store>` below): `memory` (`MemoryStore`) and `file` (`FileStore` without fsync in
//! a tempdir) always; `kv` (`KvStore`, LMDB in a tempdir, feature `lmdb`), `redis` and
//! `memcached` (features `redis`/`memcached`, servers of `LOCKTABLE_REDIS_URL` /
//! `LOCKTABLE_MEMCACHED_URL`, a key prefix of this run) and `postgres` (feature `postgres`,
//! server of `LOCKTABLE_PG_URL`, a table of this run in schema `locktable_cachebench`) when
//! their feature is on and their variable is set; each one left out gets a line on stderr
//! saying why. The creation lock is always the lock table file (one host).
//!
//! Groups:
//! - `cache_hit/<store>`: one `Region::get::<String>` of a fresh 200-byte value. A hit reads
//!   two entries: the namespace's generation and the value. Throughput 1 element: `thrpt` is
//!   hits/s.
//! - `cache_hit_get_or_create/<store>`: the same through `get_or_create` (no lock is taken on a
//!   hit).
//! - `expiry_to_fresh_16_workers/<mode>/<store>`: 16 threads of this process, each with a
//!   handle on one cache (lock table file + store), released together on a key whose value has
//!   just expired (stale grace 0); the time until all 16 hold a value. `create` sleeps 1 ms (a
//!   slow query). `locked`: `get_or_create` (one creation, 15 waiters read its result);
//!   `no_lock`: `get`, then `create` and `set` on a miss (the dogpile). Creations per expiry
//!   are printed at the end.
//!
//! Run: `cargo bench --bench cache`; part of it: `cargo bench --bench cache -- cache_hit`.
//! Every store: `eval "$(scripts/services start)"; eval "$(scripts/pg-server start)"; cargo
//! bench --features lmdb,redis,memcached,postgres --bench cache` (then stop both servers).

use criterion::{Criterion, Throughput};
use locktable::cache::{Cache, CacheConfig, IdKey};
use locktable::session::{FileStore, MemoryStore, Store};
use locktable::{Error, LockTable, TableOptions};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const WORKERS: usize = 16;

/// The stores this run measures, in order; each one left out is said on stderr with why.
fn store_kinds() -> Vec<&'static str> {
    let mut kinds = vec!["memory", "file"];
    let optional: [(&str, &str, Option<&str>, bool); 4] = [
        ("kv", "lmdb", None, cfg!(feature = "lmdb")),
        (
            "redis",
            "redis",
            Some("LOCKTABLE_REDIS_URL"),
            cfg!(feature = "redis"),
        ),
        (
            "memcached",
            "memcached",
            Some("LOCKTABLE_MEMCACHED_URL"),
            cfg!(feature = "memcached"),
        ),
        (
            "postgres",
            "postgres",
            Some("LOCKTABLE_PG_URL"),
            cfg!(feature = "postgres"),
        ),
    ];
    for (kind, feature, var, enabled) in optional {
        if !enabled {
            eprintln!("{kind}: left out (feature `{feature}` is off)");
        } else if let Some(var) = var.filter(|v| std::env::var(v).map_or(true, |u| u.is_empty())) {
            eprintln!("{kind}: left out ({var} is not set)");
        } else {
            kinds.push(kind);
        }
    }
    kinds
}

/// A key prefix (Redis, memcached) or table name (PostgreSQL) no other run uses.
#[allow(dead_code)] // unused without the server stores' features
fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "cachebench_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[allow(dead_code)] // unused without the server stores' features
fn url(var: &str) -> String {
    std::env::var(var).expect("store_kinds checked it")
}

fn store(kind: &str, dir: &Path) -> Arc<dyn Store> {
    match kind {
        "memory" => Arc::new(MemoryStore::new()),
        "file" => Arc::new(
            FileStore::open(dir.join("cache"))
                .unwrap()
                .with_fsync(false),
        ),
        #[cfg(feature = "lmdb")]
        "kv" => Arc::new(locktable::session::KvStore::open(dir.join("kv")).unwrap()),
        #[cfg(feature = "redis")]
        "redis" => Arc::new(
            locktable::session::RedisStore::open(&url("LOCKTABLE_REDIS_URL"))
                .unwrap()
                .with_prefix(unique("redis") + ":"),
        ),
        #[cfg(feature = "memcached")]
        "memcached" => Arc::new(
            locktable::session::MemcachedStore::open(&url("LOCKTABLE_MEMCACHED_URL"))
                .unwrap()
                .with_prefix(unique("memcached") + ":"),
        ),
        #[cfg(feature = "postgres")]
        "postgres" => Arc::new(
            locktable::session::PgStore::with_pool(
                locktable::session::PgPool::connect(&url("LOCKTABLE_PG_URL")).unwrap(),
                locktable::session::PgStoreOptions {
                    schema: "locktable_cachebench".into(),
                    table: unique("t"),
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        other => unreachable!("store_kinds never names {other}"),
    }
}

fn cache(kind: &str, dir: &Path, grace: Duration) -> Cache {
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    Cache::new(
        Arc::new(table),
        store(kind, dir),
        IdKey::from_bytes([9; 32]),
        CacheConfig {
            stale_grace: grace,
            ..CacheConfig::default()
        },
    )
}

/// The benchmark group `name`: `read` of a fresh 200-byte value, on each store of `kinds`.
fn hit_group(
    c: &mut Criterion,
    name: &str,
    kinds: &[&str],
    read: impl Fn(&locktable::cache::Region) -> String,
) {
    let value = "x".repeat(200);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for &kind in kinds {
        let dir = tempfile::tempdir().unwrap();
        let r = cache(kind, dir.path(), Duration::from_secs(60)).region("pages");
        r.set("/index", &value, Duration::from_secs(3600)).unwrap();
        g.bench_function(kind, |b| b.iter(|| black_box(read(&r))));
    }
    g.finish();
}

fn hits(c: &mut Criterion, kinds: &[&str]) {
    hit_group(c, "cache_hit", kinds, |r| {
        r.get::<String>("/index").unwrap().unwrap()
    });
    hit_group(c, "cache_hit_get_or_create", kinds, |r| {
        r.get_or_create(
            "/index",
            Duration::from_secs(3600),
            || -> Result<_, Error> { unreachable!("the value is fresh") },
        )
        .unwrap()
    });
}

/// One worker's request: with the creation lock or the naive way.
fn request(r: &locktable::cache::Region, locked: bool, creations: &AtomicU64) {
    let create = || -> Result<String, Error> {
        creations.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1));
        Ok("fresh".to_owned())
    };
    let ttl = Duration::from_secs(3600);
    if locked {
        let _: String = r.get_or_create("k", ttl, create).unwrap();
    } else if r.get::<String>("k").unwrap().is_none() {
        r.set("k", &create().unwrap(), ttl).unwrap();
    }
}

fn expiry_to_fresh(c: &mut Criterion, kinds: &[&str]) {
    let mut g = c.benchmark_group("expiry_to_fresh_16_workers");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    let mut summary = Vec::new();
    for locked in [true, false] {
        for &kind in kinds {
            let dir = tempfile::tempdir().unwrap();
            let main = cache(kind, dir.path(), Duration::ZERO);
            let region = main.region("r");
            let creations = Arc::new(AtomicU64::new(0));
            let expiries = Arc::new(AtomicU64::new(0));
            let name = format!("{}/{kind}", if locked { "locked" } else { "no_lock" });
            g.bench_function(name.as_str(), |b| {
                b.iter_custom(|iters| {
                    let start = Arc::new(Barrier::new(WORKERS + 1));
                    let done = Arc::new(Barrier::new(WORKERS + 1));
                    let stop = Arc::new(AtomicBool::new(false));
                    let threads: Vec<_> = (0..WORKERS)
                        .map(|_| {
                            let (r, start, done, stop, n) = (
                                main.clone().region("r"),
                                start.clone(),
                                done.clone(),
                                stop.clone(),
                                creations.clone(),
                            );
                            std::thread::spawn(move || loop {
                                start.wait();
                                if stop.load(Ordering::Relaxed) {
                                    return;
                                }
                                request(&r, locked, &n);
                                done.wait();
                            })
                        })
                        .collect();
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // Expired at once: stale grace 0, time-to-live 0.
                        region.set("k", &"old", Duration::ZERO).unwrap();
                        expiries.fetch_add(1, Ordering::Relaxed);
                        start.wait();
                        let t = Instant::now();
                        done.wait();
                        total += t.elapsed();
                    }
                    stop.store(true, Ordering::Relaxed);
                    start.wait();
                    for t in threads {
                        t.join().unwrap();
                    }
                    total
                })
            });
            // Nothing to say for a benchmark that a filter left out.
            let expiries = expiries.load(Ordering::Relaxed);
            if expiries > 0 {
                summary.push(format!(
                    "{name}: {:.2} creations per expiry",
                    creations.load(Ordering::Relaxed) as f64 / expiries as f64
                ));
            }
        }
    }
    g.finish();
    for line in summary {
        println!("{line}");
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let kinds = store_kinds();
    hits(&mut c, &kinds);
    expiry_to_fresh(&mut c, &kinds);
    c.final_summary();
}
