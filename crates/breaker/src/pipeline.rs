//! The four wrappers combined in one documented order.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tracing::Instrument;

use crate::breaker::{CircuitBreaker, State};
use crate::bulkhead::Bulkhead;
use crate::classify::{Classifier, Outcome};
use crate::clock::{Clock, CoarseClock};
use crate::error::{RetryError, TimeoutError};
use crate::policy::{CountWindow, FailurePolicy};
use crate::retry::{Retry, RetryAll, RetryClassifier};
use crate::timeout::Timeout;

/// The error of one attempt inside a [`Pipeline`]: what the retry and breaker classifiers see.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError<E> {
    /// The attempt hit the per-attempt timeout.
    #[error("attempt timed out after {0:?}")]
    Timeout(Duration),
    /// The attempt failed.
    #[error("attempt failed")]
    Inner(#[source] E),
}

/// The error of a call through a [`Pipeline`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError<E> {
    /// The bulkhead was full: nothing ran.
    #[error("bulkhead full ({max_concurrent} calls in flight)")]
    BulkheadFull {
        /// The bulkhead's limit.
        max_concurrent: usize,
    },
    /// The breaker refused the call: nothing ran.
    #[error("circuit breaker is {state}; call not attempted")]
    Open {
        /// The state that refused the call.
        state: State,
        /// When a call could be admitted again, if known.
        retry_after: Option<Duration>,
    },
    /// The last attempt timed out.
    #[error("timed out after {limit:?} ({attempts} attempts)")]
    Timeout {
        /// The per-attempt limit.
        limit: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// The last attempt failed.
    #[error("call failed ({attempts} attempts)")]
    Failed {
        /// The last attempt's error.
        #[source]
        error: E,
        /// Attempts made.
        attempts: u32,
    },
}

impl<E> CallError<E> {
    /// Whether the call was refused without running (bulkhead or breaker).
    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::BulkheadFull { .. } | Self::Open { .. })
    }
}

/// Bulkhead, circuit breaker, retry and timeout, each optional, applied in this order from the
/// outside in:
///
/// ```text
/// bulkhead( breaker( retry( timeout( call ) ) ) )
/// ```
///
/// - The bulkhead is outermost: the cheapest refusal, and it bounds everything inside, retries
///   and their sleeps included, so a slow dependency cannot tie up more than N tasks.
/// - The breaker sees one outcome per logical call (after retries), and an open breaker fails
///   fast without spending any retry.
/// - Retry re-runs attempts, honouring its budget so retries cannot multiply an outage.
/// - The timeout bounds each attempt, so one hung attempt cannot eat the whole retry schedule.
///
/// ```
/// use std::time::Duration;
/// use stanchion_breaker::{Bulkhead, CircuitBreaker, ConsecutiveFailures, Pipeline, Retry, Timeout};
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pipeline = Pipeline::new()
///     .bulkhead(Bulkhead::builder().max_concurrent(64).build()?)
///     .breaker(CircuitBreaker::builder().policy(ConsecutiveFailures::new(5)?).build()?)
///     .retry(Retry::builder().max_attempts(2).build()?)
///     .timeout(Timeout::new(Duration::from_millis(200))?);
/// let answer = pipeline.call(|| async { Ok::<_, std::io::Error>(7) }).await?;
/// assert_eq!(answer, 7);
/// # Ok(()) }
/// ```
pub struct Pipeline<P = CountWindow, C = CoarseClock> {
    bulkhead: Option<Bulkhead>,
    breaker: Option<CircuitBreaker<P, C>>,
    retry: Option<Retry>,
    timeout: Option<Timeout>,
}

impl<P: FailurePolicy, C: Clock> fmt::Debug for Pipeline<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("bulkhead", &self.bulkhead)
            .field("breaker", &self.breaker)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<P, C> Clone for Pipeline<P, C> {
    fn clone(&self) -> Self {
        Self {
            bulkhead: self.bulkhead.clone(),
            breaker: self.breaker.clone(),
            retry: self.retry.clone(),
            timeout: self.timeout,
        }
    }
}

impl Pipeline {
    /// An empty pipeline (calls pass straight through).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self {
            bulkhead: None,
            breaker: None,
            retry: None,
            timeout: None,
        }
    }
}

impl<P: FailurePolicy, C: Clock> Pipeline<P, C> {
    /// Adds a bulkhead (outermost).
    #[must_use]
    pub fn bulkhead(mut self, bulkhead: Bulkhead) -> Self {
        self.bulkhead = Some(bulkhead);
        self
    }

