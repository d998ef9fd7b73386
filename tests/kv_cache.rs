//! The hot-session cache on the key-value store (LMDB): its change counters live in the
//! store's directory (`Store::change_counters`), so every process on that directory sees every
//! other's writes. The cross-process test re-executes this binary (`current_exe() --exact
//! child_role --ignored`) with `LOCKTABLE_KV_CACHE_ROLE` set; without it the child test
//! returns at once.
#![cfg(feature = "lmdb")]

use locktable::session::{ChangeCounters, KvStore, SessionConfig, SessionManager, Store};
use std::path::{Path, PathBuf};
use std::process::Command;

const ROLE: &str = "LOCKTABLE_KV_CACHE_ROLE";
const DIR: &str = "LOCKTABLE_KV_CACHE_DIR";
const SID: &str = "LOCKTABLE_KV_CACHE_ID";

fn config() -> SessionConfig {
    SessionConfig {
        fsync: false,
        ..SessionConfig::default()
    }
}

fn read_n(mgr: &SessionManager, id: &str) -> Option<u64> {
    let s = mgr.load(id).unwrap()?;
    let n = s.get::<u64>("n").unwrap();
    s.commit().unwrap();
    n
}

fn run_child(role: &str, dir: &Path, id: &str) {
    let st = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--ignored", "--nocapture"])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(SID, id)
        .status()
        .unwrap();
    assert!(st.success(), "child {role} failed");
}

#[test]
fn the_kv_store_names_its_directory_for_the_counters() {
    let dir = tempfile::tempdir().unwrap();
    let store = KvStore::open(dir.path().join("kv")).unwrap();
    assert_eq!(
        store.change_counters(),
        ChangeCounters::Directory(dir.path().join("kv").canonicalize().unwrap())
    );
}

/// Hits in this process, and a commit or delete in another process seen by the very next load.
#[test]
fn a_commit_in_another_process_is_seen_by_the_very_next_load_on_kv() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = SessionManager::new_kv(dir.path(), config()).unwrap();
    let mut s = mgr.create().unwrap();
    s.insert("n", &0u64).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    for round in 1..=8u64 {
        assert_eq!(read_n(&mgr, &id), Some(round - 1));
        let hits = mgr.stats().cache_hits;
        assert_eq!(read_n(&mgr, &id), Some(round - 1));
        assert_eq!(mgr.stats().cache_hits, hits + 1, "round {round}: not a hit");
        run_child("increment", dir.path(), &id);
        assert_eq!(read_n(&mgr, &id), Some(round), "round {round}: stale copy");
    }
    run_child("delete", dir.path(), &id);
    assert_eq!(read_n(&mgr, &id), None);
    assert!(dir.path().join("sessions.kv/.versions").exists());
}

/// Child side (does nothing unless started by a parent test).
#[test]
#[ignore = "child process of a_commit_in_another_process_is_seen_by_the_very_next_load_on_kv"]
fn child_role() {
    let (Ok(role), Ok(dir), Ok(id)) = (
        std::env::var(ROLE),
        std::env::var(DIR).map(PathBuf::from),
        std::env::var(SID),
    ) else {
        return;
    };
    let mgr = SessionManager::new_kv(&dir, config()).unwrap();
    match role.as_str() {
        "increment" => {
            mgr.transact(&id, |s| {
                let n = s.get::<u64>("n")?.unwrap_or(0);
                s.insert("n", &(n + 1))
            })
            .unwrap()
            .expect("session exists");
        }
        "delete" => assert!(mgr.delete(&id).unwrap()),
        other => panic!("unknown role {other}"),
    }
}
