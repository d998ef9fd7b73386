//! Model-based tests of the session layer (issue 4, item 10).
//!
//! `interleaved_requests_match_the_reference`: several clients' requests (load, get, insert,
//! remove, commit, end without commit, cycle, clock steps, gc, re-create) are interleaved in an
//! order chosen by proptest and checked step by step against a sequential reference: reads see
//! the load-time snapshot plus the request's own changes; a commit succeeds exactly when no other
//! commit changed one of its keys (written, or read with `get_for_update`) since its load, and
//! then applies only its delta; the stored
//! last-accessed time is the maximum of the recorded accesses; an expired session is never
//! returned and never revived.
//!
//! `threaded_increments_lose_nothing`: threads run random mixes of optimistic, exclusive and
//! read-only requests on shared counters; every counter equals its number of successful commits.

use locktable::session::{
    record, Expiry, ManualClock, MemoryStore, Session, SessionConfig, SessionId, SessionManager,
    Timestamp,
};
use locktable::{Error, LockTable, TableOptions};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const T0: Timestamp = Timestamp(1_700_000_000_000);
const IDLE_MS: u64 = 60_000;
const LIFE_MS: u64 = 300_000;
const CLIENTS: usize = 3;
const KEYS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    Load(usize),
    Get(usize, usize),
    /// A read that takes part in the commit's conflict check (write-skew protection).
    GetForUpdate(usize, usize),
    Insert(usize, usize, i64),
    Remove(usize, usize),
    Commit(usize),
    End(usize),
    Cycle(usize),
    Advance(u64),
    /// `Session::set_expiry` with one of the rules of `rule()`.
    SetExpiry(usize, usize),
    Gc,
    Create,
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS;
    let k = 0..KEYS.len();
    prop_oneof![
        4 => c.clone().prop_map(Op::Load),
        3 => (c.clone(), k.clone()).prop_map(|(c, k)| Op::Get(c, k)),
        2 => (c.clone(), k.clone()).prop_map(|(c, k)| Op::GetForUpdate(c, k)),
        4 => (c.clone(), k.clone(), -5i64..5).prop_map(|(c, k, v)| Op::Insert(c, k, v)),
        2 => (c.clone(), k).prop_map(|(c, k)| Op::Remove(c, k)),
        4 => c.clone().prop_map(Op::Commit),
        1 => c.clone().prop_map(Op::End),
        1 => c.prop_map(Op::Cycle),
        2 => (1u64..40_000).prop_map(Op::Advance),
        1 => Just(Op::Gc),
        1 => Just(Op::Create),
        2 => (0..CLIENTS, 0..4usize).prop_map(|(c, e)| Op::SetExpiry(c, e)),
    ]
}

/// The sequential reference of one session.
/// The expiry rules the model uses: the default, a short and a long idle timeout, and a fixed
/// time (relative to the clock when the rule is set).
fn rule(e: usize, now: Timestamp) -> Expiry {
    match e {
        0 => Expiry::Default,
        1 => Expiry::Idle(Duration::from_millis(20_000)),
        2 => Expiry::Idle(Duration::from_millis(150_000)),
        _ => Expiry::At(now.saturating_add(Duration::from_millis(50_000))),
    }
}

#[derive(Debug, Clone)]
struct Reference {
    expiry: Expiry,
    id: String,
    gen: u64,
    deleted: bool,
    version: u64,
    created: Timestamp,
    la: Timestamp,
    data: BTreeMap<String, i64>,
    changed: BTreeMap<String, u64>,
}

impl Reference {
    fn expired(&self, now: Timestamp) -> bool {
        let idle = now.0.saturating_sub(self.la.0);
        let age = now.0.saturating_sub(self.created.0);
        match self.expiry {
            Expiry::Default => idle > IDLE_MS || age > LIFE_MS,
            Expiry::Idle(d) => u128::from(idle) > d.as_millis() || age > LIFE_MS,
            Expiry::At(t) => now > t,
        }
    }
    fn alive(&self, now: Timestamp) -> bool {
        !self.deleted && !self.expired(now)
    }
    /// A request that finds the session expired deletes it on the spot.
    fn delete_if_seen_expired(&mut self, now: Timestamp) {
        if !self.deleted && self.expired(now) {
            self.deleted = true;
        }
    }
    /// An access recorded at a request's end (touch interval 0).
    fn record_access(&mut self, gen: u64, accessed: Timestamp, now: Timestamp) {
        if gen == self.gen && self.alive(now) {
            self.la = self.la.max(accessed);
        }
    }
}

struct Request {
    /// The rule this request holds (loaded, or set by it) and whether it set one.
    expiry: Expiry,
    expiry_changed: bool,
    /// Keys read with `get_for_update`.
    reads: std::collections::BTreeSet<String>,
    session: Session,
    gen: u64,
    base: u64,
    view: BTreeMap<String, i64>,
    delta: BTreeMap<String, Option<i64>>,
    accessed: Timestamp,
}

