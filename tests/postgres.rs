//! Sessions and locks on a real PostgreSQL server: the store conformance suite on `PgStore`,
//! `SessionManager::postgres` across processes and hosts, advisory-lock exclusion, killed lock
//! holders, dropped connections and a restarted server, statement counts, and hostile input.
//!
//! The server comes from `LOCKTABLE_PG_URL` (`eval "$(scripts/pg-server start)"` starts a
//! throwaway one; `./scripts/test` does it). Without it these tests fail, saying how to
//! start one. The restart and statement-count tests also need
//! `LOCKTABLE_PG_DIR` (set by the same script): the restart test runs `scripts/pg-server
//! restart` and is `#[ignore]`d so that `scripts/test` runs it alone.
//!
//! Each test works in its own tables (a fresh schema per test binary run, a fresh table per
//! test), so tests run in parallel against one server. Child processes are this test binary
//! re-executed (`--exact child_role --ignored`) with `LOCKTABLE_PG_ROLE` naming their role.

#![cfg(feature = "postgres")]

#[allow(dead_code)]
#[path = "session_conformance.rs"]
mod conformance;

use conformance::Fixture;
use locktable::session::{
    Cutoffs, Expiry, PgLocks, PgPool, PgPoolOptions, PgStore, PgStoreOptions, SessionConfig,
    SessionId, SessionManager, SessionMeta, Store, StoredSession, Timestamp, Touch,
};
use locktable::{Error, LockTable, TableOptions};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use support::child::child_command;
use support::counters;
use support::servers::{required_env, unique_tag};

mod support;

const ROLE: &str = "LOCKTABLE_PG_ROLE";
const SCHEMA_ENV: &str = "LOCKTABLE_PG_TEST_SCHEMA";
const TABLE_ENV: &str = "LOCKTABLE_PG_TEST_TABLE";
const SID_ENV: &str = "LOCKTABLE_PG_TEST_ID";
const SECRET: [u8; 16] = *b"locktable-tests!";
const PROCESSES: usize = 4;
const INCREMENTS: u64 = 2000;

/// The server's URL; a test failure when there is none (the test command starts one).
fn pg_url() -> String {
    required_env("LOCKTABLE_PG_URL")
}

/// The throwaway server's directory (for its log, or to restart it), like [`pg_url`].
fn pg_dir() -> String {
    required_env("LOCKTABLE_PG_DIR")
}

/// A schema for this run of the test binary, so runs never see each other's rows.
fn run_schema() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    S.get_or_init(|| format!("lt_test_{}", unique_tag("_")))
}

/// Options for a fresh table set of this run.
fn fresh_options() -> PgStoreOptions {
    static N: AtomicUsize = AtomicUsize::new(0);
    PgStoreOptions {
        schema: run_schema().to_owned(),
        table: format!("t{}", N.fetch_add(1, Ordering::Relaxed)),
        ..PgStoreOptions::default()
    }
}

fn store(url: &str, opts: PgStoreOptions) -> PgStore {
    PgStore::with_pool(PgPool::connect(url).unwrap(), opts).unwrap()
}

fn pg_fixture() -> Fixture<PgStore> {
    let url = pg_url();
    let opts = fresh_options();
    let first = store(&url, opts.clone());
    Fixture {
        store: first,
        table: LockTable::anonymous(&TableOptions::default()).unwrap(),
        // Another host's handle: its own pool on the same tables.
        reopen: Some(Box::new(move || {
            Box::new(store(&url, opts.clone())) as Box<dyn Store>
        })),
        _keep: Box::new(()),
    }
}

/// The shared conformance checks, each on a fresh `PgStore`.
macro_rules! pg_conformance {
    ($($check:ident),* $(,)?) => {
        mod pg_store {
            use super::*;
            $(
                #[test]
                fn $check() {
                    conformance::$check(pg_fixture());
                }
            )*
        }
    };
}

pg_conformance!(
    load_absent,
    save_is_compare_and_swap,
    save_keeps_the_newer_access_time,
    touch_does_not_revive_an_expired_session,
    meta_is_kept_beside_the_record,
    load_reports_records_over_the_limit,
    remove_expired_is_a_checked_delete,
    remove_expired_is_atomic_with_touches,
    scan_expired_is_bounded_and_complete,
    shared_stores_agree_across_handles,
    atomic_cas_holds_across_handles,
    touch_is_monotonic_coalesced_and_leaves_data,
    delete_removes_everything,
    concurrent_cas_has_one_winner_per_version,
    concurrent_touches_keep_the_maximum,
    thousand_concurrent_reads_store_one_touch,
    manager_roundtrip_over_store,
    by_key_head_values_and_whole_agree,
    by_key_save_delta_writes_only_the_change,
    by_key_sizes_count_head_and_values,
    by_key_manager_get_remove_commit_expire,
    by_key_value_replaced_before_a_lazy_get,
    by_key_commit_over_the_limit_is_too_large,
    by_key_damaged_value_is_a_typed_error,
    by_key_a_growing_session_is_converted,
);

const T0: Timestamp = Timestamp(1_700_000_000_000);
const MAX: usize = 1 << 20;

/// A stored session with opaque bytes (the store does not decode records).
fn stored(version: u64, created: Timestamp, la: Timestamp, bytes: Vec<u8>) -> StoredSession {
    StoredSession {
        meta: SessionMeta {
            version,
            created,
            last_accessed: la,
            expiry: Expiry::Default,
            size: bytes.len() as u64,
        },
        bytes,
    }
}

