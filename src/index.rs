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
//! dies holding it is detected by its waiters (a liveness probe once the
//! spins are over) and swept, and every acquisition's deadline (or try)
//! bounds its wait for a bucket lock.
//!
//! A bucket header also remembers up to three IDs (tags) whose slot was
//! retired while marked OWNER_DIED, so the next writer of such an ID still
//! learns of the death after its slot served other IDs.

use crate::layout::BUCKET_SLOTS;
use crate::lockword::{self, Fail, Host, Ident, Wait, PHASE_ACTIVE, PHASE_FREE};
use crate::region::Region;
use crate::sync::{self, Ordering};

/// Keyed 128-bit tag of an ID. Two IDs share a slot only if their tags
/// collide, which for SipHash-1-3-128 under a secret key needs on the order
/// of 2^64 IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tag(pub(crate) u64, pub(crate) u64);

#[cfg(not(locktable_loom))]
#[inline]
pub(crate) fn tag_of(key: [u64; 2], id: &[u8]) -> Tag {
    // The same SipHash-1-3-128 value as streaming the ID through
    // `siphasher`'s `Hasher::write` (tags are stored in table files, so the
    // value must never change), computed by a one-shot specialisation that
    // reads whole words and inlines its rounds (`sip13.rs`, DESIGN §5).
    let (h1, h2) = crate::sip13::sip13_128(key[0], key[1], id);
    Tag(h1, h2)
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

/// Finds the slot serving `tag` in `bucket`: (slot index, identity).
fn scan<R: Region + ?Sized>(region: &R, bucket: usize, tag: Tag) -> Option<(usize, Ident)> {
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
            return Some((i, ident(lockword::gen(s), tag)));
        }
    }
    None
}

fn ident(gen: u32, tag: Tag) -> Ident {
    Ident {
        gen,
        tag: [tag.0, tag.1],
    }
}

/// Lock-free lookup.
pub(crate) fn find<R: Region + ?Sized>(region: &R, tag: Tag) -> Option<(usize, Ident)> {
    let (b1, b2) = buckets_of(tag, region.geometry().buckets() as usize);
    scan(region, b1, tag).or_else(|| scan(region, b2, tag))
}

/// The slot serving `tag`, given one if it has none. `Ok(None)`: both
/// candidate buckets are full of slots that are held or waited on.
/// `Err(Busy)` (a try) or `Err(Timeout)`: a bucket lock was not free in
/// time (see [`lock_bucket`]).
pub(crate) fn find_or_insert<R: Region + ?Sized>(
    region: &R,
    tag: Tag,
    me: u32,
    host: &dyn Host,
    wait: Wait,
) -> Result<Option<(usize, Ident)>, Fail> {
    if let Some(hit) = find(region, tag) {
        return Ok(Some(hit));
    }
    let (b1, b2) = buckets_of(tag, region.geometry().buckets() as usize);
    let (lo, hi) = (b1.min(b2), b1.max(b2));
    lock_bucket(region, lo, me, host, wait)?;
    if hi != lo {
        if let Err(e) = lock_bucket(region, hi, me, host, wait) {
            unlock_bucket(region, lo);
            return Err(e);
        }
    }
    let result = insert_locked(region, tag, b1, b2);
    if hi != lo {
        unlock_bucket(region, hi);
    }
    unlock_bucket(region, lo);
    Ok(result)
}

fn insert_locked<R: Region + ?Sized>(
    region: &R,
    tag: Tag,
    b1: usize,
    b2: usize,
) -> Option<(usize, Ident)> {
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
    // Prefer the emptier bucket (two-choice balancing), then reuse idle
    // slots, and only then idle slots whose last writer died (their mark
    // moves to the bucket's memory).
    let order = if free_in(b2) > free_in(b1) {
        [b2, b1]
    } else {
        [b1, b2]
    };
    let slots = || order.iter().flat_map(|&b| bucket_slots(b));
    let chosen = slots()
        .find(|&i| lockword::phase(region.slot(i).state.load(Ordering::Acquire)) == PHASE_FREE)
        .or_else(|| slots().find(|&i| retire(region, i, Retire::Unbiased)))
        .or_else(|| slots().find(|&i| retire(region, i, Retire::Idle)))
        .or_else(|| slots().find(|&i| retire(region, i, Retire::OwnerDied)))?;
    let died = forget_death(region, tag, b1) | forget_death(region, tag, b2);
    Some((chosen, install(region, chosen, tag, died)))
}

