//! PostgreSQL's own hash partitioning, computed in the client.

use crate::error::{BuildError, KeyError};
use crate::key::Key;
use crate::sharder::{ShardId, Sharder};

/// The seed PostgreSQL passes to every partition hash function (`HASH_PARTITION_SEED`).
const PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// Places a key on the partition that PostgreSQL's `PARTITION BY HASH (key)` with
/// `MODULUS n` would choose: shard `r` is the partition `FOR VALUES WITH (MODULUS n, REMAINDER
/// r)`. So a table partitioned by hash inside one database, or tables spread over databases
/// (as pgdog and Citus-style setups do), agree with the client about where a row lives.
///
/// Integer keys hash as `bigint` (equal to `integer` and `smallint` for the same value, as in
/// PostgreSQL); text keys as `text` under a deterministic collation (the default); bytes as
/// `bytea`. Checked against a real PostgreSQL in the tests.
///
/// Like modulo, changing `n` moves most keys (PostgreSQL can only split a partition by
/// doubling the modulus); use logical slots (`ShardMap`) when shards will be added.
///
/// ```
/// use stanchion_shard_router::{Key, PgHash, Sharder};
/// let pg = PgHash::new(4)?;
/// // `CREATE TABLE t (id bigint) PARTITION BY HASH (id)` with four partitions: id 1 goes to
/// // the partition with REMAINDER 0, as `SELECT satisfies_hash_partition(...)` confirms.
/// assert_eq!(pg.shard(Key::Int(1))?, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgHash {
    modulus: u32,
}

impl PgHash {
    /// `modulus` partitions (at least one).
    pub fn new(modulus: u32) -> Result<Self, BuildError> {
        if modulus == 0 {
            return Err(BuildError::Zero { field: "modulus" });
        }
        Ok(PgHash { modulus })
    }

    /// The 64-bit row hash PostgreSQL computes for a one-column hash partition key.
    pub fn row_hash(key: Key<'_>) -> u64 {
        let h = match key {
            Key::Int(v) => hashint8extended(v, PARTITION_SEED),
            Key::Text(s) => hash_bytes_extended(s.as_bytes(), PARTITION_SEED),
            Key::Bytes(b) => hash_bytes_extended(b, PARTITION_SEED),
        };
        hash_combine64(0, h)
    }
}

impl Sharder for PgHash {
    #[inline]
    fn shard(&self, key: Key<'_>) -> Result<ShardId, KeyError> {
        Ok((Self::row_hash(key) % u64::from(self.modulus)) as u32)
    }
    fn shard_count(&self) -> u32 {
        self.modulus
    }
}

/// `hash_combine64` from PostgreSQL's `common/hashfn.h`.
fn hash_combine64(mut a: u64, b: u64) -> u64 {
    a ^= b
        .wrapping_add(0x49a0_f4dd_15e5_a8e3)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7);
    a
}

/// `hashint8extended`: the high half folded into the low half (so equal values of `int2`,
/// `int4` and `int8` hash alike), then the 32-bit hash.
fn hashint8extended(v: i64, seed: u64) -> u64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = lo ^ if v >= 0 { hi } else { !hi };
    hash_uint32_extended(folded, seed)
}

struct State {
    a: u32,
    b: u32,
    c: u32,
}

impl State {
    fn new(len: u32, seed: u64) -> Self {
        let init = 0x9e37_79b9_u32.wrapping_add(len).wrapping_add(3_923_095);
        let mut s = State {
            a: init,
            b: init,
            c: init,
        };
        if seed != 0 {
            s.a = s.a.wrapping_add((seed >> 32) as u32);
            s.b = s.b.wrapping_add(seed as u32);
            s.mix();
        }
        s
    }

    /// Bob Jenkins' lookup3 `mix`.
    fn mix(&mut self) {
        let State { a, b, c } = self;
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }

    /// lookup3 `final`, then PostgreSQL's 64-bit result `(b << 32) | c`.
    fn finish(mut self) -> u64 {
        let State { a, b, c } = &mut self;
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
        (u64::from(*b) << 32) | u64::from(*c)
    }
}

/// `hash_bytes_uint32_extended`.
fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let mut s = State::new(4, seed);
    s.a = s.a.wrapping_add(k);
    s.finish()
}

/// `hash_bytes_extended` (little-endian byte order, as on every platform PostgreSQL ships for
/// today; a big-endian server hashes text differently).
fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let mut s = State::new(k.len() as u32, seed);
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut rest = k;
    while rest.len() >= 12 {
        s.a = s.a.wrapping_add(word(&rest[0..4]));
        s.b = s.b.wrapping_add(word(&rest[4..8]));
        s.c = s.c.wrapping_add(word(&rest[8..12]));
        s.mix();
        rest = &rest[12..];
    }
    // The last 0..11 bytes, little-endian into a, b, then c; the lowest byte of c is left for
    // the length, as in lookup3.
    for (i, byte) in rest.iter().enumerate() {
        let shift = 8 * (i % 4) as u32;
        match i / 4 {
            0 => s.a = s.a.wrapping_add(u32::from(*byte) << shift),
            1 => s.b = s.b.wrapping_add(u32::from(*byte) << shift),
            _ => s.c = s.c.wrapping_add(u32::from(*byte) << (shift + 8)),
        }
    }
    s.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_integers_hash_like_int4() {
        // PostgreSQL folds the high half away for values that fit in 32 bits.
        for v in [
            -5_i64,
            -1,
            0,
            1,
            77,
            i64::from(i32::MAX),
            i64::from(i32::MIN),
        ] {
            assert_eq!(
                hashint8extended(v, PARTITION_SEED),
                hash_uint32_extended(v as i32 as u32, PARTITION_SEED)
            );
        }
    }

    #[test]
    fn zero_modulus_is_refused() {
        assert_eq!(
            PgHash::new(0).unwrap_err(),
            BuildError::Zero { field: "modulus" }
        );
    }
}
