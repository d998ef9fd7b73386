//! Multi-process tests of the session layer.
//!
//! Real processes share one session directory (lock table + file store), so
//! these check cross-process exclusion, wakeups and owner-death reporting.
//!
//! The parent re-executes this test binary (`current_exe() --exact <child> --ignored
//! --nocapture`) with `LOCKTABLE_MP_ROLE` naming the child's role; a child test without that
//! variable returns at once.

use locktable::session::{
    session_lock_id, CorruptPolicy, FileStore, SessionConfig, SessionId, SessionManager, Store,
    GC_LOCK_ID,
};
use locktable::{LockTable, TableOptions};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};
use support::child::child_command;
use support::counters;
use support::spy_store::{Answer, Call, SpyStore, Watch};

mod support;

const ROLE: &str = "LOCKTABLE_MP_ROLE";
const DIR: &str = "LOCKTABLE_MP_DIR";
const SID: &str = "LOCKTABLE_MP_ID";
const WRITERS: usize = 4;
const INCREMENTS: u64 = 2000;

fn spawn_child(test: &str, role: &str, dir: &Path, id: &str) -> Child {
    child_command(test)
        .env(ROLE, role)
        .env(DIR, dir)
        .env(SID, id)
        .spawn()
        .unwrap()
}

fn child_env() -> Option<(String, PathBuf, String)> {
    let role = std::env::var(ROLE).ok()?;
    Some((
        role,
        PathBuf::from(std::env::var(DIR).ok()?),
        std::env::var(SID).ok()?,
    ))
}

#[test]
fn four_processes_transact_increments_while_readers_load() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = SessionManager::open(dir.path()).unwrap();
    let id = counters::empty_session(&mgr);
    let writers: Vec<Child> = (0..WRITERS)
        .map(|k| spawn_child("child_role", &format!("writer:{k}"), dir.path(), &id))
        .collect();
    let readers: Vec<Child> = (0..2)
        .map(|_| spawn_child("child_role", "reader", dir.path(), &id))
        .collect();
    for mut c in writers {
        assert!(c.wait().unwrap().success(), "writer failed");
    }
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    for mut c in readers {
        assert!(c.wait().unwrap().success(), "reader failed");
    }
    let s = mgr.load(&id).unwrap().expect("session survives");
    counters::assert_counts(&s, WRITERS, INCREMENTS);
}

#[test]
fn writer_killed_holding_the_lock_makes_the_next_reader_validate() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SessionConfig {
        on_corrupt: CorruptPolicy::Error,
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new_embedded(dir.path(), cfg).unwrap();
    let mut s = mgr.create().unwrap();
    s.insert("a", &1).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let mut c = spawn_child("child_role", "crasher", dir.path(), &id);
    let status = c.wait().unwrap();
    assert!(!status.success(), "the crasher must die by abort");
    // Even with CorruptPolicy::Error, the owner-died report makes the torn record an
    // invalidation, not an error or a panic.
    assert!(mgr.load(&id).unwrap().is_none());
    let st = mgr.stats();
    assert!(st.owner_died_seen >= 1);
    assert_eq!(st.corrupt_invalidated, 1);
}

/// Child side of the tests above (does nothing unless started by a parent).
#[test]
#[ignore = "child process of the multi-process tests"]
fn child_role() {
    let Some((role, dir, id)) = child_env() else {
        return;
    };
    if let Some(k) = role.strip_prefix("writer:") {
        let mgr = SessionManager::open(&dir).unwrap();
        counters::write_counts(&mgr, &id, k, INCREMENTS);
    } else if role == "reader" {
        let mgr = SessionManager::open(&dir).unwrap();
        counters::read_counts_until_stop(&mgr, &id, &dir);
    } else if role == "crasher" {
        let sid = SessionId::parse(&id).unwrap();
        let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
        let _w = table.write(session_lock_id(&sid)).unwrap();
        // A torn, multi-step write in progress: half a record on disk.
        let path = dir.join("sessions").join(&id[..2]).join(&id);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        std::process::abort();
    } else if let Some(k) = role.strip_prefix("gc:") {
        gc_child(&dir, k);
    } else if role == "gc-crasher" {
        let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
        let _sweeping = table.write(GC_LOCK_ID).unwrap();
        std::fs::write(dir.join("gc-lock-held"), b"").unwrap();
        std::process::abort();
    } else {
        panic!("unknown role {role}");
    }
}

// ---------- the background gc across processes ----------

/// The cross-process observable: a watcher of a `FileStore` that creates `dir/sweeping` (exclusively) when a
/// `gc()` batch enters its one scan (`scan_expired`) and removes it when the scan leaves
/// (after a short hold that makes a would-be overlap happen). A
/// creation that finds the file already there means two sweeps at once: it leaves
/// `dir/overlap`.
#[derive(Debug)]
struct SweepMarker {
    dir: PathBuf,
}

