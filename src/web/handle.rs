//! One request's session: a lazy state machine shared by the extractors and the layer.
//!
//! Owns: when a session is looked up, loaded, created, committed, touched, cycled or
//! invalidated during a request, and which thread does it. May not touch: lock-table internals
//! and the manager's own logic; it calls the public [`SessionManager`] / [`Session`] API (and,
//! to create a session with its first data in one write, the public record and store API).
//!
//! Rules that matter:
//! - Nothing happens until a handler asks: a request that never reads or writes its session
//!   verifies no cookie, takes no lock and does no store I/O.
//! - Every call that may wait for a lock or touch the store runs on tokio's blocking pool. Two
//!   things run inline on the runtime worker because they provably never block: a load
//!   answered from the manager's cache of decoded sessions
//!   ([`SessionManager::try_load_cached`]; only a miss goes to the blocking pool), and the end
//!   of a read-only request whose access-time write is coalesced away
//!   ([`Session::access_write_due`] is false). So a read of a hot session, the common case,
//!   makes no thread hand-off at all.
//! - A `Session` is never dropped on a runtime worker while it may still write an access
//!   time: leftovers (a cancelled request) are finished on the blocking pool.
//! - Read-only views load a snapshot that requests arriving together share (a "flight"); a
//!   request joins only a flight that has not started reading, so it sees every commit that
//!   finished before it arrived.

use super::cookies::Presented;
use super::telemetry::{bump, ReaderToken};
use super::{Shared, WebError};
use crate::session::SessionManager;
use crate::session::{Expiry, Session, SessionId, Timestamp};
use crate::Error;
use http::HeaderValue;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Where a request's session stands.
#[derive(Debug)]
enum State {
    /// Not looked at: the cookie is not even verified yet.
    Pending,
    /// The cookie named a live session and a `transact` already committed (and so recorded
    /// the access); nothing is loaded. With the session's end as that commit left it, for the
    /// cookie.
    Transacted(SessionId, Timestamp),
    /// No session (no cookie, or none that verified and named a live session). The
    /// draft becomes a new session at the end of the request if it holds any data.
    Absent(Draft),
    /// Loaded for this request.
    Loaded(Box<LoadedState>),
    /// A read-only snapshot, possibly shared with other requests of the session that arrived
    /// while its load was still queued (see [`SessionHandle::snapshot`]).
    Snapshot {
        snap: Arc<Snapshot>,
        _reader: Option<ReaderToken>,
    },
    /// The handler invalidated the session; the cookie is cleared at the end.
    Invalidated,
    /// The request ended.
    Finished,
}

#[derive(Debug)]
struct LoadedState {
    session: Session,
    /// `cycle_id` ran: the client needs the new ID, even if the request's other changes are
    /// dropped (the cycle is stored at once). With the session's end as of the cycle.
    cycled: Option<Timestamp>,
    _reader: Option<ReaderToken>,
}

/// A session's data as one load saw it, shared by the requests of one flight.
#[derive(Debug)]
pub(crate) struct Snapshot {
    id: SessionId,
    version: u64,
    /// Shared with the session it was read from (and so, after a cache hit, with the cache).
    data: Arc<BTreeMap<String, Value>>,
    /// When the session expires if not used again (by its own expiry rule), for the cookie.
    expires: Timestamp,
    /// The load's end wrote an access time: the cookie's lifetime is refreshed.
    touched: bool,
}

/// What a request without a stored session has set so far: stored as a new session at the end
/// of the request if it holds data.
#[derive(Debug, Default)]
pub(crate) struct Draft {
    data: BTreeMap<String, Value>,
    /// Set by [`SessionTxn::set_expiry`] or [`LazySession::set_expiry`](super::LazySession::set_expiry).
    expiry: Option<Expiry>,
}

/// What a flight delivers; errors as text, as every joined request gets a copy.
pub(crate) type FlightResult = Result<Option<Arc<Snapshot>>, (bool, String)>;

/// Read-only loads of one session that have not started reading the store yet, by ID: a
/// request that arrives while one is queued joins it instead of loading again. The load removes
/// its entry before it reads, so every request that joined arrived before the read began and
/// sees every commit that finished before it arrived.
pub(crate) type Flights = parking_lot::Mutex<
    std::collections::HashMap<SessionId, tokio::sync::watch::Receiver<Option<FlightResult>>>,
>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// A read-only snapshot is enough.
    Snapshot,
    /// A session that can be written (optimistic).
    Optimistic,
    /// A session holding its upgradable lock.
    Exclusive,
}

