//! `locktable stat TABLE [--json]`: a snapshot of the table, for people or
//! (with `--json`) for scripts. It never creates or repairs a table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use locktable::TableStats;

use crate::common::{open_existing, print, CliResult, Failure, EXIT_ERROR};

#[derive(clap::Args)]
pub(crate) struct StatArgs {
    /// The table file.
    table: PathBuf,
    /// Print the statistics as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &StatArgs) -> CliResult<()> {
    let path = &args.table;
    let table = open_existing(path)?;
    let stats = table.stats().map_err(|e| Failure::table(path, e))?;
    let text = if args.json {
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
