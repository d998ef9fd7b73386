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

use locktable::model::{reset_logical_clock, Key, Model, ModelFail, ModelWait};
use loom::cell::UnsafeCell;
use loom::thread;

// The session cache's change counters (a separate file: the lock-core models live here).
mod versions;
// The reader bias (per-thread reader rows): its own file.
mod bravo;
// The lookup cache's seqlock entries.
mod lookup_cache;
// The gate between attaching and fork().
mod fork_gate;

const SLOT: usize = 0;
const SLOTS: u32 = 1;

struct Shared {
    model: Model,
    data: UnsafeCell<u64>,
}

fn shared(processes: u32, poll: Option<Duration>) -> (Arc<Shared>, Key) {
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
    // called only while holding a read, upgradable or write lock on
    // SLOT; loom's UnsafeCell checks that no write overlaps this read.
    // SAFETY: sound for the reasons just given.
    unsafe { *p }
}

fn unsafe_bump(p: *mut u64) {
    // called only while holding the write lock on SLOT; loom's
    // UnsafeCell checks that no other access overlaps this write.
    // SAFETY: sound for the reasons just given.
    unsafe { *p += 1 }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    model_with_branches(1_000, f)
}

/// A model whose threads may wait for each other's bucket locks (each
/// look at a held lock is a branch).
fn model_with_branches(max_branches: usize, f: impl Fn() + Sync + Send + 'static) {
    model_bounded(max_branches, usize::MAX, f)
}

/// A model with its own cap on preemptions (the run's
/// `LOOM_MAX_PREEMPTIONS` still lowers it): for models whose threads scan a
/// whole bucket, where each extra preemption multiplies the run time.
fn model_bounded(
    max_branches: usize,
    max_preemptions: usize,
    f: impl Fn() + Sync + Send + 'static,
) {
    let mut b = loom::model::Builder::new();
    b.max_branches = max_branches;
    // Default 2 when LOOM_MAX_PREEMPTIONS is unset.
    b.preemption_bound = Some(b.preemption_bound.unwrap_or(2).min(max_preemptions));
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
    MidWriteDowngrade,
    MidUpgradableDowngrade,
}

