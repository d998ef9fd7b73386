//! The stored form of cache entries: the session record envelope (`record.rs`: versioned
//! header, CRC-32, JSON body, depth and size limits) with a body of one-letter fields.
//!
//! A value entry's body `data` holds `t` = `"v"`, `n` (namespace), `k` (key), `g` (the
//! namespace generation it was written under), `f` (fresh until, ms since the epoch) and `v`
//! (the value). A generation entry holds `t` = `"g"`, `n` and `g`. The header's expiry is
//! `Expiry::At(hard)`: the instant after which the entry is useless even as a stale value, so
//! stores with native expiry drop it then, and a scan finds it expired.
//!
//! Owns: encoding and validating entries. May not touch: the store or locks.

use crate::session::record::{self, Record, RecordBody};
use crate::session::{Expiry, StoredSession, Timestamp};
use crate::{Error, Result};
use serde_json::Value;

/// A decoded value entry.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ValueEntry {
    pub(super) namespace: String,
    pub(super) key: String,
    pub(super) generation: u64,
    pub(super) fresh_until: Timestamp,
    /// The last instant at which the entry is usable, even as a stale value: the header's
    /// `Expiry::At` (stores count a record expired when `now > At`).
    pub(super) last_usable: Timestamp,
    pub(super) value: Value,
}

/// A decoded generation entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Generation(pub(super) u64);

fn corrupt(what: &str) -> Error {
    Error::SessionCorrupt(format!("cache entry: {what}"))
}

fn body(fields: Vec<(&str, Value)>, version: u64) -> RecordBody {
    let mut b = RecordBody::default();
    for (k, v) in fields {
        b.changed.insert(k.to_owned(), version);
        b.data.insert(k.to_owned(), v);
    }
    b
}

fn to_stored(
    fields: Vec<(&str, Value)>,
    version: u64,
    now: Timestamp,
    expiry: Expiry,
    max: usize,
) -> Result<StoredSession> {
    let r = Record {
        version,
        created: now.0,
        expiry,
        body: body(fields, version),
    };
    StoredSession::from_record(record::encode(&r, max)?, now)
}

/// Encodes a value entry as record `version`; [`Error::TooLarge`] past `max` bytes,
/// [`Error::TooDeep`] for a value nested deeper than [`record::MAX_DEPTH`].
pub(super) fn encode_value(
    e: &ValueEntry,
    version: u64,
    now: Timestamp,
    max: usize,
) -> Result<StoredSession> {
    let fields = vec![
        ("t", Value::from("v")),
        ("n", Value::from(e.namespace.as_str())),
        ("k", Value::from(e.key.as_str())),
        ("g", Value::from(e.generation)),
        ("f", Value::from(e.fresh_until.0)),
        ("v", e.value.clone()),
    ];
    to_stored(fields, version, now, Expiry::At(e.last_usable), max)
}

/// Encodes a generation entry (it never expires).
pub(super) fn encode_generation(
    namespace: &str,
    g: Generation,
    version: u64,
    now: Timestamp,
    max: usize,
) -> Result<StoredSession> {
    let fields = vec![
        ("t", Value::from("g")),
        ("n", Value::from(namespace)),
        ("g", Value::from(g.0)),
    ];
    to_stored(fields, version, now, Expiry::At(Timestamp(u64::MAX)), max)
}

fn field<'a>(r: &'a Record, name: &str) -> Result<&'a Value> {
    r.body
        .data
        .get(name)
        .ok_or_else(|| corrupt(&format!("no field {name:?}")))
}

fn string(r: &Record, name: &str) -> Result<String> {
    field(r, name)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| corrupt(&format!("{name:?} is not a string")))
}

fn number(r: &Record, name: &str) -> Result<u64> {
    field(r, name)?
        .as_u64()
        .ok_or_else(|| corrupt(&format!("{name:?} is not a number")))
}

fn decode_kind(bytes: &[u8], max: usize, kind: &str) -> Result<Record> {
    let r = record::decode(bytes, max)?;
    if string(&r, "t")? != kind {
        return Err(corrupt("unexpected kind"));
    }
    Ok(r)
}

/// Decodes and validates a value entry: [`Error::SessionCorrupt`] or [`Error::TooLarge`],
/// never a panic.
pub(super) fn decode_value(bytes: &[u8], max: usize) -> Result<ValueEntry> {
    let mut r = decode_kind(bytes, max, "v")?;
    let last_usable = match r.expiry {
        Expiry::At(t) => t,
        _ => return Err(corrupt("expiry is not a fixed time")),
    };
    let (namespace, key) = (string(&r, "n")?, string(&r, "k")?);
    let generation = number(&r, "g")?;
    let fresh_until = Timestamp(number(&r, "f")?);
    // Moved out, not cloned: a value may be large.
    let value = r
        .body
        .data
        .remove("v")
        .ok_or_else(|| corrupt("no field \"v\""))?;
    Ok(ValueEntry {
        namespace,
        key,
        generation,
        fresh_until,
        last_usable,
        value,
    })
}

/// Decodes a generation entry of `namespace`.
pub(super) fn decode_generation(bytes: &[u8], max: usize, namespace: &str) -> Result<Generation> {
    let r = decode_kind(bytes, max, "g")?;
    if string(&r, "n")? != namespace {
        return Err(corrupt("generation of another namespace"));
    }
    Ok(Generation(number(&r, "g")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ValueEntry {
        ValueEntry {
            namespace: "pages".into(),
            key: "/index".into(),
            generation: 42,
            fresh_until: Timestamp(2_000),
            last_usable: Timestamp(3_000),
            value: serde_json::json!({"html": "<p>hi</p>", "n": [1, 2]}),
        }
    }

    #[test]
    fn value_entries_round_trip_and_every_flip_is_caught() {
        let s = encode_value(&sample(), 3, Timestamp(1_000), 1 << 20).unwrap();
        assert_eq!(s.meta.version, 3);
        assert_eq!(s.meta.expiry, Expiry::At(Timestamp(3_000)));
        assert_eq!(decode_value(&s.bytes, 1 << 20).unwrap(), sample());
        for i in 0..s.bytes.len() {
            let mut b = s.bytes.clone();
            b[i] ^= 0x01;
            assert!(decode_value(&b, 1 << 20).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn kinds_limits_and_garbage_are_typed_errors() {
        let g = encode_generation("pages", Generation(9), 1, Timestamp(1), 1 << 20).unwrap();
        assert_eq!(
            decode_generation(&g.bytes, 1 << 20, "pages").unwrap(),
            Generation(9)
        );
        assert!(decode_generation(&g.bytes, 1 << 20, "other").is_err());
        assert!(matches!(
            decode_value(&g.bytes, 1 << 20),
            Err(Error::SessionCorrupt(_))
        ));
        let v = encode_value(&sample(), 1, Timestamp(1), 1 << 20).unwrap();
        assert!(matches!(
            decode_value(&v.bytes, 10),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            encode_value(&sample(), 1, Timestamp(1), 10),
            Err(Error::TooLarge { .. })
        ));
        for junk in [&b""[..], b"LTS2\n", &[0xff; 200]] {
            assert!(decode_value(junk, 1 << 20).is_err());
        }
    }
}
