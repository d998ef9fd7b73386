//! The seed's page: one HTML page whose iframes, images and fetch calls all hit the visitor's
//! session at once, served by axum with `locktable::web`.
//!
//! ```text
//! cargo run --release --features axum --example axum_app -- --listen 127.0.0.1:3000 --dir DIR
//! ```
//!
//! - `GET /` the page; on load it fires many concurrent requests at the visitor's session and
//!   shows the counters (`?peer=PORT` loads its iframes and images from another process on the
//!   same host and `--dir`);
//! - `POST /api/incr/{key}` increments the session's counter `key`, answers the new value;
//! - `GET /api/get/{key}` answers the counter's value (0 if absent); never writes data.
//!
//! Several processes started with the same `--dir` serve the same sessions (the cookie key is
//! kept in `DIR/cookie.key`, created on first start), on different ports or on the same one:
//! the listener is bound with `SO_REUSEPORT`, so the kernel spreads the connections over every
//! process listening on that port. Options: `--insecure-cookie` drops the
//! cookie's `Secure` attribute (plain-HTTP development on a non-localhost name);
//! `--debug-stats` adds `GET /debug/stats` (JSON counters, also printed to stdout) and counts
//! concurrent readers; `--fsync` makes saves durable (off here: this is a demo).

use axum::extract::{Path, Query};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use locktable::session::{
    Capabilities, Cutoffs, ExpiredScan, FileStore, SessionConfig, SessionId, SessionManager,
    SessionMeta, Store, StoredSession, Timestamp, Touch,
};
use locktable::web::{
    CookieConfig, Key, LazySession, ReadOnlySession, SessionLayer, WebConfig, WebError,
};
use locktable::{LockTable, TableOptions};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Args {
    listen: String,
    dir: PathBuf,
    insecure_cookie: bool,
    debug_stats: bool,
    fsync: bool,
}

const USAGE: &str =
    "usage: axum_app --listen ADDR:PORT --dir DIR [--insecure-cookie] [--debug-stats] [--fsync]";

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut dir = None;
    let mut args = Args {
        listen: String::new(),
        dir: PathBuf::new(),
        insecure_cookie: false,
        debug_stats: false,
        fsync: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = it.next(),
            "--dir" => dir = it.next().map(PathBuf::from),
            "--insecure-cookie" => args.insecure_cookie = true,
            "--debug-stats" => args.debug_stats = true,
            "--fsync" => args.fsync = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    args.listen = listen.ok_or(USAGE)?;
    args.dir = dir.ok_or(USAGE)?;
    Ok(args)
}

/// The cookie key shared by every process on `dir`: 64 random bytes, made once.
fn cookie_key(dir: &FsPath) -> std::io::Result<Key> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("cookie.key");
    let mut bytes = [0u8; 64];
    getrandom_bytes(&mut bytes)?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another process may be writing it right now: wait for all 64 bytes.
            for _ in 0..100 {
                let b = std::fs::read(&path)?;
                if b.len() >= 64 {
                    return Key::try_from(&b[..]).map_err(std::io::Error::other);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            return Err(std::io::Error::other("cookie.key is incomplete"));
        }
        Err(e) => return Err(e),
    }
    Key::try_from(&bytes[..]).map_err(std::io::Error::other)
}

fn getrandom_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    // A key from the kernel's random source, read like any file.
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

// ---------------------------------------------------------------- store-write accounting

#[derive(Debug, Default)]
struct StoreCalls {
    saves: AtomicU64,
    touches: AtomicU64,
    deletes: AtomicU64,
}

/// The real `FileStore`, with its writes counted for `/debug/stats`.
#[derive(Debug)]
struct CountingStore {
    inner: FileStore,
    calls: Arc<StoreCalls>,
}

impl Store for CountingStore {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn load(&self, id: &SessionId, max_size: usize) -> locktable::Result<Option<StoredSession>> {
        self.inner.load(id, max_size)
    }
    fn save(
        &self,
        id: &SessionId,
        exp: Option<u64>,
        new: &StoredSession,
    ) -> locktable::Result<bool> {
        self.calls.saves.fetch_add(1, Ordering::Relaxed);
        self.inner.save(id, exp, new)
    }
    fn meta(&self, id: &SessionId) -> locktable::Result<Option<SessionMeta>> {
        self.inner.meta(id)
    }
    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        c: Duration,
        cutoffs: &Cutoffs,
    ) -> locktable::Result<Touch> {
        self.calls.touches.fetch_add(1, Ordering::Relaxed);
        self.inner.touch(id, at, c, cutoffs)
    }
    fn last_accessed(&self, id: &SessionId) -> locktable::Result<Option<Timestamp>> {
        self.inner.last_accessed(id)
    }
    fn delete(&self, id: &SessionId) -> locktable::Result<bool> {
        self.calls.deletes.fetch_add(1, Ordering::Relaxed);
        self.inner.delete(id)
    }
    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> locktable::Result<bool> {
        let removed = self.inner.remove_expired(id, cutoffs)?;
        if removed {
            self.calls.deletes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(removed)
    }
    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> locktable::Result<ExpiredScan> {
        self.inner.scan_expired(cutoffs, budget)
    }
    fn cleanup(&self) -> locktable::Result<usize> {
        self.inner.cleanup()
    }
}

