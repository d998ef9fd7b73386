//! The session cookie: its attributes, its signature or encryption, and key rotation.
//!
//! Owns: turning a session ID into a `Set-Cookie` value and a request's `Cookie` header back
//! into a session ID that this server issued, and the per-layer memo of cookie values that
//! verified ([`CookieCodec`]). May not touch: the store or the lock table; all of this is CPU
//! work on the request's headers.

use crate::session::{SessionId, Timestamp};
use cookie::{Cookie, CookieJar, Key, SameSite};
use http::header::HeaderValue;
use parking_lot::RwLock;
use siphasher::sip::SipHasher13;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// How the cookie's value is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// HMAC-SHA256 signature: the client sees the session ID but cannot forge or alter one
    /// (the default).
    Signed,
    /// AEAD (AES-256-GCM) encryption: the client cannot read the session ID either.
    Private,
}

/// Settings of the session cookie. Secure by default: signed, `HttpOnly`, `Secure`,
/// `SameSite=Lax`, `Path=/`.
///
/// A request may send several cookies of this name (stale ones on other paths or domains
/// beside the live one): the first 8 are verified, in the order sent, and the first that names
/// a live session is used. Values after the 8th are ignored, so that a request stuffed with
/// cookies of this name costs at most 8 checks.
///
/// ```
/// use locktable::web::{CookieConfig, Key};
/// let old = Key::generate();
/// let cfg = CookieConfig::new(Key::generate())
///     .verify_with(old)          // cookies signed with the old key are still accepted
///     .host_prefix(true);        // the cookie is named `__Host-lt_session`
/// assert_eq!(cfg.cookie_name(), "__Host-lt_session");
/// ```
#[derive(Clone)]
pub struct CookieConfig {
    name: String,
    key: Key,
    verify_keys: Vec<Key>,
    protection: Protection,
    secure: bool,
    http_only: bool,
    same_site: SameSite,
    host_prefix: bool,
}

impl std::fmt::Debug for CookieConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("CookieConfig")
            .field("name", &self.cookie_name())
            .field("verify_keys", &self.verify_keys.len())
            .field("protection", &self.protection)
            .field("secure", &self.secure)
            .field("http_only", &self.http_only)
            .field("same_site", &self.same_site)
            .finish_non_exhaustive()
    }
}

impl CookieConfig {
    /// A cookie named `lt_session`, signed with `key` (HMAC-SHA256).
    ///
    /// Keep the key secret and the same in every process that serves the sessions
    /// (e.g. `Key::try_from(&secret_bytes[..])` with 64 bytes from a secret store).
    pub fn new(key: Key) -> CookieConfig {
        CookieConfig {
            name: "lt_session".into(),
            key,
            verify_keys: Vec::new(),
            protection: Protection::Signed,
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            host_prefix: false,
        }
    }

    /// Another cookie name (without the `__Host-` prefix): an RFC 6265 token (visible ASCII,
    /// no spaces or separators such as `=`, `;`, `,`); [`SessionLayer::new`](super::SessionLayer::new)
    /// refuses any other.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// An extra key that verifies (never signs) cookies: the previous key during a rotation.
    pub fn verify_with(mut self, old_key: Key) -> Self {
        self.verify_keys.push(old_key);
        self
    }

    /// Signed (default) or private (encrypted) cookies.
    pub fn protection(mut self, p: Protection) -> Self {
        self.protection = p;
        self
    }

    /// The `Secure` attribute (default on). Turn it off only for plain-HTTP development; the
    /// `__Host-` prefix forces it on.
    pub fn secure(mut self, on: bool) -> Self {
        self.secure = on;
        self
    }

    /// The `SameSite` attribute (default `Lax`). `SameSite::None` needs `Secure` (browsers drop
    /// such a cookie without it), so [`SessionLayer::new`](super::SessionLayer::new) refuses it
    /// with `secure(false)` unless the `__Host-` prefix forces `Secure` on.
    pub fn same_site(mut self, s: SameSite) -> Self {
        self.same_site = s;
        self
    }