struct Harness {
    mgr: SessionManager,
    clock: Arc<ManualClock>,
    r: Reference,
    clients: Vec<Option<Request>>,
    /// Earlier sessions that expired and were replaced by `Create`, not yet collected.
    zombies: Vec<String>,
    /// Whatever the store needs kept (a directory).
    _keep: Box<dyn std::any::Any>,
    /// Sessions are loaded by key: read every value at load (the model's reads are snapshots).
    prefetch: bool,
}

impl Harness {
    fn new() -> Self {
        Self::with(|table, cfg| {
            (
                SessionManager::new(table, MemoryStore::new(), cfg),
                Box::new(()),
            )
        })
    }

    /// On the store that `make` puts under a manager (with what must outlive it).
    fn with(
        make: impl FnOnce(LockTable, SessionConfig) -> (SessionManager, Box<dyn std::any::Any>),
    ) -> Self {
        let clock = Arc::new(ManualClock::new(T0));
        let cfg = SessionConfig {
            clock: clock.clone(),
            idle_timeout: Duration::from_millis(IDLE_MS),
            max_lifetime: Duration::from_millis(LIFE_MS),
            touch_interval: Some(Duration::ZERO),
            max_tombstones: 1000,
            ..SessionConfig::default()
        };
        let table = LockTable::anonymous(&TableOptions::default()).unwrap();
        let (mgr, _keep) = make(table, cfg);
        let mut s = mgr.create().unwrap();
        s.persist();
        let r = Reference {
            id: s.id().to_string(),
            gen: 0,
            deleted: false,
            version: 1,
            created: T0,
            expiry: Expiry::Default,
            la: T0,
            data: BTreeMap::new(),
            changed: BTreeMap::new(),
        };
        s.commit().unwrap();
        Harness {
            mgr,
            clock,
            r,
            clients: (0..CLIENTS).map(|_| None).collect(),
            zombies: Vec::new(),
            _keep,
            prefetch: false,
        }
    }

    fn now(&self) -> Timestamp {
        use locktable::session::Clock;
        self.clock.now()
    }

