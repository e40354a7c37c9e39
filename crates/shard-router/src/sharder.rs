//! The `Sharder` seam and the classic sharders: modulo, jump hash, rendezvous, a ring, ranges.

use std::fmt;

use crate::error::{BuildError, KeyError};
use crate::key::{Key, mix64};

/// A shard number, `0..shard_count()`.
pub type ShardId = u32;

/// Places a key on a shard: pure, synchronous and deterministic (the same key, the same
/// configuration, the same shard, in every process and on every machine).
///
/// ```
/// use stanchion_shard_router::{JumpHash, Key, Sharder};
/// let jump = JumpHash::new(8)?;
/// let shard = jump.shard(Key::from("tenant-42"))?;
/// assert!(shard < 8);
/// assert_eq!(shard, jump.shard(Key::from("tenant-42"))?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Sharder: Send + Sync + fmt::Debug {
    /// The shard of `key`.
    fn shard(&self, key: Key<'_>) -> Result<ShardId, KeyError>;
    /// How many shards keys are spread over.
    fn shard_count(&self) -> u32;
}

fn nonzero(n: u32, field: &'static str) -> Result<u32, BuildError> {
    if n == 0 {
        Err(BuildError::Zero { field })
    } else {
        Ok(n)
    }
}

/// `hash % n`. Balanced, fastest, and moves almost every key when `n` changes
/// (`n / (n + 1)` of them): fine for a shard count that never changes, shown here for contrast.
///
/// ```
/// use stanchion_shard_router::{Key, Modulo, Sharder};
/// assert!(Modulo::new(0).is_err());
/// let m = Modulo::new(4)?;
/// assert!(m.shard(Key::Int(7))? < 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modulo {
    n: u32,
}

impl Modulo {
    /// Over `n` shards (at least one).
    pub fn new(n: u32) -> Result<Self, BuildError> {
        Ok(Modulo {
            n: nonzero(n, "shards")?,
        })
    }
}

impl Sharder for Modulo {
    #[inline]
    fn shard(&self, key: Key<'_>) -> Result<ShardId, KeyError> {
        Ok((key.hash64() % u64::from(self.n)) as u32)
    }
    fn shard_count(&self) -> u32 {
        self.n
    }
}

/// Jump consistent hash (Lamping and Veach, 2014): no memory, balanced, and going from `n` to
/// `n + 1` shards moves exactly the keys the new shard takes (`1 / (n + 1)` of them). Shards can
/// only be added or removed at the end, and are unweighted.
///
/// ```
/// use stanchion_shard_router::{JumpHash, Key, Sharder};
/// let (a, b) = (JumpHash::new(10)?, JumpHash::new(11)?);
/// // A key either stays or moves to the new shard, never between old shards.
/// for id in 0..1000_i64 {
///     let (x, y) = (a.shard(Key::Int(id))?, b.shard(Key::Int(id))?);
///     assert!(x == y || y == 10);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpHash {
    n: u32,
}

impl JumpHash {
    /// Over `n` shards (at least one).
    pub fn new(n: u32) -> Result<Self, BuildError> {
        Ok(JumpHash {
            n: nonzero(n, "shards")?,
        })
    }

    /// The jump hash of a 64-bit hash over `n` buckets (`n` at least one).
    #[inline]
    pub fn bucket(mut hash: u64, n: u32) -> u32 {
        let (mut b, mut j): (i64, i64) = (-1, 0);
        while j < i64::from(n) {
            b = j;
            hash = hash.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
            j = ((b + 1) as f64 * ((1_u64 << 31) as f64 / ((hash >> 33) + 1) as f64)) as i64;
        }
        b as u32
    }
}

impl Sharder for JumpHash {
    #[inline]
    fn shard(&self, key: Key<'_>) -> Result<ShardId, KeyError> {
        Ok(Self::bucket(key.hash64(), self.n))
    }
    fn shard_count(&self) -> u32 {
        self.n
    }
}

/// Rendezvous (highest random weight) hashing with weights: each key goes to the shard with the
/// highest `weight / -ln(u)`, `u` a per-(key, shard) hash in (0, 1). Any shard can be added,
/// removed or reweighted, and only the keys it wins or loses move; a shard gets keys in
/// proportion to its weight. A lookup scores every shard: O(n).
///
/// ```
/// use stanchion_shard_router::{Key, Rendezvous, Sharder};
/// let hrw = Rendezvous::weighted(&[1.0, 1.0, 2.0])?; // shard 2 gets half the keys
/// assert!(hrw.shard(Key::from("sku-1"))? < 3);
/// assert!(Rendezvous::weighted(&[1.0, 0.0]).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    seeds: Vec<u64>,
    weights: Vec<f64>,
    uniform: bool,
}

