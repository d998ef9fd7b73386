//! Death noticed by an event: a watcher thread per attachment that learns
//! from the kernel when a holder process exits and recovers its holds at
//! once, instead of at a waiter's next liveness poll.
//!
//! Owns: one thread, one epoll set, one eventfd and a pidfd per watched
//! process record, all process-local. Started by the first waiter of its
//! attachment that goes to sleep.
//!
//! May not touch: lock words or records (it only reads a record's pid and
//! attach time), and it never decides that a process is dead. A pidfd is
//! only a *trigger*: when it reports an exit, the watcher asks the registry
//! to probe the record's OFD lease (the authority, [`crate::registry`]),
//! and only a free lease leads to a sweep. So a pidfd that names the wrong
//! process (a pid from another pid namespace, or a pid reused before the
//! pidfd was opened) can cause a needless probe, never a wrong sweep; and a
//! pidfd that never fires leaves the waiters' poll as the fallback.
//!
//! Fork: a child does not inherit the thread (`fork` copies only the calling
//! thread), and the child's copy of its attachment is inert (every
//! acquisition returns `ForkedChild`), so nothing in a child ever talks to
//! the parent's watcher; dropping that copy does not signal it either.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Which incarnation of a process record is watched: its pid and attach
/// time as the record shows them. A record reused by a new process shows
/// another identity, so its new owner is watched afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) pid: u32,
    pub(crate) attached_ms: u64,
}

/// What a lease probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The lease is held: the process (or a new owner of its record) lives.
    Alive,
    /// The lease was free: whatever the process held has been released.
    Gone,
}

/// What the watcher needs from its attachment.
pub(crate) trait Reaper: Send + Sync + 'static {
    /// The identity of record `index` if it is LIVE.
    fn identity(&self, index: u32) -> Option<Identity>;
    /// Probes record `index`'s lease and, if it is free, sweeps the dead
    /// owner's holds and wakes the sleepers (the normal recovery path).
    fn probe_and_reap(&self, index: u32) -> Probe;
}

/// After an exit event, how often the lease is probed again while it still
/// looks held (the kernel drops the OFD lock while it tears the process
/// down, normally before the pidfd fires): 1, 2, 4, ... 32 ms, then the
/// waiters' poll takes over.
const RETRIES: u32 = 7;

/// Token of the eventfd in the epoll set (record indices are below 1024).
const EVENT_TOKEN: u64 = u64::MAX;

/// The waiters' side of a running watcher.
pub(crate) struct Watcher {
    shared: Arc<Shared>,
}

struct Shared {
    eventfd: OwnedFd,
    requests: Mutex<Requests>,
    stop: AtomicBool,
    /// Held by the thread for each round in which it holds a strong
    /// reference to the attachment, and by [`Watcher::stop_if_last`]: so a
    /// handle's drop can tell that the thread holds no reference, and stop it
    /// before it takes one.
    round: Mutex<()>,
}

#[derive(Default)]
struct Requests {
    /// Records to start watching, handed to the thread.
    pending: Vec<(u32, Identity)>,
    /// Every record asked for and not yet forgotten by the thread, so a
    /// waiter that parks again asks only for new holders.
    asked: HashMap<u32, Identity>,
}

impl Watcher {
    /// Starts the thread. `Err`: no epoll, eventfd or thread (descriptor or
    /// thread limits): the caller goes on without a watcher (the poll
    /// remains).
    pub(crate) fn start<R: Reaper>(reaper: Weak<R>) -> io::Result<Watcher> {
        // SAFETY: a plain syscall; the returned descriptor is owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let epoll = Epoll::new()?;
        epoll.add(eventfd.as_raw_fd(), EVENT_TOKEN)?;
        let shared = Arc::new(Shared {
            eventfd,
            requests: Mutex::new(Requests::default()),
            stop: AtomicBool::new(false),
            round: Mutex::new(()),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("locktable-watcher".into())
            .spawn(move || run(epoll, thread_shared, reaper))?;
        Ok(Watcher { shared })
    }

    /// Asks the thread to watch the processes of records `indices` (a
    /// sleeping waiter's holders). Cheap when they are watched already.
    pub(crate) fn watch(&self, reaper: &dyn Reaper, indices: impl IntoIterator<Item = u32>) {
        let mut asked_any = false;
        let mut req = self.shared.requests.lock();
        for i in indices {
            let Some(id) = reaper.identity(i) else {
                continue;
            };
            if req.asked.get(&i) == Some(&id) {
                continue;
            }
            req.asked.insert(i, id);
            req.pending.push((i, id));
            asked_any = true;
        }
        drop(req);
        if asked_any {
            self.shared.notify();
        }
    }

    /// Tells the thread to exit (it holds only a weak reference to the
    /// attachment, so it would also stop at its next event).
    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.notify();
    }

    /// Stops the thread if `last()` holds while the thread is between rounds
    /// (waiting for the end of a round in progress). Called by the drop of a
    /// handle with `last` = "this is the only strong reference": the thread
    /// then never takes another, so the attachment detaches on the dropping
    /// thread, before it returns. Without this, a handle dropped during a
    /// round left the last reference to the thread, and a process that
    /// exited right after the drop (as `locktable lock` does) was gone
    /// before the thread detached: its record, and a reap the thread was
    /// doing, stayed behind for a later reaper.
    pub(crate) fn stop_if_last(&self, last: impl FnOnce() -> bool) {
        let _round = self.shared.round.lock();
        if last() {
            self.stop();
        }
    }
}

impl Shared {
    fn notify(&self) {
        let one: u64 = 1;
        // writes 8 bytes from a live u64 to a descriptor we own. A
        // full counter (EAGAIN) already means "pending", so errors are moot.
        // SAFETY: sound for the reasons just given.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a descriptor we own.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }
}

/// An epoll instance.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: a plain syscall; the returned descriptor is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open; `ev` is valid for the call.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for events; `timeout` None = forever. EINTR counts as none.
    fn wait(&self, out: &mut [libc::epoll_event], timeout: Option<Duration>) -> usize {
        let ms = timeout.map_or(-1, |t| {
            t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });
        // SAFETY: `out` is a valid writable buffer of `out.len()` events.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                out.as_mut_ptr(),
                out.len() as libc::c_int,
                ms,
            )
        };
        n.max(0) as usize
    }
}

