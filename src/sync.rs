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

/// The light half of an asymmetric fence, on a biased reader's path in a
/// table whose readers publish with plain stores (DESIGN §10, "Asymmetric
/// fences"): it keeps the compiler from moving the reader's publish after
/// its re-load, and nothing more; the CPU may still let the re-load pass
/// the store (store buffering). The heavy half, [`heavy_barrier`], issued
/// by a revoking writer between its claim and its scan, forces a full
/// barrier into every running thread of every registered process, which
/// closes that window.
///
/// loom cannot model `membarrier`. Under loom the pair is an AcqRel
/// read-modify-write of one shared word ([`BARRIER_WORD`]) on each side:
/// the reader's (here) and the claimant's ([`heavy_barrier`]) are ordered
/// one way or the other, so either the reader's publish happens before the
/// claimant's scan or the claim happens before the reader's re-load,
/// which is exactly what the real barrier gives; and, unlike a pair of
/// `fence(SeqCst)`, one half alone gives nothing, so a model whose
/// claimant misses a barrier it needs fails (with two SeqCst fences, the
/// claimant's `dekker_fence` already made the barrier redundant under loom,
/// and a missing barrier went unseen). It over-approximates in one way:
/// two readers' light fences also order each other, which real readers'
/// compiler fences do not.
#[inline(always)]
pub(crate) fn light_fence() {
    #[cfg(not(locktable_loom))]
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    #[cfg(locktable_loom)]
    BARRIER_WORD.fetch_add(0, Ordering::AcqRel);
}

#[cfg(locktable_loom)]
loom::lazy_static! {
    /// The word whose read-modify-writes stand in for the asymmetric fence
    /// pair under loom ([`light_fence`]). Its value means nothing.
    static ref BARRIER_WORD: AtomicU32 = AtomicU32::new(0);
}

/// The heavy half of an asymmetric fence: when it returns, every thread of
/// every process registered with [`membarrier::register`] has executed a
/// full memory barrier at some point since it was called (or was not
/// running, and a context switch is one), so a plain store a reader made
/// before that point is visible to the caller's later loads, and a reader's
/// loads after that point see the caller's earlier stores. loom: an AcqRel
/// read-modify-write of the word of [`light_fence`].
#[inline]
pub(crate) fn heavy_barrier() {
    #[cfg(not(locktable_loom))]
    membarrier::global_barrier();
    #[cfg(locktable_loom)]
    BARRIER_WORD.fetch_add(1, Ordering::AcqRel);
}

/// `membarrier(2)`: the kernel side of the asymmetric fence.
#[cfg(not(locktable_loom))]
pub(crate) mod membarrier {
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

    // The command values of <linux/membarrier.h> (stable kernel ABI).
    const CMD_QUERY: libc::c_long = 0;
    const CMD_GLOBAL: libc::c_long = 1 << 0;
    const CMD_GLOBAL_EXPEDITED: libc::c_long = 1 << 1;
    const CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_long = 1 << 2;

