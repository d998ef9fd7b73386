//! The stored form of a session: a checksummed, versioned envelope around a JSON body.
//!
//! ```text
//! LTS2 <version> <created_ms> <expiry> <body_len> <crc32_hex>\n<JSON body>
//! ```
//! `<expiry>` is `d` (the manager's default), `i<ms>` (idle timeout of its own) or `a<ms>` (a fixed
//! time). Records of the first format, `LTS1` (no expiry field), are still read. The header holds
//! everything a store or `gc` needs to expire a session without decoding the body.
//! The CRC-32 (IEEE) covers the header fields before it and the body. JSON was chosen because it
//! cannot run code when read (unlike pickle) and any backend can store it. The body holds the data,
//! each key's last-changed version (a removed key keeps its entry: a tombstone) and a floor below
//! which pruned tombstones are no longer known.

use super::store::{Expiry, Timestamp};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const MAGIC: &str = "LTS2";
const MAGIC_V1: &str = "LTS1";
/// The head of a session stored by key (see [`Head`]): the record's header fields, then a body
/// with each key's change version and value size instead of the values.
const MAGIC_HEAD: &str = "LTH1";
/// One value of a session stored by key (see [`encode_value`]).
const MAGIC_VALUE: &str = "LTV1";
/// Longest header line accepted, newline included: reading this many bytes of a record always
/// gives its whole header.
pub const MAX_HEADER_LEN: usize = 128;
/// Deepest nesting of arrays and objects in one stored value. The same limit is checked when a
/// value is inserted and when a record is read back, and it stays well below the JSON parser's
/// own recursion limit (128, counting the two levels of the record body around each value).
pub const MAX_DEPTH: usize = 64;

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
    /// The session's expiry rule (in the header, readable without decoding the body).
    pub expiry: Expiry,
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
    /// The session's expiry rule ([`Expiry::Default`] for `LTS1` records).
    pub expiry: Expiry,
}

/// Incremental CRC-32 (IEEE 802.3, reflected, as in zlib). Computed by `crc32fast`, which
/// uses the CPU's carry-less multiply where it has one: the same checksum as the byte-at-a-time
/// table this replaced, several times faster on the large bodies every uncached load checks.
#[derive(Debug, Clone)]
pub struct Crc32(crc32fast::Hasher);

impl Crc32 {
    /// Starts a checksum.
    pub fn new() -> Self {
        Crc32(crc32fast::Hasher::new())
    }
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The checksum of everything added.
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

/// The header fields before the checksum, as text (the checksum covers them).
fn fields(magic: &str, h: &Header, body_len: usize) -> String {
    debug_assert!(magic != MAGIC_VALUE);
    if magic == MAGIC_V1 {
        return format!("{MAGIC_V1} {} {} {body_len}", h.version, h.created);
    }
    let expiry = match h.expiry {
        Expiry::Default => "d".to_owned(),
        Expiry::Idle(d) => format!("i{}", d.as_millis().min(u64::MAX as u128)),
        Expiry::At(t) => format!("a{}", t.0),
    };
    format!("{magic} {} {} {expiry} {body_len}", h.version, h.created)
}

fn parse_expiry(p: &str) -> Option<Expiry> {
    let num = |t: &str| t.parse::<u64>().ok();
    match p.split_at_checked(1)? {
        ("d", "") => Some(Expiry::Default),
        ("i", ms) => num(ms).map(|ms| Expiry::Idle(Duration::from_millis(ms))),
        ("a", ms) => num(ms).map(|ms| Expiry::At(Timestamp(ms))),
        _ => None,
    }
}

fn checksum(magic: &str, h: &Header, body: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(fields(magic, h, body.len()).as_bytes());
    c.update(body);
    c.finish()
}

/// Nesting depth of a value (a scalar is 0, `[1]` is 1), computed without recursion so that a
/// hostile value cannot overflow the stack here.
pub fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        deepest = deepest.max(d + 1);
        stack.extend(children.map(|c| (c, d + 1)));
    }
    deepest
}

/// Refuses a value deeper than [`MAX_DEPTH`] with [`Error::TooDeep`].
pub fn check_depth(v: &Value) -> Result<()> {
    match depth(v) {
        d if d > MAX_DEPTH => Err(Error::TooDeep {
            depth: d,
            limit: MAX_DEPTH,
        }),
        _ => Ok(()),
    }
}

