//! A bulkhead: at most N calls in flight, with a bounded wait or immediate rejection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{BuildError, BulkheadError};

/// Limits concurrent calls. Cheap to clone; clones share the limit.
///
/// ```
/// use std::time::Duration;
/// use stanchion_breaker::Bulkhead;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), stanchion_breaker::BuildError> {
/// let bulkhead = Bulkhead::builder().max_concurrent(1).build()?;
/// let held = bulkhead.try_acquire().expect("a free slot");
/// let refused = bulkhead.call(async { Ok::<_, ()>(()) }).await;
/// assert!(refused.unwrap_err().is_rejected());
/// drop(held);
/// assert!(bulkhead.call(async { Ok::<_, ()>(()) }).await.is_ok());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Bulkhead {
    semaphore: Arc<Semaphore>,
    max_concurrent: usize,
    max_wait: Duration,
}

/// Settings of a [`Bulkhead`].
#[derive(Debug, Clone)]
#[must_use]
pub struct BulkheadBuilder {
    max_concurrent: usize,
    max_wait: Duration,
}

/// A slot in a [`Bulkhead`], freed on drop.
#[derive(Debug)]
pub struct BulkheadPermit {
    _permit: OwnedSemaphorePermit,
}

impl Bulkhead {
    /// Defaults: 25 concurrent calls (resilience4j's), no waiting.
    pub fn builder() -> BulkheadBuilder {
        BulkheadBuilder {
            max_concurrent: 25,
            max_wait: Duration::ZERO,
        }
    }

    /// The limit.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    #[cfg(feature = "tower")]
    pub(crate) fn semaphore(&self) -> Arc<Semaphore> {
        Arc::clone(&self.semaphore)
    }

    /// How long a call may wait for a slot.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.max_concurrent - self.semaphore.available_permits()
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> Option<BulkheadPermit> {
        Arc::clone(&self.semaphore)
            .try_acquire_owned()
            .ok()
            .map(|p| BulkheadPermit { _permit: p })
    }

    /// A slot, waiting at most the configured wait.
    ///
    /// # Panics
    /// When it has to wait (a non-zero `max_wait` and no free slot) outside a Tokio runtime with
    /// the time driver enabled.
    pub async fn acquire(&self) -> Option<BulkheadPermit> {
        if let Some(p) = self.try_acquire() {
            return Some(p);
        }
        if self.max_wait.is_zero() {
            return None;
        }
        match tokio::time::timeout(self.max_wait, Arc::clone(&self.semaphore).acquire_owned()).await
        {
            Ok(Ok(p)) => Some(BulkheadPermit { _permit: p }),
            _ => None,
        }
    }

    /// Runs `call` in a slot, or refuses it.
    ///
    /// # Errors
    /// [`BulkheadError::Full`] when no slot was free within the wait (`call` did not run), and
    /// [`BulkheadError::Inner`] with the call's own error.
    ///
    /// # Panics
    /// As [`acquire`](Self::acquire).
    pub async fn call<F, T, E>(&self, call: F) -> Result<T, BulkheadError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let Some(_permit) = self.acquire().await else {
            tracing::debug!(
                bulkhead.max_concurrent = self.max_concurrent,
                "bulkhead full"
            );
            return Err(BulkheadError::Full {
                max_concurrent: self.max_concurrent,
            });
        };
        call.await.map_err(BulkheadError::Inner)
    }
}

impl BulkheadBuilder {
    /// Calls in flight at most (1 to `Semaphore::MAX_PERMITS`).
    pub fn max_concurrent(mut self, max: usize) -> Self {
        self.max_concurrent = max;
        self
    }

    /// How long a call may wait for a slot (default zero: reject at once).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Validates the settings.
    ///
    /// # Errors
    /// [`BuildError`] for `max_concurrent` of zero or above tokio's `Semaphore::MAX_PERMITS`.
    pub fn build(self) -> Result<Bulkhead, BuildError> {
        if self.max_concurrent == 0 || self.max_concurrent > Semaphore::MAX_PERMITS {
            return Err(BuildError::new(
                "max_concurrent",
                "between 1 and tokio's Semaphore::MAX_PERMITS",
                self.max_concurrent,
            ));
        }
        Ok(Bulkhead {
            semaphore: Arc::new(Semaphore::new(self.max_concurrent)),
            max_concurrent: self.max_concurrent,
            max_wait: self.max_wait,
        })
    }
}
