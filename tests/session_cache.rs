//! The hot-session cache: hits, invalidation across processes, expiry, bounds, off switch.
//!
//! The cross-process tests re-execute this binary (`current_exe() --exact child_role
//! --ignored`) with `LOCKTABLE_CACHE_ROLE` set; without it the child test returns at once.
//! They run on the file store, and with the `lmdb` feature on the key-value store too, whose
//! change counters live in its directory (`Store::change_counters`).

use locktable::session::{ManualClock, SessionConfig, SessionManager, Timestamp};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use support::child::child_command;
use support::sessions::{new_session, read_n};

mod support;

const ROLE: &str = "LOCKTABLE_CACHE_ROLE";
const DIR: &str = "LOCKTABLE_CACHE_DIR";
const SID: &str = "LOCKTABLE_CACHE_ID";
const STORE: &str = "LOCKTABLE_CACHE_STORE";

fn config() -> SessionConfig {
    SessionConfig {
        fsync: false,
        ..SessionConfig::default()
    }
}

/// A manager on `dir` over the store named `store` ("file" or "kv").
fn open(store: &str, dir: &Path) -> SessionManager {
    match store {
        "file" => SessionManager::new_embedded(dir, config()).unwrap(),
        #[cfg(feature = "lmdb")]
        "kv" => SessionManager::new_kv(dir, config()).unwrap(),
        other => panic!("unknown store {other}"),
    }
}

fn run_child(role: &str, store: &str, dir: &Path, id: &str) {
    let st = child_command("child_role")
        .env(ROLE, role)
        .env(STORE, store)
        .env(DIR, dir)
        .env(SID, id)
        .status()
        .unwrap();
    assert!(st.success(), "child {role} failed");
}

#[test]
fn a_commit_in_another_process_is_seen_by_the_very_next_load() {
    commit_elsewhere_seen_by_the_next_load("file");
}

#[cfg(feature = "lmdb")]
#[test]
fn a_commit_in_another_process_is_seen_by_the_very_next_load_on_kv() {
    commit_elsewhere_seen_by_the_next_load("kv");
}

#[cfg(feature = "lmdb")]
#[test]
fn the_kv_store_names_its_directory_for_the_counters() {
    use locktable::session::{ChangeCounters, KvStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = KvStore::open(dir.path().join("kv")).unwrap();
    assert_eq!(
        store.change_counters(),
        ChangeCounters::Directory(dir.path().join("kv").canonicalize().unwrap())
    );
}

/// Hits in this process, and a commit or delete in another process seen by the very next load.
fn commit_elsewhere_seen_by_the_next_load(store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mgr = open(store, dir.path());
    let id = new_session(&mgr, 0);
    for round in 1..=8u64 {
        // Hot in this process: the second load is a hit.
        assert_eq!(read_n(&mgr, &id), Some(round - 1));
        let hits = mgr.stats().cache_hits;
        assert_eq!(read_n(&mgr, &id), Some(round - 1));
        assert_eq!(mgr.stats().cache_hits, hits + 1, "round {round}: not a hit");
        // Another process commits; the very next load here must see it.
        run_child("increment", store, dir.path(), &id);
        assert_eq!(read_n(&mgr, &id), Some(round), "round {round}: stale copy");
    }
    // And deletions: gone for the very next load.
    run_child("delete", store, dir.path(), &id);
    assert_eq!(read_n(&mgr, &id), None);
    if store == "kv" {
        assert!(dir.path().join("sessions.kv/.versions").exists());
    }
}

/// Child side (does nothing unless started by a parent test).
#[test]
#[ignore = "child process of the a_commit_in_another_process_is_seen_by_the_very_next_load tests"]
fn child_role() {
    let (Ok(role), Ok(store), Ok(dir), Ok(id)) = (
        std::env::var(ROLE),
        std::env::var(STORE),
        std::env::var(DIR).map(PathBuf::from),
        std::env::var(SID),
    ) else {
        return;
    };
    let mgr = open(&store, &dir);
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

#[test]
fn a_thousand_reads_of_a_hot_session_are_hits_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = SessionManager::new_embedded(dir.path(), config()).unwrap();
    let id = new_session(&mgr, 7);
    let before = mgr.stats();
    for _ in 0..1000 {
        assert_eq!(read_n(&mgr, &id), Some(7));
    }
    let st = mgr.stats();
    assert_eq!(st.data_writes, before.data_writes);
    assert_eq!(st.touches_written, before.touches_written);
    // The first load fills the cache; the other 999 are hits.
    assert_eq!(st.cache_misses - before.cache_misses, 1);
    assert_eq!(st.cache_hits - before.cache_hits, 999);
}

#[test]
fn commits_deletes_and_cycles_in_this_process_invalidate_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = SessionManager::new_embedded(dir.path(), config()).unwrap();
    let id = new_session(&mgr, 1);
    assert_eq!(read_n(&mgr, &id), Some(1));
    let mut s = mgr.load(&id).unwrap().unwrap();
    s.insert("n", &2u64).unwrap();
    s.commit().unwrap();
    assert_eq!(read_n(&mgr, &id), Some(2));
    let mut s = mgr.load(&id).unwrap().unwrap();
    s.cycle_id().unwrap();
    let new_id = s.id().to_string();
    s.commit().unwrap();
    assert_eq!(read_n(&mgr, &id), None, "the old ID is gone");
    assert_eq!(read_n(&mgr, &new_id), Some(2));
    mgr.load(&new_id).unwrap().unwrap().invalidate().unwrap();
    assert_eq!(read_n(&mgr, &new_id), None);
}

