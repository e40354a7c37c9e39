//! One load per key: in one process (single flight) and across instances (lease), on a real
//! Redis; loaders that fail, panic or are cancelled release everyone.
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stanchion_testkit::RedisServer;
use stanchion_tiered_cache::{CacheError, TieredCache};
use support::{Cache, counting, hour, instance, prefix, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_on_one_key_call_the_loader_once() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("thousand");
    let cache: Cache<String> =
        TieredCache::builder("product", store(&server.url(), &p).await, hour())
            .key_prefix(&p)
            .build()
            .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let cache = cache.clone();
            let load = counting(&calls, Duration::from_millis(50), "lamp");
            tokio::spawn(async move { cache.get_or_load(&7, load).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().as_deref(), Some("lamp"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let stats = cache.stats();
    assert_eq!(stats.loads, 1);
    assert!(stats.coalesced >= 900, "{stats:?}");
}

/// Four instances (their own L1, one Redis), 100 concurrent misses each.
async fn four_instances(lease: bool) -> (usize, Vec<Cache<String>>) {
    let server = RedisServer::shared().unwrap();
    let p = prefix(if lease { "lease" } else { "nolease" });
    let lease = lease.then_some((Duration::from_secs(5), Duration::from_secs(2)));
    let mut caches = Vec::new();
    for _ in 0..4 {
        caches.push(instance(&server.url(), &p, lease).await);
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for cache in &caches {
        for _ in 0..100 {
            let cache = cache.clone();
            let load = counting(&calls, Duration::from_millis(100), "lamp");
            tasks.push(tokio::spawn(
                async move { cache.get_or_load(&1, load).await },
            ));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().as_deref(), Some("lamp"));
    }
    (calls.load(Ordering::SeqCst), caches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_with_a_lease_call_the_loader_once() {
    let (calls, caches) = four_instances(true).await;
    assert_eq!(calls, 1);
    let waits: u64 = caches.iter().map(|c| c.stats().lease_waits).sum();
    let timeouts: u64 = caches.iter().map(|c| c.stats().lease_timeouts).sum();
    assert_eq!(
        (waits, timeouts),
        (3, 0),
        "three instances waited and were woken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_without_a_lease_call_the_loader_at_most_four_times() {
    let (calls, _) = four_instances(false).await;
    assert!((1..=4).contains(&calls), "{calls} loads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_the_value_not_by_the_end_of_their_wait() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("wake");
    let lease = Some((Duration::from_secs(10), Duration::from_secs(10)));
    let a = instance(&server.url(), &p, lease).await;
    let b = instance(&server.url(), &p, lease).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let holder = tokio::spawn({
        let load = counting(&calls, Duration::from_millis(300), "lamp");
        async move { a.get_or_load(&3, load).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let got = b
        .get_or_load(&3, counting(&calls, Duration::ZERO, "other"))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(got.as_deref(), Some("lamp"));
    assert!(
        waited < Duration::from_secs(2),
        "waited {waited:?} of a 10 s wait"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    holder.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_lease_holder_wakes_the_other_instances_with_the_error() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("fail");
    let lease = Some((Duration::from_secs(10), Duration::from_secs(10)));
    let a = instance(&server.url(), &p, lease).await;
    let b = instance(&server.url(), &p, lease).await;
    let holder = tokio::spawn(async move {
        a.get_or_load(&4, || async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Err::<Option<String>, _>(std::io::Error::other("database down"))
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let got = b
        .get_or_load(&4, || async {
            Ok::<_, std::io::Error>(Some("x".to_string()))
        })
        .await;
    assert!(matches!(got, Err(CacheError::PeerLoadFailed)), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let held = holder.await.unwrap().unwrap_err();
    assert_eq!(
        held.load_error::<std::io::Error>().unwrap().to_string(),
        "database down"
    );
    // The lease was released: the next call loads at once.
    let started = Instant::now();
    let again = b
        .get_or_load(&4, || async {
            Ok::<_, std::io::Error>(Some("back".to_string()))
        })
        .await
        .unwrap();
    assert_eq!(again.as_deref(), Some("back"));
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loader_fails_every_coalesced_caller_and_the_next_call_loads_again() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("panic");
    let cache: Cache<String> =
        TieredCache::builder("product", store(&server.url(), &p).await, hour())
            .key_prefix(&p)
            .lease(Duration::from_secs(10), Duration::from_secs(10))
            .build()
            .unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load(&5, || async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if true {
                            panic!("loader bug");
                        }
                        Ok::<Option<String>, std::io::Error>(None)
                    })
                    .await
            })
        })
        .collect();
    let mut panicked = 0;
    for t in tasks {
        match t.await.unwrap() {
            Err(CacheError::LoaderPanicked) => panicked += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(panicked, 20);
    assert_eq!(
        cache.stats().loads,
        1,
        "one loader call, shared by all twenty"
    );
    let started = Instant::now();
    let v = cache
        .get_or_load(&5, || async {
            Ok::<_, std::io::Error>(Some("fixed".to_string()))
        })
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("fixed"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the lease was released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_hands_the_load_to_a_waiting_caller() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("cancel");
    let cache: Cache<String> =
        TieredCache::builder("product", store(&server.url(), &p).await, hour())
            .key_prefix(&p)
            .build()
            .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let leader = tokio::spawn({
        let cache = cache.clone();
        let load = counting(&calls, Duration::from_secs(30), "never");
        async move { cache.get_or_load(&6, load).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let follower = tokio::spawn({
        let cache = cache.clone();
        let load = counting(&calls, Duration::from_millis(10), "second");
        async move { cache.get_or_load(&6, load).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    leader.abort();
    let got = tokio::time::timeout(Duration::from_secs(2), follower)
        .await
        .expect("the follower did not wait for the cancelled leader")
        .unwrap()
        .unwrap();
    assert_eq!(got.as_deref(), Some("second"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
