//! Model-checking entry points (only with `--cfg locktable_loom`).
//!
//! Owns: a thin public face over the crate-private lock-word, index and
//! recovery code running on a [`HeapRegion`] of loom atomics, so that
//! `loom-tests/` checks the very code the mapped table runs. Processes are
//! simulated by index; a "dead" process is one whose thread stopped and
//! whose `kill` flag is set, which is what the registry's lease tells real
//! waiters.

use std::time::Duration;

use crate::index::{self, Tag};
use crate::lockword::{self, Fail, Host, Ident, SlotRef};
use crate::recovery;
pub use crate::region::HeapRegion;
use crate::region::Region;
use crate::sync::{self, AtomicU64, Ordering};

pub use crate::sync::reset_logical_clock;

/// Why a model acquisition failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFail {
    /// Conflicting hold (try only).
    Busy,
    /// Slot reused for another ID.
    Stale,
    /// Deadline passed.
    Timeout,
    /// Hold bound reached.
    HoldLimit,
}

impl From<Fail> for ModelFail {
    fn from(f: Fail) -> Self {
        match f {
            Fail::Busy => ModelFail::Busy,
            Fail::Stale => ModelFail::Stale,
            Fail::Timeout => ModelFail::Timeout,
            Fail::HoldLimit => ModelFail::HoldLimit,
        }
    }
}

/// Which ID an acquisition means: the slot generation it looked up and the
/// ID's tag (the model's IDs are their tags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The slot's generation at lookup.
    pub gen: u32,
    /// The ID's tag.
    pub tag: (u64, u64),
}

impl Key {
    fn ident(self) -> Ident {
        Ident {
            gen: self.gen,
            tag: [self.tag.0, self.tag.1],
        }
    }
    fn of(i: Ident) -> Key {
        Key {
            gen: i.gen,
            tag: (i.tag[0], i.tag[1]),
        }
    }
}

/// How long an acquisition may wait.
#[derive(Debug, Clone, Copy)]
pub enum ModelWait {
    /// Try once.
    Try,
    /// Block until granted.
    Forever,
    /// Give up after this much (logical) time.
    For(Duration),
}

/// A table of loom atomics plus the liveness of simulated processes.
pub struct Model {
    region: HeapRegion,
    dead: Vec<AtomicU64>,
    poll: Option<Duration>,
}

struct ModelHost<'m> {
    model: &'m Model,
    me: u32,
}

impl Host for ModelHost<'_> {
    fn poll_interval(&self) -> Option<Duration> {
        self.model.poll
    }
    fn me(&self) -> u32 {
        self.me
    }
    fn recover_process(&self, p: u32) -> bool {
        if p != self.me && self.model.is_dead(p) {
            let r = recovery::sweep_process(&self.model.region, p);
            r.slots_released > 0 || r.buckets_repaired > 0
        } else {
            false
        }
    }
}

fn wait_of(w: ModelWait) -> lockword::Wait {
    match w {
        ModelWait::Try => None,
        ModelWait::Forever => Some(None),
        ModelWait::For(d) => Some(sync::now().checked_add(d)),
    }
}

impl Model {
    /// A model with `slots` slots (index models: a multiple of 8, at least
    /// 16; lock-word and recovery models may use a single slot) and
    /// `processes` process indices. `poll`: the liveness poll interval of
    /// waiters (`None`: waiters never poll, so a lost wakeup is a deadlock
    /// that loom reports).
    pub fn new(slots: u32, processes: u32, poll: Option<Duration>) -> Model {
        Model {
            region: HeapRegion::new(slots, processes),
            dead: (0..processes).map(|_| AtomicU64::new(0)).collect(),
            poll,
        }
    }

    /// The same model with asymmetric fences: biased readers publish and
    /// release with plain stores and the light fence, claimants issue the
    /// heavy barrier before their row scans (under loom both are AcqRel
    /// RMWs of one word, `sync::light_fence`; DESIGN §10). Readers of one
    /// process must then use distinct rows, as `reader_row` guarantees in
    /// real builds.
    pub fn asymmetric(mut self) -> Model {
        self.region = self.region.with_fences(lockword::Fences {
            plain_reads: true,
            barrier_before_scan: true,
        });
        self
    }

