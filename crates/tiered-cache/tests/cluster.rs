//! On a real Redis Cluster (three masters): reads, multi-key reads across slots, invalidation
//! between instances, namespace generations and tags.
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use stanchion_testkit::RedisCluster;
use stanchion_tiered_cache::{RedisCacheStore, TieredCache};
use support::{batch, hour, prefix, propagation};

type ClusterCache =
    TieredCache<u64, String, RedisCacheStore<redis::cluster_async::ClusterConnection>>;

async fn instance(cluster: &RedisCluster, p: &str) -> ClusterCache {
    instance_tagged(cluster, p, false).await
}

/// An instance whose bus uses sharded pub/sub.
async fn sharded_instance(cluster: &RedisCluster, p: &str) -> ClusterCache {
    let conn = connection(cluster).await;
    let store = RedisCacheStore::sharded(conn, cluster.urls(), p).unwrap();
    let c = TieredCache::builder("product", store, hour())
        .key_prefix(p)
        .l2_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(c.wait_for_bus(Duration::from_secs(5)).await);
    c
}

/// A cluster connection that gives up within half a second.
async fn connection(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::builder(cluster.urls())
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

/// An instance; with `tags`, each value is tagged `group:{key % 3}`.
async fn instance_tagged(cluster: &RedisCluster, p: &str, tags: bool) -> ClusterCache {
    let conn = connection(cluster).await;
    // The bus subscribes on one node: Redis Cluster forwards PUBLISH to every node.
    let subscriber = redis::Client::open(cluster.urls()[0].as_str()).unwrap();
    let store = RedisCacheStore::new(conn, Some(subscriber), p);
    let mut b = TieredCache::builder("product", store, hour())
        .key_prefix(p)
        .l2_timeout(Duration::from_millis(500))
        .lease(Duration::from_secs(5), Duration::from_secs(2));
    if tags {
        b = b.tags(|k: &u64, _: &String| vec![format!("group:{}", k % 3)]);
    }
    let c = b.build().unwrap();
    assert!(c.wait_for_bus(Duration::from_secs(5)).await);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_and_invalidations_work_across_slots() {
    let cluster = RedisCluster::shared().unwrap();
    let p = prefix("cluster");
    let a = instance(cluster, &p).await;
    let b = instance(cluster, &p).await;
    // 200 keys spread over every node's slots.
    let keys: Vec<u64> = (0..200).collect();
    let loaded = a.get_or_load_many(&keys, batch).await.unwrap();
    assert!(loaded.iter().all(Option::is_some));
    // b has nothing in L1: one multi-slot read answers every key from Redis.
    let got = b.get_many(&keys).await.unwrap();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()));
    }
    assert_eq!(b.stats().l2_hits, 200, "{:?}", b.stats());
    assert_eq!(b.stats().l2_errors, 0);
    // Single-key loads with the lease.
    let v = b
        .get_or_load(&5000, || async {
            Ok::<_, std::io::Error>(Some("lamp".to_string()))
        })
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("lamp"));
    assert_eq!(a.get(&5000).await.unwrap().as_deref(), Some("lamp"));
    // An invalidation of keys on several nodes reaches the other instance's L1.
    let some: Vec<u64> = (0..200).step_by(7).collect();
    a.invalidate_many(&some).await.unwrap();
    let started = Instant::now();
    for k in &some {
        while b.get(k).await.unwrap().is_some() {
            assert!(started.elapsed() < Duration::from_secs(2), "key {k}");
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(
        b.get(&1).await.unwrap().as_deref(),
        Some("v1"),
        "others untouched"
    );
    // A new generation hides every key on every node.
    b.invalidate_all().await.unwrap();
    let started = Instant::now();
    while a.get(&1).await.unwrap().is_some() {
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::task::yield_now().await;
    }
    assert!(a.get_many(&keys).await.unwrap().iter().all(Option::is_none));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_invalidate_values_on_every_node() {
    let cluster = RedisCluster::shared().unwrap();
    let p = prefix("cluster-tags");
    let a = instance_tagged(cluster, &p, true).await;
    let b = instance_tagged(cluster, &p, true).await;
    let keys: Vec<u64> = (0..300).collect();
    a.get_or_load_many(&keys, batch).await.unwrap();
    assert!(b.get_many(&keys).await.unwrap().iter().all(Option::is_some));
    assert_eq!(b.stats().l2_hits, 300);
    a.invalidate_tag("group:1").await.unwrap();
    let started = Instant::now();
    loop {
        let got = b.get_many(&keys).await.unwrap();
        let (gone, kept): (Vec<_>, Vec<_>) = keys.iter().partition(|k| *k % 3 == 1);
        if gone.iter().all(|&&k| got[k as usize].is_none()) {
            assert!(
                kept.iter().all(|&&k| got[k as usize].is_some()),
                "only group 1 goes"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::task::yield_now().await;
    }
    // A third instance reads the tags from the cluster and agrees.
    let c = instance_tagged(cluster, &p, true).await;
    let got = c.get_many(&keys).await.unwrap();
    for k in &keys {
        assert_eq!(got[*k as usize].is_some(), k % 3 != 1, "key {k}");
    }
}

/// How many subscribers each node has for `channel`, sharded and plain.
fn subscribers(cluster: &RedisCluster, channel: &str) -> (Vec<i64>, Vec<i64>) {
    let count = |sub: &str| {
        cluster
            .nodes()
            .iter()
            .map(|n| {
                let mut c = n.connection().unwrap();
                let (_, count): (String, i64) = redis::cmd("PUBSUB")
                    .arg(sub)
                    .arg(channel)
                    .query(&mut c)
                    .unwrap();
                count
            })
            .collect()
    };
    (count("SHARDNUMSUB"), count("NUMSUB"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sharded_bus_carries_invalidations_on_one_shard_only() {
    let cluster = RedisCluster::shared().unwrap();
    let p = prefix("sharded");
    let caches = [
        sharded_instance(cluster, &p).await,
        sharded_instance(cluster, &p).await,
        sharded_instance(cluster, &p).await,
    ];
    let (sharded, plain) = subscribers(cluster, &format!("{p}bus"));
    assert_eq!(sharded.iter().sum::<i64>(), 3, "{sharded:?}");
    assert_eq!(
        sharded.iter().filter(|&&n| n > 0).count(),
        1,
        "one node: {sharded:?}"
    );
    assert_eq!(plain.iter().sum::<i64>(), 0);
    propagation(
        &caches,
        "sharded bus, invalidation seen by 2 other instances",
    )
    .await;
    assert_eq!(caches[1].stats().invalidations_received, 50);
    // A tag-free namespace generation travels the same way.
    caches[2].invalidate_all().await.unwrap();
    let started = Instant::now();
    while caches[0].get(&1).await.unwrap().is_some() {
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::task::yield_now().await;
    }
}
