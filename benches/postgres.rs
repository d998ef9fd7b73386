//! Requests per second and lost updates on PostgreSQL, beside the embedded default and beside a
//! last-writer-wins baseline, for 1, 2, 4 and 8 worker threads.
//!
//! Systems:
//! - `pg`: `SessionManager::postgres_with` (`PgStore` + `PgLocks`), one manager per worker
//!   thread, so workers share nothing but the server, as separate hosts would;
//! - `embedded`: `SessionManager::new_embedded` (file store + lock table) with its defaults
//!   (durable saves: fsync), one manager shared by the threads, as in one host;
//! - `embedded-nofsync`: the same with `fsync: false` (the test server runs with `fsync=off`,
//!   so this is the like-for-like row for writes);
//! - `lww`: a plain `SELECT` to load and `INSERT ... ON CONFLICT (id) DO UPDATE` of the whole
//!   record to save, as tower-sessions' Postgres store does, on a table of its own, one client
//!   per worker thread. No lock, no version check.
//!
//! Requests, on one hot session (8 small keys):
//! - `read`: load, read one key, end the request (no data write);
//! - `write`: increment one counter that every worker increments (`transact` on the session
//!   layer; load, increment, upsert on `lww`).
//!
//! Each cell runs for `LOCKTABLE_BENCH_SECS` seconds (default 1.2; the whole run stays under two
//! minutes). Lost updates = increments reported successful minus the final counter.
//! It is a plain timed loop (`harness = false`), not criterion: each cell is one sample, and
//! the figures are as noisy as the machine they ran on.
//!
//! Run: `eval "$(scripts/pg-server start)"; cargo bench --features postgres --bench postgres`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use locktable::session::{PgStoreOptions, SessionConfig, SessionManager};
use postgres::{Client, NoTls};
use serde_json::{json, Map, Value};

mod support;

const COUNTER: &str = "n";
const READ_KEY: &str = "user_id";
const THREADS: [usize; 4] = [1, 2, 4, 8];
const LWW_TABLE: &str = "locktable_bench_lww_sessions";

fn session_data() -> Vec<(&'static str, Value)> {
    vec![
        ("user_id", json!(4242)),
        ("name", json!("Ann Example")),
        ("roles", json!(["editor", "viewer"])),
        ("cart", json!({"items": [1, 2, 3], "total": 42.5})),
        ("csrf", json!("k3j4h5g6f7d8s9a0")),
        ("theme", json!("dark")),
        ("visits", json!(17)),
        (COUNTER, json!(0u64)),
    ]
}

#[derive(Clone, Copy, PartialEq)]
enum Request {
    Read,
    Write,
}

/// One system under test: how a worker thread gets its handle, and what a request does.
trait System: Sync {
    fn name(&self) -> &'static str;
    /// A fresh session (counter 0); returns its ID.
    fn create(&self) -> String;
    /// One worker's requests until `stop`; returns (requests, successful increments).
    fn worker(&self, id: &str, req: Request, stop: &AtomicBool) -> (u64, u64);
    /// The session's counter now.
    fn counter(&self, id: &str) -> u64;
    fn delete(&self, id: &str);
}

fn create_on(mgr: &SessionManager) -> String {
    support::create_session(mgr, session_data())
}

fn requests_on(mgr: &SessionManager, id: &str, req: Request, stop: &AtomicBool) -> (u64, u64) {
    let (mut n, mut ok) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        match req {
            Request::Read => {
                let s = mgr.load(id).expect("load").expect("session exists");
                std::hint::black_box(s.get::<u64>(READ_KEY).expect("get"));
                s.commit().expect("commit");
            }
            Request::Write => {
                let done = mgr.transact(id, |s| {
                    let v = s.get::<u64>(COUNTER)?.unwrap_or(0);
                    s.insert(COUNTER, &(v + 1))
                });
                if matches!(done, Ok(Some(()))) {
                    ok += 1;
                }
            }
        }
        n += 1;
    }
    (n, ok)
}

