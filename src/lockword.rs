//! The lock word of one slot and the reader/writer/upgradable protocol on it.
//!
//! Owns: the bit layout of a slot's `state` word and of its per-process
//! `lanes`, and every transition between lock modes (acquire, release,
//! upgrade, downgrade, timed waits, recovery of a dead process's holds).
//!
//! May not touch: where a slot lives (the table), which ID a slot is given
//! to (the index does that), or how a process is judged dead (the [`Host`]
//! decides). It does check, after every grant, that the slot still serves
//! the ID the caller looked up (its [`Ident`]: generation and tag). It works on a [`SlotRef`]:
//! references to atomics that live in the shared mapping in real builds and
//! in a heap region under loom, so this exact code is model-checked.
//!
//! # The `state` word (`u64`)
//!
//! ```text
//!  63            40 39        24 23        8 7 6 5 4 3 2 1 0
//! +----------------+------------+-----------+-+-+-+-+-+-+---+
//! |  GEN (24 bits) |  UPGRADER  |  WRITER   |R|B|D|W|L|P|PH |
//! +----------------+------------+-----------+-+-+-+-+-+-+---+
//! PH  (2 bits) phase: 0 FREE, 1 ACTIVE, 2 RETIRING
//! P   PARKED: some thread sleeps (or is about to) on this slot's futex
//! L   WRITE_LOCKED: WRITER drained every reader and holds the lock
//! W   WRITER_WAITING: a writer waits (blocks new upgradable grants; set by
//!     a waiting writer that an UPGRADER blocks, kept after the upgrader
//!     leaves, cleared by a writer's claim or a waiting writer's give-up)
//! D   OWNER_DIED: the last write holder died holding the lock
//! B   BIASED: readers may publish their holds in their thread's reader row
//!     (see "Reader bias" below) instead of their process's lane; every
//!     claimant (writer, upgrade, retirement) must scan the rows
//! R   reserved (bit 7)
//! WRITER   process index + 1 of the writer (0 = none). With L clear the
//!          writer is *pending*: it has excluded other writers, upgraders and
//!          new readers, and waits for the readers to drain.
//! UPGRADER process index + 1 of the upgradable holder (0 = none)
//! GEN      bumped each time the slot is given to a new ID (a fast filter:
//!          it wraps, so the slot's tag is what proves identity)
//! ```
//!
//! # Lanes (`u32` per attached-process index)
//!
//! ```text
//!  31          17 16               0
//! +--------------+------------------+
//! |   WAITERS    |      READERS     |
//! +--------------+------------------+
//! ```
//! Lane `p` is written only by threads of process `p` (and by recovery once
//! `p` is dead). READERS is the number of read holds process `p` has on this
//! slot: the hold record *is* the lock state, so after a death at any
//! instruction the lane says exactly what the dead process held. Plain reads
//! are bounded at `MAX_READS_PER_PROCESS` (0xFFFF) by a CAS; one more read
//! (0x10000) is reserved for the downgrade of the ID's single upgradable or
//! write hold, so READERS never carries into WAITERS and a downgrade always
//! has room. WAITERS counts this process's waiting threads (stats, and the
//! proof that a WRITER_WAITING mark has a live waiter); it saturates.
//!
//! # Reader bias (per-thread reader rows)
//!
//! Each process record has `READER_ROWS` rows of `ROW_ENTRIES` `u32`
//! entries; a thread of the process publishes a read of slot `s` by a CAS
//! of one free entry of its row from 0 to `s + 1` (SeqCst), then re-loads
//! the state (SeqCst): granted if BIASED is still set, no WRITER, same GEN
//! and the same tag. Readers of one ID in different threads then write
//! different cache lines. A claimant (write claim, upgrade, retirement)
//! that finds BIASED set scans, after its SeqCst claim, the rows of every
//! record below the lanes-in-use mark for `s + 1` and waits until none is
//! left; the writer's grant clears BIASED, and a lane reader sets it again
//! once the cooling window `bias_until` has passed. The entry sits in the
//! reader's process's own record, so a dead reader's biased holds are
//! exactly its non-zero entries (recovery zeroes them). DESIGN.md §10.
//!
//! # Asymmetric fences ([`Fences`])
//!
//! In a table created with asymmetric fences, a thread that owns its row
//! (no other thread takes entries of it) in a process registered for
//! `membarrier` publishes with a plain store and re-loads without a locked
//! instruction, and releases with a plain store; every claimant that scans
//! the rows of a BIASED slot (revocation, a waiting revoker after it sets
//! PARKED, retirement) first issues the heavy barrier
//! ([`sync::heavy_barrier`]), which puts a full fence into every reader at
//! some point of its program: a publish before that point is seen by the
//! scan, a re-load after it sees the claim. DESIGN.md §10.

use std::time::Duration;

use crate::layout::{READER_ROWS, RECORD_ROW_ENTRIES, ROW_ENTRIES};
use crate::sync::{self, AtomicU32, AtomicU64, Ordering};

pub(crate) const PHASE_MASK: u64 = 0b11;
pub(crate) const PHASE_FREE: u64 = 0;
pub(crate) const PHASE_ACTIVE: u64 = 1;
pub(crate) const PHASE_RETIRING: u64 = 2;
pub(crate) const PARKED: u64 = 1 << 2;
pub(crate) const WRITE_LOCKED: u64 = 1 << 3;
pub(crate) const WRITER_WAITING: u64 = 1 << 4;
pub(crate) const OWNER_DIED: u64 = 1 << 5;
pub(crate) const BIASED: u64 = 1 << 6;
/// A writer that revoked the bias keeps readers on their lanes for this
/// many times as long as the revocation took (BRAVO's cooling window), so
/// revocations cost writers at most about a tenth of their time.
const BIAS_COOLING_FACTOR: u64 = 9;
const WRITER_SHIFT: u32 = 8;
const UPGRADER_SHIFT: u32 = 24;
const GEN_SHIFT: u32 = 40;
/// Width of GEN. The model checker uses one bit, so that a wrap (two reuses
/// of a slot) is reachable in a model; the tag check makes it harmless.
#[cfg(not(locktable_loom))]
const GEN_BITS: u32 = 24;
#[cfg(locktable_loom)]
const GEN_BITS: u32 = 1;
const GEN_VALUES: u32 = (1 << GEN_BITS) - 1;
pub(crate) const WRITER_MASK: u64 = 0xFFFF << WRITER_SHIFT;
pub(crate) const UPGRADER_MASK: u64 = 0xFFFF << UPGRADER_SHIFT;
pub(crate) const GEN_MASK: u64 = (GEN_VALUES as u64) << GEN_SHIFT;

