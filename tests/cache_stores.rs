//! The cache's creation claim on every store beyond memory and file: 8 threads call
//! `get_or_create` on one expired key at once and `create` runs exactly once, all 8 getting
//! its value.
//!
//! Each test needs its store's feature (`lmdb`, `redis`, `memcached`, `postgres`); the server
//! stores take their server from `LOCKTABLE_REDIS_URL`, `LOCKTABLE_MEMCACHED_URL` (`eval
//! "$(scripts/services start)"`) or `LOCKTABLE_PG_URL` (`eval "$(scripts/pg-server start)"`).
//! Without it a test fails, saying how to start the server.
#![allow(dead_code, unused_imports)] // parts are unused with some features off

use locktable::cache::{Cache, CacheConfig, CreationLock, IdKey};
use locktable::session::Store;
use locktable::{Error, LockTable, TableOptions};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;
use support::servers::{required_env, unique_tag};

mod support;

const THREADS: usize = 8;

/// A key prefix or table name no other test or run uses.
fn unique(tag: &str) -> String {
    format!("cachestores_{tag}_{}", unique_tag("_"))
}

/// A `PgStore` on a table of its own, on the server at `url`.
#[cfg(feature = "postgres")]
fn pg_store(url: &str) -> locktable::session::PgStore {
    locktable::session::PgStore::with_pool(
        locktable::session::PgPool::connect(url).unwrap(),
        locktable::session::PgStoreOptions {
            schema: "locktable_cachestores".into(),
            table: unique("t"),
            ..Default::default()
        },
    )
    .unwrap()
}

/// 8 threads, each with its own handle on the lock table file and one shared store, released
/// together on a key whose value has just expired (stale grace 0: nobody may serve it).
fn one_creation_for_eight_threads(store: Arc<dyn Store>, dir: &Path) {
    let table = || -> Arc<dyn CreationLock> {
        Arc::new(LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap())
    };
    one_creation_for_eight_claimers(store, table);
}

/// The same with each thread's creation lock from `claim_lock` (its own handle, as its own
/// process or host would have).
fn one_creation_for_eight_claimers(
    store: Arc<dyn Store>,
    claim_lock: impl Fn() -> Arc<dyn CreationLock>,
) {
    let key = IdKey::generate().unwrap();
    let handle = |store: Arc<dyn Store>| {
        let cfg = CacheConfig {
            stale_grace: Duration::ZERO,
            wait_timeout: Duration::from_secs(30),
            ..CacheConfig::default()
        };
        Cache::new(claim_lock(), store, key.clone(), cfg)
    };
    let region = handle(store.clone()).region("r");
    region.set("k", &"old".to_owned(), Duration::ZERO).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        region.get::<String>("k").unwrap(),
        None,
        "the value has expired"
    );

    let creations = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (r, start, creations) = (
                handle(store.clone()).region("r"),
                start.clone(),
                creations.clone(),
            );
            std::thread::spawn(move || {
                start.wait();
                r.get_or_create("k", Duration::from_secs(3600), || {
                    let n = creations.fetch_add(1, Ordering::SeqCst) + 1;
                    // Slow, so that every other thread arrives while it runs.
                    std::thread::sleep(Duration::from_millis(200));
                    Ok::<_, Error>(format!("fresh #{n}"))
                })
                .unwrap()
            })
        })
        .collect();
    let values: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        creations.load(Ordering::SeqCst),
        1,
        "create ran once: {values:?}"
    );
    assert!(values.iter().all(|v| v == "fresh #1"), "{values:?}");
    assert_eq!(
        region.get::<String>("k").unwrap().as_deref(),
        Some("fresh #1")
    );
}

#[cfg(feature = "lmdb")]
#[test]
fn kv_one_creation_for_eight_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = locktable::session::KvStore::open(dir.path().join("kv")).unwrap();
    one_creation_for_eight_threads(Arc::new(store), dir.path());
}

#[cfg(feature = "redis")]
#[test]
fn redis_one_creation_for_eight_threads() {
    let url = required_env("LOCKTABLE_REDIS_URL");
    let dir = tempfile::tempdir().unwrap();
    let store = locktable::session::RedisStore::open(&url)
        .unwrap()
        .with_prefix(unique("redis") + ":");
    one_creation_for_eight_threads(Arc::new(store), dir.path());
}

#[cfg(feature = "memcached")]
#[test]
fn memcached_one_creation_for_eight_threads() {
    let url = required_env("LOCKTABLE_MEMCACHED_URL");
    let dir = tempfile::tempdir().unwrap();
    let store = locktable::session::MemcachedStore::open(&url)
        .unwrap()
        .with_prefix(unique("memcached") + ":");
    one_creation_for_eight_threads(Arc::new(store), dir.path());
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_one_creation_for_eight_threads() {
    let url = required_env("LOCKTABLE_PG_URL");
    let dir = tempfile::tempdir().unwrap();
    let store = pg_store(&url);
    one_creation_for_eight_threads(Arc::new(store), dir.path());
}

/// Several hosts: each thread's claim is a PostgreSQL advisory lock through its own pool, and the
/// threads share nothing but the database (no lock-table file).
#[cfg(feature = "postgres")]
#[test]
fn postgres_advisory_claim_one_creation_for_eight_hosts() {
    let url = required_env("LOCKTABLE_PG_URL");
    let store = pg_store(&url);
    let secret = store.lock_secret();
    let claim_lock = || -> Arc<dyn CreationLock> {
        Arc::new(locktable::session::PgLocks::connect(&url, secret).unwrap())
    };
    one_creation_for_eight_claimers(Arc::new(store), claim_lock);
}
