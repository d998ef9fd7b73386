//! loom models of the reader bias (per-thread reader rows, DESIGN §10):
//! publication against revocation, re-bias racing a claim, the release
//! wake against a revoking writer's PARKED, a biased reader killed between
//! publish and re-check, retirement and upgrade against a biased reader,
//! and a biased reader stalled across a generation wrap.
//!
//! Readers here read through a reader row (`read_with_row`), so they take
//! the biased path whenever the slot is BIASED, and their lane path may set
//! BIASED again. Under loom a record has one row of two entries.

use super::*;

/// The model with asymmetric fences when `asym` (DESIGN §10): every model
/// below runs both ways (modules `locked` and `asymmetric` at the end).
fn fences(m: Model, asym: bool) -> Model {
    if asym {
        m.asymmetric()
    } else {
        m
    }
}

fn shared_in(asym: bool, processes: u32, poll: Option<Duration>) -> (Arc<Shared>, Key) {
    let s = Arc::new(Shared {
        model: fences(Model::new(SLOTS, processes, poll), asym),
        data: UnsafeCell::new(0),
    });
    let g = s.model.activate(SLOT);
    (s, g)
}

fn indexed_in(asym: bool, processes: u32) -> Arc<Indexed> {
    Arc::new(Indexed {
        model: fences(Model::new(16, processes, None), asym),
        a: UnsafeCell::new(0),
    })
}
use loom::sync::atomic::{AtomicU64, Ordering};

/// An exclusion witness that the model checker's partial-order reduction
/// sees: a writer makes it odd for the length of its critical section, and
/// a reader inside its own must find it even. (A lone `UnsafeCell` race is
/// found only on schedules that loom explores for other reasons; when a
/// bug removes the writer's last access to a reader's row entry, nothing
/// makes loom try the overlapping schedule, so the models check both.)
#[derive(Clone, Default)]
struct Witness(Arc<AtomicU64>);

impl Witness {
    fn read(&self, s: &Shared) -> u64 {
        assert_eq!(
            self.0.load(Ordering::Relaxed) % 2,
            0,
            "a reader inside a write"
        );
        s.read_data()
    }
    fn write(&self, s: &Shared) {
        self.0.fetch_add(1, Ordering::Relaxed);
        s.bump_data();
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A biased read through row 0 of `p`, blocking; returns its entry.
fn biased_read(s: &Shared, p: u32, g: Key) -> Option<u32> {
    s.model
        .read_with_row(p, 0, SLOT, g, ModelWait::Forever)
        .unwrap()
}

fn a_biased_reader_and_a_revoking_writer_exclude_each_other(asym: bool) {
    model(move || {
        let w = Witness::default();
        let (s, g) = shared_in(asym, 2, None);
        s.model.bias(SLOT);
        let reader = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(move || {
                let entry = biased_read(&s, 0, g);
                let v = w.read(&s);
                s.model.release_reader(0, SLOT, entry);
                v
            })
        };
        s.model.write(1, SLOT, g, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        assert!(reader.join().unwrap() <= 1);
        assert!(s.model.is_idle(SLOT));
        // The writer's grant revoked the bias (a lane read that came after
        // it may have set it again only once the cooling window passed).
    });
}

fn a_writer_that_gives_up_leaves_the_bias_for_the_next_claimant_to_revoke(asym: bool) {
    model(move || {
        let w = Witness::default();
        let (s, g) = shared_in(asym, 3, None);
        s.model.bias(SLOT);
        let reader = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(move || {
                let entry = biased_read(&s, 0, g);
                let v = w.read(&s);
                s.model.release_reader(0, SLOT, entry);
                v
            })
        };
        // A try that may claim, find the biased reader and give up, then a
        // blocking writer: the second claim must still scan the rows.
        if s.model.write(1, SLOT, g, ModelWait::Try).is_ok() {
            w.write(&s);
            s.model.release_write(SLOT);
        }
        s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        assert!(reader.join().unwrap() <= 2);
        assert!(s.model.is_idle(SLOT));
    });
}

fn a_rebias_racing_a_writers_claim_never_hides_a_reader(asym: bool) {
    model(move || {
        let w = Witness::default();
        let (s, g) = shared_in(asym, 2, None);
        // Not biased; the cooling window is over: the first lane read sets
        // BIASED, the second read may be biased.
        let reader = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(move || {
                let mut seen = 0;
                for _ in 0..2 {
                    let entry = biased_read(&s, 0, g);
                    seen = w.read(&s);
                    s.model.release_reader(0, SLOT, entry);
                }
                seen
            })
        };
        s.model.write(1, SLOT, g, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        assert!(reader.join().unwrap() <= 1);
        assert!(s.model.is_idle(SLOT));
    });
}

fn a_biased_release_never_loses_a_revoking_writers_wakeup(asym: bool) {
    model(move || {
        // No poll: a revoking writer asleep on the rows is woken only by
        // the reader's release.
        let w = Witness::default();
        let (s, g) = shared_in(asym, 2, None);
        s.model.bias(SLOT);
        let reader = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(move || {
                if let Ok(entry) = s.model.read_with_row(0, 0, SLOT, g, ModelWait::Try) {
                    let _ = w.read(&s);
                    s.model.release_reader(0, SLOT, entry);
                }
            })
        };
        s.model.write(1, SLOT, g, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        reader.join().unwrap();
        assert!(s.model.is_idle(SLOT));
    });
}

fn a_biased_reader_killed_between_publish_and_recheck_is_swept(asym: bool) {
    model(move || {
        let w = Witness::default();
        let (s, g) = shared_in(asym, 3, Some(Duration::from_millis(10)));
        s.model.bias(SLOT);
        let dying = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.publish_biased_only(0, SLOT);
                s.model.kill(0);
            })
        };
        let reader = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(move || {
                reset_logical_clock();
                // A live biased reader racing with the death and recovery.
                let r =
                    s.model
                        .read_with_row(1, 0, SLOT, g, ModelWait::For(Duration::from_millis(30)));
                if let Ok(entry) = r {
                    let _ = w.read(&s);
                    s.model.release_reader(1, SLOT, entry);
                }
            })
        };
        // The writer's waits poll liveness and sweep the dead reader's row.
        s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        dying.join().unwrap();
        reader.join().unwrap();
        s.model.sweep(0);
        assert_eq!(s.model.biased_reads_of(0, SLOT), 0);
        assert!(s.model.is_idle(SLOT));
    });
}

