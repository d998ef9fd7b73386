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
