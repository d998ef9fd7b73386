//! The ID index: which slot serves which ID.
//!
//! Owns: the keyed 128-bit tag of an ID, the two candidate buckets of a tag,
//! lock-free lookup, and insertion / slot reuse under the bucket locks.
//!
//! May not touch: lock modes (it only retires slots that the lock word says
//! are idle, through [`SlotRef::try_retire`]).
//!
//! Slots are grouped in buckets of [`BUCKET_SLOTS`]. An ID may live in one of
//! two buckets chosen by its tag ("two choices": the fuller bucket of a pair
//! is rarely full). Lookups scan both buckets without locking and return the
//! slot's generation; the caller's acquisition re-checks that generation
//! after announcing itself, so a slot reused meanwhile is detected
//! ("stale": look up again). Insertions take the bucket locks of both
//! candidates (lower index first), so one ID never gets two slots.
//! A bucket lock word holds the owner's process index + 1; a process that
//! dies holding it is detected by the spinning waiters and swept.

use crate::layout::BUCKET_SLOTS;
use crate::lockword::{self, Host, PHASE_ACTIVE, PHASE_FREE};
use crate::region::Region;
use crate::sync::{self, Ordering};

/// Keyed 128-bit tag of an ID. Two IDs share a slot only if their tags
/// collide, which for SipHash-1-3-128 under a secret key needs on the order
/// of 2^64 IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tag(pub(crate) u64, pub(crate) u64);

#[cfg(not(locktable_loom))]
pub(crate) fn tag_of(key: [u64; 2], id: &[u8]) -> Tag {
    use siphasher::sip128::{Hasher128, SipHasher13};
    use std::hash::Hasher;
    let mut h = SipHasher13::new_with_keys(key[0], key[1]);
    h.write(id);
    let v = h.finish128();
    Tag(v.h1, v.h2)
}

/// Maps a uniformly random 64-bit value onto `0..n` with a multiply and a
/// shift instead of a division (Lemire's "fastrange").
#[inline]
fn reduce(x: u64, n: usize) -> usize {
    ((x as u128 * n as u128) >> 64) as usize
}

/// The two candidate buckets of a tag (distinct when there are two or more).
#[inline]
pub(crate) fn buckets_of(tag: Tag, buckets: usize) -> (usize, usize) {
    let b1 = reduce(tag.0, buckets);
    let mut b2 = reduce(tag.1, buckets);
    if b2 == b1 {
        b2 = (b1 + 1) % buckets;
    }
    (b1, b2)
}

fn bucket_slots(bucket: usize) -> std::ops::Range<usize> {
    let first = bucket * BUCKET_SLOTS as usize;
    first..first + BUCKET_SLOTS as usize
}

/// Finds the slot serving `tag` in `bucket`: (slot index, generation).
fn scan<R: Region + ?Sized>(region: &R, bucket: usize, tag: Tag) -> Option<(usize, u32)> {
    for i in bucket_slots(bucket) {
        let s = region.slot(i).state.load(Ordering::Acquire);
        if lockword::phase(s) != PHASE_ACTIVE {
            continue;
        }
        // Acquire pairs with the Release stores of an inserter: if we read a
        // tag written after a retirement, the caller's later state check sees
        // that retirement (and so a generation mismatch).
        let [t0, t1] = region.slot_tag(i);
        if t0.load(Ordering::Acquire) == tag.0 && t1.load(Ordering::Acquire) == tag.1 {
            return Some((i, lockword::gen(s)));
        }
    }
    None
}

/// Lock-free lookup.
pub(crate) fn find<R: Region + ?Sized>(region: &R, tag: Tag) -> Option<(usize, u32)> {
    let (b1, b2) = buckets_of(tag, region.geometry().buckets() as usize);
    scan(region, b1, tag).or_else(|| scan(region, b2, tag))
}

/// The slot serving `tag`, given one if it has none. `None`: both candidate
/// buckets are full of slots that are held or waited on.
pub(crate) fn find_or_insert<R: Region + ?Sized>(
    region: &R,
    tag: Tag,
    me: u32,
    host: &dyn Host,
) -> Option<(usize, u32)> {
    if let Some(hit) = find(region, tag) {
        return Some(hit);
    }
    let (b1, b2) = buckets_of(tag, region.geometry().buckets() as usize);
    let (lo, hi) = (b1.min(b2), b1.max(b2));
    lock_bucket(region, lo, me, host);
    if hi != lo {
        lock_bucket(region, hi, me, host);
    }
    let result = insert_locked(region, tag, b1, b2);
    if hi != lo {
        unlock_bucket(region, hi);
    }
    unlock_bucket(region, lo);
    result
}

