//! From a cache key to a store ID.
//!
//! Stores take [`SessionId`]s: exactly 32 characters of URL-safe base64 (24 bytes). A cache key
//! is any string, so the ID of an entry is a keyed hash (two SipHash-2-4 outputs under a 256-bit
//! secret, [`IdKey`]) of a domain tag, the entry kind, the namespace (length-prefixed) and the
//! key. The entry keeps its namespace and key inside, so a collision is detected on read and
//! is a miss, never another key's value. The secret makes IDs unguessable: a client that can
//! choose cache keys can neither aim two keys at one ID nor name a cache entry as a session
//! cookie when a store is shared.
//!
//! Owns: the secret and the derivation. May not touch: the store or locks.

use crate::session::SessionId;
use crate::{Error, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use siphasher::sip128::{Hasher128, SipHasher24};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::hash::Hasher;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Length of the secret in bytes.
pub const ID_KEY_LEN: usize = 32;

/// The secret that maps cache keys to store IDs. Every process (and host) sharing a cache must
/// use the same one, or they will not find each other's entries.
///
/// ```
/// use locktable::cache::IdKey;
/// let dir = tempfile::tempdir().unwrap();
/// let a = IdKey::load_or_create(dir.path().join("cache.key")).unwrap();
/// let b = IdKey::load_or_create(dir.path().join("cache.key")).unwrap();
/// assert_eq!(a, b); // the second process reads what the first created
/// assert_eq!(format!("{a:?}"), "IdKey(..)"); // never printed
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct IdKey([u8; ID_KEY_LEN]);

impl fmt::Debug for IdKey {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdKey(..)")
    }
}

/// What an ID names: a value entry or a namespace's generation entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Value = 1,
    Generation = 2,
}

impl IdKey {
    /// A fresh secret from the OS random source.
    pub fn generate() -> Result<IdKey> {
        let mut b = [0u8; ID_KEY_LEN];
        getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
        Ok(IdKey(b))
    }

    /// A secret the application distributes itself (every host of a shared store).
    pub fn from_bytes(bytes: [u8; ID_KEY_LEN]) -> IdKey {
        IdKey(bytes)
    }

    /// The secret's bytes (to hand to another host).
    pub fn as_bytes(&self) -> &[u8; ID_KEY_LEN] {
        &self.0
    }

    /// Reads the secret at `path`, or creates it there (mode 0600) if the file does not exist.
    /// Processes racing to create it end up with the one that was linked into place first.
    /// A file of the wrong length is an [`Error::Io`] of kind `InvalidData`.
    pub fn load_or_create(path: impl AsRef<Path>) -> Result<IdKey> {
        let path = path.as_ref();
        if let Some(k) = Self::read(path)? {
            return Ok(k);
        }
        let fresh = Self::generate()?;
        // A name of its own per attempt (threads of one process may race here too).
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| Error::Random(e.to_string()))?;
        let tmp = path.with_extension(format!("tmp.{:016x}", u64::from_le_bytes(nonce)));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&fresh.0).and_then(|()| f.sync_all()));
        let linked = written.and_then(|()| fs::hard_link(&tmp, path));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(fresh),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Self::read(path)?
                .ok_or_else(|| Error::Io(std::io::Error::other("cache key file vanished"))),
            Err(e) => Err(e.into()),
        }
    }

    fn read(path: &Path) -> Result<Option<IdKey>> {
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut b = Vec::with_capacity(ID_KEY_LEN + 1);
        f.take(ID_KEY_LEN as u64 + 1).read_to_end(&mut b)?;
        let bytes: [u8; ID_KEY_LEN] = b.try_into().map_err(|_| {
            Error::Io(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("{}: not a {ID_KEY_LEN}-byte cache key", path.display()),
            ))
        })?;
        Ok(Some(IdKey(bytes)))
    }

    fn half(&self, i: usize) -> (u64, u64) {
        let word = |j: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&self.0[j * 8..j * 8 + 8]);
            u64::from_le_bytes(w)
        };
        (word(2 * i), word(2 * i + 1))
    }

    /// The store ID of `(kind, namespace, key)`.
    pub(super) fn derive(&self, kind: Kind, namespace: &str, key: &str) -> SessionId {
        let hash = |half: usize| {
            let (k0, k1) = self.half(half);
            let mut h = SipHasher24::new_with_keys(k0, k1);
            h.write(b"locktable.cache\0");
            h.write(&[kind as u8]);
            h.write(&(namespace.len() as u64).to_le_bytes());
            h.write(namespace.as_bytes());
            h.write(key.as_bytes());
            h.finish128().as_bytes()
        };
        let mut raw = [0u8; 24];
        raw[..16].copy_from_slice(&hash(0));
        raw[16..].copy_from_slice(&hash(1)[..8]);
        SessionId::parse(&URL_SAFE_NO_PAD.encode(raw))
            .expect("24 bytes in URL-safe base64 are always a valid ID")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_separate_kinds_namespaces_and_the_ns_key_boundary() {
        let k = IdKey::from_bytes([7; ID_KEY_LEN]);
        let a = k.derive(Kind::Value, "ab", "c");
        assert_eq!(a, k.derive(Kind::Value, "ab", "c"));
        assert_ne!(a, k.derive(Kind::Value, "a", "bc"));
        assert_ne!(a, k.derive(Kind::Generation, "ab", "c"));
        assert_ne!(
            a,
            IdKey::from_bytes([8; ID_KEY_LEN]).derive(Kind::Value, "ab", "c")
        );
        // Hostile keys are just bytes to hash.
        let _ = k.derive(Kind::Value, "", &"../".repeat(10_000));
    }

    /// Regression: temporary names were per process, so two threads could remove each
    /// other's temporary file and fail.
    #[test]
    fn threads_racing_to_create_the_key_file_all_get_the_same_key() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("cache.key");
            let keys: Vec<IdKey> = (0..8)
                .map(|_| {
                    let p = p.clone();
                    std::thread::spawn(move || IdKey::load_or_create(&p).unwrap())
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            assert!(keys.iter().all(|k| *k == keys[0]));
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
        }
    }

    #[test]
    fn a_key_file_of_the_wrong_length_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, b"short").unwrap();
        assert!(matches!(IdKey::load_or_create(&p), Err(Error::Io(_))));
    }
}
