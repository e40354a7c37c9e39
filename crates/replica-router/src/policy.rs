//! Replica selection policies: pure, synchronous, allocation-free.

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What a policy sees of the replicas: the eligible ones (healthy, caught up enough for the
/// read) and their load.
pub trait ReplicaSet {
    /// Number of replicas (eligible or not).
    fn len(&self) -> usize;
    /// Whether there are no replicas.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether replica `i` may serve this read.
    fn eligible(&self, i: usize) -> bool;
    /// Requests in flight on replica `i`.
    fn in_flight(&self, i: usize) -> u32;
    /// Moving average of replica `i`'s request latency, in microseconds (0 while unknown).
    fn latency_us(&self, i: usize) -> u64;
    /// Configured weight of replica `i` (default 1).
    fn weight(&self, i: usize) -> u32;
}

/// Picks one eligible replica, or `None` when none is eligible.
///
/// ```
/// use stanchion_replica_router::{PowerOfTwo, ReplicaPolicy, ReplicaSet};
/// struct Two;
/// impl ReplicaSet for Two {
///     fn len(&self) -> usize { 2 }
///     fn eligible(&self, i: usize) -> bool { i == 1 }
///     fn in_flight(&self, _: usize) -> u32 { 0 }
///     fn latency_us(&self, _: usize) -> u64 { 100 }
///     fn weight(&self, _: usize) -> u32 { 1 }
/// }
/// assert_eq!(PowerOfTwo::default().pick(&Two), Some(1));
/// fn _object_safe(_: &dyn ReplicaPolicy) {}
/// ```
pub trait ReplicaPolicy: Send + Sync + fmt::Debug + 'static {
    /// The chosen replica's index.
    fn pick(&self, set: &dyn ReplicaSet) -> Option<usize>;
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(0);
        h.finish() | 1
    });
}

/// A fast per-thread xorshift generator: selection needs spread, not cryptography.
fn random() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.set(x);
        x
    })
}

fn eligible_count(set: &dyn ReplicaSet) -> usize {
    (0..set.len()).filter(|&i| set.eligible(i)).count()
}

fn nth_eligible(set: &dyn ReplicaSet, n: usize) -> Option<usize> {
    (0..set.len()).filter(|&i| set.eligible(i)).nth(n)
}

/// Each eligible replica in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl ReplicaPolicy for RoundRobin {
    fn pick(&self, set: &dyn ReplicaSet) -> Option<usize> {
        // Turns are counted over the eligible replicas only: rotating over every node and
        // taking the next eligible one gives the replica after an ineligible node (the primary,
        // an ejected replica) that node's turns too.
        let count = eligible_count(set);
        if count == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        nth_eligible(set, turn % count)
    }
}

/// Uniformly at random among eligible replicas.
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

impl ReplicaPolicy for Random {
    fn pick(&self, set: &dyn ReplicaSet) -> Option<usize> {
        let count = eligible_count(set);
        if count == 0 {
            return None;
        }
        nth_eligible(set, (random() % count as u64) as usize)
    }
}

/// At random, in proportion to each replica's weight (bigger machines take more reads).
#[derive(Debug, Default, Clone, Copy)]
pub struct Weighted;

impl ReplicaPolicy for Weighted {
    fn pick(&self, set: &dyn ReplicaSet) -> Option<usize> {
        let total: u64 = (0..set.len())
            .filter(|&i| set.eligible(i))
            .map(|i| u64::from(set.weight(i)))
            .sum();
        if total == 0 {
            return Random.pick(set);
        }
        let mut ticket = random() % total;
        for i in (0..set.len()).filter(|&i| set.eligible(i)) {
            let w = u64::from(set.weight(i));
            if ticket < w {
                return Some(i);
            }
            ticket -= w;
        }
        None
    }
}

/// The eligible replica with the fewest requests in flight (ties: the first).
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastInFlight;

impl ReplicaPolicy for LeastInFlight {
    fn pick(&self, set: &dyn ReplicaSet) -> Option<usize> {
        (0..set.len())
            .filter(|&i| set.eligible(i))
            .min_by_key(|&i| set.in_flight(i))
    }
}

