//! The lookup cache: recent ID -> slot lookups of one attachment, shared by
//! all the threads of the process.
//!
//! Owns: one heap array per attachment (per [`crate::LockTable`] handle and
//! its clones), never the mapping. It remembers where the IDs the process
//! locked live (slot index, generation, tag), so that locking one again,
//! from any thread, skips the keyed 128-bit hash and the bucket scan, as
//! PostgreSQL's backend-local lock table skips its shared hash table. (It
//! was per thread until issue #13: a server whose requests for one session
//! land on any of its worker threads paid the keyed lookup whenever the
//! session was new to the thread, though not to the process.)
//!
//! May not touch: the table. A hit is only a hint: the acquisition checks
//! the slot's generation and tag after announcing itself, exactly as for a
//! lookup in the table, and a slot reused meanwhile reports "stale", which
//! falls back to the full lookup, whose result overwrites the entry. So a
//! wrong or stale hint costs a retry, never a wrong lock. What this module
//! must guarantee is narrower: a hit returns a hint that some fill stored
//! *for this ID* (never one fill's ID with another fill's slot or tag).
//!
//! **Entries are seqlocks** (DESIGN §5, "Lookup cache"). Each entry has a
//! sequence word, even when stable. A fill takes the entry by a CAS from
//! even to odd with Acquire (and gives up if it loses or finds it odd: a
//! fill is only an optimisation), stores the fields with Release, then
//! stores the next even value with Release. A probe loads the sequence
//! (Acquire), the fields (Acquire) and the sequence again, and trusts the
//! fields only if both loads saw the same even value. Why that is exact:
//! * if a probe's Acquire load of a field reads a store of fill F, then
//!   F's odd CAS happens before the probe's second load of the sequence,
//!   which therefore reads F's odd value or a later one: never the value
//!   the first load read, unless that was F's own final even value, whose
//!   Release made every field of F visible (and a later fill's field would
//!   again move the sequence);
//! * fills of one entry are ordered: a fill's Acquire CAS reads the
//!   previous fill's Release of the even value, so the previous fill's
//!   stores come first in every field's modification order, and a stable
//!   entry never holds a mix of two fills.
//!
//! loom (`loom-tests/lookup_cache.rs`) fails with any of the four orderings
//! weakened to Relaxed or without the second load of the sequence. Every
//! access of a probe is a plain `mov` on x86-64, and a hit writes nothing,
//! so the threads that read a hot ID share its entry's line.
//!
//! The cache is 4-way set-associative, sized to the table: four entries per
//! slot ([`ENTRIES_PER_SLOT`]), at most [`MAX_ENTRIES`], so the IDs a table
//! can hold rarely crowd a set (2048 IDs in the cache of a 4096-slot table:
//! a set holds more than 4 with probability under 0.2%). An entry's head is
//! one cache line: the sequence, the slot, the generation, the length, the
//! tag and the first 32 bytes of the ID (a session ID of this crate is 32
//! bytes), so a hit usually reads one line; the rest of a longer ID is in
//! a separate array of tails. Way `w` of set `s` is entry `w * sets + s`,
//! so the heads that probes read first are consecutive lines. A fill takes
//! an empty way, else the way filled fewest times (its sequence is lowest),
//! which rotates a full set's ways. IDs longer than [`MAX_CACHED_ID`] are
//! not cached. The arrays are written when the handle first locks (about
//! 1.3 MiB for a table of 4096 slots), so no probe takes a page fault.
//!
//! The index hash is cheap and seeded per attachment (not a PRF): IDs an
//! attacker makes collide in it only evict each other's entries, which
//! costs the keyed lookup (tens of nanoseconds), never a wrong lock. Its
//! last step, a multiply whose top bits pick the set, keeps IDs of one
//! format spread over the sets for every seed ([`LookupCache::set_of`]).

use crate::sync::{AtomicU64, Ordering};

