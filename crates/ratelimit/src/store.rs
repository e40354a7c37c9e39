//! The seam: where shared limiter state lives.

use std::future::Future;

use crate::error::StoreError;
use crate::gcra::Decision;
use crate::quota::Limits;

/// Shared GCRA state. [`RedisStore`](crate::RedisStore) (feature `redis`) is the production
/// implementation; [`LocalLimiter`](crate::LocalLimiter) implements it for a single process.
///
/// An implementation runs the whole check (every quota, all or nothing) in one atomic step and,
/// for a networked store, in one round trip.
pub trait RateLimitStore: Send + Sync + 'static {
    /// Checks `cost` units for `key` against `limits`.
    fn check(
        &self,
        key: &str,
        limits: &Limits,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send;

    /// Answers at once when the store can without waiting (an in-process store); `None` (the
    /// default) means [`check`](Self::check) must be awaited. Used by
    /// [`RateLimiter::check_now`](crate::RateLimiter::check_now).
    fn check_now(
        &self,
        key: &str,
        limits: &Limits,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        let _ = (key, limits, cost);
        None
    }

    /// A cheap liveness probe used while the store is marked down.
    fn probe(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }
}

impl<Q, C> RateLimitStore for crate::LocalLimiter<String, Q, C>
where
    Q: crate::QuotaSelector<String>,
    C: crate::Clock,
{
    fn check(
        &self,
        key: &str,
        limits: &Limits,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send {
        let decision = self.check_limits(key, limits, cost);
        async move { Ok(decision) }
    }

    fn check_now(
        &self,
        key: &str,
        limits: &Limits,
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        Some(Ok(self.check_limits(key, limits, cost)))
    }
}
