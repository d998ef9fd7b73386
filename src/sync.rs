//! The `sync` facade: atomics, futex wait/wake and the clock that the lock
//! algorithm uses.
//!
//! Owns: the switch between the real primitives (std atomics living in the
//! shared mapping, `futex(2)` without `FUTEX_PRIVATE_FLAG`, `Instant`) and the
//! loom model (loom atomics in a heap region, a futex shim built on a loom
//! mutex and condvar, a logical per-thread clock), selected by the crate-own
//! cfg `locktable_loom`. The same algorithm code in [`crate::lockword`] and
//! [`crate::recovery`] compiles against either.
//!
//! May not touch: the table layout or any policy; it only provides
//! primitives.

#[cfg(not(locktable_loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(locktable_loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use std::time::Duration;

/// Outcome of a futex wait. Callers never trust it: every wait loop re-checks
/// its condition, so spurious wakeups and lost races are harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitOutcome {
    /// Woken, interrupted, or the word had already changed.
    Woken,
    /// The timeout passed.
    TimedOut,
}

/// Makes the store-then-load (Dekker) pattern explicit for the model checker.
///
/// Every Dekker pair in the algorithm is written with `SeqCst` read-modify-
/// writes followed by `SeqCst` loads. In the C++20/Rust memory model all
/// `SeqCst` operations are in one total order consistent with program order,
/// so the store-buffering outcome (both sides miss the other's store) is
/// forbidden without any fence, and on x86-64 the locked RMW already is a
/// full barrier. loom, however, models `SeqCst` accesses as acquire/release
/// only, so under loom this inserts the `fence(SeqCst)` that makes loom see
/// the same guarantee. It is a no-op in real builds.
#[inline(always)]
pub(crate) fn dekker_fence() {
    #[cfg(locktable_loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// Hint inside a bounded spin loop (loom: yield so the model explores others).
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(not(locktable_loom))]
    std::hint::spin_loop();
    #[cfg(locktable_loom)]
    loom::thread::yield_now();
}

/// Gives the CPU away once (loom: lets the model run another thread).
#[inline]
pub(crate) fn yield_now() {
    #[cfg(not(locktable_loom))]
    std::thread::yield_now();
    #[cfg(locktable_loom)]
    loom::thread::yield_now();
}

/// Sleeps for `d` (loom: advances the thread's logical clock by `d` and
/// yields, so a model sees time pass without blocking).
pub(crate) fn pause(d: Duration) {
    #[cfg(not(locktable_loom))]
    std::thread::sleep(d);
    #[cfg(locktable_loom)]
    {
        advance_clock(d);
        loom::thread::yield_now();
    }
}

// ---------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------

/// A point in time. Real builds: `Instant`. loom: a logical per-thread clock
/// that advances only when a timed wait "sleeps", so timeouts are explored
/// deterministically.
#[cfg(not(locktable_loom))]
pub(crate) type Instant = std::time::Instant;

#[cfg(not(locktable_loom))]
#[inline]
pub(crate) fn now() -> Instant {
    std::time::Instant::now()
}

#[cfg(locktable_loom)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Instant(u64);

#[cfg(locktable_loom)]
impl Instant {
    pub(crate) fn checked_add(self, d: Duration) -> Option<Instant> {
        Some(Instant(self.0.saturating_add(d.as_nanos() as u64)))
    }
    pub(crate) fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(locktable_loom)]
std::thread_local! {
    static LOGICAL_NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(locktable_loom)]
pub(crate) fn now() -> Instant {
    Instant(LOGICAL_NOW.with(|c| c.get()))
}

#[cfg(locktable_loom)]
fn advance_clock(d: Duration) {
    LOGICAL_NOW.with(|c| c.set(c.get().saturating_add(d.as_nanos() as u64)));
}

/// Nanoseconds on a clock that every process of the host shares
/// (`CLOCK_MONOTONIC`): the reader-bias cooling window is compared across
/// processes. loom: the thread's logical clock.
#[cfg(not(locktable_loom))]
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // `ts` is a live, writable timespec on this stack frame for the whole
    // call; CLOCK_MONOTONIC always exists on Linux.
    // SAFETY: sound for the reasons just given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(locktable_loom)]
pub(crate) fn monotonic_ns() -> u64 {
    now().0
}

