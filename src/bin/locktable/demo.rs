//! `locktable demo [--compare] [--fsync] ...`: the session workload, on this
//! crate's session layer and (with `--compare`) beside today's
//! flock-and-rewrite way, in worker processes that re-execute this binary.
//!
//! Several workers (processes, or threads with `--threads`) act as browser
//! pages on a few shared sessions. Each page is one writing request
//! (increment the worker's own counter and a shared counter) plus several
//! concurrent reading requests, each doing a little simulated work. Two
//! systems run the same workload:
//! - **locktable**: the embedded default (`SessionManager::open`); writers use
//!   `SessionManager::transact`, readers `SessionManager::load`.
//! - **flock+rewrite**: a faithful model of Beaker's file backend
//!   ([`baseline`]).
//!
//! At the end, every counter is compared with the number of increments the
//! workers reported as successful: the difference is the number of lost
//! updates.
//!
//! Owns: the workload and its report. It uses only the library's public
//! API; nothing here is part of the library.

mod baseline;
mod driver;
mod histogram;
mod report;
mod store;
mod worker;

use std::io::Write as _;
use std::time::Duration;

use crate::common::{print, CliResult, Failure, EXIT_ERROR, EXIT_USAGE};
use driver::{run_demo, DemoConfig, WorkerMode};
use store::StoreSpec;

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// Also run today's way (flock per session file, every access
    /// rewriting the load-time snapshot, as Beaker does) side by side.
    #[arg(long)]
    compare: bool,
    /// Seconds each system runs.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Worker processes (browser pages in flight).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Reading requests per page, concurrent with its writing request.
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Run workers as threads of this process instead of processes.
    #[arg(long)]
    threads: bool,
    /// Make locktable's saves durable (fsync the file and directory);
    /// the baseline never fsyncs, as Beaker does not.
    #[arg(long)]
    fsync: bool,
    /// Session store of the locktable side: memory, file[:DIR], kv[:DIR] (LMDB),
    /// redis://HOST:PORT/, memcached://HOST:PORT or postgres://USER@HOST:PORT/DB (sessions and
    /// locks on the server, workers sharing nothing else). Without DIR, a temporary directory.
    #[arg(long, default_value = "file")]
    store: String,
}

pub(crate) fn run(args: &DemoArgs) -> CliResult<()> {
    if !(args.secs.is_finite() && args.secs > 0.0 && args.secs <= 3600.0) {
        return Err(Failure::new(EXIT_USAGE, "--secs must be in (0, 3600]"));
    }
    if args.workers == 0 || args.workers > 256 || args.readers > 64 {
        return Err(Failure::new(
            EXIT_USAGE,
            "--workers must be in 1..=256 and --readers in 0..=64",
        ));
    }
    let fail = |e: &dyn std::fmt::Display| Failure::new(EXIT_ERROR, format!("demo: {e}"));
    let store = StoreSpec::parse(&args.store).map_err(|e| Failure::new(EXIT_USAGE, e))?;
    // The memory store lives in one process: its workers are threads.
    let mode = if args.threads || !store.shared_across_processes() {
        WorkerMode::Threads
    } else {
        WorkerMode::Processes {
            exe: std::env::current_exe().map_err(|e| fail(&e))?,
        }
    };
    let cfg = DemoConfig {
        workers: args.workers,
        readers_per_page: args.readers,
        duration: Duration::from_secs_f64(args.secs),
        compare: args.compare,
        fsync: args.fsync,
        progress: true,
        mode,
        store,
        ..DemoConfig::default()
    };
    let report = run_demo(&cfg).map_err(|e| fail(&e))?;
    print(&format!("{report}\n"))
}

/// The worker arguments when this process is a demo worker (started by
/// `locktable demo` as `locktable __demo-worker ARGS...`), else `None`.
pub(crate) fn worker_args(args: &[String]) -> Option<&[String]> {
    match args.split_first() {
        Some((first, rest)) if first == worker::WORKER_SUBCOMMAND => Some(rest),
        _ => None,
    }
}

/// Runs a demo worker process; returns its exit status.
pub(crate) fn worker_main(args: &[String]) -> i32 {
    match worker::worker_main(args) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "locktable: demo worker: {e}");
            EXIT_ERROR
        }
    }
}
