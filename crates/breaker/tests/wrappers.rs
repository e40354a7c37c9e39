//! Retry, timeout, bulkhead, the pipeline order, and the tower layers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stanchion_breaker::{
    AttemptError, Bulkhead, CallError, CircuitBreaker, ConsecutiveFailures, Jitter, OpenWait,
    Outcome, Pipeline, Retry, RetryBudget, RetryDecision, RetryError, State, Timeout,
};

fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

#[tokio::test(start_paused = true)]
async fn retry_stops_at_max_attempts_with_the_last_error() {
    let retry = Retry::builder().max_attempts(4).build().unwrap();
    let tries = counter();
    let err = retry
        .call(|| {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move { Err::<(), _>(n) }
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RetryError::Exhausted {
                attempts: 4,
                last: 3
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_does_not_retry_permanent_errors() {
    let retry = Retry::builder().max_attempts(5).build().unwrap();
    let tries = counter();
    let permanent = |e: &&str| {
        if *e == "404" {
            RetryDecision::Stop
        } else {
            RetryDecision::Retry
        }
    };
    let err = retry
        .call_with(&permanent, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("404") }
        })
        .await
        .unwrap_err();
    assert!(matches!(err, RetryError::NotRetryable("404")));
    assert_eq!(tries.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_honours_the_servers_retry_after_hint() {
    let retry = Retry::builder()
        .max_attempts(2)
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .build()
        .unwrap();
    let hint = |_: &&str| RetryDecision::RetryAfter(Duration::from_secs(7));
    let start = tokio::time::Instant::now();
    let tries = counter();
    let _ = retry
        .call_with(&hint, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("503") }
        })
        .await;
    assert_eq!(tries.load(Ordering::SeqCst), 2);
    assert!(start.elapsed() >= Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn retry_gives_up_before_exceeding_max_elapsed() {
    let retry = Retry::builder()
        .max_attempts(100)
        .backoff(Duration::from_secs(1), Duration::from_secs(1))
        .jitter(Jitter::None)
        .max_elapsed(Duration::from_millis(3500))
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let err = retry.call(|| async { Err::<(), _>(()) }).await.unwrap_err();
    // Attempts at 0 s, 1 s, 2 s, 3 s; a fifth would start at 4 s > 3.5 s.
    assert!(
        matches!(err, RetryError::Exhausted { attempts: 4, .. }),
        "{err:?}"
    );
    assert!(start.elapsed() <= Duration::from_millis(3500));
}

#[tokio::test(start_paused = true)]
async fn a_retry_budget_stops_retries_from_multiplying_an_outage() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 10.0).unwrap();
    let retry = Retry::builder()
        .max_attempts(5)
        .budget(budget)
        .build()
        .unwrap();
    let attempts = counter();
    for _ in 0..100 {
        let _ = retry
            .call(|| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(()) }
            })
            .await;
    }
    // Without a budget: 500 attempts. With 10 %: 100 first attempts and about 10 retries.
    let total = attempts.load(Ordering::SeqCst);
    assert!((100..=111).contains(&total), "{total} attempts");
}

#[tokio::test(start_paused = true)]
async fn timeout_drops_slow_calls_and_passes_errors_through() {
    let t = Timeout::new(Duration::from_millis(100)).unwrap();
    let slow = t.call(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<(), ()>(())
    });
    assert!(slow.await.unwrap_err().is_timeout());
    let failed = t.call(async { Err::<(), _>("x") }).await.unwrap_err();
    assert!(!failed.is_timeout());
    assert_eq!(Timeout::new(Duration::ZERO).unwrap_err().field(), "timeout");
}

