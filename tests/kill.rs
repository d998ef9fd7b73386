//! Crash safety with real processes and SIGKILL (issue 3 item 8).
//!
//! Children are this test binary re-executed (`--exact child --ignored`),
//! with the role in `LOCKTABLE_KILL_ROLE`; the ignored `child` test does
//! nothing unless it is set. Children report readiness by creating marker
//! files and are then killed with SIGKILL.
//!
//! `LOCKTABLE_SOAK_KILLS=N` makes the kill storm run N kills (default 200).
#![cfg(not(locktable_loom))]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use locktable::{HoldMode, LockTable, TableOptions, TableStats};
use support::child::{quiet_child_command, signal, Kids};

mod support;

const ROLE: &str = "LOCKTABLE_KILL_ROLE";
const DIR: &str = "LOCKTABLE_KILL_DIR";
const VICTIM: &str = "victim";
/// Generous bound on kill-to-acquire (the design target is milliseconds).
const BOUND: Duration = Duration::from_secs(5);
const HANDSHAKE: Duration = Duration::from_secs(20);
const STORM_IDS: usize = 4;
const STORM_CHILDREN: usize = 4;

// ---------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------

fn table_path(dir: &Path) -> PathBuf {
    dir.join("table")
}

fn open(dir: &Path) -> LockTable {
    let opts = TableOptions::default().capacity(64).max_processes(32);
    LockTable::open(table_path(dir), &opts).unwrap()
}

fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    support::child::wait_until(what, HANDSHAKE, cond);
}

fn spawn_child(dir: &Path, role: &str) -> Child {
    quiet_child_command("child")
        .env(ROLE, role)
        .env(DIR, dir)
        .spawn()
        .unwrap()
}

/// SIGKILLs the child and reaps it; panics if it had already failed.
fn kill(c: &mut Child) {
    // SAFETY: plain syscall on the PID of our own child, not yet waited for.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
    let st = c.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "child {} {st}", c.id());
}

/// No hold, waiter, owner-died mark or other process is left.
fn assert_clean(st: &TableStats) {
    assert!(st.holders.is_empty(), "leaked holds: {st:?}");
    assert!(st.waiters.is_empty(), "leaked waiters: {st:?}");
    assert_eq!(st.slots_in_use, 0, "{st:?}");
    assert_eq!(st.owner_died_marks, 0, "{st:?}");
    assert_eq!(st.processes.len(), 1, "dead records left: {st:?}");
    assert!(st.processes[0].this_handle);
}

fn read_u64(f: &File) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 0).unwrap();
    u64::from_le_bytes(b)
}

/// A small xorshift generator: no dependency needed for test randomness.
struct Rng(u64);

