//! Errors: building a cache, talking to the L2 store, encoding values, and calls.

use std::sync::Arc;

/// Invalid configuration, rejected by a builder's `build()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
#[non_exhaustive]
pub struct BuildError {
    /// The setting at fault.
    pub field: &'static str,
    /// What it must be.
    pub reason: String,
}

impl BuildError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// The L2 store failed or refused a call.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The call did not finish within the L2 timeout.
    #[error("the L2 store did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// L2 is being skipped after repeated failures (see [`crate::SkipPolicy`]).
    #[error("the L2 store is skipped after repeated failures")]
    Skipped,
    /// The connection or the server failed (the text never holds a URL or password).
    #[error("the L2 store failed: {0}")]
    Backend(String),
    /// The server answered something this crate did not expect.
    #[error("unexpected reply from the L2 store: {0}")]
    Protocol(String),
}

impl StoreError {
    /// True for a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }
}

/// A value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The codec refused the value.
    #[error("could not encode the value: {0}")]
    Encode(String),
    /// The bytes are not a value of this type (corrupt, or written by another version).
    #[error("could not decode the value: {0}")]
    Decode(String),
}

/// What a cache call can fail with. Redis failing is not among them for calls with a loader:
/// those fall back to L1 and the loader.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The loader returned an error (shared by every caller coalesced onto that load), and no
    /// stale value within `max_stale` was there to serve instead.
    #[error("the loader failed")]
    Load(#[source] Arc<dyn std::error::Error + Send + Sync + 'static>),
    /// The loader panicked; every caller coalesced onto it gets this error, nobody waits forever.
    #[error("the loader panicked")]
    LoaderPanicked,
    /// Another instance held this key's lease and its loader failed; the callers waiting for
    /// it get this error instead of repeating the failing load everywhere.
    #[error("the instance loading this key failed")]
    PeerLoadFailed,
    /// A call that needs L2 (an invalidation, a plain `get` on a miss) could not reach it.
    #[error("the L2 store failed")]
    Store(#[from] StoreError),
    /// A value could not be encoded.
    #[error("codec error")]
    Codec(#[from] CodecError),
    /// A tag given to [`crate::TieredCache::invalidate_tag`] is empty or longer than 128
    /// bytes.
    #[error("invalid tag of {len} bytes: tags are 1 to 128 bytes")]
    InvalidTag {
        /// The tag's length in bytes.
        len: usize,
    },
}

impl CacheError {
    /// The loader's error, if it is one of type `E`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use stanchion_tiered_cache::CacheError;
    /// let e = CacheError::Load(Arc::new(std::io::Error::other("db down")));
    /// assert!(e.load_error::<std::io::Error>().is_some());
    /// ```
    pub fn load_error<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            Self::Load(e) => e.downcast_ref::<E>(),
            _ => None,
        }
    }
}
