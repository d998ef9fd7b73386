//! Multi-process checks of the lock core: deaths in the middle of an upgrade, a full table or a
//! full registry whose holder is killed, cancelled async waits beside waiting writers, and
//! holders that exit normally without releasing.
//!
//! Children are this test binary re-executed (`--exact child --ignored`), with the role in
//! `LOCKTABLE_RCP_ROLE`; they talk to the parent through marker and result files in a temporary
//! directory. Every wait of the parent and of the children is bounded (`HANDSHAKE`, `BOUND`), so a
//! hang fails the test instead of hanging it.
#![cfg(not(locktable_loom))]

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use locktable::{Error, HoldMode, LockTable, TableOptions, TableStats};
use support::child::{quiet_child_command, signal, Kids};

mod support;

const ROLE: &str = "LOCKTABLE_RCP_ROLE";
const DIR: &str = "LOCKTABLE_RCP_DIR";
const VICTIM: &str = "victim";
/// Generous bound on kill-to-acquire (the design target is milliseconds).
const BOUND: Duration = Duration::from_secs(5);
const HANDSHAKE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------

fn table_path(dir: &Path) -> PathBuf {
    dir.join("table")
}

/// The options of every process of a test; `RCP_OPTS` picks a geometry for the tests that need
/// a small one.
fn opts() -> TableOptions {
    match std::env::var("LOCKTABLE_RCP_OPTS").as_deref() {
        Ok("full") => TableOptions::default().capacity(16).max_processes(8),
        Ok("procs") => TableOptions::default().capacity(64).max_processes(2),
        Ok("procs-noreap") => TableOptions::default()
            .capacity(64)
            .max_processes(2)
            .reap_on_attach(false),
        _ => TableOptions::default().capacity(64).max_processes(16),
    }
}

fn open_with(dir: &Path, o: &TableOptions) -> LockTable {
    LockTable::open(table_path(dir), o).unwrap()
}

fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    support::child::wait_until(what, HANDSHAKE, cond);
}

fn wait_marker(dir: &Path, name: &str) {
    wait_until(&format!("marker {name}"), || dir.join(name).exists());
}

fn spawn(dir: &Path, role: &str, geometry: &str) -> Child {
    quiet_child_command("child")
        .env(ROLE, role)
        .env(DIR, dir)
        .env("LOCKTABLE_RCP_OPTS", geometry)
        .spawn()
        .unwrap()
}

/// SIGKILLs the child and reaps it; panics if it had already exited.
fn kill(c: &mut Child) {
    support::child::send_signal(c, libc::SIGKILL);
    let st = c.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL), "child {} {st}", c.id());
}

/// Waits (bounded) for a child's normal exit with status 0.
fn wait_ok(c: &mut Child, what: &str) {
    let deadline = Instant::now() + HANDSHAKE;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            assert!(st.success(), "{what}: child {} {st}", c.id());
            return;
        }
        assert!(Instant::now() < deadline, "{what}: child did not exit");
        thread::sleep(Duration::from_millis(2));
    }
}

/// A result file a child wrote (`write_result`), waited for.
fn result(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    wait_until(&format!("result {name}"), || p.exists());
    fs::read_to_string(p).unwrap()
}

/// Writes a result atomically (a rename), so the parent never reads half of it.
fn write_result(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(tmp, dir.join(name)).unwrap();
}

fn waiting(t: &LockTable, pid: u32) -> bool {
    t.stats().unwrap().waiters.iter().any(|w| w.pid == pid)
}

fn holds(t: &LockTable, pid: u32, mode: HoldMode) -> bool {
    t.stats()
        .unwrap()
        .holders
        .iter()
        .any(|h| h.pid == pid && h.mode == mode)
}

/// No hold, waiter or other process is left.
fn assert_clean(st: &TableStats) {
    assert!(st.holders.is_empty(), "leaked holds: {st:?}");
    assert!(st.waiters.is_empty(), "leaked waiters: {st:?}");
    assert_eq!(st.slots_in_use, 0, "{st:?}");
    assert_eq!(st.processes.len(), 1, "records left: {st:?}");
}

