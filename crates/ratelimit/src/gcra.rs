//! The one GCRA (generic cell rate algorithm) of this crate, in absolute microseconds.
//!
//! State per quota is its theoretical arrival time (TAT): the instant at which the key would be
//! back to full capacity. A request of cost `c` moves it to `max(TAT, now) + c * T` (`T` the
//! emission interval) and is admitted if that is at most `burst * T` ahead of now. Because the
//! state is an absolute time, any process reading it (or the Redis script, which runs the same
//! arithmetic) reaches the same decision; a TAT in the past means "full capacity", so an idle
//! key's state can be dropped without changing any decision.

use std::time::Duration;

use crate::quota::{Limits, MAX_LIMITS};

/// What a check decided. Exhaustive on purpose (not `#[non_exhaustive]`): a check admits,
/// refuses for now, or can never admit, so callers may match the three without a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Admitted; it counts against every quota.
    Allowed,
    /// Refused for now; nothing was counted. See [`Decision::retry_after`].
    Denied,
    /// The cost is larger than a quota's burst: it can never be admitted, however long the
    /// caller waits.
    Impossible,
}

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// The in-process store.
    Local,
    /// The shared store (Redis).
    Shared,
    /// The local memory of a key denied until later (no round trip was made).
    DenyCache,
    /// The shared store failed or was down; the failure mode decided.
    Fallback,
}

/// A rate-limit decision, with what the HTTP headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Admitted, denied, or impossible.
    pub verdict: Verdict,
    /// Index (in the [`Limits`] set) of the quota that decided: the one denying, or when
    /// admitted the one with the least room left.
    pub quota: usize,
    /// That quota's burst.
    pub limit: u32,
    /// Requests (of cost 1) that quota would still admit now.
    pub remaining: u32,
    /// Time until that quota is back to full capacity.
    pub reset_after: Duration,
    /// When denied: time until this request's cost would be admitted.
    pub retry_after: Option<Duration>,
    /// Shadow mode: the limiter would have denied this request but let it through.
    pub shadow_denied: bool,
    /// Where the decision came from.
    pub source: Source,
}

impl Decision {
    /// Whether the request may proceed (shadow-mode denials included).
    #[inline]
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allowed
    }

    pub(crate) fn allow_all(source: Source) -> Self {
        Self {
            verdict: Verdict::Allowed,
            quota: 0,
            limit: 0,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: None,
            shadow_denied: false,
            source,
        }
    }
}

/// The raw state of one key: one TAT per quota, 0 meaning "never seen".
pub(crate) type Tats = [u64; MAX_LIMITS];

/// The state of one key for [`check`]: a theoretical arrival time per quota (opaque; start from
/// `State::default()`, a key never seen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    tats: Tats,
}

impl State {
    /// The time (microseconds, the caller's clock) after which the key is at full capacity on
    /// every quota, so its state can be forgotten without changing any decision.
    ///
    /// ```
    /// use stanchion_ratelimit::{Limits, Quota, gcra};
    /// let limits = Limits::single(Quota::per_second(10)?);
    /// let mut state = gcra::State::default();
    /// gcra::check(&limits, &mut state, 1_000_000, 1);
    /// assert_eq!(state.idle_after(), 1_100_000);
    /// # Ok::<(), stanchion_ratelimit::BuildError>(())
    /// ```
    pub fn idle_after(&self) -> u64 {
        idle_after(&self.tats)
    }
}

/// Runs GCRA for every quota of `limits` at `now` (microseconds), all or nothing: when admitted,
/// `tats` is updated; when denied or impossible, it is left as it was. Cost 0 only reports.
///
/// ```
/// use stanchion_ratelimit::{Limits, Quota, Verdict, gcra};
/// let limits = Limits::single(Quota::per_second(2)?);
/// let mut state = gcra::State::default();
/// let now = 10_000_000;
/// assert_eq!(gcra::check(&limits, &mut state, now, 1).verdict, Verdict::Allowed);
/// assert_eq!(gcra::check(&limits, &mut state, now, 1).verdict, Verdict::Allowed);
/// let third = gcra::check(&limits, &mut state, now, 1);
/// assert_eq!(third.verdict, Verdict::Denied);
/// assert_eq!(third.retry_after, Some(std::time::Duration::from_millis(500)));
/// assert_eq!(gcra::check(&limits, &mut state, now, 3).verdict, Verdict::Impossible);
/// # Ok::<(), stanchion_ratelimit::BuildError>(())
/// ```
pub fn check(limits: &Limits, state: &mut State, now: u64, cost: u32) -> Decision {
    check_tats(limits, &mut state.tats, now, cost)
}

