//! The shared limiter: a store, a timeout, a failure mode, a deny cache and shadow mode.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::error::{BuildError, KeyError, StoreError};
use crate::gcra::{Decision, Source, Verdict};
use crate::local::LocalLimiter;
use crate::quota::{Limits, QuotaSelector};
use crate::store::RateLimitStore;

/// What to do when the shared store fails or is too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureMode {
    /// Allow every request: availability first (a login page, a product catalogue).
    Open,
    /// Deny every request: protection first (an expensive or abusable endpoint).
    Closed,
    /// Decide in this process with each quota's rate divided by the expected number of
    /// `instances` (an emission interval `instances` times longer, the burst divided too but
    /// at least one request): together the instances admit at most the global rate, plus a
    /// burst of at most `max(burst, instances)`, however the traffic is spread over them.
    Local {
        /// Instances expected to share the traffic (at least 1).
        instances: u32,
    },
}

/// Settings of a [`RateLimiter`].
#[must_use]
pub struct RateLimiterBuilder<S, Q> {
    store: S,
    selector: Q,
    timeout: Duration,
    failure_mode: FailureMode,
    recheck: Duration,
    shadow: bool,
    max_key_len: usize,
    deny_cache_capacity: usize,
    /// Built from an empty [`Limits`]: refused by `build`.
    empty_limits: bool,
}

impl<S, Q> fmt::Debug for RateLimiterBuilder<S, Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiterBuilder")
            .field("timeout", &self.timeout)
            .field("failure_mode", &self.failure_mode)
            .field("recheck", &self.recheck)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

impl<S: RateLimitStore, Q: QuotaSelector<str>> RateLimiterBuilder<S, Q> {
    /// How long a check may wait for the store (default 50 ms). Past it, the failure mode
    /// decides and the store is marked down.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What decides while the store is failing (default [`FailureMode::Local`] with 1 instance).
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.failure_mode = mode;
        self
    }

    /// While down, the store is probed in the background this often (default 1 s, at most one
    /// hour); callers never wait for it: once a check has timed out or failed, every check decides
    /// at once by the failure mode until a background probe finds the store answering again.
    pub fn recheck_interval(mut self, every: Duration) -> Self {
        self.recheck = every;
        self
    }

    /// Shadow mode: decisions that would deny are counted and logged, and allowed.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Longest key accepted, in bytes (default 512).
    pub fn max_key_len(mut self, len: usize) -> Self {
        self.max_key_len = len;
        self
    }

    /// Keys remembered as denied (default 100 000; 0 turns the deny cache off). The cache is a
    /// moka cache: each denial expires when it ends, and a full cache evicts the entries least
    /// likely to be asked again (TinyLFU), in constant time per insert.
    pub fn deny_cache_capacity(mut self, capacity: usize) -> Self {
        self.deny_cache_capacity = capacity;
        self
    }

    /// Validates the settings.
    ///
    /// # Errors
    /// [`BuildError`] for an empty set of limits, a timeout or recheck interval of zero or above
    /// one hour, `FailureMode::Local` with zero instances, or a maximum key length of zero.
    pub fn build(self) -> Result<RateLimiter<S, Q>, BuildError> {
        if self.empty_limits {
            return Err(BuildError::new("limits", "at least one quota", "none"));
        }
        if self.timeout.is_zero() || self.timeout > MAX_WAIT {
            return Err(BuildError::new(
                "timeout",
                "greater than zero and at most one hour",
                format!("{:?}", self.timeout),
            ));
        }
        if self.recheck.is_zero() || self.recheck > MAX_WAIT {
            return Err(BuildError::new(
                "recheck_interval",
                "greater than zero and at most one hour",
                format!("{:?}", self.recheck),
            ));
        }
        if let FailureMode::Local { instances: 0 } = self.failure_mode {
            return Err(BuildError::new("failure_mode.instances", "at least 1", 0));
        }
        if self.max_key_len == 0 {
            return Err(BuildError::new("max_key_len", "at least 1", 0));
        }
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                fallback: LocalLimiter::unlimited(),
                store: self.store,
                selector: self.selector,
                timeout: self.timeout,
                failure_mode: self.failure_mode,
                recheck: self.recheck,
                shadow: self.shadow,
                max_key_len: self.max_key_len,
                deny: DenyCache::new(self.deny_cache_capacity),
                down_until: AtomicU64::new(0),
                probing: AtomicBool::new(false),
                clock: MonotonicClock::default(),
            }),
        })
    }
}

