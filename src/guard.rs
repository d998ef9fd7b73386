//! RAII guards: a hold that is released when the guard is dropped.
//!
//! Owns: the conversion between hold modes (upgrade, downgrade) as seen by
//! the user. A guard borrows its table (`ReadGuard<'a>`), which costs
//! nothing on the acquire path; [`into_owned`](ReadGuard::into_owned) turns
//! it into a `'static` guard that owns a reference-counted handle, for holds
//! stored in structs or spawned tasks. Guards are `Send` either way, so an
//! async handler can hold one across `.await`.
//!
//! In a process forked from the one that took the hold, a guard is inert:
//! dropping or converting it changes nothing, because the hold belongs to
//! the parent.
//!
//! May not touch: lock-word bits (it calls `SlotRef` methods).

use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use crate::lockword::{Fail, Granted};
use crate::table::Inner;

/// How a guard reaches its table: borrowed (the fast default: no shared
/// reference count is touched per lock) or owned.
pub(crate) enum TableRef<'a> {
    Borrowed(&'a Arc<Inner>),
    Owned(Arc<Inner>),
}

impl Deref for TableRef<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        match self {
            TableRef::Borrowed(a) => a,
            TableRef::Owned(a) => a,
        }
    }
}

impl TableRef<'_> {
    fn into_owned(self) -> TableRef<'static> {
        match self {
            TableRef::Borrowed(a) => TableRef::Owned(Arc::clone(a)),
            TableRef::Owned(a) => TableRef::Owned(a),
        }
    }
}

/// What a read guard releases on drop: normally its read. A downgrade
/// whose read found no room in the lane (only a corrupt table can fill it:
/// a downgrade's read is reserved) keeps the stronger hold it came from, so
/// the caller still excludes writers, and the guard releases that instead.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Releases {
    Read,
    Upgradable,
    Write,
}

/// The part every guard has: the table and the slot.
struct Hold<'a> {
    table: TableRef<'a>,
    slot: u32,
    owner_died: bool,
    releases: Releases,
    /// A biased read: the reader-row entry that holds it (released by
    /// clearing the entry, from whichever thread drops the guard).
    /// `None`: the hold is in the process's lane or the state word.
    entry: Option<u32>,
}

impl Hold<'_> {
    #[inline]
    fn me(&self) -> u32 {
        self.table.me
    }
    /// False in a forked child: the hold belongs to the parent's record.
    #[inline]
    fn ours(&self) -> bool {
        !self.table.forked()
    }
}

macro_rules! guard_common {
    ($name:ident) => {
        impl<'a> $name<'a> {
            #[inline]
            pub(crate) fn new(table: TableRef<'a>, slot: u32, owner_died: bool) -> Self {
                $name {
                    hold: ManuallyDrop::new(Hold {
                        table,
                        slot,
                        owner_died,
                        releases: Releases::Read,
                        entry: None,
                    }),
                }
            }

            /// True if the last writer of this ID died while holding the
            /// write lock (like `EOWNERDEAD`): data it protected may be half
            /// written. The first writer after the death consumes the mark.
            pub fn previous_owner_died(&self) -> bool {
                self.hold.owner_died
            }

            /// The same hold as a `'static` guard that owns a handle to the
            /// table (one reference-count increment), e.g. to keep it in a
            /// struct or move it into a spawned task.
            pub fn into_owned(self) -> $name<'static> {
                let hold = self.into_hold();
                let (releases, entry) = (hold.releases, hold.entry);
                let mut owned = $name::new(hold.table.into_owned(), hold.slot, hold.owner_died);
                owned.hold.releases = releases;
                owned.hold.entry = entry;
                owned
            }

            /// Takes the hold out without running `Drop` (for mode changes).
            fn into_hold(self) -> Hold<'a> {
                let mut this = ManuallyDrop::new(self);
                // `this` is never used or dropped again (it is in a
                // ManuallyDrop that goes out of scope), so the `Hold` is
                // moved out exactly once.
                // SAFETY: sound for the reasons just given.
                unsafe { ManuallyDrop::take(&mut this.hold) }
            }
        }

        impl std::fmt::Debug for $name<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("slot", &self.hold.slot)
                    .field("previous_owner_died", &self.hold.owner_died)
                    .finish()
            }
        }
    };
}

/// A shared (read) hold on one ID.
#[must_use = "the lock is released when the guard is dropped"]
pub struct ReadGuard<'a> {
    hold: ManuallyDrop<Hold<'a>>,
}

/// An upgradable hold: shared with readers, exclusive against writers and
/// other upgradable holders; can become a write hold without letting any
/// other writer in first.
#[must_use = "the lock is released when the guard is dropped"]
pub struct UpgradableReadGuard<'a> {
    hold: ManuallyDrop<Hold<'a>>,
}

/// An exclusive hold on one ID.
#[must_use = "the lock is released when the guard is dropped"]
pub struct WriteGuard<'a> {
    hold: ManuallyDrop<Hold<'a>>,
}

guard_common!(ReadGuard);

impl<'a> ReadGuard<'a> {
    /// True if this read is held through the calling thread's reader row
    /// (the reader bias, DESIGN §10), false if it is counted in the
    /// process's lane. Only a diagnostic: both exclude writers alike.
    ///
    /// ```
    /// use locktable::{LockTable, TableOptions};
    /// let t = LockTable::anonymous(&TableOptions::default()).unwrap();
    /// drop(t.read("hot").unwrap()); // the first read sets the bias
    /// assert!(t.read("hot").unwrap().is_biased());
    /// ```
    pub fn is_biased(&self) -> bool {
        self.hold.entry.is_some()
    }

