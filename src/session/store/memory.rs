//! [`MemoryStore`]: sessions in a process-local map (tests, single-process servers).
//!
//! Owns: its map. Every operation is atomic under one mutex, so its compare-and-swap, touches and
//! expiry checks need no lock from the manager.

use super::{
    touch_refusal, Capabilities, Cutoffs, ExpiredScan, SessionMeta, Store, StoredSession,
    Timestamp, Touch,
};
use crate::session::id::SessionId;
use crate::{Error, Result};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::Duration;

/// An in-memory [`Store`]; every operation is atomic under one mutex.
///
/// ```
/// use locktable::session::{MemoryStore, SessionConfig, SessionManager};
/// use locktable::{LockTable, TableOptions};
/// let table = LockTable::anonymous(&TableOptions::default()).unwrap();
/// let mgr = SessionManager::new(table, MemoryStore::new(), SessionConfig::default());
/// let mut s = mgr.create().unwrap();
/// s.insert("k", &1).unwrap();
/// let id = s.id().to_string();
/// s.commit().unwrap();
/// assert!(mgr.load(&id).unwrap().is_some());
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<BTreeMap<SessionId, StoredSession>>,
    /// The last ID examined by `scan_expired` (the scan resumes after it).
    cursor: Mutex<Option<SessionId>>,
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

    fn change_counters(&self) -> super::ChangeCounters {
        super::ChangeCounters::Process
    }

    fn load(&self, id: &SessionId, max_size: usize) -> Result<Option<StoredSession>> {
        let map = self.map.lock();
        match map.get(id) {
            Some(s) if s.bytes.len() > max_size => Err(Error::TooLarge {
                size: s.bytes.len(),
                limit: max_size,
            }),
            other => Ok(other.cloned()),
        }
    }

    fn save(&self, id: &SessionId, expected: Option<u64>, new: &StoredSession) -> Result<bool> {
        let mut map = self.map.lock();
        let current = map.get(id);
        if current.map(|c| c.meta.version) != expected {
            return Ok(false);
        }
        let mut stored = new.clone();
        stored.meta.size = stored.bytes.len() as u64;
        if let Some(c) = current {
            stored.meta.last_accessed = stored.meta.last_accessed.max(c.meta.last_accessed);
        }
        map.insert(id.clone(), stored);
        Ok(true)
    }

    fn meta(&self, id: &SessionId) -> Result<Option<SessionMeta>> {
        Ok(self.map.lock().get(id).map(|s| s.meta))
    }

    fn touch(
        &self,
        id: &SessionId,
        at: Timestamp,
        coalesce: Duration,
        cutoffs: &Cutoffs,
    ) -> Result<Touch> {
        let mut map = self.map.lock();
        let Some(s) = map.get_mut(id) else {
            return Ok(Touch::Missing);
        };
        if let Some(refused) = touch_refusal(&s.meta, at, coalesce, cutoffs) {
            return Ok(refused);
        }
        s.meta.last_accessed = at;
        Ok(Touch::Written)
    }

    fn delete(&self, id: &SessionId) -> Result<bool> {
        Ok(self.map.lock().remove(id).is_some())
    }

    fn remove_expired(&self, id: &SessionId, cutoffs: &Cutoffs) -> Result<bool> {
        let mut map = self.map.lock();
        match map.get(id) {
            Some(s) if cutoffs.meta_expired(&s.meta) => Ok(map.remove(id).is_some()),
            _ => Ok(false),
        }
    }

    fn scan_expired(&self, cutoffs: &Cutoffs, budget: usize) -> Result<ExpiredScan> {
        let map = self.map.lock();
        let mut cursor = self.cursor.lock();
        let start = match cursor.as_ref() {
            Some(c) => Bound::Excluded(c.clone()),
            None => Bound::Unbounded,
        };
        let mut scan = ExpiredScan::default();
        for (id, s) in map.range((start, Bound::Unbounded)) {
            if scan.examined == budget {
                scan.more = true;
                return Ok(scan);
            }
            scan.examined += 1;
            *cursor = Some(id.clone());
            if cutoffs.meta_expired(&s.meta) {
                scan.expired.push(id.clone());
            }
        }
        // A full pass: the next one starts from the beginning.
        *cursor = None;
        Ok(scan)
    }
}
