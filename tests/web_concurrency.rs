//! The web layer's concurrency and lifecycle over real HTTP: one session hit at once through
//! every view, handlers cut by a timeout outside or inside the layer, graceful shutdown with
//! requests in flight, logout after a read with several cookies, and `transact` under
//! contention. Every wait of a test is bounded, so that a hang fails instead.

#[path = "web_support/http.rs"]
mod http;
mod support;

use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{once, Resp};
use hyper::{Method, StatusCode};
use locktable::session::{FileStore, SessionConfig, SessionManager};
use locktable::web::{
    CookieConfig, ExclusiveSession, Key, LazySession, ReadOnlySession, SessionLayer, WebConfig,
    WebError,
};
use locktable::{LockTable, TableOptions};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::spy_store::{Call, SpyStore, Watch};

/// Bound of every whole test body.
const TEST_BOUND: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- handlers

async fn read(s: ReadOnlySession, Path(key): Path<String>) -> Result<String, WebError> {
    Ok(s.get::<u64>(&key).await?.unwrap_or(0).to_string())
}

/// Optimistic read-modify-write committed at the end of the request (409 on a conflict).
async fn lazy_incr(s: LazySession, Path(key): Path<String>) -> Result<String, WebError> {
    let n = s.get::<u64>(&key).await?.unwrap_or(0) + 1;
    tokio::time::sleep(Duration::from_millis(2)).await;
    s.insert(&key, &n).await?;
    Ok(n.to_string())
}

/// Read-modify-write under the session's upgradable lock, held a little while.
async fn excl_incr(s: ExclusiveSession, Path(key): Path<String>) -> Result<String, WebError> {
    let n = s.get::<u64>(&key).await?.unwrap_or(0) + 1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.insert(&key, &n).await?;
    Ok(n.to_string())
}

/// `transact`, answering "value attempts" (how often the closure ran).
async fn txn_incr(s: LazySession, Path(key): Path<String>) -> Result<String, WebError> {
    let runs = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&runs);
    let n = s
        .transact(move |s| {
            r.fetch_add(1, Ordering::Relaxed);
            let n = s.get::<u64>(&key)?.unwrap_or(0) + 1;
            s.insert(&key, &n)?;
            Ok(n)
        })
        .await?;
    Ok(format!("{n} {}", runs.load(Ordering::Relaxed)))
}

/// Writes `h1`, then hangs forever before writing `h2`.
async fn hang_between_writes(s: LazySession) -> Result<&'static str, WebError> {
    s.insert("h1", &1u64).await?;
    std::future::pending::<()>().await;
    s.insert("h2", &1u64).await?;
    Ok("unreachable")
}

/// Takes the upgradable lock, writes, then hangs forever.
async fn hang_exclusive(s: ExclusiveSession) -> Result<&'static str, WebError> {
    s.insert("x", &1u64).await?;
    std::future::pending::<()>().await;
    Ok("unreachable")
}

/// Holds the upgradable lock for `ms`, then increments `x`.
async fn slow_excl(s: ExclusiveSession, Path(ms): Path<u64>) -> Result<String, WebError> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let n = s.get::<u64>("x").await?.unwrap_or(0) + 1;
    s.insert("x", &n).await?;
    Ok(n.to_string())
}

/// Optimistic write of `y` after a pause.
async fn slow_lazy(s: LazySession, Path(ms): Path<u64>) -> Result<String, WebError> {
    let n = s.get::<u64>("y").await?.unwrap_or(0) + 1;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    s.insert("y", &n).await?;
    Ok(n.to_string())
}

async fn new_session(s: LazySession) -> Result<&'static str, WebError> {
    s.insert("a", &1u64).await?;
    Ok("new")
}

async fn lazy_read_then_logout(s: LazySession) -> Result<String, WebError> {
    let a = s.get::<u64>("a").await?.unwrap_or(0);
    s.invalidate().await?;
    Ok(a.to_string())
}

async fn ro_read_then_logout(r: ReadOnlySession, s: LazySession) -> Result<String, WebError> {
    let a = r.get::<u64>("a").await?.unwrap_or(0);
    s.invalidate().await?;
    Ok(a.to_string())
}

async fn excl_read_then_logout(s: ExclusiveSession) -> Result<String, WebError> {
    let a = s.get::<u64>("a").await?.unwrap_or(0);
    s.invalidate().await?;
    Ok(a.to_string())
}

