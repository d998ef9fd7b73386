//! A process that dies holding only a biased read (a reader-row entry, no
//! lane count, no claim): the death watcher of a revoking writer must
//! notice it without the liveness poll, `stat` must show the dead hold,
//! and a new process that takes over its record must start with clean
//! rows.
//!
//! Children are this test binary re-executed (`--exact child --ignored`),
//! with the role in `LOCKTABLE_BIAS_DEATH_ROLE`; the ignored `child` test
//! does nothing unless it is set.
#![cfg(not(locktable_loom))]

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use locktable::{HoldMode, LockTable, TableOptions};

const ROLE: &str = "LOCKTABLE_BIAS_DEATH_ROLE";
const DIR: &str = "LOCKTABLE_BIAS_DEATH_DIR";
const ID: &str = "hot";
const MAX_PROCESSES: u32 = 2;
const HANDSHAKE: Duration = Duration::from_secs(20);
/// Far longer than the waits below: only the death watcher can be in time.
const LONG_POLL: Duration = Duration::from_secs(120);

fn opts() -> TableOptions {
    TableOptions::default()
        .capacity(64)
        .max_processes(MAX_PROCESSES)
        .poll_interval(LONG_POLL)
}

fn biased_entries(dir: &Path) -> usize {
    support::rows::biased_entries(&dir.join("table"), MAX_PROCESSES)
}

fn wait_file(dir: &Path, name: &str) {
    let deadline = Instant::now() + HANDSHAKE;
    while !dir.join(name).exists() {
        assert!(Instant::now() < deadline, "no {name} after {HANDSHAKE:?}");
        thread::sleep(Duration::from_millis(1));
    }
}

struct Kid(Child);

impl Kid {
    fn spawn(dir: &Path) -> Kid {
        Kid(Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child", "--ignored", "--nocapture"])
            .arg("--test-threads=1")
            .env(ROLE, "holder")
            .env(DIR, dir)
            .stdin(Stdio::null())
            .spawn()
            .unwrap())
    }
    fn kill(&mut self) {
        // SAFETY: plain syscall on the PID of our own child, not yet waited for.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(self.0.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "child process of the tests in this file"]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    assert_eq!(role, "holder");
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let t = LockTable::open(dir.join("table"), &opts()).unwrap();
    // The first read (on the lane) sets the bias; the held one is biased.
    drop(t.read(ID).unwrap());
    let _held = t.read(ID).unwrap();
    std::fs::File::create(dir.join("holding")).unwrap();
    thread::sleep(Duration::from_secs(60));
}

/// The child's only hold is its row entry; the parent starts a write
/// (which revokes the bias and sleeps on the entry), then the child is
/// killed: with a two-minute poll, the writer gets in quickly only if its
/// watcher was asked to watch the child, i.e. if the slot's named
/// processes include row holders.
#[test]
fn the_death_watcher_notices_a_process_that_held_only_a_row_entry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = LockTable::open(d.join("table"), &opts()).unwrap();
    let mut kid = Kid::spawn(d);
    wait_file(d, "holding");
    assert_eq!(biased_entries(d), 1, "the child's hold is in its row");
    let st = t.stats().unwrap();
    assert!(
        st.holders
            .iter()
            .all(|h| h.mode == HoldMode::Read && h.count == 1 && h.alive),
        "{st:?}"
    );
    assert_eq!(st.holders.len(), 1);
    thread::scope(|s| {
        let writer = s.spawn(|| {
            let start = Instant::now();
            let w = t.write_timeout(ID, Duration::from_secs(30));
            (w.map(drop), start.elapsed())
        });
        // Let the writer claim, scan, park and ask its watcher.
        thread::sleep(Duration::from_millis(200));
        assert!(!writer.is_finished(), "the writer passed a biased reader");
        kid.kill();
        let (w, took) = writer.join().unwrap();
        assert!(w.is_ok(), "{w:?}");
        assert!(took < Duration::from_secs(20), "took {took:?}");
    });
    assert_eq!(biased_entries(d), 0);
}

/// The dead child's record is taken by the next process to attach (the
/// only record left; reap on attach is off, as for `locktable stat`): its
/// rows must be clean before it is used, and the dead hold is shown as
/// dead until then.
#[test]
fn a_new_process_taking_a_dead_biased_readers_record_starts_clean() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = LockTable::open(d.join("table"), &opts()).unwrap();
    let mut kid = Kid::spawn(d);
    wait_file(d, "holding");
    kid.kill();
    let st = t.stats().unwrap();
    let dead: Vec<_> = st.dead_holders().collect();
    assert_eq!(dead.len(), 1, "{st:?}");
    assert_eq!((dead[0].mode, dead[0].count), (HoldMode::Read, 1));
    assert_eq!(biased_entries(d), 1);
    let again = LockTable::open(d.join("table"), &opts().reap_on_attach(false)).unwrap();
    assert_eq!(
        again.process_index(),
        dead[0].process,
        "took the dead record"
    );
    assert_eq!(biased_entries(d), 0, "the taken record's rows were swept");
    assert!(t.try_write(ID).unwrap().is_some());
    // The new owner's own biased reads work and are its own.
    drop(again.read(ID).unwrap());
    let r = again.read(ID).unwrap();
    let st = t.stats().unwrap();
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].process, again.process_index());
    assert!(st.holders[0].alive);
    assert!(t.try_write(ID).unwrap().is_none());
    drop(r);
    assert!(t.try_write(ID).unwrap().is_some());
}