/// Encodes a record; [`Error::TooLarge`] if the result would exceed `max_size` bytes,
/// [`Error::TooDeep`] if a value nests deeper than [`MAX_DEPTH`].
pub fn encode(record: &Record, max_size: usize) -> Result<Vec<u8>> {
    for v in record.body.data.values() {
        check_depth(v)?;
    }
    let body = serde_json::to_vec(&record.body)?;
    let h = Header {
        version: record.version,
        created: record.created,
        expiry: record.expiry,
    };
    let crc = checksum(MAGIC, &h, &body);
    let header = format!("{} {crc:08x}\n", fields(MAGIC, &h, body.len()));
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
    magic: &'static str,
    header: Header,
    len: usize,
    crc: u32,
    body: &'a [u8],
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>> {
    let nl = bytes
        .iter()
        .take(MAX_HEADER_LEN)
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header line"))?;
    let line = std::str::from_utf8(&bytes[..nl]).map_err(|_| corrupt("header is not UTF-8"))?;
    let mut parts = line.split(' ');
    let magic = match parts.next() {
        Some(MAGIC) => MAGIC,
        Some(MAGIC_V1) => MAGIC_V1,
        Some(MAGIC_HEAD) => MAGIC_HEAD,
        _ => return Err(corrupt("unknown record format")),
    };
    let num = |p: Option<&str>, what: &str| -> Result<u64> {
        p.and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| corrupt(what))
    };
    let version = num(parts.next(), "bad version")?;
    let created = num(parts.next(), "bad creation time")?;
    let expiry = if magic != MAGIC_V1 {
        parts
            .next()
            .and_then(parse_expiry)
            .ok_or_else(|| corrupt("bad expiry"))?
    } else {
        Expiry::Default
    };
    let len =
        usize::try_from(num(parts.next(), "bad length")?).map_err(|_| corrupt("bad length"))?;
    let crc = parts
        .next()
        .filter(|p| p.len() == 8)
        .and_then(|p| u32::from_str_radix(p, 16).ok())
        .ok_or_else(|| corrupt("bad checksum field"))?;
    if parts.next().is_some() {
        return Err(corrupt("extra header fields"));
    }
    Ok(Parsed {
        magic,
        header: Header {
            version,
            created,
            expiry,
        },
        len,
        crc,
        body: &bytes[nl + 1..],
    })
}

/// Reads only the header (no checksum check) of a record or a head; for stores that need the
/// version or creation time.
pub fn peek_header(bytes: &[u8]) -> Result<Header> {
    parse(bytes).map(|p| p.header)
}

/// Parses and checks size limit, header, length and checksum; `head`: a head is expected, else
/// a record.
fn checked(bytes: &[u8], max_size: usize, head: bool) -> Result<Parsed<'_>> {
    if bytes.len() > max_size {
        return Err(Error::TooLarge {
            size: bytes.len(),
            limit: max_size,
        });
    }
    let p = parse(bytes)?;
    if (p.magic == MAGIC_HEAD) != head {
        return Err(corrupt(if head {
            "a whole record where a head was expected"
        } else {
            "a head where a whole record was expected"
        }));
    }
    if p.body.len() != p.len {
        return Err(corrupt("length mismatch (torn or truncated record)"));
    }
    if checksum(p.magic, &p.header, p.body) != p.crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(p)
}

/// The length of the record or head that `prefix` (at least its header line) starts: header
/// line plus body, as the header says (not checked against anything yet).
pub fn framed_len(prefix: &[u8]) -> Result<usize> {
    let p = parse(prefix)?;
    (prefix.len() - p.body.len())
        .checked_add(p.len)
        .ok_or_else(|| corrupt("bad length"))
}

/// Where each live key's value lies in a file that holds a head of `head_len` bytes followed
/// by the values of its live keys in key order: `(key, offset, length)`.
pub fn value_offsets(head: &Head, head_len: u64) -> Vec<(&str, u64, u64)> {
    let mut at = head_len;
    let mut out = Vec::with_capacity(head.keys.len());
    for (k, s) in &head.keys {
        if let Some(n) = s.size {
            out.push((k.as_str(), at, n));
            at = at.saturating_add(n);
        }
    }
    out
}

/// True when `bytes` start like a head (stored by key), not a whole record.
pub fn is_head(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC_HEAD.as_bytes())
}

