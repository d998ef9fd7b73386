//! Cross-process attacks on the session layer's guarantees (DESIGN.md section 11): a process's
//! hot-read cache against gc, `delete` and `cycle_id` in another process; the key-value store's
//! lazy reads against another process's commit; a manager inherited by a forked child; writers
//! SIGKILLed in the middle of their commits.
//!
//! The parent re-executes this test binary (`--exact child_role --ignored`) with
//! `LOCKTABLE_RSP_ROLE` naming the child's role; without it the child test returns at once. Every
//! parent test runs under a watchdog, and every child under a deadline.

use locktable::session::{Clock, SessionConfig, SessionManager, Timestamp};
use locktable::Error;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::child::{child_command, wait_exit_code, Kids};
use support::cpus::watchdog;
use support::sessions::{new_session, read_n};

mod support;

const ROLE: &str = "LOCKTABLE_RSP_ROLE";
const DIR: &str = "LOCKTABLE_RSP_DIR";
const SID: &str = "LOCKTABLE_RSP_ID";
const STORE: &str = "LOCKTABLE_RSP_STORE";
/// How long any one child may run.
const CHILD_LIMIT: Duration = Duration::from_secs(60);

/// The system clock moved `ahead` into the future: a process whose clock stepped forward.
#[derive(Debug)]
struct Ahead(Duration);

impl Clock for Ahead {
    fn now(&self) -> Timestamp {
        let t = std::time::SystemTime::now() + self.0;
        Timestamp(t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64)
    }
}

fn config(ahead: Duration, lazy_above: u64) -> SessionConfig {
    SessionConfig {
        fsync: false,
        idle_timeout: Duration::from_secs(600),
        lock_timeout: Duration::from_secs(10),
        lazy_above,
        clock: Arc::new(Ahead(ahead)),
        ..SessionConfig::default()
    }
}

/// A manager on `dir` over `store` ("file" or "kv"), its clock `ahead` of the system's.
fn open_with(store: &str, dir: &Path, ahead: Duration, lazy_above: u64) -> SessionManager {
    open_cfg(store, dir, config(ahead, lazy_above))
}

fn open_cfg(store: &str, dir: &Path, cfg: SessionConfig) -> SessionManager {
    match store {
        "file" => SessionManager::new_embedded(dir, cfg).unwrap(),
        #[cfg(feature = "lmdb")]
        "kv" => SessionManager::new_kv(dir, cfg).unwrap(),
        other => panic!("unknown store {other}"),
    }
}

fn open(store: &str, dir: &Path) -> SessionManager {
    open_with(store, dir, Duration::ZERO, u64::MAX)
}

/// Reads `id` until this process's cache answers it (a hit), so that the next load would be
/// served from the cache unless something invalidated the copy.
fn make_hot(mgr: &SessionManager, id: &str, n: u64) {
    let before = mgr.stats().cache_hits;
    for _ in 0..3 {
        assert_eq!(read_n(mgr, id), Some(n));
    }
    assert!(mgr.stats().cache_hits > before, "{id} is not cached here");
}

fn spawn_child(role: &str, store: &str, dir: &Path, id: &str) -> Child {
    child_command("child_role")
        .env(ROLE, role)
        .env(STORE, store)
        .env(DIR, dir)
        .env(SID, id)
        .spawn()
        .unwrap()
}

/// Waits for `c` at most [`CHILD_LIMIT`] (killed and a failure after that).
fn wait_ok(mut c: Child, what: &str) {
    let deadline = Instant::now() + CHILD_LIMIT;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            assert!(st.success(), "{what}: child failed: {st}");
            return;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{what}: child hangs");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run_child(role: &str, store: &str, dir: &Path, id: &str) {
    wait_ok(spawn_child(role, store, dir, id), role);
}

