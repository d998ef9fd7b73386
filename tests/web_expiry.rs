//! The session cookie's lifetime over real HTTP: `Max-Age` and `Expires` follow the session's
//! own expiry rule (`Expiry::Idle`, `Expiry::At`), set through the web layer or by the manager,
//! on every path that issues the cookie (new session, end-of-request commit, `transact`,
//! a read whose access-time write is due).

#[path = "web_support/http.rs"]
mod http;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use hyper::{Method, StatusCode};
use locktable::session::{Expiry, ManualClock, SessionConfig, SessionManager, Timestamp};
use locktable::web::{CookieConfig, Key, LazySession, ReadOnlySession, SessionLayer, WebError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// 2023-11-14 22:13:20 UTC.
const START: Timestamp = Timestamp(1_700_000_000_000);

fn at(clock: &ManualClock, secs: u64) -> Expiry {
    use locktable::session::Clock;
    Expiry::At(Timestamp(clock.now().0 + secs * 1000))
}

async fn read(s: ReadOnlySession) -> Result<String, WebError> {
    Ok(s.get::<u64>("a").await?.unwrap_or(0).to_string())
}

async fn incr(s: LazySession) -> Result<String, WebError> {
    let n = s.get::<u64>("a").await?.unwrap_or(0) + 1;
    s.insert("a", &n).await?;
    Ok(n.to_string())
}

/// "Remember me": idle expiry of `secs`, set with the request's other changes.
async fn remember(s: LazySession, Path(secs): Path<u64>) -> Result<String, WebError> {
    s.insert("user", "ann").await?;
    s.set_expiry(Expiry::Idle(Duration::from_secs(secs)))
        .await?;
    Ok("ok".into())
}

/// A fixed end `secs` from now, set with the request's other changes.
async fn until(
    State(clock): State<Arc<ManualClock>>,
    s: LazySession,
    Path(secs): Path<u64>,
) -> Result<String, WebError> {
    s.insert("user", "bob").await?;
    s.set_expiry(at(&clock, secs)).await?;
    Ok("ok".into())
}

/// The same inside a `transact`.
async fn until_txn(
    State(clock): State<Arc<ManualClock>>,
    s: LazySession,
    Path(secs): Path<u64>,
) -> Result<String, WebError> {
    let e = at(&clock, secs);
    s.transact(move |t| {
        t.insert("user", "cy")?;
        t.set_expiry(e);
        Ok(())
    })
    .await?;
    Ok("ok".into())
}

struct Server {
    addr: SocketAddr,
    clock: Arc<ManualClock>,
    mgr: SessionManager,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let cfg = SessionConfig {
        fsync: false,
        clock: clock.clone(),
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new_embedded(dir.path(), cfg).unwrap();
    let layer = SessionLayer::new(
        mgr.clone(),
        CookieConfig::new(Key::generate()).secure(false),
    )
    .unwrap();
    let app = Router::new()
        .route("/get", get(read))
        .route("/incr", post(incr))
        .route("/remember/{secs}", post(remember))
        .route("/until/{secs}", post(until))
        .route("/until-txn/{secs}", post(until_txn))
        .with_state(clock.clone())
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        addr,
        clock,
        mgr,
        _dir: dir,
    }
}

impl Server {
    async fn req(&self, method: Method, path: &str, cookie: Option<&str>) -> http::Resp {
        let r = http::once(self.addr, method, path, cookie).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        r
    }
}

/// `Max-Age` and `Expires` of a `Set-Cookie`.
fn lifetime(r: &http::Resp) -> (String, String) {
    let set = r.set_cookie().expect("a Set-Cookie");
    let attr = |name: &str| {
        set.split(';')
            .map(str::trim)
            .find_map(|a| a.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {set}"))
            .to_string()
    };
    (attr("Max-Age="), attr("Expires="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_rule_gives_the_idle_timeout() {
    let srv = start().await;
    let r = srv.req(Method::POST, "/incr", None).await;
    assert_eq!(
        lifetime(&r),
        ("1800".into(), "Tue, 14 Nov 2023 22:43:20 GMT".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_with_its_own_expiry_gets_a_cookie_that_lives_as_long() {
    let srv = start().await;
    // Idle for 2 hours (within the manager's 24 h lifetime).
    let r = srv.req(Method::POST, "/remember/7200", None).await;
    assert_eq!(
        lifetime(&r),
        ("7200".into(), "Wed, 15 Nov 2023 00:13:20 GMT".into())
    );
    // Idle for 7 days: the manager's maximum lifetime (24 h) still ends it first.
    let r = srv.req(Method::POST, "/remember/604800", None).await;
    assert_eq!(lifetime(&r).0, "86400");
    // A fixed end 30 days away: beyond the manager's limits, by design of `Expiry::At`.
    let r = srv.req(Method::POST, "/until/2592000", None).await;
    assert_eq!(
        lifetime(&r),
        ("2592000".into(), "Thu, 14 Dec 2023 22:13:20 GMT".into())
    );
    let r = srv.req(Method::POST, "/until-txn/90", None).await;
    assert_eq!(
        lifetime(&r),
        ("90".into(), "Tue, 14 Nov 2023 22:14:50 GMT".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_session_that_changes_its_expiry_gets_the_new_lifetime() {
    let srv = start().await;
    let cookie = srv
        .req(Method::POST, "/incr", None)
        .await
        .cookie_pair()
        .unwrap();
    // The end-of-request commit of a loaded session.
    let r = srv.req(Method::POST, "/until/90", Some(&cookie)).await;
    assert_eq!(
        lifetime(&r),
        ("90".into(), "Tue, 14 Nov 2023 22:14:50 GMT".into())
    );
    // A `transact` on the stored session.
    srv.clock.advance(Duration::from_secs(10));
    let r = srv.req(Method::POST, "/until-txn/60", Some(&cookie)).await;
    assert_eq!(
        lifetime(&r),
        ("60".into(), "Tue, 14 Nov 2023 22:14:30 GMT".into())
    );
}

// Before the cookie followed the session's rule, this read got `Max-Age=1800` (the manager's
// idle timeout) for a session that ends in 59 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_touch_refreshes_the_cookie_to_the_sessions_own_end() {
    let srv = start().await;
    let cookie = srv
        .req(Method::POST, "/incr", None)
        .await
        .cookie_pair()
        .unwrap();
    // The rule is set outside the web layer, by the manager (e.g. an admin tool). A signed
    // cookie's value is the signature (44 characters) followed by the session ID.
    let id = &cookie["lt_session=".len() + 44..];
    let end = at(&srv.clock, 90);
    srv.mgr
        .transact(id, |s| {
            s.set_expiry(end);
            Ok(())
        })
        .unwrap()
        .expect("the session exists");
    // Past the touch interval (30 s), a read writes the access time and refreshes the cookie.
    srv.clock.advance(Duration::from_secs(31));
    let r = srv.req(Method::GET, "/get", Some(&cookie)).await;
    assert_eq!(r.body, "1");
    assert_eq!(
        lifetime(&r),
        ("59".into(), "Tue, 14 Nov 2023 22:14:50 GMT".into())
    );
    // Past its end the session is gone, whatever the cookie says.
    srv.clock.advance(Duration::from_secs(60));
    let r = srv.req(Method::GET, "/get", Some(&cookie)).await;
    assert_eq!(r.body, "0");
}
