//! Reader bias on real hardware: threads and processes reading one ID
//! through their reader rows while writers revoke the bias, with a shared
//! record that a writer overlapping a reader would leave torn; and SIGKILL
//! of a process holding a biased read (its row entry is swept, a writer
//! gets in).
//!
//! Children are this test binary re-executed (`--exact child --ignored`),
//! with the role in `LOCKTABLE_BIAS_ROLE`; the ignored `child` test does
//! nothing unless it is set.
#![cfg(not(locktable_loom))]

mod support;

use std::fs::{self, File, OpenOptions};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use locktable::{HoldMode, LockTable, TableOptions};

const ROLE: &str = "LOCKTABLE_BIAS_ROLE";
const DIR: &str = "LOCKTABLE_BIAS_DIR";
const ID: &str = "hot-session";
const MAX_PROCESSES: u32 = 8;
const HANDSHAKE: Duration = Duration::from_secs(20);
const RUN: Duration = Duration::from_millis(1500);

fn open(dir: &Path) -> LockTable {
    let opts = TableOptions::default()
        .capacity(64)
        .max_processes(MAX_PROCESSES);
    LockTable::open(dir.join("table"), &opts).unwrap()
}

fn signal(dir: &Path, name: &str) {
    File::create(dir.join(name)).unwrap();
}

fn wait_file(dir: &Path, name: &str) {
    let deadline = Instant::now() + HANDSHAKE;
    while !dir.join(name).exists() {
        assert!(Instant::now() < deadline, "no {name} after {HANDSHAKE:?}");
        thread::sleep(Duration::from_millis(1));
    }
}

fn spawn_child(dir: &Path, role: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--ignored", "--nocapture"])
        .arg("--test-threads=1")
        .env(ROLE, role)
        .env(DIR, dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills every child left if a test fails.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The shared record, mapped by every process: [readers inside, writer
/// inside, writes]. Readers and writers mark themselves inside their
/// critical sections and check that the other kind is not; a writer also
/// counts its writes with a plain load and store, which loses counts if two
/// writers overlap.
struct Record(memmap2::MmapMut);

impl Record {
    fn open(dir: &Path) -> Record {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("record"))
            .unwrap();
        // SAFETY: the file is this test's own, 64 bytes, and nobody
        // truncates it while it is mapped.
        Record(unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap())
    }

    fn cell(&self, i: usize) -> &AtomicU64 {
        assert!(i < 3);
        // The mapping is page aligned and 64 bytes long, so word i (< 3)
        // is in bounds and 8-aligned; every process accesses these words
        // only atomically, and the mapping outlives the borrow of self.
        // SAFETY: sound for the reasons just given.
        unsafe { &*(self.0.as_ptr().add(8 * i) as *const AtomicU64) }
    }

    fn writes(&self) -> u64 {
        self.cell(2).load(Ordering::SeqCst)
    }
}

fn spin(n: u32) {
    for _ in 0..n {
        std::hint::spin_loop();
    }
}

/// One locked write.
fn write_once(t: &LockTable, r: &Record) {
    let g = t.write(ID).unwrap();
    r.cell(1).store(1, Ordering::SeqCst);
    assert_eq!(
        r.cell(0).load(Ordering::SeqCst),
        0,
        "a writer beside readers"
    );
    let n = r.cell(2).load(Ordering::Relaxed);
    spin(500);
    r.cell(2).store(n + 1, Ordering::Relaxed);
    assert_eq!(
        r.cell(0).load(Ordering::SeqCst),
        0,
        "a writer beside readers"
    );
    r.cell(1).store(0, Ordering::SeqCst);
    drop(g);
}

/// Reads under read holds until `stop`; panics if a writer is inside.
/// Returns the number of reads.
fn read_until(t: &LockTable, r: &Record, stop: &AtomicBool) -> u64 {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let g = t.read(ID).unwrap();
        r.cell(0).fetch_add(1, Ordering::SeqCst);
        assert_eq!(
            r.cell(1).load(Ordering::SeqCst),
            0,
            "a reader beside a writer"
        );
        spin(100);
        assert_eq!(
            r.cell(1).load(Ordering::SeqCst),
            0,
            "a reader beside a writer"
        );
        r.cell(0).fetch_sub(1, Ordering::SeqCst);
        drop(g);
        n += 1;
    }
    n
}

/// The reader-row entries of the table file.
fn row_entries(dir: &Path) -> Vec<u32> {
    support::rows::entries(&dir.join("table"), MAX_PROCESSES)
}

#[test]
#[ignore = "child process of the tests in this file"]
fn child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    match role.as_str() {
        "readers" => child_readers(&dir),
        "holder" => child_holder(&dir),
        other => panic!("unknown role {other}"),
    }
}

