//! Conformance suite for [`Store`] implementations.
//!
//! Every check is generic over a store factory; the `conformance!` macro instantiates the whole
//! suite for one backend, so adding a backend is one line at the bottom of this file.

use locktable::session::{
    record, Cutoffs, FileStore, ManualClock, MemoryStore, SessionConfig, SessionId, SessionManager,
    Store, StoredSession, Timestamp, Touch,
};
use locktable::{LockTable, TableOptions};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

const T0: Timestamp = Timestamp(1_700_000_000_000);

/// A store plus whatever must live as long as it (a temporary directory).
pub struct Fixture<S> {
    pub store: S,
    pub table: LockTable,
    pub _keep: Box<dyn Any>,
}

fn memory() -> Fixture<MemoryStore> {
    Fixture {
        store: MemoryStore::new(),
        table: LockTable::anonymous(&TableOptions::default()).unwrap(),
        _keep: Box::new(()),
    }
}

fn file() -> Fixture<FileStore> {
    let dir = tempfile::tempdir().unwrap();
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    Fixture {
        store: FileStore::open(dir.path().join("s"), table.clone()).unwrap(),
        table,
        _keep: Box::new(dir),
    }
}

/// The file store with durability off (atomic renames, no fsync).
fn file_no_fsync() -> Fixture<FileStore> {
    let f = file();
    Fixture {
        store: f.store.with_fsync(false),
        table: f.table,
        _keep: f._keep,
    }
}

fn rec(version: u64, created: Timestamp, la: Timestamp, note: &str) -> StoredSession {
    let mut body = record::RecordBody::default();
    body.data.insert("note".into(), note.into());
    body.changed.insert("note".into(), version);
    let r = record::Record {
        version,
        created: created.0,
        body,
    };
    StoredSession {
        version,
        created,
        last_accessed: la,
        bytes: record::encode(&r, 1 << 20).unwrap(),
    }
}

fn id() -> SessionId {
    SessionId::generate().unwrap()
}

pub fn load_absent<S: Store>(f: Fixture<S>) {
    assert!(f.store.load(&id()).unwrap().is_none());
    assert!(f.store.last_accessed(&id()).unwrap().is_none());
    assert!(!f.store.delete(&id()).unwrap());
    assert_eq!(
        f.store
            .touch(&id(), T0, Duration::ZERO, Timestamp(0))
            .unwrap(),
        Touch::Missing
    );
}

pub fn save_is_compare_and_swap<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    assert!(s.save(&i, None, &rec(1, T0, T0, "one")).unwrap());
    assert!(
        !s.save(&i, None, &rec(1, T0, T0, "again")).unwrap(),
        "create over existing"
    );
    assert!(
        !s.save(&i, Some(7), &rec(8, T0, T0, "wrong")).unwrap(),
        "wrong version"
    );
    let got = s.load(&i).unwrap().unwrap();
    assert_eq!(got.bytes, rec(1, T0, T0, "one").bytes);
    assert_eq!((got.version, got.created, got.last_accessed), (1, T0, T0));
    assert!(s.save(&i, Some(1), &rec(2, T0, T0, "two")).unwrap());
    let got = s.load(&i).unwrap().unwrap();
    assert_eq!(got.version, 2);
    assert_eq!(got.bytes, rec(2, T0, T0, "two").bytes);
    assert!(
        !s.save(&id(), Some(1), &rec(2, T0, T0, "x")).unwrap(),
        "update of absent"
    );
}

pub fn save_keeps_the_newer_access_time<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    let late = T0.saturating_add(Duration::from_secs(60));
    assert!(s.save(&i, None, &rec(1, T0, late, "a")).unwrap());
    assert!(s.save(&i, Some(1), &rec(2, T0, T0, "b")).unwrap());
    assert_eq!(s.last_accessed(&i).unwrap(), Some(late));
    assert_eq!(s.load(&i).unwrap().unwrap().last_accessed, late);
}

pub fn touch_is_monotonic_coalesced_and_leaves_data<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    assert!(s.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    let before = s.load(&i).unwrap().unwrap().bytes;
    let t = |secs| T0.saturating_add(Duration::from_secs(secs));
    let c = Duration::from_secs(10);
    assert_eq!(s.touch(&i, t(5), c, Timestamp(0)).unwrap(), Touch::Skipped);
    assert_eq!(s.touch(&i, t(20), c, Timestamp(0)).unwrap(), Touch::Written);
    assert_eq!(s.last_accessed(&i).unwrap(), Some(t(20)));
    assert_eq!(
        s.touch(&i, t(3), Duration::ZERO, Timestamp(0)).unwrap(),
        Touch::Skipped
    );
    assert_eq!(s.last_accessed(&i).unwrap(), Some(t(20)));
    assert_eq!(
        s.touch(&i, t(21), Duration::ZERO, Timestamp(0)).unwrap(),
        Touch::Written
    );
    let after = s.load(&i).unwrap().unwrap();
    assert_eq!(after.bytes, before);
    assert_eq!((after.version, after.last_accessed), (1, t(21)));
}