/// Ways per set.
const WAYS: usize = 4;
/// IDs longer than this are not cached (they take the full lookup).
pub const MAX_CACHED_ID: usize = 48;
/// An ID as stored in an entry: little-endian 8-byte words, the last one
/// zero-padded, so that a probe compares whole words instead of calling
/// `memcmp`.
const ID_WORDS: usize = MAX_CACHED_ID / 8;
/// Entries per slot of the table (see the module doc for why so many; an
/// entry is 80 bytes, so 320 bytes of process memory per slot).
const ENTRIES_PER_SLOT: usize = 4;
/// The most entries one attachment's cache has (2.5 MiB: 64-byte heads and
/// 16-byte tails).
pub const MAX_ENTRIES: usize = 1 << 15;
/// The fewest: one set (the loom models use it, so that any two IDs share
/// their set; a table has at least 8 slots, so 32 entries).
const MIN_ENTRIES: usize = WAYS;

/// Where an ID was found: its slot, the slot's generation then, and the
/// ID's tag (checked against the slot's tag on a hit, so that a generation
/// that wrapped around cannot make a stale hint look valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    /// The slot index.
    pub slot: u32,
    /// The slot's generation when it was found (24 bits).
    pub gen: u32,
    /// The ID's 128-bit tag.
    pub tag: [u64; 2],
}

/// The first line of a cached lookup: the sequence word, the hint, and
/// the ID's first [`HEAD_WORDS`] words. `meta` packs the ID's length (bits
/// 0-7, 0 for an empty entry), the generation (bits 8-31) and the slot
/// (bits 32-63).
#[repr(C, align(64))]
struct Head {
    /// Even: stable. Odd: a fill is storing the fields (or died doing so;
    /// only in a forked child, which cannot use this attachment anyway).
    seq: AtomicU64,
    meta: AtomicU64,
    tag: [AtomicU64; 2],
    id: [AtomicU64; HEAD_WORDS],
}

/// The rest of a long ID (more than `8 * HEAD_WORDS` bytes), in a separate
/// array: heads stay one line each, so that IDs of up to 32 bytes are
/// decided on one line and the heads of consecutive sets fill consecutive
/// lines (with the whole entry in one 128-byte block, the entries that
/// probes hit first all sat at one offset modulo 512 and shared an eighth
/// of the L1 cache's sets: 256 IDs in turn read 20% slower than with the
/// per-thread cache, which was dense).
struct Tail {
    id: [AtomicU64; ID_WORDS - HEAD_WORDS],
}

/// ID words kept in the head line.
const HEAD_WORDS: usize = 4;
const _: () = assert!(std::mem::size_of::<Head>() == 64);

const LEN_BITS: u32 = 8;
const GEN_BITS: u32 = 24;
const _: () = assert!(MAX_CACHED_ID < 1 << LEN_BITS);

#[inline(always)]
fn pack(len: usize, hint: Hint) -> u64 {
    debug_assert!(hint.gen < 1 << GEN_BITS);
    len as u64 | (hint.gen as u64) << LEN_BITS | (hint.slot as u64) << 32
}

