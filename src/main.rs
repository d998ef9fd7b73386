//! `locktable`: the command-line face of a lock table file.
//!
//! ```text
//! locktable stat TABLE [--json]
//! locktable lock TABLE ID [--read|--upgradable|--write] [--timeout DURATION] -- COMMAND [ARGS...]
//! locktable reap TABLE
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

#[cfg(not(locktable_loom))]
fn main() {
    cli::main()
}

/// The library exports almost nothing under the loom cfg: no CLI then.
#[cfg(locktable_loom)]
fn main() {}

#[cfg(not(locktable_loom))]
mod cli {
    use std::ffi::OsString;
    use std::fmt::Write as _;
    use std::io::Write as _;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::ExitStatusExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, ExitStatus};
    use std::time::Duration;

    use clap::{Args, Parser, Subcommand};
    use locktable::session::demo;
    use locktable::{Error, LockTable, TableOptions, TableStats};

    /// Exit status of a general error.
    const EXIT_ERROR: i32 = 1;
    /// Exit status of a usage error (as clap uses).
    const EXIT_USAGE: i32 = 2;
    /// Exit status of `lock --timeout` when the lock was not granted in time.
    const EXIT_TIMEOUT: i32 = 75;
    /// Exit status when the command exists but cannot be executed.
    const EXIT_CANNOT_EXECUTE: i32 = 126;
    /// Exit status when the command does not exist.
    const EXIT_NOT_FOUND: i32 = 127;

    /// Per-ID reader/upgradable/writer locks shared by processes through a
    /// table file.
    #[derive(Parser)]
    #[command(name = "locktable", version, about, after_help = EXIT_HELP)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    const EXIT_HELP: &str = "Exit status: 0 success, 1 error, 2 usage error, 75 lock timeout, \
        126 command not executable, 127 command not found; `lock` otherwise exits with the \
        command's status, or 128+N if it was killed by signal N.";

    #[derive(Subcommand)]
    enum Cmd {
        /// Show the table: processes, holders, waiters, dead holders.
        Stat {
            /// The table file.
            table: PathBuf,
            /// Print the statistics as JSON.
            #[arg(long)]
            json: bool,
        },
        /// Run a command while holding the lock on an ID (like flock(1)).
        Lock(LockArgs),
        /// Release the holds of dead processes and print what was released.
        Reap {
            /// The table file.
            table: PathBuf,
        },
        /// Run the session workload (browser pages of one writing and several
        /// reading requests on shared sessions) in worker processes and
        /// print throughput, latency, writes, touches and lost updates.
        Demo(DemoArgs),
    }

    #[derive(Args)]
    struct DemoArgs {
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
    }

    #[derive(Args)]
    struct LockArgs {
        /// The table file (created if missing).
        table: PathBuf,
        /// The ID to lock (its bytes, as given).
        id: OsString,
        /// Hold a shared (read) lock.
        #[arg(long, group = "mode")]
        read: bool,
        /// Hold an upgradable lock (shared with readers, exclusive against
        /// writers and other upgradable holders).
        #[arg(long, group = "mode")]
        upgradable: bool,
        /// Hold an exclusive lock (the default).
        #[arg(long, group = "mode")]
        write: bool,
        /// Give up (exit 75) if the lock is not granted within DURATION
        /// (e.g. 300ms, 2s, 1m; a bare number is seconds).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// The command to run, and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<OsString>,
    }

    /// A failure: the exit status and the one-line message.
    struct Failure {
        code: i32,
        message: String,
    }

    impl Failure {
        fn new(code: i32, message: impl Into<String>) -> Self {
            Failure {
                code,
                message: message.into(),
            }
        }

        /// An error of the library about the table at `path`.
        fn table(path: &Path, e: Error) -> Self {
            let code = match e {
                Error::Timeout => EXIT_TIMEOUT,
                _ => EXIT_ERROR,
            };
            Failure::new(code, format!("{}: {e}", path.display()))
        }
    }

    type CliResult<T> = Result<T, Failure>;

    pub(crate) fn main() {
        install_panic_hook();
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.first().map(String::as_str) == Some(demo::WORKER_SUBCOMMAND) {
            // A demo worker process, started by `locktable demo`.
            let code = match demo::demo_worker_main(&args[1..]) {
                Ok(()) => 0,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "locktable: demo worker: {e}");
                    EXIT_ERROR
                }
            };
            std::process::exit(code);
        }
        let cli = match Cli::try_parse() {
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

    /// A panic (a bug) still gives one line on stderr, without a backtrace.
    fn install_panic_hook() {
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

    fn run(cli: Cli) -> CliResult<i32> {
        match cli.command {
            Cmd::Stat { table, json } => stat(&table, json).map(|()| 0),
            Cmd::Lock(args) => lock(&args),
            Cmd::Reap { table } => reap(&table).map(|()| 0),
            Cmd::Demo(args) => run_demo(&args).map(|()| 0),
        }
    }

    fn run_demo(args: &DemoArgs) -> CliResult<()> {
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
        let mode = if args.threads {
            demo::WorkerMode::Threads
        } else {
            demo::WorkerMode::Processes {
                exe: std::env::current_exe().map_err(|e| fail(&e))?,
                args_prefix: vec![demo::WORKER_SUBCOMMAND.to_owned()],
            }
        };
        let cfg = demo::DemoConfig {
            workers: args.workers,
            readers_per_page: args.readers,
            duration: Duration::from_secs_f64(args.secs),
            compare: args.compare,
            fsync: args.fsync,
            progress: true,
            mode,
            ..demo::DemoConfig::default()
        };
        let report = demo::run_demo(&cfg).map_err(|e| fail(&e))?;
        println!("{report}");
        Ok(())
    }

    // ---------------------------------------------------------------
    // Opening
    // ---------------------------------------------------------------

    /// Opens (or creates) the table at `path`.
    fn open(path: &Path) -> CliResult<LockTable> {
        LockTable::open(path, &TableOptions::default()).map_err(|e| Failure::table(path, e))
    }

    /// Opens an existing table; never creates one (an empty file would
    /// otherwise become a fresh table).
    fn open_existing(path: &Path) -> CliResult<LockTable> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Failure::new(
                    EXIT_ERROR,
                    format!("{}: no such table file", path.display()),
                ))
            }
            Err(e) => return Err(Failure::new(EXIT_ERROR, format!("{}: {e}", path.display()))),
            Ok(m) if m.is_file() && m.len() == 0 => {
                return Err(Failure::new(
                    EXIT_ERROR,
                    format!("{}: empty file, not a lock table", path.display()),
                ))
            }
            Ok(_) => {}
        }
        // Inspect before repairing: stat shows dead holders, reap reports
        // what it releases.
        let opts = TableOptions::default().reap_on_attach(false);
        LockTable::open(path, &opts).map_err(|e| Failure::table(path, e))
    }

    // ---------------------------------------------------------------
    // stat
    // ---------------------------------------------------------------

    fn stat(path: &Path, json: bool) -> CliResult<()> {
        let table = open_existing(path)?;
        let stats = table.stats().map_err(|e| Failure::table(path, e))?;
        let text = if json {
            let mut s = serde_json::to_string_pretty(&stats)
                .map_err(|e| Failure::new(EXIT_ERROR, format!("cannot encode JSON: {e}")))?;
            s.push('\n');
            s
        } else {
            render_stats(path, &stats)
        };
        print(&text)
    }

    fn yes_no(b: bool) -> &'static str {
        if b {
            "yes"
        } else {
            "no"
        }
    }

    fn render_stats(path: &Path, st: &TableStats) -> String {
        let mut out = String::new();
        let dead = st.dead_holders().count();
        let _ = writeln!(out, "table        {}", path.display());
        let _ = writeln!(
            out,
            "capacity     {} slots: {} assigned, {} in use",
            st.capacity, st.slots_assigned, st.slots_in_use
        );
        let _ = writeln!(out, "owner died   {} slot(s) marked", st.owner_died_marks);
        let _ = writeln!(
            out,
            "processes    {} attached (max {})",
            st.processes.len(),
            st.max_processes
        );
        for p in &st.processes {
            let me = if p.this_handle {
                "  (this command)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  index {:<5} pid {:<8} alive {:<3}{me}",
                p.index,
                p.pid,
                yes_no(p.alive)
            );
        }
        let _ = writeln!(out, "holders      {}", st.holders.len());
        for h in &st.holders {
            let _ = writeln!(
                out,
                "  slot {:<6} tag {} pid {:<8} process {:<5} mode {:<13} count {:<5} alive {}",
                h.slot,
                h.tag,
                h.pid,
                h.process,
                format!("{:?}", h.mode).to_lowercase(),
                h.count,
                yes_no(h.alive)
            );
        }
        let _ = writeln!(out, "waiters      {}", st.waiters.len());
        for w in &st.waiters {
            let _ = writeln!(
                out,
                "  slot {:<6} pid {:<8} process {:<5} threads {}",
                w.slot, w.pid, w.process, w.count
            );
        }
        let _ = writeln!(out, "dead holders {dead} waiting to be reaped");
        out
    }

    fn print(text: &str) -> CliResult<()> {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|e| Failure::new(EXIT_ERROR, format!("cannot write to stdout: {e}")))
    }

    // ---------------------------------------------------------------
    // reap
    // ---------------------------------------------------------------

    fn reap(path: &Path) -> CliResult<()> {
        let table = open_existing(path)?;
        let reaped = table.reap().map_err(|e| Failure::table(path, e))?;
        let mut out = String::new();
        for (index, pid, r) in &reaped {
            let _ = writeln!(
                out,
                "process {index} (pid {pid}): released {} slot(s), repaired {} bucket lock(s)",
                r.slots_released, r.buckets_repaired
            );
        }
        let _ = writeln!(out, "reaped {} dead process record(s)", reaped.len());
        print(&out)
    }

    // ---------------------------------------------------------------
    // lock
    // ---------------------------------------------------------------

    #[derive(Clone, Copy)]
    enum Mode {
        Read,
        Upgradable,
        Write,
    }

    impl Mode {
        fn of(args: &LockArgs) -> Mode {
            if args.read {
                Mode::Read
            } else if args.upgradable {
                Mode::Upgradable
            } else {
                Mode::Write
            }
        }

        fn name(self) -> &'static str {
            match self {
                Mode::Read => "read",
                Mode::Upgradable => "upgradable",
                Mode::Write => "write",
            }
        }
    }

    /// A hold of any mode, released on drop.
    #[allow(dead_code)] // held only for its Drop
    enum Held<'a> {
        Read(locktable::ReadGuard<'a>),
        Upgradable(locktable::UpgradableReadGuard<'a>),
        Write(locktable::WriteGuard<'a>),
    }

    fn acquire<'a>(
        table: &'a LockTable,
        id: &[u8],
        mode: Mode,
        timeout: Option<Duration>,
    ) -> locktable::Result<Held<'a>> {
        Ok(match (mode, timeout) {
            (Mode::Read, None) => Held::Read(table.read(id)?),
            (Mode::Read, Some(d)) => Held::Read(table.read_timeout(id, d)?),
            (Mode::Upgradable, None) => Held::Upgradable(table.upgradable_read(id)?),
            (Mode::Upgradable, Some(d)) => Held::Upgradable(table.upgradable_read_timeout(id, d)?),
            (Mode::Write, None) => Held::Write(table.write(id)?),
            (Mode::Write, Some(d)) => Held::Write(table.write_timeout(id, d)?),
        })
    }

    fn lock(args: &LockArgs) -> CliResult<i32> {
        let table = open(&args.table)?;
        let id = args.id.as_bytes();
        let mode = Mode::of(args);
        let held = acquire(&table, id, mode, args.timeout).map_err(|e| match e {
            Error::Timeout => Failure::new(
                EXIT_TIMEOUT,
                format!(
                    "timed out after {:?} waiting for a {} lock on {:?}",
                    args.timeout.unwrap_or_default(),
                    mode.name(),
                    String::from_utf8_lossy(id)
                ),
            ),
            e => Failure::table(&args.table, e),
        })?;
        let status = run_command(&args.command);
        drop(held);
        status.map(exit_code)
    }

    /// Runs the command and waits for it. While it runs, SIGINT and SIGQUIT
    /// are left to the command (as system(3) does), so that a Ctrl-C ends
    /// the command and this process still releases the lock in order.
    fn run_command(command: &[OsString]) -> CliResult<ExitStatus> {
        let (program, rest) = command
            .split_first()
            .ok_or_else(|| Failure::new(EXIT_USAGE, "no command given"))?;
        let mut child = Command::new(program).args(rest).spawn().map_err(|e| {
            let shown = program.to_string_lossy();
            match e.kind() {
                std::io::ErrorKind::NotFound => {
                    Failure::new(EXIT_NOT_FOUND, format!("{shown}: command not found"))
                }
                _ => Failure::new(EXIT_CANNOT_EXECUTE, format!("{shown}: cannot execute: {e}")),
            }
        })?;
        ignore_interrupts();
        child
            .wait()
            .map_err(|e| Failure::new(EXIT_ERROR, format!("waiting for the command: {e}")))
    }

    fn ignore_interrupts() {
        for sig in [libc::SIGINT, libc::SIGQUIT] {
            // Setting a signal's disposition to SIG_IGN installs no
            // handler code; it is always sound.
            // SAFETY: sound for the reasons just given.
            unsafe {
                libc::signal(sig, libc::SIG_IGN);
            }
        }
    }

    /// The command's exit status, or 128 + the signal that killed it.
    fn exit_code(status: ExitStatus) -> i32 {
        match (status.code(), status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => EXIT_ERROR,
        }
    }

    /// Parses `300ms`, `2s`, `1.5m`, `1h`, `250us`, `10ns`, or a bare number
    /// of seconds.
    fn parse_duration(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        if number.is_empty() {
            return Err(format!("{s:?} does not start with a number"));
        }
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{number:?} is not a number"))?;
        let unit_secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "" | "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("unknown unit {unit:?} (use ns, us, ms, s, m or h)")),
        };
        Duration::try_from_secs_f64(value * unit_secs).map_err(|_| format!("{s:?} is out of range"))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn durations() {
            let ok = |s: &str| parse_duration(s).unwrap();
            assert_eq!(ok("300ms"), Duration::from_millis(300));
            assert_eq!(ok("2s"), Duration::from_secs(2));
            assert_eq!(ok("2"), Duration::from_secs(2));
            assert_eq!(ok("1m"), Duration::from_secs(60));
            assert_eq!(ok("1.5s"), Duration::from_millis(1500));
            assert_eq!(ok("1h"), Duration::from_secs(3600));
            assert_eq!(ok("250us"), Duration::from_micros(250));
            assert_eq!(ok("0ms"), Duration::ZERO);
            for bad in [
                "",
                "ms",
                "5x",
                "-1s",
                "1..2s",
                "inf",
                "nan",
                "1e9999s",
                "9e99h",
                "99999999999999999999999h",
            ] {
                assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
            }
        }

        #[test]
        fn cli_definition_is_valid() {
            use clap::CommandFactory;
            Cli::command().debug_assert();
        }
    }
}
