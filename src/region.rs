//! Regions: where the table's atomics live.
//!
//! Owns: turning offsets of the [`crate::layout`] into references to atomics.
//! [`MappedRegion`] does it over a shared file mapping; [`HeapRegion`] over
//! a heap buffer of facade atomics (loom atomics under the model checker,
//! whose atomics cannot live in mapped bytes). The index, lock-word and
//! recovery code is written against [`Region`] only.
//!
//! May not touch: the meaning of any word.

use crate::layout::{Geometry, BUCKET_WORDS};
use crate::lockword::{BiasedHold, Fences, SlotRef};
use crate::sync::{AtomicU32, AtomicU64};

/// A process record's atomics.
#[derive(Clone, Copy)]
pub(crate) struct RecordRef<'a> {
    pub(crate) state: &'a AtomicU64,
    pub(crate) pid: &'a AtomicU32,
    pub(crate) attached_ms: &'a AtomicU64,
}

/// The shared memory of one table, as atomics.
pub(crate) trait Region: Send + Sync {
    fn geometry(&self) -> Geometry;
    fn slot(&self, index: usize) -> SlotRef<'_>;
    /// The 128-bit tag of the ID a slot serves (valid while ACTIVE).
    fn slot_tag(&self, index: usize) -> [&AtomicU64; 2];
    fn bucket_lock(&self, bucket: usize) -> &AtomicU64 {
        self.bucket_word(bucket, 0)
    }
    /// Word `i` (0..8) of a bucket header: 0 is the bucket lock, the others
    /// hold the bucket's memory of dead writers (see the index).
    fn bucket_word(&self, bucket: usize, i: usize) -> &AtomicU64;
    fn record(&self, index: usize) -> RecordRef<'_>;
    /// High-water mark of attached process indices + 1 (see `SlotRef`).
    fn lanes_in_use(&self) -> &AtomicU32;
    /// Every reader-row entry of the table: record `p`'s are
    /// `p * RECORD_ROW_ENTRIES ..` (see the lock word, reader bias).
    fn reader_rows(&self) -> &[AtomicU32];
}

#[cfg(not(locktable_loom))]
pub(crate) use mapped::MappedRegion;

#[cfg(not(locktable_loom))]
mod mapped {
    use super::*;
    use crate::layout::{
        RECORD_ATTACHED_MS, RECORD_PID, RECORD_SIZE, RECORD_STATE, SLOT_BIAS_UNTIL, SLOT_LANES,
        SLOT_SEQ, SLOT_STATE, SLOT_TAG0, SLOT_TAG1,
    };
    use memmap2::MmapRaw;

    /// A `MAP_SHARED` mapping of a whole, validated table file.
    ///
    /// The mapping is not inherited by forked children (`MADV_DONTFORK`): a
    /// child's copy would hold a reference to the open file description and
    /// so keep the parent's liveness lease (an OFD lock) alive after the
    /// parent died. In a child the region is therefore never touched, and
    /// its drop does not unmap (the address range is not ours there).
    pub(crate) struct MappedRegion {
        map: std::mem::ManuallyDrop<MmapRaw>,
        fork_epoch: u64,
        geometry: Geometry,
        /// Precomputed from the geometry: the acquire and release paths
        /// compute a slot's address on every call.
        slots_offset: usize,
        slot_size: usize,
        capacity: usize,
        lanes: usize,
        rows_offset: usize,
        row_entries: usize,
        /// How this attachment fences its biased reads (from the header
        /// and this process's membarrier registration).
        fences: Fences,
    }

    impl MappedRegion {
        /// `map` must span `geometry.file_size()` bytes; checked here.
        pub(crate) fn new(map: MmapRaw, geometry: Geometry, fences: Fences) -> Option<Self> {
            if (map.len() as u64) < geometry.file_size() || map.as_ptr() as usize % 4096 != 0 {
                return None;
            }
            // Not inherited across fork (see the type's docs). Best effort:
            // a kernel without it only loses the fork protection.
            // The range is exactly our own live mapping; the advice changes
            // only what a future fork() copies.
            // SAFETY: sound for the reasons just given.
            unsafe {
                libc::madvise(map.as_mut_ptr().cast(), map.len(), libc::MADV_DONTFORK);
            }
            Some(MappedRegion {
                map: std::mem::ManuallyDrop::new(map),
                fork_epoch: crate::fork::epoch(),
                geometry,
                slots_offset: geometry.slots_offset() as usize,
                slot_size: geometry.slot_size() as usize,
                capacity: geometry.capacity as usize,
                lanes: geometry.max_processes as usize,
                rows_offset: geometry.rows_offset() as usize,
                row_entries: geometry.row_entries() as usize,
                fences,
            })
        }

