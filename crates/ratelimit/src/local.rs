//! The in-process store: GCRA state in sharded maps, idle keys dropped automatically.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;

use foldhash::quality::RandomState;
use hashbrown::HashTable;

use crate::clock::{Clock, MonotonicClock};
use crate::error::BuildError;
use crate::gcra::{self, Decision, Tats};
use crate::quota::{Limits, QuotaSelector};

struct Shard<K> {
    /// Entries with their hash: each key is hashed once per check, for the shard and the table.
    map: HashTable<(u64, K, Tats)>,
    /// Sweep idle keys when the map reaches this size.
    sweep_at: usize,
    /// Keys evicted while active because the shard was full.
    evicted: u64,
}

/// A keyed in-process limiter.
///
/// Keys are spread over sharded maps behind short mutexes. State is a TAT per quota; a key whose
/// every TAT is in the past is at full capacity, so it is dropped (losslessly) by an amortised
/// sweep whenever a shard has doubled since its last sweep: memory stays proportional to the
/// keys active within their burst window, without the caller doing anything (governor needs
/// `retain_recent` calls for that).
///
/// The number of keys is capped ([`max_keys`](Self::max_keys), default
/// [`DEFAULT_MAX_KEYS`](Self::DEFAULT_MAX_KEYS)), so a client rotating keys or addresses under
/// long quota periods cannot grow memory without bound. When a shard is full of active keys, a
/// new key evicts the one nearest to idle among a sample of eight (the one whose state matters
/// least); an evicted key is treated as new when it comes back, so it may be admitted up to its
/// burst again. [`evicted`](Self::evicted) counts these.
///
/// ```
/// use stanchion_ratelimit::{Limits, LocalLimiter, Quota};
/// let limiter = LocalLimiter::<u64>::new(Limits::single(Quota::per_second(2)?))?;
/// assert!(limiter.check(&7, 1).is_allowed());
/// assert!(limiter.check(&7, 1).is_allowed());
/// assert!(!limiter.check(&7, 1).is_allowed());
/// assert!(limiter.check(&8, 1).is_allowed()); // another key
/// # Ok::<(), stanchion_ratelimit::BuildError>(())
/// ```
pub struct LocalLimiter<K, Q = Limits, C = MonotonicClock> {
    shards: Box<[Mutex<Shard<K>>]>,
    /// Most keys per shard.
    per_shard: usize,
    hasher: RandomState,
    selector: Q,
    clock: C,
}

impl<K, Q, C: fmt::Debug> fmt::Debug for LocalLimiter<K, Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("shards", &self.shards.len())
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

const SHARDS: usize = 64;
const MIN_SWEEP: usize = 256;
/// Entries looked at to choose one to evict.
const EVICTION_SAMPLE: usize = 8;

impl<K, Q, C> LocalLimiter<K, Q, C> {
    /// The default cap on keys holding state: 1,000,000 (about 160 MB with short string keys,
    /// measured).
    pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
}

impl<K: Hash + Eq + Clone> LocalLimiter<K> {
    /// A limiter with the same limits for every key.
    pub fn new(limits: Limits) -> Result<Self, BuildError> {
        Self::with_selector(limits, MonotonicClock::default())
    }

    /// A store whose own limits are empty: every check names its limits
    /// ([`check_limits`](Self::check_limits)), as a `RateLimiter` does.
    pub(crate) fn unlimited() -> Self {
        Self::make(Limits::new(), MonotonicClock::default())
    }
}

impl<K: Hash + Eq + Clone, Q: QuotaSelector<K>, C: Clock> LocalLimiter<K, Q, C> {
    /// A limiter choosing limits per key (see [`Plans`](crate::Plans)), on `clock`.
    pub fn with_selector(selector: Q, clock: C) -> Result<Self, BuildError> {
        Ok(Self::make(selector, clock))
    }

