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