#[allow(clippy::needless_range_loop)] // parallel arrays indexed by quota
pub(crate) fn check_tats(limits: &Limits, tats: &mut Tats, now: u64, cost: u32) -> Decision {
    if limits.len() == 1
        && let Some(q) = limits.quota(0)
    {
        return check_one(q, &mut tats[0], now, cost);
    }
    let n = limits.len().min(MAX_LIMITS);
    let mut new = [0u64; MAX_LIMITS];
    // Impossible first: nothing else matters.
    for i in 0..n {
        let Some(q) = limits.quota(i) else { continue };
        if cost > q.burst_size() {
            return Decision {
                verdict: Verdict::Impossible,
                quota: i,
                limit: q.burst_size(),
                remaining: remaining(
                    q.capacity_micros(),
                    q.emission_micros(),
                    tats[i].max(now) - now,
                ),
                reset_after: Duration::from_micros(tats[i].saturating_sub(now)),
                retry_after: None,
                shadow_denied: false,
                source: Source::Local,
            };
        }
    }
    let mut denied: Option<(usize, u64)> = None;
    for i in 0..n {
        let Some(q) = limits.quota(i) else { continue };
        let tat = tats[i].max(now);
        let next = tat.saturating_add(u64::from(cost) * q.emission_micros());
        let ahead = next - now;
        if ahead > q.capacity_micros() {
            let wait = ahead - q.capacity_micros();
            if denied.is_none_or(|(_, w)| wait > w) {
                denied = Some((i, wait));
            }
        }
        new[i] = next;
    }
    if let Some((i, wait)) = denied {
        let q = limits.quota(i).copied();
        let (limit, cap, t) = q.map_or((0, 0, 1), |q| {
            (q.burst_size(), q.capacity_micros(), q.emission_micros())
        });
        let ahead = tats[i].max(now) - now;
        return Decision {
            verdict: Verdict::Denied,
            quota: i,
            limit,
            remaining: remaining(cap, t, ahead),
            reset_after: Duration::from_micros(ahead),
            retry_after: Some(Duration::from_micros(wait)),
            shadow_denied: false,
            source: Source::Local,
        };
    }
    // Admitted: commit every quota, report the one with the least room.
    let mut best: Option<(usize, u32, u64)> = None;
    for i in 0..n {
        let Some(q) = limits.quota(i) else { continue };
        if cost > 0 {
            tats[i] = new[i];
        }
        let ahead = tats[i].max(now) - now;
        let left = remaining(q.capacity_micros(), q.emission_micros(), ahead);
        if best.is_none_or(|(_, l, _)| left < l) {
            best = Some((i, left, ahead));
        }
    }
    let (i, left, ahead) = best.unwrap_or((0, 0, 0));
    Decision {
        verdict: Verdict::Allowed,
        quota: i,
        limit: limits.quota(i).map_or(0, |q| q.burst_size()),
        remaining: left,
        reset_after: Duration::from_micros(ahead),
        retry_after: None,
        shadow_denied: false,
        source: Source::Local,
    }
}

/// The same rules for a single quota, without the bookkeeping of several.
#[inline]
fn check_one(q: &crate::quota::Quota, tat: &mut u64, now: u64, cost: u32) -> Decision {
    let (t, cap, burst) = (q.emission_micros(), q.capacity_micros(), q.burst_size());
    let start = (*tat).max(now);
    let mut decision = Decision {
        verdict: Verdict::Allowed,
        quota: 0,
        limit: burst,
        remaining: 0,
        reset_after: Duration::ZERO,
        retry_after: None,
        shadow_denied: false,
        source: Source::Local,
    };
    if cost > burst {
        decision.verdict = Verdict::Impossible;
        decision.remaining = remaining(cap, t, start - now);
        decision.reset_after = Duration::from_micros((*tat).saturating_sub(now));
        return decision;
    }
    let next = start.saturating_add(u64::from(cost) * t);
    if next - now > cap {
        decision.verdict = Verdict::Denied;
        decision.remaining = remaining(cap, t, start - now);
        decision.reset_after = Duration::from_micros(start - now);
        decision.retry_after = Some(Duration::from_micros(next - now - cap));
        return decision;
    }
    let after = if cost > 0 {
        *tat = next;
        next
    } else {
        start
    };
    decision.remaining = remaining(cap, t, after - now);
    decision.reset_after = Duration::from_micros(after - now);
    decision
}

#[inline]
pub(crate) fn remaining(capacity: u64, emission: u64, ahead: u64) -> u32 {
    u32::try_from(capacity.saturating_sub(ahead) / emission.max(1)).unwrap_or(u32::MAX)
}

/// The latest TAT of a state: once `now` passes it, the key is at full capacity on every quota
/// and its state can be forgotten.
#[inline]
pub(crate) fn idle_after(tats: &Tats) -> u64 {
    tats.iter().copied().max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Quota;

    #[test]
    fn two_limits_are_all_or_nothing() {
        let limits = Limits::new()
            .with("second", Quota::per_second(10).unwrap())
            .unwrap()
            .with("minute", Quota::per_minute(3).unwrap())
            .unwrap();
        let mut s = State::default();
        let now = 1_000_000;
        for _ in 0..3 {
            assert!(check(&limits, &mut s, now, 1).is_allowed());
        }
        let before = s;
        let d = check(&limits, &mut s, now, 1);
        assert_eq!(d.verdict, Verdict::Denied);
        assert_eq!(d.quota, 1);
        assert_eq!(d.retry_after, Some(Duration::from_secs(20)));
        assert_eq!(s, before, "a denial consumes nothing on any quota");
    }

    #[test]
    fn reports_remaining_and_reset_of_the_tightest_quota() {
        let limits = Limits::single(Quota::per_second(10).unwrap());
        let mut s = State::default();
        let d = check(&limits, &mut s, 5_000_000, 4);
        assert_eq!((d.limit, d.remaining), (10, 6));
        assert_eq!(d.reset_after, Duration::from_millis(400));
    }

    #[test]
    fn cost_zero_reports_without_consuming() {
        let limits = Limits::single(Quota::per_second(1).unwrap());
        let mut s = State::default();
        check(&limits, &mut s, 1_000_000, 1);
        let before = s;
        let d = check(&limits, &mut s, 1_000_000, 0);
        assert!(d.is_allowed());
        assert_eq!(d.remaining, 0);
        assert_eq!(s, before);
    }
}
