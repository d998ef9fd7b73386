//! Regression tests for the lock-core holes found by the third review: each
//! failed before its fix (a hang is caught by a bounded wait and reported as
//! a failure). The comment above each test says what went wrong and how it
//! was fixed. The slot-identity holes (a generation wrap while an
//! acquisition is stalled) are tested white-box in `src/table_tests.rs`,
//! because the stall needs a hook between the lookup and the announcement.
#![cfg(not(locktable_loom))]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use locktable::{Error, LockTable, TableOptions};
use support::child::quiet_child_command;

mod support;

/// Reads one process may hold of one ID (documented with `Error::HoldLimit`).
const READ_LIMIT: u32 = 65_535;

/// Runs `f` on a thread and gives up waiting after `limit` (a hang is a
/// failure, not a stuck test run; the stuck thread dies with the process).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

fn small(path: &Path) -> LockTable {
    let opts = TableOptions::default().capacity(16).max_processes(4);
    LockTable::open(path, &opts).unwrap()
}

/// Byte offset of bucket `b`'s lock word (header fields at 56: buckets offset).
fn bucket_lock_offset(path: &Path, b: u64) -> (File, u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut w = [0u8; 8];
    f.read_exact_at(&mut w, 56).unwrap();
    (f, u64::from_ne_bytes(w) + 64 * b)
}

// ---------------------------------------------------------------------
// HoldLimit from a downgrade
// ---------------------------------------------------------------------

// Was a bug (hang, src/lockword.rs `add_reader_for_downgrade`): a process
// holding the maximum number of reads of an ID (65,535) and its upgradable
// hold could not downgrade: `downgrade()` spun on a core forever waiting for
// a lane that only its own guards could empty.
//
// Fix: the lane field has room for one more read than plain reads may take
// (plain reads stop at MAX_READS_PER_PROCESS); that read is reserved for the
// single upgradable (or write) hold of the ID, and an upgradable acquisition
// by a process that already used it (a lane above the bound) returns
// `HoldLimit`. So every downgrade has room, and every path that adds a read
// either fits or returns `HoldLimit`.
#[test]
fn an_upgradable_hold_downgrades_at_the_read_limit() {
    let t = LockTable::anonymous(&TableOptions::default()).unwrap();
    // Read until the lane is at the bound (a thread's reader row, used
    // while the ID is read-biased, holds up to 16 reads on top of it).
    let mut reads = Vec::new();
    loop {
        match t.read("x") {
            Ok(g) => reads.push(g),
            Err(Error::HoldLimit { .. }) => break,
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(reads.len() <= READ_LIMIT as usize + 16, "no bound");
    }
    assert!(reads.len() >= READ_LIMIT as usize);
    let u = t.upgradable_read("x").unwrap().into_owned();
    let r = within(Duration::from_secs(5), move || u.downgrade())
        .expect("downgrade at the read limit never returned");
    // The reserved read is used: a second upgradable hold could not
    // downgrade, so it is refused up front.
    assert!(matches!(
        t.upgradable_read("x"),
        Err(Error::HoldLimit { .. })
    ));
    drop(r);
    let u = t.upgradable_read("x").unwrap();
    drop(u.downgrade());
    drop(reads);
    assert!(t.try_write("x").unwrap().is_some());
}

// ---------------------------------------------------------------------
// Bucket lock: deadlines, try semantics, repair
// ---------------------------------------------------------------------

// Was a bug (hang, src/index.rs `lock_bucket`): an insertion waits for its
// buckets' locks before any deadline is looked at, and it spun for as long
// as the lock word named a live process (one frozen mid-insertion, or a
// file crafted by another local user): `try_write`, `try_read` and every
// `*_timeout` call never returned.
//
// Fix: the bucket lock takes the acquisition's deadline. A try gives up
// with "busy" after a short spin, a timed call with `Timeout`; a holder that
// stays is probed for liveness (a dead one is swept, which repairs the
// bucket) and a blocking waiter sleeps between probes instead of spinning.
#[test]
fn a_bucket_lock_held_by_a_live_process_honours_try_and_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let t = small(&path);
    let frozen = small(&path); // a live process "frozen mid-insertion"
    let (raw, off0) = bucket_lock_offset(&path, 0);
    let (_, off1) = bucket_lock_offset(&path, 1);
    // With 16 slots (2 buckets) every new ID needs both bucket locks.
    let mine = frozen.process_index() as u64 + 1;
    raw.write_all_at(&mine.to_ne_bytes(), off0).unwrap();
    raw.write_all_at(&mine.to_ne_bytes(), off1).unwrap();

    let t2 = t.clone();
    let r = within(Duration::from_secs(5), move || {
        let started = Instant::now();
        let tried = t2.try_write("new").unwrap().is_none();
        let timed = t2.write_timeout("new", Duration::from_millis(50));
        (
            tried,
            matches!(timed, Err(Error::Timeout)),
            started.elapsed(),
        )
    })
    .expect("an acquisition spun on a live process's bucket lock");
    assert!(r.0, "try_write got a slot without the bucket lock");
    assert!(r.1, "write_timeout did not time out");
    assert!(r.2 < Duration::from_secs(2), "took {:?}", r.2);

    // A blocking acquisition waits for the holder, then proceeds.
    let t3 = t.clone();
    let waiter = thread::spawn(move || t3.write("new").map(drop));
    thread::sleep(Duration::from_millis(100));
    raw.write_all_at(&0u64.to_ne_bytes(), off0).unwrap();
    raw.write_all_at(&0u64.to_ne_bytes(), off1).unwrap();
    let done = within(Duration::from_secs(5), move || waiter.join().unwrap())
        .expect("the blocking writer never got the released bucket");
    done.unwrap();
    drop(frozen);
}

