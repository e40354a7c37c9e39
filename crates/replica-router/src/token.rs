//! Write tokens: a position in the primary's WAL that a read must not precede.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

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

/// Proof of a committed write: the primary's timeline and WAL position after the commit. A
/// read given this token is served only by a node on that timeline or a later one that has
/// replayed at least this far, so it sees the write.
///
/// Serializes to a short string (`w2:1:16/B374D848`: timeline, then position) for a cookie, a
/// header or an event. Tokens of the earlier form without a timeline (`w1:16/B374D848`) still
/// parse; the router treats their timeline as the newest it knows.
///
/// Positions of two timelines compare only within one history: after a failover, a replica left
/// on the old timeline can have replayed "further" than a new write without having it. The
/// timeline in the token is what lets the router refuse such a replica.
///
/// ```
/// use stanchion_replica_router::WriteToken;
/// let token: WriteToken = "w2:3:16/B374D848".parse()?;
/// assert_eq!((token.timeline(), token.to_string().as_str()), (Some(3), "w2:3:16/B374D848"));
/// let old: WriteToken = "w1:16/B374D848".parse()?;
/// assert_eq!(old.timeline(), None);
/// assert!("w1:zz".parse::<WriteToken>().is_err());
/// assert!("w2:0:1/0".parse::<WriteToken>().is_err());
/// # Ok::<(), stanchion_replica_router::TokenParseError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WriteToken {
    lsn: Lsn,
    timeline: Option<u32>,
}

impl WriteToken {
    /// A token for a WAL position, timeline unknown.
    pub fn new(lsn: Lsn) -> Self {
        Self {
            lsn,
            timeline: None,
        }
    }

    /// A token for a WAL position on a timeline (1 or more; 0 means unknown).
    pub fn on_timeline(lsn: Lsn, timeline: u32) -> Self {
        Self {
            lsn,
            timeline: (timeline != 0).then_some(timeline),
        }
    }

    /// The WAL position.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// The timeline the write was made on, if the token carries it.
    pub fn timeline(&self) -> Option<u32> {
        self.timeline
    }

    /// The later of two tokens: the later timeline, then the later position.
    #[must_use]
    pub fn max(self, other: Self) -> Self {
        let key = |t: &Self| (t.timeline.unwrap_or(0), t.lsn);
        if key(&other) > key(&self) {
            other
        } else {
            self
        }
    }
}

impl fmt::Display for WriteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.timeline {
            Some(t) => write!(f, "w2:{t}:{}", self.lsn),
            None => write!(f, "w1:{}", self.lsn),
        }
    }
}

/// A string that is not a write token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a write token (expected `w2:T:X/Y` or `w1:X/Y`)")]
pub struct TokenParseError;

impl FromStr for WriteToken {
    type Err = TokenParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("w2:") {
            let (timeline, lsn) = rest.split_once(':').ok_or(TokenParseError)?;
            if timeline.is_empty()
                || timeline.len() > 10
                || !timeline.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(TokenParseError);
            }
            let timeline: u32 = timeline.parse().map_err(|_| TokenParseError)?;
            let lsn = Lsn::parse(lsn).ok_or(TokenParseError)?;
            if timeline == 0 {
                return Err(TokenParseError);
            }
            return Ok(Self::on_timeline(lsn, timeline));
        }
        let lsn = s
            .strip_prefix("w1:")
            .and_then(Lsn::parse)
            .ok_or(TokenParseError)?;
        Ok(Self::new(lsn))
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
    /// 0: unknown.
    timeline: AtomicU32,
}

impl SessionToken {
    /// Starts from a token carried by the client (a cookie).
    pub fn from_token(token: WriteToken) -> Self {
        Self {
            lsn: AtomicU64::new(token.lsn.0),
            timeline: AtomicU32::new(token.timeline.unwrap_or(0)),
        }
    }

    /// Moves the session forward to `token` if it is later (position and timeline each only
    /// move forward).
    pub fn observe(&self, token: WriteToken) {
        if let Some(t) = token.timeline {
            self.timeline.fetch_max(t, Ordering::AcqRel);
        }
        self.lsn.fetch_max(token.lsn.0, Ordering::AcqRel);
    }

    /// The session's position, as a token.
    pub fn token(&self) -> WriteToken {
        WriteToken::on_timeline(
            Lsn(self.lsn.load(Ordering::Acquire)),
            self.timeline.load(Ordering::Acquire),
        )
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
    fn tokens_with_timelines_round_trip_and_bad_ones_are_refused() {
        for text in [
            "w2:1:0/10",
            "w2:4294967295:FFFFFFFF/FFFFFFFF",
            "w1:16/B374D848",
        ] {
            assert_eq!(text.parse::<WriteToken>().unwrap().to_string(), text);
        }
        for bad in [
            "w2:",
            "w2:1",
            "w2::1/0",
            "w2:x:1/0",
            "w2:-1:1/0",
            "w2:0:1/0",
            "w2:4294967296:1/0",
            "w2:1:1/",
            "w3:1:1/0",
            "w2:1:1/0:",
        ] {
            assert!(bad.parse::<WriteToken>().is_err(), "{bad}");
        }
        let a: WriteToken = "w2:1:5/0".parse().unwrap();
        let b: WriteToken = "w2:2:1/0".parse().unwrap();
        assert_eq!(a.max(b), b, "a later timeline wins");
        let session = SessionToken::default();
        session.observe(a);
        session.observe(b);
        assert_eq!(session.token().timeline(), Some(2));
        assert_eq!(session.token().lsn(), Lsn(5 << 32));
    }

    #[test]
    fn tokens_order_by_position() {
        let a: WriteToken = "w1:0/10".parse().unwrap();
        let b: WriteToken = "w1:1/0".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.max(b), b);
    }
}