/// The rule at `now` with an idle timeout of 100 s and a lifetime of 1,000 s.
fn rule(now: Timestamp) -> Cutoffs {
    Cutoffs {
        now,
        idle_timeout: Duration::from_secs(100),
        max_lifetime: Duration::from_secs(1000),
    }
}

fn sid() -> SessionId {
    SessionId::generate().unwrap()
}

/// `url` with its own `application_name`, so a test can terminate only its own connections.
fn named(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

/// Terminates every connection named `name` (as a dying network or server would).
fn terminate(url: &str, name: &str) {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
        &[&name],
    )
    .unwrap();
}

/// A manager over `PgStore` with a private lock table: processes share nothing but the database.
fn pg_manager(url: &str, opts: PgStoreOptions) -> SessionManager {
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    SessionManager::new(table, store(url, opts), SessionConfig::default())
}

// ---- schema ----

#[test]
fn schema_is_created_once_by_concurrent_starters_and_kept_by_later_ones() {
    let url = pg_url();
    let opts = fresh_options();
    let stores: Vec<PgStore> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|_| sc.spawn(|| store(&url, opts.clone())))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(stores[0].schema_version().unwrap(), 1);
    let i = sid();
    assert!(stores[1]
        .save(&i, None, &stored(1, T0, T0, b"x".to_vec()))
        .unwrap());
    // A later start migrates nothing and keeps the data.
    let again = store(&url, opts.clone());
    assert_eq!(again.load(&i, MAX).unwrap().unwrap().bytes, b"x");
    // Tables from a newer library are refused, not rewritten.
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.execute(
        &format!(
            "UPDATE \"{}\".locktable_schema SET version = 99 WHERE name = $1",
            opts.schema
        ),
        &[&format!("{}.{}", opts.schema, opts.table)],
    )
    .unwrap();
    let err = PgStore::with_pool(PgPool::connect(&url).unwrap(), opts).unwrap_err();
    assert!(
        matches!(&err, Error::Backend(m) if m.contains("newer")),
        "{err}"
    );
}

#[test]
fn bad_schema_or_table_names_are_refused() {
    let url = pg_url();
    for (schema, table) in [
        ("x\"; DROP SCHEMA public; --", "t"),
        ("ok", "T"),
        ("", "t"),
        ("ok", "1t"),
    ] {
        let opts = PgStoreOptions {
            schema: schema.into(),
            table: table.into(),
            ..PgStoreOptions::default()
        };
        let r = PgStore::with_pool(PgPool::connect(&url).unwrap(), opts);
        assert!(
            matches!(r, Err(Error::InvalidOptions(_))),
            "{schema} {table}"
        );
    }
}

// ---- store specifics ----

#[test]
fn purge_deletes_expired_sessions_in_bounded_batches() {
    let url = pg_url();
    let s = store(&url, fresh_options());
    let t = |secs| T0.saturating_add(Duration::from_secs(secs));
    let old: Vec<SessionId> = (0..5).map(|_| sid()).collect();
    for i in &old {
        assert!(s.save(i, None, &stored(1, t(0), t(10), vec![1])).unwrap());
    }
    let live = sid();
    assert!(s
        .save(&live, None, &stored(1, t(0), t(500), vec![1]))
        .unwrap());
    // A touch that lands before the purge keeps its session.
    assert_eq!(
        s.touch(&old[0], t(105), Duration::ZERO, &rule(t(105)))
            .unwrap(),
        Touch::Written
    );
    let cut = rule(t(200));
    assert_eq!(s.purge_expired(&cut, 2).unwrap(), 2);
    assert_eq!(s.purge_expired(&cut, 10).unwrap(), 2);
    assert_eq!(s.purge_expired(&cut, 10).unwrap(), 0);
    assert!(s.load(&old[0], MAX).unwrap().is_some());
    assert!(s.load(&live, MAX).unwrap().is_some());
    assert_eq!(
        old[1..]
            .iter()
            .filter(|i| s.load(i, MAX).unwrap().is_none())
            .count(),
        4
    );
    // Past its lifetime, even a fresh access does not keep a session.
    assert_eq!(s.purge_expired(&rule(t(1001)), 10).unwrap(), 2);
}

#[test]
fn oversize_records_are_typed_errors_and_never_shipped() {
    let url = pg_url();
    let opts = PgStoreOptions {
        max_record_size: 1000,
        ..fresh_options()
    };
    let s = store(&url, opts.clone());
    let i = sid();
    let r = s.save(&i, None, &stored(1, T0, T0, vec![7; 1001]));
    assert!(matches!(
        r,
        Err(Error::TooLarge {
            size: 1001,
            limit: 1000
        })
    ));
    assert!(s.load(&i, MAX).unwrap().is_none(), "nothing written");
    assert!(s.save(&i, None, &stored(1, T0, T0, vec![7; 1000])).unwrap());
    // A reader with a smaller limit (its own, or the manager's) gets the size, not the bytes.
    let small = store(
        &url,
        PgStoreOptions {
            max_record_size: 100,
            ..opts
        },
    );
    assert!(matches!(
        small.load(&i, MAX),
        Err(Error::TooLarge {
            size: 1000,
            limit: 100
        })
    ));
    assert!(matches!(
        s.load(&i, 10),
        Err(Error::TooLarge {
            size: 1000,
            limit: 10
        })
    ));
    // Through the manager: a commit that grows the record past the store's own limit (below the
    // manager's) writes nothing and keeps the session as it was.
    let mgr = SessionManager::new(
        LockTable::anonymous(&TableOptions::default()).unwrap(),
        store(
            &url,
            PgStoreOptions {
                max_record_size: 1 << 20,
                ..fresh_options()
            },
        ),
        SessionConfig {
            max_record_size: 4 << 20,
            ..SessionConfig::default()
        },
    );
    let mut sess = mgr.create().unwrap();
    sess.insert("small", &1).unwrap();
    let id = sess.id().to_string();
    sess.commit().unwrap();
    let mut sess = mgr.load(&id).unwrap().unwrap();
    sess.insert("big", &"x".repeat(2 << 20)).unwrap();
    assert!(matches!(sess.commit(), Err(Error::TooLarge { .. })));
    let sess = mgr.load(&id).unwrap().unwrap();
    assert!(sess.get::<String>("big").unwrap().is_none());
    assert_eq!(sess.get::<i32>("small").unwrap(), Some(1));
}

