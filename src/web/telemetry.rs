//! Counters, the keyed hash that names a session in traces, and the concurrent-reader gauge.
//!
//! Owns: [`WebStats`] and how it is counted. May not touch: sessions, the store, the lock table.
//! A raw session ID is a bearer secret and never leaves this module's callers: traces carry
//! [`SidHasher::tag`], a keyed hash whose key is random per layer.

use parking_lot::Mutex;
use siphasher::sip::SipHasher13;
use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::session::SessionId;

/// Counters of one [`SessionLayer`](super::SessionLayer) (all its clones), since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WebStats {
    /// Requests that went through the layer.
    pub requests: u64,
    /// Requests that looked at their session at all (the others did no store I/O and took no
    /// lock).
    pub sessions_used: u64,
    /// Sessions loaded (optimistic, exclusive or read-only), from the store or from the
    /// manager's cache of decoded sessions.
    pub loads: u64,
    /// New sessions stored (at the end of the first request that wrote something).
    pub created: u64,
    /// End-of-request commits that wrote data.
    pub commits: u64,
    /// End-of-request commits refused with a conflict (or because the session vanished),
    /// answered with the conflict status.
    pub conflicts: u64,
    /// Re-runs of `transact` closures after a conflict.
    pub transact_retries: u64,
    /// Lock waits that passed the timeout (answered 503).
    pub timeouts: u64,
    /// Access-time writes (touches) issued at the end of read-only requests.
    pub touches: u64,
    /// Read-only request ends whose touch was coalesced away without any I/O.
    pub touches_skipped: u64,
    /// Presented cookies that did not verify or did not name a live session.
    pub cookies_rejected: u64,
    /// Sessions moved to a fresh ID.
    pub cycled: u64,
    /// Sessions invalidated.
    pub invalidated: u64,
    /// Garbage-collection passes run by [`SessionLayer::spawn_gc`](super::SessionLayer::spawn_gc).
    pub gc_runs: u64,
    /// Sessions deleted by those passes.
    pub gc_deleted: u64,
    /// Most requests of one session that had it loaded at the same moment (needs
    /// [`WebConfig::track_readers`](super::WebConfig::track_readers)).
    pub max_concurrent_readers: u64,
    /// Most store updates (data writes and touches) that one request caused.
    pub max_writes_per_request: u64,
    /// Jobs handed to tokio's blocking pool (loads the session cache could not answer,
    /// commits, due touches, lock waits, cleanups). A read of a cached session whose touch is
    /// coalesced away hands off nothing.
    pub blocking_tasks: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub sessions_used: AtomicU64,
    pub loads: AtomicU64,
    pub created: AtomicU64,
    pub commits: AtomicU64,
    pub conflicts: AtomicU64,
    pub transact_retries: AtomicU64,
    pub timeouts: AtomicU64,
    pub touches: AtomicU64,
    pub touches_skipped: AtomicU64,
    pub cookies_rejected: AtomicU64,
    pub cycled: AtomicU64,
    pub invalidated: AtomicU64,
    pub gc_runs: AtomicU64,
    pub gc_deleted: AtomicU64,
    pub max_concurrent_readers: AtomicU64,
    pub max_writes_per_request: AtomicU64,
    pub blocking_tasks: AtomicU64,
}

/// Relaxed everywhere: the counters are statistics, read without ordering against anything.
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> WebStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WebStats {
            requests: g(&self.requests),
            sessions_used: g(&self.sessions_used),
            loads: g(&self.loads),
            created: g(&self.created),
            commits: g(&self.commits),
            conflicts: g(&self.conflicts),
            transact_retries: g(&self.transact_retries),
            timeouts: g(&self.timeouts),
            touches: g(&self.touches),
            touches_skipped: g(&self.touches_skipped),
            cookies_rejected: g(&self.cookies_rejected),
            cycled: g(&self.cycled),
            invalidated: g(&self.invalidated),
            gc_runs: g(&self.gc_runs),
            gc_deleted: g(&self.gc_deleted),
            max_concurrent_readers: g(&self.max_concurrent_readers),
            max_writes_per_request: g(&self.max_writes_per_request),
            blocking_tasks: g(&self.blocking_tasks),
        }
    }
}

/// Names sessions in traces by a keyed hash (SipHash-1-3, random key per layer).
#[derive(Debug)]
pub(crate) struct SidHasher {
    k0: u64,
    k1: u64,
}

impl SidHasher {
    pub fn new() -> SidHasher {
        let mut key = [0u8; 16];
        // A failed random source leaves a zero key: traces then link across restarts, but no
        // raw ID is ever logged. Not worth failing the layer for.
        let _ = getrandom::fill(&mut key);
        let (a, b) = key.split_at(8);
        SidHasher {
            k0: u64::from_le_bytes(a.try_into().unwrap_or_default()),
            k1: u64::from_le_bytes(b.try_into().unwrap_or_default()),
        }
    }

    pub fn hash(&self, id: &SessionId) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(id.as_str().as_bytes());
        h.finish()
    }

    /// What traces show for a session: 16 hex digits of the keyed hash, computed only when
    /// a span or event is actually recorded. (A disabled span may still visit its fields, e.g.
    /// when some dependency enables `tracing`'s `log` feature and no subscriber is set: a
    /// field that hashed and formatted eagerly cost every request.)
    pub fn tag<'a>(&'a self, id: &'a SessionId) -> SidTag<'a> {
        SidTag { hasher: self, id }
    }
}

/// A session's name in traces; see [`SidHasher::tag`].
#[derive(Clone, Copy)]
pub(crate) struct SidTag<'a> {
    hasher: &'a SidHasher,
    id: &'a SessionId,
}

impl std::fmt::Display for SidTag<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.hasher.hash(self.id))
    }
}

/// How many requests of each session have it loaded right now (only when tracking is on).
#[derive(Debug, Default)]
pub(crate) struct ReaderGauge {
    live: Mutex<HashMap<u64, u64>>,
}

/// One request's place in the gauge; leaves it when dropped.
#[derive(Debug)]
pub(crate) struct ReaderToken {
    gauge: Arc<ReaderGauge>,
    key: u64,
}

impl ReaderGauge {
    pub fn enter(self: &Arc<Self>, key: u64, max: &AtomicU64) -> ReaderToken {
        let now = {
            let mut live = self.live.lock();
            let n = live.entry(key).or_insert(0);
            *n += 1;
            *n
        };
        max.fetch_max(now, Ordering::Relaxed);
        ReaderToken {
            gauge: Arc::clone(self),
            key,
        }
    }
}

impl Drop for ReaderToken {
    fn drop(&mut self) {
        let mut live = self.gauge.live.lock();
        if let Some(n) = live.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.key);
            }
        }
    }
}
