//! Read-only requests of a session stored **by key** (a large session on a store that keeps
//! its values per key): over real HTTP, a `ReadOnlySession` sees every value of the version it
//! loaded, not only the values some earlier `get` happened to read. Every session here is
//! stored by key (`lazy_above: 0`), on the file store and on LMDB.

#[path = "web_support/http.rs"]
mod http;

use axum::extract::Path as UrlPath;
use axum::routing::{get, post};
use axum::Router;
use hyper::{Method, StatusCode};
use locktable::session::{SessionConfig, SessionManager};
use locktable::web::{CookieConfig, Key, LazySession, ReadOnlySession, SessionLayer, WebError};
use std::net::SocketAddr;

/// Sets keys `k0`..`k{n-1}` to `i * 10`, in one request.
async fn fill(s: LazySession, UrlPath(n): UrlPath<u64>) -> Result<&'static str, WebError> {
    for i in 0..n {
        s.insert(&format!("k{i}"), &(i * 10)).await?;
    }
    Ok("ok")
}

/// Sets one key, in its own request (a one-key commit of a session stored by key).
async fn set(
    s: LazySession,
    UrlPath((k, v)): UrlPath<(String, u64)>,
) -> Result<&'static str, WebError> {
    s.insert(&k, &v).await?;
    Ok("ok")
}

/// The value of `key` as a read-only request sees it ("none" if absent).
async fn read(s: ReadOnlySession, UrlPath(k): UrlPath<String>) -> Result<String, WebError> {
    Ok(match s.get::<u64>(&k).await? {
        Some(v) => v.to_string(),
        None => "none".into(),
    })
}

/// How many keys a read-only request sees.
async fn count(s: ReadOnlySession) -> Result<String, WebError> {
    Ok(s.keys().await?.len().to_string())
}

async fn serve(mgr: SessionManager) -> SocketAddr {
    let layer = SessionLayer::new(mgr, CookieConfig::new(Key::generate()).secure(false)).unwrap();
    let app = Router::new()
        .route("/fill/{n}", post(fill))
        .route("/set/{k}/{v}", post(set))
        .route("/get/{k}", get(read))
        .route("/count", get(count))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn by_key() -> SessionConfig {
    SessionConfig {
        fsync: false,
        lazy_above: 0,
        ..SessionConfig::default()
    }
}

async fn read_only_requests_see_every_value(mgr: SessionManager) {
    let addr = serve(mgr).await;
    let r = http::once(addr, Method::POST, "/fill/40", None)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let cookie = r.cookie_pair().unwrap();
    let mut c = http::Conn::open(addr).await.unwrap();
    // A one-key commit: the session stays stored by key, its other values untouched.
    let r = c
        .req(Method::POST, "/set/k7/777", Some(&cookie))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = c.req(Method::GET, "/count", Some(&cookie)).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "40"));
    for i in 0..40u64 {
        let want = if i == 7 { 777 } else { i * 10 };
        let r = c
            .req(Method::GET, &format!("/get/k{i}"), Some(&cookie))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body, want.to_string(), "key k{i}");
    }
    let r = c
        .req(Method::GET, "/get/absent", Some(&cookie))
        .await
        .unwrap();
    assert_eq!(r.body, "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = SessionManager::new_embedded(dir.path(), by_key()).unwrap();
    read_only_requests_see_every_value(mgr).await;
}

#[cfg(feature = "lmdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_store_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let mgr = SessionManager::new_kv(dir.path(), by_key()).unwrap();
    read_only_requests_see_every_value(mgr).await;
}
