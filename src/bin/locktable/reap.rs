//! `locktable reap TABLE`: release every hold of every dead process and say
//! what was released.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::common::{open_existing, print, CliResult, Failure};

#[derive(clap::Args)]
pub(crate) struct ReapArgs {
    /// The table file.
    table: PathBuf,
}

pub(crate) fn run(args: &ReapArgs) -> CliResult<()> {
    let path = &args.table;
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
