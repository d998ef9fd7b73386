//! Unit tests of the cache protocol on a memory store and a manual clock.

use super::*;
use crate::session::{ManualClock, MemoryStore, StoredSession};
use std::sync::mpsc;

struct Fixture {
    cache: Cache,
    clock: Arc<ManualClock>,
    table: Arc<LockTable>,
    store: Arc<MemoryStore>,
}

fn fixture(cfg: CacheConfig) -> Fixture {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    let table = Arc::new(LockTable::anonymous(&TableOptions::default()).unwrap());
    let store = Arc::new(MemoryStore::new());
    let cache = Cache::new(
        table.clone(),
        store.clone(),
        IdKey::from_bytes([3; ID_KEY_LEN]),
        CacheConfig {
            clock: clock.clone(),
            ..cfg
        },
    );
    Fixture {
        cache,
        clock,
        table,
        store,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn values_are_fresh_for_their_ttl_then_stale_then_dead() {
    let f = fixture(CacheConfig {
        stale_grace: secs(5),
        ..CacheConfig::default()
    });
    let r = f.cache.region("r");
    r.set("k", &"v1", secs(10)).unwrap();
    assert_eq!(r.get::<String>("k").unwrap().as_deref(), Some("v1"));
    f.clock.advance(secs(10));
    assert_eq!(
        r.get::<String>("k").unwrap(),
        None,
        "stale is not a get hit"
    );
    assert!(matches!(f.cache.lookup("r", "k").unwrap(), Found::Stale(_)));
    f.clock.advance(secs(5));
    assert!(matches!(f.cache.lookup("r", "k").unwrap(), Found::Absent));
    assert_eq!(f.cache.gc(100).unwrap(), (1, false));
}

#[test]
fn remove_and_clear_affect_only_their_keys_and_namespace() {
    let f = fixture(CacheConfig::default());
    let (a, b) = (f.cache.region("a"), f.cache.region("b"));
    a.set("x", &1, secs(60)).unwrap();
    a.set("y", &2, secs(60)).unwrap();
    b.set("x", &3, secs(60)).unwrap();
    assert!(a.remove("y").unwrap());
    assert!(!a.remove("y").unwrap());
    assert_eq!(a.get::<i32>("x").unwrap(), Some(1));
    a.clear().unwrap();
    assert_eq!(a.get::<i32>("x").unwrap(), None);
    assert_eq!(b.get::<i32>("x").unwrap(), Some(3));
    a.set("x", &4, secs(60)).unwrap();
    assert_eq!(a.get::<i32>("x").unwrap(), Some(4), "usable after a clear");
}

#[test]
fn a_lost_generation_entry_acts_as_a_clear() {
    let f = fixture(CacheConfig::default());
    let r = f.cache.region("r");
    r.set("k", &1, secs(60)).unwrap();
    let gen_id = f.cache.inner.key.derive(Kind::Generation, "r", "");
    assert!(f.store.delete(&gen_id).unwrap());
    assert_eq!(r.get::<i32>("k").unwrap(), None);
    r.set("j", &2, secs(60)).unwrap();
    assert_eq!(r.get::<i32>("k").unwrap(), None, "never revived");
    assert_eq!(r.get::<i32>("j").unwrap(), Some(2));
}

#[test]
fn corrupt_and_oversize_entries_are_counted_misses_and_are_replaced_by_set() {
    let f = fixture(CacheConfig {
        max_entry_size: 400,
        ..CacheConfig::default()
    });
    let r = f.cache.region("r");
    r.set("k", &"v", secs(60)).unwrap();
    let id = f.cache.inner.key.derive(Kind::Value, "r", "k");
    let mut s = f.store.load(&id, usize::MAX).unwrap().unwrap();
    let n = s.bytes.len();
    s.bytes[n - 3] ^= 1;
    let v = s.meta.version;
    assert!(f.store.save(&id, Some(v), &s).unwrap());
    assert_eq!(r.get::<String>("k").unwrap(), None);
    assert_eq!(f.cache.stats().corrupt, 1);
    r.set("k", &"w", secs(60)).unwrap();
    assert_eq!(r.get::<String>("k").unwrap().as_deref(), Some("w"));
    // Over the limit: refused when written, a miss when found (written by a laxer handle).
    let big = "x".repeat(500);
    assert!(matches!(
        r.set("k", &big, secs(60)),
        Err(Error::TooLarge { limit: 400, .. })
    ));
    let lax = Cache::new(
        f.table.clone(),
        f.store.clone(),
        IdKey::from_bytes([3; ID_KEY_LEN]),
        CacheConfig {
            clock: f.clock.clone(),
            ..CacheConfig::default()
        },
    );
    lax.region("r").set("k", &big, secs(60)).unwrap();
    assert_eq!(r.get::<String>("k").unwrap(), None);
    assert_eq!(f.cache.stats().corrupt, 2);
    // Garbage where a header should be: also a miss, and set replaces it.
    let junk = StoredSession {
        meta: s.meta,
        bytes: b"not a record".to_vec(),
    };
    f.store.delete(&id).unwrap();
    assert!(f.store.save(&id, None, &junk).unwrap());
    assert_eq!(r.get::<String>("k").unwrap(), None);
    r.set("k", &"z", secs(60)).unwrap();
    assert_eq!(r.get::<String>("k").unwrap().as_deref(), Some("z"));
}

#[test]
fn an_entry_under_another_keys_id_is_a_collision_miss() {
    let f = fixture(CacheConfig::default());
    let r = f.cache.region("r");
    r.set("a", &"value of a", secs(60)).unwrap();
    let a = f.cache.inner.key.derive(Kind::Value, "r", "a");
    let b = f.cache.inner.key.derive(Kind::Value, "r", "b");
    let s = f.store.load(&a, usize::MAX).unwrap().unwrap();
    assert!(f.store.save(&b, None, &s).unwrap());
    assert_eq!(r.get::<String>("b").unwrap(), None);
    assert_eq!(f.cache.stats().collisions, 1);
    let got: String = r
        .get_or_create("b", secs(60), || Ok::<_, Error>("value of b".into()))
        .unwrap();
    assert_eq!(got, "value of b");
    assert_eq!(r.get::<String>("a").unwrap().as_deref(), Some("value of a"));
}

#[test]
fn a_value_of_another_type_is_a_typed_error() {
    let f = fixture(CacheConfig::default());
    let r = f.cache.region("r");
    r.set("k", &"text", secs(60)).unwrap();
    assert!(matches!(r.get::<u64>("k"), Err(Error::Serialize(_))));
}

/// JSON has no NaN: `serde_json` turns it into `null`, which no longer reads back as an `f64`.
/// Such a value used to be stored and returned once; every later call then failed with
/// `Error::Serialize` for the whole time-to-live, without creating again.
#[test]
fn a_created_value_that_does_not_read_back_is_an_error_and_is_not_stored() {
    let f = fixture(CacheConfig::default());
    let r = f.cache.region("r");
    let e = r
        .get_or_create::<f64, Error, _>("k", secs(60), || Ok(f64::NAN))
        .unwrap_err();
    assert!(matches!(e, Error::Serialize(_)), "{e:?}");
    assert!(matches!(f.cache.lookup("r", "k").unwrap(), Found::Absent));
    let name = f.cache.claim_name("r", "k");
    assert!(f.table.try_claim(&name).unwrap().is_some(), "released");
    let v: f64 = r
        .get_or_create("k", secs(60), || Ok::<_, Error>(1.5))
        .unwrap();
    assert_eq!(v, 1.5);
    assert_eq!(r.get::<f64>("k").unwrap(), Some(1.5));
}

#[test]
fn get_or_create_creates_once_then_hits() {
    let f = fixture(CacheConfig::default());
    let r = f.cache.region("r");
    let mut runs = 0;
    for _ in 0..3 {
        let v: u32 = r
            .get_or_create("k", secs(60), || {
                runs += 1;
                Ok::<_, Error>(7)
            })
            .unwrap();
        assert_eq!(v, 7);
    }
    assert_eq!(runs, 1);
    let st = f.cache.stats();
    assert_eq!((st.creations, st.hits, st.misses), (1, 2, 1));
}

#[test]
fn a_failing_or_panicking_creator_releases_its_claim_and_the_next_call_creates() {
    let f = fixture(CacheConfig::default());
    let r = f.cache.region("r");
    let e = r
        .get_or_create::<u32, Error, _>("k", secs(60), || Err(Error::SessionGone))
        .unwrap_err();
    assert!(matches!(e, Error::SessionGone));
    let name = f.cache.claim_name("r", "k");
    assert!(f.table.try_claim(&name).unwrap().is_some(), "released");
    let r2 = r.clone();
    let panicked = std::thread::spawn(move || {
        r2.get_or_create::<u32, Error, _>("k", secs(60), || panic!("creator bug"))
    })
    .join();
    assert!(panicked.is_err());
    assert!(f.table.try_claim(&name).unwrap().is_some(), "released");
    let v: u32 = r
        .get_or_create("k", secs(60), || Ok::<_, Error>(9))
        .unwrap();
    assert_eq!(v, 9);
    assert_eq!(f.cache.stats().create_failures, 1);
}

#[test]
fn a_waiter_gives_up_with_a_timeout_and_never_runs_create() {
    let f = fixture(CacheConfig {
        wait_timeout: Duration::from_millis(50),
        ..CacheConfig::default()
    });
    let r = f.cache.region("r");
    let held = f.table.try_claim(&f.cache.claim_name("r", "k")).unwrap();
    let e = r
        .get_or_create::<u32, Error, _>("k", secs(60), || panic!("must not run"))
        .unwrap_err();
    assert!(matches!(e, Error::Timeout), "{e:?}");
    let st = f.cache.stats();
    assert_eq!((st.waits, st.timeouts, st.creations), (1, 1, 0));
    drop(held);
}

#[test]
fn a_stale_value_is_served_without_waiting_while_another_worker_recreates() {
    let f = fixture(CacheConfig {
        stale_grace: secs(30),
        wait_timeout: secs(60),
        ..CacheConfig::default()
    });
    let r = f.cache.region("r");
    r.set("k", &"old", secs(10)).unwrap();
    f.clock.advance(secs(11));
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let creator = {
        let r = r.clone();
        std::thread::spawn(move || {
            r.get_or_create::<String, Error, _>("k", secs(10), || {
                entered_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Ok("new".into())
            })
        })
    };
    entered_rx.recv().unwrap();
    // The creator is blocked until this returns: a wait would end only in the timeout.
    let got: String = r
        .get_or_create("k", secs(10), || -> Result<String> {
            panic!("second creator")
        })
        .unwrap();
    assert_eq!(got, "old");
    release_tx.send(()).unwrap();
    assert_eq!(creator.join().unwrap().unwrap(), "new");
    assert_eq!(r.get::<String>("k").unwrap().as_deref(), Some("new"));
    let st = f.cache.stats();
    assert_eq!((st.stale_served, st.creations, st.waits), (1, 1, 0));
}

#[test]
fn with_no_grace_others_wait_for_the_creator_and_read_its_value() {
    let f = fixture(CacheConfig {
        stale_grace: Duration::ZERO,
        ..CacheConfig::default()
    });
    let r = f.cache.region("r");
    r.set("k", &"old", secs(10)).unwrap();
    f.clock.advance(secs(11));
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let runs = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (r, b, runs) = (r.clone(), barrier.clone(), runs.clone());
            std::thread::spawn(move || {
                b.wait();
                r.get_or_create::<String, Error, _>("k", secs(10), || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(100));
                    Ok("new".into())
                })
                .unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), "new");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn gc_leaves_sessions_with_idle_expiry_alone() {
    let f = fixture(CacheConfig {
        stale_grace: Duration::ZERO,
        ..CacheConfig::default()
    });
    let mgr = crate::session::SessionManager::new(
        LockTable::anonymous(&TableOptions::default()).unwrap(),
        SharedStore(f.store.clone()),
        crate::session::SessionConfig {
            clock: f.clock.clone(),
            ..Default::default()
        },
    );
    let mut s = mgr.create().unwrap();
    s.insert("u", &1).unwrap();
    let sid = s.id().to_string();
    s.commit().unwrap();
    f.cache.region("r").set("k", &1, secs(1)).unwrap();
    f.clock.advance(secs(2));
    assert_eq!(f.cache.gc(100).unwrap().0, 1);
    assert!(mgr.load(&sid).unwrap().is_some());
}

/// A store handle shared with the test (the manager takes its store by value).
#[derive(Debug)]
struct SharedStore(Arc<MemoryStore>);

impl Store for SharedStore {
    fn capabilities(&self) -> crate::session::Capabilities {
        self.0.capabilities()
    }
    fn load(&self, id: &SessionId, max: usize) -> Result<Option<StoredSession>> {
        self.0.load(id, max)
    }
    fn save(&self, id: &SessionId, e: Option<u64>, n: &StoredSession) -> Result<bool> {
        self.0.save(id, e, n)
    }
    fn meta(&self, id: &SessionId) -> Result<Option<crate::session::SessionMeta>> {
        self.0.meta(id)
    }
    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        c: &Cutoffs,
    ) -> Result<crate::session::Touch> {
        self.0.touch(id, at, coalesce, c)
    }
    fn delete(&self, id: &SessionId) -> Result<bool> {
        self.0.delete(id)
    }
    fn remove_expired(&self, id: &SessionId, c: &Cutoffs) -> Result<bool> {
        self.0.remove_expired(id, c)
    }
    fn scan_expired(&self, c: &Cutoffs, budget: usize) -> Result<crate::session::ExpiredScan> {
        self.0.scan_expired(c, budget)
    }
}