fn counter_on(mgr: &SessionManager, id: &str) -> u64 {
    let s = mgr.load(id).expect("load").expect("session exists");
    s.get::<u64>(COUNTER).expect("get").unwrap_or(0)
}

struct Pg {
    url: String,
    setup: SessionManager,
}

impl System for Pg {
    fn name(&self) -> &'static str {
        "pg"
    }
    fn create(&self) -> String {
        create_on(&self.setup)
    }
    fn worker(&self, id: &str, req: Request, stop: &AtomicBool) -> (u64, u64) {
        // A manager of its own: another host.
        let mgr = pg_manager(&self.url);
        requests_on(&mgr, id, req, stop)
    }
    fn counter(&self, id: &str) -> u64 {
        counter_on(&self.setup, id)
    }
    fn delete(&self, id: &str) {
        self.setup.delete(id).expect("delete");
    }
}

fn pg_manager(url: &str) -> SessionManager {
    SessionManager::postgres_with(url, PgStoreOptions::default(), SessionConfig::default())
        .expect("connect to LOCKTABLE_PG_URL")
}

struct Embedded {
    name: &'static str,
    mgr: SessionManager,
    _dir: TempDir,
}

impl System for Embedded {
    fn name(&self) -> &'static str {
        self.name
    }
    fn create(&self) -> String {
        create_on(&self.mgr)
    }
    fn worker(&self, id: &str, req: Request, stop: &AtomicBool) -> (u64, u64) {
        requests_on(&self.mgr, id, req, stop)
    }
    fn counter(&self, id: &str) -> u64 {
        counter_on(&self.mgr, id)
    }
    fn delete(&self, id: &str) {
        self.mgr.delete(id).expect("delete");
    }
}

/// The last-writer-wins baseline: whole-record load and upsert, nothing else.
struct Lww {
    url: String,
    next: AtomicU64,
}

impl Lww {
    fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("connect to LOCKTABLE_PG_URL")
    }

    fn load(c: &mut Client, id: &str) -> Map<String, Value> {
        let row = c
            .query_one(
                &format!("SELECT data FROM {LWW_TABLE} WHERE id = $1"),
                &[&id],
            )
            .expect("select");
        serde_json::from_slice(row.get::<_, &[u8]>(0)).expect("json")
    }

    fn save(c: &mut Client, id: &str, data: &Map<String, Value>) {
        let bytes = serde_json::to_vec(data).expect("json");
        c.execute(
            &format!(
                "INSERT INTO {LWW_TABLE} (id, data, expiry_date) \
                 VALUES ($1, $2, now() + interval '1 day') \
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data, \
                 expiry_date = excluded.expiry_date"
            ),
            &[&id, &bytes],
        )
        .expect("upsert");
    }
}

impl System for Lww {
    fn name(&self) -> &'static str {
        "lww"
    }
    fn create(&self) -> String {
        let id = format!(
            "bench-{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let data: Map<String, Value> = session_data()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        Lww::save(&mut self.client(), &id, &data);
        id
    }
    fn worker(&self, id: &str, req: Request, stop: &AtomicBool) -> (u64, u64) {
        let mut c = self.client();
        let (mut n, mut ok) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            let mut data = Lww::load(&mut c, id);
            match req {
                Request::Read => {
                    std::hint::black_box(data.get(READ_KEY));
                }
                Request::Write => {
                    let v = data.get(COUNTER).and_then(Value::as_u64).unwrap_or(0);
                    data.insert(COUNTER.to_owned(), json!(v + 1));
                    Lww::save(&mut c, id, &data);
                    ok += 1;
                }
            }
            n += 1;
        }
        (n, ok)
    }
    fn counter(&self, id: &str) -> u64 {
        let data = Lww::load(&mut self.client(), id);
        data.get(COUNTER).and_then(Value::as_u64).unwrap_or(0)
    }
    fn delete(&self, id: &str) {
        self.client()
            .execute(&format!("DELETE FROM {LWW_TABLE} WHERE id = $1"), &[&id])
            .expect("delete");
    }
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "locktable-bench-pg-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let p = std::path::PathBuf::from(p.to_string_lossy().replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '/' && c != '-',
            "",
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn embedded(name: &'static str, fsync: bool) -> Embedded {
    let dir = TempDir::new(name);
    let cfg = SessionConfig {
        fsync,
        ..SessionConfig::default()
    };
    let mgr = SessionManager::new_embedded(&dir.0, cfg).expect("embedded manager");
    Embedded {
        name,
        mgr,
        _dir: dir,
    }
}