    fn step(&mut self, op: &Op) {
        let now = self.now();
        match *op {
            Op::Load(c) => {
                if self.clients[c].is_some() {
                    return;
                }
                let got = self.mgr.load(&self.r.id).unwrap();
                assert_eq!(got.is_some(), self.r.alive(now), "visibility at load");
                self.r.delete_if_seen_expired(now);
                if let Some(session) = got {
                    if self.prefetch {
                        for k in KEYS {
                            session.get::<i64>(k).unwrap();
                        }
                    }
                    assert_eq!(session.version(), self.r.version);
                    assert_eq!(session.last_accessed(), self.r.la);
                    self.clients[c] = Some(Request {
                        session,
                        gen: self.r.gen,
                        base: self.r.version,
                        view: self.r.data.clone(),
                        delta: BTreeMap::new(),
                        reads: Default::default(),
                        accessed: now.max(self.r.la),
                        expiry: self.r.expiry,
                        expiry_changed: false,
                    });
                }
            }
            Op::GetForUpdate(c, k) => {
                if let Some(q) = &mut self.clients[c] {
                    let got = q.session.get_for_update::<i64>(KEYS[k]).unwrap();
                    assert_eq!(got, q.view.get(KEYS[k]).copied(), "snapshot read");
                    q.reads.insert(KEYS[k].to_owned());
                }
            }
            Op::Get(c, k) => {
                if let Some(q) = &self.clients[c] {
                    let got = q.session.get::<i64>(KEYS[k]).unwrap();
                    assert_eq!(got, q.view.get(KEYS[k]).copied(), "snapshot read");
                }
            }
            Op::Insert(c, k, v) => {
                if let Some(q) = &mut self.clients[c] {
                    q.session.insert(KEYS[k], &v).unwrap();
                    q.view.insert(KEYS[k].into(), v);
                    q.delta.insert(KEYS[k].into(), Some(v));
                }
            }
            Op::Remove(c, k) => {
                if let Some(q) = &mut self.clients[c] {
                    let had = q.view.remove(KEYS[k]).is_some();
                    assert_eq!(q.session.remove(KEYS[k]), had);
                    if had {
                        q.delta.insert(KEYS[k].into(), None);
                    }
                }
            }
            Op::End(c) => {
                if let Some(q) = self.clients[c].take() {
                    drop(q.session);
                    self.r.record_access(q.gen, q.accessed, now);
                }
            }
            Op::Commit(c) => {
                let Some(q) = self.clients[c].take() else {
                    return;
                };
                let qid = q.session.id().to_string();
                let got = q.session.commit();
                if !q.delta.is_empty() || q.expiry_changed {
                    // A request of a replaced, expired session deletes it when it sees it.
                    self.zombies.retain(|z| *z != qid);
                }
                if q.delta.is_empty() && !q.expiry_changed {
                    assert!(got.is_ok(), "read-only commit: {got:?}");
                    self.r.record_access(q.gen, q.accessed, now);
                } else if q.gen != self.r.gen || !self.r.alive(now) {
                    assert!(matches!(got, Err(Error::SessionGone)), "{got:?}");
                    if q.gen == self.r.gen {
                        self.r.delete_if_seen_expired(now);
                    }
                } else if let Some(k) = q
                    .delta
                    .keys()
                    .chain(q.reads.iter())
                    .find(|k| self.r.changed.get(*k).is_some_and(|&v| v > q.base))
                {
                    // Written keys, then keys read for update: no write skew on either.
                    assert!(
                        matches!(&got, Err(Error::Conflict { key }) if key == k),
                        "expected conflict on {k}: {got:?}"
                    );
                    // The dropped session still records its access.
                    self.r.record_access(q.gen, q.accessed, now);
                } else {
                    assert!(got.is_ok(), "expected success: {got:?}");
                    self.r.version += 1;
                    for (k, v) in &q.delta {
                        match v {
                            Some(v) => self.r.data.insert(k.clone(), *v),
                            None => self.r.data.remove(k),
                        };
                        self.r.changed.insert(k.clone(), self.r.version);
                    }
                    if q.expiry_changed {
                        self.r.expiry = q.expiry;
                    }
                    self.r.la = self.r.la.max(q.accessed);
                }
            }
            Op::Cycle(c) => {
                let Some(q) = &mut self.clients[c] else {
                    return;
                };
                let qid = q.session.id().to_string();
                self.zombies.retain(|z| *z != qid);
                let got = q.session.cycle_id();
                if q.gen != self.r.gen || !self.r.alive(now) {
                    assert!(matches!(got, Err(Error::SessionGone)), "{got:?}");
                    if q.gen == self.r.gen {
                        self.r.delete_if_seen_expired(now);
                    }
                } else {
                    got.unwrap();
                    assert!(
                        self.mgr.load(&self.r.id).unwrap().is_none(),
                        "old ID is dead"
                    );
                    self.r.gen += 1;
                    self.r.id = q.session.id().to_string();
                    self.r.la = self.r.la.max(q.accessed);
                    q.gen = self.r.gen;
                }
            }
            Op::Advance(ms) => self.clock.advance(Duration::from_millis(ms)),
            Op::SetExpiry(c, e) => {
                if let Some(q) = &mut self.clients[c] {
                    let e = rule(e, now);
                    q.session.set_expiry(e);
                    if e != q.expiry {
                        q.expiry = e;
                        q.expiry_changed = true;
                    }
                    assert_eq!(q.session.expiry(), q.expiry);
                }
            }
            Op::Gc => {
                let report = self.mgr.gc().unwrap();
                let expected = !self.r.deleted && self.r.expired(now);
                assert_eq!(report.deleted, usize::from(expected) + self.zombies.len());
                self.zombies.clear();
                if expected {
                    self.r.deleted = true;
                }
            }
            Op::Create => {
                if self.r.alive(now) {
                    return;
                }
                if !self.r.deleted {
                    self.zombies.push(self.r.id.clone());
                }
                let mut s = self.mgr.create().unwrap();
                s.persist();
                self.r = Reference {
                    id: s.id().to_string(),
                    gen: self.r.gen + 1,
                    deleted: false,
                    version: 1,
                    created: now,
                    expiry: Expiry::Default,
                    la: now,
                    data: BTreeMap::new(),
                    changed: BTreeMap::new(),
                };
                s.commit().unwrap();
            }
        }
        self.check_store();
    }