/// A pidfd for `pid` (closed on drop; removing it from the epoll set is
/// implied by the close, as it is the only descriptor of its file).
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor (O_CLOEXEC) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A lease probe to make, and why.
struct Due {
    index: u32,
    id: Identity,
    at: Instant,
    /// 0: right after the watch was set up (the process may have died
    /// before its pidfd existed); n > 0: the n-th probe after an exit event.
    attempt: u32,
}

/// The thread's state.
struct Watches {
    pidfds: HashMap<u32, (Identity, OwnedFd)>,
    due: Vec<Due>,
}

fn run<R: Reaper>(epoll: Epoll, shared: Arc<Shared>, reaper: Weak<R>) {
    let mut w = Watches {
        pidfds: HashMap::new(),
        due: Vec::new(),
    };
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
    loop {
        let now = Instant::now();
        let timeout = w
            .due
            .iter()
            .map(|d| d.at.saturating_duration_since(now))
            .min();
        let n = epoll.wait(&mut events, timeout);
        // The round holds a strong reference only under `round`, and
        // checks `stop` under it first (see `Watcher::stop_if_last`).
        let round = shared.round.lock();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(reaper) = reaper.upgrade() else {
            return;
        };
        for ev in &events[..n] {
            let token = ev.u64;
            if token == EVENT_TOKEN {
                shared.drain();
                let pending = std::mem::take(&mut shared.requests.lock().pending);
                for (index, id) in pending {
                    w.open(&epoll, index, id);
                }
            } else if let Some((id, _fd)) = w.pidfds.remove(&(token as u32)) {
                // The process exited: probe now (dropping the pidfd closed it
                // and took it out of the epoll set).
                w.due.push(Due {
                    index: token as u32,
                    id,
                    at: Instant::now(),
                    attempt: 1,
                });
            }
        }
        w.probe_due(&*reaper, &shared);
        // If it was the last reference (the handles were dropped during the
        // round by owners that did not wait for it, such as guards that own
        // their table), the attachment detaches here, and the next upgrade
        // fails.
        drop(reaper);
        drop(round);
    }
}

impl Watches {
    /// Starts watching record `index` as `id`, replacing an older watch of
    /// the record, and schedules the first lease probe: the process may
    /// have died before its pidfd existed (then `pidfd_open` fails, or
    /// names a zombie that is readable at once, or a reused pid). Alive at
    /// that probe: the watch stays (or, without a pidfd, the poll covers).
    fn open(&mut self, epoll: &Epoll, index: u32, id: Identity) {
        self.pidfds.remove(&index);
        let watched = pidfd_open(id.pid).and_then(|fd| {
            epoll.add(fd.as_raw_fd(), index as u64)?;
            Ok(fd)
        });
        match watched {
            Ok(fd) => {
                self.pidfds.insert(index, (id, fd));
            }
            // Any other error than "no such process" (no pidfd_open, a
            // descriptor limit): this incarnation is not watched, and it
            // stays "asked" so parking waiters do not retry the syscall; the
            // poll covers it (a new owner of the record is asked afresh).
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => return,
            // ESRCH: the pid is gone, so if it was the owner's, its files
            // were closed long ago and the single probe below decides. If
            // the lease is still held, the pid was not the owner's (another
            // pid namespace): the poll covers it, as above.
            Err(_) => {}
        }
        self.due.push(Due {
            index,
            id,
            at: Instant::now(),
            attempt: 0,
        });
    }

    fn probe_due(&mut self, reaper: &dyn Reaper, shared: &Shared) {
        let now = Instant::now();
        let (ready, later): (Vec<Due>, Vec<Due>) = self.due.drain(..).partition(|d| d.at <= now);
        self.due = later;
        for d in ready {
            match (reaper.probe_and_reap(d.index), d.attempt) {
                // Alive at the first probe: keep watching.
                (Probe::Alive, 0) => {}
                // Exited but the lease still looks held: the kernel has not
                // closed its files yet, or the pidfd named another process
                // (another pid namespace). Probe again, then give up.
                (Probe::Alive, n) if n < RETRIES => self.due.push(Due {
                    at: Instant::now() + Duration::from_millis(1 << (n - 1)),
                    attempt: n + 1,
                    ..d
                }),
                _ => {
                    if self.pidfds.get(&d.index).is_some_and(|(id, _)| *id == d.id) {
                        self.pidfds.remove(&d.index);
                    }
                    forget(shared, d.index, d.id);
                }
            }
        }
    }
}

/// Lets waiters ask for record `index` again.
fn forget(shared: &Shared, index: u32, id: Identity) {
    let mut req = shared.requests.lock();
    if req.asked.get(&index) == Some(&id) {
        req.asked.remove(&index);
    }
}
