//! The layers.

use super::{BulkheadService, CircuitBreakerService};
use crate::breaker::CircuitBreaker;
use crate::bulkhead::Bulkhead;
use crate::classify::DefaultClassifier;
use crate::clock::{Clock, CoarseClock};
use crate::policy::{CountWindow, FailurePolicy};

/// Wraps services in a [`CircuitBreakerService`]; every service it makes shares the breaker.
///
/// ```
/// use stanchion_breaker::{CircuitBreaker, CircuitBreakerLayer, Outcome};
/// let breaker = CircuitBreaker::builder().name("search").build()?;
/// // 404 is an answer, not an outage: classify by response.
/// let layer = CircuitBreakerLayer::new(breaker).classifier(|r: &Result<u16, std::io::Error>| match r {
///     Ok(s) if *s >= 500 => Outcome::Failure,
///     Ok(_) => Outcome::Success,
///     Err(_) => Outcome::Failure,
/// });
/// # let _ = layer;
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
pub struct CircuitBreakerLayer<P = CountWindow, C = CoarseClock, K = DefaultClassifier> {
    breaker: CircuitBreaker<P, C>,
    classifier: K,
}

impl<P, C, K: Clone> Clone for CircuitBreakerLayer<P, C, K> {
    fn clone(&self) -> Self {
        Self {
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<P: FailurePolicy, C: Clock> CircuitBreakerLayer<P, C> {
    /// A layer over `breaker`, classifying `Ok` as success and `Err` as failure.
    pub fn new(breaker: CircuitBreaker<P, C>) -> Self {
        Self {
            breaker,
            classifier: DefaultClassifier,
        }
    }
}

impl<P: FailurePolicy, C: Clock, K> CircuitBreakerLayer<P, C, K> {
    /// Classifies responses and errors with `classifier`.
    pub fn classifier<L>(self, classifier: L) -> CircuitBreakerLayer<P, C, L> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }
}

impl<S, P, C, K: Clone> tower::Layer<S> for CircuitBreakerLayer<P, C, K> {
    type Service = CircuitBreakerService<S, P, C, K>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// Wraps services in a [`BulkheadService`]; every service it makes shares the limit.
///
/// ```
/// use stanchion_breaker::{Bulkhead, BulkheadLayer};
/// let layer = BulkheadLayer::new(&Bulkhead::builder().max_concurrent(32).build()?);
/// # let _ = layer;
/// # Ok::<(), stanchion_breaker::BuildError>(())
/// ```
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// A layer sharing `bulkhead`'s slots and its wait: with a wait of zero (the default) a
    /// request that finds every slot busy is refused at once; otherwise the service's
    /// `poll_ready` waits up to that long for a slot, then refuses.
    pub fn new(bulkhead: &Bulkhead) -> Self {
        Self {
            bulkhead: bulkhead.clone(),
        }
    }
}

impl<S> tower::Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService::new(inner, &self.bulkhead)
    }
}

impl<P: FailurePolicy, C: Clock, K> std::fmt::Debug for CircuitBreakerLayer<P, C, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}
