//! Every public future is `Send` when its inputs are: `tokio::spawn` on the multi-threaded
//! runtime and axum handlers accept them. These are compile-time checks on the futures the
//! public methods return (not only on the types), plus runs on a multi-threaded runtime.

use std::future::Future;
use std::time::Duration;

use stanchion_breaker::{
    Bulkhead, CircuitBreaker, ConsecutiveFailures, CountWindow, Outcome, Pipeline, Retry,
    RetryDecision, TimeWindow, Timeout,
};

fn assert_send<F: Future + Send>(f: F) -> F {
    f
}

fn assert_send_sync<T: Send + Sync>() {}

async fn ok() -> Result<u32, std::io::Error> {
    Ok(1)
}

fn pipeline() -> Pipeline<CountWindow> {
    Pipeline::new()
        .bulkhead(Bulkhead::builder().max_concurrent(8).build().unwrap())
        .breaker(CircuitBreaker::builder().build().unwrap())
        .retry(Retry::builder().max_attempts(2).build().unwrap())
        .timeout(Timeout::new(Duration::from_secs(1)).unwrap())
}

#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<Pipeline>();
    assert_send_sync::<CircuitBreaker>();
    assert_send_sync::<CircuitBreaker<TimeWindow>>();
    assert_send_sync::<Retry>();
    assert_send_sync::<Timeout>();
    assert_send_sync::<Bulkhead>();
    assert_send_sync::<stanchion_breaker::BreakerError<std::io::Error>>();
    assert_send_sync::<stanchion_breaker::CallError<std::io::Error>>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_future_is_send_and_spawns_on_the_multi_threaded_runtime() {
    let p = pipeline();
    let breaker = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(3).unwrap())
        .build()
        .unwrap();
    let retry = Retry::builder().max_attempts(2).build().unwrap();
    let timeout = Timeout::new(Duration::from_secs(1)).unwrap();
    let bulkhead = Bulkhead::builder().max_concurrent(4).build().unwrap();

    let classify = |r: &Result<u32, _>| match r {
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    };
    let retry_all = |_: &std::io::Error| RetryDecision::Retry;

    let handles = vec![
        tokio::spawn({
            let p = p.clone();
            async move { assert_send(p.call(ok)).await.map_err(|e| e.to_string()) }
        }),
        tokio::spawn({
            let p = p.clone();
            async move {
                let classify = |r: &Result<u32, _>| match r {
                    Ok(_) => Outcome::Success,
                    Err(_) => Outcome::Failure,
                };
                let retry_all = |_: &_| RetryDecision::Retry;
                assert_send(p.call_with(&retry_all, &classify, ok))
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
        tokio::spawn({
            let b = breaker.clone();
            async move { assert_send(b.call(ok())).await.map_err(|e| e.to_string()) }
        }),
        tokio::spawn({
            let b = breaker.clone();
            async move {
                assert_send(b.call_with(&classify, ok()))
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
        tokio::spawn({
            let r = retry.clone();
            async move { assert_send(r.call(ok)).await.map_err(|e| e.to_string()) }
        }),
        tokio::spawn({
            let r = retry.clone();
            async move {
                assert_send(r.call_with(&retry_all, ok))
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
        tokio::spawn(async move {
            assert_send(timeout.call(ok()))
                .await
                .map_err(|e| e.to_string())
        }),
        tokio::spawn({
            let b = bulkhead.clone();
            async move { assert_send(b.call(ok())).await.map_err(|e| e.to_string()) }
        }),
    ];
    for h in handles {
        assert_eq!(h.await.unwrap(), Ok(1));
    }
    assert!(assert_send(bulkhead.acquire()).await.is_some());
}

mod axum_handler {
    use axum::Router;
    use axum::body::Body;
    use axum::extract::State;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    async fn search(State(p): State<Pipeline<CountWindow>>) -> (StatusCode, String) {
        match p
            .call(|| async {
                tokio::task::yield_now().await;
                Ok::<_, std::io::Error>("tea")
            })
            .await
        {
            Ok(hit) => (StatusCode::OK, hit.to_owned()),
            Err(e) if e.is_rejected() => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_axum_handler_calls_through_a_pipeline() {
        let app = Router::new()
            .route("/search", get(search))
            .with_state(pipeline());
        let mut served = Vec::new();
        for _ in 0..4 {
            let app = app.clone();
            served.push(tokio::spawn(async move {
                app.oneshot(Request::get("/search").body(Body::empty()).unwrap())
                    .await
                    .unwrap()
                    .status()
            }));
        }
        for s in served {
            assert_eq!(s.await.unwrap(), StatusCode::OK);
        }
    }
}

#[cfg(feature = "tower")]
mod tower_services {
    use axum::Router;
    use axum::body::Body;
    use axum::error_handling::HandleErrorLayer;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use stanchion_breaker::{BulkheadLayer, CircuitBreakerLayer, Rejected};
    use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};

    use super::*;

    fn assert_service_send_sync<S: Send + Sync + Clone + 'static>(_: &S) {}

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tower_service_futures_are_send() {
        let breaker = CircuitBreaker::builder().build().unwrap();
        let bulkhead = Bulkhead::builder()
            .max_concurrent(2)
            .max_wait(Duration::from_millis(10))
            .build()
            .unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(breaker))
            .layer(BulkheadLayer::new(&bulkhead))
            .service(service_fn(
                |x: u32| async move { Ok::<_, std::io::Error>(x) },
            ));
        assert_service_send_sync(&svc);
        let fut = assert_send(svc.ready().await.unwrap().call(4));
        let spawned = tokio::spawn(fut);
        assert_eq!(spawned.await.unwrap().unwrap(), 4);
        // Readiness itself, with the bounded wait in progress, is Send too.
        let held = bulkhead.try_acquire().unwrap();
        let held2 = bulkhead.try_acquire().unwrap();
        let mut clone = svc.clone();
        let ready = tokio::spawn(async move {
            let r = assert_send(clone.ready()).await.map(|_| ());
            r.is_ok()
        });
        assert!(ready.await.unwrap());
        drop((held, held2));
    }

    async fn answer_errors(err: BoxError) -> (StatusCode, String) {
        if err.is::<Rejected>() {
            (StatusCode::SERVICE_UNAVAILABLE, err.to_string())
        } else {
            (StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_axum_route_behind_the_breaker_layer() {
        let breaker = CircuitBreaker::builder()
            .policy(ConsecutiveFailures::new(1).unwrap())
            .build()
            .unwrap();
        let app = Router::new().route("/", get(|| async { "fine" })).layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(answer_errors))
                .layer(CircuitBreakerLayer::new(breaker.clone())),
        );
        let get = |app: Router| async move {
            app.oneshot(Request::get("/").body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        };
        assert_eq!(
            tokio::spawn(get(app.clone())).await.unwrap(),
            StatusCode::OK
        );
        breaker.force_open();
        assert_eq!(
            tokio::spawn(get(app)).await.unwrap(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
