//! Tests of the background gc: it sweeps until no more work, stops promptly, survives errors,
//! and two managers on one directory never sweep at once.

use super::super::{
    Capabilities, Cutoffs, ExpiredScan, FileStore, ManualClock, SessionConfig, SessionId,
    SessionManager, SessionMeta, Store, StoredSession, Timestamp, Touch,
};
use super::*;
use crate::{Error, LockTable, TableOptions};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Instant;

const T0: Timestamp = Timestamp(1_700_000_000_000);
const IDLE: Duration = Duration::from_secs(600);

/// What every probed store of one test shares: how many `gc()` calls are inside the store at
/// once (inside `scan_expired`, each gc batch's one scan), the most ever seen, and how many scans
/// should still fail.
#[derive(Debug, Default)]
struct Probe {
    inside: AtomicUsize,
    most_inside: AtomicUsize,
    /// Kept inside the window this long, so that an overlap, if the code allowed one, happens.
    hold: Mutex<Duration>,
    failures_left: AtomicU64,
    /// `scan_expired` calls so far.
    scans: AtomicUsize,
}

/// A `FileStore` that reports to a [`Probe`].
#[derive(Debug)]
struct ProbedStore {
    inner: FileStore,
    probe: Arc<Probe>,
}

impl Store for ProbedStore {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn load(&self, id: &SessionId, max_size: usize) -> Result<Option<StoredSession>> {
        self.inner.load(id, max_size)
    }
    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        self.inner.save(id, expected, new)
    }
    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        self.inner.meta(id)
    }
    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> Result<Touch> {
        self.inner.touch(id, at, coalesce, cutoffs)
    }
    fn delete(&self, id: &SessionId) -> Result<bool> {
        self.inner.delete(id)
    }
    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool> {
        self.inner.remove_expired(id, cutoffs)
    }
    /// `gc()` calls this once per batch: count the sweeps inside it at once, hold it for the
    /// probe's time, and fail while injected failures are left.
    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> Result<ExpiredScan> {
        let p = &self.probe;
        let failing = p
            .failures_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(Error::Io(std::io::Error::other("injected gc failure")));
        }
        p.scans.fetch_add(1, Ordering::SeqCst);
        let now_inside = p.inside.fetch_add(1, Ordering::SeqCst) + 1;
        p.most_inside.fetch_max(now_inside, Ordering::SeqCst);
        let r = self.inner.scan_expired(cutoffs, budget);
        std::thread::sleep(*p.hold.lock());
        p.inside.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

/// A manager on `dir` with its own lock-table attachment (like another process), a manual clock
/// and a probed store.
fn manager(
    dir: &Path,
    probe: &Arc<Probe>,
    clock: &Arc<ManualClock>,
    gc_batch: usize,
) -> SessionManager {
    let table = LockTable::open(dir.join("locks.table"), &TableOptions::default()).unwrap();
    let store = FileStore::open(dir.join("sessions"))
        .unwrap()
        .with_fsync(false);
    let cfg = SessionConfig {
        idle_timeout: IDLE,
        gc_batch,
        clock: clock.clone(),
        fsync: false,
        ..SessionConfig::default()
    };
    let store = ProbedStore {
        inner: store,
        probe: Arc::clone(probe),
    };
    SessionManager::new(table, store, cfg)
}

fn create(mgr: &SessionManager) -> String {
    let mut s = mgr.create().unwrap();
    s.persist(); // creation is lazy: store the empty session explicitly
    let id = s.id().to_string();
    s.commit().unwrap();
    id
}

/// Polls `cond` (an observable of the gc thread) until it holds; panics after 30 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_round_sweeps_batch_after_batch_until_no_more_work_then_waits() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let clock = Arc::new(ManualClock::new(T0));
    let mgr = manager(dir.path(), &probe, &clock, 2);
    let expired: Vec<String> = (0..7).map(|_| create(&mgr)).collect();
    clock.advance(IDLE + Duration::from_secs(1));
    let live = create(&mgr);

    let gc = mgr.spawn_gc(Duration::from_secs(3600)).unwrap();
    wait_until("one round swept", || gc.stats().rounds_swept == 1);
    // Seven expired sessions, batches of two: one round made four gc() calls.
    assert_eq!(gc.stats().deleted, 7, "{:?}", gc.stats());
    for id in &expired {
        assert!(mgr.load(id).unwrap().is_none());
        let sid = SessionId::parse(id).unwrap();
        assert!(
            mgr.store().load(&sid, usize::MAX).unwrap().is_none(),
            "not deleted"
        );
    }
    assert!(
        mgr.load(&live).unwrap().is_some(),
        "a live session was deleted"
    );

    // Stopping does not wait for the rest of the hour.
    let t = Instant::now();
    let stats = gc.stats();
    drop(gc);
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert_eq!(stats.rounds_swept, 1, "{stats:?}");
    assert_eq!(stats.rounds_failed, 0, "{stats:?}");
}

/// A batch that deletes nothing (here: a full budget of live sessions, so the scan reports more
/// work) ends the round; the rest waits for the next round instead of being swept at once.
#[test]
fn a_batch_that_deletes_nothing_ends_the_round() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let clock = Arc::new(ManualClock::new(T0));
    let mgr = manager(dir.path(), &probe, &clock, 1);
    for _ in 0..4 {
        create(&mgr);
    }
    let first = mgr.gc().unwrap();
    assert!(first.more && first.deleted == 0, "{first:?}");
    let scans_before = probe.scans.load(Ordering::SeqCst);
    let gc = mgr.spawn_gc(Duration::from_secs(3600)).unwrap();
    wait_until("one round swept", || gc.stats().rounds_swept == 1);
    drop(gc);
    assert_eq!(
        probe.scans.load(Ordering::SeqCst) - scans_before,
        1,
        "the round went on after a batch that deleted nothing"
    );
}

