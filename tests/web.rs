//! The web layer over real HTTP: axum servers on loopback, a hyper client, a real `FileStore`
//! wrapped to count every store call.

#[path = "web_support/http.rs"]
mod http;
mod support;

use axum::extract::{Path, Query};
use axum::routing::{get, post};
use axum::Router;
use http::{once, Resp};
use hyper::{Method, StatusCode};
use locktable::session::{
    Expiry, FileStore, ManualClock, SessionConfig, SessionManager, Timestamp,
};
use locktable::web::{
    CookieConfig, ExclusiveSession, Key, LazySession, Protection, ReadOnlySession, SameSite,
    SessionLayer, WebConfig, WebError,
};
use locktable::{LockTable, TableOptions};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::spy_store::{Call, SpyStore, Watch};

// ---------------------------------------------------------------- a store that counts its calls

#[derive(Debug, Default)]
struct Calls {
    reads: AtomicU64,
    writes: AtomicU64,
    /// Deletions of sessions found expired (the manager removes one on sight).
    expired_removals: AtomicU64,
}

/// Counts every call before it reaches the store.
impl Watch for Calls {
    fn before(&self, call: Call) {
        let counter = match call {
            Call::Load | Call::Meta | Call::LastAccessed | Call::ScanExpired => &self.reads,
            Call::Save | Call::Touch | Call::Delete => &self.writes,
            Call::RemoveExpired => &self.expired_removals,
            Call::Cleanup => return,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- the app under test

async fn read(s: ReadOnlySession, Path(key): Path<String>) -> Result<String, WebError> {
    Ok(s.get::<u64>(&key).await?.unwrap_or(0).to_string())
}

async fn lazy_read(s: LazySession, Path(key): Path<String>) -> Result<String, WebError> {
    Ok(s.get::<u64>(&key).await?.unwrap_or(0).to_string())
}

async fn incr(s: LazySession, Path(key): Path<String>) -> Result<String, WebError> {
    let n = s
        .transact(move |s| {
            let n = s.get::<u64>(&key)?.unwrap_or(0) + 1;
            s.insert(&key, &n)?;
            Ok(n)
        })
        .await?;
    Ok(n.to_string())
}

/// Optimistic read-then-write, with a pause in between to let another request interleave.
async fn set(
    s: LazySession,
    Path((key, value)): Path<(String, u64)>,
    Query(q): Query<HashMap<String, u64>>,
) -> Result<String, WebError> {
    let before = s.get::<u64>(&key).await?.unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(
        q.get("pause_ms").copied().unwrap_or(0),
    ))
    .await;
    s.insert(&key, &value).await?;
    Ok(before.to_string())
}

/// Holds the session's upgradable lock for `ms`, then writes.
async fn exclusive(s: ExclusiveSession, Path(ms): Path<u64>) -> Result<String, WebError> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let n = s.get::<u64>("x").await?.unwrap_or(0) + 1;
    s.insert("x", &n).await?;
    Ok(n.to_string())
}

/// Reads through the read-only view, pauses, then writes through the lazy handle.
async fn read_then_write(
    r: ReadOnlySession,
    s: LazySession,
    Path((key, value)): Path<(String, u64)>,
    Query(q): Query<HashMap<String, u64>>,
) -> Result<String, WebError> {
    let before = r.get::<u64>(&key).await?.unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(
        q.get("pause_ms").copied().unwrap_or(0),
    ))
    .await;
    s.insert(&key, &value).await?;
    Ok(before.to_string())
}

/// A read-modify-write under the session's upgradable lock: cannot conflict.
async fn exclusive_incr(s: ExclusiveSession, Path(key): Path<String>) -> Result<String, WebError> {
    let n = s
        .transact(move |s| {
            let n = s.get::<u64>(&key)?.unwrap_or(0) + 1;
            s.insert(&key, &n)?;
            Ok(n)
        })
        .await?;
    Ok(n.to_string())
}

/// Writes, then fails.
async fn write_then_fail(s: LazySession) -> Result<axum::response::Response, WebError> {
    s.insert("k", &99u64).await?;
    Ok(axum::response::IntoResponse::into_response((
        StatusCode::INTERNAL_SERVER_ERROR,
        "boom",
    )))
}

async fn login(s: LazySession) -> Result<&'static str, WebError> {
    s.cycle_id().await?;
    Ok("ok")
}

async fn logout(s: LazySession) -> Result<&'static str, WebError> {
    s.invalidate().await?;
    Ok("bye")
}

/// Writes under the session's upgradable lock, then panics.
async fn exclusive_then_panic(s: ExclusiveSession) -> Result<&'static str, WebError> {
    s.insert("x", &1000u64).await?;
    panic!("handler panics while holding the session");
}

/// Cycles the ID (as at login), writes, then fails.
async fn login_then_fail(s: LazySession) -> Result<axum::response::Response, WebError> {
    s.cycle_id().await?;
    s.insert("user", &7u64).await?;
    Ok(axum::response::IntoResponse::into_response((
        StatusCode::INTERNAL_SERVER_ERROR,
        "boom",
    )))
}

