//! Circuit breaker, retry, timeout and bulkhead, for protecting calls to a payment service, a
//! search service, Redis or a database replica.
//!
//! # Quick example
//! ```
//! use std::time::Duration;
//! use stanchion_breaker::{Bulkhead, CircuitBreaker, ConsecutiveFailures, Pipeline, Retry, Timeout};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let search = Pipeline::new()
//!     .bulkhead(Bulkhead::builder().max_concurrent(100).build()?)
//!     .breaker(CircuitBreaker::builder().name("search").policy(ConsecutiveFailures::new(5)?).build()?)
//!     .retry(Retry::builder().max_attempts(2).build()?)
//!     .timeout(Timeout::new(Duration::from_millis(300))?);
//! let hits = search.call(|| async { Ok::<_, std::io::Error>(vec!["tea"]) }).await?;
//! assert_eq!(hits, ["tea"]);
//! # Ok(()) }
//! ```
//!
//! # Concepts
//! - [`CircuitBreaker`] (default policy [`CountWindow`], default clock [`CoarseClock`]) with
//!   the states of [`State`]. Its hot path in `Closed` is one atomic load before the call, one
//!   after, and the policy's atomic update: no lock, no allocation, no clock read unless the
//!   policy needs time.
//! - [`FailurePolicy`]: [`ConsecutiveFailures`], [`CountWindow`], [`TimeWindow`], combined with
//!   [`FailurePolicy::or`].
//! - [`Classifier`] (default [`DefaultClassifier`]): success, failure or ignored.
//! - [`Clock`]: [`CoarseClock`], [`MonotonicClock`], [`ManualClock`].
//! - [`OnEvent`] hooks, [`Stats`], [`Registry`].
//! - [`Retry`] with [`RetryClassifier`] and [`RetryBudget`]; [`Timeout`]; [`Bulkhead`].
//! - [`Pipeline`] applies them as `bulkhead(breaker(retry(timeout(call))))`.
//!
//! # Feature flags
//! | feature | what |
//! |---|---|
//! | `tower` | `CircuitBreakerLayer` and `BulkheadLayer` |
//! | `metrics` | `breaker.transitions` and `breaker.rejected` counters through the `metrics` facade, registered when a breaker is built |
//!
//! # Observability
//! A `breaker.pipeline` span per [`Pipeline`] call, and `tracing` events with the fields
//! `breaker.name`, `breaker.state`, `breaker.from`, `breaker.open_wait_ms`, `retry.attempt`,
//! `retry.delay_ms`, `error.type`, `bulkhead.max_concurrent`; see the README for the table.
//!
//! # MSRV
//! Rust 1.94.

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod breaker;
mod classify;
mod clock;
mod error;
mod policy;
mod registry;

pub use crate::breaker::{
    BreakerEvent, CircuitBreaker, CircuitBreakerBuilder, OnEvent, OpenWait, OwnedPermit, Permit,
    State, Stats,
};
pub use crate::bulkhead::{Bulkhead, BulkheadBuilder, BulkheadPermit};
pub use crate::classify::{Classifier, DefaultClassifier, Outcome};
pub use crate::clock::{Clock, CoarseClock, ManualClock, MonotonicClock};
pub use crate::error::{
    BreakerError, BuildError, BulkheadError, Rejected, RetryError, TimeoutError,
};
pub use crate::pipeline::{AttemptError, CallError, Pipeline};
pub use crate::policy::{
    ConsecutiveFailures, CountWindow, FailurePolicy, MAX_COUNT_WINDOW, MAX_TIME_WINDOW_SECS,
    MAX_TIME_WINDOW_STRIPES, Or, Record, TimeWindow, WindowBuilder, WindowCounts,
};
pub use crate::registry::Registry;
pub use crate::retry::{
    Jitter, Retry, RetryAll, RetryBudget, RetryBuilder, RetryClassifier, RetryDecision,
};
pub use crate::timeout::Timeout;

mod bulkhead;
mod pipeline;
mod retry;
mod timeout;
#[cfg(feature = "tower")]
mod tower;
#[cfg(feature = "tower")]
pub use crate::tower::{
    BulkheadFull, BulkheadFuture, BulkheadLayer, BulkheadService, CircuitBreakerFuture,
    CircuitBreakerLayer, CircuitBreakerService,
};