/// Records the level and fields of every event, for the thread that set it as default.
#[derive(Default)]
struct Capture {
    events: parking_lot::Mutex<Vec<String>>,
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = event.metadata().level().to_string();
        event.record(&mut Fields(&mut line));
        self.events.lock().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn errors_are_logged_and_the_thread_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    probe.failures_left.store(2, Ordering::Relaxed);
    let clock = Arc::new(ManualClock::new(T0));
    let mgr = manager(dir.path(), &probe, &clock, 10);
    let id = create(&mgr);
    clock.advance(IDLE + Duration::from_secs(1));

    let capture = Arc::new(Capture::default());
    let dispatch = tracing::Dispatch::from(Arc::clone(&capture));
    let gc = tracing::dispatcher::with_default(&dispatch, || {
        mgr.spawn_gc(Duration::from_millis(1)).unwrap()
    });
    wait_until("a round after the failures", || gc.stats().deleted == 1);
    let stats = gc.stats();
    drop(gc);
    assert_eq!(stats.rounds_failed, 2, "{stats:?}");
    assert!(mgr.load(&id).unwrap().is_none());
    let events = capture.events.lock();
    let warnings: Vec<&String> = events.iter().filter(|e| e.starts_with("WARN")).collect();
    assert_eq!(warnings.len(), 2, "{events:?}");
    assert!(
        warnings[0].contains("injected gc failure") && warnings[0].contains("gc"),
        "{warnings:?}"
    );
}

/// The observable: `Probe::most_inside`, the most `gc()` calls ever inside the store at once,
/// over two managers with their own attachments to one directory (as two processes have).
#[test]
fn two_managers_on_one_directory_never_sweep_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    *probe.hold.lock() = Duration::from_millis(3);
    let clock = Arc::new(ManualClock::new(T0));
    let a = manager(dir.path(), &probe, &clock, 10);
    let b = manager(dir.path(), &probe, &clock, 10);

    let gc_a = a.spawn_gc(Duration::from_millis(1)).unwrap();
    let gc_b = b.spawn_gc(Duration::from_millis(1)).unwrap();
    wait_until("both swept often", || {
        gc_a.stats().rounds_swept >= 20 && gc_b.stats().rounds_swept >= 20
    });
    let (sa, sb) = (gc_a.stats(), gc_b.stats());
    drop((gc_a, gc_b));
    assert_eq!(probe.most_inside.load(Ordering::SeqCst), 1, "{sa:?} {sb:?}");
    // They did meet: rounds were skipped because the other one was sweeping.
    assert!(sa.rounds_skipped + sb.rounds_skipped > 0, "{sa:?} {sb:?}");

    // The observable does see an overlap when gc() runs in both at once without the helper.
    let overlap = AtomicBool::new(false);
    std::thread::scope(|s| {
        for m in [&a, &b] {
            let overlap = &overlap;
            let probe = &probe;
            s.spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !overlap.load(Ordering::SeqCst) && Instant::now() < deadline {
                    m.gc().unwrap();
                    if probe.most_inside.load(Ordering::SeqCst) > 1 {
                        overlap.store(true, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert!(
        overlap.load(Ordering::SeqCst),
        "the probe cannot see overlaps"
    );
}

#[test]
fn a_held_gc_lock_makes_rounds_skip_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let clock = Arc::new(ManualClock::new(T0));
    let mgr = manager(dir.path(), &probe, &clock, 10);
    // Another live attachment (another process) holds the gc lock.
    let other = LockTable::open(dir.path().join("locks.table"), &TableOptions::default()).unwrap();
    let held = other.write(GC_LOCK_ID).unwrap();
    let gc = mgr.spawn_gc(Duration::from_millis(1)).unwrap();
    wait_until("skipped rounds", || gc.stats().rounds_skipped >= 3);
    assert_eq!(gc.stats().rounds_swept, 0);
    drop(held);
    wait_until("a sweep once released", || gc.stats().rounds_swept >= 1);
}

/// A forked child has a copy of the handle but not the thread: dropping the copy must not touch
/// the stop mutex (it may have been copied locked, by a thread the child does not have) nor
/// join the thread.
#[test]
fn dropping_a_handle_copied_into_a_forked_child_returns_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let clock = Arc::new(ManualClock::new(T0));
    let mgr = manager(dir.path(), &probe, &clock, 10);
    let gc = mgr.spawn_gc(Duration::from_secs(3600)).unwrap();
    wait_until("the first round", || gc.stats().rounds_swept >= 1);
    // At the fork, another thread holds the stop mutex, as the gc thread does for an instant
    // at each check; in the child that thread is gone and the copy stays locked.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let shared = Arc::clone(&gc.shared);
    let holder = std::thread::spawn(move || {
        let _stop = shared.stop.lock();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv();
    });
    locked_rx.recv().unwrap();
    // the child only reads an atomic, drops the handle (an atomic load and a
    // decrement, no allocation, no lock) and calls _exit.
    // SAFETY: sound for the reasons just given.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(gc);
        // SAFETY: _exit ends the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    loop {
        // SAFETY: polls our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("the child hung dropping the handle");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    drop(gc);
}
