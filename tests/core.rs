//! Semantics of the lock core within one process: modes, conversions,
//! timeouts, bad IDs, and two attachments of one file acting as two processes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use locktable::{Error, HoldMode, LockTable, TableOptions};

fn table() -> LockTable {
    LockTable::anonymous(&TableOptions::default()).unwrap()
}

#[test]
fn readers_share_and_exclude_writers() {
    let t = table();
    let a = t.read("x").unwrap();
    let b = t.try_read("x").unwrap().expect("second reader");
    assert!(t.try_write("x").unwrap().is_none());
    assert!(t.try_upgradable_read("x").unwrap().is_some());
    drop((a, b));
    let w = t.try_write("x").unwrap().expect("free after readers left");
    assert!(t.try_read("x").unwrap().is_none());
    assert!(t.try_upgradable_read("x").unwrap().is_none());
    // Other IDs are independent.
    assert!(t.try_write("y").unwrap().is_some());
    drop(w);
}

#[test]
fn one_upgradable_at_a_time_coexisting_with_readers() {
    let t = table();
    let u = t.upgradable_read("x").unwrap();
    assert!(t.try_upgradable_read("x").unwrap().is_none());
    let r = t.try_read("x").unwrap().expect("reader beside upgradable");
    let u = u.try_upgrade().expect_err("reader present");
    drop(r);
    let w = u.try_upgrade().expect("no readers left");
    assert!(t.try_read("x").unwrap().is_none());
    let u = w.downgrade_to_upgradable();
    assert!(t.try_read("x").unwrap().is_some());
    let r = u.downgrade();
    assert!(t.try_upgradable_read("x").unwrap().is_some());
    assert!(t.try_write("x").unwrap().is_none());
    drop(r);
    assert!(t.try_write("x").unwrap().is_some());
}

#[test]
fn write_downgrade_lets_no_writer_in_between() {
    let t = table();
    let w = t.write("x").unwrap();
    let r = w.downgrade();
    assert!(t.try_write("x").unwrap().is_none());
    assert!(t.try_read("x").unwrap().is_some());
    drop(r);
}

#[test]
fn timeouts_report_timeout_and_leave_no_trace() {
    let t = table();
    let w = t.write("x").unwrap();
    let start = Instant::now();
    assert!(matches!(
        t.read_timeout("x", Duration::from_millis(30)),
        Err(Error::Timeout)
    ));
    assert!(start.elapsed() >= Duration::from_millis(30));
    assert!(matches!(
        t.write_timeout("x", Duration::from_millis(5)),
        Err(Error::Timeout)
    ));
    assert!(matches!(
        t.upgradable_read_timeout("x", Duration::from_millis(5)),
        Err(Error::Timeout)
    ));
    drop(w);
    let r = t.read("x").unwrap();
    let u = t.upgradable_read("x").unwrap();
    let u = u
        .upgrade_timeout(Duration::from_millis(20))
        .expect_err("reader holds");
    drop(r);
    let w = u
        .upgrade_timeout(Duration::from_millis(20))
        .expect("reader gone");
    drop(w);
    let s = t.stats().unwrap();
    assert!(s.holders.is_empty(), "{:?}", s.holders);
    assert!(s.waiters.is_empty());
}

#[test]
fn bad_ids_are_typed_errors() {
    let t = table();
    assert!(matches!(t.read(""), Err(Error::InvalidId { .. })));
    assert!(matches!(
        t.write(vec![7u8; 257]),
        Err(Error::InvalidId { .. })
    ));
    assert!(t.write(vec![7u8; 256]).is_ok());
}

#[test]
fn a_sleeping_reader_is_woken_by_the_writer_release() {
    let t = table();
    let w = t.write("x").unwrap();
    let got = Arc::new(AtomicBool::new(false));
    let h = {
        let (t, got) = (t.clone(), got.clone());
        thread::spawn(move || {
            let _r = t.read("x").unwrap();
            got.store(true, Ordering::SeqCst);
        })
    };
    thread::sleep(Duration::from_millis(50));
    assert!(!got.load(Ordering::SeqCst));
    drop(w);
    h.join().unwrap();
    assert!(got.load(Ordering::SeqCst));
}

