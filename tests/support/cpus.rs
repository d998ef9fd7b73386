//! Threads pinned to CPUs, spins, the membarrier run-queue trap, and a watchdog, for the tests
//! of the asymmetric fence and of fork (DESIGN §10 "Status", §6 "fork()").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pins the calling thread to `cpu`; false if that CPU may not be used.
pub fn pin_to(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Spins (never sleeps) for `d`.
pub fn spin_for(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Sets the trap of DESIGN §10 "Status": the calling thread runs on CPU 1, then moves to CPU 0,
/// so CPU 1 last ran this process before anything in it registers for `membarrier`; the thread
/// stays pinned to CPU 0. False (and nothing set) if CPUs 0 and 1 cannot both be used.
pub fn set_run_queue_trap() -> bool {
    if !pin_to(1) || !pin_to(0) {
        return false;
    }
    assert!(pin_to(1));
    spin_for(Duration::from_millis(50));
    assert!(pin_to(0));
    std::thread::sleep(Duration::from_millis(5));
    true
}

/// Ends the whole test process, with a message, if the returned flag is not set within `limit`:
/// a lost wake-up or a deadlocked fork must fail the test, not hang the test run.
pub fn watchdog(what: &'static str, limit: Duration) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let seen = done.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !seen.load(Ordering::Relaxed) {
            if start.elapsed() > limit {
                eprintln!("{what}: not done after {limit:?}, something hangs");
                // SAFETY: ends the process at once (also from a process whose
                // other threads are forking); nothing else to uphold.
                unsafe { libc::_exit(101) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    done
}
