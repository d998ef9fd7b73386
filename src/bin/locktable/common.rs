//! What every subcommand shares: exit statuses, the one-line failure,
//! opening a table file, and writing to stdout.

use std::io::Write as _;
use std::path::Path;

use locktable::{Error, LockTable, TableOptions};

/// Exit status of a general error.
pub(crate) const EXIT_ERROR: i32 = 1;
/// Exit status of a usage error (as clap uses).
pub(crate) const EXIT_USAGE: i32 = 2;
/// Exit status of `lock --timeout` when the lock was not granted in time.
pub(crate) const EXIT_TIMEOUT: i32 = 75;
/// Exit status when the command exists but cannot be executed.
pub(crate) const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit status when the command does not exist.
pub(crate) const EXIT_NOT_FOUND: i32 = 127;

/// A failure: the exit status and the one-line message.
pub(crate) struct Failure {
    pub(crate) code: i32,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// An error of the library about the table at `path`.
    pub(crate) fn table(path: &Path, e: Error) -> Self {
        let code = match e {
            Error::Timeout => EXIT_TIMEOUT,
            _ => EXIT_ERROR,
        };
        Failure::new(code, format!("{}: {e}", path.display()))
    }
}

pub(crate) type CliResult<T> = Result<T, Failure>;

/// Opens (or creates) the table at `path`.
pub(crate) fn open(path: &Path) -> CliResult<LockTable> {
    LockTable::open(path, &TableOptions::default()).map_err(|e| Failure::table(path, e))
}

/// Opens an existing table; never creates one (an empty file would
/// otherwise become a fresh table).
pub(crate) fn open_existing(path: &Path) -> CliResult<LockTable> {
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
    // what it releases. Never create or initialise: a file whose creation
    // never finished is reported, not completed.
    let opts = TableOptions::default().reap_on_attach(false).create(false);
    LockTable::open(path, &opts).map_err(|e| Failure::table(path, e))
}

/// Writes `text` to stdout; a closed stdout is a failure, not a panic.
pub(crate) fn print(text: &str) -> CliResult<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::new(EXIT_ERROR, format!("cannot write to stdout: {e}")))
}
