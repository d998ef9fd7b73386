//! The cache against a sequential model: `get`, `set`, `remove`, `clear`, `get_or_create`, `gc`
//! and the passing of time (a manual clock), on the memory and the file store.
//!
//! The model is a map from (namespace, key) to (value, fresh until). Sequentially nobody else
//! is recreating, so `get_or_create` returns the fresh value or runs `create`; a stale value is
//! never a `get` hit; `gc` never changes what is visible.

use locktable::cache::{Cache, CacheConfig, IdKey};
use locktable::session::{Clock, FileStore, ManualClock, MemoryStore, Store, Timestamp};
use locktable::{Error, LockTable, TableOptions};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Set(usize, usize, u32, u64),
    Get(usize, usize),
    Remove(usize, usize),
    Clear(usize),
    GetOrCreate(usize, usize, u32, u64),
    Gc,
    Advance(u64),
}

const NAMESPACES: [&str; 2] = ["a", "b"];
const KEYS: [&str; 3] = ["x", "y", ""];

fn op() -> impl Strategy<Value = Op> {
    let ns = 0..NAMESPACES.len();
    let key = 0..KEYS.len();
    prop_oneof![
        2 => (ns.clone(), key.clone(), any::<u32>(), 0u64..3_000)
            .prop_map(|(n, k, v, t)| Op::Set(n, k, v, t)),
        3 => (ns.clone(), key.clone()).prop_map(|(n, k)| Op::Get(n, k)),
        1 => (ns.clone(), key.clone()).prop_map(|(n, k)| Op::Remove(n, k)),
        1 => ns.clone().prop_map(Op::Clear),
        2 => (ns, key, any::<u32>(), 0u64..3_000).prop_map(|(n, k, v, t)| Op::GetOrCreate(n, k, v, t)),
        1 => Just(Op::Gc),
        2 => (0u64..2_000).prop_map(Op::Advance),
    ]
}

type Model = HashMap<(usize, usize), (u32, Timestamp)>;

fn fresh(model: &Model, now: Timestamp, n: usize, k: usize) -> Option<u32> {
    model
        .get(&(n, k))
        .filter(|(_, until)| now < *until)
        .map(|(v, _)| *v)
}

fn run(store: Arc<dyn Store>, ops: &[Op]) -> Result<(), TestCaseError> {
    let clock = Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let cache = Cache::new(
        Arc::new(table),
        store,
        IdKey::generate().unwrap(),
        CacheConfig {
            stale_grace: Duration::from_millis(500),
            clock: clock.clone(),
            ..CacheConfig::default()
        },
    );
    let mut model = Model::new();
    for op in ops {
        let now = clock.now();
        match *op {
            Op::Set(n, k, v, ttl) => {
                cache
                    .region(NAMESPACES[n])
                    .set(KEYS[k], &v, Duration::from_millis(ttl))
                    .unwrap();
                model.insert((n, k), (v, now.saturating_add(Duration::from_millis(ttl))));
            }
            Op::Get(n, k) => {
                let got = cache.region(NAMESPACES[n]).get::<u32>(KEYS[k]).unwrap();
                prop_assert_eq!(got, fresh(&model, now, n, k), "{:?}", op);
            }
            Op::Remove(n, k) => {
                let existed = cache.region(NAMESPACES[n]).remove(KEYS[k]).unwrap();
                let was_fresh = fresh(&model, now, n, k).is_some();
                prop_assert!(existed || !was_fresh, "a fresh entry was not removed");
                model.remove(&(n, k));
            }
            Op::Clear(n) => {
                cache.clear(NAMESPACES[n]).unwrap();
                model.retain(|(mn, _), _| *mn != n);
            }
            Op::GetOrCreate(n, k, v, ttl) => {
                let mut ran = false;
                let got: u32 = cache
                    .region(NAMESPACES[n])
                    .get_or_create(KEYS[k], Duration::from_millis(ttl), || {
                        ran = true;
                        Ok::<_, Error>(v)
                    })
                    .unwrap();
                match fresh(&model, now, n, k) {
                    Some(old) => {
                        prop_assert!(!ran, "create ran on a fresh value");
                        prop_assert_eq!(got, old);
                    }
                    None => {
                        prop_assert!(ran, "no fresh value, and create did not run");
                        prop_assert_eq!(got, v);
                        model.insert((n, k), (v, now.saturating_add(Duration::from_millis(ttl))));
                    }
                }
            }
            Op::Gc => {
                cache.gc(1_000).unwrap();
            }
            Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn memory_store_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(Arc::new(MemoryStore::new()), &ops)?;
    }
}

proptest! {
    // Each case creates a directory of files: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn file_store_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap().with_fsync(false);
        run(Arc::new(store), &ops)?;
    }
}
