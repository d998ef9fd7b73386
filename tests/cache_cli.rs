//! End-to-end test of `locktable cache-demo`: with the cache's creation lock every key is
//! created once per expiry, while the no-lock baseline shows the dogpile.
#![cfg(not(locktable_loom))]

use support::cli::{locktable, locktable_to_closed_pipe};

mod support;

/// The two numbers (locktable, no-lock) of one report row.
fn row(report: &str, name: &str) -> [f64; 2] {
    let line = report
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {name:?} row in {report}"));
    let v: Vec<f64> = line[name.len()..]
        .split_whitespace()
        .map(|x| x.parse().unwrap_or_else(|_| panic!("{name}: {x:?}")))
        .collect();
    [v[0], v[1]]
}

#[test]
fn cache_demo_creates_once_per_expiry_where_the_baseline_dogpiles() {
    let o = locktable(&[
        "cache-demo",
        "--workers",
        "4",
        "--keys",
        "2",
        "--secs",
        "1.2",
        "--period-ms",
        "300",
        "--create-ms",
        "60",
        "--grace-ms",
        "300",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    let [mean, base_mean] = row(&out, "creations per key per expiry");
    let [max, base_max] = row(&out, "max creations per key per expiry");
    // The guarantee: exactly one creation for every key and period.
    assert_eq!((mean, max), (1.0, 1.0), "{out}");
    // Four workers, each seeing every expiry: without the lock several create the same value.
    assert!(base_max >= 2.0 && base_mean > 1.0, "{out}");
    let [expiries, _] = row(&out, "expiries (key x period)");
    assert!(expiries >= 6.0, "two keys over four periods: {out}");
    let [stale, base_stale] = row(&out, "served stale");
    assert!(stale > 0.0 && base_stale == 0.0, "{out}");
    // The first value of each key is awaited by the workers that did not create it.
    let [waits, _] = row(&out, "waits");
    assert!(waits > 0.0, "{out}");
    assert!(out.contains("with the creation lock: yes"), "{out}");
}

#[test]
fn cache_demo_rejects_bad_arguments_with_one_line() {
    for args in [
        ["--period-ms", "100", "--create-ms", "100"],
        // Regression: the workers overflowed computing the end of such a period and panicked.
        ["--period-ms", "18446744073709551615", "--secs", "0.2"],
    ] {
        let o = locktable(&[&["cache-demo"][..], &args[..]].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("locktable: "), "{args:?}: {err}");
    }
    let o = locktable(&["__cache-demo-worker", "nonsense"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cache-demo worker"), "{err}");
}

/// `println!` panicked when stdout was gone (`locktable cache-demo | head -0`): exit 101 and
/// "internal error". It is a one-line failure.
#[test]
fn cache_demo_to_a_closed_stdout_is_a_one_line_failure_not_a_panic() {
    let o = locktable_to_closed_pipe(&[
        "cache-demo",
        "--workers",
        "1",
        "--keys",
        "1",
        "--secs",
        "0.2",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("locktable: ") && err.contains("stdout"),
        "{err}"
    );
}