#[test]
fn writers_are_mutually_exclusive_under_contention() {
    let t = table();
    let inside = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..4)
        .map(|i| {
            let (t, inside, total) = (t.clone(), inside.clone(), total.clone());
            thread::spawn(move || {
                for n in 0..2000 {
                    if (n + i) % 3 == 0 {
                        let _r = t.read("hot").unwrap();
                        assert_eq!(inside.load(Ordering::SeqCst), 0);
                    } else {
                        let _w = t.write("hot").unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        total.fetch_add(1, Ordering::SeqCst);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert!(total.load(Ordering::SeqCst) > 4000);
}

#[test]
fn a_stream_of_readers_does_not_starve_a_writer() {
    let t = table();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (t, stop) = (t.clone(), stop.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Three threads with overlapping holds: some reader is
                    // (almost) always inside.
                    let _a = t.read("hot").unwrap();
                    thread::sleep(Duration::from_micros(200));
                    n += 1;
                }
                n
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(20));
    let w = t.write_timeout("hot", Duration::from_secs(10));
    assert!(w.is_ok(), "writer starved");
    drop(w);
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
}

#[test]
fn two_attachments_behave_like_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let a = LockTable::open(&path, &TableOptions::default()).unwrap();
    let b = LockTable::open(&path, &TableOptions::default()).unwrap();
    assert_ne!(a.process_index(), b.process_index());
    let ra = a.read("s").unwrap();
    let rb = b.read("s").unwrap();
    assert!(a.try_write("s").unwrap().is_none());
    let s = a.stats().unwrap();
    let readers: Vec<_> = s
        .holders
        .iter()
        .filter(|h| h.mode == HoldMode::Read)
        .collect();
    assert_eq!(readers.len(), 2);
    assert_eq!(s.processes.len(), 2);
    drop((ra, rb));
    let w = b.write("s").unwrap();
    assert!(a.try_read("s").unwrap().is_none());
    drop(w);
}

#[test]
fn forgotten_read_guards_hit_a_bound_not_a_wrap() {
    let t = table();
    // 65,535 reads fit in the process's lane; a thread's reader row (16
    // entries, used while the ID is read-biased) holds a few more.
    let mut held = 0u32;
    let err = loop {
        match t.read("x") {
            Ok(g) => std::mem::forget(g),
            Err(e) => break e,
        }
        held += 1;
        assert!(held <= 65_535 + 16, "no bound");
    };
    assert!(held >= 65_535, "bound hit after {held} reads");
    assert!(matches!(err, Error::HoldLimit { limit: 65_535 }));
    assert!(matches!(t.try_read("x"), Err(Error::HoldLimit { .. })));
    // The bound did not spill into the waiter count or other IDs.
    let s = t.stats().unwrap();
    assert!(s.waiters.is_empty());
    assert_eq!(s.holders.len(), 1);
    assert_eq!(s.holders[0].count, held);
    assert!(t.try_write("y").unwrap().is_some());
}

#[test]
fn many_distinct_ids_over_time_reuse_slots() {
    let t = LockTable::anonymous(&TableOptions::default().capacity(64)).unwrap();
    for i in 0..100_000u32 {
        let _w = t.write(i.to_le_bytes()).unwrap();
    }
    // Holding more IDs than fit is a typed error, not corruption.
    let mut held = Vec::new();
    let err = loop {
        match t.write(held.len().to_le_bytes()) {
            Ok(g) => held.push(g),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::TableFull { capacity: 64 }), "{err}");
    assert!(held.len() >= 16, "only {} held", held.len());
    drop(held);
    assert!(t.write("after").is_ok());
}

#[test]
fn handles_and_guards_are_thread_safe_types() {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    fn send<T: Send + 'static>() {}
    send_sync::<LockTable>();
    send::<locktable::ReadGuard<'static>>();
    send::<locktable::UpgradableReadGuard<'static>>();
    send::<locktable::WriteGuard<'static>>();
    // A borrowed guard moves to a scoped thread; an owned one anywhere.
    let t = table();
    let w = t.write("x").unwrap();
    thread::scope(|s| {
        s.spawn(move || drop(w));
    });
    let w = t.write("x").unwrap().into_owned();
    thread::spawn(move || drop(w)).join().unwrap();
    assert!(t.try_write("x").unwrap().is_some());
}

#[test]
fn a_cached_lookup_survives_its_slot_being_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let opts = TableOptions::default().capacity(16);
    let t = LockTable::open(&path, &opts).unwrap();
    let other = LockTable::open(&path, &opts).unwrap();
    drop(t.write("a").unwrap()); // now in this process's lookup cache
    for i in 0..200 {
        // Each new ID needs a slot; idle ones (a's included) are reused.
        drop(t.write(format!("id{i}")).unwrap());
    }
    let g = t.write("a").unwrap();
    // Another attachment (no cache) must find the very same lock ...
    assert!(other.try_read("a").unwrap().is_none());
    // ... and no other ID may share it.
    for i in 0..200 {
        assert!(
            other.try_write(format!("id{i}")).unwrap().is_some(),
            "id{i}"
        );
    }
    drop(g);
    assert!(other.try_write("a").unwrap().is_some());
}

#[test]
fn too_many_processes_is_a_typed_error_and_a_slot_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let opts = TableOptions::default().max_processes(2);
    let a = LockTable::open(&path, &opts).unwrap();
    let b = LockTable::open(&path, &opts).unwrap();
    let e = LockTable::open(&path, &opts).unwrap_err();
    assert!(
        matches!(e, Error::TooManyProcesses { max_processes: 2 }),
        "{e}"
    );
    let _held = a.write("x").unwrap();
    drop(b);
    let c = LockTable::open(&path, &opts).unwrap();
    assert!(
        c.try_read("x").unwrap().is_none(),
        "a's hold survived b's detach"
    );
}