struct Cell {
    per_sec: f64,
    lost: u64,
}

/// `threads` workers on one fresh session for `secs`; requests per second and lost updates.
fn run_cell(sys: &dyn System, req: Request, threads: usize, secs: Duration) -> Cell {
    let id = sys.create();
    let stop = AtomicBool::new(false);
    let start_line = Barrier::new(threads + 1);
    let (elapsed, results) = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (id, stop, start_line) = (&id, &stop, &start_line);
                sc.spawn(move || {
                    start_line.wait();
                    // A worker connects inside the timed window (a few ms of the cell's time).
                    sys.worker(id, req, stop)
                })
            })
            .collect();
        start_line.wait();
        let t0 = Instant::now();
        std::thread::sleep(secs);
        stop.store(true, Ordering::Relaxed);
        let results: Vec<(u64, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (t0.elapsed(), results)
    });
    let requests: u64 = results.iter().map(|r| r.0).sum();
    let increments: u64 = results.iter().map(|r| r.1).sum();
    let lost = increments.saturating_sub(sys.counter(&id));
    sys.delete(&id);
    Cell {
        per_sec: requests as f64 / elapsed.as_secs_f64(),
        lost,
    }
}

fn main() {
    // A benchmark without its server fails; it never reports an empty run as done.
    let url = std::env::var("LOCKTABLE_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .expect(
            "LOCKTABLE_PG_URL is not set: run `eval \"$(scripts/pg-server start)\"` first, then \
             cargo bench --features postgres --bench postgres",
        );
    let secs = std::env::var("LOCKTABLE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.2);
    let secs = Duration::from_secs_f64(secs);
    let mut setup = Client::connect(&url, NoTls).expect("connect to LOCKTABLE_PG_URL");
    setup
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {LWW_TABLE} \
             (id text PRIMARY KEY, data bytea NOT NULL, expiry_date timestamptz NOT NULL)"
        ))
        .expect("create the baseline's table");
    let systems: Vec<Box<dyn System>> = vec![
        Box::new(Pg {
            url: url.clone(),
            setup: pg_manager(&url),
        }),
        Box::new(embedded("embedded", true)),
        Box::new(embedded("embedded-nofsync", false)),
        Box::new(Lww {
            url: url.clone(),
            next: AtomicU64::new(0),
        }),
    ];
    println!(
        "{:.1} s per cell; requests/s in total (lost updates under concurrent increments)",
        secs.as_secs_f64()
    );
    print!("{:<24}", "system / request");
    for t in THREADS {
        print!(
            "{:>20}",
            format!("{t} thread{}", if t == 1 { "" } else { "s" })
        );
    }
    println!();
    for req in [Request::Read, Request::Write] {
        for sys in &systems {
            let label = match req {
                Request::Read => "read",
                Request::Write => "write",
            };
            print!("{:<24}", format!("{} / {label}", sys.name()));
            for t in THREADS {
                let c = run_cell(sys.as_ref(), req, t, secs);
                let cell = match req {
                    Request::Read => format!("{:.0}", c.per_sec),
                    Request::Write => format!("{:.0} ({} lost)", c.per_sec, c.lost),
                };
                print!("{cell:>20}");
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
            }
            println!();
        }
    }
    let _ = setup.batch_execute(&format!("DROP TABLE IF EXISTS {LWW_TABLE}"));
}