// Coverage for the same fix (this case already worked through the poll
// interval): with the holder dead, a try neither fails for ever nor spins;
// the dead holder's bucket lock is repaired by the try itself. A word naming
// no possible process (corruption) is repaired too.
#[test]
fn a_bucket_lock_of_a_dead_process_or_a_corrupt_word_is_repaired_by_a_try() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let t = small(&path);
    let dead = small(&path);
    let dead_word = dead.process_index() as u64 + 1;
    drop(dead); // the lease is free: that process is gone
    let (raw, off0) = bucket_lock_offset(&path, 0);
    let (_, off1) = bucket_lock_offset(&path, 1);
    raw.write_all_at(&dead_word.to_ne_bytes(), off0).unwrap();
    raw.write_all_at(&0xdead_beef_u64.to_ne_bytes(), off1)
        .unwrap();
    let t2 = t.clone();
    let got = within(Duration::from_secs(5), move || {
        t2.try_write("new").unwrap().map(|w| w.into_owned())
    })
    .expect("a try spun on a dead or corrupt bucket lock");
    assert!(
        got.is_some(),
        "the dead holder's bucket lock was not repaired"
    );
}

// ---------------------------------------------------------------------
// WRITER_WAITING: a waiting writer against a stream of upgradable holders
// ---------------------------------------------------------------------

// Was a bug (starvation, src/lockword.rs `release_upgradable`): the
// WRITER_WAITING bit, meant to stop new upgradable grants while a writer
// waits, was cleared in the same step that released the upgrader. So it
// never refused a grant that would otherwise succeed: a writer woken by the
// upgrader's release lost to the next upgradable request, again and again.
//
// Fix: the bit outlives the upgrader that a writer waited for: it is
// cleared by a writer's claim, by a waiting writer that gives up (the
// others re-arm it), or by the recovery of a dead waiting writer. Bypass is
// bounded: once a writer waits, no upgradable request is granted before a
// writer gets in.
#[test]
fn a_waiting_writer_is_not_starved_by_a_stream_of_upgradable_holders() {
    let t = LockTable::anonymous(&TableOptions::default()).unwrap();
    let first = t.upgradable_read("x").unwrap();
    let writer_in = Arc::new(AtomicBool::new(false));
    let grants_before_writer = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (t, writer_in) = (t.clone(), writer_in.clone());
        thread::spawn(move || {
            let w = t.write("x").unwrap();
            writer_in.store(true, Ordering::SeqCst);
            drop(w);
        })
    };
    // The writer is past its spin phase (registered as a waiter, which it
    // does just before it announces itself), waiting for `first`.
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.stats().unwrap().waiters.is_empty() {
        assert!(Instant::now() < deadline, "the writer never waited");
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(50));
    let stop = Arc::new(AtomicBool::new(false));
    let stream: Vec<_> = (0..2)
        .map(|_| {
            let (t, stop, writer_in, n) = (
                t.clone(),
                stop.clone(),
                writer_in.clone(),
                grants_before_writer.clone(),
            );
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let u = t
                        .upgradable_read_timeout("x", Duration::from_millis(100))
                        .ok();
                    if u.is_some() && !writer_in.load(Ordering::SeqCst) {
                        n.fetch_add(1, Ordering::SeqCst);
                    }
                    thread::sleep(Duration::from_millis(1));
                    drop(u);
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(50));
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !writer_in.load(Ordering::SeqCst) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::SeqCst);
    for s in stream {
        s.join().unwrap();
    }
    writer.join().unwrap();
    let n = grants_before_writer.load(Ordering::SeqCst);
    assert!(
        n == 0,
        "{n} upgradable holders overtook a writer that was already waiting"
    );
}

