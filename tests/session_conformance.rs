//! Conformance suite for [`Store`] implementations.
//!
//! Every check is generic over a store factory; the `conformance!` macro instantiates the whole
//! suite for one backend, so adding a backend is one line at the bottom of this file. Another
//! test file reuses the suite by including this one (`#[macro_use] #[path =
//! "session_conformance.rs"] mod conformance;` and `use conformance::*;`), with factories that
//! may return `Option<Fixture<_>>` (`None`: no server, the test is skipped). A backend
//! whose data is shared between handles (files, a server) also gives `reopen`, a second handle
//! on the same storage, so that the suite can check its [`Capabilities::atomic_cas`] claim.

use locktable::session::{
    record, ChangedValue, Cutoffs, Expiry, FileStore, ManualClock, MemoryStore, SessionConfig,
    SessionId, SessionManager, SessionMeta, Store, Stored, StoredHead, StoredSession, Timestamp,
    Touch,
};
use locktable::{Error, LockTable, TableOptions};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

const T0: Timestamp = Timestamp(1_700_000_000_000);
const MAX: usize = 1 << 20;

/// A store plus whatever must live as long as it (a temporary directory).
pub struct Fixture<S> {
    pub store: S,
    pub table: LockTable,
    /// Another handle on the same storage, for stores shared between handles.
    pub reopen: Option<Box<dyn Fn() -> Box<dyn Store>>>,
    pub _keep: Box<dyn Any>,
}

fn memory() -> Fixture<MemoryStore> {
    Fixture {
        store: MemoryStore::new(),
        table: LockTable::anonymous(&TableOptions::default()).unwrap(),
        reopen: None,
        _keep: Box::new(()),
    }
}

fn file() -> Fixture<FileStore> {
    let dir = tempfile::tempdir().unwrap();
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let root = dir.path().join("s");
    let store = FileStore::open(&root).unwrap();
    Fixture {
        store,
        table,
        reopen: Some(Box::new(move || Box::new(FileStore::open(&root).unwrap()))),
        _keep: Box::new(dir),
    }
}

/// The file store with durability off (atomic renames, no fsync).
fn file_no_fsync() -> Fixture<FileStore> {
    let f = file();
    Fixture {
        store: f.store.with_fsync(false),
        table: f.table,
        reopen: f.reopen,
        _keep: f._keep,
    }
}

fn rec_with(
    version: u64,
    created: Timestamp,
    la: Timestamp,
    expiry: Expiry,
    note: &str,
) -> StoredSession {
    let mut body = record::RecordBody::default();
    body.data.insert("note".into(), note.into());
    body.changed.insert("note".into(), version);
    let r = record::Record {
        version,
        created: created.0,
        expiry,
        body,
    };
    StoredSession::from_record(record::encode(&r, MAX).unwrap(), la).unwrap()
}

fn rec(version: u64, created: Timestamp, la: Timestamp, note: &str) -> StoredSession {
    rec_with(version, created, la, Expiry::Default, note)
}

fn id() -> SessionId {
    SessionId::generate().unwrap()
}

fn t(secs: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

/// The rule at `now` with an idle timeout of 100 s and a lifetime of 1,000 s.
fn rule(now: Timestamp) -> Cutoffs {
    Cutoffs {
        now,
        idle_timeout: Duration::from_secs(100),
        max_lifetime: Duration::from_secs(1000),
    }
}

/// A rule under which nothing stored at T0 or later is expired.
fn never() -> Cutoffs {
    rule(T0)
}

pub fn load_absent<S: Store>(f: Fixture<S>) {
    assert!(f.store.load(&id(), MAX).unwrap().is_none());
    assert!(f.store.meta(&id()).unwrap().is_none());
    assert!(f.store.last_accessed(&id()).unwrap().is_none());
    assert!(!f.store.delete(&id()).unwrap());
    assert!(!f.store.remove_expired(&id(), &rule(t(1 << 30))).unwrap());
    assert_eq!(
        f.store.touch(&id(), T0, Duration::ZERO, &never()).unwrap(),
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
    let got = s.load(&i, MAX).unwrap().unwrap();
    assert_eq!(got.bytes, rec(1, T0, T0, "one").bytes);
    let m = got.meta;
    assert_eq!((m.version, m.created, m.last_accessed), (1, T0, T0));
    assert!(s.save(&i, Some(1), &rec(2, T0, T0, "two")).unwrap());
    let got = s.load(&i, MAX).unwrap().unwrap();
    assert_eq!(got.meta.version, 2);
    assert_eq!(got.bytes, rec(2, T0, T0, "two").bytes);
    assert!(
        !s.save(&id(), Some(1), &rec(2, T0, T0, "x")).unwrap(),
        "update of absent"
    );
}

pub fn save_keeps_the_newer_access_time<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    let late = t(60);
    assert!(s.save(&i, None, &rec(1, T0, late, "a")).unwrap());
    assert!(s.save(&i, Some(1), &rec(2, T0, T0, "b")).unwrap());
    assert_eq!(s.last_accessed(&i).unwrap(), Some(late));
    assert_eq!(s.load(&i, MAX).unwrap().unwrap().meta.last_accessed, late);
}

/// Metadata (version, times, expiry rule, size) is readable without the record and agrees with
/// what `load` returns.
pub fn meta_is_kept_beside_the_record<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    let e = Expiry::Idle(Duration::from_secs(7));
    let r = rec_with(1, T0, t(3), e, "a");
    assert!(s.save(&i, None, &r).unwrap());
    let m = s.meta(&i).unwrap().unwrap();
    assert_eq!(m, s.load(&i, MAX).unwrap().unwrap().meta);
    assert_eq!(
        (m.version, m.created, m.last_accessed, m.expiry, m.size),
        (1, T0, t(3), e, r.bytes.len() as u64)
    );
}

