//! Recovery: releasing exactly the holds of a dead process.
//!
//! Owns: the sweep of one dead process index over the whole region (its
//! lanes, WRITER/UPGRADER claims and bucket locks in every slot and bucket).
//!
//! May not touch: liveness. The caller proves the process dead and keeps its
//! index from being reused until the sweep returns (the registry does both
//! by holding the record's lease while it sweeps).
//!
//! Why a sweep is exact whatever instruction the dead process stopped at:
//! every field it can have written names it (lane `p` belongs to `p` only,
//! WRITER/UPGRADER hold `p + 1`, a bucket lock holds `p + 1`), each is
//! changed by one atomic instruction, and clearing a field that names `p`
//! is right both before and after `p`'s last instruction took effect.

use crate::index;
use crate::region::Region;

/// What one sweep released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Slots on which the dead process held, claimed or waited.
    pub slots_released: usize,
    /// Bucket locks it held (an insertion it died in).
    pub buckets_repaired: usize,
}

/// Releases every hold of `dead` in `region`.
pub(crate) fn sweep_process<R: Region + ?Sized>(region: &R, dead: u32) -> SweepReport {
    let mut report = SweepReport::default();
    for i in 0..region.geometry().capacity as usize {
        if region.slot(i).recover_process(dead) {
            report.slots_released += 1;
        }
    }
    report.buckets_repaired = index::repair_buckets_of(region, dead);
    report
}
