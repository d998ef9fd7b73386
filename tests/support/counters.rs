//! The counting workload of the multi-process session tests: writer processes each add one to a
//! counter of their own (`p<k>`) and to a `shared` one in every `transact`, reader processes load
//! the session meanwhile, and the parent checks that every increment landed exactly once.

use locktable::session::{Session, SessionManager};
use std::path::Path;

/// A new, empty session kept although empty (`persist`), for the counters to go into; its ID.
pub fn empty_session(mgr: &SessionManager) -> String {
    let mut s = mgr.create().unwrap();
    s.persist();
    let id = s.id().to_string();
    s.commit().unwrap();
    id
}

/// One increment of writer `own`: its own counter and the shared one, in one transaction.
pub fn add_one(s: &mut Session, own: &str) -> locktable::Result<()> {
    let a = s.get::<u64>(own)?.unwrap_or(0);
    s.insert(own.to_owned(), &(a + 1))?;
    let b = s.get::<u64>("shared")?.unwrap_or(0);
    s.insert("shared", &(b + 1))
}

/// Child role `writer:<k>`: `increments` transactions of [`add_one`] on `p<k>`.
pub fn write_counts(mgr: &SessionManager, id: &str, k: &str, increments: u64) {
    let own = format!("p{k}");
    for _ in 0..increments {
        let done = mgr.transact(id, |s| add_one(s, &own)).unwrap();
        assert!(done.is_some(), "session vanished");
    }
}

/// Child role `reader`: loads the session until `dir/stop` exists; the shared counter never
/// goes backwards.
pub fn read_counts_until_stop(mgr: &SessionManager, id: &str, dir: &Path) {
    let mut last = 0u64;
    while !dir.join("stop").exists() {
        let s = mgr.load(id).unwrap().expect("session exists");
        let now = s.get::<u64>("shared").unwrap().unwrap_or(0);
        assert!(now >= last, "shared counter went backwards");
        last = now;
        s.commit().unwrap();
    }
}

/// Each of `writers` counters is `increments`, and the shared one their sum: no update lost or
/// applied twice.
pub fn assert_counts(s: &Session, writers: usize, increments: u64) {
    for k in 0..writers {
        assert_eq!(s.get::<u64>(&format!("p{k}")).unwrap(), Some(increments));
    }
    assert_eq!(
        s.get::<u64>("shared").unwrap(),
        Some(increments * writers as u64),
        "lost or doubled updates"
    );
}