impl Head {
    fn empty() -> Self {
        Head {
            seq: AtomicU64::new(0),
            meta: AtomicU64::new(0),
            tag: [AtomicU64::new(0), AtomicU64::new(0)],
            id: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Tail {
    fn empty() -> Self {
        Tail {
            id: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Writes one word of every page of `entries` now. The compiler turns the
/// zero-initialisation into a `calloc`, whose large blocks are pages the
/// kernel maps on first touch; without this, a fresh handle's first probes
/// and fills would take a read fault and then a copy-on-write fault per
/// 4 KiB of entries (a new ID read 105-145 ns instead of about 65). An
/// atomic store is not optimised away.
fn prefault<T>(entries: &[T], word: impl Fn(&T) -> &AtomicU64) {
    const PAGE: usize = 4096;
    let step = (PAGE / std::mem::size_of::<T>()).max(1);
    for e in entries.iter().step_by(step) {
        word(e).store(0, Ordering::Relaxed);
    }
}

/// What a probe found in one way.
enum Look {
    Hit(Hint),
    /// Another ID (or a fill under way).
    Other,
    /// Never filled: neither is any later way of the set (fills take the
    /// first empty way, and no entry is ever emptied), so the probe stops.
    Empty,
}

/// One entry: its head, and the tails array with the entry's index (its
/// tail is indexed only for an ID longer than the head holds).
#[derive(Clone, Copy)]
struct Entry<'a> {
    head: &'a Head,
    tails: &'a [Tail],
    index: usize,
}

impl Entry<'_> {
    /// The stored ID word `k`.
    #[inline(always)]
    fn word(&self, k: usize) -> &AtomicU64 {
        if k < HEAD_WORDS {
            &self.head.id[k]
        } else {
            &self.tails[self.index].id[k - HEAD_WORDS]
        }
    }

    /// What this entry holds for the ID of length `len` and `words`
    /// ([`padded_words`]): its hint (if no fill overlapped the reads),
    /// another ID, or nothing.
    #[inline(always)]
    fn look(&self, len: usize, words: &[u64; ID_WORDS]) -> Look {
        let head = self.head;
        let seq = head.seq.load(Ordering::Acquire);
        let meta = head.meta.load(Ordering::Acquire);
        if meta == 0 {
            return Look::Empty;
        }
        match self.hint_for(seq, meta, len, words) {
            Some(hint) => Look::Hit(hint),
            None => Look::Other,
        }
    }

    /// The hint of an entry whose sequence and meta words were `seq` and
    /// `meta`, if it holds the ID and no fill overlapped the reads.
    #[inline(always)]
    fn hint_for(&self, seq: u64, meta: u64, len: usize, words: &[u64; ID_WORDS]) -> Option<Hint> {
        let head = self.head;
        if meta & ((1 << LEN_BITS) - 1) != len as u64 || !self.holds_words(len, words) {
            return None;
        }
        let tag = [
            head.tag[0].load(Ordering::Acquire),
            head.tag[1].load(Ordering::Acquire),
        ];
        // The second load needs no ordering of its own: the Acquire loads
        // above keep it after them (see the module doc for the argument).
        if seq & 1 != 0 || head.seq.load(Ordering::Relaxed) != seq {
            return None;
        }
        Some(Hint {
            slot: (meta >> 32) as u32,
            gen: ((meta >> LEN_BITS) & ((1 << GEN_BITS) - 1)) as u32,
            tag,
        })
    }

    /// True if the stored words are the ID's (both zero-padded the same
    /// way, so equal words mean equal bytes, given equal lengths). Words
    /// past the length are not read: an ID of at most 32 bytes is decided
    /// on the head's line.
    #[inline(always)]
    fn holds_words(&self, len: usize, words: &[u64; ID_WORDS]) -> bool {
        // The head's words unconditionally (zero past the ID on both
        // sides), the tail's only for a long ID: one branch, predicted.
        let mut diff = 0u64;
        for (stored, w) in self.head.id.iter().zip(words) {
            diff |= stored.load(Ordering::Acquire) ^ w;
        }
        if len > 8 * HEAD_WORDS {
            for (k, w) in words.iter().enumerate().skip(HEAD_WORDS) {
                diff |= self.word(k).load(Ordering::Acquire) ^ w;
            }
        }
        diff == 0
    }

    /// Stores the hint of the ID of length `len` and `words`, unless another
    /// fill holds the entry (then this one is skipped: the cache is only a
    /// hint).
    fn fill(&self, len: usize, words: &[u64; ID_WORDS], hint: Hint) {
        let head = self.head;
        let seq = head.seq.load(Ordering::Relaxed);
        if seq & 1 != 0
            || head
                .seq
                .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // The CAS is Acquire: it read the previous fill's Release of the
        // even value, so that fill's stores happen before the ones below,
        // which therefore follow them in every field's modification order.
        // With a Relaxed CAS the two fills' stores to one field are
        // unordered, the older may land last, and the entry would hold a
        // stable mix of two fills (loom found it:
        // `racing_fills_of_one_way_leave_one_whole_fill`).
        // Release on every field: a probe that reads any of them is then
        // ordered after the odd value above, and sees the sequence move.
        head.meta.store(pack(len, hint), Ordering::Release);
        head.tag[0].store(hint.tag[0], Ordering::Release);
        head.tag[1].store(hint.tag[1], Ordering::Release);
        // The tail only for a long ID: a probe reads it only after the
        // length matched a long one (`holds_words`), and then it was
        // written by the fill that stored that length. So a short ID's fill
        // leaves the tail's line alone (a first touch writes one line).
        let used = if len > 8 * HEAD_WORDS {
            ID_WORDS
        } else {
            HEAD_WORDS
        };
        for (k, &w) in words.iter().enumerate().take(used) {
            self.word(k).store(w, Ordering::Release);
        }
        head.seq.store(seq + 2, Ordering::Release);
    }

    /// How often this entry was filled (twice its fills; odd while one is
    /// under way), and whether it is empty.
    #[inline(always)]
    fn fills_and_empty(&self) -> (u64, bool) {
        (
            self.head.seq.load(Ordering::Relaxed),
            self.head.meta.load(Ordering::Relaxed) == 0,
        )
    }
}

/// `id` (`1 <= id.len() <= MAX_CACHED_ID`) as little-endian 8-byte words,
/// the last one zero-padded and the rest zero: computed once per probe,
/// for the hash and the compare, with a constant trip count the compiler
/// unrolls (the branches depend only on the length, so a server's IDs of
/// one length predict them all).
#[inline(always)]
fn padded_words(id: &[u8]) -> [u64; ID_WORDS] {
    let n = id.len();
    let mut words = [0u64; ID_WORDS];
    let whole = n / 8;
    for (k, w) in words.iter_mut().enumerate() {
        if k < whole {
            *w = le_word(&id[8 * k..]);
        }
    }
    let rest = n % 8;
    if rest != 0 {
        words[whole] = if n >= 8 {
            // The last 8 bytes (overlapping the previous word), shifted
            // down so that only the tail's bytes remain.
            le_word(&id[n - 8..]) >> (8 * (8 - rest))
        } else {
            id.iter()
                .enumerate()
                .fold(0u64, |w, (i, &b)| w | (b as u64) << (8 * i))
        };
    }
    words
}

/// The first 8 bytes of `bytes` (at least 8) as a little-endian word.
#[inline(always)]
fn le_word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

/// Where a probe that missed wants its refill ([`LookupCache::put`]): the
/// set and the way chosen. The way is only a choice: if another thread
/// filled it meanwhile, the refill overwrites that ID's entry, which costs
/// that ID a miss, never a wrong hint.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    set: usize,
    way: usize,
}

/// What [`LookupCache::probe`] found.
#[derive(Debug)]
pub enum Probe {
    /// The cached hint.
    Hit(Hint),
    /// Not cached: where it goes.
    Miss(Key),
    /// Not cacheable (empty or longer than [`MAX_CACHED_ID`]).
    Uncached,
}

/// One attachment's cache (see the module doc). Way `w` of set `s` is
/// entry `w * sets + s`: the ways a probe reads first are consecutive.
pub struct LookupCache {
    heads: Box<[Head]>,
    tails: Box<[Tail]>,
    /// The number of sets minus one (a power of two minus one).
    mask: usize,
    /// log2 of the number of sets.
    set_bits: u32,
    /// Seed of the index hash, random per cache.
    seed: [u64; 2],
}

impl std::fmt::Debug for LookupCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupCache")
            .field("entries", &self.heads.len())
            .finish()
    }
}

impl LookupCache {
    /// A cache for a table of `capacity` slots: [`ENTRIES_PER_SLOT`] entries
    /// per slot, rounded up to a power of two, within
    /// `MIN_ENTRIES..=MAX_ENTRIES`. `seed` seeds the index hash.
    pub fn new(capacity: usize, seed: u64) -> Self {
        let entries = capacity
            .saturating_mul(ENTRIES_PER_SLOT)
            .next_power_of_two()
            .clamp(MIN_ENTRIES, MAX_ENTRIES);
        let heads: Box<[Head]> = (0..entries).map(|_| Head::empty()).collect();
        let tails: Box<[Tail]> = (0..entries).map(|_| Tail::empty()).collect();
        prefault(&heads, |h| &h.seq);
        prefault(&tails, |t| &t.id[0]);
        LookupCache {
            heads,
            tails,
            mask: entries / WAYS - 1,
            set_bits: (entries / WAYS).trailing_zeros(),
            // Two words from one (splitmix64's increment and multiplier).
            seed: [
                seed,
                seed.wrapping_add(0x9E37_79B9_7F4A_7C15)
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9),
            ],
        }
    }

