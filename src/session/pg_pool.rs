//! [`PgPool`]: the connections that [`super::PgStore`] and [`super::PgLocks`] share, and the
//! mapping of PostgreSQL failures to [`Error`].
//!
//! Owns: opening, caching and discarding connections, and their prepared statements. It may not
//! interpret session data or lock keys: callers pass it SQL and parameters.
//!
//! Why a pool of our own (about a hundred lines) rather than `r2d2_postgres`: a checked-out
//! connection must cost no round trip (r2d2 tests connections on checkout by default, and a load
//! must be one round trip), a connection that may still hold advisory locks must be closed rather
//! than reused (r2d2 cannot detach one), and one dead connection must flush all the idle ones
//! (after a server restart every one of them is dead). Statements are prepared once per
//! connection and cached, so each later call is a single round trip.
//!
//! The `postgres` client is synchronous and drives its own small runtime: never call into this
//! module from an async runtime's worker thread (use `spawn_blocking`).

use crate::{Error, Result};
use parking_lot::{Condvar, Mutex};
use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default number of connections a pool opens at most.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// A bounded pool of connections to one PostgreSQL database; cheap to clone.
///
/// Give the store and the locks a pool each: a lock guard keeps its connection until it is
/// dropped, and the store calls made meanwhile must not wait for it. Connections must not be used
/// across `fork()`: a child opens its own pool.
///
/// ```no_run
/// use locktable::session::{
///     PgLocks, PgPool, PgPoolOptions, PgStore, PgStoreOptions, SessionConfig, SessionManager,
/// };
/// let url = "postgres://app@db.internal/app";
/// let store = PgStore::with_pool(PgPool::connect(url).unwrap(), PgStoreOptions::default()).unwrap();
/// let lock_pool = PgPool::connect_with(
///     url,
///     PgPoolOptions { max_connections: 64, ..PgPoolOptions::default() },
/// )
/// .unwrap();
/// let locks = PgLocks::with_pool(lock_pool, store.lock_secret());
/// let mgr = SessionManager::with_pg(store, locks, SessionConfig::default());
/// # let _ = mgr;
/// ```
#[derive(Clone)]
pub struct PgPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: postgres::Config,
    max: usize,
    checkout_timeout: Duration,
    state: Mutex<PoolState>,
    freed: Condvar,
}

#[derive(Default)]
struct PoolState {
    /// Boxed so that checking one out or in moves a pointer, and guards stay small.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<Conn>>,
    /// Connections open, idle or checked out.
    open: usize,
    /// Bumped when a connection is found dead: older connections are not reused.
    generation: u64,
}

struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
    generation: u64,
}

impl fmt::Debug for PgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.lock();
        // The configuration holds the password: print only the shape of the pool.
        f.debug_struct("PgPool")
            .field("max", &self.inner.max)
            .field("open", &st.open)
            .field("idle", &st.idle.len())
            .finish()
    }
}

/// Settings of a [`PgPool`].
#[derive(Debug, Clone)]
pub struct PgPoolOptions {
    /// Most connections open at once (idle or in use). Each exclusive session holds one for its
    /// whole request. Default [`DEFAULT_POOL_SIZE`].
    pub max_connections: usize,
    /// How long a caller waits for a free connection before [`Error::Backend`]. Default 30 s.
    pub checkout_timeout: Duration,
}

impl Default for PgPoolOptions {
    fn default() -> Self {
        PgPoolOptions {
            max_connections: DEFAULT_POOL_SIZE,
            checkout_timeout: Duration::from_secs(30),
        }
    }
}

impl PgPool {
    /// A pool for the database at `url` (a `postgres://` URL or a `key=value` string) with the
    /// default [`PgPoolOptions`]. Connects once to check the URL.
    pub fn connect(url: &str) -> Result<PgPool> {
        Self::connect_with(url, PgPoolOptions::default())
    }