#[tokio::test(start_paused = true)]
async fn bulkhead_bounds_concurrency_and_waits_a_bounded_time() {
    let bulkhead = Bulkhead::builder()
        .max_concurrent(2)
        .max_wait(Duration::from_millis(50))
        .build()
        .unwrap();
    let a = bulkhead.try_acquire().unwrap();
    let _b = bulkhead.try_acquire().unwrap();
    assert_eq!(bulkhead.in_flight(), 2);
    let start = tokio::time::Instant::now();
    let refused = bulkhead.call(async { Ok::<_, ()>(()) }).await.unwrap_err();
    assert!(refused.is_rejected());
    assert!(start.elapsed() >= Duration::from_millis(50));
    // A slot freed during the wait is taken.
    let waiter = {
        let bulkhead = bulkhead.clone();
        tokio::spawn(async move { bulkhead.call(async { Ok::<_, ()>(1) }).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(a);
    assert_eq!(waiter.await.unwrap().unwrap(), 1);
    assert_eq!(
        Bulkhead::builder()
            .max_concurrent(0)
            .build()
            .unwrap_err()
            .field(),
        "max_concurrent"
    );
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_counts_one_breaker_outcome_per_call_and_spends_no_retry_when_open() {
    let breaker = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(2).unwrap())
        .open_wait(OpenWait::Fixed(Duration::from_secs(60)))
        .build()
        .unwrap();
    let pipeline = Pipeline::new()
        .breaker(breaker.clone())
        .retry(Retry::builder().max_attempts(3).build().unwrap())
        .timeout(Timeout::new(Duration::from_millis(100)).unwrap());
    let attempts = counter();
    let hang = || {
        attempts.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<(), ()>(())
        }
    };
    let err = pipeline.call(hang).await.unwrap_err();
    assert!(
        matches!(err, CallError::Timeout { attempts: 3, .. }),
        "{err:?}"
    );
    assert_eq!(
        breaker.state(),
        State::Closed,
        "three timed-out attempts are one failure"
    );
    let _ = pipeline.call(hang).await;
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(attempts.load(Ordering::SeqCst), 6);
    let err = pipeline.call(hang).await.unwrap_err();
    assert!(matches!(err, CallError::Open { .. }));
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        6,
        "an open breaker spends no attempt"
    );
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_uses_its_classifiers() {
    let breaker = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .build()
        .unwrap();
    let pipeline = Pipeline::new()
        .bulkhead(Bulkhead::builder().max_concurrent(1).build().unwrap())
        .breaker(breaker.clone())
        .retry(Retry::builder().max_attempts(3).build().unwrap());
    let never = |_: &AttemptError<u16>| RetryDecision::Stop;
    let client_errors_ok = |r: &Result<(), AttemptError<u16>>| match r {
        Err(AttemptError::Inner(s)) if *s < 500 => Outcome::Success,
        Err(_) => Outcome::Failure,
        Ok(_) => Outcome::Success,
    };
    let err = pipeline
        .call_with(&never, &client_errors_ok, || async { Err::<(), _>(404u16) })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Failed {
                error: 404,
                attempts: 1
            }
        ),
        "{err:?}"
    );
    assert_eq!(breaker.state(), State::Closed);
    let _ = pipeline
        .call_with(&never, &client_errors_ok, || async { Err::<(), _>(503u16) })
        .await;
    assert_eq!(breaker.state(), State::Open);
}

#[cfg(feature = "tower")]
mod tower_layers {
    use super::*;
    use stanchion_breaker::{BulkheadLayer, CircuitBreakerLayer};
    use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

    #[tokio::test]
    async fn clones_of_a_breaker_layer_share_one_breaker() {
        let breaker = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(2).unwrap())
            .build()
            .unwrap();
        let layer = CircuitBreakerLayer::new(breaker.clone());
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|fail: bool| async move {
                if fail { Err("503") } else { Ok("200") }
            }));
        let mut a = svc.clone();
        let mut b = svc;
        assert!(a.ready().await.unwrap().call(true).await.is_err());
        assert!(b.ready().await.unwrap().call(true).await.is_err());
        assert_eq!(breaker.state(), State::Open);
        let err = a.ready().await.unwrap().call(false).await.unwrap_err();
        assert!(err.is_rejected());
    }

    #[tokio::test]
    async fn the_breaker_layer_classifies_responses() {
        let breaker = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(1).unwrap())
            .build()
            .unwrap();
        let layer =
            CircuitBreakerLayer::new(breaker.clone()).classifier(|r: &Result<u16, ()>| match r {
                Ok(s) if *s >= 500 => Outcome::Failure,
                Ok(429) => Outcome::Ignored,
                _ => Outcome::Success,
            });
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|s: u16| async move { Ok::<_, ()>(s) }));
        for status in [200, 404, 429, 429] {
            svc.ready().await.unwrap().call(status).await.unwrap();
        }
        assert_eq!(breaker.state(), State::Closed);
        svc.ready().await.unwrap().call(503).await.unwrap();
        assert_eq!(breaker.state(), State::Open);
    }

    #[tokio::test]
    async fn the_bulkhead_layer_refuses_when_full_and_clones_share_slots() {
        let bulkhead = Bulkhead::builder().max_concurrent(1).build().unwrap();
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let wait = Arc::new(tokio::sync::Mutex::new(Some(wait)));
        let svc = ServiceBuilder::new()
            .layer(BulkheadLayer::new(&bulkhead))
            .service(service_fn(move |_: ()| {
                let wait = wait.clone();
                async move {
                    if let Some(w) = wait.lock().await.take() {
                        let _ = w.await;
                    }
                    Ok::<_, ()>(())
                }
            }));
        let mut first = svc.clone();
        let mut second = svc;
        let held = tokio::spawn(async move { first.ready().await.unwrap().call(()).await });
        tokio::task::yield_now().await;
        while bulkhead.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let err = second.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(err.is_rejected());
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        second.ready().await.unwrap().call(()).await.unwrap();
    }
}
