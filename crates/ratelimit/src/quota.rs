//! Quotas and sets of limits checked together.

use std::fmt;
use std::time::Duration;

use crate::error::{BuildError, QuotaError};

/// Longest period a quota may have.
pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);
/// Most limits in one [`Limits`] set.
pub const MAX_LIMITS: usize = 4;
/// Largest `burst * emission interval`, in microseconds: 2^50 (about 35 years). The Redis
/// script works in Lua doubles, exact below 2^53, on absolute times: a TAT is at most `now +
/// capacity` and the next one at most `now + 2 x capacity`, which stays below 2^53 until the
/// year 2183 (Unix time in microseconds passes 2^53 - 2^51 then). With 2^52 the sum passed 2^53
/// and `retry_after` came out a microsecond off the Rust GCRA's.
const MAX_CAPACITY_MICROS: u64 = 1 << 50;

/// `rate` requests per `period`, with up to `burst` at once.
///
/// The emission interval `period / rate` is the steady spacing of requests, in whole
/// microseconds rounded up, so that no interval ever admits more than `rate x time + burst`;
/// it must be at least one microsecond (at most a million requests a second per key). A rate
/// that does not divide the period admits slightly less than it says: 3 per second admits one
/// request every 333,334 µs; at the extreme, 999,999 per second admits 500,000 (an interval of
/// 2 µs). Rates that divide one second (1 to 1,000,000 by divisors) are exact.
///
/// ```
/// use std::time::Duration;
/// use stanchion_ratelimit::Quota;
/// let api = Quota::per_second(10)?.burst(20)?;
/// assert_eq!(api.emission_interval(), Duration::from_millis(100));
/// let daily = Quota::new(1000, Duration::from_secs(86_400))?;
/// assert_eq!(daily.burst_size(), 1000);
/// # Ok::<(), stanchion_ratelimit::BuildError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    rate: u32,
    period: Duration,
    burst: u32,
    emission_micros: u64,
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?} (burst {})", self.rate, self.period, self.burst)
    }
}

impl Quota {
    /// `rate` per `period`; the burst defaults to `rate`. A `const fn`, so a quota can be a
    /// constant (an invalid one is then a compile error):
    ///
    /// ```
    /// use std::time::Duration;
    /// use stanchion_ratelimit::Quota;
    /// const SEARCH: Quota = match Quota::new(30, Duration::from_secs(10)) {
    ///     Ok(q) => q,
    ///     Err(_) => panic!("invalid quota"),
    /// };
    /// assert_eq!(SEARCH.emission_interval(), Duration::from_millis(333) + Duration::from_micros(334));
    /// ```
    pub const fn new(rate: u32, period: Duration) -> Result<Self, QuotaError> {
        if rate == 0 {
            return Err(QuotaError::ZeroRate);
        }
        let micros = period.as_micros();
        if micros == 0 || micros > MAX_PERIOD.as_micros() {
            return Err(QuotaError::Period(period));
        }
        if micros < rate as u128 {
            return Err(QuotaError::TooFast { rate, period });
        }
        // Rounded up, never down: a shorter interval would admit more than `rate` per `period`
        // (`per_second(3)` would admit two requests 333,333 µs apart). A rate that does not
        // divide the period admits slightly less than it says instead. At most 366 days in
        // microseconds, so it fits in a u64.
        let emission_micros = micros.div_ceil(rate as u128) as u64;
        Self {
            rate,
            period,
            burst: rate,
            emission_micros,
        }
        .validated()
    }

    /// `rate` per second (`const`).
    pub const fn per_second(rate: u32) -> Result<Self, QuotaError> {
        Self::new(rate, Duration::from_secs(1))
    }

    /// `rate` per minute (`const`).
    pub const fn per_minute(rate: u32) -> Result<Self, QuotaError> {
        Self::new(rate, Duration::from_secs(60))
    }

    /// `rate` per hour (`const`).
    pub const fn per_hour(rate: u32) -> Result<Self, QuotaError> {
        Self::new(rate, Duration::from_secs(3600))
    }

    /// Allows up to `burst` requests at once (at least 1; `const`).
    pub const fn burst(mut self, burst: u32) -> Result<Self, QuotaError> {
        if burst == 0 {
            return Err(QuotaError::ZeroBurst);
        }
        self.burst = burst;
        self.validated()
    }

    const fn validated(self) -> Result<Self, QuotaError> {
        if (self.burst as u64).saturating_mul(self.emission_micros) > MAX_CAPACITY_MICROS {
            return Err(QuotaError::BurstTooLarge(self.burst));
        }
        Ok(self)
    }

    /// Requests per period.
    pub const fn rate(&self) -> u32 {
        self.rate
    }