fn a_killed_biased_reader_is_swept_and_a_writer_gets_in(asym: bool) {
    model(move || {
        let w = Witness::default();
        let (s, g) = shared_in(asym, 2, Some(Duration::from_millis(10)));
        s.model.bias(SLOT);
        let dying = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(move || {
                if let Ok(Some(_)) = s.model.read_with_row(0, 0, SLOT, g, ModelWait::Try) {
                    let _ = w.read(&s);
                }
                s.model.kill(0);
            })
        };
        s.model.write(1, SLOT, g, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        dying.join().unwrap();
        s.model.sweep(0);
        assert!(s.model.is_idle(SLOT));
    });
}

fn an_upgrade_revokes_a_biased_reader(asym: bool) {
    model(move || {
        let w = Witness::default();
        let (s, g) = shared_in(asym, 2, None);
        s.model.bias(SLOT);
        s.model.upgradable(1, SLOT, g, ModelWait::Forever).unwrap();
        let reader = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(move || {
                let entry = biased_read(&s, 0, g);
                let v = w.read(&s);
                s.model.release_reader(0, SLOT, entry);
                v
            })
        };
        s.model.upgrade(1, SLOT, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        assert!(reader.join().unwrap() <= 1);
        assert!(s.model.is_idle(SLOT));
    });
}

fn retirement_races_a_biased_reader_safely(asym: bool) {
    model(move || {
        let w = Witness::default();
        let s = Arc::new(Shared {
            model: fences(Model::new(16, 2, None), asym),
            data: UnsafeCell::new(0),
        });
        let (slot, g) = s.model.find_or_insert((1, 2), 0).unwrap();
        s.model.bias(slot);
        let reader = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(
                move || match s.model.read_with_row(1, 0, slot, g, ModelWait::Try) {
                    Ok(entry) => {
                        let _ = w.read(&s);
                        s.model.release_reader(1, slot, entry);
                        true
                    }
                    Err(ModelFail::Stale) => false,
                    Err(e) => panic!("unexpected {e:?}"),
                },
            )
        };
        let retired = s.model.try_retire(slot, g);
        if retired {
            // Reused for another ID: the data changes owner.
            w.write(&s);
        }
        let read = reader.join().unwrap();
        if retired {
            assert_eq!(s.model.find((1, 2)), None);
        } else {
            assert!(read || s.model.find((1, 2)) == Some((slot, g)));
        }
    });
}

