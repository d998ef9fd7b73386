//! A per-thread cache of recent ID -> slot lookups.
//!
//! Owns: nothing shared. It remembers, per thread, where the last IDs it
//! locked live (slot index and generation), so that locking the same ID
//! again skips the keyed 128-bit hash and the bucket scan, as PostgreSQL's
//! backend-local lock table skips its shared hash table.
//!
//! May not touch: the table. A hit is only a hint: the acquisition checks
//! the slot's generation after announcing itself, exactly as for a lookup
//! in the table, and a slot that was reused meanwhile reports "stale", which
//! evicts the entry and falls back to the full lookup. So a wrong or stale
//! entry can cost a retry, never a wrong lock.
//!
//! The cache is direct-mapped and indexed by a cheap unkeyed hash of the ID:
//! it lives in one thread's memory, so an attacker who makes IDs collide in
//! it only causes misses (the full, keyed lookup), never shared contention.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

const ENTRIES: usize = 64;
/// IDs longer than this are not cached (they take the full lookup).
pub(crate) const MAX_CACHED_ID: usize = 48;

#[derive(Clone, Copy)]
struct Entry {
    table: u64,
    len: u8,
    id: [u8; MAX_CACHED_ID],
    slot: u32,
    gen: u32,
    tag: [u64; 2],
}

const EMPTY: Entry = Entry {
    table: 0,
    len: 0,
    id: [0; MAX_CACHED_ID],
    slot: 0,
    gen: 0,
    tag: [0; 2],
};

/// Where an ID was found: its slot, the slot's generation then, and the
/// ID's tag (checked against the slot's tag on a hit, so that a generation
/// that wrapped around cannot make a stale hint look valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hint {
    pub(crate) slot: u32,
    pub(crate) gen: u32,
    pub(crate) tag: [u64; 2],
}

thread_local! {
    static CACHE: RefCell<[Entry; ENTRIES]> = const { RefCell::new([EMPTY; ENTRIES]) };
}

/// A process-unique, never reused, non-zero identity for each attachment.
pub(crate) fn new_table_uid() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The first and the last 8 bytes of `id` (overlapping or zero-padded
/// for short IDs), read without a call into libc.
#[inline]
fn ends(id: &[u8]) -> (u64, u64) {
    if id.len() >= 8 {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&id[..8]);
        b.copy_from_slice(&id[id.len() - 8..]);
        (u64::from_le_bytes(a), u64::from_le_bytes(b))
    } else {
        let w = id
            .iter()
            .enumerate()
            .fold(0u64, |w, (i, &b)| w | (b as u64) << (8 * i));
        (w, w)
    }
}

/// Cheap O(1) index: mixes the length, the first and the last 8 bytes.
/// Session-style IDs differ in both; a collision only costs a miss.
#[inline]
fn index_of(table: u64, id: &[u8]) -> usize {
    let (first, last) = ends(id);
    let h = (first ^ table.rotate_left(32) ^ (id.len() as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ last.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    ((h ^ (h >> 32)) as usize) % ENTRIES
}

/// The cached hint for `id` in table `table`, if any.
#[inline]
pub(crate) fn get(table: u64, id: &[u8]) -> Option<Hint> {
    if id.len() > MAX_CACHED_ID {
        return None;
    }
    let i = index_of(table, id);
    CACHE.with(|c| {
        let c = c.borrow();
        let e = &c[i];
        (e.table == table && e.len as usize == id.len() && &e.id[..id.len()] == id).then_some(
            Hint {
                slot: e.slot,
                gen: e.gen,
                tag: e.tag,
            },
        )
    })
}

/// Remembers where `id` lives.
#[inline]
pub(crate) fn put(table: u64, id: &[u8], hint: Hint) {
    if id.len() > MAX_CACHED_ID {
        return;
    }
    let i = index_of(table, id);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let e = &mut c[i];
        e.table = table;
        e.len = id.len() as u8;
        e.id[..id.len()].copy_from_slice(id);
        e.slot = hint.slot;
        e.gen = hint.gen;
        e.tag = hint.tag;
    });
}

/// Forgets `id` (its slot turned out to be stale).
#[inline]
pub(crate) fn evict(table: u64, id: &[u8]) {
    if id.len() > MAX_CACHED_ID {
        return;
    }
    let i = index_of(table, id);
    CACHE.with(|c| c.borrow_mut()[i].table = 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_only_for_the_same_table_and_id() {
        let (a, b) = (new_table_uid(), new_table_uid());
        let h = |slot, gen| Hint {
            slot,
            gen,
            tag: [slot as u64, gen as u64],
        };
        put(a, b"session-1", h(7, 3));
        assert_eq!(get(a, b"session-1"), Some(h(7, 3)));
        assert_eq!(get(b, b"session-1"), None);
        assert_eq!(get(a, b"session-2"), None);
        assert_eq!(get(a, b"session-"), None);
        assert_eq!(get(a, b"session-1x"), None);
        assert_eq!(get(a, b"sessiOn-1"), None);
        let long_id = b"0123456789abcdef0123456789abcdef0123456789abcdef";
        put(a, long_id, h(9, 9));
        assert_eq!(get(a, long_id), Some(h(9, 9)));
        let mut other = *long_id;
        other[20] = b'X';
        assert_eq!(get(a, &other), None);
        evict(a, b"session-1");
        assert_eq!(get(a, b"session-1"), None);
        let long = [1u8; MAX_CACHED_ID + 1];
        put(a, &long, h(1, 1));
        assert_eq!(get(a, &long), None);
    }
}
