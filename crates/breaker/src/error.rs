//! Error types: configuration (build time) and calls (run time).

use std::time::Duration;

use crate::breaker::State;

/// A configuration value was rejected when the policy, breaker, retry or bulkhead was built.
///
/// ```
/// use stanchion_breaker::CountWindow;
/// let err = CountWindow::builder(0).build().unwrap_err();
/// assert_eq!(err.field(), "window_size");
/// assert!(err.to_string().contains("window_size"));
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid `{field}`: must be {expected}, got {got}")]
pub struct BuildError {
    field: &'static str,
    expected: &'static str,
    got: String,
}

impl BuildError {
    pub(crate) fn new(field: &'static str, expected: &'static str, got: impl ToString) -> Self {
        Self {
            field,
            expected,
            got: got.to_string(),
        }
    }

    /// The name of the offending setting, as spelled by its builder method.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

/// Checks a percentage in (0, 100].
pub(crate) fn percent(field: &'static str, value: f64) -> Result<u32, BuildError> {
    if value.is_nan() || value <= 0.0 || value > 100.0 {
        return Err(BuildError::new(field, "a percentage in (0, 100]", value));
    }
    // Basis points, so thresholds are compared in integers on the hot path.
    Ok((value * 100.0).round() as u32)
}

/// A call refused by a breaker: it was never started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker rejected the call while {state}")]
pub struct Rejected {
    /// The state that refused the call (`Open`, `ForcedOpen`, or `HalfOpen` with every probe
    /// permit taken).
    pub state: State,
    /// When a call could be admitted again, if known (`Open` only).
    pub retry_after: Option<Duration>,
}

/// The error of a call through a [`CircuitBreaker`](crate::CircuitBreaker).
///
/// ```
/// use stanchion_breaker::{BreakerError, CircuitBreaker, ConsecutiveFailures};
/// let breaker = CircuitBreaker::builder()
///     .policy(ConsecutiveFailures::new(1)?)
///     .build()?;
/// let first = breaker.call_sync(|| Err::<(), _>("boom"));
/// assert!(matches!(first, Err(BreakerError::Inner("boom"))));
/// let second = breaker.call_sync(|| Ok::<_, &str>(()));
/// assert!(second.unwrap_err().is_rejected());
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BreakerError<E> {
    /// The breaker refused the call; the dependency was not called.
    #[error("circuit breaker is {state}; call not attempted")]
    Open {
        /// The state that refused the call.
        state: State,
        /// When a call could be admitted again, if known.
        retry_after: Option<Duration>,
    },
    /// The call ran and failed.
    #[error("call failed")]
    Inner(#[source] E),
}

impl<E> BreakerError<E> {
    /// Whether the breaker refused the call (as opposed to the call failing).
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Open { .. })
    }

    /// The breaker's hint of when to try again, for a rejection.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Open { retry_after, .. } => *retry_after,
            Self::Inner(_) => None,
        }
    }

    /// The call's own error, if it ran.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Inner(e) => Some(e),
            Self::Open { .. } => None,
        }
    }
}

impl<E> From<Rejected> for BreakerError<E> {
    fn from(r: Rejected) -> Self {
        Self::Open {
            state: r.state,
            retry_after: r.retry_after,
        }
    }
}

/// The error of a call through [`Timeout`](crate::Timeout).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TimeoutError<E> {
    /// The call did not finish in time and was dropped.
    #[error("call timed out after {0:?}")]
    Elapsed(Duration),
    /// The call finished in time and failed.
    #[error("call failed")]
    Inner(#[source] E),
}

impl<E> TimeoutError<E> {
    /// Whether the call timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Elapsed(_))
    }
}

/// The error of a call through a [`Bulkhead`](crate::Bulkhead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BulkheadError<E> {
    /// Every slot was busy (and stayed busy for the configured wait).
    #[error("bulkhead full ({max_concurrent} calls in flight)")]
    Full {
        /// The bulkhead's limit.
        max_concurrent: usize,
    },
    /// The call ran and failed.
    #[error("call failed")]
    Inner(#[source] E),
}

impl<E> BulkheadError<E> {
    /// Whether the bulkhead refused the call.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Full { .. })
    }
}

/// The error of a call through [`Retry`](crate::Retry): the last attempt's error, or why retrying
/// stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError<E> {
    /// Every allowed attempt failed; this is the last error.
    #[error("gave up after {attempts} attempts")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        last: E,
    },
    /// The error was not retryable.
    #[error("call failed with a non-retryable error")]
    NotRetryable(#[source] E),
    /// The retry budget was spent: retrying would multiply load on a failing dependency.
    #[error("retry budget exhausted after {attempts} attempts")]
    BudgetExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        last: E,
    },
}

impl<E> RetryError<E> {
    /// The last error seen.
    pub fn into_last(self) -> E {
        match self {
            Self::Exhausted { last, .. } | Self::BudgetExhausted { last, .. } => last,
            Self::NotRetryable(e) => e,
        }
    }

    /// A reference to the last error seen.
    pub fn last(&self) -> &E {
        match self {
            Self::Exhausted { last, .. } | Self::BudgetExhausted { last, .. } => last,
            Self::NotRetryable(e) => e,
        }
    }
}