impl Mode {
    fn reading(read_only: bool) -> Mode {
        if read_only {
            Mode::Snapshot
        } else {
            Mode::Optimistic
        }
    }
}

/// The per-request handle, put into the request's extensions by the layer.
#[derive(Debug, Clone)]
pub(crate) struct SessionHandle(Arc<RequestSession>);

#[derive(Debug)]
pub(crate) struct RequestSession {
    shared: Arc<Shared>,
    cookies: Vec<HeaderValue>,
    state: tokio::sync::Mutex<State>,
    /// Store updates (data writes and touches) this request caused.
    writes: AtomicU64,
    /// The cookie verified only with an old key: re-sign it with the current one at the end.
    resign: AtomicBool,
    /// Every verified ID of a request that sent several cookies of ours (rare; otherwise
    /// empty): a logout ends them all.
    also_presented: parking_lot::Mutex<Vec<SessionId>>,
    // Orderings: `writes` and `resign` are Relaxed. Both are written while the request holds
    // `state`'s mutex (or after awaiting the blocking task that did the write) and read in
    // `finish` after taking that mutex, which orders them.
}

/// A read-modify-write view given to `transact` closures: the stored session, or the draft of a
/// session that does not exist yet.
pub struct SessionTxn<'a> {
    inner: TxnInner<'a>,
}

enum TxnInner<'a> {
    Stored(&'a mut Session),
    Draft(&'a mut Draft),
}

impl SessionTxn<'_> {
    /// Reads a value; `Ok(None)` when absent.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> crate::Result<Option<T>> {
        match &self.inner {
            TxnInner::Stored(s) => s.get(key),
            TxnInner::Draft(d) => match d.data.get(key) {
                None => Ok(None),
                Some(v) => Ok(Some(T::deserialize(v)?)),
            },
        }
    }

    /// Sets a value.
    pub fn insert<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> crate::Result<()> {
        match &mut self.inner {
            TxnInner::Stored(s) => s.insert(key, value),
            TxnInner::Draft(d) => {
                d.data.insert(key.to_owned(), serde_json::to_value(value)?);
                Ok(())
            }
        }
    }

    /// Removes a key; returns whether it was present.
    pub fn remove(&mut self, key: &str) -> bool {
        match &mut self.inner {
            TxnInner::Stored(s) => s.remove(key),
            TxnInner::Draft(d) => d.data.remove(key).is_some(),
        }
    }

    /// Sets the session's expiry rule (see [`Session::set_expiry`]); the cookie's `Max-Age`
    /// and `Expires` follow it.
    pub fn set_expiry(&mut self, e: Expiry) {
        match &mut self.inner {
            TxnInner::Stored(s) => s.set_expiry(e),
            TxnInner::Draft(d) => d.expiry = Some(e),
        }
    }
}

impl SessionHandle {
    pub(crate) fn new(shared: Arc<Shared>, cookies: Vec<HeaderValue>) -> SessionHandle {
        SessionHandle(Arc::new(RequestSession {
            shared,
            cookies,
            state: tokio::sync::Mutex::new(State::Pending),
            writes: AtomicU64::new(0),
            resign: AtomicBool::new(false),
            also_presented: parking_lot::Mutex::new(Vec::new()),
        }))
    }

    fn shared(&self) -> &Shared {
        &self.0.shared
    }

    /// The IDs the request's cookies name and that verify (CPU only), in the order sent.
    /// Counts a rejected cookie. The caller uses the first whose session exists (see
    /// [`Self::chose`]): only a request with several cookies of ours can pay for more than one
    /// lookup.
    fn presented_ids(&self) -> Presented {
        let sh = self.shared();
        bump(&sh.stats.sessions_used);
        if self.0.cookies.is_empty() {
            return Presented::default();
        }
        let ids = sh.cookies.session_ids(&self.0.cookies);
        if ids.is_empty() {
            bump(&sh.stats.cookies_rejected);
        } else if ids.several() {
            *self.0.also_presented.lock() = ids.ids().cloned().collect();
        }
        ids
    }

    /// The request uses the presented ID whose cookie only an old key verified: re-sign it.
    fn chose(&self, old_key: bool) {
        if old_key {
            self.0.resign.store(true, Ordering::Relaxed);
        }
    }

