//! Write tokens: a position in the primary's WAL that a read must not precede.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// A PostgreSQL WAL position (`pg_lsn`), as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's text form, `X/Y` (two hexadecimal halves).
    pub fn parse(text: &str) -> Option<Self> {
        let (hi, lo) = text.trim().split_once('/')?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return None;
        }
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        Some(Self((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Proof of a committed write: the primary's WAL position after the commit. A read given this
/// token is served only by a node that has replayed at least this far, so it sees the write.
///
/// Serializes to a short string (`w1:16/B374D848`) for a cookie, a header or an event.
///
/// ```
/// use stanchion_replica_router::WriteToken;
/// let token: WriteToken = "w1:16/B374D848".parse()?;
/// assert_eq!(token.to_string(), "w1:16/B374D848");
/// assert!("w1:zz".parse::<WriteToken>().is_err());
/// # Ok::<(), stanchion_replica_router::TokenParseError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WriteToken {
    lsn: Lsn,
}

impl WriteToken {
    /// A token for a WAL position.
    pub fn new(lsn: Lsn) -> Self {
        Self { lsn }
    }

    /// The WAL position.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// The later of two tokens.
    #[must_use]
    pub fn max(self, other: Self) -> Self {
        if other.lsn > self.lsn { other } else { self }
    }
}

impl fmt::Display for WriteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w1:{}", self.lsn)
    }
}

/// A string that is not a write token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a write token (expected `w1:X/Y`)")]
pub struct TokenParseError;

impl FromStr for WriteToken {
    type Err = TokenParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lsn = s
            .strip_prefix("w1:")
            .and_then(Lsn::parse)
            .ok_or(TokenParseError)?;
        Ok(Self { lsn })
    }
}

/// Monotonic reads for one user session: remembers the latest position the session wrote or
/// read, so a later read never sees an older state than an earlier one. Share it (it is
/// `Sync`) across the session's requests, or carry [`SessionToken::token`] in a cookie.
///
/// ```
/// use stanchion_replica_router::{Lsn, SessionToken, WriteToken};
/// let session = SessionToken::default();
/// session.observe(WriteToken::new(Lsn(100)));
/// session.observe(WriteToken::new(Lsn(50))); // never goes back
/// assert_eq!(session.token().lsn(), Lsn(100));
/// ```
#[derive(Debug, Default)]
pub struct SessionToken {
    lsn: AtomicU64,
}

impl SessionToken {
    /// Starts from a token carried by the client (a cookie).
    pub fn from_token(token: WriteToken) -> Self {
        Self {
            lsn: AtomicU64::new(token.lsn.0),
        }
    }

    /// Moves the session forward to `token` if it is later.
    pub fn observe(&self, token: WriteToken) {
        self.lsn.fetch_max(token.lsn.0, Ordering::AcqRel);
    }

    /// The session's position, as a token.
    pub fn token(&self) -> WriteToken {
        WriteToken::new(Lsn(self.lsn.load(Ordering::Acquire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_postgres_text() {
        for text in ["0/0", "0/16B3748", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            assert_eq!(Lsn::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(Lsn::parse("1/0").unwrap(), Lsn(1 << 32));
        for bad in ["", "/", "1/", "/1", "1/2/3", "g/1", "123456789/0", "1"] {
            assert!(Lsn::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn tokens_order_by_position() {
        let a: WriteToken = "w1:0/10".parse().unwrap();
        let b: WriteToken = "w1:1/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.max(b), b);
    }
}
