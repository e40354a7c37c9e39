//! Errors, one enum per concern, each `#[non_exhaustive]` with its source kept.

use std::time::Duration;

/// Boxed error from a publisher or a consumer's transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Configuration refused when it is built.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// A name that ends up in SQL (the namespace) must be a plain lower-case identifier.
    #[error(
        "`{field}` must match [a-z_][a-z0-9_]{{0,39}} (it names tables), got {len} characters that do not"
    )]
    InvalidName {
        /// The setting.
        field: &'static str,
        /// Length of the refused value (the value itself is not echoed).
        len: usize,
    },
    /// A setting that must be positive is zero.
    #[error("`{field}` must be greater than zero")]
    Zero {
        /// The setting.
        field: &'static str,
    },
    /// A setting out of its range.
    #[error("`{field}` {reason}")]
    OutOfRange {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// Why an event was not written into the caller's transaction. Every variant except
/// [`EnqueueError::Database`] is raised before any SQL runs, so the transaction stays usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The payload did not serialize to JSON.
    #[error("the event payload does not serialize: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The encoded event (payload, key, type and headers) is larger than the configured limit.
    #[error("the event is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// `OutboxConfig::max_event_bytes`.
        limit: usize,
    },
    /// A field of the event is not acceptable (an empty type, a key over 1,024 bytes).
    #[error("event field `{field}` {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The database refused the insert; the transaction is then in the database's hands (on
    /// PostgreSQL it is aborted and must be rolled back).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[error("the outbox insert failed: {0}")]
    Database(#[source] sqlx::Error),
}

/// A failure of the relay-side store operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed or is unreachable.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[error("outbox database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A row could not be read back (headers that are not a JSON object of strings, a negative
    /// attempt count): reported with its id, never unwrapped.
    #[error("outbox row {id} is corrupt: {reason}")]
    Corrupt {
        /// Row id.
        id: i64,
        /// What is wrong.
        reason: String,
    },
    /// The lanes table does not have the configured number of lanes: events hashed to a missing
    /// lane would never be published, so the relay refuses to start.
    #[error(
        "the lanes table has {found} lanes but the outbox is configured with {configured}; run the migration with the same `lanes`"
    )]
    LaneMismatch {
        /// `OutboxConfig::lanes`.
        configured: u32,
        /// Rows in the lanes table.
        found: u32,
    },
}

/// What a [`Publisher`](crate::Publisher) reports for one message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker cannot be reached or did not answer in time. The attempt does not count towards
    /// dead-lettering: the relay backs off as a whole and the event stays pending.
    #[error("the broker is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The broker refused this message. The attempt counts; after `max_attempts` the event is
    /// dead-lettered, which unblocks its ordering key.
    #[error("the broker rejected the message: {0}")]
    Rejected(#[source] BoxError),
}

impl PublishError {
    /// A transport failure (see [`PublishError::Unavailable`]).
    pub fn unavailable(e: impl Into<BoxError>) -> Self {
        Self::Unavailable(e.into())
    }
    /// A refusal of this message (see [`PublishError::Rejected`]).
    pub fn rejected(e: impl Into<BoxError>) -> Self {
        Self::Rejected(e.into())
    }
}

/// Errors of the relay's own lifecycle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The store refused to start (for example [`StoreError::LaneMismatch`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The relay did not stop within the given time; its leases expire on their own.
    #[error("the relay did not stop within {0:?}")]
    StopTimeout(Duration),
}

/// Errors of an inbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// A message id or consumer name that is empty or over 512 bytes.
    #[error("inbox `{field}` {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The database failed.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    #[error("inbox database error: {0}")]
    Database(#[source] sqlx::Error),
}

/// Errors of a stream consumer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The broker failed or is unreachable.
    #[error("the broker failed: {0}")]
    Broker(#[source] BoxError),
    /// An entry that is not an outbox message (missing or malformed fields). It stays pending
    /// until the caller acknowledges it.
    #[error("stream entry {entry} is not an outbox message: {reason}")]
    Corrupt {
        /// The stream entry id.
        entry: String,
        /// What is wrong.
        reason: String,
    },
}
