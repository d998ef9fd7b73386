//! Session IDs: 192 bits from the OS random source, as 32 characters of URL-safe base64.
//!
//! IDs from clients are hostile input: [`SessionId::parse`] checks length and charset before the
//! text can reach a file name or a lock key, and nothing else in this crate builds a `SessionId`.

use crate::{Error, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::fmt;

/// Number of random bytes in an ID (192 bits).
pub const ID_BYTES: usize = 24;
/// Length of an ID's text form: 24 bytes in unpadded base64 are exactly 32 characters.
pub const ID_LEN: usize = 32;

/// A validated session ID.
///
/// ```
/// use locktable::session::SessionId;
/// let id = SessionId::generate().unwrap();
/// assert_eq!(id.as_str().len(), 32);
/// assert_eq!(SessionId::parse(id.as_str()).unwrap(), id);
/// assert!(SessionId::parse("../../etc/passwd").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// Makes a fresh ID from the OS random source.
    pub fn generate() -> Result<SessionId> {
        let mut bytes = [0u8; ID_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
        Ok(SessionId(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Validates an ID received from a client: exactly [`ID_LEN`] characters of `A-Z a-z 0-9 - _`.
    ///
    /// Returns [`Error::InvalidSessionId`] otherwise. Validation does not say whether the session
    /// exists.
    pub fn parse(text: &str) -> Result<SessionId> {
        let ok = text.len() == ID_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(Error::InvalidSessionId);
        }
        // 32 characters decode to exactly 24 bytes; this also rejects non-canonical trailing bits
        // (there are none at this length, but the check keeps the rule in one place).
        match URL_SAFE_NO_PAD.decode(text) {
            Ok(b) if b.len() == ID_BYTES => Ok(SessionId(text.to_owned())),
            _ => Err(Error::InvalidSessionId),
        }
    }

    /// The ID's text (safe in a URL, a cookie and a file name).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    /// Shows only a prefix, so IDs (bearer secrets) do not end up whole in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({}…)", &self.0[..6])
    }
}

impl std::str::FromStr for SessionId {
    type Err = Error;
    fn from_str(s: &str) -> Result<SessionId> {
        SessionId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = SessionId::generate().unwrap();
        let b = SessionId::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(SessionId::parse(a.as_str()).unwrap(), a);
        assert!(!format!("{a:?}").contains(a.as_str()));
    }

    #[test]
    fn hostile_ids_are_rejected() {
        let good = SessionId::generate().unwrap();
        let long = format!("{}A", good.as_str());
        let bad = [
            "",
            "short",
            &long,
            "../../../../../../../../etc/passwd",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/A",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=A",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\0A",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.A",
            "ÄAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ];
        for b in bad {
            assert!(
                matches!(SessionId::parse(b), Err(Error::InvalidSessionId)),
                "{b:?}"
            );
        }
    }
}
