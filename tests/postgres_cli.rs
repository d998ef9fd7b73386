//! `locktable demo --store postgres://...`: worker processes that share nothing but the
//! PostgreSQL server (no lock table, no directory) print the usual report, with no lost update.
//!
//! The server comes from `LOCKTABLE_PG_URL` (`eval "$(scripts/pg-server start)"`; `./scripts/test`
//! does it): unset, this fails, saying how to start one.

use support::cli::{first_number as row, locktable};
use support::servers::required_env;

mod support;

fn pg_url() -> String {
    required_env("LOCKTABLE_PG_URL")
}

#[test]
fn demo_on_postgres_loses_nothing_beside_the_baseline() {
    let url = pg_url();
    let o = locktable(&[
        "demo",
        "--store",
        &url,
        "--compare",
        "--secs",
        "1",
        "--workers",
        "3",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("3 worker processes"), "{out}");
    let header = out.lines().nth(1).unwrap_or_default();
    assert!(header.contains("postgres at"), "{out}");
    assert!(header.contains("no lock table"), "{out}");
    let requests = out
        .lines()
        .find(|l| l.starts_with("requests/s"))
        .expect("requests row");
    let per_system: Vec<f64> = requests["requests/s".len()..]
        .split_whitespace()
        .map(|x| x.parse().expect("a number"))
        .collect();
    assert!(per_system.len() == 2 && per_system[0] > 0.0, "{out}");
    // The lost-updates row's first column is the PostgreSQL side.
    assert_eq!(row(&out, "lost updates"), 0.0, "{out}");
    // 1 writing + 4 reading requests per page: reads write no data.
    assert!(row(&out, "data writes / 1k requests") <= 250.0, "{out}");
}

#[test]
fn an_unreachable_postgres_server_is_a_clear_error_not_a_panic() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let o = locktable(&[
        "demo",
        "--store",
        "postgres://nobody@127.0.0.1:1/none",
        "--secs",
        "0.2",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("locktable: demo:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
