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
//! full ID decides (word by word: IDs are stored as zero-padded 8-byte
//! words, so neither the compare nor the fill calls into libc). A fill
//! takes an empty way, else replaces the ways of its set round-robin.
//!
//! An acquisition visits the cache once: on a miss, the caller's lock-free
//! table lookup runs inside the visit and its result fills the way the
//! probe chose ([`get_or_fill`]); only an ID that must be inserted into the
//! table is filled in a second visit ([`put`]). A visit made while another is in progress further up the same thread's
//! stack (a re-entrant acquisition) goes without the cache.
//!
//! The index hash is cheap and unkeyed: the cache lives in one thread's
//! memory, so an attacker who makes IDs collide in it only causes misses
//! (the full, keyed lookup), never shared contention. The sets are
//! allocated on a thread's first lock (about 52 KiB), so threads that
//! never lock pay nothing.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

const WAYS: usize = 8;
const SETS: usize = 64;
/// IDs longer than this are not cached (they take the full lookup).
pub(crate) const MAX_CACHED_ID: usize = 48;
/// An ID as stored in an entry: little-endian 8-byte words, the last one
/// zero-padded, so that a probe compares whole words instead of calling
/// `memcmp`, and a fill writes them instead of calling `memcpy`.
const ID_WORDS: usize = MAX_CACHED_ID / 8;

#[derive(Clone, Copy)]
struct Entry {
    table: u64,
    len: u32,
    slot: u32,
    gen: u32,
    tag: [u64; 2],
    id: [u64; ID_WORDS],
}

const EMPTY: Entry = Entry {
    table: 0,
    len: 0,
    slot: 0,
    gen: 0,
    tag: [0; 2],
    id: [0; ID_WORDS],
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

impl Entry {
    #[inline(always)]
    fn hint(&self) -> Hint {
        Hint {
            slot: self.slot,
            gen: self.gen,
            tag: self.tag,
        }
    }
}

thread_local! {
    static CACHE: RefCell<Option<Box<[Set]>>> = const { RefCell::new(None) };
}

/// A process-unique, never reused, non-zero identity for each attachment.
pub(crate) fn new_table_uid() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The 8 bytes of `id` from `at` as a little-endian word, zero-padded past
/// the end (`at < id.len()`).
#[inline(always)]
fn word_at(id: &[u8], at: usize) -> u64 {
    let rest = &id[at..];
    if rest.len() >= 8 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&rest[..8]);
        u64::from_le_bytes(w)
    } else {
        rest.iter()
            .enumerate()
            .fold(0u64, |w, (i, &b)| w | (b as u64) << (8 * i))
    }
}

