//! Retry with exponential backoff, jitter, a retryability classifier, server hints and a budget.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::error::{BuildError, RetryError};

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Retry after the backoff delay.
    Retry,
    /// Retry after this delay (a server's `Retry-After` hint), if within the limits. The hint is
    /// capped by [`RetryBuilder::max_hint`] (default 60 s), so a server answering
    /// `Retry-After: 86400` cannot put a call to sleep for a day.
    RetryAfter(Duration),
    /// Do not retry: the error is permanent.
    Stop,
}

/// Decides whether an error is worth retrying. Implemented for closures.
///
/// ```
/// use stanchion_breaker::{RetryClassifier, RetryDecision};
/// let only_transient = |e: &std::io::Error| match e.kind() {
///     std::io::ErrorKind::TimedOut | std::io::ErrorKind::ConnectionReset => RetryDecision::Retry,
///     _ => RetryDecision::Stop,
/// };
/// let e = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
/// assert_eq!(only_transient.decide(&e), RetryDecision::Stop);
/// fn _object_safe(_: &dyn RetryClassifier<std::io::Error>) {}
/// ```
pub trait RetryClassifier<E> {
    /// Decides for one error.
    fn decide(&self, error: &E) -> RetryDecision;
}

/// Every error is retryable.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryAll;

impl<E> RetryClassifier<E> for RetryAll {
    fn decide(&self, _error: &E) -> RetryDecision {
        RetryDecision::Retry
    }
}

impl<E, F: Fn(&E) -> RetryDecision> RetryClassifier<E> for F {
    fn decide(&self, error: &E) -> RetryDecision {
        self(error)
    }
}

/// How the backoff delay is randomised.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Jitter {
    /// The exact exponential delay.
    None,
    /// Uniform in `[0, delay]` (AWS "full jitter"; the default).
    Full,
    /// Uniform in `[delay * (1 - f), delay * (1 + f)]`, `f` in `[0, 1]`.
    Proportional(f64),
}

/// Limits retries to a share of calls, so retries cannot multiply the load on a dependency that
/// is already failing (the idea of tower's `TpsBudget` and Finagle's retry budget). Clones share
/// the budget.
///
/// Over the last `window`, retries are allowed while
/// `retries < min_per_second * window_secs + percent/100 * calls`.
///
/// ```
/// use std::time::Duration;
/// use stanchion_breaker::RetryBudget;
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 20.0)?;
/// for _ in 0..10 { budget.deposit(); }
/// assert!(budget.withdraw());
/// assert!(budget.withdraw());
/// assert!(!budget.withdraw()); // 20 % of 10 calls spent
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    window_secs: u64,
    min_per_second: u32,
    percent_bp: u32,
    clock: Arc<dyn Clock>,
    state: Mutex<BudgetState>,
}

#[derive(Default)]
struct BudgetState {
    /// (second, calls, retries), oldest first.
    buckets: VecDeque<(u64, u64, u64)>,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("window_secs", &self.inner.window_secs)
            .field("min_per_second", &self.inner.min_per_second)
            .field("percent", &(f64::from(self.inner.percent_bp) / 100.0))
            .finish()
    }
}

impl RetryBudget {
    /// A budget over `window` (whole seconds, 1 to 3600) allowing `min_per_second` retries per
    /// second plus `percent` of calls (0 to 1000: a percentage above 100 allows several retries
    /// per call).
    ///
    /// # Errors
    /// [`BuildError`] for a window that is not whole seconds from 1 to 3600, or a percentage
    /// outside 0 to 1000.
    pub fn new(window: Duration, min_per_second: u32, percent: f64) -> Result<Self, BuildError> {
        Self::with_clock(window, min_per_second, percent, MonotonicClock::default())
    }

