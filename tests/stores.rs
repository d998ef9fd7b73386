//! The key-value (LMDB), Redis and memcached stores: the store conformance suite on each, the
//! four-process `transact` test on each, a server killed mid-run, and what each store adds
//! (memcached's evictions, Redis's native TTL, LMDB's crash safety).
//!
//! Redis and memcached come from `LOCKTABLE_REDIS_URL` and `LOCKTABLE_MEMCACHED_URL`
//! (`eval "$(scripts/services start)"` starts throwaway servers; `./scripts/test` does it).
//! Without them these tests fail, saying how to start them. The kill
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
mod support;

use conformance::*;
use locktable::session::{
    KvStore, MemcachedStore, RedisStore, SessionConfig, SessionManager, Store,
};
use locktable::{Error, LockTable, TableOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::child::child_command;
use support::counters;
use support::servers::{required_env, unique_tag};
use support::spy_store::SpyStore;

const ROLE: &str = "LOCKTABLE_STORES_ROLE";
const STORE_ENV: &str = "LOCKTABLE_STORES_STORE";
const DIR_ENV: &str = "LOCKTABLE_STORES_DIR";
const SID_ENV: &str = "LOCKTABLE_STORES_ID";
const PROCESSES: usize = 4;
const INCREMENTS: u64 = 300;

/// A key prefix no other test (or run) uses.
fn unique_prefix(tag: &str) -> String {
    format!("lt-test:{tag}:{}:", unique_tag(":"))
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

fn redis_fixture() -> Fixture<RedisStore> {
    let url = required_env("LOCKTABLE_REDIS_URL");
    let prefix = unique_prefix("conf");
    Fixture {
        store: redis_store(&url, &prefix),
        table: LockTable::anonymous(&TableOptions::default()).unwrap(),
        reopen: Some(Box::new(move || {
            Box::new(redis_store(&url, &prefix)) as Box<dyn Store>
        })),
        _keep: Box::new(()),
    }
}

fn memcached_fixture() -> Fixture<MemcachedStore> {
    let url = required_env("LOCKTABLE_MEMCACHED_URL");
    let prefix = unique_prefix("conf");
    Fixture {
        store: memcached_store(&url, &prefix),
        table: LockTable::anonymous(&TableOptions::default()).unwrap(),
        reopen: Some(Box::new(move || {
            Box::new(memcached_store(&url, &prefix)) as Box<dyn Store>
        })),
        _keep: Box::new(()),
    }
}

conformance!(lmdb_kv_suite, kv_fixture);
conformance!(redis_suite, redis_fixture);
conformance!(memcached_suite, memcached_fixture);

#[test]
fn capabilities_say_what_each_store_is() {
    let kv = kv_fixture();
    let c = kv.store.capabilities();
    assert!(c.persistent && c.shared_across_processes && c.atomic_cas && !c.native_expiry);
    let c = redis_fixture().store.capabilities();
    assert!(c.persistent && c.shared_across_processes && c.atomic_cas && c.native_expiry);
    let c = memcached_fixture().store.capabilities();
    assert!(c.persistent && c.shared_across_processes && c.atomic_cas && c.native_expiry);
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
        SpyStore::boxed(open_store(spec, dir), ()),
        SessionConfig::default(),
    )
}

fn spawn_child(role: &str, spec: &str, dir: &Path, id: &str) -> Child {
    child_command("child_role")
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
    let id = counters::empty_session(&mgr);
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
    counters::assert_counts(&s, PROCESSES, INCREMENTS);
}

#[test]
fn four_processes_transact_on_kv() {
    four_processes_transact("kv");
}

#[test]
fn four_processes_transact_on_redis() {
    required_env("LOCKTABLE_REDIS_URL");
    four_processes_transact(&format!("redis:{}", unique_prefix("mp")));
}

#[test]
fn four_processes_transact_on_memcached() {
    required_env("LOCKTABLE_MEMCACHED_URL");
    four_processes_transact(&format!("memcached:{}", unique_prefix("mp")));
}

/// Increments until killed; after each commit, writes the count it knows is committed.
fn kv_writer(dir: &Path, id: &str) {
    let mgr = SessionManager::open_kv(dir).unwrap();
    for k in 1.. {
        mgr.transact(id, |s| {
            let v = s.get::<u64>("n")?.unwrap_or(0);
            s.insert("n", &(v + 1))
        })
        .unwrap()
        .expect("the session exists");
        std::fs::write(dir.join("acked.tmp"), format!("{k}")).unwrap();
        std::fs::rename(dir.join("acked.tmp"), dir.join("acked")).unwrap();
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
    if role == "kv-writer" {
        return kv_writer(&dir, &id);
    }
    let mgr = manager(&spec, &dir);
    if let Some(k) = role.strip_prefix("writer:") {
        counters::write_counts(&mgr, &id, k, INCREMENTS);
    } else if role == "reader" {
        counters::read_counts_until_stop(&mgr, &id, &dir);
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

// ---- a server killed mid-run ----

/// A private server on a free port, killed and restarted by the test (the shared one serves
/// the other tests meanwhile).
struct PrivateServer {
    bin: String,
    args: Vec<String>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl PrivateServer {
    fn start(bin: String, args: Vec<String>, dir: tempfile::TempDir) -> PrivateServer {
        let mut s = PrivateServer {
            bin,
            args,
            child: None,
            _dir: dir,
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        self.child = Some(
            Command::new(&self.bin)
                .args(&self.args)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    /// SIGKILL: no clean shutdown.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Retries `open` until the server answers (it was just started).
fn wait_for<T>(mut open: impl FnMut() -> locktable::Result<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the server did not come up: {e}"),
        }
    }
}

/// What the workers saw.
#[derive(Debug, Default)]
struct Outcomes {
    ok: u64,
    ok_after_restart: u64,
    gone: u64,
    unknown: u64,
    backend: u64,
    slowest: Duration,
}

/// Four threads increment one counter with `transact` while `outage` kills and restarts the
/// server. Every error must be typed (`Backend`, `OutcomeUnknown`), every call bounded.
fn hammer_through_an_outage(mgr: &SessionManager, id: &str, outage: impl FnOnce()) -> Outcomes {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let restarted = std::sync::atomic::AtomicBool::new(false);
    let out = parking_lot::Mutex::new(Outcomes::default());
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let after = restarted.load(Ordering::SeqCst);
                    let t = std::time::Instant::now();
                    let r = mgr.transact(id, |s| {
                        let n = s.get::<u64>("n")?.unwrap_or(0);
                        s.insert("n", &(n + 1))
                    });
                    let took = t.elapsed();
                    let failed = !matches!(r, Ok(Some(())));
                    let mut o = out.lock();
                    o.slowest = o.slowest.max(took);
                    match r {
                        Ok(Some(())) => {
                            o.ok += 1;
                            if after {
                                o.ok_after_restart += 1;
                            }
                        }
                        Ok(None) => o.gone += 1,
                        Err(Error::OutcomeUnknown(_)) => o.unknown += 1,
                        Err(Error::Backend(m)) => {
                            assert!(!m.contains(id), "an error message leaks the session ID");
                            o.backend += 1
                        }
                        Err(e) => panic!("untyped or unexpected error: {e:?}"),
                    }
                    drop(o);
                    if failed {
                        // The server is down: do not spin.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        outage();
        restarted.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::SeqCst);
    });
    out.into_inner()
}

fn counter(mgr: &SessionManager, id: &str) -> Option<u64> {
    mgr.load(id)
        .unwrap()
        .map(|s| s.get::<u64>("n").unwrap().unwrap_or(0))
}

#[test]
fn redis_killed_mid_run_gives_typed_errors_and_applies_nothing_twice() {
    let bin = required_env("LOCKTABLE_REDIS_SERVER");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // Every acknowledged write is in the append-only file before the reply, so it survives
    // the kill: what the counter holds afterwards can be compared with what was acknowledged.
    let args: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir.path().to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut server = PrivateServer::start(bin, args, dir);
    let url = format!("redis://127.0.0.1:{port}/");
    let store = wait_for(|| RedisStore::open(&url)).with_timeout(Duration::from_millis(300));
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(table, store, SessionConfig::default());
    let mut s = mgr.create().unwrap();
    s.insert("n", &0u64).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let o = hammer_through_an_outage(&mgr, &id, || {
        server.kill();
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
        wait_for(|| RedisStore::open(&url));
    });
    eprintln!("{o:?}");
    assert!(o.backend + o.unknown > 0, "the outage was not seen: {o:?}");
    assert!(
        o.ok_after_restart > 0,
        "no recovery after the restart: {o:?}"
    );
    assert_eq!(
        o.gone, 0,
        "the session survived in the append-only file: {o:?}"
    );
    assert!(o.slowest < Duration::from_secs(10), "a call hung: {o:?}");
    let n = counter(&mgr, &id).expect("the session survives the restart");
    assert!(
        o.ok <= n && n <= o.ok + o.unknown,
        "acknowledged {} (+{} unknown) but the counter is {n}: {o:?}",
        o.ok,
        o.unknown
    );
}

#[test]
fn memcached_killed_mid_run_gives_typed_errors_and_the_session_is_gone_whole() {
    let bin = required_env("LOCKTABLE_MEMCACHED_SERVER");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let args: Vec<String> = [
        "-l",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "0",
        "-m",
        "16",
        "-u",
        &user,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut server = PrivateServer::start(bin, args, dir);
    let url = format!("memcached://127.0.0.1:{port}");
    let store = wait_for(|| MemcachedStore::open(&url)).with_timeout(Duration::from_millis(300));
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(table, store, SessionConfig::default());
    let mut s = mgr.create().unwrap();
    s.insert("n", &0u64).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let o = hammer_through_an_outage(&mgr, &id, || {
        server.kill();
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
        wait_for(|| MemcachedStore::open(&url));
    });
    eprintln!("{o:?}");
    assert!(o.backend + o.unknown > 0, "the outage was not seen: {o:?}");
    assert!(o.ok > 0, "nothing worked before the kill: {o:?}");
    assert!(o.slowest < Duration::from_secs(10), "a call hung: {o:?}");
    // memcached keeps nothing across a restart: the session is gone, whole (no error, no half).
    assert_eq!(counter(&mgr, &id), None);
    assert!(
        o.gone > 0,
        "after the restart, transact must say the session is gone: {o:?}"
    );
    // And the store reconnected: a new session works.
    let mut s = mgr.create().unwrap();
    s.insert("n", &1u64).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    assert_eq!(counter(&mgr, &id), Some(1));
}

// ---- memcached: an evicted half means the whole session is gone ----

/// One text-protocol exchange with the shared memcached server (the test's view of its items).
fn memcached_raw(url: &str, cmd: &str) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("memcached://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if n == 0
            || text.ends_with("END\r\n")
            || text.ends_with("DELETED\r\n")
            || text.ends_with("NOT_FOUND\r\n")
        {
            return text.into_owned();
        }
    }
}

#[test]
fn memcached_session_missing_either_half_is_gone_everywhere() {
    let url = required_env("LOCKTABLE_MEMCACHED_URL");
    let prefix = unique_prefix("evict");
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(
        table,
        memcached_store(&url, &prefix),
        SessionConfig::default(),
    );
    let new_session = || {
        let mut s = mgr.create().unwrap();
        s.insert("k", &1).unwrap();
        let id = s.id().to_string();
        s.commit().unwrap();
        id
    };
    // The record item evicted, the metadata left: gone, and the metadata goes too.
    let id = new_session();
    let meta = memcached_raw(&url, &format!("get {prefix}m:{id}"));
    let nonce = meta
        .lines()
        .nth(1)
        .unwrap()
        .split(' ')
        .nth(5)
        .unwrap()
        .to_owned();
    let deleted = memcached_raw(&url, &format!("delete {prefix}d:{id}:{nonce}"));
    assert_eq!(deleted, "DELETED\r\n");
    let sid = locktable::session::SessionId::parse(&id).unwrap();
    assert_eq!(mgr.store().meta(&sid).unwrap(), None);
    assert!(mgr.load(&id).unwrap().is_none());
    assert_eq!(
        memcached_raw(&url, &format!("get {prefix}m:{id}")),
        "END\r\n",
        "the orphaned metadata is expired"
    );
    assert_eq!(mgr.transact(&id, |s| s.insert("k", &2)).unwrap(), None);
    // The metadata evicted, the record left: gone.
    let id = new_session();
    memcached_raw(&url, &format!("delete {prefix}m:{id}"));
    assert!(mgr.load(&id).unwrap().is_none());
    let sid = locktable::session::SessionId::parse(&id).unwrap();
    assert_eq!(mgr.store().meta(&sid).unwrap(), None);
    assert_eq!(
        mgr.store()
            .touch(
                &sid,
                locktable::session::Timestamp(u64::MAX / 2),
                Duration::ZERO,
                &mgr.config().cutoffs(locktable::session::Timestamp(0))
            )
            .unwrap(),
        locktable::session::Touch::Missing
    );
}

// ---- Redis: the native TTL follows the session ----

#[test]
fn redis_ttl_follows_the_sessions_expiry() {
    let url = required_env("LOCKTABLE_REDIS_URL");
    let prefix = unique_prefix("ttl");
    let cfg = SessionConfig {
        idle_timeout: Duration::from_secs(600),
        ..SessionConfig::default()
    };
    let store = redis_store(&url, &prefix).with_rule_of(&cfg);
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(table, store, cfg);
    let mut s = mgr.create().unwrap();
    s.insert("k", &1).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}{id}"))
        .query(&mut c)
        .unwrap();
    // Idle timeout (600 s) plus the 60 s grace, less the time since the save.
    assert!((650_000..=660_000).contains(&pttl), "{pttl}");
    // A session with a fixed end gets a TTL to that end.
    let mut s = mgr.load(&id).unwrap().unwrap();
    let at = locktable::session::Timestamp(s.created().0 + 10_000);
    s.set_expiry(locktable::session::Expiry::At(at));
    s.commit().unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}{id}"))
        .query(&mut c)
        .unwrap();
    assert!((60_000..=70_000).contains(&pttl), "{pttl}");
}

// ---- LMDB: a process killed mid-write ----

#[test]
fn kv_writer_killed_mid_run_loses_nothing_acknowledged_and_blocks_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = SessionManager::open_kv(dir.path()).unwrap();
    let mut s = mgr.create().unwrap();
    s.insert("n", &0u64).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let mut child = spawn_child("kv-writer", "kv", dir.path(), &id);
    // Let it commit a while, then kill it, most likely inside a write transaction.
    let acked = dir.path().join("acked");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&acked)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        < 50
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let acked: u64 = std::fs::read_to_string(&acked)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let n = counter(&mgr, &id).expect("the session survives");
    // The acknowledgement is written after the commit: the counter may be one ahead.
    assert!(acked <= n && n <= acked + 1, "acked {acked}, counter {n}");
    // LMDB's writer lock was recovered: writes go on. The child may have died after LMDB wrote
    // its last commit's meta page but before it published the transaction to readers (the
    // synchronous meta write is a long window for SIGKILL); that commit, never acknowledged,
    // becomes visible when the next write transaction recovers the writer mutex. So the value
    // this transaction starts from is n or n + 1 (never more, never less), and its own
    // increment is applied exactly once on top of it.
    let seen = std::sync::atomic::AtomicU64::new(u64::MAX);
    let r = mgr
        .transact_timeout(&id, Duration::from_secs(5), |s| {
            let v = s.get::<u64>("n")?.unwrap_or(0);
            seen.store(v, std::sync::atomic::Ordering::Relaxed);
            s.insert("n", &(v + 1))
        })
        .unwrap();
    assert_eq!(r, Some(()));
    let v = seen.into_inner();
    assert!(
        n <= v && v <= acked + 1,
        "acked {acked}, read {n}, transaction started from {v}"
    );
    assert_eq!(counter(&mgr, &id), Some(v + 1), "applied exactly once");
}

// ---- hostile or damaged server data ----

/// Garbage in a session's Redis hash: every call gives `SessionCorrupt` (never a panic), the
/// manager treats the session as absent, and gc deletes it.
#[test]
fn redis_garbage_metadata_is_corrupt_and_collected() {
    let url = required_env("LOCKTABLE_REDIS_URL");
    let prefix = unique_prefix("junk");
    let store = redis_store(&url, &prefix);
    let id = locktable::session::SessionId::generate().unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let key = format!("{prefix}{}", id.as_str());
    for fields in [
        vec![
            ("v", "1"),
            ("c", "x"),
            ("la", "1"),
            ("e", "d"),
            ("n", "1"),
            ("d", "z"),
        ],
        vec![
            ("v", "1"),
            ("c", "1"),
            ("la", "1"),
            ("e", "q7"),
            ("n", "1"),
            ("d", "z"),
        ],
        vec![("v", "1")],
    ] {
        let _: () = redis::cmd("DEL").arg(&key).query(&mut c).unwrap();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&key);
        for (f, v) in &fields {
            cmd.arg(f).arg(v);
        }
        let _: () = cmd.query(&mut c).unwrap();
        let corrupt = |r: String| assert!(r.contains("SessionCorrupt"), "{fields:?}: {r}");
        corrupt(format!("{:?}", store.load(&id, 1 << 20)));
        corrupt(format!("{:?}", store.meta(&id)));
        let cut = SessionConfig::default().cutoffs(locktable::session::Timestamp(10));
        corrupt(format!(
            "{:?}",
            store.touch(&id, locktable::session::Timestamp(5), Duration::ZERO, &cut)
        ));
        corrupt(format!("{:?}", store.remove_expired(&id, &cut)));
    }
    // The manager: absent to a request, deleted by gc.
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(table, store, SessionConfig::default());
    assert!(mgr.load(id.as_str()).unwrap().is_none());
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("v")
        .arg("junk")
        .query(&mut c)
        .unwrap();
    let r = mgr.gc().unwrap();
    assert_eq!(r.corrupt, 1, "{r:?}");
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut c).unwrap();
    assert_eq!(exists, 0);
}