    /// The period.
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// Requests allowed at once.
    pub const fn burst_size(&self) -> u32 {
        self.burst
    }

    /// `period / rate`.
    pub const fn emission_interval(&self) -> Duration {
        Duration::from_micros(self.emission_micros)
    }

    pub(crate) const fn emission_micros(&self) -> u64 {
        self.emission_micros
    }

    pub(crate) const fn capacity_micros(&self) -> u64 {
        self.burst as u64 * self.emission_micros
    }
}

/// One to [`MAX_LIMITS`] quotas checked together and atomically: a request is admitted only if
/// every quota admits it, and then counts against all of them (e.g. 10 per second and 1000 per
/// hour). Each has a name used in the `RateLimit-Policy` header.
///
/// ```
/// use stanchion_ratelimit::{Limits, Quota};
/// let free = Limits::new()
///     .with("burst", Quota::per_second(10)?)?
///     .with("hourly", Quota::per_hour(1000)?)?;
/// assert_eq!(free.len(), 2);
/// # Ok::<(), stanchion_ratelimit::BuildError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Limits {
    quotas: Vec<(String, Quota)>,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.quotas.iter().map(|(n, q)| (n, q)))
            .finish()
    }
}

impl Limits {
    /// An empty set (add quotas with [`with`](Self::with); checking an empty set is an error).
    pub fn new() -> Self {
        Self::default()
    }

    /// A set of one quota named `default`.
    pub fn single(quota: Quota) -> Self {
        Self {
            quotas: vec![("default".to_owned(), quota)],
        }
    }

    /// Adds a named quota. Names are 1-32 characters of `[A-Za-z0-9_-]` (they appear in HTTP
    /// headers) and unique within the set.
    pub fn with(mut self, name: &str, quota: Quota) -> Result<Self, BuildError> {
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(BuildError::new(
                "limit name",
                "1-32 characters of [A-Za-z0-9_-]",
                name,
            ));
        }
        if self.quotas.iter().any(|(n, _)| n == name) {
            return Err(BuildError::new("limit name", "unique within the set", name));
        }
        if self.quotas.len() >= MAX_LIMITS {
            return Err(BuildError::new(
                "limits",
                "at most 4 quotas per set",
                self.quotas.len() + 1,
            ));
        }
        self.quotas.push((name.to_owned(), quota));
        Ok(self)
    }

    /// The quotas, in order.
    pub fn quotas(&self) -> impl Iterator<Item = (&str, &Quota)> {
        self.quotas.iter().map(|(n, q)| (n.as_str(), q))
    }

    /// Number of quotas.
    pub fn len(&self) -> usize {
        self.quotas.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.quotas.is_empty()
    }

    /// One instance's share of these limits when `instances` decide apart (the limiter's
    /// `FailureMode::Local`): each quota's emission interval `instances` times longer, its burst
    /// divided by `instances` but at least one request and at least `cost`. Together the
    /// instances then admit at most the rate, plus a burst of `max(burst, instances)`.
    pub(crate) fn share(&self, instances: u32, cost: u32) -> Limits {
        let n = instances.max(1);
        Limits {
            quotas: self
                .quotas
                .iter()
                .map(|(name, q)| {
                    let burst = (q.burst / n).max(cost).clamp(1, q.burst);
                    // Capacity stays under the cap the Redis script needs exact; only a share
                    // longer than 35 years is shortened.
                    let emission_micros = q
                        .emission_micros
                        .saturating_mul(u64::from(n))
                        .min(MAX_CAPACITY_MICROS / u64::from(burst));
                    (
                        name.clone(),
                        Quota {
                            rate: q.rate,
                            period: q.period,
                            burst,
                            emission_micros,
                        },
                    )
                })
                .collect(),
        }
    }

    pub(crate) fn quota(&self, i: usize) -> Option<&Quota> {
        self.quotas.get(i).map(|(_, q)| q)
    }

    /// The name of quota `i` (`"default"` when out of range).
    pub fn name(&self, i: usize) -> &str {
        self.quotas
            .get(i)
            .map(|(n, _)| n.as_str())
            .unwrap_or("default")
    }
}

/// Chooses the limits of a key: a fixed set, or per-key plans (free vs paid).
///
/// ```
/// use stanchion_ratelimit::{Limits, Plans, Quota, QuotaSelector};
/// let plans = Plans::new(
///     vec![
///         Limits::single(Quota::per_minute(60)?),   // 0: free
///         Limits::single(Quota::per_minute(6000)?), // 1: paid
///     ],
///     |key: &str| usize::from(key.starts_with("paid:")),
/// )?;
/// assert_eq!(plans.select("paid:acme").len(), 1);
/// # Ok::<(), stanchion_ratelimit::BuildError>(())
/// ```
pub trait QuotaSelector<K: ?Sized>: Send + Sync + 'static {
    /// The limits that apply to `key`.
    fn select(&self, key: &K) -> &Limits;
}