/// The longest timeout or recheck interval accepted.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// `down_until` while a background probe is running: down until the probe clears it.
const DOWN_UNTIL_PROBED: u64 = u64::MAX;

/// A rate limiter over a shared store, cheap to clone (clones share everything).
///
/// A check goes, in order: key validation; "impossible" (cost above a burst) without a round
/// trip; the deny cache (a key denied until T is denied locally until T: an abusive client costs
/// no round trip); if the store is known to be down, the failure mode at once; otherwise the
/// store, bounded by the timeout, whose failure marks it down and falls back.
///
/// ```no_run
/// use std::time::Duration;
/// use stanchion_ratelimit::{FailureMode, Limits, Quota, RateLimiter, RedisStore};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let conn = redis::aio::ConnectionManager::new(redis::Client::open("redis://127.0.0.1/")?).await?;
/// let limiter = RateLimiter::builder(
///         RedisStore::new(conn, "rl:"),
///         Limits::new().with("second", Quota::per_second(10)?)?.with("hour", Quota::per_hour(1000)?)?,
///     )
///     .timeout(Duration::from_millis(20))
///     .failure_mode(FailureMode::Local { instances: 4 })
///     .build()?;
/// let decision = limiter.check("client-42", 1).await?;
/// if !decision.is_allowed() { /* 429 */ }
/// # Ok(()) }
/// ```
pub struct RateLimiter<S, Q = Limits> {
    inner: Arc<Inner<S, Q>>,
}

impl<S, Q> Clone for RateLimiter<S, Q> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S, Q> fmt::Debug for RateLimiter<S, Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("failure_mode", &self.inner.failure_mode)
            .field("timeout", &self.inner.timeout)
            .field("shadow", &self.inner.shadow)
            .field(
                "store_down",
                &(self.inner.clock.now_micros() < self.inner.down_until.load(Ordering::Acquire)),
            )
            .finish_non_exhaustive()
    }
}

struct Inner<S, Q> {
    store: S,
    selector: Q,
    timeout: Duration,
    failure_mode: FailureMode,
    recheck: Duration,
    shadow: bool,
    max_key_len: usize,
    deny: DenyCache,
    fallback: LocalLimiter<String, Limits, MonotonicClock>,
    down_until: AtomicU64,
    probing: AtomicBool,
    clock: MonotonicClock,
}

impl<S: RateLimitStore> RateLimiter<S, Limits> {
    /// A limiter with the same limits for every key (see [`with_selector`](Self::with_selector)
    /// for per-key plans).
    pub fn builder(store: S, limits: Limits) -> RateLimiterBuilder<S, Limits> {
        let empty = limits.is_empty();
        let mut builder = Self::with_selector(store, limits);
        builder.empty_limits = empty;
        builder
    }
}

impl RateLimiter<LocalLimiter<String>, Limits> {
    /// An in-process limiter: one set of limits, nothing else to build (the in-process store
    /// takes each check's limits from the limiter). For per-key plans in process, use
    /// [`with_selector`](Self::with_selector) with a `LocalLimiter` store.
    ///
    /// ```
    /// use stanchion_ratelimit::{Limits, Quota, RateLimiter};
    /// let limiter = RateLimiter::local(Limits::single(Quota::per_second(10)?)).build()?;
    /// assert!(limiter.check_now("k", 1).unwrap()?.is_allowed());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn local(limits: Limits) -> RateLimiterBuilder<LocalLimiter<String>, Limits> {
        Self::builder(LocalLimiter::unlimited(), limits)
    }
}

