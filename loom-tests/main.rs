//! loom models of the lock-word, index and recovery protocols.
//!
//! Run (the README test command does this):
//! `RUSTFLAGS="--cfg locktable_loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom`
//!
//! The data a lock protects is a `loom::cell::UnsafeCell`: if the lock ever
//! let a writer overlap another holder, loom reports the data race, so every
//! model checks mutual exclusion on every interleaving it explores, besides
//! its own assertions. A lost wakeup shows up as a loom deadlock (waiters in
//! the models that check wakeups never poll).
#![cfg(locktable_loom)]

use std::sync::Arc;
use std::time::Duration;

use locktable::model::{reset_logical_clock, Model, ModelFail, ModelWait};
use loom::cell::UnsafeCell;
use loom::thread;

// The session cache's change counters (a separate file: the lock-core models live here).
mod versions;

const SLOT: usize = 0;
const SLOTS: u32 = 1;

struct Shared {
    model: Model,
    data: UnsafeCell<u64>,
}

fn shared(processes: u32, poll: Option<Duration>) -> (Arc<Shared>, u32) {
    let s = Arc::new(Shared {
        // One slot: the lock-word and recovery models need no index, and a
        // sweep visits every slot of the region.
        model: Model::new(SLOTS, processes, poll),
        data: UnsafeCell::new(0),
    });
    let g = s.model.activate(SLOT);
    (s, g)
}

impl Shared {
    fn read_data(&self) -> u64 {
        self.data.with(|p| unsafe_read(p))
    }
    fn bump_data(&self) {
        self.data.with_mut(|p| unsafe_bump(p))
    }
}

fn unsafe_read(p: *const u64) -> u64 {
    // SAFETY: called only while holding a read, upgradable or write lock on
    // SLOT; loom's UnsafeCell checks that no write overlaps this read.
    unsafe { *p }
}

fn unsafe_bump(p: *mut u64) {
    // SAFETY: called only while holding the write lock on SLOT; loom's
    // UnsafeCell checks that no other access overlaps this write.
    unsafe { *p += 1 }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b.check(move || {
        reset_logical_clock();
        f()
    });
}

#[test]
fn two_readers_and_a_writer() {
    model(|| {
        let (s, g) = shared(3, None);
        let readers: Vec<_> = (0..2)
            .map(|p| {
                let s = s.clone();
                thread::spawn(move || {
                    s.model.read(p, SLOT, g, ModelWait::Forever).unwrap();
                    let v = s.read_data();
                    s.model.release_read(p, SLOT);
                    v
                })
            })
            .collect();
        s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        s.bump_data();
        s.model.release_write(SLOT);
        for r in readers {
            assert!(r.join().unwrap() <= 1);
        }
        assert!(s.model.is_idle(SLOT));
    });
}

#[test]
fn a_process_attaching_during_a_write_is_seen_by_the_drain_check() {
    model(|| {
        let (s, g) = shared(3, None);
        // Only process 0 has attached so far: writers scan lane 0 only.
        s.model.set_lanes_in_use(1);
        let late = {
            let s = s.clone();
            thread::spawn(move || {
                // Process 2 attaches (raising the mark), then reads.
                s.model.attach(2);
                s.model.read(2, SLOT, g, ModelWait::Forever).unwrap();
                let v = s.read_data();
                s.model.release_read(2, SLOT);
                v
            })
        };
        s.model.write(0, SLOT, g, ModelWait::Forever).unwrap();
        s.bump_data();
        s.model.release_write(SLOT);
        assert!(late.join().unwrap() <= 1);
        assert!(s.model.is_idle(SLOT));
    });
}

#[test]
fn upgrader_with_a_reader_and_a_writer() {
    model(|| {
        let (s, g) = shared(3, None);
        let up = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.upgradable(0, SLOT, g, ModelWait::Forever).unwrap();
                let before = s.read_data();
                s.model.upgrade(0, SLOT, ModelWait::Forever).unwrap();
                // Nobody wrote between our upgradable read and the upgrade.
                assert_eq!(s.read_data(), before);
                s.bump_data();
                s.model.release_write(SLOT);
            })
        };
        let reader = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.read(1, SLOT, g, ModelWait::Forever).unwrap();
                let _ = s.read_data();
                s.model.release_read(1, SLOT);
            })
        };
        s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        s.bump_data();
        s.model.release_write(SLOT);
        up.join().unwrap();
        reader.join().unwrap();
        assert_eq!(s.read_data(), 2);
        assert!(s.model.is_idle(SLOT));
    });
}

