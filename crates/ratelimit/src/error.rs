//! Errors: configuration (build time), key and store failures (call time).

/// A configuration value was rejected when it was built.
///
/// ```
/// use std::time::Duration;
/// use stanchion_ratelimit::Quota;
/// let err = Quota::new(0, Duration::from_secs(1)).unwrap_err();
/// assert_eq!(err.field(), "rate");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: must be {expected}, got {got}")]
pub struct BuildError {
    field: &'static str,
    expected: &'static str,
    got: String,
}

impl BuildError {
    pub(crate) fn new(field: &'static str, expected: &'static str, got: impl ToString) -> Self {
        Self {
            field,
            expected,
            got: got.to_string(),
        }
    }

    /// The offending setting, as spelled by its builder method.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

/// An invalid [`Quota`](crate::Quota). Plain data (no allocation), so quota constructors are
/// `const fn`; converts into [`BuildError`] for `?`.
///
/// ```
/// use stanchion_ratelimit::{Quota, QuotaError};
/// assert_eq!(Quota::per_second(0), Err(QuotaError::ZeroRate));
/// assert_eq!(Quota::per_second(0).unwrap_err().field(), "rate");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// A rate of zero.
    #[error("invalid `rate`: must be at least 1, got 0")]
    ZeroRate,
    /// A period of zero or longer than 366 days.
    #[error("invalid `period`: must be between 1 microsecond and 366 days, got {0:?}")]
    Period(std::time::Duration),
    /// More than one request per microsecond of the period.
    #[error(
        "invalid `rate`: must be at most one request per microsecond of the period, got {rate} per {period:?}"
    )]
    TooFast {
        /// The rate asked for.
        rate: u32,
        /// Its period.
        period: std::time::Duration,
    },
    /// A burst of zero.
    #[error("invalid `burst`: must be at least 1, got 0")]
    ZeroBurst,
    /// A burst whose capacity (`burst x period / rate`) passes 35 years.
    #[error(
        "invalid `burst`: must be small enough that burst x period / rate stays under 35 years, got {0}"
    )]
    BurstTooLarge(u32),
}

impl QuotaError {
    /// The offending setting: `rate`, `period` or `burst`.
    pub const fn field(&self) -> &'static str {
        match self {
            Self::ZeroRate | Self::TooFast { .. } => "rate",
            Self::Period(_) => "period",
            Self::ZeroBurst | Self::BurstTooLarge(_) => "burst",
        }
    }
}

impl From<QuotaError> for BuildError {
    fn from(e: QuotaError) -> Self {
        let (expected, got) = match e {
            QuotaError::ZeroRate => ("at least 1", "0".to_owned()),
            QuotaError::Period(p) => ("between 1 microsecond and 366 days", format!("{p:?}")),
            QuotaError::TooFast { rate, period } => (
                "at most one request per microsecond of the period",
                format!("{rate} per {period:?}"),
            ),
            QuotaError::ZeroBurst => ("at least 1", "0".to_owned()),
            QuotaError::BurstTooLarge(b) => (
                "small enough that burst x period / rate stays under 35 years",
                b.to_string(),
            ),
        };
        BuildError::new(e.field(), expected, got)
    }
}

/// A check could not be made by a shared store (the limiter's failure mode then decides).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer within the configured timeout.
    #[error("rate-limit store did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The store is known to be down; it was not asked (see the limiter's failure mode).
    #[error("rate-limit store is marked down; not asked")]
    Down,
    /// The Redis command failed. The message never contains the connection URL.
    #[cfg(feature = "redis")]
    #[error("redis rate-limit script failed")]
    Redis(#[source] redis::RedisError),
    /// Too many checks are already waiting for this store (a hung or overloaded Redis): this
    /// one was refused at once instead of joining an ever longer queue.
    #[error("rate-limit store has {queued} checks waiting; refused without queuing")]
    Overloaded {
        /// Checks waiting when this one arrived.
        queued: usize,
    },
    /// The store answered something this version does not understand (corrupt state, another
    /// program writing the key): reported, never unwrapped.
    #[error("unexpected reply from the rate-limit store: {0}")]
    Protocol(String),
    /// The store answered, but this key's entry holds a value of another type (another program
    /// wrote it): this check fails, the store and every other key are fine.
    #[error("the rate-limit entry of this key holds a value of another type")]
    KeyHoldsOtherType,
}

impl StoreError {
    /// Whether the store was too slow.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }

    /// Whether the error concerns one key only (the store itself answered): the limiter decides
    /// that key by its failure mode without marking the store down.
    pub fn is_key_error(&self) -> bool {
        matches!(self, Self::KeyHoldsOtherType)
    }
}

/// A key the limiter refuses to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Longer than the limiter's `max_key_len`.
    #[error("rate-limit key is {len} bytes, longer than the limit of {max}")]
    TooLong {
        /// The key's length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// Empty keys would put every caller in one bucket by mistake.
    #[error("rate-limit key is empty")]
    Empty,
}