#[test]
fn hostile_ids_are_refused_or_hashed_never_reach_sql() {
    let url = pg_url();
    let opts = fresh_options();
    let mgr = pg_manager(&url, opts.clone());
    let mut s = mgr.create().unwrap();
    s.persist();
    let good = s.id().to_string();
    s.commit().unwrap();
    let long = "A".repeat(100_000);
    let hostile = [
        "'; DROP TABLE sessions; --",
        "\0",
        "",
        "ÄÖÜ-unicode-and-more-than-32-bytes",
        "../../etc/passwd",
        &long,
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'",
    ];
    for h in hostile {
        assert!(mgr.load(h).unwrap().is_none(), "{h:?}");
        assert!(mgr.load_exclusive(h).unwrap().is_none());
        assert!(mgr.transact(h, |_| Ok(())).unwrap().is_none());
        assert!(!mgr.delete(h).unwrap());
    }
    assert!(mgr.load(&good).unwrap().is_some(), "other sessions intact");
    // Lock IDs are hashed: quotes and NUL bytes are just bytes; empty and oversized are refused.
    let locks = PgLocks::connect(&url, SECRET).unwrap();
    for h in ["'; SELECT pg_sleep(100); --", "\0", "ÄÖÜ"] {
        let t = Instant::now();
        drop(locks.write(h).unwrap());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    assert!(matches!(locks.write(""), Err(Error::InvalidId { .. })));
    // An unrepresentable wait is no limit, not a panic.
    drop(locks.write_timeout("huge wait", Duration::MAX).unwrap());
    assert!(matches!(locks.read(&long), Err(Error::InvalidId { .. })));
}

#[test]
fn server_errors_name_the_operation_and_never_quote_data() {
    let url = pg_url();
    let opts = fresh_options();
    let s = store(&url, opts.clone());
    let i = sid();
    assert!(s
        .save(&i, None, &stored(1, T0, T0, b"secret-data".to_vec()))
        .unwrap());
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(&format!(
        "DROP TABLE \"{}\".\"{}\"",
        opts.schema, opts.table
    ))
    .unwrap();
    for r in [
        s.load(&i, MAX).map(|_| ()),
        s.save(&i, Some(1), &stored(2, T0, T0, b"x".to_vec()))
            .map(|_| ()),
        s.delete(&i).map(|_| ()),
    ] {
        let e = r.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Backend(_)), "{msg}");
        assert!(msg.contains("SQLSTATE 42P01"), "{msg}");
        assert!(
            !msg.contains(i.as_str()) && !msg.contains("secret"),
            "{msg}"
        );
        assert!(!msg.contains(&opts.table), "no SQL text: {msg}");
    }
}

#[test]
fn tables_changed_behind_the_stores_back_give_typed_errors_not_panics() {
    let url = pg_url();
    let opts = fresh_options();
    let s = store(&url, opts.clone());
    let i = sid();
    assert!(s.save(&i, None, &stored(1, T0, T0, vec![1])).unwrap());
    assert!(
        s.load(&i, MAX).unwrap().is_some(),
        "statement prepared and cached"
    );
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(&format!(
        "ALTER TABLE \"{}\".\"{}\" ALTER COLUMN size TYPE bigint",
        opts.schema, opts.table
    ))
    .unwrap();
    for _ in 0..3 {
        let r = s.load(&i, MAX);
        assert!(matches!(r, Err(Error::Backend(_))), "{r:?}");
        let r = s.meta(&i);
        assert!(matches!(r, Err(Error::Backend(_))), "{r:?}");
    }
}

/// Runs `sql` on the store's tables, `{d}` and `{a}` standing for the record and access tables.
fn plant(url: &str, opts: &PgStoreOptions, sql: &str) {
    let d = format!("\"{}\".\"{}\"", opts.schema, opts.table);
    let a = format!("\"{}\".\"{}_access\"", opts.schema, opts.table);
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.batch_execute(&sql.replace("{d}", &d).replace("{a}", &a))
        .unwrap();
}

#[test]
fn a_size_column_that_disagrees_with_the_bytes_ships_nothing_and_is_corrupt() {
    let url = pg_url();
    let opts = fresh_options();
    let s = store(&url, opts.clone());
    let other = sid();
    assert!(s
        .save(&other, None, &stored(1, T0, T0, vec![1; 10]))
        .unwrap());
    // Another program writes 2 MB of bytes but a size that passes any limit, or none at all.
    for size in ["10", "-1", "0", "2147483647"] {
        let i = sid();
        assert!(s.save(&i, None, &stored(1, T0, T0, vec![1; 10])).unwrap());
        plant(
            &url,
            &opts,
            &format!(
                "UPDATE {{d}} SET size = {size}, bytes = decode(repeat('ab', 2000000), 'hex') \
                 WHERE id = '{}'",
                i.as_str()
            ),
        );
        let r = s.load(&i, 1000);
        assert!(
            matches!(r, Err(Error::SessionCorrupt(_))),
            "size {size}: {:?}",
            r.map(|o| o.map(|st| (st.meta, st.bytes.len())))
        );
        let r = s.meta(&i);
        assert!(
            matches!(r, Err(Error::SessionCorrupt(_))),
            "size {size}: {r:?}"
        );
        assert!(s.delete(&i).unwrap());
    }
    assert_eq!(s.load(&other, MAX).unwrap().unwrap().bytes, vec![1; 10]);
}