    /// Way `way` of set `set` (both in range: `set <= mask`, `way < WAYS`).
    #[inline(always)]
    fn entry(&self, set: usize, way: usize) -> Entry<'_> {
        let index = way * (self.mask + 1) + set;
        Entry {
            head: &self.heads[index],
            tails: &self.tails,
            index,
        }
    }

    /// Cheap hash of the seed, the length and every byte of the ID (its
    /// `words`): each 16 bytes in one 64x64->128-bit multiply, folded
    /// (every bit of the result depends on every input bit), the multiplies
    /// independent of one another. Every byte counts: IDs of one format
    /// often share their first and last words ("user-000123-web") and
    /// differ only in the middle. Not a PRF: a collision costs a miss.
    ///
    /// The set is the top bits of the folded value times an odd constant.
    /// The folded value alone (its low bits xor its high half's) is close
    /// to linear in a difference confined to a few adjacent bits of one
    /// word (a big-endian counter, a binary UUID's counter, a multiple of
    /// 4096), and for some seeds such IDs fell into a fraction of the sets:
    /// 256 big-endian counters kept 203 of 256 entries in a 256-slot table
    /// for one seed in 300, and 102 for one in 2000 (a uniform hash: at
    /// least 246). The multiply's top bits mix all 64 bits of the fold
    /// (`hash_tests`).
    #[inline(always)]
    fn set_of(&self, len: usize, words: &[u64; ID_WORDS]) -> usize {
        // Every pair, without a branch (the zero words of a short ID are
        // hashed too): three independent multiplies cost less than the
        // branches that would skip them.
        let mut h = len as u64;
        for (p, pair) in words.chunks_exact(2).enumerate() {
            let a = pair[0] ^ self.seed[0].rotate_left(16 * p as u32);
            let b = pair[1] ^ self.seed[1].rotate_left(16 * p as u32);
            let m = (a as u128).wrapping_mul(b as u128);
            h ^= (m as u64) ^ ((m >> 64) as u64);
        }
        // The top `set_bits` bits of the product, rotated down (a rotation,
        // not a shift: a one-set cache has no bits to take).
        h.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(self.set_bits) as usize
            & self.mask
    }

    /// Looks `id` up.
    #[inline(always)]
    pub fn probe(&self, id: &[u8]) -> Probe {
        match self.probe_keyed(id) {
            (_, Some(hint)) => Probe::Hit(hint),
            (Some(key), None) => Probe::Miss(key),
            (None, None) => Probe::Uncached,
        }
    }

    /// The key of `id` without probing (for a fill after an insertion or a
    /// stale hint): the way holding `id` if any, else the refill's choice.
    /// `None`: not cacheable.
    pub fn key(&self, id: &[u8]) -> Option<Key> {
        self.probe_keyed(id).0
    }

    /// The probe: the hint and its way on a hit, the refill's way on a
    /// miss, neither for an uncacheable ID.
    #[inline(always)]
    fn probe_keyed(&self, id: &[u8]) -> (Option<Key>, Option<Hint>) {
        if id.is_empty() || id.len() > MAX_CACHED_ID {
            return (None, None);
        }
        let words = padded_words(id);
        let set = self.set_of(id.len(), &words);
        for way in 0..WAYS {
            match self.entry(set, way).look(id.len(), &words) {
                Look::Hit(hint) => return (Some(Key { set, way }), Some(hint)),
                // A miss: the refill takes this way. (A way that a racing
                // fill just took may look empty; the refill then races that
                // fill for it, and the loser skips: a hint lost, no harm.)
                Look::Empty => return (Some(Key { set, way }), None),
                Look::Other => {}
            }
        }
        (Some(self.missed(set)), None)
    }

    /// A probe of `set` missed: the way its refill takes (an empty one,
    /// else the one filled fewer times; ties go to the first).
    #[cold]
    #[inline(never)]
    fn missed(&self, set: usize) -> Key {
        let mut best = (0, u64::MAX);
        for way in 0..WAYS {
            let (fills, empty) = self.entry(set, way).fills_and_empty();
            if empty {
                return Key { set, way };
            }
            if fills < best.1 {
                best = (way, fills);
            }
        }
        Key { set, way: best.0 }
    }

    /// Remembers that `id` lives where `hint` says, in the way `key` chose
    /// (skipped if another thread is filling that way right now).
    #[inline]
    pub fn put(&self, key: &Key, id: &[u8], hint: Hint) {
        if id.is_empty() || id.len() > MAX_CACHED_ID || key.set > self.mask || key.way >= WAYS {
            return;
        }
        self.entry(key.set, key.way)
            .fill(id.len(), &padded_words(id), hint);
    }
}