async fn txn_then_logout(s: LazySession) -> Result<String, WebError> {
    let a = s.transact(|s| Ok(s.get::<u64>("a")?.unwrap_or(0))).await?;
    s.invalidate().await?;
    Ok(a.to_string())
}

/// `tokio::time::timeout` around the rest of the stack, answering `status` when it fires.
async fn cut(State(limit): State<(Duration, StatusCode)>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit.0, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (limit.1, "timed out\n").into_response(),
    }
}

fn routes() -> Router {
    Router::new()
        .route("/ro/{key}", get(read))
        .route("/lazy-incr/{key}", post(lazy_incr))
        .route("/excl-incr/{key}", post(excl_incr))
        .route("/txn-incr/{key}", post(txn_incr))
        .route("/hang", post(hang_between_writes))
        .route("/hang-excl", post(hang_exclusive))
        .route("/slow-excl/{ms}", post(slow_excl))
        .route("/slow-lazy/{ms}", post(slow_lazy))
        .route("/new", post(new_session))
        .route("/logout/lazy", post(lazy_read_then_logout))
        .route("/logout/ro", post(ro_read_then_logout))
        .route("/logout/excl", post(excl_read_then_logout))
        .route("/logout/txn", post(txn_then_logout))
}

/// Where a timeout layer goes.
#[derive(Clone, Copy)]
enum Cut {
    None,
    /// Around the session layer: the whole request future is dropped.
    Outside(Duration, StatusCode),
    /// Between the session layer and the handler: the layer ends the request with the
    /// timeout's answer.
    Inside(Duration, StatusCode),
}

/// A store whose saves can be slowed down.
#[derive(Debug, Default)]
struct SlowSaves {
    save_ms: AtomicU64,
    saves: AtomicU64,
}