/// Two reader threads until the parent says stop.
fn child_readers(dir: &Path) {
    let t = open(dir);
    let f = Record::open(dir);
    let stop = AtomicBool::new(false);
    signal(dir, &format!("ready-{}", std::process::id()));
    wait_file(dir, "go");
    thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| read_until(&t, &f, &stop));
        }
        wait_file(dir, "stop");
        stop.store(true, Ordering::Relaxed);
    });
}

/// Takes a few reads (the first re-biases the ID), then holds one and
/// waits to be killed.
fn child_holder(dir: &Path) {
    let t = open(dir);
    for _ in 0..3 {
        drop(t.read(ID).unwrap());
    }
    let _held = t.read(ID).unwrap();
    signal(dir, "holding");
    thread::sleep(Duration::from_secs(60));
}

#[test]
fn readers_in_threads_and_processes_never_overlap_a_revoking_writer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    fs::write(d.join("record"), [0u8; 64]).unwrap();
    let mut kids = Kids((0..2).map(|_| spawn_child(d, "readers")).collect());
    for c in &kids.0 {
        wait_file(d, &format!("ready-{}", c.id()));
    }
    let f = Record::open(d);
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    signal(d, "go");
    let reads: u64 = thread::scope(|s| {
        let readers: Vec<_> = (0..2)
            .map(|_| s.spawn(|| read_until(&t, &f, &stop)))
            .collect();
        let start = Instant::now();
        while start.elapsed() < RUN {
            write_once(&t, &f);
            writes.fetch_add(1, Ordering::Relaxed);
            // Readers get in between writes, so the bias comes back.
            thread::sleep(Duration::from_micros(200));
        }
        stop.store(true, Ordering::Relaxed);
        readers.into_iter().map(|r| r.join().unwrap()).sum()
    });
    signal(d, "stop");
    for c in &mut kids.0 {
        let st = c.wait().unwrap();
        assert!(st.success(), "a reader process failed: {st}");
    }
    let w = writes.load(Ordering::Relaxed);
    assert_eq!(f.writes(), w, "every write counted once");
    assert!(w > 10 && reads > 10, "writes {w}, reads {reads}");
    let st = t.stats().unwrap();
    assert!(st.holders.is_empty() && st.waiters.is_empty(), "{st:?}");
    assert!(row_entries(d).iter().all(|&e| e == 0), "a row entry leaked");
}

#[test]
fn a_killed_biased_reader_is_swept_and_a_writer_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    let mut kids = Kids(vec![spawn_child(d, "holder")]);
    wait_file(d, "holding");
    // The hold is a biased one: an entry in the child's reader row (not
    // its lane), counted as its read hold.
    let entries: Vec<u32> = row_entries(d).into_iter().filter(|&e| e != 0).collect();
    assert_eq!(entries.len(), 1, "the held read is in a reader row");
    let st = t.stats().unwrap();
    let child_index = st.processes.iter().find(|p| !p.this_handle).unwrap().index;
    let read = st
        .holders
        .iter()
        .find(|h| h.mode == HoldMode::Read)
        .unwrap();
    assert_eq!((read.process, read.count), (child_index, 1));
    assert!(t.try_write(ID).unwrap().is_none());
    let c = &mut kids.0[0];
    // SAFETY: plain syscall on the PID of our own child, not yet waited for.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(c.wait().unwrap().signal(), Some(libc::SIGKILL));
    let w = t.write_timeout(ID, Duration::from_secs(5));
    assert!(w.is_ok(), "the writer did not get in: {w:?}");
    drop(w);
    assert!(
        row_entries(d).iter().all(|&e| e == 0),
        "the entry was swept"
    );
}

/// A forked child's copy of a biased guard is inert: dropping it does not
/// clear the parent's row entry (the mapping is not even inherited), and
/// the child's copy of the handle refuses to read. The parent's hold stays
/// until the parent drops it.
#[test]
fn a_forked_child_leaves_the_parents_biased_read_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    drop(t.read(ID).unwrap()); // the first read sets the bias
    let g = t.read(ID).unwrap();
    assert_eq!(row_entries(d).iter().filter(|&&e| e != 0).count(), 1);
    // SAFETY: the child only drops a guard (inert after the fork: no
    // allocation, no lock), asks the handle for a read (refused at once
    // with a unit error) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(g);
        let code = match t.try_read(ID) {
            Err(locktable::Error::ForkedChild) => 0,
            _ => 1,
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut st = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "child status {st}"
    );
    assert_eq!(
        row_entries(d).iter().filter(|&&e| e != 0).count(),
        1,
        "the parent's entry survived the child's drop"
    );
    assert!(t.try_write(ID).unwrap().is_none());
    drop(g);
    assert!(row_entries(d).iter().all(|&e| e == 0));
    assert!(t.try_write(ID).unwrap().is_some());
}