    /// Like [`PgPool::connect`] with explicit options.
    pub fn connect_with(url: &str, opts: PgPoolOptions) -> Result<PgPool> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|_| Error::InvalidOptions("unparsable PostgreSQL connection URL".into()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("locktable");
        }
        apply_liveness_defaults(&mut config);
        let pool = PgPool {
            inner: Arc::new(PoolInner {
                config,
                max: opts.max_connections.max(1),
                checkout_timeout: opts.checkout_timeout,
                state: Mutex::new(PoolState::default()),
                freed: Condvar::new(),
            }),
        };
        drop(pool.get()?);
        Ok(pool)
    }

    /// Connections open now (idle or in use).
    pub fn open_connections(&self) -> usize {
        self.inner.state.lock().open
    }

    /// A connection for one operation (returned to the pool when dropped).
    pub(crate) fn get(&self) -> Result<PooledConn> {
        self.get_until(None)
    }

    /// [`PgPool::get`] waiting for a free connection until `until` at the latest (then
    /// [`Error::Timeout`]), and never longer than the pool's checkout timeout (then
    /// [`Error::Backend`]).
    pub(crate) fn get_until(&self, until: Option<Instant>) -> Result<PooledConn> {
        let now = Instant::now();
        // A timeout too long to represent waits a century (as good as forever, without a panic).
        let pool_deadline = now
            .checked_add(self.inner.checkout_timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let (deadline, caller_first) = match until {
            Some(u) if u < pool_deadline => (u, true),
            _ => (pool_deadline, false),
        };
        let mut st = self.inner.state.lock();
        loop {
            while let Some(c) = st.idle.pop() {
                if c.generation == st.generation && !c.client.is_closed() {
                    return Ok(self.wrap(c));
                }
                st.open -= 1;
                // Closing talks to the server: not under the pool's mutex.
                drop(st);
                drop(c);
                st = self.inner.state.lock();
            }
            if st.open < self.inner.max {
                st.open += 1;
                let generation = st.generation;
                drop(st);
                return match self.inner.config.connect(NoTls) {
                    Ok(client) => Ok(self.wrap(Box::new(Conn {
                        client,
                        statements: HashMap::new(),
                        generation,
                    }))),
                    Err(e) => {
                        self.release_slot();
                        Err(backend_error("connect", &e))
                    }
                };
            }
            if self.inner.freed.wait_until(&mut st, deadline).timed_out() {
                if caller_first {
                    return Err(Error::Timeout);
                }
                return Err(Error::Backend(format!(
                    "no free connection within {:?} (pool of {})",
                    self.inner.checkout_timeout, self.inner.max
                )));
            }
        }
    }

    fn wrap(&self, c: Box<Conn>) -> PooledConn {
        PooledConn {
            pool: Arc::clone(&self.inner),
            conn: Some(c),
            keep: true,
        }
    }

    fn release_slot(&self) {
        self.inner.state.lock().open -= 1;
        self.inner.freed.notify_one();
    }
}

/// Defaults that bound how long a dead peer goes unnoticed, where the URL sets nothing itself:
/// - client side, TCP keepalives after 30 s idle (every 10 s, 3 probes) and a 30 s
///   `tcp_user_timeout`, so a call on a connection whose network died fails instead of hanging;
/// - server side (startup `options`), the same keepalives, so the server ends the session of a
///   client whose network died, and releases its advisory locks, within about a minute instead of
///   the system default of two hours.
///
/// A server that is alive but stopped (its kernel still answers TCP) is not detected by either:
/// the call waits. Set `statement_timeout` in the URL's `options` to bound server-side waits.
fn apply_liveness_defaults(config: &mut postgres::Config) {
    const IDLE: Duration = Duration::from_secs(30);
    if config.get_keepalives() && config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(IDLE);
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(Duration::from_secs(10));
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(3);
        }
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(IDLE);
    }
    if config.get_options().is_none() {
        config.options(
            "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3",
        );
    }
}

/// A connection checked out of a [`PgPool`]. Dropping it returns it, unless it failed or was
/// marked with [`PooledConn::discard`], in which case it is closed (and the server releases
/// everything it held, advisory locks included).
pub(crate) struct PooledConn {
    pool: Arc<PoolInner>,
    /// Boxed: guards that hold a connection stay small.
    conn: Option<Box<Conn>>,
    keep: bool,
}

