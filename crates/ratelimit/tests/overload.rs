//! A `RedisStore` used without `RateLimiter` (no timeout in front of it) against a Redis that
//! stopped answering: the queue of waiting checks is bounded. A file of its own, so its thousands
//! of tasks do not slow the latency-bound fault tests.

mod support;

use std::time::{Duration, Instant};

use stanchion_ratelimit::{Limits, Quota, RedisStore};
use stanchion_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_used_directly_refuses_checks_beyond_its_queue_while_redis_hangs() {
    use stanchion_ratelimit::{RateLimitStore, StoreError};
    use std::sync::Arc;
    type Store = RedisStore<redis::aio::ConnectionManager>;

    let server = RedisServer::start().unwrap();
    let store: Arc<Store> = Arc::new(RedisStore::new(
        support::manager(&server.url()).await,
        &support::prefix("overload"),
    ));
    let limits = Arc::new(Limits::single(Quota::per_second(1_000_000).unwrap()));
    assert!(store.check("warm", &limits, 1).await.unwrap().is_allowed());
    server.pause().unwrap();
    // More checks than may wait: the ones beyond the queue (and the two batches of at most 64
    // sent to the hung server) fail at once, the rest wait.
    let total = Store::MAX_QUEUED + 400;
    let mut waiting = Vec::new();
    for i in 0..total {
        let (store, limits) = (store.clone(), limits.clone());
        waiting.push(tokio::spawn(async move {
            let start = Instant::now();
            let result = store.check(&format!("k{i}"), &limits, 1).await;
            (result, start.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = waiting.iter().filter(|t| t.is_finished()).count();
    assert!(
        refused >= 200,
        "{refused} of {total} checks finished while Redis hung"
    );
    server.resume().unwrap();
    let (mut overloaded, mut answered) = (0, 0);
    for task in waiting {
        match task.await.unwrap() {
            (Err(StoreError::Overloaded { queued }), took) => {
                assert!(queued >= Store::MAX_QUEUED);
                assert!(took < Duration::from_millis(100), "refused after {took:?}");
                overloaded += 1;
            }
            (Ok(d), _) => {
                assert!(d.is_allowed());
                answered += 1;
            }
            (Err(e), _) => panic!("unexpected {e}"),
        }
    }
    assert!(overloaded >= 200, "{overloaded} refused");
    assert_eq!(overloaded + answered, total);
    // Once Redis answers, the queue drains and new checks are accepted again.
    assert!(store.check("after", &limits, 1).await.unwrap().is_allowed());
}

/// Checks whose callers gave up while Redis hung (their timeout passed, or their future was
/// dropped) are not sent once it answers again: the keys they named are never charged, and the
/// store counts them as abandoned. Only the checks already on the wire are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_whose_callers_gave_up_are_never_sent() {
    use stanchion_ratelimit::RateLimitStore;
    use std::sync::Arc;
    type Store = RedisStore<redis::aio::ConnectionManager>;

    let server = RedisServer::start().unwrap();
    let prefix = support::prefix("abandoned");
    let store: Arc<Store> = Arc::new(RedisStore::new(
        support::manager(&server.url()).await,
        &prefix,
    ));
    let limits = Arc::new(Limits::single(Quota::per_minute(10).unwrap()));
    assert!(store.check("warm", &limits, 1).await.unwrap().is_allowed());
    server.pause().unwrap();
    // Two checks go out at once and hang on the wire (the store's calls in flight); their
    // callers keep waiting.
    let mut on_wire = Vec::new();
    for i in 0..2 {
        let (store, limits) = (store.clone(), limits.clone());
        on_wire.push(tokio::spawn(async move {
            store.check(&format!("wire{i}"), &limits, 1).await
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then 300 checks queue behind them; half time out, half have their task aborted.
    let mut gave_up = Vec::new();
    for i in 0..300 {
        let (store, limits) = (store.clone(), limits.clone());
        gave_up.push(tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_millis(if i % 2 == 0 { 30 } else { 10_000 }),
                store.check(&format!("late{i}"), &limits, 1),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (i, t) in gave_up.iter().enumerate() {
        if i % 2 == 1 {
            t.abort();
        }
    }
    for (i, t) in gave_up.into_iter().enumerate() {
        match t.await {
            Ok(result) => {
                assert_eq!(i % 2, 0);
                assert!(result.is_err(), "check {i} answered while Redis hung");
            }
            Err(e) => assert!(e.is_cancelled() && i % 2 == 1),
        }
    }
    server.resume().unwrap();
    for t in on_wire {
        let d = t.await.unwrap().unwrap();
        assert!(d.is_allowed());
    }
    // Give the batcher time to form (and drop) the next batches.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conn = server.connection().unwrap();
    let late: Vec<String> = (0..300)
        .map(|i| store.redis_key(&format!("late{i}")))
        .collect();
    let charged: usize = redis::cmd("EXISTS").arg(&late).query(&mut conn).unwrap();
    assert_eq!(charged, 0, "keys of abandoned checks were charged");
    let wire: usize = redis::cmd("EXISTS")
        .arg(store.redis_key("wire0"))
        .arg(store.redis_key("wire1"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(wire, 2);
    let stats = store.batch_stats();
    assert_eq!(stats.abandoned, 300, "{stats:?}");
    // And the store keeps working.
    assert!(store.check("after", &limits, 1).await.unwrap().is_allowed());
}

/// A store dropped while Redis hangs with its script calls on the wire lets go of its
/// connection at once: the calls under way are aborted, not left holding it until Redis
/// answers (which may be never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dropped_while_redis_hangs_releases_its_connection() {
    use stanchion_ratelimit::RateLimitStore;
    use std::sync::atomic::Ordering;

    let server = RedisServer::start().unwrap();
    // No response timeout: a hung call would otherwise end by itself after redis-rs's default
    // (500 ms), hiding what the store does.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(200)))
        .set_response_timeout(None)
        .set_number_of_retries(0);
    let manager = redis::aio::ConnectionManager::new_with_config(
        redis::Client::open(server.url()).unwrap(),
        config,
    )
    .await
    .unwrap();
    let (conn, watch) = support::Watched::new(manager);
    let live = &watch.live;
    let store = std::sync::Arc::new(RedisStore::new(conn, &support::prefix("dropped")));
    let limits = std::sync::Arc::new(Limits::single(Quota::per_second(10).unwrap()));
    assert!(store.check("warm", &limits, 1).await.unwrap().is_allowed());
    server.pause().unwrap();
    let mut hung = Vec::new();
    for i in 0..6 {
        let (store, limits) = (store.clone(), limits.clone());
        hung.push(tokio::spawn(async move {
            store.check(&format!("k{i}"), &limits, 1).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        live.load(Ordering::SeqCst) >= 2,
        "calls on the wire hold clones"
    );
    for t in &hung {
        t.abort();
    }
    drop(store);
    let start = Instant::now();
    while live.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = live.load(Ordering::SeqCst);
    server.resume().unwrap();
    assert_eq!(left, 0, "connection clones still held with Redis hung");
    // Aborted, not answered: well before a response timeout would have ended the calls.
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    eprintln!(
        "connection released {:?} after the store was dropped",
        start.elapsed()
    );
}