async fn untouched(_s: LazySession) -> &'static str {
    "hello"
}

fn app(layer: SessionLayer) -> Router {
    Router::new()
        .route("/get/{key}", get(read))
        .route("/lazy-get/{key}", get(lazy_read))
        .route("/incr/{key}", post(incr))
        .route("/set/{key}/{value}", post(set))
        .route("/excl/{ms}", post(exclusive))
        .route("/excl-incr/{key}", post(exclusive_incr))
        .route("/read-then-write/{key}/{value}", post(read_then_write))
        .route("/write-then-fail", post(write_then_fail))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/untouched", get(untouched))
        .route("/excl-panic", post(exclusive_then_panic))
        .route("/login-then-fail", post(login_then_fail))
        .route("/plain", get(|| async { "plain" }))
        .layer(layer)
}

struct Server {
    addr: SocketAddr,
    layer: SessionLayer,
    calls: Arc<Calls>,
    mgr: SessionManager,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Setup {
    dir: PathBuf,
    key: Key,
    cookies: Option<CookieConfig>,
    web: WebConfig,
    session: SessionConfig,
    /// A plain `FileStore`, so the manager's session cache is on (a counting store turns it
    /// off); the store call counters then stay at 0.
    cached: bool,
}

impl Setup {
    fn new(dir: &std::path::Path) -> Setup {
        Setup {
            dir: dir.to_path_buf(),
            key: Key::generate(),
            cookies: None,
            web: WebConfig::default(),
            session: SessionConfig {
                fsync: false,
                ..SessionConfig::default()
            },
            cached: false,
        }
    }

    async fn start(&self) -> Server {
        // Every server opens the directory itself: another attachment, as another process would.
        let table =
            LockTable::open(self.dir.join("locks.table"), &TableOptions::default()).unwrap();
        let calls = Arc::new(Calls::default());
        let store = FileStore::open(self.dir.join("sessions"))
            .unwrap()
            .with_fsync(false);
        let mgr = if self.cached {
            SessionManager::new(table, store, self.session.clone())
        } else {
            let store = SpyStore::new(store, Arc::clone(&calls));
            SessionManager::new(table, store, self.session.clone())
        };
        let cookies = self
            .cookies
            .clone()
            .unwrap_or_else(|| CookieConfig::new(self.key.clone()));
        let layer = SessionLayer::with_config(mgr.clone(), cookies, self.web.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = app(layer.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Server {
            addr,
            layer,
            calls,
            mgr,
            task,
        }
    }
}

impl Server {
    async fn get(&self, path: &str, cookie: Option<&str>) -> Resp {
        once(self.addr, Method::GET, path, cookie).await.unwrap()
    }
    async fn post(&self, path: &str, cookie: Option<&str>) -> Resp {
        once(self.addr, Method::POST, path, cookie).await.unwrap()
    }
    fn writes(&self) -> u64 {
        self.calls.writes.load(Ordering::SeqCst)
    }
    fn store_calls(&self) -> u64 {
        self.writes()
            + self.calls.reads.load(Ordering::SeqCst)
            + self.calls.expired_removals.load(Ordering::SeqCst)
    }
    /// A new session holding `a = 1`; returns its cookie pair.
    async fn new_session(&self) -> String {
        let r = self.post("/incr/a", None).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
        r.cookie_pair().expect("a new session sets its cookie")
    }
}

fn tamper(pair: &str) -> String {
    let mut t = pair.to_string();
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    t
}

// ---------------------------------------------------------------- laziness

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_touches_its_session_does_no_store_io_and_no_lock() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let cookie = srv.new_session().await;
    let before = srv.store_calls();
    let loads = srv.mgr.stats().loads;
    for c in [None, Some(cookie.as_str()), Some(tamper(&cookie).as_str())] {
        for path in ["/plain", "/untouched"] {
            let r = srv.get(path, c).await;
            assert_eq!(r.status, StatusCode::OK);
            assert!(
                r.set_cookie().is_none(),
                "{path}: no cookie for an untouched session"
            );
        }
    }
    assert_eq!(srv.store_calls(), before, "no store call at all");
    assert_eq!(
        srv.mgr.stats().loads,
        loads,
        "no load, hence no lock operation"
    );
    let st = srv.layer.stats();
    assert_eq!(st.requests, 7);
    assert_eq!(
        st.sessions_used, 1,
        "only the creating request used its session"
    );
    assert_eq!(
        st.cookies_rejected, 0,
        "the tampered cookie was never even looked at"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_who_writes_nothing_causes_no_store_write() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    for _ in 0..5 {
        let r = srv.get("/get/a", None).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "0"));
        assert!(r.set_cookie().is_none());
    }
    assert_eq!(srv.store_calls(), 0);
    assert_eq!(srv.layer.stats().created, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_is_stored_in_one_write_with_a_secure_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let r = srv.post("/incr/a", None).await;
    assert_eq!(r.body, "1");
    assert_eq!(srv.writes(), 1, "create and first data: one store write");
    let set = r.set_cookie().unwrap();
    for attr in [
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        "Path=/",
        "Max-Age=1800",
    ] {
        assert!(set.contains(attr), "{attr} missing in {set}");
    }
    assert!(set.starts_with("lt_session="));
    assert_eq!(r.headers.get("cache-control").unwrap(), "no-store");
    assert_eq!(r.headers.get("vary").unwrap(), "cookie");
    let pair = r.cookie_pair().unwrap();
    // 44 characters of base64 HMAC-SHA256, then the 32-character ID.
    assert_eq!(pair.len() - "lt_session=".len(), 44 + 32, "{pair}");
    let r = srv.get("/get/a", Some(&pair)).await;
    assert_eq!(r.body, "1");
    let r = srv.post("/incr/a", Some(&pair)).await;
    assert_eq!(r.body, "2");
    assert_eq!(srv.get("/get/a", Some(&pair)).await.body, "2");
    assert_eq!(srv.layer.stats().max_writes_per_request, 1);
}

// ---------------------------------------------------------------- hostile cookies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_unknown_and_malformed_cookies_get_a_fresh_session_never_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path());
    let srv = setup.start().await;
    let good = srv.new_session().await;
    // An unknown but correctly signed ID: what a server with the key would issue.
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = Setup::new(other_dir.path());
    other.key = setup.key.clone();
    let unknown = other.start().await.new_session().await;
    let hostile = [
        tamper(&good),
        unknown,
        "lt_session=".to_string(),
        "lt_session=../../etc/passwd".to_string(),
        "lt_session=%00%ff;;;==".to_string(),
        format!("lt_session={}", "A".repeat(5000)),
        // The bare ID without its MAC: never adopted.
        format!("lt_session={}", &good["lt_session=".len()..][44..]),
    ];
    for c in &hostile {
        let writes = srv.writes();
        let r = srv.get("/get/a", Some(c)).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "0"), "{c}");
        assert_eq!(
            srv.writes(),
            writes,
            "a reading visitor with a bad cookie writes nothing"
        );
        let r = srv.post("/incr/a", Some(c)).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"), "{c}");
        let fresh = r.cookie_pair().unwrap();
        assert_ne!(&fresh, c);
        assert_ne!(fresh, good);
    }
    // The good session is untouched by all that.
    assert_eq!(srv.get("/get/a", Some(&good)).await.body, "1");
    assert!(srv.layer.stats().cookies_rejected >= hostile.len() as u64);
}

