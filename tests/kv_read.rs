//! What a read-only request costs the key-value store (LMDB): with the hot-session cache on, a
//! hit calls the store not at all (so the cached read costs the same on every store that names
//! a place for the cache's counters: the store cannot make it cheaper or dearer); with the cache
//! off, it is one `load_head` per request and nothing else. The store is the real `KvStore`,
//! seen through a wrapper that counts the calls of each `Store` method and forwards them.
#![cfg(feature = "lmdb")]

use locktable::session::{
    Capabilities, ChangeCounters, ChangedValue, Cutoffs, ExpiredScan, KvStore, SessionConfig,
    SessionId, SessionManager, SessionMeta, Store, Stored, StoredHead, StoredSession, Timestamp,
    Touch,
};
use locktable::{LockTable, Result, TableOptions};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Calls = Arc<Mutex<BTreeMap<&'static str, u64>>>;

#[derive(Debug)]
struct Counting {
    inner: KvStore,
    calls: Calls,
}

impl Counting {
    fn call(&self, name: &'static str) {
        *self.calls.lock().unwrap().entry(name).or_default() += 1;
    }
}

impl Store for Counting {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn change_counters(&self) -> ChangeCounters {
        self.inner.change_counters()
    }
    fn load(&self, id: &SessionId, max: usize) -> Result<Option<StoredSession>> {
        self.call("load");
        self.inner.load(id, max)
    }
    fn save(&self, id: &SessionId, e: Option<u64>, new: &StoredSession) -> Result<bool> {
        self.call("save");
        self.inner.save(id, e, new)
    }
    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        self.call("meta");
        self.inner.meta(id)
    }
    fn touch(&self, id: &SessionId, at: Timestamp, c: Duration, cut: &Cutoffs) -> Result<Touch> {
        self.call("touch");
        self.inner.touch(id, at, c, cut)
    }
    fn last_accessed(&self, id: &SessionId) -> Result<Option<Timestamp>> {
        self.call("last_accessed");
        self.inner.last_accessed(id)
    }
    fn delete(&self, id: &SessionId) -> Result<bool> {
        self.call("delete");
        self.inner.delete(id)
    }
    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool> {
        self.call("remove_expired");
        self.inner.remove_expired(id, cutoffs)
    }
    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> Result<ExpiredScan> {
        self.call("scan_expired");
        self.inner.scan_expired(cutoffs, budget)
    }
    fn cleanup(&self) -> Result<usize> {
        self.call("cleanup");
        self.inner.cleanup()
    }
    fn load_head(&self, id: &SessionId, max: usize, up_to: u64) -> Result<Option<Stored>> {
        self.call("load_head");
        self.inner.load_head(id, max, up_to)
    }
    fn load_values(
        &self,
        id: &SessionId,
        version: u64,
        keys: &[&str],
    ) -> Result<Option<Vec<Option<Vec<u8>>>>> {
        self.call("load_values");
        self.inner.load_values(id, version, keys)
    }
    fn save_delta(
        &self,
        id: &SessionId,
        e: Option<u64>,
        new: &StoredHead,
        changed: &[ChangedValue],
    ) -> Result<bool> {
        self.call("save_delta");
        self.inner.save_delta(id, e, new, changed)
    }
}

/// A manager on a counted `KvStore` in `dir` and one stored session of a few keys.
fn manager(dir: &std::path::Path, cache_bytes: usize) -> (SessionManager, String, Calls) {
    let calls = Calls::default();
    let store = Counting {
        inner: KvStore::open(dir.join("sessions.kv")).unwrap(),
        calls: calls.clone(),
    };
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    let cfg = SessionConfig {
        fsync: false,
        cache_bytes,
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new(table, store, cfg);
    let mut s = mgr.create().unwrap();
    s.insert("user_id", &4242u64).unwrap();
    s.insert("name", &"Ann").unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    (mgr, id, calls)
}

fn read(mgr: &SessionManager, id: &str) {
    let s = mgr.load(id).unwrap().expect("session exists");
    assert_eq!(s.get::<u64>("user_id").unwrap(), Some(4242));
    s.commit().unwrap();
}

#[test]
fn a_cached_read_request_on_kv_does_not_call_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (mgr, id, calls) = manager(dir.path(), 64 << 20);
    read(&mgr, &id); // fills the cache
    calls.lock().unwrap().clear();
    let hits = mgr.stats().cache_hits;
    for _ in 0..1000 {
        read(&mgr, &id);
    }
    assert_eq!(mgr.stats().cache_hits - hits, 1000);
    assert_eq!(
        *calls.lock().unwrap(),
        BTreeMap::new(),
        "store calls on hits"
    );
}

#[test]
fn an_uncached_read_request_on_kv_is_one_load_head() {
    let dir = tempfile::tempdir().unwrap();
    let (mgr, id, calls) = manager(dir.path(), 0);
    calls.lock().unwrap().clear();
    for _ in 0..100 {
        read(&mgr, &id);
    }
    let want: BTreeMap<&str, u64> = [("load_head", 100)].into();
    assert_eq!(*calls.lock().unwrap(), want);
}