/// Reaps, then checks that nothing is left (`assert_clean`).
fn reap_and_assert_clean(t: &LockTable) {
    t.reap().unwrap();
    assert_clean(&t.stats().unwrap());
}

/// The start of most tests: a directory and this process's table in it (`opts`).
fn setup() -> (tempfile::TempDir, LockTable) {
    let dir = tempfile::tempdir().unwrap();
    let t = open_with(dir.path(), &opts());
    (dir, t)
}

/// A test's children (`Kids`, which it derefs to), spawned in its directory `d` (default
/// geometry) and watched through its table `t`.
struct Procs<'a> {
    d: &'a Path,
    t: &'a LockTable,
    kids: Kids,
}

impl<'a> Procs<'a> {
    fn new(d: &'a Path, t: &'a LockTable) -> Self {
        Procs {
            d,
            t,
            kids: Kids::default(),
        }
    }

    /// Spawns a child in `role` and waits for the marker it sets once it holds.
    fn holder(&mut self, role: &str, marker: &str) {
        self.kids.0.push(spawn(self.d, role, ""));
        wait_marker(self.d, marker);
    }

    /// Spawns a child in `role` and waits (bounded, as `what`) until it waits in the table.
    fn waiter(&mut self, role: &str, what: &str) {
        self.kids.0.push(spawn(self.d, role, ""));
        let pid = self.kids.0.last().unwrap().id();
        wait_until(what, || waiting(self.t, pid));
    }
}

impl std::ops::Deref for Procs<'_> {
    type Target = Kids;
    fn deref(&self) -> &Kids {
        &self.kids
    }
}

