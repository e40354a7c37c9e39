//! A deadline per call.

use std::future::Future;
use std::time::Duration;

use crate::error::{BuildError, TimeoutError};

/// Drops a call that takes longer than its limit (tokio's timer).
///
/// ```
/// use std::time::Duration;
/// use stanchion_breaker::Timeout;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), stanchion_breaker::BuildError> {
/// let timeout = Timeout::new(Duration::from_millis(50))?;
/// let slow = timeout.call(async {
///     tokio::time::sleep(Duration::from_secs(1)).await;
///     Ok::<_, std::io::Error>(())
/// });
/// assert!(slow.await.unwrap_err().is_timeout());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Timeout {
    limit: Duration,
}

impl Timeout {
    /// A limit greater than zero.
    ///
    /// # Errors
    /// [`BuildError`] for a zero limit.
    pub fn new(limit: Duration) -> Result<Self, BuildError> {
        if limit.is_zero() {
            return Err(BuildError::new("timeout", "greater than zero", "0s"));
        }
        Ok(Self { limit })
    }

    /// The limit.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Runs `call`, dropping it when the limit passes.
    ///
    /// # Errors
    /// [`TimeoutError::Elapsed`] when the limit passed (the call was dropped), and
    /// [`TimeoutError::Inner`] with the call's own error.
    ///
    /// # Panics
    /// Outside a Tokio runtime with the time driver enabled.
    pub async fn call<F, T, E>(&self, call: F) -> Result<T, TimeoutError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        match tokio::time::timeout(self.limit, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(TimeoutError::Inner(e)),
            Err(_) => Err(TimeoutError::Elapsed(self.limit)),
        }
    }
}
