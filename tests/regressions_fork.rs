//! Regression tests from the second review (of 2df44f7, 5995c2c, 7bd97dd,
//! 257aa62): each failed before its fix; the comment above each test says
//! what went wrong and how it was fixed.
#![cfg(not(locktable_loom))]

mod support;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use locktable::{LockTable, TableOptions};
use support::child::wait_exit_code;

/// The descriptor number of the (only) open descriptor of `path`.
fn fd_of(path: &Path) -> i32 {
    let want = std::fs::canonicalize(path).unwrap();
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let e = e.unwrap();
        if let Ok(target) = std::fs::read_link(e.path()) {
            if target == want {
                return e.file_name().to_str().unwrap().parse().unwrap();
            }
        }
    }
    panic!("no descriptor open on {}", path.display());
}

// ---------------------------------------------------------------------
// 1. Stale fork registrations: a grandchild closes an unrelated descriptor.
// ---------------------------------------------------------------------

// Was a bug (src/fork.rs `on_fork_child` + `ForkSafeFile::drop`): the child
// handler closes every registered table descriptor but leaves the numbers
// in the (inherited) `FDS` array, and in the child `ForkSafeFile::drop`
// returns early (epoch changed) without clearing its slot either. So in a
// forked child, `FDS` keeps naming descriptor numbers that are now free.
// Anything the child opens next reuses the lowest free number (a socket, a
// log file, a pipe meant for a subprocess, or a *new* table). When the child
// forks again (double-fork daemonisation, a worker that forks helpers, a
// fork+exec that passes descriptors), the grandchild's handler closes that
// unrelated descriptor. It is also a slow leak of `FDS` slots across
// generations (after 1024, tables silently stop being registered).
//
// Fix (done): in `on_fork_child`, after `close(fd)`, also
// `slot.store(-1, Relaxed)` (still async-signal-safe). The child's copies of
// pre-fork `ForkSafeFile`s never touch their slot again (drop checks the
// epoch first), so clearing is safe.
#[test]
fn a_grandchild_closes_a_descriptor_that_reused_a_closed_table_fd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let opts = TableOptions::default().capacity(16).max_processes(4);
    let t = LockTable::open(&path, &opts).unwrap();
    let n = fd_of(&path);
    let devnull = CString::new("/dev/null").unwrap();

    // SAFETY: the child and grandchild only make async-signal-safe calls
    // (open, dup2, close, fork, fcntl, waitpid, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        unsafe {
            // The handler closed `n` here. The child opens an ordinary file
            // that lands on the same number (as the lowest free number
            // usually does; dup2 makes it deterministic).
            let f = libc::open(devnull.as_ptr(), libc::O_RDONLY);
            if f < 0 {
                libc::_exit(10);
            }
            if f != n {
                libc::dup2(f, n);
                libc::close(f);
            }
            // Sanity: it is open in the child.
            if libc::fcntl(n, libc::F_GETFD) == -1 {
                libc::_exit(11);
            }
            let gc = libc::fork();
            if gc == 0 {
                // The grandchild did nothing but inherit it.
                let code = if libc::fcntl(n, libc::F_GETFD) == -1 {
                    1
                } else {
                    0
                };
                libc::_exit(code);
            }
            let mut st = 0;
            libc::waitpid(gc, &mut st, 0);
            libc::_exit(if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                12
            });
        }
    }
    let code = wait_exit_code(pid);
    drop(t);
    assert_ne!(code, 10, "child could not open /dev/null");
    assert_ne!(code, 11, "child's descriptor not open");
    assert_eq!(
        code, 0,
        "the grandchild's fork handler closed descriptor {n}, which the child had \
         reopened on /dev/null (a stale table registration)"
    );
}

// ---------------------------------------------------------------------
// 2. A fork between open() and registration keeps the parent's lease alive.
// ---------------------------------------------------------------------

