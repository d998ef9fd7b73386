//! Kill soak of the session layer: worker processes run loads, `transact`s, exclusive requests,
//! touches, ID cycles, deletes and gc on a few shared sessions and are SIGKILLed at random points.
//!
//! After every round (all workers killed) the parent checks:
//! - every commit a worker saw return `Ok` is present exactly once: each increment adds 1 to the
//!   worker's own key and 1 to the session's shared key in one commit, so `shared == sum of own
//!   keys` (no half-applied or double-applied commit); each own key is at least the last value
//!   its worker logged after an `Ok`, and above it by at most the attempts the worker logged
//!   since (an attempt in flight when the worker was killed may have been applied); and every
//!   acknowledged value steps by at least 1 and at most the attempts since the previous one;
//! - no record is torn or corrupt (the parent reads with `CorruptPolicy::Error`);
//! - no expired session is visible (workers' private sessions expire after 300 ms);
//! - no lock is held by a dead process (every shared session's write lock is granted);
//! - after `gc`, no temporary file and no orphan (a session of a killed `cycle_id`) is left.
//!
//! `LOCKTABLE_SESSION_SOAK_KILLS=N` runs N kills (default 200, about a minute or less in a
//! debug build on 2 cores). Workers are this test binary re-executed (`--exact soak_worker
//! --ignored`), told their slot by environment variables.
#![cfg(not(locktable_loom))]

use locktable::session::{
    session_lock_id, CorruptPolicy, Expiry, FileStore, SessionConfig, SessionId, SessionManager,
};
use locktable::{Error, LockTable, TableOptions};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::child::child_command;

mod support;

const DIR: &str = "LOCKTABLE_SESSION_SOAK_DIR";
const SLOT: &str = "LOCKTABLE_SESSION_SOAK_SLOT";
const KILLS: &str = "LOCKTABLE_SESSION_SOAK_KILLS";
const WORKERS: usize = 4;
const SHARED: usize = 3;
const KILLS_PER_ROUND: u64 = 25;
/// Private sessions of the workers expire after this much idleness.
const PRIVATE_IDLE: Duration = Duration::from_millis(300);

fn config() -> SessionConfig {
    SessionConfig {
        // Process kills, not power loss: durability is not what this test checks.
        fsync: false,
        touch_interval: Some(Duration::ZERO),
        lock_timeout: Duration::from_secs(5),
        transact_retries: 3,
        gc_batch: 64,
        ..SessionConfig::default()
    }
}

/// A small xorshift generator (no dependency, reproducible from the seed).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

fn own_key(slot: usize) -> String {
    format!("w{slot}")
}

fn log_path(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("log.{slot}"))
}

fn ids_path(dir: &Path) -> PathBuf {
    dir.join("shared-ids")
}