#[test]
fn planted_rows_are_corrupt_collected_by_gc_and_always_deletable() {
    let url = pg_url();
    let opts = fresh_options();
    let mgr = pg_manager(&url, opts.clone());
    plant(
        &url,
        &opts,
        "ALTER TABLE {d} ALTER COLUMN bytes DROP NOT NULL, ALTER COLUMN created DROP NOT NULL, \
         ALTER COLUMN expiry_ms DROP NOT NULL, ALTER COLUMN version DROP NOT NULL; \
         ALTER TABLE {a} ALTER COLUMN last_accessed DROP NOT NULL",
    );
    // Each damage, as another program could leave it (`$` is the session's ID).
    let damages = [
        "UPDATE {d} SET size = size - 1 WHERE id = '$'",
        "UPDATE {d} SET size = size + 1000000 WHERE id = '$'",
        "UPDATE {d} SET size = -5 WHERE id = '$'",
        "UPDATE {d} SET version = -1 WHERE id = '$'",
        "UPDATE {d} SET version = NULL WHERE id = '$'",
        "UPDATE {d} SET expiry_kind = 9 WHERE id = '$'",
        "UPDATE {d} SET bytes = NULL WHERE id = '$'",
        "UPDATE {d} SET created = NULL WHERE id = '$'",
        "UPDATE {d} SET expiry_ms = NULL WHERE id = '$'",
        "UPDATE {a} SET last_accessed = NULL WHERE id = '$'",
        "DELETE FROM {a} WHERE id = '$'",
    ];
    let session = |k: usize| {
        let mut s = mgr.create().unwrap();
        s.insert("k", &k).unwrap();
        let id = s.id().to_string();
        s.commit().unwrap();
        id
    };
    let rows = |id: &str| -> i64 {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let d = format!("\"{}\".\"{}\"", opts.schema, opts.table);
        c.query_one(&format!("SELECT count(*) FROM {d} WHERE id = $1"), &[&id])
            .unwrap()
            .get(0)
    };
    let healthy = session(usize::MAX);
    // A row that no session ID names: not ours, left alone.
    plant(
        &url,
        &opts,
        "INSERT INTO {d} VALUES ('not a session', 1, 0, 0, 0, 1, '\\x00'); \
         INSERT INTO {a} VALUES ('not a session', 0)",
    );
    // gc collects every one of them as corrupt (they are not expired).
    let planted: Vec<String> = damages
        .iter()
        .enumerate()
        .map(|(k, sql)| {
            let id = session(k);
            plant(&url, &opts, &sql.replace('$', &id));
            id
        })
        .collect();
    let mut corrupt = 0;
    loop {
        let r = mgr.gc().unwrap();
        corrupt += r.corrupt;
        if !r.more {
            break;
        }
    }
    for (id, sql) in planted.iter().zip(damages) {
        assert_eq!(rows(id), 0, "gc left {sql}");
    }
    assert_eq!(corrupt, damages.len());
    // A load invalidates them (the default policy); `delete` removes them and says so.
    for (k, sql) in damages.iter().enumerate() {
        let id = session(k);
        plant(&url, &opts, &sql.replace('$', &id));
        let r = mgr.load(&id).map(|s| s.is_some());
        assert!(matches!(r, Ok(false)), "{sql}: {r:?}");
        assert_eq!(rows(&id), 0, "load left {sql}");
        let id = session(k);
        plant(&url, &opts, &sql.replace('$', &id));
        assert!(mgr.delete(&id).unwrap(), "{sql}");
        assert_eq!(rows(&id), 0, "delete left {sql}");
    }
    assert_eq!(rows("not a session"), 1);
    let s = mgr.load(&healthy).unwrap().unwrap();
    assert_eq!(s.get::<usize>("k").unwrap(), Some(usize::MAX));
}

// ---- advisory locks ----

#[test]
fn lock_modes_exclude_as_documented_and_timeouts_leave_nothing_held() {
    let url = pg_url();
    // Two users sharing only the database.
    let a = PgLocks::connect(&url, SECRET).unwrap();
    let b = PgLocks::connect(&url, SECRET).unwrap();
    let key = format!("modes-{}", run_schema());
    let short = Duration::from_millis(150);

    let r1 = a.read(&key).unwrap();
    let r2 = b.read_timeout(&key, short).unwrap();
    let u = b.upgradable_timeout(&key, short).unwrap();
    assert!(matches!(
        a.upgradable_timeout(&key, short),
        Err(Error::Timeout)
    ));
    // This attempt takes the intent key, then times out on the data key: it must release both.
    assert!(matches!(a.write_timeout(&key, short), Err(Error::Timeout)));
    assert!(matches!(a.try_write(&key), Ok(None)));
    drop(u);
    let u = a.upgradable_timeout(&key, short).unwrap();
    // The upgrade waits for the readers only.
    let released = Arc::new(AtomicBool::new(false));
    let w = std::thread::scope(|sc| {
        let rel = released.clone();
        sc.spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            rel.store(true, Ordering::SeqCst);
            drop(r1);
            drop(r2);
        });
        let w = u.upgrade().unwrap();
        assert!(
            released.load(Ordering::SeqCst),
            "upgrade waited for readers"
        );
        w
    });
    assert!(matches!(b.read_timeout(&key, short), Err(Error::Timeout)));
    assert!(matches!(
        b.upgradable_timeout(&key, short),
        Err(Error::Timeout)
    ));
    drop(w);
    drop(b.write_timeout(&key, short).unwrap());
    // A timed-out upgrade hands the upgradable hold back, still held.
    let r = a.read(&key).unwrap();
    let u = b.upgradable(&key).unwrap();
    let Err((Error::Timeout, u)) = u.upgrade_timeout(short) else {
        panic!("the upgrade should time out while a reader holds the lock");
    };
    assert!(matches!(
        a.upgradable_timeout(&key, short),
        Err(Error::Timeout)
    ));
    drop(r);
    let w = u.upgrade_timeout(short).map_err(|(e, _)| e).unwrap();
    drop(w);
    drop(a.write_timeout(&key, short).unwrap());
}

