//! [`PgLocks`]: per-ID read, upgradable and write locks on PostgreSQL advisory locks, shared by
//! every host that reaches the database.
//!
//! Owns: the mapping of an ID to advisory-lock keys and of the three lock modes to shared and
//! exclusive advisory locks. It may not read or write session data (that is `PgStore`).
//!
//! # Keys
//! A keyed SipHash-1-3 of the ID gives two keys per ID. The 128-bit secret must be the same on
//! every host: `SessionManager::postgres` takes it from the database (`PgStore::lock_secret`,
//! made once per table set), or the application passes its own. Nobody who lacks it can aim IDs
//! at one key.
//! - the **data key** `D`, a `bigint` in the one-key space (`pg_advisory_lock(bigint)`);
//! - the **intent key** `I`, a pair of `int4` in the two-key space
//!   (`pg_advisory_lock(int4, int4)`). The server keeps the two spaces apart, so an intent key can
//!   never equal any data key.
//!
//! # Modes
//! | mode | holds |
//! |---|---|
//! | read | `D` shared |
//! | upgradable | `I` exclusive, then `D` shared |
//! | write | `I` exclusive, then `D` exclusive |
//! | upgrade | with `I` and `D` shared held: `D` exclusive, then `D` shared released |
//!
//! Readers share `D` with one upgradable holder; upgradable and write holders exclude each other
//! through `I`; a writer excludes readers through `D`. One backend may hold `D` shared and
//! exclusive at once, so an upgrade waits only for the other readers.
//!
//! **No deadlock among these locks**: every holder takes `I` before `D` and never waits for `I`
//! while holding `D`. A waiter for `D` exclusive (a writer or an upgrade) holds at most `I`, and
//! the only others who can hold `D` are readers (who hold nothing else and wait for nothing) and
//! at most one upgradable holder, which cannot exist while the waiter holds `I`. So no cycle of
//! waits can form. Two IDs whose keyed hashes collide (chance 2^-64 per pair) merely share a lock.
//!
//! # Connections
//! Each guard holds its advisory locks on a connection of its own, checked out of the pool for
//! the guard's life (session-scope advisory locks belong to a server session; they do not work
//! behind a transaction-pooling proxy such as PgBouncer in transaction mode). Dropping a guard
//! runs `pg_advisory_unlock_all()` on it and returns it to the pool, or closes it if that failed.
//! If the process or its connection dies, the server ends the session and releases its locks.
//!
//! Timeouts use `lock_timeout` (one `DO` block per acquisition, which gives each wait what the
//! earlier ones left); a wait that runs out is [`Error::Timeout`] and leaves nothing held, except
//! that a timed-out upgrade hands the upgradable hold back. Like all of this crate's PostgreSQL
//! code, calls block: never call them on an async runtime's worker thread.

use super::pg_pool::{PgFailure, PgPool, PooledConn};
use crate::{Error, Result, MAX_ID_LEN};
use postgres::error::SqlState;
use siphasher::sip128::{Hasher128, SipHasher13};
use std::fmt;
use std::hash::Hasher;
use std::time::{Duration, Instant};

/// The two advisory-lock keys of one ID (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PgLockKeys {
    /// The data key, in the one-key (`bigint`) space.
    pub data: i64,
    /// The intent key, in the two-key (`int4, int4`) space.
    pub intent: (i32, i32),
}

/// Per-ID cross-host locks on PostgreSQL advisory locks; cheap to clone.
///
/// ```no_run
/// use locktable::session::PgLocks;
/// use std::time::Duration;
/// let locks = PgLocks::connect("postgres://app@db.internal/app", [42; 16]).unwrap();
/// let u = locks.upgradable("cart:17").unwrap(); // other readers go on
/// let w = u.upgrade().unwrap(); // waits for them, then excludes everyone
/// drop(w);
/// assert!(locks.write_timeout("cart:17", Duration::from_millis(100)).is_ok());
/// ```
#[derive(Clone)]
pub struct PgLocks {
    pool: PgPool,
    secret: [u8; 16],
}

impl fmt::Debug for PgLocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("PgLocks").field("pool", &self.pool).finish()
    }
}

/// What one acquisition takes, in order.
#[derive(Clone, Copy)]
enum Step {
    IntentExclusive,
    DataShared,
    DataExclusive,
    /// Releases the shared hold on `D` (after an upgrade took it exclusively).
    DataUnlockShared,
}

impl PgLocks {
    /// Locks on the database at `url` with a default pool. All users of the same locks must use
    /// the same `secret` (16 random bytes from the configuration).
    pub fn connect(url: &str, secret: [u8; 16]) -> Result<PgLocks> {
        Ok(Self::with_pool(PgPool::connect(url)?, secret))
    }

