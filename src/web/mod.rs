//! Web sessions for axum and tower (feature `axum`): a [`SessionLayer`], extractors, cookies.
//!
//! Owns: the HTTP side of sessions — the cookie, when a request's session is loaded and
//! committed, how waits and conflicts become status codes, and the web counters. May not touch:
//! the session layer's rules (it calls [`SessionManager`]) or the lock table's internals.
//!
//! ```
//! use axum::{routing::post, Router};
//! use locktable::session::SessionManager;
//! use locktable::web::{CookieConfig, Key, LazySession, SessionLayer, WebError};
//!
//! async fn incr(s: LazySession) -> Result<String, WebError> {
//!     let n = s.transact(|s| {
//!         let n = s.get::<u64>("n")?.unwrap_or(0) + 1;
//!         s.insert("n", &n)?;
//!         Ok(n)
//!     }).await?;
//!     Ok(n.to_string())
//! }
//!
//! # fn main() -> locktable::Result<()> {
//! # let dir = tempfile::tempdir()?;
//! let mgr = SessionManager::open(dir.path())?;
//! let app: Router = Router::new()
//!     .route("/incr", post(incr))
//!     .layer(SessionLayer::new(mgr, CookieConfig::new(Key::generate()))?);
//! # Ok(()) }
//! ```
//!
//! # What a request costs
//! - Nothing, if the handler never reads or writes its session: no cookie check, no lock, no
//!   store I/O.
//! - A read-only request: one load (read lock held only while the record is read), and at most
//!   one access-time write per touch interval for the whole session (coalesced). Through a
//!   [`ReadOnlySession`], requests of one session that arrive together share one load, and a
//!   session in the manager's cache is read without a copy of its data.
//! - The cookie is verified (HMAC, or AEAD for private cookies) the first time the layer sees
//!   its value; the layer remembers a few thousand values that verified, so the next requests
//!   of that browser cost a keyed hash instead. Values that fail are never remembered.
//! - When a request sends several cookies of our name that verify (a stale one on a more
//!   specific `Path`, which browsers send first, beside the live one), the first whose session
//!   exists is used: a stale cookie never shadows the live session. Only such a request pays
//!   for more than one lookup. At most the first 8 values of our name are verified; later ones
//!   are ignored, so a request stuffed with them costs at most 8 checks.
//! - A writing request: one load and one commit of its delta at the end (see
//!   [`LazySession`]); a conflict with a concurrent request on the same key is answered with
//!   [`WebConfig::conflict_status`] (409), never a silent overwrite. Use
//!   [`LazySession::transact`] for read-modify-writes that retry instead.
//! - A handler that answers with a server error (5xx) stores none of its session changes.
//!   The layer sees only the response, so a request timeout must be placed **outside** the
//!   session layer (added after it with `.layer`), or answer with a 5xx: a timeout inside it that
//!   answers 408 would have the changes the cut handler made so far committed as if it had
//!   finished.
//! - A response that used the session gets `Vary: Cookie`; one that sets the cookie also gets
//!   `Cache-Control: no-store` unless the handler set a `Cache-Control` itself.
//! - The cookie lives as long as the session: its `Max-Age` and `Expires` are the session's end
//!   by the session's own expiry rule ([`LazySession::set_expiry`], e.g. `Expiry::Idle` of 30
//!   days for "remember me", or `Expiry::At`), re-sent whenever a write or a touch extends it.
//! - A visitor without a session who writes nothing causes no store write at all; a new
//!   session is stored, with its first data, in one write at the end of the request that wrote.
//!
//! # Waiting
//! Loads, commits, touches and lock waits run on tokio's blocking pool, never on a runtime
//! worker. The exception never blocks: a session that the manager's cache of decoded sessions
//! can answer ([`SessionManager::try_load_cached`](crate::session::SessionManager::try_load_cached):
//! no store I/O, no lock) is read inline, and a read-only request whose access-time write is
//! coalesced away ends inline, so a read of a hot session hands nothing to another thread
//! ([`WebStats::blocking_tasks`] counts the hand-offs). A load that waits for a lock longer than [`WebConfig::lock_timeout`] is answered
//! `503 Service Unavailable` with `Retry-After`. A request dropped while it waits (the client
//! went away) never keeps a lock: the abandoned load is released as soon as it completes.
//! Commits are not cut short by the layer (a commit abandoned by the layer could still land
//! after the client was told it failed); they wait as long as the manager waits.
//!
//! # Observability
//! `tracing` spans `session.load` (which includes the wait for the session's lock),
//! `session.commit`, `session.touch`, `session.transact`, `session.create` and `session.cycle`
//! name the session by a keyed hash (`sid`, random key per layer), never by its ID;
//! [`crate::asynclock`] adds `lock_wait` spans. [`SessionLayer::stats`] gives the counters
//! ([`WebStats`]): conflicts, transaction retries, timeouts, touches, gc runs and more.