fn spawn_worker(dir: &Path, slot: usize) -> Child {
    child_command("soak_worker")
        .env(DIR, dir)
        .env(SLOT, slot.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

// The live workers of a round; killed when dropped, so that a failing check (a panic) leaves
// no worker running on a directory about to be removed.
use support::child::Kids as Workers;

/// Fails the test if a worker ended by itself (it only ends on a broken invariant).
fn check_alive(slot: usize, c: &mut Child) {
    if let Some(st) = c.try_wait().unwrap() {
        panic!("worker {slot} exited by itself: {st}");
    }
}

fn kill(c: &mut Child) {
    let _ = c.kill();
    let st = c.wait().unwrap();
    assert!(
        st.signal() == Some(libc::SIGKILL) || st.code() == Some(0),
        "worker ended with {st}"
    );
}

#[test]
fn session_layer_survives_random_kills() {
    let target: u64 = std::env::var(KILLS)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let parent = SessionManager::new_embedded(
        dir,
        SessionConfig {
            on_corrupt: CorruptPolicy::Error,
            ..config()
        },
    )
    .unwrap();
    let shared: Vec<String> = (0..SHARED)
        .map(|_| {
            let mut s = parent.create().unwrap();
            s.insert("shared", &0u64).unwrap();
            let id = s.id().to_string();
            s.commit().unwrap();
            id
        })
        .collect();
    std::fs::write(ids_path(dir), shared.join("\n")).unwrap();
    let started = Instant::now();
    let mut rng = Rng::new(seed());
    let mut kills = 0u64;
    let mut rounds = 0u64;
    while kills < target {
        let mut workers = Workers((0..WORKERS).map(|w| spawn_worker(dir, w)).collect());
        let round_end = (kills + KILLS_PER_ROUND).min(target);
        while kills < round_end {
            std::thread::sleep(Duration::from_millis(5 + rng.below(40)));
            let slot = rng.below(WORKERS as u64) as usize;
            for (w, c) in workers.0.iter_mut().enumerate() {
                check_alive(w, c);
            }
            kill(&mut workers.0[slot]);
            kills += 1;
            workers.0[slot] = spawn_worker(dir, slot);
        }
        for c in &mut workers.0 {
            kill(c);
        }
        workers.0.clear();
        rounds += 1;
        verify_round(dir, &parent, &shared);
        if target > 200 && rounds % 40 == 0 {
            println!(
                "{kills} kills, {rounds} rounds, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let commits: u64 = shared
        .iter()
        .map(|id| {
            let s = parent.load(id).unwrap().unwrap();
            s.get::<u64>("shared").unwrap().unwrap()
        })
        .sum();
    println!(
        "session kill soak: {kills} kills in {rounds} rounds, {commits} increments committed, \
         {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(commits > 0, "the workers did some work");
}

/// Every check of a round; see the module docs.
fn verify_round(dir: &Path, parent: &SessionManager, shared: &[String]) {
    // No lock held by a dead process: every shared session's write lock is granted (the lock
    // table recovers a dead holder's hold while we wait).
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    for id in shared {
        let sid = SessionId::parse(id).unwrap();
        let w = table.write_timeout(session_lock_id(&sid), Duration::from_secs(5));
        assert!(w.is_ok(), "lock of {id} not granted: {w:?}");
    }
    drop(table);
    let logs: Vec<String> = (0..WORKERS)
        .map(|w| std::fs::read_to_string(log_path(dir, w)).unwrap_or_default())
        .collect();
    for (j, id) in shared.iter().enumerate() {
        let s = match parent.load(id) {
            Ok(Some(s)) => s,
            other => panic!("shared session {j}: {other:?} (torn, corrupt or lost)"),
        };
        let total: u64 = s.get("shared").unwrap().unwrap();
        let mut sum = 0;
        for (w, log) in logs.iter().enumerate() {
            let own: u64 = s.get(&own_key(w)).unwrap().unwrap_or(0);
            sum += own;
            let (last, tries) = check_log(log, j, w);
            assert!(
                own >= last && own - last <= tries,
                "session {j}, worker {w}: stored {own}, last acknowledged {last}, {tries} \
                 unacknowledged attempts"
            );
        }
        assert_eq!(
            total, sum,
            "session {j}: shared counter != sum of own counters"
        );
        s.commit().unwrap();
    }
    // Private sessions: once idle past their expiry, none is visible, and gc leaves nothing.
    std::thread::sleep(PRIVATE_IDLE + Duration::from_millis(50));
    let root = dir.join("sessions");
    for name in session_files(&root) {
        if shared.contains(&name) {
            continue;
        }
        assert!(
            parent.load(&name).unwrap().is_none(),
            "expired private session {name} visible"
        );
    }
    let sweeper = SessionManager::new(
        LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap(),
        FileStore::open(&root)
            .unwrap()
            .with_fsync(false)
            .with_temp_grace(Duration::ZERO),
        config(),
    );
    loop {
        let r = sweeper.gc().unwrap();
        assert_eq!(r.unreadable, 0, "{r:?}");
        if !r.more {
            break;
        }
    }
    let mut left = session_files(&root);
    left.sort();
    let mut want: Vec<String> = shared.to_vec();
    want.sort();
    assert_eq!(left, want, "orphans or temporary files left after gc");
}

/// Every file in the shard directories (records and temporary files), by name.
fn session_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(root).unwrap().flatten() {
        if !shard.file_type().unwrap().is_dir() {
            continue;
        }
        for e in std::fs::read_dir(shard.path()).unwrap().flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// Checks one worker's log for session `j`; returns the last acknowledged value of its own key
/// and how many attempts were made since (each may have been applied, unacknowledged, when the
/// worker was killed). Lines are `S` (an incarnation started), `T <j>` (an increment is about to
/// be attempted) and `K <j> <value>` (that attempt returned Ok with this value). A line cut by
/// the kill (no newline) does not count.
///
/// Exactly once: every acknowledged value is above the previous one by at least 1 (the attempt
/// it acknowledges) and at most the attempts made since that one (each applies at most once).
fn check_log(log: &str, j: usize, w: usize) -> (u64, u64) {
    let mut last = 0u64;
    let mut tries = 0u64;
    for line in log.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let mut p = line.split_whitespace();
        let kind = p.next();
        if kind == Some("S") {
            continue;
        }
        let sj: usize = p.next().unwrap().parse().unwrap();
        if sj != j {
            continue;
        }
        match kind {
            Some("T") => tries += 1,
            Some("K") => {
                let v: u64 = p.next().unwrap().parse().unwrap();
                assert!(
                    v > last && v - last <= tries,
                    "worker {w}, session {j}: acknowledged {v} after {last} with {tries} attempts"
                );
                last = v;
                tries = 0;
            }
            other => panic!("bad log line {other:?}"),
        }
    }
    (last, tries)
}

// ---------------------------------------------------------------------------------------------
// The worker
// ---------------------------------------------------------------------------------------------

/// Ends the worker on a broken invariant (the parent reports any exit that is not a kill).
fn fail(what: impl std::fmt::Display) -> ! {
    eprintln!("soak worker: {what}");
    std::process::exit(3);
}

struct Worker {
    mgr: SessionManager,
    slot: usize,
    shared: Vec<String>,
    log: std::fs::File,
    rng: Rng,
}

impl Worker {
    fn log(&mut self, line: String) {
        // One write per line: a kill leaves a whole line, none, or a cut one (ignored).
        self.log.write_all(line.as_bytes()).unwrap();
    }

    fn ack(&mut self, j: usize, v: u64) {
        self.log(format!("K {j} {v}\n"));
    }

    /// One increment of the own and the shared key of session `j`, in one commit.
    fn increment(&mut self, j: usize, how: u64) {
        let key = own_key(self.slot);
        let bump = |s: &mut locktable::session::Session| -> locktable::Result<u64> {
            let own = s.get::<u64>(&key)?.unwrap_or(0) + 1;
            let total = s.get::<u64>("shared")?.unwrap_or(0) + 1;
            s.insert(key.clone(), &own)?;
            s.insert("shared", &total)?;
            Ok(own)
        };
        let id = self.shared[j].clone();
        self.log(format!("T {j}\n"));
        let r = match how {
            0 => self.mgr.transact(&id, bump),
            _ => match self.mgr.load_exclusive(&id) {
                Ok(Some(mut s)) => match bump(&mut s) {
                    Ok(v) => s.commit().map(|()| Some(v)),
                    Err(e) => Err(e),
                },
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(Some(v)) => self.ack(j, v),
            Ok(None) => fail(format!("shared session {j} vanished")),
            Err(e) => fail(format!("increment: {e}")),
        }
    }

    /// A read-only request: the snapshot is consistent, and its end stores a touch.
    fn read(&mut self, j: usize) {
        let s = match self.mgr.load(&self.shared[j]) {
            Ok(Some(s)) => s,
            other => fail(format!("load of shared {j}: {other:?}")),
        };
        let total: u64 = s.get("shared").unwrap().unwrap_or(0);
        let sum: u64 = (0..WORKERS)
            .map(|w| s.get::<u64>(&own_key(w)).unwrap().unwrap_or(0))
            .sum();
        if total != sum {
            fail(format!("torn snapshot of {j}: {total} != {sum}"));
        }
        s.commit().unwrap_or_else(|e| fail(format!("touch: {e}")));
    }

    /// A private session's life: created, cycled, maybe deleted; otherwise it expires. It may
    /// also expire under way (a slow, loaded machine): `None` and `SessionGone` are fine here.
    fn private(&mut self) {
        let mut s = self.mgr.create().unwrap();
        s.set_expiry(Expiry::Idle(PRIVATE_IDLE));
        s.insert("x", &1).unwrap();
        let id = s.id().to_string();
        s.commit().unwrap_or_else(|e| fail(format!("create: {e}")));
        let Some(mut s) = self.mgr.load(&id).unwrap_or_else(|e| fail(e)) else {
            return;
        };
        match s.cycle_id() {
            Ok(()) => {}
            Err(Error::SessionGone) => return,
            Err(e) => fail(format!("cycle: {e}")),
        }
        s.insert("y", &2).unwrap();
        let new_id = s.id().to_string();
        match s.commit() {
            Ok(()) | Err(Error::SessionGone) => {}
            Err(e) => fail(format!("commit after cycle: {e}")),
        }
        if self.mgr.load(&id).unwrap_or_else(|e| fail(e)).is_some() {
            fail("the old ID survived its cycle");
        }
        match self.rng.below(3) {
            0 => {
                if let Some(s) = self.mgr.load(&new_id).unwrap_or_else(|e| fail(e)) {
                    match s.invalidate() {
                        Ok(()) | Err(Error::SessionGone) => {}
                        Err(e) => fail(format!("invalidate: {e}")),
                    }
                }
            }
            1 => {
                self.mgr.delete(&new_id).unwrap_or_else(|e| fail(e));
            }
            _ => {}
        }
    }

    fn run(mut self) -> ! {
        loop {
            let j = self.rng.below(SHARED as u64) as usize;
            match self.rng.below(10) {
                0..=3 => self.increment(j, 0),
                4 | 5 => self.increment(j, 1),
                6 | 7 => self.read(j),
                8 => self.private(),
                _ => {
                    if let Err(e) = self.mgr.gc() {
                        fail(format!("gc: {e}"));
                    }
                }
            }
        }
    }
}

/// Worker side (does nothing unless started by the soak).
#[test]
#[ignore = "child process of the session kill soak"]
fn soak_worker() {
    let (Ok(dir), Ok(slot)) = (std::env::var(DIR), std::env::var(SLOT)) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let slot: usize = slot.parse().unwrap();
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(&dir, slot))
        .unwrap();
    log.write_all(b"S\n").unwrap();
    let shared = std::fs::read_to_string(ids_path(&dir))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mgr = SessionManager::new_embedded(&dir, config()).unwrap_or_else(|e| fail(e));
    Worker {
        mgr,
        slot,
        shared,
        log,
        rng: Rng::new(seed()),
    }
    .run()
}