impl Rng {
    fn seeded(extra: u64) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng((t ^ extra.rotate_left(32) ^ std::process::id() as u64) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

// ---------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------

/// Entry point of the child processes; a no-op in a normal test run.
#[test]
#[ignore = "child process entry point, run by the other tests"]
fn child() {
    let Some((role, dir)) = support::child::role_and_dir(ROLE, DIR) else {
        return;
    };
    let (role, arg) = role.split_once(':').unwrap_or((&role, ""));
    match role {
        "hold" => child_hold(&dir, arg),
        "storm" => child_storm(&dir, arg),
        other => panic!("unknown role {other}"),
    }
}

/// Takes `VICTIM` in the given mode, says so, and waits to be killed.
fn child_hold(dir: &Path, mode: &str) {
    let t = open(dir);
    let guard: Box<dyn std::any::Any> = match mode {
        "read" => Box::new(t.read(VICTIM).unwrap().into_owned()),
        "upgradable" => Box::new(t.upgradable_read(VICTIM).unwrap().into_owned()),
        "upgraded" => Box::new(t.upgradable_read(VICTIM).unwrap().upgrade().into_owned()),
        "write" => Box::new(t.write(VICTIM).unwrap().into_owned()),
        other => panic!("unknown mode {other}"),
    };
    signal(dir, "holding");
    thread::sleep(Duration::from_secs(120)); // killed long before
    drop(guard);
}

/// Hammers the storm IDs with random modes until killed. Every write hold
/// increments the ID's counter file, then logs the completed increment.
fn child_storm(dir: &Path, serial: &str) {
    let t = open(dir);
    let counters: Vec<File> = (0..STORM_IDS)
        .map(|i| {
            let p = dir.join(format!("counter-{i}"));
            OpenOptions::new().read(true).write(true).open(p).unwrap()
        })
        .collect();
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("log-{serial}")))
        .unwrap();
    let mut increment = |i: usize, died: bool| {
        let v = read_u64(&counters[i]);
        counters[i].write_all_at(&(v + 1).to_le_bytes(), 0).unwrap();
        let died = if died { "owner died, " } else { "" };
        // Logged after the data write: the increment definitely landed.
        log.write_all(format!("{died}completed increment k{i}\n").as_bytes())
            .unwrap();
    };
    signal(dir, &format!("ready-{serial}"));
    let mut rng = Rng::seeded(serial.parse().unwrap());
    let limit = Duration::from_secs(30); // a stuck lock fails the child
    loop {
        let i = rng.below(STORM_IDS as u64) as usize;
        let id = format!("k{i}");
        match rng.below(3) {
            0 => {
                let g = t.read_timeout(&id, limit).unwrap();
                read_u64(&counters[i]);
                drop(g);
            }
            1 => {
                let u = t.upgradable_read_timeout(&id, limit).unwrap();
                let before = read_u64(&counters[i]);
                let w = u.upgrade_timeout(limit).unwrap();
                // Upgradable excluded every writer: nothing changed.
                assert_eq!(read_u64(&counters[i]), before, "k{i} changed");
                increment(i, w.previous_owner_died());
                drop(w);
            }
            _ => {
                let w = t.write_timeout(&id, limit).unwrap();
                increment(i, w.previous_owner_died());
                drop(w);
            }
        }
    }
}

// ---------------------------------------------------------------------
// Parent side: one holder killed in each mode
// ---------------------------------------------------------------------

/// Kills a child holding `VICTIM` in `mode` while this process waits to
/// write it; returns kill-to-acquire and whether the owner was reported dead.
fn kill_holder_and_acquire(mode: &str, want: HoldMode) -> (Duration, bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    let mut kids = Kids(vec![spawn_child(d, &format!("hold:{mode}"))]);
    let pid = kids.0[0].id();
    wait_until("child holds", || d.join("holding").exists());
    let st = t.stats().unwrap();
    assert!(
        st.holders.iter().any(|h| h.pid == pid && h.mode == want),
        "{mode}: {st:?}"
    );
    let waiter = {
        let t = t.clone();
        thread::spawn(move || {
            let g = t.write_timeout(VICTIM, BOUND).map(|g| g.into_owned());
            (Instant::now(), g)
        })
    };
    let me = std::process::id();
    wait_until("parent waits", || {
        t.stats().unwrap().waiters.iter().any(|w| w.pid == me)
    });
    let killed = Instant::now();
    kill(&mut kids.0[0]);
    let (acquired, g) = waiter.join().unwrap();
    let g = g.unwrap_or_else(|e| panic!("{mode}: no write after the kill: {e}"));
    let took = acquired.duration_since(killed);
    let died = g.previous_owner_died();
    drop(g);
    // Reported once: the next writer sees a clean slate.
    assert!(!t.write(VICTIM).unwrap().previous_owner_died(), "{mode}");
    t.reap().unwrap();
    assert_clean(&t.stats().unwrap());
    (took, died)
}

#[test]
fn killed_holders_of_every_mode_are_released_within_the_bound() {
    let cases = [
        ("read", HoldMode::Read, false),
        ("upgradable", HoldMode::Upgradable, false),
        ("upgraded", HoldMode::Write, true),
        ("write", HoldMode::Write, true),
    ];
    for (mode, hold, writer) in cases {
        let (took, died) = kill_holder_and_acquire(mode, hold);
        println!("SIGKILL of a {mode} holder -> waiting writer acquired in {took:?}");
        assert!(took < BOUND, "{mode}: {took:?}");
        assert_eq!(died, writer, "{mode}: previous_owner_died");
    }
}