#[cfg(all(test, not(locktable_loom)))]
mod tests {
    use super::*;

    fn hint(n: u32) -> Hint {
        Hint {
            slot: n,
            gen: (n + 1) & ((1 << GEN_BITS) - 1),
            tag: [n as u64, !(n as u64)],
        }
    }
    fn get(c: &LookupCache, id: &[u8]) -> Option<Hint> {
        match c.probe(id) {
            Probe::Hit(h) => Some(h),
            _ => None,
        }
    }
    fn put(c: &LookupCache, id: &[u8], h: Hint) {
        if let Some(k) = c.key(id) {
            c.put(&k, id, h)
        }
    }

    #[test]
    fn hits_only_for_the_same_id() {
        let c = LookupCache::new(64, 1);
        put(&c, b"session-1", hint(7));
        assert_eq!(get(&c, b"session-1"), Some(hint(7)));
        assert_eq!(get(&c, b"session-2"), None);
        assert_eq!(get(&c, b"session-"), None);
        assert_eq!(get(&c, b"session-1x"), None);
        assert_eq!(get(&c, b"sessiOn-1"), None);
        let long_id = b"0123456789abcdef0123456789abcdef0123456789abcdef";
        put(&c, long_id, hint(9));
        assert_eq!(get(&c, long_id), Some(hint(9)));
        let mut other = *long_id;
        other[40] = b'X';
        assert_eq!(get(&c, &other), None);
        let long = [1u8; MAX_CACHED_ID + 1];
        assert!(matches!(c.probe(&long), Probe::Uncached));
        assert!(matches!(c.probe(b""), Probe::Uncached));
        // A second cache (another attachment) knows nothing of the first's.
        let d = LookupCache::new(64, 1);
        assert_eq!(get(&d, b"session-1"), None);
    }

