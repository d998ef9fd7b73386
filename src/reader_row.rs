//! Which thread of this process writes which reader row.
//!
//! Owns: the process-wide lease of reader rows to threads. Each process
//! record has `READER_ROWS` rows (DESIGN §10); row `r` of every table's
//! record of this process is written only by the thread that holds lease
//! `r` (and by guards it handed to other threads, which only zero their own
//! entry). That ownership is what lets a biased read publish with a plain
//! store under asymmetric fences: no other thread can take the free entry
//! the store fills. A thread takes a lease at its first biased read and
//! gives it back when it exits; a thread that finds every row leased reads
//! through its process's lane (always correct, only slower), and tries
//! again at its next read.
//!
//! May not touch: the rows themselves or the table; it only hands out
//! numbers.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::layout::READER_ROWS;

/// Leased rows of this process, one bit per lease (bit `b` is row
/// `spread_row(b)`). No two live threads hold the same bit: the RMWs on
/// this one word give that by themselves. But a lease also hands the row's
/// entries from one owner to the next: the next owner's load-then-store of
/// a free entry must see every entry the previous owner filled (a guard it
/// sent to another thread may outlive it), or it could read a stale 0, fill
/// that entry, and have the guard's release zero it under its live read.
/// So the return is a Release RMW and the lease an Acquire one: the
/// previous owner's row stores happen before the next owner's row loads
/// (the RMWs between them on this word continue the release sequence).
static LEASED: AtomicU32 = AtomicU32::new(0);

const ALL_LEASED: u32 = if READER_ROWS >= 32 {
    u32::MAX
} else {
    (1u32 << READER_ROWS) - 1
};

/// The calling thread's lease, as its row (`LEASE_ROW`) and bit number
/// (`LEASE_BIT`), or one of these:
const UNLEASED: u32 = u32::MAX;
/// The thread has exited (its lease was returned): reads taken from other
/// thread-locals' destructors use their lane.
const GONE: u32 = u32::MAX - 1;

thread_local! {
    // Const-initialised, no destructor: readable on every read without a
    // lazy-init check, and from other thread-locals' destructors.
    static LEASE_ROW: Cell<u32> = const { Cell::new(UNLEASED) };
    static LEASE_BIT: Cell<u32> = const { Cell::new(UNLEASED) };
    // Registered once the thread holds a lease; its destructor returns it.
    static RETURN_ON_EXIT: LeaseReturn = const { LeaseReturn };
}

struct LeaseReturn;

impl Drop for LeaseReturn {
    fn drop(&mut self) {
        LEASE_ROW.with(|l| l.set(GONE));
        let bit = LEASE_BIT.with(|l| l.replace(GONE));
        if bit < 32 {
            // Release: see `LEASED`.
            LEASED.fetch_and(!(1 << bit), Ordering::Release);
        }
    }
}

/// The reader row the calling thread owns, leasing one at its first call;
/// `None` when all rows are leased or the thread is exiting.
#[inline]
pub(crate) fn reader_row() -> Option<u32> {
    match LEASE_ROW.with(Cell::get) {
        UNLEASED => lease_one(),
        GONE => None,
        row => Some(row),
    }
}

#[cold]
#[inline(never)]
fn lease_one() -> Option<u32> {
    let mut leased = LEASED.load(Ordering::Relaxed);
    let bit = loop {
        if leased & ALL_LEASED == ALL_LEASED {
            return None;
        }
        let bit = (!leased).trailing_zeros();
        // Acquire on success: see `LEASED` (the failure carries nothing).
        match LEASED.compare_exchange_weak(
            leased,
            leased | 1 << bit,
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => break bit,
            Err(now) => leased = now,
        }
    };
    // Register the return before using the lease; if the thread is already
    // tearing down its thread-locals, give the lease back at once.
    if RETURN_ON_EXIT.try_with(|_| ()).is_err() {
        LEASED.fetch_and(!(1 << bit), Ordering::Relaxed);
        LEASE_ROW.with(|l| l.set(GONE));
        return None;
    }
    let row = spread_row(bit);
    LEASE_BIT.with(|l| l.set(bit));
    LEASE_ROW.with(|l| l.set(row));
    Some(row)
}

/// In a forked child: only the forking thread survives, so only its lease
/// stays taken (the others would never be returned). Called from the fork
/// child handler: atomics and a const thread-local only.
pub(crate) fn after_fork_in_child() {
    let mine = LEASE_BIT.with(Cell::get);
    let keep = if mine < 32 { 1 << mine } else { 0 };
    LEASED.store(keep, Ordering::Relaxed);
}

/// Lease number -> row: the even rows first, then the odd ones, so that
/// threads leasing one after the other (usually running at the same time)
/// write lines 128 bytes apart, not neighbouring lines, which CPUs that
/// fetch lines in pairs (adjacent-line prefetch) would make share.
fn spread_row(n: u32) -> u32 {
    let rows = READER_ROWS as u32;
    let n = n % rows;
    let half = (rows / 2).max(1);
    (n % half) * 2 + n / half
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_row_is_a_permutation_without_neighbours() {
        let mut seen: Vec<u32> = (0..READER_ROWS as u32).map(spread_row).collect();
        for pair in seen.windows(2) {
            assert_ne!(pair[0].abs_diff(pair[1]), 1, "{pair:?}");
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..READER_ROWS as u32).collect::<Vec<_>>());
    }

    #[test]
    fn live_threads_never_share_a_row_and_exited_threads_return_theirs() {
        // More threads than rows, all alive at once: the leased rows are
        // distinct, the rest get none.
        let n = READER_ROWS as usize + 8;
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
        let rows: Vec<Option<u32>> = (0..n)
            .map(|_| {
                let b = barrier.clone();
                std::thread::spawn(move || {
                    let r = reader_row();
                    assert_eq!(reader_row(), r, "a thread keeps its lease");
                    b.wait();
                    r
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let mut leased: Vec<u32> = rows.iter().flatten().copied().collect();
        leased.sort_unstable();
        let before = leased.len();
        leased.dedup();
        assert_eq!(leased.len(), before, "two live threads share a row");
        // Other tests' threads may hold leases meanwhile, so only bounds.
        assert!(before <= READER_ROWS as usize);
        // All those threads exited: a new thread gets a row again.
        let again = std::thread::spawn(reader_row).join().unwrap();
        assert!(
            again.is_some(),
            "leases of exited threads were not returned"
        );
    }
}
