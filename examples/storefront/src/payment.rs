//! The simulated payment provider: a dependency with latency, declines and outages, charged
//! through the breaker crate's pipeline (breaker, retry, per-attempt timeout).
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use stanchion_breaker::{
    AttemptError, CallError, CircuitBreaker, CountWindow, OpenWait, Outcome, Pipeline, Retry,
    RetryDecision, Timeout,
};

/// How the simulated provider behaves.
#[derive(Debug, Clone, Copy)]
pub struct PaymentConfig {
    /// Share of charges declined (a business answer: not retried, not a breaker failure).
    pub decline_rate: f64,
    /// Share of attempts that fail as if the provider had a 503 (retried, counted by the breaker).
    pub error_rate: f64,
    /// Latency of every attempt.
    pub latency: Duration,
}

impl Default for PaymentConfig {
    fn default() -> Self {
        Self {
            decline_rate: 0.1,
            error_rate: 0.05,
            latency: Duration::from_millis(3),
        }
    }
}

/// What the provider answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PaymentError {
    /// The card was declined.
    #[error("payment declined")]
    Declined,
    /// The provider failed (a 5xx or a refused connection).
    #[error("payment provider unavailable")]
    Unavailable,
}

/// The provider, shared by every instance (it is one external service). Charges are
/// idempotent by key: a retried charge returns the first answer and moves money once.
#[derive(Debug)]
pub struct PaymentProvider {
    config: Mutex<PaymentConfig>,
    down: AtomicBool,
    charges: Mutex<HashMap<String, Result<String, PaymentError>>>,
    /// Money moved (successful first charges).
    pub charged: AtomicU64,
    /// Attempts received.
    pub attempts: AtomicU64,
}

impl PaymentProvider {
    /// A provider behaving as `config` says.
    pub fn new(config: PaymentConfig) -> Self {
        Self {
            config: Mutex::new(config),
            down: AtomicBool::new(false),
            charges: Mutex::new(HashMap::new()),
            charged: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
        }
    }

    /// Takes the provider down (every attempt fails) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Changes the provider's behaviour.
    pub fn set_config(&self, config: PaymentConfig) {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// Charges `amount_cents` once per `idempotency_key`.
    pub async fn charge(
        &self,
        idempotency_key: &str,
        amount_cents: i64,
    ) -> Result<String, PaymentError> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let config = *self.config.lock().unwrap_or_else(|p| p.into_inner());
        tokio::time::sleep(config.latency).await;
        if self.down.load(Ordering::Relaxed) || fastrand::f64() < config.error_rate {
            return Err(PaymentError::Unavailable);
        }
        let mut charges = self.charges.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(answer) = charges.get(idempotency_key) {
            return answer.clone();
        }
        let answer = if fastrand::f64() < config.decline_rate || amount_cents <= 0 {
            Err(PaymentError::Declined)
        } else {
            self.charged.fetch_add(1, Ordering::Relaxed);
            Ok(format!("rcpt-{}", charges.len() + 1))
        };
        charges.insert(idempotency_key.to_owned(), answer.clone());
        answer
    }
}

/// The pipeline one instance calls the provider through: a count-window breaker (50 % of 20
/// calls, at least 5), three attempts with backoff, 200 ms per attempt.
pub fn pipeline(name: &str) -> Result<Pipeline, crate::Error> {
    let policy = CountWindow::builder(20)
        .failure_rate(50.0)
        .minimum_calls(5)
        .build()
        .map_err(|e| crate::Error::Config(e.to_string()))?;
    let breaker = CircuitBreaker::builder()
        .name(format!("payments@{name}"))
        .policy(policy)
        .open_wait(OpenWait::exponential(
            Duration::from_millis(500),
            2.0,
            Duration::from_secs(10),
        ))
        .half_open_calls(2)
        .build()
        .map_err(|e| crate::Error::Config(e.to_string()))?;
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(Duration::from_millis(5), Duration::from_millis(50))
        .build()
        .map_err(|e| crate::Error::Config(e.to_string()))?;
    let timeout = Timeout::new(Duration::from_millis(200))
        .map_err(|e| crate::Error::Config(e.to_string()))?;
    Ok(Pipeline::new()
        .breaker(breaker)
        .retry(retry)
        .timeout(timeout))
}

/// Charges through `pipeline`: declines stop at once and count as breaker successes (the
/// provider answered); outages and timeouts are retried and count as failures.
pub async fn charge(
    pipeline: &Pipeline,
    provider: &PaymentProvider,
    key: &str,
    amount_cents: i64,
) -> Result<String, CallError<PaymentError>> {
    let retryable = |e: &AttemptError<PaymentError>| match e {
        AttemptError::Inner(PaymentError::Declined) => RetryDecision::Stop,
        _ => RetryDecision::Retry,
    };
    let classify = |r: &Result<String, AttemptError<PaymentError>>| match r {
        Ok(_) | Err(AttemptError::Inner(PaymentError::Declined)) => Outcome::Success,
        Err(_) => Outcome::Failure,
    };
    pipeline
        .call_with(&retryable, &classify, || provider.charge(key, amount_cents))
        .await
}