        /// The words the release of the biased read of slot `index`
        /// held through row entry `entry` touches, without assembling a
        /// whole [`SlotRef`] (the read guard's drop). `None`: an index
        /// outside the table (never for a guard's own hold).
        #[inline(always)]
        pub(crate) fn biased_hold(&self, index: u32, entry: u32) -> Option<BiasedHold<'_>> {
            if index as usize >= self.capacity || entry as usize >= self.row_entries {
                return None;
            }
            let base = self.slot_base(index as usize);
            let entry = self.u32_at(self.rows_offset as u64 + 4 * entry as u64);
            Some(BiasedHold {
                entry,
                state: self.u64_at(base + SLOT_STATE),
                seq: self.u32_at(base + SLOT_SEQ),
                plain: self.fences.plain_reads,
            })
        }

        pub(crate) fn fences(&self) -> Fences {
            self.fences
        }

        pub(crate) fn init_state(&self) -> &AtomicU32 {
            self.u32_at(crate::layout::INIT_STATE_OFFSET)
        }

        #[inline]
        fn u64_at(&self, offset: u64) -> &AtomicU64 {
            debug_assert!(offset % 8 == 0 && offset + 8 <= self.map.len() as u64);
            // Every caller passes an offset computed from the
            // validated geometry, inside the mapping (file_size() bytes,
            // checked in `new`) and 8-aligned (the mapping is page aligned
            // and all layout offsets are multiples of 8). AtomicU64 has the
            // size and alignment of u64. The bytes are only ever accessed
            // atomically by every process, so no data race exists, and the
            // mapping outlives the returned reference (it borrows self).
            // SAFETY: sound for the reasons just given.
            unsafe { &*(self.map.as_ptr().add(offset as usize) as *const AtomicU64) }
        }

        #[inline]
        fn u32_at(&self, offset: u64) -> &AtomicU32 {
            debug_assert!(offset % 4 == 0 && offset + 4 <= self.map.len() as u64);
            // SAFETY: as in `u64_at`, with 4-byte alignment and size.
            unsafe { &*(self.map.as_ptr().add(offset as usize) as *const AtomicU32) }
        }

        #[inline]
        fn slot_base(&self, index: usize) -> u64 {
            assert!(index < self.capacity);
            (self.slots_offset + self.slot_size * index) as u64
        }
    }

    impl Drop for MappedRegion {
        fn drop(&mut self) {
            if crate::fork::epoch() == self.fork_epoch {
                // SAFETY: dropped exactly once, here; not used after.
                unsafe { std::mem::ManuallyDrop::drop(&mut self.map) }
            }
            // In a forked child the mapping was never inherited
            // (MADV_DONTFORK): unmapping that range could hit another mapping.
        }
    }

    impl Region for MappedRegion {
        fn geometry(&self) -> Geometry {
            self.geometry
        }

        #[inline]
        fn slot(&self, index: usize) -> SlotRef<'_> {
            let base = self.slot_base(index);
            let lanes_ptr = self.u32_at(base + SLOT_LANES) as *const AtomicU32;
            // The lanes of a slot are `max_processes` consecutive
            // 4-byte words starting at base + SLOT_LANES, all inside the slot
            // (slot_size() reserves them, rounded up to a cache line) and so
            // inside the mapping; 4-aligned; accessed only atomically.
            // SAFETY: sound for the reasons just given.
            let lanes = unsafe { std::slice::from_raw_parts(lanes_ptr, self.lanes) };
            SlotRef {
                index: index as u32,
                state: self.u64_at(base + SLOT_STATE),
                tag: [self.u64_at(base + SLOT_TAG0), self.u64_at(base + SLOT_TAG1)],
                seq: self.u32_at(base + SLOT_SEQ),
                bias_until: self.u64_at(base + SLOT_BIAS_UNTIL),
                lanes,
                lanes_in_use: self.lanes_in_use(),
                rows: self.reader_rows(),
                fences: self.fences,
            }
        }

        #[inline]
        fn reader_rows(&self) -> &[AtomicU32] {
            let ptr = self.u32_at(self.rows_offset as u64) as *const AtomicU32;
            // The reader rows are `row_entries` consecutive 4-byte words
            // from rows_offset, which the validated geometry puts inside
            // the mapping (file_size() counts them); page aligned; accessed
            // only atomically by every process.
            // SAFETY: sound for the reasons just given.
            unsafe { std::slice::from_raw_parts(ptr, self.row_entries) }
        }

        #[inline]
        fn slot_tag(&self, index: usize) -> [&AtomicU64; 2] {
            let base = self.slot_base(index);
            [self.u64_at(base + SLOT_TAG0), self.u64_at(base + SLOT_TAG1)]
        }

        #[inline]
        fn bucket_word(&self, bucket: usize, i: usize) -> &AtomicU64 {
            assert!(bucket < self.geometry.buckets() as usize && i < BUCKET_WORDS);
            self.u64_at(
                self.geometry.buckets_offset()
                    + crate::layout::BUCKET_HEADER_SIZE * bucket as u64
                    + 8 * i as u64,
            )
        }

        #[inline]
        fn lanes_in_use(&self) -> &AtomicU32 {
            self.u32_at(crate::layout::LANES_IN_USE_OFFSET)
        }

        fn record(&self, index: usize) -> RecordRef<'_> {
            assert!(index < self.geometry.max_processes as usize);
            let base = self.geometry.registry_offset() + RECORD_SIZE * index as u64;
            RecordRef {
                state: self.u64_at(base + RECORD_STATE),
                pid: self.u32_at(base + RECORD_PID),
                attached_ms: self.u64_at(base + RECORD_ATTACHED_MS),
            }
        }
    }
}

