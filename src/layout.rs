//! The table file format: header, geometry, offsets, and the checks on open.
//!
//! Owns: every byte offset in the file, the header encoding, the format
//! version, the layout descriptor and its validation. A header is parsed
//! from bytes read with `pread` (never from the mapping), so a hostile or
//! truncated file is rejected before anything is mapped.
//!
//! May not touch: the atomics inside the regions it describes.
//!
//! ```text
//! offset 0                      header (4096 bytes, one page)
//!   0   magic "LOCKTBL\0"        8 bytes
//!   8   format version           u32: 4, or 5 with asymmetric fences
//!  12   endianness marker        u32 0x01020304 as written by the creator
//!  16   header size              u32
//!  20   cache line               u32 (every region entry is padded to it)
//!  24   slot size                u32
//!  28   process record size      u32
//!  32   bucket header size       u32
//!  36   slots per bucket         u32
//!  40   capacity (slots)         u32
//!  44   max processes            u32
//!  48   registry offset          u64
//!  56   buckets offset           u64
//!  64   slots offset             u64
//!  72   file size                u64
//!  80   hash key (2 x u64)       per-table random SipHash key
//!  96   created (unix ms)        u64
//! 104   usize width, u64 align   u32, u32
//! 112   flags                    u32: bit 0 = asymmetric fences (biased readers
//!                                publish with plain stores, revokers issue membarrier)
//! 116   reserved                 u32 0 (another value is refused)
//! 120   checksum                 u64 FNV-1a of bytes 0..120
//! 128   init state               u32 atomic, own cache line: READY when done
//! 192   lanes in use             u32 atomic, own cache line: highest attached
//!                                process index + 1 ever (drain checks stop there)
//! 4096                           registry: max_processes records x 64 bytes
//!                                buckets: capacity/8 headers x 64 bytes
//!                                slots: capacity x slot size
//!                                reader rows (page aligned): max_processes
//!                                blocks of READER_ROWS rows x 64 bytes
//! ```
//!
//! A slot's first cache line: state (+0), seq (+8), tag (+16, +24) and
//! `bias_until` (+32, the end of the reader-bias cooling window). The reader
//! rows of record `p` follow the slots: `READER_ROWS` rows of
//! `ROW_ENTRIES` `u32` entries (one cache line each); an entry is 0 or
//! slot index + 1 (a biased read hold of process `p`, see the lock word).

use crate::error::{Error, Result};

pub(crate) const MAGIC: [u8; 8] = *b"LOCKTBL\0";
/// 2: adds the lanes-in-use mark at offset 192, which drain checks rely on.
/// 3: adds the per-process reader rows after the slots and `bias_until` in
/// each slot's first line (reader bias, see the lock word): a build that
/// does not scan the rows would let a writer in beside a biased reader, so
/// older files and builds are refused.
/// 4: adds the flags word at 112 (the checksum moves to 120). With
/// `FLAG_ASYMMETRIC_FENCES`, a build that revokes without `membarrier`
/// would let a writer in beside a reader whose plain publish it did not
/// see, so version-3 builds must refuse these files. Since stop 20 only
/// files without that flag are written as version 4 (see
/// [`ASYMMETRIC_FORMAT_VERSION`]).
pub(crate) const FORMAT_VERSION: u32 = 4;
/// 5: version 4 with `FLAG_ASYMMETRIC_FENCES`, written by builds whose
/// processes refresh every CPU's membarrier mark before they publish
/// plainly (DESIGN §10, "Status"). Builds before that published plainly on
/// CPUs the barrier skipped, so they must refuse these files (they read
/// only version 4), and this build refuses version-4 files with the flag
/// (such a build may be attached to them).
pub(crate) const ASYMMETRIC_FORMAT_VERSION: u32 = 5;
/// Header flag: biased readers of registered processes publish with plain
/// stores, and every revocation or retirement of a BIASED slot issues the
/// heavy barrier first (DESIGN §10, "Asymmetric fences").
pub(crate) const FLAG_ASYMMETRIC_FENCES: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_ASYMMETRIC_FENCES;
pub(crate) const FLAGS_OFFSET: usize = 112;
pub(crate) const ENDIAN_MARKER: u32 = 0x0102_0304;
pub(crate) const HEADER_SIZE: u64 = 4096;
pub(crate) const CACHE_LINE: u64 = 64;
pub(crate) const RECORD_SIZE: u64 = 64;
pub(crate) const BUCKET_HEADER_SIZE: u64 = 64;
pub(crate) const BUCKET_SLOTS: u32 = 8;
/// 64-bit words in a bucket header: the bucket lock (word 0), then the
/// bucket's memory of dead writers (words 1..7: three 128-bit tags, then
/// the next entry to overwrite). Version-2 files have these words zeroed,
/// and builds that do not know them never write them.
pub(crate) const BUCKET_WORDS: usize = 8;
pub(crate) const CHECKSUM_OFFSET: usize = 120;
pub(crate) const INIT_STATE_OFFSET: u64 = 128;
/// Lanes-in-use high-water mark (u32 atomic, own cache line).
pub(crate) const LANES_IN_USE_OFFSET: u64 = 192;
/// Value of the init-state word once the creator has finished.
pub(crate) const INIT_READY: u32 = 0x5245_4459; // "READY"