#[derive(Clone)]
struct App {
    layer: SessionLayer,
    calls: Arc<StoreCalls>,
    /// Increments answered with 200, per key (this process only).
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
}

// ---------------------------------------------------------------- handlers

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

async fn incr(app: App, s: LazySession, key: String) -> Result<Response, WebError> {
    if !valid_key(&key) {
        return Ok((axum::http::StatusCode::BAD_REQUEST, "bad key\n").into_response());
    }
    let k = key.clone();
    let n = s
        .transact(move |s| {
            let n = s.get::<u64>(&k)?.unwrap_or(0) + 1;
            s.insert(&k, &n)?;
            Ok(n)
        })
        .await?;
    *app.acked.lock().unwrap().entry(key).or_default() += 1;
    Ok(n.to_string().into_response())
}

/// `?work_ms=N` simulates N ms of work after the read (at most 1 s), to widen overlaps.
async fn read_value(
    s: &ReadOnlySession,
    key: &str,
    q: &HashMap<String, u64>,
) -> Result<u64, WebError> {
    let v = s.get::<u64>(key).await?.unwrap_or(0);
    let work = q.get("work_ms").copied().unwrap_or(0).min(1000);
    if work > 0 {
        tokio::time::sleep(Duration::from_millis(work)).await;
    }
    Ok(v)
}

async fn get_value(
    s: ReadOnlySession,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, u64>>,
) -> Result<String, WebError> {
    Ok(read_value(&s, &key, &q).await?.to_string())
}

async fn frame(
    s: ReadOnlySession,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, u64>>,
) -> Result<Html<String>, WebError> {
    let v = read_value(&s, &key, &q).await?;
    let key = html_escape(&key);
    Ok(Html(format!(
        "<!doctype html><body style=\"margin:0;font:14px sans-serif;background:#eef\">\
         iframe: <b>{key}</b> = <span id=v>{v}</span></body>"
    )))
}