/// A record over the reader's limit is reported (`TooLarge`), never handed out or lost: it can
/// still be deleted, and its metadata read.
pub fn load_reports_records_over_the_limit<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    let r = rec(1, T0, T0, &"x".repeat(2000));
    assert!(s.save(&i, None, &r).unwrap());
    assert!(matches!(
        s.load(&i, 1000),
        Err(Error::TooLarge { limit: 1000, .. })
    ));
    assert_eq!(s.load(&i, MAX).unwrap().unwrap().bytes, r.bytes);
    assert!(s.meta(&i).unwrap().is_some());
    assert!(s.delete(&i).unwrap());
}

pub fn touch_is_monotonic_coalesced_and_leaves_data<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    assert!(s.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    let before = s.load(&i, MAX).unwrap().unwrap().bytes;
    let c = Duration::from_secs(10);
    assert_eq!(s.touch(&i, t(5), c, &never()).unwrap(), Touch::Skipped);
    assert_eq!(s.touch(&i, t(20), c, &never()).unwrap(), Touch::Written);
    assert_eq!(s.last_accessed(&i).unwrap(), Some(t(20)));
    assert_eq!(
        s.touch(&i, t(3), Duration::ZERO, &never()).unwrap(),
        Touch::Skipped
    );
    assert_eq!(s.last_accessed(&i).unwrap(), Some(t(20)));
    assert_eq!(
        s.touch(&i, t(21), Duration::ZERO, &never()).unwrap(),
        Touch::Written
    );
    let after = s.load(&i, MAX).unwrap().unwrap();
    assert_eq!(after.bytes, before);
    assert_eq!((after.meta.version, after.meta.last_accessed), (1, t(21)));
}

/// A touch never revives a session that is expired by its stored metadata, under any of the
/// expiry rules: it writes nothing and says so.
pub fn touch_does_not_revive_an_expired_session<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let cases = [
        // (expiry, created, last accessed, now of the touch)
        (Expiry::Default, t(0), t(10), t(111)),
        (Expiry::Default, t(0), t(990), t(1001)),
        (Expiry::Idle(Duration::from_secs(5)), t(0), t(10), t(16)),
        (Expiry::At(t(50)), t(0), t(45), t(51)),
    ];
    for (e, created, la, now) in cases {
        let i = id();
        assert!(s.save(&i, None, &rec_with(1, created, la, e, "a")).unwrap());
        assert_eq!(
            s.touch(&i, now, Duration::ZERO, &rule(now)).unwrap(),
            Touch::Expired,
            "{e:?}"
        );
        assert_eq!(s.last_accessed(&i).unwrap(), Some(la));
    }
    // Not yet expired: written.
    let i = id();
    assert!(s.save(&i, None, &rec(1, t(0), t(10), "a")).unwrap());
    assert_eq!(
        s.touch(&i, t(100), Duration::ZERO, &rule(t(100))).unwrap(),
        Touch::Written
    );
    assert_eq!(s.last_accessed(&i).unwrap(), Some(t(100)));
}

pub fn delete_removes_everything<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    assert!(s.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    assert!(s.delete(&i).unwrap());
    assert!(s.load(&i, MAX).unwrap().is_none());
    assert!(s.meta(&i).unwrap().is_none());
    assert!(s.last_accessed(&i).unwrap().is_none());
    assert!(
        s.save(&i, None, &rec(1, T0, T0, "b")).unwrap(),
        "ID reusable"
    );
}

