//! `locktable::web` beside tower-sessions 0.15, over real HTTP on loopback.
//!
//! The same two axum handlers on each side (read a counter; increment a counter), a bounded
//! load generator (keep-alive hyper connections, a fixed time per cell), and one hot session:
//! - read-only requests at 1, 8 and 64 concurrent connections;
//! - concurrent increments of distinct keys of the one session (each connection its own key),
//!   then the lost updates: increments acknowledged minus increments stored.
//!
//! `cargo bench --features axum --bench web` prints a table (requests/s, p50/p99 latency, lost
//! updates). `LOCKTABLE_WEB_BENCH_SECS` sets the seconds per cell (default 2);
//! `LOCKTABLE_WEB_BENCH_CONNS=1,8` runs only the cells of those connection counts (16 is the
//! increments cell). Server threads are named `web-server`, load-generator threads
//! `web-client`, so that a profile can tell them apart.
//! `LOCKTABLE_WEB_BENCH_ROUNDS=N` repeats every cell N times; the contenders take turns cell
//! by cell (who goes first rotates), so a change in the machine's other load hits them alike,
//! and a last table gives medians and ratios to tower-sessions.
//! Server and load generator share the machine (separate tokio runtimes of 2 workers each);
//! every contender is served by the same server runtime. Each row also gives the server's CPU
//! time per request (its threads' `schedstat`), which the machine's other load disturbs much
//! less than requests/s.

#[path = "web_support/apps.rs"]
mod apps;
#[path = "../tests/web_support/http.rs"]
mod http;

use apps::Side;
use http::Conn;
use hyper::{Method, StatusCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

struct Cell {
    requests: u64,
    errors: u64,
    secs: f64,
    lat_us: Vec<u32>,
    lost: Option<u64>,
    /// CPU time of the server's threads (workers and blocking pool) during the cell.
    server_cpu_ns: u64,
}

impl Cell {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    fn pct(&mut self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return 0.0;
        }
        self.lat_us.sort_unstable();
        let i = ((self.lat_us.len() - 1) as f64 * p).round() as usize;
        self.lat_us[i] as f64 / 1000.0
    }
    /// Server CPU per answered request, in microseconds: what the server side costs, much less
    /// sensitive to the machine's other load than requests/s.
    fn cpu_us_per_req(&self) -> f64 {
        self.server_cpu_ns as f64 / 1000.0 / (self.requests + self.errors).max(1) as f64
    }
}

/// CPU time so far of each of this process's threads named `web-server` (Linux `schedstat`),
/// by thread ID.
fn server_cpu_ns() -> HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "web-server")
        })
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns = stat.split_whitespace().next()?.parse::<u64>().ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// Server CPU time spent since `before`: each thread's growth (a thread started since counts
/// whole; one that ended since, e.g. an idle blocking-pool thread, is left out rather than
/// subtracted).
fn server_cpu_since(before: &HashMap<String, u64>) -> u64 {
    server_cpu_ns()
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// `conns` connections send `path` (or `/api/incr/k{i}` when `incr`) for `secs`.
async fn load(addr: SocketAddr, cookie: String, conns: usize, secs: f64, incr: bool) -> Cell {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let cpu_before = server_cpu_ns();
    let mut tasks = Vec::new();
    for i in 0..conns {
        let cookie = cookie.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await.unwrap();
            let (method, path) = if incr {
                (Method::POST, format!("/api/incr/k{i}"))
            } else {
                (Method::GET, "/api/get/a".to_string())
            };
            let (mut lat, mut ok, mut err) = (Vec::with_capacity(1 << 14), 0u64, 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                match c.req(method.clone(), &path, Some(&cookie)).await {
                    Ok(r) if r.status == StatusCode::OK => ok += 1,
                    Ok(_) => err += 1,
                    Err(_) => {
                        err += 1;
                        c = Conn::open(addr).await.unwrap();
                    }
                }
                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            (lat, ok, err)
        }));
    }
    let mut cell = Cell {
        requests: 0,
        errors: 0,
        secs: 0.0,
        lat_us: Vec::new(),
        lost: None,
        server_cpu_ns: 0,
    };
    for t in tasks {
        let (lat, ok, err) = t.await.unwrap();
        cell.lat_us.extend(lat);
        cell.requests += ok;
        cell.errors += err;
    }
    cell.secs = start.elapsed().as_secs_f64();
    cell.server_cpu_ns = server_cpu_since(&cpu_before);
    if incr {
        // Every 200 was one acknowledged increment of the connection's own key.
        let mut c = Conn::open(addr).await.unwrap();
        let mut stored = 0u64;
        for i in 0..conns {
            let r = c
                .req(Method::GET, &format!("/api/get/k{i}"), Some(&cookie))
                .await
                .unwrap();
            stored += r.body.parse::<u64>().unwrap_or(0);
        }
        cell.lost = Some(cell.requests.saturating_sub(stored));
    }
    cell
}

