//! Regression tests for bugs found in review (each failed before its fix).
//! The doc comment of each test says what went wrong and how it was fixed.
#![cfg(not(locktable_loom))]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use locktable::{LockTable, TableOptions};
use support::child::quiet_child_command;

mod support;

// ---------------------------------------------------------------------
// Raw file access (the table is a MAP_SHARED file; pread/pwrite go through
// the same page cache, so they see and change what the mappings see).
// ---------------------------------------------------------------------

struct Raw {
    f: File,
    slot_size: u64,
    capacity: u64,
    buckets_off: u64,
    slots_off: u64,
}

impl Raw {
    fn open(path: &Path) -> Raw {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut r = Raw {
            f,
            slot_size: 0,
            capacity: 0,
            buckets_off: 0,
            slots_off: 0,
        };
        r.slot_size = r.u32(24) as u64;
        r.capacity = r.u32(40) as u64;
        r.buckets_off = r.u64(56);
        r.slots_off = r.u64(64);
        r
    }
    fn u32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.f.read_exact_at(&mut b, off).unwrap();
        u32::from_ne_bytes(b)
    }
    fn u64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.f.read_exact_at(&mut b, off).unwrap();
        u64::from_ne_bytes(b)
    }
    fn put_u64(&self, off: u64, v: u64) {
        self.f.write_all_at(&v.to_ne_bytes(), off).unwrap();
    }
    fn state_off(&self, slot: u64) -> u64 {
        self.slots_off + slot * self.slot_size
    }
    fn state(&self, slot: u64) -> u64 {
        self.u64(self.state_off(slot))
    }
    fn lane(&self, slot: u64, p: u32) -> u32 {
        self.u32(self.state_off(slot) + 64 + 4 * p as u64)
    }
    fn bucket_lock_off(&self, slot: u64) -> u64 {
        self.buckets_off + 64 * (slot / 8)
    }
}

const PHASE_MASK: u64 = 0b11;
const PHASE_ACTIVE: u64 = 1;
const PHASE_RETIRING: u64 = 2;
fn gen_of(s: u64) -> u64 {
    s >> 40
}

// ---------------------------------------------------------------------
// 1. Bucket repair turns a RETIRING slot FREE without checking its lanes.
// ---------------------------------------------------------------------

/// Was a bug (exclusion violation after a crash, src/index.rs
/// `repair_buckets_locked_by`, ~line 224): a process that dies inside
/// `try_retire` *after* its CAS ACTIVE -> RETIRING and *before* its lane scan
/// leaves the slot RETIRING with its bucket lock held. The repair sets every
/// RETIRING slot of that bucket FREE unconditionally ("a retirement either
/// finished or had not published anything yet"). But a reader that announced
/// and validated *before* the CAS still holds a read on the slot: the dead
/// retirer's lane scan would have seen it and given the slot back. After the
/// repair the ID has no slot, so the next acquisition of the ID inserts it in
/// a fresh slot and a writer gets it while the reader still holds it.
///
/// The test builds exactly the state such a death leaves (slot RETIRING,
/// bucket lock word = dead index + 1, reader's lane = 1) by writing the file,
/// then lets the dead handle's sweep run (detach runs the same
/// `sweep_process` a reaper runs).
///
/// Fix: the repair gives a RETIRING slot back to its ID (ACTIVE, same GEN,
/// waking sleepers), as an interrupted `try_retire` that found a reader
/// does; only `try_retire`'s own all-zero lane scan makes a slot FREE.
#[test]
fn repair_of_a_dead_retirer_frees_a_slot_that_a_live_reader_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let opts = TableOptions::default().capacity(16).max_processes(4);
    let reader = LockTable::open(&path, &opts).unwrap();
    let dead = LockTable::open(&path, &opts).unwrap();
    let other = LockTable::open(&path, &opts).unwrap();

    let r = reader.read("x").unwrap();
    let raw = Raw::open(&path);
    let rp = reader.process_index();
    let slot = (0..raw.capacity)
        .find(|&i| raw.state(i) & PHASE_MASK == PHASE_ACTIVE && raw.lane(i, rp) == 1)
        .expect("the slot of x");
    // `dead` took the bucket lock, CASed ACTIVE -> RETIRING, and died.
    let s = raw.state(slot);
    raw.put_u64(raw.state_off(slot), (s & !PHASE_MASK) | PHASE_RETIRING);
    raw.put_u64(raw.bucket_lock_off(slot), dead.process_index() as u64 + 1);
    drop(dead); // its record is swept: the bucket is "repaired"

    // Churn the bucket: other IDs come and go and may take any slot that
    // the repair wrongly freed.
    let mut pins = Vec::new();
    for i in 0..14 {
        pins.push(other.read(format!("pin{i}")).unwrap());
    }
    // `reader` still holds "x" for reading...
    let w = other.try_write("x").unwrap();
    assert!(
        w.is_none(),
        "a writer got x while another process holds a read guard on it"
    );
    drop(w);
    drop(pins);
    drop(r);
    // ...and once it lets go, x is writable again.
    assert!(other.try_write("x").unwrap().is_some());
}

