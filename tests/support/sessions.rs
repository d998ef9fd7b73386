//! A session holding one counter `n`: made and read the same way by the session tests that
//! check what another manager or process sees.

use locktable::session::SessionManager;

/// Creates a session whose `n` is `n`; its ID.
pub fn new_session(mgr: &SessionManager, n: u64) -> String {
    let mut s = mgr.create().unwrap();
    s.insert("n", &n).unwrap();
    let id = s.id().to_string();
    s.commit().unwrap();
    id
}

/// The session's `n`, or `None` if the session is gone.
pub fn read_n(mgr: &SessionManager, id: &str) -> Option<u64> {
    let s = mgr.load(id).unwrap()?;
    let n = s.get::<u64>("n").unwrap();
    s.commit().unwrap();
    n
}
