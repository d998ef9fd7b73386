//! The run-queue refresh of asymmetric fences (src/sync.rs
//! `membarrier::refresh_runqueues`, DESIGN §10 "Status (stop 20)") in
//! processes where it cannot do its job. Each case runs in a re-executed
//! child of this test binary, because the refresh happens once per process:
//!
//! * a seccomp filter makes `clone` fail (EPERM): no child, so no refresh;
//! * a seccomp filter makes `sched_setaffinity` fail (EPERM), as
//!   `SystemCallFilter=~@resources` with `SystemCallErrorNumber=EPERM` or an
//!   LSM that denies `setsched` does: the refresh's child runs and exits, but
//!   has visited no CPU, so nothing was refreshed;
//!
//! Since both cases install a seccomp filter, the process now skips the
//! refresh before it forks (a filter may kill on `clone`), so both check
//! that skip; the child's own check of its moves (an LSM that denies
//! `setsched` without a filter) is not reached here.
//!
//! In each case the process must still attach, report that its readers do
//! *not* publish plainly (`asymmetric_fences() == false`: the barrier may
//! skip CPUs it runs on), keep its signal mask, and exclude a writer beside
//! its reader, its own or another process's.
//!
//! And in applications that handle children themselves (SIGCHLD counted
//! and `waitpid(-1)`, or SIGCHLD ignored, which auto-reaps children that
//! signal at exit), the refresh's child must be invisible to them and
//! still be waited for, so the refresh works: plain reads, signal mask
//! kept, locks exclusive.
#![cfg(not(locktable_loom))]

mod support;

use std::time::{Duration, Instant};

use locktable::{LockTable, TableOptions};
use support::child::{quiet_child_command, Kids};
use support::seccomp::forbid_syscall;

const TABLE: &str = "LOCKTABLE_REFRESH_EDGE_TABLE";
const CASE: &str = "LOCKTABLE_REFRESH_EDGE_CASE";
const ID: &str = "hot";

/// Exit codes of the child.
const LOCKED_AND_CORRECT: i32 = 0;
const CLAIMED_PLAIN_READS: i32 = 5;
const MASK_CHANGED: i32 = 6;
const NO_SECCOMP: i32 = 4;
const SAW_OUR_CHILD: i32 = 7;
const NO_PLAIN_READS: i32 = 8;

/// SIGCHLDs this process received (the "sigchld_counted" case).
static SIGCHLDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn count_sigchld(_: libc::c_int) {
    SIGCHLDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// The calling thread's signal mask.
fn current_mask() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid out-buffer; a null new set
    // makes pthread_sigmask only read the mask.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old),
            0
        );
        old
    }
}

/// True if the two masks block the same ordinary signals.
fn same_mask(a: &libc::sigset_t, b: &libc::sigset_t) -> bool {
    (1..32).all(|sig| {
        // SAFETY: both sets are initialised; sigismember only reads them.
        unsafe { libc::sigismember(a, sig) == libc::sigismember(b, sig) }
    })
}

