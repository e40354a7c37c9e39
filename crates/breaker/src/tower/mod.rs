//! tower middleware (feature `tower`): [`CircuitBreakerLayer`] and [`BulkheadLayer`]. Clones of
//! a layer and of the services it makes share one breaker or bulkhead.
//!
//! For per-request timeouts use `tower::timeout`; for retries, [`Retry`](crate::Retry) around the
//! call, or `tower::retry`.

mod future;
mod layer;

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;

pub use self::future::{BulkheadFuture, CircuitBreakerFuture};
pub use self::layer::{BulkheadLayer, CircuitBreakerLayer};

use crate::breaker::CircuitBreaker;
use crate::bulkhead::Bulkhead;
use crate::classify::{Classifier, DefaultClassifier};
use crate::clock::{Clock, CoarseClock};
use crate::error::{BreakerError, BulkheadError};
use crate::policy::{CountWindow, FailurePolicy};

/// A service behind a circuit breaker. Made by [`CircuitBreakerLayer`].
///
/// ```
/// use tower::{Service, ServiceExt, service_fn};
/// use stanchion_breaker::{CircuitBreaker, CircuitBreakerLayer, ConsecutiveFailures};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let breaker = CircuitBreaker::builder().policy(ConsecutiveFailures::new(1)?).build()?;
/// let mut svc = tower::ServiceBuilder::new()
///     .layer(CircuitBreakerLayer::new(breaker.clone()))
///     .service(service_fn(|fail: bool| async move { if fail { Err("503") } else { Ok("ok") } }));
/// assert!(svc.ready().await.unwrap().call(true).await.is_err());
/// let err = svc.ready().await.unwrap().call(false).await.unwrap_err();
/// assert!(err.is_rejected());
/// # Ok(()) }
/// ```
pub struct CircuitBreakerService<S, P = CountWindow, C = CoarseClock, K = DefaultClassifier> {
    inner: S,
    breaker: CircuitBreaker<P, C>,
    classifier: K,
}

impl<S: Clone, P, C, K: Clone> Clone for CircuitBreakerService<S, P, C, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S, P, C, K, Req> tower::Service<Req> for CircuitBreakerService<S, P, C, K>
where
    S: tower::Service<Req>,
    P: FailurePolicy,
    C: Clock,
    K: Classifier<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BreakerError<S::Error>;
    type Future = CircuitBreakerFuture<S::Future, P, C, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BreakerError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.breaker.try_acquire_owned() {
            Ok(permit) => CircuitBreakerFuture::admitted(
                self.inner.call(req),
                permit,
                self.classifier.clone(),
            ),
            Err(rejected) => CircuitBreakerFuture::rejected(rejected),
        }
    }
}

/// A service behind a [`Bulkhead`]: a request that finds every slot busy is refused at once with
/// [`BulkheadError::Full`] (it never queues). Made by [`BulkheadLayer`].
#[derive(Debug, Clone)]
pub struct BulkheadService<S> {
    inner: S,
    semaphore: Arc<Semaphore>,
    max_concurrent: usize,
}

impl<S, Req> tower::Service<Req> for BulkheadService<S>
where
    S: tower::Service<Req>,
{
    type Response = S::Response;
    type Error = BulkheadError<S::Error>;
    type Future = BulkheadFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BulkheadError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match Arc::clone(&self.semaphore).try_acquire_owned() {
            Ok(permit) => BulkheadFuture::admitted(self.inner.call(req), permit),
            Err(_) => BulkheadFuture::rejected(self.max_concurrent),
        }
    }
}

impl<S> BulkheadService<S> {
    pub(crate) fn new(inner: S, bulkhead: &Bulkhead) -> Self {
        Self {
            inner,
            semaphore: bulkhead.semaphore(),
            max_concurrent: bulkhead.max_concurrent(),
        }
    }
}

impl<S: std::fmt::Debug, P: FailurePolicy, C: Clock, K> std::fmt::Debug
    for CircuitBreakerService<S, P, C, K>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}