fn insert_locked<R: Region + ?Sized>(
    region: &R,
    tag: Tag,
    b1: usize,
    b2: usize,
) -> Option<(usize, u32)> {
    if let Some(hit) = scan(region, b1, tag).or_else(|| scan(region, b2, tag)) {
        return Some(hit);
    }
    let free_in = |b: usize| {
        bucket_slots(b)
            .filter(|&i| {
                lockword::phase(region.slot(i).state.load(Ordering::Acquire)) == PHASE_FREE
            })
            .count()
    };
    // Prefer the emptier bucket (two-choice balancing), then reuse idle slots.
    let order = if free_in(b2) > free_in(b1) {
        [b2, b1]
    } else {
        [b1, b2]
    };
    let chosen = order
        .iter()
        .flat_map(|&b| bucket_slots(b))
        .find(|&i| lockword::phase(region.slot(i).state.load(Ordering::Acquire)) == PHASE_FREE)
        .or_else(|| {
            order.iter().flat_map(|&b| bucket_slots(b)).find(|&i| {
                let slot = region.slot(i);
                let s = slot.state.load(Ordering::Acquire);
                slot.try_retire(lockword::gen(s))
            })
        })?;
    let slot = region.slot(chosen);
    let s = slot.state.load(Ordering::Acquire);
    debug_assert_eq!(lockword::phase(s), PHASE_FREE);
    let [t0, t1] = region.slot_tag(chosen);
    t0.store(tag.0, Ordering::Release);
    t1.store(tag.1, Ordering::Release);
    let g = lockword::next_gen(lockword::gen(s));
    // Lanes may hold transient announcements of readers of the previous ID
    // that are backing off; they see the new generation and leave.
    let active = lockword::with_gen(s & !lockword::PHASE_MASK, g) | PHASE_ACTIVE;
    slot.state.store(active & !STALE_BITS, Ordering::Release);
    Some((chosen, g))
}

/// Bits that never carry over to a slot's next ID.
const STALE_BITS: u64 = lockword::PARKED
    | lockword::WRITE_LOCKED
    | lockword::WRITER_WAITING
    | lockword::OWNER_DIED
    | lockword::WRITER_MASK
    | lockword::UPGRADER_MASK;

#[cfg(not(locktable_loom))]
const BUCKET_SPINS: u32 = 100;
#[cfg(locktable_loom)]
const BUCKET_SPINS: u32 = 0;

/// Takes a bucket lock. Holds are a few dozen instructions long, so this
/// spins, then yields; a holder that stays longer than a poll interval is
/// checked for liveness (a dead holder is swept, which releases the lock).
fn lock_bucket<R: Region + ?Sized>(region: &R, bucket: usize, me: u32, host: &dyn Host) {
    let word = region.bucket_lock(bucket);
    let mine = me as u64 + 1;
    let mut spins = 0u32;
    let mut since = None;
    loop {
        let cur = word.load(Ordering::Relaxed);
        if cur == 0
            && word
                .compare_exchange(0, mine, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return;
        }
        spins += 1;
        if spins < BUCKET_SPINS {
            sync::spin_hint();
            continue;
        }
        #[cfg(not(locktable_loom))]
        std::thread::yield_now();
        #[cfg(locktable_loom)]
        loom::thread::yield_now();
        if cur != 0 {
            // Owner index (cur - 1) past the registry:
            if cur > region.geometry().max_processes as u64 {
                // No process can have this index: a corrupt word. Repair.
                repair_buckets_locked_by(region, cur);
                continue;
            }
            if let Some(poll) = host.poll_interval() {
                let now = sync::now();
                let start = *since.get_or_insert(now);
                if now.saturating_duration_since(start) >= poll {
                    host.recover_process((cur - 1) as u32);
                    since = Some(now);
                }
            }
        }
    }
}

fn unlock_bucket<R: Region + ?Sized>(region: &R, bucket: usize) {
    region.bucket_lock(bucket).store(0, Ordering::Release);
}

/// Repairs the buckets whose lock the dead process `dead` held: a slot it
/// left RETIRING goes back to ACTIVE with the same generation. The dead
/// retirer may not have scanned the lanes yet, so a reader may still hold
/// the slot; giving it back to its ID is right either way (an idle slot is
/// simply retired again later).
pub(crate) fn repair_buckets_of<R: Region + ?Sized>(region: &R, dead: u32) -> usize {
    repair_buckets_locked_by(region, dead as u64 + 1)
}

/// Repairs every bucket whose lock word equals `owner_word` (a dead
/// process's index + 1, or a value no process can have).
fn repair_buckets_locked_by<R: Region + ?Sized>(region: &R, owner_word: u64) -> usize {
    let mut repaired = 0;
    for b in 0..region.geometry().buckets() as usize {
        let word = region.bucket_lock(b);
        if word.load(Ordering::Acquire) != owner_word {
            continue;
        }
        for i in bucket_slots(b) {
            let slot = region.slot(i);
            if lockword::phase(slot.state.load(Ordering::Acquire)) == lockword::PHASE_RETIRING {
                slot.abandon_retirement();
            }
        }
        if word
            .compare_exchange(owner_word, 0, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            repaired += 1;
        }
    }
    repaired
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_buckets_are_distinct_and_in_range() {
        for n in [2usize, 3, 8, 512] {
            for t in 0..1000u64 {
                let x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let (a, b) = buckets_of(Tag(x, x.rotate_left(17)), n);
                assert!(a < n && b < n && a != b);
            }
        }
    }

    #[test]
    fn tags_depend_on_the_key() {
        let a = tag_of([1, 2], b"session-1");
        let b = tag_of([1, 3], b"session-1");
        let c = tag_of([1, 2], b"session-2");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, tag_of([1, 2], b"session-1"));
    }
}