/// Decodes and fully validates a record: size limit, header, length, checksum, JSON.
pub fn decode(bytes: &[u8], max_size: usize) -> Result<Record> {
    let p = checked(bytes, max_size, false)?;
    let body: RecordBody =
        serde_json::from_slice(p.body).map_err(|e| corrupt(&format!("bad body: {e}")))?;
    if body.data.keys().any(|k| !body.changed.contains_key(k)) {
        return Err(corrupt("key without change version"));
    }
    if body.data.values().any(|v| depth(v) > MAX_DEPTH) {
        return Err(corrupt("value nested deeper than the limit"));
    }
    Ok(Record {
        version: p.header.version,
        created: p.header.created,
        expiry: p.header.expiry,
        body,
    })
}

/// What one key's entry in a [`Head`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// The version at which the key was last inserted or removed.
    #[serde(rename = "c")]
    pub changed: u64,
    /// Size of the stored value ([`encode_value`]); `None` for a removed key (a tombstone).
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// The part of a session record that conflicts and expiry need, without the values: what a
/// store that keeps a session's values one per key stores beside them (see
/// [`Store::load_head`](super::Store::load_head)).
///
/// ```text
/// LTH1 <version> <created_ms> <expiry> <body_len> <crc32_hex>\n{"keys":{"<key>":{"c":3,"n":120},...},"floor":0}
/// ```
/// A key with a size is live; one without is a tombstone. The values are stored apart, each
/// one tagged with the version that wrote it (its key's `changed`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// Record version.
    pub version: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created: u64,
    /// The session's expiry rule.
    pub expiry: Expiry,
    /// Every key's change version, and the size of each live key's stored value.
    pub keys: BTreeMap<String, KeyState>,
    /// As [`RecordBody::floor`].
    pub floor: u64,
}

#[derive(Serialize, Deserialize)]
struct HeadBody {
    keys: BTreeMap<String, KeyState>,
    #[serde(default)]
    floor: u64,
}

impl Head {
    /// Sum of the sizes of the live keys' stored values.
    pub fn values_size(&self) -> u64 {
        self.keys
            .values()
            .filter_map(|k| k.size)
            .fold(0u64, u64::saturating_add)
    }

    /// The live keys, in order.
    pub fn live_keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.keys
            .iter()
            .filter(|(_, k)| k.size.is_some())
            .map(|(k, _)| k.as_str())
    }
}

/// Encodes a head (the checksum covers header fields and body, as for a record).
pub fn encode_head(head: &Head) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(&HeadBody {
        keys: head.keys.clone(),
        floor: head.floor,
    })?;
    let h = Header {
        version: head.version,
        created: head.created,
        expiry: head.expiry,
    };
    let crc = checksum(MAGIC_HEAD, &h, &body);
    let mut out = format!("{} {crc:08x}\n", fields(MAGIC_HEAD, &h, body.len())).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes and fully validates a head (size limit, header, length, checksum, JSON).
pub fn decode_head(bytes: &[u8], max_size: usize) -> Result<Head> {
    let p = checked(bytes, max_size, true)?;
    let body: HeadBody =
        serde_json::from_slice(p.body).map_err(|e| corrupt(&format!("bad head: {e}")))?;
    Ok(Head {
        version: p.header.version,
        created: p.header.created,
        expiry: p.header.expiry,
        keys: body.keys,
        floor: body.floor,
    })
}

/// The CRC of a value: its tag, its key and its JSON, so that a value read under another key
/// or of another version is detected.
fn value_crc(key: &str, tag: u64, json: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(format!("{MAGIC_VALUE} {tag} {}\0", key.len()).as_bytes());
    c.update(key.as_bytes());
    c.update(json);
    c.finish()
}

/// Encodes one value of a session stored by key: `LTV1 <tag> <crc32_hex>\n<JSON>`, where the
/// tag is the version that wrote it and the CRC covers tag, key and JSON.
/// [`Error::TooDeep`] if the value nests deeper than [`MAX_DEPTH`].
pub fn encode_value(key: &str, tag: u64, value: &Value) -> Result<Vec<u8>> {
    check_depth(value)?;
    let json = serde_json::to_vec(value)?;
    let mut out = format!("{MAGIC_VALUE} {tag} {:08x}\n", value_crc(key, tag, &json)).into_bytes();
    out.extend_from_slice(&json);
    Ok(out)
}

