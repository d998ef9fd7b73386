//! Multi-process tests of the session layer (issue 4, item 10).
//!
//! Real processes share one session directory (lock table + file store), so
//! these check cross-process exclusion, wakeups and owner-death reporting.
//!
//! The parent re-executes this test binary (`current_exe() --exact <child> --ignored
//! --nocapture`) with `LOCKTABLE_MP_ROLE` naming the child's role; a child test without that
//! variable returns at once.

use locktable::session::demo::{run_demo, DemoConfig, WorkerMode};
use locktable::session::{
    session_lock_id, CorruptPolicy, SessionConfig, SessionId, SessionManager,
};
use locktable::{LockTable, TableOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

const ROLE: &str = "LOCKTABLE_MP_ROLE";
const DIR: &str = "LOCKTABLE_MP_DIR";
const SID: &str = "LOCKTABLE_MP_ID";
const WRITERS: usize = 4;
const INCREMENTS: u64 = 2000;

fn spawn_child(test: &str, role: &str, dir: &Path, id: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
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
    let mut s = mgr.create().unwrap();
    s.persist();
    let id = s.id().to_string();
    s.commit().unwrap();
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
    for k in 0..WRITERS {
        assert_eq!(s.get::<u64>(&format!("p{k}")).unwrap(), Some(INCREMENTS));
    }
    assert_eq!(
        s.get::<u64>("shared").unwrap(),
        Some(INCREMENTS * WRITERS as u64)
    );
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

#[test]
fn demo_in_worker_processes_loses_nothing() {
    let cfg = DemoConfig {
        workers: 3,
        duration: Duration::from_millis(800),
        compare: true,
        mode: WorkerMode::Processes {
            exe: std::env::current_exe().unwrap(),
            args_prefix: [
                "--exact",
                "child_demo_worker",
                "--ignored",
                "--nocapture",
                "--",
            ]
            .map(String::from)
            .to_vec(),
        },
        ..DemoConfig::default()
    };
    // The worker child finds its arguments after "--" (libtest ignores them as extra filters).
    let report = run_demo(&cfg).unwrap();
    println!("{report}");
    assert_eq!(report.runs[0].lost_updates, 0);
    assert!(report.runs[0].requests > 0 && report.runs[1].requests > 0);
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
        let mgr = SessionManager::open(&dir).unwrap();
        let mut last = 0u64;
        while !dir.join("stop").exists() {
            let s = mgr.load(&id).unwrap().expect("session exists");
            let now = s.get::<u64>("shared").unwrap().unwrap_or(0);
            assert!(now >= last, "shared counter went backwards");
            last = now;
            s.commit().unwrap();
        }
    } else if role == "crasher" {
        let sid = SessionId::parse(&id).unwrap();
        let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
        let _w = table.write(session_lock_id(&sid)).unwrap();
        // A torn, multi-step write in progress: half a record on disk.
        let path = dir.join("sessions").join(&id[..2]).join(&id);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        std::process::abort();
    } else {
        panic!("unknown role {role}");
    }
}

/// Demo worker child: its arguments follow "--" on the command line.
#[test]
#[ignore = "child process of the multi-process tests"]
fn child_demo_worker() {
    let args: Vec<String> = std::env::args().collect();
    let Some(pos) = args.iter().position(|a| a == "--") else {
        return;
    };
    locktable::session::demo::demo_worker_main(&args[pos + 1..]).unwrap();
}