impl Watch for SlowSaves {
    fn before(&self, call: Call) {
        if call == Call::Save {
            self.saves.fetch_add(1, Ordering::SeqCst);
            let ms = self.save_ms.load(Ordering::SeqCst);
            if ms > 0 {
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
    }
}

struct Server {
    addr: SocketAddr,
    layer: SessionLayer,
    slow: Arc<SlowSaves>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn manager(dir: &std::path::Path, cfg: SessionConfig, slow: Arc<SlowSaves>) -> SessionManager {
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    let store = FileStore::open(dir.join("sessions"))
        .unwrap()
        .with_fsync(false);
    SessionManager::new(table, SpyStore::new(store, slow), cfg)
}

fn session_cfg() -> SessionConfig {
    SessionConfig {
        fsync: false,
        ..SessionConfig::default()
    }
}

async fn start(
    dir: &std::path::Path,
    key: &Key,
    cfg: SessionConfig,
    web: WebConfig,
    cut_at: Cut,
    shutdown: Option<tokio::sync::oneshot::Receiver<()>>,
) -> Server {
    let slow = Arc::new(SlowSaves::default());
    let mgr = manager(dir, cfg, Arc::clone(&slow));
    let layer = SessionLayer::with_config(mgr, CookieConfig::new(key.clone()), web).unwrap();
    let router = match cut_at {
        Cut::None => routes().layer(layer.clone()),
        Cut::Outside(d, s) => routes()
            .layer(layer.clone())
            .layer(middleware::from_fn_with_state((d, s), cut)),
        Cut::Inside(d, s) => routes()
            .layer(middleware::from_fn_with_state((d, s), cut))
            .layer(layer.clone()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, router);
        match shutdown {
            None => serve.await.unwrap(),
            Some(rx) => serve
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap(),
        }
    });
    Server {
        addr,
        layer,
        slow,
        task,
    }
}

/// `start` with a fresh key, the default web configuration and no graceful shutdown.
async fn start_simple(dir: &std::path::Path, cfg: SessionConfig, cut_at: Cut) -> Server {
    start(
        dir,
        &Key::generate(),
        cfg,
        WebConfig::default(),
        cut_at,
        None,
    )
    .await
}

impl Server {
    async fn req(&self, method: Method, path: &str, cookie: Option<&str>) -> Resp {
        once(self.addr, method, path, cookie).await.unwrap()
    }
    /// Sends a request from a task of its own; the task answers the response and how long it
    /// took.
    fn spawn_req(
        &self,
        method: Method,
        path: String,
        cookie: &str,
    ) -> tokio::task::JoinHandle<(Resp, Duration)> {
        let (addr, c) = (self.addr, cookie.to_owned());
        tokio::spawn(async move {
            let t = Instant::now();
            let r = once(addr, method, &path, Some(&c)).await.unwrap();
            (r, t.elapsed())
        })
    }
    async fn new_session(&self) -> String {
        let r = self.req(Method::POST, "/new", None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.cookie_pair().unwrap()
    }
    async fn value(&self, key: &str, cookie: &str) -> u64 {
        let r = self
            .req(Method::GET, &format!("/ro/{key}"), Some(cookie))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body.parse().unwrap()
    }
}

/// Waits (bounded) until no process holds anything in the table of `dir`, opened afresh.
async fn assert_no_holders(dir: &std::path::Path) {
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let holders = table.stats().unwrap().holders;
        if holders.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left holding: {holders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_BOUND, f)
        .await
        .expect("the test hung");
}

// ---------------------------------------------------------------- 1. mixed views at once

/// Many requests of one session at once, through all three views and `transact`, some on
/// one hot key: every 200 is stored, nothing else is; 409 only from the optimistic
/// end-of-request commit; 503 always with `Retry-After`; no request waits past the layer's
/// load bound plus the manager's commit bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_views_of_one_session_lose_no_acknowledged_write() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = session_cfg();
        cfg.lock_timeout = Duration::from_millis(1500);
        let web = WebConfig {
            lock_timeout: Duration::from_millis(400),
            ..WebConfig::default()
        };
        let srv = start(dir.path(), &Key::generate(), cfg, web, Cut::None, None).await;
        let cookie = srv.new_session().await;
        let mut tasks = Vec::new();
        for i in 0..160usize {
            let route = ["ro", "lazy-incr", "excl-incr", "txn-incr"][i % 4];
            let key = if i % 3 == 0 {
                "hot"
            } else {
                ["k0", "k1"][i % 2]
            };
            let method = if route == "ro" {
                Method::GET
            } else {
                Method::POST
            };
            let task = srv.spawn_req(method, format!("/{route}/{key}"), &cookie);
            tasks.push((route, key, task));
        }
        let mut acked: HashMap<&str, u64> = HashMap::new();
        let mut statuses: HashMap<(&str, u16), u64> = HashMap::new();
        for (route, key, t) in tasks {
            let (r, took) = t.await.unwrap();
            *statuses.entry((route, r.status.as_u16())).or_default() += 1;
            // A load waits at most 400 ms, a commit at most 1.5 s (the manager's bound).
            assert!(took < Duration::from_secs(4), "{route}: {took:?}");
            match r.status {
                StatusCode::OK => {
                    if route != "ro" {
                        *acked.entry(key).or_default() += 1;
                    }
                }
                StatusCode::CONFLICT => assert_eq!(route, "lazy-incr", "{}", r.body),
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert!(r.headers.get("retry-after").is_some(), "{route}")
                }
                s => panic!("{route}: {s} {}", r.body),
            }
        }
        eprintln!("statuses {statuses:?}, stats {:?}", srv.layer.stats());
        for key in ["hot", "k0", "k1"] {
            let want = acked.get(key).copied().unwrap_or(0);
            assert_eq!(srv.value(key, &cookie).await, want, "key {key}");
        }
        assert_no_holders(dir.path()).await;
    })
    .await
}

// ---------------------------------------------------------------- 2. timeout layers

/// A timeout around the session layer drops the whole request: the handler's writes are not
/// stored, and a held upgradable lock is released at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_outside_the_layer_stores_nothing_and_releases_the_lock() {
    let cut_at = Cut::Outside(Duration::from_millis(200), StatusCode::REQUEST_TIMEOUT);
    hanging_handlers_cut_store_nothing_and_release_the_lock(cut_at).await
}

/// A timeout inside the session layer that answers 5xx: the layer ends the request, stores
/// none of the cut handler's changes, and releases its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_inside_the_layer_answering_5xx_stores_nothing_and_releases_the_lock() {
    let cut_at = Cut::Inside(Duration::from_millis(200), StatusCode::GATEWAY_TIMEOUT);
    hanging_handlers_cut_store_nothing_and_release_the_lock(cut_at).await
}

