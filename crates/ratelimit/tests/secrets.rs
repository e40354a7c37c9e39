//! The Redis password never reaches what the limiter shows: its tracing events (every level),
//! the errors it returns, its `Debug` output, its key names. Redis requires a password here,
//! answers, then dies for good.
//!
//! Its own binary: it installs a global tracing subscriber.

mod support;

use std::fmt::Write as _;
use std::time::Duration;

use redis::AsyncCommands;
use stanchion_ratelimit::{
    FailureMode, Limits, Quota, RateLimitStore, RateLimiter, RedisConcurrencyLimiter, RedisStore,
    Source,
};
use stanchion_testkit::RedisServer;

const PASSWORD: &str = "limit-pw-93b0c2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_reaches_logs_errors_debug_output_or_keys() {
    let events = stanchion_testkit::events::capture();
    let mut server = RedisServer::builder().password(PASSWORD).start().unwrap();
    let url = server.url();
    assert!(url.contains(PASSWORD));
    let p = support::prefix("secrets");
    let limits = Limits::single(Quota::per_second(5).unwrap());
    let store = RedisStore::new(support::manager(&url).await, &p);
    let limiter = RateLimiter::builder(store.clone(), limits.clone())
        .timeout(Duration::from_millis(200))
        .failure_mode(FailureMode::Open)
        .build()
        .unwrap();
    let leases =
        RedisConcurrencyLimiter::new(support::manager(&url).await, &p, 2, Duration::from_secs(5))
            .unwrap();
    for i in 0..20 {
        let d = limiter
            .check(&format!("client-{}", i % 3), 1)
            .await
            .unwrap();
        assert_ne!(d.source, Source::Fallback);
    }
    let held = leases.acquire("tenant").await.unwrap();
    let mut conn = support::manager(&url).await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert!(keys.len() >= 4, "{keys:?}");
    held.release().await.unwrap();

    // Redis dies and does not come back.
    tokio::task::block_in_place(|| server.kill().unwrap());
    let mut errors = Vec::new();
    let mut fallbacks = 0;
    for i in 0..30 {
        // Keys no denial was remembered for: each check asks the store.
        let d = limiter.check(&format!("new-client-{i}"), 1).await.unwrap();
        fallbacks += usize::from(d.source == Source::Fallback);
        if let Err(e) = store.check("direct", &limits, 1).await {
            errors.push(e.to_string());
            errors.push(format!("{e:?}"));
        }
        if let Err(e) = leases.acquire("tenant").await {
            errors.push(e.to_string());
            errors.push(format!("{e:?}"));
        }
    }
    assert_eq!(fallbacks, 30, "every check decided by the failure mode");
    assert!(!errors.is_empty(), "calls straight to the store failed");

    let mut shown = events.text();
    assert!(shown.contains("WARN"), "the outage was logged:\n{shown}");
    let _ = write!(
        shown,
        "\n{}\n{limiter:?}\n{store:?}\n{:?}\n{}",
        errors.join("\n"),
        store.batch_stats(),
        keys.join("\n")
    );
    assert!(
        !shown.contains(PASSWORD),
        "the password appears in:\n{shown}"
    );
    eprintln!(
        "{} lines of events and errors, {} keys checked",
        shown.lines().count(),
        keys.len()
    );
}