/// A key of another type at a session's name (another program's `SET`, `RPUSH`, ...): every
/// read of it is `SessionCorrupt`, not a backend error, so the manager's corruption policy
/// applies and gc deletes it; the other sessions stay.
#[test]
fn redis_a_key_of_another_type_is_corrupt_and_collected() {
    let url = required_env("LOCKTABLE_REDIS_URL");
    let prefix = unique_prefix("wrongtype");
    let store = redis_store(&url, &prefix);
    let id = locktable::session::SessionId::generate().unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let key = format!("{prefix}{}", id.as_str());
    let plants: [(&str, &[&str], &str); 5] = [
        // A hash, but with none of a session's fields.
        ("HSET", &["foo", "bar"], "hash"),
        ("SET", &["junk"], "string"),
        ("RPUSH", &["a", "b"], "list"),
        ("SADD", &["a"], "set"),
        ("ZADD", &["1", "a"], "zset"),
    ];
    let cut = SessionConfig::default().cutoffs(locktable::session::Timestamp(10));
    for (cmd, args, planted) in plants {
        let _: () = redis::cmd("DEL").arg(&key).query(&mut c).unwrap();
        let _: () = redis::cmd(cmd).arg(&key).arg(args).query(&mut c).unwrap();
        let corrupt = |r: String| assert!(r.contains("SessionCorrupt"), "{cmd}: {r}");
        corrupt(format!("{:?}", store.load(&id, 1 << 20)));
        corrupt(format!("{:?}", store.load_head(&id, 1 << 20, 1 << 20)));
        corrupt(format!("{:?}", store.load_values(&id, 1, &["k"])));
        corrupt(format!("{:?}", store.meta(&id)));
        corrupt(format!(
            "{:?}",
            store.touch(&id, locktable::session::Timestamp(5), Duration::ZERO, &cut)
        ));
        corrupt(format!("{:?}", store.remove_expired(&id, &cut)));
        // A save finds another version there (it is not the session it expects) and leaves
        // the key alone.
        let rec = memcached_any_record();
        let head = locktable::session::StoredHead {
            meta: rec.meta,
            head: b"h".to_vec(),
            values: None,
        };
        for expected in [None, Some(1)] {
            assert!(
                matches!(store.save(&id, expected, &rec), Ok(false)),
                "{cmd}"
            );
            let r = store.save_delta(&id, expected, &head, &[("k".into(), Some(b"1".to_vec()))]);
            assert!(matches!(r, Ok(false)), "{cmd}: {r:?}");
        }
        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut c).unwrap();
        assert_eq!(kind, planted, "{cmd}: left alone");
        if cmd == "HSET" {
            let n: i64 = redis::cmd("HLEN").arg(&key).query(&mut c).unwrap();
            assert_eq!(n, 1, "{cmd}: left alone");
        }
    }
    // The manager: a live session beside it stays; the planted key is absent to a request
    // (and deleted under the default policy), and gc deletes one planted again.
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(table, store, SessionConfig::default());
    let mut live = mgr.create().unwrap();
    live.insert("n", &1).unwrap();
    let live_id = live.id().as_str().to_owned();
    live.commit().unwrap();
    assert!(mgr.load(id.as_str()).unwrap().is_none());
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut c).unwrap();
    assert_eq!(exists, 0, "invalidated by the corruption policy");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("junk")
        .query(&mut c)
        .unwrap();
    let r = mgr.gc().unwrap();
    assert_eq!((r.corrupt, r.unreadable), (1, 0), "{r:?}");
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut c).unwrap();
    assert_eq!(exists, 0, "collected by gc");
    // And deletable by the manager (under any policy: see regressions_session.rs).
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("junk")
        .query(&mut c)
        .unwrap();
    assert!(mgr.delete(id.as_str()).unwrap());
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut c).unwrap();
    assert_eq!(exists, 0, "deleted");
    let s = mgr
        .load(&live_id)
        .unwrap()
        .expect("the other session stays");
    assert_eq!(s.get::<i32>("n").unwrap(), Some(1));
}