// ---------------------------------------------------------------------
// OWNER_DIED pins idle slots
// ---------------------------------------------------------------------

// Was a bug (TableFull with nothing held, src/lockword.rs `try_retire`):
// retirement refused slots marked OWNER_DIED, and only the next writer of
// the same ID cleared the mark. Sixteen killed writers of one-off IDs made a
// 16-slot table answer `TableFull` with nothing held.
//
// Fix: such a slot is retired when no unmarked idle slot is left, and its
// mark moves with the ID: the retiring insertion records the ID's tag in
// the bucket's small memory of dead writers, and the ID's next insertion
// takes the mark back, so its next writer still learns of the death (only a
// bucket that forgets more than three such IDs loses the oldest; DESIGN §7).
#[test]
fn slots_of_killed_writers_are_reused_and_the_death_is_still_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let t = small(&path);
    for i in 0..16 {
        // A writer of a one-off ID dies holding it (its detach sweeps it
        // exactly as a reaper sweeps a killed process).
        let dying = small(&path);
        std::mem::forget(dying.write(format!("one-off-{i}")).unwrap());
        drop(dying);
    }
    assert_eq!(t.stats().unwrap().owner_died_marks, 16);
    let fresh = t
        .try_write("fresh")
        .expect("TableFull with nothing held")
        .expect("nothing holds fresh");
    assert!(!fresh.previous_owner_died());
    drop(fresh);
    for i in 0..16 {
        let w = t.write(format!("one-off-{i}")).unwrap();
        assert!(
            w.previous_owner_died(),
            "the death of one-off-{i}'s writer was forgotten"
        );
    }
}

// ---------------------------------------------------------------------
// The fork window spans a blocking wait
// ---------------------------------------------------------------------

// Was a bug (fork stalls, src/table.rs `open` + src/fork.rs): the attach
// window that a fork's prepare handler waits for was open from before the
// file was opened until the whole attach finished, including the blocking
// F_OFD_SETLKW on the file's init lock. Any holder of that byte (a process
// stopped mid-creation, or anyone who can open the file) stalled every
// fork() (pre-forking servers, daemons; `Command` uses posix_spawn, which
// runs no atfork handler) of a process with one thread in
// `LockTable::open`.
//
// Fix: two short windows, "open -> registered" and "mapped -> marked
// MADV_DONTFORK", neither of which blocks; the init lock is waited for
// outside both.
#[test]
fn a_fork_does_not_wait_for_an_open_blocked_on_the_init_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    drop(small(&path)); // the table exists
                        // Someone else holds the init lock (an OFD lock on byte 2^40).
    let holder = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    ofd_write_lock(&holder, 1 << 40);
    let opener = {
        let path = path.clone();
        thread::spawn(move || small(&path).process_index())
    };
    thread::sleep(Duration::from_millis(100)); // the opener now waits
    let forked = within(Duration::from_secs(5), || {
        let started = Instant::now();
        // SAFETY: the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: plain exit in the child.
            unsafe { libc::_exit(0) };
        }
        let mut st = 0;
        // SAFETY: waiting for our own child.
        let waited = unsafe { libc::waitpid(pid, &mut st, 0) };
        (pid > 0 && waited == pid, started.elapsed())
    });
    drop(holder); // releases the init lock: the opener proceeds
    opener.join().unwrap();
    let (ok, took) = forked.expect("the fork never returned");
    assert!(ok);
    assert!(
        took < Duration::from_secs(1),
        "a fork waited {took:?} for another thread's blocked open"
    );
}

