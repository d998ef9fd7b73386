//! Helpers shared by the benchmarks: each file under `benches/` is a crate of its own and takes
//! this module with `mod support;`. Set-up only; what a benchmark measures stays in it.

// Each bench uses only a part of this module; the rest would be reported as dead code.
#![allow(dead_code)]

use locktable::session::SessionManager;
use serde_json::Value;

/// The store wrapper of the tests (`tests/support/spy_store.rs`), to count store calls.
#[path = "../../tests/support/spy_store.rs"]
pub mod spy_store;

/// Creates a session holding `data`; returns its ID.
pub fn create_session(mgr: &SessionManager, data: Vec<(&str, Value)>) -> String {
    let mut s = mgr.create().expect("create session");
    for (k, v) in data {
        s.insert(k, &v).expect("insert");
    }
    let id = s.id().to_string();
    s.commit().expect("commit");
    id
}
