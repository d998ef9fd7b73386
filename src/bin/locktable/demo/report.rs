//! What a demo run reports, per system, and how it is printed.

use std::fmt;
use std::time::Duration;

/// Which system a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum System {
    /// This crate's session layer on its embedded default.
    LockTable,
    /// flock per session file and whole-snapshot rewrite on every access (Beaker's way).
    FlockRewrite,
}

impl System {
    pub(super) fn name(self) -> &'static str {
        match self {
            System::LockTable => "locktable",
            System::FlockRewrite => "flock+rewrite",
        }
    }
    pub(super) fn parse(s: &str) -> Option<System> {
        [System::LockTable, System::FlockRewrite]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

/// Results for one system.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SystemReport {
    /// Which system.
    pub(super) system: System,
    /// Requests completed.
    pub(super) requests: u64,
    /// Wall time of the run.
    pub(super) elapsed: Duration,
    /// Median request latency.
    pub(super) p50: Duration,
    /// 99th percentile request latency.
    pub(super) p99: Duration,
    /// Writes of session data.
    pub(super) data_writes: u64,
    /// Writes of the access time alone.
    pub(super) touches: u64,
    /// Commits that had to be retried (conflicts).
    pub(super) conflicts: u64,
    /// Loads answered from the session cache, and loads that looked in it (0 when off).
    pub(super) cache: (u64, u64),
    /// Increments reported successful but missing from the final data.
    pub(super) lost_updates: u64,
}

impl SystemReport {
    /// Requests per second.
    pub(super) fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn per_1k(&self, n: u64) -> f64 {
        n as f64 * 1000.0 / (self.requests.max(1)) as f64
    }
}

/// The demo's result: one entry per system run.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DemoReport {
    /// Settings summary.
    pub(super) summary: String,
    /// locktable first, then the baseline when `compare` was set.
    pub(super) runs: Vec<SystemReport>,
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        write!(f, "{:<26}", "")?;
        for r in &self.runs {
            write!(f, "{:>16}", r.system.name())?;
        }
        writeln!(f)?;
        type Cell = Box<dyn Fn(&SystemReport) -> String>;
        let rows: Vec<(&str, Cell)> = vec![
            (
                "requests/s",
                Box::new(|r| format!("{:.0}", r.requests_per_sec())),
            ),
            (
                "p50 latency (ms)",
                Box::new(|r| format!("{:.3}", r.p50.as_secs_f64() * 1e3)),
            ),
            (
                "p99 latency (ms)",
                Box::new(|r| format!("{:.3}", r.p99.as_secs_f64() * 1e3)),
            ),
            (
                "data writes / 1k requests",
                Box::new(|r| format!("{:.1}", r.per_1k(r.data_writes))),
            ),
            (
                "touches / 1k requests",
                Box::new(|r| format!("{:.1}", r.per_1k(r.touches))),
            ),
            (
                "cache hit rate",
                Box::new(|r| match r.cache {
                    (_, 0) => "n/a".to_owned(),
                    (h, l) => format!("{:.1}%", h as f64 * 100.0 / l as f64),
                }),
            ),
            ("conflicts retried", Box::new(|r| r.conflicts.to_string())),
            ("lost updates", Box::new(|r| r.lost_updates.to_string())),
        ];
        for (name, cell) in rows {
            write!(f, "{name:<26}")?;
            for r in &self.runs {
                write!(f, "{:>16}", cell(r))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