    /// Runs `f` on the blocking pool. With `deadline`, a wait longer than it becomes
    /// [`Error::Timeout`]; the abandoned call finishes on its own and its result (a session and
    /// the lock it may hold) is dropped there, releasing the lock.
    async fn blocking<T: Send + 'static>(
        &self,
        deadline: Option<Duration>,
        f: impl FnOnce() -> crate::Result<T> + Send + 'static,
    ) -> Result<T, WebError> {
        bump(&self.shared().stats.blocking_tasks);
        let task = tokio::task::spawn_blocking(f);
        let joined = match deadline {
            None => task.await,
            Some(d) => match tokio::time::timeout(d, task).await {
                Ok(j) => j,
                Err(_) => {
                    bump(&self.shared().stats.timeouts);
                    return Err(self.err(Error::Timeout));
                }
            },
        };
        match joined {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if matches!(e, Error::Timeout) {
                    bump(&self.shared().stats.timeouts);
                }
                Err(self.err(e))
            }
            Err(join) => Err(self.err(Error::Io(std::io::Error::other(join.to_string())))),
        }
    }

    fn err(&self, e: Error) -> WebError {
        WebError::new(e, &self.shared().cfg)
    }

    /// Makes sure the session is resolved as `mode` needs: a snapshot, a loaded session
    /// (optimistic or exclusive), or known to be absent.
    async fn resolve(&self, state: &mut State, mode: Mode) -> Result<(), WebError> {
        let (ids, seen_version) = match state {
            State::Pending => (self.presented_ids(), None),
            State::Transacted(id, _) => (Presented::one(id.clone()), None),
            State::Snapshot { snap, .. } if mode != Mode::Snapshot => {
                (Presented::one(snap.id.clone()), Some(snap.version))
            }
            State::Loaded(l) if mode == Mode::Exclusive && !l.session.is_exclusive() => {
                return Err(self.err(Error::Io(std::io::Error::other(
                    "the session was already loaded optimistically in this request",
                ))))
            }
            State::Finished => return Err(self.err(Error::SessionFinished)),
            _ => return Ok(()),
        };
        if ids.is_empty() {
            *state = State::Absent(Draft::default());
            return Ok(());
        }
        let sh = self.shared();
        if mode == Mode::Snapshot {
            for (id, old_key) in ids {
                if let Some(snap) = self.snapshot(id).await? {
                    self.chose(old_key);
                    let reader = sh.readers.as_ref().map(|g| {
                        g.enter(sh.hasher.hash(&snap.id), &sh.stats.max_concurrent_readers)
                    });
                    *state = State::Snapshot {
                        snap,
                        _reader: reader,
                    };
                    return Ok(());
                }
            }
            bump(&sh.stats.cookies_rejected);
            *state = State::Absent(Draft::default());
            return Ok(());
        }
        let exclusive = mode == Mode::Exclusive;
        let mut loaded = None;
        for (id, old_key) in ids {
            loaded = self.load(id, exclusive).await?;
            if loaded.is_some() {
                self.chose(old_key);
                break;
            }
        }
        match loaded {
            Some(session) => {
                bump(&sh.stats.loads);
                if seen_version.is_some_and(|v| v != session.version()) {
                    // The handler read an older snapshot: what it writes may rest on stale
                    // data. Refuse, as a commit conflict would (the session drops off-worker).
                    leave_off_worker(sh, session);
                    *state = State::Finished;
                    return Err(self.err(Error::Conflict {
                        key: "(read before the last commit)".into(),
                    }));
                }
                let reader = sh.readers.as_ref().map(|g| {
                    g.enter(
                        sh.hasher.hash(session.id()),
                        &sh.stats.max_concurrent_readers,
                    )
                });
                *state = State::Loaded(Box::new(LoadedState {
                    session,
                    cycled: None,
                    _reader: reader,
                }));
            }
            None => {
                bump(&sh.stats.cookies_rejected);
                *state = State::Absent(Draft::default());
            }
        }
        Ok(())
    }

    /// Session `id`, if it exists: from the manager's cache when it has it (optimistic loads
    /// only), otherwise loaded on the blocking pool.
    async fn load(&self, id: SessionId, exclusive: bool) -> Result<Option<Session>, WebError> {
        if !exclusive {
            if let Some(session) = self.try_cached(&id)? {
                return Ok(Some(session));
            }
        }
        let sh = self.shared();
        let mgr = sh.mgr.clone();
        let span = tracing::debug_span!("session.load", sid = %sh.hasher.tag(&id), exclusive);
        self.blocking(Some(sh.cfg.lock_timeout), move || {
            let _e = span.entered();
            if exclusive {
                mgr.load_exclusive(id.as_str())
            } else {
                mgr.load(id.as_str())
            }
        })
        .await
    }

    /// Session `id` from the manager's cache of decoded sessions, inline: never blocks (no
    /// store I/O, no lock). `None`: not cached, load it on the blocking pool.
    fn try_cached(&self, id: &SessionId) -> Result<Option<Session>, WebError> {
        let sh = self.shared();
        let _e =
            tracing::debug_span!("session.load", sid = %sh.hasher.tag(id), cached = true).entered();
        sh.mgr.try_load_cached_id(id).map_err(|e| self.err(e))
    }

    /// A read-only snapshot of session `id`. From the manager's cache when it has the current
    /// copy (inline, see [`Self::try_cached`]); otherwise joins a load of it that is queued but
    /// has not started reading, or starts one. The access is ended (coalesced touch) right
    /// away, inline when no write is due and on the blocking pool otherwise, so a read-only
    /// request holds no session at all.
    async fn snapshot(&self, id: SessionId) -> Result<Option<Arc<Snapshot>>, WebError> {
        let sh = Arc::clone(&self.0.shared);
        if let Some(session) = self.try_cached(&id)? {
            bump(&sh.stats.loads);
            // A cached session is whole (sessions loaded by key are never cached): no I/O here.
            let snap = snapshot_of(&session).map_err(|e| self.err(e))?;
            if snap.touched {
                // Once per touch interval: the access-time write goes to the blocking pool.
                let sh2 = Arc::clone(&sh);
                self.blocking(None, move || {
                    end_snapshot_access(&sh2, session, true);
                    Ok(())
                })
                .await?;
            } else {
                // No write due: ending the access does no I/O and takes no lock.
                end_snapshot_access(&sh, session, false);
            }
            return Ok(Some(Arc::new(snap)));
        }
        let mut rx = {
            let mut flights = sh.flights.lock();
            match flights.get(&id) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    flights.insert(id.clone(), rx.clone());
                    let sh2 = Arc::clone(&sh);
                    let id = id.clone();
                    let span = tracing::debug_span!("session.load", sid = %sh.hasher.tag(&id), shared = true);
                    // Detached: every request of the flight waits on the channel with its own
                    // deadline; a dropped request leaves the load to finish for the others.
                    bump(&sh.stats.blocking_tasks);
                    drop(tokio::task::spawn_blocking(move || {
                        let _e = span.entered();
                        sh2.flights.lock().remove(&id);
                        let r = load_snapshot(&sh2, &id)
                            .map_err(|e| (matches!(e, Error::Timeout), e.to_string()));
                        tx.send_replace(Some(r));
                    }));
                    rx
                }
            }
        };
        let wait = tokio::time::timeout(sh.cfg.lock_timeout, rx.wait_for(Option::is_some))
            .await
            .map(|r| r.map(|v| v.clone()));
        let result = match wait {
            Err(_) => {
                bump(&sh.stats.timeouts);
                return Err(self.err(Error::Timeout));
            }
            Ok(Err(_)) => {
                // The load was dropped unrun (runtime shutting down): forget its entry so that
                // later requests start a load of their own.
                let mut flights = sh.flights.lock();
                if flights.get(&id).is_some_and(|r| r.same_channel(&rx)) {
                    flights.remove(&id);
                }
                Err((false, "the session load was abandoned".to_string()))
            }
            Ok(Ok(v)) => v.unwrap_or(Err((false, String::new()))),
        };
        result.map_err(|(timeout, msg)| {
            if timeout {
                bump(&sh.stats.timeouts);
                self.err(Error::Timeout)
            } else {
                self.err(Error::Io(std::io::Error::other(msg)))
            }
        })
    }

    pub(crate) async fn load_exclusive(&self) -> Result<(), WebError> {
        let mut st = self.0.state.lock().await;
        self.resolve(&mut st, Mode::Exclusive).await
    }

    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        key: &str,
        read_only: bool,
    ) -> Result<Option<T>, WebError> {
        let mut st = self.0.state.lock().await;
        self.resolve(&mut st, Mode::reading(read_only)).await?;
        let r = match &*st {
            State::Loaded(l) => l.session.get(key),
            State::Snapshot { snap, .. } => match snap.data.get(key) {
                None => Ok(None),
                Some(v) => T::deserialize(v).map(Some).map_err(Error::from),
            },
            State::Absent(d) => match d.data.get(key) {
                None => Ok(None),
                Some(v) => T::deserialize(v).map(Some).map_err(Error::from),
            },
            _ => Err(Error::SessionFinished),
        };
        r.map_err(|e| self.err(e))
    }

    pub(crate) async fn keys(&self, read_only: bool) -> Result<Vec<String>, WebError> {
        let mut st = self.0.state.lock().await;
        self.resolve(&mut st, Mode::reading(read_only)).await?;
        match &*st {
            State::Loaded(l) => Ok(l.session.keys().map(str::to_owned).collect()),
            State::Snapshot { snap, .. } => Ok(snap.data.keys().cloned().collect()),
            State::Absent(d) => Ok(d.data.keys().cloned().collect()),
            _ => Err(self.err(Error::SessionFinished)),
        }
    }

    pub(crate) async fn insert<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), WebError> {
        let mut st = self.0.state.lock().await;
        self.resolve(&mut st, Mode::Optimistic).await?;
        let r = match &mut *st {
            State::Loaded(l) => l.session.insert(key, value),
            State::Absent(d) => serde_json::to_value(value)
                .map(|v| {
                    d.data.insert(key.to_owned(), v);
                })
                .map_err(Error::from),
            _ => Err(Error::SessionFinished),
        };
        r.map_err(|e| self.err(e))
    }

    pub(crate) async fn remove(&self, key: &str) -> Result<bool, WebError> {
        let mut st = self.0.state.lock().await;
        self.resolve(&mut st, Mode::Optimistic).await?;
        match &mut *st {
            State::Loaded(l) => Ok(l.session.remove(key)),
            State::Absent(d) => Ok(d.data.remove(key).is_some()),
            _ => Err(self.err(Error::SessionFinished)),
        }
    }

    pub(crate) async fn set_expiry(&self, e: Expiry) -> Result<(), WebError> {
        let mut st = self.0.state.lock().await;
        self.resolve(&mut st, Mode::Optimistic).await?;
        match &mut *st {
            State::Loaded(l) => {
                l.session.set_expiry(e);
                Ok(())
            }
            State::Absent(d) => {
                d.expiry = Some(e);
                Ok(())
            }
            _ => Err(self.err(Error::SessionFinished)),
        }
    }

    pub(crate) async fn transact<R, F>(&self, mut f: F) -> Result<R, WebError>
    where
        F: FnMut(&mut SessionTxn<'_>) -> crate::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let mut st = self.0.state.lock().await;
        let ids = match &mut *st {
            State::Pending => self.presented_ids(),
            State::Transacted(id, _) => Presented::one(id.clone()),
            // An exclusive session cannot conflict: change it in place, committed at the end.
            State::Loaded(l) if l.session.is_exclusive() => {
                let mut txn = SessionTxn {
                    inner: TxnInner::Stored(&mut l.session),
                };
                return f(&mut txn).map_err(|e| self.err(e));
            }
            State::Loaded(l) => Presented::one(l.session.id().clone()),
            State::Snapshot { snap, .. } => Presented::one(snap.id.clone()),
            State::Absent(d) => {
                let mut txn = SessionTxn {
                    inner: TxnInner::Draft(d),
                };
                return f(&mut txn).map_err(|e| self.err(e));
            }
            State::Invalidated | State::Finished => {
                return Err(self.err(Error::SessionFinished));
            }
        };
        // The first presented session that exists takes the transaction.
        let tried = !ids.is_empty();
        for (id, old_key) in ids {
            let sh = self.shared();
            let mgr = sh.mgr.clone();
            let span = tracing::debug_span!("session.transact", sid = %sh.hasher.tag(&id));
            let attempts = Arc::new(AtomicU64::new(0));
            let counted = Arc::clone(&attempts);
            let expires = Arc::new(AtomicU64::new(0));
            let expires_seen = Arc::clone(&expires);
            let id2 = id.clone();
            // The transaction commits itself, so no layer deadline: a commit cut short here
            // could still land after the client was told it failed.
            let (result, f_back) = self
                .blocking(None, move || {
                    let _e = span.entered();
                    let r = mgr.transact(id2.as_str(), |s| {
                        counted.fetch_add(1, Ordering::Relaxed);
                        let r = f(&mut SessionTxn {
                            inner: TxnInner::Stored(s),
                        });
                        // After `f`: its expiry rule, if it set one, is what gets committed.
                        expires_seen.store(s.expires_at().0, Ordering::Relaxed);
                        r
                    });
                    Ok((r, f))
                })
                .await?;
            f = f_back;
            // Relaxed: the blocking task that counted has been joined (awaited) above.
            let n = attempts.load(Ordering::Relaxed);
            sh.stats
                .transact_retries
                .fetch_add(n.saturating_sub(1), Ordering::Relaxed);
            match result {
                Ok(Some(r)) => {
                    self.chose(old_key);
                    if n > 0 {
                        bump(&sh.stats.commits);
                        self.0.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    if matches!(*st, State::Pending | State::Transacted(..)) {
                        *st = State::Transacted(id, Timestamp(expires.load(Ordering::Relaxed)));
                    }
                    return Ok(r);
                }
                // That cookie named no live session: try the next one.
                Ok(None) => {}
                Err(e) => {
                    if matches!(e, Error::Conflict { .. }) {
                        bump(&sh.stats.conflicts);
                    }
                    return Err(self.err(e));
                }
            }
        }
        if tried {
            // No cookie named a live session: fall through to a new one.
            bump(&self.shared().stats.cookies_rejected);
        }
        let mut draft = match std::mem::replace(&mut *st, State::Absent(Draft::default())) {
            State::Absent(d) => d,
            _ => Draft::default(),
        };
        let r = f(&mut SessionTxn {
            inner: TxnInner::Draft(&mut draft),
        });
        *st = State::Absent(draft);
        r.map_err(|e| self.err(e))
    }

    pub(crate) async fn cycle_id(&self) -> Result<(), WebError> {
        let mut st = self.0.state.lock().await;
        self.resolve(&mut st, Mode::Optimistic).await?;
        if !matches!(&*st, State::Loaded(_)) {
            // A new session gets a fresh ID anyway; nothing else can be cycled.
            return Ok(());
        }
        let State::Loaded(mut l) = std::mem::replace(&mut *st, State::Finished) else {
            return Ok(());
        };
        let span =
            tracing::debug_span!("session.cycle", sid = %self.shared().hasher.tag(l.session.id()));
        let r = self
            .blocking(None, move || {
                let _e = span.entered();
                let r = l.session.cycle_id();
                Ok((l, r))
            })
            .await;
        let (mut l, r) = r?;
        if r.is_ok() {
            l.cycled = Some(l.session.expires_at());
            bump(&self.shared().stats.cycled);
            self.0.writes.fetch_add(1, Ordering::Relaxed);
        }
        *st = State::Loaded(l);
        r.map_err(|e| self.err(e))
    }

    pub(crate) async fn invalidate(&self) -> Result<(), WebError> {
        let mut st = self.0.state.lock().await;
        let sh = self.shared();
        // `Finished` until the delete is done: a request cut while it waits (a timeout layer
        // inside this one dropped the handler) must keep the client's cookie, as a failed
        // delete does, since the delete may still fail.
        let old = std::mem::replace(&mut *st, State::Finished);
        // Every session the request's cookies name is ended, not only the one it used: a live
        // one behind it would otherwise take over on the next request.
        let mut others = std::mem::take(&mut *self.0.also_presented.lock());
        let mgr = sh.mgr.clone();
        let job: Option<Box<dyn FnOnce() -> crate::Result<()> + Send>> = match old {
            State::Loaded(l) => {
                others.retain(|o| o != l.session.id());
                Some(Box::new(move || l.session.invalidate()))
            }
            State::Transacted(id, _) => {
                others.retain(|o| *o != id);
                let mgr = mgr.clone();
                Some(Box::new(move || mgr.delete(id.as_str()).map(|_| ())))
            }
            State::Snapshot { snap, .. } => {
                let id = snap.id.clone();
                others.retain(|o| *o != id);
                let mgr = mgr.clone();
                Some(Box::new(move || mgr.delete(id.as_str()).map(|_| ())))
            }
            State::Pending => {
                others = self.presented_ids().into_iter().map(|(id, _)| id).collect();
                self.0.also_presented.lock().clear();
                None
            }
            // No presented cookie named a live session.
            State::Absent(_) | State::Invalidated => {
                others.clear();
                None
            }
            State::Finished => return Err(self.err(Error::SessionFinished)),
        };
        bump(&sh.stats.invalidated);
        if job.is_none() && others.is_empty() {
            *st = State::Invalidated;
            return Ok(());
        }
        let job = move || {
            let mut r = job.map_or(Ok(()), |j| j());
            for id in others {
                if let Err(e) = mgr.delete(id.as_str()) {
                    r = r.and(Err(e));
                }
            }
            r
        };
        let r = self.blocking(Some(sh.cfg.lock_timeout), job).await;
        // On any other error the session may still be there (a lock wait timed out, the store
        // failed): the state stays `Finished`, which keeps the client's cookie so that it can
        // retry the logout, rather than leave a live session that no client can name any more.
        if r.as_ref()
            .map_or_else(|e| matches!(e.error(), Error::SessionGone), |_| true)
        {
            *st = State::Invalidated;
        }
        r
    }

    /// Ends the request: commits the changes as one delta, or creates the new session, or
    /// records the access; sets or clears the cookie. Errors become the response.
    pub(crate) async fn finish(
        &self,
        mut resp: http::Response<axum_core::body::Body>,
    ) -> http::Response<axum_core::body::Body> {
        let state = {
            let mut st = self.0.state.lock().await;
            std::mem::replace(&mut *st, State::Finished)
        };
        // A handler that failed (5xx) may have left half-made changes: store none of them.
        // The access is still recorded, off the worker, as for any dropped session.
        let failed = resp.status().is_server_error();
        if !matches!(state, State::Pending) {
            // The answer depended on the session: caches must key it by the cookie.
            resp.headers_mut()
                .append(http::header::VARY, HeaderValue::from_static("cookie"));
        }
        let outcome = match state {
            State::Pending | State::Finished => Ok(None),
            State::Absent(_) if failed => Ok(None),
            State::Loaded(l) if failed && l.session.is_dirty() => {
                tracing::debug!("handler failed: the request's session changes are dropped");
                // A `cycle_id` of this request is already stored and the old ID is dead: the
                // client still needs the new one (lasting as of the cycle, not as the dropped
                // changes would have it).
                let cycled = l.cycled.map(|end| (l.session.id().clone(), end));
                leave_off_worker(self.shared(), l.session);
                Ok(cycled.and_then(|(id, end)| self.cookie(&id, end)))
            }
            // The transaction's commit extended the session: refresh the cookie's lifetime.
            State::Transacted(id, expires) => Ok(self.cookie(&id, expires)),
            State::Absent(draft) if draft.data.is_empty() => Ok(None),
            State::Absent(draft) => self.create(draft).await,
            State::Loaded(l) => self.end_loaded(*l).await,
            State::Snapshot { snap, .. } => {
                let renew = snap.touched || self.0.resign.load(Ordering::Relaxed);
                Ok(renew.then(|| self.cookie(&snap.id, snap.expires)).flatten())
            }
            State::Invalidated => Ok(self.shared().cookies.clear()),
        };
        let sh = self.shared();
        let writes = self.0.writes.load(Ordering::Relaxed);
        if writes > 0 {
            // Skipped for the common read: no shared cache line written per request.
            sh.stats
                .max_writes_per_request
                .fetch_max(writes, Ordering::Relaxed);
        }
        match outcome {
            Ok(Some(cookie)) => {
                let h = resp.headers_mut();
                h.append(http::header::SET_COOKIE, cookie);
                // A cached Set-Cookie would hand this session to the cache's next client.
                h.entry(http::header::CACHE_CONTROL)
                    .or_insert(HeaderValue::from_static("no-store"));
                resp
            }
            Ok(None) => resp,
            Err(e) => axum_core::response::IntoResponse::into_response(e),
        }
    }

    /// Stores a new session with the draft as its first data: one write.
    async fn create(&self, draft: Draft) -> Result<Option<HeaderValue>, WebError> {
        let sh = self.shared();
        let mgr = sh.mgr.clone();
        let span = tracing::debug_span!("session.create", keys = draft.data.len());
        let (id, expires) = self
            .blocking(None, move || {
                let _e = span.entered();
                create_with(&mgr, draft)
            })
            .await?;
        bump(&sh.stats.created);
        self.0.writes.fetch_add(1, Ordering::Relaxed);
        Ok(self.cookie(&id, expires))
    }

    async fn end_loaded(&self, l: LoadedState) -> Result<Option<HeaderValue>, WebError> {
        let sh = self.shared();
        // After the handler: its expiry rule, if it set one, is what gets committed.
        let expires = l.session.expires_at();
        let id = l.session.id().clone();
        let tag = sh.hasher.tag(&id);
        // A new ID, or a cookie that only an old key verified: the client needs a fresh cookie
        // even when nothing is written (as a read-only snapshot's end does).
        let reissue = l.cycled.is_some() || self.0.resign.load(Ordering::Relaxed);
        if l.session.is_dirty() {
            let span = tracing::debug_span!("session.commit", sid = %tag);
            let session = l.session;
            let r = self
                .blocking(None, move || {
                    let _e = span.entered();
                    session.commit()
                })
                .await;
            return match r {
                Ok(()) => {
                    bump(&sh.stats.commits);
                    self.0.writes.fetch_add(1, Ordering::Relaxed);
                    Ok(self.cookie(&id, expires))
                }
                Err(e) => {
                    if e.is_conflict() {
                        bump(&sh.stats.conflicts);
                        tracing::debug!(sid = %tag, "end-of-request commit refused: {}", e);
                    }
                    Err(e)
                }
            };
        }
        if !l.session.access_write_due() {
            // Provably no I/O: the manager coalesces this touch away.
            bump(&sh.stats.touches_skipped);
            let _ = l.session.commit();
            return Ok(reissue.then(|| self.cookie(&id, expires)).flatten());
        }
        let span = tracing::debug_span!("session.touch", sid = %tag);
        let session = l.session;
        let r = self
            .blocking(None, move || session.commit())
            .instrument(span)
            .await;
        bump(&sh.stats.touches);
        self.0.writes.fetch_add(1, Ordering::Relaxed);
        match r {
            // The touch extends the session: refresh the cookie's lifetime with it.
            Ok(()) => Ok(self.cookie(&id, expires)),
            // A failed access-time write does not fail a read-only request.
            Err(_) => Ok(None),
        }
    }

    /// The `Set-Cookie` that gives the client `id` until `expires`: when the session expires
    /// if not used again, by its own expiry rule ([`Session::expires_at`]).
    fn cookie(&self, id: &SessionId, expires: Timestamp) -> Option<HeaderValue> {
        let sh = self.shared();
        sh.cookies.issue(id, sh.mgr.config().clock.now(), expires)
    }
}