impl<S: RateLimitStore, Q: QuotaSelector<str>> RateLimiter<S, Q> {
    /// A limiter choosing limits per key.
    pub fn with_selector(store: S, selector: Q) -> RateLimiterBuilder<S, Q> {
        RateLimiterBuilder {
            store,
            selector,
            timeout: Duration::from_millis(50),
            failure_mode: FailureMode::Local { instances: 1 },
            recheck: Duration::from_secs(1),
            shadow: false,
            max_key_len: 512,
            deny_cache_capacity: 100_000,
            empty_limits: false,
        }
    }

    /// The limits that apply to `key`.
    pub fn limits_for(&self, key: &str) -> &Limits {
        self.inner.selector.select(key)
    }

    /// Whether the store is currently marked down (the failure mode is deciding).
    pub fn is_store_down(&self) -> bool {
        self.inner.clock.now_micros() < self.inner.down_until.load(Ordering::Acquire)
    }

    /// What can be decided without the store: a refused key, no limits, an impossible cost, a
    /// remembered denial, or the failure mode while the store is down.
    fn prelude<'a>(&'a self, key: &str, cost: u32) -> Result<Prelude<'a>, KeyError> {
        let inner = &*self.inner;
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > inner.max_key_len {
            return Err(KeyError::TooLong {
                len: key.len(),
                max: inner.max_key_len,
            });
        }
        let limits = inner.selector.select(key);
        if limits.is_empty() {
            return Ok(Prelude::Decided(Decision::allow_all(Source::Local)));
        }
        if let Some((i, q)) = limits
            .quotas()
            .enumerate()
            .map(|(i, (_, q))| (i, q))
            .find(|(_, q)| cost > q.burst_size())
        {
            return Ok(Prelude::Decided(Decision {
                verdict: Verdict::Impossible,
                quota: i,
                limit: q.burst_size(),
                remaining: 0,
                reset_after: Duration::ZERO,
                retry_after: None,
                shadow_denied: false,
                source: Source::Local,
            }));
        }
        let now = inner.clock.now_micros();
        // Only a request the store would certainly deny, answered as the store would: same
        // cost as the cached denial (a cheaper one may pass), never a peek (cost 0 only
        // reports).
        if !inner.shadow
            && cost > 0
            && let Some(denial) = inner.deny.get(key, cost, now)
            && let Some(q) = limits.quota(denial.quota)
        {
            let ahead = denial.tat.saturating_sub(now);
            return Ok(Prelude::Decided(Decision {
                verdict: Verdict::Denied,
                quota: denial.quota,
                limit: q.burst_size(),
                remaining: crate::gcra::remaining(q.capacity_micros(), q.emission_micros(), ahead),
                reset_after: Duration::from_micros(ahead),
                retry_after: Some(Duration::from_micros(denial.until - now)),
                shadow_denied: false,
                source: Source::DenyCache,
            }));
        }
        if now < inner.down_until.load(Ordering::Acquire) {
            // Down until a probe clears it: if that probe's runtime shut down (dropping it),
            // start another on this one; with no runtime here, down for one recheck interval.
            if !inner.probing.load(Ordering::Acquire)
                && inner.down_until.load(Ordering::Acquire) == DOWN_UNTIL_PROBED
                && !self.start_probe()
            {
                let until = now.saturating_add(micros(inner.recheck));
                let _ = inner.down_until.compare_exchange(
                    DOWN_UNTIL_PROBED,
                    until,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            let d = self.fallback(key, limits, cost, None);
            return Ok(Prelude::Decided(self.finish(key, cost, d, now)));
        }
        Ok(Prelude::Ask { limits, now })
    }

    /// The store's answer, or the failure mode's when it failed.
    fn answered(
        &self,
        key: &str,
        limits: &Limits,
        cost: u32,
        now: u64,
        answer: Result<Decision, StoreError>,
    ) -> Decision {
        let decision = match answer {
            Ok(decision) => decision,
            Err(e) if e.is_key_error() => {
                // One bad entry, not a bad store: only this key falls back.
                tracing::warn!(
                    error = %e,
                    ratelimit.failure_mode = ?self.inner.failure_mode,
                    "rate-limit entry unusable; deciding this key without the store"
                );
                #[cfg(feature = "metrics")]
                metrics::counter!("ratelimit.key_errors").increment(1);
                self.fallback(key, limits, cost, None)
            }
            Err(e) => self.fallback(key, limits, cost, Some(e)),
        };
        self.finish(key, cost, decision, now)
    }

    /// Checks `cost` units for `key`. Errors only for keys it refuses; store failures are
    /// handled by the failure mode (the decision's `source` says so).
    pub async fn check(&self, key: &str, cost: u32) -> Result<Decision, KeyError> {
        let (limits, now) = match self.prelude(key, cost)? {
            Prelude::Decided(d) => return Ok(d),
            Prelude::Ask { limits, now } => (limits, now),
        };
        let inner = &*self.inner;
        let answer =
            match tokio::time::timeout(inner.timeout, inner.store.check(key, limits, cost)).await {
                Ok(answer) => answer,
                Err(_) => Err(StoreError::Timeout(inner.timeout)),
            };
        Ok(self.answered(key, limits, cost, now, answer))
    }

    /// Decides at once, without awaiting, when that is possible: the store answers without
    /// waiting (an in-process store, see [`RateLimitStore::check_now`]), or the deny cache,
    /// the failure mode or the key itself decides. `None` means [`check`](Self::check) must
    /// be awaited. The tower layer uses this to make no allocation per request on an
    /// in-process store.
    ///
    /// ```
    /// use stanchion_ratelimit::{Limits, Quota, RateLimiter};
    /// let limiter = RateLimiter::local(Limits::single(Quota::per_second(1)?)).build()?;
    /// assert!(limiter.check_now("k", 1).unwrap()?.is_allowed());
    /// assert!(!limiter.check_now("k", 1).unwrap()?.is_allowed());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn check_now(&self, key: &str, cost: u32) -> Option<Result<Decision, KeyError>> {
        let (limits, now) = match self.prelude(key, cost) {
            Err(e) => return Some(Err(e)),
            Ok(Prelude::Decided(d)) => return Some(Ok(d)),
            Ok(Prelude::Ask { limits, now }) => (limits, now),
        };
        let answer = self.inner.store.check_now(key, limits, cost)?;
        Some(Ok(self.answered(key, limits, cost, now, answer)))
    }

    fn finish(&self, key: &str, cost: u32, mut decision: Decision, now: u64) -> Decision {
        let inner = &*self.inner;
        if decision.verdict != Verdict::Denied {
            if decision.verdict == Verdict::Allowed && cost > 0 {
                // The admission moved the key's state: a remembered denial of another cost
                // no longer says what the store would answer.
                inner.deny.remove(key);
            }
            return decision;
        }
        #[cfg(feature = "metrics")]
        metrics::counter!("ratelimit.denied", "ratelimit.shadow" => if inner.shadow { "true" } else { "false" }).increment(1);
        if inner.shadow {
            tracing::info!(
                ratelimit.key = key,
                ratelimit.quota = decision.quota,
                "rate limit would deny (shadow mode)"
            );
            decision.verdict = Verdict::Allowed;
            decision.shadow_denied = true;
            decision.retry_after = None;
            return decision;
        }
        if decision.source == Source::Shared
            && cost > 0
            && let Some(wait) = decision.retry_after
        {
            // What the store said, as absolute times on this process's clock: the denying
            // quota's TAT and when this cost passes.
            inner.deny.insert(
                key,
                Denial {
                    cost,
                    quota: decision.quota,
                    tat: now.saturating_add(micros(decision.reset_after)),
                    until: now.saturating_add(micros(wait)),
                    ttl: 0,
                },
                now,
            );
        }
        decision
    }

    fn fallback(
        &self,
        key: &str,
        limits: &Limits,
        cost: u32,
        error: Option<StoreError>,
    ) -> Decision {
        let inner = &*self.inner;
        if let Some(error) = error {
            let now = inner.clock.now_micros();
            // Down until a background probe sees the store answer again; without a runtime to
            // probe from, down for one recheck interval.
            let until = if self.start_probe() {
                DOWN_UNTIL_PROBED
            } else {
                now.saturating_add(micros(inner.recheck))
            };
            let was_down = inner.down_until.swap(until, Ordering::AcqRel);
            if was_down <= now {
                tracing::warn!(
                    error = %error,
                    ratelimit.failure_mode = ?inner.failure_mode,
                    "rate-limit store failed; deciding without it"
                );
            }
            #[cfg(feature = "metrics")]
            metrics::counter!("ratelimit.store_errors").increment(1);
        }
        let mut decision = match inner.failure_mode {
            FailureMode::Open => Decision::allow_all(Source::Fallback),
            FailureMode::Closed => Decision {
                verdict: Verdict::Denied,
                quota: 0,
                limit: limits.quota(0).map_or(0, |q| q.burst_size()),
                remaining: 0,
                reset_after: inner.recheck,
                retry_after: Some(inner.recheck),
                shadow_denied: false,
                source: Source::Fallback,
            },
            FailureMode::Local { instances } => {
                // This instance's share: the quota's rate divided by `instances` (a longer
                // emission interval), not a larger cost against the full burst, which let each
                // instance admit a whole burst per burst period.
                let share = limits.share(instances, cost);
                let mut d = inner.fallback.check_limits(key, &share, cost);
                d.limit = limits.quota(d.quota).map_or(d.limit, |q| q.burst_size());
                d
            }
        };
        decision.source = Source::Fallback;
        decision
    }

    /// Makes sure a background probe is running; `false` if none can run (no tokio runtime).
    /// The probe holds the limiter weakly: a limiter dropped while its store is down stops it.
    fn start_probe(&self) -> bool {
        let inner = &*self.inner;
        if inner.probing.swap(true, Ordering::AcqRel) {
            return true;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            inner.probing.store(false, Ordering::Release);
            return false;
        };
        let weak = Arc::downgrade(&self.inner);
        let (recheck, timeout) = (inner.recheck, inner.timeout);
        // However the probe ends (the store answers, the limiter is dropped, or its runtime
        // shuts down and drops it), the next failure or down check may start another.
        let guard = ProbeRunning(weak.clone());
        handle.spawn(async move {
            let _guard = guard;
            loop {
                tokio::time::sleep(recheck).await;
                let Some(inner) = weak.upgrade() else { return };
                let healthy = matches!(
                    tokio::time::timeout(timeout, inner.store.probe()).await,
                    Ok(Ok(()))
                );
                if healthy {
                    inner.probing.store(false, Ordering::Release);
                    inner.down_until.store(0, Ordering::Release);
                    tracing::info!("rate-limit store is answering again");
                    return;
                }
            }
        });
        true
    }
}