#[test]
fn a_lock_wait_for_a_free_connection_is_bounded_by_its_timeout() {
    let url = pg_url();
    let pool = PgPool::connect_with(
        &url,
        PgPoolOptions {
            max_connections: 1,
            ..PgPoolOptions::default()
        },
    )
    .unwrap();
    let locks = PgLocks::with_pool(pool, SECRET);
    let held = locks.read("pool-a").unwrap();
    let t = Instant::now();
    assert!(matches!(
        locks.write_timeout("pool-b", Duration::from_millis(100)),
        Err(Error::Timeout)
    ));
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(held);
    drop(
        locks
            .write_timeout("pool-b", Duration::from_millis(100))
            .unwrap(),
    );
}

#[test]
fn two_lock_users_never_both_hold_one_exclusive_lock() {
    let url = pg_url();
    let users = [
        PgLocks::connect(&url, SECRET).unwrap(),
        PgLocks::connect(&url, SECRET).unwrap(),
    ];
    let key = format!("excl-{}", run_schema());
    let inside = AtomicBool::new(false);
    let counter = AtomicU64::new(0);
    let per_thread = 150u64;
    std::thread::scope(|sc| {
        for t in 0..4usize {
            let (locks, key, inside, counter) = (&users[t % 2], &key, &inside, &counter);
            sc.spawn(move || {
                for k in 0..per_thread {
                    // Half the entries go through upgradable + upgrade.
                    let _w = if (k + t as u64) % 2 == 0 {
                        locks.write(key).unwrap()
                    } else {
                        locks.upgradable(key).unwrap().upgrade().unwrap()
                    };
                    assert!(
                        !inside.swap(true, Ordering::SeqCst),
                        "two exclusive holders"
                    );
                    // A read-modify-write that a second holder would break.
                    let v = counter.load(Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(50));
                    counter.store(v + 1, Ordering::SeqCst);
                    inside.store(false, Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(counter.into_inner(), 4 * per_thread);
}

fn spawn_child(role: &str, envs: &[(&str, &str)], stdout: Stdio) -> Child {
    let mut cmd = child_command("child_role");
    cmd.env(ROLE, role).stdout(stdout);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

#[test]
fn sigkill_of_an_exclusive_holder_frees_its_lock() {
    let url = pg_url();
    let key = format!("kill-{}", run_schema());
    let locks = PgLocks::connect(&url, SECRET).unwrap();
    let mut child = spawn_child("holder", &[(SID_ENV, &key)], Stdio::piped());
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut locked = false;
    for line in out.lines() {
        if line.unwrap().trim_end().ends_with("LOCKED") {
            locked = true;
            break;
        }
    }
    assert!(locked, "child did not report its lock");
    assert!(locks.try_write(&key).unwrap().is_none(), "child holds it");
    let killed = Instant::now();
    child.kill().unwrap(); // SIGKILL
    let w = locks.write_timeout(&key, Duration::from_secs(20)).unwrap();
    let took = killed.elapsed();
    child.wait().unwrap();
    println!("lock free {took:?} after SIGKILL of its holder (server noticed the closed socket)");
    drop(w);
}

// ---- many processes, one database ----

/// Runs `PROCESSES` writer children of `role` on one session and checks every count.
fn processes_count_exactly(role: &str) {
    let url = pg_url();
    let opts = fresh_options();
    let mgr = pg_manager(&url, opts.clone());
    let id = counters::empty_session(&mgr);
    let started = Instant::now();
    let children: Vec<Child> = (0..PROCESSES)
        .map(|k| {
            spawn_child(
                &format!("{role}:{k}"),
                &[
                    (SCHEMA_ENV, &opts.schema),
                    (TABLE_ENV, &opts.table),
                    (SID_ENV, &id),
                ],
                Stdio::inherit(),
            )
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a writer failed");
    }
    let s = mgr.load(&id).unwrap().unwrap();
    counters::assert_counts(&s, PROCESSES, INCREMENTS);
    println!(
        "{role}: {PROCESSES} processes x {INCREMENTS} increments, exact, in {:?}",
        started.elapsed()
    );
}

/// `SessionManager::postgres`: sessions and advisory locks on the database, no lock table.
/// `transact` never fails: its final, exclusive attempt cannot conflict.
#[test]
fn four_processes_sharing_only_the_database_count_exactly() {
    processes_count_exactly("writer-pg");
}

/// A private lock table per process and `PgStore` only: the store's compare-and-set alone keeps
/// every count exact (conflicts are retried by the caller).
#[test]
fn four_processes_with_private_lock_tables_count_exactly_by_cas() {
    processes_count_exactly("writer-cas");
}

fn pg_sessions(url: &str, opts: &PgStoreOptions, cfg: SessionConfig) -> SessionManager {
    SessionManager::postgres_with(url, opts.clone(), cfg).unwrap()
}

#[test]
fn managers_sharing_only_the_database_never_both_hold_an_exclusive_session() {
    let url = pg_url();
    let opts = fresh_options();
    let managers = [
        pg_sessions(&url, &opts, SessionConfig::default()),
        pg_sessions(&url, &opts, SessionConfig::default()),
    ];
    let mut s = managers[0].create().unwrap();
    s.insert("n", &0u64).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let inside = AtomicBool::new(false);
    let per_thread = 40u64;
    std::thread::scope(|sc| {
        for t in 0..4usize {
            let (mgr, id, inside) = (&managers[t % 2], &id, &inside);
            sc.spawn(move || {
                for _ in 0..per_thread {
                    let mut s = mgr.load_exclusive(id).unwrap().unwrap();
                    assert!(
                        !inside.swap(true, Ordering::SeqCst),
                        "two exclusive holders"
                    );
                    let n = s.get::<u64>("n").unwrap().unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                    s.insert("n", &(n + 1)).unwrap();
                    inside.store(false, Ordering::SeqCst);
                    s.commit().unwrap();
                }
            });
        }
    });
    let s = managers[1].load(&id).unwrap().unwrap();
    assert_eq!(s.get::<u64>("n").unwrap(), Some(4 * per_thread));
    assert_eq!(
        managers[0].stats().conflicts + managers[1].stats().conflicts,
        0,
        "exclusive requests cannot conflict"
    );
}

#[test]
fn optimistic_loads_take_no_lock_and_commits_wait_for_an_exclusive_holder() {
    let url = pg_url();
    let opts = fresh_options();
    let a = pg_sessions(&url, &opts, SessionConfig::default());
    let b = pg_sessions(&url, &opts, SessionConfig::default());
    let mut s = a.create().unwrap();
    s.insert("k", &1).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let mut held = a.load_exclusive(&id).unwrap().unwrap();
    // A read-only request goes on while the exclusive request holds the session.
    let t = Instant::now();
    let r = b
        .load_timeout(&id, Duration::from_millis(50))
        .unwrap()
        .unwrap();
    assert_eq!(r.get::<i32>("k").unwrap(), Some(1));
    r.commit().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    // A commit with changes waits for it.
    let mut w = b.load(&id).unwrap().unwrap();
    w.insert("other", &2).unwrap();
    assert!(matches!(
        w.commit_timeout(Duration::from_millis(200)),
        Err(Error::Timeout)
    ));
    // So does another exclusive request.
    assert!(matches!(
        b.load_exclusive_timeout(&id, Duration::from_millis(200)),
        Err(Error::Timeout)
    ));
    held.insert("k", &3).unwrap();
    held.commit().unwrap();
    let mut w = b.load(&id).unwrap().unwrap();
    w.insert("other", &2).unwrap();
    w.commit().unwrap();
    let s = a.load(&id).unwrap().unwrap();
    assert_eq!(
        (s.get::<i32>("k").unwrap(), s.get::<i32>("other").unwrap()),
        (Some(3), Some(2))
    );
}

/// Statements the server logged from connections that asked for `log_statement=all`.
fn logged_statements(log: &str, from: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap();
    text[from..]
        .lines()
        .filter(|l| l.contains("LOG:  statement: ") || l.contains("LOG:  execute "))
        .map(str::to_owned)
        .collect()
}

/// A read-only request is one statement (no lock, coalesced touch); a writing one is a lock, a
/// re-read, the compare-and-set save and an unlock. Counted in the server's statement log, which
/// only this test's connections write to (they set `log_statement=all` for themselves).
#[test]
fn a_read_only_request_is_one_statement() {
    let url = pg_url();
    let dir = pg_dir();
    let log = format!("{dir}/log");
    let logging = named(
        &url,
        &format!("lt_count_{}&options=-c%20log_statement%3Dall", run_schema()),
    );
    let clock = Arc::new(locktable::session::ManualClock::new(T0));
    let cfg = SessionConfig {
        clock: clock.clone(),
        ..SessionConfig::default()
    };
    let mgr = pg_sessions(&logging, &fresh_options(), cfg);
    let mut s = mgr.create().unwrap();
    s.insert("k", &1).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    // Warm up: statements are prepared once per connection.
    mgr.load(&id).unwrap().unwrap().commit().unwrap();
    mgr.transact(&id, |s| s.insert("k", &2)).unwrap().unwrap();
    let start = std::fs::metadata(&log).unwrap().len() as usize;
    for _ in 0..10 {
        let s = mgr.load(&id).unwrap().unwrap();
        assert_eq!(s.get::<i32>("k").unwrap(), Some(2));
        s.commit().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let reads = logged_statements(&log, start);
    assert_eq!(reads.len(), 10, "{reads:#?}");
    let start = std::fs::metadata(&log).unwrap().len() as usize;
    let mut s = mgr.load(&id).unwrap().unwrap();
    s.insert("k", &3).unwrap();
    s.commit().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let write = logged_statements(&log, start);
    assert_eq!(
        write.len(),
        5,
        "load, lock, re-read, save, unlock: {write:#?}"
    );
}

/// An exclusive request whose lock connection died lost its lock (the server released it): it
/// cannot commit any more, and another host's exclusive request goes ahead.
#[test]
fn an_exclusive_request_whose_connection_died_cannot_commit() {
    let url = pg_url();
    let opts = fresh_options();
    let name = format!("lt_fence_{}", run_schema());
    let a = pg_sessions(&named(&url, &name), &opts, SessionConfig::default());
    let b = pg_sessions(&url, &opts, SessionConfig::default());
    let mut s = a.create().unwrap();
    s.insert("k", &"first").unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let mut sa = a.load_exclusive(&id).unwrap().unwrap();
    sa.insert("k", &"from a").unwrap();
    terminate(&url, &name);
    let mut sb = b
        .load_exclusive_timeout(&id, Duration::from_secs(10))
        .unwrap()
        .unwrap();
    sb.insert("k", &"from b").unwrap();
    sb.commit().unwrap();
    let r = sa.commit();
    assert!(matches!(r, Err(Error::Backend(_))), "{r:?}");
    let s = b.load(&id).unwrap().unwrap();
    assert_eq!(s.get::<String>("k").unwrap().as_deref(), Some("from b"));
}

#[test]
fn gc_and_expiry_through_the_postgres_manager() {
    let url = pg_url();
    let clock = Arc::new(locktable::session::ManualClock::new(T0));
    let cfg = SessionConfig {
        clock: clock.clone(),
        idle_timeout: Duration::from_secs(60),
        ..SessionConfig::default()
    };
    let mgr = pg_sessions(&url, &fresh_options(), cfg);
    let ids: Vec<String> = (0..3)
        .map(|k| {
            let mut s = mgr.create().unwrap();
            s.insert("k", &k).unwrap();
            let id = s.id().to_string();
            s.commit().unwrap();
            id
        })
        .collect();
    // One session is used at 50 s (its touch is stored); the others idle out at 61 s.
    clock.advance(Duration::from_secs(50));
    mgr.load(&ids[0]).unwrap().unwrap().commit().unwrap();
    clock.advance(Duration::from_secs(11));
    assert!(mgr.load(&ids[1]).unwrap().is_none(), "expired on sight");
    let report = mgr.gc().unwrap();
    assert_eq!(report.deleted, 1, "{report:?}");
    assert!(mgr.load(&ids[0]).unwrap().is_some());
    assert!(mgr.load(&ids[2]).unwrap().is_none());
    assert!(mgr
        .store()
        .meta(&SessionId::parse(&ids[2]).unwrap())
        .unwrap()
        .is_none());
}

#[test]
fn sigkill_of_a_host_holding_an_exclusive_session_frees_it() {
    let url = pg_url();
    let opts = fresh_options();
    let mgr = pg_sessions(&url, &opts, SessionConfig::default());
    let mut s = mgr.create().unwrap();
    s.insert("k", &1).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let mut child = spawn_child(
        "exclusive-holder",
        &[
            (SCHEMA_ENV, &opts.schema),
            (TABLE_ENV, &opts.table),
            (SID_ENV, &id),
        ],
        Stdio::piped(),
    );
    let out = BufReader::new(child.stdout.take().unwrap());
    let locked = out
        .lines()
        .any(|l| l.unwrap().trim_end().ends_with("LOCKED"));
    assert!(locked, "child did not report its exclusive session");
    assert!(matches!(
        mgr.load_exclusive_timeout(&id, Duration::from_millis(200)),
        Err(Error::Timeout)
    ));
    let killed = Instant::now();
    child.kill().unwrap(); // SIGKILL
    let s = mgr
        .load_exclusive_timeout(&id, Duration::from_secs(20))
        .unwrap()
        .unwrap();
    let took = killed.elapsed();
    child.wait().unwrap();
    assert_eq!(
        s.get::<i32>("k").unwrap(),
        Some(1),
        "the dead host wrote nothing"
    );
    s.commit().unwrap();
    println!("exclusive session free {took:?} after SIGKILL of the host holding it");
}

/// Child side of the tests above (does nothing unless started by one of them).
#[test]
#[ignore = "child process of the PostgreSQL tests"]
fn child_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let child_options = || PgStoreOptions {
        schema: std::env::var(SCHEMA_ENV).unwrap(),
        table: std::env::var(TABLE_ENV).unwrap(),
        ..PgStoreOptions::default()
    };
    let url = std::env::var("LOCKTABLE_PG_URL").unwrap();
    let id = std::env::var(SID_ENV).unwrap();
    if role == "holder" {
        let locks = PgLocks::connect(&url, SECRET).unwrap();
        let _w = locks.write(&id).unwrap();
        println!("LOCKED");
        std::thread::sleep(Duration::from_secs(120));
    } else if role == "exclusive-holder" {
        let mgr = pg_sessions(&url, &child_options(), SessionConfig::default());
        let _s = mgr.load_exclusive(&id).unwrap().unwrap();
        println!("LOCKED");
        std::thread::sleep(Duration::from_secs(120));
    } else if let Some((kind, k)) = role.split_once(':') {
        let mgr = match kind {
            "writer-pg" => pg_sessions(&url, &child_options(), SessionConfig::default()),
            "writer-cas" => pg_manager(&url, child_options()),
            _ => panic!("unknown role {role}"),
        };
        let own = format!("p{k}");
        let mut conflicts = 0u64;
        let mut done = 0;
        while done < INCREMENTS {
            let r = mgr.transact(&id, |s| counters::add_one(s, &own));
            match r {
                Ok(Some(())) => done += 1,
                Ok(None) => panic!("session vanished"),
                // With private lock tables even the final attempt of `transact` may conflict:
                // its exclusive lock is in this process's table. The CAS wrote nothing; retry.
                Err(Error::Conflict { .. }) if kind == "writer-cas" => conflicts += 1,
                Err(e) => panic!("writer {k}: {e}"),
            }
        }
        let st = mgr.stats();
        println!(
            "{kind} {k}: {INCREMENTS} increments, {} commit conflicts retried inside transact, \
             {conflicts} failed transacts retried",
            st.conflicts
        );
    } else {
        panic!("unknown role {role}");
    }
}

// ---- a restarted server, dropped connections ----

/// Counts of one worker's outcomes.
#[derive(Default)]
struct Outcomes {
    acked: AtomicU64,
    unknown: AtomicU64,
    failed: AtomicU64,
    acked_after_disruption: AtomicU64,
}

/// Workers increment their own key through the manager while `disrupt` runs; afterwards every
/// key holds at least the acknowledged increments and at most those plus the ones whose outcome
/// was reported unknown (nothing lost, nothing applied twice), and work resumed.
fn increments_survive(url: &str, disrupt: impl FnOnce()) {
    let opts = fresh_options();
    // Sessions and advisory locks on the database, as `SessionManager::postgres` sets them up.
    let mgr = pg_sessions(url, &opts, SessionConfig::default());
    let id = counters::empty_session(&mgr);
    let outcomes: Vec<Outcomes> = (0..4).map(|_| Outcomes::default()).collect();
    let stop = AtomicBool::new(false);
    let disrupted = AtomicBool::new(false);
    std::thread::scope(|sc| {
        for (k, o) in outcomes.iter().enumerate() {
            let (mgr, id, stop, disrupted) = (&mgr, &id, &stop, &disrupted);
            sc.spawn(move || {
                let key = format!("w{k}");
                while !stop.load(Ordering::SeqCst) {
                    let r = mgr.transact(id, |s| {
                        let v = s.get::<u64>(&key)?.unwrap_or(0);
                        s.insert(key.clone(), &(v + 1))
                    });
                    match r {
                        Ok(Some(())) => {
                            o.acked.fetch_add(1, Ordering::SeqCst);
                            if disrupted.load(Ordering::SeqCst) {
                                o.acked_after_disruption.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Ok(None) => panic!("session vanished"),
                        Err(Error::OutcomeUnknown(_)) => {
                            o.unknown.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(Error::Backend(_)) => {
                            o.failed.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("untyped failure: {e}"),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        disrupt();
        disrupted.store(true, Ordering::SeqCst);
        let resumed = Instant::now();
        while outcomes
            .iter()
            .any(|o| o.acked_after_disruption.load(Ordering::SeqCst) < 10)
        {
            assert!(
                resumed.elapsed() < Duration::from_secs(30),
                "work did not resume"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let s = mgr.load(&id).unwrap().unwrap();
    let (mut errors, mut unknown_total) = (0, 0);
    for (k, o) in outcomes.iter().enumerate() {
        let got = s.get::<u64>(&format!("w{k}")).unwrap().unwrap_or(0);
        let acked = o.acked.load(Ordering::SeqCst);
        let unknown = o.unknown.load(Ordering::SeqCst);
        errors += unknown + o.failed.load(Ordering::SeqCst);
        unknown_total += unknown;
        assert!(
            acked <= got && got <= acked + unknown,
            "worker {k}: stored {got}, acknowledged {acked}, outcome unknown {unknown}"
        );
    }
    println!(
        "disruption: {errors} typed errors ({unknown_total} with unknown outcome), \
         no acknowledged increment lost or doubled"
    );
}

#[test]
fn dropped_connections_give_typed_errors_and_work_resumes() {
    let url = pg_url();
    let name = format!("lt_drop_{}", run_schema());
    increments_survive(&named(&url, &name), || {
        for _ in 0..3 {
            terminate(&url, &name);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

#[test]
#[ignore = "restarts the shared server: run it alone (scripts/test does)"]
fn server_restart_gives_typed_errors_and_work_resumes() {
    let url = pg_url();
    let dir = pg_dir();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-server");
    // A lock waiter in flight across the restart gets a typed error, not a hang or a panic.
    let locks = PgLocks::connect(&url, SECRET).unwrap();
    let key = format!("restart-{}", run_schema());
    let held = locks.write(&key).unwrap();
    let waiter = {
        let locks = locks.clone();
        let key = key.clone();
        std::thread::spawn(move || locks.write(&key).map(drop))
    };
    std::thread::sleep(Duration::from_millis(200));
    let restart = || {
        let st = Command::new(script)
            .args(["restart", &dir])
            .status()
            .unwrap();
        assert!(st.success(), "restart failed");
    };
    increments_survive(&url, restart);
    let waited = waiter.join().unwrap();
    assert!(matches!(waited, Err(Error::Backend(_))), "{waited:?}");
    drop(held);
    drop(locks.write_timeout(&key, Duration::from_secs(5)).unwrap());
}

#[test]
fn a_pool_reconnects_after_its_connections_die() {
    let url = pg_url();
    let name = format!("lt_reconnect_{}", run_schema());
    let pool = PgPool::connect_with(
        &named(&url, &name),
        PgPoolOptions {
            max_connections: 2,
            ..PgPoolOptions::default()
        },
    )
    .unwrap();
    let s = PgStore::with_pool(pool.clone(), fresh_options()).unwrap();
    let i = sid();
    assert!(s.save(&i, None, &stored(1, T0, T0, vec![1])).unwrap());
    terminate(&url, &name);
    // At most one call fails (the one that finds the dead connection); then it reconnects.
    let mut failures = 0;
    for _ in 0..5 {
        match s.load(&i, MAX) {
            Ok(got) => assert_eq!(got.unwrap().meta.version, 1),
            Err(Error::Backend(_)) => failures += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(failures <= 1, "{failures} failures");
    assert!(pool.open_connections() <= 2);
}