/// A new session, created by one increment of `key`: its cookie.
async fn new_session(addr: SocketAddr, key: &str) -> String {
    let mut c = Conn::open(addr).await.unwrap();
    let r = c
        .req(Method::POST, &format!("/api/incr/{key}"), None)
        .await
        .unwrap();
    r.cookie_pair().expect("session cookie")
}

/// One contender, served for the whole run.
struct Server {
    side: Side,
    addr: SocketAddr,
    /// The hot session of the read-only cells: one key, `a`.
    read_cookie: String,
    _dir: tempfile::TempDir,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `LOCKTABLE_WEB_BENCH_INPROC=N`: N read-only requests of the hot session through each
/// contender's router in process (no network, one thread), for counting what one request
/// costs with `perf stat -e instructions:u` (pick one contender with the name filter): the
/// instruction count does not depend on the machine's other load, unlike any timing.
fn in_process(n: u64, filter: Option<&str>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for side in [
        Side::LocktableFile,
        Side::LocktableMemory,
        Side::TowerSessionsMemory,
    ] {
        if filter.is_some_and(|f| !side.name().to_lowercase().contains(&f.to_lowercase())) {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let app = rt.block_on(async { side.router(dir.path()) });
        let (_, cookie, _) = apps::call(&rt, &app, Method::POST, "/api/incr/a", None);
        let cookie = cookie.expect("session cookie");
        let t = Instant::now();
        for _ in 0..n {
            let (status, _, _) = apps::call(&rt, &app, Method::GET, "/api/get/a", Some(&cookie));
            assert_eq!(status, StatusCode::OK);
        }
        let per = t.elapsed().as_nanos() as f64 / n as f64;
        println!(
            "{}: {n} requests in process, {per:.0} ns each (wall clock)",
            side.name()
        );
    }
}

fn main() {
    let secs: f64 = env_or("LOCKTABLE_WEB_BENCH_SECS", 2.0);
    let rounds: usize = env_or("LOCKTABLE_WEB_BENCH_ROUNDS", 1usize).max(1);
    // Connection counts to run (comma-separated, e.g. `8,64`); all when unset.
    let workloads: Vec<String> = std::env::var("LOCKTABLE_WEB_BENCH_CONNS")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    // `cargo bench` passes `--bench`; a filter argument picks contenders by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    if let Ok(n) = std::env::var("LOCKTABLE_WEB_BENCH_INPROC") {
        in_process(n.parse().expect("a request count"), filter.as_deref());
        return;
    }
    // Both contenders get the same runtimes: the server's (2 workers, its blocking pool) and
    // the load generator's (2 workers).
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("web-server")
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("web-client")
        .enable_all()
        .build()
        .unwrap();
    let mut servers = Vec::new();
    for side in [
        Side::LocktableFile,
        Side::LocktableMemory,
        Side::TowerSessionsMemory,
    ] {
        if let Some(f) = &filter {
            if !side.name().to_lowercase().contains(&f.to_lowercase()) {
                continue;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let router = side.router(dir.path());
        let listener = server_rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        server_rt.spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        servers.push(Server {
            side,
            addr,
            read_cookie: client_rt.block_on(new_session(addr, "a")),
            _dir: dir,
        });
    }
    let runs: [(&str, usize, bool); 4] = [
        ("read-only", 1, false),
        ("read-only", 8, false),
        ("read-only", 64, false),
        ("increments, distinct keys", 16, true),
    ];
    println!(
        "web benchmark: {secs} s per cell, {rounds} round(s), contenders interleaved cell by \
         cell, loopback HTTP/1.1 keep-alive, one hot session"
    );
    println!(
        "| round | server | workload | conns | requests/s | p50 ms | p99 ms | server CPU µs/req \
         | errors | lost updates |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    // (side index, cell index) -> requests/s and CPU per request of each round.
    let mut rps = vec![vec![Vec::new(); runs.len()]; servers.len()];
    let mut cpu = vec![vec![Vec::new(); runs.len()]; servers.len()];
    let mut p50 = vec![vec![Vec::new(); runs.len()]; servers.len()];
    let mut p99 = vec![vec![Vec::new(); runs.len()]; servers.len()];
    // Lost and acknowledged increments, summed over the rounds.
    let mut lost = vec![vec![(0u64, 0u64); runs.len()]; servers.len()];
    for round in 0..rounds {
        for (ci, &(label, conns, incr)) in runs.iter().enumerate() {
            if !workloads.is_empty() && !workloads.contains(&conns.to_string()) {
                continue;
            }
            // Rotate who goes first, so that no contender always follows the same one.
            for k in 0..servers.len() {
                let si = (k + round) % servers.len();
                let sv = &servers[si];
                // Each increments cell gets a session of its own, so that its lost updates are
                // its own and the read-only cells of later rounds read the same one-key session.
                let cookie = if incr {
                    client_rt.block_on(new_session(sv.addr, "x"))
                } else {
                    sv.read_cookie.clone()
                };
                let mut cell = client_rt.block_on(load(sv.addr, cookie, conns, secs, incr));
                rps[si][ci].push(cell.rps());
                cpu[si][ci].push(cell.cpu_us_per_req());
                p50[si][ci].push(cell.pct(0.50));
                p99[si][ci].push(cell.pct(0.99));
                if let Some(l) = cell.lost {
                    lost[si][ci].0 += l;
                    lost[si][ci].1 += cell.requests;
                }
                println!(
                    "| {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {} | {} |",
                    round + 1,
                    sv.side.name(),
                    label,
                    conns,
                    cell.rps(),
                    cell.pct(0.50),
                    cell.pct(0.99),
                    cell.cpu_us_per_req(),
                    cell.errors,
                    cell.lost
                        .map_or("-".to_string(), |l| format!("{l} of {}", cell.requests)),
                );
            }
        }
    }
    // Medians over the rounds, and each contender's ratio to tower-sessions in the same cells.
    let anchor = servers
        .iter()
        .position(|s| matches!(s.side, Side::TowerSessionsMemory));
    println!();
    println!(
        "medians over {rounds} round(s); ratio = median over the rounds of requests/s over \
         tower-sessions' in the same round (higher is better)"
    );
    println!(
        "| server | workload | conns | requests/s | ratio | p50 ms | p99 ms | server CPU µs/req \
         | lost updates (all rounds) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (si, sv) in servers.iter().enumerate() {
        for (ci, &(label, conns, _)) in runs.iter().enumerate() {
            if rps[si][ci].is_empty() {
                continue;
            }
            let r = median(rps[si][ci].clone());
            // Paired: each round's ratio (the contenders ran that cell one after the other),
            // then the median of those, which a drift of the machine's load between rounds
            // does not skew.
            let ratio = anchor
                .filter(|&a| !rps[a][ci].is_empty())
                .map_or("-".to_string(), |a| {
                    let per_round = rps[si][ci].iter().zip(&rps[a][ci]).map(|(x, y)| x / y);
                    format!("{:.2}x", median(per_round.collect()))
                });
            let (l, acked) = lost[si][ci];
            println!(
                "| {} | {} | {} | {:.0} | {} | {:.3} | {:.3} | {:.1} | {} |",
                sv.side.name(),
                label,
                conns,
                r,
                ratio,
                median(p50[si][ci].clone()),
                median(p99[si][ci].clone()),
                median(cpu[si][ci].clone()),
                if acked > 0 {
                    format!("{l} of {acked}")
                } else {
                    "-".to_string()
                },
            );
        }
    }
}