impl std::ops::DerefMut for Procs<'_> {
    fn deref_mut(&mut self) -> &mut Kids {
        &mut self.kids
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
    let t = open_with(&dir, &opts());
    let d = &dir;
    let (role, arg) = role.split_once(':').unwrap_or((&role, ""));
    match role {
        // Holds a read until told to release it.
        "reader" => {
            let g = t.read(VICTIM).unwrap();
            signal(d, &format!("{arg}_holding"));
            wait_marker(d, &format!("{arg}_release"));
            drop(g);
        }
        // Holds the upgradable hold until told to release it.
        "upholder" => {
            let g = t.upgradable_read(VICTIM).unwrap();
            signal(d, "u_holding");
            wait_marker(d, "u_release");
            drop(g);
        }
        // Waits to write, reports it, holds it until told.
        "writer" => {
            let g = match t.write_timeout(VICTIM, HANDSHAKE) {
                Ok(g) => g,
                Err(e) => return write_result(d, "w_got", &format!("err {e}")),
            };
            write_result(d, "w_got", &format!("ok {}", g.previous_owner_died()));
            wait_marker(d, "w_release");
            drop(g);
        }
        // Takes the upgradable hold, then upgrades when told (`go`); killed in or after it.
        "upgrader" => {
            let up = t.upgradable_read(VICTIM).unwrap();
            signal(d, "a_upgradable");
            wait_marker(d, "a_go");
            let w = up.upgrade();
            signal(d, "a_upgraded");
            thread::sleep(HANDSHAKE * 6); // killed long before
            drop(w);
        }
        // Waits for the upgradable hold, reports it, holds it until told, then upgrades.
        "upwaiter" => {
            let up = match t.upgradable_read_timeout(VICTIM, HANDSHAKE) {
                Ok(up) => up,
                Err(e) => return write_result(d, "b_got", &format!("err {e}")),
            };
            write_result(d, "b_got", &format!("ok {}", up.previous_owner_died()));
            wait_marker(d, "b_release");
            match up.upgrade_timeout(HANDSHAKE) {
                Ok(w) => write_result(d, "b_upgraded", &format!("ok {}", w.previous_owner_died())),
                Err(_) => write_result(d, "b_upgraded", "timeout"),
            }
        }
        // Waits for a read and reports it (and the owner-died flag).
        "late_reader" => {
            let r = match t.read_timeout(VICTIM, HANDSHAKE) {
                Ok(r) => format!("ok {}", r.previous_owner_died()),
                Err(e) => format!("err {e}"),
            };
            write_result(d, &format!("{arg}_got"), &r);
        }
        // Writes distinct IDs until the table is full, holds them all, says how many.
        "fill" => {
            let mut held = Vec::new();
            let e = loop {
                match t.write(format!("fill{}", held.len())) {
                    Ok(g) => held.push(g),
                    Err(e) => break e,
                }
            };
            assert!(matches!(e, Error::TableFull { .. }), "{e:?}");
            write_result(d, "filled", &held.len().to_string());
            thread::sleep(HANDSHAKE * 6); // killed long before
            drop(held);
        }
        // Holds a write of VICTIM until killed.
        "hold_write" => {
            let g = t.write(VICTIM).unwrap();
            signal(d, "holding");
            thread::sleep(HANDSHAKE * 6);
            drop(g);
        }
        // Attaches (done above) and reports whether VICTIM is writable and its owner-died flag.
        "attach_and_write" => {
            let r = match t.write_timeout(VICTIM, BOUND) {
                Ok(w) => format!("ok {}", w.previous_owner_died()),
                Err(e) => format!("err {e}"),
            };
            write_result(d, "attached", &r);
        }
        // Exits normally while a guard is alive or forgotten.
        "exit_holding" => {
            match arg {
                "write" => {
                    let g = t.write(VICTIM).unwrap();
                    signal(d, "holding");
                    wait_marker(d, "exit");
                    let _keep = &g;
                    std::process::exit(0);
                }
                "forget_write" => std::mem::forget(t.write(VICTIM).unwrap()),
                "forget_read" => std::mem::forget(t.read(VICTIM).unwrap()),
                "forget_upgradable" => std::mem::forget(t.upgradable_read(VICTIM).unwrap()),
                other => panic!("unknown arg {other}"),
            }
            signal(d, "holding");
            wait_marker(d, "exit");
            // The handle too is never dropped: exit runs no destructor of it.
            std::mem::forget(t);
            std::process::exit(0);
        }
        other => panic!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------
// 1. A killed mid-upgrade (or after it) while B waits upgradable and C reads
// ---------------------------------------------------------------------

/// A holds the upgradable hold and upgrades; C (another process) holds a read, so A's upgrade
/// waits with WRITER pending. B waits for the upgradable hold and C2 (a third process) waits to
/// read behind the pending writer. A is SIGKILLed: B and C2 must get in within the bound, and the
/// owner-died flag must be false everywhere (A never held the write lock: a pending writer's
/// death leaves no mark). `kill.rs` kills upgraders only with no other party waiting.
#[test]
fn an_upgrader_killed_while_draining_lets_the_upgradable_waiter_and_readers_in() {
    let (dir, t) = setup();
    let d = dir.path();
    let mut kids = Procs::new(d, &t);
    kids.holder("reader:c", "c_holding");
    kids.holder("upgrader", "a_upgradable");
    signal(d, "a_go");
    let a = kids.0[1].id();
    wait_until("A waits in its upgrade", || waiting(&t, a));
    assert!(
        holds(&t, a, HoldMode::WritePending),
        "{:?}",
        t.stats().unwrap()
    );
    kids.waiter("upwaiter", "B waits for the upgradable hold");
    kids.waiter("late_reader:c2", "C2 waits behind the pending writer");
    assert!(!d.join("a_upgraded").exists());
    assert!(!d.join("b_got").exists() && !d.join("c2_got").exists());

    let killed = Instant::now();
    kill(&mut kids.0[1]);
    assert_eq!(result(d, "b_got"), "ok false", "B's upgradable hold");
    assert_eq!(result(d, "c2_got"), "ok false", "C2's read");
    let took = killed.elapsed();
    assert!(took < BOUND, "kill to B and C2 in: {took:?}");
    wait_ok(&mut kids.0[3], "C2");

    // B upgrades once C leaves; it is told nothing died (A never held the write lock).
    signal(d, "b_release");
    thread::sleep(Duration::from_millis(30));
    assert!(!d.join("b_upgraded").exists(), "B upgraded past C's read");
    signal(d, "c_release");
    assert_eq!(result(d, "b_upgraded"), "ok false");
    wait_ok(&mut kids.0[0], "C");
    wait_ok(&mut kids.0[2], "B");
    assert!(!t.write(VICTIM).unwrap().previous_owner_died());
    reap_and_assert_clean(&t);
}

/// As above, but A's upgrade completed (it holds the write lock) when it is killed: B and C2 get
/// in and are told (`previous_owner_died`), B's upgrade is told, and the writer after B is not.
#[test]
fn an_upgrader_killed_holding_the_write_lock_is_reported_to_the_upgradable_waiter_and_readers() {
    let (dir, t) = setup();
    let d = dir.path();
    let mut kids = Procs::new(d, &t);
    kids.holder("upgrader", "a_upgradable");
    signal(d, "a_go");
    wait_marker(d, "a_upgraded");
    kids.waiter("upwaiter", "B waits for the upgradable hold");
    kids.waiter("late_reader:c2", "C2 waits behind the writer");

    let killed = Instant::now();
    kill(&mut kids.0[0]);
    assert_eq!(result(d, "b_got"), "ok true", "B's upgradable hold");
    assert_eq!(result(d, "c2_got"), "ok true", "C2's read");
    assert!(killed.elapsed() < BOUND, "{:?}", killed.elapsed());
    wait_ok(&mut kids.0[2], "C2");
    signal(d, "b_release");
    assert_eq!(
        result(d, "b_upgraded"),
        "ok true",
        "B's upgrade clears the mark"
    );
    wait_ok(&mut kids.0[1], "B");
    assert!(!t.write(VICTIM).unwrap().previous_owner_died());
    reap_and_assert_clean(&t);
}

/// As the first test, with a writer D (a fourth process) that waits from before the upgrade, so
/// WRITER_WAITING is up when A is killed mid-upgrade. A, waiting in its upgrade, is marked as a
/// waiter in its lane, so its sweep clears WRITER_WAITING, and D sets it again only when it
/// wakes: the waiters then race, and B (upgradable) or C2 (a reader) may get in before D claims
/// (DESIGN §3, "No FIFO among writers"; seen in about one run in five). Whatever the
/// order, everyone gets in within the bound and nobody is told of a death (A never held the
/// write lock).
#[test]
fn an_upgrader_killed_mid_upgrade_with_a_waiting_writer_lets_every_waiter_in() {
    let (dir, t) = setup();
    let d = dir.path();
    let mut kids = Procs::new(d, &t);
    kids.holder("reader:c", "c_holding");
    kids.holder("upgrader", "a_upgradable");
    kids.waiter("writer", "D waits behind the upgradable hold");
    signal(d, "a_go");
    let a = kids.0[1].id();
    wait_until("A waits in its upgrade", || waiting(&t, a));
    kids.waiter("upwaiter", "B waits");
    kids.waiter("late_reader:c2", "C2 waits");

    // Every later holder leaves as soon as it has its grant, so no order among them can block
    // another: the test checks that all get in, not in which order. C leaves only after the
    // kill (before it, A's upgrade would complete and A would die holding the write lock).
    for m in ["w_release", "b_release"] {
        signal(d, m);
    }
    let killed = Instant::now();
    kill(&mut kids.0[1]);
    signal(d, "c_release");
    assert_eq!(result(d, "w_got"), "ok false", "D's write");
    assert_eq!(result(d, "c2_got"), "ok false", "C2's read");
    assert_eq!(result(d, "b_got"), "ok false", "B's upgradable hold");
    assert_eq!(result(d, "b_upgraded"), "ok false", "B's upgrade");
    assert!(killed.elapsed() < BOUND, "{:?}", killed.elapsed());
    for (i, who) in [(0, "C"), (2, "D"), (3, "B"), (4, "C2")] {
        wait_ok(&mut kids.0[i], who);
    }
    reap_and_assert_clean(&t);
}

// ---------------------------------------------------------------------
// 2. A full table whose holder is killed
// ---------------------------------------------------------------------

/// A child fills a 16-slot table with write holds and is SIGKILLed. Without any `reap` call,
/// the parent's next insertion succeeds (the insertion reaps before reporting `TableFull`), and
/// all 16 slots come back: the parent can then hold 16 new IDs at once.
#[test]
fn a_killed_child_that_filled_the_table_gives_every_slot_back_without_a_manual_reap() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = open_with(d, &TableOptions::default().capacity(16).max_processes(8));
    let mut kids = Kids(vec![spawn(d, "fill", "full")]);
    let filled: usize = result(d, "filled").parse().unwrap();
    assert_eq!(filled, 16, "a 16-slot table holds 16 IDs");
    // Alive: the table is full, for blocking, timed and try acquisitions alike.
    for e in [
        t.write("new").map(drop).unwrap_err(),
        t.read_timeout("new", Duration::from_millis(50))
            .map(drop)
            .unwrap_err(),
        t.try_upgradable_read("new").map(drop).unwrap_err(),
    ] {
        assert!(matches!(e, Error::TableFull { capacity: 16 }), "{e:?}");
    }
    kill(&mut kids.0[0]);
    // Dead: the next insertion reaps and succeeds. A new ID's writer is told nothing (the
    // child's marks belong to its own IDs).
    let started = Instant::now();
    let w = t.write("new").unwrap();
    assert!(started.elapsed() < BOUND);
    assert!(!w.previous_owner_died());
    let mut held = vec![w];
    for i in 1..16 {
        match t.write(format!("new{i}")) {
            Ok(g) => held.push(g),
            Err(e) => panic!("slot {i} of 16 not given back: {e:?}"),
        }
    }
    assert!(matches!(
        t.try_write("one more").map(drop).unwrap_err(),
        Error::TableFull { .. }
    ));
    drop(held);
    let st = t.stats().unwrap();
    assert_eq!(st.processes.len(), 1, "the dead record was freed: {st:?}");
    assert!(st.holders.is_empty() && st.waiters.is_empty(), "{st:?}");
}

// ---------------------------------------------------------------------
// 3. A full registry whose member is killed
// ---------------------------------------------------------------------

fn a_killed_process_frees_its_record(geometry: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = TableOptions::default().capacity(64).max_processes(2);
    let o = if geometry == "procs-noreap" {
        o.reap_on_attach(false)
    } else {
        o
    };
    let t = open_with(d, &o);
    let mut kids = Kids(vec![spawn(d, "hold_write", geometry)]);
    wait_marker(d, "holding");
    // Both records are taken by live processes: another handle cannot attach.
    let e = LockTable::open(table_path(d), &o).map(drop).unwrap_err();
    assert!(
        matches!(e, Error::TooManyProcesses { max_processes: 2 }),
        "{e:?}"
    );
    kill(&mut kids.0[0]);
    // A new process attaches in the dead one's record, and its write is told of the death.
    kids.0.push(spawn(d, "attach_and_write", geometry));
    assert_eq!(result(d, "attached"), "ok true", "{geometry}");
    wait_ok(&mut kids.0[1], "attacher");
    // And so does a second handle of this process, once that one has gone.
    let t2 = LockTable::open(table_path(d), &o).unwrap();
    assert!(!t2.write(VICTIM).unwrap().previous_owner_died());
    drop(t2);
    assert_clean(&t.stats().unwrap());
}

/// `max_processes` 2, both taken, one SIGKILLed: a new process attaches (the dead record is
/// swept and taken over), with `reap_on_attach` on.
#[test]
fn a_killed_process_frees_its_record_for_a_new_one() {
    a_killed_process_frees_its_record("procs");
}

/// The same with `reap_on_attach(false)`: attaching still takes over a dead record when no
/// free one is left.
#[test]
fn a_killed_process_frees_its_record_for_a_new_one_without_reap_on_attach() {
    a_killed_process_frees_its_record("procs-noreap");
}

// ---------------------------------------------------------------------
// 5. Holders that exit normally without releasing
// ---------------------------------------------------------------------

/// A child exits (`std::process::exit`, status 0) while holding VICTIM in `mode` (a live guard,
/// or a forgotten one and a forgotten handle): a writer waiting in this process gets in within
/// the bound, told of a dead writer exactly when the child held the write lock.
fn exit_holding(mode: &str, write_lock: bool) {
    let (dir, t) = setup();
    let d = dir.path();
    let mut kids = Procs::new(d, &t);
    kids.holder(&format!("exit_holding:{mode}"), "holding");
    let waiter = {
        let t = t.clone();
        thread::spawn(move || {
            let g = t.write_timeout(VICTIM, BOUND * 2).map(|g| g.into_owned());
            (Instant::now(), g)
        })
    };
    let me = std::process::id();
    wait_until("parent waits", || waiting(&t, me));
    let exited = Instant::now();
    signal(d, "exit");
    wait_ok(&mut kids.0[0], mode);
    let (at, g) = waiter.join().unwrap();
    let g = g.unwrap_or_else(|e| panic!("{mode}: no write after the exit: {e}"));
    let took = at.duration_since(exited);
    assert!(took < BOUND, "{mode}: {took:?}");
    assert_eq!(g.previous_owner_died(), write_lock, "{mode}");
    drop(g);
    assert!(!t.write(VICTIM).unwrap().previous_owner_died(), "{mode}");
    reap_and_assert_clean(&t);
}

#[test]
fn a_holder_that_exits_normally_without_releasing_is_released_like_a_death() {
    for (mode, write_lock) in [
        ("write", true),
        ("forget_write", true),
        ("forget_read", false),
        ("forget_upgradable", false),
    ] {
        exit_holding(mode, write_lock);
    }
}

// ---------------------------------------------------------------------
// 4. Cancelled async waits beside a waiting writer and readers
// ---------------------------------------------------------------------

/// U (a process) holds the upgradable hold and R (another) a read; W (a third) waits to write,
/// so it marks WRITER_WAITING. This process starts `upgradable_read_async` and `write_async`
/// waits and drops them. Nothing of them stays: no waiter, no hold, and once U and R leave, W
/// gets in within the bound; after W, a reader in another process and this process's
/// upgradable and write acquisitions get in at once (a leaked WRITER_WAITING or WRITER claim
/// would refuse the try-upgradable or the try-write). The crate's own tests cancel one
/// `write_async` with no other waiter, in one process.
#[cfg(feature = "axum")]
#[test]
fn cancelled_async_waits_leave_no_claim_for_a_waiting_writer_or_later_holders() {
    use locktable::asynclock::AsyncLockTable;
    let (dir, t) = setup();
    let d = dir.path();
    let mut kids = Procs::new(d, &t);
    kids.holder("upholder", "u_holding");
    kids.holder("reader:r", "r_holding");
    kids.waiter("writer", "W waits");
    // The fairness mark is up: a new upgradable try is refused although only an upgradable
    // holder and a reader hold.
    assert!(t.try_upgradable_read(VICTIM).unwrap().is_none());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let me = std::process::id();
    rt.block_on(async {
        for round in 0..3 {
            let up = t.upgradable_read_async(VICTIM, HANDSHAKE);
            let wr = t.write_async(VICTIM, HANDSHAKE);
            let both = async { tokio::join!(up, wr) };
            // Long enough that both are in their blocking waits (and sleeping, marked).
            let r = tokio::time::timeout(Duration::from_millis(150), both).await;
            assert!(
                r.is_err(),
                "round {round}: an async wait got in past U, R and W"
            );
        }
    });
    // The abandoned waits end within a slice (25 ms).
    wait_until("the cancelled waits leave", || !waiting(&t, me));
    drop(rt);
    let st = t.stats().unwrap();
    assert!(
        st.holders.iter().all(|h| h.pid != me),
        "a cancelled wait holds: {st:?}"
    );
    assert!(!d.join("w_got").exists());

    signal(d, "u_release");
    signal(d, "r_release");
    let released = Instant::now();
    assert_eq!(result(d, "w_got"), "ok false");
    assert!(released.elapsed() < BOUND, "{:?}", released.elapsed());
    wait_ok(&mut kids.0[0], "U");
    wait_ok(&mut kids.0[1], "R");
    signal(d, "w_release");
    wait_ok(&mut kids.0[2], "W");
    kids.0.push(spawn(d, "late_reader:l", ""));
    assert_eq!(result(d, "l_got"), "ok false");
    wait_ok(&mut kids.0[3], "L");
    let up = t.try_upgradable_read(VICTIM).unwrap();
    assert!(
        up.is_some(),
        "WRITER_WAITING leaked: {:?}",
        t.stats().unwrap()
    );
    drop(up);
    assert!(
        t.try_write(VICTIM).unwrap().is_some(),
        "a write claim leaked"
    );
    reap_and_assert_clean(&t);
}
