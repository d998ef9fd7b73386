//! Time from SIGKILL of a lock holder to a waiter's acquisition, in another
//! process (issue 3, item 10).
//!
//! `cargo bench --bench recovery` (env `LOCKTABLE_KILLS`, default 100).
//! For each kill: a child process (this binary, re-executed) opens the table,
//! takes the lock (write or read), reports ready and sleeps; the parent
//! starts a writer that blocks on the same ID, lets it go to sleep, sends
//! SIGKILL, and measures from `kill()` to the moment the writer holds the
//! lock. The writer learns of the death by its liveness poll
//! (`TableOptions::poll_interval`), so the expected figure is about half
//! the poll interval on average and one interval at worst.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use locktable::{LockTable, TableOptions};

const CHILD_ENV: &str = "LOCKTABLE_RECOVERY_BENCH_CHILD";

fn child(spec: &str) {
    let (mode, path) = spec.split_once(':').expect("mode:path");
    let t = LockTable::open(path, &TableOptions::default()).expect("child open");
    let _held: Box<dyn std::any::Any> = match mode {
        "write" => Box::new(t.write("victim").expect("child write").into_owned()),
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
        // Let the waiter finish spinning and go to sleep on the futex.
        std::thread::sleep(Duration::from_millis(3));
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
    let kills: usize = std::env::var("LOCKTABLE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().expect("tempdir");
    println!("SIGKILL of a holder -> waiting writer in another process holds the lock ({kills} kills each)");
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10}",
        "holder", "poll", "median", "p99", "worst"
    );
    for poll_ms in [20u64, 5] {
        for mode in ["write", "read"] {
            let path = dir.path().join(format!("t-{mode}-{poll_ms}"));
            let v = measure(mode, &path, Duration::from_millis(poll_ms), kills);
            let (med, p99, worst) = summary(v);
            println!(
                "{mode:<8} {:>8}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms",
                poll_ms,
                med.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                worst.as_secs_f64() * 1e3
            );
        }
    }
}