/// The child's entry point: sets up its case, attaches, and checks.
#[test]
#[ignore]
fn refresh_edge_child() {
    let (Ok(path), Ok(case)) = (std::env::var(TABLE), std::env::var(CASE)) else {
        return;
    };
    // A mask the application chose: SIGUSR2 blocked. The refresh blocks
    // everything around its clone and must put this back.
    // SAFETY: the set is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let installed = match case.as_str() {
        "clone" => forbid_syscall(libc::SYS_clone),
        "affinity" => forbid_syscall(libc::SYS_sched_setaffinity),
        "sigchld_ignored" => {
            // SAFETY: SIG_IGN is a valid disposition for SIGCHLD.
            unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
            true
        }
        "sigchld_counted" => {
            // SAFETY: the handler only does an atomic add (async-signal-safe).
            unsafe {
                libc::signal(
                    libc::SIGCHLD,
                    count_sigchld as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
            true
        }
        other => panic!("unknown case {other}"),
    };
    if !installed {
        std::process::exit(NO_SECCOMP);
    }
    let before = current_mask();
    let t = LockTable::open(&path, &TableOptions::default().asymmetric_fences(true)).unwrap();
    if !same_mask(&before, &current_mask()) {
        std::process::exit(MASK_CHANGED);
    }
    if case == "sigchld_counted" || case == "sigchld_ignored" {
        // An application that reaps whatever child it is told about (as
        // init-like supervisors do) must not be told about, nor find, a
        // child it never made; and the refresh must have worked.
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if SIGCHLDS.load(std::sync::atomic::Ordering::SeqCst) != 0 || reaped > 0 {
            std::process::exit(SAW_OUR_CHILD);
        }
        if !t.asymmetric_fences() {
            std::process::exit(NO_PLAIN_READS);
        }
    } else if t.asymmetric_fences() {
        std::process::exit(CLAIMED_PLAIN_READS);
    }
    // Locks still exclude: a biased read keeps this process's writer out,
    // then the writer gets in once it is gone.
    drop(t.read(ID).unwrap());
    let g = t.read(ID).unwrap();
    assert!(t.try_write(ID).unwrap().is_none(), "writer beside a reader");
    drop(g);
    drop(t.try_write(ID).unwrap().expect("nobody holds the ID"));
    // Hold a read for the parent to try against.
    let g = t.read(ID).unwrap();
    let flag = format!("{path}.reading");
    std::fs::write(&flag, b"").unwrap();
    let done = format!("{path}.tried");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(&done).exists() {
        assert!(Instant::now() < deadline, "parent never tried");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(g);
    std::process::exit(LOCKED_AND_CORRECT);
}

/// Runs the child for `case` against a table of asymmetric fences; while it
/// holds a read, this process's writer must be refused. Returns the
/// child's exit code.
fn run_case(case: &str) -> Option<i32> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let t = LockTable::open(&path, &TableOptions::default().asymmetric_fences(true)).unwrap();
    assert!(
        t.asymmetric_fences(),
        "this machine offers no expedited membarrier (or the refresh failed in a plain \
         process): the test cannot run"
    );
    let mut kids = Kids::default();
    kids.0.push(
        quiet_child_command("refresh_edge_child")
            .env(TABLE, &path)
            .env(CASE, case)
            .spawn()
            .unwrap(),
    );
    let reading = dir.path().join("t.reading");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = kids.0[0].try_wait().unwrap() {
            break st;
        }
        if reading.exists() && !dir.path().join("t.tried").exists() {
            assert!(
                t.try_write(ID).unwrap().is_none(),
                "{case}: a writer was granted beside the child's read"
            );
            std::fs::write(dir.path().join("t.tried"), b"").unwrap();
        }
        assert!(Instant::now() < deadline, "{case}: the child hung");
        std::thread::sleep(Duration::from_millis(5));
    };
    let code = status.code();
    assert_ne!(
        code,
        Some(NO_SECCOMP),
        "seccomp filters are not allowed here"
    );
    if code == Some(LOCKED_AND_CORRECT) {
        assert!(dir.path().join("t.tried").exists());
        drop(t.try_write(ID).unwrap().expect("the child is gone"));
    }
    code
}

#[test]
fn a_process_that_cannot_clone_reads_with_locked_instructions() {
    assert_eq!(run_case("clone"), Some(LOCKED_AND_CORRECT));
}

#[test]
fn a_process_whose_refresh_cannot_move_between_cpus_reads_with_locked_instructions() {
    assert_eq!(run_case("affinity"), Some(LOCKED_AND_CORRECT));
}

#[test]
fn a_process_that_ignores_sigchld_still_refreshes() {
    assert_eq!(run_case("sigchld_ignored"), Some(LOCKED_AND_CORRECT));
}

#[test]
fn the_refresh_child_is_invisible_to_the_applications_sigchld_and_wait() {
    assert_eq!(run_case("sigchld_counted"), Some(LOCKED_AND_CORRECT));
}