/// Clears the limiter's `probing` flag when the probe task ends or is dropped.
struct ProbeRunning<S, Q>(std::sync::Weak<Inner<S, Q>>);

impl<S, Q> Drop for ProbeRunning<S, Q> {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.probing.store(false, Ordering::Release);
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The part of a check made before asking the store.
enum Prelude<'a> {
    /// Decided without the store.
    Decided(Decision),
    /// Ask the store about these limits; `now` on the limiter's clock.
    Ask { limits: &'a Limits, now: u64 },
}

/// What the store answered for a denied request, kept to answer the same request locally.
#[derive(Debug, Clone, Copy)]
struct Denial {
    /// The cost that was denied: only that cost is answered from the cache.
    cost: u32,
    /// The quota that denied.
    quota: usize,
    /// That quota's theoretical arrival time (local clock, microseconds).
    tat: u64,
    /// When a request of `cost` passes (local clock, microseconds).
    until: u64,
    /// `until` less the time it was remembered: how long the cache keeps it.
    ttl: u64,
}

/// Keys denied until a time, remembered locally: a moka cache bounded by `capacity` entries
/// (TinyLFU admission and eviction, O(1) per insert; no sweep under a lock), each entry expiring
/// when its denial ends. A denial the cache has no room for goes to the store next time, which
/// is always right. Keys come from clients, so they are hashed with std's keyed SipHash
/// (moka's default).
struct DenyCache {
    cache: Option<moka::sync::Cache<String, Denial>>,
}

/// Expires a remembered denial when it stops being true.
struct UntilDenialEnds;

impl moka::Expiry<String, Denial> for UntilDenialEnds {
    fn expire_after_create(
        &self,
        _key: &String,
        denial: &Denial,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_micros(denial.ttl))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        denial: &Denial,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(Duration::from_micros(denial.ttl))
    }
}

