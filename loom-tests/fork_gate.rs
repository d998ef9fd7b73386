//! loom models of the attach/fork gate (`locktable::fork_gate`).
//!
//! The property: **no fork happens while an attachment is inside its
//! window** (between opening the table's descriptor and registering it,
//! with its mapping marked `MADV_DONTFORK`). The window's work is a write
//! to a `loom::cell::UnsafeCell`, and the fork's snapshot of memory is a
//! read of it: if the gate ever let the two overlap, loom reports the data
//! race. The snapshot must also never see a window half done (opened but
//! not registered). Every thread ends, so a gate that could hold an
//! attachment or a fork back for good shows up as a loom deadlock.

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

use locktable::fork_gate::ForkGate;

struct Process {
    gate: ForkGate,
    /// What attachment `i` does inside its window: 1 = descriptor opened,
    /// 2 = registered (the child's handler would close it). A fork copies
    /// whatever they hold. One cell each: attachments may overlap.
    window: [UnsafeCell<u32>; 2],
}

impl Process {
    /// An open gate and two windows not begun.
    fn new() -> Arc<Process> {
        Arc::new(Process {
            gate: ForkGate::new(),
            window: [UnsafeCell::new(0), UnsafeCell::new(0)],
        })
    }
}

/// Attachment `i`'s window reaches step `step` (1 opened, 2 registered).
fn window_step(p: &Process, i: usize, step: u32) {
    // SAFETY: a plain write of the cell; the gate is what keeps a fork's
    // copy from overlapping it, and loom reports it if it does.
    p.window[i].with_mut(|w| unsafe { *w = step });
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    // Both sides spin (with a yield) while the other is inside: each turn
    // of a spin is a branch.
    b.max_branches = 20_000;
    b.check(f);
}

fn attach(p: &Process, i: usize) {
    p.gate.enter();
    inside(p, i);
}

/// One attempt to attach, without waiting (see `fork_once`).
fn attach_once(p: &Process, i: usize) {
    if p.gate.try_enter() {
        inside(p, i);
    }
}

/// The window's work (open, then register), then the leave.
fn inside(p: &Process, i: usize) {
    window_step(p, i, 1);
    window_step(p, i, 2);
    p.gate.leave();
}

/// A fork: the prepare handler, the copy of memory, the parent handler.
/// Returns what the child got.
fn fork(p: &Process) -> [u32; 2] {
    p.gate.prepare_fork();
    let child = copy(p);
    p.gate.fork_done_in_parent();
    child
}

/// A fork that does not spin: the prepare handler's first half and one
/// look; `None` where the real one would wait (it would look again, which
/// is the same look later). With two spinning threads (a forker waiting
/// for an attachment, an attachment waiting for the fork) loom's branches
/// explode, so the models with more threads use this.
fn fork_once(p: &Process) -> Option<[u32; 2]> {
    p.gate.hold_attachments_back();
    let child = p.gate.no_attachment_inside().then(|| copy(p));
    p.gate.fork_done_in_parent();
    child
}

/// The child's copy of the windows.
fn copy(p: &Process) -> [u32; 2] {
    // SAFETY: a plain read of the cell; loom reports it if it
    // overlaps an attachment's write, which is what the models check.
    [0, 1].map(|i| p.window[i].with(|w| unsafe { *w }))
}

fn never_half_done(child: impl Into<Option<[u32; 2]>>) {
    let Some(child) = child.into() else { return };
    assert!(
        child.iter().all(|&s| s != 1),
        "a fork copied an attachment between open and register: {child:?}"
    );
}

#[test]
fn a_fork_never_copies_an_attachment_inside_its_window() {
    model(|| {
        let p = Process::new();
        let a = {
            let p = p.clone();
            thread::spawn(move || attach(&p, 0))
        };
        never_half_done(fork(&p));
        a.join().unwrap();
    });
}

/// An attachment that leaves, and enters again, racing a fork (the
/// back-off and the second announcement).
#[test]
fn an_attachment_entering_twice_and_a_fork() {
    model(|| {
        let p = Process::new();
        let a = {
            let p = p.clone();
            thread::spawn(move || {
                attach(&p, 0);
                attach(&p, 1);
            })
        };
        never_half_done(fork(&p));
        a.join().unwrap();
    });
}

/// Two attachments inside at once (the count at 2, a back-off while the
/// other is inside) and a fork.
#[test]
fn two_attachments_and_a_fork() {
    model(|| {
        let p = Process::new();
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let p = p.clone();
                thread::spawn(move || attach_once(&p, i))
            })
            .collect();
        never_half_done(fork_once(&p));
        for t in threads {
            t.join().unwrap();
        }
    });
}

/// Two forks at once: the first to finish must not let an attachment in
/// under the second (a flag instead of a count failed this model).
#[test]
fn two_forks_and_an_attachment() {
    model(|| {
        let p = Process::new();
        let a = {
            let p = p.clone();
            thread::spawn(move || attach(&p, 0))
        };
        let f = {
            let p = p.clone();
            thread::spawn(move || never_half_done(fork_once(&p)))
        };
        never_half_done(fork_once(&p));
        a.join().unwrap();
        f.join().unwrap();
    });
}

/// A window inside a window of the same thread (a table file dropped on an
/// attach's error path, `ForkSafeFile::drop` entering its own window) and a
/// fork: the inner window enters without waiting, because the fork waits
/// for the outer one; an inner `enter` waiting for the fork would leave
/// both threads waiting for each other (a loom deadlock). Window 0 is the
/// outer work, window 1 the inner.
#[test]
fn a_nested_window_and_a_fork() {
    model(|| {
        let p = Process::new();
        let a = {
            let p = p.clone();
            thread::spawn(move || {
                p.gate.enter();
                window_step(&p, 0, 1);
                p.gate.enter_nested();
                inside(&p, 1);
                window_step(&p, 0, 2);
                p.gate.leave();
            })
        };
        never_half_done(fork(&p));
        a.join().unwrap();
    });
}
