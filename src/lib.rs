//! # locktable
//!
//! Per-ID reader / upgradable / writer locks shared by the threads **and
//! processes** of one host, kept in a memory-mapped table file, with waiting
//! on shared futexes and automatic release of the holds of dead processes.
//! A web-session layer ([`session`]) builds on it, and a cache ([`cache`]) with one creator
//! per key over the same stores. With the `axum` feature, `locktable::web` puts sessions into
//! axum / tower apps and `locktable::asynclock` offers async lock waits.
//!
//! ```
//! use locktable::{LockTable, TableOptions};
//! let table = LockTable::anonymous(&TableOptions::default()).unwrap();
//! let up = table.upgradable_read(b"cart:42").unwrap();
//! let reader = table.read(b"cart:42").unwrap();   // readers still welcome
//! drop(reader);
//! let w = up.upgrade();                           // now exclusive
//! let r = w.downgrade();                          // and back, atomically
//! # drop(r);
//! ```
//!
//! See `DESIGN.md` for the file format, the lock word, the memory orderings
//! and the recovery protocol.

#![warn(missing_docs)]
// Under the model checker only the protocol modules are exercised.
#![cfg_attr(locktable_loom, allow(dead_code, unused_imports))]

mod error;
mod index;
mod layout;
mod lockword;
mod recovery;
mod region;
mod sync;
// The session cache's change-counter protocol (public to the loom models).
#[cfg(locktable_loom)]
pub mod versions;
#[cfg(not(locktable_loom))]
mod versions;

// The lookup cache's seqlock entries (public to the loom models).
#[cfg(locktable_loom)]
pub mod lookup_cache;
#[cfg(not(locktable_loom))]
mod lookup_cache;

#[cfg(locktable_loom)]
pub mod model;

#[cfg(not(locktable_loom))]
pub mod cache;
#[cfg(not(locktable_loom))]
mod fork;
#[cfg(locktable_loom)]
pub mod fork_gate;
#[cfg(not(locktable_loom))]
mod fork_gate;
#[cfg(not(locktable_loom))]
mod guard;
#[cfg(not(locktable_loom))]
mod reader_row;
#[cfg(not(locktable_loom))]
mod registry;
#[cfg(not(locktable_loom))]
pub mod session;
#[cfg(not(locktable_loom))]
mod sip13;
#[cfg(not(locktable_loom))]
mod stats;
#[cfg(not(locktable_loom))]
mod table;
#[cfg(not(locktable_loom))]
mod watcher;

#[cfg(all(feature = "axum", not(locktable_loom)))]
pub mod asynclock;
#[cfg(all(feature = "axum", not(locktable_loom)))]
pub mod web;

pub use error::{Error, Result};
#[cfg(not(locktable_loom))]
pub use guard::{ReadGuard, UpgradableReadGuard, WriteGuard};
pub use layout::Geometry;
pub use recovery::SweepReport;
#[cfg(not(locktable_loom))]
pub use stats::{HoldMode, Holder, ProcessInfo, TableStats, Waiter};
#[cfg(not(locktable_loom))]
pub use table::{
    LockTable, TableOptions, DEFAULT_CAPACITY, DEFAULT_MAX_PROCESSES, DEFAULT_POLL_INTERVAL,
    MAX_ID_LEN,
};

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
