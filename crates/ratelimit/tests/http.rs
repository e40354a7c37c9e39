//! The middleware with axum: headers, 429 with Retry-After, spoofed X-Forwarded-For ignored,
//! preflight exemption, shared state across clones, and the Redis store behind it.
#![cfg(feature = "tower")]

#[cfg(feature = "redis")]
mod support;

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode};
#[cfg(feature = "redis")]
use stanchion_ratelimit::RedisStore;
use stanchion_ratelimit::{
    ClientIp, HeaderKey, Limits, LocalLimiter, MissingKey, PeerAddr, Quota, RateLimitLayer,
    RateLimiter,
};
use tower::ServiceExt;

fn limits() -> Limits {
    Limits::new()
        .with("burst", Quota::per_second(2).unwrap())
        .unwrap()
        .with(
            "daily",
            Quota::new(100, std::time::Duration::from_secs(86_400)).unwrap(),
        )
        .unwrap()
}

fn app(layer: RateLimitLayer<LocalLimiter<String>, Limits, ClientIp>) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer)
}

fn local_layer() -> RateLimitLayer<LocalLimiter<String>, Limits, ClientIp> {
    let limiter = RateLimiter::local(limits()).build().unwrap();
    RateLimitLayer::new(limiter, ClientIp::trusting(["10.0.0.0/8"]).unwrap())
}

fn request(peer: &str, xff: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().uri("/");
    if let Some(x) = xff {
        b = b.header("x-forwarded-for", x);
    }
    let mut req = b.body(Body::empty()).unwrap();
    req.extensions_mut()
        .insert(PeerAddr(peer.parse::<SocketAddr>().unwrap()));
    req
}

#[tokio::test]
async fn every_response_carries_the_draft_headers_and_denials_get_429_with_retry_after() {
    let app = app(local_layer().legacy_headers(true));
    let first = app
        .clone()
        .oneshot(request("203.0.113.1:1", None))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let h = first.headers();
    assert_eq!(
        h["ratelimit-policy"],
        "\"burst\";q=2;w=1, \"daily\";q=100;w=86400"
    );
    assert_eq!(h["ratelimit"], "\"burst\";r=1;t=1");
    assert_eq!(h["x-ratelimit-limit"], "2");
    assert_eq!(h["x-ratelimit-remaining"], "1");
    app.clone()
        .oneshot(request("203.0.113.1:1", None))
        .await
        .unwrap();
    let denied = app
        .clone()
        .oneshot(request("203.0.113.1:1", None))
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(denied.headers()["retry-after"], "1");
    assert_eq!(denied.headers()["ratelimit"], "\"burst\";r=0;t=1");
    // Another client is unaffected.
    let other = app.oneshot(request("203.0.113.2:1", None)).await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = app(local_layer());
    // An attacker rotating X-Forwarded-For values still shares one bucket: its own address.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let spoof = format!("198.51.100.{i}");
        let res = app
            .clone()
            .oneshot(request("203.0.113.66:1", Some(&spoof)))
            .await
            .unwrap();
        statuses.push(res.status());
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        2
    );
    // Through a trusted proxy, the forwarded address is the key.
    for i in 0..2 {
        let client = format!("198.51.100.{i}");
        let res = app
            .clone()
            .oneshot(request("10.0.0.5:1", Some(&client)))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "client {client}");
    }
}

