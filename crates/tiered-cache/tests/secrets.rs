//! The Redis password never reaches what the cache shows: its tracing events (every level),
//! the errors it returns, its `Debug` output, its key names. Redis requires a password here,
//! works, then dies for good; a second instance's bus uses a wrong password throughout.
//!
//! Its own binary: it installs a global tracing subscriber.

mod support;

use std::fmt::Write as _;
use std::time::Duration;

use redis::AsyncCommands;
use stanchion_testkit::RedisServer;
use stanchion_tiered_cache::{Policy, RedisCacheStore, TieredCache};
use support::{manager, prefix};

const PASSWORD: &str = "cache-pw-7d31e9";
const WRONG: &str = "not-the-pw-40a2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_reaches_logs_errors_debug_output_or_keys() {
    let events = stanchion_testkit::events::capture();
    let mut server = RedisServer::builder().password(PASSWORD).start().unwrap();
    let url = server.url();
    assert!(url.contains(PASSWORD));
    let p = prefix("secrets");
    let policy = Policy::builder(Duration::from_secs(60))
        .max_stale(Duration::from_secs(600))
        .build()
        .unwrap();
    let store = RedisCacheStore::new(
        manager(&url).await,
        Some(redis::Client::open(url.as_str()).unwrap()),
        &p,
    );
    let cache: TieredCache<u64, String, _> = TieredCache::builder("user", store, policy.clone())
        .key_prefix(&p)
        .lease(Duration::from_secs(1), Duration::from_millis(200))
        .tags(|id, _| vec![format!("user:{id}")])
        .build()
        .unwrap();
    assert!(cache.wait_for_bus(Duration::from_secs(5)).await);
    // A second instance whose bus authenticates with the wrong password.
    let wrong_url = url.replace(PASSWORD, WRONG);
    let wrong_bus = RedisCacheStore::new(
        manager(&url).await,
        Some(redis::Client::open(wrong_url.as_str()).unwrap()),
        &p,
    );
    let other: TieredCache<u64, String, _> = TieredCache::builder("user", wrong_bus, policy)
        .key_prefix(&p)
        .build()
        .unwrap();
    assert!(!other.wait_for_bus(Duration::from_millis(500)).await);

    let load =
        |v: &'static str| move || async move { Ok::<_, std::io::Error>(Some(v.to_string())) };
    for id in 0..20 {
        cache.get_or_load(&id, load("x")).await.unwrap();
    }
    cache.invalidate(&1).await.unwrap();
    cache.invalidate_tag("user:2").await.unwrap();
    let mut errors = Vec::new();
    if let Err(e) = cache.invalidate_tag(&"t".repeat(500)).await {
        errors.push(e);
    }
    let mut conn = manager(&url).await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert!(keys.len() >= 20, "{keys:?}");

    // Redis dies and does not come back.
    tokio::task::block_in_place(|| server.kill().unwrap());
    for id in 0..40 {
        cache.get_or_load(&id, load("y")).await.unwrap();
        if let Err(e) = cache.invalidate(&id).await {
            errors.push(e);
        }
        if let Err(e) = cache.get_many(&[100 + id, 200 + id]).await {
            errors.push(e);
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // bus reconnect attempts
    let stats = cache.stats();
    assert!(stats.l2_errors > 0, "{stats:?}");
    assert!(!errors.is_empty(), "the calls without a loader failed");

    let mut shown = events.text();
    assert!(shown.contains("WARN"), "the outage was logged:\n{shown}");
    for e in &errors {
        let _ = write!(shown, "\n{e}\n{e:?}");
    }
    let _ = write!(
        shown,
        "\n{cache:?}\n{other:?}\n{stats:?}\n{:?}\n{}",
        other.stats(),
        keys.join("\n")
    );
    for secret in [PASSWORD, WRONG] {
        assert!(!shown.contains(secret), "{secret} appears in:\n{shown}");
    }
    eprintln!(
        "{} lines of events, {} errors, {} keys checked",
        shown.lines().count(),
        errors.len(),
        keys.len()
    );
}
