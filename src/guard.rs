//! RAII guards: a hold that is released when the guard is dropped.
//!
//! Owns: the conversion between hold modes (upgrade, downgrade) as seen by
//! the user. Guards own a reference to their table (no lifetime), so they
//! are `Send + 'static` and can be held across `.await`.
//!
//! May not touch: lock-word bits (it calls `SlotRef` methods).

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::Duration;

use crate::lockword::Granted;
use crate::table::Inner;

/// The part every guard has: the table and the slot.
struct Hold {
    inner: Arc<Inner>,
    slot: u32,
    owner_died: bool,
}

impl Hold {
    fn me(&self) -> u32 {
        self.inner.me
    }
    /// False in a forked child: the hold belongs to the parent's record.
    fn ours(&self) -> bool {
        !self.inner.forked()
    }
}

macro_rules! guard_common {
    ($name:ident) => {
        impl $name {
            pub(crate) fn new(inner: Arc<Inner>, slot: u32, owner_died: bool) -> Self {
                $name {
                    hold: ManuallyDrop::new(Hold {
                        inner,
                        slot,
                        owner_died,
                    }),
                }
            }

            /// True if the last writer of this ID died while holding the
            /// write lock (like `EOWNERDEAD`): data it protected may be half
            /// written. The first writer after the death consumes the mark.
            pub fn previous_owner_died(&self) -> bool {
                self.hold.owner_died
            }

            /// Takes the hold out without running `Drop` (for mode changes).
            #[allow(dead_code)] // ReadGuard has no mode change
            fn into_hold(self) -> Hold {
                let mut this = ManuallyDrop::new(self);
                // SAFETY: `this` is never used or dropped again (it is in a
                // ManuallyDrop that goes out of scope), so the `Hold` is
                // moved out exactly once.
                unsafe { ManuallyDrop::take(&mut this.hold) }
            }
        }

        impl std::fmt::Debug for $name {
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
pub struct ReadGuard {
    hold: ManuallyDrop<Hold>,
}

/// An upgradable hold: shared with readers, exclusive against writers and
/// other upgradable holders; can become a write hold without letting any
/// other writer in first.
#[must_use = "the lock is released when the guard is dropped"]
pub struct UpgradableReadGuard {
    hold: ManuallyDrop<Hold>,
}

/// An exclusive hold on one ID.
#[must_use = "the lock is released when the guard is dropped"]
pub struct WriteGuard {
    hold: ManuallyDrop<Hold>,
}

guard_common!(ReadGuard);
guard_common!(UpgradableReadGuard);
guard_common!(WriteGuard);

impl Drop for ReadGuard {
    fn drop(&mut self) {
        if self.hold.ours() {
            self.hold
                .inner
                .slot(self.hold.slot)
                .release_read(self.hold.me());
        }
        // SAFETY: dropped exactly once, here; `self.hold` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.hold) }
    }
}

impl Drop for UpgradableReadGuard {
    fn drop(&mut self) {
        if self.hold.ours() {
            self.hold.inner.slot(self.hold.slot).release_upgradable();
        }
        // SAFETY: dropped exactly once, here; `self.hold` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.hold) }
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.hold.ours() {
            self.hold.inner.slot(self.hold.slot).release_write();
        }
        // SAFETY: dropped exactly once, here; `self.hold` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.hold) }
    }
}

impl UpgradableReadGuard {
    fn upgrade_with(self, wait: crate::lockword::Wait) -> Result<WriteGuard, Self> {
        let hold = self.into_hold();
        let inner = hold.inner.clone();
        let r: Result<Granted, _> = inner.slot(hold.slot).upgrade(hold.me(), wait, &*inner);
        match r {
            Ok(g) => Ok(WriteGuard::new(
                hold.inner,
                hold.slot,
                hold.owner_died || g.owner_died,
            )),
            Err(_) => Err(UpgradableReadGuard::new(
                hold.inner,
                hold.slot,
                hold.owner_died,
            )),
        }
    }

    /// Waits for the readers to leave, then holds the ID exclusively. Cannot
    /// deadlock: there is at most one upgradable holder per ID, and readers
    /// arriving after the upgrade began wait for it.
    pub fn upgrade(self) -> WriteGuard {
        let mut g = self;
        loop {
            match g.upgrade_with(Some(None)) {
                Ok(w) => return w,
                Err(back) => g = back,
            }
        }
    }

    /// Upgrades only if no reader holds the ID; gives the guard back if one does.
    pub fn try_upgrade(self) -> Result<WriteGuard, Self> {
        self.upgrade_with(None)
    }

    /// Upgrades, or gives the guard back when `timeout` passes.
    pub fn upgrade_timeout(self, timeout: Duration) -> Result<WriteGuard, Self> {
        let deadline = crate::sync::now().checked_add(timeout);
        self.upgrade_with(Some(deadline))
    }

    /// Becomes a plain read hold; writers may then proceed once readers leave.
    pub fn downgrade(self) -> ReadGuard {
        let hold = self.into_hold();
        hold.inner
            .slot(hold.slot)
            .downgrade_upgradable_to_read(hold.me());
        ReadGuard::new(hold.inner, hold.slot, hold.owner_died)
    }
}

impl WriteGuard {
    /// Becomes a read hold without letting any writer in between.
    pub fn downgrade(self) -> ReadGuard {
        let hold = self.into_hold();
        hold.inner
            .slot(hold.slot)
            .downgrade_write_to_read(hold.me());
        ReadGuard::new(hold.inner, hold.slot, false)
    }

    /// Becomes an upgradable hold without letting any writer in between.
    pub fn downgrade_to_upgradable(self) -> UpgradableReadGuard {
        let hold = self.into_hold();
        hold.inner
            .slot(hold.slot)
            .downgrade_write_to_upgradable(hold.me());
        UpgradableReadGuard::new(hold.inner, hold.slot, false)
    }
}
