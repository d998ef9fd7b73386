//! Reader bias at its edges, on real hardware: an upgradable holder beside
//! biased readers (and the upgrade that must drain them), writes and
//! upgrades that give up during a revocation, a full row, and a biased
//! guard that outlives its thread (more reading threads than reader rows:
//! `tests/reader_rows_leased.rs`, alone in its process because it takes
//! every row).
//! Each test also checks, from the table file, that no reader-row entry
//! is left behind once every guard is gone.
#![cfg(not(locktable_loom))]

mod support;

use std::path::Path;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use locktable::{Error, HoldMode, LockTable, TableOptions};

const ID: &str = "hot";
const MAX_PROCESSES: u32 = 4;
const SHORT: Duration = Duration::from_millis(30);

fn open(dir: &Path) -> LockTable {
    let opts = TableOptions::default()
        .capacity(64)
        .max_processes(MAX_PROCESSES);
    LockTable::open(dir.join("table"), &opts).unwrap()
}

/// Non-zero reader-row entries of the table file (biased read holds).
fn biased_entries(dir: &Path) -> usize {
    support::rows::biased_entries(&dir.join("table"), MAX_PROCESSES)
}

/// Read holds of `id`'s slot that the statistics show for this process.
fn reads_shown(t: &LockTable) -> u32 {
    t.stats()
        .unwrap()
        .holders
        .iter()
        .filter(|h| h.mode == HoldMode::Read && h.process == t.process_index())
        .map(|h| h.count)
        .sum()
}

/// Sets the bias on `ID` (the first read, on the lane, sets it).
fn bias(t: &LockTable) {
    drop(t.read(ID).unwrap());
}

#[test]
fn an_upgradable_holder_and_biased_readers_coexist_and_the_upgrade_drains_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    bias(&t);
    let r = t.read(ID).unwrap();
    assert_eq!(biased_entries(d), 1, "the read is biased");
    // Upgradable and readers share the ID, in either order.
    let u = t.try_upgradable_read(ID).unwrap().expect("beside a reader");
    let r2 = t.try_read(ID).unwrap().expect("a reader beside upgradable");
    assert_eq!(biased_entries(d), 2);
    // The upgrade must wait for the biased readers, and giving up (a try,
    // a timeout) changes nothing: the readers keep their holds.
    let u = match u.try_upgrade() {
        Ok(_) => panic!("try_upgrade beside biased readers"),
        Err(u) => u,
    };
    let u = match u.upgrade_timeout(SHORT) {
        Ok(_) => panic!("an upgrade beside biased readers"),
        Err(u) => u,
    };
    assert_eq!(biased_entries(d), 2);
    assert!(t.try_write(ID).unwrap().is_none());
    drop(r);
    // A reader that arrives now still gets in (no writer pending).
    let r3 = t.read_timeout(ID, SHORT).unwrap();
    let released = thread::scope(|s| {
        let up = s.spawn(move || {
            let w = u.upgrade();
            drop(w);
        });
        thread::sleep(SHORT);
        assert!(!up.is_finished(), "the upgrade passed a biased reader");
        drop(r2);
        thread::sleep(SHORT);
        assert!(!up.is_finished(), "the upgrade passed a biased reader");
        drop(r3);
        up.join().is_ok()
    });
    assert!(released);
    assert_eq!(biased_entries(d), 0);
    // The upgrade revoked the bias: the next read is a lane read.
    let r = t.read(ID).unwrap();
    assert_eq!(biased_entries(d), 0, "the grant cleared BIASED");
    drop(r);
    assert!(t.try_write(ID).unwrap().is_some());
}

