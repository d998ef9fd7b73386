//! Recovery: releasing exactly the holds of a dead process.
//!
//! Owns: the sweep of one dead process index over the whole region (its
//! reader rows, then its lanes, WRITER/UPGRADER claims and bucket locks in
//! every slot and bucket).
//!
//! May not touch: liveness. The caller proves the process dead and keeps its
//! index from being reused until the sweep returns (the registry does both
//! by holding the record's lease while it sweeps).
//!
//! Why a sweep is exact whatever instruction the dead process stopped at:
//! every field it can have written names it (lane `p` and the reader rows
//! of record `p` belong to `p` only, WRITER/UPGRADER hold `p + 1`, a bucket
//! lock holds `p + 1`), each is
//! changed by one atomic instruction, and clearing a field that names `p`
//! is right both before and after `p`'s last instruction took effect.

use crate::index;
use crate::layout::RECORD_ROW_ENTRIES;
use crate::region::Region;
use crate::sync::Ordering;

/// What one sweep released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Slots on which the dead process held, claimed or waited, each
    /// counted once (however many reads, biased or not, held it).
    pub slots_released: usize,
    /// Bucket locks it held (an insertion it died in).
    pub buckets_repaired: usize,
}

/// Releases every hold of `dead` in `region`.
pub(crate) fn sweep_process<R: Region + ?Sized>(region: &R, dead: u32) -> SweepReport {
    let mut from_rows = Vec::new();
    sweep_reader_rows_into(region, dead, &mut from_rows);
    from_rows.sort_unstable();
    from_rows.dedup();
    let mut report = SweepReport::default();
    for i in 0..region.geometry().capacity as usize {
        // Both are called for every slot (`|`, not `||`): the slot pass
        // must run even where a row entry already released the slot.
        if region.slot(i).recover_process(dead) | from_rows.binary_search(&i).is_ok() {
            report.slots_released += 1;
        }
    }
    report.buckets_repaired = index::repair_buckets_of(region, dead);
    report
}

/// Zeroes the reader rows of record `dead` (its biased read holds, and
/// publications it made before a re-check it never finished) and wakes the
/// sleepers of each slot an entry held: a revoking writer may sleep on it.
/// Also run on attach, for the record taken (a corrupt file may have left
/// entries in a free record). Returns how many entries held something.
///
/// SeqCst swap: the same Dekker pair as a live reader's release (entry
/// store, then the PARKED check in `wake_if_parked`). An entry value that
/// names no slot (corruption) is cleared without a wake.
pub(crate) fn sweep_reader_rows<R: Region + ?Sized>(region: &R, dead: u32) -> usize {
    let mut slots = Vec::new();
    sweep_reader_rows_into(region, dead, &mut slots)
}

/// `sweep_reader_rows`, also pushing onto `slots` the slot each entry
/// held (repeated per entry: the caller dedups, so that the sweep's report
/// counts a slot once however many reads held it).
fn sweep_reader_rows_into<R: Region + ?Sized>(
    region: &R,
    dead: u32,
    slots: &mut Vec<usize>,
) -> usize {
    let n = RECORD_ROW_ENTRIES as usize;
    let start = dead as usize * n;
    let Some(block) = region.reader_rows().get(start..start + n) else {
        return 0;
    };
    let capacity = region.geometry().capacity as usize;
    let mut released = 0;
    for entry in block {
        if entry.load(Ordering::SeqCst) == 0 {
            continue;
        }
        let held = entry.swap(0, Ordering::SeqCst);
        if held == 0 {
            continue;
        }
        released += 1;
        if let Some(slot) = (held as usize).checked_sub(1).filter(|&i| i < capacity) {
            region.slot(slot).wake_if_parked();
            slots.push(slot);
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockword::{self, Fail, Host, Ident, SlotRef};
    use crate::region::HeapRegion;
    use crate::sync::Ordering;
    use std::time::Duration;

    struct NoHost;
    impl Host for NoHost {
        fn poll_interval(&self) -> Option<Duration> {
            None
        }
        fn me(&self) -> u32 {
            0
        }
        fn recover_process(&self, _: u32) -> bool {
            false
        }
    }

    fn active(region: &HeapRegion, i: usize) -> (SlotRef<'_>, Ident) {
        let slot = region.slot(i);
        slot.state.store(
            lockword::with_gen(0, 1) | lockword::PHASE_ACTIVE,
            Ordering::Relaxed,
        );
        (
            slot,
            Ident {
                gen: 1,
                tag: [0, 0],
            },
        )
    }

    #[test]
    fn a_sweep_releases_exactly_the_dead_processes_holds() {
        let region = HeapRegion::new(16, 3);
        let (a, g) = active(&region, 0);
        let (b, gb) = active(&region, 1);
        // Process 1 reads slot 0 twice and writes slot 1; process 2 reads slot 0.
        a.read(1, None, g, None, &NoHost).unwrap();
        a.read(1, None, g, None, &NoHost).unwrap();
        a.read(2, None, g, None, &NoHost).unwrap();
        b.write(1, gb, None, &NoHost).unwrap();
        let r = sweep_process(&region, 1);
        assert_eq!(r.slots_released, 2);
        // Process 2's read survives, so a writer is still excluded from slot 0.
        assert_eq!(a.write(0, g, None, &NoHost), Err(Fail::Busy));
        // Slot 1 is free again and reports the dead writer once.
        let got = b.write(0, gb, None, &NoHost).unwrap();
        assert!(got.owner_died);
        b.release_write();
        assert!(!b.write(0, gb, None, &NoHost).unwrap().owner_died);
        // A second sweep finds nothing: idempotent.
        assert_eq!(sweep_process(&region, 1), SweepReport::default());
    }

    #[test]
    fn a_sweep_of_an_index_past_the_lanes_clears_the_fields_naming_it() {
        let region = HeapRegion::new(16, 2);
        let (a, g) = active(&region, 0);
        // A corrupt word naming process 40 as the writer.
        a.state.fetch_or(41 << 8, Ordering::Relaxed);
        assert_eq!(a.read(0, None, g, None, &NoHost), Err(Fail::Busy));
        sweep_process(&region, 40);
        assert!(a.read(0, None, g, None, &NoHost).is_ok());
    }

    /// `reap` reports slots released (`locktable reap`: "released N
    /// slot(s)"): a dead process that held one slot through two biased
    /// reads and a lane read released one slot, not three.
    #[test]
    fn a_sweep_counts_each_slot_once_however_the_dead_process_held_it() {
        let region = HeapRegion::new(16, 2);
        let (a, g) = active(&region, 0);
        a.state.fetch_or(lockword::BIASED, Ordering::Relaxed);
        let b1 = a.read(1, Some(0), g, None, &NoHost).unwrap();
        let b2 = a.read(1, Some(0), g, None, &NoHost).unwrap();
        assert!(b1.entry().is_some() && b2.entry().is_some(), "biased reads");
        a.read(1, None, g, None, &NoHost).unwrap();
        let r = sweep_process(&region, 1);
        assert_eq!(r.slots_released, 1);
        // Everything was released: a writer gets in.
        assert!(a.write(0, g, None, &NoHost).is_ok());
    }
}