    /// Like [`new`](Self::new), with a clock (for tests).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_clock(
        window: Duration,
        min_per_second: u32,
        percent: f64,
        clock: impl Clock,
    ) -> Result<Self, BuildError> {
        if window.subsec_nanos() != 0 || window.is_zero() || window.as_secs() > 3600 {
            return Err(BuildError::new(
                "budget.window",
                "whole seconds between 1 s and 3600 s",
                format!("{window:?}"),
            ));
        }
        if percent.is_nan() || !(0.0..=1000.0).contains(&percent) {
            return Err(BuildError::new(
                "budget.percent",
                "between 0 and 1000",
                percent,
            ));
        }
        Ok(Self {
            inner: Arc::new(BudgetInner {
                window_secs: window.as_secs(),
                min_per_second,
                percent_bp: (percent * 100.0).round() as u32,
                clock: Arc::new(clock),
                state: Mutex::default(),
            }),
        })
    }

    fn with_bucket<R>(&self, f: impl FnOnce(&mut (u64, u64, u64), u64, u64) -> R) -> R {
        let second = self.inner.clock.now_nanos() / 1_000_000_000;
        let mut state = match self.inner.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        while state
            .buckets
            .front()
            .is_some_and(|b| b.0 + self.inner.window_secs <= second)
        {
            state.buckets.pop_front();
        }
        if state.buckets.back().is_none_or(|b| b.0 != second) {
            state.buckets.push_back((second, 0, 0));
        }
        let (calls, retries) = state
            .buckets
            .iter()
            .fold((0, 0), |(c, r), b| (c + b.1, r + b.2));
        match state.buckets.back_mut() {
            Some(back) => f(back, calls, retries),
            None => f(&mut (second, 0, 0), calls, retries),
        }
    }

    /// Counts a call (first attempts).
    pub fn deposit(&self) {
        self.with_bucket(|b, _, _| b.1 += 1);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let min = u64::from(self.inner.min_per_second) * self.inner.window_secs;
        let bp = u64::from(self.inner.percent_bp);
        self.with_bucket(|b, calls, retries| {
            // retries < min + calls * percent, in basis points to stay in integers.
            if retries.saturating_mul(10_000)
                < min
                    .saturating_mul(10_000)
                    .saturating_add(calls.saturating_mul(bp))
            {
                b.2 += 1;
                true
            } else {
                false
            }
        })
    }
}

/// Retries failed attempts with exponential backoff. Cheap to clone; clones share the budget.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// use stanchion_breaker::Retry;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let retry = Retry::builder()
///     .max_attempts(3)
///     .backoff(Duration::from_millis(10), Duration::from_secs(1))
///     .build()?;
/// let tries = AtomicU32::new(0);
/// let value = retry
///     .call(|| async {
///         if tries.fetch_add(1, Ordering::SeqCst) < 2 { Err("flaky") } else { Ok(42) }
///     })
///     .await
///     .expect("the third attempt succeeds");
/// assert_eq!((value, tries.load(Ordering::SeqCst)), (42, 3));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Retry {
    max_attempts: u32,
    base: Duration,
    cap: Duration,
    multiplier: f64,
    jitter: Jitter,
    max_elapsed: Option<Duration>,
    max_hint: Duration,
    budget: Option<RetryBudget>,
}

/// The default cap on a server's retry hint.
const DEFAULT_MAX_HINT: Duration = Duration::from_secs(60);

/// Settings of a [`Retry`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryBuilder {
    retry: Retry,
}

impl Retry {
    /// Defaults: 3 attempts, 100 ms base doubling to a 10 s cap, full jitter, no elapsed limit,
    /// server hints capped at 60 s, no budget.
    pub fn builder() -> RetryBuilder {
        RetryBuilder {
            retry: Retry {
                max_attempts: 3,
                base: Duration::from_millis(100),
                cap: Duration::from_secs(10),
                multiplier: 2.0,
                jitter: Jitter::Full,
                max_elapsed: None,
                max_hint: DEFAULT_MAX_HINT,
                budget: None,
            },
        }
    }

