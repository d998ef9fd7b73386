//! Fuzzing of table files: random files, mutated headers and mutated table
//! bodies fed to `open`, `stats` and acquisitions. Only typed errors are
//! allowed: no panic, no hang, no SIGBUS, and a file that is not ours is
//! never modified.
#![cfg(not(locktable_loom))]

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use locktable::{Error, LockTable, TableOptions};
use proptest::prelude::*;

fn small() -> TableOptions {
    TableOptions::default()
        .capacity(16)
        .max_processes(2)
        .poll_interval(Duration::from_millis(1))
}

/// A valid small table file, with a few holds left behind by a handle that
/// is still attached (so the body has live-looking content).
fn valid_table_bytes(dir: &Path) -> Vec<u8> {
    let path = dir.join("seed");
    let t = LockTable::open(&path, &small()).unwrap();
    let r = t.read("a").unwrap();
    let u = t.upgradable_read("b").unwrap();
    let w = t.write("c").unwrap();
    let bytes = std::fs::read(&path).unwrap();
    drop((r, u, w));
    drop(t);
    bytes
}

fn is_typed(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt(_)
            | Error::Incompatible { .. }
            | Error::InvalidOptions(_)
            | Error::TableFull { .. }
            | Error::TooManyProcesses { .. }
            | Error::Timeout
            | Error::HoldLimit { .. }
            | Error::Io(_)
    )
}

/// Runs `f` on another thread and fails the test if it does not finish:
/// a corrupt table must never make an operation hang.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} hung or panicked on a corrupt table"))
}

/// Opens the file and exercises it; returns a description of each outcome.
fn exercise(path: std::path::PathBuf) -> Vec<String> {
    within("open/stat/acquire", move || {
        let mut out = Vec::new();
        let t = match LockTable::open(&path, &small()) {
            Ok(t) => t,
            Err(e) => {
                assert!(is_typed(&e), "untyped error {e:?}");
                out.push(format!("open: {e}"));
                return out;
            }
        };
        match t.stats() {
            Ok(s) => out.push(format!("stats: {} holders", s.holders.len())),
            Err(e) => assert!(is_typed(&e), "{e:?}"),
        }
        let short = Duration::from_millis(5);
        for id in ["a", "b", "c", "d", "e"] {
            let results = [
                t.try_read(id).map(|g| g.is_some()),
                t.try_write(id).map(|g| g.is_some()),
                t.read_timeout(id, short).map(|_| true),
                t.write_timeout(id, short).map(|_| true),
                t.upgradable_read_timeout(id, short)
                    .map(|u| u.upgrade_timeout(short).is_ok()),
            ];
            for r in results {
                match r {
                    Ok(b) => out.push(format!("{id}: {b}")),
                    Err(e) => assert!(is_typed(&e), "untyped error {e:?}"),
                }
            }
        }
        let _ = t.reap();
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random bytes: an error, and the file is left exactly as it was
    /// (unless it is a prefix of our magic, i.e. an abandoned creation).
    #[test]
    fn random_files_give_typed_errors_and_are_not_modified(
        bytes in proptest::collection::vec(any::<u8>(), 0..12_000)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, &bytes).unwrap();
        let outcome = exercise(path.clone());
        let ours = bytes.is_empty() || b"LOCKTBL\0".starts_with(&bytes[..bytes.len().min(8)]);
        if outcome.first().is_some_and(|o| o.starts_with("open:")) {
            prop_assert_eq!(std::fs::read(&path).unwrap(), bytes);
        } else {
            prop_assert!(ours, "a foreign file was accepted as a table");
        }
    }

    /// A valid table with bytes of its header flipped.
    #[test]
    fn mutated_headers_give_typed_errors(
        flips in proptest::collection::vec((0usize..256, 1u8..=255), 1..6)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid_table_bytes(dir.path());
        for (at, x) in &flips {
            bytes[*at] ^= x;
        }
        let path = dir.path().join("t");
        std::fs::write(&path, &bytes).unwrap();
        exercise(path);
    }

    /// A valid table with random words of its body (registry, bucket locks,
    /// slot states, tags and lanes) overwritten: opening, stats and every
    /// kind of acquisition still end, with a result or a typed error.
    #[test]
    fn mutated_bodies_never_panic_or_hang(
        writes in proptest::collection::vec((4096usize..40_000, any::<u64>()), 1..24)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid_table_bytes(dir.path());
        for (at, v) in &writes {
            let at = (*at % (bytes.len() - 8)) & !7;
            let at = at.max(4096);
            bytes[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        }
        let path = dir.path().join("t");
        std::fs::write(&path, &bytes).unwrap();
        exercise(path);
    }
}

#[test]
fn truncated_and_extended_tables_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = valid_table_bytes(dir.path());
    for len in [4096, bytes.len() - 4096, bytes.len() + 4096] {
        let path = dir.path().join(format!("t{len}"));
        let mut b = bytes.clone();
        b.resize(len, 0);
        std::fs::write(&path, &b).unwrap();
        let e = LockTable::open(&path, &small()).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{len}: {e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b,
            "rejected file was modified"
        );
    }
}

#[test]
fn other_geometry_is_incompatible() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    drop(LockTable::open(&path, &small()).unwrap());
    let e = LockTable::open(&path, &small().capacity(32)).unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e}");
    let e = LockTable::open(&path, &small().max_processes(3)).unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e}");
    // Unset geometry attaches to whatever the file has.
    assert!(LockTable::open(&path, &TableOptions::default()).is_ok());
}

#[test]
fn an_abandoned_creation_is_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    // What a creator killed after writing the header but before READY leaves.
    let mut bytes = valid_table_bytes(dir.path());
    bytes[128..132].copy_from_slice(&0u32.to_ne_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let t = LockTable::open(&path, &small()).unwrap();
    assert!(t.try_write("x").unwrap().is_some());
    // And one killed in the middle of writing the magic.
    let path2 = dir.path().join("t2");
    std::fs::write(&path2, b"LOCK").unwrap();
    let t2 = LockTable::open(&path2, &small()).unwrap();
    assert!(t2.try_write("x").unwrap().is_some());
}

#[test]
fn new_files_get_mode_0600_and_symlinks_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    drop(LockTable::open(&path, &small()).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let e = LockTable::open(&link, &small()).unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e}");
    let e = LockTable::open(dir.path(), &small()).unwrap_err();
    assert!(
        matches!(e, Error::Incompatible { .. } | Error::Io(_)),
        "{e}"
    );
}
