//! `locktable cache-demo`: worker processes hammer a few slow-to-create keys that expire at
//! the same instants, through the cache's `get_or_create` and through a no-lock baseline, and
//! the report counts creations per key per expiry.
//!
//! Time is cut into periods of `--period-ms`, counted from a common start instant. Every value
//! is fresh until the end of the period in which its request started, so all keys expire at
//! each period boundary, and every worker sees each expiry. A creation is tagged with the
//! period whose value it makes (the period in which its request started, whose end is the
//! value's expiry); with one creator per key there is one creation per key per period (a
//! second one would need a worker to stall for a whole period between its lookup and its
//! `create`), while the baseline (`get`, and on a miss `create` then `set`, as a cache
//! without a creation lock does) has every worker that sees the expiry create: a dogpile.
//!
//! - **locktable**: `Region::get_or_create` over `Cache::open` (lock table + `FileStore`). Once
//!   a value exists, an expired one is served stale (within `--grace-ms`) while one worker
//!   recreates it; the first values are awaited ("waits").
//! - **no lock**: `Region::get`, then `create` and `Region::set` on a miss, on a fresh
//!   directory.
//!
//! Workers are this binary, re-executed as `locktable __cache-demo-worker ARGS...`; each prints
//! one `result {json}` line. Owns: the workload and its report; it uses only the library's
//! public API.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use locktable::cache::{Cache, CacheConfig};
use locktable::Error;
use serde::{Deserialize, Serialize};

use crate::common::{print, CliResult, Failure, EXIT_ERROR, EXIT_USAGE};

/// The hidden subcommand of a worker process.
pub(crate) const WORKER_SUBCOMMAND: &str = "__cache-demo-worker";

/// The longest `--period-ms`: an hour.
const MAX_PERIOD_MS: u64 = 3_600_000;

#[derive(clap::Args)]
pub(crate) struct CacheDemoArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Keys hammered by every worker.
    #[arg(long, default_value_t = 3)]
    keys: usize,
    /// Seconds each system runs.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Every value expires at the end of a period of this many milliseconds.
    #[arg(long, default_value_t = 400)]
    period_ms: u64,
    /// Milliseconds one creation takes (a slow query or render).
    #[arg(long, default_value_t = 50)]
    create_ms: u64,
    /// How long past its expiry a value may be served while it is recreated (milliseconds).
    #[arg(long, default_value_t = 400)]
    grace_ms: u64,
}

/// One worker's instructions (its command line).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkerArgs {
    locked: bool,
    dir: PathBuf,
    keys: usize,
    period_ms: u64,
    create_ms: u64,
    grace_ms: u64,
    start_ms: u64,
    end_ms: u64,
}

/// What one worker did.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerResult {
    requests: u64,
    stale_served: u64,
    waits: u64,
    /// (key index, period, creations started in that period).
    creations: Vec<(usize, u64, u64)>,
}

/// The totals of one system.
#[derive(Debug, Default)]
struct SystemReport {
    requests: u64,
    stale_served: u64,
    waits: u64,
    creations: u64,
    /// Creations per (key, period), for every pair with at least one.
    per_expiry: BTreeMap<(usize, u64), u64>,
}