    /// Adds a circuit breaker.
    #[must_use]
    pub fn breaker<Q: FailurePolicy, D: Clock>(
        self,
        breaker: CircuitBreaker<Q, D>,
    ) -> Pipeline<Q, D> {
        Pipeline {
            bulkhead: self.bulkhead,
            breaker: Some(breaker),
            retry: self.retry,
            timeout: self.timeout,
        }
    }

    /// Adds retries.
    #[must_use]
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Adds a per-attempt timeout (innermost).
    #[must_use]
    pub fn timeout(mut self, timeout: Timeout) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The breaker, if any (for its state and stats).
    pub fn circuit_breaker(&self) -> Option<&CircuitBreaker<P, C>> {
        self.breaker.as_ref()
    }

    /// Runs `attempt` through the pipeline: every error and timeout is retryable and counts as a
    /// breaker failure.
    ///
    /// # Errors
    /// [`CallError::BulkheadFull`] or [`CallError::Open`] when the call was refused without
    /// running; [`CallError::Timeout`] or [`CallError::Failed`] for the last attempt.
    ///
    /// # Panics
    /// Outside a Tokio runtime with the time driver enabled, when a timeout, a retry delay or a
    /// bulkhead wait is configured.
    pub async fn call<F, Fut, T, E>(&self, attempt: F) -> Result<T, CallError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let failure = |r: &Result<T, AttemptError<E>>| match r {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        };
        self.call_with(&RetryAll, &failure, attempt).await
    }

    /// Like [`call`](Self::call), with a retry classifier and a breaker classifier over
    /// [`AttemptError`].
    ///
    /// # Errors
    /// As [`call`](Self::call).
    ///
    /// # Panics
    /// As [`call`](Self::call).
    pub async fn call_with<R, K, F, Fut, T, E>(
        &self,
        retryable: &R,
        classifier: &K,
        attempt: F,
    ) -> Result<T, CallError<E>>
    where
        R: RetryClassifier<AttemptError<E>> + ?Sized,
        K: Classifier<T, AttemptError<E>> + ?Sized,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let span = tracing::debug_span!(
            "breaker.pipeline",
            breaker.name = self.breaker.as_ref().map(CircuitBreaker::name),
        );
        self.run(retryable, classifier, attempt)
            .instrument(span)
            .await
    }

    async fn run<R, K, F, Fut, T, E>(
        &self,
        retryable: &R,
        classifier: &K,
        mut attempt: F,
    ) -> Result<T, CallError<E>>
    where
        R: RetryClassifier<AttemptError<E>> + ?Sized,
        K: Classifier<T, AttemptError<E>> + ?Sized,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _slot = match &self.bulkhead {
            Some(b) => Some(b.acquire().await.ok_or(CallError::BulkheadFull {
                max_concurrent: b.max_concurrent(),
            })?),
            None => None,
        };
        let permit = match &self.breaker {
            Some(cb) => Some(cb.try_acquire().map_err(|r| CallError::Open {
                state: r.state,
                retry_after: r.retry_after,
            })?),
            None => None,
        };
        // An atomic rather than a `Cell`: the counter is borrowed across `.await`, and a `Cell`
        // would make this future `!Send` (rejected by `tokio::spawn` and axum handlers).
        let attempts = AtomicU32::new(0);
        let timeout = self.timeout;
        let one = || {
            attempts.fetch_add(1, Ordering::Relaxed);
            let fut = attempt();
            async move {
                match timeout {
                    Some(t) => t.call(fut).await.map_err(|e| match e {
                        TimeoutError::Elapsed(d) => AttemptError::Timeout(d),
                        TimeoutError::Inner(e) => AttemptError::Inner(e),
                    }),
                    None => fut.await.map_err(AttemptError::Inner),
                }
            }
        };
        let result = match &self.retry {
            Some(retry) => retry
                .call_with(retryable, one)
                .await
                .map_err(RetryError::into_last),
            None => {
                let mut one = one;
                one().await
            }
        };
        if let Some(permit) = permit {
            permit.record(classifier.classify(&result));
        }
        result.map_err(|e| match e {
            AttemptError::Timeout(limit) => CallError::Timeout {
                limit,
                attempts: attempts.load(Ordering::Relaxed),
            },
            AttemptError::Inner(error) => CallError::Failed {
                error,
                attempts: attempts.load(Ordering::Relaxed),
            },
        })
    }
}