impl PooledConn {
    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("present until drop")
    }

    /// Closes this connection instead of returning it to the pool.
    pub(crate) fn discard(&mut self) {
        self.keep = false;
    }

    /// Notes a failed call: a connection-level failure (not a statement's error) discards this
    /// connection and every idle one of the same generation.
    fn note_error(&mut self, e: &postgres::Error) {
        if is_statement_error(e) && !self.conn().client.is_closed() {
            return;
        }
        self.keep = false;
        let mut st = self.pool.state.lock();
        let generation = self.conn.as_ref().map_or(0, |c| c.generation);
        if generation == st.generation {
            st.generation += 1;
            let stale = std::mem::take(&mut st.idle);
            st.open -= stale.len();
            drop(st);
            drop(stale);
            self.pool.freed.notify_all();
        }
    }

    fn statement(&mut self, sql: &str) -> std::result::Result<Statement, postgres::Error> {
        let c = self.conn();
        if let Some(s) = c.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = c.client.prepare(sql)?;
        c.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Runs a cached prepared statement and returns its rows (one round trip once prepared).
    pub(crate) fn query(
        &mut self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Vec<Row>, PgFailure> {
        let r = self
            .statement(sql)
            .and_then(|s| self.conn().client.query(&s, params));
        r.map_err(|e| {
            // Prepared again next time: a statement can go stale (its tables were dropped and
            // created again, or their columns changed).
            self.conn().statements.remove(sql);
            self.note_error(&e);
            PgFailure::new(op, e)
        })
    }

    /// Runs statements with the simple protocol (no parameters; one round trip).
    pub(crate) fn batch(
        &mut self,
        op: &'static str,
        sql: &str,
    ) -> std::result::Result<(), PgFailure> {
        let r = self.conn().client.batch_execute(sql);
        r.map_err(|e| {
            self.note_error(&e);
            PgFailure::new(op, e)
        })
    }

    /// The underlying client, for a multi-statement transaction (schema migration).
    pub(crate) fn client(&mut self) -> &mut Client {
        &mut self.conn().client
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(c) = self.conn.take() else { return };
        let mut st = self.pool.state.lock();
        if self.keep && c.generation == st.generation && !c.client.is_closed() {
            st.idle.push(c);
        } else {
            st.open -= 1;
            drop(st);
            // Closing happens outside the pool's mutex (it talks to the server).
            drop(c);
        }
        self.pool.freed.notify_one();
    }
}

/// A failed PostgreSQL call: the operation, and the client's error kept for classification.
pub(crate) struct PgFailure {
    pub(crate) op: &'static str,
    pub(crate) error: postgres::Error,
}

impl PgFailure {
    fn new(op: &'static str, error: postgres::Error) -> PgFailure {
        PgFailure { op, error }
    }

    /// The SQLSTATE code, when the server answered with an error.
    pub(crate) fn code(&self) -> Option<&postgres::error::SqlState> {
        self.error.code()
    }

    /// True when the statement certainly did not take effect: the server answered with an
    /// ERROR, which rolls back the statement's implicit transaction and keeps the connection.
    ///
    /// Anything else leaves the outcome unknown: a dropped connection, and also a FATAL error
    /// (the server terminated the session, for example at shutdown), which can arrive after the
    /// commit but before the buffered reply was flushed. The converse holds for our small
    /// replies: the server buffers a statement's reply and flushes it with the ReadyForQuery
    /// that follows the commit at Sync, so a reply the client received means the commit
    /// happened.
    pub(crate) fn certainly_not_applied(&self) -> bool {
        is_statement_error(&self.error)
    }
}

/// An ERROR from the server: the statement failed, the session and connection live on. (A FATAL
/// or PANIC ends the session; anything else is a client-side or connection failure.)
fn is_statement_error(e: &postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.parsed_severity() == Some(postgres::error::Severity::Error))
}

impl From<PgFailure> for Error {
    fn from(f: PgFailure) -> Error {
        backend_error(f.op, &f.error)
    }
}

/// A typed error for a failed call. Server errors are reported by their SQLSTATE class and code
/// only: their message or detail may quote values (IDs, data), which must not reach logs.
pub(crate) fn backend_error(op: &str, e: &postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let class = match &code[..2] {
                "08" => "connection exception",
                "40" => "transaction rolled back",
                "53" => "insufficient resources",
                "54" => "program limit exceeded",
                "55" => "object not in prerequisite state",
                "57" => "operator intervention (server shutting down or query cancelled)",
                "58" => "system error",
                "42" => "schema mismatch or missing privilege",
                "XX" => "internal error",
                _ => "server error",
            };
            Error::Backend(format!("{op}: {class} (SQLSTATE {code})"))
        }
        // Client-side errors (closed connection, I/O, timeouts) carry no query data.
        None => Error::Backend(format!("{op}: {e}")),
    }
}