impl SystemReport {
    fn mean_per_expiry(&self) -> f64 {
        if self.per_expiry.is_empty() {
            return 0.0;
        }
        self.creations as f64 / self.per_expiry.len() as f64
    }
    fn max_per_expiry(&self) -> u64 {
        self.per_expiry.values().copied().max().unwrap_or(0)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn fail(e: &dyn std::fmt::Display) -> Failure {
    Failure::new(EXIT_ERROR, format!("cache-demo: {e}"))
}

pub(crate) fn run(args: &CacheDemoArgs) -> CliResult<()> {
    if !(args.secs.is_finite() && args.secs > 0.0 && args.secs <= 600.0) {
        return Err(Failure::new(EXIT_USAGE, "--secs must be in (0, 600]"));
    }
    if !(1..=64).contains(&args.workers) || !(1..=64).contains(&args.keys) {
        return Err(Failure::new(
            EXIT_USAGE,
            "--workers and --keys must be in 1..=64",
        ));
    }
    // The workers compute period ends in unix milliseconds: a period of up to an hour keeps
    // that far from overflow (a bigger one made every worker panic).
    if !(1..=MAX_PERIOD_MS).contains(&args.period_ms) {
        return Err(Failure::new(
            EXIT_USAGE,
            format!("--period-ms must be in 1..={MAX_PERIOD_MS}"),
        ));
    }
    if args.create_ms >= args.period_ms {
        return Err(Failure::new(
            EXIT_USAGE,
            "--create-ms must be shorter than --period-ms",
        ));
    }
    let exe = std::env::current_exe().map_err(|e| fail(&e))?;
    let dir = TempDir::new().map_err(|e| fail(&e))?;
    let mut reports = Vec::new();
    for locked in [true, false] {
        let sub = dir.0.join(if locked { "locktable" } else { "nolock" });
        reports.push(run_system(&exe, args, locked, &sub).map_err(|e| fail(&e))?);
    }
    print(&render_report(args, &reports[0], &reports[1]))
}

fn run_system(
    exe: &Path,
    args: &CacheDemoArgs,
    locked: bool,
    dir: &Path,
) -> Result<SystemReport, Error> {
    fs::create_dir_all(dir)?;
    // Room for the workers to start, so that all of them see the first period.
    let start_ms = unix_ms() + 500 + 50 * args.workers as u64;
    let a = WorkerArgs {
        locked,
        dir: dir.to_path_buf(),
        keys: args.keys,
        period_ms: args.period_ms,
        create_ms: args.create_ms,
        grace_ms: args.grace_ms,
        start_ms,
        end_ms: start_ms + (args.secs * 1000.0) as u64,
    };
    let json = serde_json::to_string(&a)?;
    let children = (0..args.workers)
        .map(|_| {
            Command::new(exe)
                .args([WORKER_SUBCOMMAND, &json])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut total = SystemReport::default();
    for mut child in children {
        let mut result = None;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                if let Some(j) = line?.strip_prefix("result ") {
                    result = Some(serde_json::from_str::<WorkerResult>(j)?);
                }
            }
        }
        let status = child.wait()?;
        let r = match result {
            Some(r) if status.success() => r,
            _ => {
                return Err(Error::Io(std::io::Error::other(format!(
                    "a worker failed: {status}"
                ))))
            }
        };
        total.requests += r.requests;
        total.stale_served += r.stale_served;
        total.waits += r.waits;
        for (key, period, n) in r.creations {
            total.creations += n;
            *total.per_expiry.entry((key, period)).or_default() += n;
        }
    }
    Ok(total)
}

fn render_report(args: &CacheDemoArgs, l: &SystemReport, b: &SystemReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cache-demo: {} worker processes, {} keys, every value expires each {} ms, a creation \
         takes {} ms, stale grace {} ms, {} s per system",
        args.workers, args.keys, args.period_ms, args.create_ms, args.grace_ms, args.secs
    );
    out.push('\n');
    let _ = writeln!(out, "{:<36}{:>12}{:>12}", "", "locktable", "no-lock");
    let mut row = |name: &str, x: String, y: String| {
        let _ = writeln!(out, "{name:<36}{x:>12}{y:>12}");
    };
    row(
        "creations per key per expiry",
        format!("{:.2}", l.mean_per_expiry()),
        format!("{:.2}", b.mean_per_expiry()),
    );
    row(
        "max creations per key per expiry",
        l.max_per_expiry().to_string(),
        b.max_per_expiry().to_string(),
    );
    row(
        "expiries (key x period)",
        l.per_expiry.len().to_string(),
        b.per_expiry.len().to_string(),
    );
    row(
        "creations",
        l.creations.to_string(),
        b.creations.to_string(),
    );
    row("requests", l.requests.to_string(), b.requests.to_string());
    row(
        "served stale",
        l.stale_served.to_string(),
        b.stale_served.to_string(),
    );
    row("waits", l.waits.to_string(), b.waits.to_string());
    out.push('\n');
    let _ = writeln!(
        out,
        "one creation per key per expiry with the creation lock: {}",
        if l.max_per_expiry() == 1 { "yes" } else { "NO" }
    );
    out
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, Error> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| Error::Random(e.to_string()))?;
        let p = std::env::temp_dir().join(format!(
            "locktable-cache-demo-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(r)
        ));
        fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The worker arguments when this process is a cache-demo worker, else `None`.
pub(crate) fn worker_args(args: &[String]) -> Option<&[String]> {
    match args.split_first() {
        Some((first, rest)) if first == WORKER_SUBCOMMAND => Some(rest),
        _ => None,
    }
}

/// Runs a worker; returns its exit status.
pub(crate) fn worker_main(args: &[String]) -> i32 {
    let r = match args {
        [json] => serde_json::from_str::<WorkerArgs>(json)
            .map_err(Error::from)
            .and_then(|a| worker(&a)),
        _ => Err(Error::Io(std::io::Error::other("expected one argument"))),
    };
    match r {
        Ok(result) => match serde_json::to_string(&result) {
            Ok(j) => {
                println!("result {j}");
                0
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "locktable: cache-demo worker: {e}");
                EXIT_ERROR
            }
        },
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "locktable: cache-demo worker: {e}");
            EXIT_ERROR
        }
    }
}

fn worker(a: &WorkerArgs) -> Result<WorkerResult, Error> {
    let cache = Cache::open_with(
        &a.dir,
        CacheConfig {
            stale_grace: Duration::from_millis(a.grace_ms),
            wait_timeout: Duration::from_secs(10),
            ..CacheConfig::default()
        },
    )?;
    let region = cache.region("demo");
    let period = |t: u64| t.saturating_sub(a.start_ms) / a.period_ms;
    let mut created: BTreeMap<(usize, u64), u64> = BTreeMap::new();
    let mut requests = 0;
    if let Some(wait) = a.start_ms.checked_sub(unix_ms()) {
        std::thread::sleep(Duration::from_millis(wait));
    }
    while unix_ms() < a.end_ms {
        for key in 0..a.keys {
            let now = unix_ms();
            // Fresh until the end of this period: a creation for this request makes "the
            // value of period p", and with one creator per key there is one per period.
            let p = period(now);
            let ttl = Duration::from_millis(a.start_ms + (p + 1) * a.period_ms - now);
            let name = format!("key{key}");
            let mut create = || -> Result<String, Error> {
                *created.entry((key, p)).or_default() += 1;
                std::thread::sleep(Duration::from_millis(a.create_ms));
                Ok(format!("{name} made at {}", unix_ms()))
            };
            if a.locked {
                let _: String = region.get_or_create(&name, ttl, create)?;
            } else if region.get::<String>(&name)?.is_none() {
                let v = create()?;
                region.set(&name, &v, ttl)?;
            }
            requests += 1;
        }
    }
    let st = cache.stats();
    Ok(WorkerResult {
        requests,
        stale_served: st.stale_served,
        waits: st.waits,
        creations: created.into_iter().map(|((k, p), n)| (k, p, n)).collect(),
    })
}
