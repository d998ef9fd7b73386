//! `locktable`: the command-line face of a lock table file.
//!
//! ```text
//! locktable stat TABLE [--json]
//! locktable lock TABLE ID [--read|--upgradable|--write] [--timeout DURATION] -- COMMAND [ARGS...]
//! locktable reap TABLE
//! locktable demo [--compare] [--fsync] [--secs S] [--workers N] [--readers N] [--threads]
//! locktable cache-demo [--workers N] [--keys K] [--secs S] [--period-ms P] [--create-ms C] [--grace-ms G]
//! ```
//!
//! - `stat` prints the table: geometry, attached processes, holders, waiters,
//!   dead holders waiting to be reaped and owner-died marks (`--json`: the
//!   library's `TableStats` as JSON). It never creates a table.
//! - `lock` holds the lock on `ID` (the bytes of the argument) while it runs
//!   `COMMAND`, like flock(1), then releases it. It creates the table file if
//!   it does not exist. The default mode is `--write`. `DURATION` is a number
//!   with an optional unit: `ns`, `us`, `ms`, `s` (the default), `m`, `h`,
//!   e.g. `300ms`, `2s`, `1.5m`.
//! - `reap` releases every hold of every dead process and prints what it
//!   released.
//! - `demo` runs the session workload in worker processes (this binary,
//!   re-executed) and prints throughput, latency, writes and lost updates.
//! - `cache-demo` runs worker processes on a few slow-to-create keys through
//!   the cache's `get_or_create` and through a no-lock baseline, and prints
//!   creations per key per expiry, requests served stale and waits.
//!
//! Tables are opened with the default options: the geometry comes from the
//! file.
//!
//! Exit status:
//!
//! | status  | meaning                                                    |
//! |---------|------------------------------------------------------------|
//! | 0       | success                                                    |
//! | 1       | error (bad table file, I/O, table full, ...)               |
//! | 2       | usage error (bad arguments)                                |
//! | 75      | `lock --timeout`: the lock was not granted in time (EX_TEMPFAIL) |
//! | 126     | `lock`: the command was found but could not be executed    |
//! | 127     | `lock`: the command was not found                          |
//! | N       | `lock`: the command exited with status N                   |
//! | 128 + S | `lock`: the command was killed by signal S                 |
//!
//! Errors are one line on stderr, `locktable: <message>`.
//!
//! Owns: argument parsing and the process's exit status; each subcommand
//! lives in its own module. Built only with the `cli` feature (on by
//! default), so the library itself never depends on clap.

// The library exports almost nothing under the loom cfg: no CLI then.
#[cfg(not(locktable_loom))]
mod cache_demo;
#[cfg(not(locktable_loom))]
mod common;
#[cfg(not(locktable_loom))]
mod demo;
#[cfg(not(locktable_loom))]
mod lock;
#[cfg(not(locktable_loom))]
mod reap;
#[cfg(not(locktable_loom))]
mod stat;

#[cfg(locktable_loom)]
fn main() {}

#[cfg(not(locktable_loom))]
fn main() {
    use std::io::Write as _;

    install_panic_hook();
    // `std::env::args()` panics on an argument that is not UTF-8; IDs and
    // paths are bytes. Workers (this binary, re-executed) get UTF-8 only, so
    // any other argument list skips the worker check and goes to clap.
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(std::ffi::OsString::into_string)
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    if let Some(worker_args) = demo::worker_args(&args) {
        std::process::exit(demo::worker_main(worker_args));
    }
    if let Some(worker_args) = cache_demo::worker_args(&args) {
        std::process::exit(cache_demo::worker_main(worker_args));
    }
    let cli = match <Cli as clap::Parser>::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let code = match run(cli) {
        Ok(code) => code,
        Err(f) => {
            let line = f.message.replace(['\n', '\r'], " ");
            let _ = writeln!(std::io::stderr(), "locktable: {line}");
            f.code
        }
    };
    std::process::exit(code);
}

/// Per-ID reader/upgradable/writer locks shared by processes through a
/// table file.
#[cfg(not(locktable_loom))]
#[derive(clap::Parser)]
#[command(name = "locktable", version, about, after_help = EXIT_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[cfg(not(locktable_loom))]
const EXIT_HELP: &str = "Exit status: 0 success, 1 error, 2 usage error, 75 lock timeout, \
    126 command not executable, 127 command not found; `lock` otherwise exits with the \
    command's status, or 128+N if it was killed by signal N.";

#[cfg(not(locktable_loom))]
#[derive(clap::Subcommand)]
enum Cmd {
    /// Show the table: processes, holders, waiters, dead holders.
    Stat(stat::StatArgs),
    /// Run a command while holding the lock on an ID (like flock(1)).
    Lock(lock::LockArgs),
    /// Release the holds of dead processes and print what was released.
    Reap(reap::ReapArgs),
    /// Run the session workload (browser pages of one writing and several
    /// reading requests on shared sessions) in worker processes and
    /// print throughput, latency, writes, touches and lost updates.
    Demo(demo::DemoArgs),
    /// Run worker processes on a few slow-to-create cache keys, with the
    /// cache's creation lock and without, and print creations per key per
    /// expiry, requests served stale and waits.
    CacheDemo(cache_demo::CacheDemoArgs),
}

#[cfg(not(locktable_loom))]
fn run(cli: Cli) -> common::CliResult<i32> {
    match cli.command {
        Cmd::Stat(args) => stat::run(&args).map(|()| 0),
        Cmd::Lock(args) => lock::run(&args),
        Cmd::Reap(args) => reap::run(&args).map(|()| 0),
        Cmd::Demo(args) => demo::run(&args).map(|()| 0),
        Cmd::CacheDemo(args) => cache_demo::run(&args).map(|()| 0),
    }
}

/// A panic (a bug) still gives one line on stderr, without a backtrace.
#[cfg(not(locktable_loom))]
fn install_panic_hook() {
    use std::io::Write as _;

    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = msg.replace(['\n', '\r'], " ");
        let _ = writeln!(std::io::stderr(), "locktable: internal error: {msg}{at}");
    }));
}

#[cfg(all(test, not(locktable_loom)))]
mod tests {
    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
