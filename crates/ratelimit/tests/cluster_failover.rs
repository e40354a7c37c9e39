//! A Redis Cluster master killed mid-run, its replica promoted: the limiter follows its failure
//! mode during the outage (no caller waits past the timeout), and goes back to Redis for every
//! key once the replica serves the slots. The times are measured and printed (README).

mod support;

use std::time::{Duration, Instant};

use redis::cluster_routing::Slot;
use stanchion_ratelimit::{FailureMode, Limits, Quota, RateLimiter, RedisStore, Source};
use stanchion_testkit::RedisCluster;

const TIMEOUT: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_survived_and_its_replica_is_used_after_failover() {
    let mut cluster = RedisCluster::start_with_replicas(3).unwrap();
    let client = redis::cluster::ClusterClient::builder(cluster.urls().into_iter().take(3))
        .connection_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(500))
        .retries(1)
        .build()
        .unwrap();
    let store = RedisStore::new(
        client.get_async_connection().await.unwrap(),
        &support::prefix("failover"),
    )
    .for_cluster();
    // A key in the first master's slots (0-5460) and one in the second's.
    let key_in = |range: std::ops::Range<u16>| {
        (0..)
            .map(|i| format!("client-{i}"))
            .find(|k| {
                let slot = Slot::for_key(store.redis_key(k));
                range.clone().any(|s| Slot::new(s) == Some(slot))
            })
            .unwrap()
    };
    let (a, b) = (key_in(0..5461), key_in(5461..10922));
    let limiter = RateLimiter::builder(store, Limits::single(Quota::per_second(1_000).unwrap()))
        .timeout(TIMEOUT)
        .recheck_interval(Duration::from_millis(200))
        .failure_mode(FailureMode::Local { instances: 1 })
        .build()
        .unwrap();
    for k in [&a, &b] {
        assert_eq!(limiter.check(k, 1).await.unwrap().source, Source::Shared);
    }

    cluster.node_mut(0).unwrap().kill().unwrap();
    let killed = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut waited = 0;
    let mut checks = 0;
    let mut fallback = 0;
    let mut back: Option<Duration> = None;
    let mut shared_in_a_row = 0;
    while killed.elapsed() < Duration::from_secs(40) {
        for k in [&a, &b] {
            let start = Instant::now();
            let d = limiter.check(k, 1).await.unwrap();
            let took = start.elapsed();
            checks += 1;
            slowest = slowest.max(took);
            if took >= TIMEOUT {
                waited += 1;
            }
            assert!(d.is_allowed(), "{d:?}");
            if d.source == Source::Fallback {
                fallback += 1;
            }
            if k == &a {
                if d.source == Source::Shared {
                    back.get_or_insert(killed.elapsed());
                    shared_in_a_row += 1;
                } else {
                    shared_in_a_row = 0;
                    back = None;
                }
            }
        }
        if shared_in_a_row >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.wait_for_failover(0).unwrap();
    eprintln!(
        "master killed: {checks} checks, {fallback} decided by the failure mode, {waited} waited \
         the {TIMEOUT:?} timeout, slowest {slowest:?}; Redis used again for the dead master's \
         slots after {back:?}"
    );
    let back = back.expect("the limiter never went back to Redis after the failover");
    assert!(fallback > 0, "the outage was never seen");
    // No caller waits past the timeout (plus scheduling slack on a loaded machine).
    assert!(
        slowest < TIMEOUT + Duration::from_millis(150),
        "{slowest:?}"
    );
    assert!(back < Duration::from_secs(30), "{back:?}");
}