impl<K: ?Sized> QuotaSelector<K> for Limits {
    #[inline]
    fn select(&self, _key: &K) -> &Limits {
        self
    }
}

/// Several [`Limits`] sets and a function picking one per key (an index; out-of-range indexes
/// use the last set).
pub struct Plans<F> {
    plans: Vec<Limits>,
    pick: F,
}

impl<F> fmt::Debug for Plans<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plans")
            .field("plans", &self.plans)
            .finish_non_exhaustive()
    }
}

impl<F> Plans<F> {
    /// At least one non-empty set.
    pub fn new(plans: Vec<Limits>, pick: F) -> Result<Self, BuildError> {
        if plans.is_empty() {
            return Err(BuildError::new("plans", "at least one set of limits", 0));
        }
        if let Some(i) = plans.iter().position(Limits::is_empty) {
            return Err(BuildError::new(
                "plans",
                "sets with at least one quota",
                format!("set {i} is empty"),
            ));
        }
        Ok(Self { plans, pick })
    }
}

impl<K: ?Sized, F> QuotaSelector<K> for Plans<F>
where
    F: Fn(&K) -> usize + Send + Sync + 'static,
{
    #[inline]
    fn select(&self, key: &K) -> &Limits {
        let i = (self.pick)(key).min(self.plans.len() - 1);
        &self.plans[i]
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::{Limits, Quota};
    use crate::clock::ManualClock;
    use crate::local::LocalLimiter;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// `instances` limiters deciding apart on their share admit, over any window, at most
        /// the global rate times the window plus `max(burst, instances)` (the `Local` failure
        /// mode's bound), however the requests are spread over them.
        #[test]
        fn shares_never_admit_more_than_the_global_rate(
            rate in 1u32..50,
            burst in 1u32..20,
            instances in 1u32..40,
            steps in proptest::collection::vec((0u32..40, 0u64..400_000, 1u32..4), 50..400),
        ) {
            let quota = Quota::new(rate, Duration::from_secs(1)).unwrap().burst(burst).unwrap();
            let limits = Limits::single(quota);
            let clock = ManualClock::new();
            clock.advance(Duration::from_secs(1));
            let local: Vec<LocalLimiter<String, Limits, ManualClock>> = (0..instances)
                .map(|_| LocalLimiter::with_selector(limits.clone(), clock.clone()).unwrap())
                .collect();
            // (time, units) of every admission, across instances.
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (who, gap, cost) in steps {
                clock.advance(Duration::from_micros(gap));
                let cost = cost.min(burst);
                let share = limits.share(instances, cost);
                let d = local[(who % instances) as usize].check_limits("k", &share, cost);
                if d.is_allowed() {
                    admitted.push((crate::Clock::now_micros(&clock), u64::from(cost)));
                }
            }
            let em = quota.emission_micros();
            // Each instance holds at most a burst of max(burst / instances, cost) units.
            let slack = u64::from(burst.max(instances * burst.min(3)));
            for i in 0..admitted.len() {
                let mut units = 0;
                for &(t, c) in &admitted[i..] {
                    units += c;
                    let window = t - admitted[i].0;
                    // Units the global quota admits in `window`, plus the burst allowance.
                    let bound = window / em + 1 + slack;
                    prop_assert!(units <= bound, "{units} units in {window} us (bound {bound})");
                }
            }
        }
    }

    #[test]
    fn a_share_lengthens_the_interval_instead_of_raising_the_cost() {
        let limits = Limits::single(Quota::per_minute(2).unwrap());
        let share = limits.share(10, 1);
        let q = share.quota(0).unwrap();
        assert_eq!(q.burst_size(), 1);
        assert_eq!(q.emission_interval(), Duration::from_secs(300));
        // A cost above the divided burst still fits.
        assert_eq!(share_burst(&limits, 10, 2), 2);
        // A share that would last past the cap is shortened, never overflowed.
        let daily = Limits::single(Quota::new(1, Duration::from_secs(366 * 86_400)).unwrap());
        let q = *daily.share(u32::MAX, 1).quota(0).unwrap();
        assert!(q.capacity_micros() <= super::MAX_CAPACITY_MICROS);
    }

    fn share_burst(limits: &Limits, n: u32, cost: u32) -> u32 {
        limits.share(n, cost).quota(0).unwrap().burst_size()
    }
}