impl Rendezvous {
    /// `n` shards of equal weight.
    pub fn new(n: u32) -> Result<Self, BuildError> {
        nonzero(n, "shards")?;
        Self::weighted(&vec![1.0; n as usize])
    }

    /// One shard per weight (shard `i` has `weights[i]`); weights must be finite and above zero.
    pub fn weighted(weights: &[f64]) -> Result<Self, BuildError> {
        if weights.is_empty() {
            return Err(BuildError::Empty { field: "weights" });
        }
        if weights.len() > u32::MAX as usize {
            return Err(BuildError::TooLarge {
                field: "weights",
                value: weights.len() as u64,
                max: u64::from(u32::MAX),
            });
        }
        for (i, w) in weights.iter().enumerate() {
            if !(w.is_finite() && *w > 0.0) {
                return Err(BuildError::BadWeight {
                    shard: i as u32,
                    weight: w.to_string(),
                });
            }
        }
        Ok(Rendezvous {
            seeds: (0..weights.len() as u64).map(shard_seed).collect(),
            uniform: weights.iter().all(|w| *w == weights[0]),
            weights: weights.to_vec(),
        })
    }
}

/// A shard's fixed seed: its number, hashed (shard `i` scores the same in every process).
fn shard_seed(i: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())
}

impl Sharder for Rendezvous {
    fn shard(&self, key: Key<'_>) -> Result<ShardId, KeyError> {
        let h = key.hash64();
        let mut best = 0;
        if self.uniform {
            // -1/ln(u) grows with u: with equal weights the largest hash wins.
            let mut top = 0;
            for (i, seed) in self.seeds.iter().enumerate() {
                let s = mix64(h ^ seed);
                if s > top || i == 0 {
                    top = s;
                    best = i;
                }
            }
        } else {
            let mut top = f64::NEG_INFINITY;
            for (i, (seed, w)) in self.seeds.iter().zip(&self.weights).enumerate() {
                // u in (0, 1): 53 bits of the mixed hash, centred in its interval.
                let u = ((mix64(h ^ seed) >> 11) as f64 + 0.5) / (1_u64 << 53) as f64;
                let score = w / -u.ln();
                if score > top {
                    top = score;
                    best = i;
                }
            }
        }
        Ok(best as u32)
    }
    fn shard_count(&self) -> u32 {
        self.seeds.len() as u32
    }
}

/// A consistent-hash ring with virtual nodes: each shard owns `vnodes × weight` points on a
/// 64-bit circle and a key goes to the next point clockwise. Adding a shard moves about
/// `1 / (n + 1)` of the keys (with a spread that shrinks as `vnodes` grows); balance improves
/// as `1 / sqrt(vnodes)`. A lookup is a binary search; memory is 12 bytes per point.
///
/// ```
/// use stanchion_shard_router::{Key, Ring, Sharder};
/// let ring = Ring::new(4, 160)?;
/// assert_eq!(ring.points(), 640);
/// assert!(ring.shard(Key::Int(1))? < 4);
/// assert!(Ring::new(4, 0).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    points: Vec<u64>,
    owners: Vec<u32>,
    shards: u32,
}

impl Ring {
    /// `shards` shards of equal weight, `vnodes` points each.
    pub fn new(shards: u32, vnodes: u32) -> Result<Self, BuildError> {
        nonzero(shards, "shards")?;
        Self::weighted(&vec![1; shards as usize], vnodes)
    }

    /// Shard `i` gets `vnodes × weights[i]` points.
    pub fn weighted(weights: &[u32], vnodes: u32) -> Result<Self, BuildError> {
        nonzero(vnodes, "vnodes")?;
        if weights.is_empty() {
            return Err(BuildError::Empty { field: "weights" });
        }
        let mut total: u64 = 0;
        for (i, w) in weights.iter().enumerate() {
            if *w == 0 {
                return Err(BuildError::BadWeight {
                    shard: i as u32,
                    weight: "0".into(),
                });
            }
            total = total.saturating_add(u64::from(*w) * u64::from(vnodes));
        }
        const MAX_POINTS: u64 = 1 << 26;
        if total > MAX_POINTS {
            return Err(BuildError::TooLarge {
                field: "vnodes × weights",
                value: total,
                max: MAX_POINTS,
            });
        }
        let mut all: Vec<(u64, u32)> = Vec::with_capacity(total as usize);
        for (shard, w) in weights.iter().enumerate() {
            for v in 0..u64::from(*w) * u64::from(vnodes) {
                let mut bytes = [0_u8; 16];
                bytes[..8].copy_from_slice(&(shard as u64).to_le_bytes());
                bytes[8..].copy_from_slice(&v.to_le_bytes());
                all.push((xxhash_rust::xxh3::xxh3_64(&bytes), shard as u32));
            }
        }
        // Ties (astronomically rare) go to the lower shard, the same way everywhere.
        all.sort_unstable();
        all.dedup_by_key(|p| p.0);
        Ok(Ring {
            points: all.iter().map(|p| p.0).collect(),
            owners: all.iter().map(|p| p.1).collect(),
            shards: weights.len() as u32,
        })
    }

