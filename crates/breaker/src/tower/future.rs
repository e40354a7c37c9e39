//! Response futures: named types, no allocation per request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::sync::OwnedSemaphorePermit;
use tower::BoxError;

use super::BulkheadFull;
use crate::breaker::OwnedPermit;
use crate::classify::Classifier;
use crate::clock::Clock;
use crate::error::Rejected;
use crate::policy::FailurePolicy;

pin_project_lite::pin_project! {
    /// The response future of a [`CircuitBreakerService`](super::CircuitBreakerService). Dropped
    /// before completion, it records nothing and frees its half-open probe permit.
    #[derive(Debug)]
    pub struct CircuitBreakerFuture<F, P: FailurePolicy, C: Clock, K> {
        #[pin]
        inner: Option<F>,
        permit: Option<OwnedPermit<P, C>>,
        classifier: Option<K>,
        rejected: Option<Rejected>,
    }
}

impl<F, P: FailurePolicy, C: Clock, K> CircuitBreakerFuture<F, P, C, K> {
    pub(crate) fn admitted(inner: F, permit: OwnedPermit<P, C>, classifier: K) -> Self {
        Self {
            inner: Some(inner),
            permit: Some(permit),
            classifier: Some(classifier),
            rejected: None,
        }
    }

    pub(crate) fn rejected(rejected: Rejected) -> Self {
        Self {
            inner: None,
            permit: None,
            classifier: None,
            rejected: Some(rejected),
        }
    }
}

impl<F, T, E, P, C, K> Future for CircuitBreakerFuture<F, P, C, K>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    P: FailurePolicy,
    C: Clock,
    K: Classifier<T, E>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let rejected = this.rejected.take().unwrap_or(Rejected {
                state: crate::State::Open,
                retry_after: None,
            });
            return Poll::Ready(Err(rejected.into()));
        };
        let result = ready!(inner.poll(cx));
        if let (Some(permit), Some(classifier)) = (this.permit.take(), this.classifier.as_ref()) {
            permit.record(classifier.classify(&result));
        }
        Poll::Ready(result.map_err(Into::into))
    }
}

pin_project_lite::pin_project! {
    /// The response future of a [`BulkheadService`](super::BulkheadService): holds the slot until
    /// the response is ready.
    #[derive(Debug)]
    pub struct BulkheadFuture<F> {
        #[pin]
        inner: Option<F>,
        permit: Option<OwnedSemaphorePermit>,
        max_concurrent: usize,
    }
}

impl<F> BulkheadFuture<F> {
    pub(crate) fn admitted(inner: F, permit: OwnedSemaphorePermit) -> Self {
        Self {
            inner: Some(inner),
            permit: Some(permit),
            max_concurrent: 0,
        }
    }

    pub(crate) fn rejected(max_concurrent: usize) -> Self {
        Self {
            inner: None,
            permit: None,
            max_concurrent,
        }
    }
}

impl<F, T, E> Future for BulkheadFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(BulkheadFull::new(*this.max_concurrent).into()));
        };
        let result = ready!(inner.poll(cx));
        this.permit.take();
        Poll::Ready(result.map_err(Into::into))
    }
}
