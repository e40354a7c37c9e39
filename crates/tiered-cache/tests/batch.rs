//! The batch loader on real Redis and in memory: concurrent misses become one `load_many` call
//! per window (an N+1 pattern becomes one query), batches never exceed `max_keys`, a lone miss
//! waits one window, failures and panics reach every waiter, values loaded by one instance are
//! read from Redis by another without loading, and bad settings are refused.

#[cfg(feature = "redis")]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stanchion_tiered_cache::{
    BatchLoadError, BatchLoader, CacheError, MemoryCacheStore, Policy, TieredCache,
};

type Calls = Arc<Mutex<Vec<Vec<u64>>>>;

type Loaded = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<HashMap<u64, String>, std::io::Error>> + Send>,
>;

/// `load_many` that records its keys, and knows every id below 1,000.
fn recording(calls: &Calls) -> impl Fn(Vec<u64>) -> Loaded + Send + Sync + 'static {
    let calls = Arc::clone(calls);
    move |ids: Vec<u64>| {
        calls.lock().unwrap().push(ids.clone());
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(ids
                .into_iter()
                .filter(|&id| id < 1_000)
                .map(|id| (id, format!("product {id}")))
                .collect())
        })
    }
}

/// Every id asked for at once through `loader` (each under a 5 s bound: nobody may hang), in
/// order.
async fn get_all<S, C>(
    loader: &BatchLoader<u64, String, S, C>,
    ids: impl IntoIterator<Item = u64>,
) -> Vec<Result<Option<String>, CacheError>>
where
    S: stanchion_tiered_cache::CacheStore,
    C: stanchion_tiered_cache::Codec<String>,
{
    futures_util::future::join_all(ids.into_iter().map(|id| {
        let loader = loader.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(5), loader.get(&id))
                .await
                .expect("a waiter hung")
        }
    }))
    .await
}

/// A cache of products in memory (no Redis), with "not found" cached.
fn memory_cache() -> TieredCache<u64, String, MemoryCacheStore> {
    TieredCache::builder("product", MemoryCacheStore::new(), policy())
        .build()
        .unwrap()
}

fn policy() -> Policy {
    Policy::builder(Duration::from_secs(3600))
        .negative_ttl(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_become_one_call_per_window_and_batches_respect_max_keys() {
    let cache = memory_cache();
    let calls: Calls = Arc::default();
    let loader = cache
        .batch_loader(32, Duration::from_millis(20), recording(&calls))
        .unwrap();
    // An order page's 20 lines, each asking for its product (with repeats), plus a missing id.
    let ids: Vec<u64> = (0..20).map(|i| i % 15).chain([5_000]).collect();
    let got = get_all(&loader, ids.iter().copied()).await;
    for (id, v) in ids.iter().zip(&got) {
        let expected = (*id < 1_000).then(|| format!("product {id}"));
        assert_eq!(v.as_ref().unwrap(), &expected, "id {id}");
    }
    let made = calls.lock().unwrap().clone();
    assert_eq!(made.len(), 1, "{made:?}");
    // Each key once (the cache's single flight), the missing one included.
    assert_eq!(made[0].len(), 16, "{made:?}");
    assert_eq!(loader.batches(), 1);
    // Now cached: no call, and "not found" is cached too.
    assert_eq!(loader.get(&3).await.unwrap().as_deref(), Some("product 3"));
    assert_eq!(loader.get(&5_000).await.unwrap(), None);
    assert_eq!(calls.lock().unwrap().len(), 1);

    // 100 distinct misses with max 32: four calls, none above 32 keys, every key once.
    let got = get_all(&loader, 100..200).await;
    for (id, v) in (100..200u64).zip(got) {
        assert_eq!(v.unwrap(), Some(format!("product {id}")));
    }
    let made = calls.lock().unwrap()[1..].to_vec();
    assert!(made.iter().all(|c| c.len() <= 32), "{made:?}");
    let mut all: Vec<u64> = made.concat();
    all.sort_unstable();
    assert_eq!(all, (100..200).collect::<Vec<_>>());
    assert_eq!(
        made.len(),
        4,
        "{:?}",
        made.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_miss_is_loaded_after_one_window() {
    let cache = memory_cache();
    let calls: Calls = Arc::default();
    let loader = cache
        .batch_loader(64, Duration::from_millis(30), recording(&calls))
        .unwrap();
    let start = Instant::now();
    assert_eq!(loader.get(&7).await.unwrap().as_deref(), Some("product 7"));
    let took = start.elapsed();
    // The window, plus the 5 ms load, plus scheduling on a loaded machine.
    assert!(took >= Duration::from_millis(30), "{took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(calls.lock().unwrap().as_slice(), &[vec![7]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_panicking_load_reaches_every_waiter() {
    let cache = memory_cache();
    let failing = cache
        .batch_loader(8, Duration::from_millis(5), |_ids: Vec<u64>| async {
            Err::<HashMap<u64, String>, _>(std::io::Error::other("database down"))
        })
        .unwrap();
    let got = get_all(&failing, 0..10).await;
    for r in got {
        match r {
            Err(CacheError::Load(e)) => {
                let e = e.downcast_ref::<BatchLoadError>().expect("a batch error");
                assert!(matches!(e, BatchLoadError::Failed(_)), "{e:?}");
                let source = std::error::Error::source(e).unwrap().to_string();
                assert!(source.contains("database down"), "{source}");
            }
            other => panic!("{other:?}"),
        }
    }
    let panicking = cache
        .batch_loader(8, Duration::from_millis(5), |_ids: Vec<u64>| async {
            if true {
                panic!("bug in load_many");
            }
            Ok::<HashMap<u64, String>, std::io::Error>(HashMap::new())
        })
        .unwrap();
    let got = get_all(&panicking, 20..25).await;
    for r in got {
        match r {
            Err(CacheError::Load(e)) => assert!(matches!(
                e.downcast_ref::<BatchLoadError>(),
                Some(BatchLoadError::Panicked)
            )),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let cache = memory_cache();
    let calls: Calls = Arc::default();
    for (max, window) in [
        (0, Duration::from_millis(1)),
        (10_001, Duration::from_millis(1)),
        (8, Duration::ZERO),
        (8, Duration::from_secs(2)),
        (8, Duration::MAX),
    ] {
        let e = cache
            .batch_loader(max, window, recording(&calls))
            .unwrap_err();
        assert!(e.field.starts_with("batch"), "{e}");
    }
}

/// Four instances sharing one Redis, each with its own batch loader: the first instance's batch
/// loads the page's products once; the others read them from Redis (L2) without any call.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_one_instance_loaded_are_read_from_redis_by_the_others() {
    let server = stanchion_testkit::RedisServer::shared().unwrap();
    let p = support::prefix("batch");
    let calls: Calls = Arc::default();
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let cache = support::instance(&server.url(), &p, None).await;
        loaders.push(
            cache
                .batch_loader(64, Duration::from_millis(10), recording(&calls))
                .unwrap(),
        );
    }
    let page: Vec<u64> = (0..40).collect();
    let first: Vec<Option<String>> = get_all(&loaders[0], page.iter().copied())
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(first.iter().all(Option::is_some));
    assert_eq!(calls.lock().unwrap().len(), 1);
    for l in &loaders[1..] {
        let got: Vec<Option<String>> = get_all(l, page.iter().copied())
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, first);
        assert_eq!(l.batches(), 0, "served from Redis");
    }
    assert_eq!(calls.lock().unwrap().len(), 1);
}