/// Largest number of read holds one process may count in its lane for one
/// ID. While the ID is read-biased, each of the process's threads may hold
/// up to 16 more in its reader row (those cannot overflow anything: a full
/// row sends the thread to its lane), so a process may get a few more
/// reads than this before [`crate::Error::HoldLimit`].
pub const MAX_READS_PER_PROCESS: u32 = 0xFFFF;
/// Plain reads stop at `MAX_READS_PER_PROCESS`; the one read above it is
/// the downgrade of the ID's single upgradable or write hold.
const MAX_LANE_READERS: u32 = MAX_READS_PER_PROCESS + 1;
const LANE_READERS: u32 = 0x1_FFFF;
const LANE_WAITER_SHIFT: u32 = 17;
const LANE_WAITER_ONE: u32 = 1 << LANE_WAITER_SHIFT;
const LANE_WAITERS_MAX: u32 = 0x7FFF;

#[inline]
pub(crate) fn phase(s: u64) -> u64 {
    s & PHASE_MASK
}
#[inline]
pub(crate) fn gen(s: u64) -> u32 {
    ((s & GEN_MASK) >> GEN_SHIFT) as u32
}
#[inline]
pub(crate) fn writer(s: u64) -> u32 {
    ((s & WRITER_MASK) >> WRITER_SHIFT) as u32
}
#[inline]
pub(crate) fn upgrader(s: u64) -> u32 {
    ((s & UPGRADER_MASK) >> UPGRADER_SHIFT) as u32
}
#[inline]
fn writer_field(me: u32) -> u64 {
    ((me as u64) + 1) << WRITER_SHIFT
}
#[inline]
fn upgrader_field(me: u32) -> u64 {
    ((me as u64) + 1) << UPGRADER_SHIFT
}
#[inline]
pub(crate) fn with_gen(s: u64, g: u32) -> u64 {
    (s & !GEN_MASK) | (((g as u64) << GEN_SHIFT) & GEN_MASK)
}
#[inline]
pub(crate) fn next_gen(g: u32) -> u32 {
    (g + 1) & GEN_VALUES
}
#[inline]
pub(crate) fn lane_readers(l: u32) -> u32 {
    l & LANE_READERS
}
#[inline]
pub(crate) fn lane_waiters(l: u32) -> u32 {
    l >> LANE_WAITER_SHIFT
}
#[inline]
fn is_active(s: u64, g: u32) -> bool {
    phase(s) == PHASE_ACTIVE && gen(s) == g
}

/// The ID an acquisition looked up: the slot's generation then (a cheap
/// first filter) and the ID's 128-bit tag (the proof, re-checked after the
/// hold is announced or claimed, because GEN wraps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ident {
    pub(crate) gen: u32,
    pub(crate) tag: [u64; 2],
}

/// How biased reads are fenced (DESIGN §10, "Asymmetric fences").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fences {
    /// This process's biased reads publish and release with plain stores
    /// and a compiler fence ([`sync::light_fence`]). Only in a table of
    /// asymmetric fences, by a process registered for the barrier, and only
    /// through a row that the reading thread owns (the caller's promise:
    /// see `reader_row`), because a plain store cannot tell a free entry
    /// that another thread takes at the same time.
    pub(crate) plain_reads: bool,
    /// Other processes' readers may publish plainly: every claimant that
    /// scans the rows issues [`sync::heavy_barrier`] first.
    pub(crate) barrier_before_scan: bool,
}

impl Fences {
    /// The fenced protocol: locked publishes, no barrier.
    pub(crate) const LOCKED: Fences = Fences {
        plain_reads: false,
        barrier_before_scan: false,
    };
}

/// The atomics of one slot. Borrowed from the mapping (or the loom heap).
#[derive(Clone, Copy)]
pub(crate) struct SlotRef<'a> {
    /// The slot's index: a biased read publishes `index + 1` in a row.
    pub(crate) index: u32,
    pub(crate) state: &'a AtomicU64,
    /// The 128-bit tag of the ID the slot serves (written by an insertion
    /// before it publishes ACTIVE; constant while any hold, claim or
    /// waiter mark keeps the slot from being retired).
    pub(crate) tag: [&'a AtomicU64; 2],
    /// Futex word: bumped by every wake so a sleeper never misses one.
    pub(crate) seq: &'a AtomicU32,
    pub(crate) lanes: &'a [AtomicU32],
    /// Table-wide high-water mark of attached process indices (+1): lanes
    /// at or past it have never been used, so drain checks stop there.
    pub(crate) lanes_in_use: &'a AtomicU32,
    /// End of the cooling window after a revocation (CLOCK_MONOTONIC ns):
    /// no re-bias before it. Only a heuristic: any value is safe.
    pub(crate) bias_until: &'a AtomicU64,
    /// Every reader-row entry of the table (record `p` owns
    /// `p * RECORD_ROW_ENTRIES ..`).
    pub(crate) rows: &'a [AtomicU32],
    /// How biased reads are fenced in this table and this process.
    pub(crate) fences: Fences,
}

/// What the waiting code needs from its environment.
pub(crate) trait Host {
    /// How long a waiter sleeps before it checks whether the holders it waits
    /// for are alive. `None`: never (only for models of lost wakeups).
    fn poll_interval(&self) -> Option<Duration>;
    /// The caller's own process index (never judged dead by itself).
    fn me(&self) -> u32;
    /// If process `p` is dead, releases all its holds (a sweep) and returns
    /// true. Returns false for live processes and for `p == me()`.
    fn recover_process(&self, p: u32) -> bool;
    /// Called by a waiter that has waited a poll interval: checks every
    /// process named by `slot` (writer, upgrader, lanes) and recovers the
    /// dead ones. Returns true if it released anything.
    fn recover_stalled(&self, slot: SlotRef<'_>) -> bool {
        let mut any = false;
        for p in slot.named_processes() {
            if p != self.me() {
                any |= self.recover_process(p);
            }
        }
        any
    }
    /// Called by a waiter about to sleep: asks for the holders named by
    /// `slot` to be watched, so their death is noticed by an event rather
    /// than at the next poll (see `watcher`). The default watches nothing.
    fn watch_holders(&self, _slot: SlotRef<'_>) {}
}

/// Why an attempt did not take the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fail {
    /// Held in a conflicting mode (only from `try_*`).
    Busy,
    /// The slot no longer serves the ID: look it up again.
    Stale,
    /// The deadline passed.
    Timeout,
    /// This process already holds `MAX_READS_PER_PROCESS` reads of the ID
    /// (or, for an upgradable hold, the read reserved for its downgrade).
    HoldLimit,
}

/// A granted hold. `owner_died` reports OWNER_DIED as seen at acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Granted {
    pub(crate) owner_died: bool,
    /// A biased read: 1 + the index (in `SlotRef::rows`) of the entry that
    /// holds it, to be cleared by `release_biased`; 0: a lane read, or
    /// another mode. (Not an `Option<u32>`: with it the grant is 12 bytes,
    /// and the hit path's copies of it through `Result`/`Option` layers
    /// compiled to overlapping partial stores and loads, a store-forwarding
    /// stall that cost the uncontended read about 15 ns.)
    entry_plus_one: u32,
}