#[test]
fn when_the_creator_fails_one_waiter_takes_over_and_the_others_read_its_value() {
    let f = fixture(CacheConfig::default());
    let r = f.cache.region("r");
    let (entered_tx, entered_rx) = mpsc::channel();
    let (fail_tx, fail_rx) = mpsc::channel::<()>();
    let failing = {
        let r = r.clone();
        std::thread::spawn(move || {
            r.get_or_create::<String, Error, _>("k", secs(60), || {
                entered_tx.send(()).unwrap();
                fail_rx.recv().unwrap();
                Err(Error::SessionGone)
            })
        })
    };
    entered_rx.recv().unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let waiters: Vec<_> = (0..6)
        .map(|_| {
            let (r, runs) = (r.clone(), runs.clone());
            std::thread::spawn(move || {
                r.get_or_create::<String, Error, _>("k", secs(60), || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok("second".into())
                })
                .unwrap()
            })
        })
        .collect();
    // Every waiter is parked on the claim (or about to be) before the creator fails.
    while f.cache.stats().waits < 6 {
        std::thread::sleep(Duration::from_millis(1));
    }
    fail_tx.send(()).unwrap();
    assert!(matches!(failing.join().unwrap(), Err(Error::SessionGone)));
    for w in waiters {
        assert_eq!(w.join().unwrap(), "second");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "exactly one waiter took over"
    );
    assert_eq!(f.cache.stats().create_failures, 1);
}