    /// The delay before retry number `retry` (1-based), jitter applied.
    pub fn delay(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let raw = self.base.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = if raw.is_finite() {
            raw.min(self.cap.as_secs_f64())
        } else {
            self.cap.as_secs_f64()
        };
        let secs = match self.jitter {
            Jitter::None => capped,
            Jitter::Full => capped * unit_random(),
            Jitter::Proportional(f) => capped * (1.0 - f + 2.0 * f * unit_random()),
        };
        // Saturates: proportional jitter can exceed a cap near `Duration::MAX`.
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
    }

    /// The longest delay a server's hint ([`RetryDecision::RetryAfter`]) can ask for.
    pub fn max_hint(&self) -> Duration {
        self.max_hint
    }

    /// Runs `attempt` until it succeeds or a limit is reached; every error is retryable.
    ///
    /// # Errors
    /// [`RetryError::Exhausted`] when the attempts or `max_elapsed` ran out,
    /// [`RetryError::NotRetryable`] when the classifier said stop, and
    /// [`RetryError::BudgetExhausted`] when the budget refused a retry; each with the last error.
    ///
    /// # Panics
    /// Outside a Tokio runtime with the time driver enabled, when it has to sleep before a retry.
    pub async fn call<F, Fut, T, E>(&self, attempt: F) -> Result<T, RetryError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(&RetryAll, attempt).await
    }

    /// Like [`call`](Self::call), with a classifier of what is retryable.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    ///
    /// # Panics
    /// As [`call`](Self::call).
    pub async fn call_with<K, F, Fut, T, E>(
        &self,
        classifier: &K,
        mut attempt: F,
    ) -> Result<T, RetryError<E>>
    where
        K: RetryClassifier<E> + ?Sized,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let start = tokio::time::Instant::now();
        if let Some(budget) = &self.budget {
            budget.deposit();
        }
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let error = match attempt().await {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let delay = match classifier.decide(&error) {
                RetryDecision::Stop => return Err(RetryError::NotRetryable(error)),
                RetryDecision::Retry => self.delay(attempts),
                RetryDecision::RetryAfter(hint) => hint.min(self.max_hint),
            };
            if attempts >= self.max_attempts {
                tracing::debug!(
                    retry.attempt = attempts,
                    error.type = std::any::type_name::<E>(),
                    "retries exhausted"
                );
                return Err(RetryError::Exhausted {
                    attempts,
                    last: error,
                });
            }
            if let Some(max) = self.max_elapsed
                && start.elapsed().saturating_add(delay) > max
            {
                return Err(RetryError::Exhausted {
                    attempts,
                    last: error,
                });
            }
            if let Some(budget) = &self.budget
                && !budget.withdraw()
            {
                tracing::warn!(
                    retry.attempt = attempts,
                    error.type = std::any::type_name::<E>(),
                    "retry budget exhausted"
                );
                return Err(RetryError::BudgetExhausted {
                    attempts,
                    last: error,
                });
            }
            tracing::debug!(
                retry.attempt = attempts,
                retry.delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error.type = std::any::type_name::<E>(),
                "retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

impl RetryBuilder {
    /// Attempts in all, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.retry.max_attempts = attempts;
        self
    }

    /// The first delay and the longest one.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.retry.base = base;
        self.retry.cap = cap;
        self
    }

    /// Growth of the delay per retry (default 2).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.retry.multiplier = multiplier;
        self
    }

    /// Randomisation of the delay (default [`Jitter::Full`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.retry.jitter = jitter;
        self
    }

    /// No retry starts if it would begin later than this after the first attempt started.
    pub fn max_elapsed(mut self, max: Duration) -> Self {
        self.retry.max_elapsed = Some(max);
        self
    }

    /// The longest wait a server's retry hint may impose (default 60 s); a longer hint is cut to
    /// this. Combine with [`max_elapsed`](Self::max_elapsed) to give up instead of retrying
    /// early.
    pub fn max_hint(mut self, max: Duration) -> Self {
        self.retry.max_hint = max;
        self
    }

    /// Limits retries to a share of calls.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.retry.budget = Some(budget);
        self
    }

    /// Validates the settings.
    ///
    /// # Errors
    /// [`BuildError`] for zero attempts, a zero base delay, a cap below the base, a multiplier
    /// below 1 or not finite, a jitter fraction outside [0, 1], or a zero `max_elapsed` or
    /// `max_hint`.
    pub fn build(self) -> Result<Retry, BuildError> {
        let r = &self.retry;
        if r.max_attempts == 0 {
            return Err(BuildError::new("max_attempts", "at least 1", 0));
        }
        if r.base.is_zero() {
            return Err(BuildError::new("backoff.base", "greater than zero", "0s"));
        }
        if r.cap < r.base {
            return Err(BuildError::new(
                "backoff.cap",
                "at least the base delay",
                format!("{:?}", r.cap),
            ));
        }
        if r.multiplier.is_nan() || r.multiplier.is_infinite() || r.multiplier < 1.0 {
            return Err(BuildError::new(
                "multiplier",
                "a finite number of at least 1",
                r.multiplier,
            ));
        }
        if let Jitter::Proportional(f) = r.jitter
            && (f.is_nan() || !(0.0..=1.0).contains(&f))
        {
            return Err(BuildError::new("jitter", "a fraction in [0, 1]", f));
        }
        if let Some(max) = r.max_elapsed
            && max.is_zero()
        {
            return Err(BuildError::new("max_elapsed", "greater than zero", "0s"));
        }
        if r.max_hint.is_zero() {
            return Err(BuildError::new("max_hint", "greater than zero", "0s"));
        }
        Ok(self.retry)
    }
}