    /// Points on the ring.
    pub fn points(&self) -> usize {
        self.points.len()
    }

    /// Bytes the ring holds on the heap (12 per point).
    pub fn heap_bytes(&self) -> usize {
        self.points.capacity() * 8 + self.owners.capacity() * 4
    }
}

impl Sharder for Ring {
    #[inline]
    fn shard(&self, key: Key<'_>) -> Result<ShardId, KeyError> {
        let h = key.hash64();
        let i = self.points.partition_point(|p| *p < h);
        Ok(self.owners[if i == self.points.len() { 0 } else { i }])
    }
    fn shard_count(&self) -> u32 {
        self.shards
    }
}

/// Ranges of key values (not hashes): `[start, end)` to a shard, covering every key exactly
/// once. Range scans stay on one shard; hot ranges (recent ids) are the price. Integer ranges
/// place `Key::Int`; text ranges place `Key::Text` and `Key::Bytes` by byte order.
///
/// ```
/// use stanchion_shard_router::{Key, Ranges, Sharder};
/// let r = Ranges::int(&[(i64::MIN, Some(1_000), 0), (1_000, Some(5_000), 1), (5_000, None, 2)])?;
/// assert_eq!(r.shard(Key::Int(4_999))?, 1);
/// assert_eq!(r.shard(Key::Int(5_000))?, 2);
/// // A gap between 1,000 and 2,000 is refused, naming the range:
/// let gap = Ranges::int(&[(i64::MIN, Some(1_000), 0), (2_000, None, 1)]).unwrap_err();
/// assert!(gap.to_string().contains("ranges[1]"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    bounds: Bounds,
    shards_of: Vec<u32>,
    shards: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Bounds {
    /// Start of each range after the first.
    Int(Vec<i64>),
    Text(Vec<Vec<u8>>),
}

impl Ranges {
    /// Integer ranges `(start, end, shard)`: `start` inclusive, `end` exclusive (`None`: no end).
    /// The first must start at `i64::MIN`, each next one where the previous ends, and the last
    /// must have no end.
    pub fn int(ranges: &[(i64, Option<i64>, ShardId)]) -> Result<Self, BuildError> {
        let spans: Vec<(i64, Option<i64>, u32)> = ranges.to_vec();
        let starts = check_spans(&spans, i64::MIN, |v| v.to_string())?;
        Ok(Ranges {
            shards_of: spans.iter().map(|s| s.2).collect(),
            shards: shard_count(&spans),
            bounds: Bounds::Int(starts),
        })
    }

    /// Text ranges by byte order; the first must start at `""`.
    pub fn text(ranges: &[(&str, Option<&str>, ShardId)]) -> Result<Self, BuildError> {
        let spans: Vec<(Vec<u8>, Option<Vec<u8>>, u32)> = ranges
            .iter()
            .map(|(a, b, s)| (a.as_bytes().to_vec(), b.map(|b| b.as_bytes().to_vec()), *s))
            .collect();
        let starts = check_spans(&spans, Vec::new(), |v| {
            format!("{:?}", String::from_utf8_lossy(v))
        })?;
        Ok(Ranges {
            shards_of: spans.iter().map(|s| s.2).collect(),
            shards: shard_count(&spans),
            bounds: Bounds::Text(starts),
        })
    }
}

fn shard_count<T>(spans: &[(T, Option<T>, u32)]) -> u32 {
    spans
        .iter()
        .map(|s| s.2)
        .max()
        .map_or(0, |m| m.saturating_add(1))
}

/// Checks that the spans tile the whole domain; returns the starts after the first.
fn check_spans<T: Ord + Clone>(
    spans: &[(T, Option<T>, u32)],
    min: T,
    show: impl Fn(&T) -> String,
) -> Result<Vec<T>, BuildError> {
    let Some(first) = spans.first() else {
        return Err(BuildError::Empty { field: "ranges" });
    };
    if first.0 != min {
        return Err(BuildError::RangeGap {
            index: 0,
            detail: format!("keys below {} have no range", show(&first.0)),
        });
    }
    for (i, w) in spans.windows(2).enumerate() {
        let (prev, next) = (&w[0], &w[1]);
        let Some(end) = &prev.1 else {
            return Err(BuildError::RangeOverlap {
                index: i + 1,
                detail: format!("ranges[{i}] has no end, so it already covers these keys"),
            });
        };
        if next.0 < *end {
            return Err(BuildError::RangeOverlap {
                index: i + 1,
                detail: format!(
                    "starts at {}, before ranges[{i}] ends at {}",
                    show(&next.0),
                    show(end)
                ),
            });
        }
        if next.0 > *end {
            return Err(BuildError::RangeGap {
                index: i + 1,
                detail: format!("keys from {} to {} have no range", show(end), show(&next.0)),
            });
        }
    }
    for (i, s) in spans.iter().enumerate() {
        if let Some(end) = &s.1
            && *end <= s.0
        {
            return Err(BuildError::RangeOverlap {
                index: i,
                detail: format!("is empty or reversed ({}..{})", show(&s.0), show(end)),
            });
        }
    }
    if let Some(end) = &spans[spans.len() - 1].1 {
        return Err(BuildError::RangeGap {
            index: spans.len(),
            detail: format!("keys from {} up have no range", show(end)),
        });
    }
    Ok(spans[1..].iter().map(|s| s.0.clone()).collect())
}

