//! Process registry: who is attached, who is alive, and reclaiming the dead.
//!
//! Owns: the process records in the table and their liveness leases. Record
//! `i` is owned by whoever holds an OFD write lock (`F_OFD_SETLK`) on byte
//! `LEASE_BASE + i` of the table file. The kernel drops that lock when the
//! last descriptor of the open file description closes, which happens when
//! the process dies however it dies, so "I could take the lease" means "the
//! owner is dead" with no PID involved (PIDs are reused and collide across
//! PID namespaces; the PID in a record is for display only).
//!
//! Taking a record's lease also gives exclusive right to its fate: only the
//! lease holder may sweep the record's holds or mark it free, so a sweep
//! never races with a new owner of the same index.
//!
//! May not touch: lock words except through [`crate::recovery`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::layout::LEASE_BASE;
use crate::recovery::{self, SweepReport};
use crate::region::{MappedRegion, Region};
use crate::sync::Ordering;

pub(crate) const RECORD_FREE: u64 = 0;
pub(crate) const RECORD_LIVE: u64 = 1;

/// An OFD lock request on one byte. `Ok(false)`: held by another open file
/// description.
pub(crate) fn ofd_lock(file: &File, byte: i64, kind: libc::c_int, wait: bool) -> io::Result<bool> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0; // required by F_OFD_* commands
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // `fl` is a valid flock for the duration of the call and the
        // descriptor is owned by `file`, which is borrowed for the call.
        // SAFETY: sound for the reasons just given.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

/// True if another open file description holds the lease byte of `index`.
pub(crate) fn lease_held_by_other(file: &File, index: u32) -> io::Result<bool> {
    // SAFETY: as in `ofd_lock`.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = (LEASE_BASE + index as i64) as libc::off_t;
    fl.l_len = 1;
    // SAFETY: `fl` is valid for the call; F_OFD_GETLK only writes into it.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_OFD_GETLK,
            &mut fl as *mut libc::flock,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn lease_byte(index: u32) -> i64 {
    LEASE_BASE + index as i64
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Attaches the calling handle. Prefers a FREE record; only when none is
/// left does it take over the record of a process that died attached
/// (sweeping it first), so dead holders stay visible to inspection until a
/// waiter, `reap`, or a shortage of records reclaims them. `None`: every
/// record is held by a live process.
pub(crate) fn attach(region: &MappedRegion, file: &File) -> io::Result<Option<u32>> {
    for only_free in [true, false] {
        for i in 0..region.geometry().max_processes {
            let rec = region.record(i as usize);
            let free = rec.state.load(Ordering::Acquire) == RECORD_FREE;
            if only_free && !free {
                continue;
            }
            if !ofd_lock(file, lease_byte(i), libc::F_WRLCK, false)? {
                continue;
            }
            // Re-read under the lease: only the lease holder changes it now.
            if rec.state.load(Ordering::Acquire) != RECORD_FREE {
                recovery::sweep_process(region, i);
            } else {
                // A free record's reader rows are zero in a sound table
                // (detach and recovery zero them); clear what a corrupt
                // file may have left, or our threads would find entries
                // that no release ever clears.
                recovery::sweep_reader_rows(region, i);
            }
            // Before any hold can be announced in lane i: writers' drain
            // checks scan lanes below this mark (see SlotRef::used_lanes).
            region.lanes_in_use().fetch_max(i + 1, Ordering::SeqCst);
            rec.pid.store(std::process::id(), Ordering::Relaxed);
            rec.attached_ms.store(now_ms(), Ordering::Relaxed);
            // Release: a reader of the record that sees LIVE sees its pid.
            rec.state.store(RECORD_LIVE, Ordering::Release);
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Detaches: releases whatever holds remain (guards that were forgotten),
/// frees the record, then drops the lease.
pub(crate) fn detach(region: &MappedRegion, file: &File, me: u32) {
    recovery::sweep_process(region, me);
    region
        .record(me as usize)
        .state
        .store(RECORD_FREE, Ordering::Release);
    let _ = ofd_lock(file, lease_byte(me), libc::F_UNLCK, false);
}

/// If the owner of record `index` is dead, sweeps its holds and frees the
/// record. `Ok(None)`: alive, or nothing held. The caller serialises calls
/// within its process (OFD locks are per open file description, so two
/// threads of one handle would both "get" the same lease).
///
/// An index beyond the registry can only come from a corrupt word; nobody
/// can own it, so its sweep needs no lease.
pub(crate) fn reap(
    region: &MappedRegion,
    file: &File,
    index: u32,
    me: u32,
) -> io::Result<Option<SweepReport>> {
    if index == me {
        return Ok(None);
    }
    if index >= region.geometry().max_processes {
        let r = recovery::sweep_process(region, index);
        return Ok((r != SweepReport::default()).then_some(r));
    }
    if !ofd_lock(file, lease_byte(index), libc::F_WRLCK, false)? {
        return Ok(None);
    }
    // We hold the lease: nobody owns this index. A LIVE record is a dead
    // owner's; a FREE record holds nothing in a sound table, but a corrupt
    // word may still name it, and a sweep under the lease is always safe.
    let rec = region.record(index as usize);
    let was_live = rec.state.load(Ordering::Acquire) != RECORD_FREE;
    let r = recovery::sweep_process(region, index);
    if was_live {
        rec.state.store(RECORD_FREE, Ordering::Release);
    }
    ofd_lock(file, lease_byte(index), libc::F_UNLCK, false)?;
    Ok((was_live || r != SweepReport::default()).then_some(r))
}