    /// The stored record equals the reference (data, version, last-accessed).
    fn check_store(&self) {
        let id = SessionId::parse(&self.r.id).unwrap();
        let stored = self.mgr.store().load(&id, 1 << 20).unwrap();
        if self.r.deleted {
            assert!(stored.is_none());
            return;
        }
        let stored = stored.expect("live or not yet collected session is stored");
        let rec = record::decode(&stored.bytes, 1 << 20).unwrap();
        let data: BTreeMap<String, i64> = rec
            .body
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
            .collect();
        assert_eq!(data, self.r.data, "no update lost, none resurrected");
        assert_eq!(rec.version, self.r.version);
        assert_eq!(
            stored.meta.last_accessed, self.r.la,
            "last-accessed = max of accesses"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn interleaved_requests_match_the_reference(ops in proptest::collection::vec(op(), 1..80)) {
        let mut h = Harness::new();
        for op in &ops {
            h.step(op);
        }
        for c in 0..CLIENTS {
            h.step(&Op::Commit(c));
        }
        let now = h.now();
        prop_assert_eq!(h.mgr.load(&h.r.id).unwrap().is_some(), h.r.alive(now));
    }

    /// The same on the key-value store with every session stored and loaded by key (commits
    /// merge the delta into the head and write the changed values: `Store::save_delta`); each
    /// load reads its values at once, so that reads are snapshots as above.
    #[cfg(feature = "lmdb")]
    #[test]
    fn interleaved_requests_match_the_reference_by_key(ops in proptest::collection::vec(op(), 1..80)) {
        let mut h = Harness::with(|table, cfg| {
            let dir = tempfile::tempdir().unwrap();
            let opts = locktable::session::KvOptions { fsync: false, ..Default::default() };
            let store = locktable::session::KvStore::open_with(dir.path(), &opts).unwrap();
            (SessionManager::new(table, store, SessionConfig { lazy_above: 0, ..cfg }), Box::new(dir))
        });
        h.prefetch = true;
        for op in &ops {
            h.step(op);
        }
        for c in 0..CLIENTS {
            h.step(&Op::Commit(c));
        }
        let now = h.now();
        prop_assert_eq!(h.mgr.load(&h.r.id).unwrap().is_some(), h.r.alive(now));
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Optimistic,
    Exclusive,
    ReadOnly,
    Transact,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Optimistic),
        Just(Kind::Exclusive),
        Just(Kind::ReadOnly),
        Just(Kind::Transact)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn threaded_increments_lose_nothing(
        plans in proptest::collection::vec(
            proptest::collection::vec((kind(), 0..KEYS.len()), 1..60), 2..4)
    ) {
        let table = LockTable::anonymous(&TableOptions::default()).unwrap();
        let mgr = SessionManager::new(table, MemoryStore::new(), SessionConfig::default());
        let mut s = mgr.create().unwrap();
        s.persist();
        let id = s.id().to_string();
        s.commit().unwrap();
        let writes_before = mgr.stats().data_writes;
        let results: Vec<([u64; 3], u64, u64)> = std::thread::scope(|sc| {
            let handles: Vec<_> = plans
                .iter()
                .map(|plan| {
                    let (mgr, id) = (&mgr, &id);
                    sc.spawn(move || {
                        let mut ok = [0u64; 3];
                        let mut conflicts = 0;
                        let mut read_only = 0;
                        for &(kind, k) in plan {
                            let key = KEYS[k];
                            let bump = |s: &mut Session| -> locktable::Result<()> {
                                let v = s.get::<u64>(key)?.unwrap_or(0);
                                s.insert(key, &(v + 1))
                            };
                            match kind {
                                Kind::ReadOnly => {
                                    let s = mgr.load(id).unwrap().unwrap();
                                    let _ = s.get::<u64>(key).unwrap();
                                    s.commit().unwrap();
                                    read_only += 1;
                                }
                                Kind::Transact => {
                                    mgr.transact(id, bump).unwrap().unwrap();
                                    ok[k] += 1;
                                }
                                Kind::Optimistic | Kind::Exclusive => {
                                    let mut s = if matches!(kind, Kind::Exclusive) {
                                        mgr.load_exclusive(id).unwrap().unwrap()
                                    } else {
                                        mgr.load(id).unwrap().unwrap()
                                    };
                                    bump(&mut s).unwrap();
                                    std::thread::yield_now();
                                    match s.commit() {
                                        Ok(()) => ok[k] += 1,
                                        Err(Error::Conflict { key: ck }) => {
                                            assert!(!matches!(kind, Kind::Exclusive));
                                            assert_eq!(ck, key);
                                            conflicts += 1;
                                        }
                                        Err(e) => panic!("unexpected {e}"),
                                    }
                                }
                            }
                        }
                        (ok, conflicts, read_only)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let s = mgr.load(&id).unwrap().unwrap();
        let mut total_ok = 0;
        for (k, key) in KEYS.iter().enumerate() {
            let ok: u64 = results.iter().map(|r| r.0[k]).sum();
            total_ok += ok;
            prop_assert_eq!(s.get::<u64>(key).unwrap().unwrap_or(0), ok);
        }
        let conflicts: u64 = results.iter().map(|r| r.1).sum();
        let read_only: u64 = results.iter().map(|r| r.2).sum();
        let attempts: u64 = plans.iter().map(|p| p.len() as u64).sum();
        prop_assert_eq!(total_ok + conflicts + read_only, attempts);
        // Only successful increments wrote data; read-only requests wrote none.
        prop_assert_eq!(mgr.stats().data_writes - writes_before, total_ok);
    }
}
