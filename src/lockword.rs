//! The lock word of one slot and the reader/writer/upgradable protocol on it.
//!
//! Owns: the bit layout of a slot's `state` word and of its per-process
//! `lanes`, and every transition between lock modes (acquire, release,
//! upgrade, downgrade, timed waits, recovery of a dead process's holds).
//!
//! May not touch: where a slot lives (the table), which ID it serves (the
//! table's lookup checks the generation this module returns), or how a
//! process is judged dead (the [`Host`] decides). It works on a [`SlotRef`]:
//! references to atomics that live in the shared mapping in real builds and
//! in a heap region under loom, so this exact code is model-checked.
//!
//! # The `state` word (`u64`)
//!
//! ```text
//!  63            40 39        24 23        8 7 6 5 4 3 2 1 0
//! +----------------+------------+-----------+-+-+-+-+-+-+---+
//! |  GEN (24 bits) |  UPGRADER  |  WRITER   |R|R|D|W|L|P|PH |
//! +----------------+------------+-----------+-+-+-+-+-+-+---+
//! PH  (2 bits) phase: 0 FREE, 1 ACTIVE, 2 RETIRING
//! P   PARKED: some thread sleeps (or is about to) on this slot's futex
//! L   WRITE_LOCKED: WRITER drained every reader and holds the lock
//! W   WRITER_WAITING: a writer waits for the UPGRADER to leave (blocks
//!     new upgradable grants; set only while UPGRADER != 0)
//! D   OWNER_DIED: the last write holder died holding the lock
//! R   reserved (bit 6: reader bias for per-thread reader indicators)
//! WRITER   process index + 1 of the writer (0 = none). With L clear the
//!          writer is *pending*: it has excluded other writers, upgraders and
//!          new readers, and waits for the readers to drain.
//! UPGRADER process index + 1 of the upgradable holder (0 = none)
//! GEN      bumped each time the slot is given to a new ID
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
//! instruction the lane says exactly what the dead process held. Holds are
//! bounded at `MAX_READS_PER_PROCESS` (0xFFFF) by a CAS, so READERS never
//! carries into WAITERS. WAITERS is informational (stats) and saturates.

use std::time::Duration;

use crate::sync::{self, AtomicU32, AtomicU64, Ordering};

pub(crate) const PHASE_MASK: u64 = 0b11;
pub(crate) const PHASE_FREE: u64 = 0;
pub(crate) const PHASE_ACTIVE: u64 = 1;
pub(crate) const PHASE_RETIRING: u64 = 2;
pub(crate) const PARKED: u64 = 1 << 2;
pub(crate) const WRITE_LOCKED: u64 = 1 << 3;
pub(crate) const WRITER_WAITING: u64 = 1 << 4;
pub(crate) const OWNER_DIED: u64 = 1 << 5;
const WRITER_SHIFT: u32 = 8;
const UPGRADER_SHIFT: u32 = 24;
const GEN_SHIFT: u32 = 40;
pub(crate) const WRITER_MASK: u64 = 0xFFFF << WRITER_SHIFT;
pub(crate) const UPGRADER_MASK: u64 = 0xFFFF << UPGRADER_SHIFT;
pub(crate) const GEN_MASK: u64 = 0xFF_FFFF << GEN_SHIFT;

/// Largest number of read holds one process may have on one ID.
pub const MAX_READS_PER_PROCESS: u32 = 0xFFFF;
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
    (g + 1) & 0xFF_FFFF
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

/// The atomics of one slot. Borrowed from the mapping (or the loom heap).
#[derive(Clone, Copy)]
pub(crate) struct SlotRef<'a> {
    pub(crate) state: &'a AtomicU64,
    /// Futex word: bumped by every wake so a sleeper never misses one.
    pub(crate) seq: &'a AtomicU32,
    pub(crate) lanes: &'a [AtomicU32],
    /// Table-wide high-water mark of attached process indices (+1): lanes
    /// at or past it have never been used, so drain checks stop there.
    pub(crate) lanes_in_use: &'a AtomicU32,
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
    /// This process already holds `MAX_READS_PER_PROCESS` reads of the ID.
    HoldLimit,
}

