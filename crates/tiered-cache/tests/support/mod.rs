//! Shared helpers for the tests against real Redis servers.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use stanchion_tiered_cache::{CacheStore, Policy, RedisCacheStore, TieredCache};

pub type Store = RedisCacheStore<redis::aio::ConnectionManager>;
pub type Cache<V> = TieredCache<u64, V, Store>;

/// A key prefix unique to this test run and call site.
pub fn prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}:{}:{}:",
        std::process::id(),
        test,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A connection manager that gives up quickly, as a cache's should.
pub async fn manager(url: &str) -> redis::aio::ConnectionManager {
    stanchion_testkit::connection_manager(url).await.unwrap()
}

/// A Redis store with its bus, for one instance.
pub async fn store(url: &str, prefix: &str) -> Store {
    RedisCacheStore::new(
        manager(url).await,
        Some(redis::Client::open(url).unwrap()),
        prefix,
    )
}

/// One instance under `prefix` (an hour's policy), with a lease `(ttl, wait)` if given, once
/// its bus listens.
pub async fn instance(
    url: &str,
    prefix: &str,
    lease: Option<(Duration, Duration)>,
) -> Cache<String> {
    let mut b =
        TieredCache::builder("product", store(url, prefix).await, hour()).key_prefix(prefix);
    if let Some((ttl, wait)) = lease {
        b = b.lease(ttl, wait);
    }
    let c: Cache<String> = b.build().unwrap();
    assert!(c.wait_for_bus(Duration::from_secs(5)).await);
    c
}

pub fn hour() -> Policy {
    Policy::builder(Duration::from_secs(3600)).build().unwrap()
}

/// What the counting loader returns.
pub type Loaded = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<String>, std::io::Error>> + Send>,
>;

/// A loader that counts its calls, waits `delay`, and returns `value`.
pub fn counting(
    calls: &Arc<AtomicUsize>,
    delay: Duration,
    value: &str,
) -> impl FnOnce() -> Loaded + Send + 'static {
    let calls = Arc::clone(calls);
    let value = value.to_owned();
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            Ok(Some(value))
        })
    }
}

/// Loads for `get_or_load_many`: each id maps to "v{id}".
pub async fn batch(ids: Vec<u64>) -> Result<HashMap<u64, String>, std::io::Error> {
    Ok(ids.into_iter().map(|id| (id, format!("v{id}"))).collect())
}

/// A loader that returns `v`.
pub fn value(
    v: &str,
) -> impl FnOnce() -> std::future::Ready<Result<Option<String>, std::io::Error>> + Send + 'static {
    let v = v.to_owned();
    move || std::future::ready(Ok(Some(v)))
}

/// 50 rounds: every cache loads key `round` into its L1, `caches[0]` invalidates it, and the
/// time until every other cache stops serving it is recorded (at most 2 s). Prints the median,
/// p90 and max as `what`, and returns the sorted times.
pub async fn propagation<S: CacheStore>(
    caches: &[TieredCache<u64, String, S>],
    what: &str,
) -> Vec<std::time::Duration> {
    let mut gaps = Vec::new();
    for round in 0..50u64 {
        for c in caches {
            c.get_or_load(&round, value("old")).await.unwrap();
        }
        let started = std::time::Instant::now();
        caches[0].invalidate(&round).await.unwrap();
        for c in &caches[1..] {
            while c.get(&round).await.unwrap().is_some() {
                assert!(started.elapsed() < Duration::from_secs(2), "round {round}");
                tokio::task::yield_now().await;
            }
        }
        gaps.push(started.elapsed());
    }
    gaps.sort();
    eprintln!(
        "{what}: median {:?}, p90 {:?}, max {:?}",
        gaps[25], gaps[45], gaps[49]
    );
    gaps
}

/// A load of `key` held open on purpose, to force an interleaving: its loader reports on
/// `started` that it has begun (the row is read then), and returns `value` only once
/// `release` is sent.
pub struct GatedLoad<V> {
    pub started: tokio::sync::oneshot::Receiver<()>,
    pub release: tokio::sync::oneshot::Sender<()>,
    pub load: tokio::task::JoinHandle<Result<Option<V>, stanchion_tiered_cache::CacheError>>,
}

/// Starts `cache.get_or_load(&key, ..)` on a task with a gated loader returning `value`.
pub fn gated_load<V, S>(cache: &TieredCache<u64, V, S>, key: u64, value: V) -> GatedLoad<V>
where
    V: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static,
    S: CacheStore,
{
    let (release, gate) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let cache = cache.clone();
    let load = tokio::spawn(async move {
        cache
            .get_or_load(&key, move || async move {
                let _ = started_tx.send(());
                let _ = gate.await;
                Ok::<_, std::io::Error>(Some(value))
            })
            .await
    });
    GatedLoad {
        started,
        release,
        load,
    }
}