/// Browsers send cookies of other apps of the site in the same `Cookie` header, and a cookie set
/// by script may hold UTF-8 (or any byte): such a neighbour must not hide the session cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_cookie_with_non_ascii_bytes_does_not_hide_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let good = srv.new_session().await;
    let mut conn = http::Conn::open(srv.addr).await.unwrap();
    let g = good.as_bytes();
    for raw in [
        [b"pref=caf\xc3\xa9; ".as_slice(), g].concat(),
        [g, b"; pref=\xff\xfe".as_slice()].concat(),
        // Our own name with a value that is not even UTF-8: skipped like any bad value.
        [b"lt_session=\xff\xfe; ".as_slice(), g].concat(),
    ] {
        let header = (
            hyper::header::COOKIE,
            hyper::header::HeaderValue::from_bytes(&raw).unwrap(),
        );
        let r = conn
            .req_raw(Method::POST, "/incr/a", &[header])
            .await
            .unwrap();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        assert_eq!(r.status, StatusCode::OK, "{shown}");
        assert_ne!(r.body, "1", "the session was not seen: {shown}");
        assert_eq!(r.cookie_pair().as_ref(), Some(&good), "{shown}");
    }
    assert_eq!(srv.get("/get/a", Some(&good)).await.body, "4");
    assert_eq!(srv.layer.stats().created, 1, "no fresh session was made");
}

/// Two of our cookies that both verify: a stale one (here on a more specific `Path`, which
/// browsers send first) naming a deleted session, beside the live one. The live session is
/// used by every view; the stale cookie neither shadows it nor makes a fresh session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cookie_sent_first_does_not_shadow_the_live_session() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let stale = srv.new_session().await;
    assert_eq!(
        srv.post("/logout", Some(&stale)).await.status,
        StatusCode::OK
    );
    let live = srv.new_session().await;
    assert_ne!(stale, live);
    let both = format!("{stale}; {live}");
    // Also as two `Cookie` headers (HTTP/2 clients may split them).
    let split = [
        (
            hyper::header::COOKIE,
            hyper::header::HeaderValue::from_str(&stale).unwrap(),
        ),
        (
            hyper::header::COOKIE,
            hyper::header::HeaderValue::from_str(&live).unwrap(),
        ),
    ];
    let mut conn = http::Conn::open(srv.addr).await.unwrap();
    let r = conn.req_raw(Method::GET, "/get/a", &split).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"), "split");
    for (method, path, want) in [
        (Method::GET, "/get/a", "1"),
        (Method::GET, "/lazy-get/a", "1"),
        (Method::POST, "/incr/a", "2"),
        (Method::POST, "/set/a/5", "2"),
        (Method::POST, "/excl-incr/a", "6"),
        (Method::POST, "/read-then-write/a/8", "6"),
    ] {
        let r = once(srv.addr, method, path, Some(&both)).await.unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, want),
            "{path}"
        );
        if let Some(c) = r.cookie_pair() {
            assert_eq!(c, live, "{path}: the live session's cookie");
        }
    }
    assert_eq!(srv.layer.stats().created, 2, "no fresh session was made");
    assert_eq!(srv.get("/get/a", Some(&live)).await.body, "8");
    // A logout ends the live session.
    let r = srv.post("/logout", Some(&both)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(srv.get("/get/a", Some(&live)).await.body, "0", "logged out");
    // Two live sessions: the first sent is used, and a logout ends both (the other one would
    // otherwise take over on the next request).
    let (first, second) = (srv.new_session().await, srv.new_session().await);
    assert_eq!(srv.post("/incr/a", Some(&second)).await.body, "2");
    let both = format!("{first}; {second}");
    assert_eq!(srv.get("/get/a", Some(&both)).await.body, "1");
    assert_eq!(
        srv.post("/logout", Some(&both)).await.status,
        StatusCode::OK
    );
    assert_eq!(srv.get("/get/a", Some(&first)).await.body, "0");
    assert_eq!(srv.get("/get/a", Some(&second)).await.body, "0");
}

