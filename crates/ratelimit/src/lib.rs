//! Rate limits with one GCRA for in-process and Redis-shared state.
//!
//! See the crate README for the algorithm, how to pick a failure mode, and migration tables.

mod clock;
mod concurrency;
mod error;
pub mod gcra;
mod limiter;
mod local;
mod quota;
mod store;

#[cfg(feature = "redis")]
mod redis;

pub use crate::clock::{Clock, ManualClock, MonotonicClock};
pub use crate::concurrency::{
    ConcurrencyError, ConcurrencyLimiter, ConcurrencyPermit, TooManyInFlight,
};
#[cfg(feature = "redis")]
pub use crate::concurrency::{RedisConcurrencyLimiter, RedisLease};
pub use crate::error::{BuildError, KeyError, StoreError};
pub use crate::gcra::{Decision, Source, Verdict};
pub use crate::limiter::{FailureMode, RateLimiter, RateLimiterBuilder};
pub use crate::local::LocalLimiter;
pub use crate::quota::{Limits, MAX_LIMITS, MAX_PERIOD, Plans, Quota, QuotaSelector};
pub use crate::store::RateLimitStore;

#[cfg(feature = "redis")]
pub use crate::redis::{GCRA_SCRIPT, RedisStore};

#[cfg(feature = "tower")]
mod http;
#[cfg(feature = "tower")]
pub use crate::http::{
    ClientIp, HeaderKey, IpNet, KeyExtractor, MissingKey, PeerAddr, ProxyHeader, RateLimitFuture,
    RateLimitLayer, RateLimitService, write_headers,
};
