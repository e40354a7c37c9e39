//! tower middleware (feature `tower`): [`CircuitBreakerLayer`] and [`BulkheadLayer`]. Clones of
//! a layer and of the services it makes share one breaker or bulkhead.
//!
//! Following tower's own middleware (`Timeout`, `LoadShed`), the services' error type is
//! [`tower::BoxError`], the inner service's error converted with `Into`, so these layers stack
//! with `tower::timeout`, `tower::retry` and `tower::load_shed` in any order (tower-http's
//! layers pass errors through and take them like any service). A refusal is a concrete error inside the box: [`Rejected`](crate::Rejected) from the
//! breaker, [`BulkheadFull`] from the bulkhead; find it with `downcast_ref`.
//!
//! # Readiness
//! - [`CircuitBreakerService`] sheds load in `call`: `poll_ready` only asks the inner service,
//!   and a request arriving while the breaker is open gets an immediate error future. An open
//!   breaker is a verdict on the dependency, not a queue to wait in, and a caller that waited in
//!   `poll_ready` would wait out the whole open period.
//! - [`BulkheadService`] applies backpressure in `poll_ready`, as tower's `ConcurrencyLimit`
//!   does: it takes a slot there (waiting up to the bulkhead's
//!   [`max_wait`](crate::BulkheadBuilder::max_wait)) and holds it until the response is ready.
//!   When no slot comes in time, `poll_ready` still returns ready and the next `call` is
//!   refused with [`BulkheadFull`] (tower's load-shedding convention), so a caller never waits
//!   longer than the configured wait. As with `ConcurrencyLimit`, a clone that was made ready
//!   and then not called holds its slot until it is called or dropped.
//!
//! For per-request timeouts use `tower::timeout`; for retries, [`Retry`](crate::Retry) around the
//! call, or `tower::retry`.

mod error;
mod future;
mod layer;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::BoxError;

pub use self::error::BulkheadFull;
pub use self::future::{BulkheadFuture, CircuitBreakerFuture};
pub use self::layer::{BulkheadLayer, CircuitBreakerLayer};

use crate::breaker::CircuitBreaker;
use crate::bulkhead::Bulkhead;
use crate::classify::{Classifier, DefaultClassifier};
use crate::clock::{Clock, CoarseClock};
use crate::policy::{CountWindow, FailurePolicy};

/// A service behind a circuit breaker. Made by [`CircuitBreakerLayer`].
///
/// ```
/// use tower::{Service, ServiceExt, service_fn};
/// use stanchion_breaker::{CircuitBreaker, CircuitBreakerLayer, ConsecutiveFailures, Rejected};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let breaker = CircuitBreaker::builder().policy(ConsecutiveFailures::new(1)?).build()?;
/// let mut svc = tower::ServiceBuilder::new()
///     .layer(CircuitBreakerLayer::new(breaker.clone()))
///     .service(service_fn(|fail: bool| async move { if fail { Err("503") } else { Ok("ok") } }));
/// assert!(svc.ready().await.unwrap().call(true).await.is_err());
/// let err = svc.ready().await.unwrap().call(false).await.unwrap_err();
/// assert!(err.downcast_ref::<Rejected>().is_some());
/// # Ok(()) }
/// ```
pub struct CircuitBreakerService<S, P = CountWindow, C = CoarseClock, K = DefaultClassifier> {
    inner: S,
    breaker: CircuitBreaker<P, C>,
    classifier: K,
}

impl<S, P, C, K> CircuitBreakerService<S, P, C, K> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The breaker this service shares.
    pub fn breaker(&self) -> &CircuitBreaker<P, C> {
        &self.breaker
    }
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
    S::Error: Into<BoxError>,
    P: FailurePolicy,
    C: Clock,
    K: Classifier<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = CircuitBreakerFuture<S::Future, P, C, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
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

type Acquire = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send + Sync>>;

