//! [`MemoryStore`]: sessions in a process-local map (tests, single-process servers).

use super::{Capabilities, Cutoffs, Store, StoredSession, Timestamp, Touch};
use crate::session::id::SessionId;
use crate::Result;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::Duration;

/// An in-memory [`Store`]; every operation is atomic under one mutex.
///
/// ```
/// use locktable::session::{MemoryStore, SessionConfig, SessionManager};
/// use locktable::{LockTable, TableOptions};
/// let table = LockTable::anonymous(&TableOptions::default()).unwrap();
/// let mgr = SessionManager::new(table, MemoryStore::new(), SessionConfig::default());
/// let s = mgr.create().unwrap();
/// assert!(mgr.load(s.id().as_str()).unwrap().is_some());
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<SessionId, StoredSession>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, false, false, true)
    }

    fn load(&self, id: &SessionId) -> Result<Option<StoredSession>> {
        Ok(self.map.lock().get(id).cloned())
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        let mut map = self.map.lock();
        let current = map.get(id);
        if current.map(|c| c.version) != expected {
            return Ok(false);
        }
        let mut stored = new.clone();
        if let Some(c) = current {
            stored.last_accessed = stored.last_accessed.max(c.last_accessed);
        }
        map.insert(id.clone(), stored);
        Ok(true)
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        idle_before: Timestamp,
    ) -> Result<Touch> {
        let mut map = self.map.lock();
        Ok(match map.get_mut(id) {
            None => Touch::Missing,
            Some(s) if s.last_accessed >= at.saturating_sub(coalesce) => Touch::Skipped,
            Some(s) if s.last_accessed < idle_before => Touch::Expired,
            Some(s) => {
                s.last_accessed = at;
                Touch::Written
            }
        })
    }

    fn last_accessed(&self, id: &SessionId) -> Result<Option<Timestamp>> {
        Ok(self.map.lock().get(id).map(|s| s.last_accessed))
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        Ok(self.map.lock().remove(id).is_some())
    }

    fn list_expired(&self, cutoffs: Cutoffs, limit: usize) -> Result<Vec<SessionId>> {
        Ok(self
            .map
            .lock()
            .iter()
            .filter(|(_, s)| cutoffs.expired(s.created, s.last_accessed))
            .map(|(id, _)| id.clone())
            .take(limit)
            .collect())
    }
}
