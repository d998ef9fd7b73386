//! A real store wrapped so that a test can watch every call on it (count calls, leave marker
//! files, act between a read and the next call) or make a call fail after the store did its
//! work: one forwarding wrapper, so that each test writes only what it watches.
//!
//! Also taken by `benches/session.rs` (with `#[path]`): change it with the bench in mind.

use locktable::session::{
    Capabilities, Cutoffs, ExpiredScan, SessionId, SessionMeta, Store, StoredSession, Timestamp,
    Touch,
};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Which [`Store`] method a call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Load,
    Save,
    Meta,
    Touch,
    LastAccessed,
    Delete,
    RemoveExpired,
    ScanExpired,
    Cleanup,
}

/// What the store answered, as far as watchers tell answers apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `save`: whether it wrote.
    Saved(bool),
    /// `touch`: what it did.
    Touched(Touch),
    /// `remove_expired`: whether it removed the session.
    Removed(bool),
    /// Any other call that succeeded.
    Done,
    /// The call returned an error.
    Failed,
}

/// What a test does around the calls of a [`SpyStore`]. Both hooks do nothing by default.
pub trait Watch: Send + Sync + fmt::Debug {
    /// Runs before `call` reaches the store.
    fn before(&self, _call: Call) {}

    /// Runs after the store answered `call`. An error returned here replaces the store's answer
    /// (a call that did its work and then failed). `store` is the wrapped store, for a watcher
    /// that acts on it between two calls.
    fn after(&self, _store: &dyn Store, _call: Call, _answer: Answer) -> locktable::Result<()> {
        Ok(())
    }
}

/// A shared watcher watches: the test keeps one handle on it, the store the other.
impl<W: Watch + ?Sized> Watch for Arc<W> {
    fn before(&self, call: Call) {
        (**self).before(call)
    }
    fn after(&self, store: &dyn Store, call: Call, answer: Answer) -> locktable::Result<()> {
        (**self).after(store, call, answer)
    }
}

/// Watches nothing: a [`SpyStore`] with it is a boxed store that is a [`Store`] itself.
impl Watch for () {}

/// A store that forwards every call to the store it wraps, with its [`Watch`] around each.
#[derive(Debug)]
pub struct SpyStore<W> {
    inner: Box<dyn Store>,
    watch: W,
}

impl<W: Watch> SpyStore<W> {
    pub fn new(inner: impl Store + 'static, watch: W) -> Self {
        Self::boxed(Box::new(inner), watch)
    }

    pub fn boxed(inner: Box<dyn Store>, watch: W) -> Self {
        SpyStore { inner, watch }
    }

    /// Forwards one call, with the watcher's hooks around it.
    fn around<T>(
        &self,
        call: Call,
        forward: impl FnOnce(&dyn Store) -> locktable::Result<T>,
        answer: impl FnOnce(&T) -> Answer,
    ) -> locktable::Result<T> {
        self.watch.before(call);
        let result = forward(&*self.inner);
        let a = match &result {
            Ok(v) => answer(v),
            Err(_) => Answer::Failed,
        };
        self.watch.after(&*self.inner, call, a)?;
        result
    }
}

fn done<T>(_: &T) -> Answer {
    Answer::Done
}

impl<W: Watch> Store for SpyStore<W> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn load(&self, id: &SessionId, max_size: usize) -> locktable::Result<Option<StoredSession>> {
        self.around(Call::Load, |s| s.load(id, max_size), done)
    }
    fn save(
        &self,
        id: &SessionId,
        expected: Option<u64>,
        new: &StoredSession,
    ) -> locktable::Result<bool> {
        self.around(
            Call::Save,
            |s| s.save(id, expected, new),
            |&w| Answer::Saved(w),
        )
    }
    fn meta(&self, id: &SessionId) -> locktable::Result<Option<SessionMeta>> {
        self.around(Call::Meta, |s| s.meta(id), done)
    }
    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> locktable::Result<Touch> {
        self.around(
            Call::Touch,
            |s| s.touch(id, at, coalesce, cutoffs),
            |&t| Answer::Touched(t),
        )
    }
    fn last_accessed(&self, id: &SessionId) -> locktable::Result<Option<Timestamp>> {
        self.around(Call::LastAccessed, |s| s.last_accessed(id), done)
    }
    fn delete(&self, id: &SessionId) -> locktable::Result<bool> {
        self.around(Call::Delete, |s| s.delete(id), done)
    }
    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> locktable::Result<bool> {
        self.around(
            Call::RemoveExpired,
            |s| s.remove_expired(id, cutoffs),
            |&r| Answer::Removed(r),
        )
    }
    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> locktable::Result<ExpiredScan> {
        self.around(Call::ScanExpired, |s| s.scan_expired(cutoffs, budget), done)
    }
    fn cleanup(&self) -> locktable::Result<usize> {
        self.around(Call::Cleanup, |s| s.cleanup(), done)
    }
}