#[test]
fn a_write_that_times_out_during_a_revocation_leaves_the_bias_to_the_next_writer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    bias(&t);
    let r = t.read(ID).unwrap();
    assert_eq!(biased_entries(d), 1);
    assert!(matches!(t.write_timeout(ID, SHORT), Err(Error::Timeout)));
    // The claim is gone (readers enter again) and the bias stays: a new
    // read in another thread is biased too, and every writer still scans.
    thread::scope(|s| {
        s.spawn(|| {
            let r2 = t.read_timeout(ID, SHORT).unwrap();
            assert_eq!(biased_entries(d), 2, "the bias survived the timeout");
            assert!(t.try_write(ID).unwrap().is_none());
            assert!(matches!(t.write_timeout(ID, SHORT), Err(Error::Timeout)));
            drop(r2);
        });
    });
    assert!(t.try_write(ID).unwrap().is_none(), "the first reader holds");
    drop(r);
    assert_eq!(biased_entries(d), 0);
    let w = t.write_timeout(ID, Duration::from_secs(5)).unwrap();
    drop(w);
    assert_eq!(reads_shown(&t), 0);
}

/// A thread that holds more reads than its row has entries: the rest go to
/// the lane; all are counted and all must go before a writer gets in.
#[test]
fn a_full_row_sends_further_reads_to_the_lane() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    bias(&t);
    // A fresh thread: its row is not shared with another of ours.
    thread::scope(|s| {
        s.spawn(|| {
            let mut gs: Vec<_> = (0..20).map(|_| t.read(ID).unwrap()).collect();
            assert_eq!(biased_entries(d), 16, "one full row");
            assert_eq!(reads_shown(&t), 20);
            while let Some(g) = gs.pop() {
                assert!(t.try_write(ID).unwrap().is_none());
                drop(g);
            }
        });
    });
    assert_eq!(biased_entries(d), 0);
    assert!(t.try_write(ID).unwrap().is_some());
}

/// A biased guard moved out of the thread that took it outlives that
/// thread; later threads (one of which may get the same row) read and
/// leave; the writer waits for the guard, which is released by another
/// thread.
#[test]
fn a_biased_guard_outlives_its_thread() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    bias(&t);
    let g = thread::spawn({
        let t = t.clone();
        move || t.read(ID).unwrap().into_owned()
    })
    .join()
    .unwrap();
    assert_eq!(biased_entries(d), 1);
    let kept = Mutex::new(Some(g));
    thread::scope(|s| {
        for _ in 0..40 {
            s.spawn(|| drop(t.read(ID).unwrap()));
        }
    });
    assert_eq!(biased_entries(d), 1, "the other threads left");
    assert!(matches!(t.write_timeout(ID, SHORT), Err(Error::Timeout)));
    thread::scope(|s| {
        s.spawn(|| drop(kept.lock().unwrap().take()));
    });
    assert_eq!(biased_entries(d), 0);
    assert!(t.try_write(ID).unwrap().is_some());
}

/// Writers are not starved by a stream of biased readers: every write of a
/// writer racing three threads that read the ID back to back gets in (the
/// claim stops new readers, biased or not, and only the holds present at
/// the claim are waited for). Liveness only: the latency printed is not
/// asserted (the machine is shared).
#[test]
fn a_stream_of_biased_readers_does_not_starve_a_writer() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    bias(&t);
    let stop = AtomicBool::new(false);
    let biased_seen = AtomicU64::new(0);
    let (writes, worst) = thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let g = t.read(ID).unwrap();
                    for _ in 0..200 {
                        std::hint::spin_loop();
                    }
                    if biased_entries(dir.path()) > 0 {
                        biased_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(g);
                }
            });
        }
        let mut worst = Duration::ZERO;
        let start = std::time::Instant::now();
        let mut writes = 0;
        while start.elapsed() < Duration::from_millis(600) {
            let t0 = std::time::Instant::now();
            let w = t.write_timeout(ID, Duration::from_secs(10));
            assert!(w.is_ok(), "a writer starved: {w:?}");
            worst = worst.max(t0.elapsed());
            drop(w);
            writes += 1;
            thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
        (writes, worst)
    });
    eprintln!(
        "{writes} writes, worst wait {worst:?}, {} reads saw a biased hold",
        biased_seen.load(Ordering::Relaxed)
    );
    assert!(writes > 10);
    assert!(
        biased_seen.load(Ordering::Relaxed) > 0,
        "the readers never used the bias: the test did not test it"
    );
    assert_eq!(biased_entries(dir.path()), 0);
}
