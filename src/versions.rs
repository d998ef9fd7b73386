//! Change counters of the session cache: the seqlock-style protocol on one bucket word.
//!
//! Owns: the meaning of a bucket word of the session layer's `.versions` mapping (see
//! `session/cache.rs` for the file). A word is even when no write of a session hashed to it is
//! in progress and odd while one is (or after a writer died in the middle of one). Every write
//! that changes what a load would return moves the word forward twice: [`begin`] before the store
//! write, [`end`] after it. A process caches a decoded session only under an even word read
//! *before* its store read ([`fill_stamp`]), and uses the copy only while the word still has that
//! value ([`is_current`]). Writers of one bucket are serialized by the bucket's write lock (held by
//! the caller), so a word has one writer at a time; a writer killed between `begin` and `end`
//! leaves the word odd, and the next writer's `begin` moves it to another odd value and its `end`
//! makes it even again.
//!
//! Every operation is `SeqCst`: the store operations the words bracket are system calls (or, in
//! the model, `SeqCst` atomics), and the argument in DESIGN.md section 11 ("Hot-session cache")
//! is a single total order of begin, store write, end, stamp load and store read.
//!
//! May not touch: the lock table and its file format; the store.

use crate::sync::{AtomicU64, Ordering};

/// Marks a write of a session of this bucket as started; returns the value to pass to [`end`].
/// The caller holds the bucket's write lock, so nobody else writes the word meanwhile.
pub fn begin(word: &AtomicU64) -> u64 {
    let w = word.load(Ordering::SeqCst);
    // Even: nobody in progress. Odd: a writer died mid-write (we hold the lock, so it is not
    // running); move on to another odd value so that no stamp can ever match the word again.
    let started = if w % 2 == 0 {
        w.wrapping_add(1)
    } else {
        w.wrapping_add(2)
    };
    word.store(started, Ordering::SeqCst);
    started
}

/// Completes the write started by [`begin`] (the store write is over, whatever its outcome).
pub fn end(word: &AtomicU64, started: u64) {
    word.store(started.wrapping_add(1), Ordering::SeqCst);
}

/// Read before the store read of a fill: the stamp a decoded copy may be cached under, or `None`
/// while a write is in progress (or a writer died mid-write) and nothing may be cached.
pub fn fill_stamp(word: &AtomicU64) -> Option<u64> {
    let w = word.load(Ordering::SeqCst);
    (w % 2 == 0).then_some(w)
}

/// True while a copy cached under `stamp` is current: no write of its bucket began since the
/// stamp was read.
pub fn is_current(word: &AtomicU64, stamp: u64) -> bool {
    word.load(Ordering::SeqCst) == stamp
}
