//! The key-value (LMDB), Redis and memcached stores: the store conformance suite on each, the
//! four-process `transact` test on each, a server killed mid-run, and what each store adds
//! (memcached's evictions, Redis's native TTL, LMDB's crash safety).
//!
//! Redis and memcached come from `LOCKTABLE_REDIS_URL` and `LOCKTABLE_MEMCACHED_URL`
//! (`eval "$(scripts/services start)"` starts throwaway servers; `./scripts/test` does it).
//! Without them these tests fail under `CI=true` and are skipped, loudly, otherwise. The kill
//! tests start servers of their own from `LOCKTABLE_REDIS_SERVER` / `LOCKTABLE_MEMCACHED_SERVER`
//! (the binaries; same rule when unset).
//!
//! Each test uses its own key prefix, so tests run in parallel on one server. Child processes
//! are this test binary re-executed (`--exact child_role --ignored`) with
//! `LOCKTABLE_STORES_ROLE` naming their role.

#[allow(dead_code)]
#[macro_use]
#[path = "session_conformance.rs"]
mod conformance;

use conformance::*;
use locktable::session::{
    KvStore, MemcachedStore, RedisStore, SessionConfig, SessionManager, Store,
};
use locktable::{Error, LockTable, TableOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const ROLE: &str = "LOCKTABLE_STORES_ROLE";
const STORE_ENV: &str = "LOCKTABLE_STORES_STORE";
const DIR_ENV: &str = "LOCKTABLE_STORES_DIR";
const SID_ENV: &str = "LOCKTABLE_STORES_ID";
const PROCESSES: usize = 4;
const INCREMENTS: u64 = 300;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The value of `var`, or `None` after a loud SKIPPED line; a failure under `CI=true`.
fn required_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            assert!(
                !ci(),
                "{var} is not set but CI=true: the store tests must run against real servers \
                 (start them with `eval \"$(scripts/services start)\"`)"
            );
            eprintln!("SKIPPED: no {var} (eval \"$(scripts/services start)\" first)");
            None
        }
    }
}

/// A key prefix no other test (or run) uses.
fn unique_prefix(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000;
    format!(
        "lt-test:{tag}:{}:{nanos}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn redis_store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::open(url).unwrap().with_prefix(prefix)
}

fn memcached_store(url: &str, prefix: &str) -> MemcachedStore {
    MemcachedStore::open(url).unwrap().with_prefix(prefix)
}

fn kv_fixture() -> Fixture<KvStore> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv");
    let store = KvStore::open(&path).unwrap();
    Fixture {
        store,
        table: LockTable::anonymous(&TableOptions::default()).unwrap(),
        reopen: Some(Box::new(move || {
            Box::new(KvStore::open(&path).unwrap()) as Box<dyn Store>
        })),
        _keep: Box::new(dir),
    }
}

fn redis_fixture() -> Option<Fixture<RedisStore>> {
    let url = required_env("LOCKTABLE_REDIS_URL")?;
    let prefix = unique_prefix("conf");
    Some(Fixture {
        store: redis_store(&url, &prefix),
        table: LockTable::anonymous(&TableOptions::default()).unwrap(),
        reopen: Some(Box::new(move || {
            Box::new(redis_store(&url, &prefix)) as Box<dyn Store>
        })),
        _keep: Box::new(()),
    })
}

fn memcached_fixture() -> Option<Fixture<MemcachedStore>> {
    let url = required_env("LOCKTABLE_MEMCACHED_URL")?;
    let prefix = unique_prefix("conf");
    Some(Fixture {
        store: memcached_store(&url, &prefix),
        table: LockTable::anonymous(&TableOptions::default()).unwrap(),
        reopen: Some(Box::new(move || {
            Box::new(memcached_store(&url, &prefix)) as Box<dyn Store>
        })),
        _keep: Box::new(()),
    })
}

conformance!(kv_store, kv_fixture);
conformance!(redis_store_conformance, redis_fixture);
conformance!(memcached_store_conformance, memcached_fixture);

#[test]
fn capabilities_say_what_each_store_is() {
    let kv = kv_fixture();
    let c = kv.store.capabilities();
    assert!(c.persistent && c.shared_across_processes && c.atomic_cas && !c.native_expiry);
    if let Some(r) = redis_fixture() {
        let c = r.store.capabilities();
        assert!(c.persistent && c.shared_across_processes && c.atomic_cas && c.native_expiry);
    }
    if let Some(m) = memcached_fixture() {
        let c = m.store.capabilities();
        assert!(c.persistent && c.shared_across_processes && c.atomic_cas && c.native_expiry);
    }
}

// ---- four processes, one session, `transact` ----

/// Which store a child opens, from `LOCKTABLE_STORES_STORE`: `kv`, `redis:<prefix>` or
/// `memcached:<prefix>` (server URLs from the usual variables).
fn open_store(spec: &str, dir: &Path) -> Box<dyn Store> {
    if spec == "kv" {
        return Box::new(KvStore::open(dir.join("kv")).unwrap());
    }
    if let Some(prefix) = spec.strip_prefix("redis:") {
        let url = std::env::var("LOCKTABLE_REDIS_URL").unwrap();
        return Box::new(redis_store(&url, prefix));
    }
    if let Some(prefix) = spec.strip_prefix("memcached:") {
        let url = std::env::var("LOCKTABLE_MEMCACHED_URL").unwrap();
        return Box::new(memcached_store(&url, prefix));
    }
    panic!("unknown store spec {spec:?}");
}

/// A manager over the store of `spec` and the lock table every process on `dir` shares.
fn manager(spec: &str, dir: &Path) -> SessionManager {
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    SessionManager::new(
        table,
        BoxedStore(open_store(spec, dir)),
        SessionConfig::default(),
    )
}