/// `remove_expired` deletes exactly the expired sessions, by each one's own rule.
pub fn remove_expired_is_a_checked_delete<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let now = t(200);
    let expired = [
        rec(1, t(0), t(10), ""),
        rec_with(1, t(0), t(180), Expiry::Idle(Duration::from_secs(5)), ""),
        rec_with(1, t(0), t(199), Expiry::At(t(150)), ""),
    ];
    let alive = [
        rec(1, t(0), t(150), ""),
        rec_with(1, t(0), t(10), Expiry::Idle(Duration::from_secs(500)), ""),
        rec_with(1, t(0), t(0), Expiry::At(t(5000)), ""),
    ];
    for r in &expired {
        let i = id();
        assert!(s.save(&i, None, r).unwrap());
        assert!(s.remove_expired(&i, &rule(now)).unwrap(), "{:?}", r.meta);
        assert!(s.meta(&i).unwrap().is_none());
    }
    for r in &alive {
        let i = id();
        assert!(s.save(&i, None, r).unwrap());
        assert!(!s.remove_expired(&i, &rule(now)).unwrap(), "{:?}", r.meta);
        assert!(s.meta(&i).unwrap().is_some());
    }
}

/// A touch that lands while gc decides cannot be lost: either the touch sees the session
/// expired (and writes nothing), or `remove_expired` sees it touched (and keeps it). Never
/// "touch written, then session removed as expired".
pub fn remove_expired_is_atomic_with_touches<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    for _ in 0..50 {
        let i = id();
        assert!(s.save(&i, None, &rec(1, t(0), t(0), "")).unwrap());
        // The toucher's clock is behind gc's (a clock step): it sees the session alive.
        let (touch, removed) = std::thread::scope(|sc| {
            let a = sc.spawn(|| s.touch(&i, t(99), Duration::ZERO, &rule(t(99))).unwrap());
            let b = sc.spawn(|| s.remove_expired(&i, &rule(t(101))).unwrap());
            (a.join().unwrap(), b.join().unwrap())
        });
        match (touch, removed) {
            (Touch::Written, true) => {
                // Only fine if the removal came first... which would make the touch Missing.
                panic!("a written touch was followed by removal as expired")
            }
            (Touch::Written, false) => assert_eq!(s.last_accessed(&i).unwrap(), Some(t(99))),
            (Touch::Missing, true) => assert!(s.meta(&i).unwrap().is_none()),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// `scan_expired` examines at most `budget` entries per call, and successive calls find every
/// expired session by its own rule.
/// (A store with `native_expiry` may find nothing: it expires sessions by itself.)
pub fn scan_expired_is_bounded_and_complete<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let native = s.capabilities().native_expiry;
    let now = t(500);
    let mut want = Vec::new();
    for k in 0..12u64 {
        let i = id();
        let r = match k % 4 {
            0 => rec(1, t(0), t(10), ""),  // idle-expired
            1 => rec(1, t(0), t(450), ""), // alive
            2 => rec_with(1, t(0), t(10), Expiry::Idle(Duration::from_secs(1000)), ""), // alive
            _ => rec_with(1, t(0), t(499), Expiry::At(t(400)), ""), // expired at a fixed time
        };
        if k % 4 == 0 || k % 4 == 3 {
            want.push(i.clone());
        }
        assert!(s.save(&i, None, &r).unwrap());
    }
    want.sort();
    let mut got = Vec::new();
    let mut calls = 0;
    loop {
        let scan = s.scan_expired(&rule(now), 5).unwrap();
        assert!(scan.examined <= 5);
        assert_eq!(scan.unreadable, 0);
        got.extend(scan.expired);
        calls += 1;
        if !scan.more || calls > 10 {
            break;
        }
    }
    got.sort();
    got.dedup();
    if native {
        assert!(got.iter().all(|i| want.contains(i)), "only expired ones");
        return;
    }
    assert_eq!(got, want);
    assert!(calls >= 3, "12 entries need at least 3 calls of 5");
    assert!(s.scan_expired(&never(), 100).unwrap().expired.is_empty());
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
                    let cur = s.load(i, MAX).unwrap().unwrap().meta.version;
                    let next = rec(cur + 1, T0, T0, &format!("{t}"));
                    if s.save(i, Some(cur), &next).unwrap() {
                        wins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let v = s.load(&i, MAX).unwrap().unwrap().meta.version;
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
                    s.touch(i, at, Duration::ZERO, &never()).unwrap();
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
    // A session that nothing wrote to is never stored (lazy creation).
    let s = mgr.create().unwrap();
    let ghost = s.id().to_string();
    s.commit().unwrap();
    assert!(mgr.load(&ghost).unwrap().is_none());
    clock.advance(Duration::from_secs(61));
    let r = mgr.gc().unwrap();
    if !mgr.store().capabilities().native_expiry {
        assert_eq!((r.deleted, r.examined), (1, 1));
    }
    assert!(mgr.load(&id).unwrap().is_none());
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
    let mut s = mgr.create().unwrap();
    s.persist();
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

/// A store that claims [`Capabilities::atomic_cas`] keeps it across handles on one storage
/// (two processes, or two managers with different lock tables): one winner per version.
pub fn atomic_cas_holds_across_handles<S: Store>(f: Fixture<S>) {
    let Some(reopen) = &f.reopen else {
        return;
    };
    if !f.store.capabilities().atomic_cas {
        return;
    }
    let other = reopen();
    let i = id();
    assert!(f.store.save(&i, None, &rec(1, T0, T0, "0")).unwrap());
    let wins = std::sync::atomic::AtomicU64::new(0);
    let handles: [&dyn Store; 2] = [&f.store, &*other];
    std::thread::scope(|sc| {
        for (t, s) in handles.into_iter().enumerate() {
            let (i, wins) = (&i, &wins);
            sc.spawn(move || {
                for _ in 0..100 {
                    let cur = s.load(i, MAX).unwrap().unwrap().meta.version;
                    if s.save(i, Some(cur), &rec(cur + 1, T0, T0, &format!("{t}")))
                        .unwrap()
                    {
                        wins.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let v = f.store.load(&i, MAX).unwrap().unwrap().meta.version;
    assert_eq!(v, 1 + wins.into_inner(), "every successful CAS bumped once");
}

/// A `persistent`, `shared_across_processes` store shows one handle's writes, touches and
/// deletes to another handle on the same storage.
pub fn shared_stores_agree_across_handles<S: Store>(f: Fixture<S>) {
    let caps = f.store.capabilities();
    let Some(reopen) = &f.reopen else {
        assert!(
            !caps.shared_across_processes,
            "a shared store must give the suite a second handle (reopen)"
        );
        return;
    };
    assert!(caps.persistent || caps.shared_across_processes);
    let other = reopen();
    let i = id();
    assert!(f.store.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    assert_eq!(other.meta(&i).unwrap().unwrap().version, 1);
    assert_eq!(
        other.touch(&i, t(5), Duration::ZERO, &never()).unwrap(),
        Touch::Written
    );
    assert_eq!(f.store.last_accessed(&i).unwrap(), Some(t(5)));
    assert!(other.delete(&i).unwrap());
    assert!(f.store.load(&i, MAX).unwrap().is_none());
}

// ---- Sessions stored by key (`per_key`; every other store runs the default methods) ----

/// A record of `n` keys `k0..` whose values are `"<note>-<i>"`, split into head and values.
fn split_rec(version: u64, n: usize, note: &str) -> (StoredHead, Vec<ChangedValue>) {
    let mut body = record::RecordBody::default();
    for i in 0..n {
        body.data
            .insert(format!("k{i}"), format!("{note}-{i}").into());
        body.changed.insert(format!("k{i}"), version);
    }
    let r = record::Record {
        version,
        created: T0.0,
        expiry: Expiry::Default,
        body,
    };
    let (head, values) = record::split(&r).unwrap();
    (
        stored_head(&head),
        values.into_iter().map(|(k, v)| (k, Some(v))).collect(),
    )
}

fn stored_head(head: &record::Head) -> StoredHead {
    let bytes = record::encode_head(head).unwrap();
    StoredHead {
        meta: SessionMeta {
            version: head.version,
            created: Timestamp(head.created),
            last_accessed: T0,
            expiry: head.expiry,
            size: bytes.len() as u64 + head.values_size(),
        },
        head: bytes,
        values: None,
    }
}

fn value_of(key: &str, head: &record::Head, bytes: &[u8]) -> serde_json::Value {
    record::decode_value(key, &head.keys[key], bytes).unwrap()
}

/// `save_delta` of a new session, then `load_head` (values only when asked, on a per-key
/// store), `load_values` at the version, and a whole `load` that agrees.
pub fn by_key_head_values_and_whole_agree<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let per_key = s.capabilities().per_key;
    let i = id();
    let (head, values) = split_rec(1, 5, "a");
    assert!(s.save_delta(&i, None, &head, &values).unwrap());
    assert!(
        !s.save_delta(&i, None, &head, &values).unwrap(),
        "create over existing"
    );
    let h = match s.load_head(&i, MAX, 0).unwrap().unwrap() {
        Stored::ByKey(got) => {
            assert!(per_key, "only a per-key store keeps a head");
            assert!(got.values.is_none(), "values left out when not asked for");
            assert_eq!(
                got.meta.size, head.meta.size,
                "stored size: head plus values"
            );
            record::decode_head(&got.head, MAX).unwrap()
        }
        Stored::Whole(got) => {
            assert!(
                !per_key,
                "a per-key store keeps what save_delta wrote by key"
            );
            record::split(&record::decode(&got.bytes, MAX).unwrap())
                .unwrap()
                .0
        }
    };
    assert_eq!((h.version, h.keys.len()), (1, 5));
    match s.load_head(&i, MAX, u64::MAX).unwrap().unwrap() {
        Stored::ByKey(all) => assert_eq!(all.values.as_ref().map(Vec::len), Some(5)),
        Stored::Whole(all) => assert_eq!(all.meta.version, 1),
    }
    let v = s.load_values(&i, 1, &["k3", "nope"]).unwrap().unwrap();
    assert_eq!(value_of("k3", &h, v[0].as_deref().unwrap()), "a-3");
    assert!(v[1].is_none());
    assert!(
        s.load_values(&i, 2, &["k3"]).unwrap().is_none(),
        "other version"
    );
    assert!(
        s.load_values(&id(), 1, &["k3"]).unwrap().is_none(),
        "absent"
    );
    let whole = s.load(&i, MAX).unwrap().unwrap();
    let r = record::decode(&whole.bytes, MAX).unwrap();
    assert_eq!(r.body.data["k4"], "a-4");
    assert_eq!(whole.meta.version, 1);
}

/// `save_delta` is a compare-and-swap that writes the head and the changed values only: an
/// unchanged value keeps its bytes, a removed one is gone, and the old version is unreadable.
pub fn by_key_save_delta_writes_only_the_change<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    let (head, values) = split_rec(1, 3, "a");
    assert!(s.save_delta(&i, None, &head, &values).unwrap());
    let before = s.load_values(&i, 1, &["k0"]).unwrap().unwrap();
    let mut h = record::decode_head(&head.head, MAX).unwrap();
    h.version = 2;
    let v2 = record::encode_value("k1", 2, &"b".into()).unwrap();
    h.keys.insert(
        "k1".into(),
        record::KeyState {
            changed: 2,
            size: Some(v2.len() as u64),
        },
    );
    h.keys.insert(
        "k2".into(),
        record::KeyState {
            changed: 2,
            size: None,
        },
    );
    let new = stored_head(&h);
    let delta = vec![("k1".to_owned(), Some(v2)), ("k2".to_owned(), None)];
    assert!(
        !s.save_delta(&i, Some(7), &new, &delta).unwrap(),
        "wrong version"
    );
    assert!(
        !s.save_delta(&id(), Some(1), &new, &delta).unwrap(),
        "absent"
    );
    assert!(s.save_delta(&i, Some(1), &new, &delta).unwrap());
    let v = s.load_values(&i, 2, &["k0", "k1", "k2"]).unwrap().unwrap();
    assert_eq!(v[0], before[0], "unchanged value");
    assert_eq!(value_of("k1", &h, v[1].as_deref().unwrap()), "b");
    assert!(v[2].is_none(), "removed value");
    assert!(s.load_values(&i, 1, &["k0"]).unwrap().is_none());
    let r = record::decode(&s.load(&i, MAX).unwrap().unwrap().bytes, MAX).unwrap();
    assert_eq!(r.body.data.len(), 2);
    assert_eq!(r.body.changed["k2"], 2, "tombstone kept");
    // A whole save replaces everything; a delta after it sees the whole record's values.
    assert!(s.save(&i, Some(2), &rec(3, T0, T0, "w")).unwrap());
    assert!(s.load_values(&i, 3, &["k0"]).unwrap().unwrap()[0].is_none());
    let whole = match s.load_head(&i, MAX, 0).unwrap().unwrap() {
        Stored::Whole(w) => w,
        Stored::ByKey(_) => panic!("a whole save is read back whole"),
    };
    let h3 = record::split(&record::decode(&whole.bytes, MAX).unwrap())
        .unwrap()
        .0;
    let mut h4 = h3.clone();
    h4.version = 4;
    let v4 = record::encode_value("x", 4, &1.into()).unwrap();
    h4.keys.insert(
        "x".into(),
        record::KeyState {
            changed: 4,
            size: Some(v4.len() as u64),
        },
    );
    assert!(s
        .save_delta(&i, Some(3), &stored_head(&h4), &[("x".into(), Some(v4))])
        .unwrap());
    let r = record::decode(&s.load(&i, MAX).unwrap().unwrap().bytes, MAX).unwrap();
    assert_eq!(
        (r.body.data["note"].as_str(), r.body.data["x"].as_i64()),
        (Some("w"), Some(1))
    );
}

/// Head and values are limited together: a session stored by key over the reader's limit is
/// `TooLarge` for `load_head`, deletable, and its metadata readable.
pub fn by_key_sizes_count_head_and_values<S: Store>(f: Fixture<S>) {
    let s = &f.store;
    let i = id();
    let (head, values) = split_rec(1, 20, &"x".repeat(100));
    assert!(s.save_delta(&i, None, &head, &values).unwrap());
    let size = s.meta(&i).unwrap().unwrap().size as usize;
    assert!(size > 2000);
    assert!(matches!(
        s.load_head(&i, 2000, 0),
        Err(Error::TooLarge { limit: 2000, .. })
    ));
    assert!(s.load_head(&i, size.max(MAX), 0).unwrap().is_some());
    assert!(s.delete(&i).unwrap());
    assert!(s.load_head(&i, MAX, 0).unwrap().is_none());
    assert!(s.load_values(&i, 1, &["k0"]).unwrap().is_none());
}

/// A manager that loads every session by key (`lazy_above: 0`).
fn lazy_manager<S: Store + 'static>(f: Fixture<S>, clock: Arc<ManualClock>) -> SessionManager {
    let cfg = SessionConfig {
        clock,
        idle_timeout: Duration::from_secs(60),
        lazy_above: 0,
        ..SessionConfig::default()
    };
    SessionManager::new(f.table.clone(), f.store, cfg)
}

fn keys_n(mgr: &SessionManager, n: usize) -> String {
    let mut s = mgr.create().unwrap();
    for k in 0..n {
        s.insert(format!("k{k}"), &k).unwrap();
    }
    let id = s.id().to_string();
    s.commit().unwrap();
    id
}

/// Through the manager: a lazy `get` of one key, keys from the head, a removal, a one-key
/// commit, and expiry, on every store.
pub fn by_key_manager_get_remove_commit_expire<S: Store + 'static>(f: Fixture<S>) {
    let clock = Arc::new(ManualClock::new(T0));
    let keep = f._keep;
    let f = Fixture {
        _keep: Box::new(()),
        ..f
    };
    let mgr = lazy_manager(f, clock.clone());
    let id = keys_n(&mgr, 10);
    let mut s = mgr.load(&id).unwrap().unwrap();
    assert_eq!(s.get::<usize>("k7").unwrap(), Some(7));
    assert_eq!(s.get::<usize>("k7").unwrap(), Some(7), "read once, kept");
    assert_eq!(s.get::<usize>("absent").unwrap(), None);
    assert_eq!(s.keys().count(), 10);
    assert!(s.remove("k3"));
    assert!(!s.remove("k3"));
    assert_eq!(s.get::<usize>("k3").unwrap(), None);
    s.insert("k8", &80).unwrap();
    s.insert("new", &1).unwrap();
    assert_eq!(s.get::<usize>("k8").unwrap(), Some(80));
    assert_eq!(s.keys().count(), 10);
    s.commit().unwrap();
    let s = mgr.load(&id).unwrap().unwrap();
    assert_eq!(s.version(), 2);
    assert_eq!(s.get::<usize>("k3").unwrap(), None);
    assert_eq!(s.get::<usize>("k8").unwrap(), Some(80));
    assert_eq!(
        s.get::<usize>("k9").unwrap(),
        Some(9),
        "untouched value kept"
    );
    assert_eq!(s.get::<usize>("new").unwrap(), Some(1));
    s.commit().unwrap();
    // A request that loaded before the removal and writes the removed key conflicts.
    let mut old = mgr.load(&id).unwrap().unwrap();
    mgr.transact(&id, |s| {
        s.remove("k9");
        Ok(())
    })
    .unwrap()
    .unwrap();
    old.insert("k9", &99).unwrap();
    assert!(matches!(old.commit(), Err(Error::Conflict { key }) if key == "k9"));
    // Expiry: gone for a load, and a lazy get of a session that expired and was collected
    // meanwhile conflicts (its values are gone), and `transact` then says the session is gone.
    let s = mgr.load(&id).unwrap().unwrap();
    clock.advance(Duration::from_secs(61));
    mgr.gc().unwrap();
    let gone = mgr
        .store()
        .meta(&SessionId::parse(&id).unwrap())
        .unwrap()
        .is_none();
    if gone && mgr.store().capabilities().per_key {
        assert!(matches!(s.get::<usize>("k0"), Err(Error::Conflict { .. })));
    }
    drop(s);
    assert!(mgr.load(&id).unwrap().is_none());
    assert_eq!(mgr.transact(&id, |s| s.get::<usize>("k0")).unwrap(), None);
    drop(keep);
}

/// A value replaced by another commit between a lazy load and its `get`: on a per-key store
/// the `get` fails with `Conflict` (a request never mixes versions) and `transact` runs again
/// and succeeds; on a whole-record store the `get` sees the loaded snapshot.
pub fn by_key_value_replaced_before_a_lazy_get<S: Store + 'static>(f: Fixture<S>) {
    let per_key = f.store.capabilities().per_key;
    let keep = f._keep;
    let f = Fixture {
        _keep: Box::new(()),
        ..f
    };
    let mgr = lazy_manager(f, Arc::new(ManualClock::new(T0)));
    let id = keys_n(&mgr, 4);
    let s = mgr.load(&id).unwrap().unwrap();
    mgr.transact(&id, |s| s.insert("k1", &100))
        .unwrap()
        .unwrap();
    match s.get::<usize>("k1") {
        Err(Error::Conflict { key }) => assert!(per_key && key == "k1"),
        Ok(v) => assert!(!per_key && v == Some(1), "{v:?}"),
        Err(e) => panic!("{e}"),
    }
    drop(s);
    let mut attempts = 0;
    let got = mgr
        .transact(&id, |s| {
            attempts += 1;
            if attempts == 1 {
                // Another request commits between this one's load and its get.
                mgr.transact(&id, |o| o.insert("k2", &200))
                    .unwrap()
                    .unwrap();
            }
            let n = s.get::<usize>("k2")?.unwrap();
            s.insert("k3", &(n + 1))?;
            Ok(n)
        })
        .unwrap();
    if per_key {
        assert_eq!((got, attempts), (Some(200), 2), "retried on fresh data");
    } else {
        // Whole-record snapshot: the first attempt read 2 and its commit did not conflict (k3
        // was not changed by the other request).
        assert_eq!((got, attempts), (Some(2), 1));
    }
    let s = mgr.load(&id).unwrap().unwrap();
    assert_eq!(s.get::<usize>("k3").unwrap(), got.map(|n| n + 1));
    drop(keep);
}

/// `max_record_size` limits head plus values at commit; nothing is written when it is over.
pub fn by_key_commit_over_the_limit_is_too_large<S: Store + 'static>(f: Fixture<S>) {
    let keep = f._keep;
    let f = Fixture {
        _keep: Box::new(()),
        ..f
    };
    let cfg = SessionConfig {
        lazy_above: 0,
        max_record_size: 4000,
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new(f.table.clone(), f.store, cfg);
    let id = keys_n(&mgr, 3);
    let r = mgr.transact(&id, |s| {
        for k in 0..3 {
            s.insert(format!("big{k}"), &"x".repeat(1500))?;
        }
        Ok(())
    });
    assert!(
        matches!(r, Err(Error::TooLarge { limit: 4000, .. })),
        "{r:?}"
    );
    let s = mgr.load(&id).unwrap().unwrap();
    assert_eq!((s.version(), s.keys().count()), (1, 3));
    drop(keep);
}

/// A damaged value (wrong version tag, wrong CRC) read by key is `SessionCorrupt` for that
/// session only.
pub fn by_key_damaged_value_is_a_typed_error<S: Store + 'static>(f: Fixture<S>) {
    if !f.store.capabilities().per_key {
        return;
    }
    let keep = f._keep;
    let f = Fixture {
        _keep: Box::new(()),
        ..f
    };
    let mgr = lazy_manager(f, Arc::new(ManualClock::new(T0)));
    let good = keys_n(&mgr, 2);
    let bad = keys_n(&mgr, 2);
    let sid = SessionId::parse(&bad).unwrap();
    let Stored::ByKey(st) = mgr.store().load_head(&sid, MAX, 0).unwrap().unwrap() else {
        panic!("stored by key (lazy_above: 0)");
    };
    let mut h = record::decode_head(&st.head, MAX).unwrap();
    // A value tagged with another version than its head says (same size).
    let wrong = record::encode_value("k0", 9, &0.into()).unwrap();
    h.version = 2;
    h.keys.get_mut("k0").unwrap().size = Some(wrong.len() as u64);
    let new = stored_head(&h);
    assert!(mgr
        .store()
        .save_delta(&sid, Some(1), &new, &[("k0".into(), Some(wrong))])
        .unwrap());
    let s = mgr.load(&bad).unwrap().unwrap();
    assert!(matches!(
        s.get::<usize>("k0"),
        Err(Error::SessionCorrupt(_))
    ));
    drop(s);
    let s = mgr.load(&good).unwrap().unwrap();
    assert_eq!(
        s.get::<usize>("k1").unwrap(),
        Some(1),
        "other sessions intact"
    );
    drop(s);
    drop(keep);
}

/// A session stays a whole record while it is at most `lazy_above`, is converted to storage by
/// key by the commit that makes it larger (on a per-key store), keeps every value across the
/// conversion, and loads by key from then on.
pub fn by_key_a_growing_session_is_converted<S: Store + 'static>(f: Fixture<S>) {
    let per_key = f.store.capabilities().per_key;
    let keep = f._keep;
    let f = Fixture {
        _keep: Box::new(()),
        ..f
    };
    let cfg = SessionConfig {
        lazy_above: 2000,
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new(f.table.clone(), f.store, cfg);
    let id = keys_n(&mgr, 3);
    let sid = SessionId::parse(&id).unwrap();
    let form = |mgr: &SessionManager| match mgr.store().load_head(&sid, MAX, 0).unwrap() {
        Some(Stored::Whole(_)) => "whole",
        Some(Stored::ByKey(_)) => "by key",
        None => "gone",
    };
    assert_eq!(form(&mgr), "whole", "small: a whole record");
    mgr.transact(&id, |s| s.insert("big", &"x".repeat(3000)))
        .unwrap()
        .unwrap();
    assert_eq!(form(&mgr), if per_key { "by key" } else { "whole" });
    let s = mgr.load(&id).unwrap().unwrap();
    assert_eq!(s.keys().count(), 4);
    assert_eq!(
        s.get::<usize>("k2").unwrap(),
        Some(2),
        "kept across the conversion"
    );
    assert_eq!(s.get::<String>("big").unwrap().map(|b| b.len()), Some(3000));
    drop(s);
    // Shrunk again: still by key (no conversion back), loaded whole in one snapshot.
    mgr.transact(&id, |s| {
        s.remove("big");
        Ok(())
    })
    .unwrap()
    .unwrap();
    let s = mgr.load(&id).unwrap().unwrap();
    assert_eq!((s.keys().count(), s.version()), (3, 3));
    drop(s);
    drop(keep);
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
            fn touch_does_not_revive_an_expired_session() {
                super::touch_does_not_revive_an_expired_session($factory());
            }
            #[test]
            fn meta_is_kept_beside_the_record() {
                super::meta_is_kept_beside_the_record($factory());
            }
            #[test]
            fn load_reports_records_over_the_limit() {
                super::load_reports_records_over_the_limit($factory());
            }
            #[test]
            fn remove_expired_is_a_checked_delete() {
                super::remove_expired_is_a_checked_delete($factory());
            }
            #[test]
            fn remove_expired_is_atomic_with_touches() {
                super::remove_expired_is_atomic_with_touches($factory());
            }
            #[test]
            fn scan_expired_is_bounded_and_complete() {
                super::scan_expired_is_bounded_and_complete($factory());
            }
            #[test]
            fn shared_stores_agree_across_handles() {
                super::shared_stores_agree_across_handles($factory());
            }
            #[test]
            fn atomic_cas_holds_across_handles() {
                super::atomic_cas_holds_across_handles($factory());
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
            fn by_key_head_values_and_whole_agree() {
                super::by_key_head_values_and_whole_agree($factory());
            }
            #[test]
            fn by_key_save_delta_writes_only_the_change() {
                super::by_key_save_delta_writes_only_the_change($factory());
            }
            #[test]
            fn by_key_sizes_count_head_and_values() {
                super::by_key_sizes_count_head_and_values($factory());
            }
            #[test]
            fn by_key_manager_get_remove_commit_expire() {
                super::by_key_manager_get_remove_commit_expire($factory());
            }
            #[test]
            fn by_key_value_replaced_before_a_lazy_get() {
                super::by_key_value_replaced_before_a_lazy_get($factory());
            }
            #[test]
            fn by_key_commit_over_the_limit_is_too_large() {
                super::by_key_commit_over_the_limit_is_too_large($factory());
            }
            #[test]
            fn by_key_damaged_value_is_a_typed_error() {
                super::by_key_damaged_value_is_a_typed_error($factory());
            }
            #[test]
            fn by_key_a_growing_session_is_converted() {
                super::by_key_a_growing_session_is_converted($factory());
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
    assert!(store.load(&i, MAX).unwrap().is_some());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn file_store_reports_corrupt_and_oversized_files() {
    let f = file();
    let i = id();
    let j = id();
    assert!(f.store.save(&i, None, &rec(1, T0, T0, "a")).unwrap());
    assert!(f.store.save(&j, None, &rec(1, T0, T0, "a")).unwrap());
    std::fs::write(f.store.path_of(&i), b"garbage without header").unwrap();
    assert!(matches!(
        f.store.load(&i, MAX),
        Err(locktable::Error::SessionCorrupt(_))
    ));
    // The store's own limit applies on both sides: a bigger record is refused at save and
    // reported at load, never read.
    let store = f.store.with_max_file_size(10);
    assert!(matches!(
        store.load(&j, MAX),
        Err(locktable::Error::TooLarge { .. })
    ));
    assert!(matches!(
        store.save(&id(), None, &rec(1, T0, T0, "a")),
        Err(locktable::Error::TooLarge { .. })
    ));
    // A corrupt header is offered to gc as corrupt; an oversized record is not (it is only
    // collected once expired, by its header).
    let scan = store.scan_expired(&never(), 10).unwrap();
    assert_eq!(scan.corrupt, vec![i]);
    assert!(scan.expired.is_empty());
}

#[test]
fn file_store_ignores_foreign_files() {
    let f = file();
    let root = f.store.root().to_path_buf();
    std::fs::create_dir_all(root.join("zz")).unwrap();
    std::fs::write(root.join("zz").join("not-a-session"), b"x").unwrap();
    std::fs::write(root.join("README"), b"x").unwrap();
    let all = rule(Timestamp(u64::MAX));
    let scan = f.store.scan_expired(&all, 10).unwrap();
    assert!(scan.expired.is_empty() && scan.corrupt.is_empty());
    assert_eq!(scan.unreadable, 0);
    assert_eq!(f.store.cleanup().unwrap(), 0);
}
