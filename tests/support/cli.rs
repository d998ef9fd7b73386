//! Running the `locktable` binary and reading its demo reports.

use std::process::{Command, Output};

/// The `locktable` binary of this build.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_locktable"))
}

/// Runs `locktable ARGS...` to the end.
pub fn locktable(args: &[&str]) -> Output {
    bin().args(args).output().expect("run locktable")
}

/// The first line of `report` that starts with `name` (a row of a demo's report table); a test
/// failure when there is none.
pub fn report_line<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name:?} row in {report}"))
}

/// The first number of the report row `name`.
pub fn first_number(report: &str, name: &str) -> f64 {
    let line = report_line(report, name);
    line[name.len()..]
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("{name}: {line:?}"))
}

/// Runs `locktable ARGS...` with its stdout a pipe whose reader is already gone (as in
/// `locktable ... | head -0`); returns its output, stderr only. A child that another test
/// thread forks at the wrong moment keeps a copy of the reader until it execs; then the write
/// succeeds and the run exits 0, so such runs are repeated (a few times at most).
pub fn locktable_to_closed_pipe(args: &[&str]) -> Output {
    use std::process::Stdio;
    for _ in 0..10 {
        let mut child = bin()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run locktable");
        drop(child.stdout.take());
        let o = child.wait_with_output().expect("wait for locktable");
        if !o.status.success() {
            return o;
        }
    }
    panic!("locktable {args:?} wrote to a closed pipe and succeeded, 10 times");
}