async fn image(
    s: ReadOnlySession,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, u64>>,
) -> Result<Response, WebError> {
    let v = read_value(&s, &key, &q).await?;
    let key = html_escape(&key);
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"120\" height=\"24\">\
         <rect width=\"120\" height=\"24\" rx=\"4\" fill=\"#2a6\"/>\
         <text x=\"8\" y=\"17\" fill=\"#fff\" font-family=\"sans-serif\" font-size=\"13\">img {key}={v}</text></svg>"
    );
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn stats(app: App, s: ReadOnlySession) -> Result<Json<serde_json::Value>, WebError> {
    let acked = app.acked.lock().unwrap().clone();
    let mut keys = serde_json::Map::new();
    let mut lost = 0u64;
    for (key, n) in &acked {
        let stored = s.get::<u64>(key).await?.unwrap_or(0);
        lost += n.saturating_sub(stored);
        keys.insert(
            key.clone(),
            serde_json::json!({ "acked": n, "stored": stored }),
        );
    }
    let w = app.layer.stats();
    let m = app.layer.manager().stats();
    let c = &app.calls;
    let v = serde_json::json!({
        "pid": std::process::id(),
        "requests": w.requests,
        "sessions_used": w.sessions_used,
        "loads": w.loads,
        "created": w.created,
        "commits": w.commits,
        "conflicts": w.conflicts + m.conflicts,
        "transact_retries": w.transact_retries,
        "timeouts": w.timeouts,
        "touches": w.touches,
        "max_concurrent_readers": w.max_concurrent_readers,
        "max_writes_per_request": w.max_writes_per_request,
        "store_saves": c.saves.load(Ordering::Relaxed),
        "store_touches": c.touches.load(Ordering::Relaxed),
        "store_deletes": c.deletes.load(Ordering::Relaxed),
        "acked_increments": acked.values().sum::<u64>(),
        "lost": lost,
        "keys": keys,
    });
    println!("STATS {v}");
    Ok(Json(v))
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>locktable sessions</title>
<style>
body{font:15px sans-serif;margin:20px;background:#fafafa}
table{border-collapse:collapse;margin:10px 0}td,th{border:1px solid #999;padding:3px 10px;text-align:right}
iframe{width:150px;height:24px;border:1px solid #99c;margin:2px}img{margin:2px}
pre{white-space:pre-wrap;word-break:break-all;font-size:12px}
#status{font-weight:bold;padding:6px;background:#ffd}#status.ok{background:#cfc}#status.bad{background:#fcc}
</style></head><body>
<h1>One page, one session, many requests at once</h1>
<p>On load this page fires fetch calls (reads and increments), iframes and images at its session,
all concurrently, then compares what the server acknowledged with what it stored.</p>
<div id="status">running...</div>
<table id="counters"><tr><th>key</th><th>increments acknowledged</th><th>stored</th><th>lost</th></tr></table>
<div id="frames"></div><div id="images"></div>
<pre id="stats"></pre>
<script>
const KEYS = ['a','b','c','d'];
const peer = new URLSearchParams(location.search).get('peer');
const other = peer ? `${location.protocol}//${location.hostname}:${peer}` : '';
const st = document.getElementById('status');
async function incr(key){ const r = await fetch(`/api/incr/${key}`, {method:'POST'}); if(!r.ok) throw new Error(`incr ${key}: ${r.status}`); return key; }
async function read(key){ const r = await fetch(`/api/get/${key}?work_ms=30`); if(!r.ok) throw new Error(`get ${key}: ${r.status}`); return Number(await r.text()); }
function frame(key){ return new Promise((ok, err) => { const f = document.createElement('iframe'); f.onload = () => ok(); f.onerror = err; f.src = `${other}/frame/${key}?work_ms=30`; document.getElementById('frames').appendChild(f); }); }
function image(key){ return new Promise((ok, err) => { const i = new Image(); i.onload = () => ok(); i.onerror = () => err(new Error('img ' + key)); i.src = `${other}/img/${key}?work_ms=30`; document.getElementById('images').appendChild(i); }); }
async function main(){
  const acked = {};
  await incr('visits'); acked.visits = 1;             // makes the session: one cookie for all that follows
  const jobs = [];
  for (let round = 0; round < 3; round++) for (const k of KEYS) jobs.push(incr(k));   // 12 increments of 4 keys
  for (let i = 0; i < 12; i++) jobs.push(incr('shared'));                              // 12 of one shared key
  for (let i = 0; i < 20; i++) jobs.push(read(KEYS[i % KEYS.length]));                 // 20 reads
  for (const k of KEYS.concat(['shared', 'visits'])) { jobs.push(frame(k)); jobs.push(image(k)); }  // 6 iframes, 6 images
  const results = await Promise.allSettled(jobs);
  let failed = 0;
  for (const r of results) { if (r.status === 'rejected') failed++; else if (typeof r.value === 'string') acked[r.value] = (acked[r.value] || 0) + 1; }
  const table = document.getElementById('counters');
  let lost = 0;
  for (const k of Object.keys(acked)) {
    const stored = await read(k);
    const l = Math.max(0, acked[k] - stored); lost += l;
    const tr = document.createElement('tr');
    tr.innerHTML = `<td>${k}</td><td>${acked[k]}</td><td>${stored}</td><td>${l}</td>`;
    table.appendChild(tr);
  }
  const s = await (await fetch('/debug/stats')).text().catch(() => '');
  document.getElementById('stats').textContent = s;
  st.textContent = `done: ${jobs.length} concurrent requests, ${failed} failed, ${lost} increments lost`;
  st.className = (failed === 0 && lost === 0) ? 'ok' : 'bad';
  document.title = 'done';
}
main().catch(e => { st.textContent = 'error: ' + e; st.className = 'bad'; });
</script></body></html>
"#;

fn open_manager(args: &Args) -> locktable::Result<(SessionManager, Arc<StoreCalls>)> {
    std::fs::create_dir_all(&args.dir)?;
    let table = LockTable::open(args.dir.join("locks.table"), &TableOptions::default())?;
    let calls = Arc::new(StoreCalls::default());
    let store = CountingStore {
        inner: FileStore::open(args.dir.join("sessions"))?.with_fsync(args.fsync),
        calls: Arc::clone(&calls),
    };
    let cfg = SessionConfig {
        fsync: args.fsync,
        ..SessionConfig::default()
    };
    Ok((SessionManager::new(table, store, cfg), calls))
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("axum_app: {e}");
        std::process::exit(1);
    }
}

/// A listener on `addr` that other processes may share (`SO_REUSEPORT`; `SO_REUSEADDR` so that
/// a restart does not wait for old connections' `TIME_WAIT`).
async fn listen_shared(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr}: no address")))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (mgr, calls) = open_manager(&args)?;
    let cookies = CookieConfig::new(cookie_key(&args.dir)?).secure(!args.insecure_cookie);
    let web = WebConfig {
        track_readers: args.debug_stats,
        ..WebConfig::default()
    };
    let layer = SessionLayer::with_config(mgr, cookies, web)?;
    let _gc = layer.spawn_gc(Duration::from_secs(60));
    let app = App {
        layer: layer.clone(),
        calls,
        acked: Arc::default(),
    };
    let a = app.clone();
    let mut router = Router::new()
        .route("/", get(page))
        .route(
            "/api/incr/{key}",
            post(move |s: LazySession, Path(key): Path<String>| incr(a.clone(), s, key)),
        )
        .route("/api/get/{key}", get(get_value))
        .route("/frame/{key}", get(frame))
        .route("/img/{key}", get(image));
    if args.debug_stats {
        let a = app.clone();
        router = router.route(
            "/debug/stats",
            get(move |s: ReadOnlySession| stats(a.clone(), s)),
        );
    }
    let router = router.layer(layer);
    let listener = listen_shared(&args.listen).await?;
    println!(
        "listening on http://{} (dir {})",
        listener.local_addr()?,
        args.dir.display()
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