/// Garbage in a memcached metadata item: `SessionCorrupt`, never a panic; the manager treats
/// the session as absent and deletes it.
#[test]
fn memcached_garbage_metadata_is_corrupt() {
    let url = required_env("LOCKTABLE_MEMCACHED_URL");
    let prefix = unique_prefix("junk");
    let store = memcached_store(&url, &prefix);
    let id = locktable::session::SessionId::generate().unwrap();
    for junk in [
        "",
        "1 2 3",
        "1 2 3 d 4 nothex 5",
        "1 2 3 zz 4 00 5",
        "a b c d e f g",
    ] {
        let set = memcached_raw_store(&url, &format!("{prefix}m:{}", id.as_str()), junk);
        assert_eq!(set, "STORED\r\n");
        let corrupt = |r: String| assert!(r.contains("SessionCorrupt"), "{junk:?}: {r}");
        corrupt(format!("{:?}", store.load(&id, 1 << 20)));
        corrupt(format!("{:?}", store.meta(&id)));
        let cut = SessionConfig::default().cutoffs(locktable::session::Timestamp(10));
        corrupt(format!(
            "{:?}",
            store.touch(&id, locktable::session::Timestamp(5), Duration::ZERO, &cut)
        ));
        // A save never matches unreadable metadata.
        let rec = memcached_any_record();
        assert!(!store.save(&id, None, &rec).unwrap(), "{junk:?}");
    }
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(table, store, SessionConfig::default());
    assert!(mgr.load(id.as_str()).unwrap().is_none());
    assert_eq!(
        memcached_raw(&url, &format!("get {prefix}m:{}", id.as_str())),
        "END\r\n",
        "the corrupt session was invalidated"
    );
    // And deletable by the manager.
    let meta_key = format!("{prefix}m:{}", id.as_str());
    assert_eq!(memcached_raw_store(&url, &meta_key, "1 2 3"), "STORED\r\n");
    assert!(mgr.delete(id.as_str()).unwrap());
    assert_eq!(memcached_raw(&url, &format!("get {meta_key}")), "END\r\n");
}

