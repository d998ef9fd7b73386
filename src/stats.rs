//! Table statistics: a snapshot of slots, processes, holders and waiters.
//!
//! Owns: reading the table for display (`locktable stat`). Read-only: it
//! never changes a word. A snapshot is not atomic across slots.

use serde::Serialize;

use crate::layout::RECORD_ROW_ENTRIES;
use crate::lockword::{self, lane_readers, lane_waiters};
use crate::region::Region;
use crate::registry;
use crate::sync::Ordering;
use crate::table::Inner;

/// Mode of a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldMode {
    /// Shared.
    Read,
    /// Upgradable.
    Upgradable,
    /// Exclusive (granted).
    Write,
    /// Exclusive, claimed, waiting for readers to leave.
    WritePending,
}

/// One process's hold on one slot.
#[derive(Debug, Clone, Serialize)]
pub struct Holder {
    /// Slot index.
    pub slot: u32,
    /// The ID's 128-bit tag, hex (IDs themselves are not stored).
    pub tag: String,
    /// Hold mode.
    pub mode: HoldMode,
    /// Number of holds (reads can be several).
    pub count: u32,
    /// Process index (record) of the holder.
    pub process: u32,
    /// PID recorded by that process (display only).
    pub pid: u32,
    /// False when the holder is dead and its hold waits to be reaped.
    pub alive: bool,
}

/// Threads of one process waiting on one slot.
#[derive(Debug, Clone, Serialize)]
pub struct Waiter {
    /// Slot index.
    pub slot: u32,
    /// Process index.
    pub process: u32,
    /// PID (display only).
    pub pid: u32,
    /// Waiting threads.
    pub count: u32,
}

/// An attached process record.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    /// Record index.
    pub index: u32,
    /// PID recorded at attach (display only).
    pub pid: u32,
    /// Attach time, ms since the Unix epoch.
    pub attached_ms: u64,
    /// Whether its liveness lease is held (false: dead, not yet reaped).
    pub alive: bool,
    /// True for the handle that took this snapshot.
    pub this_handle: bool,
}

/// A snapshot of a table.
#[derive(Debug, Clone, Serialize)]
pub struct TableStats {
    /// Slots in the table.
    pub capacity: usize,
    /// Slots assigned to an ID (held, waited on, or idle and reusable).
    pub slots_assigned: usize,
    /// Slots currently held or waited on.
    pub slots_in_use: usize,
    /// Slots whose last writer died (reported to the next holder).
    pub owner_died_marks: usize,
    /// Maximum attached processes.
    pub max_processes: usize,
    /// Attached process records (live, or dead and not yet reaped).
    pub processes: Vec<ProcessInfo>,
    /// Current holds.
    pub holders: Vec<Holder>,
    /// Current waiters.
    pub waiters: Vec<Waiter>,
}

impl TableStats {
    /// Holds whose process is dead (released by the next waiter or `reap`).
    pub fn dead_holders(&self) -> impl Iterator<Item = &Holder> {
        self.holders.iter().filter(|h| !h.alive)
    }
}

pub(crate) fn collect(inner: &Inner) -> TableStats {
    let region = &inner.region;
    let g = region.geometry();
    let mut processes = Vec::new();
    let mut alive = vec![false; g.max_processes as usize];
    let mut pids = vec![0u32; g.max_processes as usize];
    for i in 0..g.max_processes {
        let rec = region.record(i as usize);
        pids[i as usize] = rec.pid.load(Ordering::Relaxed);
        if rec.state.load(Ordering::Acquire) == registry::RECORD_FREE {
            continue;
        }
        let a = inner.lease_held_by_other(i);
        alive[i as usize] = a;
        processes.push(ProcessInfo {
            index: i,
            pid: pids[i as usize],
            attached_ms: rec.attached_ms.load(Ordering::Relaxed),
            alive: a,
            this_handle: i == inner.me,
        });
    }
    let mut st = TableStats {
        capacity: g.capacity as usize,
        slots_assigned: 0,
        slots_in_use: 0,
        owner_died_marks: 0,
        max_processes: g.max_processes as usize,
        processes,
        holders: Vec::new(),
        waiters: Vec::new(),
    };
    // Biased reads (reader-row entries), per slot and process: each counts
    // as one read hold of the process whose record holds the entry.
    let mut biased: std::collections::HashMap<(usize, u32), u32> = Default::default();
    for (p, block) in region
        .reader_rows()
        .chunks(RECORD_ROW_ENTRIES as usize)
        .enumerate()
    {
        for e in block {
            let v = e.load(Ordering::Acquire) as usize;
            if v != 0 {
                *biased.entry((v - 1, p as u32)).or_default() += 1;
            }
        }
    }
    for i in 0..g.capacity as usize {
        let slot = region.slot(i);
        let s = slot.state.load(Ordering::Acquire);
        if lockword::phase(s) != lockword::PHASE_ACTIVE {
            continue;
        }
        st.slots_assigned += 1;
        if s & lockword::OWNER_DIED != 0 {
            st.owner_died_marks += 1;
        }
        let [t0, t1] = region.slot_tag(i);
        let tag = format!(
            "{:016x}{:016x}",
            t0.load(Ordering::Relaxed),
            t1.load(Ordering::Relaxed)
        );
        let mut used = false;
        let mut push = |mode, count, p: u32| {
            let p_alive = alive.get(p as usize).copied().unwrap_or(false);
            st.holders.push(Holder {
                slot: i as u32,
                tag: tag.clone(),
                mode,
                count,
                process: p,
                pid: pids.get(p as usize).copied().unwrap_or(0),
                alive: p_alive,
            });
        };
        if lockword::writer(s) != 0 {
            used = true;
            let mode = if s & lockword::WRITE_LOCKED != 0 {
                HoldMode::Write
            } else {
                HoldMode::WritePending
            };
            push(mode, 1, lockword::writer(s) - 1);
        }
        if lockword::upgrader(s) != 0 {
            used = true;
            push(HoldMode::Upgradable, 1, lockword::upgrader(s) - 1);
        }
        for (p, lane) in slot.lanes.iter().enumerate() {
            let l = lane.load(Ordering::Acquire);
            let reads = lane_readers(l) + biased.get(&(i, p as u32)).copied().unwrap_or(0);
            if reads != 0 {
                used = true;
                push(HoldMode::Read, reads, p as u32);
            }
            if lane_waiters(l) != 0 {
                used = true;
                st.waiters.push(Waiter {
                    slot: i as u32,
                    process: p as u32,
                    pid: pids[p],
                    count: lane_waiters(l),
                });
            }
        }
        if used {
            st.slots_in_use += 1;
        }
    }
    st
}
