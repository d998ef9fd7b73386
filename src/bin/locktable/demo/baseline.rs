//! Today's way, modelled on Beaker's file backend: one JSON file per
//! session; a request loads the file under a shared `flock`, and at its end
//! rewrites the whole load-time snapshot, with a fresh accessed time, under
//! an exclusive `flock`. Every access is a write, and a read-only request
//! can overwrite a concurrent update.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use locktable::session::Timestamp;
use locktable::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct BeakerFile {
    pub(super) data: BTreeMap<String, u64>,
    pub(super) accessed: u64,
}

pub(super) fn beaker_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.session"))
}

/// Loads under a shared flock (released before returning), as Beaker's file namespace does.
pub(super) fn beaker_load(path: &Path) -> Result<BeakerFile> {
    let mut f = File::open(path)?;
    flock(&f, libc::LOCK_SH)?;
    let mut s = String::new();
    let r = f.read_to_string(&mut s);
    flock(&f, libc::LOCK_UN)?;
    r?;
    if s.is_empty() {
        return Ok(BeakerFile::default());
    }
    Ok(serde_json::from_str(&s)?)
}

/// Rewrites the whole snapshot in place under an exclusive flock.
pub(super) fn beaker_save(path: &Path, snapshot: &BeakerFile) -> Result<()> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    flock(&f, libc::LOCK_EX)?;
    let bytes = serde_json::to_vec(snapshot)?;
    let r = (|| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(&bytes)
    })();
    flock(&f, libc::LOCK_UN)?;
    r?;
    Ok(())
}

/// `flock(2)` on an open file, retried on EINTR.
fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // `f` is an open file borrowed for the whole call, so the descriptor is valid;
        // flock takes no pointers and has no other memory effects.
        // SAFETY: sound for the reasons just given.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(super) fn now_ms() -> u64 {
    Timestamp::from_system_time(SystemTime::now()).0
}