impl DenyCache {
    fn new(capacity: usize) -> Self {
        let cache = (capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(capacity as u64)
                .expire_after(UntilDenialEnds)
                .build()
        });
        Self { cache }
    }

    fn get(&self, key: &str, cost: u32, now: u64) -> Option<Denial> {
        self.cache
            .as_ref()?
            .get(key)
            .filter(|d| d.cost == cost && d.until > now)
    }

    fn remove(&self, key: &str) {
        if let Some(cache) = &self.cache
            && cache.contains_key(key)
        {
            cache.invalidate(key);
        }
    }

    fn insert(&self, key: &str, mut denial: Denial, now: u64) {
        if let Some(cache) = &self.cache {
            denial.ttl = denial.until.saturating_sub(now);
            cache.insert(key.to_owned(), denial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Denial, DenyCache};

    fn denial(cost: u32, now: u64, for_us: u64) -> Denial {
        Denial {
            cost,
            quota: 0,
            tat: now + for_us,
            until: now + for_us,
            ttl: 0,
        }
    }

    /// An attacker rotating keys fills the deny cache: it stays within its capacity, every
    /// insert stays cheap (no sweep of the whole cache under a lock), and the keys it keeps
    /// still answer.
    #[test]
    fn a_full_deny_cache_stays_bounded_and_cheap() {
        let cache = DenyCache::new(1_000);
        let now = 1_000_000;
        let mut slowest = std::time::Duration::ZERO;
        for i in 0..100_000u64 {
            let key = format!("attacker-{i}");
            let start = std::time::Instant::now();
            cache.insert(&key, denial(1, now, 3_600_000_000), now);
            slowest = slowest.max(start.elapsed());
        }
        let moka = cache.cache.as_ref().unwrap();
        moka.run_pending_tasks();
        assert!(
            moka.entry_count() <= 1_000,
            "{} entries",
            moka.entry_count()
        );
        // Generous for a loaded debug build; a sweep of a full shard took milliseconds.
        assert!(
            slowest < std::time::Duration::from_millis(50),
            "{slowest:?}"
        );
        // A key asked about often is kept over one-off keys.
        for _ in 0..5 {
            cache.insert("regular", denial(1, now, 3_600_000_000), now);
            let _ = cache.get("regular", 1, now);
        }
        for i in 100_000..110_000u64 {
            cache.insert(&format!("attacker-{i}"), denial(1, now, 3_600_000_000), now);
        }
        moka.run_pending_tasks();
        assert!(cache.get("regular", 1, now).is_some());
    }

    /// A remembered denial answers only its own cost and only until it ends; after that the
    /// entry is gone from the cache, not just filtered.
    #[test]
    fn a_denial_expires_when_it_ends() {
        let cache = DenyCache::new(100);
        let now = 1_000_000;
        cache.insert("k", denial(2, now, 30_000), now);
        assert!(cache.get("k", 2, now).is_some());
        assert!(
            cache.get("k", 1, now).is_none(),
            "a cheaper request may pass"
        );
        assert!(cache.get("k", 2, now + 30_000).is_none(), "ended");
        std::thread::sleep(std::time::Duration::from_millis(60));
        let moka = cache.cache.as_ref().unwrap();
        assert!(!moka.contains_key("k"));
        // Removed by moka's timer wheel (about one second granularity).
        let start = std::time::Instant::now();
        loop {
            moka.run_pending_tasks();
            if moka.entry_count() == 0 {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "never removed"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let off = DenyCache::new(0);
        off.insert("k", denial(1, now, 30_000), now);
        assert!(off.get("k", 1, now).is_none());
    }
}
