//! Per-type expiry policies.

use std::time::Duration;

use crate::entry::Times;
use crate::error::BuildError;

/// Longest TTL accepted anywhere (a year): larger values are configuration mistakes, and
/// every time computed from them stays far from overflow.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Which tiers a type is cached in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiers {
    /// Process memory (L1) in front of the L2 store: the default.
    Both,
    /// Process memory only (values that are cheap to load, or must never leave the process).
    L1Only,
    /// The L2 store only (values every instance must see the same instant they change).
    L2Only,
}

impl Tiers {
    pub(crate) fn l1(self) -> bool {
        matches!(self, Self::Both | Self::L1Only)
    }
    pub(crate) fn l2(self) -> bool {
        matches!(self, Self::Both | Self::L2Only)
    }
}

/// How long values of one type live, and what is served when they are old or loading fails.
///
/// A value is *fresh* until its soft TTL (served as is), *stale* until its hard TTL `ttl`
/// (served while one background refresh runs), and *expired* after it: callers wait for a
/// load, and get the expired value only if that load fails and it expired less than
/// `max_stale` ago. The shop's types:
///
/// ```
/// use std::time::Duration;
/// use stanchion_tiered_cache::Policy;
/// let min = |m: u64| Duration::from_secs(60 * m);
/// let product = Policy::builder(min(60)).soft_ttl(min(50)).l1_ttl(min(5)).build()?;
/// let product_list = Policy::builder(min(5)).l1_ttl(Duration::from_secs(30)).build()?;
/// let categories = Policy::builder(min(24 * 60)).max_stale(min(60)).build()?;
/// let user = Policy::builder(min(15)).negative_ttl(Duration::from_secs(30)).build()?;
/// assert_eq!(user.ttl(), min(15));
/// # Ok::<(), stanchion_tiered_cache::BuildError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    ttl: Duration,
    l1_ttl: Duration,
    soft_ttl: Option<Duration>,
    jitter: f64,
    negative_ttl: Option<Duration>,
    tiers: Tiers,
    max_stale: Duration,
    early_refresh: Option<f64>,
    tombstone_ttl: Duration,
}

impl Policy {
    /// Starts a policy whose values expire `ttl` after they were loaded.
    pub fn builder(ttl: Duration) -> PolicyBuilder {
        PolicyBuilder {
            policy: Policy {
                ttl,
                l1_ttl: ttl,
                soft_ttl: None,
                jitter: 0.1,
                negative_ttl: None,
                tiers: Tiers::Both,
                max_stale: Duration::ZERO,
                early_refresh: None,
                tombstone_ttl: Duration::from_secs(10),
            },
        }
    }

    /// The hard TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
    /// How long a copy stays in process memory at most.
    pub fn l1_ttl(&self) -> Duration {
        self.l1_ttl
    }
    /// The soft TTL, if any.
    pub fn soft_ttl(&self) -> Option<Duration> {
        self.soft_ttl
    }
    /// The jitter fraction.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }
    /// How long "not found" is cached (`None`: never).
    pub fn negative_ttl(&self) -> Option<Duration> {
        self.negative_ttl
    }
    /// The tiers used.
    pub fn tiers(&self) -> Tiers {
        self.tiers
    }
    /// How long past its hard TTL a value may be served when loading fails.
    pub fn max_stale(&self) -> Duration {
        self.max_stale
    }
    /// The XFetch factor, if probabilistic early refresh is on.
    pub fn early_refresh(&self) -> Option<f64> {
        self.early_refresh
    }
    /// How long an invalidation's tombstone lives (and so the longest load whose result is
    /// still written back to L2).
    pub fn tombstone_ttl(&self) -> Duration {
        self.tombstone_ttl
    }

    /// The times of an entry loaded at `now` (ms) whose load took `load_ms`; `unit` in [0, 1)
    /// draws the jitter, which only ever shortens TTLs (by up to `jitter` of them).
    pub(crate) fn times(&self, now: u64, load_ms: u32, found: bool, unit: f64) -> Times {
        let scale = 1.0 - self.jitter * unit.clamp(0.0, 1.0);
        let ms = |d: Duration| (d.as_millis() as f64 * scale) as u64;
        let hard = if found {
            ms(self.ttl)
        } else {
            ms(self.negative_ttl.unwrap_or(Duration::ZERO))
        };
        let soft = match (found, self.soft_ttl) {
            (true, Some(s)) => ms(s).min(hard),
            _ => hard,
        };
        Times {
            loaded_at: now,
            fresh_until: now.saturating_add(soft),
            expires_at: now.saturating_add(hard),
            load_ms,
        }
    }