impl Watch for SweepMarker {
    fn before(&self, call: Call) {
        if call != Call::ScanExpired {
            return;
        }
        let entered = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.dir.join("sweeping"));
        match entered {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::write(self.dir.join("overlap"), b"").unwrap();
            }
            Err(e) => panic!("marker: {e}"),
        }
    }
    fn after(&self, _: &dyn Store, call: Call, _: Answer) -> locktable::Result<()> {
        if call == Call::ScanExpired {
            std::thread::sleep(Duration::from_millis(3));
            let _ = std::fs::remove_file(self.dir.join("sweeping"));
        }
        Ok(())
    }
}

/// A manager on `dir` (its own attachment, as a process has) over its `FileStore` watched by a
/// [`SweepMarker`].
fn marker_manager(dir: &Path) -> SessionManager {
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    let files = FileStore::open(dir.join("sessions"))
        .unwrap()
        .with_fsync(false);
    let marker = SweepMarker {
        dir: dir.to_path_buf(),
    };
    let store = SpyStore::new(files, marker);
    SessionManager::new(table, store, SessionConfig::default())
}

/// Polls for a condition set by another process or thread; panics after 60 s.
fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    support::child::wait_until(what, Duration::from_secs(60), cond);
}

const GC_PROCESSES: usize = 2;
const GC_ROUNDS: u64 = 10;

/// Child `gc:<k>`: once every child is ready, runs `spawn_gc` until it swept `GC_ROUNDS` times
/// (then says `done.<k>`) and the parent says `stop`; writes its counters to `stats.<k>`.
fn gc_child(dir: &Path, k: &str) {
    let mgr = marker_manager(dir);
    std::fs::write(dir.join(format!("ready.{k}")), b"").unwrap();
    wait_until("every gc child ready", || {
        (0..GC_PROCESSES).all(|i| dir.join(format!("ready.{i}")).exists())
    });
    let gc = mgr.spawn_gc(Duration::from_millis(1)).unwrap();
    wait_until("enough sweeps", || gc.stats().rounds_swept >= GC_ROUNDS);
    std::fs::write(dir.join(format!("done.{k}")), b"").unwrap();
    wait_until("stop", || dir.join("stop").exists());
    let st = gc.stats();
    drop(gc);
    let line = format!(
        "{} {} {}",
        st.rounds_swept, st.rounds_skipped, st.rounds_failed
    );
    std::fs::write(dir.join(format!("stats.{k}")), line).unwrap();
}

#[test]
fn gc_threads_of_two_processes_never_sweep_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    drop(SessionManager::open(d).unwrap());
    let children: Vec<Child> = (0..GC_PROCESSES)
        .map(|k| spawn_child("child_role", &format!("gc:{k}"), d, ""))
        .collect();
    wait_until("both children swept", || {
        (0..GC_PROCESSES).all(|k| d.join(format!("done.{k}")).exists())
    });
    std::fs::write(d.join("stop"), b"").unwrap();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "gc child failed");
    }
    assert!(!d.join("overlap").exists(), "two processes swept at once");
    let mut skipped = 0;
    for k in 0..GC_PROCESSES {
        let line = std::fs::read_to_string(d.join(format!("stats.{k}"))).unwrap();
        let n: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
        assert!(n[0] >= GC_ROUNDS, "child {k}: {line}");
        assert_eq!(n[2], 0, "child {k} had failed rounds: {line}");
        skipped += n[1];
    }
    // They met: some rounds were skipped because the other process was sweeping.
    assert!(skipped > 0, "the processes never met");
}

/// The observable above does see two sweeps at once when `gc()` runs in two attachments
/// without the helper.
#[test]
fn the_overlap_marker_sees_unguarded_concurrent_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let managers = [marker_manager(d), marker_manager(d)];
    let deadline = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        for m in &managers {
            s.spawn(move || {
                while !d.join("overlap").exists() && Instant::now() < deadline {
                    m.gc().unwrap();
                }
            });
        }
    });
    assert!(d.join("overlap").exists(), "the marker cannot see overlaps");
}

#[test]
fn a_sweeper_killed_holding_the_gc_lock_does_not_stop_gc_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mgr = SessionManager::open(d).unwrap();
    let mut crasher = spawn_child("child_role", "gc-crasher", d, "");
    assert!(!crasher.wait().unwrap().success(), "the crasher must abort");
    assert!(
        d.join("gc-lock-held").exists(),
        "the crasher never held the lock"
    );
    let gc = mgr.spawn_gc(Duration::from_millis(1)).unwrap();
    wait_until("a sweep after the sweeper died", || {
        gc.stats().rounds_swept >= 1
    });
}
