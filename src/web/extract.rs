//! The axum extractors: three views of the request's one session.
//!
//! Owns: what each view allows. May not touch: state transitions (see `handle.rs`).

use super::handle::{SessionHandle, SessionTxn};
use super::WebError;
use crate::session::Expiry;
use axum_core::extract::FromRequestParts;
use http::request::Parts;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::ops::Deref;

fn handle(parts: &Parts) -> Result<SessionHandle, WebError> {
    parts
        .extensions
        .get::<SessionHandle>()
        .cloned()
        .ok_or_else(WebError::missing_layer)
}

/// The request's session, optimistic and lazy: loaded at the first read or write, changes
/// committed once at the end of the request as one delta (only the keys this request set or
/// removed), or else the access recorded (coalesced). Extracting it costs nothing.
///
/// If another request changed one of the same keys since this one loaded, the end-of-request
/// commit writes nothing and the response becomes [`WebConfig::conflict_status`]
/// (409 by default). Use [`transact`](Self::transact) to retry instead.
///
/// [`WebConfig::conflict_status`]: super::WebConfig::conflict_status
#[derive(Debug, Clone)]
pub struct LazySession(SessionHandle);

impl LazySession {
    /// Reads a value (`None` when absent or when there is no session).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, WebError> {
        self.0.get(key, false).await
    }

    /// The keys present.
    pub async fn keys(&self) -> Result<Vec<String>, WebError> {
        self.0.keys(false).await
    }

    /// Sets a value, committed at the end of the request. A visitor without a session gets one,
    /// stored (with this data) at the end of the request.
    pub async fn insert<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), WebError> {
        self.0.insert(key, value).await
    }

    /// Removes a key at the end of the request; returns whether it was present.
    pub async fn remove(&self, key: &str) -> Result<bool, WebError> {
        self.0.remove(key).await
    }

    /// Sets the session's expiry rule, committed at the end of the request (see
    /// [`Session::set_expiry`](crate::session::Session::set_expiry)): e.g.
    /// `Expiry::Idle(30 days)` for "remember me". The cookie's `Max-Age` and `Expires` follow
    /// the session's rule. A visitor without a session gets one only if the request also
    /// stores data.
    pub async fn set_expiry(&self, e: Expiry) -> Result<(), WebError> {
        self.0.set_expiry(e).await
    }

    /// A read-modify-write committed now, retried on fresh data after a conflict (see
    /// [`SessionManager::transact`](crate::session::SessionManager::transact)); `f` may run
    /// several times. In an [`ExclusiveSession`] it runs once on the held session and is
    /// committed with the request. Without a session, it runs on the new session's draft.
    pub async fn transact<R, F>(&self, f: F) -> Result<R, WebError>
    where
        F: FnMut(&mut SessionTxn<'_>) -> crate::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.0.transact(f).await
    }

    /// Moves the session to a fresh ID now (call it at login) and re-issues the cookie. The move
    /// is stored at once, so the cookie is re-issued even if the handler then fails (5xx) and
    /// its other changes are dropped.
    pub async fn cycle_id(&self) -> Result<(), WebError> {
        self.0.cycle_id().await
    }

    /// Deletes the session now and clears the cookie at the end of the request. If the delete
    /// fails (e.g. 503 after a lock wait), the cookie is kept so that the client can retry.
    /// A request that sent several valid cookies of ours (stale ones on other paths) ends the
    /// sessions of all of them, so that none takes over on the next request.
    pub async fn invalidate(&self) -> Result<(), WebError> {
        self.0.invalidate().await
    }
}

impl<S: Send + Sync> FromRequestParts<S> for LazySession {
    type Rejection = WebError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, WebError> {
        handle(parts).map(LazySession)
    }
}

/// The request's session, loaded during extraction with its upgradable lock, which is held
/// until the end of the request: other exclusive requests and all commits of this session wait,
/// plain reads go on. Its read-modify-writes cannot conflict. Offers every method of
/// [`LazySession`] (through `Deref`).
///
/// A lock wait longer than [`WebConfig::lock_timeout`](super::WebConfig::lock_timeout) rejects
/// the request with 503 and `Retry-After`.
#[derive(Debug, Clone)]
pub struct ExclusiveSession(LazySession);

impl Deref for ExclusiveSession {
    type Target = LazySession;
    fn deref(&self) -> &LazySession {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ExclusiveSession {
    type Rejection = WebError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, WebError> {
        let h = handle(parts)?;
        h.load_exclusive().await?;
        Ok(ExclusiveSession(LazySession(h)))
    }
}

/// A read-only view of the request's session: it has no method that writes, so a handler that
/// takes it can never change session data. Its end only records the access (coalesced).
///
/// Its load is shared: requests of one session that arrive while a read-only load of it is
/// still queued (not yet reading) get that load's snapshot instead of loading again, so a page
/// whose many requests read one session at once costs a few loads. Each request still sees
/// every commit that finished before it arrived. If the same request later writes through a
/// [`LazySession`], it is refused with the conflict status when the session changed since
/// its snapshot.
#[derive(Debug, Clone)]
pub struct ReadOnlySession(SessionHandle);

impl ReadOnlySession {
    /// Reads a value (`None` when absent or when there is no session).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, WebError> {
        self.0.get(key, true).await
    }

    /// The keys present.
    pub async fn keys(&self) -> Result<Vec<String>, WebError> {
        self.0.keys(true).await
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ReadOnlySession {
    type Rejection = WebError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, WebError> {
        handle(parts).map(ReadOnlySession)
    }
}