/// A memory store that runs a hook once, right after the first `load` that finds nothing.
struct HookAfterMiss {
    inner: Arc<MemoryStore>,
    #[allow(clippy::type_complexity)]
    hook: parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl fmt::Debug for HookAfterMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookAfterMiss").finish_non_exhaustive()
    }
}

impl Store for HookAfterMiss {
    fn capabilities(&self) -> crate::session::Capabilities {
        self.inner.capabilities()
    }
    fn load(&self, id: &SessionId, max: usize) -> Result<Option<StoredSession>> {
        let r = self.inner.load(id, max)?;
        if r.is_none() {
            if let Some(hook) = self.hook.lock().take() {
                hook();
            }
        }
        Ok(r)
    }
    fn save(&self, id: &SessionId, e: Option<u64>, n: &StoredSession) -> Result<bool> {
        self.inner.save(id, e, n)
    }
    fn meta(&self, id: &SessionId) -> Result<Option<crate::session::SessionMeta>> {
        self.inner.meta(id)
    }
    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        c: &Cutoffs,
    ) -> Result<crate::session::Touch> {
        self.inner.touch(id, at, coalesce, c)
    }
    fn delete(&self, id: &SessionId) -> Result<bool> {
        self.inner.delete(id)
    }
    fn remove_expired(&self, id: &SessionId, c: &Cutoffs) -> Result<bool> {
        self.inner.remove_expired(id, c)
    }
    fn scan_expired(&self, c: &Cutoffs, budget: usize) -> Result<crate::session::ExpiredScan> {
        self.inner.scan_expired(c, budget)
    }
}