/// Child side (does nothing unless started by a parent test).
#[test]
#[ignore = "child process of the tests of this file"]
fn child_role() {
    let (Ok(role), Ok(store), Ok(dir), Ok(id)) = (
        std::env::var(ROLE),
        std::env::var(STORE),
        std::env::var(DIR).map(PathBuf::from),
        std::env::var(SID),
    ) else {
        return;
    };
    let _done = watchdog("session_cross_process child", CHILD_LIMIT);
    match role.as_str() {
        // A process whose clock is an hour ahead: every session idle for 10 min is expired for
        // its gc.
        "gc" => {
            let mgr = open_with(&store, &dir, Duration::from_secs(3600), u64::MAX);
            let mut deleted = 0;
            loop {
                let r = mgr.gc().unwrap();
                deleted += r.deleted;
                if !r.more {
                    break;
                }
            }
            assert!(deleted >= 1, "gc deleted nothing");
        }
        "delete" => assert!(open(&store, &dir).delete(&id).unwrap()),
        "cycle" => {
            let mgr = open(&store, &dir);
            let mut s = mgr.load(&id).unwrap().expect("session exists");
            s.cycle_id().unwrap();
            let new = s.id().to_string();
            s.commit().unwrap();
            std::fs::write(dir.join("new_id"), new).unwrap();
        }
        "set_a" => {
            let mgr = open_with(&store, &dir, Duration::ZERO, 0);
            mgr.transact(&id, |s| s.insert("a", &"new".repeat(100)))
                .unwrap()
                .expect("session exists");
        }
        "writer" => writer_loop(&store, &dir, &id),
        other => panic!("unknown role {other}"),
    }
}

