//! The reader rows of a table file, read from outside with `pread` (not
//! through a mapping), for tests that check which biased read holds are
//! left. Format 3 and later: `max_processes` records x 32 rows x 16 `u32`
//! entries at the very end of the file (a page multiple, so no padding
//! follows them); an entry is 0 or slot index + 1.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Rows per process record and entries per row.
pub const ROWS: usize = 32;
pub const ROW_ENTRIES: usize = 16;

/// Every reader-row entry of the table file at `table`.
pub fn entries(table: &Path, max_processes: u32) -> Vec<u32> {
    let bytes = max_processes as u64 * (ROWS * ROW_ENTRIES * 4) as u64;
    let f = File::open(table).unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = vec![0u8; bytes as usize];
    f.read_exact_at(&mut b, len - bytes).unwrap();
    b.chunks(4)
        .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
        .collect()
}

/// Non-zero entries (biased read holds) of the table file at `table`.
pub fn biased_entries(table: &Path, max_processes: u32) -> usize {
    entries(table, max_processes)
        .iter()
        .filter(|&&e| e != 0)
        .count()
}