/// Offsets inside a slot.
pub(crate) const SLOT_STATE: u64 = 0;
pub(crate) const SLOT_SEQ: u64 = 8;
pub(crate) const SLOT_TAG0: u64 = 16;
pub(crate) const SLOT_TAG1: u64 = 24;
/// End of the slot's reader-bias cooling window (CLOCK_MONOTONIC ns).
pub(crate) const SLOT_BIAS_UNTIL: u64 = 32;
pub(crate) const SLOT_LANES: u64 = CACHE_LINE;

/// Reader rows per process record. A thread of the process publishes its
/// biased reads in one row (threads beyond this many share rows; an entry
/// is taken by a CAS from 0, so sharing is safe). The model checker uses
/// one row of two entries, which keeps its revocation scans short.
#[cfg(not(locktable_loom))]
pub(crate) const READER_ROWS: u64 = 32;
#[cfg(locktable_loom)]
pub(crate) const READER_ROWS: u64 = 1;
/// `u32` entries per reader row (one cache line in real builds).
#[cfg(not(locktable_loom))]
pub(crate) const ROW_ENTRIES: u64 = CACHE_LINE / 4;
#[cfg(locktable_loom)]
pub(crate) const ROW_ENTRIES: u64 = 2;
/// Entries of one process record's reader rows.
pub(crate) const RECORD_ROW_ENTRIES: u64 = READER_ROWS * ROW_ENTRIES;

/// Offsets inside a process record.
pub(crate) const RECORD_STATE: u64 = 0;
pub(crate) const RECORD_PID: u64 = 8;
pub(crate) const RECORD_ATTACHED_MS: u64 = 16;

pub(crate) const MIN_CAPACITY: u32 = BUCKET_SLOTS * 2;
pub(crate) const MAX_CAPACITY: u32 = 1 << 24;
pub(crate) const MAX_PROCESSES: u32 = 1024;

/// Byte offsets used as OFD lock targets. They lie far beyond the end of any
/// table file (locks past EOF are allowed and never touch data).
pub(crate) const INIT_LOCK_BYTE: i64 = 1 << 40;
pub(crate) const LEASE_BASE: i64 = (1 << 40) + 4096;

/// Size and shape of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Number of lock slots (IDs held or cached at once).
    pub capacity: u32,
    /// Number of processes that may be attached at once.
    pub max_processes: u32,
}

