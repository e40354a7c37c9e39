//! Shard keys and the one hash every sharder in this crate starts from.

use xxhash_rust::xxh3::xxh3_64;

/// A shard key: a 64-bit integer (a tenant or aggregate id), a text key or raw bytes.
///
/// Keys of different kinds are different keys: `Key::Int(5)` and `Key::Text("5")` may land on
/// different shards. Build one with `From`: `Key::from(42_i64)`, `Key::from("acme")`.
///
/// ```
/// use stanchion_shard_router::Key;
/// let a = Key::from(42_i64);
/// assert_eq!(a, Key::Int(42));
/// assert_eq!(Key::from("acme").hash64(), Key::Bytes(b"acme").hash64());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Key<'a> {
    /// A signed 64-bit integer (PostgreSQL `bigint`; `integer` values convert losslessly).
    Int(i64),
    /// UTF-8 text (PostgreSQL `text` / `varchar` under a deterministic collation).
    Text(&'a str),
    /// Raw bytes (PostgreSQL `bytea`). Hashes like the text with the same bytes.
    Bytes(&'a [u8]),
}

impl Key<'_> {
    /// The stable 64-bit hash every sharder here starts from: XXH3-64 (seed 0) of the key's
    /// bytes, little-endian for integers. It is part of the placement format: it does not change
    /// between versions or machines, so keys do not move on an upgrade.
    #[inline]
    pub fn hash64(&self) -> u64 {
        match *self {
            Key::Int(v) => xxh3_64(&v.to_le_bytes()),
            Key::Text(s) => xxh3_64(s.as_bytes()),
            Key::Bytes(b) => xxh3_64(b),
        }
    }

    /// `"int"`, `"text"` or `"bytes"`, as used in errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Key::Int(_) => "int",
            Key::Text(_) => "text",
            Key::Bytes(_) => "bytes",
        }
    }
}

impl From<i64> for Key<'_> {
    fn from(v: i64) -> Self {
        Key::Int(v)
    }
}

impl From<i32> for Key<'_> {
    fn from(v: i32) -> Self {
        Key::Int(i64::from(v))
    }
}

impl<'a> From<&'a str> for Key<'a> {
    fn from(v: &'a str) -> Self {
        Key::Text(v)
    }
}

impl<'a> From<&'a String> for Key<'a> {
    fn from(v: &'a String) -> Self {
        Key::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Key<'a> {
    fn from(v: &'a [u8]) -> Self {
        Key::Bytes(v)
    }
}

/// A 64-bit finalizer (from MurmurHash3): spreads a combination of two hashes over all bits.
#[inline]
pub(crate) fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Maps a 64-bit hash onto `0..n` without a division (Lemire's multiply-shift).
#[inline]
pub(crate) fn fast_range(hash: u64, n: u32) -> u32 {
    ((u128::from(hash) * u128::from(n)) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned() {
        // Placement depends on these values: a change here moves every key.
        assert_eq!(Key::Int(0).hash64(), xxh3_64(&[0; 8]));
        assert_eq!(Key::Text("").hash64(), xxh3_64(b""));
        assert_eq!(Key::Text("").hash64(), 0x2d06_8005_38d3_94c2);
    }

    #[test]
    fn fast_range_stays_in_range() {
        for n in [1, 2, 3, 4096, u32::MAX] {
            for h in [0, 1, u64::MAX, u64::MAX / 2] {
                assert!(fast_range(h, n) < n);
            }
        }
    }
}