impl Granted {
    #[inline]
    pub(crate) fn of_state(s: u64) -> Granted {
        Granted {
            owner_died: s & OWNER_DIED != 0,
            entry_plus_one: 0,
        }
    }

    /// A biased read's row entry, if this grant is one.
    #[inline]
    pub(crate) fn entry(&self) -> Option<u32> {
        self.entry_plus_one.checked_sub(1)
    }
}

/// A biased read hold, as the few words its release touches: built from a
/// [`SlotRef`] or, on the guard's fast path, straight from the mapping (so
/// the release does not assemble a whole `SlotRef`).
#[derive(Clone, Copy)]
pub(crate) struct BiasedHold<'a> {
    pub(crate) entry: &'a AtomicU32,
    pub(crate) state: &'a AtomicU64,
    pub(crate) seq: &'a AtomicU32,
    /// `Fences::plain_reads` of the process that holds it.
    pub(crate) plain: bool,
}

impl BiasedHold<'_> {
    /// Drops the hold, then wakes sleepers if any are marked: the
    /// releaser's half of the Dekker pair with a revoking writer's "set
    /// PARKED, re-scan the rows". Locked: a SeqCst store then a SeqCst
    /// load. Plain: a Release store (the read's accesses happen before a
    /// scan that sees the 0), the light fence, then the load; the revoker
    /// issues the heavy barrier between its PARKED and its re-scan
    /// (`drain_readers`).
    ///
    /// The plain branch loads PARKED without [`sync::dekker_fence`]: that
    /// fence is nothing in real builds, and under loom it would order the
    /// store and the load by itself and hide a revoker that skipped the
    /// barrier (the light fence is the model of what real builds have).
    #[inline(always)]
    pub(crate) fn release(self) {
        if self.plain {
            self.entry.store(0, Ordering::Release);
            sync::light_fence();
            if self.state.load(Ordering::SeqCst) & PARKED != 0 {
                wake_all(self.state, self.seq);
            }
        } else {
            self.entry.store(0, Ordering::SeqCst);
            wake_if_parked(self.state, self.seq);
        }
    }
}

/// A biased attempt that lost: out of line, so that the granted path
/// stays small enough to inline into the caller.
#[cold]
#[inline(never)]
fn back_off_biased(hold: BiasedHold<'_>) {
    hold.release();
}

/// After a release (an RMW or SeqCst store the caller made): wakes the
/// slot's sleepers if PARKED is set.
#[inline(always)]
fn wake_if_parked(state: &AtomicU64, seq: &AtomicU32) {
    sync::dekker_fence();
    if state.load(Ordering::SeqCst) & PARKED != 0 {
        wake_all(state, seq);
    }
}

/// Clears PARKED, then bumps `seq` and wakes every sleeper of the slot.
/// Out of line: only two words are passed, so callers on the fast paths
/// need not keep a whole `SlotRef` in memory for this rare call.
#[cold]
#[inline(never)]
fn wake_all(state: &AtomicU64, seq: &AtomicU32) {
    state.fetch_and(!PARKED, Ordering::SeqCst);
    seq.fetch_add(1, Ordering::SeqCst);
    sync::futex_wake_all(seq);
}

/// How long to wait: `None` = try once, `Some(None)` = forever,
/// `Some(Some(t))` = until `t`.
pub(crate) type Wait = Option<Option<sync::Instant>>;

/// Spin rounds before parking (each round spins up to 64 hints). Under loom
/// spinning only multiplies interleavings, so the model parks at once.
#[cfg(not(locktable_loom))]
const SPIN_LIMIT: u32 = 64;
#[cfg(locktable_loom)]
const SPIN_LIMIT: u32 = 0;

impl<'a> SlotRef<'a> {
    /// Every process index that holds, claims or waits on this slot.
    pub(crate) fn named_processes(&self) -> Vec<u32> {
        let s = self.state.load(Ordering::Acquire);
        let mut v: Vec<u32> = [writer(s), upgrader(s)]
            .into_iter()
            .filter(|&x| x != 0)
            .map(|x| x - 1)
            .collect();
        for (i, l) in self.lanes.iter().enumerate() {
            if l.load(Ordering::Acquire) != 0 && !v.contains(&(i as u32)) {
                v.push(i as u32);
            }
        }
        if s & BIASED != 0 {
            // The rows a revoking writer waits for: those below the mark.
            let mine = self.index + 1;
            let n =
                self.lanes_in_use.load(Ordering::Acquire) as usize * RECORD_ROW_ENTRIES as usize;
            let rows = &self.rows[..n.min(self.rows.len())];
            for (p, block) in rows.chunks(RECORD_ROW_ENTRIES as usize).enumerate() {
                let p = p as u32;
                if !v.contains(&p) && block.iter().any(|e| e.load(Ordering::Acquire) == mine) {
                    v.push(p);
                }
            }
        }
        v
    }

