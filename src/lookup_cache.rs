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
//! The cache is set-associative: 64 sets of 8 ways (512 IDs per thread),
//! so a thread that cycles through a few hundred IDs (a server thread
//! serving many sessions) still hits. A set keeps one cache line of
//! fingerprints (a 64-bit hash of the attachment and the ID, never 0 for a
//! used way), so a probe reads one line and then compares the full ID of
//! the way whose fingerprint matches; a fingerprint is only a filter, the
//! full ID decides. A fill takes an empty way, else replaces the ways of its set round-robin. The index hash
//! is cheap and unkeyed: the cache lives in one thread's memory, so an
//! attacker who makes IDs collide in it only causes misses (the full, keyed
//! lookup), never shared contention. The sets are allocated on a thread's
//! first lock (about 45 KiB), so threads that never lock pay nothing.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

const WAYS: usize = 8;
const SETS: usize = 64;
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

/// One set: the fingerprints first, on their own cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Set {
    /// 0: an empty way.
    fps: [u64; WAYS],
    ways: [Entry; WAYS],
    /// The way the next fill of this set replaces.
    next: u8,
}

const EMPTY_SET: Set = Set {
    fps: [0; WAYS],
    ways: [EMPTY; WAYS],
    next: 0,
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
    static CACHE: RefCell<Option<Box<[Set]>>> = const { RefCell::new(None) };
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

/// Cheap O(1) hash: mixes the attachment, the length, the first and the
/// last 8 bytes. Session-style IDs differ in both; a collision only costs a
/// miss or a full-ID compare. Returns (set, fingerprint != 0).
#[inline]
fn locate(table: u64, id: &[u8]) -> (usize, u64) {
    let (first, last) = ends(id);
    let h = (first ^ table.rotate_left(32) ^ (id.len() as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ last.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let h = h ^ (h >> 29);
    ((h as usize) % SETS, h | 1)
}

#[inline]
fn holds(e: &Entry, table: u64, id: &[u8]) -> bool {
    e.table == table && e.len as usize == id.len() && &e.id[..id.len()] == id
}

/// The way of `set` holding `id` of `table`, if any.
#[inline]
fn way_of(set: &Set, fp: u64, table: u64, id: &[u8]) -> Option<usize> {
    (0..WAYS).find(|&w| set.fps[w] == fp && holds(&set.ways[w], table, id))
}

/// Runs `f` on this thread's sets, allocating them on first use.
#[inline]
fn with_sets<T>(f: impl FnOnce(&mut [Set]) -> T) -> T {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let sets = c.get_or_insert_with(|| vec![EMPTY_SET; SETS].into_boxed_slice());
        f(sets)
    })
}

/// Where `id` of table `table` belongs in the cache: computed once per
/// acquisition and reused by the refill and the eviction, so a miss hashes
/// the ID for the cache only once. `None`: the ID is too long to cache.
#[derive(Clone, Copy)]
pub(crate) struct Key {
    table: u64,
    set: usize,
    fp: u64,
}

#[inline]
pub(crate) fn key(table: u64, id: &[u8]) -> Option<Key> {
    if id.len() > MAX_CACHED_ID {
        return None;
    }
    let (set, fp) = locate(table, id);
    Some(Key { table, set, fp })
}

/// The cached hint for `id` (whose key is `k`), if any.
#[inline]
pub(crate) fn get(k: &Key, id: &[u8]) -> Option<Hint> {
    with_sets(|sets| {
        let set = &sets[k.set];
        way_of(set, k.fp, k.table, id).map(|w| {
            let e = &set.ways[w];
            Hint {
                slot: e.slot,
                gen: e.gen,
                tag: e.tag,
            }
        })
    })
}

/// Remembers where `id` lives (in place if it is cached already).
#[inline]
pub(crate) fn put(k: &Key, id: &[u8], hint: Hint) {
    with_sets(|sets| {
        let set = &mut sets[k.set];
        let w = way_of(set, k.fp, k.table, id)
            .or_else(|| set.fps.iter().position(|&f| f == 0))
            .unwrap_or_else(|| {
                let w = set.next as usize;
                set.next = ((w + 1) % WAYS) as u8;
                w
            });
        set.fps[w] = k.fp;
        let e = &mut set.ways[w];
        e.table = k.table;
        e.len = id.len() as u8;
        e.id[..id.len()].copy_from_slice(id);
        e.slot = hint.slot;
        e.gen = hint.gen;
        e.tag = hint.tag;
    });
}

/// Forgets `id` (its slot turned out to be stale).
#[inline]
pub(crate) fn evict(k: &Key, id: &[u8]) {
    with_sets(|sets| {
        let set = &mut sets[k.set];
        if let Some(w) = way_of(set, k.fp, k.table, id) {
            set.fps[w] = 0;
            set.ways[w].table = 0;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(table: u64, id: &[u8]) -> Option<Hint> {
        key(table, id).and_then(|k| super::get(&k, id))
    }
    fn put(table: u64, id: &[u8], hint: Hint) {
        if let Some(k) = key(table, id) {
            super::put(&k, id, hint)
        }
    }
    fn evict(table: u64, id: &[u8]) {
        if let Some(k) = key(table, id) {
            super::evict(&k, id)
        }
    }

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

    #[test]
    fn a_thread_cycling_through_hundreds_of_ids_keeps_most_of_them() {
        let t = new_table_uid();
        let ids: Vec<String> = (0..256)
            .map(|i| format!("sess-{i:08x}-{:016x}", i * 7919))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            put(
                t,
                id.as_bytes(),
                Hint {
                    slot: i as u32,
                    gen: 1,
                    tag: [i as u64, 0],
                },
            );
        }
        let hits = ids
            .iter()
            .enumerate()
            .filter(|(i, id)| get(t, id.as_bytes()).map(|h| h.slot) == Some(*i as u32))
            .count();
        // 256 IDs in 64 sets of 8: only sets with more than 8 IDs lose any.
        assert!(hits >= 240, "{hits} of 256 hit");
        // A hit never returns another ID's hint, and a refill replaces in place.
        put(
            t,
            ids[3].as_bytes(),
            Hint {
                slot: 999,
                gen: 2,
                tag: [9, 9],
            },
        );
        assert_eq!(get(t, ids[3].as_bytes()).unwrap().slot, 999);
        evict(t, ids[3].as_bytes());
        assert_eq!(get(t, ids[3].as_bytes()), None);
    }

    #[test]
    fn a_full_set_replaces_its_ways_in_turn() {
        let t = new_table_uid();
        // IDs that land in one set (found by search; the hash is fixed).
        let same_set: Vec<String> = (0..100_000)
            .map(|i| format!("id-{i}"))
            .filter(|id| locate(t, id.as_bytes()).0 == 0)
            .take(WAYS + 1)
            .collect();
        for (i, id) in same_set.iter().enumerate() {
            put(
                t,
                id.as_bytes(),
                Hint {
                    slot: i as u32,
                    gen: 0,
                    tag: [0; 2],
                },
            );
        }
        // The ninth replaced the first; the other eight are all there.
        assert_eq!(get(t, same_set[0].as_bytes()), None);
        for (i, id) in same_set.iter().enumerate().skip(1) {
            assert_eq!(get(t, id.as_bytes()).map(|h| h.slot), Some(i as u32));
        }
    }
}