/// B (this process) holds a session in its cache; A (a child) deletes or moves it: B's very
/// next load must not return it.
fn gone_elsewhere(store: &str, role: &str) {
    let done = watchdog("gone_elsewhere", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let mgr = open(store, dir.path());
    let id = new_session(&mgr, 7);
    make_hot(&mgr, &id, 7);
    run_child(role, store, dir.path(), &id);
    assert!(
        mgr.load(&id).unwrap().is_none(),
        "{role} in another process: this process's next load still returned the session"
    );
    assert!(mgr.try_load_cached(&id).unwrap().is_none());
    if role == "cycle" {
        let new = std::fs::read_to_string(dir.path().join("new_id")).unwrap();
        assert_eq!(read_n(&mgr, &new), Some(7), "the moved session lives on");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
}

// Checks what no other test does: gc run by *another* process (here one whose clock stepped
// ahead, so this process still finds the session alive by its own clock and its cached times).
#[test]
fn gc_in_another_process_drops_this_processs_cached_copy() {
    gone_elsewhere("file", "gc");
}

#[test]
fn cycle_id_in_another_process_drops_this_processs_cached_copy() {
    gone_elsewhere("file", "cycle");
}

#[cfg(feature = "lmdb")]
#[test]
fn gc_in_another_process_drops_this_processs_cached_copy_on_kv() {
    gone_elsewhere("kv", "gc");
}

#[cfg(feature = "lmdb")]
#[test]
fn cycle_id_in_another_process_drops_this_processs_cached_copy_on_kv() {
    gone_elsewhere("kv", "cycle");
}

/// KvStore, sessions by key (`lazy_above: 0`): B loads the head, A commits a new value of `a`,
/// B's first `get("a")` must give the loaded version's value or `Conflict`, never A's; and B's
/// next load sees A's commit.
#[cfg(feature = "lmdb")]
#[test]
fn a_lazy_read_after_another_processs_commit_never_mixes_versions_on_kv() {
    let done = watchdog("lazy kv", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let mgr = open_with("kv", dir.path(), Duration::ZERO, 0);
    let mut s = mgr.create().unwrap();
    s.insert("a", &"old".repeat(100)).unwrap();
    s.insert("b", &"bee".repeat(100)).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    // A by-key layout from now on (the first store may be whole).
    mgr.transact(&id, |s| s.insert("b", &"bee".repeat(100)))
        .unwrap()
        .unwrap();
    let s = mgr.load(&id).unwrap().unwrap();
    run_child("set_a", "kv", dir.path(), &id);
    for key in ["a", "b"] {
        match s.get::<String>(key) {
            Ok(v) => assert_ne!(
                v.as_deref(),
                Some("new".repeat(100).as_str()),
                "{key}: a value of another version"
            ),
            Err(Error::Conflict { .. }) => {}
            Err(e) => panic!("{key}: {e}"),
        }
    }
    s.discard();
    let s = mgr.load(&id).unwrap().unwrap();
    assert_eq!(s.get::<String>("a").unwrap(), Some("new".repeat(100)));
    assert_eq!(s.get::<String>("b").unwrap(), Some("bee".repeat(100)));
    s.discard();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Exit codes of the forked child: 0 all as documented, 10 + k the k-th check failed.
fn in_forked_child(
    dir: &Path,
    mgr: &SessionManager,
    id: &str,
    loaded: locktable::session::Session,
) -> i32 {
    fn forked<T>(r: locktable::Result<T>) -> bool {
        matches!(r, Err(Error::ForkedSessionManager))
    }
    type Check<'a> = (&'a str, Box<dyn FnOnce() -> bool + 'a>);
    let checks: Vec<Check<'_>> = vec![
        ("create", Box::new(|| forked(mgr.create()))),
        ("load", Box::new(|| forked(mgr.load(id)))),
        (
            "load_exclusive",
            Box::new(|| forked(mgr.load_exclusive(id))),
        ),
        (
            "try_load_cached",
            Box::new(|| forked(mgr.try_load_cached(id))),
        ),
        (
            "transact",
            Box::new(|| forked(mgr.transact(id, |s| s.insert("evil", &1)))),
        ),
        ("delete", Box::new(|| forked(mgr.delete(id)))),
        ("gc", Box::new(|| forked(mgr.gc()))),
        (
            "spawn_gc",
            Box::new(|| forked(mgr.spawn_gc(Duration::from_millis(10)))),
        ),
        (
            "inherited session: commit",
            Box::new(move || {
                let mut s = loaded;
                // `insert` may or may not refuse; the commit must, and write nothing.
                let _ = s.insert("evil", &1);
                forked(s.commit())
            }),
        ),
    ];
    for (k, (what, check)) in checks.into_iter().enumerate() {
        if !check() {
            eprintln!("forked child: {what} did not refuse with ForkedSessionManager");
            return 10 + k as i32;
        }
    }
    // A manager opened in the child works.
    let fresh = open("file", dir);
    let r = fresh.transact(id, |s| s.insert("child", &true));
    if !matches!(r, Ok(Some(()))) {
        eprintln!("forked child: a fresh manager failed: {r:?}");
        return 2;
    }
    0
}

#[test]
fn a_manager_inherited_by_a_forked_child_refuses_every_call_and_writes_nothing() {
    let done = watchdog("fork", Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let mgr = open("file", dir.path());
    let id = new_session(&mgr, 1);
    make_hot(&mgr, &id, 1);
    let loaded = mgr.load(&id).unwrap().unwrap();
    // SAFETY: the child runs only the session layer's calls and ends with `_exit`; glibc's
    // allocator is fork-safe, and the watchdog below ends a child that hangs.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: alarm is async-signal-safe; a child that hangs is killed by SIGALRM.
        unsafe { libc::alarm(60) };
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            in_forked_child(dir.path(), &mgr, &id, loaded)
        }))
        .unwrap_or(3);
        // SAFETY: ends the child at once, running no destructor of the parent's state.
        unsafe { libc::_exit(code) };
    }
    loaded.discard();
    assert_eq!(wait_exit_code(pid), 0, "see the child's line above");
    // The parent is unaffected and sees only the fresh manager's write.
    let s = mgr.load(&id).unwrap().unwrap();
    assert_eq!(s.get::<u64>("n").unwrap(), Some(1));
    assert_eq!(s.get::<bool>("child").unwrap(), Some(true));
    assert_eq!(
        s.get::<u64>("evil").unwrap(),
        None,
        "the inherited manager wrote"
    );
    s.commit().unwrap();
    mgr.transact(&id, |s| s.insert("parent", &true))
        .unwrap()
        .unwrap();
    mgr.gc().unwrap();
    assert_eq!(read_n(&mgr, &id), Some(1));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The payload of commit `n`: a torn record would not match its own `n`.
fn payload(n: u64) -> String {
    format!("{n}:").repeat(1 + (n as usize * 37) % 300)
}

/// Commits `n` = 1, 2, ... to the shared session `id` and to a session of its own, and appends
/// each acknowledged `n` to `acked` (one line per commit that returned `Ok`), until killed.
fn writer_loop(store: &str, dir: &Path, id: &str) {
    use std::io::Write;
    let mgr = open(store, dir);
    let shared_n = read_n(&mgr, id).unwrap();
    let mut own = mgr.create().unwrap();
    own.insert("n", &0u64).unwrap();
    own.insert("p", &payload(0)).unwrap();
    let own_id = own.id().to_string();
    own.commit().unwrap();
    std::fs::write(dir.join("own_id"), &own_id).unwrap();
    let mut acked = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("acked"))
        .unwrap();
    for n in shared_n + 1.. {
        for (sid, first) in [(id, n), (own_id.as_str(), n - shared_n)] {
            mgr.transact(sid, |s| {
                s.insert("n", &first)?;
                s.insert("p", &payload(first))
            })
            .unwrap()
            .expect("session exists");
        }
        writeln!(acked, "{n}").unwrap();
        if n == shared_n + 1 {
            std::fs::write(dir.join("writing"), b"").unwrap();
        }
    }
}