/// Which idle slots an insertion's retirement pass takes, in the order the
/// passes run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retire {
    /// Idle, not BIASED: retiring it scans no reader rows (and, with
    /// asymmetric fences, issues no `membarrier`).
    Unbiased,
    /// Any idle slot whose last writer did not die.
    Idle,
    /// Idle slots whose last writer died (their mark moves to the bucket).
    OwnerDied,
}

/// Retires slot `i` if it is idle and `pass` takes it. A slot whose last
/// writer died is retired only in the `OwnerDied` pass; its tag then goes
/// to the memory of dead writers of its bucket (one of the ID's two
/// candidates) once it is FREE, so the ID's next insertion brings the mark
/// back.
fn retire<R: Region + ?Sized>(region: &R, i: usize, pass: Retire) -> bool {
    let slot = region.slot(i);
    let s = slot.state.load(Ordering::Acquire);
    let marked = s & lockword::OWNER_DIED != 0;
    let even_owner_died = pass == Retire::OwnerDied;
    if marked != even_owner_died || pass == Retire::Unbiased && s & lockword::BIASED != 0 {
        return false;
    }
    // Read before the retirement: we hold the bucket lock, so the tag
    // cannot change under us, and the insertion overwrites it right after.
    let [t0, t1] = region.slot_tag(i);
    let old = Tag(t0.load(Ordering::Acquire), t1.load(Ordering::Acquire));
    if !slot.try_retire(lockword::gen(s), even_owner_died) {
        return false;
    }
    if marked {
        remember_death(region, i / BUCKET_SLOTS as usize, old);
    }
    true
}

/// Publishes slot `chosen` (FREE, our bucket locks held) for `tag`: tag
/// first (Release), then ACTIVE with GEN + 1 (Release), OWNER_DIED set if
/// the bucket remembered a dead writer of this ID.
fn install<R: Region + ?Sized>(region: &R, chosen: usize, tag: Tag, died: bool) -> Ident {
    let slot = region.slot(chosen);
    let s = slot.state.load(Ordering::Acquire);
    debug_assert_eq!(lockword::phase(s), PHASE_FREE);
    let [t0, t1] = region.slot_tag(chosen);
    t0.store(tag.0, Ordering::Release);
    t1.store(tag.1, Ordering::Release);
    let g = lockword::next_gen(lockword::gen(s));
    // Lanes may hold transient announcements of readers of the previous ID
    // that are backing off; they see the new generation (or tag) and leave.
    let mut active = lockword::with_gen(s & !lockword::PHASE_MASK, g) | PHASE_ACTIVE;
    active &= !STALE_BITS;
    if died {
        active |= lockword::OWNER_DIED;
    }
    slot.state.store(active, Ordering::Release);
    ident(g, tag)
}

/// Entries (128-bit tags) in a bucket's memory of dead writers.
const DEATH_ENTRIES: usize = 3;
/// Bucket word holding the index of the next entry to overwrite.
const DEATH_NEXT: usize = 1 + 2 * DEATH_ENTRIES;

/// Records that `tag`'s last writer died, in `bucket`'s memory (the oldest
/// entry is overwritten when all three are used). Bucket lock held.
/// Relaxed: only bucket-lock holders read or write these words, and the
/// bucket lock (Acquire/Release) orders them.
fn remember_death<R: Region + ?Sized>(region: &R, bucket: usize, tag: Tag) {
    let next = region.bucket_word(bucket, DEATH_NEXT);
    let e = next.load(Ordering::Relaxed) as usize % DEATH_ENTRIES;
    region
        .bucket_word(bucket, 1 + 2 * e)
        .store(tag.0, Ordering::Relaxed);
    region
        .bucket_word(bucket, 2 + 2 * e)
        .store(tag.1, Ordering::Relaxed);
    next.store(((e + 1) % DEATH_ENTRIES) as u64, Ordering::Relaxed);
}

/// True if `bucket` remembered a dead writer of `tag`; forgets it (every
/// copy). Bucket lock held.
fn forget_death<R: Region + ?Sized>(region: &R, tag: Tag, bucket: usize) -> bool {
    if tag == Tag(0, 0) {
        return false; // the value of an empty entry (a 2^-128 tag)
    }
    let mut found = false;
    for e in 0..DEATH_ENTRIES {
        let lo = region.bucket_word(bucket, 1 + 2 * e);
        let hi = region.bucket_word(bucket, 2 + 2 * e);
        if lo.load(Ordering::Relaxed) == tag.0 && hi.load(Ordering::Relaxed) == tag.1 {
            lo.store(0, Ordering::Relaxed);
            hi.store(0, Ordering::Relaxed);
            found = true;
        }
    }
    found
}

