//! The contenders of the web benchmarks (`benches/web.rs` over loopback HTTP,
//! `benches/web_layer.rs` in process): the same two axum handlers on each side (read a counter;
//! increment it), each behind its session layer with signed cookies (HMAC-SHA256 on both
//! sides, `Secure` off for plain HTTP).

#![allow(dead_code)]

use axum::body::Body;
use axum::extract::Path;
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use hyper::{Method, Request, StatusCode};
use locktable::session::{MemoryStore, SessionConfig, SessionManager};
use locktable::web::{CookieConfig, Key, LazySession, ReadOnlySession, SessionLayer, WebError};
use locktable::{LockTable, TableOptions};
use tower_service::Service;

// ---------------------------------------------------------------- locktable::web handlers

async fn lt_read(s: ReadOnlySession, Path(k): Path<String>) -> Result<String, WebError> {
    Ok(s.get::<u64>(&k).await?.unwrap_or(0).to_string())
}

async fn lt_incr(s: LazySession, Path(k): Path<String>) -> Result<String, WebError> {
    let n = s
        .transact(move |s| {
            let n = s.get::<u64>(&k)?.unwrap_or(0) + 1;
            s.insert(&k, &n)?;
            Ok(n)
        })
        .await?;
    Ok(n.to_string())
}

// ---------------------------------------------------------------- tower-sessions handlers

async fn ts_read(s: tower_sessions::Session, Path(k): Path<String>) -> Result<String, StatusCode> {
    let v = s
        .get::<u64>(&k)
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok(v.unwrap_or(0).to_string())
}

async fn ts_incr(s: tower_sessions::Session, Path(k): Path<String>) -> Result<String, StatusCode> {
    let e = |_| StatusCode::INTERNAL_SERVER_ERROR;
    let n = s.get::<u64>(&k).await.map_err(e)?.unwrap_or(0) + 1;
    s.insert(&k, n).await.map_err(e)?;
    Ok(n.to_string())
}

// ---------------------------------------------------------------- contenders

/// One contender.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    LocktableFile,
    LocktableMemory,
    TowerSessionsMemory,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::LocktableFile => "locktable::web, FileStore (embedded default, no fsync)",
            Side::LocktableMemory => "locktable::web, MemoryStore",
            Side::TowerSessionsMemory => "tower-sessions 0.15, MemoryStore",
        }
    }

    pub fn router(self, dir: &std::path::Path) -> Router {
        let routes = |r: Router| r;
        match self {
            Side::LocktableFile | Side::LocktableMemory => {
                let cfg = SessionConfig {
                    fsync: false,
                    ..SessionConfig::default()
                };
                let mgr = match self {
                    Side::LocktableFile => SessionManager::new_embedded(dir, cfg).unwrap(),
                    _ => SessionManager::new(
                        LockTable::anonymous(&TableOptions::default()).unwrap(),
                        MemoryStore::new(),
                        cfg,
                    ),
                };
                let cookies = CookieConfig::new(Key::generate()).secure(false);
                routes(
                    Router::new()
                        .route("/api/get/{k}", get(lt_read))
                        .route("/api/incr/{k}", post(lt_incr)),
                )
                .layer(SessionLayer::new(mgr, cookies).unwrap())
            }
            Side::TowerSessionsMemory => {
                let layer = tower_sessions::SessionManagerLayer::new(
                    tower_sessions::MemoryStore::default(),
                )
                .with_secure(false)
                .with_signed(tower_sessions::cookie::Key::generate());
                Router::new()
                    .route("/api/get/{k}", get(ts_read))
                    .route("/api/incr/{k}", post(ts_incr))
                    .layer(layer)
            }
        }
    }
}

/// One request through `app` in process (no network): status, the `name=value` of a
/// `Set-Cookie`, body.
pub fn call(
    rt: &tokio::runtime::Runtime,
    app: &Router,
    method: Method,
    path: &str,
    cookie: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        b = b.header(hyper::header::COOKIE, c);
    }
    let req = b.body(Body::empty()).unwrap();
    rt.block_on(async {
        let resp = app.clone().call(req).await.unwrap();
        let status = resp.status();
        let cookie = resp
            .headers()
            .get(hyper::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_owned);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, cookie, String::from_utf8_lossy(&body).into_owned())
    })
}