impl Geometry {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&self.capacity)
            || self.capacity % BUCKET_SLOTS != 0
        {
            return Err(Error::InvalidOptions(format!(
                "capacity {} must be a multiple of {BUCKET_SLOTS} in {MIN_CAPACITY}..={MAX_CAPACITY}",
                self.capacity
            )));
        }
        if !(1..=MAX_PROCESSES).contains(&self.max_processes) {
            return Err(Error::InvalidOptions(format!(
                "max_processes {} must be in 1..={MAX_PROCESSES}",
                self.max_processes
            )));
        }
        Ok(())
    }

    pub(crate) fn slot_size(&self) -> u64 {
        SLOT_LANES + round_up(4 * self.max_processes as u64, CACHE_LINE)
    }
    pub(crate) fn buckets(&self) -> u32 {
        self.capacity / BUCKET_SLOTS
    }
    pub(crate) fn registry_offset(&self) -> u64 {
        HEADER_SIZE
    }
    pub(crate) fn buckets_offset(&self) -> u64 {
        self.registry_offset() + RECORD_SIZE * self.max_processes as u64
    }
    pub(crate) fn slots_offset(&self) -> u64 {
        round_up(
            self.buckets_offset() + BUCKET_HEADER_SIZE * self.buckets() as u64,
            4096,
        )
    }
    /// The reader rows: after the slots, page aligned.
    pub(crate) fn rows_offset(&self) -> u64 {
        round_up(
            self.slots_offset() + self.slot_size() * self.capacity as u64,
            4096,
        )
    }
    /// Number of reader-row entries in the table (every record's rows).
    pub(crate) fn row_entries(&self) -> u64 {
        RECORD_ROW_ENTRIES * self.max_processes as u64
    }
    pub(crate) fn file_size(&self) -> u64 {
        round_up(self.rows_offset() + 4 * self.row_entries(), 4096)
    }
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The immutable part of a header, as parsed and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) geometry: Geometry,
    pub(crate) hash_key: [u64; 2],
    pub(crate) created_ms: u64,
    /// `FLAG_ASYMMETRIC_FENCES`: chosen by the creator, fixed for the
    /// table's life.
    pub(crate) asymmetric_fences: bool,
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