/// A granted hold. `owner_died` reports OWNER_DIED as seen at acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Granted {
    pub(crate) owner_died: bool,
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
        v
    }

    #[inline]
    fn lane(&self, me: u32) -> &'a AtomicU32 {
        &self.lanes[me as usize]
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

    /// True when no process has a read hold on this slot.
    #[inline]
    fn readers_drained(&self) -> bool {
        self.used_lanes()
            .iter()
            .all(|l| lane_readers(l.load(Ordering::SeqCst)) == 0)
    }

    /// Announces one more read hold of `me`, bounded (a CAS, so the count
    /// never passes the bound even transiently). SeqCst: first half of the
    /// reader's Dekker pair. (A `fetch_add` undone at the bound is as
    /// correct and a nanosecond cheaper, but it multiplied the loom
    /// recovery models' state space by 15.)
    #[inline]
    fn lane_add_reader(&self, me: u32) -> bool {
        let lane = self.lane(me);
        let mut cur = lane.load(Ordering::Relaxed);
        loop {
            if lane_readers(cur) >= MAX_READS_PER_PROCESS {
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
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }

    fn lane_remove_waiter(&self, me: u32) {
        self.lane(me).fetch_sub(LANE_WAITER_ONE, Ordering::Relaxed);
    }

    /// Clears PARKED and wakes every sleeper. The seq bump comes after the
    /// state change the caller made, so a sleeper that read seq before it
    /// cannot sleep through it (FUTEX_WAIT compares the value atomically).
    pub(crate) fn wake_all(&self) {
        self.state.fetch_and(!PARKED, Ordering::SeqCst);
        self.wake_sleepers();
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
    #[inline]
    pub(crate) fn try_read_once(&self, me: u32, g: u32) -> Result<Granted, Fail> {
        let s = self.state.load(Ordering::Acquire);
        if !is_active(s, g) {
            return Err(Fail::Stale);
        }
        if writer(s) != 0 {
            return Err(Fail::Busy);
        }
        if !self.lane_add_reader(me) {
            return Err(Fail::HoldLimit);
        }
        sync::dekker_fence();
        let s = self.state.load(Ordering::SeqCst);
        if !is_active(s, g) {
            self.lane_remove_reader(me);
            return Err(Fail::Stale);
        }
        if writer(s) != 0 {
            // A writer claimed the slot between our two loads: it may be
            // waiting for our lane to drain, so leave and wake it.
            self.lane_remove_reader(me);
            return Err(Fail::Busy);
        }
        Ok(Granted {
            owner_died: s & OWNER_DIED != 0,
        })
    }

    #[inline]
    pub(crate) fn read(
        &self,
        me: u32,
        g: u32,
        wait: Wait,
        host: &dyn Host,
    ) -> Result<Granted, Fail> {
        let first = self.try_read_once(me, g);
        let (Some(deadline), Err(Fail::Busy)) = (wait, first) else {
            return first;
        };
        let mut waiting = Waiting::new(self, me, deadline, host);
        loop {
            waiting.wait_until(|s| !is_active(s, g) || writer(s) == 0, || false)?;
            match self.try_read_once(me, g) {
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

    #[inline]
    fn try_upgradable_once(&self, me: u32, g: u32) -> Result<Granted, Fail> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if !is_active(s, g) {
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
                Ok(_) => {
                    return Ok(Granted {
                        owner_died: s & OWNER_DIED != 0,
                    })
                }
                Err(v) => s = v,
            }
        }
    }

    #[inline]
    pub(crate) fn upgradable(
        &self,
        me: u32,
        g: u32,
        wait: Wait,
        host: &dyn Host,
    ) -> Result<Granted, Fail> {
        let Some(deadline) = wait else {
            return self.try_upgradable_once(me, g);
        };
        let mut waiting = Waiting::new(self, me, deadline, host);
        loop {
            match self.try_upgradable_once(me, g) {
                Err(Fail::Busy) => {}
                other => return other,
            }
            waiting.wait_until(
                |s| {
                    !is_active(s, g)
                        || (writer(s) == 0 && upgrader(s) == 0 && s & WRITER_WAITING == 0)
                },
                || false,
            )?;
        }
    }

    #[inline]
    pub(crate) fn release_upgradable(&self) {
        self.clear_and_wake(UPGRADER_MASK | WRITER_WAITING);
    }

    // -----------------------------------------------------------------
    // Write
    // -----------------------------------------------------------------

    /// Claims the WRITER field (pending) if no writer or upgrader holds it.
    /// With `announce`, a writer blocked only by an upgrader sets
    /// WRITER_WAITING so no new upgrader overtakes it.
    #[inline]
    pub(crate) fn try_claim_writer(&self, me: u32, g: u32, announce: bool) -> Result<(), Fail> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if !is_active(s, g) {
                return Err(Fail::Stale);
            }
            let new = if writer(s) == 0 && upgrader(s) == 0 {
                s | writer_field(me)
            } else if announce && writer(s) == 0 && s & WRITER_WAITING == 0 {
                s | WRITER_WAITING
            } else {
                return Err(Fail::Busy);
            };
            match self
                .state
                .compare_exchange_weak(s, new, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) if new & WRITER_MASK != 0 => return Ok(()),
                Ok(_) => return Err(Fail::Busy),
                Err(v) => s = v,
            }
        }
    }

    /// With the WRITER field ours, waits for every reader lane to drain,
    /// then sets WRITE_LOCKED and consumes OWNER_DIED.
    #[inline]
    fn drain_readers(&self, waiting: Option<&mut Waiting<'_, 'a>>) -> Result<Granted, Fail> {
        sync::dekker_fence();
        if !self.readers_drained() {
            let Some(waiting) = waiting else {
                return Err(Fail::Busy);
            };
            loop {
                waiting.wait_until(|_| false, || self.readers_drained())?;
                if self.readers_drained() {
                    break;
                }
            }
        }
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let new = (s | WRITE_LOCKED) & !OWNER_DIED;
            match self
                .state
                .compare_exchange_weak(s, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(v) => s = v,
            }
        }
        let died = s & OWNER_DIED != 0;
        Ok(Granted { owner_died: died })
    }

    #[inline]
    pub(crate) fn write(
        &self,
        me: u32,
        g: u32,
        wait: Wait,
        host: &dyn Host,
    ) -> Result<Granted, Fail> {
        let Some(deadline) = wait else {
            self.try_claim_writer(me, g, false)?;
            return self
                .drain_readers(None)
                .inspect_err(|_| self.abandon_writer());
        };
        let mut waiting = Waiting::new(self, me, deadline, host);
        loop {
            match self.try_claim_writer(me, g, true) {
                Ok(()) => break,
                Err(Fail::Busy) => {}
                Err(other) => return Err(other),
            }
            waiting.wait_until(
                |s| {
                    !is_active(s, g)
                        || writer(s) == 0 && (upgrader(s) == 0 || s & WRITER_WAITING == 0)
                },
                || false,
            )?;
        }
        self.drain_readers(Some(&mut waiting))
            .inspect_err(|_| self.abandon_writer())
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
    /// cannot deadlock. On failure the upgradable hold is restored.
    pub(crate) fn upgrade(&self, me: u32, wait: Wait, host: &dyn Host) -> Result<Granted, Fail> {
        self.begin_upgrade(me);
        let result = match wait {
            None => self.drain_readers(None),
            Some(deadline) => {
                let mut waiting = Waiting::new(self, me, deadline, host);
                self.drain_readers(Some(&mut waiting))
            }
        };
        if result.is_err() {
            self.writer_to_upgrader(me);
        }
        result
    }

    /// First step of an upgrade: UPGRADER -> pending WRITER in one CAS.
    pub(crate) fn begin_upgrade(&self, me: u32) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            debug_assert_eq!(upgrader(s), me + 1);
            let new = (s & !(UPGRADER_MASK | WRITER_WAITING)) | writer_field(me);
            match self
                .state
                .compare_exchange_weak(s, new, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(v) => s = v,
            }
        }
    }

    /// WRITER (pending or granted) -> UPGRADER in one CAS: the failed
    /// upgrade's way back, and the write -> upgradable downgrade.
    fn writer_to_upgrader(&self, me: u32) {
        self.update_and_wake(|s| (s & !(WRITER_MASK | WRITE_LOCKED)) | upgrader_field(me));
    }

    /// Adds a read hold for `me` while we hold the slot exclusively enough
    /// that the lane cannot be at its bound for long (only transient
    /// announcements of readers that are backing off can be there).
    fn add_reader_for_downgrade(&self, me: u32) {
        while !self.lane_add_reader(me) {
            sync::spin_hint();
        }
    }

    /// Write -> read, atomically with respect to other writers: the read
    /// hold is announced before WRITER is cleared.
    pub(crate) fn downgrade_write_to_read(&self, me: u32) {
        self.add_reader_for_downgrade(me);
        self.clear_and_wake(WRITER_MASK | WRITE_LOCKED);
    }

    /// Write -> upgradable in one CAS.
    pub(crate) fn downgrade_write_to_upgradable(&self, me: u32) {
        self.writer_to_upgrader(me);
    }

    /// Upgradable -> read: announce the read, then give up UPGRADER.
    pub(crate) fn downgrade_upgradable_to_read(&self, me: u32) {
        self.add_reader_for_downgrade(me);
        self.clear_and_wake(UPGRADER_MASK | WRITER_WAITING);
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
                new &= !(UPGRADER_MASK | WRITER_WAITING);
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
    /// Idle: no writer, upgrader, waiting writer or unreported owner death,
    /// and every lane zero (no read hold, no registered waiter). ACTIVE ->
    /// RETIRING is the writer side of a Dekker pair with `try_read_once`
    /// (lane add, then state load).
    ///
    /// PARKED does not block retirement: a waiter that is still waiting is
    /// registered in its lane, so PARKED alone is a stray mark (a waiter that
    /// saw the slot change and left, or one that died). Leaving it would pin
    /// the slot forever. Anyone who might sleep on the slot is woken when it
    /// goes FREE and finds it stale.
    pub(crate) fn try_retire(&self, g: u32) -> bool {
        let s = self.state.load(Ordering::Acquire);
        let busy = WRITER_MASK | UPGRADER_MASK | WRITER_WAITING | OWNER_DIED;
        if !is_active(s, g) || s & busy != 0 {
            return false;
        }
        if !self.begin_retire(s) {
            return false;
        }
        sync::dekker_fence();
        if self
            .used_lanes()
            .iter()
            .all(|l| l.load(Ordering::SeqCst) == 0)
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
    marked: bool,
    /// When the current poll interval started (first park, or last check).
    poll_base: Option<sync::Instant>,
}

impl<'h, 'a> Waiting<'h, 'a> {
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
    /// deadline passes (`Err(Timeout)`).
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
        if self.spins < SPIN_LIMIT {
            self.spins += 1;
            for _ in 0..(1u32 << self.spins.min(6)) {
                sync::spin_hint();
            }
            return Ok(());
        }
        let now = sync::now();
        if let Some(d) = self.deadline {
            if now >= d {
                return Err(Fail::Timeout);
            }
        }
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