/// Loads `id` and checks the record is one commit's whole state: `(n, payload(n))`.
fn consistent(mgr: &SessionManager, id: &str) -> Option<u64> {
    let s = mgr.load(id).unwrap()?;
    let n = s.get::<u64>("n").unwrap().expect("n");
    let p = s.get::<String>("p").unwrap().expect("p");
    assert_eq!(p, payload(n), "torn record: n = {n}");
    s.commit().unwrap();
    Some(n)
}

fn last_acked(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("acked"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .max()
        .unwrap_or(0)
}

fn killed_mid_commit(store: &str) {
    let done = watchdog("killed_mid_commit", Duration::from_secs(300));
    let dir = tempfile::tempdir().unwrap();
    // This process is the other reader, with the cache on.
    let reader = open(store, dir.path());
    let id = {
        let mut s = reader.create().unwrap();
        s.insert("n", &0u64).unwrap();
        s.insert("p", &payload(0)).unwrap();
        let id = s.id().to_string();
        s.commit().unwrap();
        id
    };
    let mut rand = [0u8; 32];
    getrandom::fill(&mut rand).unwrap();
    for (round, r) in rand.iter().enumerate().take(12) {
        for f in ["writing", "own_id"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        let mut kids = Kids(vec![spawn_child("writer", store, dir.path(), &id)]);
        support::child::wait_until("writer started", CHILD_LIMIT, || {
            dir.path().join("writing").exists()
        });
        // Read (and cache) while it writes, then kill it at a random moment.
        let until = Instant::now() + Duration::from_micros(2_000 + u64::from(*r) * 150);
        let mut seen = 0;
        while Instant::now() < until {
            let n = consistent(&reader, &id).expect("the shared session is never gone");
            assert!(n >= seen, "round {round}: went back from {seen} to {n}");
            seen = n;
        }
        let mut c = kids.0.pop().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        let acked = last_acked(dir.path());
        // This process's next load, and a manager without cache, agree; the state is an
        // acknowledged commit's (or the one in flight when the writer died).
        let fresh = open_cfg(
            store,
            dir.path(),
            SessionConfig {
                cache_bytes: 0,
                ..config(Duration::ZERO, u64::MAX)
            },
        );
        let n = consistent(&reader, &id).expect("the shared session is never gone");
        assert!(
            n >= acked && n <= acked + 1,
            "round {round}: {n} after {acked} acknowledged"
        );
        assert_eq!(
            consistent(&fresh, &id),
            Some(n),
            "round {round}: stale copy"
        );
        assert_eq!(
            consistent(&reader, &id),
            Some(n),
            "round {round}: second load"
        );
        // The writer's own session: loadable and whole, or cleanly gone.
        if let Ok(own) = std::fs::read_to_string(dir.path().join("own_id")) {
            let _ = consistent(&reader, &own);
        }
        // And a commit from here still works (repairs an odd counter the writer left).
        reader
            .transact(&id, |s| {
                s.insert("n", &n)?;
                s.insert("p", &payload(n))
            })
            .unwrap()
            .unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn writers_killed_mid_commit_leave_whole_records_and_no_stale_copy() {
    killed_mid_commit("file");
}

#[cfg(feature = "lmdb")]
#[test]
fn writers_killed_mid_commit_leave_whole_records_and_no_stale_copy_on_kv() {
    killed_mid_commit("kv");
}