    fn host(&self, me: u32) -> ModelHost<'_> {
        ModelHost { model: self, me }
    }

    fn slot(&self, i: usize) -> SlotRef<'_> {
        self.region.slot(i)
    }

    /// Lowers the lanes-in-use mark to `n` (processes `>= n` not attached).
    pub fn set_lanes_in_use(&self, n: u32) {
        self.region.set_lanes_in_use(n);
    }

    /// Attaches process `p`: raises the lanes-in-use mark as the registry
    /// does, before the process takes any hold.
    pub fn attach(&self, p: u32) {
        self.region
            .lanes_in_use()
            .fetch_max(p + 1, Ordering::SeqCst);
    }

    /// Marks process `p` dead (call from its thread when it "dies").
    pub fn kill(&self, p: u32) {
        self.dead[p as usize].store(1, Ordering::SeqCst);
    }

    fn is_dead(&self, p: u32) -> bool {
        self.dead[p as usize].load(Ordering::SeqCst) != 0
    }

    /// Makes slot `i` ACTIVE for the ID with tag (i, 0); returns its key.
    pub fn activate(&self, i: usize) -> Key {
        let slot = self.slot(i);
        let s = slot.state.load(Ordering::Relaxed);
        let g = lockword::next_gen(lockword::gen(s));
        let tag = (i as u64, 0);
        slot.tag[0].store(tag.0, Ordering::Relaxed);
        slot.tag[1].store(tag.1, Ordering::Relaxed);
        slot.state.store(
            lockword::with_gen(0, g) | lockword::PHASE_ACTIVE,
            Ordering::Release,
        );
        Key { gen: g, tag }
    }

    /// Read hold on slot `i` of generation `g` for process `me`.
    pub fn read(&self, me: u32, i: usize, k: Key, w: ModelWait) -> Result<bool, ModelFail> {
        let r = self
            .slot(i)
            .read(me, None, k.ident(), wait_of(w), &self.host(me));
        r.map(|g| g.owner_died).map_err(Into::into)
    }
    /// Read hold through reader row `row` of process `me`: biased when the
    /// slot is, else on the lane (which may set BIASED again, once the
    /// cooling window has passed). Returns the row entry of a biased hold
    /// (`None`: a lane hold), to pass to [`Model::release_reader`].
    pub fn read_with_row(
        &self,
        me: u32,
        row: u32,
        i: usize,
        k: Key,
        w: ModelWait,
    ) -> Result<Option<u32>, ModelFail> {
        let r = self
            .slot(i)
            .read(me, Some(row), k.ident(), wait_of(w), &self.host(me));
        r.map(|g| g.entry()).map_err(Into::into)
    }
    /// Releases a read taken by [`Model::read_with_row`].
    pub fn release_reader(&self, me: u32, i: usize, entry: Option<u32>) {
        match entry {
            Some(e) => self.slot(i).release_biased(e),
            None => self.slot(i).release_read(me),
        }
    }
    /// Sets BIASED on slot `i` (what a re-bias does; for a model's setup).
    pub fn bias(&self, i: usize) {
        self.slot(i)
            .state
            .fetch_or(lockword::BIASED, Ordering::SeqCst);
    }
    /// True if slot `i` is BIASED.
    pub fn is_biased(&self, i: usize) -> bool {
        self.slot(i).state.load(Ordering::SeqCst) & lockword::BIASED != 0
    }
    /// Sets slot `i`'s cooling window to end at logical time `ns`.
    pub fn set_bias_until(&self, i: usize, ns: u64) {
        self.slot(i).bias_until.store(ns, Ordering::Relaxed);
    }
    /// The first step of a biased read alone: the entry published in row
    /// 0 of `me` (a reader killed between publish and re-check).
    pub fn publish_biased_only(&self, me: u32, i: usize) {
        let slot = self.slot(i);
        let start = me as usize * crate::layout::RECORD_ROW_ENTRIES as usize;
        slot.rows[start].store(i as u32 + 1, Ordering::SeqCst);
    }
    /// Biased read holds of `p` on slot `i` (its row entries naming it).
    pub fn biased_reads_of(&self, p: u32, i: usize) -> usize {
        let n = crate::layout::RECORD_ROW_ENTRIES as usize;
        self.region.reader_rows()[p as usize * n..(p as usize + 1) * n]
            .iter()
            .filter(|e| e.load(Ordering::SeqCst) == i as u32 + 1)
            .count()
    }
    /// Upgradable hold.
    pub fn upgradable(&self, me: u32, i: usize, k: Key, w: ModelWait) -> Result<bool, ModelFail> {
        let r = self
            .slot(i)
            .upgradable(me, k.ident(), wait_of(w), &self.host(me));
        r.map(|g| g.owner_died).map_err(Into::into)
    }
    /// Write hold.
    pub fn write(&self, me: u32, i: usize, k: Key, w: ModelWait) -> Result<bool, ModelFail> {
        let r = self
            .slot(i)
            .write(me, k.ident(), wait_of(w), &self.host(me));
        r.map(|g| g.owner_died).map_err(Into::into)
    }
    /// Upgrade an upgradable hold of `me`.
    pub fn upgrade(&self, me: u32, i: usize, w: ModelWait) -> Result<bool, ModelFail> {
        let r = self.slot(i).upgrade(me, wait_of(w), &self.host(me));
        r.map(|g| g.owner_died).map_err(Into::into)
    }
    /// Release a read hold.
    pub fn release_read(&self, me: u32, i: usize) {
        self.slot(i).release_read(me)
    }
    /// Release the upgradable hold.
    pub fn release_upgradable(&self, i: usize) {
        self.slot(i).release_upgradable()
    }
    /// Release the write hold.
    pub fn release_write(&self, i: usize) {
        self.slot(i).release_write()
    }
    /// Write -> read (false: no room in the lane, the write hold is kept).
    pub fn downgrade_write_to_read(&self, me: u32, i: usize) -> bool {
        self.slot(i).downgrade_write_to_read(me)
    }
    /// Write -> upgradable.
    pub fn downgrade_write_to_upgradable(&self, me: u32, i: usize) {
        self.slot(i).downgrade_write_to_upgradable(me)
    }
    /// Upgradable -> read (false: no room in the lane, the hold is kept).
    pub fn downgrade_upgradable_to_read(&self, me: u32, i: usize) -> bool {
        self.slot(i).downgrade_upgradable_to_read(me)
    }

    /// Recovery sweep of process `p` (as the registry runs it once `p`'s
    /// lease is free).
    pub fn sweep(&self, p: u32) {
        recovery::sweep_process(&self.region, p);
    }

    /// The first step of a read, alone: the lane announcement (a reader
    /// killed right after it).
    pub fn announce_read_only(&self, me: u32, i: usize) {
        self.slot(i).lanes[me as usize].fetch_add(1, Ordering::SeqCst);
    }

    /// The first step of a downgrade alone (write -> read, or upgradable
    /// -> read): the read is announced, the stronger hold not yet given up
    /// (a process killed in the middle of a downgrade).
    pub fn downgrade_read_only(&self, me: u32, i: usize) {
        self.slot(i).lanes[me as usize].fetch_add(1, Ordering::SeqCst);
    }

    /// A waiting writer's announcement alone: its waiter mark, then
    /// WRITER_WAITING (a writer killed while it waits for an upgrader).
    pub fn announce_waiting_writer_only(&self, me: u32, i: usize, k: Key) {
        let slot = self.slot(i);
        slot.lanes[me as usize].fetch_add(1 << 17, Ordering::SeqCst);
        assert_eq!(
            slot.try_claim_writer(me, k.ident(), true),
            Err(Fail::Busy),
            "an upgrader holds the slot"
        );
    }

    /// The first step of an upgrade alone (killed with WRITER claimed).
    pub fn begin_upgrade_only(&self, me: u32, i: usize) {
        self.slot(i).begin_upgrade(me);
    }

    /// The first step of a write alone: the pending WRITER claim.
    pub fn claim_write_only(&self, me: u32, i: usize, k: Key) -> Result<(), ModelFail> {
        self.slot(i)
            .try_claim_writer(me, k.ident(), false)
            .map(|_| ())
            .map_err(Into::into)
    }

    /// Slot lookup / insertion for a tag, waiting for the bucket locks as
    /// `w` says (`Err`: a try found a bucket busy, or the deadline passed).
    pub fn find_or_insert_within(
        &self,
        tag: (u64, u64),
        me: u32,
        w: ModelWait,
    ) -> Result<Option<(usize, Key)>, ModelFail> {
        index::find_or_insert(
            &self.region,
            Tag(tag.0, tag.1),
            me,
            &self.host(me),
            wait_of(w),
        )
        .map(|found| found.map(|(i, id)| (i, Key::of(id))))
        .map_err(Into::into)
    }

    /// Slot lookup / insertion for a tag (blocking on the bucket locks).
    pub fn find_or_insert(&self, tag: (u64, u64), me: u32) -> Option<(usize, Key)> {
        self.find_or_insert_within(tag, me, ModelWait::Forever)
            .expect("a blocking insertion does not fail")
    }

    /// Lock-free lookup only.
    pub fn find(&self, tag: (u64, u64)) -> Option<(usize, Key)> {
        index::find(&self.region, Tag(tag.0, tag.1)).map(|(i, id)| (i, Key::of(id)))
    }

    /// Retire slot `i` (caller plays the bucket-lock holder).
    pub fn try_retire(&self, i: usize, k: Key) -> bool {
        self.slot(i).try_retire(k.gen, false)
    }

    /// The first step of a retirement alone (a retirer killed after it).
    pub fn begin_retire_only(&self, i: usize, k: Key) -> bool {
        let slot = self.slot(i);
        let s = slot.state.load(Ordering::Acquire);
        lockword::gen(s) == k.gen
            && lockword::phase(s) == lockword::PHASE_ACTIVE
            && slot.begin_retire(s)
    }

    /// Process `p` takes the lock of the bucket of slot `i` (it is free)
    /// and dies holding it, as an insertion killed midway leaves it.
    pub fn die_holding_bucket_of(&self, p: u32, i: usize) {
        let word = self.region.bucket_lock(i / 8);
        assert_eq!(word.swap(p as u64 + 1, Ordering::SeqCst), 0);
        self.kill(p);
    }

    /// Writes `v` into the lock word of the bucket of slot `i` (a corrupt
    /// file, or a process that holds it).
    pub fn set_bucket_lock_of(&self, i: usize, v: u64) {
        self.region.bucket_lock(i / 8).store(v, Ordering::SeqCst);
    }

    /// Fills the lane of `p` on slot `i` with the reads of a process at
    /// the plain-read limit.
    pub fn fill_lane_to_the_read_limit(&self, p: u32, i: usize) {
        self.slot(i).lanes[p as usize].store(lockword::MAX_READS_PER_PROCESS, Ordering::SeqCst);
    }

    /// The read holds of `p` on slot `i`.
    pub fn reads_of(&self, p: u32, i: usize) -> u32 {
        lockword::lane_readers(self.slot(i).lanes[p as usize].load(Ordering::SeqCst))
    }

    /// Slot `i` is retired (when idle) and given to `tag` at once, as an
    /// insertion that needs room does; `None` if it was not idle. Done under
    /// the bucket lock of the slot, as the index does.
    pub fn reuse_slot(&self, i: usize, tag: (u64, u64), me: u32) -> Option<Key> {
        let host = self.host(me);
        index::reuse_slot_for_model(&self.region, i, Tag(tag.0, tag.1), me, &host).map(Key::of)
    }

    /// What recovery does for a dead retirer's bucket: give the slot back.
    pub fn repair_retirement(&self, i: usize) {
        let slot = self.slot(i);
        if lockword::phase(slot.state.load(Ordering::Acquire)) == lockword::PHASE_RETIRING {
            slot.abandon_retirement();
        }
    }

    /// True when slot `i` is ACTIVE with generation `k.gen`.
    pub fn is_active(&self, i: usize, k: Key) -> bool {
        let s = self.slot(i).state.load(Ordering::SeqCst);
        lockword::phase(s) == lockword::PHASE_ACTIVE && lockword::gen(s) == k.gen
    }

    /// True if the lock word of slot `i`'s bucket is free.
    pub fn bucket_unlocked(&self, i: usize) -> bool {
        self.region.bucket_lock(i / 8).load(Ordering::SeqCst) == 0
    }

    /// True if WRITER_WAITING is set on slot `i`.
    pub fn writer_waiting_marked(&self, i: usize) -> bool {
        self.slot(i).state.load(Ordering::SeqCst) & lockword::WRITER_WAITING != 0
    }

    /// True when slot `i` has no holder, claim, or read announcement left.
    pub fn is_idle(&self, i: usize) -> bool {
        let s = self.slot(i);
        let st = s.state.load(Ordering::SeqCst);
        st & (lockword::WRITER_MASK | lockword::UPGRADER_MASK | lockword::WRITE_LOCKED) == 0
            && s.lanes
                .iter()
                .all(|l| lockword::lane_readers(l.load(Ordering::SeqCst)) == 0)
            && s.rows
                .iter()
                .all(|e| e.load(Ordering::SeqCst) != i as u32 + 1)
    }

    /// True if slot `i` carries the owner-died mark.
    pub fn owner_died_marked(&self, i: usize) -> bool {
        self.slot(i).state.load(Ordering::SeqCst) & lockword::OWNER_DIED != 0
    }
}
