//! [`PgStore`]: sessions in PostgreSQL, shared by every host that reaches the database.
//!
//! Owns: its two tables, their schema version and the lock-key secret row. It may not take
//! advisory locks (that is [`crate::session::PgLocks`]; only the migration takes a
//! transaction-scoped one) nor interpret records beyond their size.
//!
//! Layout, in a configurable schema (default `locktable`) and table name (default `sessions`):
//! - `<table>`: `id`, `version`, `created`, `expiry_kind`, `expiry_ms`, `size`, `bytes` (the
//!   encoded record and, beside it, the metadata that expiry needs). Written only by saves, each a
//!   compare-and-set on `version` inside one statement.
//! - `<table>_access`: `id`, `last_accessed`. The narrow table that touches update, so a touch
//!   leaves a small dead tuple (a HOT update: no indexed column changes) instead of a copy of the
//!   record. Its fill factor leaves room on each page for those updates.
//! - `locktable_lock_secret`: one row per table set with the secret of its advisory-lock keys.
//! - `locktable_schema`: one row per table set with its schema version. Creation and migration run
//!   in one transaction under a transaction-scoped advisory lock, so concurrent starters are safe
//!   and a second start changes nothing.
//!
//! Every operation is one statement, hence one round trip once its prepared statement is cached
//! on the connection. Server or connection failures become [`Error::Backend`], or
//! [`Error::OutcomeUnknown`] for a save that may have committed (see [`PgStore`]); the next call
//! reconnects.
//! The client is synchronous: never call it on an async runtime's worker thread.

use super::{
    Capabilities, Cutoffs, ExpiredScan, Expiry, SessionMeta, Store, StoredSession, Timestamp, Touch,
};
use crate::session::id::SessionId;
use crate::session::pg_pool::{PgPool, PooledConn};
use crate::{Error, Result};
use parking_lot::Mutex;
use std::time::Duration;

/// The schema version this library creates and understands.
const SCHEMA_VERSION: i32 = 1;

/// Key of the transaction-scoped advisory lock that serializes schema migrations, in the two-key
/// space (which session intent keys share: a collision, chance 2^-64, would only make a
/// migration wait for one request).
const MIGRATION_LOCK: (i32, i32) = (0x6c74_6162, 0x6d69_6772);

/// Settings of a [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgStoreOptions {
    /// Schema holding the tables (created if missing). Default `locktable`.
    pub schema: String,
    /// Name of the record table; the access-time table is `<table>_access`. Default `sessions`.
    pub table: String,
    /// Largest record the store accepts (a bound of its own, beside the manager's limit that
    /// every load passes); bigger ones are [`Error::TooLarge`]. Default 16 MiB.
    pub max_record_size: usize,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        PgStoreOptions {
            schema: "locktable".into(),
            table: "sessions".into(),
            max_record_size: 16 << 20,
        }
    }
}

/// A [`Store`] on PostgreSQL (13 or newer).
///
/// Saves are compare-and-set statements (`INSERT ... ON CONFLICT DO NOTHING` to create,
/// `UPDATE ... WHERE id = $1 AND version = $2` otherwise), so two hosts can never both win a
/// version, whatever locks they hold: [`Capabilities::atomic_cas`] is true.
///
/// Failures: a statement the server refused with an ERROR certainly did not apply
/// ([`Error::Backend`]). A connection that dropped, or a FATAL server error, while a save was in
/// flight leaves its outcome unknown ([`Error::OutcomeUnknown`]): reload before retrying, never
/// replay it blindly. The next call opens a fresh connection.
///
/// Most applications use [`crate::session::SessionManager::postgres`], which pairs it with
/// advisory locks on the same database. Do not use a store across `fork()`.
///
/// ```no_run
/// use locktable::session::{PgStore, Store};
/// let store = PgStore::connect("postgres://app@db.internal/app").unwrap();
/// assert!(store.capabilities().atomic_cas);
/// ```
pub struct PgStore {
    pool: PgPool,
    max_record_size: usize,
    sql: Sql,
    /// The last ID `scan_expired` examined (the next scan resumes after it).
    scan_cursor: Mutex<Option<String>>,
    /// Secret of the advisory-lock keys, shared through the database by every host.
    lock_secret: [u8; 16],
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the lock secret.
        f.debug_struct("PgStore")
            .field("tables", &self.sql.set_name)
            .field("max_record_size", &self.max_record_size)
            .field("pool", &self.pool)
            .finish()
    }
}

