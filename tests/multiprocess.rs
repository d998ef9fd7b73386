//! Real processes sharing one table file (issue 2 item 8).
//!
//! The test binary re-executes itself: the parent starts
//! `current_exe --exact child --ignored ...` with the role in
//! `LOCKTABLE_MP_ROLE`; the ignored `child` test does nothing unless that
//! variable is set. Parent and children hand-shake through marker files in
//! the test's temporary directory, never through sleeps alone.
#![cfg(not(locktable_loom))]

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use locktable::{Error, HoldMode, LockTable, TableOptions};
use support::child::{quiet_child_command, signal, wait_until, Kids};

mod support;

const ROLE: &str = "LOCKTABLE_MP_ROLE";
const DIR: &str = "LOCKTABLE_MP_DIR";
const ID: &str = "shared-id";
const HANDSHAKE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------

fn table_path(dir: &Path) -> PathBuf {
    dir.join("table")
}

fn open(dir: &Path) -> LockTable {
    let opts = TableOptions::default().capacity(64).max_processes(16);
    LockTable::open(table_path(dir), &opts).unwrap()
}

/// Waits until the marker file `name` exists.
fn wait_file(dir: &Path, name: &str) {
    wait_until(&format!("marker {name}"), HANDSHAKE, || {
        dir.join(name).exists()
    });
}

impl Kids {
    fn spawn(dir: &Path, roles: &[&str]) -> Kids {
        Kids(roles.iter().map(|r| spawn_child(dir, r)).collect())
    }

    fn pid(&self, i: usize) -> u32 {
        self.0[i].id()
    }

    /// Waits for every child and asserts that each one passed.
    fn wait_success(mut self, limit: Duration) {
        for c in &mut self.0 {
            let st = wait_child(c, limit);
            assert!(st.success(), "child {} failed: {st}", c.id());
        }
        self.0.clear();
    }
}

fn spawn_child(dir: &Path, role: &str) -> Child {
    quiet_child_command("child")
        .env(ROLE, role)
        .env(DIR, dir)
        .spawn()
        .unwrap()
}

fn wait_child(c: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "child {} hung", c.id());
        thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------

/// Entry point of the child processes; a no-op in a normal test run.
#[test]
#[ignore = "child process entry point, run by the other tests"]
fn child() {
    let Some((role, dir)) = support::child::role_and_dir(ROLE, DIR) else {
        return;
    };
    let (role, arg) = role.split_once(':').unwrap_or((&role, ""));
    match role {
        "reader" => child_reader(&dir, arg),
        "writer" => child_writer(&dir),
        "expect-busy" => child_expect_busy(&dir),
        "sleeper" => child_sleeper(&dir),
        "counter" => child_counter(&dir, arg),
        other => panic!("unknown role {other}"),
    }
}

/// Holds a read lock, says so, and waits (still holding) until the other
/// reader says so too, then until the parent releases it.
fn child_reader(dir: &Path, me: &str) {
    let other = if me == "a" { "b" } else { "a" };
    let t = open(dir);
    let g = t.read(ID).unwrap();
    signal(dir, &format!("holding-{me}"));
    wait_file(dir, &format!("holding-{other}"));
    wait_file(dir, "release");
    drop(g);
}

fn child_writer(dir: &Path) {
    let t = open(dir);
    let g = t.write(ID).unwrap();
    signal(dir, "holding");
    wait_file(dir, "release");
    drop(g);
}

/// The parent holds the write lock: every non-blocking attempt fails here.
fn child_expect_busy(dir: &Path) {
    let t = open(dir);
    assert!(t.try_read(ID).unwrap().is_none());
    assert!(t.try_upgradable_read(ID).unwrap().is_none());
    assert!(t.try_write(ID).unwrap().is_none());
    assert!(matches!(
        t.read_timeout(ID, Duration::from_millis(30)),
        Err(Error::Timeout)
    ));
    assert!(t.try_write("another-id").unwrap().is_some());
}

/// Waits for a read lock with liveness polling effectively off, so only a
/// futex wake from the releasing process can end the wait in time.
fn child_sleeper(dir: &Path) {
    let opts = TableOptions::default().poll_interval(Duration::from_secs(3600));
    let t = LockTable::open(table_path(dir), &opts).unwrap();
    let g = t.read_timeout(ID, Duration::from_secs(60)).unwrap();
    signal(dir, "acquired");
    drop(g);
}

