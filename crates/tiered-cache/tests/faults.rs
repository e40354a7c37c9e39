//! Redis killed, paused (SIGSTOP), restarted, or gone for good: callers with a loader get
//! values, never errors, within the loader's time plus a bounded number of L2 timeouts; the
//! cache goes back to Redis when it returns.
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use stanchion_testkit::RedisServer;
use stanchion_tiered_cache::{ConsecutiveFailures, TieredCache};
use support::{Cache, hour, prefix, store};

const L2_TIMEOUT: Duration = Duration::from_millis(100);
const LOAD: Duration = Duration::from_millis(20);

async fn cache(server: &RedisServer, p: &str) -> Cache<String> {
    let c: Cache<String> = TieredCache::builder("product", store(&server.url(), p).await, hour())
        .key_prefix(p)
        .l2_timeout(L2_TIMEOUT)
        .lease(Duration::from_secs(5), Duration::from_millis(500))
        .skip_policy(ConsecutiveFailures::new(3, Duration::from_millis(500)).unwrap())
        .build()
        .unwrap();
    assert!(c.wait_for_bus(Duration::from_secs(5)).await);
    c
}

async fn load(id: u64) -> Result<Option<String>, std::io::Error> {
    tokio::time::sleep(LOAD).await;
    Ok(Some(format!("v{id}")))
}

/// Reads `keys` once each (new keys: every call loads) and returns the slowest call.
async fn read_all(cache: &Cache<String>, keys: std::ops::Range<u64>) -> Duration {
    let mut slowest = Duration::ZERO;
    for k in keys {
        let started = Instant::now();
        let v = cache.get_or_load(&k, move || load(k)).await.unwrap();
        slowest = slowest.max(started.elapsed());
        assert_eq!(v, Some(format!("v{k}")));
    }
    slowest
}

fn key_exists(server: &RedisServer, p: &str, id: u64) -> bool {
    let mut conn = server.connection().unwrap();
    let n: u64 = redis::cmd("EXISTS")
        .arg(format!("{p}product:0:{id}"))
        .query(&mut conn)
        .unwrap();
    n == 1
}

/// Loads new keys from `first` on until one of them is written to Redis (within 5 s: the skip
/// cool-down, the connection's own reconnect); returns how long that took.
async fn back_on_redis(server: &RedisServer, p: &str, c: &Cache<String>, first: u64) -> Duration {
    let back = Instant::now();
    let mut k = first;
    while !key_exists(server, p, k - 1) {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "never went back to Redis"
        );
        read_all(c, k..k + 1).await;
        k += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    back.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_then_restarted() {
    let mut server = RedisServer::start().unwrap();
    let p = prefix("kill");
    let c = cache(&server, &p).await;
    read_all(&c, 0..5).await;
    assert!(key_exists(&server, &p, 4));
    // Killed while a load is in flight: the caller still gets its value.
    let slow = tokio::spawn({
        let c = c.clone();
        async move {
            c.get_or_load(&100, || async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, std::io::Error>(Some("slow".to_string()))
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.kill().unwrap();
    assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("slow"));
    // While it is down: values, each call within the load plus two L2 timeouts.
    let slowest = read_all(&c, 200..230).await;
    assert!(
        slowest < LOAD + 2 * L2_TIMEOUT + Duration::from_millis(80),
        "{slowest:?}"
    );
    assert!(c.stats().l2_skipped > 0, "{:?}", c.stats());
    // Keys loaded before still come from L1.
    assert_eq!(c.get(&4).await.unwrap().as_deref(), Some("v4"));
    server.restart().unwrap();
    assert!(
        c.wait_for_bus(Duration::from_secs(5)).await,
        "the bus came back"
    );
    let back = back_on_redis(&server, &p, &c, 300).await;
    eprintln!("back on Redis {back:?} after it restarted");
    assert!(c.stats().l1_clears >= 1, "L1 was cleared on reconnecting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_with_sigstop_costs_at_most_two_timeouts_per_call() {
    let server = RedisServer::start().unwrap();
    let p = prefix("pause");
    let c = cache(&server, &p).await;
    read_all(&c, 0..5).await;
    server.pause().unwrap();
    let started = Instant::now();
    let slowest = read_all(&c, 100..140).await;
    let total = started.elapsed();
    server.resume().unwrap();
    assert!(
        slowest < LOAD + 2 * L2_TIMEOUT + Duration::from_millis(80),
        "{slowest:?}"
    );
    // Once skipping, calls cost the load alone: 40 calls take far less than 40 timeouts.
    assert!(total < 40 * LOAD + 10 * L2_TIMEOUT, "{total:?}");
    let s = c.stats();
    assert!(s.l2_errors >= 3 && s.l2_skipped > 0, "{s:?}");
    back_on_redis(&server, &p, &c, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_never_comes_back_leaves_l1_and_the_loader_serving() {
    let mut server = RedisServer::start().unwrap();
    let p = prefix("dead");
    let c = cache(&server, &p).await;
    read_all(&c, 0..10).await;
    server.kill().unwrap();
    for round in 0..5 {
        let slowest = read_all(&c, 1000 * (round + 1)..1000 * (round + 1) + 20).await;
        assert!(
            slowest < LOAD + 2 * L2_TIMEOUT + Duration::from_millis(80),
            "{slowest:?}"
        );
        // Old keys: L1 copies, kept while the bus is down.
        for k in 0..10 {
            assert_eq!(c.get(&k).await.unwrap(), Some(format!("v{k}")));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // What needs Redis says so: an invalidation cannot reach L2 or the other instances.
    let err = c.invalidate(&1).await.unwrap_err();
    assert!(
        matches!(err, stanchion_tiered_cache::CacheError::Store(_)),
        "{err:?}"
    );
    assert!(!c.wait_for_bus(Duration::from_millis(100)).await);
}