    /// Until when an entry with these times may be served at all: when loading fails, up to
    /// `max_stale` past its TTL. Both tiers keep it no longer.
    pub(crate) fn stale_until(&self, times: &Times) -> u64 {
        times
            .expires_at
            .saturating_add(self.max_stale.as_millis() as u64)
    }

    /// How long L2 keeps an entry with these times, counted from `now`.
    pub(crate) fn l2_keep_ms(&self, times: &Times, now: u64) -> u64 {
        self.stale_until(times).saturating_sub(now)
    }

    /// Whether XFetch asks for a refresh now (`unit` uniform in (0, 1]): the closer to the
    /// soft deadline and the slower the load, the likelier.
    pub(crate) fn refresh_early(&self, times: &Times, now: u64, unit: f64) -> bool {
        let Some(beta) = self.early_refresh else {
            return false;
        };
        let unit = unit.clamp(f64::MIN_POSITIVE, 1.0);
        let lead = f64::from(times.load_ms.max(1)) * beta * -unit.ln();
        now as f64 + lead >= times.fresh_until as f64
    }
}

/// Builds a [`Policy`]; `build()` rejects what cannot work.
#[derive(Debug, Clone)]
#[must_use]
pub struct PolicyBuilder {
    policy: Policy,
}

impl PolicyBuilder {
    /// Keep copies in process memory for at most this long (default: the TTL). Shorter than
    /// the TTL bounds how long an instance that missed an invalidation message serves an old
    /// value.
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.policy.l1_ttl = ttl;
        self
    }
    /// Serve values older than this while one background refresh runs (default: off).
    pub fn soft_ttl(mut self, ttl: Duration) -> Self {
        self.policy.soft_ttl = Some(ttl);
        self
    }
    /// Shorten each entry's TTLs by a random fraction up to `fraction` (0 to 0.5, default
    /// 0.1), so that keys loaded together do not expire together.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.policy.jitter = fraction;
        self
    }
    /// Cache "not found" for this long (default: not cached).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.policy.negative_ttl = Some(ttl);
        self
    }
    /// Which tiers to use (default: both).
    pub fn tiers(mut self, tiers: Tiers) -> Self {
        self.policy.tiers = tiers;
        self
    }
    /// Serve a value up to this long past its TTL when the loader fails (default: zero).
    pub fn max_stale(mut self, d: Duration) -> Self {
        self.policy.max_stale = d;
        self
    }
    /// Probabilistic early refresh (XFetch) with factor `beta` (> 0; 1 is the usual choice):
    /// a value is refreshed in the background before its soft deadline with a probability that
    /// grows as the deadline nears and with the time its load took.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.policy.early_refresh = Some(beta);
        self
    }
    /// How long an invalidation's tombstone lives in L2 (default 10 s). A load that began
    /// before an invalidation never overwrites it; a load that takes longer than this is
    /// returned to its callers but not written to L2.
    pub fn tombstone_ttl(mut self, d: Duration) -> Self {
        self.policy.tombstone_ttl = d;
        self
    }

    /// Checks the policy.
    ///
    /// # Errors
    /// A zero or over-a-year TTL, an L1 or soft TTL longer than the TTL, a jitter outside
    /// 0 to 0.5, a non-positive XFetch factor, or a tombstone TTL under 100 ms.
    pub fn build(self) -> Result<Policy, BuildError> {
        let p = self.policy;
        let within = |field: &'static str, d: Duration| {
            if d > MAX_TTL {
                Err(BuildError::new(
                    field,
                    format!("at most {MAX_TTL:?}, got {d:?}"),
                ))
            } else {
                Ok(())
            }
        };
        if p.ttl < Duration::from_millis(1) {
            return Err(BuildError::new("ttl", "at least 1 ms"));
        }
        within("ttl", p.ttl)?;
        within("max_stale", p.max_stale)?;
        within("tombstone_ttl", p.tombstone_ttl)?;
        if p.l1_ttl.is_zero() || p.l1_ttl > p.ttl {
            return Err(BuildError::new(
                "l1_ttl",
                format!("between 1 ms and the TTL {:?}, got {:?}", p.ttl, p.l1_ttl),
            ));
        }
        if let Some(s) = p.soft_ttl
            && (s.is_zero() || s > p.ttl)
        {
            return Err(BuildError::new(
                "soft_ttl",
                format!("between 1 ms and the TTL {:?}, got {s:?}", p.ttl),
            ));
        }
        if let Some(n) = p.negative_ttl {
            if n < Duration::from_millis(1) {
                return Err(BuildError::new("negative_ttl", "at least 1 ms"));
            }
            within("negative_ttl", n)?;
        }
        if !(0.0..=0.5).contains(&p.jitter) {
            return Err(BuildError::new(
                "jitter",
                format!("a fraction from 0 to 0.5, got {}", p.jitter),
            ));
        }
        if let Some(b) = p.early_refresh
            && !(b > 0.0 && b.is_finite())
        {
            return Err(BuildError::new(
                "early_refresh",
                format!("a positive factor, got {b}"),
            ));
        }
        if p.tombstone_ttl < Duration::from_millis(100) {
            return Err(BuildError::new("tombstone_ttl", "at least 100 ms"));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_cannot_work() {
        let s = Duration::from_secs;
        for (b, field) in [
            (Policy::builder(Duration::ZERO), "ttl"),
            (Policy::builder(s(1)).l1_ttl(s(2)), "l1_ttl"),
            (Policy::builder(s(1)).soft_ttl(s(2)), "soft_ttl"),
            (Policy::builder(s(1)).jitter(0.9), "jitter"),
            (Policy::builder(s(1)).jitter(f64::NAN), "jitter"),
            (Policy::builder(s(1)).early_refresh(0.0), "early_refresh"),
            (Policy::builder(MAX_TTL + s(1)), "ttl"),
            (Policy::builder(s(1)).max_stale(Duration::MAX), "max_stale"),
            (
                Policy::builder(s(1)).negative_ttl(Duration::MAX),
                "negative_ttl",
            ),
        ] {
            assert_eq!(b.build().unwrap_err().field, field);
        }
    }

    proptest::proptest! {
        /// Jitter only shortens: every TTL lands in [ttl x (1 - jitter), ttl], and the soft
        /// deadline never passes the hard one.
        #[test]
        fn jitter_stays_within_its_bounds(
            ttl_ms in 1u64..MAX_TTL.as_millis() as u64,
            soft_pct in 1u64..=100,
            jitter in 0.0f64..=0.5,
            unit in 0.0f64..1.0,
            now in 0u64..(1u64 << 50),
        ) {
            let ttl = Duration::from_millis(ttl_ms);
            let soft = Duration::from_millis((ttl_ms * soft_pct / 100).max(1));
            let p = Policy::builder(ttl).soft_ttl(soft).jitter(jitter).build().unwrap();
            let t = p.times(now, 5, true, unit);
            let hard = t.expires_at - now;
            proptest::prop_assert!(hard <= ttl_ms);
            proptest::prop_assert!(hard as f64 >= (ttl_ms as f64) * (1.0 - jitter) - 1.0);
            proptest::prop_assert!(t.fresh_until <= t.expires_at);
            proptest::prop_assert!(t.fresh_until - now <= soft.as_millis() as u64);
        }

        /// XFetch never refreshes before `fresh_until - load x beta x ln(1/unit)` and always
        /// does at or after `fresh_until`; the lead grows with the load time.
        #[test]
        fn early_refresh_follows_xfetch(
            load_ms in 1u32..10_000,
            beta in 0.1f64..4.0,
            unit in 0.0001f64..=1.0,
            before in 0u64..100_000,
        ) {
            let p = Policy::builder(Duration::from_secs(3600)).early_refresh(beta).build().unwrap();
            let t = Times { loaded_at: 0, fresh_until: 1_000_000, expires_at: 2_000_000, load_ms };
            let now = t.fresh_until - before;
            let lead = f64::from(load_ms) * beta * -unit.ln();
            proptest::prop_assert_eq!(p.refresh_early(&t, now, unit), (before as f64) <= lead);
            proptest::prop_assert!(p.refresh_early(&t, t.fresh_until, unit));
            let off = Policy::builder(Duration::from_secs(3600)).build().unwrap();
            proptest::prop_assert!(!off.refresh_early(&t, t.fresh_until, unit));
        }
    }
}