#[test]
fn kill_to_acquire_over_repeated_kills() {
    let mut times: Vec<Duration> = (0..10)
        .map(|_| kill_holder_and_acquire("write", HoldMode::Write).0)
        .collect();
    times.sort();
    println!(
        "kill-to-acquire over {} kills of a writer: median {:?}, worst {:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() - 1]
    );
    assert!(times[times.len() - 1] < BOUND);
}

// ---------------------------------------------------------------------
// Parent side: the kill storm
// ---------------------------------------------------------------------

struct Storm {
    dir: PathBuf,
    kids: Kids,
    serials: Vec<u64>,
    next_serial: u64,
    kills: u64,
}

impl Storm {
    fn start(dir: &Path) -> Storm {
        for i in 0..STORM_IDS {
            fs::write(dir.join(format!("counter-{i}")), 0u64.to_le_bytes()).unwrap();
        }
        let mut s = Storm {
            dir: dir.to_path_buf(),
            kids: Kids(Vec::new()),
            serials: Vec::new(),
            next_serial: 0,
            kills: 0,
        };
        for _ in 0..STORM_CHILDREN {
            s.spawn();
        }
        s
    }

    fn spawn(&mut self) {
        let serial = self.next_serial;
        self.next_serial += 1;
        let child = spawn_child(&self.dir, &format!("storm:{serial}"));
        self.kids.0.push(child);
        self.serials.push(serial);
    }

    fn ready(&self, k: usize) -> bool {
        self.dir.join(format!("ready-{}", self.serials[k])).exists()
    }

    /// Fails the test if a child exited by itself (it panicked).
    fn check_alive(&mut self) {
        for c in &mut self.kids.0 {
            if let Some(st) = c.try_wait().unwrap() {
                panic!("storm child {} exited by itself: {st}", c.id());
            }
        }
    }

    /// Kills child `k` and starts a replacement.
    fn kill_and_replace(&mut self, k: usize) {
        let mut c = self.kids.0.swap_remove(k);
        self.serials.swap_remove(k);
        kill(&mut c);
        self.kills += 1;
        self.spawn();
    }

    fn kill_all(&mut self) {
        for mut c in std::mem::take(&mut self.kids.0) {
            kill(&mut c);
            self.kills += 1;
        }
    }

    /// Per ID: (increments logged as completed, of which saw owner-died).
    fn logged(&self) -> Vec<(u64, u64)> {
        let mut per_id = vec![(0, 0); STORM_IDS];
        for serial in 0..self.next_serial {
            let Ok(text) = fs::read_to_string(self.dir.join(format!("log-{serial}"))) else {
                continue;
            };
            // A kill can cut the last append short (a write(2) that crosses
            // a page boundary stops there when SIGKILL arrives): only whole
            // lines count as completed.
            for line in text.split_inclusive('\n') {
                let Some(line) = line.strip_suffix('\n') else {
                    continue;
                };
                let (died, rest) = match line.strip_prefix("owner died, ") {
                    Some(rest) => (1, rest),
                    None => (0, line),
                };
                let i: usize = rest
                    .strip_prefix("completed increment k")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("bad log line {line:?}"));
                per_id[i].0 += 1;
                per_id[i].1 += died;
            }
        }
        per_id
    }
}

