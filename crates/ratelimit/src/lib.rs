//! Rate limits with one GCRA for in-process and Redis-shared state.
//!
//! # Quick example
//! ```
//! use stanchion_ratelimit::{Limits, LocalLimiter, Quota};
//! let limiter = LocalLimiter::<std::net::IpAddr>::new(Limits::single(Quota::per_second(5)?))?;
//! let client: std::net::IpAddr = "203.0.113.7".parse().unwrap();
//! assert!(limiter.check(&client, 1).is_allowed());
//! # Ok::<(), stanchion_ratelimit::BuildError>(())
//! ```
//!
//! # Concepts
//! - [`Quota`] (rate, period, burst) and [`Limits`] (up to four quotas checked together);
//!   [`QuotaSelector`] and [`Plans`] for per-key quotas.
//! - [`gcra::check`]: the algorithm, pure, in absolute microseconds. [`Decision`] carries the
//!   [`Verdict`] and what the HTTP headers need.
//! - [`RateLimitStore`], the seam: [`LocalLimiter`] in process, [`RedisStore`] (feature
//!   `redis`) shared.
//! - [`RateLimiter`]: timeout, [`FailureMode`], deny cache, shadow mode over any store.
//! - [`ConcurrencyLimiter`] and `RedisConcurrencyLimiter`: requests in flight per key.
//! - [`Clock`]: [`MonotonicClock`], [`ManualClock`].
//! - Feature `tower`: `RateLimitLayer` with `ClientIp`, `HeaderKey` or closure key extractors.
//!
//! # Feature flags
//! | feature | what |
//! |---|---|
//! | `redis` | `RedisStore`, `RedisConcurrencyLimiter` |
//! | `tower` | `RateLimitLayer` and the key extractors |
//! | `axum` | `ClientIp` also reads axum's `ConnectInfo<SocketAddr>` |
//! | `metrics` | `ratelimit.denied`, `ratelimit.store_errors` counters |
//!
//! # Observability
//! `tracing` events with `ratelimit.key`, `ratelimit.quota`, `ratelimit.failure_mode`,
//! `error`; the hot in-process path logs nothing. See the README.
//!
//! # MSRV
//! Rust 1.94.

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

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
pub use crate::error::{BuildError, KeyError, QuotaError, StoreError};
pub use crate::gcra::{Decision, Source, Verdict};
pub use crate::limiter::{FailureMode, RateLimiter, RateLimiterBuilder};
pub use crate::local::LocalLimiter;
pub use crate::quota::{Limits, MAX_LIMITS, MAX_PERIOD, Plans, Quota, QuotaSelector};
pub use crate::store::RateLimitStore;

#[cfg(feature = "redis")]
pub use crate::redis::{BatchStats, GCRA_SCRIPT, RedisStore};

#[cfg(feature = "tower")]
mod tower_layer;
#[cfg(feature = "tower")]
pub use crate::tower_layer::{
    ClientIp, HeaderKey, IpNet, KeyExtractor, MIN_KEY_SECRET_LEN, MissingKey, PeerAddr,
    ProxyHeader, RateLimitFuture, RateLimitLayer, RateLimitService, write_headers,
};
