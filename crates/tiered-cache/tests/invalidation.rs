//! Invalidation reaches every instance, a load begun before an invalidation never writes its
//! older value back, whole namespaces move to a new generation; on a real Redis.
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stanchion_testkit::RedisServer;
use stanchion_tiered_cache::TieredCache;
use support::{Cache, batch, counting, gated_load, instance, prefix, propagation, store, value};

async fn instances(server: &RedisServer, p: &str, n: usize) -> Vec<Cache<String>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(instance(&server.url(), p, None).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_on_one_instance_is_seen_by_every_other() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("seen");
    let caches = instances(server, &p, 4).await;
    propagation(&caches, "invalidation seen by 3 other instances").await;
    let received: u64 = caches[1..]
        .iter()
        .map(|c| c.stats().invalidations_received)
        .sum();
    assert_eq!(received, 150);
    // The next read of each instance loads the new value.
    for c in &caches {
        assert_eq!(
            c.get_or_load(&0, value("new")).await.unwrap().as_deref(),
            Some("new")
        );
    }
}

/// A reader loads the old row; a writer updates it and invalidates; the reader's load then
/// returns. The old value must reach neither L2 nor any L1.
async fn stale_load_race(invalidate_elsewhere: bool, with_old_entry: bool) {
    let server = RedisServer::shared().unwrap();
    let p = prefix("race");
    let caches = instances(server, &p, 2).await;
    let (reader, writer) = (
        &caches[0],
        if invalidate_elsewhere {
            &caches[1]
        } else {
            &caches[0]
        },
    );
    if with_old_entry {
        // An entry that is already past its TTL in L2 (so the reader loads).
        let short = stanchion_tiered_cache::Policy::builder(Duration::from_millis(50))
            .max_stale(Duration::from_secs(60))
            .build()
            .unwrap();
        let seed: Cache<String> =
            TieredCache::builder("product", store(&server.url(), &p).await, short)
                .key_prefix(&p)
                .build()
                .unwrap();
        seed.get_or_load(&1, value("older")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    // The reader reads the row ("old") here, before the update.
    let gated = gated_load(reader, 1, "old".to_string());
    gated.started.await.unwrap();
    // The writer commits "new" and invalidates while the reader's load is in flight.
    writer.invalidate(&1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // let the message arrive
    gated.release.send(()).unwrap();
    assert_eq!(gated.load.await.unwrap().unwrap().as_deref(), Some("old"));
    assert_eq!(
        reader.stats().stale_writes_refused,
        1,
        "{:?}",
        reader.stats()
    );
    let calls = Arc::new(AtomicUsize::new(0));
    for c in &caches {
        let got = c
            .get_or_load(&1, counting(&calls, Duration::ZERO, "new"))
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("new"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the old value was not cached anywhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_begun_before_a_local_invalidation_is_not_written_back() {
    stale_load_race(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_begun_before_another_instances_invalidation_is_not_written_back() {
    stale_load_race(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_of_an_expired_entry_does_not_overwrite_a_newer_invalidation() {
    stale_load_race(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_all_moves_every_instance_to_a_new_generation() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("gen");
    let caches = instances(server, &p, 3).await;
    let keys: Vec<u64> = (0..20).collect();
    for c in &caches {
        c.get_or_load_many(&keys, batch).await.unwrap();
    }
    caches[2].invalidate_all().await.unwrap();
    let started = Instant::now();
    for c in &caches[..2] {
        while c.get(&3).await.unwrap().is_some() {
            assert!(started.elapsed() < Duration::from_secs(2));
            tokio::task::yield_now().await;
        }
        assert!(c.get_many(&keys).await.unwrap().iter().all(Option::is_none));
    }
    // A new instance reads the generation from Redis.
    let late = &instances(server, &p, 1).await[0];
    assert_eq!(late.get(&3).await.unwrap(), None);
    late.get_or_load_many(&keys, batch).await.unwrap();
    assert_eq!(caches[0].get(&3).await.unwrap().as_deref(), Some("v3"));
}

/// Calls of `command` Redis has served so far.
fn calls_of(conn: &mut redis::Connection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_of_a_hundred_keys_is_one_round_trip() {
    let server = RedisServer::start().unwrap();
    let p = prefix("many");
    let writer = &instances(&server, &p, 1).await[0];
    let keys: Vec<u64> = (0..100).collect();
    writer.get_or_load_many(&keys, batch).await.unwrap();
    let reader = &instances(&server, &p, 1).await[0];
    reader.get(&1000).await.unwrap(); // reads the generation once
    let mut conn = server.connection().unwrap();
    let (mget, get) = (calls_of(&mut conn, "mget"), calls_of(&mut conn, "get"));
    let got = reader.get_many(&keys).await.unwrap();
    assert_eq!(calls_of(&mut conn, "mget") - mget, 1);
    assert_eq!(calls_of(&mut conn, "get") - get, 0);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, v)| v.as_deref() == Some(format!("v{i}").as_str()))
    );
    // Now all in L1: no round trip at all.
    let mget = calls_of(&mut conn, "mget");
    reader.get_many(&keys).await.unwrap();
    assert_eq!(calls_of(&mut conn, "mget"), mget);
}