/// Model checking: retires slot `i` (if idle, even with OWNER_DIED) and
/// installs `tag` in it at once, under its bucket lock, as an insertion that
/// needs room does. Models use it to reuse one slot again and again (a
/// generation wrap) without filling a table.
#[cfg(locktable_loom)]
pub(crate) fn reuse_slot_for_model<R: Region + ?Sized>(
    region: &R,
    i: usize,
    tag: Tag,
    me: u32,
    host: &dyn Host,
) -> Option<Ident> {
    let bucket = i / BUCKET_SLOTS as usize;
    lock_bucket(region, bucket, me, host, Some(None)).ok()?;
    let s = region.slot(i).state.load(Ordering::Acquire);
    let done = (lockword::phase(s) == PHASE_FREE
        || retire(region, i, Retire::Idle)
        || retire(region, i, Retire::OwnerDied))
    .then(|| {
        let died = forget_death(region, tag, bucket);
        install(region, i, tag, died)
    });
    unlock_bucket(region, bucket);
    done
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
/// Yields after the spins before a waiter starts to sleep between checks.
#[cfg(not(locktable_loom))]
const BUCKET_YIELDS: u32 = 100;
#[cfg(locktable_loom)]
const BUCKET_YIELDS: u32 = 1;
/// Longest sleep between two looks at a bucket lock that stays held.
const BUCKET_MAX_NAP: std::time::Duration = std::time::Duration::from_millis(1);

/// Takes a bucket lock within the acquisition's `wait`. Holds are a few
/// dozen instructions long, so this spins, then yields, then sleeps in
/// short naps (it never busy-waits on a holder that stays). A holder that
/// stays past the spins is examined: a word naming no possible process
/// (corruption) is repaired at once; a process that is not us is probed
/// for liveness at once, then once per poll interval, and a dead one is
/// swept (which repairs its buckets). A try gives up with `Busy` after its
/// spins, yields and one probe; a timed wait gives up with `Timeout` at its
/// deadline.
fn lock_bucket<R: Region + ?Sized>(
    region: &R,
    bucket: usize,
    me: u32,
    host: &dyn Host,
    wait: Wait,
) -> Result<(), Fail> {
    let word = region.bucket_lock(bucket);
    let mine = me as u64 + 1;
    let mut tries = 0u32;
    let mut next_probe: Option<sync::Instant> = None;
    let mut nap = std::time::Duration::from_micros(10);
    loop {
        let cur = word.load(Ordering::Relaxed);
        if cur == 0
            && word
                .compare_exchange(0, mine, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return Ok(());
        }
        tries += 1;
        if tries < BUCKET_SPINS {
            sync::spin_hint();
            continue;
        }
        if cur > region.geometry().max_processes as u64 {
            // No process can have this index: a corrupt word. Repair.
            repair_buckets_locked_by(region, cur);
            continue;
        }
        let now = sync::now();
        let probe_due = match next_probe {
            None => true,
            Some(t) => now >= t,
        };
        if cur != 0 && cur != mine && probe_due {
            // Without a poll interval (models only) the holder is probed once.
            let never = now.checked_add(std::time::Duration::from_secs(u32::MAX as u64));
            next_probe = host.poll_interval().map_or(never, |p| now.checked_add(p));
            if host.recover_process((cur - 1) as u32) {
                continue;
            }
        }
        match wait {
            None if tries >= BUCKET_SPINS + BUCKET_YIELDS => return Err(Fail::Busy),
            Some(Some(deadline)) if now >= deadline => return Err(Fail::Timeout),
            _ => {}
        }
        if tries < BUCKET_SPINS + BUCKET_YIELDS || wait.is_none() {
            sync::yield_now();
        } else {
            let left = match wait {
                Some(Some(d)) => d.saturating_duration_since(now),
                _ => BUCKET_MAX_NAP,
            };
            sync::pause(nap.min(left));
            nap = (nap * 2).min(BUCKET_MAX_NAP);
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

    /// Tags live in table files shared with other processes and builds:
    /// the one-shot hash must equal the streaming one for every ID length.
    #[test]
    fn the_tag_is_the_streamed_siphash_13_128_of_the_id() {
        use siphasher::sip128::{Hasher128, SipHasher13};
        use std::hash::Hasher;
        let key = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        let bytes: Vec<u8> = (0..=255u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
        for len in 0..=bytes.len() {
            let id = &bytes[..len];
            let mut h = SipHasher13::new_with_keys(key[0], key[1]);
            h.write(id);
            let v = h.finish128();
            assert_eq!(tag_of(key, id), Tag(v.h1, v.h2), "length {len}");
        }
    }
}