/// The first and the last 8 bytes of `id` (overlapping or zero-padded
/// for short IDs), read without a call into libc.
#[inline]
fn ends(id: &[u8]) -> (u64, u64) {
    if id.len() >= 8 {
        (word_at(id, 0), word_at(id, id.len() - 8))
    } else {
        let w = word_at(id, 0);
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

/// True if `e` holds `id` of `table`: the table, the length, then the ID
/// word by word (both sides zero-padded the same way, so equal words mean
/// equal bytes).
#[inline(always)]
fn holds(e: &Entry, table: u64, id: &[u8]) -> bool {
    e.table == table && e.len as usize == id.len() && id_words_equal(&e.id, id)
}

/// True if the stored words are `id`'s (`id.len() <= MAX_CACHED_ID`).
#[inline(always)]
fn id_words_equal(stored: &[u64; ID_WORDS], id: &[u8]) -> bool {
    // Whole words first, folded into one difference (no branch per word),
    // then the zero-padded tail.
    let mut chunks = id.chunks_exact(8);
    let mut diff = 0u64;
    for (s, c) in stored.iter().zip(&mut chunks) {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        diff |= s ^ u64::from_le_bytes(w);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        diff |= stored[(id.len() / 8).min(ID_WORDS - 1)] ^ word_at(tail, 0);
    }
    diff == 0
}

/// The way of `set` holding `id` of `table`, if any.
#[inline(always)]
fn way_of(set: &Set, fp: u64, table: u64, id: &[u8]) -> Option<usize> {
    let mut w = 0;
    while w < WAYS {
        if set.fps[w] == fp && holds(&set.ways[w], table, id) {
            return Some(w);
        }
        w += 1;
    }
    None
}

/// The way a fill of `set` takes when the ID is not there: an empty one,
/// else the next in turn.
#[inline(always)]
fn victim(set: &Set) -> usize {
    let mut w = 0;
    while w < WAYS {
        if set.fps[w] == 0 {
            return w;
        }
        w += 1;
    }
    set.next as usize
}

/// Runs `f` on this thread's sets, allocating them on first use. `None`
/// (the caller goes without the cache) when the sets are in use further
/// up this thread's stack, or during the thread's exit once they are gone.
///
/// The thread-local is reached with a closure that only returns its
/// address, so that `LocalKey::with` inlines to a plain thread-local
/// access (with the whole probe inside the closure the compiler kept it
/// out of line, behind an indirect call).
#[inline(always)]
fn with_sets<T>(f: impl FnOnce(&mut [Set]) -> T) -> Option<T> {
    let cell: *const RefCell<Option<Box<[Set]>>> = CACHE.try_with(|c| c as *const _).ok()?;
    // The pointer is to this thread's own thread-local, which `try_with`
    // just found alive; it stays alive until the thread's thread-local
    // destructors run, which cannot happen before this call returns (it
    // runs on this thread and does not exit it).
    // SAFETY: sound for the reasons just given.
    let cell = unsafe { &*cell };
    let mut sets = cell.try_borrow_mut().ok()?;
    Some(f(sets.get_or_insert_with(|| {
        vec![EMPTY_SET; SETS].into_boxed_slice()
    })))
}

/// Where `id` of table `table` belongs in the cache: computed once per
/// acquisition and reused by the refill and the eviction, so a miss hashes
/// the ID for the cache only once. `None`: the ID is too long to cache.
///
/// A probe that misses also records the way the refill will take, so the
/// refill writes the entry without scanning the set again. The way is
/// only a choice: if the set changed meanwhile (the thread locked other
/// IDs in between), the refill overwrites whatever that way holds, which
/// costs the other ID a miss at worst, never a wrong hint.
#[derive(Clone, Copy)]
pub(crate) struct Key {
    table: u64,
    set: usize,
    fp: u64,
    /// The way a refill takes (set by a probe that missed or an eviction).
    fill: Option<u8>,
}

#[inline]
pub(crate) fn key(table: u64, id: &[u8]) -> Option<Key> {
    if id.len() > MAX_CACHED_ID {
        return None;
    }
    let (set, fp) = locate(table, id);
    Some(Key {
        table,
        set,
        fp,
        fill: None,
    })
}

/// The cached hint for `id`, or on a miss the hint `miss` finds (a
/// lock-free lookup in the table), which fills the cache at once: one
/// visit to this thread's cache per acquisition, hit or miss.
#[inline]
pub(crate) fn get_or_fill(
    k: &mut Key,
    id: &[u8],
    miss: impl FnOnce() -> Option<Hint>,
) -> Option<Hint> {
    with_sets(|sets| {
        let set = &mut sets[k.set];
        if let Some(w) = way_of(set, k.fp, k.table, id) {
            return Some(set.ways[w].hint());
        }
        let w = choose_refill(set, k);
        let hint = miss()?;
        fill(set, w, k, id, hint);
        Some(hint)
    })
    .flatten()
}

/// What [`probe`] found.
pub(crate) enum Probe {
    /// The cached hint.
    Hit(Hint),
    /// Not cached: where it goes, with the way its refill ([`put`]) takes
    /// already chosen (and its lines prefetched), so the refill does not
    /// scan the set again.
    Miss(Key),
    /// Not cacheable (too long), or the cache is unavailable (a visit
    /// further up this thread's stack, or thread exit).
    Uncached,
}

/// The acquisition's fast path: looks `id` of `table` up in this thread's
/// cache (the full path, [`get_or_fill`], falls back on anything else).
#[inline(always)]
pub(crate) fn probe(table: u64, id: &[u8]) -> Probe {
    if id.len() > MAX_CACHED_ID {
        return Probe::Uncached;
    }
    let (set, fp) = locate(table, id);
    // Inline, not through `with_sets`: a shared borrow, and no allocation
    // (a thread without sets takes the full path, which allocates them).
    let Ok(cell) = CACHE.try_with(|c| c as *const RefCell<Option<Box<[Set]>>>) else {
        return Probe::Uncached;
    };
    // As in `with_sets`: this thread's own live thread-local, which
    // outlives this call.
    // SAFETY: sound for the reasons just given.
    let cell = unsafe { &*cell };
    let Ok(sets) = cell.try_borrow() else {
        return Probe::Uncached;
    };
    let Some(s) = sets.as_deref().and_then(|sets| sets.get(set)) else {
        return Probe::Uncached;
    };
    match way_of(s, fp, table, id) {
        Some(w) => Probe::Hit(s.ways[w].hint()),
        None => Probe::Miss(missed(s, table, set, fp)),
    }
}

/// A probe of `set` missed: the key with the way its refill takes, whose
/// lines are prefetched meanwhile (as in [`get_or_fill`]).
#[cold]
#[inline(never)]
fn missed(s: &Set, table: u64, set: usize, fp: u64) -> Key {
    let mut k = Key {
        table,
        set,
        fp,
        fill: None,
    };
    choose_refill(s, &mut k);
    k
}

/// Chooses the way of `set` that the refill for `k` takes (recorded in
/// `k`) and prefetches its lines.
#[inline(always)]
fn choose_refill(set: &Set, k: &mut Key) -> usize {
    let w = victim(set);
    k.fill = Some(w as u8);
    prefetch_entry(&set.ways[w]);
    w
}

/// Asks the CPU to bring the lines of entry `e` into L1 (a hint: no
/// access, no effect on what any load or store sees), so that the refill
/// after the table lookup stores into lines already there. On a miss, the
/// way a refill takes has not been read (the probe read only the
/// fingerprint line), and the lock word's read-modify-write that follows
/// the refill cannot execute before the refill's stores are in L1: without
/// the hint it waits for the entry's lines to arrive from L2 or further
/// after the lookup; with it they arrive during the tag's hash and the
/// bucket scan.
#[inline(always)]
fn prefetch_entry(e: &Entry) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = e as *const Entry as *const i8;
        const SIZE: usize = std::mem::size_of::<Entry>();
        // An entry spans at most 3 lines; points at most 64 bytes apart
        // from its first to its last byte touch every one of them.
        const _: () = assert!(SIZE <= 128);
        // `_mm_prefetch` is a hint: it never faults (even on an invalid
        // address) and reads or writes nothing the program can observe;
        // SSE is part of the x86_64 baseline. The addresses are inside
        // `*e` anyway (offsets 0, SIZE / 2 and SIZE - 1).
        // SAFETY: sound for the reasons just given.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(SIZE / 2));
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(SIZE - 1));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = e;
}

