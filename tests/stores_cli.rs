//! `locktable demo --store ...` on every store: the same report, and no lost update.
//!
//! Redis and memcached come from `LOCKTABLE_REDIS_URL` / `LOCKTABLE_MEMCACHED_URL` (see
//! `tests/stores.rs`): unset, these fail, saying how to start them.

use support::cli::{first_number as row, locktable};
use support::servers::required_env;

mod support;

/// Runs the demo on `store` and checks the report: requests served, none lost, only writing
/// requests wrote data.
fn demo_on(store: &str, describes: &str, workers: &str) -> String {
    let o = locktable(&["demo", "--store", store, "--secs", "0.6", "--workers", "3"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(&format!("3 worker {workers}")), "{out}");
    assert!(
        out.lines().nth(1).is_some_and(|l| l.contains(describes)),
        "{out}"
    );
    assert!(row(&out, "requests/s") > 0.0, "{out}");
    assert_eq!(row(&out, "lost updates"), 0.0, "{out}");
    // 1 writing + 4 reading requests per page: at most a fifth write.
    assert!(row(&out, "data writes / 1k requests") <= 250.0, "{out}");
    out
}

#[test]
fn demo_on_kv_in_a_named_directory_loses_nothing_and_leaves_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("demo");
    demo_on(&format!("kv:{}", kv.display()), "kv (LMDB)", "processes");
    assert!(kv.join("locks.table").exists());
    // The demo deletes its sessions at the end.
    let store = locktable::session::KvStore::open(kv.join("sessions.kv")).unwrap();
    let everything = locktable::session::Cutoffs {
        now: locktable::session::Timestamp(u64::MAX),
        idle_timeout: std::time::Duration::ZERO,
        max_lifetime: std::time::Duration::ZERO,
    };
    use locktable::session::Store;
    let scan = store.scan_expired(&everything, 100).unwrap();
    assert_eq!((scan.examined, scan.more), (0, false), "{scan:?}");
}

#[test]
fn demo_on_redis_loses_nothing() {
    let url = required_env("LOCKTABLE_REDIS_URL");
    demo_on(&url, "redis at", "processes");
}

#[test]
fn demo_on_memcached_loses_nothing() {
    let url = required_env("LOCKTABLE_MEMCACHED_URL");
    demo_on(&url, "memcached at", "processes");
}

#[test]
fn demo_on_memory_runs_threads() {
    demo_on("memory", "memory", "threads");
}

#[test]
fn demo_on_file_is_the_default() {
    let o = locktable(&["demo", "--secs", "0.3", "--workers", "2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("locktable store: file"), "{out}");
}

#[test]
fn demo_refuses_an_unknown_store_with_a_usage_error() {
    let o = locktable(&["demo", "--store", "mongodb://x"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--store") && err.contains("memcached://"),
        "{err}"
    );
}
