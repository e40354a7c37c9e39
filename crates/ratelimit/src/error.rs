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
