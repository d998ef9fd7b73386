//! [`PgStore`]: sessions in PostgreSQL, shared by every host that reaches the database.
//!
//! Owns: its two tables and their schema version. It may not take advisory locks (that is
//! [`crate::session::PgLocks`]) nor interpret records beyond their size.
//!
//! Layout, in a configurable schema (default `locktable`) and table name (default `sessions`):
//! - `<table>`: `id`, `version`, `created`, `size`, `bytes` (the encoded record). Written only by
//!   saves, each a compare-and-set on `version` inside one statement.
//! - `<table>_access`: `id`, `last_accessed`. The narrow table that touches update, so a touch
//!   leaves a small dead tuple (a HOT update: no indexed column changes) instead of a copy of the
//!   record. Its fill factor leaves room on each page for those updates.
//! - `locktable_schema`: one row per table set with its schema version. Creation and migration run
//!   in one transaction under a transaction-scoped advisory lock, so concurrent starters are safe
//!   and a second start changes nothing.
//!
//! Every operation is one statement, hence one round trip once its prepared statement is cached
//! on the connection. Server or connection failures become [`Error::Backend`] (the statement
//! certainly failed, or its outcome is unknown: see [`PgStore`]); the next call reconnects.
//! The client is synchronous: never call it on an async runtime's worker thread.

use super::{Capabilities, Cutoffs, Store, StoredSession, Timestamp, Touch};
use crate::session::id::SessionId;
use crate::session::pg_pool::{PgPool, PooledConn};
use crate::{Error, Result};
use std::time::Duration;

/// The schema version this library creates and understands.
const SCHEMA_VERSION: i32 = 1;

/// Key of the transaction-scoped advisory lock that serializes schema migrations (in the
/// two-key space, apart from session locks, which use the single-key space and 2 for intent).
const MIGRATION_LOCK: (i32, i32) = (0x6c74_6162, 0x6d69_6772);

/// Settings of a [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgStoreOptions {
    /// Schema holding the tables (created if missing). Default `locktable`.
    pub schema: String,
    /// Name of the record table; the access-time table is `<table>_access`. Default `sessions`.
    pub table: String,
    /// Largest record the store accepts and returns; bigger ones are [`Error::TooLarge`].
    /// Default 1 MiB, the session manager's default.
    pub max_record_size: usize,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        PgStoreOptions {
            schema: "locktable".into(),
            table: "sessions".into(),
            max_record_size: 1 << 20,
        }
    }
}

/// A [`Store`] on PostgreSQL (13 or newer).
///
/// Saves are compare-and-set statements (`INSERT ... ON CONFLICT DO NOTHING` to create,
/// `UPDATE ... WHERE id = $1 AND version = $2` otherwise), so two hosts can never both win a
/// version, whatever locks they hold: [`Capabilities::atomic_cas`] is true.
///
/// Failures: a statement the server refused certainly did not apply. A connection that dropped
/// while a save was in flight leaves its outcome unknown: the error says so, and the caller must
/// reload before retrying (never replay it blindly). Either way the error is [`Error::Backend`]
/// and the next call opens a fresh connection.
///
/// ```no_run
/// use locktable::session::{PgStore, SessionConfig, SessionManager};
/// use locktable::{LockTable, TableOptions};
/// let store = PgStore::connect("postgres://app@db.internal/app").unwrap();
/// let table = LockTable::anonymous(&TableOptions::default()).unwrap();
/// let mgr = SessionManager::new(table, store, SessionConfig::default());
/// let s = mgr.create().unwrap();
/// # let _ = s;
/// ```
#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    max_record_size: usize,
    sql: Sql,
}

/// The statements, built once from the configured names.
#[derive(Debug)]
struct Sql {
    load: String,
    create: String,
    update: String,
    touch: String,
    last_accessed: String,
    delete: String,
    list_expired: String,
    purge_expired: String,
    migrate_v1: String,
    schema_table: String,
    schema: String,
    set_name: String,
}

/// Accepts plain lower-case SQL identifiers only, so names never need escaping beyond quotes.
fn check_identifier(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidOptions(format!(
            "PostgreSQL {what} name must be 1-48 characters of [a-z0-9_], not starting with a digit"
        )))
    }
}

