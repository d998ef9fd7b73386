//! The stored form of a session: a checksummed, versioned envelope around a JSON body.
//!
//! ```text
//! LTS1 <version> <created_ms> <body_len> <crc32_hex>\n<JSON body>
//! ```
//! The CRC-32 (IEEE) covers the header fields before it and the body. JSON was chosen because it
//! cannot run code when read (unlike pickle) and any backend can store it. The body holds the data,
//! each key's last-changed version (a removed key keeps its entry: a tombstone) and a floor below
//! which pruned tombstones are no longer known.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

const MAGIC: &str = "LTS1";
/// Longest header we accept before the newline.
const MAX_HEADER: usize = 96;

/// The mutable part of a session record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordBody {
    /// Live keys and their values.
    pub data: BTreeMap<String, Value>,
    /// The version at which each key was last inserted or removed. A key listed here but absent
    /// from `data` is a tombstone.
    pub changed: BTreeMap<String, u64>,
    /// Tombstones of versions `<= floor` were pruned: a request loaded before `floor` cannot be
    /// proven conflict-free for keys without an entry in `changed`, so it gets a conflict.
    #[serde(default)]
    pub floor: u64,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Bumped by every data write; 1 for a new session.
    pub version: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created: u64,
    /// Data and change history.
    pub body: RecordBody,
}

/// Fields of the header, readable without parsing or checking the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Record version.
    pub version: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created: u64,
}

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// Incremental CRC-32 (IEEE 802.3, reflected, as in zlib).
#[derive(Debug, Clone, Copy)]
pub struct Crc32(u32);

impl Crc32 {
    /// Starts a checksum.
    pub fn new() -> Self {
        Crc32(0xFFFF_FFFF)
    }
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = CRC_TABLE[((self.0 ^ b as u32) & 0xFF) as usize] ^ (self.0 >> 8);
        }
    }
    /// The checksum of everything added.
    pub fn finish(self) -> u32 {
        self.0 ^ 0xFFFF_FFFF
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

fn checksum(version: u64, created: u64, body: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(format!("{MAGIC} {version} {created} {}", body.len()).as_bytes());
    c.update(body);
    c.finish()
}

/// Encodes a record; [`Error::TooLarge`] if the result would exceed `max_size` bytes.
pub fn encode(record: &Record, max_size: usize) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(&record.body)?;
    let crc = checksum(record.version, record.created, &body);
    let header = format!(
        "{MAGIC} {} {} {} {crc:08x}\n",
        record.version,
        record.created,
        body.len()
    );
    let size = header.len() + body.len();
    if size > max_size {
        return Err(Error::TooLarge {
            size,
            limit: max_size,
        });
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn corrupt(what: &str) -> Error {
    Error::SessionCorrupt(what.to_owned())
}

struct Parsed<'a> {
    header: Header,
    len: usize,
    crc: u32,
    body: &'a [u8],
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>> {
    let nl = bytes
        .iter()
        .take(MAX_HEADER + 1)
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header line"))?;
    let line = std::str::from_utf8(&bytes[..nl]).map_err(|_| corrupt("header is not UTF-8"))?;
    let mut parts = line.split(' ');
    if parts.next() != Some(MAGIC) {
        return Err(corrupt("unknown record format"));
    }
    let mut num = |what: &str| -> Result<u64> {
        parts
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| corrupt(what))
    };
    let version = num("bad version")?;
    let created = num("bad creation time")?;
    let len = usize::try_from(num("bad length")?).map_err(|_| corrupt("bad length"))?;
    let crc = parts
        .next()
        .filter(|p| p.len() == 8)
        .and_then(|p| u32::from_str_radix(p, 16).ok())
        .ok_or_else(|| corrupt("bad checksum field"))?;
    if parts.next().is_some() {
        return Err(corrupt("extra header fields"));
    }
    Ok(Parsed {
        header: Header { version, created },
        len,
        crc,
        body: &bytes[nl + 1..],
    })
}

/// Reads only the header (no checksum check); for stores that need the version or creation time.
pub fn peek_header(bytes: &[u8]) -> Result<Header> {
    parse(bytes).map(|p| p.header)
}

/// Decodes and fully validates a record: size limit, header, length, checksum, JSON.
pub fn decode(bytes: &[u8], max_size: usize) -> Result<Record> {
    if bytes.len() > max_size {
        return Err(Error::TooLarge {
            size: bytes.len(),
            limit: max_size,
        });
    }
    let p = parse(bytes)?;
    if p.body.len() != p.len {
        return Err(corrupt("length mismatch (torn or truncated record)"));
    }
    if checksum(p.header.version, p.header.created, p.body) != p.crc {
        return Err(corrupt("checksum mismatch"));
    }
    let body: RecordBody =
        serde_json::from_slice(p.body).map_err(|e| corrupt(&format!("bad body: {e}")))?;
    if body.data.keys().any(|k| !body.changed.contains_key(k)) {
        return Err(corrupt("key without change version"));
    }
    Ok(Record {
        version: p.header.version,
        created: p.header.created,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut body = RecordBody::default();
        body.data.insert("user".into(), Value::from("ann"));
        body.changed.insert("user".into(), 3);
        body.changed.insert("gone".into(), 2);
        Record {
            version: 3,
            created: 1_700_000_000_000,
            body,
        }
    }

    #[test]
    fn crc32_known_vector() {
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
    }

    #[test]
    fn roundtrip_and_header() {
        let r = sample();
        let bytes = encode(&r, 1 << 20).unwrap();
        assert_eq!(decode(&bytes, 1 << 20).unwrap(), r);
        assert_eq!(
            peek_header(&bytes).unwrap(),
            Header {
                version: 3,
                created: 1_700_000_000_000
            }
        );
    }

    #[test]
    fn every_single_byte_flip_and_truncation_is_detected() {
        let bytes = encode(&sample(), 1 << 20).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(decode(&b, 1 << 20).is_err(), "flip at {i} undetected");
            assert!(decode(&bytes[..i], 1 << 20).is_err(), "truncation at {i}");
        }
    }

    #[test]
    fn size_limit_is_enforced_both_ways() {
        let bytes = encode(&sample(), 1 << 20).unwrap();
        assert!(matches!(
            encode(&sample(), 10),
            Err(Error::TooLarge { limit: 10, .. })
        ));
        assert!(matches!(
            decode(&bytes, 10),
            Err(Error::TooLarge { limit: 10, .. })
        ));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        for g in [&b""[..], b"\n", b"LTS1\n", b"LTS1 1 2 3 zz\n", &[0xff; 300]] {
            assert!(matches!(decode(g, 1 << 20), Err(Error::SessionCorrupt(_))));
        }
    }
}