/// Adds 1 to the counter file 10,000 times under the write lock.
fn child_counter(dir: &Path, me: &str) {
    let t = open(dir);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("counter"))
        .unwrap();
    signal(dir, &format!("ready-{me}"));
    wait_file(dir, "go");
    for _ in 0..INCREMENTS {
        let g = t.write(ID).unwrap();
        let v = read_counter(&file);
        file.write_all_at(&(v + 1).to_le_bytes(), 0).unwrap();
        drop(g);
    }
}

const INCREMENTS: u64 = 10_000;

fn read_counter(f: &File) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 0).unwrap();
    u64::from_le_bytes(b)
}

// ---------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------

#[test]
fn readers_in_two_processes_hold_one_id_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    let kids = Kids::spawn(d, &["reader:a", "reader:b"]);
    wait_file(d, "holding-a");
    wait_file(d, "holding-b");
    // Both hold it now: neither releases before "release".
    let st = t.stats().unwrap();
    let mut pids: Vec<u32> = st
        .holders
        .iter()
        .filter(|h| h.mode == HoldMode::Read)
        .map(|h| h.pid)
        .collect();
    pids.sort_unstable();
    let mut want = vec![kids.pid(0), kids.pid(1)];
    want.sort_unstable();
    assert_eq!(pids, want, "{st:?}");
    assert_eq!(st.holders[0].slot, st.holders[1].slot);
    assert!(t.try_write(ID).unwrap().is_none());
    let mine = t.try_read(ID).unwrap().expect("a third reader joins");
    signal(d, "release");
    kids.wait_success(HANDSHAKE);
    drop(mine);
    assert!(t.try_write(ID).unwrap().is_some());
}

#[test]
fn a_writer_in_one_process_excludes_readers_in_another() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    // Child writes, parent is refused.
    let kids = Kids::spawn(d, &["writer"]);
    wait_file(d, "holding");
    assert!(t.try_read(ID).unwrap().is_none());
    assert!(t.try_upgradable_read(ID).unwrap().is_none());
    assert!(matches!(
        t.read_timeout(ID, Duration::from_millis(50)),
        Err(Error::Timeout)
    ));
    assert!(t.try_read("another-id").unwrap().is_some());
    signal(d, "release");
    kids.wait_success(HANDSHAKE);
    drop(t.read_timeout(ID, HANDSHAKE).unwrap());
    // Parent writes, child is refused.
    let g = t.write(ID).unwrap();
    Kids::spawn(d, &["expect-busy"]).wait_success(HANDSHAKE);
    drop(g);
}

#[test]
fn a_sleeper_in_one_process_is_woken_by_a_release_in_another() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    let g = t.write(ID).unwrap();
    let kids = Kids::spawn(d, &["sleeper"]);
    let pid = kids.pid(0);
    // Handshake: the child is registered as a waiter on the ID.
    let deadline = Instant::now() + HANDSHAKE;
    while !t.stats().unwrap().waiters.iter().any(|w| w.pid == pid) {
        assert!(Instant::now() < deadline, "the child never waited");
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(100)); // past any spinning: asleep
    assert!(!d.join("acquired").exists());
    let released = Instant::now();
    drop(g);
    wait_file(d, "acquired");
    let woke = released.elapsed();
    println!("cross-process wake: {woke:?}");
    // Its liveness poll is an hour: only the futex wake can explain this.
    assert!(woke < Duration::from_secs(5), "woken after {woke:?}");
    kids.wait_success(HANDSHAKE);
}

#[test]
fn four_processes_add_to_a_shared_counter_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    fs::write(d.join("counter"), 0u64.to_le_bytes()).unwrap();
    let roles = ["counter:0", "counter:1", "counter:2", "counter:3"];
    let kids = Kids::spawn(d, &roles);
    for i in 0..roles.len() {
        wait_file(d, &format!("ready-{i}"));
    }
    let start = Instant::now();
    signal(d, "go");
    kids.wait_success(Duration::from_secs(300));
    println!("4 x {INCREMENTS} locked increments: {:?}", start.elapsed());
    let f = File::open(d.join("counter")).unwrap();
    assert_eq!(read_counter(&f), 4 * INCREMENTS);
    let st = t.stats().unwrap();
    assert!(st.holders.is_empty() && st.waiters.is_empty(), "{st:?}");
}