impl Sql {
    fn new(schema: &str, table: &str) -> Sql {
        let d = format!("\"{schema}\".\"{table}\"");
        let a = format!("\"{schema}\".\"{table}_access\"");
        let schema_table = format!("\"{schema}\".\"locktable_schema\"");
        Sql {
            load: format!(
                "SELECT d.version, d.created, COALESCE(a.last_accessed, d.created), d.size, \
                 CASE WHEN d.size <= $2 THEN d.bytes END \
                 FROM {d} d LEFT JOIN {a} a ON a.id = d.id WHERE d.id = $1"
            ),
            // Insert-if-absent; the access row follows only when the record was inserted.
            create: format!(
                "WITH d AS (INSERT INTO {d} (id, version, created, size, bytes) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING RETURNING id) \
                 INSERT INTO {a} (id, last_accessed) SELECT id, $6 FROM d \
                 ON CONFLICT (id) DO UPDATE SET last_accessed = excluded.last_accessed \
                 RETURNING 1"
            ),
            // Compare-and-set on the version; the access time moves only forwards, and only when
            // the record was written.
            update: format!(
                "WITH d AS (UPDATE {d} SET version = $3, created = $4, size = $5, bytes = $6 \
                 WHERE id = $1 AND version = $2 RETURNING id), \
                 a AS (UPDATE {a} SET last_accessed = $7 FROM d \
                 WHERE {a}.id = d.id AND {a}.last_accessed < $7) \
                 SELECT count(*) FROM d"
            ),
            // Written only if older than the coalescing bound ($3) and not idle-expired ($4),
            // both checked on the row being updated (so atomically with the write). `cur` is the
            // statement's snapshot, used only to say why nothing was written.
            touch: format!(
                "WITH cur AS (SELECT last_accessed FROM {a} WHERE id = $1), \
                 upd AS (UPDATE {a} SET last_accessed = $2 \
                 WHERE id = $1 AND last_accessed < $3 AND last_accessed >= $4 RETURNING 1) \
                 SELECT (SELECT last_accessed FROM cur), (SELECT count(*) FROM upd)"
            ),
            last_accessed: format!("SELECT last_accessed FROM {a} WHERE id = $1"),
            delete: format!(
                "WITH d AS (DELETE FROM {d} WHERE id = $1 RETURNING id), \
                 a AS (DELETE FROM {a} WHERE id = $1) \
                 SELECT count(*) FROM d"
            ),
            list_expired: format!(
                "SELECT d.id FROM {d} d LEFT JOIN {a} a ON a.id = d.id \
                 WHERE COALESCE(a.last_accessed, d.created) < $1 OR d.created < $2 LIMIT $3"
            ),
            // Bounded batch: lock up to $3 candidates (skipping rows a save holds), then delete
            // each only if the predicate still holds on its current access row (a touch that
            // committed meanwhile keeps the session).
            purge_expired: format!(
                "WITH victims AS (SELECT d.id FROM {d} d LEFT JOIN {a} a ON a.id = d.id \
                 WHERE COALESCE(a.last_accessed, d.created) < $1 OR d.created < $2 \
                 LIMIT $3 FOR UPDATE OF d SKIP LOCKED), \
                 gone AS (DELETE FROM {a} x USING {d} y \
                 WHERE x.id IN (SELECT id FROM victims) AND y.id = x.id \
                 AND (x.last_accessed < $1 OR y.created < $2) RETURNING x.id), \
                 del AS (DELETE FROM {d} WHERE id IN (SELECT id FROM gone) RETURNING 1) \
                 SELECT count(*) FROM del"
            ),
            migrate_v1: format!(
                "CREATE TABLE IF NOT EXISTS {d} (\
                 id text PRIMARY KEY, version bigint NOT NULL, created bigint NOT NULL, \
                 size integer NOT NULL, bytes bytea NOT NULL); \
                 CREATE TABLE IF NOT EXISTS {a} (\
                 id text PRIMARY KEY, last_accessed bigint NOT NULL) WITH (fillfactor = 70);"
            ),
            schema_table,
            schema: format!("\"{schema}\""),
            set_name: format!("{schema}.{table}"),
        }
    }
}

/// Milliseconds as PostgreSQL's `bigint`; times past year 292 million saturate.
fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

/// A stored `bigint` time as a [`Timestamp`] (a negative one, written by someone else, is 0).
fn ts(v: i64) -> Timestamp {
    Timestamp(u64::try_from(v).unwrap_or(0))
}

