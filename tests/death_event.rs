//! A holder's death is noticed by an event (the watcher's pidfd), not by
//! the waiters' liveness poll: with a 10 s poll interval, a waiter in
//! another process acquires within a fraction of a second of the SIGKILL.
//!
//! The test binary re-executes itself as the holder (`LOCKTABLE_DE_ROLE`).
#![cfg(not(locktable_loom))]

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use locktable::{LockTable, TableOptions};
use support::child::child_command;

mod support;

const ROLE: &str = "LOCKTABLE_DE_ROLE";
const ID: &str = "watched";
/// Far longer than any acquisition below may take: a result within the
/// limit cannot come from the poll.
const POLL: Duration = Duration::from_secs(10);
/// How long a waiter may take after the kill (the kernel's teardown of a
/// small process plus scheduling on a loaded 2-core machine).
const LIMIT: Duration = Duration::from_secs(3);

#[test]
#[ignore = "child process of the other tests"]
fn holder() {
    let Ok(spec) = std::env::var(ROLE) else {
        return;
    };
    let (mode, path) = spec.split_once(':').unwrap();
    let t = LockTable::open(path, &TableOptions::default()).unwrap();
    let _held: Box<dyn std::any::Any> = match mode {
        "write" => Box::new(t.write(ID).unwrap().into_owned()),
        "upgradable" => Box::new(t.upgradable_read(ID).unwrap().into_owned()),
        _ => Box::new(t.read(ID).unwrap().into_owned()),
    };
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

struct Holder(Child);

impl Holder {
    fn spawn(mode: &str, path: &std::path::Path) -> Holder {
        let mut c = child_command("holder")
            .arg("--quiet")
            .env(ROLE, format!("{mode}:{}", path.display()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        while line.trim() != "ready" {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "holder exited");
        }
        Holder(c)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills a `mode` holder while a writer of this process sleeps on the ID,
/// and returns how long after the kill the writer got the lock.
fn kill_to_acquisition(mode: &str) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    let table = LockTable::open(&path, &TableOptions::default().poll_interval(POLL)).unwrap();
    let mut holder = Holder::spawn(mode, &path);
    let t = table.clone();
    let waiter = std::thread::spawn(move || {
        let g = t.write_timeout(ID, LIMIT + Duration::from_secs(2));
        let at = Instant::now();
        (g.map(|g| g.previous_owner_died()), at)
    });
    // Let the waiter pass its spin phase and sleep (and its watcher start).
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiter.is_finished(), "the holder's lock was not held");
    let killed_at = Instant::now();
    holder.0.kill().unwrap();
    let (got, at) = waiter.join().unwrap();
    let owner_died = got.expect("the waiter timed out: the death was not noticed");
    assert_eq!(owner_died, mode == "write");
    at.saturating_duration_since(killed_at)
}

#[test]
fn a_killed_writer_is_noticed_by_a_waiter_in_another_process_long_before_the_poll() {
    let took = kill_to_acquisition("write");
    assert!(took < LIMIT, "took {took:?}");
}

#[test]
fn a_killed_reader_is_noticed_by_a_waiter_in_another_process_long_before_the_poll() {
    let took = kill_to_acquisition("read");
    assert!(took < LIMIT, "took {took:?}");
}

#[test]
fn a_killed_upgradable_holder_is_noticed_long_before_the_poll() {
    let took = kill_to_acquisition("upgradable");
    assert!(took < LIMIT, "took {took:?}");
}

#[test]
fn a_live_holder_is_not_swept_by_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    let table = LockTable::open(&path, &TableOptions::default().poll_interval(POLL)).unwrap();
    let _holder = Holder::spawn("write", &path);
    // The waiter sleeps (so the watcher watches the holder) and times out.
    let r = table.write_timeout(ID, Duration::from_millis(300));
    assert!(matches!(r, Err(locktable::Error::Timeout)), "{r:?}");
    assert!(table.try_read(ID).unwrap().is_none());
}

#[test]
fn a_forked_child_neither_inherits_nor_disturbs_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    let table = LockTable::open(&path, &TableOptions::default().poll_interval(POLL)).unwrap();
    let mut holder = Holder::spawn("write", &path);
    // A wait that sleeps starts the watcher, which now watches the holder.
    let r = table.write_timeout(ID, Duration::from_millis(100));
    assert!(matches!(r, Err(locktable::Error::Timeout)), "{r:?}");
    let copy = table.clone();
    // the child only checks its inert handle (an atomic load and a
    // unit error), drops it (which, in a child, neither detaches nor
    // signals the parent's watcher; glibc's malloc is fork-safe) and exits
    // with `_exit`.
    // SAFETY: sound for the reasons just given.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let inert = matches!(copy.try_read(ID), Err(locktable::Error::ForkedChild));
        drop(copy);
        // SAFETY: ends the child without running the parent's atexit code.
        unsafe { libc::_exit(if inert { 0 } else { 1 }) };
    }
    drop(copy);
    let mut st = 0;
    // SAFETY: waits for our own child; `st` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "child: {st}"
    );
    // The parent's watcher still notices the holder's death at once.
    let t = table.clone();
    let waiter =
        std::thread::spawn(move || t.write_timeout(ID, LIMIT).map(|g| g.previous_owner_died()));
    std::thread::sleep(Duration::from_millis(100));
    holder.0.kill().unwrap();
    assert!(
        waiter.join().unwrap().unwrap(),
        "the dead writer is reported"
    );
}