impl Sharder for Ranges {
    fn shard(&self, key: Key<'_>) -> Result<ShardId, KeyError> {
        let i = match (&self.bounds, key) {
            (Bounds::Int(starts), Key::Int(v)) => starts.partition_point(|s| *s <= v),
            (Bounds::Text(starts), Key::Text(t)) => {
                starts.partition_point(|s| s.as_slice() <= t.as_bytes())
            }
            (Bounds::Text(starts), Key::Bytes(b)) => starts.partition_point(|s| s.as_slice() <= b),
            (Bounds::Int(_), other) => {
                return Err(KeyError::Kind {
                    sharder: "Ranges",
                    expected: "int",
                    kind: other.kind(),
                });
            }
            (Bounds::Text(_), other) => {
                return Err(KeyError::Kind {
                    sharder: "Ranges",
                    expected: "text",
                    kind: other.kind(),
                });
            }
        };
        Ok(self.shards_of[i])
    }
    fn shard_count(&self) -> u32 {
        self.shards
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_matches_the_papers_reference_values() {
        // Values from the reference C++ implementation for key 0..: key 0 is always bucket 0.
        assert_eq!(JumpHash::bucket(0, 1), 0);
        assert_eq!(JumpHash::bucket(0, 100), 0);
        for n in 1..200 {
            assert!(JumpHash::bucket(12_345, n) < n);
        }
    }

    #[test]
    fn ranges_refuse_overlaps_gaps_and_empties() {
        let e = Ranges::int(&[(i64::MIN, Some(10), 0), (5, None, 1)]).unwrap_err();
        assert!(
            matches!(e, BuildError::RangeOverlap { index: 1, .. }),
            "{e}"
        );
        let e = Ranges::int(&[(0, None, 0)]).unwrap_err();
        assert!(matches!(e, BuildError::RangeGap { index: 0, .. }), "{e}");
        let e = Ranges::int(&[(i64::MIN, Some(10), 0)]).unwrap_err();
        assert!(matches!(e, BuildError::RangeGap { index: 1, .. }), "{e}");
        let e = Ranges::int(&[(i64::MIN, None, 0), (10, None, 1)]).unwrap_err();
        assert!(
            matches!(e, BuildError::RangeOverlap { index: 1, .. }),
            "{e}"
        );
        let e = Ranges::int(&[]).unwrap_err();
        assert_eq!(e, BuildError::Empty { field: "ranges" });
        let e = Ranges::text(&[("", Some("m"), 0), ("m", Some("m"), 1), ("m", None, 2)]);
        assert!(
            matches!(e, Err(BuildError::RangeOverlap { index: 1, .. })),
            "{e:?}"
        );
    }

    #[test]
    fn text_ranges_place_by_byte_order() {
        let r = Ranges::text(&[("", Some("h"), 0), ("h", Some("p"), 1), ("p", None, 2)]).unwrap();
        assert_eq!(r.shard(Key::Text("apple")).unwrap(), 0);
        assert_eq!(r.shard(Key::Text("h")).unwrap(), 1);
        assert_eq!(r.shard(Key::Bytes(b"zebra")).unwrap(), 2);
        assert!(r.shard(Key::Int(1)).is_err());
        assert_eq!(r.shard_count(), 3);
    }

    #[test]
    fn weights_and_counts_are_checked() {
        assert_eq!(
            JumpHash::new(0).unwrap_err(),
            BuildError::Zero { field: "shards" }
        );
        assert!(matches!(
            Rendezvous::weighted(&[1.0, f64::NAN]),
            Err(BuildError::BadWeight { shard: 1, .. })
        ));
        assert_eq!(
            Rendezvous::weighted(&[]).unwrap_err(),
            BuildError::Empty { field: "weights" }
        );
        assert!(matches!(
            Ring::weighted(&[1, 0], 10),
            Err(BuildError::BadWeight { shard: 1, .. })
        ));
        assert!(matches!(
            Ring::new(1 << 20, 1 << 10),
            Err(BuildError::TooLarge { .. })
        ));
    }
}
