//! A process that may ask `membarrier(2)` what it offers but may not issue
//! a barrier (a seccomp filter on the command argument), attached to a
//! table of asymmetric fences (DESIGN §10).
//!
//! Was a bug (src/sync.rs `membarrier::can_issue`, src/table.rs
//! `fences_for`): attach decided that the process "can issue the heavy
//! barrier" from `MEMBARRIER_CMD_QUERY` alone. Under a filter that allows
//! QUERY and refuses the barrier commands, the attach succeeded (readers
//! locked, since registration failed), and the first revocation of a
//! BIASED slot called `global_barrier`, whose fallback loop retries both
//! commands forever: a `try_write` (which promises never to wait) and a
//! `write_timeout` hung for good. Fix: attach issues the barrier once and
//! is refused (`Incompatible`) if neither command works.
//!
//! The same filter on a process that creates a table: creation checked
//! only the query, so the creator recorded asymmetric fences and (with the
//! attach fixed) was then refused by its own attach. Fix: the creator
//! records them only if it can issue the barrier.
#![cfg(not(locktable_loom))]

mod support;

use std::time::{Duration, Instant};

use locktable::{Error, LockTable, TableOptions};
use support::child::{quiet_child_command, Kids};
use support::seccomp::{self, jump, stmt, LD_W_ABS, RET_ALLOW, RET_ERRNO, RET_K};

const ROLE: &str = "LOCKTABLE_SECCOMP_CHILD_TABLE";
const CREATE_ROLE: &str = "LOCKTABLE_SECCOMP_CHILD_CREATES";
const ID: &str = "hot";

/// Exit codes of the child.
const ATTACHED_AND_WROTE: i32 = 0;
const REFUSED: i32 = 3;
const NO_SECCOMP: i32 = 4;

/// Installs, for the calling thread, a filter under which `membarrier`
/// fails with EPERM for every command but `MEMBARRIER_CMD_QUERY` (0).
/// False if the kernel or sandbox does not allow it.
fn forbid_membarrier_but_query() -> bool {
    // seccomp_data: nr at 0, args[0] at 16 (low half first on the
    // little-endian targets this runs on).
    seccomp::install(&[
        stmt(LD_W_ABS, 0),
        jump(libc::SYS_membarrier as u32, 0, 3),
        stmt(LD_W_ABS, 16),
        jump(0, 1, 0),
        stmt(RET_K, RET_ERRNO | libc::EPERM as u32),
        stmt(RET_K, RET_ALLOW),
    ])
}

/// Installs the filter, then opens (or creates) the table at `path`; exits
/// with `NO_SECCOMP` if the filter cannot be installed, `REFUSED` if the
/// open is refused as incompatible.
fn open_under_filter(path: &str) -> LockTable {
    if !forbid_membarrier_but_query() {
        std::process::exit(NO_SECCOMP);
    }
    match LockTable::open(path, &TableOptions::default().asymmetric_fences(true)) {
        Err(Error::Incompatible { .. }) => std::process::exit(REFUSED),
        other => other.unwrap(),
    }
}

/// The child's entry point: attaches under the filter, biases the ID, then
/// revokes the bias with a try and a timed write.
#[test]
#[ignore]
fn seccomp_child() {
    let Ok(path) = std::env::var(ROLE) else {
        return;
    };
    let t = open_under_filter(&path);
    drop(t.read(ID).unwrap());
    let g = t.read(ID).unwrap();
    assert!(g.is_biased(), "the second read was not biased");
    drop(g);
    drop(t.try_write(ID).unwrap().expect("nobody else holds the ID"));
    drop(t.read(ID).unwrap());
    drop(t.write_timeout(ID, Duration::from_secs(1)).unwrap());
    std::process::exit(ATTACHED_AND_WROTE);
}

/// The creating child's entry point: creates a table under the filter,
/// then biases an ID and revokes the bias.
#[test]
#[ignore]
fn seccomp_creator_child() {
    let Ok(path) = std::env::var(CREATE_ROLE) else {
        return;
    };
    let t = open_under_filter(&path);
    assert!(!t.asymmetric_fences());
    drop(t.read(ID).unwrap());
    drop(t.read(ID).unwrap());
    drop(t.write_timeout(ID, Duration::from_secs(1)).unwrap());
    std::process::exit(ATTACHED_AND_WROTE);
}

/// Runs the ignored test `test` with `role` = `path`; its exit code, or a
/// failure if it runs 20 s.
fn child_exit_code(test: &str, role: &str, path: &std::path::Path) -> Option<i32> {
    let mut kids = Kids::default();
    kids.0
        .push(quiet_child_command(test).env(role, path).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = kids.0[0].try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the child hung: a write under a filter that forbids membarrier's barrier never returned"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let code = status.code();
    assert_ne!(
        code,
        Some(NO_SECCOMP),
        "seccomp filters are not allowed here"
    );
    code
}

#[test]
fn a_process_that_cannot_issue_the_barrier_creates_a_locked_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    assert_eq!(
        child_exit_code("seccomp_creator_child", CREATE_ROLE, &path),
        Some(ATTACHED_AND_WROTE)
    );
    // The table it made is usable by everyone, with locked readers.
    let t = LockTable::open(&path, &TableOptions::default()).unwrap();
    assert!(!t.asymmetric_fences());
    drop(t.write(ID).unwrap());
}

#[test]
fn a_process_that_cannot_issue_the_barrier_is_refused_rather_than_hanging_in_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let t = LockTable::open(&path, &TableOptions::default().asymmetric_fences(true)).unwrap();
    assert!(
        t.asymmetric_fences(),
        "this machine offers no expedited membarrier: the test cannot run"
    );
    let code = child_exit_code("seccomp_child", ROLE, &path);
    assert!(
        code == Some(REFUSED) || code == Some(ATTACHED_AND_WROTE),
        "child exit code: {code:?}"
    );
}
