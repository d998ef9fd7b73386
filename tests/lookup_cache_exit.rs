//! This crate's thread-locals and thread exit: a lock taken by a
//! thread-local destructor that runs after the crate's own thread-local
//! destructors (a guard kept in a thread-local, a connection pool that
//! locks on drop) works instead of panicking. The lookup cache was per
//! thread when this test was written (it is per attachment now); the
//! reader-row lease (`src/reader_row.rs`) still is, and a read after it is
//! returned goes through the process's lane.
//!
//! A panic in a thread-local destructor aborts the process, so a failure
//! here takes this whole test binary down: it has this one test.

use std::cell::RefCell;

use locktable::{LockTable, TableOptions};

/// Locks an ID when the thread's thread-locals are destroyed.
struct LocksOnDrop(Option<LockTable>);

impl Drop for LocksOnDrop {
    fn drop(&mut self) {
        if let Some(table) = self.0.take() {
            drop(table.read("on-exit").expect("read from a destructor"));
            drop(table.write("on-exit").expect("write from a destructor"));
        }
    }
}

thread_local! {
    static LOCKS_ON_EXIT: RefCell<LocksOnDrop> = const { RefCell::new(LocksOnDrop(None)) };
}

#[test]
fn a_lock_taken_by_a_thread_local_destructor_after_the_cache_is_gone_works() {
    let table = LockTable::anonymous(&TableOptions::default().capacity(64)).unwrap();
    let mine = table.clone();
    std::thread::spawn(move || {
        // This thread-local's destructor is registered first, the crate's
        // (the reader-row lease, at the first read) second; they run in
        // reverse order, so the lease is gone when this one locks.
        LOCKS_ON_EXIT.with(|l| l.borrow_mut().0 = Some(mine.clone()));
        drop(mine.read("during").unwrap());
    })
    .join()
    .expect("the thread exits cleanly");
    // The destructor's holds were released.
    assert!(table.try_write("on-exit").unwrap().is_some());
}
