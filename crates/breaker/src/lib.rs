#![doc = "Circuit breaker, retry, timeout and bulkhead."]
//!
//! See the crate README for concepts, the settings mapping from resilience4j and gobreaker, and
//! the measured figures.

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
    ConsecutiveFailures, CountWindow, FailurePolicy, MAX_COUNT_WINDOW, MAX_TIME_WINDOW_SECS, Or,
    Record, TimeWindow, WindowBuilder, WindowCounts,
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
    BulkheadFuture, BulkheadLayer, BulkheadService, CircuitBreakerFuture, CircuitBreakerLayer,
    CircuitBreakerService,
};