mod cookies;
mod extract;
mod handle;
mod layer;
mod telemetry;

pub use cookie::{Key, SameSite};
pub use cookies::{CookieConfig, Protection};
pub use extract::{ExclusiveSession, LazySession, ReadOnlySession};
pub use handle::SessionTxn;
pub use layer::{SessionLayer, SessionService};
pub use telemetry::WebStats;

use crate::session::SessionManager;
use crate::Error;
use axum_core::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use std::sync::Arc;
use std::time::Duration;

/// Settings of a [`SessionLayer`] beyond the cookie.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Longest wait for a session's lock when loading it; past it the request gets 503.
    /// Default 5 s.
    pub lock_timeout: Duration,
    /// The `Retry-After` of a 503 (rounded up to whole seconds). Default 1 s.
    pub retry_after: Duration,
    /// Status of a request whose end-of-request commit conflicted with another request (or
    /// whose session vanished meanwhile): nothing of it was written. Default 409 Conflict.
    pub conflict_status: StatusCode,
    /// Count how many requests of one session have it loaded at once
    /// ([`WebStats::max_concurrent_readers`]); costs a short mutex per load. Default off.
    pub track_readers: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            lock_timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(1),
            conflict_status: StatusCode::CONFLICT,
            track_readers: false,
        }
    }
}

/// Everything a layer's requests share.
#[derive(Debug)]
pub(crate) struct Shared {
    mgr: SessionManager,
    cookies: cookies::CookieCodec,
    cfg: WebConfig,
    stats: telemetry::Counters,
    hasher: telemetry::SidHasher,
    readers: Option<Arc<telemetry::ReaderGauge>>,
    flights: handle::Flights,
}

impl Shared {
    fn new(mgr: SessionManager, cookies: CookieConfig, cfg: WebConfig) -> Shared {
        Shared {
            readers: cfg
                .track_readers
                .then(|| Arc::new(telemetry::ReaderGauge::default())),
            mgr,
            cookies: cookies::CookieCodec::new(cookies),
            cfg,
            stats: telemetry::Counters::default(),
            hasher: telemetry::SidHasher::new(),
            flights: Default::default(),
        }
    }
}

/// A session error as an HTTP answer: 503 + `Retry-After` for a lock wait past the timeout,
/// the conflict status (409) for a conflict or a vanished session, 500 for everything else
/// (without details: they stay in the logs).
#[derive(Debug)]
pub struct WebError {
    error: Error,
    status: StatusCode,
    retry_after: Option<u64>,
}

impl WebError {
    fn new(error: Error, cfg: &WebConfig) -> WebError {
        let (status, retry_after) = match &error {
            Error::Timeout => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(cfg.retry_after.as_secs_f64().ceil().max(1.0) as u64),
            ),
            Error::Conflict { .. } | Error::SessionGone => (cfg.conflict_status, None),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        WebError {
            error,
            status,
            retry_after,
        }
    }

    fn missing_layer() -> WebError {
        WebError {
            error: Error::Io(std::io::Error::other(
                "no SessionLayer: add `.layer(SessionLayer::new(..)?)` to the router",
            )),
            status: StatusCode::INTERNAL_SERVER_ERROR,
            retry_after: None,
        }
    }

    /// The underlying error.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// True for a conflict or a session that vanished before the commit.
    pub fn is_conflict(&self) -> bool {
        matches!(self.error, Error::Conflict { .. } | Error::SessionGone)
    }
}

impl std::fmt::Display for WebError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.error)
    }
}

impl std::error::Error for WebError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() && self.retry_after.is_none() {
            tracing::error!(error = %self.error, "session error");
        }
        let body = match self.status {
            StatusCode::SERVICE_UNAVAILABLE => "session busy, retry later\n",
            s if s.is_server_error() => "session error\n",
            _ => "conflict: the session changed meanwhile, nothing was saved\n",
        };
        let mut resp = (self.status, body).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