fn memcached_any_record() -> locktable::session::StoredSession {
    let r = locktable::session::record::Record {
        version: 1,
        created: 1,
        expiry: Default::default(),
        body: Default::default(),
    };
    locktable::session::StoredSession::from_record(
        locktable::session::record::encode(&r, 1 << 20).unwrap(),
        locktable::session::Timestamp(1),
    )
    .unwrap()
}

/// `set key 0 60 <len>` of `value` on the shared memcached server.
fn memcached_raw_store(url: &str, key: &str, value: &str) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("memcached://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(format!("set {key} 0 60 {}\r\n{value}\r\n", value.len()).as_bytes())
        .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `load_values` of more keys than Lua's `unpack` takes in one call (about 8,000): a store
/// user asking for every key of a big session stored by key gets them all, in order.
#[test]
fn redis_load_values_of_ten_thousand_keys() {
    let url = required_env("LOCKTABLE_REDIS_URL");
    let prefix = unique_prefix("manykeys");
    let dir = tempfile::tempdir().unwrap();
    let table = LockTable::open(dir.path().join("locks.table"), &TableOptions::default()).unwrap();
    let cfg = SessionConfig {
        lazy_above: 0,
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new(table, redis_store(&url, &prefix), cfg);
    let mut s = mgr.create().unwrap();
    let keys: Vec<String> = (0..10_000).map(|i| format!("k{i:05}")).collect();
    for (i, k) in keys.iter().enumerate() {
        s.insert(k.as_str(), &i).unwrap();
    }
    let id = s.id().clone();
    s.commit().unwrap();
    let version = mgr.load(id.as_str()).unwrap().unwrap().version();
    let store = redis_store(&url, &prefix);
    let mut asked: Vec<&str> = keys.iter().map(String::as_str).collect();
    asked.push("absent");
    let values = store
        .load_values(&id, version, &asked)
        .unwrap()
        .expect("the loaded version");
    assert_eq!(values.len(), asked.len());
    assert!(values[..keys.len()].iter().all(Option::is_some));
    assert_eq!(values[keys.len()], None);
    // The session reads whole through the manager too.
    let s = mgr.load(id.as_str()).unwrap().unwrap();
    assert_eq!(s.get::<usize>("k09999").unwrap(), Some(9999));
    assert_eq!(s.keys().count(), keys.len());
}

/// A key under the store's prefix that is not UTF-8 (written by another program sharing the
/// server) made every `gc()` fail: the `SCAN` reply was read as strings, so one such key made
/// the whole batch an error and the cursor never moved past it; expired sessions were never
/// collected by gc again. Keys are now read as bytes: it is skipped like any key that names no
/// session, and the sessions around it are collected.
#[test]
fn redis_a_key_that_is_not_utf8_does_not_stop_gc() {
    let url = required_env("LOCKTABLE_REDIS_URL");
    let prefix = unique_prefix("notutf8");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let mut junk = prefix.as_bytes().to_vec();
    junk.extend_from_slice(b"\xff\xfe");
    let _: () = redis::cmd("SET").arg(&junk).arg("x").query(&mut c).unwrap();
    let clock = std::sync::Arc::new(locktable::session::ManualClock::new(
        locktable::session::Timestamp(1_700_000_000_000),
    ));
    let cfg = SessionConfig {
        clock: clock.clone(),
        idle_timeout: Duration::from_secs(60),
        ..SessionConfig::default()
    };
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(table, redis_store(&url, &prefix), cfg);
    let ids: Vec<String> = (0..3)
        .map(|k| {
            let mut s = mgr.create().unwrap();
            s.insert("k", &k).unwrap();
            let id = s.id().to_string();
            s.commit().unwrap();
            id
        })
        .collect();
    clock.advance(Duration::from_secs(61));
    let mut deleted = 0;
    for _ in 0..3 {
        let r = mgr
            .gc()
            .expect("gc does not fail because of one foreign key");
        deleted += r.deleted;
    }
    assert_eq!(deleted, 3, "every expired session was collected");
    let _: () = redis::cmd("DEL").arg(&junk).query(&mut c).unwrap();
    for id in &ids {
        assert!(mgr.load(id).unwrap().is_none());
    }
}

/// A memcached item larger than its session allows (a record item bigger than its metadata
/// says, or a metadata item of kilobytes, written by another program) was reported as
/// `Backend` ("unexpected item in the reply to gets") on every load: the manager's corruption
/// policy never ran, so the session failed every request until it expired. It is now
/// `SessionCorrupt`: the manager treats the session as absent and deletes it; others are
/// untouched.
#[test]
fn memcached_an_item_larger_than_its_metadata_says_is_corrupt() {
    let url = required_env("LOCKTABLE_MEMCACHED_URL");
    let prefix = unique_prefix("bigitem");
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let mgr = SessionManager::new(
        table,
        memcached_store(&url, &prefix),
        SessionConfig::default(),
    );
    let new = |k: i64| {
        let mut s = mgr.create().unwrap();
        s.insert("k", &k).unwrap();
        let id = s.id().to_string();
        s.commit().unwrap();
        id
    };
    let (id, other) = (new(1), new(2));
    let meta_key = format!("{prefix}m:{id}");
    let anchor = memcached_raw(&url, &format!("get {meta_key}"));
    let nonce = anchor.lines().nth(1).unwrap().split(' ').nth(5).unwrap();
    let set = memcached_raw_store(&url, &format!("{prefix}d:{id}:{nonce}"), &"y".repeat(500));
    assert_eq!(set, "STORED\r\n");
    let store = memcached_store(&url, &prefix);
    let sid = locktable::session::SessionId::parse(&id).unwrap();
    let r = store.load(&sid, 1 << 20);
    assert!(matches!(r, Err(Error::SessionCorrupt(_))), "{r:?}");
    assert!(mgr.load(&id).unwrap().is_none());
    assert_eq!(
        memcached_raw(&url, &format!("get {meta_key}")),
        "END\r\n",
        "the corrupt session was invalidated"
    );
    // A metadata item far longer than any the store writes.
    let set = memcached_raw_store(&url, &meta_key, &"1".repeat(5000));
    assert_eq!(set, "STORED\r\n");
    let r = store.meta(&sid);
    assert!(matches!(r, Err(Error::SessionCorrupt(_))), "{r:?}");
    assert!(mgr.load(&id).unwrap().is_none());
    let s = mgr
        .load(&other)
        .unwrap()
        .expect("the other session is intact");
    assert_eq!(s.get::<i64>("k").unwrap(), Some(2));
}
