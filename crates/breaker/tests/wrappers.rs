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
    use stanchion_breaker::{BulkheadFull, BulkheadLayer, CircuitBreakerLayer, Rejected};
    use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};

    fn rejected(err: &BoxError) -> bool {
        err.downcast_ref::<Rejected>().is_some()
    }

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
        let first = a.ready().await.unwrap().call(true).await.unwrap_err();
        assert_eq!(first.to_string(), "503", "the inner error, boxed as is");
        assert!(b.ready().await.unwrap().call(true).await.is_err());
        assert_eq!(breaker.state(), State::Open);
        let err = a.ready().await.unwrap().call(false).await.unwrap_err();
        assert!(rejected(&err), "{err}");
        assert_eq!(err.downcast_ref::<Rejected>().unwrap().state, State::Open);
    }

    #[tokio::test]
    async fn the_breaker_layer_classifies_responses() {
        let breaker = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(1).unwrap())
            .build()
            .unwrap();
        let layer = CircuitBreakerLayer::new(breaker.clone()).classifier(
            |r: &Result<u16, std::io::Error>| match r {
                Ok(s) if *s >= 500 => Outcome::Failure,
                Ok(429) => Outcome::Ignored,
                _ => Outcome::Success,
            },
        );
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(
                |s: u16| async move { Ok::<_, std::io::Error>(s) },
            ));
        for status in [200, 404, 429, 429] {
            svc.ready().await.unwrap().call(status).await.unwrap();
        }
        assert_eq!(breaker.state(), State::Closed);
        svc.ready().await.unwrap().call(503).await.unwrap();
        assert_eq!(breaker.state(), State::Open);
    }

    #[tokio::test]
    async fn services_expose_their_inner_service() {
        let breaker = CircuitBreaker::builder().build().unwrap();
        let bulkhead = Bulkhead::builder().build().unwrap();
        let inner = service_fn(|x: u8| async move { Ok::<_, std::io::Error>(x) });
        let mut svc = ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(breaker))
            .layer(BulkheadLayer::new(&bulkhead))
            .service(inner);
        let _: &stanchion_breaker::BulkheadService<_> = svc.get_ref();
        let _ = svc.get_mut().get_mut();
        assert_eq!(svc.breaker().state(), State::Closed);
        let mut bare = svc.into_inner().into_inner();
        assert_eq!(bare.ready().await.unwrap().call(9).await.unwrap(), 9);
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
                    Ok::<_, std::io::Error>(())
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
        assert_eq!(
            err.downcast_ref::<BulkheadFull>()
                .map(BulkheadFull::max_concurrent),
            Some(1)
        );
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        second.ready().await.unwrap().call(()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_bulkhead_layer_waits_at_most_its_max_wait_in_poll_ready() {
        let bulkhead = Bulkhead::builder()
            .max_concurrent(1)
            .max_wait(Duration::from_millis(50))
            .build()
            .unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(BulkheadLayer::new(&bulkhead))
            .service(service_fn(
                |x: u32| async move { Ok::<_, std::io::Error>(x) },
            ));

        // A slot freed within the wait: the request waits for it and is served.
        let held = bulkhead.try_acquire().unwrap();
        let freer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(held);
        });
        let start = tokio::time::Instant::now();
        assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(20) && waited < Duration::from_millis(50),
            "{waited:?}"
        );
        freer.await.unwrap();

        // No slot within the wait: ready after exactly the wait, then refused.
        let _held = bulkhead.try_acquire().unwrap();
        let start = tokio::time::Instant::now();
        let err = svc.ready().await.unwrap().call(2).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        assert!(err.downcast_ref::<BulkheadFull>().is_some(), "{err}");
    }

    /// Retries any error up to `left` more times; requests are cloneable numbers.
    #[derive(Clone)]
    struct RetryErrors {
        left: usize,
    }

    impl<Res> tower::retry::Policy<u32, Res, BoxError> for RetryErrors {
        type Future = std::future::Ready<()>;
        fn retry(
            &mut self,
            _req: &mut u32,
            result: &mut Result<Res, BoxError>,
        ) -> Option<Self::Future> {
            if result.is_err() && self.left > 0 {
                self.left -= 1;
                Some(std::future::ready(()))
            } else {
                None
            }
        }
        fn clone_request(&mut self, req: &u32) -> Option<u32> {
            Some(*req)
        }
    }

    /// A dependency whose answer to `n` takes `n` ms and fails when `n` is odd.
    fn slow_dependency(
        calls: Arc<AtomicU32>,
    ) -> impl Service<u32, Response = u32, Error = std::io::Error, Future: Send> + Clone {
        service_fn(move |n: u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(u64::from(n))).await;
                if n % 2 == 1 {
                    Err(std::io::Error::other("odd"))
                } else {
                    Ok(n)
                }
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_stack_of_four_with_tower_layers_inside() {
        // retry( breaker( timeout( bulkhead( dependency ) ) ) )
        let breaker = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(3).unwrap())
            .build()
            .unwrap();
        let bulkhead = Bulkhead::builder().max_concurrent(4).build().unwrap();
        let calls = counter();
        let mut svc = ServiceBuilder::new()
            .layer(tower::retry::RetryLayer::new(RetryErrors { left: 1 }))
            .layer(CircuitBreakerLayer::new(breaker.clone()))
            .timeout(Duration::from_millis(100))
            .layer(BulkheadLayer::new(&bulkhead))
            .service(slow_dependency(calls.clone()));
        assert_eq!(svc.ready().await.unwrap().call(10).await.unwrap(), 10);
        // A timeout inside the breaker is a boxed tower error, counted as a failure.
        let err = svc.ready().await.unwrap().call(400).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "one call, then two tries");
        assert_eq!(breaker.state(), State::Closed);
        // A third failure opens the breaker; the retry then meets the rejection.
        let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
        assert!(rejected(&err), "{err}");
        assert_eq!(breaker.state(), State::Open);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "the retry was refused, not sent"
        );
        assert_eq!(bulkhead.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stack_of_four_with_tower_layers_outside() {
        // load_shed( timeout( bulkhead( breaker( dependency ) ) ) )
        let breaker = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(1).unwrap())
            .build()
            .unwrap();
        let bulkhead = Bulkhead::builder().max_concurrent(1).build().unwrap();
        let calls = counter();
        let svc = ServiceBuilder::new()
            .load_shed()
            .timeout(Duration::from_millis(100))
            .layer(BulkheadLayer::new(&bulkhead))
            .layer(CircuitBreakerLayer::new(breaker.clone()))
            .service(slow_dependency(calls.clone()));
        let mut a = svc.clone();
        let mut b = svc;
        // A slow call holds the only slot; a second one is refused by the bulkhead.
        let slow = tokio::spawn(async move { a.ready().await.unwrap().call(80).await });
        while bulkhead.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let err = b.ready().await.unwrap().call(2).await.unwrap_err();
        assert!(err.is::<BulkheadFull>(), "{err}");
        assert_eq!(slow.await.unwrap().unwrap(), 80);
        // The timeout outside the breaker: the breaker's permit is dropped with the future, so
        // nothing is recorded and the breaker stays closed.
        let err = b.ready().await.unwrap().call(200).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
        assert_eq!(breaker.state(), State::Closed);
        let err = b.ready().await.unwrap().call(1).await.unwrap_err();
        assert_eq!(err.to_string(), "odd");
        assert_eq!(breaker.state(), State::Open);
        let err = b.ready().await.unwrap().call(2).await.unwrap_err();
        assert!(rejected(&err), "{err}");
        assert_eq!(bulkhead.in_flight(), 0);
    }
}