    /// Name the cookie `__Host-<name>`: browsers then accept it only with `Secure`, `Path=/` and
    /// no `Domain`, so a sibling subdomain cannot plant or overwrite it.
    pub fn host_prefix(mut self, on: bool) -> Self {
        self.host_prefix = on;
        self
    }

    /// The cookie's name as sent.
    pub fn cookie_name(&self) -> String {
        if self.host_prefix {
            format!("__Host-{}", self.name)
        } else {
            self.name.clone()
        }
    }

    /// Refuses settings with which no cookie could work: a name that is not an RFC 6265 token
    /// (empty, or with a space, a control character, a separator such as `=` or `;`, or a byte
    /// outside ASCII) would either make no `Set-Cookie` header at all or come back under
    /// another name, so every write would make a new session. Checked when the layer is built.
    pub(crate) fn check(&self) -> crate::Result<()> {
        let name = self.cookie_name();
        let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
        if self.name.is_empty() || !name.bytes().all(token) {
            return Err(crate::Error::InvalidOptions(format!(
                "cookie name {name:?} is not a token (RFC 6265): use visible ASCII without \
                 spaces or any of ()<>@,;:\\\"/[]?={{}}"
            )));
        }
        if self.same_site == SameSite::None && !self.is_secure() {
            // Browsers refuse `SameSite=None` without `Secure`: the cookie would never come
            // back, and every write would make a new session.
            return Err(crate::Error::InvalidOptions(
                "SameSite=None needs the Secure attribute: browsers drop the cookie without it"
                    .into(),
            ));
        }
        let id = SessionId::generate()?;
        if self.issue(&id, Timestamp(0), Timestamp(1000)).is_none() || self.clear().is_none() {
            return Err(crate::Error::InvalidOptions(
                "the session cookie cannot be written as a header".into(),
            ));
        }
        Ok(())
    }

    fn is_secure(&self) -> bool {
        self.secure || self.host_prefix
    }

    /// Verifies (or decrypts) one cookie with the signing key, then each verification key:
    /// the session ID, with `true` when only a verification (old) key accepted it.
    fn open(&self, c: Cookie<'static>) -> Option<(SessionId, bool)> {
        std::iter::once(&self.key)
            .chain(&self.verify_keys)
            .enumerate()
            .find_map(|(i, key)| {
                let jar = CookieJar::new();
                let plain = match self.protection {
                    Protection::Signed => jar.signed(key).verify(c.clone()),
                    Protection::Private => jar.private(key).decrypt(c.clone()),
                }?;
                SessionId::parse(plain.value()).ok().map(|id| (id, i > 0))
            })
    }

    /// The `Set-Cookie` value that gives the client `id` until `expires` (`Max-Age` counted
    /// from `now`, and the same instant as `Expires` for clients that know only that).
    fn issue(&self, id: &SessionId, now: Timestamp, expires: Timestamp) -> Option<HeaderValue> {
        let mut jar = CookieJar::new();
        let plain = self.base(
            Cookie::new(self.cookie_name(), id.as_str().to_owned()),
            now,
            expires,
        );
        match self.protection {
            Protection::Signed => jar.signed_mut(&self.key).add(plain),
            Protection::Private => jar.private_mut(&self.key).add(plain),
        }
        let sealed = jar.get(&self.cookie_name())?;
        HeaderValue::from_str(&sealed.to_string()).ok()
    }

    /// The `Set-Cookie` value that removes the client's cookie.
    fn clear(&self) -> Option<HeaderValue> {
        let c = self.base(
            Cookie::new(self.cookie_name(), ""),
            Timestamp(0),
            Timestamp(0),
        );
        HeaderValue::from_str(&c.to_string()).ok()
    }

