//! The real servers (Redis, memcached, PostgreSQL) that server-backed tests run against, named
//! by environment variables that `scripts/services start` and `scripts/pg-server start` print,
//! and names that keep one run's keys and tables apart from every other run's.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The value of `var`. A test failure when it is unset or empty: server tests never skip
/// silently (the test command starts the servers).
pub fn required_env(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: these tests must run against a real server (start it with \
             `eval \"$({})\"`)",
            starter_of(var)
        ),
    }
}

/// The script that starts the server behind `var` and prints it.
fn starter_of(var: &str) -> &'static str {
    if var.starts_with("LOCKTABLE_PG_") {
        "scripts/pg-server start"
    } else {
        "scripts/services start"
    }
}

/// `<process id><sep><nanoseconds><sep><counter>`: a tag no other call, test or run produces,
/// for key prefixes and table names (`sep` to suit what it names).
pub fn unique_tag(sep: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{}{sep}{nanos}{sep}{n}", std::process::id())
}