fn version_param(v: u64) -> Result<i64> {
    i64::try_from(v)
        .map_err(|_| Error::SessionCorrupt("record version beyond the store's range".into()))
}

impl PgStore {
    /// Connects to `url` with the default pool and [`PgStoreOptions`], creating or migrating
    /// the tables.
    pub fn connect(url: &str) -> Result<PgStore> {
        Self::with_pool(PgPool::connect(url)?, PgStoreOptions::default())
    }

    /// A store on an existing pool (share one with [`crate::session::PgLocks`]), creating or
    /// migrating the tables.
    pub fn with_pool(pool: PgPool, opts: PgStoreOptions) -> Result<PgStore> {
        check_identifier("schema", &opts.schema)?;
        check_identifier("table", &opts.table)?;
        let store = PgStore {
            pool,
            max_record_size: opts.max_record_size,
            sql: Sql::new(&opts.schema, &opts.table),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The pool this store uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the schema, or brings it to [`SCHEMA_VERSION`]; idempotent and safe to run from
    /// many processes at once.
    fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.get()?;
        let r = self.migrate_on(&mut conn);
        if let Err(Error::Backend(_)) = &r {
            conn.discard();
        }
        r
    }

    fn migrate_on(&self, conn: &mut PooledConn) -> Result<()> {
        let fail = |e: postgres::Error| crate::session::pg_pool::backend_error("migrate", &e);
        let sql = &self.sql;
        let mut tx = conn.client().transaction().map_err(fail)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&MIGRATION_LOCK.0, &MIGRATION_LOCK.1],
        )
        .map_err(fail)?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}; \
             CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, version integer NOT NULL);",
            sql.schema, sql.schema_table
        ))
        .map_err(fail)?;
        let current: i32 = tx
            .query_opt(
                &format!("SELECT version FROM {} WHERE name = $1", sql.schema_table),
                &[&sql.set_name],
            )
            .map_err(fail)?
            .map_or(0, |r| r.get(0));
        if current > SCHEMA_VERSION {
            return Err(Error::Backend(format!(
                "migrate: the tables are at schema version {current}, newer than this library's \
                 {SCHEMA_VERSION}"
            )));
        }
        if current < 1 {
            tx.batch_execute(&sql.migrate_v1).map_err(fail)?;
        }
        // Later versions add their steps here, each guarded by `current < N`.
        if current < SCHEMA_VERSION {
            tx.execute(
                &format!(
                    "INSERT INTO {} (name, version) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET version = excluded.version",
                    sql.schema_table
                ),
                &[&sql.set_name, &SCHEMA_VERSION],
            )
            .map_err(fail)?;
        }
        tx.commit().map_err(fail)
    }

    /// The schema version of this store's tables (for tests and tools).
    pub fn schema_version(&self) -> Result<i32> {
        let mut conn = self.pool.get()?;
        let rows = conn.query(
            "migrate",
            &format!(
                "SELECT version FROM {} WHERE name = $1",
                self.sql.schema_table
            ),
            &[&self.sql.set_name],
        )?;
        Ok(rows.first().map_or(0, |r| r.get(0)))
    }

    /// Deletes up to `batch` expired sessions in one statement and returns how many. Each is
    /// re-checked against its current access time as it is deleted, so a touch that committed
    /// meanwhile keeps it; rows being saved right now are skipped (a later call gets them).
    pub fn purge_expired(&self, cutoffs: Cutoffs, batch: usize) -> Result<usize> {
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let rows = self.pool.get()?.query(
            "purge_expired",
            &self.sql.purge_expired,
            &[
                &ms(cutoffs.idle_before),
                &ms(cutoffs.created_before),
                &limit,
            ],
        )?;
        Ok(count(&rows))
    }

    fn check_size(&self, len: usize) -> Result<i32> {
        if len > self.max_record_size {
            return Err(Error::TooLarge {
                size: len,
                limit: self.max_record_size,
            });
        }
        i32::try_from(len).map_err(|_| Error::TooLarge {
            size: len,
            limit: i32::MAX as usize,
        })
    }
}

fn count(rows: &[postgres::Row]) -> usize {
    rows.first()
        .map_or(0, |r| usize::try_from(r.get::<_, i64>(0)).unwrap_or(0))
}