#[test]
fn kill_storm() {
    let target: u64 = std::env::var("LOCKTABLE_SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open(d);
    let mut storm = Storm::start(d);
    let mut rng = Rng::seeded(0x5eed);
    let start = Instant::now();
    while storm.kills < target {
        thread::sleep(Duration::from_millis(1 + rng.below(5)));
        storm.check_alive();
        // Kill only children that are running (attached and hammering).
        let ready: Vec<usize> = (0..STORM_CHILDREN).filter(|&k| storm.ready(k)).collect();
        if ready.is_empty() {
            continue;
        }
        let k = ready[rng.below(ready.len() as u64) as usize];
        storm.kill_and_replace(k);
    }
    storm.check_alive();
    storm.kill_all();
    let storm_time = start.elapsed();

    // Every ID can be written, within the bound.
    let mut worst = Duration::ZERO;
    for i in 0..STORM_IDS {
        let t0 = Instant::now();
        let g = t.write_timeout(format!("k{i}"), BOUND);
        let g = g.unwrap_or_else(|e| panic!("k{i} not writable after the storm: {e}"));
        worst = worst.max(t0.elapsed());
        drop(g);
    }
    t.reap().unwrap();
    assert_clean(&t.stats().unwrap());

    // No completed increment was lost; at most one in flight per kill landed.
    let logged = storm.logged();
    let mut total = (0, 0, 0);
    for (i, &(done, died)) in logged.iter().enumerate() {
        let f = File::open(d.join(format!("counter-{i}"))).unwrap();
        let counter = read_u64(&f);
        assert!(
            counter >= done,
            "k{i}: counter {counter} < completed {done}"
        );
        assert!(
            counter <= done + storm.kills,
            "k{i}: counter {counter} > completed {done} + kills {}",
            storm.kills
        );
        total = (total.0 + counter, total.1 + done, total.2 + died);
    }
    assert!(total.0 <= total.1 + storm.kills);
    assert!(total.1 > 0, "the storm made no progress");
    println!(
        "kill storm: {} kills ({} processes) in {storm_time:?}; counters {} >= completed {}; \
         {} writers saw owner-died; slowest post-storm write {worst:?}",
        storm.kills, storm.next_serial, total.0, total.1, total.2
    );
}

// ---------------------------------------------------------------------
// The CLI killed while it holds a lock
// ---------------------------------------------------------------------

fn locktable() -> Command {
    Command::new(env!("CARGO_BIN_EXE_locktable"))
}

fn stat_json(path: &Path) -> serde_json::Value {
    let o = locktable()
        .arg("stat")
        .arg("--json")
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Kills the process group of our child `leader` (the orphaned command).
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: signals the process group of our own child.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

#[test]
fn cli_lock_killed_with_sigkill_leaves_the_id_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = table_path(dir.path());
    drop(open(dir.path()));
    let mut holder = locktable()
        .arg("lock")
        .arg(&path)
        .args(["id", "--write", "--", "sleep", "100"])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let _group = Group(holder.id() as i32);
    let pid = holder.id();
    wait_until("locktable lock holds", || {
        let v = stat_json(&path);
        v["holders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["pid"] == pid)
    });
    // Another process waits for the same ID.
    let waiter = locktable()
        .arg("lock")
        .arg(&path)
        .args(["id", "--write", "--timeout", "10s", "--", "true"])
        .spawn()
        .unwrap();
    let waiter_pid = waiter.id();
    let mut kids = Kids(vec![waiter]);
    wait_until("second locktable waits", || {
        let v = stat_json(&path);
        v["waiters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["pid"] == waiter_pid)
    });
    let killed = Instant::now();
    kill(&mut holder);
    let st = kids.0[0].wait().unwrap();
    let took = killed.elapsed();
    println!("SIGKILL of `locktable lock` -> waiting `locktable lock` done in {took:?}");
    assert!(st.success(), "waiter: {st}");
    assert!(took < BOUND, "{took:?}");
    kids.0.clear();
    let v = stat_json(&path);
    assert!(v["holders"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["waiters"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["owner_died_marks"], 0, "{v}");
    assert_eq!(v["processes"].as_array().unwrap().len(), 1, "{v}");
    let o = locktable()
        .arg("lock")
        .arg(&path)
        .args(["id", "--timeout", "1s", "--", "true"])
        .status()
        .unwrap();
    assert!(o.success());
}