/// A service behind a [`Bulkhead`]: at most `max_concurrent` requests in flight across every
/// clone. `poll_ready` takes a slot (waiting at most the bulkhead's `max_wait`); a request that
/// got none is refused with [`BulkheadFull`]. Made by [`BulkheadLayer`].
///
/// ```
/// use tower::{Service, ServiceExt, service_fn};
/// use stanchion_breaker::{Bulkhead, BulkheadFull, BulkheadLayer};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower::BoxError> {
/// let bulkhead = Bulkhead::builder().max_concurrent(1).build()?;
/// let mut svc = tower::ServiceBuilder::new()
///     .layer(BulkheadLayer::new(&bulkhead))
///     .service(service_fn(|x: u32| async move { Ok::<_, std::io::Error>(x) }));
/// let held = bulkhead.try_acquire().expect("a free slot");
/// let err = svc.ready().await?.call(1).await.unwrap_err();
/// assert!(err.downcast_ref::<BulkheadFull>().is_some());
/// drop(held);
/// assert_eq!(svc.ready().await?.call(2).await?, 2);
/// # Ok(()) }
/// ```
pub struct BulkheadService<S> {
    inner: S,
    semaphore: Arc<Semaphore>,
    max_concurrent: usize,
    max_wait: Duration,
    /// The slot taken by `poll_ready` for the next `call`.
    permit: Option<OwnedSemaphorePermit>,
    /// A bounded wait for a slot, in progress (allocated only when every slot was busy).
    waiting: Option<Acquire>,
    /// No slot came in time: the next `call` is refused.
    shed: bool,
}

impl<S> BulkheadService<S> {
    pub(crate) fn new(inner: S, bulkhead: &Bulkhead) -> Self {
        Self {
            inner,
            semaphore: bulkhead.semaphore(),
            max_concurrent: bulkhead.max_concurrent(),
            max_wait: bulkhead.max_wait(),
            permit: None,
            waiting: None,
            shed: false,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service (a slot taken by `poll_ready` is given back).
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Takes a slot for the next call, or decides to refuse it; `Pending` while waiting.
    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.permit.is_some() || self.shed {
            return Poll::Ready(());
        }
        if self.waiting.is_none() {
            match Arc::clone(&self.semaphore).try_acquire_owned() {
                Ok(permit) => {
                    self.permit = Some(permit);
                    return Poll::Ready(());
                }
                Err(_) if self.max_wait.is_zero() => {
                    self.shed = true;
                    return Poll::Ready(());
                }
                Err(_) => {
                    let semaphore = Arc::clone(&self.semaphore);
                    let wait = self.max_wait;
                    self.waiting = Some(Box::pin(async move {
                        tokio::time::timeout(wait, semaphore.acquire_owned())
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }));
                }
            }
        }
        if let Some(waiting) = self.waiting.as_mut() {
            let got = std::task::ready!(waiting.as_mut().poll(cx));
            self.waiting = None;
            match got {
                Some(permit) => self.permit = Some(permit),
                None => self.shed = true,
            }
        }
        Poll::Ready(())
    }
}

impl<S: Clone> Clone for BulkheadService<S> {
    /// A clone shares the slots but not a slot taken by this service's `poll_ready`.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            semaphore: Arc::clone(&self.semaphore),
            max_concurrent: self.max_concurrent,
            max_wait: self.max_wait,
            permit: None,
            waiting: None,
            shed: false,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for BulkheadService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadService")
            .field("inner", &self.inner)
            .field("max_concurrent", &self.max_concurrent)
            .field("max_wait", &self.max_wait)
            .field("holds_slot", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, Req> tower::Service<Req> for BulkheadService<S>
where
    S: tower::Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BulkheadFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        std::task::ready!(self.poll_slot(cx));
        if self.shed {
            // The call will be refused without reaching the inner service.
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.shed = false;
        // Without a preceding `poll_ready` (a contract breach), try once rather than panic.
        let permit = self
            .permit
            .take()
            .or_else(|| Arc::clone(&self.semaphore).try_acquire_owned().ok());
        match permit {
            Some(permit) => BulkheadFuture::admitted(self.inner.call(req), permit),
            None => {
                tracing::debug!(
                    bulkhead.max_concurrent = self.max_concurrent,
                    "bulkhead full"
                );
                BulkheadFuture::rejected(self.max_concurrent)
            }
        }
    }
}

impl<S: fmt::Debug, P: FailurePolicy, C: Clock, K> fmt::Debug
    for CircuitBreakerService<S, P, C, K>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}