/// The statements, built once from the configured names.
#[derive(Debug)]
struct Sql {
    load: String,
    create: String,
    update: String,
    meta: String,
    last_accessed: String,
    touch: String,
    delete: String,
    remove_expired: String,
    scan_expired: String,
    purge_expired: String,
    migrate_v1: String,
    schema_table: String,
    secret_table: String,
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

/// SQL for "expired under the cut-offs" of a record row `d` and its access row `a`, with the
/// parameters `$now`, `$idle` and `$life` (milliseconds, `bigint`), as `Cutoffs::expired`
/// computes it. The sums are `numeric`, so they cannot overflow.
fn expired_sql(d: &str, a: &str, now: u8, idle: u8, life: u8) -> String {
    format!(
        "(CASE {d}.expiry_kind WHEN {AT} THEN ${now}::bigint > {d}.expiry_ms \
         ELSE ${now}::bigint > LEAST({a}.last_accessed::numeric \
         + CASE {d}.expiry_kind WHEN {IDLE} THEN {d}.expiry_ms ELSE ${idle}::bigint END, \
         {d}.created::numeric + ${life}::bigint) END)"
    )
}

/// SQL for "the metadata of record row `d` and access row `a` (of a `LEFT JOIN`) is readable":
/// what [`meta_from`] checks, so that `scan_expired` lists as corrupt exactly the rows whose
/// `meta` is [`Error::SessionCorrupt`]. Rows planted or altered by another program (NULLs, a
/// missing access row, an unknown expiry kind, a negative version, a `size` that is not the
/// length of `bytes`) are not.
fn sound_sql(d: &str, a: &str) -> String {
    format!(
        "coalesce({d}.version >= 0 AND {d}.created IS NOT NULL \
         AND {a}.last_accessed IS NOT NULL AND {d}.expiry_kind IN ({DEFAULT}, {IDLE}, {AT}) \
         AND {d}.expiry_ms IS NOT NULL AND {d}.size = octet_length({d}.bytes), false)"
    )
}

/// `expiry_kind` values.
const DEFAULT: i16 = 0;
const IDLE: i16 = 1;
const AT: i16 = 2;

impl Sql {
    fn new(schema: &str, table: &str) -> Sql {
        let d = format!("\"{schema}\".\"{table}\"");
        let a = format!("\"{schema}\".\"{table}_access\"");
        let schema_table = format!("\"{schema}\".\"locktable_schema\"");
        // The metadata and the real length of the bytes (read from the value's header: the
        // bytes themselves are neither read nor sent). A record row without its access row is
        // found too (`LEFT JOIN`), as corrupt.
        let cols = "d.version, d.created, a.last_accessed, d.expiry_kind, d.expiry_ms, d.size, \
                    octet_length(d.bytes)";
        Sql {
            load: format!(
                // The bytes only when their real length is within the limit and agrees with
                // `size` (a `size` written by someone else is no bound on the transfer).
                "SELECT {cols}, CASE WHEN octet_length(d.bytes) <= $2 \
                 AND d.size = octet_length(d.bytes) THEN d.bytes END \
                 FROM {d} d LEFT JOIN {a} a ON a.id = d.id WHERE d.id = $1"
            ),
            // Insert-if-absent; the access row follows only when the record was inserted.
            create: format!(
                "WITH d AS (INSERT INTO {d} \
                 (id, version, created, expiry_kind, expiry_ms, size, bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING RETURNING id) \
                 INSERT INTO {a} (id, last_accessed) SELECT id, $8 FROM d \
                 ON CONFLICT (id) DO UPDATE SET last_accessed = excluded.last_accessed \
                 RETURNING 1"
            ),
            // Compare-and-set on the version; the access time moves only forwards, and only when
            // the record was written. Locks the record row, then the access row (the order of
            // every statement here that locks both).
            update: format!(
                "WITH d AS (UPDATE {d} SET version = $3, created = $4, expiry_kind = $5, \
                 expiry_ms = $6, size = $7, bytes = $8 \
                 WHERE id = $1 AND version = $2 RETURNING id), \
                 a AS (UPDATE {a} SET last_accessed = $9 FROM d \
                 WHERE {a}.id = d.id AND {a}.last_accessed < $9) \
                 SELECT count(*) FROM d"
            ),
            meta: format!(
                "SELECT {cols} FROM {d} d LEFT JOIN {a} a ON a.id = d.id WHERE d.id = $1"
            ),
            // The narrow table only.
            last_accessed: format!("SELECT last_accessed FROM {a} WHERE id = $1"),
            // Written only if older than the coalescing bound ($3) and not expired, both checked
            // on the access row being updated (so atomically with the write: a concurrent touch
            // makes the server re-check them on the newest row). `cur` is the statement's
            // snapshot, used only to say why nothing was written.
            touch: format!(
                "WITH cur AS (SELECT a.last_accessed, {exp_cur} AS expired \
                 FROM {a} a JOIN {d} d ON d.id = a.id WHERE a.id = $1), \
                 upd AS (UPDATE {a} a SET last_accessed = $2 FROM {d} d \
                 WHERE a.id = $1 AND d.id = a.id AND a.last_accessed < $3 AND NOT {exp_upd} \
                 RETURNING 1) \
                 SELECT (SELECT last_accessed FROM cur), (SELECT expired FROM cur), \
                 (SELECT count(*) FROM upd)",
                exp_cur = expired_sql("d", "a", 4, 5, 6),
                exp_upd = expired_sql("d", "a", 4, 5, 6),
            ),
            delete: format!(
                "WITH d AS (DELETE FROM {d} WHERE id = $1 RETURNING id), \
                 a AS (DELETE FROM {a} WHERE id = $1) \
                 SELECT count(*) FROM d"
            ),
            // Locks the record row first, then deletes the access row only if the predicate
            // holds on its newest version (a touch that committed meanwhile keeps the session),
            // then the record.
            remove_expired: format!(
                "WITH v AS (SELECT id FROM {d} WHERE id = $1 FOR UPDATE), \
                 gone AS (DELETE FROM {a} a USING {d} d \
                 WHERE a.id IN (SELECT id FROM v) AND d.id = a.id AND {exp} RETURNING a.id), \
                 del AS (DELETE FROM {d} WHERE id IN (SELECT id FROM gone) RETURNING 1) \
                 SELECT count(*) FROM del",
                exp = expired_sql("d", "a", 2, 3, 4),
            ),
            // Metadata only, from a cursor, in ID order: bounded and, over successive calls,
            // complete. Unreadable metadata (see `sound_sql`) is reported, not judged expired.
            scan_expired: format!(
                "SELECT d.id, {sound}, coalesce({exp}, false) \
                 FROM {d} d LEFT JOIN {a} a ON a.id = d.id \
                 WHERE d.id > $1 ORDER BY d.id LIMIT $5",
                sound = sound_sql("d", "a"),
                exp = expired_sql("d", "a", 2, 3, 4),
            ),
            // Bounded batch: lock up to $4 candidates (skipping rows a save holds), then delete
            // each only if the predicate still holds on its newest access row.
            purge_expired: format!(
                "WITH victims AS (SELECT d.id FROM {d} d JOIN {a} a ON a.id = d.id \
                 WHERE {exp} LIMIT $4 FOR UPDATE OF d SKIP LOCKED), \
                 gone AS (DELETE FROM {a} a USING {d} d \
                 WHERE a.id IN (SELECT id FROM victims) AND d.id = a.id AND {exp} \
                 RETURNING a.id), \
                 del AS (DELETE FROM {d} WHERE id IN (SELECT id FROM gone) RETURNING 1) \
                 SELECT count(*) FROM del",
                exp = expired_sql("d", "a", 1, 2, 3),
            ),
            migrate_v1: format!(
                "CREATE TABLE IF NOT EXISTS {d} (\
                 id text PRIMARY KEY, version bigint NOT NULL, created bigint NOT NULL, \
                 expiry_kind smallint NOT NULL, expiry_ms bigint NOT NULL, \
                 size integer NOT NULL, bytes bytea NOT NULL); \
                 CREATE TABLE IF NOT EXISTS {a} (\
                 id text PRIMARY KEY, last_accessed bigint NOT NULL) WITH (fillfactor = 70);"
            ),
            schema_table,
            secret_table: format!("\"{schema}\".\"locktable_lock_secret\""),
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

fn dur_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The cut-offs as the `$now, $idle, $life` parameters of [`expired_sql`].
fn cutoff_params(c: &Cutoffs) -> [i64; 3] {
    [ms(c.now), dur_ms(c.idle_timeout), dur_ms(c.max_lifetime)]
}

fn expiry_params(e: Expiry) -> (i16, i64) {
    match e {
        Expiry::Default => (DEFAULT, 0),
        Expiry::Idle(d) => (IDLE, dur_ms(d)),
        Expiry::At(t) => (AT, ms(t)),
    }
}

/// Column `i` of a row of our own statements; a type that differs (tables changed behind this
/// library's back) is an error, not a panic.
fn col<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(|_| {
        Error::Backend(format!(
            "column {i} has an unexpected type (were the tables changed outside this library?)"
        ))
    })
}

/// Column `i` of a record's row, which our statements never leave NULL: a NULL (written by
/// someone else, or a record row without its access row) makes the record unreadable.
fn val<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, i: usize) -> Result<T> {
    col::<Option<T>>(row, i)?
        .ok_or_else(|| Error::SessionCorrupt(format!("column {i} of the record's row is NULL")))
}

/// Reads the metadata columns (version, created, last accessed, expiry kind and value, size,
/// real length of the bytes); what it refuses is what [`sound_sql`] refuses.
fn meta_from(row: &postgres::Row) -> Result<SessionMeta> {
    let version: i64 = val(row, 0)?;
    let kind: i16 = val(row, 3)?;
    let value: i64 = val(row, 4)?;
    let size: i32 = val(row, 5)?;
    let len: i32 = val(row, 6)?;
    if size != len {
        return Err(Error::SessionCorrupt(
            "the stored size disagrees with the record's length".into(),
        ));
    }
    let expiry = match kind {
        DEFAULT => Expiry::Default,
        IDLE => Expiry::Idle(Duration::from_millis(u64::try_from(value).unwrap_or(0))),
        AT => Expiry::At(ts(value)),
        _ => {
            return Err(Error::SessionCorrupt(
                "unknown expiry kind in the store".into(),
            ))
        }
    };
    Ok(SessionMeta {
        version: u64::try_from(version)
            .map_err(|_| Error::SessionCorrupt("negative record version".into()))?,
        created: ts(val(row, 1)?),
        last_accessed: ts(val(row, 2)?),
        expiry,
        // Not negative: it equals a length.
        size: u64::try_from(size).unwrap_or(0),
    })
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
            scan_cursor: Mutex::new(None),
            lock_secret: [0; 16],
        };
        let mut store = store;
        store.lock_secret = store.migrate()?;
        Ok(store)
    }

