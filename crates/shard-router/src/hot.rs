//! Hot shards and hot keys: per-shard counters, and an approximate top-N of keys in bounded
//! memory (the Space-Saving algorithm of Metwally, Agrawal and El Abbadi, 2005).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One counter per shard: routed calls, to find a hot shard.
///
/// ```
/// use stanchion_shard_router::ShardCounters;
/// let c = ShardCounters::new(3);
/// c.add(1, 5);
/// assert_eq!(c.snapshot(), vec![0, 5, 0]);
/// ```
#[derive(Debug)]
pub struct ShardCounters {
    counts: Box<[AtomicU64]>,
}

impl ShardCounters {
    /// Counters for `shards` shards.
    pub fn new(shards: u32) -> Self {
        ShardCounters {
            counts: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds `n` to a shard's count (ignored for a shard past the end; saturates).
    #[inline]
    pub fn add(&self, shard: u32, n: u64) {
        if let Some(c) = self.counts.get(shard as usize) {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_add(n))
            });
        }
    }

    /// Every shard's count.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

/// An approximate top-N of keys in memory bounded by `capacity` entries.
///
/// Guarantees (Space-Saving): after `total` observations, every key seen more than
/// `total / capacity` times is tracked; a tracked key's `count` is at least its true count and
/// at most its true count plus its `error`, and `error <= total / capacity`. So with a capacity
/// of 1,000, any key taking more than 0.1 % of the traffic is listed. Checked by a property test
/// against exact counts.
///
/// Observing a key already tracked is a hash-map update; a new key when full replaces the
/// entry with the smallest count (a scan of `capacity` entries: keep the capacity in the
/// hundreds, or sample the calls you observe).
///
/// ```
/// use stanchion_shard_router::HotKeys;
/// let hot = HotKeys::new(8)?;
/// for i in 0..1000_u32 {
///     hot.observe(&"big-tenant".to_string());
///     hot.observe(&format!("tenant-{i}"));
/// }
/// let top = hot.top(1);
/// assert_eq!(top[0].key, "big-tenant");
/// assert!(top[0].count >= 1000);
/// # Ok::<(), stanchion_shard_router::BuildError>(())
/// ```
#[derive(Debug)]
pub struct HotKeys<K> {
    capacity: usize,
    inner: Mutex<Summary<K>>,
}

#[derive(Debug)]
struct Summary<K> {
    total: u64,
    entries: HashMap<K, (u64, u64)>,
}

/// A tracked key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotKey<K> {
    /// The key.
    pub key: K,
    /// An upper bound of how often it was seen.
    pub count: u64,
    /// How much of `count` may be overestimate (`count - error` is a lower bound).
    pub error: u64,
}

impl<K: Hash + Eq + Clone> HotKeys<K> {
    /// Tracks at most `capacity` keys (1 to 1,000,000).
    pub fn new(capacity: usize) -> Result<Self, crate::BuildError> {
        if capacity == 0 {
            return Err(crate::BuildError::Zero { field: "capacity" });
        }
        if capacity > 1_000_000 {
            return Err(crate::BuildError::TooLarge {
                field: "capacity",
                value: capacity as u64,
                max: 1_000_000,
            });
        }
        Ok(HotKeys {
            capacity,
            inner: Mutex::new(Summary {
                total: 0,
                entries: HashMap::with_capacity(capacity),
            }),
        })
    }

    /// Counts one occurrence of `key`.
    pub fn observe(&self, key: &K) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.total = s.total.saturating_add(1);
        if let Some(e) = s.entries.get_mut(key) {
            e.0 = e.0.saturating_add(1);
            return;
        }
        if s.entries.len() < self.capacity {
            s.entries.insert(key.clone(), (1, 0));
            return;
        }
        let (victim, min) = s
            .entries
            .iter()
            .min_by_key(|(_, (c, _))| *c)
            .map(|(k, (c, _))| (k.clone(), *c))
            .expect("a full summary has entries");
        s.entries.remove(&victim);
        s.entries.insert(key.clone(), (min.saturating_add(1), min));
    }

    /// The `n` keys with the highest counts, highest first.
    pub fn top(&self, n: usize) -> Vec<HotKey<K>> {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<HotKey<K>> = s
            .entries
            .iter()
            .map(|(k, (c, e))| HotKey {
                key: k.clone(),
                count: *c,
                error: *e,
            })
            .collect();
        all.sort_by_key(|k| std::cmp::Reverse(k.count));
        all.truncate(n);
        all
    }

    /// Observations so far.
    pub fn total(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}
