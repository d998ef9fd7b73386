//! Unit tests of the manager and session semantics (MemoryStore, manual clock).

use super::*;
use crate::{LockTable, TableOptions};
use std::time::Duration;

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn setup(cfg: impl FnOnce(&mut SessionConfig)) -> (SessionManager, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let mut c = SessionConfig {
        clock: clock.clone(),
        ..SessionConfig::default()
    };
    cfg(&mut c);
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    (SessionManager::new(table, MemoryStore::new(), c), clock)
}

fn new_session(mgr: &SessionManager, kv: &[(&str, i64)]) -> String {
    let mut s = mgr.create().unwrap();
    s.persist();
    for (k, v) in kv {
        s.insert(*k, v).unwrap();
    }
    let id = s.id().to_string();
    s.commit().unwrap();
    id
}

fn get(mgr: &SessionManager, id: &str, key: &str) -> Option<i64> {
    mgr.load(id).unwrap().unwrap().get::<i64>(key).unwrap()
}

fn raw(mgr: &SessionManager, id: &str) -> StoredSession {
    let id = SessionId::parse(id).unwrap();
    mgr.store().load(&id, 1 << 30).unwrap().unwrap()
}

#[test]
fn roundtrip_values_of_any_serde_type() {
    let (mgr, _) = setup(|_| {});
    let mut s = mgr.create().unwrap();
    s.insert("list", &vec![1, 2, 3]).unwrap();
    s.insert("name", "ann").unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let s = mgr.load(&id).unwrap().unwrap();
    assert_eq!(s.get::<Vec<i32>>("list").unwrap(), Some(vec![1, 2, 3]));
    assert_eq!(s.get::<String>("name").unwrap().as_deref(), Some("ann"));
    assert_eq!(s.keys().collect::<Vec<_>>(), ["list", "name"]);
    assert!(matches!(s.get::<u8>("name"), Err(Error::Serialize(_))));
    assert_eq!(s.created(), T0);
}

#[test]
fn read_only_requests_never_write_data() {
    let (mgr, clock) = setup(|_| {});
    let id = new_session(&mgr, &[("a", 1)]);
    let before = raw(&mgr, &id);
    let writes = mgr.stats().data_writes;
    clock.advance(Duration::from_secs(3600 / 2));
    for _ in 0..10 {
        let s = mgr.load(&id).unwrap().unwrap();
        assert_eq!(s.get::<i64>("a").unwrap(), Some(1));
        s.commit().unwrap();
        let s = mgr.load(&id).unwrap().unwrap();
        drop(s); // dropped without commit: access only
    }
    let after = raw(&mgr, &id);
    assert_eq!(before.bytes, after.bytes);
    assert_eq!(before.meta.version, after.meta.version);
    assert_eq!(mgr.stats().data_writes, writes);
    assert!(after.meta.last_accessed > before.meta.last_accessed);
}

#[test]
fn concurrent_requests_on_different_keys_both_survive() {
    let (mgr, _) = setup(|_| {});
    let id = new_session(&mgr, &[("a", 1), ("b", 1)]);
    let mut r1 = mgr.load(&id).unwrap().unwrap();
    let mut r2 = mgr.load(&id).unwrap().unwrap();
    let r3 = mgr.load(&id).unwrap().unwrap(); // read-only, committed last
    r1.insert("a", &2).unwrap();
    r2.insert("b", &3).unwrap();
    r2.insert("c", &4).unwrap();
    r1.commit().unwrap();
    r2.commit().unwrap();
    r3.commit().unwrap();
    assert_eq!(get(&mgr, &id, "a"), Some(2));
    assert_eq!(get(&mgr, &id, "b"), Some(3));
    assert_eq!(get(&mgr, &id, "c"), Some(4));
}