    /// The pool this store uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The secret for [`crate::session::PgLocks`] keys of this table set: 16 random bytes made by
    /// the first host that created the tables and read from the database by every other, so all
    /// hosts derive the same keys without configuration. (Session IDs are random and made by the
    /// server, so the secret only keeps crafted lock IDs of other users of the database from
    /// aiming at one key.)
    pub fn lock_secret(&self) -> [u8; 16] {
        self.lock_secret
    }

    /// Creates the schema, or brings it to [`SCHEMA_VERSION`], and returns the lock secret;
    /// idempotent and safe to run from many processes at once.
    fn migrate(&self) -> Result<[u8; 16]> {
        let mut conn = self.pool.get()?;
        let r = self.migrate_on(&mut conn);
        if let Err(Error::Backend(_)) = &r {
            conn.discard();
        }
        r
    }

    fn migrate_on(&self, conn: &mut PooledConn) -> Result<[u8; 16]> {
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
             CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, version integer NOT NULL); \
             CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, secret bytea NOT NULL);",
            sql.schema, sql.schema_table, sql.secret_table
        ))
        .map_err(fail)?;
        let current: i32 = tx
            .query_opt(
                &format!("SELECT version FROM {} WHERE name = $1", sql.schema_table),
                &[&sql.set_name],
            )
            .map_err(fail)?
            .map_or(Ok(0), |r| r.try_get(0))
            .map_err(fail)?;
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
        let mut fresh = [0u8; 16];
        getrandom::fill(&mut fresh).map_err(|e| Error::Random(e.to_string()))?;
        tx.execute(
            &format!(
                "INSERT INTO {} (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                sql.secret_table
            ),
            &[&sql.set_name, &fresh.as_slice()],
        )
        .map_err(fail)?;
        let stored: Vec<u8> = tx
            .query_one(
                &format!("SELECT secret FROM {} WHERE name = $1", sql.secret_table),
                &[&sql.set_name],
            )
            .map_err(fail)?
            .try_get(0)
            .map_err(fail)?;
        let secret = <[u8; 16]>::try_from(stored.as_slice()).map_err(|_| {
            Error::Backend("migrate: the stored lock secret is not 16 bytes".into())
        })?;
        tx.commit().map_err(fail)?;
        Ok(secret)
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
        rows.first().map_or(Ok(0), |r| col(r, 0))
    }

    /// Deletes up to `batch` expired sessions in one statement and returns how many: a bulk
    /// alternative to the manager's `gc` for a periodic job. Each is re-checked against its
    /// newest access time as it is deleted, so a touch that committed meanwhile keeps it; rows
    /// being saved right now are skipped (a later call gets them).
    pub fn purge_expired(&self, cutoffs: &Cutoffs, batch: usize) -> Result<usize> {
        let [now, idle, life] = cutoff_params(cutoffs);
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let rows = self.pool.get()?.query(
            "purge_expired",
            &self.sql.purge_expired,
            &[&now, &idle, &life, &limit],
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
        .and_then(|r| r.try_get::<_, i64>(0).ok())
        .map_or(0, |n| usize::try_from(n).unwrap_or(0))
}

impl Store for PgStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, false, true)
    }

    fn load(&self, id: &SessionId, max_size: usize) -> Result<Option<StoredSession>> {
        let limit_bytes = max_size.min(self.max_record_size);
        let limit = i32::try_from(limit_bytes).unwrap_or(i32::MAX);
        let rows = self
            .pool
            .get()?
            .query("load", &self.sql.load, &[&id.as_str(), &limit])?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let meta = meta_from(row)?;
        // Larger than the limit: the server sent the size, not the bytes.
        let Some(bytes) = col::<Option<Vec<u8>>>(row, 7)? else {
            return Err(Error::TooLarge {
                size: usize::try_from(meta.size).unwrap_or(usize::MAX),
                limit: limit_bytes,
            });
        };
        Ok(Some(StoredSession { meta, bytes }))
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        let size = self.check_size(new.bytes.len())?;
        let m = &new.meta;
        let version = version_param(m.version)?;
        let (kind, value) = expiry_params(m.expiry);
        let (created, la) = (ms(m.created), ms(m.last_accessed));
        let mut conn = self.pool.get()?;
        let written = match expected {
            None => conn
                .query(
                    "save",
                    &self.sql.create,
                    &[
                        &id.as_str(),
                        &version,
                        &created,
                        &kind,
                        &value,
                        &size,
                        &new.bytes,
                        &la,
                    ],
                )
                .map(|rows| rows.len() == 1),
            Some(exp) => {
                let exp = version_param(exp)?;
                conn.query(
                    "save",
                    &self.sql.update,
                    &[
                        &id.as_str(),
                        &exp,
                        &version,
                        &created,
                        &kind,
                        &value,
                        &size,
                        &new.bytes,
                        &la,
                    ],
                )
                .map(|rows| count(&rows) == 1)
            }
        };
        match written {
            Ok(w) => Ok(w),
            Err(f) if f.certainly_not_applied() => Err(f.into()),
            Err(f) => Err(Error::OutcomeUnknown(format!(
                "the connection failed while the save was in flight: {}",
                Error::from(f)
            ))),
        }
    }

    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        let rows = self
            .pool
            .get()?
            .query("meta", &self.sql.meta, &[&id.as_str()])?;
        rows.first().map(meta_from).transpose()
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> Result<Touch> {
        let write_below = at.saturating_sub(coalesce);
        let [now, idle, life] = cutoff_params(cutoffs);
        let rows = self.pool.get()?.query(
            "touch",
            &self.sql.touch,
            &[&id.as_str(), &ms(at), &ms(write_below), &now, &idle, &life],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| Error::Backend("touch: no result row".into()))?;
        let stored: Option<i64> = col(row, 0)?;
        let expired: Option<bool> = col(row, 1)?;
        let written: i64 = col(row, 2)?;
        Ok(match stored {
            _ if written == 1 => Touch::Written,
            None => Touch::Missing,
            Some(la) if ts(la) >= write_below => Touch::Skipped,
            Some(_) if expired == Some(true) => Touch::Expired,
            // The snapshot said "write" but the row changed before the update reached it (a
            // concurrent touch, save or delete): say what happened from its newest state.
            Some(_) => match self.meta(id)? {
                None => Touch::Missing,
                Some(m) if m.last_accessed >= write_below => Touch::Skipped,
                Some(m) if cutoffs.meta_expired(&m) => Touch::Expired,
                Some(_) => Touch::Skipped,
            },
        })
    }

    fn last_accessed(&self, id: &SessionId) -> Result<Option<Timestamp>> {
        let rows =
            self.pool
                .get()?
                .query("last_accessed", &self.sql.last_accessed, &[&id.as_str()])?;
        rows.first().map(|r| col(r, 0).map(ts)).transpose()
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        let rows = self
            .pool
            .get()?
            .query("delete", &self.sql.delete, &[&id.as_str()])?;
        Ok(count(&rows) == 1)
    }

    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool> {
        let [now, idle, life] = cutoff_params(cutoffs);
        let rows = self.pool.get()?.query(
            "remove_expired",
            &self.sql.remove_expired,
            &[&id.as_str(), &now, &idle, &life],
        )?;
        Ok(count(&rows) == 1)
    }

    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> Result<ExpiredScan> {
        let [now, idle, life] = cutoff_params(cutoffs);
        let mut cursor = self.scan_cursor.lock();
        let after = cursor.clone().unwrap_or_default();
        let limit = i64::try_from(budget).unwrap_or(i64::MAX);
        let rows = self.pool.get()?.query(
            "scan_expired",
            &self.sql.scan_expired,
            &[&after, &now, &idle, &life, &limit],
        )?;
        let mut scan = ExpiredScan {
            examined: rows.len(),
            more: rows.len() == budget && budget > 0,
            ..ExpiredScan::default()
        };
        for row in &rows {
            let id: &str = col(row, 0)?;
            match SessionId::parse(id) {
                Ok(sid) if !col::<bool>(row, 1)? => scan.corrupt.push(sid),
                Ok(sid) if col::<bool>(row, 2)? => scan.expired.push(sid),
                Ok(_) => {}
                // A row no session ID names was written by something else: not ours to delete.
                Err(_) => scan.unreadable += 1,
            }
        }
        *cursor = match rows.last() {
            Some(r) if scan.more => Some(col::<String>(r, 0)?),
            // A full pass: the next one starts from the beginning.
            _ => None,
        };
        Ok(scan)
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
        assert_eq!(dur_ms(Duration::MAX), i64::MAX);
    }
}