/// Each cookie value of our name costs an HMAC (or AEAD) check: only the first 8 of a request
/// are looked at, so a request with thousands of them does bounded work. A valid cookie after
/// 8 others of our name is ignored (documented on `CookieConfig`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_8_session_cookie_values_are_verified() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let good = srv.new_session().await;
    let bogus = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("lt_session={}{i}", "A".repeat(60)))
            .collect()
    };
    let mut seven = bogus(7);
    seven.push(good.clone());
    assert_eq!(srv.get("/get/a", Some(&seven.join("; "))).await.body, "1");
    // Split over several `Cookie` headers, the count is the same.
    let headers: Vec<_> = seven
        .iter()
        .map(|c| {
            (
                hyper::header::COOKIE,
                hyper::header::HeaderValue::from_str(c).unwrap(),
            )
        })
        .collect();
    let mut conn = http::Conn::open(srv.addr).await.unwrap();
    let r = conn.req_raw(Method::GET, "/get/a", &headers).await.unwrap();
    assert_eq!(r.body, "1");
    let mut eight = bogus(8);
    eight.push(good.clone());
    assert_eq!(srv.get("/get/a", Some(&eight.join("; "))).await.body, "0");
    let mut many = bogus(5000);
    many.push(good.clone());
    let r = srv.get("/get/a", Some(&many.join("; "))).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "0"));
    // Neighbour cookies of other names do not count.
    let mut others: Vec<_> = (0..50).map(|i| format!("other{i}=x")).collect();
    others.push(good.clone());
    assert_eq!(srv.get("/get/a", Some(&others.join("; "))).await.body, "1");
}