impl Store for PgStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, false, true)
    }

    fn load(&self, id: &SessionId) -> Result<Option<StoredSession>> {
        let limit = i32::try_from(self.max_record_size).unwrap_or(i32::MAX);
        let rows = self
            .pool
            .get()?
            .query("load", &self.sql.load, &[&id.as_str(), &limit])?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let size: i32 = row.get(3);
        let Some(bytes) = row.get::<_, Option<Vec<u8>>>(4) else {
            return Err(Error::TooLarge {
                size: usize::try_from(size).unwrap_or(0),
                limit: self.max_record_size,
            });
        };
        let version: i64 = row.get(0);
        Ok(Some(StoredSession {
            version: u64::try_from(version)
                .map_err(|_| Error::SessionCorrupt("negative record version".into()))?,
            created: ts(row.get(1)),
            last_accessed: ts(row.get(2)),
            bytes,
        }))
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        let size = self.check_size(new.bytes.len())?;
        let version = version_param(new.version)?;
        let mut conn = self.pool.get()?;
        let rows = match expected {
            None => conn.query(
                "save",
                &self.sql.create,
                &[
                    &id.as_str(),
                    &version,
                    &ms(new.created),
                    &size,
                    &new.bytes,
                    &ms(new.last_accessed),
                ],
            ),
            Some(exp) => {
                let exp = version_param(exp)?;
                conn.query(
                    "save",
                    &self.sql.update,
                    &[
                        &id.as_str(),
                        &exp,
                        &version,
                        &ms(new.created),
                        &size,
                        &new.bytes,
                        &ms(new.last_accessed),
                    ],
                )
                .map(|rows| if count(&rows) == 1 { rows } else { Vec::new() })
            }
        };
        match rows {
            Ok(rows) => Ok(!rows.is_empty()),
            Err(f) if f.certainly_not_applied() => Err(f.into()),
            Err(f) => Err(Error::Backend(format!(
                "save: outcome unknown, the connection failed while the write was in flight \
                 (reload before retrying): {}",
                Error::from(f)
            ))),
        }
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        idle_before: Timestamp,
    ) -> Result<Touch> {
        let write_below = at.saturating_sub(coalesce);
        let rows = self.pool.get()?.query(
            "touch",
            &self.sql.touch,
            &[&id.as_str(), &ms(at), &ms(write_below), &ms(idle_before)],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| Error::Backend("touch: no result row".into()))?;
        let stored: Option<i64> = row.get(0);
        let written: i64 = row.get(1);
        Ok(match stored {
            _ if written == 1 => Touch::Written,
            None => Touch::Missing,
            Some(la) if ts(la) < idle_before && ts(la) < write_below => Touch::Expired,
            // Recent enough, or changed by a concurrent touch (which left it newer).
            Some(_) => Touch::Skipped,
        })
    }

    fn last_accessed(&self, id: &SessionId) -> Result<Option<Timestamp>> {
        let rows =
            self.pool
                .get()?
                .query("last_accessed", &self.sql.last_accessed, &[&id.as_str()])?;
        Ok(rows.first().map(|r| ts(r.get(0))))
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        let rows = self
            .pool
            .get()?
            .query("delete", &self.sql.delete, &[&id.as_str()])?;
        Ok(count(&rows) == 1)
    }

    fn list_expired(&self, cutoffs: Cutoffs, limit: usize) -> Result<Vec<SessionId>> {
        let lim = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.pool.get()?.query(
            "list_expired",
            &self.sql.list_expired,
            &[&ms(cutoffs.idle_before), &ms(cutoffs.created_before), &lim],
        )?;
        // Rows whose ID is not a session ID were written by something else: not ours to touch.
        Ok(rows
            .iter()
            .filter_map(|r| SessionId::parse(r.get::<_, &str>(0)).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain_lower_case() {
        for ok in ["locktable", "sessions", "_x1", "a_b_c"] {
            assert!(check_identifier("t", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Sessions",
            "a\"b",
            "a;drop",
            "a b",
            &"x".repeat(49),
        ] {
            assert!(
                matches!(check_identifier("t", bad), Err(Error::InvalidOptions(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn times_saturate_into_bigint() {
        assert_eq!(ms(Timestamp(u64::MAX)), i64::MAX);
        assert_eq!(ts(-5), Timestamp(0));
    }
}