#[test]
fn two_upgradable_requests_never_deadlock() {
    model(|| {
        let (s, g) = shared(2, None);
        let hs: Vec<_> = (0..2)
            .map(|p| {
                let s = s.clone();
                thread::spawn(move || {
                    s.model.upgradable(p, SLOT, g, ModelWait::Forever).unwrap();
                    let before = s.read_data();
                    s.model.upgrade(p, SLOT, ModelWait::Forever).unwrap();
                    assert_eq!(s.read_data(), before);
                    s.bump_data();
                    s.model.release_write(SLOT);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(s.read_data(), 2);
        assert!(s.model.is_idle(SLOT));
    });
}

#[test]
fn downgrades_keep_writers_out() {
    model(|| {
        let (s, g) = shared(3, None);
        let w = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.write(0, SLOT, g, ModelWait::Forever).unwrap();
                s.bump_data();
                let mine = s.read_data();
                s.model.downgrade_write_to_upgradable(0, SLOT);
                assert_eq!(s.read_data(), mine);
                s.model.downgrade_upgradable_to_read(0, SLOT);
                assert_eq!(s.read_data(), mine);
                s.model.release_read(0, SLOT);
            })
        };
        let reader = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.read(1, SLOT, g, ModelWait::Forever).unwrap();
                let _ = s.read_data();
                s.model.release_read(1, SLOT);
            })
        };
        s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        s.bump_data();
        s.model.downgrade_write_to_read(2, SLOT);
        let _ = s.read_data();
        s.model.release_read(2, SLOT);
        w.join().unwrap();
        reader.join().unwrap();
        assert_eq!(s.read_data(), 2);
        assert!(s.model.is_idle(SLOT));
    });
}

#[test]
fn a_timed_acquisition_times_out_and_leaves_no_trace() {
    model(|| {
        let (s, g) = shared(3, None);
        // Holder: a reader that stays until the timed writer gave up.
        s.model.read(0, SLOT, g, ModelWait::Forever).unwrap();
        let timed = {
            let s = s.clone();
            thread::spawn(move || {
                reset_logical_clock();
                let r = s
                    .model
                    .write(1, SLOT, g, ModelWait::For(Duration::from_millis(5)));
                assert_eq!(r, Err(ModelFail::Timeout));
            })
        };
        // A reader arriving while the writer is pending backs off and must
        // be woken when the pending writer gives up.
        let late_reader = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.read(2, SLOT, g, ModelWait::Forever).unwrap();
                s.model.release_read(2, SLOT);
            })
        };
        timed.join().unwrap();
        late_reader.join().unwrap();
        s.model.release_read(0, SLOT);
        assert!(s.model.is_idle(SLOT));
        assert_eq!(s.model.write(1, SLOT, g, ModelWait::Try), Ok(false));
    });
}

#[test]
fn a_release_never_loses_a_sleeping_writers_wakeup() {
    model(|| {
        let (s, g) = shared(3, None);
        let readers: Vec<_> = (0..2)
            .map(|p| {
                let s = s.clone();
                thread::spawn(move || {
                    if s.model.read(p, SLOT, g, ModelWait::Try).is_ok() {
                        s.model.release_read(p, SLOT);
                    }
                })
            })
            .collect();
        // Blocks with no poll: only a wake can end its sleep.
        s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        s.model.release_write(SLOT);
        for r in readers {
            r.join().unwrap();
        }
    });
}

#[test]
fn a_release_never_loses_a_sleeping_readers_wakeup() {
    model(|| {
        let (s, g) = shared(3, None);
        let writer = {
            let s = s.clone();
            thread::spawn(move || {
                if s.model.write(0, SLOT, g, ModelWait::Try).is_ok() {
                    s.bump_data();
                    s.model.release_write(SLOT);
                }
            })
        };
        let up = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.upgradable(1, SLOT, g, ModelWait::Forever).unwrap();
                s.model.release_upgradable(SLOT);
            })
        };
        s.model.read(2, SLOT, g, ModelWait::Forever).unwrap();
        let _ = s.read_data();
        s.model.release_read(2, SLOT);
        writer.join().unwrap();
        up.join().unwrap();
    });
}

// ---------------------------------------------------------------------------
// Recovery: a process that stops at each step of acquire and release, and a
// recoverer (here: the waiter's own liveness poll) that repairs its slot.
// ---------------------------------------------------------------------------

/// Where the dying process stops.
#[derive(Clone, Copy, Debug)]
enum Death {
    AfterReadAnnounce,
    HoldingRead,
    HoldingUpgradable,
    MidUpgrade,
    WritePending,
    HoldingWrite,
    AfterWriteRelease,
}

fn die_at(s: &Shared, g: u32, p: u32, at: Death) {
    let m = &s.model;
    match at {
        Death::AfterReadAnnounce => m.announce_read_only(p, SLOT),
        Death::HoldingRead => {
            m.read(p, SLOT, g, ModelWait::Forever).unwrap();
        }
        Death::HoldingUpgradable => {
            m.upgradable(p, SLOT, g, ModelWait::Forever).unwrap();
        }
        Death::MidUpgrade => {
            m.upgradable(p, SLOT, g, ModelWait::Forever).unwrap();
            m.begin_upgrade_only(p, SLOT);
        }
        Death::WritePending => {
            let _ = m.claim_write_only(p, SLOT, g);
        }
        Death::HoldingWrite => {
            m.write(p, SLOT, g, ModelWait::Forever).unwrap();
            s.bump_data();
        }
        Death::AfterWriteRelease => {
            m.write(p, SLOT, g, ModelWait::Forever).unwrap();
            s.bump_data();
            m.release_write(SLOT);
        }
    }
    m.kill(p);
}