impl Drop for RequestSession {
    fn drop(&mut self) {
        // A cancelled request may leave a loaded session behind; dropping it records the access
        // (store I/O) and releases an exclusive hold. Do that off the runtime's workers.
        let st = std::mem::replace(self.state.get_mut(), State::Finished);
        if let State::Loaded(l) = st {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    bump(&self.shared.stats.blocking_tasks);
                    rt.spawn_blocking(move || drop(l));
                }
                Err(_) => drop(l),
            }
        }
    }
}

/// Creates a session whose first record holds `data`. The manager's creation is lazy, so this
/// is one store write: the commit that stores the new session with its data (limits checked by
/// `insert`, as for any other write).
fn create_with(mgr: &SessionManager, draft: Draft) -> crate::Result<(SessionId, Timestamp)> {
    let mut session = mgr.create()?;
    for (key, value) in &draft.data {
        session.insert(key.as_str(), value)?;
    }
    if let Some(e) = draft.expiry {
        session.set_expiry(e);
    }
    let id = session.id().clone();
    let expires = session.expires_at();
    session.commit()?;
    Ok((id, expires))
}

/// Ends a session on the blocking pool: dropping it may write an access time and release a lock.
fn leave_off_worker(sh: &Shared, session: Session) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            bump(&sh.stats.blocking_tasks);
            drop(rt.spawn_blocking(move || drop(session)))
        }
        Err(_) => drop(session),
    }
}