    /// The reader-row entry of a biased read (`None`: a lane read).
    #[cfg(test)]
    pub(crate) fn biased_entry(&self) -> Option<u32> {
        self.hold.entry
    }

    /// A read granted by the lock word: biased (`entry`) or in the lane.
    #[inline]
    pub(crate) fn granted(table: TableRef<'a>, slot: u32, granted: Granted) -> Self {
        let mut g = ReadGuard::new(table, slot, granted.owner_died);
        g.hold.entry = granted.entry();
        g
    }
}
guard_common!(UpgradableReadGuard);
guard_common!(WriteGuard);

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.hold.ours() {
            if let (Releases::Read, Some(entry)) = (self.hold.releases, self.hold.entry) {
                // The fast path: only the entry and the slot's state and
                // futex words, not a whole `SlotRef`.
                if let Some(hold) = self.hold.table.region.biased_hold(self.hold.slot, entry) {
                    hold.release();
                }
                // SAFETY: dropped exactly once, here; `self.hold` is not used after.
                unsafe { ManuallyDrop::drop(&mut self.hold) }
                return;
            }
            let slot = self.hold.table.slot(self.hold.slot);
            match (self.hold.releases, self.hold.entry) {
                (Releases::Read, Some(entry)) => slot.release_biased(entry),
                (Releases::Read, None) => slot.release_read(self.hold.me()),
                (Releases::Upgradable, _) => slot.release_upgradable(),
                (Releases::Write, _) => slot.release_write(),
            }
        }
        // SAFETY: dropped exactly once, here; `self.hold` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.hold) }
    }
}

impl Drop for UpgradableReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.hold.ours() {
            self.hold.table.slot(self.hold.slot).release_upgradable();
        }
        // SAFETY: dropped exactly once, here; `self.hold` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.hold) }
    }
}

impl Drop for WriteGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.hold.ours() {
            self.hold.table.slot(self.hold.slot).release_write();
        }
        // SAFETY: dropped exactly once, here; `self.hold` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.hold) }
    }
}

impl<'a> UpgradableReadGuard<'a> {
    fn upgrade_with(self, wait: crate::lockword::Wait) -> Result<WriteGuard<'a>, Self> {
        let hold = self.into_hold();
        let r: Result<Granted, _> = if hold.ours() {
            let slot = hold.table.slot(hold.slot);
            match slot.upgrade(hold.me(), wait, &*hold.table) {
                // A try that found readers: sweep dead ones (rate-limited).
                Err(Fail::Busy) if hold.table.sweep_for_try(hold.slot) => {
                    slot.upgrade(hold.me(), wait, &*hold.table)
                }
                other => other,
            }
        } else {
            // A forked child: the hold is the parent's; change nothing.
            Ok(Granted::of_state(0))
        };
        match r {
            Ok(g) => Ok(WriteGuard::new(
                hold.table,
                hold.slot,
                hold.owner_died || g.owner_died,
            )),
            Err(_) => Err(UpgradableReadGuard::new(
                hold.table,
                hold.slot,
                hold.owner_died,
            )),
        }
    }

    /// Waits for the readers to leave, then holds the ID exclusively. Cannot
    /// deadlock with other holders: there is at most one upgradable holder
    /// per ID, and readers arriving after the upgrade began wait for it. It
    /// does wait for every read of the ID, so a thread that still holds a
    /// read of the same ID waits for itself forever (use one hold per
    /// request, or [`upgrade_timeout`](Self::upgrade_timeout)).
    pub fn upgrade(self) -> WriteGuard<'a> {
        let mut g = self;
        loop {
            match g.upgrade_with(Some(None)) {
                Ok(w) => return w,
                Err(back) => g = back,
            }
        }
    }

    /// Upgrades only if no reader holds the ID; gives the guard back if one does.
    pub fn try_upgrade(self) -> Result<WriteGuard<'a>, Self> {
        self.upgrade_with(None)
    }

    /// Upgrades, or gives the guard back when `timeout` passes.
    pub fn upgrade_timeout(self, timeout: Duration) -> Result<WriteGuard<'a>, Self> {
        let deadline = crate::sync::now().checked_add(timeout);
        self.upgrade_with(Some(deadline))
    }

    /// Becomes a plain read hold; writers may then proceed once readers leave.
    ///
    /// Never waits and never fails: the read it adds is reserved for it, so
    /// it fits even when this process holds the maximum number of reads
    /// ([`crate::Error::HoldLimit`] is returned by the upgradable acquisition
    /// instead, if the reserve is in use).
    pub fn downgrade(self) -> ReadGuard<'a> {
        let hold = self.into_hold();
        let done = !hold.ours()
            || hold
                .table
                .slot(hold.slot)
                .downgrade_upgradable_to_read(hold.me());
        let mut r = ReadGuard::new(hold.table, hold.slot, hold.owner_died);
        if !done {
            r.hold.releases = Releases::Upgradable;
        }
        r
    }
}

impl<'a> WriteGuard<'a> {
    /// Becomes a read hold without letting any writer in between.
    pub fn downgrade(self) -> ReadGuard<'a> {
        let hold = self.into_hold();
        let done = !hold.ours()
            || hold
                .table
                .slot(hold.slot)
                .downgrade_write_to_read(hold.me());
        let mut r = ReadGuard::new(hold.table, hold.slot, false);
        if !done {
            r.hold.releases = Releases::Write;
        }
        r
    }

    /// Becomes an upgradable hold without letting any writer in between.
    pub fn downgrade_to_upgradable(self) -> UpgradableReadGuard<'a> {
        let hold = self.into_hold();
        if hold.ours() {
            hold.table
                .slot(hold.slot)
                .downgrade_write_to_upgradable(hold.me());
        }
        UpgradableReadGuard::new(hold.table, hold.slot, false)
    }
}