fn recovery_model(at: Death) {
    model(move || {
        let (s, g) = shared(3, Some(Duration::from_millis(10)));
        let dying = {
            let s = s.clone();
            thread::spawn(move || die_at(&s, g, 0, at))
        };
        let reader = {
            let s = s.clone();
            thread::spawn(move || {
                reset_logical_clock();
                // A live reader racing with the death and the recovery.
                if s.model
                    .read(1, SLOT, g, ModelWait::For(Duration::from_millis(30)))
                    .is_ok()
                {
                    let _ = s.read_data();
                    s.model.release_read(1, SLOT);
                }
            })
        };
        // A live writer: its waits poll liveness and sweep the dead process.
        let died = s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        s.bump_data();
        s.model.release_write(SLOT);
        dying.join().unwrap();
        reader.join().unwrap();
        s.model.sweep(0);
        if matches!(at, Death::HoldingWrite) {
            // The live writer either came after the death and was told, or
            // came first, and the mark waits for the next holder.
            assert!(died != s.model.owner_died_marked(SLOT));
        } else {
            assert!(!died && !s.model.owner_died_marked(SLOT));
        }
        assert!(s.model.is_idle(SLOT));
    });
}

#[test]
fn recovery_of_a_reader_killed_after_announcing() {
    recovery_model(Death::AfterReadAnnounce);
}

#[test]
fn recovery_of_a_killed_reader() {
    recovery_model(Death::HoldingRead);
}

#[test]
fn recovery_of_a_killed_upgradable_holder() {
    recovery_model(Death::HoldingUpgradable);
}

#[test]
fn recovery_of_a_process_killed_mid_upgrade() {
    recovery_model(Death::MidUpgrade);
}

#[test]
fn recovery_of_a_writer_killed_while_pending() {
    recovery_model(Death::WritePending);
}

#[test]
fn recovery_of_a_killed_writer_reports_owner_died() {
    recovery_model(Death::HoldingWrite);
}

#[test]
fn recovery_after_a_completed_release_changes_nothing() {
    recovery_model(Death::AfterWriteRelease);
}

// ---------------------------------------------------------------------------
// Index: one ID never gets two slots; retirement never strands a reader.
// ---------------------------------------------------------------------------

#[test]
fn concurrent_inserts_of_one_id_agree_on_one_slot() {
    model(|| {
        let m = Arc::new(Model::new(16, 2, Some(Duration::from_millis(10))));
        let other = {
            let m = m.clone();
            thread::spawn(move || m.find_or_insert((7, 9), 1).unwrap())
        };
        let mine = m.find_or_insert((7, 9), 0).unwrap();
        assert_eq!(other.join().unwrap(), mine);
        assert_eq!(m.find((7, 9)), Some(mine));
    });
}

#[test]
fn retirement_races_a_reader_safely() {
    model(|| {
        let s = Arc::new(Shared {
            model: Model::new(16, 2, None),
            data: UnsafeCell::new(0),
        });
        let (slot, g) = s.model.find_or_insert((1, 2), 0).unwrap();
        let reader = {
            let s = s.clone();
            thread::spawn(move || match s.model.read(1, slot, g, ModelWait::Try) {
                Ok(_) => {
                    let _ = s.read_data();
                    s.model.release_read(1, slot);
                    true
                }
                Err(ModelFail::Stale) => false,
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        let retired = s.model.try_retire(slot, g);
        if retired {
            // Reused for another ID: the data changes owner.
            s.bump_data();
        }
        let read = reader.join().unwrap();
        // A reader inside the slot while it was retired would race with
        // the bump above (loom reports it). The index agrees with the outcome.
        if retired {
            assert_eq!(s.model.find((1, 2)), None);
        } else {
            assert!(read || s.model.find((1, 2)) == Some((slot, g)));
        }
    });
}

#[test]
fn a_retirer_killed_mid_retirement_is_repaired_without_freeing_a_held_slot() {
    model(|| {
        let s = Arc::new(Shared {
            model: Model::new(16, 2, None),
            data: UnsafeCell::new(0),
        });
        let (slot, g) = s.model.find_or_insert((1, 2), 0).unwrap();
        let reader = {
            let s = s.clone();
            thread::spawn(move || match s.model.read(1, slot, g, ModelWait::Try) {
                Ok(_) => {
                    let _ = s.read_data();
                    true
                }
                Err(ModelFail::Stale) => false,
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        // The retirer takes the first step and dies; recovery repairs.
        s.model.begin_retire_only(slot, g);
        s.model.repair_retirement(slot);
        let holding = reader.join().unwrap();
        // The slot still serves its ID with the same generation, and a
        // reader that got in still holds it.
        assert!(s.model.is_active(slot, g));
        assert_eq!(s.model.find((1, 2)), Some((slot, g)));
        if holding {
            assert!(!s.model.is_idle(slot));
            s.model.release_read(1, slot);
        }
        assert!(s.model.is_idle(slot));
    });
}