// ---------------------------------------------------------------------
// 2. 24-bit generation wraps; the lookup cache (per thread then) trusted (slot, GEN).
// ---------------------------------------------------------------------

/// Was a bug (wrong lock for an ID, src/table.rs `acquire` + src/lookup_cache.rs,
/// with GEN = 24 bits in src/lockword.rs): the per-thread cache validates a
/// hit only by the slot's GEN. GEN wraps after 2^24 reuses of a slot, and
/// `insert_locked` always retires the *first* idle slot of the preferred
/// bucket, so the churn of many short-lived IDs (session IDs) concentrates on
/// a few slots and wraps their GEN quickly (here: 2^24 distinct IDs, a few
/// seconds). A thread whose cache still holds (slot, g) for ID "x" then locks
/// whatever ID the slot serves at generation g, and another process locking
/// "x" gets a different slot: two writers of "x" at once.
///
/// Only API calls are used (about 70 s in a debug build). Fix: the cache
/// entry keeps the 128-bit tag, and a hit is used only if the slot's tag
/// (Acquire) still equals it; GEN then only guards the window of one
/// acquisition, as for an uncached lookup.
#[test]
#[ignore = "a soak: 2^24 real acquisitions (70 s and more in a debug build); the same hole, and the \
            window it left, are tested at once by src/table_tests.rs; run with --ignored"]
fn a_cached_lookup_locks_the_wrong_id_after_the_generation_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let opts = TableOptions::default().capacity(16).max_processes(4);
    let t = LockTable::open(&path, &opts).unwrap();
    let other = LockTable::open(&path, &opts).unwrap();
    let raw = Raw::open(&path);

    drop(t.write("x").unwrap()); // (slot, gen) of "x" now in the lookup cache
    let slot = (0..raw.capacity)
        .find(|&i| raw.state(i) & PHASE_MASK == PHASE_ACTIVE)
        .unwrap();
    let g = gen_of(raw.state(slot));
    // Pin every other slot, so that each new ID below reuses `slot`.
    let pins: Vec<_> = (0..15)
        .map(|i| other.read(format!("pin{i}")).unwrap())
        .collect();
    // Churn from another thread (its own cache, its own attachment).
    let churn = {
        let other = other.clone();
        thread::spawn(move || {
            for k in 0u64..(1 << 24) {
                drop(other.read(k.to_le_bytes()).unwrap());
            }
        })
    };
    churn.join().unwrap();
    let s = raw.state(slot);
    assert_eq!(s & PHASE_MASK, PHASE_ACTIVE);
    assert_eq!(gen_of(s), g, "slot reused exactly 2^24 times");

    // This thread "locks x": the cache hit validates, but the slot serves
    // the ID (2^24 - 1).to_le_bytes() now.
    let wx = t.write("x").unwrap();
    let mut pins = pins;
    pins.pop(); // one idle slot for "x" to be inserted into
    let wx2 = other.try_write("x").unwrap();
    assert!(
        wx2.is_none(),
        "two attachments hold the write lock of \"x\" at once"
    );
    drop(wx2);
    drop(wx);
}

// ---------------------------------------------------------------------
// 3. Guard conversions act in a forked child.
// ---------------------------------------------------------------------

/// Was a bug (fork handling, src/guard.rs `WriteGuard::downgrade`,
/// `downgrade_to_upgradable`, `UpgradableReadGuard::upgrade*`/`downgrade`):
/// DESIGN §6 says handles and guards created before a fork refuse to act in
/// the child, and `Drop` honours it (`Hold::ours`). The conversions do not:
/// a child that downgrades its copy of the parent's write guard clears the
/// parent's WRITER field in the shared table (and leaks a read count in the
/// parent's lane). The parent still believes it holds the write lock while
/// other processes read.
///
/// Fix: every conversion checks `hold.ours()`; in a forked child it returns
/// the converted guard without touching the table.
#[test]
fn a_forked_child_downgrading_a_write_guard_releases_the_parents_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let opts = TableOptions::default().capacity(16).max_processes(4);
    let parent = LockTable::open(&path, &opts).unwrap();
    let other = LockTable::open(&path, &opts).unwrap();
    let w = parent.write("x").unwrap();
    // SAFETY: the child only does atomics, a futex syscall and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let r = w.downgrade(); // the parent's hold, converted by the child
        drop(r); // a no-op in the child, as designed
                 // SAFETY: plain exit without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let mut st = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    let r = other.try_read("x").unwrap();
    assert!(
        r.is_none(),
        "another process reads x while the parent holds its write guard"
    );
    drop(r);
    drop(w);
}