/// Decodes one stored value of `key` and checks it against its head entry: the size, the tag
/// (the version that wrote it must be the key's `changed`), the CRC (which covers the key), the
/// JSON and the nesting depth. Anything else is [`Error::SessionCorrupt`].
pub fn decode_value(key: &str, state: &KeyState, bytes: &[u8]) -> Result<Value> {
    if state.size != Some(bytes.len() as u64) {
        return Err(corrupt("stored value's size disagrees with its head"));
    }
    let nl = bytes
        .iter()
        .take(64)
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("value without a header line"))?;
    let line = std::str::from_utf8(&bytes[..nl]).map_err(|_| corrupt("bad value header"))?;
    let mut parts = line.split(' ');
    let (Some(MAGIC_VALUE), Some(tag), Some(crc), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt("bad value header"));
    };
    let tag: u64 = tag.parse().map_err(|_| corrupt("bad value tag"))?;
    let crc = u32::from_str_radix(crc, 16)
        .ok()
        .filter(|_| crc.len() == 8)
        .ok_or_else(|| corrupt("bad value checksum field"))?;
    if tag != state.changed {
        return Err(corrupt(
            "stored value of another version than its head says",
        ));
    }
    let json = &bytes[nl + 1..];
    if value_crc(key, tag, json) != crc {
        return Err(corrupt("value checksum mismatch"));
    }
    let v: Value = serde_json::from_slice(json).map_err(|e| corrupt(&format!("bad value: {e}")))?;
    if depth(&v) > MAX_DEPTH {
        return Err(corrupt("value nested deeper than the limit"));
    }
    Ok(v)
}

/// A session's stored values: (key, [`encode_value`] bytes), in key order.
pub type StoredValues = Vec<(String, Vec<u8>)>;

/// Splits a record into its head and its stored values.
pub fn split(record: &Record) -> Result<(Head, StoredValues)> {
    let mut keys = BTreeMap::new();
    let mut values = Vec::with_capacity(record.body.data.len());
    for (k, &changed) in &record.body.changed {
        let size = match record.body.data.get(k) {
            Some(v) => {
                let bytes = encode_value(k, changed, v)?;
                let n = bytes.len() as u64;
                values.push((k.clone(), bytes));
                Some(n)
            }
            None => None,
        };
        keys.insert(k.clone(), KeyState { changed, size });
    }
    let head = Head {
        version: record.version,
        created: record.created,
        expiry: record.expiry,
        keys,
        floor: record.body.floor,
    };
    Ok((head, values))
}

