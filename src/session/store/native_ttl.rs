//! Native time-to-live of the server stores (Redis, memcached): how long the server keeps a
//! session before dropping it by itself.
//!
//! Owns: the rule that turns a session's metadata into a server TTL, and the text form of an
//! expiry rule in the servers' metadata (`d`, `i<ms>`, `a<ms>`, as in the record header). It
//! writes nothing. May not touch: any server (the stores send what it computes).
//!
//! The TTL is a backstop, never the judge: the manager decides expiry by the metadata
//! ([`Cutoffs`]), atomically with touches and deletes. The server may only drop a session the
//! manager would also find expired, so the TTL is the session's remaining life *plus a grace*
//! (default 60 s) and is never shorter than the grace: a clock difference between hosts, or a
//! request in flight, never loses a live session.
//!
//! A store learns the manager's rule ([`Cutoffs::idle_timeout`], [`Cutoffs::max_lifetime`]) from
//! every `touch`, `remove_expired` and `scan_expired` call, and starts from the one it was given
//! ([`TtlRule::new`], the `SessionConfig` defaults unless told otherwise). It only ever raises
//! it, so a TTL set from it is never too short for any manager that used the store.

use super::{Cutoffs, Expiry, SessionMeta, Timestamp};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The expiry rule a store assumes when it sets a TTL outside a touch (in `save`).
#[derive(Debug)]
pub(super) struct TtlRule {
    idle_ms: AtomicU64,
    max_life_ms: AtomicU64,
    grace: Duration,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl TtlRule {
    pub(super) fn new(idle_timeout: Duration, max_lifetime: Duration, grace: Duration) -> Self {
        TtlRule {
            idle_ms: AtomicU64::new(ms(idle_timeout)),
            max_life_ms: AtomicU64::new(ms(max_lifetime)),
            grace,
        }
    }

    /// The manager's rule (`idle_timeout`, `max_lifetime`) with this rule's grace.
    pub(super) fn of_config(&self, cfg: &crate::session::SessionConfig) -> TtlRule {
        TtlRule::new(cfg.idle_timeout, cfg.max_lifetime, self.grace)
    }

    /// This rule with another grace.
    pub(super) fn with_grace(&self, grace: Duration) -> TtlRule {
        let c = self.cutoffs(Timestamp(0));
        TtlRule::new(c.idle_timeout, c.max_lifetime, grace)
    }

    /// Raises the assumed rule to the manager's, if larger.
    pub(super) fn learn(&self, c: &Cutoffs) {
        // Relaxed: each value is an independent upper bound read on its own; no other memory
        // is published through it, and a racing reader that sees the old value only sets a
        // shorter TTL once (the next touch corrects it with the exact rule).
        self.idle_ms
            .fetch_max(ms(c.idle_timeout), Ordering::Relaxed);
        self.max_life_ms
            .fetch_max(ms(c.max_lifetime), Ordering::Relaxed);
    }

    /// The rule as cutoffs at `now`.
    pub(super) fn cutoffs(&self, now: Timestamp) -> Cutoffs {
        Cutoffs {
            now,
            // Relaxed: see `learn`.
            idle_timeout: Duration::from_millis(self.idle_ms.load(Ordering::Relaxed)),
            max_lifetime: Duration::from_millis(self.max_life_ms.load(Ordering::Relaxed)),
        }
    }

    /// The TTL of a session with metadata `m`, as seen at `now` under `c`: its remaining life
    /// plus the grace, at least the grace.
    pub(super) fn ttl(&self, m: &SessionMeta, c: &Cutoffs) -> Duration {
        let end = c.expires_at(m.created, m.last_accessed, m.expiry);
        Duration::from_millis(end.0.saturating_sub(c.now.0)).saturating_add(self.grace)
    }

    /// The TTL at a save: the rule this store assumes, "now" being the save's access time.
    pub(super) fn ttl_at_save(&self, m: &SessionMeta) -> Duration {
        self.ttl(m, &self.cutoffs(m.last_accessed))
    }

    /// The grace added to every TTL.
    pub(super) fn grace(&self) -> Duration {
        self.grace
    }
}

/// The text form of an expiry rule.
pub(super) fn expiry_text(e: Expiry) -> String {
    match e {
        Expiry::Default => "d".to_owned(),
        Expiry::Idle(d) => format!("i{}", ms(d)),
        Expiry::At(t) => format!("a{}", t.0),
    }
}

/// Parses [`expiry_text`]'s output.
pub(super) fn parse_expiry_text(s: &str) -> Option<Expiry> {
    let num = |r: &str| -> Option<u64> {
        (!r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            .then(|| r.parse().ok())
            .flatten()
    };
    match s.as_bytes().first()? {
        b'd' if s.len() == 1 => Some(Expiry::Default),
        b'i' => num(&s[1..]).map(|m| Expiry::Idle(Duration::from_millis(m))),
        b'a' => num(&s[1..]).map(|m| Expiry::At(Timestamp(m))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Expiry;

    fn meta(created: u64, la: u64, expiry: Expiry) -> SessionMeta {
        SessionMeta {
            version: 1,
            created: Timestamp(created),
            last_accessed: Timestamp(la),
            expiry,
            size: 1,
        }
    }

    #[test]
    fn the_ttl_is_the_remaining_life_plus_the_grace_and_never_less_than_the_grace() {
        let r = TtlRule::new(
            Duration::from_secs(100),
            Duration::from_secs(1000),
            Duration::from_secs(60),
        );
        let c = r.cutoffs(Timestamp(50_000));
        assert_eq!(
            r.ttl(&meta(0, 40_000, Expiry::Default), &c),
            Duration::from_secs(90 + 60)
        );
        // Past its end: the grace only.
        assert_eq!(
            r.ttl(&meta(0, 0, Expiry::At(Timestamp(1))), &c),
            Duration::from_secs(60)
        );
        // The lifetime caps an idle rule.
        assert_eq!(
            r.ttl(
                &meta(0, 999_000, Expiry::Idle(Duration::from_secs(500))),
                &r.cutoffs(Timestamp(999_000))
            ),
            Duration::from_secs(1 + 60)
        );
    }

    #[test]
    fn expiry_text_round_trips_and_refuses_junk() {
        for e in [
            Expiry::Default,
            Expiry::Idle(Duration::from_millis(7)),
            Expiry::At(Timestamp(u64::MAX)),
        ] {
            assert_eq!(parse_expiry_text(&expiry_text(e)), Some(e));
        }
        for junk in ["", "x", "dd", "i", "a-1", "i1x", "a99999999999999999999999"] {
            assert_eq!(parse_expiry_text(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn the_rule_is_only_ever_raised() {
        let r = TtlRule::new(
            Duration::from_secs(100),
            Duration::from_secs(1000),
            Duration::ZERO,
        );
        r.learn(&Cutoffs {
            now: Timestamp(0),
            idle_timeout: Duration::from_secs(500),
            max_lifetime: Duration::from_secs(10),
        });
        let c = r.cutoffs(Timestamp(0));
        assert_eq!(c.idle_timeout, Duration::from_secs(500));
        assert_eq!(c.max_lifetime, Duration::from_secs(1000));
    }
}