    #[inline]
    fn lane(&self, me: u32) -> &'a AtomicU32 {
        &self.lanes[me as usize]
    }

    /// True if the slot's tag is `tag`. Acquire: pairs with the Release
    /// stores of the insertion that published the generation the caller's
    /// previous state access read (see DESIGN §5, "Slot identity").
    #[inline]
    pub(crate) fn has_tag(&self, tag: [u64; 2]) -> bool {
        self.tag[0].load(Ordering::Acquire) == tag[0]
            && self.tag[1].load(Ordering::Acquire) == tag[1]
    }

    /// The lanes any process may have written: those below the table's
    /// high-water mark. A process raises the mark (SeqCst) when it attaches,
    /// before it can announce anything in its lane, so a checker that loads
    /// the mark after its own SeqCst claim sees every lane whose
    /// announcement precedes the claim (the rest see the claim and back off).
    #[inline]
    fn used_lanes(&self) -> &'a [AtomicU32] {
        let n = self.lanes_in_use.load(Ordering::SeqCst) as usize;
        &self.lanes[..n.min(self.lanes.len())]
    }

    /// True when no process has a read hold on this slot: no lane
    /// counts a reader, and, when `biased` (the slot was BIASED when the
    /// caller claimed it), no reader row of an attached process holds the
    /// slot. The rows are scanned below the same lanes-in-use mark, for the
    /// same reason: a process raises it before it publishes anything.
    #[inline]
    fn readers_drained(&self, biased: bool) -> bool {
        let lanes = self.used_lanes();
        lanes
            .iter()
            .all(|l| lane_readers(l.load(Ordering::SeqCst)) == 0)
            && (!biased || self.rows_drained(lanes.len()))
    }

    /// True when no row entry of processes `0..processes` holds this slot.
    /// SeqCst loads: the claimant's half of the Dekker pair with a biased
    /// reader's "publish (SeqCst), re-load the state (SeqCst)".
    fn rows_drained(&self, processes: usize) -> bool {
        let mine = self.index + 1;
        let n = (processes * RECORD_ROW_ENTRIES as usize).min(self.rows.len());
        self.rows[..n]
            .iter()
            .all(|e| e.load(Ordering::SeqCst) != mine)
    }

    /// Publishes a biased read of this slot in row `row` of process `me`:
    /// the first free entry goes from 0 to slot + 1, the first half of the
    /// reader's Dekker pair with a revoking claimant's row scan.
    /// * Locked (`Fences::plain_reads` false): a CAS (SeqCst), so that
    ///   threads sharing a row never overwrite each other's entries.
    /// * Plain: a Relaxed store, then [`sync::light_fence`]. The row is the
    ///   caller's own (no other thread takes its free entries; a guard
    ///   dropped on another thread only zeroes its own entry), so a load
    ///   that saw 0 still holds when the store lands. The claimant's heavy
    ///   barrier provides the store-load order (module docs).
    ///
    /// `None`: the row is full; the caller uses its lane.
    #[inline(always)]
    fn publish_biased(&self, me: u32, row: u32) -> Option<u32> {
        let start = me as usize * RECORD_ROW_ENTRIES as usize
            + (row as usize % READER_ROWS as usize) * ROW_ENTRIES as usize;
        let mine = self.index + 1;
        let entries = self.rows.get(start..start + ROW_ENTRIES as usize)?;
        for (i, e) in entries.iter().enumerate() {
            if e.load(Ordering::Relaxed) != 0 {
                continue;
            }
            if self.fences.plain_reads {
                e.store(mine, Ordering::Relaxed);
                sync::light_fence();
                return Some((start + i) as u32);
            }
            if e.compare_exchange(0, mine, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                sync::dekker_fence();
                return Some((start + i) as u32);
            }
        }
        None
    }

    /// Drops the biased read held by row entry `entry` ([`BiasedHold::release`]).
    #[inline]
    pub(crate) fn release_biased(&self, entry: u32) {
        if let Some(e) = self.rows.get(entry as usize) {
            self.biased_hold(e).release();
        } else {
            self.wake_if_parked();
        }
    }

    /// The words a biased read held through `entry` touches on release.
    #[inline(always)]
    fn biased_hold(&self, entry: &'a AtomicU32) -> BiasedHold<'a> {
        BiasedHold {
            entry,
            state: self.state,
            seq: self.seq,
            plain: self.fences.plain_reads,
        }
    }

    /// A claimant (revoking writer or upgrade, retirement) of a BIASED
    /// slot, after its SeqCst claim and before it scans the rows: in a table
    /// of asymmetric fences, forces every plain publish that precedes the
    /// readers' re-loads to be visible (DESIGN §10).
    #[inline]
    fn barrier_before_row_scan(&self) {
        if self.fences.barrier_before_scan {
            sync::heavy_barrier();
        }
    }

    /// After a release (an RMW or SeqCst store the caller made): wakes
    /// sleepers if PARKED is set.
    #[inline]
    pub(crate) fn wake_if_parked(&self) {
        wake_if_parked(self.state, self.seq);
    }

    /// One attempt at a biased read through row `row` of process `me`.
    /// `None`: the slot is not biased (or no longer), or busy, or stale,
    /// or the row is full; the caller takes the lane path, which decides.
    ///
    /// Why it excludes writers: the grant needs BIASED and no WRITER on the
    /// SeqCst re-load that follows the SeqCst publish. BIASED is cleared
    /// only by a writer's grant, and every claim sets WRITER. A claim that
    /// precedes the re-load in the SC order is seen (we back off); a claim
    /// after it finds BIASED set (any grant that cleared it would need an
    /// earlier claim), so it scans the rows after its claim and sees our
    /// entry, which precedes the claim. Identity: as for a lane read, our
    /// published entry keeps the slot from being retired (retirement scans
    /// the rows of a BIASED slot), so the tag read after the re-load is
    /// exact even if GEN wrapped meanwhile.
    #[inline(always)]
    pub(crate) fn try_read_biased(&self, me: u32, row: u32, id: Ident) -> Option<Granted> {
        let s = self.state.load(Ordering::Acquire);
        if s & BIASED == 0 || !is_active(s, id.gen) || writer(s) != 0 {
            return None;
        }
        let entry = self.publish_biased(me, row)?;
        let s = self.state.load(Ordering::SeqCst);
        if s & BIASED != 0 && is_active(s, id.gen) && writer(s) == 0 && self.has_tag(id.tag) {
            return Some(Granted {
                owner_died: s & OWNER_DIED != 0,
                entry_plus_one: entry + 1,
            });
        }
        // A claim, a retirement or a reuse came first: leave (a revoking
        // writer may sleep on our entry) and let the lane path decide.
        if let Some(e) = self.rows.get(entry as usize) {
            back_off_biased(self.biased_hold(e));
        }
        None
    }

    /// Re-bias: a lane reader that holds its read and found `s` (its
    /// SeqCst re-load) with no WRITER, UPGRADER or WRITER_WAITING sets
    /// BIASED once the cooling window has passed. One CAS (SeqCst) from
    /// exactly `s`: it fails if a claim came first (that claim did not
    /// need to scan), and a claim after it sees BIASED and scans. A failed
    /// CAS is left alone; the next lane read tries again.
    #[inline]
    fn maybe_rebias(&self, s: u64) {
        if s & (BIASED | WRITER_MASK | UPGRADER_MASK | WRITER_WAITING) != 0 {
            return;
        }
        let until = self.bias_until.load(Ordering::Relaxed);
        if until != 0 && sync::monotonic_ns() < until {
            return;
        }
        let _ = self
            .state
            .compare_exchange(s, s | BIASED, Ordering::SeqCst, Ordering::Relaxed);
    }

    /// Announces one more read hold of `me` if the lane stays within
    /// `bound` (a CAS, so the count never passes the bound even
    /// transiently). SeqCst: first half of the reader's Dekker pair. (A
    /// `fetch_add` undone at the bound is as correct and a nanosecond
    /// cheaper, but it multiplied the loom recovery models' state space by
    /// 15.)
    #[inline]
    fn lane_add_reader(&self, me: u32, bound: u32) -> bool {
        let lane = self.lane(me);
        let mut cur = lane.load(Ordering::Relaxed);
        loop {
            if lane_readers(cur) >= bound {
                return false;
            }
            match lane.compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }

    /// Drops one read hold of `me`, then wakes sleepers if any are marked.
    /// SeqCst sub then SeqCst load: the releaser's half of the Dekker pair
    /// with a sleeper's "set PARKED, re-check lanes".
    #[inline]
    fn lane_remove_reader(&self, me: u32) {
        self.lane(me).fetch_sub(1, Ordering::SeqCst);
        sync::dekker_fence();
        if self.state.load(Ordering::SeqCst) & PARKED != 0 {
            self.wake_all();
        }
    }

    /// Marks one waiting thread of `me` in its lane. SeqCst: a retirement's
    /// lane scan (after its SeqCst ACTIVE -> RETIRING) either sees the mark
    /// and keeps the slot, or the waiter's next state check sees RETIRING.
    /// A writer marks itself before it sets WRITER_WAITING, so a mark that
    /// nobody backs (its writer died) is found by recovery in the lane.
    fn lane_add_waiter(&self, me: u32) -> bool {
        let lane = self.lane(me);
        let mut cur = lane.load(Ordering::Relaxed);
        loop {
            if lane_waiters(cur) >= LANE_WAITERS_MAX {
                return false;
            }
            match lane.compare_exchange_weak(
                cur,
                cur + LANE_WAITER_ONE,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }

    fn lane_remove_waiter(&self, me: u32) {
        self.lane(me).fetch_sub(LANE_WAITER_ONE, Ordering::SeqCst);
    }

    /// Clears PARKED and wakes every sleeper. The seq bump comes after the
    /// state change the caller made, so a sleeper that read seq before it
    /// cannot sleep through it (FUTEX_WAIT compares the value atomically).
    pub(crate) fn wake_all(&self) {
        wake_all(self.state, self.seq);
    }

    /// Bumps `seq` and wakes every sleeper. Callers have already changed
    /// the state and cleared PARKED (having seen it set).
    fn wake_sleepers(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        sync::futex_wake_all(self.seq);
    }

    /// Applies `change` to the state word in a CAS loop, clearing PARKED in
    /// the same step, and wakes sleepers if PARKED was set.
    #[inline]
    fn update_and_wake(&self, change: impl Fn(u64) -> u64) {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            let next = change(cur) & !PARKED;
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        if cur & PARKED != 0 {
            self.wake_sleepers();
        }
    }

    /// Clears `bits` from the state word and wakes sleepers if PARKED was set.
    #[inline]
    fn clear_and_wake(&self, bits: u64) -> u64 {
        let old = self.state.fetch_and(!(bits | PARKED), Ordering::SeqCst);
        if old & PARKED != 0 {
            self.wake_sleepers();
        }
        old
    }

    // -----------------------------------------------------------------
    // Read
    // -----------------------------------------------------------------

    /// One attempt to take a read hold.
    ///
    /// Identity: after the announcement (lane +1, SeqCst) no retirement can
    /// take the slot away (its lane scan would see us), and the SeqCst state
    /// load that follows sees any retirement already under way. So the tag
    /// read after that load is the tag of the ID we now hold, and it stays
    /// so until we leave: comparing it with ours is exact even if GEN
    /// wrapped while we were stalled between the lookup and here.
    #[inline]
    /// With `rebias` (the caller has a reader row), a granted lane read
    /// may set BIASED again (`maybe_rebias`).
    pub(crate) fn try_read_once(&self, me: u32, id: Ident, rebias: bool) -> Result<Granted, Fail> {
        let s = self.state.load(Ordering::Acquire);
        if !is_active(s, id.gen) {
            return Err(Fail::Stale);
        }
        if writer(s) != 0 {
            return Err(Fail::Busy);
        }
        if !self.lane_add_reader(me, MAX_READS_PER_PROCESS) {
            return Err(if self.has_tag(id.tag) {
                Fail::HoldLimit
            } else {
                Fail::Stale
            });
        }
        sync::dekker_fence();
        let s = self.state.load(Ordering::SeqCst);
        if !is_active(s, id.gen) || !self.has_tag(id.tag) {
            self.lane_remove_reader(me);
            return Err(Fail::Stale);
        }
        if writer(s) != 0 {
            // A writer claimed the slot between our two loads: it may be
            // waiting for our lane to drain, so leave and wake it.
            self.lane_remove_reader(me);
            return Err(Fail::Busy);
        }
        if rebias {
            self.maybe_rebias(s);
        }
        Ok(Granted::of_state(s))
    }

    /// One attempt at a read: biased through `row` if the slot is biased
    /// and the row has a free entry, else through the lane. `row: None`
    /// (no row for this thread) takes the lane path only.
    #[inline]
    fn try_read_any(&self, me: u32, row: Option<u32>, id: Ident) -> Result<Granted, Fail> {
        if let Some(row) = row {
            if let Some(granted) = self.try_read_biased(me, row, id) {
                return Ok(granted);
            }
        }
        self.try_read_once(me, id, row.is_some())
    }

    #[inline]
    pub(crate) fn read(
        &self,
        me: u32,
        row: Option<u32>,
        id: Ident,
        wait: Wait,
        host: &dyn Host,
    ) -> Result<Granted, Fail> {
        let first = self.try_read_any(me, row, id);
        let (Some(deadline), Err(Fail::Busy)) = (wait, first) else {
            return first;
        };
        let mut waiting = Waiting::new(self, me, deadline, host);
        loop {
            waiting.wait_until(|s| !is_active(s, id.gen) || writer(s) == 0, || false)?;
            match self.try_read_any(me, row, id) {
                Err(Fail::Busy) => {}
                other => return other,
            }
        }
    }

    #[inline]
    pub(crate) fn release_read(&self, me: u32) {
        self.lane_remove_reader(me);
    }

    // -----------------------------------------------------------------
    // Upgradable
    // -----------------------------------------------------------------

    /// One attempt at an upgradable hold: a CAS setting UPGRADER. Then the
    /// identity check (the claim keeps the slot from being retired, so the
    /// tag read after it is exact, as for a read) and the hold bound: a
    /// process whose lane already holds the reserved read (the downgrade of
    /// an earlier upgradable or write hold) could not downgrade this one.
    #[inline]
    fn try_upgradable_once(&self, me: u32, id: Ident) -> Result<Granted, Fail> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if !is_active(s, id.gen) {
                return Err(Fail::Stale);
            }
            if writer(s) != 0 || upgrader(s) != 0 || s & WRITER_WAITING != 0 {
                return Err(Fail::Busy);
            }
            match self.state.compare_exchange_weak(
                s,
                s | upgrader_field(me),
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(v) => s = v,
            }
        }
        let fail = if !self.has_tag(id.tag) {
            Fail::Stale
        } else if lane_readers(self.lane(me).load(Ordering::Acquire)) > MAX_READS_PER_PROCESS {
            Fail::HoldLimit
        } else {
            return Ok(Granted::of_state(s));
        };
        self.release_upgradable();
        Err(fail)
    }

    #[inline]
    pub(crate) fn upgradable(
        &self,
        me: u32,
        id: Ident,
        wait: Wait,
        host: &dyn Host,
    ) -> Result<Granted, Fail> {
        let Some(deadline) = wait else {
            return self.try_upgradable_once(me, id);
        };
        let mut waiting = Waiting::new(self, me, deadline, host);
        loop {
            match self.try_upgradable_once(me, id) {
                Err(Fail::Busy) => waiting.still_serves(id)?,
                other => return other,
            }
            waiting.wait_until(
                |s| {
                    !is_active(s, id.gen)
                        || (writer(s) == 0 && upgrader(s) == 0 && s & WRITER_WAITING == 0)
                },
                || false,
            )?;
        }
    }

    /// Gives up UPGRADER. WRITER_WAITING stays: the writer it protects
    /// still waits, and no new upgradable hold may pass it.
    #[inline]
    pub(crate) fn release_upgradable(&self) {
        self.clear_and_wake(UPGRADER_MASK);
    }

    // -----------------------------------------------------------------
    // Write
    // -----------------------------------------------------------------

    /// Claims the WRITER field (pending) if no writer or upgrader holds it,
    /// clearing WRITER_WAITING (a writer gets in: the mark did its job).
    /// With `announce` (a waiting writer, marked in its lane), a writer
    /// blocked only by an upgrader sets WRITER_WAITING so that no new
    /// upgradable hold overtakes it. After a claim, the identity check: the
    /// claim keeps the slot from being retired, so the tag is exact.
    #[inline]
    ///
    /// Returns the state the claim replaced (its BIASED bit says whether
    /// the drain must scan the reader rows).
    pub(crate) fn try_claim_writer(&self, me: u32, id: Ident, announce: bool) -> Result<u64, Fail> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if !is_active(s, id.gen) {
                return Err(Fail::Stale);
            }
            let new = if writer(s) == 0 && upgrader(s) == 0 {
                (s | writer_field(me)) & !WRITER_WAITING
            } else if announce && writer(s) == 0 && s & WRITER_WAITING == 0 {
                if !self.has_tag(id.tag) {
                    return Err(Fail::Stale);
                }
                s | WRITER_WAITING
            } else {
                return Err(Fail::Busy);
            };
            match self
                .state
                .compare_exchange_weak(s, new, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) if new & WRITER_MASK != 0 => break,
                Ok(_) => return Err(Fail::Busy),
                Err(v) => s = v,
            }
        }
        if self.has_tag(id.tag) {
            Ok(s)
        } else {
            self.abandon_writer();
            Err(Fail::Stale)
        }
    }

    /// With the WRITER field ours, waits for every reader lane to drain
    /// and, if the slot was `biased` when we claimed it, every reader row
    /// (the revocation), then sets WRITE_LOCKED, consumes OWNER_DIED and
    /// clears BIASED. Nobody else changes BIASED while WRITER is ours (a
    /// re-bias needs WRITER = 0), so `biased` stays true until our grant.
    /// A claimant that gives up leaves BIASED set, so the next claimant
    /// scans the rows again. After a revocation, `bias_until` is set to
    /// the end of the cooling window (Relaxed: only a heuristic).
    #[inline]
    fn drain_readers(
        &self,
        waiting: Option<&mut Waiting<'_, 'a>>,
        biased: bool,
    ) -> Result<Granted, Fail> {
        sync::dekker_fence();
        let started = biased.then(sync::monotonic_ns);
        if biased {
            self.barrier_before_row_scan();
        }
        if !self.readers_drained(biased) {
            let Some(waiting) = waiting else {
                return Err(Fail::Busy);
            };
            loop {
                // After PARKED: a plain release's store may still sit in
                // its CPU's store buffer while its PARKED load ran; the
                // barrier makes the re-scan see it, or the releaser see
                // PARKED.
                let drained_after_park = || {
                    if biased {
                        self.barrier_before_row_scan();
                    }
                    self.readers_drained(biased)
                };
                waiting.wait_until(|_| false, drained_after_park)?;
                if self.readers_drained(biased) {
                    break;
                }
            }
        }
        if let Some(started) = started {
            let now = sync::monotonic_ns();
            let took = now.saturating_sub(started).max(1);
            self.bias_until.store(
                now.saturating_add(took.saturating_mul(BIAS_COOLING_FACTOR)),
                Ordering::Relaxed,
            );
        }
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let new = (s | WRITE_LOCKED) & !(OWNER_DIED | BIASED);
            match self
                .state
                .compare_exchange_weak(s, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(v) => s = v,
            }
        }
        let died = s & OWNER_DIED != 0;
        Ok(Granted {
            owner_died: died,
            entry_plus_one: 0,
        })
    }

    #[inline]
    pub(crate) fn write(
        &self,
        me: u32,
        id: Ident,
        wait: Wait,
        host: &dyn Host,
    ) -> Result<Granted, Fail> {
        let Some(deadline) = wait else {
            return self.try_write_once(me, id);
        };
        let mut waiting = Waiting::new(self, me, deadline, host);
        let claimed = self.claim_writer_waiting(me, id, &mut waiting);
        if claimed.is_err() && waiting.marked {
            // We may have set WRITER_WAITING: take it back (other waiting
            // writers are woken and set it again).
            self.withdraw_writer_waiting();
        }
        let claimed = claimed?;
        self.drain_readers(Some(&mut waiting), claimed & BIASED != 0)
            .inspect_err(|_| self.abandon_writer())
    }

    /// A try: no claim at all while readers are visible, so a try that
    /// fails because of them leaves nothing that could fail another try.
    /// (A reader that arrives between this check and the claim races with
    /// us; then both may fail, as racing tries may.)
    #[inline]
    fn try_write_once(&self, me: u32, id: Ident) -> Result<Granted, Fail> {
        if !self.readers_drained(false) || !self.rows_drained_if_biased() {
            let s = self.state.load(Ordering::Acquire);
            return Err(if is_active(s, id.gen) {
                Fail::Busy
            } else {
                Fail::Stale
            });
        }
        let claimed = self.try_claim_writer(me, id, false)?;
        self.drain_readers(None, claimed & BIASED != 0)
            .inspect_err(|_| self.abandon_writer())
    }

    /// A try's look before it claims anything: false if the slot is
    /// BIASED and a row holds it (so a failing try leaves no trace).
    fn rows_drained_if_biased(&self) -> bool {
        self.state.load(Ordering::Acquire) & BIASED == 0
            || self.rows_drained(self.lanes_in_use.load(Ordering::SeqCst) as usize)
    }

    /// The claim phase of a waiting writer. It announces itself
    /// (WRITER_WAITING) only once it is marked in its lane, after the spin
    /// phase: the mark is what lets recovery clear a dead writer's bit.
    fn claim_writer_waiting(
        &self,
        me: u32,
        id: Ident,
        waiting: &mut Waiting<'_, 'a>,
    ) -> Result<u64, Fail> {
        loop {
            match self.try_claim_writer(me, id, waiting.marked) {
                Ok(s) => return Ok(s),
                Err(Fail::Busy) => waiting.still_serves(id)?,
                Err(other) => return Err(other),
            }
            waiting.wait_until(
                |s| {
                    !is_active(s, id.gen)
                        || writer(s) == 0 && (upgrader(s) == 0 || s & WRITER_WAITING == 0)
                },
                || false,
            )?;
        }
    }

    /// A waiting writer gives up (timeout, stale slot): clears the
    /// WRITER_WAITING mark it may have set and wakes everyone, so that
    /// upgradable requests proceed and other waiting writers set it again.
    fn withdraw_writer_waiting(&self) {
        if self.state.load(Ordering::Acquire) & WRITER_WAITING != 0 {
            self.clear_and_wake(WRITER_WAITING);
        }
    }

    /// Gives up a pending WRITER claim (try failed or timed out): readers
    /// that backed off because of it may be asleep.
    #[inline]
    fn abandon_writer(&self) {
        self.clear_and_wake(WRITER_MASK | WRITE_LOCKED);
    }

    #[inline]
    pub(crate) fn release_write(&self) {
        self.clear_and_wake(WRITER_MASK | WRITE_LOCKED);
    }

    // -----------------------------------------------------------------
    // Upgrade and downgrade
    // -----------------------------------------------------------------

    /// Turns our upgradable hold into a pending write (UPGRADER -> WRITER),
    /// then drains readers. No other writer or upgrader can exist while we
    /// hold UPGRADER, so this never waits for anything but readers and
    /// cannot deadlock. On failure the upgradable hold is restored. A try
    /// with readers visible changes nothing at all (no trace for other
    /// tries).
    pub(crate) fn upgrade(&self, me: u32, wait: Wait, host: &dyn Host) -> Result<Granted, Fail> {
        if wait.is_none() && (!self.readers_drained(false) || !self.rows_drained_if_biased()) {
            return Err(Fail::Busy);
        }
        let biased = self.begin_upgrade(me) & BIASED != 0;
        let result = match wait {
            None => self.drain_readers(None, biased),
            Some(deadline) => {
                let mut waiting = Waiting::new(self, me, deadline, host);
                self.drain_readers(Some(&mut waiting), biased)
            }
        };
        if result.is_err() {
            self.writer_to_upgrader(me);
        }
        result
    }

    /// First step of an upgrade: UPGRADER -> pending WRITER in one CAS.
    /// WRITER_WAITING stays for the writers still waiting. Returns the
    /// state it replaced (BIASED: the drain scans the rows).
    pub(crate) fn begin_upgrade(&self, me: u32) -> u64 {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            debug_assert_eq!(upgrader(s), me + 1);
            let new = (s & !UPGRADER_MASK) | writer_field(me);
            match self
                .state
                .compare_exchange_weak(s, new, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => return s,
                Err(v) => s = v,
            }
        }
    }

    /// WRITER (pending or granted) -> UPGRADER in one CAS: the failed
    /// upgrade's way back, and the write -> upgradable downgrade.
    fn writer_to_upgrader(&self, me: u32) {
        self.update_and_wake(|s| (s & !(WRITER_MASK | WRITE_LOCKED)) | upgrader_field(me));
    }

    /// Adds the read of a downgrade. It has room by construction: plain
    /// reads stop one below the lane's bound, and only the ID's single
    /// upgradable or write hold (ours) may take the last read; an
    /// upgradable grant to a process that already used it is refused
    /// (`HoldLimit`). False only for a lane that a corrupt table filled.
    fn add_reader_for_downgrade(&self, me: u32) -> bool {
        self.lane_add_reader(me, MAX_LANE_READERS)
    }

    /// Write -> read, atomically with respect to other writers: the read
    /// hold is announced before WRITER is cleared. False (the write hold is
    /// kept) only if a corrupt table left no room in the lane.
    pub(crate) fn downgrade_write_to_read(&self, me: u32) -> bool {
        if !self.add_reader_for_downgrade(me) {
            return false;
        }
        self.clear_and_wake(WRITER_MASK | WRITE_LOCKED);
        true
    }

    /// Write -> upgradable in one CAS.
    pub(crate) fn downgrade_write_to_upgradable(&self, me: u32) {
        self.writer_to_upgrader(me);
    }

    /// Upgradable -> read: announce the read, then give up UPGRADER. False
    /// (the upgradable hold is kept) only for a lane a corrupt table filled.
    pub(crate) fn downgrade_upgradable_to_read(&self, me: u32) -> bool {
        if !self.add_reader_for_downgrade(me) {
            return false;
        }
        self.release_upgradable();
        true
    }

    // -----------------------------------------------------------------
    // Recovery
    // -----------------------------------------------------------------

    /// Releases every hold of the dead process `dead` on this slot: its
    /// lane (reads and waiter marks), its WRITER claim (setting OWNER_DIED
    /// if it held the lock) and its UPGRADER. Idempotent, and exact whatever
    /// instruction `dead` stopped at, because each of these fields is written
    /// only by `dead` itself. The caller must guarantee `dead` is dead and
    /// its index is not reused before the sweep ends (the lease does).
    /// Returns true if anything was released.
    ///
    /// WRITER_WAITING is shared by every waiting writer, so it names
    /// nobody. If `dead` had waiters marked (it may have been the writer
    /// that set it), the bit is cleared and everyone is woken: live waiting
    /// writers set it again.
    pub(crate) fn recover_process(&self, dead: u32) -> bool {
        // An index past the lanes can only come from a corrupt word: there
        // is no lane to clear, but the fields naming it are cleared below.
        let lane_had = self
            .lanes
            .get(dead as usize)
            .map_or(0, |l| l.swap(0, Ordering::SeqCst));
        let mut changed = lane_readers(lane_had) != 0;
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let mut new = s;
            if writer(s) == dead + 1 {
                new &= !(WRITER_MASK | WRITE_LOCKED);
                if s & WRITE_LOCKED != 0 {
                    new |= OWNER_DIED;
                }
            }
            if upgrader(s) == dead + 1 {
                new &= !UPGRADER_MASK;
            }
            if lane_waiters(lane_had) != 0 {
                new &= !WRITER_WAITING;
            }
            if new == s {
                break;
            }
            match self
                .state
                .compare_exchange_weak(s, new, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => {
                    changed = true;
                    break;
                }
                Err(v) => s = v,
            }
        }
        if changed || lane_had != 0 {
            sync::dekker_fence();
            self.wake_all();
        }
        changed
    }

    /// Tries to retire an idle ACTIVE slot of generation `g` so it can serve
    /// another ID. Only the holder of the slot's bucket lock calls this.
    /// Idle: no writer or upgrader, every lane zero (no read hold, no
    /// registered waiter), and, unless `even_owner_died`, no unreported
    /// owner death (the caller then carries the mark, see the index).
    /// ACTIVE -> RETIRING is the writer side of a Dekker pair with
    /// `try_read_once` (lane add, then state load).
    ///
    /// PARKED and WRITER_WAITING do not block retirement: a waiter that is
    /// still waiting (a waiting writer included) is registered in its lane,
    /// so either bit alone is a stray mark (a waiter that saw the slot change
    /// and left, or one that died). Leaving it would pin the slot forever.
    /// Anyone who might sleep on the slot is woken when it goes FREE and
    /// finds it stale.
    pub(crate) fn try_retire(&self, g: u32, even_owner_died: bool) -> bool {
        let s = self.state.load(Ordering::Acquire);
        let mut busy = WRITER_MASK | UPGRADER_MASK;
        if !even_owner_died {
            busy |= OWNER_DIED;
        }
        if !is_active(s, g) || s & busy != 0 {
            return false;
        }
        if !self.begin_retire(s) {
            return false;
        }
        sync::dekker_fence();
        if s & BIASED != 0 {
            self.barrier_before_row_scan();
        }
        let lanes = self.used_lanes();
        // A BIASED slot may have biased readers: the rows are checked as
        // the lanes are (the ACTIVE -> RETIRING CAS is the claimant's half
        // of the Dekker pair with a biased reader's publish and re-load;
        // with asymmetric fences, the barrier just above completes it).
        if lanes.iter().all(|l| l.load(Ordering::SeqCst) == 0)
            && (s & BIASED == 0 || self.rows_drained(lanes.len()))
        {
            self.set_phase_and_wake(PHASE_FREE);
            true
        } else {
            self.abandon_retirement();
            false
        }
    }

    /// First step of a retirement: ACTIVE -> RETIRING (SeqCst), from the
    /// state `s` the caller found idle.
    pub(crate) fn begin_retire(&self, s: u64) -> bool {
        let retiring = (s & !PHASE_MASK) | PHASE_RETIRING;
        self.state
            .compare_exchange(s, retiring, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
    }

    /// RETIRING -> ACTIVE with the same generation: the slot keeps serving
    /// its ID. Used when a retirement finds a reader, and by the repair of
    /// a retirer that died (which cannot know whether its lane scan would
    /// have found one).
    pub(crate) fn abandon_retirement(&self) {
        self.set_phase_and_wake(PHASE_ACTIVE);
    }

    /// Sets the phase (keeping GEN), clears PARKED and wakes sleepers if
    /// it was set: they re-check and find the slot active or stale.
    fn set_phase_and_wake(&self, phase: u64) {
        self.update_and_wake(|s| (s & !PHASE_MASK) | phase);
    }
}