/// Both hanging handlers (one optimistic after a write, one holding the upgradable lock) are
/// cut by `cut_at`, which answers its status; after each, a request that takes the upgradable
/// lock gets it at once and the cut handler's write is not stored.
async fn hanging_handlers_cut_store_nothing_and_release_the_lock(cut_at: Cut) {
    let (Cut::Outside(_, status) | Cut::Inside(_, status)) = cut_at else {
        panic!("a cut is needed")
    };
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let srv = start_simple(dir.path(), session_cfg(), cut_at).await;
        let cookie = srv.new_session().await;
        for path in ["/hang", "/hang-excl"] {
            let r = srv.req(Method::POST, path, Some(&cookie)).await;
            assert_eq!(r.status, status, "{path}");
            let t = Instant::now();
            let r = srv.req(Method::POST, "/slow-excl/0", Some(&cookie)).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{path}: {:?}",
                t.elapsed()
            );
            assert_eq!(srv.value("h1", &cookie).await, 0, "{path}");
        }
        assert_eq!(
            srv.value("x", &cookie).await,
            2,
            "only the finished requests' writes"
        );
        assert_no_holders(dir.path()).await;
    })
    .await
}

/// A timeout around the layer that fires while the end-of-request commit runs: the commit
/// (already handed to the blocking pool) lands exactly once, and the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_during_the_commit_applies_it_once_and_releases_the_lock() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let cut_at = Cut::Outside(Duration::from_millis(300), StatusCode::REQUEST_TIMEOUT);
        let srv = start_simple(dir.path(), session_cfg(), cut_at).await;
        let cookie = srv.new_session().await;
        srv.slow.save_ms.store(600, Ordering::SeqCst);
        let saves = srv.slow.saves.load(Ordering::SeqCst);
        let r = srv.req(Method::POST, "/slow-excl/0", Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::REQUEST_TIMEOUT);
        srv.slow.save_ms.store(0, Ordering::SeqCst);
        // The commit goes on after the answer; the next request (under the same 300 ms cut)
        // waits for the rest of it, then sees it.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = srv.req(Method::POST, "/slow-excl/0", Some(&cookie)).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "2"),
            "applied once"
        );
        assert_eq!(srv.slow.saves.load(Ordering::SeqCst), saves + 2);
        assert_no_holders(dir.path()).await;
    })
    .await
}

// ---------------------------------------------------------------- 3. graceful shutdown

/// Requests in flight when a graceful shutdown begins finish: acknowledged commits are
/// stored, the optimistic ones conflict cleanly, and no lock is left held afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_sessions_commit_and_leaves_no_lock() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut srv = start(
            dir.path(),
            &key,
            session_cfg(),
            WebConfig::default(),
            Cut::None,
            Some(rx),
        )
        .await;
        let cookie = srv.new_session().await;
        let mut tasks = Vec::new();
        for path in [
            "/slow-excl/400",
            "/slow-excl/100",
            "/slow-lazy/300",
            "/slow-lazy/200",
            "/txn-incr/z",
            "/excl-incr/z",
        ] {
            tasks.push((path, srv.spawn_req(Method::POST, path.to_owned(), &cookie)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(()).unwrap();
        let mut acked: HashMap<char, u64> = HashMap::new();
        for (path, t) in tasks {
            let (r, _) = t.await.unwrap();
            let key = match path {
                p if p.starts_with("/slow-excl") => 'x',
                p if p.starts_with("/slow-lazy") => 'y',
                _ => 'z',
            };
            match r.status {
                StatusCode::OK => *acked.entry(key).or_default() += 1,
                StatusCode::CONFLICT if key == 'y' => {}
                s => panic!("{path}: {s} {}", r.body),
            }
        }
        let task = std::mem::replace(&mut srv.task, tokio::spawn(async {}));
        task.await.expect("the server shut down");
        drop(srv);
        assert_no_holders(dir.path()).await;
        let srv = start(
            dir.path(),
            &key,
            session_cfg(),
            WebConfig::default(),
            Cut::None,
            None,
        )
        .await;
        for (k, key) in [('x', "x"), ('y', "y"), ('z', "z")] {
            let want = acked.get(&k).copied().unwrap_or(0);
            assert_eq!(srv.value(key, &cookie).await, want, "key {key}");
        }
    })
    .await
}

