//! `locktable lock TABLE ID [--read|--upgradable|--write] [--timeout D] -- COMMAND...`:
//! run a command while holding the lock on an ID, like flock(1), and exit
//! with the command's status.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use locktable::{Error, LockTable};

use crate::common::{
    open, CliResult, Failure, EXIT_CANNOT_EXECUTE, EXIT_ERROR, EXIT_NOT_FOUND, EXIT_TIMEOUT,
    EXIT_USAGE,
};

#[derive(clap::Args)]
pub(crate) struct LockArgs {
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

pub(crate) fn run(args: &LockArgs) -> CliResult<i32> {
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
}
