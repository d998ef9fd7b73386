//! loom models of the lookup cache's seqlock entries (`locktable::lookup_cache`).
//!
//! The property: **a probe's hit is a hint that one fill stored for that very ID** (never one
//! fill's ID with another fill's slot, generation or tag), while fills of other IDs overwrite the
//! same entry and other fills race for it. The acquisition's own checks (generation and tag after
//! the announcement, the `main.rs` models) make a stale hint harmless, but they cannot catch a
//! hint that carries another ID's tag: that ID's lock would be taken. The IDs are 40 bytes, so
//! the entry's head line and its tail are both in play.

use loom::sync::Arc;
use loom::thread;

use locktable::lookup_cache::{Hint, LookupCache, Probe};

const A: &[u8; 40] = b"session-aaaaaaaa-0000000000000000-aaaaaa";
const B: &[u8; 40] = b"session-bbbbbbbb-1111111111111111-bbbbbb";
/// One-word IDs for the model with three threads (fewer stores per fill, so it stays fast).
const SHORT_A: &[u8] = b"sess-a";
const SHORT_B: &[u8] = b"sess-b";

fn hint(n: u32) -> Hint {
    Hint {
        slot: n,
        gen: n + 1,
        tag: [u64::from(n) * 3, u64::from(n) * 7],
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b.check(f);
}

/// What a probe of `id` may return: a miss, or exactly one of `allowed`.
fn probe_is_one_of(cache: &LookupCache, id: &[u8], allowed: &[Hint]) {
    if let Probe::Hit(h) = cache.probe(id) {
        assert!(
            allowed.contains(&h),
            "{:?} got {h:?}",
            String::from_utf8_lossy(id)
        );
    }
}

/// One thread fills `A`, then overwrites the same way with `B`, while another probes both: every
/// hit is the probed ID's own hint, never a mix of the two fills.
#[test]
fn a_probe_racing_an_overwrite_never_mixes_two_ids() {
    model(|| {
        // One set: both IDs share it.
        let cache = Arc::new(LookupCache::new(1, 7));
        let key = cache.key(A).expect("cacheable");
        let filler = {
            let cache = cache.clone();
            thread::spawn(move || {
                cache.put(&key, A, hint(1));
                // The same way, another ID: what a refill of a full set does.
                cache.put(&key, B, hint(2));
            })
        };
        probe_is_one_of(&cache, A, &[hint(1)]);
        probe_is_one_of(&cache, B, &[hint(2)]);
        filler.join().unwrap();
        // Once the fills are over, B is there (the only fill of its way that could be skipped is
        // one racing another fill, and here they are in one thread).
        assert!(matches!(cache.probe(B), Probe::Hit(h) if h == hint(2)));
        probe_is_one_of(&cache, A, &[]);
    });
}

/// Two threads fill the same way with different IDs at once (one may be skipped: it lost the
/// entry to the other; short IDs, since three threads make the model large) while a third probes: hits are exact, and the entry ends up holding one
/// whole fill.
#[test]
fn racing_fills_of_one_way_leave_one_whole_fill() {
    model(|| {
        // One set: both IDs share it.
        let cache = Arc::new(LookupCache::new(1, 7));
        let key = cache.key(SHORT_A).expect("cacheable");
        let fillers: Vec<_> = [(SHORT_A, 1), (SHORT_B, 2)]
            .into_iter()
            .map(|(id, n)| {
                let cache = cache.clone();
                thread::spawn(move || cache.put(&key, id, hint(n)))
            })
            .collect();
        probe_is_one_of(&cache, SHORT_A, &[hint(1)]);
        probe_is_one_of(&cache, SHORT_B, &[hint(2)]);
        for f in fillers {
            f.join().unwrap();
        }
        let a = matches!(cache.probe(SHORT_A), Probe::Hit(h) if h == hint(1));
        let b = matches!(cache.probe(SHORT_B), Probe::Hit(h) if h == hint(2));
        assert!(
            a || b,
            "both fills were lost: {:?} {:?}",
            cache.probe(SHORT_A),
            cache.probe(SHORT_B)
        );
        assert!(!(a && b), "one way holds two IDs");
    });
}