/// A touch never revives a session whose stored access time is already
/// past the idle cut-off: it writes nothing and says so.
pub fn touch_does_not_revive_an_idle_expired_session<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    let t = |secs| T0.saturating_add(Duration::from_secs(secs));
    assert!(s.save(&i, None, &rec(1, t(0), t(10), "a")).unwrap());
    let idle_before = t(50);
    assert_eq!(
        s.touch(&i, t(100), Duration::ZERO, idle_before).unwrap(),
        Touch::Expired
    );
    assert_eq!(s.last_accessed(&i).unwrap(), Some(t(10)));
    // Not yet expired: written.
    assert_eq!(
        s.touch(&i, t(100), Duration::ZERO, t(5)).unwrap(),
        Touch::Written
    );
    assert_eq!(s.last_accessed(&i).unwrap(), Some(t(100)));
}

pub fn delete_removes_everything<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    assert!(s.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    assert!(s.delete(&i).unwrap());
    assert!(s.load(&i).unwrap().is_none());
    assert!(s.last_accessed(&i).unwrap().is_none());
    assert!(
        s.save(&i, None, &rec(1, T0, T0, "b")).unwrap(),
        "ID reusable"
    );
}

pub fn list_expired_by_idle_and_lifetime_with_limit<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let t = |secs| T0.saturating_add(Duration::from_secs(secs));
    let old_idle = id();
    let old_created = id();
    let fresh = id();
    assert!(s.save(&old_idle, None, &rec(1, t(0), t(10), "")).unwrap());
    assert!(s
        .save(&old_created, None, &rec(1, t(0), t(500), ""))
        .unwrap());
    assert!(s.save(&fresh, None, &rec(1, t(400), t(500), "")).unwrap());
    let cut = Cutoffs {
        idle_before: t(100),
        created_before: t(300),
    };
    let mut got = s.list_expired(cut, 10).unwrap();
    got.sort();
    let mut want = vec![old_idle.clone(), old_created.clone()];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(s.list_expired(cut, 1).unwrap().len(), 1);
    let none = Cutoffs {
        idle_before: t(0),
        created_before: t(0),
    };
    assert!(s.list_expired(none, 10).unwrap().is_empty());
}

pub fn concurrent_cas_has_one_winner_per_version<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    assert!(s.save(&i, None, &rec(1, T0, T0, "0")).unwrap());
    let wins = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|sc| {
        for t in 0..4 {
            let (s, i, wins) = (s, &i, &wins);
            sc.spawn(move || {
                for _ in 0..50 {
                    let cur = s.load(i).unwrap().unwrap().version;
                    let next = rec(cur + 1, T0, T0, &format!("{t}"));
                    if s.save(i, Some(cur), &next).unwrap() {
                        wins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let v = s.load(&i).unwrap().unwrap().version;
    assert_eq!(v, 1 + wins.into_inner(), "every successful CAS bumped once");
}

pub fn concurrent_touches_keep_the_maximum<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    assert!(s.save(&i, None, &rec(1, T0, T0, "")).unwrap());
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let (s, i) = (s, &i);
            sc.spawn(move || {
                for k in 0..100u64 {
                    let at = T0.saturating_add(Duration::from_millis(1 + (k * 7 + t * 13) % 400));
                    s.touch(i, at, Duration::ZERO, Timestamp(0)).unwrap();
                }
            });
        }
    });
    let max = (0..4u64)
        .flat_map(|t| (0..100u64).map(move |k| 1 + (k * 7 + t * 13) % 400))
        .max()
        .unwrap();
    assert_eq!(
        s.last_accessed(&i).unwrap(),
        Some(T0.saturating_add(Duration::from_millis(max)))
    );
}

pub fn manager_roundtrip_over_store<S: Store + 'static>(f: Fixture<S>) {
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = SessionConfig {
        clock: clock.clone(),
        idle_timeout: Duration::from_secs(60),
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new(f.table.clone(), f.store, cfg);
    let mut s = mgr.create().unwrap();
    s.insert("k", &41).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    assert_eq!(
        mgr.transact(&id, |s| {
            let v = s.get::<i32>("k")?.unwrap() + 1;
            s.insert("k", &v)?;
            Ok(v)
        })
        .unwrap(),
        Some(42)
    );
    clock.advance(Duration::from_secs(61));
    assert!(mgr.load(&id).unwrap().is_none());
    assert_eq!(mgr.gc().unwrap().deleted, 1);
    drop(f._keep);
}

pub fn thousand_concurrent_reads_store_one_touch<S: Store + 'static>(f: Fixture<S>) {
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = SessionConfig {
        clock: clock.clone(),
        touch_interval: Some(Duration::from_secs(30)),
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new(f.table.clone(), f.store, cfg);
    let s = mgr.create().unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    clock.advance(Duration::from_secs(60));
    let sessions: Vec<_> = (0..1000).map(|_| mgr.load(&id).unwrap().unwrap()).collect();
    let before = mgr.stats();
    std::thread::scope(|sc| {
        let mut chunks: Vec<Vec<_>> = (0..4).map(|_| Vec::new()).collect();
        for (i, s) in sessions.into_iter().enumerate() {
            chunks[i % 4].push(s);
        }
        for chunk in chunks {
            sc.spawn(move || chunk.into_iter().for_each(|s| s.commit().unwrap()));
        }
    });
    let after = mgr.stats();
    assert_eq!(after.touches_written - before.touches_written, 1);
    assert_eq!(after.data_writes, before.data_writes, "reads wrote no data");
    let sid = SessionId::parse(&id).unwrap();
    assert_eq!(
        mgr.store().last_accessed(&sid).unwrap(),
        Some(T0.saturating_add(Duration::from_secs(60)))
    );
    drop(f._keep);
}

macro_rules! conformance {
    ($name:ident, $factory:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn load_absent() {
                super::load_absent($factory());
            }
            #[test]
            fn save_is_compare_and_swap() {
                super::save_is_compare_and_swap($factory());
            }
            #[test]
            fn save_keeps_the_newer_access_time() {
                super::save_keeps_the_newer_access_time($factory());
            }
            #[test]
            fn touch_does_not_revive_an_idle_expired_session() {
                super::touch_does_not_revive_an_idle_expired_session($factory());
            }
            #[test]
            fn touch_is_monotonic_coalesced_and_leaves_data() {
                super::touch_is_monotonic_coalesced_and_leaves_data($factory());
            }
            #[test]
            fn delete_removes_everything() {
                super::delete_removes_everything($factory());
            }
            #[test]
            fn list_expired_by_idle_and_lifetime_with_limit() {
                super::list_expired_by_idle_and_lifetime_with_limit($factory());
            }
            #[test]
            fn concurrent_cas_has_one_winner_per_version() {
                super::concurrent_cas_has_one_winner_per_version($factory());
            }
            #[test]
            fn concurrent_touches_keep_the_maximum() {
                super::concurrent_touches_keep_the_maximum($factory());
            }
            #[test]
            fn thousand_concurrent_reads_store_one_touch() {
                super::thousand_concurrent_reads_store_one_touch($factory());
            }
            #[test]
            fn manager_roundtrip_over_store() {
                super::manager_roundtrip_over_store($factory());
            }
        }
    };
}

