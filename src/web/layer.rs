//! The tower middleware: gives every request a lazy session handle and ends it after the
//! handler.
//!
//! Owns: the request/response plumbing. May not touch: session state (see `handle.rs`).

use super::handle::SessionHandle;
use super::telemetry::bump;
use super::{CookieConfig, Shared, WebConfig, WebStats};
use crate::session::SessionManager;
use axum_core::body::Body;
use http::{header::COOKIE, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The session middleware: `Router::new().route(..).layer(SessionLayer::new(mgr, cookies)?)`.
///
/// Cheap to clone; clones share their counters.
#[derive(Debug, Clone)]
pub struct SessionLayer {
    shared: Arc<Shared>,
}

impl SessionLayer {
    /// A layer over `mgr` with the cookie `cookies` and the default [`WebConfig`].
    ///
    /// Fails with [`Error::InvalidOptions`](crate::Error::InvalidOptions) for cookie settings
    /// that no cookie could work with (a name that is not an RFC 6265 token, see
    /// [`CookieConfig::name`]): the layer would store sessions but could not hand them out.
    pub fn new(mgr: SessionManager, cookies: CookieConfig) -> crate::Result<SessionLayer> {
        SessionLayer::with_config(mgr, cookies, WebConfig::default())
    }

    /// A layer with explicit settings; fails as [`SessionLayer::new`] does.
    pub fn with_config(
        mgr: SessionManager,
        cookies: CookieConfig,
        cfg: WebConfig,
    ) -> crate::Result<SessionLayer> {
        cookies.check()?;
        Ok(SessionLayer {
            shared: Arc::new(Shared::new(mgr, cookies, cfg)),
        })
    }

    /// The session manager.
    pub fn manager(&self) -> &SessionManager {
        &self.shared.mgr
    }

    /// The counters.
    pub fn stats(&self) -> WebStats {
        self.shared.stats.snapshot()
    }

    /// Runs the manager's garbage collection every `every` on the blocking pool (counted in
    /// [`WebStats::gc_runs`] and [`WebStats::gc_deleted`]) until the task is aborted.
    pub fn spawn_gc(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let sh = Arc::clone(&shared);
                let _ = tokio::task::spawn_blocking(move || {
                    let _span = tracing::debug_span!("session.gc").entered();
                    loop {
                        match sh.mgr.gc() {
                            Ok(r) => {
                                bump(&sh.stats.gc_runs);
                                sh.stats.gc_deleted.fetch_add(
                                    r.deleted as u64,
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                                if !r.more {
                                    break;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "session gc failed");
                                break;
                            }
                        }
                    }
                })
                .await;
            }
        })
    }
}

impl<S> tower_layer::Layer<S> for SessionLayer {
    type Service = SessionService<S>;
    fn layer(&self, inner: S) -> SessionService<S> {
        SessionService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service made by [`SessionLayer`].
#[derive(Debug, Clone)]
pub struct SessionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> tower_service::Service<Request<B>> for SessionService<S>
where
    S: tower_service::Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        bump(&self.shared.stats.requests);
        // Only copied (reference-counted bytes), not parsed: verification waits for first use.
        let cookies = req.headers().get_all(COOKIE).iter().cloned().collect();
        let handle = SessionHandle::new(Arc::clone(&self.shared), cookies);
        req.extensions_mut().insert(handle.clone());
        // The clone that was made ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(handle.finish(resp).await)
        })
    }
}
