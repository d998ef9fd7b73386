//! The gate between attaching and `fork()`: no fork happens while an
//! attachment is between "table descriptor opened" and "descriptor
//! registered, mapping marked `MADV_DONTFORK`" (a child forked there would
//! keep the open file description, and with it the parent's liveness
//! lease, see [`crate::fork`]).
//!
//! Owns: the two words of the gate and their Dekker pair. An attachment
//! announces itself (`attaching` + 1), then checks that no fork is being
//! prepared; a fork's prepare handler raises `forking`, then waits until
//! no attachment is announced. SeqCst on both sides: in the single total
//! order of SeqCst operations either the announcement precedes the
//! forker's load of `attaching` (the forker waits for it to leave) or the
//! raising of `forking` precedes the attachment's check (it backs off and
//! waits). A back-off's decrement, like a leave's, is an RMW, so it
//! continues the release sequence of an earlier leave that the forker's
//! load may read through. The leave is a SeqCst RMW too, so the window's work happens
//! before a forker's load that reads the decremented count.
//!
//! May not touch: descriptors, mappings or the fork handlers themselves
//! ([`crate::fork`] calls this); it only orders two counters. Compiled
//! against the `sync` facade, so `loom-tests/fork_gate.rs` checks this
//! exact code.

use crate::sync::{self, AtomicU32, Ordering};

/// The gate. One static instance in real builds (`crate::fork`); models
/// make their own.
pub struct ForkGate {
    /// Attachments inside their window.
    attaching: AtomicU32,
    /// Forks between their prepare handler and their parent (or child)
    /// handler.
    forking: AtomicU32,
}

impl ForkGate {
    /// An open gate (const: it lives in a static).
    #[cfg(not(locktable_loom))]
    pub(crate) const fn new() -> ForkGate {
        ForkGate {
            attaching: AtomicU32::new(0),
            forking: AtomicU32::new(0),
        }
    }

    /// An open gate (loom atomics cannot be built in a const context).
    #[cfg(locktable_loom)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> ForkGate {
        ForkGate {
            attaching: AtomicU32::new(0),
            forking: AtomicU32::new(0),
        }
    }

    /// Enters an attachment's window: waits while a fork is being prepared,
    /// announces itself, and backs off again if a fork began meanwhile.
    pub fn enter(&self) {
        while !self.try_enter() {
            while self.forking.load(Ordering::SeqCst) != 0 {
                sync::yield_now();
            }
        }
    }

    /// One attempt of [`enter`](Self::enter): true if the caller is now
    /// inside its window (and must [`leave`](Self::leave) it), false if a
    /// fork is being prepared (nothing to undo).
    pub fn try_enter(&self) -> bool {
        if self.forking.load(Ordering::SeqCst) != 0 {
            return false;
        }
        self.attaching.fetch_add(1, Ordering::SeqCst);
        sync::dekker_fence();
        if self.forking.load(Ordering::SeqCst) == 0 {
            return true;
        }
        self.take_back();
        false
    }

    /// Enters a window inside a window of the same thread (a table file
    /// dropped on an attach's error path): no wait, because a fork being
    /// prepared waits for the outer window, which this thread holds, so
    /// waiting for that fork here would wait forever.
    pub fn enter_nested(&self) {
        self.attaching.fetch_add(1, Ordering::SeqCst);
    }

    /// Leaves an attachment's window.
    pub fn leave(&self) {
        self.take_back();
    }

    /// Takes one announcement back, never below zero. In a parent the count
    /// is never below the caller's own announcements, so this is a plain
    /// decrement; in a child forked from a signal handler that interrupted
    /// the thread inside (or entering) its window, the child handler reset
    /// the count to zero and the resumed thread then takes back an
    /// announcement that is gone: a wrapping decrement left u32::MAX there
    /// and every later fork of that child waited forever. SeqCst, and an
    /// RMW (the successful compare-exchange), for the reasons in the module
    /// comment; the failure ordering only re-reads for the next attempt.
    fn take_back(&self) {
        let _ = self
            .attaching
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// A fork's prepare handler: holds new attachments back, then waits
    /// until every attachment inside its window has left. Not for a fork
    /// by a thread that is itself inside (or entering) a window, from a
    /// signal handler: it would wait for itself forever; such a fork only
    /// holds attachments back ([`hold_attachments_back`]
    /// (Self::hold_attachments_back), see `crate::fork`).
    pub fn prepare_fork(&self) {
        self.hold_attachments_back();
        while !self.no_attachment_inside() {
            sync::yield_now();
        }
    }

    /// The first half of [`prepare_fork`](Self::prepare_fork): from here
    /// on no attachment enters until [`fork_done_in_parent`]
    /// (Self::fork_done_in_parent). A count, not a flag: two threads may
    /// fork at once (glibc serialises its fork handlers, other C
    /// libraries need not), and the first to finish must not open the
    /// gate under the second.
    pub fn hold_attachments_back(&self) {
        self.forking.fetch_add(1, Ordering::SeqCst);
        sync::dekker_fence();
    }

    /// The wait's condition: no attachment is inside its window. Once true
    /// after [`hold_attachments_back`](Self::hold_attachments_back), it
    /// stays true until the fork is done.
    pub fn no_attachment_inside(&self) -> bool {
        self.attaching.load(Ordering::SeqCst) == 0
    }

    /// After the fork, in the parent: this fork no longer holds
    /// attachments back.
    pub fn fork_done_in_parent(&self) {
        self.forking.fetch_sub(1, Ordering::SeqCst);
    }

    /// After the fork, in the child: it has one thread, this one, so no
    /// other fork is under way in it (the parent's other forkers' counts
    /// were copied too) and no attachment is inside its window. The count
    /// of attachments must be reset too: an attachment that announced
    /// itself just after the forker's last look, and was about to back off,
    /// is copied as 1 with no thread left to take it back, and the child's
    /// own next fork would wait for it forever (the flag-only gate before
    /// stop 20 kept that count).
    pub fn fork_done_in_child(&self) {
        self.forking.store(0, Ordering::SeqCst);
        self.attaching.store(0, Ordering::SeqCst);
    }
}