/// The default: two eligible replicas at random, and the one with the lower expected wait,
/// `(in flight + 1) x latency average`. Near-optimal load spreading without the herd behaviour of
/// always picking the least loaded.
#[derive(Debug, Default, Clone, Copy)]
pub struct PowerOfTwo;

impl ReplicaPolicy for PowerOfTwo {
    fn pick(&self, set: &dyn ReplicaSet) -> Option<usize> {
        let count = eligible_count(set);
        match count {
            0 => None,
            1 => nth_eligible(set, 0),
            _ => {
                let r = random();
                let a = (r % count as u64) as usize;
                let mut b = ((r >> 32) % (count as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth_eligible(set, a)?, nth_eligible(set, b)?);
                let cost = |i: usize| (u64::from(set.in_flight(i)) + 1) * set.latency_us(i).max(1);
                Some(if cost(b) < cost(a) { b } else { a })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Set {
        eligible: Vec<bool>,
        in_flight: Vec<u32>,
        latency: Vec<u64>,
        weight: Vec<u32>,
    }

    impl ReplicaSet for Set {
        fn len(&self) -> usize {
            self.eligible.len()
        }
        fn eligible(&self, i: usize) -> bool {
            self.eligible[i]
        }
        fn in_flight(&self, i: usize) -> u32 {
            self.in_flight[i]
        }
        fn latency_us(&self, i: usize) -> u64 {
            self.latency[i]
        }
        fn weight(&self, i: usize) -> u32 {
            self.weight[i]
        }
    }

    fn set(eligible: &[bool]) -> Set {
        Set {
            eligible: eligible.to_vec(),
            in_flight: vec![0; eligible.len()],
            latency: vec![100; eligible.len()],
            weight: vec![1; eligible.len()],
        }
    }

    fn counts(policy: &dyn ReplicaPolicy, s: &Set, n: usize) -> Vec<usize> {
        let mut c = vec![0; s.len()];
        for _ in 0..n {
            c[policy.pick(s).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn every_policy_picks_only_eligible_replicas_and_none_from_none() {
        let policies: Vec<Box<dyn ReplicaPolicy>> = vec![
            Box::new(RoundRobin::default()),
            Box::new(Random),
            Box::new(Weighted),
            Box::new(LeastInFlight),
            Box::new(PowerOfTwo),
        ];
        let s = set(&[false, true, false, true]);
        for p in &policies {
            for _ in 0..100 {
                let i = p.pick(&s).unwrap();
                assert!(i == 1 || i == 3, "{p:?} picked {i}");
            }
            assert_eq!(p.pick(&set(&[false, false])), None);
            assert_eq!(p.pick(&set(&[])), None);
        }
    }

    #[test]
    fn round_robin_and_random_spread_evenly() {
        let s = set(&[true; 4]);
        assert_eq!(counts(&RoundRobin::default(), &s, 400), vec![100; 4]);
        // The primary first, as the router lists nodes: the two replicas share evenly.
        let s = set(&[false, true, true]);
        assert_eq!(counts(&RoundRobin::default(), &s, 400), vec![0, 200, 200]);
        let s = set(&[true, false, true, false, true]);
        assert_eq!(
            counts(&RoundRobin::default(), &s, 300),
            vec![100, 0, 100, 0, 100]
        );
        let s = set(&[true; 4]);
        for c in counts(&Random, &s, 4000) {
            assert!((800..1200).contains(&c), "{c}");
        }
    }

    #[test]
    fn weighted_follows_weights() {
        let mut s = set(&[true, true]);
        s.weight = vec![1, 3];
        let c = counts(&Weighted, &s, 4000);
        assert!((2700..3300).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn least_in_flight_and_power_of_two_avoid_the_loaded_replica() {
        let mut s = set(&[true, true, true]);
        s.in_flight = vec![10, 0, 10];
        assert_eq!(LeastInFlight.pick(&s), Some(1));
        let c = counts(&PowerOfTwo, &s, 3000);
        // Replica 1 wins every pair it is in (2 of 3 pairs).
        assert!(c[1] > 1800, "{c:?}");
        // Slow replicas lose too.
        let mut s = set(&[true, true]);
        s.latency = vec![10_000, 100];
        assert_eq!(counts(&PowerOfTwo, &s, 100), vec![0, 100]);
    }
}
