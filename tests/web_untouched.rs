//! A request that never touches its session takes no lock, seen in the lock table itself (not
//! only in the manager's counters): over real HTTP, requests whose handlers ignore the session
//! leave the table without a single slot assigned, while one request that reads the session
//! assigns one.

#[path = "web_support/http.rs"]
mod http;

use axum::routing::{get, post};
use axum::Router;
use hyper::{Method, StatusCode};
use locktable::session::{FileStore, SessionConfig, SessionManager};
use locktable::web::{CookieConfig, Key, LazySession, ReadOnlySession, SessionLayer, WebError};
use locktable::{LockTable, TableOptions};
use std::net::SocketAddr;
use std::path::Path;

async fn incr(s: LazySession) -> Result<String, WebError> {
    let n = s.get::<u64>("a").await?.unwrap_or(0) + 1;
    s.insert("a", &n).await?;
    Ok(n.to_string())
}

async fn read(s: ReadOnlySession) -> Result<String, WebError> {
    Ok(s.get::<u64>("a").await?.unwrap_or(0).to_string())
}

/// Extracts the session but never uses it.
async fn untouched(_s: LazySession) -> &'static str {
    "hello"
}

async fn plain() -> &'static str {
    "plain"
}

/// A server on the session store `store` with its own lock table `table`.
async fn serve(table: &Path, store: &Path, key: &Key) -> (SocketAddr, LockTable) {
    let locks = LockTable::open(table, &TableOptions::default()).unwrap();
    let cfg = SessionConfig {
        fsync: false,
        ..SessionConfig::default()
    };
    let files = FileStore::open(store).unwrap().with_fsync(false);
    let mgr = SessionManager::new(locks.clone(), files, cfg);
    let layer = SessionLayer::new(mgr, CookieConfig::new(key.clone()).secure(false)).unwrap();
    let app = Router::new()
        .route("/incr", post(incr))
        .route("/get", get(read))
        .route("/untouched", get(untouched))
        .route("/plain", get(plain))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, locks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untouched_sessions_assign_no_lock_table_slot() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("sessions");
    let key = Key::generate();
    // Server A creates the session (its commit locks it in A's table).
    let (a, _) = serve(&dir.path().join("a.table"), &store, &key).await;
    let r = http::once(a, Method::POST, "/incr", None).await.unwrap();
    let cookie = r.cookie_pair().unwrap();
    // Server B serves the same sessions with a lock table that nothing has locked yet.
    let (b, table) = serve(&dir.path().join("b.table"), &store, &key).await;
    assert_eq!(table.stats().unwrap().slots_assigned, 0);
    let mut c = http::Conn::open(b).await.unwrap();
    for path in ["/untouched", "/plain"] {
        for _ in 0..20 {
            let r = c.req(Method::GET, path, Some(&cookie)).await.unwrap();
            assert_eq!(r.status, StatusCode::OK);
        }
    }
    assert_eq!(
        table.stats().unwrap().slots_assigned,
        0,
        "no lock operation for a session no handler used"
    );
    // The measure sees a lock operation: one read of the session (a miss of B's session cache,
    // so a load under the session's read lock) assigns its slot.
    let r = c.req(Method::GET, "/get", Some(&cookie)).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "1"));
    assert_eq!(table.stats().unwrap().slots_assigned, 1);
}
