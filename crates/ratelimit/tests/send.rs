//! Every public future is `Send` when its inputs are (`tokio::spawn` on the multi-threaded
//! runtime and axum handlers need it): compile-time checks on the futures the public methods
//! return, plus runs on a multi-threaded runtime.

use std::future::Future;

use stanchion_ratelimit::{Limits, LocalLimiter, Quota, RateLimitStore, RateLimiter};

fn assert_send<F: Future + Send>(f: F) -> F {
    f
}

fn assert_send_sync<T: Send + Sync>() {}

fn local() -> RateLimiter<LocalLimiter<String>> {
    RateLimiter::local(Limits::single(Quota::per_second(10).unwrap()))
        .build()
        .unwrap()
}

#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<RateLimiter<LocalLimiter<String>>>();
    assert_send_sync::<LocalLimiter<String>>();
    assert_send_sync::<stanchion_ratelimit::ConcurrencyLimiter>();
    assert_send_sync::<stanchion_ratelimit::Decision>();
    assert_send_sync::<stanchion_ratelimit::StoreError>();
    assert_send_sync::<stanchion_ratelimit::BuildError>();
    assert_send_sync::<stanchion_ratelimit::QuotaError>();
    #[cfg(feature = "redis")]
    {
        assert_send_sync::<stanchion_ratelimit::RedisStore<redis::aio::ConnectionManager>>();
        assert_send_sync::<stanchion_ratelimit::RedisStore<redis::cluster_async::ClusterConnection>>(
        );
        assert_send_sync::<
            stanchion_ratelimit::RedisConcurrencyLimiter<redis::aio::ConnectionManager>,
        >();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_and_store_futures_are_send() {
    let limiter = std::sync::Arc::new(local());
    let l = std::sync::Arc::clone(&limiter);
    let d = tokio::spawn(async move { assert_send(l.check("k", 1)).await })
        .await
        .unwrap()
        .unwrap();
    assert!(d.is_allowed());
    let store = LocalLimiter::<String>::new(Limits::new()).unwrap();
    let limits = Limits::single(Quota::per_second(1).unwrap());
    assert!(
        assert_send(RateLimitStore::check(&store, "k", &limits, 1))
            .await
            .unwrap()
            .is_allowed()
    );
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_futures_are_send() {
    let server = stanchion_testkit::RedisServer::shared().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let store = stanchion_ratelimit::RedisStore::new(conn.clone(), "send-test:");
    let limits = Limits::single(Quota::per_second(10).unwrap());
    let task = tokio::spawn(async move {
        let d = assert_send(store.check("k", &limits, 1)).await.unwrap();
        assert_send(store.probe()).await.unwrap();
        d
    });
    assert!(task.await.unwrap().is_allowed());
    let conc = stanchion_ratelimit::RedisConcurrencyLimiter::new(
        conn,
        "send-test-c:",
        2,
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    let lease = tokio::spawn(async move {
        let lease = assert_send(conc.acquire("k")).await.unwrap();
        assert!(assert_send(lease.renew()).await.unwrap());
        assert_send(lease.release()).await
    });
    lease.await.unwrap().unwrap();
}

/// The layer's response future is `Send` (axum requires it) and, with an in-process store,
/// decided without waiting: no boxed future per request.
#[cfg(feature = "tower")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_future_is_send_and_unboxed_for_an_in_process_store() {
    use std::net::SocketAddr;
    use tower::{Layer, Service, ServiceExt};

    let layer =
        stanchion_ratelimit::RateLimitLayer::new(local(), stanchion_ratelimit::ClientIp::direct());
    let inner = tower::service_fn(|_req: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
    });
    let mut svc = layer.layer(inner);
    let mut req = http::Request::new(());
    req.extensions_mut().insert(stanchion_ratelimit::PeerAddr(
        "192.0.2.7:4000".parse::<SocketAddr>().unwrap(),
    ));
    let fut = svc.ready().await.unwrap().call(req);
    let state = format!("{fut:?}");
    assert!(state.contains("inner"), "{state}");
    let res = tokio::spawn(assert_send(fut)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("ratelimit"));
}

/// With Redis behind it, the layer waits for the limiter (the one boxed future per request),
/// and still answers.
#[cfg(all(feature = "tower", feature = "redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_future_waits_for_a_redis_store() {
    use std::net::SocketAddr;
    use tower::{Layer, Service, ServiceExt};

    let server = stanchion_testkit::RedisServer::shared().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let limiter = RateLimiter::builder(
        stanchion_ratelimit::RedisStore::new(conn, "send-test-layer:"),
        Limits::single(Quota::per_second(10).unwrap()),
    )
    .build()
    .unwrap();
    let layer =
        stanchion_ratelimit::RateLimitLayer::new(limiter, stanchion_ratelimit::ClientIp::direct());
    let inner = tower::service_fn(|_req: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
    });
    let mut svc = layer.layer(inner);
    let mut req = http::Request::new(());
    req.extensions_mut().insert(stanchion_ratelimit::PeerAddr(
        "192.0.2.8:4000".parse::<SocketAddr>().unwrap(),
    ));
    let fut = svc.ready().await.unwrap().call(req);
    assert!(format!("{fut:?}").contains("waiting"));
    let res = tokio::spawn(assert_send(fut)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
}