/// Uniform in [0, 1), from the standard library's randomly keyed hasher (no extra dependency;
/// retries are not a hot path).
fn unit_random() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(crate::clock::Clock::now_nanos(&MonotonicClock::default()));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    #[test]
    fn full_jitter_stays_within_the_exponential_envelope() {
        let retry = Retry::builder()
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .build()
            .unwrap();
        for attempt in 1..10 {
            let envelope =
                Duration::from_millis(100 * (1 << (attempt - 1))).min(Duration::from_secs(1));
            for _ in 0..50 {
                assert!(retry.delay(attempt) <= envelope);
            }
        }
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| retry.delay(3)).collect();
        assert!(distinct.len() > 10, "jitter varies");
    }

    #[test]
    fn no_jitter_is_exactly_exponential_and_capped() {
        let retry = Retry::builder()
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .jitter(Jitter::None)
            .build()
            .unwrap();
        let delays: Vec<_> = (1..=4).map(|a| retry.delay(a).as_millis()).collect();
        assert_eq!(delays, vec![10, 20, 40, 50]);
    }

    #[test]
    fn budget_ages_out_and_has_a_floor() {
        let clock = ManualClock::new();
        let budget =
            RetryBudget::with_clock(Duration::from_secs(2), 1, 10.0, clock.clone()).unwrap();
        // Floor: 1 per second over 2 seconds = 2 retries with no calls at all.
        assert!(budget.withdraw());
        assert!(budget.withdraw());
        assert!(!budget.withdraw());
        clock.advance(Duration::from_secs(2));
        for _ in 0..10 {
            budget.deposit();
        }
        // 2 (floor) + 10 % of 10 calls = 3.
        assert!(budget.withdraw() && budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw());
    }

    #[test]
    fn bad_settings_name_their_field() {
        let field = |b: RetryBuilder| b.build().unwrap_err().field();
        assert_eq!(field(Retry::builder().max_attempts(0)), "max_attempts");
        assert_eq!(
            field(Retry::builder().jitter(Jitter::Proportional(f64::NAN))),
            "jitter"
        );
        assert_eq!(field(Retry::builder().multiplier(0.5)), "multiplier");
        assert_eq!(field(Retry::builder().max_hint(Duration::ZERO)), "max_hint");
        assert_eq!(
            field(Retry::builder().backoff(Duration::from_secs(2), Duration::from_secs(1))),
            "backoff.cap"
        );
        assert_eq!(
            RetryBudget::new(Duration::from_secs(1), 0, f64::NAN)
                .unwrap_err()
                .field(),
            "budget.percent"
        );
    }
}
