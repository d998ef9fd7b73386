//! What a child process inherits across `fork()`, and how it is disowned.
//!
//! Owns: the process-global fork epoch and the registry of table file
//! descriptors that a forked child must close.
//!
//! Why: a table's liveness lease is an OFD lock, which the kernel drops when
//! the *last* descriptor of the open file description closes. A child made
//! by `fork()` (without exec) holds a copy of that descriptor, so while any
//! such child lives, a dead parent would still look alive and its holds
//! would never be recovered (pre-forking servers do exactly this). The
//! `pthread_atfork` child handler therefore closes every registered table
//! descriptor in the child, and bumps the epoch so that the child's copies
//! of handles and guards refuse to act (the holds are the parent's).
//! Attaching opens the descriptor and maps the file inside an
//! [`AttachWindow`], which a fork (its prepare handler) waits for, so no
//! child is made between "opened" and "registered, mapping not inherited".
//!
//! May not touch: tables; it only sees descriptor numbers.

use std::cell::Cell;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::atomic::{compiler_fence, AtomicI32, AtomicU64, AtomicU8, Ordering};

use crate::fork_gate::ForkGate;

/// Incremented in every child after `fork()`. Relaxed everywhere: the child
/// handler runs while the child has one thread, before any code of the child
/// reads it, so program order alone makes the new value visible; in the
/// parent it never changes.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// Table descriptors to close in a child. A lock-free array: the child
/// handler runs where only async-signal-safe operations are allowed.
/// Orderings: registration and release are AcqRel/Release for other
/// registering threads; the child handler's Relaxed loads read the snapshot
/// that fork() copied, and no registration can be in flight at the fork,
/// because registrations happen inside an attach window and the prepare
/// handler waits (SeqCst) until no window is open.
const MAX_REGISTERED: usize = 1024;
static FDS: [AtomicI32; MAX_REGISTERED] = [const { AtomicI32::new(-1) }; MAX_REGISTERED];

/// Attachments between "descriptor opened" and "descriptor registered and
/// mapping marked MADV_DONTFORK": a fork in that window would let the child
/// keep the open file description. The prepare handler waits for it to
/// drain and holds new attachments back meanwhile (`fork_gate`).
static GATE: ForkGate = ForkGate::new();

thread_local! {
    /// How many attach windows the current thread is inside or entering
    /// (it is raised before the gate's announcement and lowered after the
    /// leave, so it is never below the thread's own announcements). A
    /// const thread-local without destructor: reading it is a plain TLS
    /// access, safe in a handler that runs inside a signal handler.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

extern "C" fn on_fork_prepare() {
    if DEPTH.with(Cell::get) != 0 {
        // A fork on a thread that is inside (or entering) an attach window:
        // only from a signal handler that interrupted it. Waiting for the
        // windows would wait for this thread's own, which cannot close until
        // the handler returns (a hang, seen in tests/fork_gate_races.rs).
        // Hold new attachments back, but do not wait: the child may inherit
        // the interrupted attachment's descriptor (or another thread's), as
        // any fork did before the gate; the forker chose to fork there.
        GATE.hold_attachments_back();
        return;
    }
    GATE.prepare_fork();
}

extern "C" fn on_fork_parent() {
    GATE.fork_done_in_parent();
}

extern "C" fn on_fork_child() {
    GATE.fork_done_in_child();
    EPOCH.fetch_add(1, Ordering::Relaxed);
    crate::reader_row::after_fork_in_child();
    for slot in &FDS {
        // Clear the slot too: the number may be reused in this child for an
        // unrelated file, which a grandchild must not close.
        let fd = slot.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            // Closing a descriptor is async-signal-safe; the parent's copy
            // and its OFD locks are unaffected.
            // `close` on a descriptor number that this process inherited from
            // its parent; nothing in the child uses it again
            // (ForkSafeFile::drop skips it once the epoch changed).
            // SAFETY: sound for the reasons just given.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

/// Installs the fork handlers once. A plain atomic rather than `Once`: a
/// fork while another thread is inside `Once::call_once` would leave the
/// child's `Once` running forever.
fn install_handlers() {
    static STATE: AtomicU8 = AtomicU8::new(0);
    if STATE.load(Ordering::Acquire) == 2 {
        return;
    }
    if STATE
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        // The child handler only does atomic operations and `close`, all
        // async-signal-safe as a child handler requires; the prepare
        // handler runs in the parent before the fork, where waiting is fine.
        // SAFETY: sound for the reasons just given.
        unsafe {
            libc::pthread_atfork(
                Some(on_fork_prepare),
                Some(on_fork_parent),
                Some(on_fork_child),
            );
        }
        STATE.store(2, Ordering::Release);
    } else {
        while STATE.load(Ordering::Acquire) != 2 {
            std::thread::yield_now();
        }
    }
}

/// Held from before a table descriptor is opened until it is registered
/// and its mapping is marked `MADV_DONTFORK`: no fork happens meanwhile.
pub(crate) struct AttachWindow(());

impl AttachWindow {
    pub(crate) fn enter() -> AttachWindow {
        install_handlers();
        let depth = DEPTH.with(Cell::get);
        DEPTH.with(|d| d.set(depth + 1));
        // Only this thread's signal handlers read DEPTH: a compiler fence
        // keeps the raise before the announcement for them.
        compiler_fence(Ordering::SeqCst);
        if depth == 0 {
            GATE.enter();
        } else {
            // A fork being prepared waits for this thread's outer window;
            // waiting for the fork here would wait forever.
            GATE.enter_nested();
        }
        AttachWindow(())
    }
}

impl Drop for AttachWindow {
    fn drop(&mut self) {
        GATE.leave();
        // The lowering stays after the leave (see `enter`).
        compiler_fence(Ordering::SeqCst);
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// The current fork epoch of this process.
#[inline]
pub(crate) fn epoch() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// A table file whose descriptor a forked child closes at once.
pub(crate) struct ForkSafeFile {
    file: ManuallyDrop<File>,
    slot: Option<usize>,
    epoch: u64,
}

impl ForkSafeFile {
    /// Registers `file`. With more than 1024 tables open at once the
    /// descriptor is not registered (a child then keeps it, as before).
    pub(crate) fn new(file: File) -> ForkSafeFile {
        install_handlers();
        let fd = file.as_raw_fd();
        let slot = FDS.iter().position(|s| {
            s.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        ForkSafeFile {
            file: ManuallyDrop::new(file),
            slot,
            epoch: epoch(),
        }
    }

    /// The fork epoch this file was opened under.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Deref for ForkSafeFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl Drop for ForkSafeFile {
    fn drop(&mut self) {
        // Unregister before closing, so that a fork in between cannot make
        // a child close a reused number; and no fork between the two (an
        // attach window, held until the close below), or the child would
        // keep the descriptor, unregistered, for its whole life (and with
        // it an anonymous table's memory): 19 of 702 children did in
        // tests/fork_gate_races.rs.
        let _window = match self.slot {
            // A child: the fork handler closed this descriptor already, and
            // the number may name another file now. Do not close.
            Some(_) if epoch() != self.epoch => return,
            Some(i) => {
                let window = AttachWindow::enter();
                FDS[i].store(-1, Ordering::Release);
                Some(window)
            }
            None => None,
        };
        // SAFETY: dropped exactly once, here; the file is not used after.
        unsafe { ManuallyDrop::drop(&mut self.file) }
    }
}