    fn base(&self, mut c: Cookie<'static>, now: Timestamp, expires: Timestamp) -> Cookie<'static> {
        c.set_path("/");
        c.set_http_only(self.http_only);
        c.set_secure(self.is_secure());
        c.set_same_site(self.same_site);
        // To the nearest second: a session stored a few milliseconds ago with an idle time of
        // 1800 s gets `Max-Age=1800`, not 1799.
        let left_ms = expires.0.saturating_sub(now.0);
        let secs = i64::try_from(left_ms.saturating_add(500) / 1000).unwrap_or(i64::MAX);
        c.set_max_age(cookie::time::Duration::seconds(secs));
        c.set_expires(expires_attribute(now, expires));
        c
    }
}

/// The `Expires` instant: the session's end, or the Unix epoch for a cookie that is removed or
/// already past its end (browsers then drop it at once). Whole seconds, clamped to what HTTP
/// dates can carry.
fn expires_attribute(now: Timestamp, expires: Timestamp) -> cookie::time::OffsetDateTime {
    const LAST_HTTP_DATE: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = if expires.0 <= now.0 {
        0
    } else {
        i64::try_from(expires.0 / 1000)
            .unwrap_or(i64::MAX)
            .min(LAST_HTTP_DATE)
    };
    cookie::time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap_or(cookie::time::OffsetDateTime::UNIX_EPOCH)
}

/// A layer's cookie handling: the [`CookieConfig`], its cookie name as sent, and a memo of
/// cookie values that verified, so that a client sending the same cookie again (every request
/// of a browsing session) costs a keyed hash and a lookup instead of an HMAC or AEAD.
///
/// Why the memo is safe: verifying is a pure function of the value and the keys, and the keys
/// of a layer never change, so a value that verified once verifies again with the same
/// result. Only values that verified are remembered (a forged value costs a full verification
/// every time, as without the memo, and never fills it). Entries are found by a keyed hash with
/// a random key per layer and then compared in full in constant time, so lookups reveal
/// nothing about remembered values. It holds at most 4096 values; when a shard is
/// full one entry makes room, so a flood of distinct valid cookies costs at worst what no memo
/// costs. The memo names no session state: a remembered cookie of a deleted or expired session
/// still finds no session.
pub(crate) struct CookieCodec {
    cfg: CookieConfig,
    name: String,
    hash_key: (u64, u64),
    memo: Vec<RwLock<HashMap<u64, Verified, BuildHasherDefault<PreHashed>>>>,
}

/// How many values of the session cookie's name one request may make the layer verify: the
/// first ones sent, across all `Cookie` headers (see [`CookieConfig`]).
pub(crate) const MAX_COOKIE_VALUES: usize = 8;

/// A layer remembers at most `MEMO_SHARDS * MEMO_SHARD_ENTRIES` (4096) verified values, a
/// few hundred KiB.
const MEMO_SHARDS: usize = 16;
const MEMO_SHARD_ENTRIES: usize = 256;

struct Verified {
    value: Box<str>,
    id: SessionId,
    old_key: bool,
}

/// The map's keys are already keyed hashes: use them as they are.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (u64 keys); fold anything else in, to stay a valid hasher.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl std::fmt::Debug for CookieCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys or remembered values.
        f.debug_struct("CookieCodec")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl CookieCodec {
    pub(crate) fn new(cfg: CookieConfig) -> CookieCodec {
        let mut key = [0u8; 16];
        // A failed random source leaves a fixed key: lookups then cost the same for every value
        // anyway (the full comparison is constant-time); not worth failing the layer for.
        let _ = getrandom::fill(&mut key);
        let (a, b) = key.split_at(8);
        CookieCodec {
            name: cfg.cookie_name(),
            cfg,
            hash_key: (
                u64::from_le_bytes(a.try_into().unwrap_or_default()),
                u64::from_le_bytes(b.try_into().unwrap_or_default()),
            ),
            memo: (0..MEMO_SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    /// The session IDs that the request's cookies of our name carry and that verify with one
    /// of the keys and parse as IDs, in the order sent, without repeats. Anything else
    /// (absent, tampered, foreign key, malformed) is skipped; none at all and the request gets
    /// a fresh session.
    ///
    /// Only the first [`MAX_COOKIE_VALUES`] values of our name are looked at (each costs an
    /// HMAC or AEAD check), so a request stuffed with thousands of them does bounded work; a
    /// valid cookie after them is ignored.
    ///
    /// Usually there is one. Several verify when the client holds stale cookies beside the
    /// live one (e.g. one set on a more specific `Path`, which browsers send first): the
    /// caller uses the first whose session exists, so a stale cookie cannot shadow the live
    /// session.
    pub(crate) fn session_ids(&self, cookie_headers: &[HeaderValue]) -> Presented {
        let mut found = Presented::default();
        // Not `to_str`: it refuses the whole header for one byte outside visible ASCII, and a
        // neighbour cookie (another app's, or one set by script) may hold UTF-8 or any byte.
        // Ours never do, so only the pairs that are not UTF-8 are skipped.
        let values = cookie_headers
            .iter()
            .flat_map(|h| values_named(h.as_bytes(), &self.name))
            .take(MAX_COOKIE_VALUES);
        for value in values {
            if let Some(v) = self.open_value(value) {
                found.push(v);
            }
        }
        found
    }

    /// One cookie value: from the memo, or verified and then remembered.
    fn open_value(&self, value: &str) -> Option<(SessionId, bool)> {
        let hash = self.hash(value);
        let shard = &self.memo[(hash % MEMO_SHARDS as u64) as usize];
        if let Some(v) = shard.read().get(&hash) {
            if constant_time_eq(v.value.as_bytes(), value.as_bytes()) {
                return Some((v.id.clone(), v.old_key));
            }
        }
        let (id, old_key) = self
            .cfg
            .open(Cookie::new(self.name.clone(), value.to_owned()))?;
        let mut map = shard.write();
        if map.len() >= MEMO_SHARD_ENTRIES && !map.contains_key(&hash) {
            if let Some(victim) = map.keys().next().copied() {
                map.remove(&victim);
            }
        }
        map.insert(
            hash,
            Verified {
                value: value.into(),
                id: id.clone(),
                old_key,
            },
        );
        Some((id, old_key))
    }

    fn hash(&self, value: &str) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.hash_key.0, self.hash_key.1);
        h.write(value.as_bytes());
        h.finish()
    }

    /// See [`CookieConfig::issue`].
    pub(crate) fn issue(
        &self,
        id: &SessionId,
        now: Timestamp,
        expires: Timestamp,
    ) -> Option<HeaderValue> {
        self.cfg.issue(id, now, expires)
    }

    /// See [`CookieConfig::clear`].
    pub(crate) fn clear(&self) -> Option<HeaderValue> {
        self.cfg.clear()
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.memo.iter().map(|s| s.read().len()).sum()
    }
}

/// The verified session IDs of one request (see [`CookieCodec::session_ids`]), each with `true`
/// when only a verification (old) key accepted it.
#[derive(Debug, Default)]
pub(crate) struct Presented {
    first: Option<(SessionId, bool)>,
    /// The IDs after the first: empty, and so never allocated, for the usual single cookie.
    more: Vec<(SessionId, bool)>,
}

impl Presented {
    /// One ID already known to be the request's (verified earlier in the request).
    pub(crate) fn one(id: SessionId) -> Presented {
        Presented {
            first: Some((id, false)),
            more: Vec::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// More than one ID.
    pub(crate) fn several(&self) -> bool {
        !self.more.is_empty()
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = &SessionId> {
        self.first.iter().chain(&self.more).map(|(id, _)| id)
    }

    fn push(&mut self, (id, old_key): (SessionId, bool)) {
        match &self.first {
            None => self.first = Some((id, old_key)),
            Some((first, _)) if *first == id => {}
            Some(_) if self.more.iter().any(|(m, _)| *m == id) => {}
            Some(_) => self.more.push((id, old_key)),
        }
    }
}

impl IntoIterator for Presented {
    type Item = (SessionId, bool);
    type IntoIter = std::iter::Chain<
        std::option::IntoIter<(SessionId, bool)>,
        std::vec::IntoIter<(SessionId, bool)>,
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.more)
    }
}

/// The values of the cookies named `name` in one `Cookie` header, read as the `cookie` crate's
/// `Cookie::split_parse` reads them: pairs split at `;`, name and value trimmed, no decoding.
/// A pair that is not UTF-8 is skipped (`;` never occurs inside a multi-byte character, so the
/// other pairs are read as if it were absent).
fn values_named<'a>(header: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    header.split(|b| *b == b';').filter_map(move |pair| {
        let (n, v) = std::str::from_utf8(pair).ok()?.split_once('=')?;
        (n.trim() == name).then(|| v.trim())
    })
}