/// A cookie name that cannot be sent back as given (not an RFC 6265 token) would leave every
/// session without a cookie: each write a new session. The layer refuses it when built.
#[test]
fn a_cookie_name_that_cannot_work_is_refused_when_the_layer_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = SessionManager::open(dir.path()).unwrap();
    for bad in [
        "",
        "bad name",
        "a=b",
        "a;b",
        "caf\u{e9}",
        "new\nline",
        "x\"y",
        "a,b",
    ] {
        for prefixed in [false, true] {
            let cfg = CookieConfig::new(Key::generate())
                .name(bad)
                .host_prefix(prefixed);
            match SessionLayer::new(mgr.clone(), cfg) {
                Err(locktable::Error::InvalidOptions(msg)) => {
                    assert!(msg.contains("cookie name"), "{bad:?}: {msg}")
                }
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
    }
    for good in ["sid", "my_app-session.v2", "__Secure-x"] {
        let cfg = CookieConfig::new(Key::generate()).name(good);
        SessionLayer::with_config(mgr.clone(), cfg, WebConfig::default()).unwrap();
    }
    // SameSite=None without Secure: browsers drop the cookie, so it is refused too; with
    // Secure, or with the __Host- prefix (which forces Secure), it is fine.
    let none = || CookieConfig::new(Key::generate()).same_site(SameSite::None);
    match SessionLayer::new(mgr.clone(), none().secure(false)) {
        Err(locktable::Error::InvalidOptions(msg)) => {
            assert!(msg.contains("SameSite=None"), "{msg}")
        }
        other => panic!("SameSite=None without Secure accepted: {other:?}"),
    }
    SessionLayer::new(mgr.clone(), none()).unwrap();
    SessionLayer::new(mgr.clone(), none().secure(false).host_prefix(true)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_verify_old_cookies_and_sign_with_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let old = Setup::new(dir.path());
    let srv_old = old.start().await;
    let cookie = srv_old.new_session().await;
    let new_key = Key::generate();
    let mut rotated = Setup::new(dir.path());
    rotated.cookies = Some(CookieConfig::new(new_key.clone()).verify_with(old.key.clone()));
    let srv_rot = rotated.start().await;
    assert_eq!(srv_rot.get("/get/a", Some(&cookie)).await.body, "1");
    // A write re-issues the cookie, now signed with the new key only.
    let r = srv_rot.post("/incr/a", Some(&cookie)).await;
    assert_eq!(r.body, "2");
    let renewed = r.cookie_pair().unwrap();
    let mut only_new = Setup::new(dir.path());
    only_new.key = new_key;
    let srv_new = only_new.start().await;
    assert_eq!(srv_new.get("/get/a", Some(&renewed)).await.body, "2");
    assert_eq!(
        srv_new.get("/get/a", Some(&cookie)).await.body,
        "0",
        "old key retired"
    );
}

/// A cookie that only the old (verification) key accepts is re-signed by the first request that
/// reads the session, whichever view reads it, so the old key can be retired soon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_key_cookie_is_re_signed_by_a_read_through_any_view() {
    let dir = tempfile::tempdir().unwrap();
    let old = Setup::new(dir.path());
    let cookie = old.start().await.new_session().await;
    let new_key = Key::generate();
    let mut rotated = Setup::new(dir.path());
    rotated.cookies = Some(CookieConfig::new(new_key.clone()).verify_with(old.key.clone()));
    let srv_rot = rotated.start().await;
    let mut only_new = Setup::new(dir.path());
    only_new.key = new_key;
    let srv_new = only_new.start().await;
    for path in ["/get/a", "/lazy-get/a"] {
        let r = srv_rot.get(path, Some(&cookie)).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"), "{path}");
        let renewed = r
            .cookie_pair()
            .unwrap_or_else(|| panic!("{path}: not re-signed"));
        assert_eq!(
            srv_new.get("/get/a", Some(&renewed)).await.body,
            "1",
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_and_host_prefixed_cookies() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Setup::new(dir.path());
    s.cookies = Some(
        CookieConfig::new(s.key.clone())
            .protection(Protection::Private)
            .secure(false)
            .host_prefix(true),
    );
    let srv = s.start().await;
    let r = srv.post("/incr/a", None).await;
    let set = r.set_cookie().unwrap();
    assert!(set.starts_with("__Host-lt_session="), "{set}");
    assert!(set.contains("Secure") && set.contains("Path=/") && !set.contains("Domain"));
    let pair = r.cookie_pair().unwrap();
    assert_eq!(srv.get("/get/a", Some(&pair)).await.body, "1");
    // The same value under the unprefixed name is not ours.
    let bare = pair.replacen("__Host-", "", 1);
    assert_eq!(srv.get("/get/a", Some(&bare)).await.body, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000_000)));
    let mut s = Setup::new(dir.path());
    s.session.clock = clock.clone();
    s.session.idle_timeout = Duration::from_secs(60);
    let srv = s.start().await;
    let cookie = srv.new_session().await;
    clock.advance(Duration::from_secs(30));
    assert_eq!(srv.get("/get/a", Some(&cookie)).await.body, "1");
    clock.advance(Duration::from_secs(61));
    let writes = srv.writes();
    let r = srv.get("/get/a", Some(&cookie)).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "0"));
    assert_eq!(
        srv.writes(),
        writes,
        "an expired session is not revived by a read"
    );
    // The read that saw it expired deleted it then and there (no clock step can revive it).
    assert_eq!(srv.calls.expired_removals.load(Ordering::SeqCst), 1);
    let r = srv.post("/incr/a", Some(&cookie)).await;
    assert_eq!(r.body, "1");
    assert_ne!(r.cookie_pair().unwrap(), cookie);
    // Max-Age follows the configured idle timeout.
    assert!(r.set_cookie().unwrap().contains("Max-Age=60"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_is_written_once_per_interval_and_refreshes_the_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000_000)));
    let mut s = Setup::new(dir.path());
    s.session.clock = clock.clone();
    let srv = s.start().await;
    let cookie = srv.new_session().await;
    let writes = srv.writes();
    for _ in 0..5 {
        let r = srv.get("/get/a", Some(&cookie)).await;
        assert!(r.set_cookie().is_none(), "coalesced: nothing to refresh");
    }
    assert_eq!(srv.writes(), writes, "within the interval: no touch");
    clock.advance(Duration::from_secs(31));
    let r = srv.get("/get/a", Some(&cookie)).await;
    assert_eq!(srv.writes(), writes + 1, "one touch");
    assert!(r.set_cookie().unwrap().contains("Max-Age=1800"));
    srv.get("/get/a", Some(&cookie)).await;
    assert_eq!(srv.writes(), writes + 1);
    assert_eq!(srv.layer.stats().touches, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_hot_session_hand_nothing_to_the_blocking_pool_and_stay_current() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000_000)));
    let mut s = Setup::new(dir.path());
    s.session.clock = clock.clone();
    s.cached = true;
    let srv = s.start().await;
    let cookie = srv.new_session().await;
    // The first read misses the cache: loaded on the blocking pool, which fills the cache.
    assert_eq!(srv.get("/get/a", Some(&cookie)).await.body, "1");
    let (before, hits) = (srv.layer.stats(), srv.mgr.stats().cache_hits);
    for path in ["/get/a", "/lazy-get/a"] {
        for _ in 0..5 {
            let r = srv.get(path, Some(&cookie)).await;
            assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"), "{path}");
            assert!(
                r.set_cookie().is_none(),
                "coalesced touch: nothing to refresh"
            );
        }
    }
    let after = srv.layer.stats();
    assert_eq!(after.blocking_tasks, before.blocking_tasks, "no hand-off");
    assert_eq!(after.loads, before.loads + 10);
    assert_eq!(after.touches_skipped, before.touches_skipped + 10);
    assert_eq!(srv.mgr.stats().cache_hits, hits + 10);

    // A commit changes the session: the next reads see it (the cached copy is dropped).
    assert_eq!(srv.post("/incr/a", Some(&cookie)).await.body, "2");
    assert_eq!(srv.get("/get/a", Some(&cookie)).await.body, "2");
    assert_eq!(srv.get("/lazy-get/a", Some(&cookie)).await.body, "2");

    // A due touch on a cache hit is still written (on the blocking pool), once, and refreshes
    // the cookie; the reads after it hand off nothing again.
    clock.advance(Duration::from_secs(31));
    let before = srv.layer.stats();
    let r = srv.get("/get/a", Some(&cookie)).await;
    assert_eq!(r.body, "2");
    assert!(r.set_cookie().unwrap().contains("Max-Age=1800"));
    let mid = srv.layer.stats();
    assert_eq!(mid.touches, before.touches + 1);
    assert_eq!(mid.blocking_tasks, before.blocking_tasks + 1);
    assert_eq!(srv.get("/lazy-get/a", Some(&cookie)).await.body, "2");
    assert_eq!(srv.get("/get/a", Some(&cookie)).await.body, "2");
    let end = srv.layer.stats();
    assert_eq!(
        (end.touches, end.blocking_tasks),
        (mid.touches, mid.blocking_tasks)
    );
}