fn die_at(s: &Shared, g: Key, p: u32, at: Death) {
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
        Death::MidWriteDowngrade => {
            m.write(p, SLOT, g, ModelWait::Forever).unwrap();
            s.bump_data();
            m.downgrade_read_only(p, SLOT);
        }
        Death::MidUpgradableDowngrade => {
            m.upgradable(p, SLOT, g, ModelWait::Forever).unwrap();
            m.downgrade_read_only(p, SLOT);
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
        if matches!(at, Death::HoldingWrite | Death::MidWriteDowngrade) {
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

#[test]
fn recovery_of_a_writer_killed_mid_downgrade() {
    recovery_model(Death::MidWriteDowngrade);
}

#[test]
fn recovery_of_an_upgradable_holder_killed_mid_downgrade() {
    recovery_model(Death::MidUpgradableDowngrade);
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

// ---------------------------------------------------------------------------
// Slot identity: an acquisition stalled between its lookup (or the lookup
// cache's hint) and its announcement while its slot is reused until GEN
// wraps. Under loom GEN is one bit wide, so two reuses wrap it.
// ---------------------------------------------------------------------------

/// Per-slot data: whoever holds slot `i` for any ID may touch `data[i]`,
/// and the writer of ID A touches `a`. A hold on a slot that serves another
/// ID than the holder thinks shows up as a race on `a`.
struct Indexed {
    model: Model,
    a: UnsafeCell<u64>,
}

const A: (u64, u64) = (1, 1);
const B: (u64, u64) = (2, 2);
const C: (u64, u64) = (3, 3);

fn indexed(processes: u32) -> Arc<Indexed> {
    Arc::new(Indexed {
        model: Model::new(16, processes, None),
        a: UnsafeCell::new(0),
    })
}

/// The table goes on while the stalled thread sleeps: A's slot serves B,
/// then C (same generation again), and A's writer gets a fresh slot.
fn reuse_twice_then_write_a(s: &Indexed, slot: usize) {
    let m = &s.model;
    if m.reuse_slot(slot, B, 0).is_some() {
        m.reuse_slot(slot, C, 0);
    }
    let (i, k) = m.find_or_insert(A, 0).unwrap();
    m.write(0, i, k, ModelWait::Forever).unwrap();
    s.a.with_mut(|p| unsafe_bump(p));
    m.release_write(i);
}

#[test]
fn a_reader_stalled_across_a_generation_wrap_never_reads_another_ids_slot() {
    model(|| {
        let s = indexed(2);
        // The stalled reader's lookup (or its cached hint), taken earlier.
        let (slot, k) = s.model.find_or_insert(A, 1).unwrap();
        let reader = {
            let s = s.clone();
            thread::spawn(move || match s.model.read(1, slot, k, ModelWait::Try) {
                Ok(_) => {
                    let _ = s.a.with(|p| unsafe_read(p));
                    s.model.release_read(1, slot);
                }
                Err(ModelFail::Stale | ModelFail::Busy) => {}
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        reuse_twice_then_write_a(&s, slot);
        reader.join().unwrap();
    });
}

#[test]
fn a_writer_stalled_across_a_generation_wrap_never_claims_another_ids_slot() {
    model(|| {
        let s = indexed(2);
        let (slot, k) = s.model.find_or_insert(A, 1).unwrap();
        let writer = {
            let s = s.clone();
            thread::spawn(move || match s.model.write(1, slot, k, ModelWait::Try) {
                Ok(_) => {
                    s.a.with_mut(|p| unsafe_bump(p));
                    s.model.release_write(slot);
                }
                Err(ModelFail::Stale | ModelFail::Busy) => {}
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        reuse_twice_then_write_a(&s, slot);
        writer.join().unwrap();
    });
}

// ---------------------------------------------------------------------------
// Insertion of one ID racing the retirement of another in a shared bucket.
// ---------------------------------------------------------------------------

#[test]
fn an_insertion_retiring_a_slot_races_a_lookup_and_read_of_its_old_id() {
    // One preemption: with two, the two bucket scans make this model run
    // for four minutes on two cores (it passed then too).
    model_bounded(20_000, 1, || {
        // One bucket of 8 slots: every ID's candidates are that bucket.
        let m = Arc::new(Model::new(8, 3, None));
        let data: Arc<Vec<UnsafeCell<u64>>> =
            Arc::new((0..8).map(|_| UnsafeCell::new(0)).collect());
        let keys: Vec<_> = (1..=8u64)
            .map(|t| m.find_or_insert((t, t), 2).unwrap())
            .collect();
        // IDs 2..=8 are held (process 2 reads them): only ID 1 is idle.
        for &(i, k) in &keys[1..] {
            m.read(2, i, k, ModelWait::Try).unwrap();
        }
        // A thread locks ID 1 from scratch: lock-free lookup, then a try
        // read, retried on a stale slot, as `LockTable::acquire` does.
        let reader = {
            let (m, data) = (m.clone(), data.clone());
            thread::spawn(move || {
                while let Some((i, k)) = m.find_or_insert((1, 1), 1) {
                    match m.read(1, i, k, ModelWait::Try) {
                        Ok(_) => {
                            let _ = data[i].with(|p| unsafe_read(p));
                            m.release_read(1, i);
                            return Some(i);
                        }
                        Err(ModelFail::Stale) => continue,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
                None // the table is full: ID 1's slot went to ID 100
            })
        };
        // A new ID needs room: it retires ID 1's slot (if idle) and writes
        // (retried on a stale slot: ID 1 may take the slot back first).
        let mut mine = None;
        while let Some((i, k)) = m.find_or_insert((100, 100), 0) {
            match m.write(0, i, k, ModelWait::Forever) {
                Ok(_) => {
                    data[i].with_mut(|p| unsafe_bump(p));
                    m.release_write(i);
                    mine = Some(i);
                    break;
                }
                Err(ModelFail::Stale) => continue,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        let read_in = reader.join().unwrap();
        // Each ID got the one idle slot in turn, and the index agrees.
        assert!(mine.is_some() || read_in.is_some());
        let f1 = m.find((1, 1)).map(|f| f.0);
        let f100 = m.find((100, 100)).map(|f| f.0);
        assert!(f1.is_none() || f1 == read_in);
        assert!(f100.is_none() || f100 == mine);
        assert!(f1.is_none() || f1 != f100);
    });
}

// ---------------------------------------------------------------------------
// Bucket locks: liveness, repair, deadlines.
// ---------------------------------------------------------------------------

#[test]
fn a_bucket_lock_of_a_dead_inserter_is_repaired_by_the_next_insertion() {
    model(|| {
        let m = Arc::new(Model::new(16, 3, Some(Duration::from_millis(10))));
        // Process 2 died holding bucket 0's lock (an insertion cut short).
        m.die_holding_bucket_of(2, 0);
        let other = {
            let m = m.clone();
            thread::spawn(move || {
                reset_logical_clock();
                m.find_or_insert((7, 9), 1).unwrap()
            })
        };
        let mine = m.find_or_insert((5, 6), 0).unwrap();
        let theirs = other.join().unwrap();
        assert_ne!(mine.0, theirs.0);
        assert!(m.bucket_unlocked(0) && m.bucket_unlocked(8));
    });
}

#[test]
fn a_bucket_lock_of_a_live_holder_fails_a_try_and_times_out_a_deadline() {
    model(|| {
        let m = Arc::new(Model::new(16, 3, Some(Duration::from_millis(10))));
        // Process 2 is alive and inside an insertion (or the word is forged).
        m.set_bucket_lock_of(0, 3);
        let timed = {
            let m = m.clone();
            thread::spawn(move || {
                reset_logical_clock();
                m.find_or_insert_within((5, 6), 1, ModelWait::For(Duration::from_millis(2)))
            })
        };
        assert_eq!(
            m.find_or_insert_within((7, 9), 0, ModelWait::Try),
            Err(ModelFail::Busy)
        );
        assert_eq!(timed.join().unwrap(), Err(ModelFail::Timeout));
        // A word naming no possible process is repaired by the next one.
        m.set_bucket_lock_of(0, 1 << 40);
        assert!(m
            .find_or_insert_within((7, 9), 0, ModelWait::Try)
            .unwrap()
            .is_some());
    });
}

// ---------------------------------------------------------------------------
// WRITER_WAITING, upgrade timeouts, the hold bound.
// ---------------------------------------------------------------------------

#[test]
fn a_waiting_writer_and_an_upgradable_request_both_get_in() {
    model(|| {
        let (s, g) = shared(3, None);
        s.model.upgradable(0, SLOT, g, ModelWait::Forever).unwrap();
        let writer = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.write(1, SLOT, g, ModelWait::Forever).unwrap();
                s.bump_data();
                s.model.release_write(SLOT);
            })
        };
        let up = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.upgradable(2, SLOT, g, ModelWait::Forever).unwrap();
                let _ = s.read_data();
                s.model.release_upgradable(SLOT);
            })
        };
        s.model.release_upgradable(SLOT);
        writer.join().unwrap();
        up.join().unwrap();
        assert!(!s.model.writer_waiting_marked(SLOT));
        assert!(s.model.is_idle(SLOT));
    });
}

#[test]
fn a_writer_that_times_out_withdraws_its_claim_on_upgradable_holders() {
    model(|| {
        let (s, g) = shared(3, None);
        s.model.upgradable(0, SLOT, g, ModelWait::Forever).unwrap();
        let writer = {
            let s = s.clone();
            thread::spawn(move || {
                reset_logical_clock();
                let r = s
                    .model
                    .write(1, SLOT, g, ModelWait::For(Duration::from_millis(5)));
                assert_eq!(r, Err(ModelFail::Timeout));
            })
        };
        // Blocks with no poll: only the writer's withdrawal (and its wake)
        // or the upgrader's release lets it in.
        let up = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.upgradable(2, SLOT, g, ModelWait::Forever).unwrap();
                s.model.release_upgradable(SLOT);
            })
        };
        writer.join().unwrap();
        s.model.release_upgradable(SLOT);
        up.join().unwrap();
        assert!(!s.model.writer_waiting_marked(SLOT));
    });
}

#[test]
fn a_dead_waiting_writer_does_not_block_upgradable_holders() {
    model(|| {
        let (s, g) = shared(3, Some(Duration::from_millis(10)));
        s.model.upgradable(0, SLOT, g, ModelWait::Forever).unwrap();
        let dying = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.announce_waiting_writer_only(1, SLOT, g);
                s.model.kill(1);
            })
        };
        let up = {
            let s = s.clone();
            thread::spawn(move || {
                reset_logical_clock();
                s.model.upgradable(2, SLOT, g, ModelWait::Forever).unwrap();
                s.model.release_upgradable(SLOT);
            })
        };
        dying.join().unwrap();
        s.model.release_upgradable(SLOT);
        up.join().unwrap();
        s.model.sweep(1);
        assert!(!s.model.writer_waiting_marked(SLOT));
    });
}

#[test]
fn an_upgrade_that_times_out_keeps_the_upgradable_hold_and_wakes_readers() {
    model(|| {
        let (s, g) = shared(3, None);
        s.model.read(1, SLOT, g, ModelWait::Forever).unwrap();
        s.model.upgradable(0, SLOT, g, ModelWait::Forever).unwrap();
        // A reader that arrives during the upgrade waits (no poll) and must
        // be woken when the upgrade gives up.
        let late = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.read(2, SLOT, g, ModelWait::Forever).unwrap();
                let _ = s.read_data();
                s.model.release_read(2, SLOT);
            })
        };
        let r = s
            .model
            .upgrade(0, SLOT, ModelWait::For(Duration::from_millis(5)));
        assert_eq!(r, Err(ModelFail::Timeout));
        // Still the upgradable holder: no other upgradable hold gets in.
        assert_eq!(
            s.model.upgradable(2, SLOT, g, ModelWait::Try),
            Err(ModelFail::Busy)
        );
        s.model.release_read(1, SLOT);
        late.join().unwrap();
        s.model.release_upgradable(SLOT);
        assert!(s.model.is_idle(SLOT));
    });
}

#[test]
fn a_downgrade_at_the_read_limit_fits_and_keeps_writers_out() {
    model(|| {
        let (s, g) = shared(2, None);
        s.model.fill_lane_to_the_read_limit(0, SLOT);
        assert_eq!(
            s.model.read(0, SLOT, g, ModelWait::Try),
            Err(ModelFail::HoldLimit)
        );
        s.model.upgradable(0, SLOT, g, ModelWait::Forever).unwrap();
        let writer = {
            let s = s.clone();
            thread::spawn(move || {
                reset_logical_clock();
                if s.model
                    .write(1, SLOT, g, ModelWait::For(Duration::from_millis(5)))
                    .is_ok()
                {
                    s.bump_data();
                    s.model.release_write(SLOT);
                }
            })
        };
        assert!(s.model.downgrade_upgradable_to_read(0, SLOT));
        let _ = s.read_data();
        assert_eq!(s.model.reads_of(0, SLOT), 0x1_0000);
        writer.join().unwrap();
        // The reserved read is in use: no upgradable hold could downgrade.
        assert_eq!(
            s.model.upgradable(0, SLOT, g, ModelWait::Try),
            Err(ModelFail::HoldLimit)
        );
        s.model.release_read(0, SLOT);
    });
}