/// State of one blocking acquisition: spin budget, deadline, the liveness
/// poll, and this process's waiter mark in its lane.
struct Waiting<'h, 'a> {
    slot: SlotRef<'a>,
    me: u32,
    deadline: Option<sync::Instant>,
    host: &'h dyn Host,
    spins: u32,
    /// This thread is counted in its lane's WAITERS (from its first park).
    marked: bool,
    /// When the current poll interval started (first park, or last check).
    poll_base: Option<sync::Instant>,
}

impl<'h, 'a> Waiting<'h, 'a> {
    /// Between attempts: a slot that serves another ID now (its GEN may
    /// have wrapped while we spun, before our waiter mark pinned it) is
    /// stale; do not wait on another ID's holders.
    fn still_serves(&self, id: Ident) -> Result<(), Fail> {
        if self.slot.has_tag(id.tag) {
            Ok(())
        } else {
            Err(Fail::Stale)
        }
    }

    fn new(
        slot: &SlotRef<'a>,
        me: u32,
        deadline: Option<sync::Instant>,
        host: &'h dyn Host,
    ) -> Self {
        Waiting {
            slot: *slot,
            me,
            deadline,
            host,
            spins: 0,
            marked: false,
            poll_base: None,
        }
    }

    /// Waits until `state_ok(state)` or `other_ok()` may have become true
    /// (callers re-check; returning early is always allowed), or the
    /// deadline passes (`Err(Timeout)`). The deadline is checked first, in
    /// the spin phase too, so a zero or short timeout does not spin.
    ///
    /// Protocol: read `seq`, set PARKED, re-check the condition, then
    /// `futex_wait(seq, seen)`. A releaser changes the state first, then
    /// reads PARKED, then bumps `seq`: either the re-check sees the release,
    /// or the releaser sees PARKED and its bump makes the wait return.
    fn wait_until(
        &mut self,
        state_ok: impl Fn(u64) -> bool,
        other_ok: impl Fn() -> bool,
    ) -> Result<(), Fail> {
        let s = &self.slot;
        let now = self.deadline.map(|d| (sync::now(), d));
        if let Some((now, d)) = now {
            if now >= d {
                return Err(Fail::Timeout);
            }
        }
        if self.spins < SPIN_LIMIT {
            self.spins += 1;
            for _ in 0..(1u32 << self.spins.min(6)) {
                sync::spin_hint();
            }
            return Ok(());
        }
        let now = now.map_or_else(sync::now, |(n, _)| n);
        if !self.marked {
            self.marked = self.slot.lane_add_waiter(self.me);
        }
        let seen = s.seq.load(Ordering::SeqCst);
        s.state.fetch_or(PARKED, Ordering::SeqCst);
        sync::dekker_fence();
        if state_ok(s.state.load(Ordering::SeqCst)) || other_ok() {
            return Ok(());
        }
        let poll = self.host.poll_interval();
        let poll_base = *self.poll_base.get_or_insert(now);
        let mut timeout = self.deadline.map(|d| d.saturating_duration_since(now));
        if let Some(p) = poll {
            let until_poll = p.saturating_sub(now.saturating_duration_since(poll_base));
            timeout = Some(timeout.map_or(until_poll, |t| t.min(until_poll)));
        }
        if timeout != Some(Duration::ZERO) {
            self.host.watch_holders(self.slot);
            sync::futex_wait(s.seq, seen, timeout);
        }
        if let Some(p) = poll {
            let now = sync::now();
            if now.saturating_duration_since(poll_base) >= p {
                // Waited a whole poll interval: are the holders alive?
                self.poll_base = Some(now);
                self.host.recover_stalled(self.slot);
            }
        }
        Ok(())
    }
}

impl Drop for Waiting<'_, '_> {
    fn drop(&mut self) {
        if self.marked {
            self.slot.lane_remove_waiter(self.me);
        }
    }
}