#[test]
fn a_cached_session_still_expires_and_is_deleted_when_seen_expired() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000_000)));
    let cfg = SessionConfig {
        clock: clock.clone(),
        ..config()
    };
    let mgr = SessionManager::new_embedded(dir.path(), cfg.clone()).unwrap();
    let id = new_session(&mgr, 1);
    assert_eq!(read_n(&mgr, &id), Some(1));
    assert_eq!(read_n(&mgr, &id), Some(1));
    assert!(mgr.stats().cache_hits >= 1);
    clock.advance(cfg.idle_timeout + Duration::from_secs(1));
    assert_eq!(read_n(&mgr, &id), None, "expired despite the cached copy");
    assert_eq!(mgr.stats().expired_removed, 1);
    clock.set(Timestamp(1_000_000_000));
    assert_eq!(read_n(&mgr, &id), None, "a clock step back revives nothing");
}

#[test]
fn touches_keep_a_cached_session_alive_without_invalidating_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000_000)));
    let cfg = SessionConfig {
        clock: clock.clone(),
        idle_timeout: Duration::from_secs(600),
        ..config()
    };
    let mgr = SessionManager::new_embedded(dir.path(), cfg).unwrap();
    let id = new_session(&mgr, 1);
    // Each step is shorter than the idle timeout, their sum much longer: the touches written
    // at each request's end keep the session (and its cached copy) alive.
    for _ in 0..20 {
        clock.advance(Duration::from_secs(100));
        assert_eq!(read_n(&mgr, &id), Some(1));
    }
    let st = mgr.stats();
    assert!(st.touches_written >= 19, "{st:?}");
    assert!(st.cache_hits >= 19, "touches invalidated the copy: {st:?}");
}

#[test]
fn the_cache_is_bounded_and_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB in 16 shards: 4 KiB each. Records of at least 650 bytes: at most 6 per shard,
    // so at most 96 of the 200 sessions can be cached at any time.
    let small = SessionConfig {
        cache_bytes: 64 * 1024,
        ..config()
    };
    let mgr = SessionManager::new_embedded(dir.path(), small).unwrap();
    let pad = "x".repeat(600);
    let ids: Vec<String> = (0..200)
        .map(|n| {
            let mut s = mgr.create().unwrap();
            s.insert("n", &n).unwrap();
            s.insert("pad", &pad).unwrap();
            let id = s.id().to_string();
            s.commit().unwrap();
            id
        })
        .collect();
    for _ in 0..2 {
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(read_n(&mgr, id), Some(n as u64));
        }
    }
    let st = mgr.stats();
    assert_eq!(st.cache_hits + st.cache_misses, 400);
    assert!(
        st.cache_hits <= 96,
        "more cached than the bound allows: {st:?}"
    );
    // A small hot set still hits.
    assert_eq!(read_n(&mgr, &ids[7]), Some(7));
    let hits = mgr.stats().cache_hits;
    assert_eq!(read_n(&mgr, &ids[7]), Some(7));
    assert_eq!(mgr.stats().cache_hits, hits + 1);

    let off = SessionConfig {
        cache_bytes: 0,
        ..config()
    };
    let mgr = SessionManager::new_embedded(dir.path(), off).unwrap();
    for _ in 0..10 {
        assert_eq!(read_n(&mgr, &ids[0]), Some(0));
    }
    let st = mgr.stats();
    assert_eq!((st.cache_hits, st.cache_misses), (0, 0));
}

#[test]
fn a_damaged_counter_file_turns_the_cache_off_not_the_sessions() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sessions")).unwrap();
    std::fs::write(dir.path().join("sessions/.versions"), b"garbage").unwrap();
    let mgr = SessionManager::new_embedded(dir.path(), config()).unwrap();
    let id = new_session(&mgr, 3);
    assert_eq!(read_n(&mgr, &id), Some(3));
    assert_eq!(read_n(&mgr, &id), Some(3));
    assert_eq!(mgr.stats().cache_hits, 0);
}

// A manager with the cache off (`cache_bytes: 0`) on the same directory as one with it on: its
// writes did not move the shared change counters (it never opened `.versions`), so the other
// manager kept answering loads from its copy: a session deleted by the cache-off manager came
// back, and its commits were invisible. Now every manager on a store that names its counters
// brackets its writes, cache on or off.
#[test]
fn a_manager_with_the_cache_off_still_invalidates_other_managers_copies() {
    let dir = tempfile::tempdir().unwrap();
    let on = open("file", dir.path());
    let off = SessionManager::new_embedded(
        dir.path(),
        SessionConfig {
            cache_bytes: 0,
            ..config()
        },
    )
    .unwrap();
    let id = new_session(&on, 1);
    assert_eq!(read_n(&on, &id), Some(1));
    assert_eq!(read_n(&on, &id), Some(1));
    assert!(on.stats().cache_hits >= 1, "{:?}", on.stats());
    // A commit through the cache-off manager is seen by the very next load.
    off.transact(&id, |s| s.insert("n", &2u64))
        .unwrap()
        .unwrap();
    assert_eq!(read_n(&on, &id), Some(2));
    assert_eq!(read_n(&on, &id), Some(2));
    // A delete through it: nothing deleted comes back.
    assert!(off.delete(&id).unwrap());
    assert!(
        on.load(&id).unwrap().is_none(),
        "a deleted session came back"
    );
    // And a cycled ID's old copy.
    let id = new_session(&on, 3);
    assert_eq!(read_n(&on, &id), Some(3));
    assert_eq!(read_n(&on, &id), Some(3));
    let mut s = off.load(&id).unwrap().unwrap();
    s.cycle_id().unwrap();
    s.commit().unwrap();
    assert!(
        on.load(&id).unwrap().is_none(),
        "a cycled-away ID came back"
    );
}