// Was a bug (src/table.rs `open`/`anonymous` -> `attach_file` -> src/fork.rs
// `ForkSafeFile::new`, and src/table.rs `map_raw` -> src/region.rs
// `MappedRegion::new`): the table descriptor exists (open(2) /
// memfd_create) before `ForkSafeFile::new` registers it, and the shared
// mapping exists (mmap) before `MappedRegion::new` applies MADV_DONTFORK.
// `ForkSafeFile::new` even scans up to 1024 slots with a CAS each, so the
// first window grows with the number of tables open. A fork by another
// thread in either window gives the child the table's open file
// description (through the unregistered descriptor or the inherited
// mapping's file reference). The parent then takes its OFD lease through
// that description, so while the child lives the lease survives the
// parent's death and its holds are never recovered: exactly the bug that
// 2df44f7 fixed, still open in a window. (O_CLOEXEC does not help a child
// that does not exec.)
//
// The test opens many handles in one thread while another thread forks
// continuously; each child, after the atfork handler ran, looks for any
// descriptor or mapping of the table file and reports it.
//
// Fix (done): close the windows instead of racing them. Keep a
// process-wide atomic "opens in progress" count (plus a "forking" flag)
// around `open/memfd_create .. ForkSafeFile::new` and around
// `map_raw .. madvise(MADV_DONTFORK)`; register a `pthread_atfork` *prepare*
// handler that sets the flag and waits for the count to reach zero (new
// sections wait while the flag is set), and parent/child handlers that clear
// it. (Linux has no O_CLOFORK.) The same gate also covers the harmless
// unregister-then-close window in `ForkSafeFile::drop` (a lease-less
// description leaked into a child).
#[test]
fn a_fork_during_open_leaks_the_table_description_into_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    // Many attachments of one file (each open is a new description and a
    // new record), none dropped while forking, so a descriptor a child sees
    // can only come from the open path.
    let opts = TableOptions::default().capacity(16).max_processes(1024);
    let first = LockTable::open(&path, &opts).unwrap();
    let md = std::fs::metadata(&path).unwrap();
    let (dev, ino) = (md.dev(), md.ino());
    let cpath = std::fs::canonicalize(&path).unwrap();
    let needle: Vec<u8> = cpath.as_os_str().as_bytes().to_vec();
    let maps = CString::new("/proc/self/maps").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let fd_leaks = Arc::new(AtomicUsize::new(0));
    let map_leaks = Arc::new(AtomicUsize::new(0));
    let forks = Arc::new(AtomicUsize::new(0));
    let forker = {
        let (stop, fd_leaks, map_leaks, forks) = (
            stop.clone(),
            fd_leaks.clone(),
            map_leaks.clone(),
            forks.clone(),
        );
        let needle = needle.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20]; // allocated before forking
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: the child only makes async-signal-safe calls
                // (fstat, open, read, close, _exit) and reads memory.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0);
                if pid == 0 {
                    unsafe {
                        let mut code = 0;
                        for fd in 0..2048 {
                            let mut st: libc::stat = std::mem::zeroed();
                            if libc::fstat(fd, &mut st) == 0 && st.st_dev == dev && st.st_ino == ino
                            {
                                code |= 1;
                            }
                        }
                        let m = libc::open(maps.as_ptr(), libc::O_RDONLY);
                        if m >= 0 {
                            let mut len = 0usize;
                            loop {
                                let k = libc::read(
                                    m,
                                    buf.as_mut_ptr().add(len).cast(),
                                    buf.len() - len,
                                );
                                if k <= 0 {
                                    break;
                                }
                                len += k as usize;
                                if len == buf.len() {
                                    break;
                                }
                            }
                            libc::close(m);
                            if buf[..len].windows(needle.len()).any(|w| w == &needle[..]) {
                                code |= 2;
                            }
                        }
                        libc::_exit(code);
                    }
                }
                forks.fetch_add(1, Ordering::Relaxed);
                let code = wait_exit_code(pid);
                if code & 1 != 0 {
                    fd_leaks.fetch_add(1, Ordering::Relaxed);
                }
                if code & 2 != 0 {
                    map_leaks.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let mut handles = vec![first];
    while handles.len() < 600 {
        handles.push(LockTable::open(&path, &opts).unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    forker.join().unwrap();
    let (f, m, n) = (
        fd_leaks.load(Ordering::Relaxed),
        map_leaks.load(Ordering::Relaxed),
        forks.load(Ordering::Relaxed),
    );
    drop(handles);
    assert!(
        f == 0 && m == 0,
        "{f} of {n} forked children kept a table descriptor and {m} kept a table \
         mapping after the atfork handler ran (each holds a parent's open file \
         description, and so its lease, for as long as the child lives)"
    );
}

// ---------------------------------------------------------------------
// 3. The lanes-in-use mark changed the format: older files are refused.
// ---------------------------------------------------------------------

// Was a bug: 5995c2c made writers, upgraders and retirers scan only the lanes
// below the "lanes in use" word at header offset 192, which builds of format
// version 1 never wrote. A table shared with such a build during a rolling
// upgrade would have had readers in lanes at or above the mark, invisible to
// writers. Fix: FORMAT_VERSION is 2, and a version-1 file (or a process of
// that build) is refused with `Incompatible`, as DESIGN §2 promises.
#[test]
fn a_table_of_the_format_without_the_lanes_in_use_mark_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let opts = TableOptions::default().capacity(16).max_processes(4);
    drop(LockTable::open(&path, &opts).unwrap());
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // Rewrite the header as version 1, with a valid checksum (FNV-1a of
    // bytes 0..112 at offset 112), as an older build would have made it.
    let mut head = [0u8; 112];
    raw.read_exact_at(&mut head, 0).unwrap();
    head[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in &head {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    raw.write_all_at(&head, 0).unwrap();
    raw.write_all_at(&h.to_ne_bytes(), 112).unwrap();
    let e = LockTable::open(&path, &opts).unwrap_err();
    assert!(
        matches!(e, locktable::Error::Incompatible { .. }),
        "a version-1 table was accepted: {e}"
    );
}