// ---------------------------------------------------------------------
// 4. A forked child keeps a dead parent's lease alive.
// ---------------------------------------------------------------------

const ROLE: &str = "LOCKTABLE_REVIEW_ROLE";
const DIR: &str = "LOCKTABLE_REVIEW_DIR";

/// Child entry point; a no-op unless `LOCKTABLE_REVIEW_ROLE` is set.
#[test]
#[ignore = "child process entry point, run by the other tests"]
fn review_child() {
    let Some((role, dir)) = support::child::role_and_dir(ROLE, DIR) else {
        return;
    };
    match role.as_str() {
        "hold-and-fork" => {
            let opts = TableOptions::default().capacity(16).max_processes(4);
            let t = LockTable::open(dir.join("t"), &opts).unwrap();
            let w = t.write("x").unwrap();
            // A worker forked without exec (a pre-forking server does this).
            // SAFETY: the grandchild only sleeps and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: async-signal-safe calls only.
                unsafe {
                    libc::sleep(4);
                    libc::_exit(0);
                }
            }
            File::create(dir.join("holding")).unwrap();
            std::mem::forget(w);
            std::mem::forget(t);
            // The holder dies (as if killed) with the write lock held.
            // SAFETY: plain exit.
            unsafe { libc::_exit(0) };
        }
        other => panic!("unknown role {other}"),
    }
}

/// Was a bug (recovery misses a dead process, src/registry.rs leases +
/// src/table.rs fork handling): liveness is "someone holds the OFD lock on
/// the record's lease byte", and an OFD lock lives until the *last*
/// descriptor of the open file description closes. `fork()` (without exec)
/// duplicates the table descriptor into the child, so while any child of a
/// process lives, that process's lease stays held after it dies, and its
/// holds are never recovered: here a write lock whose holder has exited stays
/// unavailable until an unrelated grandchild exits. DESIGN §6 ("the kernel
/// drops it when the open file description closes, that is, when the process
/// dies") does not hold for forking processes, and the child cannot even use
/// the inherited handle (`ForkedChild`).
///
/// Fix (`src/fork.rs`, `src/region.rs`): the `pthread_atfork` child handler
/// closes every registered table descriptor, and the mapping is
/// `MADV_DONTFORK` (a mapping also references the open file description);
/// a forked child never closes or unmaps them again.
#[test]
fn a_dead_holders_lock_is_recovered_while_its_forked_child_lives() {
    let dir = tempfile::tempdir().unwrap();
    let opts = TableOptions::default().capacity(16).max_processes(4);
    let t = LockTable::open(dir.path().join("t"), &opts).unwrap();
    let mut child = quiet_child_command("review_child")
        .env(ROLE, "hold-and-fork")
        .env(DIR, dir.path())
        .spawn()
        .unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "child failed: {st}");
    assert!(dir.path().join("holding").exists());
    // The holder is dead. Its forked worker still runs (about 4 s), holding
    // neither the table descriptor (closed in the child) nor the mapping
    // (MADV_DONTFORK), so the dead holder's lease is free.
    let started = Instant::now();
    let w = t
        .write_timeout("x", Duration::from_millis(1500))
        .unwrap_or_else(|e| {
            panic!(
                "dead holder not recovered after {:?} while its forked child lived: {e}",
                started.elapsed()
            )
        });
    assert!(w.previous_owner_died(), "the dead writer is reported");
    drop(w);
    // The mark was consumed by that writer.
    assert!(!t.write("x").unwrap().previous_owner_died());
}

// ---------------------------------------------------------------------
// 5. FileStore::with_max_file_size(u64::MAX) overflows.
// ---------------------------------------------------------------------

/// Was a bug (panic, src/session/store/file.rs `load`: `self.max_file_size + 1`): the
/// natural "no limit" setting `with_max_file_size(u64::MAX)` makes every load
/// panic with an arithmetic overflow in debug builds (and read 0 bytes, i.e.
/// report every session as corrupt and, under the default policy, delete it,
/// in release builds, where the addition wraps to 0).
///
/// Fix: `self.max_file_size.saturating_add(1)`.
#[test]
fn file_store_without_a_size_limit_loads_sessions() {
    use locktable::session::{FileStore, SessionConfig, SessionManager};
    let dir = tempfile::tempdir().unwrap();
    let table = LockTable::anonymous(&TableOptions::default()).unwrap();
    let store = FileStore::open(dir.path())
        .unwrap()
        .with_max_file_size(u64::MAX)
        .with_fsync(false);
    let mgr = SessionManager::new(table, store, SessionConfig::default());
    let mut s = mgr.create().unwrap();
    s.insert("k", &1u32).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    let s = mgr.load(&id).unwrap().expect("session exists");
    assert_eq!(s.get::<u32>("k").unwrap(), Some(1));
}