#[test]
fn same_key_conflicts_and_writes_nothing() {
    let (mgr, _) = setup(|_| {});
    let id = new_session(&mgr, &[("a", 1)]);
    let mut r1 = mgr.load(&id).unwrap().unwrap();
    let mut r2 = mgr.load(&id).unwrap().unwrap();
    r1.insert("a", &2).unwrap();
    r2.insert("a", &3).unwrap();
    r2.insert("other", &9).unwrap();
    r1.commit().unwrap();
    let v = raw(&mgr, &id).meta.version;
    match r2.commit() {
        Err(Error::Conflict { key }) => assert_eq!(key, "a"),
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(raw(&mgr, &id).meta.version, v);
    assert_eq!(get(&mgr, &id, "a"), Some(2));
    assert_eq!(get(&mgr, &id, "other"), None);
    assert_eq!(mgr.stats().conflicts, 1);
}

#[test]
fn removed_keys_never_come_back() {
    let (mgr, _) = setup(|_| {});
    let id = new_session(&mgr, &[("cart", 1), ("x", 1)]);
    let mut stale = mgr.load(&id).unwrap().unwrap();
    let mut other = mgr.load(&id).unwrap().unwrap();
    let mut remover = mgr.load(&id).unwrap().unwrap();
    assert!(remover.remove("cart"));
    assert!(!remover.remove("never-there"));
    remover.commit().unwrap();
    // A request that does not touch the key cannot resurrect it.
    other.insert("x", &2).unwrap();
    other.commit().unwrap();
    assert_eq!(get(&mgr, &id, "cart"), None);
    // A request that loaded before the removal and writes the key conflicts.
    stale.insert("cart", &5).unwrap();
    assert!(matches!(stale.commit(), Err(Error::Conflict { .. })));
    assert_eq!(get(&mgr, &id, "cart"), None);
    // A fresh request may set it again.
    let mut fresh = mgr.load(&id).unwrap().unwrap();
    fresh.insert("cart", &6).unwrap();
    fresh.commit().unwrap();
    assert_eq!(get(&mgr, &id, "cart"), Some(6));
}

#[test]
fn pruned_tombstones_fall_back_to_a_floor_conflict() {
    let (mgr, _) = setup(|c| c.max_tombstones = 2);
    let id = new_session(&mgr, &[("k0", 0), ("k1", 0), ("k2", 0), ("k3", 0)]);
    let mut stale = mgr.load(&id).unwrap().unwrap();
    for k in ["k0", "k1", "k2", "k3"] {
        let mut s = mgr.load(&id).unwrap().unwrap();
        assert!(s.remove(k));
        s.commit().unwrap();
    }
    let rec = record::decode(&raw(&mgr, &id).bytes, 1 << 20).unwrap();
    assert_eq!(rec.body.changed.len(), 2);
    assert!(rec.body.floor > 0);
    stale.insert("k0", &1).unwrap();
    assert!(matches!(stale.commit(), Err(Error::Conflict { .. })));
    assert_eq!(get(&mgr, &id, "k0"), None);
}

#[test]
fn exclusive_requests_do_not_block_readers_and_never_conflict() {
    let (mgr, _) = setup(|_| {});
    let id = new_session(&mgr, &[("n", 0)]);
    let mut ex = mgr.load_exclusive(&id).unwrap().unwrap();
    assert!(ex.is_exclusive());
    // Readers proceed.
    let reader = mgr.load(&id).unwrap().unwrap();
    assert_eq!(reader.get::<i64>("n").unwrap(), Some(0));
    drop(reader);
    // A second exclusive request waits (seen here as a timed-out upgradable lock).
    let key = session_lock_id(&SessionId::parse(&id).unwrap());
    assert!(mgr
        .inner
        .table()
        .upgradable_read_timeout(&key, Duration::from_millis(20))
        .is_err());
    // An optimistic commit waits for the exclusive request to finish.
    let m2 = mgr.clone();
    let id2 = id.clone();
    let t = std::thread::spawn(move || {
        m2.transact(&id2, |s| {
            let n = s.get::<i64>("n")?.unwrap_or(0);
            s.insert("n", &(n + 10))
        })
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(30));
    let n = ex.get::<i64>("n").unwrap().unwrap();
    ex.insert("n", &(n + 1)).unwrap();
    ex.commit().unwrap();
    assert!(t.join().unwrap().is_some());
    assert_eq!(get(&mgr, &id, "n"), Some(11));
}

#[test]
fn transact_from_threads_loses_nothing() {
    let (mgr, _) = setup(|_| {});
    let id = new_session(&mgr, &[]);
    std::thread::scope(|sc| {
        for t in 0..4 {
            let mgr = &mgr;
            let id = &id;
            sc.spawn(move || {
                for _ in 0..200 {
                    mgr.transact(id, |s| {
                        let own = format!("t{t}");
                        let a = s.get::<i64>(&own)?.unwrap_or(0);
                        s.insert(own, &(a + 1))?;
                        let b = s.get::<i64>("shared")?.unwrap_or(0);
                        s.insert("shared", &(b + 1))
                    })
                    .unwrap()
                    .expect("session exists");
                }
            });
        }
        sc.spawn(|| {
            for _ in 0..200 {
                let s = mgr.load(&id).unwrap().unwrap();
                let _ = s.get::<i64>("shared").unwrap();
            }
        });
    });
    assert_eq!(get(&mgr, &id, "shared"), Some(800));
    for t in 0..4 {
        assert_eq!(get(&mgr, &id, &format!("t{t}")), Some(200));
    }
}

#[test]
fn thousand_concurrent_reads_cause_one_touch_per_interval() {
    let (mgr, clock) = setup(|c| c.touch_interval = Some(Duration::from_secs(30)));
    let id = new_session(&mgr, &[("a", 1)]);
    for round in 0..3 {
        clock.advance(Duration::from_secs(31));
        let before = mgr.stats();
        // All 1,000 requests are in flight at once (loaded), then end in parallel.
        let sessions: Vec<Session> = (0..1000).map(|_| mgr.load(&id).unwrap().unwrap()).collect();
        let mut chunks: Vec<Vec<Session>> = (0..4).map(|_| Vec::new()).collect();
        for (i, s) in sessions.into_iter().enumerate() {
            chunks[i % 4].push(s);
        }
        std::thread::scope(|sc| {
            for chunk in chunks {
                sc.spawn(move || {
                    for (i, s) in chunk.into_iter().enumerate() {
                        if i % 2 == 0 {
                            s.commit().unwrap();
                        } else {
                            drop(s);
                        }
                    }
                });
            }
        });
        let after = mgr.stats();
        assert_eq!(
            after.touches_written - before.touches_written,
            1,
            "round {round}"
        );
        assert_eq!(after.touches_skipped - before.touches_skipped, 999);
        assert_eq!(after.data_writes, before.data_writes);
    }
}

/// A touch interval at or past the idle timeout would never store the access of a session in
/// use (the stored time is never older than the interval before the session expires), so a
/// busy session would expire: the interval in force is at most half the idle timeout.
#[test]
fn a_touch_interval_past_the_idle_timeout_does_not_expire_a_busy_session() {
    let (mgr, clock) = setup(|c| {
        c.idle_timeout = Duration::from_secs(60);
        c.max_lifetime = Duration::from_secs(3600);
        c.touch_interval = Some(Duration::from_secs(120));
    });
    assert_eq!(
        mgr.config().effective_touch_interval(),
        Duration::from_secs(30)
    );
    let id = new_session(&mgr, &[("a", 1)]);
    for step in 0..30 {
        clock.advance(Duration::from_secs(20));
        let s = mgr.load(&id).unwrap();
        assert!(
            s.is_some(),
            "a session used every 20 s expired at step {step}"
        );
        s.unwrap().commit().unwrap();
    }
}

#[test]
fn last_accessed_never_moves_backwards() {
    let (mgr, clock) = setup(|c| c.touch_interval = Some(Duration::ZERO));
    let id = new_session(&mgr, &[]);
    clock.advance(Duration::from_secs(100));
    let late = mgr.load(&id).unwrap().unwrap();
    clock.set(T0.saturating_add(Duration::from_secs(50)));
    let early = mgr.load(&id).unwrap().unwrap();
    late.commit().unwrap();
    early.commit().unwrap();
    let la = raw(&mgr, &id).meta.last_accessed;
    assert_eq!(la, T0.saturating_add(Duration::from_secs(100)));
    // A data commit from an older request keeps the newer access time too.
    let mut w = mgr.load(&id).unwrap().unwrap();
    w.insert("x", &1).unwrap();
    w.commit().unwrap();
    assert_eq!(raw(&mgr, &id).meta.last_accessed, la);
}

#[test]
fn idle_and_lifetime_expiry_hide_sessions_and_gc_deletes_them() {
    let (mgr, clock) = setup(|c| {
        c.idle_timeout = Duration::from_secs(60);
        c.max_lifetime = Duration::from_secs(300);
        c.touch_interval = Some(Duration::from_secs(1));
    });
    let idle = new_session(&mgr, &[]);
    let active = new_session(&mgr, &[]);
    for _ in 0..4 {
        clock.advance(Duration::from_secs(50));
        mgr.load(&active).unwrap().unwrap().commit().unwrap();
    }
    let r = mgr.gc().unwrap();
    assert_eq!((r.deleted, r.live, r.more), (1, 0, false));
    assert!(mgr.load(&idle).unwrap().is_none(), "idle-expired");
    assert!(mgr.load(&active).unwrap().is_some());
    assert!(mgr
        .store()
        .load(&SessionId::parse(&idle).unwrap(), 1 << 30)
        .unwrap()
        .is_none());
    // Absolute lifetime: still active, but older than 300 s.
    clock.advance(Duration::from_secs(50));
    mgr.load(&active).unwrap().unwrap().commit().unwrap();
    clock.advance(Duration::from_secs(51));
    assert!(mgr.load_exclusive(&active).unwrap().is_none());
    assert!(mgr.load(&active).unwrap().is_none(), "lifetime-expired");
    assert!(mgr.transact(&active, |_| Ok(())).unwrap().is_none());
    // The first request that saw it expired deleted it: nothing left for gc.
    assert_eq!(mgr.stats().expired_removed, 1);
    assert_eq!(mgr.gc().unwrap().deleted, 0);
}

#[test]
fn gc_works_in_bounded_batches() {
    let (mgr, clock) = setup(|c| {
        c.gc_batch = 3;
        c.idle_timeout = Duration::from_secs(60);
    });
    for _ in 0..7 {
        new_session(&mgr, &[]);
    }
    clock.advance(Duration::from_secs(61));
    let mut total = 0;
    let mut calls = 0;
    loop {
        let r = mgr.gc().unwrap();
        assert!(r.deleted <= 3);
        total += r.deleted;
        calls += 1;
        if !r.more {
            break;
        }
    }
    assert_eq!(total, 7);
    assert_eq!(calls, 3);
}

#[test]
fn commit_after_expiry_during_request_reports_gone() {
    let (mgr, clock) = setup(|c| c.max_lifetime = Duration::from_secs(100));
    let id = new_session(&mgr, &[]);
    let mut s = mgr.load(&id).unwrap().unwrap();
    clock.advance(Duration::from_secs(101));
    s.insert("x", &1).unwrap();
    assert!(matches!(s.commit(), Err(Error::SessionGone)));
}

#[test]
fn cycle_id_moves_data_and_kills_the_old_id() {
    let (mgr, _) = setup(|_| {});
    let id = new_session(&mgr, &[("a", 1)]);
    let mut concurrent = mgr.load(&id).unwrap().unwrap();
    let mut s = mgr.load(&id).unwrap().unwrap();
    s.insert("user", &7).unwrap();
    s.cycle_id().unwrap();
    let new_id = s.id().to_string();
    assert_ne!(new_id, id);
    assert!(mgr.load(&id).unwrap().is_none());
    s.commit().unwrap();
    assert_eq!(get(&mgr, &new_id, "a"), Some(1));
    assert_eq!(get(&mgr, &new_id, "user"), Some(7));
    concurrent.insert("b", &2).unwrap();
    assert!(matches!(concurrent.commit(), Err(Error::SessionGone)));
    // Exclusive sessions keep their exclusivity on the new ID.
    let mut ex = mgr.load_exclusive(&new_id).unwrap().unwrap();
    ex.cycle_id().unwrap();
    let key = session_lock_id(ex.id());
    assert!(mgr
        .inner
        .table()
        .try_upgradable_read(&key)
        .unwrap()
        .is_none());
    ex.insert("c", &3).unwrap();
    let newest = ex.id().to_string();
    ex.commit().unwrap();
    assert_eq!(get(&mgr, &newest, "c"), Some(3));
    assert!(mgr.load(&new_id).unwrap().is_none());
}

#[test]
fn delete_and_invalidate_really_delete() {
    let (mgr, _) = setup(|_| {});
    let a = new_session(&mgr, &[("x", 1)]);
    let b = new_session(&mgr, &[("x", 1)]);
    assert!(mgr.delete(&a).unwrap());
    assert!(!mgr.delete(&a).unwrap());
    assert!(mgr.load(&a).unwrap().is_none());
    let s = mgr.load(&b).unwrap().unwrap();
    s.invalidate().unwrap();
    assert!(mgr.load(&b).unwrap().is_none());
    assert!(mgr
        .store()
        .load(&SessionId::parse(&b).unwrap(), 1 << 30)
        .unwrap()
        .is_none());
}

#[test]
fn hostile_ids_are_never_adopted() {
    let (mgr, _) = setup(|_| {});
    let unknown = SessionId::generate().unwrap();
    for id in [
        "",
        "../x",
        "A/../../../../../../../../../etc/passwd",
        unknown.as_str(),
    ] {
        assert!(mgr.load(id).unwrap().is_none());
        assert!(mgr.load_exclusive(id).unwrap().is_none());
        assert!(!mgr.delete(id).unwrap());
        assert!(mgr.transact(id, |_| Ok(())).unwrap().is_none());
    }
    assert_eq!(mgr.stats().data_writes, 0);
}

#[test]
fn corrupt_records_are_invalidated_or_reported() {
    for policy in [CorruptPolicy::Invalidate, CorruptPolicy::Error] {
        let (mgr, _) = setup(|c| c.on_corrupt = policy);
        let id = new_session(&mgr, &[("a", 1)]);
        let sid = SessionId::parse(&id).unwrap();
        let mut st = raw(&mgr, &id);
        let last = st.bytes.len() - 2;
        st.bytes[last] ^= 0x20;
        assert!(mgr.store().save(&sid, Some(st.meta.version), &st).unwrap());
        let r = mgr.load(&id);
        match policy {
            CorruptPolicy::Invalidate => {
                assert!(r.unwrap().is_none());
                assert!(mgr.store().load(&sid, 1 << 30).unwrap().is_none());
                assert_eq!(mgr.stats().corrupt_invalidated, 1);
            }
            CorruptPolicy::Error => {
                assert!(matches!(r, Err(Error::SessionCorrupt(_))));
                assert!(mgr.store().load(&sid, 1 << 30).unwrap().is_some());
                assert!(matches!(
                    mgr.load_exclusive(&id),
                    Err(Error::SessionCorrupt(_))
                ));
                assert_eq!(mgr.gc().unwrap().corrupt, 0, "not expired: gc leaves it");
            }
        }
    }
}

// A writer that dies holding the lock needs a real process death: see
// tests/session_multiprocess.rs (`killed_writer_...`).

#[test]
fn too_large_commit_writes_nothing() {
    let (mgr, _) = setup(|c| c.max_record_size = 1024);
    let id = new_session(&mgr, &[("a", 1)]);
    let v = raw(&mgr, &id).meta.version;
    let mut s = mgr.load(&id).unwrap().unwrap();
    // One value over the limit is refused at once; values over it together, at commit.
    assert!(matches!(
        s.insert("big", &"x".repeat(2000)),
        Err(Error::TooLarge { limit: 1024, .. })
    ));
    s.insert("half1", &"x".repeat(600)).unwrap();
    s.insert("half2", &"x".repeat(600)).unwrap();
    assert!(matches!(
        s.commit(),
        Err(Error::TooLarge { limit: 1024, .. })
    ));
    assert_eq!(raw(&mgr, &id).meta.version, v);
}

#[test]
fn finished_sessions_refuse_further_use() {
    let (mgr, _) = setup(|_| {});
    let id = new_session(&mgr, &[]);
    let mut s = mgr.load(&id).unwrap().unwrap();
    s.finished = true;
    assert!(matches!(s.cycle_id(), Err(Error::SessionFinished)));
    assert!(matches!(s.commit(), Err(Error::SessionFinished)));
}

#[test]
fn sessions_move_between_threads_and_managers_are_shared() {
    fn send<T: Send>(t: T) -> T {
        t
    }
    fn sync<T: Send + Sync>(t: &T) -> &T {
        t
    }
    let (mgr, _) = setup(|_| {});
    let id = new_session(&mgr, &[("a", 1)]);
    let mgr = sync(&mgr).clone();
    let mut s = send(mgr.load_exclusive(&id).unwrap().unwrap());
    let s = std::thread::spawn(move || {
        s.insert("a", &2).unwrap();
        s
    })
    .join()
    .unwrap();
    s.commit().unwrap();
    assert_eq!(get(&mgr, &id, "a"), Some(2));
}

#[test]
fn try_load_cached_answers_only_from_the_cache_with_every_guarantee_of_load() {
    let (mgr, clock) = setup(|c| c.touch_interval = Some(Duration::from_secs(30)));
    let id = new_session(&mgr, &[("a", 1)]);
    assert!(mgr.try_load_cached("not an id").unwrap().is_none());
    // Not cached yet: "ask load", and no miss counted (the load that follows counts it).
    assert!(mgr.try_load_cached(&id).unwrap().is_none());
    assert_eq!(mgr.stats().cache_misses, 0);
    drop(mgr.load(&id).unwrap().unwrap());
    let st = mgr.stats();
    assert_eq!(st.cache_misses, 1);
    let s = mgr.try_load_cached(&id).unwrap().unwrap();
    assert_eq!(s.get::<i64>("a").unwrap(), Some(1));
    assert!(
        !s.access_write_due(),
        "just accessed: the touch is coalesced"
    );
    s.commit().unwrap();
    let st2 = mgr.stats();
    assert_eq!(
        (st2.cache_hits, st2.cache_misses, st2.loads),
        (st.cache_hits + 1, 1, st.loads + 1)
    );
    // A commit drops the cached copy: not served until a load has read the new record.
    let mut w = mgr.load(&id).unwrap().unwrap();
    w.insert("a", &2).unwrap();
    w.commit().unwrap();
    assert!(mgr.try_load_cached(&id).unwrap().is_none());
    assert_eq!(get(&mgr, &id, "a"), Some(2));
    let s = mgr.try_load_cached(&id).unwrap().unwrap();
    assert_eq!(s.get::<i64>("a").unwrap(), Some(2));
    drop(s);
    // Past the touch interval the caller is told that ending it writes the access time.
    clock.advance(Duration::from_secs(31));
    let s = mgr.try_load_cached(&id).unwrap().unwrap();
    assert!(s.access_write_due());
    s.commit().unwrap();
    assert_eq!(mgr.stats().touches_written, 1);
    // Expiry is re-checked at the call: an idle session is never served from the cache.
    clock.advance(Duration::from_secs(3600));
    assert!(mgr.try_load_cached(&id).unwrap().is_none());
    assert!(mgr.load(&id).unwrap().is_none());
}
