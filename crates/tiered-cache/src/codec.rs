//! Value codecs: how a value becomes the bytes stored in L2.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

/// Turns values into bytes and back. Implementations must be cheap to clone and stateless.
///
/// ```
/// use stanchion_tiered_cache::{Codec, Postcard};
/// let bytes = Postcard.encode(&(7u32, "seven".to_string())).unwrap();
/// let back: (u32, String) = Postcard.decode(&bytes).unwrap();
/// assert_eq!(back, (7, "seven".into()));
/// ```
pub trait Codec<V>: Send + Sync + 'static {
    /// Encodes `value`.
    fn encode(&self, value: &V) -> Result<Vec<u8>, CodecError>;
    /// Decodes bytes written by [`Codec::encode`]; anything else is an error, never a panic.
    fn decode(&self, bytes: &[u8]) -> Result<V, CodecError>;
}

/// The default codec: postcard, a compact binary serde format (varint integers, no field
/// names). Values written by one type version and read by an incompatible one fail to decode
/// and count as misses.
///
/// ```
/// use stanchion_tiered_cache::{Codec, Postcard};
/// assert_eq!(Postcard.encode(&300u32).unwrap().len(), 2);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard;

impl<V: Serialize + DeserializeOwned> Codec<V> for Postcard {
    fn encode(&self, value: &V) -> Result<Vec<u8>, CodecError> {
        postcard::to_stdvec(value).map_err(|e| CodecError::Encode(e.to_string()))
    }
    fn decode(&self, bytes: &[u8]) -> Result<V, CodecError> {
        postcard::from_bytes(bytes).map_err(|e| CodecError::Decode(e.to_string()))
    }
}

/// JSON (feature `json`): larger and slower than [`Postcard`], readable with `redis-cli`, and
/// tolerant of added fields.
///
/// ```
/// # #[cfg(feature = "json")] {
/// use stanchion_tiered_cache::{Codec, Json};
/// assert_eq!(Json.encode(&vec![1, 2]).unwrap(), b"[1,2]");
/// # }
/// ```
#[cfg(feature = "json")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

#[cfg(feature = "json")]
impl<V: Serialize + DeserializeOwned> Codec<V> for Json {
    fn encode(&self, value: &V) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))
    }
    fn decode(&self, bytes: &[u8]) -> Result<V, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
    }
}