/// FNV-1a, 64-bit: detects torn or edited headers (not an adversary who can
/// write the file: such a user can already take every lock).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Header {
    /// Encodes the immutable header (bytes 0..128) with its checksum.
    pub(crate) fn encode(&self) -> [u8; 128] {
        let g = &self.geometry;
        let mut b = [0u8; 128];
        b[0..8].copy_from_slice(&MAGIC);
        let version = if self.asymmetric_fences {
            ASYMMETRIC_FORMAT_VERSION
        } else {
            FORMAT_VERSION
        };
        put_u32(&mut b, 8, version);
        put_u32(&mut b, 12, ENDIAN_MARKER);
        put_u32(&mut b, 16, HEADER_SIZE as u32);
        put_u32(&mut b, 20, CACHE_LINE as u32);
        put_u32(&mut b, 24, g.slot_size() as u32);
        put_u32(&mut b, 28, RECORD_SIZE as u32);
        put_u32(&mut b, 32, BUCKET_HEADER_SIZE as u32);
        put_u32(&mut b, 36, BUCKET_SLOTS);
        put_u32(&mut b, 40, g.capacity);
        put_u32(&mut b, 44, g.max_processes);
        put_u64(&mut b, 48, g.registry_offset());
        put_u64(&mut b, 56, g.buckets_offset());
        put_u64(&mut b, 64, g.slots_offset());
        put_u64(&mut b, 72, g.file_size());
        put_u64(&mut b, 80, self.hash_key[0]);
        put_u64(&mut b, 88, self.hash_key[1]);
        put_u64(&mut b, 96, self.created_ms);
        put_u32(&mut b, 104, std::mem::size_of::<usize>() as u32);
        put_u32(&mut b, 108, std::mem::align_of::<u64>() as u32);
        let flags = if self.asymmetric_fences {
            FLAG_ASYMMETRIC_FENCES
        } else {
            0
        };
        put_u32(&mut b, FLAGS_OFFSET, flags);
        let sum = fnv1a64(&b[..CHECKSUM_OFFSET]);
        put_u64(&mut b, CHECKSUM_OFFSET, sum);
        b
    }

    /// Parses and checks a header read from a file of `file_len` bytes.
    /// Every failure is a typed error; nothing here can panic on any input.
    pub(crate) fn decode(b: &[u8], file_len: u64) -> Result<Header> {
        if file_len < HEADER_SIZE || b.len() < 128 {
            return Err(Error::Corrupt(format!(
                "file is {file_len} bytes, shorter than a table header ({HEADER_SIZE})"
            )));
        }
        if b[0..8] != MAGIC {
            return Err(Error::Incompatible {
                reason: "not a locktable file (bad magic)".into(),
            });
        }
        if get_u32(b, 12) != ENDIAN_MARKER {
            return Err(Error::Incompatible {
                reason: "table was created on a machine of other endianness".into(),
            });
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION && version != ASYMMETRIC_FORMAT_VERSION {
            return Err(Error::Incompatible {
                reason: format!(
                    "format version {version}, this build reads {FORMAT_VERSION} and \
                     {ASYMMETRIC_FORMAT_VERSION}"
                ),
            });
        }
        let sum = get_u64(b, CHECKSUM_OFFSET);
        if sum != fnv1a64(&b[..CHECKSUM_OFFSET]) {
            return Err(Error::Corrupt("header checksum mismatch".into()));
        }
        let layout_ok = get_u32(b, 16) as u64 == HEADER_SIZE
            && get_u32(b, 20) as u64 == CACHE_LINE
            && get_u32(b, 28) as u64 == RECORD_SIZE
            && get_u32(b, 32) as u64 == BUCKET_HEADER_SIZE
            && get_u32(b, 36) == BUCKET_SLOTS
            && get_u32(b, 104) as usize == std::mem::size_of::<usize>()
            && get_u32(b, 108) as usize == std::mem::align_of::<u64>();
        if !layout_ok {
            return Err(Error::Incompatible {
                reason: "layout descriptor (sizes, alignment, cache line) differs from this build"
                    .into(),
            });
        }
        let geometry = Geometry {
            capacity: get_u32(b, 40),
            max_processes: get_u32(b, 44),
        };
        geometry
            .validate()
            .map_err(|e| Error::Corrupt(format!("header geometry: {e}")))?;
        let offsets_ok = get_u32(b, 24) as u64 == geometry.slot_size()
            && get_u64(b, 48) == geometry.registry_offset()
            && get_u64(b, 56) == geometry.buckets_offset()
            && get_u64(b, 64) == geometry.slots_offset()
            && get_u64(b, 72) == geometry.file_size();
        if !offsets_ok {
            return Err(Error::Corrupt(
                "header offsets do not match its geometry".into(),
            ));
        }
        if file_len != geometry.file_size() {
            return Err(Error::Corrupt(format!(
                "file is {file_len} bytes, header says {}",
                geometry.file_size()
            )));
        }
        let flags = get_u32(b, FLAGS_OFFSET);
        // Bytes 116..120 are written as zero and mean nothing yet: a build
        // that gives them a meaning must not be misread by this one (as the
        // flags word is guarded by KNOWN_FLAGS).
        if get_u32(b, FLAGS_OFFSET + 4) != 0 {
            return Err(Error::Incompatible {
                reason: "header bytes 116..120, reserved, are not zero".into(),
            });
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::Incompatible {
                reason: format!("unknown header flags {flags:#x}"),
            });
        }
        let asymmetric = flags & FLAG_ASYMMETRIC_FENCES != 0;
        if asymmetric != (version == ASYMMETRIC_FORMAT_VERSION) {
            return Err(Error::Incompatible {
                reason: if asymmetric {
                    "the table uses asymmetric fences and was created by a build whose readers \
                     could publish on CPUs that the barrier skipped (format 4, DESIGN §10); once \
                     no process uses it, delete the file and let it be created again"
                        .into()
                } else {
                    format!("format version {version} without the asymmetric-fence flag")
                },
            });
        }
        Ok(Header {
            geometry,
            hash_key: [get_u64(b, 80), get_u64(b, 88)],
            created_ms: get_u64(b, 96),
            asymmetric_fences: asymmetric,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            geometry: Geometry {
                capacity: 64,
                max_processes: 8,
            },
            hash_key: [1, 2],
            created_ms: 3,
            asymmetric_fences: true,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        let b = h.encode();
        assert_eq!(Header::decode(&b, h.geometry.file_size()).unwrap(), h);
    }

    /// A header as `h` encodes it, with the version field set to `version`
    /// and the checksum made right again (what another build would write).
    fn with_version(h: &Header, version: u32) -> [u8; 128] {
        let mut b = h.encode();
        put_u32(&mut b, 8, version);
        let sum = fnv1a64(&b[..CHECKSUM_OFFSET]);
        put_u64(&mut b, CHECKSUM_OFFSET, sum);
        b
    }

    /// Asymmetric-fence files are version 5; a version-4 file with the flag
    /// comes from a build whose plain readers the barrier could skip, and is
    /// refused; version 4 without the flag is the locked format, unchanged.
    #[test]
    fn asymmetric_files_are_version_5_and_old_ones_are_refused() {
        let asym = sample();
        let len = asym.geometry.file_size();
        assert_eq!(get_u32(&asym.encode(), 8), ASYMMETRIC_FORMAT_VERSION);
        let locked = Header {
            asymmetric_fences: false,
            ..sample()
        };
        assert_eq!(get_u32(&locked.encode(), 8), FORMAT_VERSION);
        assert_eq!(Header::decode(&locked.encode(), len).unwrap(), locked);
        match Header::decode(&with_version(&asym, FORMAT_VERSION), len) {
            Err(Error::Incompatible { reason }) => assert!(reason.contains("delete the file")),
            other => panic!("an old asymmetric file was accepted: {other:?}"),
        }
        assert!(matches!(
            Header::decode(&with_version(&locked, ASYMMETRIC_FORMAT_VERSION), len),
            Err(Error::Incompatible { .. })
        ));
        assert!(matches!(
            Header::decode(&with_version(&locked, 6), len),
            Err(Error::Incompatible { .. })
        ));
    }

    #[test]
    fn every_single_byte_flip_is_rejected() {
        let h = sample();
        let good = h.encode();
        for i in 0..CHECKSUM_OFFSET + 8 {
            let mut b = good;
            b[i] ^= 0x40;
            assert!(
                Header::decode(&b, h.geometry.file_size()).is_err(),
                "flip at byte {i} accepted"
            );
        }
    }

    #[test]
    fn wrong_length_is_rejected() {
        let h = sample();
        let b = h.encode();
        assert!(matches!(
            Header::decode(&b, h.geometry.file_size() - 4096),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(Header::decode(&b, 10), Err(Error::Corrupt(_))));
    }

    #[test]
    fn reader_rows_follow_the_slots_inside_the_file() {
        for (capacity, mp) in [(16, 1), (64, 8), (4096, 64), (1 << 24, 1024)] {
            let g = Geometry {
                capacity,
                max_processes: mp,
            };
            assert_eq!(g.rows_offset() % 4096, 0);
            assert!(g.rows_offset() >= g.slots_offset() + g.slot_size() * capacity as u64);
            assert!(g.rows_offset() + 4 * g.row_entries() <= g.file_size());
            assert_eq!(g.row_entries(), RECORD_ROW_ENTRIES * mp as u64);
            // An entry holds slot index + 1.
            assert!((capacity as u64) < u32::MAX as u64);
        }
    }

    #[test]
    fn slots_are_cache_line_multiples() {
        for mp in [1, 15, 16, 17, 64, 1024] {
            let g = Geometry {
                capacity: 16,
                max_processes: mp,
            };
            assert_eq!(g.slot_size() % CACHE_LINE, 0);
            assert!(g.slot_size() >= SLOT_LANES + 4 * mp as u64);
        }
    }
}