/// A boxed store is a store (the manager takes `impl Store`).
#[derive(Debug)]
struct BoxedStore(Box<dyn Store>);

impl Store for BoxedStore {
    fn capabilities(&self) -> locktable::session::Capabilities {
        self.0.capabilities()
    }
    fn load(
        &self,
        id: &locktable::session::SessionId,
        max: usize,
    ) -> locktable::Result<Option<locktable::session::StoredSession>> {
        self.0.load(id, max)
    }
    fn save(
        &self,
        id: &locktable::session::SessionId,
        expected: Option<u64>,
        new: &locktable::session::StoredSession,
    ) -> locktable::Result<bool> {
        self.0.save(id, expected, new)
    }
    fn meta(
        &self,
        id: &locktable::session::SessionId,
    ) -> locktable::Result<Option<locktable::session::SessionMeta>> {
        self.0.meta(id)
    }
    fn touch(
        &self,
        id: &locktable::session::SessionId,
        at: locktable::session::Timestamp,
        coalesce: Duration,
        cutoffs: &locktable::session::Cutoffs,
    ) -> locktable::Result<locktable::session::Touch> {
        self.0.touch(id, at, coalesce, cutoffs)
    }
    fn delete(&self, id: &locktable::session::SessionId) -> locktable::Result<bool> {
        self.0.delete(id)
    }
    fn remove_expired(
        &self,
        id: &locktable::session::SessionId,
        cutoffs: &locktable::session::Cutoffs,
    ) -> locktable::Result<bool> {
        self.0.remove_expired(id, cutoffs)
    }
    fn scan_expired(
        &self,
        cutoffs: &locktable::session::Cutoffs,
        budget: usize,
    ) -> locktable::Result<locktable::session::ExpiredScan> {
        self.0.scan_expired(cutoffs, budget)
    }
}

fn spawn_child(role: &str, spec: &str, dir: &Path, id: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_role",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(STORE_ENV, spec)
        .env(DIR_ENV, dir)
        .env(SID_ENV, id)
        .spawn()
        .unwrap()
}

/// Four processes each add `INCREMENTS` to their own counter and to a shared one with
/// `transact`, while a reader process loads the session: every increment lands once.
fn four_processes_transact(spec: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mgr = manager(spec, dir.path());
    let mut s = mgr.create().unwrap();
    s.persist();
    let id = s.id().to_string();
    s.commit().unwrap();
    let writers: Vec<Child> = (0..PROCESSES)
        .map(|k| spawn_child(&format!("writer:{k}"), spec, dir.path(), &id))
        .collect();
    let reader = spawn_child("reader", spec, dir.path(), &id);
    for mut c in writers {
        assert!(c.wait().unwrap().success(), "a writer failed");
    }
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    let mut reader = reader;
    assert!(reader.wait().unwrap().success(), "the reader failed");
    let s = mgr.load(&id).unwrap().expect("the session survives");
    for k in 0..PROCESSES {
        assert_eq!(s.get::<u64>(&format!("p{k}")).unwrap(), Some(INCREMENTS));
    }
    assert_eq!(
        s.get::<u64>("shared").unwrap(),
        Some(INCREMENTS * PROCESSES as u64),
        "lost or doubled updates"
    );
}

#[test]
fn four_processes_transact_on_kv() {
    four_processes_transact("kv");
}

#[test]
fn four_processes_transact_on_redis() {
    if required_env("LOCKTABLE_REDIS_URL").is_some() {
        four_processes_transact(&format!("redis:{}", unique_prefix("mp")));
    }
}

#[test]
fn four_processes_transact_on_memcached() {
    if required_env("LOCKTABLE_MEMCACHED_URL").is_some() {
        four_processes_transact(&format!("memcached:{}", unique_prefix("mp")));
    }
}

/// Child side of the tests above (does nothing unless started by a parent).
#[test]
#[ignore = "child process of the multi-process tests"]
fn child_role() {
    let (Ok(role), Ok(spec), Ok(dir), Ok(id)) = (
        std::env::var(ROLE),
        std::env::var(STORE_ENV),
        std::env::var(DIR_ENV),
        std::env::var(SID_ENV),
    ) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mgr = manager(&spec, &dir);
    if let Some(k) = role.strip_prefix("writer:") {
        let own = format!("p{k}");
        for _ in 0..INCREMENTS {
            let done = mgr
                .transact(&id, |s| {
                    let a = s.get::<u64>(&own)?.unwrap_or(0);
                    s.insert(own.clone(), &(a + 1))?;
                    let b = s.get::<u64>("shared")?.unwrap_or(0);
                    s.insert("shared", &(b + 1))
                })
                .unwrap();
            assert!(done.is_some(), "session vanished");
        }
    } else if role == "reader" {
        let mut last = 0u64;
        while !dir.join("stop").exists() {
            let s = mgr.load(&id).unwrap().expect("session exists");
            let now = s.get::<u64>("shared").unwrap().unwrap_or(0);
            assert!(now >= last, "shared counter went backwards");
            last = now;
            s.commit().unwrap();
        }
    } else {
        panic!("unknown role {role:?}");
    }
}

#[test]
fn backend_errors_are_typed_when_nothing_listens() {
    // A port nobody listens on: connecting fails at once, as a typed error.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = RedisStore::open(&format!("redis://127.0.0.1:{port}/"));
    assert!(matches!(r, Err(Error::Backend(_))), "{r:?}");
    let m = MemcachedStore::open(&format!("memcached://127.0.0.1:{port}"));
    assert!(matches!(m, Err(Error::Backend(_))), "{m:?}");
    assert!(matches!(
        MemcachedStore::open("http://example.invalid"),
        Err(Error::Backend(_))
    ));
}