    #[test]
    fn the_slot_the_generation_and_the_tag_survive_packing() {
        let c = LookupCache::new(64, 2);
        let h = Hint {
            slot: u32::MAX,
            gen: (1 << GEN_BITS) - 1,
            tag: [u64::MAX, 1],
        };
        put(&c, b"x", h);
        assert_eq!(get(&c, b"x"), Some(h));
        let h = Hint {
            slot: 0,
            gen: 0,
            tag: [0, 0],
        };
        put(&c, b"x", h);
        assert_eq!(get(&c, b"x"), Some(h));
    }

    /// IDs are compared as zero-padded words: IDs of every cacheable length
    /// that differ in one byte (a NUL among them, where the padding is), or
    /// only in length, never share an entry.
    #[test]
    fn ids_that_differ_in_one_byte_or_in_length_never_share_an_entry() {
        for len in 1..=MAX_CACHED_ID {
            let c = LookupCache::new(4096, len as u64);
            let base: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            put(&c, &base, hint(len as u32));
            for at in 0..len {
                for b in [0u8, b'A', 0xFF] {
                    let mut other = base.clone();
                    other[at] = b;
                    if other != base {
                        assert_eq!(get(&c, &other), None, "length {len}, byte {at} = {b}");
                    }
                }
            }
            let mut longer = base.clone();
            longer.push(0);
            assert_eq!(get(&c, &longer), None, "length {len} + NUL");
            assert_eq!(get(&c, &base[..len - 1]), None, "length {len} - 1");
            assert_eq!(get(&c, &base), Some(hint(len as u32)), "length {len}");
        }
    }