// One line per backend.
conformance!(memory_store, memory);
conformance!(file_store, file);
conformance!(file_store_without_fsync, file_no_fsync);

// ---- FileStore specifics ----

#[test]
fn file_store_layout_is_sharded_and_leaves_no_temp_or_lock_files() {
    let f = file();
    let i = id();
    assert!(f.store.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    assert!(f.store.save(&i, Some(1), &rec(2, T0, T0, "b")).unwrap());
    let path = f.store.path_of(&i);
    assert_eq!(
        path.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap(),
        &i.as_str()[..2]
    );
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![i.as_str().to_owned()]);
    assert!(f.store.delete(&i).unwrap());
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        0
    );
}

#[test]
fn file_store_cleanup_removes_only_old_temp_files() {
    let f = file();
    let i = id();
    assert!(f.store.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    let dir = f.store.path_of(&i).parent().unwrap().to_path_buf();
    std::fs::write(dir.join(format!(".tmp.{}.deadbeef", i.as_str())), b"torn").unwrap();
    assert_eq!(f.store.cleanup().unwrap(), 0, "young temp files are kept");
    let store = f.store.with_temp_grace(Duration::ZERO);
    assert_eq!(store.cleanup().unwrap(), 1);
    assert!(store.load(&i).unwrap().is_some());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn file_store_reports_corrupt_and_oversized_files_as_errors() {
    let f = file();
    let i = id();
    let j = id();
    assert!(f.store.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    assert!(f.store.save(&j, None, &rec(1, T0, T0, "a")).unwrap());
    std::fs::write(f.store.path_of(&i), b"garbage without header").unwrap();
    assert!(matches!(
        f.store.load(&i),
        Err(locktable::Error::SessionCorrupt(_))
    ));
    let store = f.store.with_max_file_size(10);
    assert!(matches!(
        store.load(&j),
        Err(locktable::Error::TooLarge { .. })
    ));
    // Unreadable (corrupt or oversized) entries are offered to gc even when not expired.
    let none = Cutoffs {
        idle_before: Timestamp(0),
        created_before: Timestamp(0),
    };
    let mut got = store.list_expired(none, 10).unwrap();
    got.sort();
    let mut want = vec![i, j];
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn file_store_ignores_foreign_files() {
    let f = file();
    let root = f.store.root().to_path_buf();
    std::fs::create_dir_all(root.join("zz")).unwrap();
    std::fs::write(root.join("zz").join("not-a-session"), b"x").unwrap();
    std::fs::write(root.join("README"), b"x").unwrap();
    let all = Cutoffs {
        idle_before: Timestamp(u64::MAX),
        created_before: Timestamp(u64::MAX),
    };
    assert!(f.store.list_expired(all, 10).unwrap().is_empty());
    assert_eq!(f.store.cleanup().unwrap(), 0);
}