    /// Locks on an existing pool (share one with [`crate::session::PgStore`]).
    pub fn with_pool(pool: PgPool, secret: [u8; 16]) -> PgLocks {
        PgLocks { pool, secret }
    }

    /// The advisory-lock keys of `id` ([`Error::InvalidId`] if it is empty or longer than
    /// [`MAX_ID_LEN`] bytes, as in the lock table).
    pub fn keys(&self, id: &str) -> Result<PgLockKeys> {
        keys_for(&self.secret, id)
    }

    /// A read lock: shared with readers and one upgradable holder. Waits without limit.
    pub fn read(&self, id: &str) -> Result<PgReadGuard> {
        self.acquire(id, &[Step::DataShared], None).map(PgReadGuard)
    }

    /// [`PgLocks::read`] waiting at most `timeout` ([`Error::Timeout`] after).
    pub fn read_timeout(&self, id: &str, timeout: Duration) -> Result<PgReadGuard> {
        self.acquire(id, &[Step::DataShared], Some(timeout))
            .map(PgReadGuard)
    }

    /// An upgradable lock: excludes other upgradable and write holders, not readers.
    pub fn upgradable(&self, id: &str) -> Result<PgUpgradableGuard> {
        self.acquire(id, &[Step::IntentExclusive, Step::DataShared], None)
            .map(PgUpgradableGuard)
    }

    /// [`PgLocks::upgradable`] waiting at most `timeout`.
    pub fn upgradable_timeout(&self, id: &str, timeout: Duration) -> Result<PgUpgradableGuard> {
        self.acquire(
            id,
            &[Step::IntentExclusive, Step::DataShared],
            Some(timeout),
        )
        .map(PgUpgradableGuard)
    }

    /// A write lock: excludes everyone.
    pub fn write(&self, id: &str) -> Result<PgWriteGuard> {
        self.acquire(id, &[Step::IntentExclusive, Step::DataExclusive], None)
            .map(PgWriteGuard)
    }

    /// [`PgLocks::write`] waiting at most `timeout`.
    pub fn write_timeout(&self, id: &str, timeout: Duration) -> Result<PgWriteGuard> {
        self.acquire(
            id,
            &[Step::IntentExclusive, Step::DataExclusive],
            Some(timeout),
        )
        .map(PgWriteGuard)
    }

    /// A write lock if it is free now (`Ok(None)` if not).
    pub fn try_write(&self, id: &str) -> Result<Option<PgWriteGuard>> {
        // The shortest wait the server accepts stands for "do not wait".
        match self.write_timeout(id, Duration::from_millis(1)) {
            Ok(g) => Ok(Some(g)),
            Err(Error::Timeout) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn acquire(&self, id: &str, steps: &[Step], timeout: Option<Duration>) -> Result<Held> {
        let keys = self.keys(id)?;
        // A wait too long to represent is no limit at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut held = Held {
            conn: Some(self.pool.get_until(deadline)?),
            keys,
        };
        held.run(steps, deadline)?;
        Ok(held)
    }
}

fn keys_for(secret: &[u8; 16], id: &str) -> Result<PgLockKeys> {
    check_id(id)?;
    let hash = |domain: u8| {
        let (k0, k1) = split_key(secret);
        let mut h = SipHasher13::new_with_keys(k0, k1);
        h.write_u8(domain);
        h.write(id.as_bytes());
        h.finish128()
    };
    let d = hash(b'd');
    let i = hash(b'i');
    Ok(PgLockKeys {
        data: d.h1 as i64,
        intent: (i.h1 as u32 as i32, (i.h1 >> 32) as u32 as i32),
    })
}

fn split_key(secret: &[u8; 16]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&secret[..8]);
    b.copy_from_slice(&secret[8..]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

fn check_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidId { reason: "empty" });
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::InvalidId {
            reason: "longer than MAX_ID_LEN bytes",
        });
    }
    Ok(())
}

/// Advisory locks held on one dedicated connection.
struct Held {
    conn: Option<PooledConn>,
    keys: PgLockKeys,
}

impl Held {
    /// The function call of one step (its keys are integers we format: nothing to escape).
    fn call(&self, step: Step) -> String {
        let (d, (i1, i2)) = (self.keys.data, self.keys.intent);
        match step {
            Step::IntentExclusive => format!("pg_advisory_lock({i1}, {i2})"),
            Step::DataShared => format!("pg_advisory_lock_shared({d})"),
            Step::DataExclusive => format!("pg_advisory_lock({d})"),
            Step::DataUnlockShared => format!("pg_advisory_unlock_shared({d})"),
        }
    }