// ---------------------------------------------------------------- 4. logout after a read

/// A logout after the handler read the session, with two valid cookies sent: both sessions
/// end, whichever view read first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_after_a_read_ends_every_presented_session() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let srv = start_simple(dir.path(), session_cfg(), Cut::None).await;
        for view in ["lazy", "ro", "excl", "txn"] {
            let (first, second) = (srv.new_session().await, srv.new_session().await);
            assert_ne!(first, second);
            let r = srv
                .req(
                    Method::POST,
                    &format!("/logout/{view}"),
                    Some(&format!("{first}; {second}")),
                )
                .await;
            assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"), "{view}");
            assert!(r.set_cookie().unwrap().contains("Max-Age=0"), "{view}");
            assert_eq!(srv.value("a", &first).await, 0, "{view}: first ended");
            assert_eq!(srv.value("a", &second).await, 0, "{view}: second ended");
        }
        assert_no_holders(dir.path()).await;
    })
    .await
}

/// A logout cut by a timeout inside the layer while its delete waits for the session's lock:
/// the delete may still fail, so the cookie must be kept (as for a logout that failed), not
/// cleared while the session lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_cut_while_its_delete_waits_keeps_the_cookie() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = session_cfg();
        cfg.lock_timeout = Duration::from_millis(500);
        let cut_at = Cut::Inside(Duration::from_millis(300), StatusCode::GATEWAY_TIMEOUT);
        let key = Key::generate();
        let srv = start(
            dir.path(),
            &key,
            cfg.clone(),
            WebConfig::default(),
            cut_at,
            None,
        )
        .await;
        // Another server on the directory, without the cut.
        let other = start(dir.path(), &key, cfg, WebConfig::default(), Cut::None, None).await;
        let cookie = srv.new_session().await;
        // Holds the upgradable lock past the manager's 500 ms bound.
        let holder = other.spawn_req(Method::POST, "/slow-excl/1200".into(), &cookie);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = srv.req(Method::POST, "/logout/lazy", Some(&cookie)).await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        // Let the abandoned delete fail on the manager's bound.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(holder.await.unwrap().0.body, "1");
        assert_eq!(
            srv.value("a", &cookie).await,
            1,
            "the delete failed: still alive"
        );
        assert!(
            r.set_cookie().is_none_or(|c| !c.contains("Max-Age=0")),
            "the cookie of a live session was cleared: {:?}",
            r.set_cookie()
        );
        assert_no_holders(dir.path()).await;
    })
    .await
}

// ---------------------------------------------------------------- 5. transact under contention

/// `transact` over HTTP against optimistic and exclusive writers of the same key: each
/// closure runs at most `transact_retries + 1` times, every 200 reports a distinct value,
/// and the stored value is the number of acknowledged increments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transact_under_contention_retries_within_the_bound_and_loses_nothing() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = session_cfg();
        cfg.transact_retries = 2;
        let srv = start_simple(dir.path(), cfg, Cut::None).await;
        let cookie = srv.new_session().await;
        let mut tasks = Vec::new();
        for i in 0..60usize {
            let route = if i % 5 == 0 { "excl-incr" } else { "txn-incr" };
            let task = srv.spawn_req(Method::POST, format!("/{route}/n"), &cookie);
            tasks.push((route, task));
        }
        let mut values = Vec::new();
        let mut max_runs = 0;
        for (route, t) in tasks {
            let (r, _) = t.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{route}: {}", r.body);
            let mut it = r.body.split(' ');
            values.push(it.next().unwrap().parse::<u64>().unwrap());
            if let Some(runs) = it.next() {
                let runs: u64 = runs.parse().unwrap();
                assert!((1..=3).contains(&runs), "{runs} runs");
                max_runs = max_runs.max(runs);
            }
        }
        values.sort_unstable();
        assert_eq!(
            values,
            (1..=60).collect::<Vec<_>>(),
            "each result reported once"
        );
        assert_eq!(srv.value("n", &cookie).await, 60);
        let st = srv.layer.stats();
        eprintln!("max runs {max_runs}, stats {st:?}");
        assert!(st.transact_retries <= 48 * 2, "{st:?}");
        assert_no_holders(dir.path()).await;
    })
    .await
}
