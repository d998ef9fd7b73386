//! More reading threads than reader rows (DESIGN §10, "Rows and threads"):
//! each live thread leases at most one row and no two live threads share
//! one, so the threads without a row read through the lane; every read is
//! counted, a writer waits for the last, and no entry is left. In a file of
//! its own: it leases every row of this process for a while, which would
//! send other tests' threads to their lanes.
#![cfg(not(locktable_loom))]

mod support;

use std::path::Path;
use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use locktable::{Error, HoldMode, LockTable, TableOptions};

const ID: &str = "hot";
const MAX_PROCESSES: u32 = 4;

/// Non-zero reader-row entries of the table file, per row.
fn entries_per_row(dir: &Path) -> Vec<usize> {
    support::rows::entries(&dir.join("table"), MAX_PROCESSES)
        .chunks(support::rows::ROW_ENTRIES)
        .map(|row| row.iter().filter(|&&e| e != 0).count())
        .collect()
}

#[test]
fn more_reading_threads_than_rows_lease_one_row_each_and_the_rest_use_lanes() {
    const THREADS: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let opts = TableOptions::default()
        .asymmetric_fences(true)
        .capacity(64)
        .max_processes(MAX_PROCESSES);
    let t = LockTable::open(d.join("table"), &opts).unwrap();
    drop(t.read(ID).unwrap()); // sets the bias
    let held = Barrier::new(THREADS + 1);
    let release = Barrier::new(THREADS + 1);
    let biased: usize = thread::scope(|s| {
        let readers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let g = t.read(ID).unwrap();
                    let biased = g.is_biased();
                    held.wait();
                    release.wait();
                    drop(g);
                    usize::from(biased)
                })
            })
            .collect();
        held.wait();
        let shown: u32 = t
            .stats()
            .unwrap()
            .holders
            .iter()
            .filter(|h| h.mode == HoldMode::Read)
            .map(|h| h.count)
            .sum();
        let per_row = entries_per_row(d);
        let write = t.write_timeout(ID, Duration::from_millis(30));
        release.wait();
        assert_eq!(shown, THREADS as u32, "every read is counted");
        // One entry per row at most: no two threads share a row.
        assert!(per_row.iter().all(|&n| n <= 1), "{per_row:?}");
        assert!(
            matches!(write, Err(Error::Timeout)),
            "a writer beside readers"
        );
        readers.into_iter().map(|r| r.join().unwrap()).sum()
    });
    // The test's own thread leased a row at its first read.
    assert_eq!(
        biased,
        support::rows::ROWS - 1,
        "every other row leased once, the rest on lanes"
    );
    assert!(
        entries_per_row(d).iter().all(|&n| n == 0),
        "an entry was left"
    );
    // The 48 threads exited and returned their leases: a new one reads biased.
    let again = thread::scope(|s| s.spawn(|| t.read(ID).unwrap().is_biased()).join().unwrap());
    assert!(again, "leases of exited threads were not returned");
    assert!(t.try_write(ID).unwrap().is_some());
}