/// Resets the calling thread's logical clock (loom models start each thread at 0).
#[cfg(locktable_loom)]
pub fn reset_logical_clock() {
    LOGICAL_NOW.with(|c| c.set(0));
}

// ---------------------------------------------------------------------------
// Futex
// ---------------------------------------------------------------------------

/// Sleeps while `*word == expected`, at most `timeout` (forever if `None`).
///
/// Real builds: `FUTEX_WAIT` without `FUTEX_PRIVATE_FLAG`, because the word
/// lives in a `MAP_SHARED` mapping and the waker may be another process; the
/// kernel keys shared futexes by (inode, offset), so every process's mapping
/// of the table file reaches the same wait queue.
#[cfg(not(locktable_loom))]
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<Duration>,
) -> WaitOutcome {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // `word` is a valid, aligned 32-bit atomic for the duration of the
    // call (the caller's borrow keeps the mapping alive); FUTEX_WAIT only reads
    // it. `ts_ptr` is null or points at a live timespec on this stack frame.
    // SAFETY: sound for the reasons just given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT) {
        WaitOutcome::TimedOut
    } else {
        // 0 (woken), EAGAIN (value changed), EINTR (signal): re-check.
        WaitOutcome::Woken
    }
}

/// Wakes every waiter sleeping on `word` (in any process).
#[cfg(not(locktable_loom))]
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    // `word` is a valid aligned 32-bit word; FUTEX_WAKE does not
    // access memory beyond using the address as a key.
    // SAFETY: sound for the reasons just given.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(locktable_loom)]
mod futex_shim {
    use loom::sync::{Condvar, Mutex};

    /// Sleepers: (address of the futex word, ticket, woken).
    #[derive(Default)]
    pub(super) struct Sleepers {
        pub(super) next_ticket: u64,
        pub(super) list: Vec<(usize, u64, bool)>,
    }

    pub(super) struct Shim {
        pub(super) lock: Mutex<Sleepers>,
        pub(super) cv: Condvar,
    }

    loom::lazy_static! {
        pub(super) static ref SHIM: Shim = Shim { lock: Mutex::new(Sleepers::default()), cv: Condvar::new() };
    }
}

/// loom futex: the value check and the sleep happen under one loom mutex, and
/// a wake takes the same mutex, which is exactly the atomicity `FUTEX_WAIT`
/// gives. As in the kernel, a wake reaches only the sleepers of the woken
/// word: each sleeper is registered with its word's address and sleeps again
/// after a condvar wake meant for another word, so a wake sent to the wrong
/// word leaves the right sleeper asleep, and loom reports the deadlock. A
/// timed wait never blocks: it advances the thread's logical clock by the
/// timeout and reports `TimedOut`, so loom explores the timeout path.
#[cfg(locktable_loom)]
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<Duration>,
) -> WaitOutcome {
    let shim = &*futex_shim::SHIM;
    let mut sleepers = shim.lock.lock().unwrap();
    if word.load(Ordering::SeqCst) != expected {
        return WaitOutcome::Woken;
    }
    match timeout {
        None => {
            let addr = word as *const AtomicU32 as usize;
            let ticket = sleepers.next_ticket;
            sleepers.next_ticket += 1;
            sleepers.list.push((addr, ticket, false));
            loop {
                sleepers = shim.cv.wait(sleepers).unwrap();
                let at = sleepers.list.iter().position(|e| e.1 == ticket);
                if let Some(i) = at.filter(|&i| sleepers.list[i].2) {
                    sleepers.list.swap_remove(i);
                    return WaitOutcome::Woken;
                }
            }
        }
        Some(d) => {
            drop(sleepers);
            advance_clock(d);
            loom::thread::yield_now();
            WaitOutcome::TimedOut
        }
    }
}

/// Wakes the sleepers registered on `word` (and only those).
#[cfg(locktable_loom)]
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    let shim = &*futex_shim::SHIM;
    let mut sleepers = shim.lock.lock().unwrap();
    let addr = word as *const AtomicU32 as usize;
    let mut any = false;
    for e in sleepers.list.iter_mut().filter(|e| e.0 == addr) {
        e.2 = true;
        any = true;
    }
    if any {
        shim.cv.notify_all();
    }
}