    fn call(cmd: libc::c_long) -> Option<libc::c_long> {
        // membarrier(cmd, flags = 0, cpu_id = 0) reads and writes no user
        // memory; an unknown or forbidden command only returns -1.
        // SAFETY: sound for the reasons just given.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_uint,
                0 as libc::c_int,
            )
        };
        (rc >= 0).then_some(rc)
    }

    /// The commands the kernel offers to this process (0 if the call is
    /// missing or forbidden, as under some seccomp profiles).
    fn supported() -> libc::c_long {
        call(CMD_QUERY).unwrap_or(0)
    }

    /// True if this process can issue the heavy barrier of an asymmetric
    /// fence: it issues one, the expedited command or else the slow global
    /// one, and remembers which worked. Issuing, not only asking
    /// `MEMBARRIER_CMD_QUERY`: a seccomp filter may allow the query and
    /// refuse the barrier (tests/membarrier_seccomp.rs), and then every
    /// revocation would spin in [`global_barrier`]'s retry loop for good.
    pub(crate) fn can_issue() -> bool {
        let s = supported();
        if s & CMD_GLOBAL_EXPEDITED != 0 && call(CMD_GLOBAL_EXPEDITED).is_some() {
            return true;
        }
        if s & CMD_GLOBAL != 0 && call(CMD_GLOBAL).is_some() {
            // Relaxed: see `CHOSEN`.
            CHOSEN.store(2, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// True if asymmetric fences can be used here at all: the expedited
    /// barrier exists, and this process can register for it.
    pub(crate) fn expedited_available() -> bool {
        let s = supported();
        s & CMD_GLOBAL_EXPEDITED != 0 && s & CMD_REGISTER_GLOBAL_EXPEDITED != 0
    }

    /// Registers this process to receive expedited global barriers (it
    /// stays registered until it exits or execs), then makes sure every
    /// CPU knows it ([`refresh_runqueues`]). Idempotent. True on success:
    /// only then may its biased readers publish with plain stores.
    pub(crate) fn register() -> bool {
        expedited_available()
            && call(CMD_REGISTER_GLOBAL_EXPEDITED).is_some()
            && refreshed_in_this_process()
    }

    /// Which process [`refresh_runqueues`] last refreshed for, as
    /// [`this_process`] names it; 0: none yet. A forked child has another
    /// address space and refreshes for itself. Acquire/Release: a thread
    /// that sees the key sees a completed refresh.
    static REFRESHED_FOR: AtomicU64 = AtomicU64::new(0);

    /// This process, as its fork epoch (bumped in every child that our
    /// `atfork` handler sees, even a child with the same pid in a new PID
    /// namespace) and its pid (for children made without the handlers).
    /// Never 0: a pid is positive.
    fn this_process() -> u64 {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        (crate::fork::epoch() << 32) | u64::from(pid as u32)
    }

    fn refreshed_in_this_process() -> bool {
        let me = this_process();
        if REFRESHED_FOR.load(Ordering::Acquire) == me {
            return true;
        }
        let done = refresh_runqueues();
        if done {
            REFRESHED_FOR.store(me, Ordering::Release);
        }
        done
    }

    /// Why registration alone is not enough (found in stop 20, DESIGN §10
    /// "Asymmetric fences"): the expedited global barrier interrupts only
    /// the CPUs whose run queue is marked as running a registered address
    /// space, and the kernel (6.18 here) updates that mark when a CPU
    /// switches to another address space. A CPU that last ran one of our
    /// threads before we registered, and since ran only kernel threads
    /// (which borrow the last address space), keeps the old, unregistered
    /// mark, and when our thread comes back it is not switching address
    /// spaces, so the mark stays: barriers skip that CPU while our reader
    /// runs on it (measured: 0 interrupts in 20,000 barriers to a CPU where
    /// a registered thread spun; `tests/membarrier_reach.rs`).
    ///
    /// The cure: after registering, make every CPU switch to another
    /// address space once. A child with its own copy of the address space
    /// (a raw `clone` without `CLONE_VM`: a fork that runs no `atfork`
    /// handlers) moves itself onto each CPU in turn and exits; the next
    /// time one of our threads runs on that CPU, the switch back updates
    /// the mark. Only on architectures whose `clone` argument order is
    /// known here; elsewhere (or if the child fails) false, and the caller
    /// publishes with locked instructions (always correct).
    fn refresh_runqueues() -> bool {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        {
            if under_seccomp_filter() {
                return false;
            }
            // The child must never run one of the application's signal
            // handlers (a handler could write to a pipe the parent reads):
            // it is created with every signal blocked, and stays so.
            let old_mask = block_all_signals();
            // Exit signal 0, not SIGCHLD: the application gets no SIGCHLD
            // for a child it never made, and its waitpid(-1) or wait()
            // (without __WALL / __WCLONE) neither finds nor reaps it, nor
            // does SIGCHLD set to SIG_IGN reap it at exit; only
            // `wait_for_success`, which names the pid and passes __WALL.
            // SAFETY: clone(exit signal 0, no new stack, no tids, no TLS)
            // is fork() without glibc's handlers and without SIGCHLD: the
            // child runs on a private copy of this thread's stack and memory. The child calls only
            // raw system calls (no allocation, no lock, no unwinding), which
            // is all a child of a multi-threaded process may do, and leaves
            // with `_exit`, so it never returns into Rust code.
            let pid = unsafe { libc::syscall(libc::SYS_clone, 0 as libc::c_long, 0, 0, 0, 0) };
            if pid == 0 {
                visit_cpus_and_exit();
            }
            restore_signals(&old_mask);
            if pid < 0 {
                return false;
            }
            wait_for_success(pid as libc::pid_t)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    }

    /// True if this process runs under a seccomp filter, or if that cannot
    /// be read. A filter may answer `clone` by killing the process
    /// (systemd's `SystemCallFilter=` without an error number does), and
    /// nothing short of calling it tells: a process that merely attaches to
    /// a table must not die of it, so such a process skips the refresh and
    /// reads with locked instructions (Docker's default profile is a
    /// filter too: containers get the locked protocol).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn under_seccomp_filter() -> bool {
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return true;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map_or(true, |mode| mode.trim() != "0")
    }

    /// Blocks every signal for the calling thread; returns the old mask.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn block_all_signals() -> libc::sigset_t {
        // SAFETY: both sets are valid, initialised by sigfillset / written
        // by pthread_sigmask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            old
        }
    }

    /// Puts back the mask [`block_all_signals`] returned.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn restore_signals(old: &libc::sigset_t) {
        // SAFETY: `old` came from pthread_sigmask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
    }

    /// The child of [`refresh_runqueues`]: runs on each CPU it may use in
    /// turn (those of its cpuset that are online: our threads cannot run
    /// elsewhere), then exits with status 0. Any other outcome exits
    /// non-zero, so that the parent keeps locked publishes: a
    /// `sched_setaffinity` refused for another reason than EINVAL (a CPU
    /// outside the cpuset, or gone offline), such as EPERM from a seccomp
    /// filter or an LSM; a move that did not land on the CPU; a kernel with
    /// more CPUs than a `cpu_set_t` holds (the mask calls fail with EINVAL);
    /// or no CPU visited at all. Ignoring the calls' results, as this did
    /// first, let a child that visited nothing report success.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn visit_cpus_and_exit() -> ! {
        const SET: usize = std::mem::size_of::<libc::cpu_set_t>();
        // Raw system calls and plain memory only: see `refresh_runqueues`.
        // SAFETY: every cpu_set_t here is a valid, initialised local, and
        // CPU_SET / CPU_ISSET index below CPU_SETSIZE; the affinity calls
        // read or write exactly `SET` bytes of it; getcpu writes one
        // c_uint through a valid pointer and ignores the null ones;
        // __errno_location returns this thread's errno (the child's own
        // copy of the memory); _exit ends the child at once (exit_group,
        // no handlers), the only way out a child of a multi-threaded
        // process may take.
        unsafe {
            let fail = |code| -> ! { libc::_exit(code) };
            // Ask for every CPU: the kernel keeps those of our cpuset that
            // are online, and reading the mask back names them.
            let mut allowed: libc::cpu_set_t = std::mem::zeroed();
            std::ptr::write_bytes(&mut allowed as *mut libc::cpu_set_t, 0xff, 1);
            if libc::syscall(libc::SYS_sched_setaffinity, 0, SET, &allowed as *const _) != 0 {
                fail(1);
            }
            if libc::syscall(libc::SYS_sched_getaffinity, 0, SET, &mut allowed as *mut _) <= 0 {
                fail(2);
            }
            let mut visited = 0usize;
            for cpu in 0..libc::CPU_SETSIZE as usize {
                if !libc::CPU_ISSET(cpu, &allowed) {
                    continue;
                }
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                // Returns once this thread runs on an allowed CPU, that is,
                // on `cpu`.
                if libc::syscall(libc::SYS_sched_setaffinity, 0, SET, &set as *const _) != 0 {
                    if *libc::__errno_location() == libc::EINVAL {
                        continue; // left the cpuset or went offline meanwhile
                    }
                    fail(3);
                }
                let mut on: libc::c_uint = u32::MAX;
                let rc = libc::syscall(
                    libc::SYS_getcpu,
                    &mut on as *mut libc::c_uint,
                    std::ptr::null_mut::<libc::c_uint>(),
                    std::ptr::null_mut::<libc::c_void>(),
                );
                if rc != 0 || on as usize != cpu {
                    fail(4);
                }
                visited += 1;
            }
            if visited == 0 {
                fail(5);
            }
            libc::_exit(0)
        }
    }

    /// True if child `pid` exited with status 0 within [`REFRESH_LIMIT`].
    /// False if it failed, if the wait failed otherwise than EINTR (then
    /// nothing proves the CPUs were visited), or if the child is still
    /// moving when the limit passes: a CPU held by a real-time busy loop
    /// (with RT throttling off) would keep it from ever landing there, and
    /// an attach must not hang for that; the child is then killed and
    /// reaped, and the process reads with locked instructions. A child
    /// with exit signal 0 is a "clone" child: only a wait with __WALL (or
    /// __WCLONE) that names it can reap it.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn wait_for_success(pid: libc::pid_t) -> bool {
        let deadline = std::time::Instant::now() + REFRESH_LIMIT;
        let mut pause = std::time::Duration::from_micros(20);
        let mut status = 0;
        loop {
            // SAFETY: `status` is a valid out-pointer for the call.
            let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG) };
            if rc == pid {
                return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            }
            let interrupted =
                rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
            if rc < 0 && !interrupted {
                return false;
            }
            if std::time::Instant::now() >= deadline {
                kill_and_reap(pid);
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(5));
        }
    }

    /// How long an attach waits for the refresh's child.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const REFRESH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

    /// Ends our refresh child `pid` and reaps it (SIGKILL ends it even
    /// while it waits to be moved to a CPU).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn kill_and_reap(pid: libc::pid_t) {
        let mut status = 0;
        // SAFETY: `pid` is our own unreaped child (only we wait for it, with
        // __WALL), so the pid cannot have been reused; `status` is valid.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            while libc::waitpid(pid, &mut status, libc::__WALL) < 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
    }

    /// Which command [`global_barrier`] issues: 0 not chosen yet, 1 the
    /// expedited one (IPIs to the CPUs running registered processes, about
    /// a microsecond), 2 the slow global one (a scheduler grace period,
    /// milliseconds; only where the expedited one is missing).
    static CHOSEN: AtomicU8 = AtomicU8::new(0);

    /// Issues the heavy barrier. Never fails: attach issued one
    /// ([`can_issue`]); should the chosen command fail anyway, the other is
    /// tried, the expedited one first (a transient failure of the expedited
    /// command, such as its ENOMEM, does not switch the process to the slow
    /// one for good), and should both fail (a seccomp filter installed
    /// after attach), it retries after a pause rather than grant a lock
    /// it cannot prove exclusive.
    pub(crate) fn global_barrier() {
        // Relaxed: the choice carries no data; any value read is valid.
        let first = match CHOSEN.load(Ordering::Relaxed) {
            2 => CMD_GLOBAL,
            _ => CMD_GLOBAL_EXPEDITED,
        };
        if call(first).is_some() {
            return;
        }
        let mut pause = std::time::Duration::from_micros(100);
        loop {
            if call(CMD_GLOBAL_EXPEDITED).is_some() || call(CMD_GLOBAL).is_some() {
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        }
    }
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
