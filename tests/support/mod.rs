//! Helpers shared by the integration tests: each file under `tests/` is a crate of its own and
//! takes this module with `mod support;`. It owns test plumbing only (server variables, child
//! processes, the CLI runner, a store wrapper that watches calls, the counting workload of the
//! multi-process session tests); what a test checks stays in the test. `spy_store` is also taken
//! by `benches/support` (with `#[path]`).

// Every test crate compiles all of this module but uses only a part of it; the rest would be
// reported as dead code once per crate.
#![allow(dead_code)]

pub mod child;
#[cfg(feature = "cli")]
pub mod cli;
pub mod counters;
pub mod cpus;
pub mod rows;
pub mod seccomp;
pub mod servers;
pub mod sessions;
pub mod spy_store;
