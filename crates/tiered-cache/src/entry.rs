//! The bytes of one L2 entry: a fixed header (kind, a unique stamp, the times every instance
//! judges freshness by), the entry's tags if it has any, and the encoded value,
//! lz4-compressed above a threshold.

use crate::error::CodecError;

const FORMAT: u8 = 1;
/// The format of an entry with tags: the header, then the tag time (u64), the number of tags
/// (u8) and each tag as a length (u8) and its bytes, then the payload.
const FORMAT_TAGGED: u8 = 2;
/// Most tags on one entry.
pub(crate) const MAX_TAGS: usize = 32;
/// Longest tag, in bytes.
pub(crate) const MAX_TAG_BYTES: usize = 128;
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

/// An entry's tags and the tag time of its load: the entry is current while every tag's
/// generation is at most `time`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tagged {
    pub(crate) time: u64,
    pub(crate) names: Vec<String>,
}

/// A decoded header and the payload (borrowed from the stored bytes unless it was
/// compressed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Raw<'a> {
    pub(crate) kind: Kind,
    pub(crate) stamp: u64,
    pub(crate) times: Times,
    pub(crate) tags: Option<Tagged>,
    pub(crate) payload: std::borrow::Cow<'a, [u8]>,
}

/// Encodes an entry. The payload is compressed when it is at least `compress_above` bytes and
/// compression saves something. Tags beyond [`MAX_TAGS`] or longer than [`MAX_TAG_BYTES`]
/// are the caller's to refuse (they are cut here).
pub(crate) fn encode(
    kind: Kind,
    stamp: u64,
    times: Times,
    tags: Option<&Tagged>,
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
    out.push(if tags.is_some() {
        FORMAT_TAGGED
    } else {
        FORMAT
    });
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
    if let Some(t) = tags {
        out.extend_from_slice(&t.time.to_le_bytes());
        let names: Vec<&[u8]> = t
            .names
            .iter()
            .map(|n| &n.as_bytes()[..n.len().min(MAX_TAG_BYTES)])
            .take(MAX_TAGS)
            .collect();
        out.push(names.len() as u8);
        for n in names {
            out.push(n.len() as u8);
            out.extend_from_slice(n);
        }
    }
    out.extend_from_slice(body);
    out
}

/// Reads the tag section at the start of `rest`: the tags and the bytes after them.
fn decode_tags(rest: &[u8]) -> Result<(Tagged, &[u8]), CodecError> {
    let short = || CodecError::Decode("entry tags cut short".into());
    let time = u64_at(rest, 0)?;
    let count = *rest.get(8).ok_or_else(short)?;
    if usize::from(count) > MAX_TAGS {
        return Err(CodecError::Decode(format!("entry claims {count} tags")));
    }
    let mut at = 9;
    let mut names = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = usize::from(*rest.get(at).ok_or_else(short)?);
        let bytes = rest.get(at + 1..at + 1 + len).ok_or_else(short)?;
        let name = std::str::from_utf8(bytes)
            .map_err(|_| CodecError::Decode("entry tag is not UTF-8".into()))?;
        names.push(name.to_owned());
        at += 1 + len;
    }
    Ok((Tagged { time, names }, &rest[at..]))
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
pub(crate) fn decode(bytes: &[u8], max_bytes: usize) -> Result<Raw<'_>, CodecError> {
    if bytes.len() < HEADER {
        return Err(CodecError::Decode(format!(
            "entry of {} bytes is shorter than its header",
            bytes.len()
        )));
    }
    if bytes[0] != FORMAT && bytes[0] != FORMAT_TAGGED {
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
    let (tags, body) = if bytes[0] == FORMAT_TAGGED {
        let (t, body) = decode_tags(&bytes[HEADER..])?;
        (Some(t), body)
    } else {
        (None, &bytes[HEADER..])
    };
    let payload = match bytes[2] {
        0 => std::borrow::Cow::Borrowed(body),
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
            let out = lz4_flex::decompress_size_prepended(body)
                .map_err(|e| CodecError::Decode(format!("lz4: {e}")))?;
            // A stream cut short can still decode, to fewer bytes than it claims.
            if out.len() != size as usize {
                return Err(CodecError::Decode(format!(
                    "compressed value gave {} of its {size} bytes",
                    out.len()
                )));
            }
            std::borrow::Cow::Owned(out)
        }
        f => return Err(CodecError::Decode(format!("unknown entry flags {f}"))),
    };
    Ok(Raw {
        kind,
        stamp: stamp_of(bytes),
        times,
        tags,
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
            let bytes = encode(Kind::Value, 42, times(), None, &payload, above);
            assert_eq!(bytes.len() < 1_000, above.is_some());
            let raw = decode(&bytes, 1 << 20).unwrap();
            assert_eq!((raw.kind, raw.stamp, raw.times), (Kind::Value, 42, times()));
            assert_eq!(raw.payload, payload);
        }
    }

    fn tags() -> Tagged {
        Tagged {
            time: 99,
            names: vec!["category:7".into(), "brand:é".into(), String::new()],
        }
    }

    #[test]
    fn tagged_entries_round_trip_and_keep_the_stamp_in_place() {
        let payload = vec![3u8; 5_000];
        for above in [None, Some(64)] {
            let bytes = encode(Kind::Value, 42, times(), Some(&tags()), &payload, above);
            assert_eq!(stamp_of(&bytes), 42);
            let raw = decode(&bytes, 1 << 20).unwrap();
            assert_eq!((raw.kind, raw.times), (Kind::Value, times()));
            assert_eq!(raw.tags, Some(tags()));
            assert_eq!(raw.payload, payload);
        }
        let absent = encode(Kind::Absent, 1, times(), None, &[], None);
        assert_eq!(decode(&absent, 64).unwrap().tags, None);
    }

    #[test]
    fn incompressible_payloads_are_stored_as_they_are() {
        let payload: Vec<u8> = (0..200u32).map(|i| (i * 7919 % 251) as u8).collect();
        let bytes = encode(Kind::Value, 1, times(), None, &payload, Some(16));
        assert_eq!(bytes[2], 0);
    }

    #[test]
    fn corrupt_entries_are_errors_not_panics() {
        let good = encode(Kind::Value, 1, times(), None, &[9u8; 4_000], Some(16));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut], 1 << 20).is_err(), "cut at {cut}");
        }
        let tagged = encode(
            Kind::Value,
            1,
            times(),
            Some(&tags()),
            &[9u8; 400],
            Some(16),
        );
        for cut in 0..tagged.len() {
            assert!(decode(&tagged[..cut], 1 << 20).is_err(), "cut at {cut}");
        }
        let mut many = tagged.clone();
        many[HEADER + 8] = 200;
        assert!(decode(&many, 1 << 20).is_err());
        let mut bomb = good.clone();
        bomb[HEADER..HEADER + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&bomb, 1 << 20).is_err());
        let mut kind = good.clone();
        kind[1] = 9;
        assert!(decode(&kind, 1 << 20).is_err());
        assert!(decode(b"hello", 1 << 20).is_err());
    }
}
