//! End-to-end tests of the `locktable` binary: `stat`, `lock`, `reap`, exit
//! statuses, and one-line errors on bad table files.
#![cfg(not(locktable_loom))]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use locktable::{LockTable, TableOptions};
use support::cli::{bin, locktable, locktable_to_closed_pipe, report_line};

mod support;

fn small() -> TableOptions {
    TableOptions::default().capacity(64).max_processes(8)
}

/// A fresh small table file in a temporary directory.
fn fresh_table() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table");
    drop(LockTable::open(&path, &small()).unwrap());
    (dir, path)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Non-zero status and exactly one line `locktable: ...` on stderr.
fn assert_one_line_error(o: &Output, what: &str) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "{what}: succeeded; stderr {err:?}");
    assert_eq!(err.lines().count(), 1, "{what}: stderr {err:?}");
    assert!(err.starts_with("locktable: "), "{what}: stderr {err:?}");
    assert!(!err.contains("panicked"), "{what}: stderr {err:?}");
    assert!(!err.contains("RUST_BACKTRACE"), "{what}: stderr {err:?}");
    err
}

fn stat_json(path: &Path) -> serde_json::Value {
    let o = locktable(&["stat", "--json", s(path)]);
    assert!(o.status.success(), "stat --json: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("stat --json is JSON")
}

fn holders(v: &serde_json::Value) -> &Vec<serde_json::Value> {
    v["holders"].as_array().expect("holders array")
}

/// Polls `stat --json` until `pred` holds (or panics after 10 s).
fn wait_for_stat(path: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = stat_json(path);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "condition never met: {v}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stat_on_a_fresh_table() {
    let (_dir, path) = fresh_table();
    let o = locktable(&["stat", s(&path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty());
    let out = stdout(&o);
    assert!(
        out.contains("capacity     64 slots: 0 assigned, 0 in use"),
        "{out}"
    );
    assert!(out.contains("holders      0"), "{out}");
    assert!(out.contains("waiters      0"), "{out}");
    assert!(out.contains("dead holders 0"), "{out}");
    assert!(out.contains("(this command)"), "{out}");
}

#[test]
fn stat_json_parses_and_shows_a_holder() {
    let (_dir, path) = fresh_table();
    let v = stat_json(&path);
    assert_eq!(v["capacity"], 64);
    assert_eq!(v["max_processes"], 8);
    assert!(holders(&v).is_empty());
    assert_eq!(
        v["processes"].as_array().unwrap().len(),
        1,
        "only stat itself"
    );

    let t = LockTable::open(&path, &small()).unwrap();
    let g = t.write("sess").unwrap();
    let v = stat_json(&path);
    let h = holders(&v);
    assert_eq!(h.len(), 1, "{v}");
    assert_eq!(h[0]["mode"], "write");
    assert_eq!(h[0]["pid"], std::process::id());
    assert_eq!(h[0]["alive"], true);
    assert_eq!(v["slots_in_use"], 1);
    let human = stdout(&locktable(&["stat", s(&path)]));
    assert!(human.contains("mode write"), "{human}");
    drop(g);
}

#[test]
fn lock_passes_the_exit_status_through() {
    let (dir, path) = fresh_table();
    let code = |cmd: &[&str]| {
        let mut args = vec!["lock", s(&path), "id", "--"];
        args.extend_from_slice(cmd);
        locktable(&args)
    };
    assert_eq!(code(&["true"]).status.code(), Some(0));
    assert_eq!(code(&["sh", "-c", "exit 7"]).status.code(), Some(7));
    // Killed by SIGTERM: 128 + 15.
    assert_eq!(
        code(&["sh", "-c", "kill -TERM $$"]).status.code(),
        Some(143)
    );
    let o = code(&["/nonexistent/command"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(assert_one_line_error(&o, "not found").contains("command not found"));
    let plain = dir.path().join("not-executable");
    fs::write(&plain, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
    let o = code(&[s(&plain)]);
    assert_eq!(o.status.code(), Some(126));
    assert_one_line_error(&o, "not executable");
    // Arguments that look like options belong to the command.
    let o = code(&["sh", "-c", "echo \"$@\"", "sh", "--read", "-x"]);
    assert_eq!(stdout(&o), "--read -x\n");
    // Nothing is left held.
    assert!(holders(&stat_json(&path)).is_empty());
}

#[test]
fn lock_holds_the_lock_in_each_mode_while_the_command_runs() {
    let (_dir, path) = fresh_table();
    let exe = env!("CARGO_BIN_EXE_locktable");
    for mode in ["read", "upgradable", "write"] {
        let flag = format!("--{mode}");
        let o = locktable(&[
            "lock",
            s(&path),
            "sess",
            &flag,
            "--",
            exe,
            "stat",
            "--json",
            s(&path),
        ]);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let h = holders(&v);
        assert_eq!(h.len(), 1, "{mode}: {v}");
        assert_eq!(h[0]["mode"], mode);
        assert_eq!(h[0]["alive"], true);
    }
    // Default mode is write.
    let o = locktable(&[
        "lock",
        s(&path),
        "sess",
        "--",
        exe,
        "stat",
        "--json",
        s(&path),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(holders(&v)[0]["mode"], "write");
}

#[test]
fn lock_times_out_with_status_75_without_running_the_command() {
    let (dir, path) = fresh_table();
    let t = LockTable::open(&path, &small()).unwrap();
    let g = t.write("busy").unwrap();
    let marker = dir.path().join("ran");
    for mode in ["--read", "--upgradable", "--write"] {
        let start = Instant::now();
        let o = locktable(&[
            "lock",
            s(&path),
            "busy",
            mode,
            "--timeout",
            "200ms",
            "--",
            "touch",
            s(&marker),
        ]);
        let took = start.elapsed();
        assert_eq!(o.status.code(), Some(75), "{mode}: {}", stderr(&o));
        assert!(assert_one_line_error(&o, mode).contains("timed out"));
        assert!(took >= Duration::from_millis(200), "{mode}: {took:?}");
        assert!(took < Duration::from_secs(3), "{mode}: {took:?}");
        assert!(!marker.exists(), "{mode}: the command ran");
    }
    // Another ID is free.
    let o = locktable(&["lock", s(&path), "other", "--timeout", "1s", "--", "true"]);
    assert_eq!(o.status.code(), Some(0));
    drop(g);
}

#[test]
fn usage_errors_exit_2() {
    let (_dir, path) = fresh_table();
    for args in [
        vec!["lock", s(&path), "id"],
        vec!["lock", s(&path), "id", "--timeout", "5x", "--", "true"],
        vec!["lock", s(&path), "id", "--timeout", "-1s", "--", "true"],
        vec!["lock", s(&path), "id", "--read", "--write", "--", "true"],
        vec!["stat"],
        vec!["frobnicate"],
    ] {
        let o = locktable(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"));
    }
    let o = locktable(&["lock", s(&path), "", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(assert_one_line_error(&o, "empty id").contains("invalid lock ID"));
}

/// `std::env::args()` panics on an argument that is not UTF-8; the CLI takes IDs and paths as
/// bytes (`OsString`), so such arguments must reach them instead of a panic.
#[test]
fn non_utf8_arguments_are_bytes_not_a_panic() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let (dir, path) = fresh_table();
    let id = OsStr::from_bytes(b"cart-\xff\xfe");
    let o = bin()
        .arg("lock")
        .arg(&path)
        .arg(id)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "lock: {}", stderr(&o));
    // A table path that is not UTF-8 is created and then stat'ed.
    let odd = dir.path().join(OsStr::from_bytes(b"t\xff"));
    let o = bin()
        .arg("lock")
        .arg(&odd)
        .args(["id", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "lock odd path: {}", stderr(&o));
    let o = bin().arg("stat").arg(&odd).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "stat odd path: {}", stderr(&o));
    // Where clap wants a string, a non-UTF-8 value is a usage error, not a panic.
    let o = bin()
        .args(["lock", s(&path), "id", "--timeout"])
        .arg(OsStr::from_bytes(b"1\xffs"))
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "timeout: {}", stderr(&o));
    assert!(!stderr(&o).contains("internal error"), "{}", stderr(&o));
    let o = bin().arg(OsStr::from_bytes(b"\xff")).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "subcommand: {}", stderr(&o));
    assert!(!stderr(&o).contains("internal error"), "{}", stderr(&o));
}

#[test]
fn bad_table_files_give_one_line_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = d.join("empty");
    fs::write(&empty, b"").unwrap();
    let random = d.join("random");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 0x80 // never a prefix of the magic
        })
        .collect();
    fs::write(&random, bytes).unwrap();
    let truncated = d.join("truncated");
    drop(LockTable::open(&truncated, &small()).unwrap());
    let len = fs::metadata(&truncated).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let version = d.join("version");
    drop(LockTable::open(&version, &small()).unwrap());
    let mut b = fs::read(&version).unwrap();
    b[8..12].copy_from_slice(&99u32.to_ne_bytes());
    fs::write(&version, b).unwrap();
    let checksum = d.join("checksum");
    drop(LockTable::open(&checksum, &small()).unwrap());
    let mut b = fs::read(&checksum).unwrap();
    b[40] ^= 0x40; // capacity, without fixing the checksum
    fs::write(&checksum, b).unwrap();
    let directory = d.join("directory");
    fs::create_dir(&directory).unwrap();
    let good = d.join("good");
    drop(LockTable::open(&good, &small()).unwrap());
    let symlink = d.join("symlink");
    std::os::unix::fs::symlink(&good, &symlink).unwrap();
    let missing = d.join("missing");
    // What a creator that died early leaves: the magic, then zeros (no READY).
    let abandoned = d.join("abandoned");
    let abandoned_bytes = [&b"LOCKTBL\0"[..], &[0u8; 92]].concat();
    fs::write(&abandoned, &abandoned_bytes).unwrap();

    let cases: [(&Path, &str); 9] = [
        (&empty, "empty"),
        (&random, "incompatible"),
        (&truncated, "corrupt"),
        (&version, "incompatible"),
        (&checksum, "corrupt"),
        (&directory, "directory"),
        (&symlink, "symbolic link"),
        (&missing, "no such"),
        (&abandoned, "creation never finished"),
    ];
    for (path, expect) in cases {
        for cmd in ["stat", "reap"] {
            let o = locktable(&[cmd, s(path)]);
            let err = assert_one_line_error(&o, &format!("{cmd} {path:?}"));
            assert!(err.contains(expect), "{cmd} {path:?}: {err:?}");
            assert!(o.stdout.is_empty());
        }
        // `lock` creates missing or empty table files (and completes an
        // abandoned creation); every other bad file is refused before the
        // command runs.
        if path == empty || path == missing || path == abandoned {
            continue;
        }
        let o = locktable(&["lock", s(path), "id", "--", "echo", "ran"]);
        let err = assert_one_line_error(&o, &format!("lock {path:?}"));
        assert!(err.contains(expect), "lock {path:?}: {err:?}");
        assert!(o.stdout.is_empty(), "lock {path:?}: the command ran");
    }
    // None of them was changed into a table (`stat` and `reap` never create
    // or initialise one).
    assert_eq!(fs::metadata(&empty).unwrap().len(), 0);
    assert_eq!(fs::read(&abandoned).unwrap(), abandoned_bytes);
    assert!(!missing.exists());
    assert!(fs::symlink_metadata(&symlink).unwrap().is_symlink());
}

/// Starts `locktable lock TABLE ID --write -- COMMAND...` in its own process
/// group and waits until it holds the lock.
fn spawn_holder(path: &Path, id: &str, cmd: &[&str]) -> Child {
    let mut c = bin();
    c.args(["lock", s(path), id, "--write", "--"])
        .args(cmd)
        .stdin(Stdio::null())
        .process_group(0);
    let child = c.spawn().unwrap();
    let pid = child.id();
    wait_for_stat(path, |v| {
        holders(v)
            .iter()
            .any(|h| h["pid"] == pid && h["mode"] == "write")
    });
    child
}

#[test]
fn two_shells_one_times_out_then_succeeds() {
    let (_dir, path) = fresh_table();
    let started = Instant::now();
    let mut first = spawn_holder(&path, "shared-id", &["sleep", "1"]);
    let t = Instant::now();
    let o = locktable(&[
        "lock",
        s(&path),
        "shared-id",
        "--timeout",
        "200ms",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // The second shell waits for the first to finish, then runs.
    let o = locktable(&[
        "lock",
        s(&path),
        "shared-id",
        "--timeout",
        "20s",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(first.wait().unwrap().success());
    assert!(holders(&stat_json(&path)).is_empty());
}

#[test]
fn reap_on_a_clean_table_reports_nothing() {
    let (_dir, path) = fresh_table();
    let o = locktable(&["reap", s(&path)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "reaped 0 dead process record(s)\n");
}

/// `stat` and `reap` attach without reaping, so a killed holder shows up as
/// a dead holder and `reap` reports releasing it.
#[test]
fn stat_shows_and_reap_reports_a_dead_holder() {
    let (_dir, path) = fresh_table();
    let mut holder = spawn_holder(&path, "id", &["sleep", "100"]);
    let pgid = holder.id() as i32;
    holder.kill().unwrap();
    holder.wait().unwrap();
    let v = stat_json(&path);
    let dead = holders(&v).iter().filter(|h| h["alive"] == false).count();
    let o = locktable(&["reap", s(&path)]);
    // SAFETY: kills the process group of our own child (the orphaned sleep).
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    assert_eq!(dead, 1, "stat shows the dead holder: {v}");
    assert!(stdout(&o).contains("released 1 slot(s)"), "{}", stdout(&o));
}

/// The numbers of one row of the demo's report table (`name` then one
/// column per system).
fn report_row(report: &str, name: &str) -> Vec<f64> {
    let line = report_line(report, name);
    line[name.len()..]
        .split_whitespace()
        .map(|x| x.parse().unwrap_or_else(|_| panic!("{name}: {x:?}")))
        .collect()
}

/// `locktable demo --compare` runs its workers as processes of this binary
/// (the README's set-up command): locktable loses no update, and every
/// access of the baseline is a write.
#[test]
fn demo_in_worker_processes_loses_nothing() {
    let o = locktable(&["demo", "--compare", "--secs", "0.8", "--workers", "3"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    assert!(out.contains("3 worker processes"), "{out}");
    let header: Vec<&str> = out
        .lines()
        .nth(2)
        .expect("header row")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["locktable", "flock+rewrite"], "{out}");
    let requests = report_row(&out, "requests/s");
    assert!(requests.iter().all(|&r| r > 0.0), "{out}");
    assert_eq!(report_row(&out, "lost updates")[0], 0.0, "{out}");
    let writes = report_row(&out, "data writes / 1k requests");
    // 1 writing + 4 reading requests per page: at most a fifth of the
    // requests write on locktable; every one does on the baseline.
    assert!(writes[0] <= 250.0, "{out}");
    assert_eq!(writes[1], 1000.0, "{out}");
}

/// `println!` panics when stdout is gone; every subcommand's report goes through the
/// one-line failure instead (`locktable ... | head -0`).
#[test]
fn a_closed_stdout_is_a_one_line_failure_not_a_panic() {
    let (_dir, path) = fresh_table();
    for args in [
        vec!["stat", s(&path)],
        vec!["stat", "--json", s(&path)],
        vec!["reap", s(&path)],
        vec![
            "demo",
            "--secs",
            "0.1",
            "--store",
            "memory",
            "--workers",
            "1",
            "--readers",
            "0",
        ],
    ] {
        let o = locktable_to_closed_pipe(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("locktable: ") && last.contains("stdout"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("internal error"), "{args:?}: {err}");
    }
}

/// A worker started with bad arguments fails with one line, not a panic.
#[test]
fn demo_worker_rejects_bad_arguments() {
    let o = locktable(&["__demo-worker", "nonsense"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(assert_one_line_error(&o, "worker").contains("demo worker"));
}
