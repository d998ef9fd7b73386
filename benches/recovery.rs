//! Time from SIGKILL of a lock holder to a waiter's acquisition, in another
//! process (issue 3, item 10).
//!
//! `cargo bench --bench recovery` (env `LOCKTABLE_KILLS`, default 100).
//! For each kill: a child process (this binary, re-executed) opens the table,
//! takes the lock (write or read), reports ready and sleeps; the parent
//! starts a writer that blocks on the same ID, lets it go to sleep, sends
//! SIGKILL, and measures from `kill()` to the moment the writer holds the
//! lock. The waiter's attachment watches the holder's pidfd (its watcher
//! thread starts when the waiter first sleeps), so the death is noticed
//! when the kernel reports the exit; the rows with a 10 s poll interval
//! show that the figure does not come from the liveness poll.
//!
//! A "big" holder first touches `LOCKTABLE_BIG_MB` MiB (default 1024) of
//! private memory, which the kernel tears down before it closes the
//! holder's files (the OFD lease) and before the pidfd reports the exit;
//! `LOCKTABLE_BIG_KILLS` (default 20) kills of it, 0 to skip.
//!
//! Holders: `write`, `read` (a read on the holder's lane: the ID's first
//! read in that process), `read-biased` (a read published in the holder's
//! reader row, with a plain store where the table has asymmetric fences).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use locktable::{LockTable, TableOptions};

const CHILD_ENV: &str = "LOCKTABLE_RECOVERY_BENCH_CHILD";

fn child(spec: &str) {
    let (mode, path) = spec.split_once(':').expect("mode:path");
    let (mode, resident_mb) = match mode.split_once('+') {
        Some((m, mb)) => (m, mb.parse::<usize>().expect("MiB")),
        None => (mode, 0),
    };
    // Resident, not just reserved: one write per page.
    let ballast: Vec<u8> = vec![1u8; resident_mb << 20];
    std::hint::black_box(&ballast);
    let t = LockTable::open(path, &TableOptions::default()).expect("child open");
    let _held: Box<dyn std::any::Any> = match mode {
        "write" => Box::new(t.write("victim").expect("child write").into_owned()),
        "read-biased" => {
            // A lane read sets the bias again once the cooling window of
            // the waiter's last revocation has passed (nine times the
            // revocation, which waited for the killed holder: tens of ms);
            // the held read is then published in the child's reader row.
            let deadline = Instant::now() + Duration::from_secs(10);
            let g = loop {
                let g = t.read("victim").expect("child read");
                if g.is_biased() {
                    break g;
                }
                drop(g);
                assert!(Instant::now() < deadline, "the bias never came back");
                std::thread::sleep(Duration::from_millis(1));
            };
            Box::new(g.into_owned())
        }
        _ => Box::new(t.read("victim").expect("child read").into_owned()),
    };
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn measure(mode: &str, path: &std::path::Path, poll: Duration, kills: usize) -> Vec<Duration> {
    let opts = TableOptions::default().poll_interval(poll);
    let table = LockTable::open(path, &opts).expect("parent open");
    let exe = std::env::current_exe().expect("current_exe");
    let mut out = Vec::with_capacity(kills);
    for _ in 0..kills {
        let mut c = Command::new(&exe)
            .env(CHILD_ENV, format!("{mode}:{}", path.display()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("child ready");
        assert_eq!(line.trim(), "ready");
        let t = table.clone();
        let waiter = std::thread::spawn(move || {
            let g = t.write("victim").expect("waiter");
            let at = Instant::now();
            drop(g);
            at
        });
        // Let the waiter finish spinning and go to sleep on the futex (its
        // watcher then watches the holder).
        std::thread::sleep(Duration::from_millis(5));
        let killed_at = Instant::now();
        c.kill().expect("kill");
        let acquired_at = waiter.join().expect("waiter thread");
        c.wait().ok();
        out.push(acquired_at.saturating_duration_since(killed_at));
    }
    out
}

fn summary(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.99), *v.last().unwrap())
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    // `cargo bench` passes "--bench"; a filter argument, if any, is ignored.
    let kills: usize = env_or("LOCKTABLE_KILLS", 100);
    let dir = tempfile::tempdir().expect("tempdir");
    let big_mb: usize = env_or("LOCKTABLE_BIG_MB", 1024);
    let big_kills: usize = env_or("LOCKTABLE_BIG_KILLS", 20);
    println!("SIGKILL of a holder -> waiting writer in another process holds the lock");
    println!(
        "{:<16} {:>7} {:>6} {:>10} {:>10} {:>10}",
        "holder", "poll", "kills", "median", "p99", "worst"
    );
    let mut rows: Vec<(String, u64, usize)> = Vec::new();
    for poll_ms in [20u64, 10_000] {
        for mode in ["write", "read", "read-biased"] {
            rows.push((mode.to_string(), poll_ms, kills));
        }
    }
    if big_kills > 0 {
        rows.push((format!("write+{big_mb}"), 20, big_kills));
    }
    for (mode, poll_ms, n) in rows {
        let path = dir.path().join(format!("t-{mode}-{poll_ms}"));
        let v = measure(&mode, &path, Duration::from_millis(poll_ms), n);
        let (med, p99, worst) = summary(v);
        let label = match mode.split_once('+') {
            Some((m, mb)) => format!("{m} {mb} MiB"),
            None => mode.clone(),
        };
        println!(
            "{label:<16} {:>5}ms {n:>6} {:>8.3}ms {:>8.3}ms {:>8.3}ms",
            poll_ms,
            med.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            worst.as_secs_f64() * 1e3
        );
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