fn ofd_write_lock(f: &File, byte: i64) {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: `fl` is valid for the call; the descriptor is owned by `f`.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------------
// Suspicions: tries and dead holders, tries and traces
// ---------------------------------------------------------------------

const ROLE: &str = "LOCKTABLE_CORE_REGRESSION_ROLE";
const DIR: &str = "LOCKTABLE_CORE_REGRESSION_DIR";

/// Child entry point; a no-op unless `LOCKTABLE_CORE_REGRESSION_ROLE` is set.
#[test]
#[ignore = "child process entry point, run by the other tests"]
fn core_regression_child() {
    let Some((role, dir)) = support::child::role_and_dir(ROLE, DIR) else {
        return;
    };
    match role.as_str() {
        "write-and-die" => {
            let t = small(&dir.join("t"));
            std::mem::forget(t.write("x").unwrap());
            File::create(dir.join("holding")).unwrap();
            // Killed here by the parent, holding the write lock.
            loop {
                thread::sleep(Duration::from_secs(1));
            }
        }
        other => panic!("unknown role {other}"),
    }
}

// Was a gap (src/table.rs `acquire`): a `try_*` never started recovery, so
// a holder killed with SIGKILL kept `try_write` users out until some
// blocking waiter, attach or reap swept it (the session layer's gc only
// tries).
//
// Fix: a try that finds its slot busy probes the processes the slot names
// (rate-limited to one probe per thread per poll interval) and tries once
// more if it released anything.
#[test]
fn a_try_sweeps_a_killed_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let t = small(&path);
    let mut child = quiet_child_command("core_regression_child")
        .env(ROLE, "write-and-die")
        .env(DIR, dir.path())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.path().join("holding").exists() {
        assert!(Instant::now() < deadline, "the child never took the lock");
        thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Only tries, from a thread that never probed before.
    let t2 = t.clone();
    let got = within(Duration::from_secs(5), move || {
        let w = t2.try_write("x").unwrap();
        w.map(|w| w.previous_owner_died())
    })
    .expect("a try hung");
    assert_eq!(
        got,
        Some(true),
        "try_write did not recover the killed writer (or lost its mark)"
    );
}

// Was a bug (src/lockword.rs `write` with no wait): a try-writer claimed
// WRITER before it looked at the readers, so while a reader held the ID,
// each failing `try_write` briefly set a pending writer, and a concurrent
// `try_read` of the same ID failed although a read was possible throughout.
//
// Fix: a try-writer (and a try-upgrade) scans the lanes first and fails
// without claiming anything when it sees a reader.
#[test]
fn a_failing_try_write_never_fails_a_concurrent_try_read() {
    let t = LockTable::anonymous(&TableOptions::default()).unwrap();
    let held = t.read("x").unwrap(); // a read is possible throughout
    let stop = Arc::new(AtomicBool::new(false));
    let spoiler = {
        let (t, stop) = (t.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert!(t.try_write("x").unwrap().is_none());
                // A try-upgrade with a reader present: the same property.
                let u = t.upgradable_read("x").unwrap();
                let u = u.try_upgrade().expect_err("a reader holds x");
                drop(u);
            }
        })
    };
    let mut failed = 0;
    for _ in 0..200_000 {
        if t.try_read("x").unwrap().is_none() {
            failed += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    spoiler.join().unwrap();
    drop(held);
    assert_eq!(failed, 0, "try_read failed {failed} times beside a reader");
}

// DESIGN §6 said a guard leaked with `mem::forget` keeps its attachment
// until the process exits. Guards borrow their table, so that is true only
// of owned guards. What holds for a borrowed one: its hold lasts until the
// last clone of its `LockTable` is dropped, whose detach sweep releases it
// as recovery would (a write leaves OWNER_DIED).
#[test]
fn a_forgotten_borrowed_guard_is_released_when_its_table_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let leaker = small(&path);
    let other = small(&path);
    std::mem::forget(leaker.write("x").unwrap());
    assert!(other.try_read("x").unwrap().is_none());
    drop(leaker);
    let w = other
        .try_write("x")
        .unwrap()
        .expect("released by the detach");
    assert!(w.previous_owner_died());
}