fn a_biased_reader_stalled_across_a_generation_wrap_never_reads_another_ids_slot(asym: bool) {
    model(move || {
        let w = Witness::default();
        let s = indexed_in(asym, 2);
        let (slot, k) = s.model.find_or_insert(A, 1).unwrap();
        // BIASED survives retirement and reuse, so the stalled reader
        // takes the biased path on whatever the slot serves by then.
        s.model.bias(slot);
        let reader = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(
                move || match s.model.read_with_row(1, 0, slot, k, ModelWait::Try) {
                    Ok(entry) => {
                        assert_eq!(w.0.load(Ordering::Relaxed) % 2, 0, "inside A's write");
                        let _ = s.a.with(|p| unsafe_read(p));
                        s.model.release_reader(1, slot, entry);
                    }
                    Err(ModelFail::Stale | ModelFail::Busy) => {}
                    Err(e) => panic!("unexpected {e:?}"),
                },
            )
        };
        // As `reuse_twice_then_write_a`, with the witness around A's write.
        let m = &s.model;
        if m.reuse_slot(slot, B, 0).is_some() {
            m.reuse_slot(slot, C, 0);
        }
        let (i, k) = m.find_or_insert(A, 0).unwrap();
        m.write(0, i, k, ModelWait::Forever).unwrap();
        w.0.fetch_add(1, Ordering::Relaxed);
        s.a.with_mut(|p| unsafe_bump(p));
        w.0.fetch_add(1, Ordering::Relaxed);
        m.release_write(i);
        reader.join().unwrap();
    });
}

#[test]
fn two_threads_sharing_a_row_and_a_revoking_writer() {
    model(|| {
        // Two threads of process 0 publish in the same row (more threads
        // than rows): each takes its own entry by a CAS from 0. Only the
        // locked protocol shares rows: with asymmetric fences a thread
        // publishes only in a row it owns (`reader_row`).
        let w = Witness::default();
        let (s, g) = shared_in(false, 2, None);
        s.model.bias(SLOT);
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (s, w) = (s.clone(), w.clone());
                thread::spawn(move || {
                    let entry = biased_read(&s, 0, g);
                    let v = w.read(&s);
                    s.model.release_reader(0, SLOT, entry);
                    v
                })
            })
            .collect();
        s.model.write(1, SLOT, g, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        for r in readers {
            assert!(r.join().unwrap() <= 1);
        }
        assert!(s.model.is_idle(SLOT));
    });
}

fn a_process_attaching_during_a_revocation_is_seen_by_the_row_scan(asym: bool) {
    model(move || {
        let w = Witness::default();
        let (s, g) = shared_in(asym, 3, None);
        s.model.bias(SLOT);
        // Only process 0 has attached so far: a revocation scans its rows only.
        s.model.set_lanes_in_use(1);
        let late = {
            let (s, w) = (s.clone(), w.clone());
            thread::spawn(move || {
                // Process 2 attaches (raising the mark), then reads biased.
                s.model.attach(2);
                let entry = biased_read(&s, 2, g);
                let v = w.read(&s);
                s.model.release_reader(2, SLOT, entry);
                v
            })
        };
        s.model.write(0, SLOT, g, ModelWait::Forever).unwrap();
        w.write(&s);
        s.model.release_write(SLOT);
        assert!(late.join().unwrap() <= 1);
        assert!(s.model.is_idle(SLOT));
    });
}

/// A biased reader that holds until told: it publishes `held` once granted
/// and releases after `done`. (A reader that simply releases lets loom's
/// scheduler run it whenever a timed wait yields, so the schedules where a
/// claimant gives up *beside* a held biased read would never be explored.)
fn reader_holding_until_done(
    s: &Arc<Shared>,
    g: Key,
    held: &Arc<loom::sync::atomic::AtomicBool>,
    done: &Arc<loom::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<()> {
    let (s, held, done) = (s.clone(), held.clone(), done.clone());
    thread::spawn(move || {
        let entry = biased_read(&s, 0, g);
        assert!(entry.is_some(), "the slot is biased and the row free");
        held.store(true, Ordering::SeqCst);
        while !done.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        s.model.release_reader(0, SLOT, entry);
    })
}

fn wait_for(flag: &loom::sync::atomic::AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        thread::yield_now();
    }
}

