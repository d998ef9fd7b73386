//! loom models of the session cache's change-counter protocol (`locktable::versions`).
//!
//! One bucket word, one or two sessions' stored records (loom atomics standing for the store's
//! `SeqCst` system calls), the bucket's write lock (a loom mutex standing for the stripe mutex
//! and the OFD lock; a killed writer's lock is released without its `end`, as the kernel
//! releases a dead process's OFD lock), and readers that fill a cache entry (stamp, then store
//! read) and later validate it. The property every model checks is the one loads rely on:
//! **a cached copy that validates equals the stored record** (no missed invalidation), and a
//! commit that completed before a load began is seen by that load.

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use loom::sync::{Arc, Mutex};
use loom::thread;

use locktable::versions::{begin, end, fill_stamp, is_current};

/// One bucket of the counter file and the records of the sessions hashed to it.
struct Bucket {
    word: AtomicU64,
    lock: Mutex<()>,
    /// Stored record version per session (0: absent).
    records: [AtomicU64; 2],
    /// Set after a writer's `end` (a commit that returned to its caller).
    committed: AtomicBool,
}

fn bucket(initial: u64) -> Arc<Bucket> {
    Arc::new(Bucket {
        word: AtomicU64::new(0),
        lock: Mutex::new(()),
        records: [AtomicU64::new(initial), AtomicU64::new(initial)],
        committed: AtomicBool::new(false),
    })
}

/// Where a writer stops (killed) in its write section.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    AfterLock,
    AfterBegin,
    AfterStoreWrite,
    Never,
}

/// A write of session `s` (commit, delete or expiry removal): lock, begin, store write, end.
fn write(b: &Bucket, s: usize, value: u64, stop: Stop) {
    let _g = b.lock.lock().unwrap();
    if stop == Stop::AfterLock {
        return;
    }
    let started = begin(&b.word);
    if stop == Stop::AfterBegin {
        return;
    }
    b.records[s].store(value, SeqCst);
    if stop == Stop::AfterStoreWrite {
        return; // killed: the word stays odd; the lock goes with the process
    }
    end(&b.word, started);
    b.committed.store(true, SeqCst);
}

/// A cache fill of session `s`: the stamp before the store read.
fn fill(b: &Bucket, s: usize) -> Option<(u64, u64)> {
    let stamp = fill_stamp(&b.word)?;
    Some((stamp, b.records[s].load(SeqCst)))
}

/// A later load's validation of a filled copy: if it validates, it must equal the store, read
/// while the word still holds the stamp.
fn check_hit(b: &Bucket, s: usize, entry: Option<(u64, u64)>) -> bool {
    let Some((stamp, cached)) = entry else {
        return false;
    };
    if !is_current(&b.word, stamp) {
        return false;
    }
    let stored = b.records[s].load(SeqCst);
    if is_current(&b.word, stamp) {
        assert_eq!(cached, stored, "a validated copy differs from the store");
    }
    true
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b.check(f);
}

#[test]
fn a_validated_copy_is_never_stale_and_a_finished_commit_is_seen() {
    model(|| {
        let b = bucket(1);
        let w = {
            let b = b.clone();
            thread::spawn(move || write(&b, 0, 2, Stop::Never))
        };
        let entry = fill(&b, 0);
        let committed_before = b.committed.load(SeqCst);
        if check_hit(&b, 0, entry) && committed_before {
            // The load began after the commit returned: it must see the new record.
            assert_eq!(entry.unwrap().1, 2);
        }
        w.join().unwrap();
        // After the commit, a copy filled before it never validates with the old record.
        if check_hit(&b, 0, entry) {
            assert_eq!(entry.unwrap().1, 2);
        }
    });
}

fn killed_writer_model(stop: Stop) {
    model(move || {
        let b = bucket(1);
        let dying = {
            let b = b.clone();
            thread::spawn(move || write(&b, 0, 2, stop))
        };
        let reader = {
            let b = b.clone();
            thread::spawn(move || fill(&b, 0))
        };
        let early = fill(&b, 0);
        dying.join().unwrap();
        let entry = reader.join().unwrap();
        // Whatever the dead writer left in the store, no copy validates with something else.
        check_hit(&b, 0, entry);
        check_hit(&b, 0, early);
        if stop == Stop::AfterBegin || stop == Stop::AfterStoreWrite {
            // Readers fall back to the store until the next write completes the word ...
            assert!(fill(&b, 0).is_none());
        }
        let next = {
            let b = b.clone();
            thread::spawn(move || write(&b, 0, 3, Stop::Never))
        };
        let during = fill(&b, 0);
        next.join().unwrap();
        // ... which makes caching possible again, and stale copies stay invalid.
        let after = fill(&b, 0);
        assert_eq!(after, Some((b.word.load(SeqCst), 3)));
        assert!(check_hit(&b, 0, after));
        check_hit(&b, 0, during);
        check_hit(&b, 0, entry);
        check_hit(&b, 0, early);
    });
}

#[test]
fn a_writer_killed_after_locking_blocks_nothing() {
    killed_writer_model(Stop::AfterLock);
}

#[test]
fn a_writer_killed_after_begin_leaves_the_bucket_uncached_until_the_next_write() {
    killed_writer_model(Stop::AfterBegin);
}

#[test]
fn a_writer_killed_after_its_store_write_invalidates_every_copy() {
    killed_writer_model(Stop::AfterStoreWrite);
}

#[test]
fn a_completed_write_then_a_death_elsewhere_changes_nothing() {
    killed_writer_model(Stop::Never);
}

#[test]
fn sessions_sharing_a_bucket_never_validate_a_stale_copy() {
    model(|| {
        // Session 0 is committed, session 1 (same bucket) is deleted (a gc removal: no session
        // lock, only the bucket lock), while a reader caches both.
        let b = bucket(1);
        let commit = {
            let b = b.clone();
            thread::spawn(move || write(&b, 0, 2, Stop::Never))
        };
        let removal = {
            let b = b.clone();
            thread::spawn(move || write(&b, 1, 0, Stop::Never))
        };
        let e0 = fill(&b, 0);
        let e1 = fill(&b, 1);
        check_hit(&b, 0, e0);
        check_hit(&b, 1, e1);
        commit.join().unwrap();
        removal.join().unwrap();
        // Both writes are done: only copies of the final records may validate.
        if check_hit(&b, 0, e0) {
            assert_eq!(e0.unwrap().1, 2);
        }
        if check_hit(&b, 1, e1) {
            assert_eq!(e1.unwrap().1, 0);
        }
    });
}

#[test]
fn a_reused_bucket_after_a_delete_never_revives_the_old_copy() {
    model(|| {
        // Session 0 is cached, then deleted; session 1 is created fresh in the same bucket (a
        // first store needs no write section: nobody can have cached an ID never stored).
        let b = bucket(0);
        b.records[0].store(1, SeqCst);
        let cached = fill(&b, 0);
        let deleter = {
            let b = b.clone();
            thread::spawn(move || write(&b, 0, 0, Stop::Never))
        };
        let creator = {
            let b = b.clone();
            thread::spawn(move || b.records[1].store(1, SeqCst))
        };
        // Loads cache only sessions that exist.
        let fresh = fill(&b, 1).filter(|&(_, v)| v != 0);
        deleter.join().unwrap();
        creator.join().unwrap();
        assert!(
            !check_hit(&b, 0, cached),
            "a deleted session's copy validated"
        );
        check_hit(&b, 1, fresh);
    });
}
