//! The bytes of one L2 entry: a fixed header (kind, a unique stamp, the times every instance
//! judges freshness by) and the encoded value, lz4-compressed above a threshold.

use crate::error::CodecError;

const FORMAT: u8 = 1;
/// Bytes before the payload.
pub(crate) const HEADER: usize = 39;
const LZ4: u8 = 1;

/// What an L2 entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A value.
    Value,
    /// The loader said there is no such value ("not found" cached).
    Absent,
    /// Written by an invalidation: a miss that a load begun before it may not overwrite.
    Tombstone,
}

/// An entry's times, in milliseconds since the epoch (the cache's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Times {
    pub(crate) loaded_at: u64,
    /// Served without a refresh until then (the soft TTL).
    pub(crate) fresh_until: u64,
    /// Served at all until then (the hard TTL); afterwards only when loading fails, for up to
    /// `max_stale`.
    pub(crate) expires_at: u64,
    /// How long the load took, for probabilistic early refresh.
    pub(crate) load_ms: u32,
}

/// A decoded header and the (decompressed) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Raw {
    pub(crate) kind: Kind,
    pub(crate) stamp: u64,
    pub(crate) times: Times,
    pub(crate) payload: Vec<u8>,
}

/// Encodes an entry. The payload is compressed when it is at least `compress_above` bytes and
/// compression saves something.
pub(crate) fn encode(
    kind: Kind,
    stamp: u64,
    times: Times,
    payload: &[u8],
    compress_above: Option<usize>,
) -> Vec<u8> {
    let compressed = match compress_above {
        Some(min) if payload.len() >= min => {
            let c = lz4_flex::compress_prepend_size(payload);
            (c.len() < payload.len()).then_some(c)
        }
        _ => None,
    };
    let body = compressed.as_deref().unwrap_or(payload);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.push(FORMAT);
    out.push(match kind {
        Kind::Value => 0,
        Kind::Absent => 1,
        Kind::Tombstone => 2,
    });
    out.push(if compressed.is_some() { LZ4 } else { 0 });
    out.extend_from_slice(&stamp.to_le_bytes());
    out.extend_from_slice(&times.loaded_at.to_le_bytes());
    out.extend_from_slice(&times.fresh_until.to_le_bytes());
    out.extend_from_slice(&times.expires_at.to_le_bytes());
    out.extend_from_slice(&times.load_ms.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The stamp of stored bytes: bytes 3 to 11, zero-padded when the value is shorter (a corrupt
/// value then still has a stamp, and a write-back can replace exactly it). The Redis script
/// reads it the same way.
pub(crate) fn stamp_of(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let part = bytes.get(3..).unwrap_or_default();
    let n = part.len().min(8);
    b[..n].copy_from_slice(&part[..n]);
    u64::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, CodecError> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| CodecError::Decode("entry header cut short".into()))
}

/// Decodes an entry, refusing payloads that would decompress to more than `max_bytes`.
pub(crate) fn decode(bytes: &[u8], max_bytes: usize) -> Result<Raw, CodecError> {
    if bytes.len() < HEADER {
        return Err(CodecError::Decode(format!(
            "entry of {} bytes is shorter than its header",
            bytes.len()
        )));
    }
    if bytes[0] != FORMAT {
        return Err(CodecError::Decode(format!(
            "unknown entry format {}",
            bytes[0]
        )));
    }
    let kind = match bytes[1] {
        0 => Kind::Value,
        1 => Kind::Absent,
        2 => Kind::Tombstone,
        k => return Err(CodecError::Decode(format!("unknown entry kind {k}"))),
    };
    let times = Times {
        loaded_at: u64_at(bytes, 11)?,
        fresh_until: u64_at(bytes, 19)?,
        expires_at: u64_at(bytes, 27)?,
        load_ms: bytes
            .get(35..39)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0),
    };
    let body = &bytes[HEADER..];
    let payload = match bytes[2] {
        0 => body.to_vec(),
        LZ4 => {
            let size = body
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| CodecError::Decode("compressed size missing".into()))?;
            if usize::try_from(size).unwrap_or(usize::MAX) > max_bytes {
                return Err(CodecError::Decode(format!(
                    "compressed value claims {size} bytes, over the {max_bytes}-byte limit"
                )));
            }
            lz4_flex::decompress_size_prepended(body)
                .map_err(|e| CodecError::Decode(format!("lz4: {e}")))?
        }
        f => return Err(CodecError::Decode(format!("unknown entry flags {f}"))),
    };
    Ok(Raw {
        kind,
        stamp: stamp_of(bytes),
        times,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times() -> Times {
        Times {
            loaded_at: 1,
            fresh_until: 2,
            expires_at: 3,
            load_ms: 4,
        }
    }

    #[test]
    fn round_trips_with_and_without_compression() {
        let payload = vec![7u8; 10_000];
        for above in [None, Some(64)] {
            let bytes = encode(Kind::Value, 42, times(), &payload, above);
            assert_eq!(bytes.len() < 1_000, above.is_some());
            let raw = decode(&bytes, 1 << 20).unwrap();
            assert_eq!((raw.kind, raw.stamp, raw.times), (Kind::Value, 42, times()));
            assert_eq!(raw.payload, payload);
        }
    }

    #[test]
    fn incompressible_payloads_are_stored_as_they_are() {
        let payload: Vec<u8> = (0..200u32).map(|i| (i * 7919 % 251) as u8).collect();
        let bytes = encode(Kind::Value, 1, times(), &payload, Some(16));
        assert_eq!(bytes[2], 0);
    }

    #[test]
    fn corrupt_entries_are_errors_not_panics() {
        let good = encode(Kind::Value, 1, times(), &[9u8; 4_000], Some(16));
        for cut in 0..good.len() {
            let _ = decode(&good[..cut], 1 << 20);
        }
        let mut bomb = good.clone();
        bomb[HEADER..HEADER + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&bomb, 1 << 20).is_err());
        let mut kind = good.clone();
        kind[1] = 9;
        assert!(decode(&kind, 1 << 20).is_err());
        assert!(decode(b"hello", 1 << 20).is_err());
    }
}
