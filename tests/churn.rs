//! Churn: millions of distinct IDs through a small table while other
//! processes hold a few fixed IDs in every mode and check mutual exclusion
//! with their own counters, and one acquirer is stopped (SIGSTOP) across the
//! churn and resumed after it. Never may two holders of one ID be in
//! conflicting modes.
//!
//! Children are this test binary re-executed with the role in
//! `LOCKTABLE_CHURN_ROLE`. They share a small mapped "check" file of atomic
//! counters: per fixed ID the readers, upgradable holders and writers inside
//! their critical sections, plus a violation count and a stop flag.
//!
//! `LOCKTABLE_CHURN_IDS=N` sets the number of distinct churned IDs (default
//! 2,000,000, split between two churner processes).
#![cfg(not(locktable_loom))]

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use locktable::{LockTable, TableOptions};
use memmap2::MmapMut;
use support::child::{quiet_child_command, send_signal as signal, wait_until as wait_for, Kids};

mod support;

const ROLE: &str = "LOCKTABLE_CHURN_ROLE";
const DIR: &str = "LOCKTABLE_CHURN_DIR";
const FIXED: usize = 4;
const CHURNERS: u64 = 2;
const CHECKERS: usize = 2;
const DEFAULT_IDS: u64 = 2_000_000;

// Check-file words.
const STOP: usize = 0;
const VIOLATIONS: usize = 1;
const CHECKED_OPS: usize = 2;
const STALLED_OPS: usize = 3;
const CHURNED: usize = 4;
const FIXED_BASE: usize = 8;
const WORDS: usize = FIXED_BASE + FIXED;

// A fixed ID's word: readers in bits 0..24, upgradable holders in 24..32,
// writers from bit 32.
const R: u64 = 1;
const U: u64 = 1 << 24;
const W: u64 = 1 << 32;
const R_MASK: u64 = U - 1;
const U_MASK: u64 = (W - 1) & !R_MASK;

fn table(dir: &Path) -> LockTable {
    let opts = TableOptions::default().capacity(64).max_processes(16);
    LockTable::open(dir.join("table"), &opts).unwrap()
}

/// The shared check file, mapped.
struct Check {
    map: MmapMut,
}

impl Check {
    fn create(dir: &Path) -> Check {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("check"))
            .unwrap();
        f.set_len(8 * WORDS as u64).unwrap();
        Self::map(dir)
    }

    fn map(dir: &Path) -> Check {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("check"))
            .unwrap();
        // the file is ours for the test, and every process accesses
        // its words only atomically (see `word`).
        // SAFETY: sound for the reasons just given.
        let map = unsafe { MmapMut::map_mut(&f) }.unwrap();
        Check { map }
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // The mapping is page aligned and WORDS * 8 bytes long; word `i` is
        // 8-aligned and inside it; every process touches these bytes only
        // through atomics, and the reference borrows the mapping.
        // SAFETY: sound for the reasons just given.
        unsafe { &*(self.map.as_ptr().add(8 * i) as *const AtomicU64) }
    }

    fn stopped(&self) -> bool {
        self.word(STOP).load(Ordering::SeqCst) != 0
    }

    /// Enters a critical section of fixed ID `k` in mode `m` (R, U or W)
    /// and records a violation if a conflicting holder is inside.
    fn enter(&self, k: usize, m: u64) {
        let prev = self.word(FIXED_BASE + k).fetch_add(m, Ordering::SeqCst);
        let conflict = match m {
            R => prev >= W,
            U => prev >= W || prev & U_MASK != 0,
            _ => prev != 0,
        };
        if conflict {
            self.word(VIOLATIONS).fetch_add(1, Ordering::SeqCst);
            eprintln!("violation: fixed-{k} entered in mode {m:#x} with {prev:#x} inside");
        }
    }

    fn leave(&self, k: usize, m: u64) {
        self.word(FIXED_BASE + k).fetch_sub(m, Ordering::SeqCst);
    }
}

/// A small xorshift generator (no dependency, deterministic per seed).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One checked operation on a random fixed ID in a random mode. Timed
/// acquisitions: a holder stopped by SIGSTOP may keep an ID for a while.
fn checked_op(t: &LockTable, c: &Check, rng: &mut Rng) {
    let k = rng.below(FIXED as u64) as usize;
    let id = format!("fixed-{k}");
    let limit = Duration::from_millis(50);
    let hold = || thread::yield_now();
    match rng.below(5) {
        0 => {
            if let Ok(g) = t.read_timeout(&id, limit) {
                c.enter(k, R);
                hold();
                c.leave(k, R);
                drop(g);
            }
        }
        1 => {
            if let Some(g) = t.try_read(&id).unwrap() {
                c.enter(k, R);
                c.leave(k, R);
                drop(g);
            }
        }
        2 => {
            if let Ok(g) = t.write_timeout(&id, limit) {
                c.enter(k, W);
                hold();
                c.leave(k, W);
                drop(g);
            }
        }
        3 => {
            if let Some(g) = t.try_write(&id).unwrap() {
                c.enter(k, W);
                c.leave(k, W);
                drop(g);
            }
        }
        _ => {
            if let Ok(u) = t.upgradable_read_timeout(&id, limit) {
                c.enter(k, U);
                hold();
                c.leave(k, U);
                if let Ok(w) = u.upgrade_timeout(limit) {
                    c.enter(k, W);
                    hold();
                    c.leave(k, W);
                    let r = w.downgrade();
                    c.enter(k, R);
                    c.leave(k, R);
                    drop(r);
                }
            }
        }
    }
}