    /// Takes the steps in order within the deadline, in one round trip. On failure, everything
    /// this connection holds is released (if even that fails, the connection is closed, which
    /// releases it on the server).
    fn run(&mut self, steps: &[Step], deadline: Option<Instant>) -> Result<()> {
        let r = self.run_keeping(steps, deadline);
        if r.is_err() {
            self.release_all();
        }
        r
    }

    /// [`Held::run`] that keeps what was held before on failure: a step that fails takes
    /// nothing, and the steps after it do not run.
    fn run_keeping(&mut self, steps: &[Step], deadline: Option<Instant>) -> Result<()> {
        let sql = match deadline {
            None => {
                let mut sql = String::from("SET lock_timeout = 0");
                for &s in steps {
                    sql.push_str("; SELECT ");
                    sql.push_str(&self.call(s));
                }
                sql
            }
            // One anonymous block, so that all the waits together stay within the time left:
            // `lock_timeout` is read when a wait starts, so each step gets what the earlier
            // ones left (at least a millisecond: 0 would mean no limit).
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = left.as_millis().clamp(1, i32::MAX as u128);
                let mut body = String::from("DECLARE t0 timestamptz := clock_timestamp(); BEGIN ");
                for &s in steps {
                    body.push_str(&format!(
                        "PERFORM set_config('lock_timeout', greatest(1, {ms} - \
                         (extract(epoch FROM clock_timestamp() - t0) * 1000)::bigint)::text, \
                         false); PERFORM {}; ",
                        self.call(s)
                    ));
                }
                body.push_str("END");
                format!("DO $lt${body}$lt$")
            }
        };
        self.batch(&sql)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(Error::Backend(
                "lock: the connection was already released".into(),
            ));
        };
        conn.batch("lock", sql).map_err(lock_error)
    }

    fn release_all(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if conn
                .batch("unlock", "SELECT pg_advisory_unlock_all()")
                .is_err()
            {
                conn.discard();
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release_all();
    }
}

fn lock_error(f: PgFailure) -> Error {
    if f.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
        Error::Timeout
    } else {
        f.into()
    }
}

/// A read lock on PostgreSQL; released when dropped.
pub struct PgReadGuard(Held);

/// An upgradable lock on PostgreSQL; released when dropped.
pub struct PgUpgradableGuard(Held);

/// A write lock on PostgreSQL; released when dropped.
pub struct PgWriteGuard(Held);

impl PgUpgradableGuard {
    /// Upgrades to a write lock, waiting for the readers. On an error (a dead connection) the
    /// guard is dropped; its locks died with the connection.
    pub fn upgrade(self) -> Result<PgWriteGuard> {
        self.upgrade_timeout(Duration::MAX).map_err(|(e, _)| e)
    }

    /// [`PgUpgradableGuard::upgrade`] waiting at most `timeout`. On [`Error::Timeout`] the
    /// upgradable lock is handed back, still held.
    pub fn upgrade_timeout(
        mut self,
        timeout: Duration,
    ) -> std::result::Result<PgWriteGuard, (Error, PgUpgradableGuard)> {
        let deadline = Instant::now().checked_add(timeout);
        // The exclusive hold on `D` is the last statement of its round trip: if it fails, the
        // shared release after it never runs and the upgradable hold is intact.
        match self
            .0
            .run_keeping(&[Step::DataExclusive, Step::DataUnlockShared], deadline)
        {
            Ok(()) => Ok(PgWriteGuard(self.0)),
            Err(e) => Err((e, self)),
        }
    }
}

macro_rules! guard_debug {
    ($($t:ident: $mode:literal),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // The keys, not the ID: IDs may be secrets (session IDs).
                f.debug_struct(stringify!($t))
                    .field("mode", &$mode)
                    .field("data_key", &self.0.keys.data)
                    .finish()
            }
        }
    )*};
}
guard_debug!(PgReadGuard: "read", PgUpgradableGuard: "upgradable", PgWriteGuard: "write");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_the_secret_and_the_id() {
        let k = |secret: [u8; 16], id: &str| keys_for(&secret, id).unwrap();
        assert_ne!(k([1; 16], "a"), k([2; 16], "a"));
        assert_ne!(k([1; 16], "a"), k([1; 16], "b"));
        assert_eq!(k([1; 16], "a"), k([1; 16], "a"));
        let both = k([1; 16], "a");
        assert_ne!(
            both.data as u64 as u32 as i32, both.intent.0,
            "independent hashes"
        );
        assert!(matches!(
            keys_for(&[0; 16], ""),
            Err(Error::InvalidId { .. })
        ));
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert!(matches!(
            keys_for(&[0; 16], &long),
            Err(Error::InvalidId { .. })
        ));
        assert!(keys_for(&[0; 16], &"x".repeat(MAX_ID_LEN)).is_ok());
    }
}
