//! When to stop calling a failing L2 for a while.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::BuildError;

/// Decides whether the next L2 call is made, from the outcomes of earlier ones. Calls it
/// refuses are misses at once (L1 and the loader keep serving).
///
/// [`ConsecutiveFailures`] is the default. To use a `stanchion-breaker` circuit breaker here,
/// implement this trait over it in the application (this crate does not depend on it).
///
/// ```
/// use stanchion_tiered_cache::{ConsecutiveFailures, SkipPolicy};
/// let skip = ConsecutiveFailures::new(2, std::time::Duration::from_secs(1)).unwrap();
/// skip.on_failure();
/// assert!(skip.allow());
/// skip.on_failure();
/// assert!(!skip.allow());
/// ```
pub trait SkipPolicy: Send + Sync + fmt::Debug + 'static {
    /// Whether to call L2 now.
    fn allow(&self) -> bool;
    /// An L2 call succeeded.
    fn on_success(&self);
    /// An L2 call failed or timed out.
    fn on_failure(&self);
}

/// Skips L2 for `cool_down` after `threshold` consecutive failures; after the cool-down, calls
/// go through again and one more failure skips again at once.
#[derive(Debug)]
pub struct ConsecutiveFailures {
    threshold: u32,
    cool_down: Duration,
    origin: Instant,
    failures: AtomicU32,
    /// Nanoseconds after `origin` until which L2 is skipped.
    skip_until: AtomicU64,
}

impl ConsecutiveFailures {
    /// # Errors
    /// A zero threshold, or a cool-down of zero or over an hour.
    pub fn new(threshold: u32, cool_down: Duration) -> Result<Self, BuildError> {
        if threshold == 0 {
            return Err(BuildError::new("skip threshold", "at least 1"));
        }
        if cool_down.is_zero() || cool_down > Duration::from_secs(3600) {
            return Err(BuildError::new(
                "skip cool_down",
                format!("between 1 ns and 1 h, got {cool_down:?}"),
            ));
        }
        Ok(Self {
            threshold,
            cool_down,
            origin: Instant::now(),
            failures: AtomicU32::new(0),
            skip_until: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl SkipPolicy for ConsecutiveFailures {
    fn allow(&self) -> bool {
        self.now() >= self.skip_until.load(Ordering::Acquire)
    }
    fn on_success(&self) {
        self.failures.store(0, Ordering::Release);
    }
    fn on_failure(&self) {
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if n >= self.threshold {
            let until = self
                .now()
                .saturating_add(u64::try_from(self.cool_down.as_nanos()).unwrap_or(u64::MAX));
            self.skip_until.store(until, Ordering::Release);
            tracing::warn!(
                cache.l2_failures = n,
                cool_down = ?self.cool_down,
                "L2 skipped after consecutive failures"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn skips_for_the_cool_down_then_lets_calls_through() {
        let s = ConsecutiveFailures::new(3, Duration::from_secs(2)).unwrap();
        for _ in 0..3 {
            assert!(s.allow());
            s.on_failure();
        }
        assert!(!s.allow());
        tokio::time::advance(Duration::from_millis(1_999)).await;
        assert!(!s.allow());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(s.allow());
        s.on_failure();
        assert!(
            !s.allow(),
            "one more failure after the cool-down skips again"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        s.on_success();
        s.on_failure();
        assert!(s.allow(), "a success resets the count");
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(ConsecutiveFailures::new(0, Duration::from_secs(1)).is_err());
        assert!(ConsecutiveFailures::new(1, Duration::ZERO).is_err());
        assert!(ConsecutiveFailures::new(1, Duration::MAX).is_err());
    }
}