    fn make(selector: Q, clock: C) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashTable::new(),
                        sweep_at: MIN_SWEEP,
                        evicted: 0,
                    })
                })
                .collect(),
            per_shard: Self::DEFAULT_MAX_KEYS / SHARDS,
            hasher: RandomState::default(),
            selector,
            clock,
        }
    }

    /// Caps the keys holding state at `max` (at least 64, one per shard; rounded down to a
    /// multiple of 64). See the type's docs for what happens when the cap is reached.
    ///
    /// ```
    /// use stanchion_ratelimit::{Limits, LocalLimiter, Quota};
    /// let limiter = LocalLimiter::<String>::new(Limits::single(Quota::per_hour(10)?))?
    ///     .max_keys(64_000)?;
    /// for i in 0..100_000 {
    ///     limiter.check(&format!("client-{i}"), 1);
    /// }
    /// assert!(limiter.len() <= 64_000);
    /// assert!(limiter.evicted() >= 36_000);
    /// # Ok::<(), stanchion_ratelimit::BuildError>(())
    /// ```
    pub fn max_keys(mut self, max: usize) -> Result<Self, BuildError> {
        if max < SHARDS {
            return Err(BuildError::new("max_keys", "at least 64", max));
        }
        self.per_shard = max / SHARDS;
        Ok(self)
    }

    /// Active keys evicted so far because the cap was reached.
    pub fn evicted(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.evicted).unwrap_or(0))
            .sum()
    }

    /// Checks `cost` units for `key` against its limits.
    #[inline]
    pub fn check(&self, key: &K, cost: u32) -> Decision {
        let limits = self.selector.select(key);
        self.check_limits(key, limits, cost)
    }

    /// Checks `key` against explicit limits (the shared limiter's local fallback uses this).
    #[inline]
    pub fn check_limits<B>(&self, key: &B, limits: &Limits, cost: u32) -> Decision
    where
        K: Borrow<B>,
        B: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.clock.now_micros();
        let hash = self.hasher.hash_one(key);
        // Middle bits pick the shard: the table itself uses the low bits (bucket) and the top
        // seven (control byte), which must stay varied within a shard.
        let shard = &self.shards[(hash >> 32) as usize % SHARDS];
        let mut shard = match shard.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((_, _, tats)) = shard
            .map
            .find_mut(hash, |(h, k, _)| *h == hash && k.borrow() == key)
        {
            return gcra::check_tats(limits, tats, now, cost);
        }
        let mut tats: Tats = [0; crate::quota::MAX_LIMITS];
        let decision = gcra::check_tats(limits, &mut tats, now, cost);
        if gcra::idle_after(&tats) > now {
            // A full sweep when the shard has doubled since the last one (amortised O(1); it
            // stops once the doubled size passes the cap, so a full shard is never swept
            // inside a request again).
            if shard.map.len() >= shard.sweep_at {
                shard.map.retain(|(_, _, t)| gcra::idle_after(t) > now);
                shard.sweep_at = (shard.map.len() * 2).max(MIN_SWEEP);
            }
            if shard.map.len() >= self.per_shard {
                // At the cap: drop the sampled key nearest to idle (an idle one costs nothing;
                // an active one is an eviction).
                let victim = shard
                    .map
                    .iter()
                    .take(EVICTION_SAMPLE)
                    .min_by_key(|(_, _, t)| gcra::idle_after(t))
                    .map(|(h, _, _)| *h);
                if let Some(victim) = victim
                    && let Ok(entry) = shard.map.find_entry(victim, |(h, _, _)| *h == victim)
                {
                    let ((_, _, t), _) = entry.remove();
                    if gcra::idle_after(&t) > now {
                        shard.evicted += 1;
                    }
                }
            }
            shard
                .map
                .insert_unique(hash, (hash, key.to_owned(), tats), |(h, _, _)| *h);
        }
        decision
    }

    /// Keys currently holding state (idle keys may still be counted until the next sweep).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.map.len()).unwrap_or(0))
            .sum()
    }

    /// Whether no key holds state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every idle key now (never needed for correctness or boundedness).
    pub fn sweep(&self) {
        let now = self.clock.now_micros();
        for shard in self.shards.iter() {
            if let Ok(mut s) = shard.lock() {
                s.map.retain(|(_, _, t)| gcra::idle_after(t) > now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::quota::Quota;
    use std::time::Duration;

    #[test]
    fn idle_keys_are_dropped_without_being_asked() {
        let clock = ManualClock::new();
        let limiter: LocalLimiter<u64, Limits, ManualClock> = LocalLimiter::with_selector(
            Limits::single(Quota::per_second(10).unwrap()),
            clock.clone(),
        )
        .unwrap();
        for key in 0..100_000u64 {
            limiter.check(&key, 1);
        }
        assert!(limiter.len() >= 100_000);
        clock.advance(Duration::from_secs(1));
        // New traffic alone (no sweep call) brings memory back down.
        for key in 100_000..200_000u64 {
            limiter.check(&key, 1);
        }
        assert!(limiter.len() < 150_000, "{} keys held", limiter.len());
    }

    #[test]
    fn borrowed_keys_look_up_without_allocating_a_key() {
        let limiter =
            LocalLimiter::<String>::new(Limits::single(Quota::per_second(1).unwrap())).unwrap();
        let limits = Limits::single(Quota::per_second(1).unwrap());
        assert!(limiter.check_limits("k", &limits, 1).is_allowed());
        assert!(!limiter.check_limits("k", &limits, 1).is_allowed());
    }
}