/// Regression: the first writer of a namespace found no generation, then wrote one by a
/// compare-and-swap against whatever version `meta` showed *then*. A writer that created the
/// generation in between (and stored its value under it) had its generation replaced: its
/// value was silently invalidated, and the waiters of its key created it again.
#[test]
fn racing_first_writers_of_a_namespace_agree_on_one_generation() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    let table = Arc::new(LockTable::anonymous(&TableOptions::default()).unwrap());
    let mem = Arc::new(MemoryStore::new());
    let cfg = || CacheConfig {
        clock: clock.clone(),
        ..CacheConfig::default()
    };
    let other = Cache::new(
        table.clone(),
        mem.clone(),
        IdKey::from_bytes([3; ID_KEY_LEN]),
        cfg(),
    );
    let hooked = Arc::new(HookAfterMiss {
        inner: mem.clone(),
        hook: parking_lot::Mutex::new(None),
    });
    let cache = Cache::new(
        table,
        hooked.clone(),
        IdKey::from_bytes([3; ID_KEY_LEN]),
        cfg(),
    );
    // `cache` finds the namespace without a generation; before it writes one, `other` creates
    // the generation and stores "a" under it.
    *hooked.hook.lock() = Some(Box::new(move || {
        other.region("r").set("a", &1u32, secs(60)).unwrap();
    }));
    cache.region("r").set("b", &2u32, secs(60)).unwrap();
    assert!(hooked.hook.lock().is_none(), "the hook ran");
    assert_eq!(cache.region("r").get::<u32>("b").unwrap(), Some(2));
    assert_eq!(
        cache.region("r").get::<u32>("a").unwrap(),
        Some(1),
        "the other writer's value survives"
    );
}