/// The body of a flight: loads, takes the data, and ends the request's access right away
/// (a read-only request's access time is its load time anyway).
///
/// A session loaded by key reads its values here; if a commit replaced them in between (a
/// `Conflict`), the load is repeated on the new version, a few times at most.
fn load_snapshot(sh: &Shared, id: &SessionId) -> crate::Result<Option<Arc<Snapshot>>> {
    const ATTEMPTS: usize = 4;
    let mut attempt = 1;
    loop {
        let Some(session) = sh.mgr.load(id.as_str())? else {
            return Ok(None);
        };
        bump(&sh.stats.loads);
        match snapshot_of(&session) {
            Ok(snap) => {
                end_snapshot_access(sh, session, snap.touched);
                return Ok(Some(Arc::new(snap)));
            }
            Err(crate::Error::Conflict { .. }) if attempt < ATTEMPTS => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// A loaded session's whole data (shared, not copied, when it was loaded whole; read in full
/// when it was loaded by key); `touched` when ending it will write the access time.
fn snapshot_of(session: &Session) -> crate::Result<Snapshot> {
    Ok(Snapshot {
        id: session.id().clone(),
        version: session.version(),
        expires: session.expires_at(),
        data: session.shared_data()?,
        touched: session.access_write_due(),
    })
}

/// Ends a snapshot's access. With `touched` false this does no I/O and takes no lock (the
/// manager coalesces the touch away), so it may run on a runtime worker.
fn end_snapshot_access(sh: &Shared, session: Session, touched: bool) {
    if touched {
        bump(&sh.stats.touches);
        let _s =
            tracing::debug_span!("session.touch", sid = %sh.hasher.tag(session.id())).entered();
        // A failed access-time write does not fail a read-only request.
        let _ = session.commit();
    } else {
        bump(&sh.stats.touches_skipped);
        // Dropping a clean session records its access, here coalesced away (no write due): the
        // same as `commit` without its deadline (a clock read) that nothing here waits for.
        drop(session);
    }
}