/// An upgrade that times out beside a biased reader takes its claim back
/// (WRITER -> UPGRADER); the bias must survive that way back, or the next
/// writer would not scan the rows and would get in beside the reader.
fn an_upgrade_that_gives_up_leaves_the_bias_for_the_next_writer_to_revoke(asym: bool) {
    model(move || {
        let (s, g) = shared_in(asym, 3, None);
        s.model.bias(SLOT);
        let (held, done) = (Arc::default(), Arc::default());
        s.model.upgradable(1, SLOT, g, ModelWait::Forever).unwrap();
        let reader = reader_holding_until_done(&s, g, &held, &done);
        wait_for(&held);
        let up = s
            .model
            .upgrade(1, SLOT, ModelWait::For(Duration::from_millis(5)));
        assert_eq!(up, Err(ModelFail::Timeout), "an upgrade beside a reader");
        s.model.release_upgradable(SLOT);
        assert!(
            s.model.write(2, SLOT, g, ModelWait::Try).is_err(),
            "a writer beside a biased reader"
        );
        done.store(true, Ordering::SeqCst);
        reader.join().unwrap();
        s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        s.model.release_write(SLOT);
        assert!(s.model.is_idle(SLOT));
    });
}

/// A writer that dies with its claim pending (the bias still set, its row
/// scan unfinished) is swept by the next writer's liveness poll; the sweep
/// must leave BIASED, so that the next writer's claim scans the rows too.
fn a_writer_killed_mid_revocation_leaves_the_bias_for_the_next_writer(asym: bool) {
    model(move || {
        let (s, g) = shared_in(asym, 3, Some(Duration::from_millis(10)));
        s.model.bias(SLOT);
        let (held, done) = (Arc::default(), Arc::default());
        let reader = reader_holding_until_done(&s, g, &held, &done);
        wait_for(&held);
        let dying = {
            let s = s.clone();
            thread::spawn(move || {
                s.model.claim_write_only(1, SLOT, g).unwrap();
                s.model.kill(1);
            })
        };
        dying.join().unwrap();
        // Waits past a poll (which sweeps process 1), then must still find
        // the biased reader.
        let w = s
            .model
            .write(2, SLOT, g, ModelWait::For(Duration::from_millis(30)));
        assert_eq!(
            w,
            Err(ModelFail::Timeout),
            "a writer beside a biased reader"
        );
        assert_eq!(s.model.biased_reads_of(0, SLOT), 1);
        done.store(true, Ordering::SeqCst);
        reader.join().unwrap();
        s.model.write(2, SLOT, g, ModelWait::Forever).unwrap();
        s.model.release_write(SLOT);
        assert!(s.model.is_idle(SLOT));
    });
}

/// Each model with the locked protocol and with asymmetric fences.
macro_rules! both_ways {
    ($($name:ident),* $(,)?) => {
        mod locked {
            $(#[test]
            fn $name() {
                super::$name(false)
            })*
        }
        mod asymmetric {
            $(#[test]
            fn $name() {
                super::$name(true)
            })*
        }
    };
}

both_ways!(
    a_biased_reader_and_a_revoking_writer_exclude_each_other,
    a_writer_that_gives_up_leaves_the_bias_for_the_next_claimant_to_revoke,
    a_rebias_racing_a_writers_claim_never_hides_a_reader,
    a_biased_release_never_loses_a_revoking_writers_wakeup,
    a_biased_reader_killed_between_publish_and_recheck_is_swept,
    a_killed_biased_reader_is_swept_and_a_writer_gets_in,
    an_upgrade_revokes_a_biased_reader,
    retirement_races_a_biased_reader_safely,
    a_biased_reader_stalled_across_a_generation_wrap_never_reads_another_ids_slot,
    a_process_attaching_during_a_revocation_is_seen_by_the_row_scan,
    an_upgrade_that_gives_up_leaves_the_bias_for_the_next_writer_to_revoke,
    a_writer_killed_mid_revocation_leaves_the_bias_for_the_next_writer,
);