/// Joins a head and its stored values (every live key's, validated) into a record.
pub fn join(head: &Head, values: &BTreeMap<String, Vec<u8>>) -> Result<Record> {
    let mut body = RecordBody {
        floor: head.floor,
        ..RecordBody::default()
    };
    for (k, state) in &head.keys {
        body.changed.insert(k.clone(), state.changed);
        if state.size.is_some() {
            let bytes = values
                .get(k)
                .ok_or_else(|| corrupt("a live key's stored value is missing"))?;
            body.data.insert(k.clone(), decode_value(k, state, bytes)?);
        }
    }
    Ok(Record {
        version: head.version,
        created: head.created,
        expiry: head.expiry,
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
            expiry: Expiry::Idle(Duration::from_secs(90)),
            body,
        }
    }

    #[test]
    fn crc32_known_vector() {
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
    }

    /// The bitwise CRC-32 that records were written with before `crc32fast`: every length,
    /// split into chunks anywhere, must give the same checksum, or stored records stop loading.
    #[test]
    fn crc32_matches_the_bitwise_definition_at_every_length_and_split() {
        fn bitwise(bytes: &[u8]) -> u32 {
            let mut c = 0xFFFF_FFFFu32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            c ^ 0xFFFF_FFFF
        }
        let data: Vec<u8> = (0..2000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..300).chain([511, 512, 513, 1024, 2000]) {
            let want = bitwise(&data[..len]);
            for split in [0, 1, 7, 64, len / 2, len] {
                let split = split.min(len);
                let mut c = Crc32::new();
                c.update(&data[..split]);
                c.update(&data[split..len]);
                assert_eq!(c.finish(), want, "length {len}, split at {split}");
            }
        }
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
                created: 1_700_000_000_000,
                expiry: Expiry::Idle(Duration::from_secs(90)),
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
    fn first_format_records_are_still_read() {
        let body = br#"{"data":{"a":1},"changed":{"a":2}}"#;
        let h = Header {
            version: 2,
            created: 5,
            expiry: Expiry::Default,
        };
        let crc = checksum(MAGIC_V1, &h, body);
        let mut bytes = format!("{} {crc:08x}\n", fields(MAGIC_V1, &h, body.len())).into_bytes();
        bytes.extend_from_slice(body);
        let r = decode(&bytes, 1 << 20).unwrap();
        assert_eq!((r.version, r.created, r.expiry), (2, 5, Expiry::Default));
    }

    #[test]
    fn depth_limit_is_the_same_on_both_sides() {
        let nest = |n: usize| {
            let mut v = Value::from(1);
            for _ in 0..n {
                v = Value::Array(vec![v]);
            }
            v
        };
        let mut r = sample();
        r.body.data.insert("deep".into(), nest(MAX_DEPTH));
        r.body.changed.insert("deep".into(), 3);
        let bytes = encode(&r, 1 << 20).unwrap();
        assert_eq!(decode(&bytes, 1 << 20).unwrap(), r);
        r.body.data.insert("deep".into(), nest(MAX_DEPTH + 1));
        assert!(matches!(encode(&r, 1 << 20), Err(Error::TooDeep { .. })));
        assert_eq!(depth(&nest(5_000)), 5_000);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        for g in [&b""[..], b"\n", b"LTS1\n", b"LTS1 1 2 3 zz\n", &[0xff; 300]] {
            assert!(matches!(decode(g, 1 << 20), Err(Error::SessionCorrupt(_))));
        }
    }
    fn sample_split() -> (Head, StoredValues) {
        let mut r = sample();
        r.body
            .data
            .insert("a\0b\n \u{1F600}".into(), Value::from(vec![1, 2]));
        r.body.changed.insert("a\0b\n \u{1F600}".into(), 2);
        split(&r).unwrap()
    }

    #[test]
    fn a_record_splits_and_joins_back() {
        let r = sample();
        let (head, values) = split(&r).unwrap();
        assert_eq!(head.live_keys().collect::<Vec<_>>(), ["user"]);
        assert_eq!(head.keys["gone"].size, None, "tombstone kept");
        let bytes = encode_head(&head).unwrap();
        assert!(is_head(&bytes) && !is_head(&encode(&r, 1 << 20).unwrap()));
        assert_eq!(framed_len(&bytes).unwrap(), bytes.len());
        assert_eq!(decode_head(&bytes, 1 << 20).unwrap(), head);
        assert_eq!(join(&head, &values.into_iter().collect()).unwrap(), r);
        assert_eq!(peek_header(&bytes).unwrap().version, 3);
    }

    /// A head is never read as a record nor a record as a head, and every byte flip or
    /// truncation of a head is a typed error.
    #[test]
    fn every_damage_to_a_head_is_detected() {
        let (head, _) = sample_split();
        let bytes = encode_head(&head).unwrap();
        let record = encode(&sample(), 1 << 20).unwrap();
        assert!(matches!(
            decode(&bytes, 1 << 20),
            Err(Error::SessionCorrupt(_))
        ));
        assert!(matches!(
            decode_head(&record, 1 << 20),
            Err(Error::SessionCorrupt(_))
        ));
        assert!(matches!(
            decode_head(&bytes, 10),
            Err(Error::TooLarge { .. })
        ));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(decode_head(&b, 1 << 20).is_err(), "flip at {i} undetected");
            assert!(
                decode_head(&bytes[..i], 1 << 20).is_err(),
                "truncation at {i}"
            );
        }
    }

    /// A value of another version, another key, another size, or with any damaged byte is
    /// `SessionCorrupt`; keys with any characters are fine.
    #[test]
    fn a_value_is_checked_against_its_head() {
        let (head, values) = sample_split();
        for (k, bytes) in &values {
            let state = head.keys[k];
            assert!(decode_value(k, &state, bytes).is_ok());
            let other_version = KeyState {
                changed: state.changed + 1,
                ..state
            };
            let other_size = KeyState {
                size: state.size.map(|n| n + 1),
                ..state
            };
            for (key, st) in [
                ("other", state),
                (k.as_str(), other_version),
                (k.as_str(), other_size),
            ] {
                assert!(matches!(
                    decode_value(key, &st, bytes),
                    Err(Error::SessionCorrupt(_))
                ));
            }
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x01;
                assert!(
                    decode_value(k, &state, &b).is_err(),
                    "flip at {i} undetected"
                );
            }
        }
        let missing: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        assert!(matches!(
            join(&head, &missing),
            Err(Error::SessionCorrupt(_))
        ));
        let deep = (0..=MAX_DEPTH).fold(Value::from(1), |v, _| Value::Array(vec![v]));
        assert!(matches!(
            encode_value("k", 1, &deep),
            Err(Error::TooDeep { .. })
        ));
    }
}
