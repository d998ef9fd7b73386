//! White-box regression tests of `LockTable::acquire`: a hook between the
//! lookup (or the lookup cache's hint) and the acquisition plays a thread
//! that was stopped there (SIGSTOP, a cgroup freezer, swap) while the table
//! went on without it.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::*;
use crate::guard::{ReadGuard, UpgradableReadGuard, WriteGuard};

/// Test-only hooks compiled into `acquire` under `cfg(test)`.
pub(crate) mod hooks {
    use std::cell::RefCell;

    use super::Inner;

    type Hook = Box<dyn FnMut(&Inner, u32, &[u8])>;

    thread_local! {
        static AFTER_LOOKUP: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `f` once, on this thread, after the next lookup of a slot.
    pub(crate) fn once_after_lookup(f: impl FnMut(&Inner, u32, &[u8]) + 'static) {
        AFTER_LOOKUP.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    /// Called by `acquire` between the lookup and the acquisition.
    pub(crate) fn after_lookup(inner: &Inner, slot: u32, id: &[u8]) {
        // Taken out first: the hook may lock through another handle.
        if let Some(mut f) = AFTER_LOOKUP.with(|h| h.borrow_mut().take()) {
            f(inner, slot, id);
        }
    }
}

#[allow(dead_code)] // the guards are only held, never read
enum Held {
    R(ReadGuard<'static>),
    U(UpgradableReadGuard<'static>),
    W(WriteGuard<'static>),
}

type Holds = Arc<Mutex<Vec<Held>>>;

fn two_attachments() -> (tempfile::TempDir, LockTable, LockTable) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let opts = TableOptions::default().capacity(16).max_processes(4);
    let a = LockTable::open(&path, &opts).unwrap();
    let b = LockTable::open(&path, &opts).unwrap();
    (dir, a, b)
}

/// The state that 2^GEN_BITS reuses of `slot` leave behind: it serves
/// `new_id` now, at the very generation the stalled thread looked up.
/// (Only the generation's arithmetic is skipped: the slot is really
/// retired, then re-tagged as an insertion does.)
fn reuse_slot_at_the_same_generation(inner: &Inner, slot: u32, new_id: &[u8]) {
    let region = &inner.region;
    let s = region.slot(slot as usize).state.load(Ordering::SeqCst);
    let g = lockword::gen(s);
    assert!(
        region.slot(slot as usize).try_retire(g, false),
        "the looked-up slot was idle"
    );
    let tag = index::tag_of(inner.hash_key, new_id);
    let [t0, t1] = region.slot_tag(slot as usize);
    t0.store(tag.0, Ordering::Release);
    t1.store(tag.1, Ordering::Release);
    let active = lockword::with_gen(0, g) | lockword::PHASE_ACTIVE;
    region
        .slot(slot as usize)
        .state
        .store(active, Ordering::Release);
}

/// While this thread is stalled between its lookup of `x` and its
/// acquisition, `x`'s slot is reused until its generation wraps, and the
/// other attachment takes `x` (in a fresh slot) in mode `take`.
fn stall_after_lookup(other: &LockTable, take: fn(&LockTable) -> Held) -> Holds {
    let holds: Holds = Arc::default();
    let (other, h) = (other.clone(), holds.clone());
    hooks::once_after_lookup(move |inner, slot, id| {
        assert_eq!(id, b"x");
        reuse_slot_at_the_same_generation(inner, slot, b"y");
        h.lock().push(take(&other));
    });
    holds
}

fn write_x(t: &LockTable) -> Held {
    Held::W(t.write("x").unwrap().into_owned())
}
fn read_x(t: &LockTable) -> Held {
    Held::R(t.read("x").unwrap().into_owned())
}

/// Was a bug (mutual exclusion, src/lockword.rs `try_read_once` and
/// src/table.rs `acquire`): an acquisition carries the `(slot, GEN)` of its
/// lookup to its announcement, and the read path validated the slot by GEN
/// alone. A 24-bit GEN wraps after 2^24 reuses of one slot (seconds of
/// churn), so a reader stalled in that window took a read hold on a slot
/// that served another ID, while a writer of its own ID held a fresh slot.
#[test]
fn a_reader_stalled_across_a_generation_wrap_reads_beside_a_writer() {
    let (_dir, t, other) = two_attachments();
    let holds = stall_after_lookup(&other, write_x);
    let r = t.read_timeout("x", Duration::from_millis(50));
    assert!(!holds.lock().is_empty(), "the hook ran");
    assert!(
        matches!(r, Err(Error::Timeout)),
        "a reader of x got in while another attachment holds x for writing"
    );
    drop(holds);
    drop(t.try_read("x").unwrap().expect("free again"));
}

/// Same hole, writer side: a try-writer claimed the WRITER field of the
/// reused slot (GEN matched) and held "x" beside a reader of "x".
#[test]
fn a_writer_stalled_across_a_generation_wrap_writes_beside_a_reader() {
    let (_dir, t, other) = two_attachments();
    let holds = stall_after_lookup(&other, read_x);
    let w = t.try_write("x").unwrap();
    assert!(!holds.lock().is_empty(), "the hook ran");
    assert!(
        w.is_none(),
        "a writer of x got in while another attachment reads x"
    );
}

/// Same hole, upgradable side (timed acquisition).
#[test]
fn an_upgrader_stalled_across_a_generation_wrap_gets_in_beside_a_writer() {
    let (_dir, t, other) = two_attachments();
    let holds = stall_after_lookup(&other, write_x);
    let u = t.upgradable_read_timeout("x", Duration::from_millis(50));
    assert!(!holds.lock().is_empty(), "the hook ran");
    assert!(
        matches!(u, Err(Error::Timeout)),
        "an upgradable holder of x got in beside a writer of x"
    );
}

/// Same hole through the lookup cache: the hint's tag was
/// checked before the acquisition, but the slot can be reused (and its GEN
/// wrap) between that check and the announcement.
#[test]
fn a_cached_hint_stalled_across_a_generation_wrap_writes_beside_a_reader() {
    let (_dir, t, other) = two_attachments();
    drop(t.write("x").unwrap()); // the hint of x is now in this process's cache
    let holds = stall_after_lookup(&other, read_x);
    let w = t.try_write("x").unwrap();
    assert!(!holds.lock().is_empty(), "the hook ran");
    assert!(
        w.is_none(),
        "a writer of x got in (through its cached hint) while x is read"
    );
}

/// Same hole, waiting writer: a timed writer claims WRITER in its claim
/// loop; with GEN matching it claimed the reused slot beside a reader of x.
#[test]
fn a_timed_writer_stalled_across_a_generation_wrap_writes_beside_a_reader() {
    let (_dir, t, other) = two_attachments();
    let holds = stall_after_lookup(&other, read_x);
    let w = t.write_timeout("x", Duration::from_millis(50));
    assert!(!holds.lock().is_empty(), "the hook ran");
    assert!(
        matches!(w, Err(Error::Timeout)),
        "a writer of x got in while another attachment reads x"
    );
}

// ---------------------------------------------------------------------
// Reader bias: which path a read takes
// ---------------------------------------------------------------------

/// The first read of an ID goes through the lane and sets the bias; the
/// next ones use the calling thread's reader row, and are still counted as
/// read holds of this process; a writer revokes the bias and waits for them.
#[test]
fn a_hot_id_is_read_through_the_reader_row_and_a_writer_revokes_it() {
    let t = LockTable::anonymous(&TableOptions::default()).unwrap();
    let first = t.read("hot").unwrap();
    assert_eq!(first.biased_entry(), None, "the first read uses the lane");
    let second = t.read("hot").unwrap();
    assert!(second.biased_entry().is_some(), "the bias was set");
    let st = t.stats().unwrap();
    assert_eq!(st.holders.len(), 1);
    assert_eq!(
        (st.holders[0].process, st.holders[0].count),
        (t.process_index(), 2)
    );
    assert!(
        t.try_write("hot").unwrap().is_none(),
        "a biased reader holds"
    );
    drop(first);
    assert!(
        t.try_write("hot").unwrap().is_none(),
        "a biased reader holds"
    );
    // A guard dropped on another thread clears its entry there.
    std::thread::scope(|s| {
        s.spawn(move || drop(second));
    });
    let w = t.write("hot").unwrap();
    drop(w);
    // The grant revoked the bias: the next read is a lane read.
    assert_eq!(t.read("hot").unwrap().biased_entry(), None);
}

#[test]
fn a_handle_without_reader_bias_reads_through_its_lane() {
    let t = LockTable::anonymous(&TableOptions::default().reader_bias(false)).unwrap();
    for _ in 0..3 {
        assert_eq!(t.read("hot").unwrap().biased_entry(), None);
    }
}

/// Where the kernel offers `membarrier`'s expedited barrier (every kernel
/// CI uses), a table created with `asymmetric_fences(true)` uses them and
/// its biased reads take the plain path; by default (off since stop 19, see
/// `TableOptions::asymmetric_fences`) the locked one, and the choice is the
/// file's: a second handle follows it whatever it asks for.
#[test]
fn asymmetric_fences_are_off_by_default_and_recorded_in_the_file() {
    assert!(
        crate::sync::membarrier::expedited_available(),
        "this kernel has no expedited membarrier: the test cannot check the default"
    );
    let dir = tempfile::tempdir().unwrap();
    let on = dir.path().join("on");
    let t = LockTable::open(&on, &TableOptions::default().asymmetric_fences(true)).unwrap();
    assert!(t.asymmetric_fences());
    drop(t.read("hot").unwrap());
    assert!(t.read("hot").unwrap().biased_entry().is_some());
    let again = LockTable::open(&on, &TableOptions::default().asymmetric_fences(false)).unwrap();
    assert!(
        again.asymmetric_fences(),
        "the file decides, not the second opener"
    );

    let off = dir.path().join("off");
    let t = LockTable::open(&off, &TableOptions::default()).unwrap();
    assert!(!t.asymmetric_fences());
    drop(t.read("hot").unwrap());
    assert!(t.read("hot").unwrap().biased_entry().is_some());
    let again = LockTable::open(&off, &TableOptions::default().asymmetric_fences(true)).unwrap();
    assert!(!again.asymmetric_fences());
}