/// Writes `id`'s entry into way `w` of `set` (advancing the set's turn if
/// that way was the next to replace).
#[inline(always)]
fn fill(set: &mut Set, w: usize, k: &Key, id: &[u8], hint: Hint) {
    if set.fps[w] != 0 && w == set.next as usize {
        set.next = ((w + 1) % WAYS) as u8;
    }
    set.fps[w] = k.fp;
    let e = &mut set.ways[w];
    e.table = k.table;
    e.len = id.len() as u32;
    let mut at = 0;
    while at < id.len() {
        e.id[at / 8] = word_at(id, at);
        at += 8;
    }
    e.slot = hint.slot;
    e.gen = hint.gen;
    e.tag = hint.tag;
}

/// Remembers where `id` lives: in the way its probe chose, else in place
/// if it is cached already, else in an empty way or the next in turn.
#[inline]
pub(crate) fn put(k: &Key, id: &[u8], hint: Hint) {
    with_sets(|sets| {
        let set = &mut sets[k.set];
        let w = match k.fill {
            Some(w) => w as usize,
            None => way_of(set, k.fp, k.table, id).unwrap_or_else(|| victim(set)),
        };
        fill(set, w, k, id, hint);
    });
}

/// Forgets `id` (its slot turned out to be stale); the refill that follows
/// takes its way.
#[inline]
pub(crate) fn evict(k: &mut Key, id: &[u8]) {
    with_sets(|sets| {
        let set = &mut sets[k.set];
        if let Some(w) = way_of(set, k.fp, k.table, id) {
            set.fps[w] = 0;
            set.ways[w].table = 0;
            k.fill = Some(w as u8);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(table: u64, id: &[u8]) -> Option<Hint> {
        key(table, id).and_then(|mut k| get_or_fill(&mut k, id, || None))
    }
    fn put(table: u64, id: &[u8], hint: Hint) {
        if let Some(k) = key(table, id) {
            super::put(&k, id, hint)
        }
    }
    fn evict(table: u64, id: &[u8]) {
        if let Some(mut k) = key(table, id) {
            super::evict(&mut k, id)
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

    fn hint(n: u32) -> Hint {
        Hint {
            slot: n,
            gen: n + 1,
            tag: [n as u64, !(n as u64)],
        }
    }

    /// IDs are compared as zero-padded words: IDs of every cacheable
    /// length that differ in one byte (a NUL among them, where the padding
    /// is), or only in length, never share an entry.
    #[test]
    fn ids_that_differ_in_one_byte_or_in_length_never_share_an_entry() {
        for len in 1..=MAX_CACHED_ID {
            // A table of its own per length: the shorter IDs are prefixes.
            let t = new_table_uid();
            let base: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            put(t, &base, hint(len as u32));
            for at in 0..len {
                for b in [0u8, b'A', 0xFF] {
                    let mut other = base.clone();
                    other[at] = b;
                    if other != base {
                        assert_eq!(get(t, &other), None, "length {len}, byte {at} = {b}");
                    }
                }
            }
            let mut longer = base.clone();
            longer.push(0);
            assert_eq!(get(t, &longer), None, "length {len} + NUL");
            assert_eq!(get(t, &base[..len - 1]), None, "length {len} - 1");
            assert_eq!(get(t, &base), Some(hint(len as u32)), "length {len}");
        }
    }

    /// A miss runs the lookup inside the visit and fills the cache with its
    /// result; the next probe hits without a lookup. A lookup that finds
    /// nothing fills nothing.
    #[test]
    fn a_miss_fills_the_cache_with_the_lookups_hint() {
        let t = new_table_uid();
        let mut k = key(t, b"sess-a").unwrap();
        assert_eq!(
            get_or_fill(&mut k, b"sess-a", || Some(hint(5))),
            Some(hint(5))
        );
        let mut k = key(t, b"sess-a").unwrap();
        let again = get_or_fill(&mut k, b"sess-a", || panic!("looked up on a hit"));
        assert_eq!(again, Some(hint(5)));
        let mut k = key(t, b"sess-b").unwrap();
        assert_eq!(get_or_fill(&mut k, b"sess-b", || None), None);
        assert_eq!(get(t, b"sess-b"), None);
    }

    /// A visit inside another (an acquisition made from within the lookup
    /// of a miss) goes without the cache instead of panicking on the
    /// `RefCell`; and a fill that the inner visit raced never gives the
    /// outer ID the inner ID's hint.
    #[test]
    fn a_reentrant_visit_goes_without_the_cache_and_hints_stay_exact() {
        let t = new_table_uid();
        let mut outer = key(t, b"outer-id").unwrap();
        let got = get_or_fill(&mut outer, b"outer-id", || {
            let mut inner = key(t, b"inner-id").unwrap();
            assert_eq!(get_or_fill(&mut inner, b"inner-id", || Some(hint(1))), None);
            // The inner acquisition inserted its ID and fills in a second
            // visit, which also finds the cache busy and skips.
            super::put(&inner, b"inner-id", hint(1));
            Some(hint(2))
        });
        assert_eq!(got, Some(hint(2)));
        assert_eq!(get(t, b"outer-id"), Some(hint(2)));
        assert_eq!(get(t, b"inner-id"), None);
        // Between a probe and its refill (the insertion path), another ID
        // of the same set may be filled into the way the probe chose; the
        // refill then replaces it, so that ID misses, and no hint is wrong.
        let same_set: Vec<Vec<u8>> = (0..100_000)
            .map(|i| format!("race-{i}").into_bytes())
            .filter(|id| locate(t, id).0 == locate(t, b"race-0").0)
            .take(2)
            .collect();
        let (a, b) = (&same_set[0], &same_set[1]);
        let mut ka = key(t, a).unwrap();
        assert_eq!(get_or_fill(&mut ka, a, || None), None);
        put(t, b, hint(20));
        super::put(&ka, a, hint(10));
        assert_eq!(get(t, a), Some(hint(10)));
        assert!(matches!(get(t, b), None | Some(Hint { slot: 20, .. })));
    }
}