/// A table in a heap buffer of facade atomics: the model checker's region.
#[cfg(any(test, locktable_loom))]
pub struct HeapRegion {
    geometry: Geometry,
    states: Vec<AtomicU64>,
    seqs: Vec<AtomicU32>,
    tags: Vec<AtomicU64>,
    lanes: Vec<AtomicU32>,
    bias_until: Vec<AtomicU64>,
    rows: Vec<AtomicU32>,
    fences: Fences,
    bucket_words: Vec<AtomicU64>,
    records: Vec<(AtomicU64, AtomicU32, AtomicU64)>,
    lanes_in_use: AtomicU32,
}

#[cfg(any(test, locktable_loom))]
impl HeapRegion {
    /// A zeroed region (all slots FREE, all records free), with every lane
    /// counted as in use (a model may lower the mark with
    /// [`HeapRegion::set_lanes_in_use`]).
    pub fn new(capacity: u32, max_processes: u32) -> HeapRegion {
        let geometry = Geometry {
            capacity,
            max_processes,
        };
        let n = capacity as usize;
        let p = max_processes as usize;
        HeapRegion {
            geometry,
            states: (0..n).map(|_| AtomicU64::new(0)).collect(),
            seqs: (0..n).map(|_| AtomicU32::new(0)).collect(),
            tags: (0..2 * n).map(|_| AtomicU64::new(0)).collect(),
            lanes: (0..n * p).map(|_| AtomicU32::new(0)).collect(),
            bias_until: (0..n).map(|_| AtomicU64::new(0)).collect(),
            rows: (0..geometry.row_entries() as usize)
                .map(|_| AtomicU32::new(0))
                .collect(),
            fences: Fences::LOCKED,
            bucket_words: (0..geometry.buckets() as usize * BUCKET_WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            records: (0..p)
                .map(|_| (AtomicU64::new(0), AtomicU32::new(0), AtomicU64::new(0)))
                .collect(),
            lanes_in_use: AtomicU32::new(max_processes),
        }
    }
    /// The same region with biased reads fenced as `fences` says (the
    /// models run the reader-bias protocol both ways).
    #[cfg(locktable_loom)]
    pub(crate) fn with_fences(mut self, fences: Fences) -> HeapRegion {
        self.fences = fences;
        self
    }
}

#[cfg(locktable_loom)]
impl HeapRegion {
    /// Sets the lanes-in-use mark (as if only processes below it attached).
    pub fn set_lanes_in_use(&self, n: u32) {
        self.lanes_in_use.store(n, crate::sync::Ordering::SeqCst);
    }
}

#[cfg(any(test, locktable_loom))]
impl Region for HeapRegion {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn slot(&self, index: usize) -> SlotRef<'_> {
        let p = self.geometry.max_processes as usize;
        SlotRef {
            index: index as u32,
            state: &self.states[index],
            tag: [&self.tags[2 * index], &self.tags[2 * index + 1]],
            seq: &self.seqs[index],
            bias_until: &self.bias_until[index],
            lanes: &self.lanes[index * p..(index + 1) * p],
            lanes_in_use: &self.lanes_in_use,
            rows: &self.rows,
            fences: self.fences,
        }
    }
    fn reader_rows(&self) -> &[AtomicU32] {
        &self.rows
    }
    fn lanes_in_use(&self) -> &AtomicU32 {
        &self.lanes_in_use
    }
    fn slot_tag(&self, index: usize) -> [&AtomicU64; 2] {
        [&self.tags[2 * index], &self.tags[2 * index + 1]]
    }
    fn bucket_word(&self, bucket: usize, i: usize) -> &AtomicU64 {
        assert!(i < BUCKET_WORDS);
        &self.bucket_words[bucket * BUCKET_WORDS + i]
    }
    fn record(&self, index: usize) -> RecordRef<'_> {
        let r = &self.records[index];
        RecordRef {
            state: &r.0,
            pid: &r.1,
            attached_ms: &r.2,
        }
    }
}