// A session with a short idle expiry has a shorter touch interval (a 60th of its idle time)
// than the manager's default. The layer decided "no touch due" by the default interval, so it
// ended such a read inline on a runtime worker while the manager wrote the access time there,
// and did not refresh the cookie. The session's own rule now decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_due_by_a_sessions_own_expiry_runs_off_the_worker_and_refreshes_the_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000_000)));
    let mut s = Setup::new(dir.path());
    s.session.clock = clock.clone();
    let srv = s.start().await;
    let cookie = srv.new_session().await;
    let id = &cookie[cookie.len() - 32..];
    let mut session = srv.mgr.load(id).unwrap().unwrap();
    session.set_expiry(Expiry::Idle(Duration::from_secs(120))); // touch interval 2 s
    session.commit().unwrap();
    for path in ["/lazy-get/a", "/get/a"] {
        clock.advance(Duration::from_secs(5));
        let (writes, before) = (srv.writes(), srv.layer.stats());
        let r = srv.get(path, Some(&cookie)).await;
        assert_eq!(r.body, "1", "{path}");
        let after = srv.layer.stats();
        assert_eq!(srv.writes(), writes + 1, "{path}: one touch");
        assert_eq!(
            after.blocking_tasks,
            before.blocking_tasks + 2 - u64::from(path == "/get/a"),
            "{path}: the load and the touch (one job for a read-only flight) off the worker"
        );
        assert!(
            r.set_cookie().is_some(),
            "{path}: the touch refreshes the cookie"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycle_id_reissues_the_cookie_and_invalidate_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let cookie = srv.new_session().await;
    let r = srv.post("/login", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK);
    let cycled = r.cookie_pair().unwrap();
    assert_ne!(cycled, cookie);
    assert_eq!(srv.get("/get/a", Some(&cycled)).await.body, "1");
    assert_eq!(
        srv.get("/get/a", Some(&cookie)).await.body,
        "0",
        "old ID is gone"
    );
    let r = srv.post("/logout", Some(&cycled)).await;
    let set = r.set_cookie().unwrap();
    assert!(set.contains("Max-Age=0"), "{set}");
    assert_eq!(srv.get("/get/a", Some(&cycled)).await.body, "0");
}

/// A logout whose delete fails (here: the session's lock stays busy past the manager's
/// timeout, so nothing was deleted) must not clear the cookie: the session lives on, and the
/// client must keep the cookie to retry the logout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_that_failed_keeps_the_cookie_for_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::new(dir.path());
    setup.session.lock_timeout = Duration::from_millis(200);
    let srv = setup.start().await;
    let cookie = srv.new_session().await;
    let (addr, c1) = (srv.addr, cookie.clone());
    let holder = tokio::spawn(async move {
        once(addr, Method::POST, "/excl/800", Some(&c1))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = srv.post("/logout", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.set_cookie(), None, "the session was not deleted");
    assert_eq!(holder.await.unwrap().body, "1");
    assert_eq!(
        srv.get("/get/a", Some(&cookie)).await.body,
        "1",
        "still alive"
    );
    // The retry logs out.
    let r = srv.post("/logout", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.set_cookie().unwrap().contains("Max-Age=0"));
    assert_eq!(srv.get("/get/a", Some(&cookie)).await.body, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_stores_none_of_its_changes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    // No session yet: nothing is created.
    let r = srv.post("/write-then-fail", None).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.set_cookie().is_none());
    assert_eq!(srv.writes(), 0);
    // An existing session: its change is dropped.
    let cookie = srv.new_session().await;
    let writes = srv.writes();
    let r = srv.post("/write-then-fail", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(srv.get("/get/k", Some(&cookie)).await.body, "0");
    assert_eq!(
        srv.writes(),
        writes,
        "no data write (and no touch within the interval)"
    );
}

/// `cycle_id` moves the session at once; a handler that then writes and fails (5xx) drops its
/// writes, but the client must still learn the new ID: its old one is dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_after_cycle_id_still_hands_out_the_new_id() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let cookie = srv.new_session().await;
    let r = srv.post("/login-then-fail", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        srv.get("/get/a", Some(&cookie)).await.body,
        "0",
        "old ID is gone"
    );
    let cycled = r.cookie_pair().expect("the new ID's cookie");
    assert_ne!(cycled, cookie);
    assert_eq!(srv.get("/get/a", Some(&cycled)).await.body, "1");
    assert_eq!(
        srv.get("/get/user", Some(&cycled)).await.body,
        "0",
        "the failed handler's write is dropped"
    );
}

/// A handler that panics while it holds the session's upgradable lock: the connection dies,
/// its write is dropped, and the next request of the session is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_releases_the_session_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let cookie = srv.new_session().await;
    assert!(once(srv.addr, Method::POST, "/excl-panic", Some(&cookie))
        .await
        .is_err());
    let t = Instant::now();
    let r = srv.post("/excl/0", Some(&cookie)).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(srv.get("/get/a", Some(&cookie)).await.body, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_request_of_a_new_visitor_creates_the_session_in_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let r = srv.post("/excl/0", None).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
    assert_eq!(srv.writes(), 1);
    let cookie = r.cookie_pair().unwrap();
    let r = srv.post("/excl/0", Some(&cookie)).await;
    assert_eq!(r.body, "2");
    assert_eq!(srv.get("/get/x", Some(&cookie)).await.body, "2");
}

// ---------------------------------------------------------------- conflicts and waits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_of_request_conflict_is_409_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let cookie = srv.new_session().await;
    let (addr, c1) = (srv.addr, cookie.clone());
    let slow = tokio::spawn(async move {
        once(addr, Method::POST, "/set/k/1?pause_ms=400", Some(&c1))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fast = srv.post("/set/k/2", Some(&cookie)).await;
    assert_eq!(fast.status, StatusCode::OK);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, StatusCode::CONFLICT, "{}", slow.body);
    assert_eq!(
        srv.get("/get/k", Some(&cookie)).await.body,
        "2",
        "no silent overwrite"
    );
    assert_eq!(srv.layer.stats().conflicts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conflict_status_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Setup::new(dir.path());
    s.web.conflict_status = StatusCode::PRECONDITION_FAILED;
    let srv = s.start().await;
    let cookie = srv.new_session().await;
    let (addr, c1) = (srv.addr, cookie.clone());
    let slow = tokio::spawn(async move {
        once(addr, Method::POST, "/set/k/1?pause_ms=400", Some(&c1))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    srv.post("/set/k/2", Some(&cookie)).await;
    assert_eq!(slow.await.unwrap().status, StatusCode::PRECONDITION_FAILED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_wait_past_the_timeout_is_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Setup::new(dir.path());
    s.web.lock_timeout = Duration::from_millis(200);
    s.web.retry_after = Duration::from_secs(2);
    let srv = s.start().await;
    let cookie = srv.new_session().await;
    let (addr, c1) = (srv.addr, cookie.clone());
    let holder = tokio::spawn(async move {
        once(addr, Method::POST, "/excl/1200", Some(&c1))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = Instant::now();
    let r = srv.post("/excl/0", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.headers.get("retry-after").unwrap(), "2");
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    // Plain reads go on meanwhile.
    assert_eq!(
        srv.get("/get/a", Some(&cookie)).await.status,
        StatusCode::OK
    );
    assert_eq!(holder.await.unwrap().body, "1");
    assert!(srv.layer.stats().timeouts >= 1);
}

/// A request that waits for a lock and is then dropped (its client hung up) must never end up
/// holding the lock: the next exclusive request gets it as soon as the first holder leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_while_waiting_never_keeps_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let cookie = srv.new_session().await;
    let (addr, c1) = (srv.addr, cookie.clone());
    let holder = tokio::spawn(async move {
        once(addr, Method::POST, "/excl/700", Some(&c1))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Several waiters that give up (their connections close) while the holder holds.
    for _ in 0..4 {
        let quit = tokio::time::timeout(
            Duration::from_millis(100),
            once(srv.addr, Method::POST, "/excl/0", Some(&cookie)),
        )
        .await;
        assert!(
            quit.is_err(),
            "the waiter cannot be served while the holder holds"
        );
    }
    assert_eq!(holder.await.unwrap().body, "1");
    let t = Instant::now();
    let r = srv.post("/excl/0", Some(&cookie)).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "2"),
        "abandoned waiters wrote nothing"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Nobody holds anything once the requests are over.
    let table = LockTable::open(dir.path().join("locks.table"), &TableOptions::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let holders = table.stats().unwrap().holders;
        if holders.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left holding: {holders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- no lost updates

/// Many concurrent increments of one session, of distinct keys and of one shared key, through
/// two servers on one directory (two attachments, as two processes): every acknowledged
/// increment is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_of_one_session_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path());
    let a = setup.start().await;
    let b = setup.start().await;
    let cookie = a.new_session().await; // a = 1
    let keys = ["k0", "k1", "k2", "k3", "shared"];
    let mut tasks = Vec::new();
    for i in 0..100 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let key = if i % 3 == 0 { "shared" } else { keys[i % 4] };
        // Some increments hold the session's upgradable lock instead of retrying.
        let route = if i % 7 == 0 { "excl-incr" } else { "incr" };
        let c = cookie.clone();
        tasks.push(tokio::spawn(async move {
            let r = once(addr, Method::POST, &format!("/{route}/{key}"), Some(&c))
                .await
                .unwrap();
            (key, r.status)
        }));
        if i % 10 == 0 {
            let c = cookie.clone();
            tasks.push(tokio::spawn(async move {
                let r = once(addr, Method::GET, "/get/shared", Some(&c))
                    .await
                    .unwrap();
                ("read", r.status)
            }));
        }
    }
    let mut acked: HashMap<&str, u64> = HashMap::new();
    for t in tasks {
        let (key, status) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{key}");
        if key != "read" {
            *acked.entry(key).or_default() += 1;
        }
    }
    for (key, n) in &acked {
        let got: u64 = a
            .get(&format!("/get/{key}"), Some(&cookie))
            .await
            .body
            .parse()
            .unwrap();
        assert_eq!(got, *n, "key {key}: {n} acknowledged");
    }
    assert_eq!(a.get("/get/a", Some(&cookie)).await.body, "1");
    let retries = a.layer.stats().transact_retries + b.layer.stats().transact_retries;
    eprintln!("acked {acked:?}, transact retries {retries}");
}

// ---------------------------------------------------------------- shared read-only loads

/// Read-only loads of one session are shared between requests that arrive together, yet every
/// read sees every commit that finished before the read was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_read_only_loads_still_read_every_finished_commit() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let cookie = srv.new_session().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..16 {
        let (addr, c, stop) = (srv.addr, cookie.clone(), Arc::clone(&stop));
        readers.push(tokio::spawn(async move {
            let mut conn = http::Conn::open(addr).await.unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = conn.req(Method::GET, "/get/a", Some(&c)).await.unwrap();
                assert_eq!(r.status, StatusCode::OK);
                n += 1;
            }
            n
        }));
    }
    for expect in 2..=31u64 {
        let r = srv.post("/incr/a", Some(&cookie)).await;
        assert_eq!(r.body, expect.to_string());
        let r = srv.get("/get/a", Some(&cookie)).await;
        assert_eq!(
            r.body,
            expect.to_string(),
            "a read after an acknowledged increment"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut reads = 30;
    for r in readers {
        reads += r.await.unwrap();
    }
    let st = srv.layer.stats();
    eprintln!("{reads} read-only requests, {} loads", st.loads);
    assert!(
        st.loads < reads,
        "concurrent readers shared loads ({} loads for {reads} reads)",
        st.loads
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_read_only_snapshot_is_refused_if_the_session_changed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Setup::new(dir.path()).start().await;
    let cookie = srv.new_session().await;
    // Nothing changed in between: the write goes through.
    let r = srv.post("/read-then-write/k/7", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(srv.get("/get/k", Some(&cookie)).await.body, "7");
    // Another request commits while this one works on its snapshot: refused, nothing written.
    let (addr, c1) = (srv.addr, cookie.clone());
    let slow = tokio::spawn(async move {
        once(
            addr,
            Method::POST,
            "/read-then-write/k/8?pause_ms=400",
            Some(&c1),
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(srv.post("/incr/a", Some(&cookie)).await.body, "2");
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, StatusCode::CONFLICT, "{}", slow.body);
    assert_eq!(srv.get("/get/k", Some(&cookie)).await.body, "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gc_task_deletes_expired_sessions_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000_000)));
    let mut s = Setup::new(dir.path());
    s.session.clock = clock.clone();
    s.session.idle_timeout = Duration::from_secs(60);
    let srv = s.start().await;
    let old = srv.new_session().await;
    let _other = srv.new_session().await;
    clock.advance(Duration::from_secs(61));
    let live = srv.new_session().await;
    let gc = srv.layer.spawn_gc(Duration::from_millis(20));
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.layer.stats().gc_deleted < 2 {
        assert!(
            Instant::now() < deadline,
            "gc did not run: {:?}",
            srv.layer.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gc.abort();
    let st = srv.layer.stats();
    assert!(st.gc_runs >= 1);
    assert_eq!(st.gc_deleted, 2, "exactly the two expired sessions");
    assert_eq!(srv.get("/get/a", Some(&live)).await.body, "1");
    assert_eq!(srv.get("/get/a", Some(&old)).await.body, "0");
}
