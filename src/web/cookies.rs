//! The session cookie: its attributes, its signature or encryption, and key rotation.
//!
//! Owns: turning a session ID into a `Set-Cookie` value and a request's `Cookie` header back
//! into a session ID that this server issued. May not touch: the store or the lock table; all of
//! this is CPU work on the request's headers.

use crate::session::SessionId;
use cookie::{Cookie, CookieJar, Key, SameSite};
use http::header::HeaderValue;
use std::time::Duration;

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

    /// Another cookie name (without the `__Host-` prefix).
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

    /// The `SameSite` attribute (default `Lax`).
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

    fn is_secure(&self) -> bool {
        self.secure || self.host_prefix
    }

    /// The session ID in the request's cookie, if one of ours is there and verifies with one of
    /// the keys and parses as an ID, with `true` when only a verification (old) key accepted it.
    /// Anything else (absent, tampered, foreign key, malformed) is `None`: the request then gets
    /// a fresh session.
    pub(crate) fn session_id(&self, cookie_headers: &[HeaderValue]) -> Option<(SessionId, bool)> {
        let name = self.cookie_name();
        for value in cookie_headers {
            let Ok(text) = value.to_str() else { continue };
            for c in Cookie::split_parse(text).flatten() {
                if c.name() != name {
                    continue;
                }
                if let Some(id) = self.open(c.into_owned()) {
                    return Some(id);
                }
            }
        }
        None
    }

    /// Verifies (or decrypts) one cookie with the signing key, then each verification key.
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

    /// The `Set-Cookie` value that gives the client `id`, valid for `max_age`.
    pub(crate) fn issue(&self, id: &SessionId, max_age: Duration) -> Option<HeaderValue> {
        let mut jar = CookieJar::new();
        let plain = self.base(
            Cookie::new(self.cookie_name(), id.as_str().to_owned()),
            max_age,
        );
        match self.protection {
            Protection::Signed => jar.signed_mut(&self.key).add(plain),
            Protection::Private => jar.private_mut(&self.key).add(plain),
        }
        let sealed = jar.get(&self.cookie_name())?;
        HeaderValue::from_str(&sealed.to_string()).ok()
    }

    /// The `Set-Cookie` value that removes the client's cookie.
    pub(crate) fn clear(&self) -> Option<HeaderValue> {
        let c = self.base(Cookie::new(self.cookie_name(), ""), Duration::ZERO);
        HeaderValue::from_str(&c.to_string()).ok()
    }

    fn base(&self, mut c: Cookie<'static>, max_age: Duration) -> Cookie<'static> {
        c.set_path("/");
        c.set_http_only(self.http_only);
        c.set_secure(self.is_secure());
        c.set_same_site(self.same_site);
        let secs = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        c.set_max_age(cookie::time::Duration::seconds(secs));
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: &HeaderValue) -> Vec<HeaderValue> {
        let set = v.to_str().unwrap();
        let pair = set.split(';').next().unwrap();
        vec![HeaderValue::from_str(pair).unwrap()]
    }

    #[test]
    fn signed_round_trip_and_tampering() {
        let cfg = CookieConfig::new(Key::generate());
        let id = SessionId::generate().unwrap();
        let v = cfg.issue(&id, Duration::from_secs(60)).unwrap();
        let s = v.to_str().unwrap();
        assert!(s.contains("HttpOnly") && s.contains("Secure") && s.contains("SameSite=Lax"));
        assert!(s.contains("Path=/") && s.contains("Max-Age=60"), "{s}");
        assert_eq!(cfg.session_id(&header(&v)), Some((id.clone(), false)));
        // Flip one character of the value.
        let mut t = s.split(';').next().unwrap().to_string();
        let last = t.pop().unwrap();
        t.push(if last == 'A' { 'B' } else { 'A' });
        let h = vec![HeaderValue::from_str(&t).unwrap()];
        assert_eq!(cfg.session_id(&h), None);
        // Another key's cookie is refused, a rotated one accepted.
        let other = CookieConfig::new(Key::generate());
        assert_eq!(other.session_id(&header(&v)), None);
        let rotated = CookieConfig::new(Key::generate()).verify_with(cfg.key.clone());
        assert_eq!(rotated.session_id(&header(&v)), Some((id, true)));
    }

    #[test]
    fn private_cookie_hides_the_id() {
        let cfg = CookieConfig::new(Key::generate()).protection(Protection::Private);
        let id = SessionId::generate().unwrap();
        let v = cfg.issue(&id, Duration::from_secs(60)).unwrap();
        assert!(!v.to_str().unwrap().contains(id.as_str()));
        assert_eq!(cfg.session_id(&header(&v)), Some((id, false)));
    }

    #[test]
    fn host_prefix_forces_secure() {
        let cfg = CookieConfig::new(Key::generate())
            .secure(false)
            .host_prefix(true);
        let v = cfg.issue(&SessionId::generate().unwrap(), Duration::from_secs(1));
        let s = v.unwrap().to_str().unwrap().to_string();
        assert!(
            s.starts_with("__Host-lt_session=") && s.contains("Secure"),
            "{s}"
        );
        let c = cfg.clear().unwrap().to_str().unwrap().to_string();
        assert!(c.contains("Max-Age=0"), "{c}");
    }
}