#[tokio::test]
async fn clones_of_the_layer_share_one_limiter_and_preflight_is_exempt() {
    let layer = local_layer().exempt_cors_preflight(true);
    let a = app(layer.clone());
    let b = app(layer);
    assert_eq!(
        a.oneshot(request("203.0.113.5:1", None))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        b.clone()
            .oneshot(request("203.0.113.5:1", None))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        b.clone()
            .oneshot(request("203.0.113.5:1", None))
            .await
            .unwrap()
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let mut preflight = Request::builder()
        .method("OPTIONS")
        .uri("/")
        .header("access-control-request-method", "GET")
        .body(Body::empty())
        .unwrap();
    preflight
        .extensions_mut()
        .insert(PeerAddr("203.0.113.5:1".parse().unwrap()));
    let res = b.oneshot(preflight).await.unwrap();
    assert_ne!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

const SECRET: &[u8] = b"test secret, sixteen bytes or more";

#[tokio::test]
async fn a_request_without_a_key_is_rejected_or_allowed_as_configured() {
    let limiter = RateLimiter::local(limits()).build().unwrap();
    let reject = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(
            limiter.clone(),
            HeaderKey::new("x-api-key", SECRET).unwrap(),
        ));
    let no_key = || Request::builder().uri("/").body(Body::empty()).unwrap();
    assert_eq!(
        reject.oneshot(no_key()).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let allow = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(limiter, HeaderKey::new("x-api-key", SECRET).unwrap())
            .missing_key(MissingKey::Allow),
    );
    assert_eq!(
        allow.oneshot(no_key()).await.unwrap().status(),
        StatusCode::OK
    );
}

// Reads the peer address through axum's `ConnectInfo`: needs the `axum` feature.
#[cfg(all(feature = "redis", feature = "axum"))]
#[tokio::test]
async fn the_middleware_works_over_redis_behind_a_real_server() {
    let redis = stanchion_testkit::RedisServer::shared().unwrap();
    let store = RedisStore::new(
        support::manager(&redis.url()).await,
        &support::prefix("http"),
    );
    let limiter = RateLimiter::builder(store, limits()).build().unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(limiter, ClientIp::direct()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let mut codes = Vec::new();
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        codes.push(text.split_whitespace().nth(1).unwrap_or("").to_owned());
        assert!(
            text.to_ascii_lowercase().contains("ratelimit-policy:"),
            "{text}"
        );
    }
    assert_eq!(codes, ["200", "200", "429"]);
    server.abort();
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn api_keys_never_reach_redis_key_names_and_are_the_same_on_every_instance() {
    use redis::AsyncCommands;
    let redis = stanchion_testkit::RedisServer::shared().unwrap();
    let prefix = support::prefix("apikey");
    let api_key = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
    // One request through a new instance (its own connection, limiter and layer).
    let request_on_a_new_instance = || async {
        let store = RedisStore::new(support::manager(&redis.url()).await, &prefix);
        let limiter = RateLimiter::builder(store, limits()).build().unwrap();
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .layer(RateLimitLayer::new(
                limiter,
                HeaderKey::new("x-api-key", SECRET).unwrap(),
            ));
        let req = Request::builder()
            .uri("/")
            .header("x-api-key", api_key)
            .body(Body::empty())
            .unwrap();
        app.oneshot(req).await.unwrap().status()
    };
    // Two instances, one shared limit of 2: both requests counted against the same key.
    assert_eq!(request_on_a_new_instance().await, StatusCode::OK);
    assert_eq!(request_on_a_new_instance().await, StatusCode::OK);
    let mut conn = support::manager(&redis.url()).await;
    let names: Vec<String> = conn.keys(format!("{prefix}*")).await.unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(!names[0].contains(api_key), "{names:?}");
    assert!(!names[0].contains("sk_live"), "{names:?}");
    // A third request from yet another instance is the third against one quota.
    assert_eq!(
        request_on_a_new_instance().await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[test]
fn a_short_secret_is_refused_and_debug_shows_no_secret() {
    assert_eq!(
        HeaderKey::new("x-api-key", b"short").unwrap_err().field(),
        "key secret"
    );
    let key = HeaderKey::new("x-api-key", SECRET).unwrap();
    assert!(!format!("{key:?}").contains("sixteen"));
}

#[tokio::test]
async fn setters_on_a_cloned_layer_take_effect_on_that_clone() {
    let limiter = RateLimiter::builder(
        LocalLimiter::<String>::new(Limits::single(Quota::per_second(1).unwrap())).unwrap(),
        limits(),
    )
    .build()
    .unwrap();
    let base = RateLimitLayer::new(limiter, ClientIp::direct());
    let _kept_alive = base.clone();
    // Before, a setter on a layer whose configuration was shared with a clone did nothing.
    let legacy = base.clone().legacy_headers(true);
    let request = || {
        let mut req = Request::builder().uri("/").body(Body::empty()).unwrap();
        req.extensions_mut()
            .insert(PeerAddr("198.51.100.7:1".parse().unwrap()));
        req
    };
    let with_legacy = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(legacy);
    let res = with_legacy.oneshot(request()).await.unwrap();
    assert!(res.headers().contains_key("x-ratelimit-limit"), "{res:?}");
    let plain = Router::new().route("/", get(|| async { "ok" })).layer(base);
    let res = plain.oneshot(request()).await.unwrap();
    assert!(!res.headers().contains_key("x-ratelimit-limit"), "{res:?}");
    // The service hands its inner service out.
    let svc = tower::Layer::layer(
        &RateLimitLayer::new(
            RateLimiter::builder(
                LocalLimiter::<String>::new(Limits::single(Quota::per_second(1).unwrap())).unwrap(),
                limits(),
            )
            .build()
            .unwrap(),
            ClientIp::direct(),
        ),
        tower::service_fn(|_: Request<Body>| async {
            Ok::<_, std::convert::Infallible>(axum::response::Response::new(Body::empty()))
        }),
    );
    let _: &tower::util::ServiceFn<_> = svc.get_ref();
    let _inner = svc.into_inner();
}