/// Equality whose time depends only on the lengths (public: every cookie of a layer has the
/// same length), not on where the values differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_700_000_000_000);

    fn in_secs(s: u64) -> Timestamp {
        Timestamp(NOW.0 + s * 1000)
    }

    /// The first verified ID, as a request with one cookie of ours uses it.
    fn first(cfg: &CookieCodec, h: &[HeaderValue]) -> Option<(SessionId, bool)> {
        cfg.session_ids(h).into_iter().next()
    }

    fn header(v: &HeaderValue) -> Vec<HeaderValue> {
        let set = v.to_str().unwrap();
        let pair = set.split(';').next().unwrap();
        vec![HeaderValue::from_str(pair).unwrap()]
    }

    #[test]
    fn signed_round_trip_and_tampering() {
        let cfg = CookieCodec::new(CookieConfig::new(Key::generate()));
        let id = SessionId::generate().unwrap();
        let v = cfg.issue(&id, NOW, in_secs(60)).unwrap();
        let s = v.to_str().unwrap();
        assert!(s.contains("HttpOnly") && s.contains("Secure") && s.contains("SameSite=Lax"));
        assert!(s.contains("Path=/") && s.contains("Max-Age=60"), "{s}");
        assert!(s.contains("Expires=Tue, 14 Nov 2023 22:14:20 GMT"), "{s}");
        assert_eq!(first(&cfg, &header(&v)), Some((id.clone(), false)));
        // Flip one character of the value.
        let mut t = s.split(';').next().unwrap().to_string();
        let last = t.pop().unwrap();
        t.push(if last == 'A' { 'B' } else { 'A' });
        let h = vec![HeaderValue::from_str(&t).unwrap()];
        assert_eq!(first(&cfg, &h), None);
        // Another key's cookie is refused, a rotated one accepted.
        let other = CookieCodec::new(CookieConfig::new(Key::generate()));
        assert_eq!(first(&other, &header(&v)), None);
        let rotated =
            CookieCodec::new(CookieConfig::new(Key::generate()).verify_with(cfg.cfg.key.clone()));
        assert_eq!(first(&rotated, &header(&v)), Some((id.clone(), true)));
        // Remembered, the answers stay the same (the old-key flag included).
        assert_eq!(first(&rotated, &header(&v)), Some((id.clone(), true)));
        assert_eq!(first(&cfg, &header(&v)), Some((id, false)));
        assert_eq!(first(&cfg, &h), None);
    }

    #[test]
    fn the_memo_keeps_only_values_that_verified_and_stays_bounded() {
        let cfg = CookieCodec::new(CookieConfig::new(Key::generate()));
        let id = SessionId::generate().unwrap();
        let good = header(&cfg.issue(&id, NOW, in_secs(60)).unwrap());
        // Forged values (another key's, unsigned) are refused every time and never remembered.
        let forged = CookieCodec::new(CookieConfig::new(Key::generate()));
        for _ in 0..3 {
            let bad = header(&forged.issue(&id, NOW, in_secs(60)).unwrap());
            assert_eq!(first(&cfg, &bad), None);
            let plain = format!("lt_session={}", id.as_str());
            assert_eq!(first(&cfg, &[HeaderValue::from_str(&plain).unwrap()]), None);
        }
        assert_eq!(cfg.remembered(), 0);
        assert_eq!(first(&cfg, &good), Some((id.clone(), false)));
        assert_eq!(cfg.remembered(), 1);
        // Many distinct valid cookies: the memo stays within its bound, every one verifies.
        for _ in 0..((MEMO_SHARDS * MEMO_SHARD_ENTRIES) + 100) {
            let other = SessionId::generate().unwrap();
            let h = header(&cfg.issue(&other, NOW, in_secs(60)).unwrap());
            assert_eq!(first(&cfg, &h), Some((other, false)));
        }
        assert!(
            cfg.remembered() <= (MEMO_SHARDS * MEMO_SHARD_ENTRIES),
            "{}",
            cfg.remembered()
        );
        assert_eq!(first(&cfg, &good), Some((id, false)));
    }

    #[test]
    fn finds_its_cookie_among_others_as_the_cookie_crate_splits_them() {
        let cfg = CookieCodec::new(CookieConfig::new(Key::generate()));
        let id = SessionId::generate().unwrap();
        let pair = header(&cfg.issue(&id, NOW, in_secs(60)).unwrap())[0]
            .to_str()
            .unwrap()
            .to_string();
        let bad = format!("lt_session={}", "A".repeat(60));
        for text in [
            format!("a=1; {pair}; b=2"),
            format!(" ;;  {pair}  ;"),
            format!("{bad}; {pair}"), // a stale or planted one first
            format!("x_lt_session=1;{pair}"),
        ] {
            let h = [HeaderValue::from_str(&text).unwrap()];
            assert_eq!(first(&cfg, &h), Some((id.clone(), false)), "{text}");
            let via_crate: Vec<_> = Cookie::split_parse(text.as_str())
                .flatten()
                .filter(|c| c.name() == "lt_session")
                .map(|c| c.value().to_string())
                .collect();
            let ours: Vec<_> = values_named(text.as_bytes(), "lt_session").collect();
            assert_eq!(ours, via_crate, "{text}");
        }
        let h = [HeaderValue::from_str("lt_sessionX=1; other=2").unwrap()];
        assert_eq!(first(&cfg, &h), None);
    }

    #[test]
    fn private_cookie_hides_the_id() {
        let cfg =
            CookieCodec::new(CookieConfig::new(Key::generate()).protection(Protection::Private));
        let id = SessionId::generate().unwrap();
        let v = cfg.issue(&id, NOW, in_secs(60)).unwrap();
        assert!(!v.to_str().unwrap().contains(id.as_str()));
        assert_eq!(first(&cfg, &header(&v)), Some((id.clone(), false)));
        assert_eq!(first(&cfg, &header(&v)), Some((id, false)));
    }

    #[test]
    fn host_prefix_forces_secure_and_clear_expires_at_once() {
        let cfg = CookieCodec::new(
            CookieConfig::new(Key::generate())
                .secure(false)
                .host_prefix(true),
        );
        let v = cfg.issue(&SessionId::generate().unwrap(), NOW, in_secs(1));
        let s = v.unwrap().to_str().unwrap().to_string();
        assert!(
            s.starts_with("__Host-lt_session=") && s.contains("Secure"),
            "{s}"
        );
        let c = cfg.clear().unwrap().to_str().unwrap().to_string();
        assert!(c.contains("Max-Age=0"), "{c}");
        assert!(c.contains("Expires=Thu, 01 Jan 1970 00:00:00 GMT"), "{c}");
    }

    #[test]
    fn a_past_or_far_end_gives_a_valid_cookie() {
        let cfg = CookieCodec::new(CookieConfig::new(Key::generate()));
        let id = SessionId::generate().unwrap();
        let past = cfg.issue(&id, NOW, Timestamp(NOW.0 - 5_000)).unwrap();
        let s = past.to_str().unwrap();
        assert!(
            s.contains("Max-Age=0") && s.contains("Expires=Thu, 01 Jan 1970"),
            "{s}"
        );
        let far = cfg.issue(&id, NOW, Timestamp(u64::MAX)).unwrap();
        let s = far.to_str().unwrap();
        assert!(s.contains("Expires=Fri, 31 Dec 9999 23:59:59 GMT"), "{s}");
    }
}
