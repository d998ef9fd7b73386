//! Typed errors of the lock core.
//!
//! Owns: the public [`Error`] enum. Every failure a caller can meet, including
//! bad input (a corrupt table file, an oversized ID), is one of these; the
//! library never panics on input.

use std::time::Duration;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The deadline of a `*_timeout` call passed before the lock was granted.
    #[error("timed out waiting for the lock")]
    Timeout,
    /// The ID is empty or longer than [`crate::MAX_ID_LEN`] bytes.
    #[error("invalid lock ID: {reason}")]
    InvalidId {
        /// Why the ID was refused.
        reason: &'static str,
    },
    /// Both candidate buckets of the ID are full of held locks, even after
    /// the holds of dead processes were released.
    #[error("lock table full (capacity {capacity} slots)")]
    TableFull {
        /// Slots in the table.
        capacity: usize,
    },
    /// Every process record of the table is taken by a live attachment. Each
    /// `LockTable::open` (so each `SessionManager::open`) is one attachment,
    /// even within one process; clones of a `LockTable` or `SessionManager`
    /// share theirs.
    #[error(
        "too many attachments to the lock table (max {max_processes}): each LockTable::open or \
         SessionManager::open is one, even within one process; clones of a LockTable or \
         SessionManager share one attachment"
    )]
    TooManyProcesses {
        /// Records in the table.
        max_processes: usize,
    },
    /// This process already holds the maximum number of read locks on one ID
    /// (a bound that keeps counters from overflowing).
    #[error("read-hold limit reached: this process holds {limit} reads of this ID")]
    HoldLimit {
        /// The bound.
        limit: u32,
    },
    /// The file is a table of another format, version, layout or geometry.
    #[error("incompatible lock table: {reason}")]
    Incompatible {
        /// What differs.
        reason: String,
    },
    /// The file is damaged: truncated, torn, or not what its header says.
    #[error("corrupt lock table: {0}")]
    Corrupt(String),
    /// The options (of a table, a store, or a web layer's cookie) are out of range or unusable.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The `LockTable` (or a `SessionManager` or guard built on it) was
    /// inherited across `fork()`; a child must open its own (it is another
    /// process and needs its own record).
    #[error(
        "this LockTable (or the SessionManager built on it) was inherited across fork(); open it \
         again in the child (LockTable::open or SessionManager::open)"
    )]
    ForkedChild,
    /// A waiter gave up on a wait shorter than the poll interval.
    #[error("wait of {0:?} is not representable")]
    BadDuration(Duration),
    /// An operating-system call failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    // ---- session layer ----
    /// Another request committed a change to `key` after this request loaded the session; nothing
    /// was written.
    #[error("conflict: key {key:?} was changed by another request since this session was loaded")]
    Conflict {
        /// The first conflicting key.
        key: String,
    },
    /// A session ID is malformed (wrong length or characters).
    #[error("malformed session id")]
    InvalidSessionId,
    /// The session no longer exists (expired, deleted, invalidated or moved by `cycle_id`).
    #[error("the session no longer exists")]
    SessionGone,
    /// A stored session record failed validation (checksum, header, format).
    #[error("corrupt session record: {0}")]
    SessionCorrupt(String),
    /// A session record would exceed the configured maximum size.
    #[error("session record too large: {size} bytes, limit {limit}")]
    TooLarge {
        /// Encoded size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A value could not be serialized or deserialized.
    #[error("serialization error: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The session was already committed, invalidated or is otherwise finished.
    #[error("the session was already committed or invalidated")]
    SessionFinished,
    /// The OS random source failed.
    #[error("OS random source failed: {0}")]
    Random(String),
    /// A value nests deeper than the session layer stores and reads back
    /// ([`crate::session::record::MAX_DEPTH`]); nothing was changed.
    #[error("value nested {depth} levels deep; sessions store at most {limit}")]
    TooDeep {
        /// Nesting depth of the refused value.
        depth: usize,
        /// The limit.
        limit: usize,
    },
    /// A commit's write may or may not have been applied (for example the record was renamed into
    /// place but the directory fsync failed). Do not replay it blindly: reload the session and
    /// look.
    #[error("commit outcome unknown (the change may have been applied): {0}")]
    OutcomeUnknown(String),
    /// This `SessionManager` (or a session of it) was inherited across `fork()`; open the
    /// `SessionManager` again in the child.
    #[error(
        "this SessionManager was inherited across fork(); open the SessionManager again in the child"
    )]
    ForkedSessionManager,
    /// The session store or lock server failed or could not be reached (a dropped connection, a
    /// restarted or overloaded server, a full connection pool). The message names the operation
    /// and the kind of failure, never session data or IDs. Later calls reconnect by themselves.
    #[error("session store or lock server failed or unavailable: {0}")]
    Backend(String),
}

#[cfg(all(test, not(locktable_loom)))]
mod tests {
    use super::*;
    use crate::session::{MemoryStore, SessionConfig, SessionManager};
    use crate::{LockTable, TableOptions};

    #[test]
    fn the_fork_error_names_what_the_user_holds_and_what_to_do() {
        let m = Error::ForkedChild.to_string();
        for part in [
            "LockTable",
            "SessionManager",
            "fork()",
            "open it again in the child",
        ] {
            assert!(m.contains(part), "{part:?} missing from {m:?}");
        }
    }

    /// Managers in one process each attach; their clones do not.
    #[test]
    fn the_attachment_limit_says_attachments_and_that_clones_share_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.table");
        let opts = TableOptions::default().max_processes(2);
        let manager = || -> Result<SessionManager> {
            let table = LockTable::open(&path, &opts)?;
            Ok(SessionManager::new(
                table,
                MemoryStore::new(),
                SessionConfig::default(),
            ))
        };
        let first = manager().unwrap();
        let clones: Vec<SessionManager> = (0..10).map(|_| first.clone()).collect();
        let _second = manager().unwrap();
        let e = manager().unwrap_err();
        assert!(
            matches!(e, Error::TooManyProcesses { max_processes: 2 }),
            "{e:?}"
        );
        let m = e.to_string();
        for part in ["attachments", "(max 2)", "SessionManager::open", "clones"] {
            assert!(m.contains(part), "{part:?} missing from {m:?}");
        }
        assert!(!m.contains("processes attached"), "{m:?}");
        drop(clones);
    }
}
