//! The web layer's traces name sessions by a keyed hash, never by their ID (a bearer secret).
//! Its own test binary: it installs a process-wide subscriber that records every span.

#[path = "web_support/http.rs"]
mod http;

use axum::extract::Path;
use axum::routing::{get, post};
use axum::Router;
use hyper::Method;
use locktable::session::{SessionConfig, SessionManager};
use locktable::web::{
    CookieConfig, ExclusiveSession, Key, LazySession, ReadOnlySession, SessionLayer, WebError,
};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Records every span's name and fields, and every event's fields, as text.
#[derive(Default)]
struct Recorder {
    lines: Mutex<Vec<String>>,
    next: AtomicU64,
}

struct Text<'a>(&'a mut String);

impl Visit for Text<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

/// The subscriber: a handle on the shared recorder.
struct Rec(Arc<Recorder>);

impl Subscriber for Rec {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut line = span.metadata().name().to_string();
        span.record(&mut Text(&mut line));
        self.0.lines.lock().unwrap().push(line);
        Id::from_u64(self.0.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut line = String::from("record");
        values.record(&mut Text(&mut line));
        self.0.lines.lock().unwrap().push(line);
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = String::from("event");
        event.record(&mut Text(&mut line));
        self.0.lines.lock().unwrap().push(line);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

async fn read(s: ReadOnlySession) -> Result<String, WebError> {
    Ok(s.get::<u64>("n").await?.unwrap_or(0).to_string())
}

async fn incr(s: LazySession) -> Result<String, WebError> {
    let n = s
        .transact(|s| {
            let n = s.get::<u64>("n")?.unwrap_or(0) + 1;
            s.insert("n", &n)?;
            Ok(n)
        })
        .await?;
    Ok(n.to_string())
}

async fn set(s: LazySession, Path(v): Path<u64>) -> Result<&'static str, WebError> {
    s.insert("v", &v).await?;
    Ok("ok")
}

async fn excl(s: ExclusiveSession) -> Result<&'static str, WebError> {
    s.insert("x", &1u64).await?;
    Ok("ok")
}

async fn login(s: LazySession) -> Result<&'static str, WebError> {
    s.cycle_id().await?;
    Ok("ok")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_a_keyed_hash_never_the_session_id() {
    let rec = Arc::new(Recorder::default());
    tracing::subscriber::set_global_default(Rec(Arc::clone(&rec))).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = SessionConfig {
        fsync: false,
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new_embedded(dir.path(), cfg).unwrap();
    let layer = SessionLayer::new(mgr, CookieConfig::new(Key::generate()).secure(false)).unwrap();
    let app = Router::new()
        .route("/read", get(read))
        .route("/incr", post(incr))
        .route("/set/{v}", post(set))
        .route("/excl", post(excl))
        .route("/login", post(login))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let r = http::once(addr, Method::POST, "/incr", None).await.unwrap();
    let mut cookie = r.cookie_pair().unwrap();
    let mut ids = vec![cookie[cookie.len() - 32..].to_string()];
    for (m, path) in [
        (Method::GET, "/read"),
        (Method::POST, "/incr"),
        (Method::POST, "/set/5"),
        (Method::POST, "/excl"),
        (Method::POST, "/login"),
        (Method::GET, "/read"),
    ] {
        let r = http::once(addr, m, path, Some(&cookie)).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        if let Some(c) = r.cookie_pair() {
            cookie = c;
            ids.push(cookie[cookie.len() - 32..].to_string());
        }
    }
    server.abort();

    let lines = rec.lines.lock().unwrap().clone();
    for name in [
        "session.load",
        "session.transact",
        "session.commit",
        "session.cycle",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(name) && l.contains(" sid=")),
            "no {name} span with a sid in {lines:#?}"
        );
    }
    for id in &ids {
        for l in &lines {
            assert!(!l.contains(id.as_str()), "raw session ID in a trace: {l}");
        }
    }
}
