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
}

/// A keyed in-process limiter.
///
/// Keys are spread over sharded maps behind short mutexes. State is a TAT per quota; a key whose
/// every TAT is in the past is at full capacity, so it is dropped (losslessly) by an amortised
/// sweep whenever a shard has doubled since its last sweep: memory stays proportional to the
/// keys active within their burst window, without the caller doing anything (governor needs
/// `retain_recent` calls for that).
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

impl<K: Hash + Eq + Clone> LocalLimiter<K> {
    /// A limiter with the same limits for every key.
    pub fn new(limits: Limits) -> Result<Self, BuildError> {
        Self::with_selector(limits, MonotonicClock::default())
    }
}

impl<K: Hash + Eq + Clone, Q: QuotaSelector<K>, C: Clock> LocalLimiter<K, Q, C> {
    /// A limiter choosing limits per key (see [`Plans`](crate::Plans)), on `clock`.
    pub fn with_selector(selector: Q, clock: C) -> Result<Self, BuildError> {
        Ok(Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashTable::new(),
                        sweep_at: MIN_SWEEP,
                    })
                })
                .collect(),
            hasher: RandomState::default(),
            selector,
            clock,
        })
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
            return gcra::check(limits, tats, now, cost);
        }
        let mut tats: Tats = [0; crate::quota::MAX_LIMITS];
        let decision = gcra::check(limits, &mut tats, now, cost);
        if gcra::idle_after(&tats) > now {
            if shard.map.len() >= shard.sweep_at {
                shard.map.retain(|(_, _, t)| gcra::idle_after(t) > now);
                shard.sweep_at = (shard.map.len() * 2).max(MIN_SWEEP);
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