#[test]
#[ignore = "child process entry point, run by the churn test"]
fn churn_child() {
    let Some((role, dir)) = support::child::role_and_dir(ROLE, DIR) else {
        return;
    };
    let t = table(&dir);
    let c = Check::map(&dir);
    let (role, arg) = role.split_once(':').unwrap_or((role.as_str(), "0"));
    let n: u64 = arg.parse().unwrap();
    match role {
        "churn" => {
            let ids = churn_ids() / CHURNERS;
            for i in 0..ids {
                // Distinct IDs, each locked once (a one-off session ID).
                let id = format!("churn-{n}-{i}");
                let g = if i % 2 == 0 {
                    t.write(&id).map(drop)
                } else {
                    t.read(&id).map(drop)
                };
                g.unwrap();
                if i % 4096 == 0 {
                    c.word(CHURNED).fetch_add(4096, Ordering::Relaxed);
                }
            }
        }
        "check" | "stalled" => {
            let ops = if role == "check" {
                CHECKED_OPS
            } else {
                STALLED_OPS
            };
            let workers: Vec<_> = (0..2)
                .map(|w| {
                    let (t, dir) = (t.clone(), dir.clone());
                    thread::spawn(move || {
                        let c = Check::map(&dir);
                        let mut rng = Rng(0x9E37_79B9 ^ (n << 8 | w) ^ std::process::id() as u64);
                        while !c.stopped() {
                            checked_op(&t, &c, &mut rng);
                            c.word(ops).fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn churn_ids() -> u64 {
    std::env::var("LOCKTABLE_CHURN_IDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_IDS)
}

fn spawn(dir: &Path, role: &str) -> Child {
    quiet_child_command("churn_child")
        .env(ROLE, role)
        .env(DIR, dir)
        .spawn()
        .unwrap()
}

#[test]
fn millions_of_ids_churn_while_fixed_ids_stay_exclusive_and_a_stopped_acquirer_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Check::create(d);
    let t = table(d);
    let mut kids = Kids(Vec::new());

    // The acquirer that will be stopped: it runs checked operations until
    // it has done some, then is frozen at whatever instruction it is at
    // (possibly between a lookup and its announcement, or holding a lock).
    kids.0.push(spawn(d, "stalled:9"));
    wait_for("the stalled acquirer runs", Duration::from_secs(30), || {
        c.word(STALLED_OPS).load(Ordering::Relaxed) > 200
    });
    signal(&kids.0[0], libc::SIGSTOP);
    let stalled_before = c.word(STALLED_OPS).load(Ordering::Relaxed);

    for k in 0..CHECKERS {
        kids.0.push(spawn(d, &format!("check:{k}")));
    }
    let churners: Vec<_> = (0..CHURNERS)
        .map(|k| spawn(d, &format!("churn:{k}")))
        .collect();
    let started = Instant::now();
    for mut ch in churners {
        let st = ch.wait().unwrap();
        assert!(st.success(), "a churner failed: {st}");
    }
    let churned = started.elapsed();

    // Resume the stopped acquirer after the churn; it must find its way
    // (its lookups and hints are stale now) without breaking exclusion.
    signal(&kids.0[0], libc::SIGCONT);
    wait_for(
        "the resumed acquirer makes progress",
        Duration::from_secs(30),
        || c.word(STALLED_OPS).load(Ordering::Relaxed) > stalled_before + 200,
    );
    c.word(STOP).store(1, Ordering::SeqCst);
    for mut kid in std::mem::take(&mut kids.0) {
        let st = kid.wait().unwrap();
        assert!(st.success(), "a checker failed: {st}");
    }
    let violations = c.word(VIOLATIONS).load(Ordering::SeqCst);
    eprintln!(
        "churn: {} IDs in {churned:?}, {} checked operations, {} by the resumed acquirer",
        churn_ids(),
        c.word(CHECKED_OPS).load(Ordering::Relaxed),
        c.word(STALLED_OPS).load(Ordering::Relaxed),
    );
    assert_eq!(violations, 0, "conflicting holders of one ID at once");
    assert!(c.word(CHECKED_OPS).load(Ordering::Relaxed) > 0);
    // Everything was released: nothing is held, every slot reusable.
    let st = t.stats().unwrap();
    assert!(st.holders.is_empty(), "holds left: {:?}", st.holders);
    drop(t.write("fixed-0").unwrap());
}
