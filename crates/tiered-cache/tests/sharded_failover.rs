//! The sharded bus on a Redis Cluster whose master for the bus channel is killed and never comes
//! back: callers keep getting values, the instances report the loss, and once the replica is
//! promoted the bus follows it: invalidations reach every instance again, and copies kept
//! through the gap are dropped (messages sent meanwhile may have been lost).
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use stanchion_testkit::RedisCluster;
use stanchion_tiered_cache::{Policy, RedisCacheStore, TieredCache};
use support::{prefix, value};

type ClusterCache =
    TieredCache<u64, String, RedisCacheStore<redis::cluster_async::ClusterConnection>>;

async fn instance(urls: &[String], p: &str) -> ClusterCache {
    let client = redis::cluster::ClusterClient::builder(urls.to_vec())
        .connection_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(300))
        .retries(1)
        .build()
        .unwrap();
    let conn = client.get_async_connection().await.unwrap();
    let store = RedisCacheStore::sharded(conn, urls.to_vec(), p).unwrap();
    let policy = Policy::builder(Duration::from_secs(3600)).build().unwrap();
    let c = TieredCache::builder("product", store, policy)
        .key_prefix(p)
        .l2_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    assert!(c.wait_for_bus(Duration::from_secs(5)).await);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sharded_bus_follows_its_slot_to_the_promoted_replica() {
    let mut cluster = RedisCluster::start_with_replicas(3).unwrap();
    let masters: Vec<String> = cluster.urls().into_iter().take(3).collect();
    let p = prefix("sharded-failover");
    let (a, b) = (instance(&masters, &p).await, instance(&masters, &p).await);
    // The master the bus channel lives on.
    let owner = (0..3)
        .find(|&i| {
            let mut c = cluster.nodes()[i].connection().unwrap();
            let (_, n): (String, i64) = redis::cmd("PUBSUB")
                .arg("SHARDNUMSUB")
                .arg(format!("{p}bus"))
                .query(&mut c)
                .unwrap();
            n == 2
        })
        .expect("one master holds both subscriptions");
    for k in 0..20u64 {
        a.get_or_load(&k, value("old")).await.unwrap();
        b.get_or_load(&k, value("old")).await.unwrap();
    }
    let clears_before = b.stats().l1_clears;

    cluster.node_mut(owner).unwrap().kill().unwrap();
    let killed = Instant::now();
    // While the slot has no master: values, never errors, for callers with a loader.
    let mut served = 0;
    while killed.elapsed() < Duration::from_millis(500) {
        for c in [&a, &b] {
            let v = c.get_or_load(&(100 + served), value("x")).await.unwrap();
            assert_eq!(v.as_deref(), Some("x"));
            served += 1;
        }
    }
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_for_failover(owner).unwrap();
        cluster
    })
    .await
    .unwrap();
    let promoted = killed.elapsed();
    // The bus comes back on the replica: b hears a's invalidations again.
    let mut back = None;
    let mut round = 0u64;
    while killed.elapsed() < Duration::from_secs(40) {
        let key = 1_000 + round;
        round += 1;
        b.get_or_load(&key, value("old")).await.unwrap();
        let _ = a.invalidate(&key).await;
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_millis(200) {
            if b.get(&key).await.ok().flatten().is_none() {
                back = Some(killed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if back.is_some() {
            break;
        }
    }
    let back = back.expect("invalidations reach b again after the failover");
    eprintln!(
        "bus master killed: {served} values served meanwhile, failover seen at {promoted:?}, \
         invalidations delivered again {back:?} after the kill"
    );
    assert!(
        b.stats().l1_clears > clears_before,
        "copies kept through the gap were dropped: {:?}",
        b.stats()
    );
    assert!(b.wait_for_bus(Duration::from_secs(1)).await);
}