    /// A refill after a stale hint replaces the entry in place, and a set
    /// that overflows replaces the way filled fewest times.
    #[test]
    fn refills_replace_in_place_and_full_sets_rotate() {
        let c = LookupCache::new(4, 3);
        assert_eq!(c.heads.len(), 16);
        let same_set: Vec<Vec<u8>> = (0..100_000)
            .map(|i| format!("id-{i}").into_bytes())
            .filter(|id| c.set_of(id.len(), &padded_words(id)) == 0)
            .take(WAYS + 1)
            .collect();
        for (i, id) in same_set.iter().take(WAYS).enumerate() {
            put(&c, id, hint(i as u32));
        }
        put(&c, &same_set[0], hint(100));
        for (i, id) in same_set.iter().take(WAYS).enumerate().skip(1) {
            assert_eq!(get(&c, id), Some(hint(i as u32)));
        }
        assert_eq!(get(&c, &same_set[0]), Some(hint(100)));
        // Way 0 was filled twice, the others once: the newcomer replaces
        // way 1 (the first of those), and way 0 stays.
        put(&c, &same_set[WAYS], hint(200));
        assert_eq!(get(&c, &same_set[WAYS]), Some(hint(200)));
        assert_eq!(get(&c, &same_set[1]), None);
        assert_eq!(get(&c, &same_set[0]), Some(hint(100)));
        for (i, id) in same_set.iter().take(WAYS).enumerate().skip(2) {
            assert_eq!(get(&c, id), Some(hint(i as u32)));
        }
    }

    /// A server's worth of IDs: most of 2048 IDs stay cached in the cache of
    /// a 4096-slot table, and every hit is the ID's own hint.
    #[test]
    fn a_process_cycling_through_thousands_of_ids_keeps_most_of_them() {
        let c = LookupCache::new(4096, 4);
        let ids: Vec<String> = (0..2048).map(|i| format!("bench-id-{i:06}")).collect();
        for (i, id) in ids.iter().enumerate() {
            put(&c, id.as_bytes(), hint(i as u32));
        }
        let mut hits = 0;
        for (i, id) in ids.iter().enumerate() {
            if let Some(h) = get(&c, id.as_bytes()) {
                assert_eq!(h, hint(i as u32));
                hits += 1;
            }
        }
        assert!(hits >= 2000, "{hits} of 2048 hit");
    }

    /// Threads filling and probing one small cache at once never see one
    /// ID with another's hint (the seqlock; loom checks it exhaustively on
    /// a small model, this on the hardware's memory order).
    #[test]
    fn concurrent_fills_never_give_an_id_another_ids_hint() {
        let c = std::sync::Arc::new(LookupCache::new(4, 5));
        let ids: Vec<Vec<u8>> = (0..64)
            .map(|i| format!("concurrent-{i:03}-{}", "x".repeat(i % 30)).into_bytes())
            .collect();
        let ids = std::sync::Arc::new(ids);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (c, ids) = (c.clone(), ids.clone());
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    for round in 0..200_000usize {
                        let i = (round * 7 + t * 13) % ids.len();
                        match c.probe(&ids[i]) {
                            Probe::Hit(h) => {
                                assert_eq!(h, hint(i as u32), "ID {i} got another hint");
                                seen += 1;
                            }
                            Probe::Miss(k) => c.put(&k, &ids[i], hint(i as u32)),
                            Probe::Uncached => unreachable!(),
                        }
                    }
                    seen
                })
            })
            .collect();
        let hits: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(hits > 0);
    }
}

#[cfg(all(test, not(locktable_loom)))]
#[path = "lookup_cache_hash_tests.rs"]
mod hash_tests;
