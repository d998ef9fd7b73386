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
use crate::lockword::{self, Fail, Host, SlotRef};
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

    /// Makes slot `i` ACTIVE for some ID; returns its generation.
    pub fn activate(&self, i: usize) -> u32 {
        let st = self.slot(i).state;
        let s = st.load(Ordering::Relaxed);
        let g = lockword::next_gen(lockword::gen(s));
        st.store(
            lockword::with_gen(0, g) | lockword::PHASE_ACTIVE,
            Ordering::Release,
        );
        g
    }

    /// Read hold on slot `i` of generation `g` for process `me`.
    pub fn read(&self, me: u32, i: usize, g: u32, w: ModelWait) -> Result<bool, ModelFail> {
        let r = self.slot(i).read(me, g, wait_of(w), &self.host(me));
        r.map(|g| g.owner_died).map_err(Into::into)
    }
    /// Upgradable hold.
    pub fn upgradable(&self, me: u32, i: usize, g: u32, w: ModelWait) -> Result<bool, ModelFail> {
        let r = self.slot(i).upgradable(me, g, wait_of(w), &self.host(me));
        r.map(|g| g.owner_died).map_err(Into::into)
    }
    /// Write hold.
    pub fn write(&self, me: u32, i: usize, g: u32, w: ModelWait) -> Result<bool, ModelFail> {
        let r = self.slot(i).write(me, g, wait_of(w), &self.host(me));
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
    /// Write -> read.
    pub fn downgrade_write_to_read(&self, me: u32, i: usize) {
        self.slot(i).downgrade_write_to_read(me)
    }
    /// Write -> upgradable.
    pub fn downgrade_write_to_upgradable(&self, me: u32, i: usize) {
        self.slot(i).downgrade_write_to_upgradable(me)
    }
    /// Upgradable -> read.
    pub fn downgrade_upgradable_to_read(&self, me: u32, i: usize) {
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

    /// The first step of an upgrade alone (killed with WRITER claimed).
    pub fn begin_upgrade_only(&self, me: u32, i: usize) {
        self.slot(i).begin_upgrade(me)
    }

    /// The first step of a write alone: the pending WRITER claim.
    pub fn claim_write_only(&self, me: u32, i: usize, g: u32) -> Result<(), ModelFail> {
        self.slot(i)
            .try_claim_writer(me, g, false)
            .map_err(Into::into)
    }

    /// Slot lookup / insertion for a tag.
    pub fn find_or_insert(&self, tag: (u64, u64), me: u32) -> Option<(usize, u32)> {
        index::find_or_insert(&self.region, Tag(tag.0, tag.1), me, &self.host(me))
    }

    /// Lock-free lookup only.
    pub fn find(&self, tag: (u64, u64)) -> Option<(usize, u32)> {
        index::find(&self.region, Tag(tag.0, tag.1))
    }

    /// Retire slot `i` (caller plays the bucket-lock holder).
    pub fn try_retire(&self, i: usize, g: u32) -> bool {
        self.slot(i).try_retire(g)
    }

    /// The first step of a retirement alone (a retirer killed after it).
    pub fn begin_retire_only(&self, i: usize, g: u32) -> bool {
        let slot = self.slot(i);
        let s = slot.state.load(Ordering::Acquire);
        lockword::gen(s) == g
            && lockword::phase(s) == lockword::PHASE_ACTIVE
            && slot.begin_retire(s)
    }

    /// What recovery does for a dead retirer's bucket: give the slot back.
    pub fn repair_retirement(&self, i: usize) {
        let slot = self.slot(i);
        if lockword::phase(slot.state.load(Ordering::Acquire)) == lockword::PHASE_RETIRING {
            slot.abandon_retirement();
        }
    }

    /// True when slot `i` is ACTIVE with generation `g`.
    pub fn is_active(&self, i: usize, g: u32) -> bool {
        let s = self.slot(i).state.load(Ordering::SeqCst);
        lockword::phase(s) == lockword::PHASE_ACTIVE && lockword::gen(s) == g
    }

    /// True when slot `i` has no holder, claim, or read announcement left.
    pub fn is_idle(&self, i: usize) -> bool {
        let s = self.slot(i);
        let st = s.state.load(Ordering::SeqCst);
        st & (lockword::WRITER_MASK | lockword::UPGRADER_MASK | lockword::WRITE_LOCKED) == 0
            && s.lanes
                .iter()
                .all(|l| lockword::lane_readers(l.load(Ordering::SeqCst)) == 0)
    }

    /// True if slot `i` carries the owner-died mark.
    pub fn owner_died_marked(&self, i: usize) -> bool {
        self.slot(i).state.load(Ordering::SeqCst) & lockword::OWNER_DIED != 0
    }
}
