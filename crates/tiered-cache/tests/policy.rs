//! TTL policies on a manual clock (the in-memory store: these are about time, not Redis),
//! and corrupt or oversized values on a real Redis.

#[cfg(feature = "redis")]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stanchion_tiered_cache::{
    CacheError, ManualClock, MemoryCacheStore, Policy, TieredCache, Tiers,
};

const START: u64 = 1_700_000_000_000;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

type Mem = TieredCache<u64, String, MemoryCacheStore>;

fn cache(policy: Policy, clock: &ManualClock) -> Mem {
    TieredCache::builder("p", MemoryCacheStore::new(), policy)
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// A loader returning `v` and counting calls.
fn ok(
    calls: &Arc<AtomicUsize>,
    v: &str,
) -> impl FnOnce() -> std::future::Ready<Result<Option<String>, std::io::Error>> + Send + 'static {
    let calls = Arc::clone(calls);
    let v = v.to_owned();
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Some(v)))
    }
}

fn failing(
    calls: &Arc<AtomicUsize>,
) -> impl FnOnce() -> std::future::Ready<Result<Option<String>, std::io::Error>> + Send + 'static {
    let calls = Arc::clone(calls);
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(std::io::Error::other("db down")))
    }
}

async fn settle() {
    // Let a spawned background refresh run.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::test]
async fn past_the_soft_ttl_the_old_value_is_served_while_one_refresh_runs() {
    let clock = ManualClock::new(START);
    let policy = Policy::builder(secs(100))
        .soft_ttl(secs(50))
        .jitter(0.0)
        .build()
        .unwrap();
    let c = cache(policy, &clock);
    let calls = Arc::new(AtomicUsize::new(0));
    assert_eq!(
        c.get_or_load(&1, ok(&calls, "v1"))
            .await
            .unwrap()
            .as_deref(),
        Some("v1")
    );
    clock.advance(secs(49));
    assert_eq!(
        c.get_or_load(&1, ok(&calls, "v2"))
            .await
            .unwrap()
            .as_deref(),
        Some("v1")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "fresh: no load");
    clock.advance(secs(2));
    // Stale: every caller gets v1 at once, and only one refresh starts.
    for _ in 0..10 {
        assert_eq!(
            c.get_or_load(&1, ok(&calls, "v2"))
                .await
                .unwrap()
                .as_deref(),
            Some("v1")
        );
    }
    settle().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(c.stats().refreshes, 1);
    assert_eq!(
        c.get_or_load(&1, ok(&calls, "v3"))
            .await
            .unwrap()
            .as_deref(),
        Some("v2")
    );
}

#[tokio::test]
async fn past_the_hard_ttl_callers_wait_for_the_load() {
    let clock = ManualClock::new(START);
    let policy = Policy::builder(secs(100))
        .soft_ttl(secs(50))
        .jitter(0.0)
        .build()
        .unwrap();
    let c = cache(policy, &clock);
    let calls = Arc::new(AtomicUsize::new(0));
    c.get_or_load(&1, ok(&calls, "v1")).await.unwrap();
    clock.advance(secs(100));
    assert_eq!(
        c.get_or_load(&1, ok(&calls, "v2"))
            .await
            .unwrap()
            .as_deref(),
        Some("v2")
    );
    assert_eq!(c.get(&1).await.unwrap().as_deref(), Some("v2"));
}

#[tokio::test]
async fn a_failing_loader_is_covered_by_max_stale_and_no_longer() {
    let clock = ManualClock::new(START);
    let policy = Policy::builder(secs(60))
        .max_stale(secs(30))
        .jitter(0.0)
        .build()
        .unwrap();
    let c = cache(policy, &clock);
    let calls = Arc::new(AtomicUsize::new(0));
    c.get_or_load(&1, ok(&calls, "v1")).await.unwrap();
    clock.advance(secs(80)); // expired 20 s ago
    assert_eq!(
        c.get_or_load(&1, failing(&calls)).await.unwrap().as_deref(),
        Some("v1")
    );
    assert_eq!(c.stats().stale_served, 1);
    clock.advance(secs(11)); // expired 31 s ago
    let err = c.get_or_load(&1, failing(&calls)).await.unwrap_err();
    assert_eq!(
        err.load_error::<std::io::Error>().unwrap().to_string(),
        "db down"
    );
    // Without max_stale, an error at once.
    let strict = cache(
        Policy::builder(secs(60)).jitter(0.0).build().unwrap(),
        &clock,
    );
    strict.get_or_load(&1, ok(&calls, "v1")).await.unwrap();
    clock.advance(secs(61));
    assert!(matches!(
        strict.get_or_load(&1, failing(&calls)).await,
        Err(CacheError::Load(_))
    ));
}

#[tokio::test]
async fn not_found_is_cached_for_the_negative_ttl_only() {
    let clock = ManualClock::new(START);
    let policy = Policy::builder(secs(600))
        .negative_ttl(secs(10))
        .jitter(0.0)
        .build()
        .unwrap();
    let c = cache(policy, &clock);
    let calls = Arc::new(AtomicUsize::new(0));
    let none = |calls: &Arc<AtomicUsize>| {
        let calls = Arc::clone(calls);
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<Option<String>, std::io::Error>(None))
        }
    };
    assert_eq!(c.get_or_load(&9, none(&calls)).await.unwrap(), None);
    clock.advance(secs(9));
    assert_eq!(c.get_or_load(&9, none(&calls)).await.unwrap(), None);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    clock.advance(secs(2));
    assert_eq!(
        c.get_or_load(&9, ok(&calls, "created"))
            .await
            .unwrap()
            .as_deref(),
        Some("created")
    );
    // No negative TTL: "not found" is never cached.
    let plain = cache(Policy::builder(secs(600)).build().unwrap(), &clock);
    plain.get_or_load(&9, none(&calls)).await.unwrap();
    plain.get_or_load(&9, none(&calls)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn the_l1_ttl_sends_reads_back_to_l2_before_the_ttl() {
    let clock = ManualClock::new(START);
    let store = MemoryCacheStore::new();
    let policy = Policy::builder(secs(600))
        .l1_ttl(secs(30))
        .jitter(0.0)
        .build()
        .unwrap();
    let a: Mem = TieredCache::builder("p", store.clone(), policy.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    a.get_or_load(&1, ok(&calls, "v1")).await.unwrap();
    a.get(&1).await.unwrap();
    let hits = a.stats().l1_hits;
    clock.advance(secs(31));
    assert_eq!(a.get(&1).await.unwrap().as_deref(), Some("v1"));
    assert_eq!(a.stats().l1_hits, hits, "the L1 copy had expired");
    assert_eq!(a.stats().l2_hits, 1);
}

#[tokio::test]
async fn tiers_limit_where_values_go() {
    let clock = ManualClock::new(START);
    let store = MemoryCacheStore::new();
    let calls = Arc::new(AtomicUsize::new(0));
    for (tiers, in_store) in [
        (Tiers::L1Only, false),
        (Tiers::L2Only, true),
        (Tiers::Both, true),
    ] {
        let p = Policy::builder(secs(60)).tiers(tiers).build().unwrap();
        let ns = format!("{tiers:?}").to_lowercase();
        let c: Mem = TieredCache::builder(&ns, store.clone(), p)
            .clock(clock.clone())
            .build()
            .unwrap();
        let before = store.len();
        c.get_or_load(&1, ok(&calls, "v")).await.unwrap();
        assert_eq!(store.len() > before, in_store, "{tiers:?}");
        assert_eq!(c.l1_len() > 0, tiers != Tiers::L2Only, "{tiers:?}");
    }
}

#[tokio::test]
async fn several_caches_on_one_memory_store_behave_as_instances() {
    let store = MemoryCacheStore::new();
    let policy = Policy::builder(secs(60)).build().unwrap();
    let make = || -> Mem {
        TieredCache::builder("p", store.clone(), policy.clone())
            .lease(secs(5), secs(2))
            .build()
            .unwrap()
    };
    let (a, b) = (make(), make());
    assert!(a.wait_for_bus(secs(1)).await && b.wait_for_bus(secs(1)).await);
    let calls = Arc::new(AtomicUsize::new(0));
    a.get_or_load(&1, ok(&calls, "v1")).await.unwrap();
    assert_eq!(
        b.get_or_load(&1, ok(&calls, "x")).await.unwrap().as_deref(),
        Some("v1")
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "b read a's value from the store"
    );
    a.invalidate(&1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.get(&1).await.unwrap(), None, "b's L1 copy was dropped");
}

#[cfg(feature = "redis")]
mod on_redis {
    use super::*;
    use stanchion_testkit::RedisServer;
    use support::{prefix, store};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_values_are_misses_counted_and_replaced() {
        let server = RedisServer::shared().unwrap();
        let p = prefix("corrupt");
        let c: support::Cache<String> =
            TieredCache::builder("product", store(&server.url(), &p).await, support::hour())
                .key_prefix(&p)
                .build()
                .unwrap();
        assert!(c.wait_for_bus(Duration::from_secs(5)).await);
        let mut conn = server.connection().unwrap();
        let garbage: [&[u8]; 4] = [
            b"",
            b"not an entry",
            &[1u8; 39],
            &[
                1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 1,
            ],
        ];
        let calls = Arc::new(AtomicUsize::new(0));
        for (i, bytes) in garbage.iter().enumerate() {
            let id = i as u64;
            let _: () = redis::cmd("SET")
                .arg(format!("{p}product:0:{id}"))
                .arg(*bytes)
                .query(&mut conn)
                .unwrap();
            assert_eq!(c.get(&id).await.unwrap(), None);
            let v = c.get_or_load(&id, ok(&calls, "good")).await.unwrap();
            assert_eq!(v.as_deref(), Some("good"));
        }
        assert!(c.stats().corrupt >= 4, "{:?}", c.stats());
        // The corrupt entries were overwritten by the loaded values.
        let other: support::Cache<String> =
            TieredCache::builder("product", store(&server.url(), &p).await, support::hour())
                .key_prefix(&p)
                .build()
                .unwrap();
        for id in 0..4 {
            assert_eq!(other.get(&id).await.unwrap().as_deref(), Some("good"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_values_stay_out_of_redis_and_are_counted() {
        let server = RedisServer::shared().unwrap();
        let p = prefix("big");
        let c: support::Cache<String> =
            TieredCache::builder("product", store(&server.url(), &p).await, support::hour())
                .key_prefix(&p)
                .max_value_bytes(4096)
                .compress_above(None)
                .build()
                .unwrap();
        assert!(c.wait_for_bus(Duration::from_secs(5)).await);
        let big = "x".repeat(10_000);
        let v = c
            .get_or_load(
                &1,
                move || async move { Ok::<_, std::io::Error>(Some(big)) },
            )
            .await
            .unwrap();
        assert_eq!(v.map(|s| s.len()), Some(10_000));
        assert_eq!(c.stats().oversized, 1);
        let mut conn = server.connection().unwrap();
        let exists: u64 = redis::cmd("EXISTS")
            .arg(format!("{p}product:0:1"))
            .query(&mut conn)
            .unwrap();
        assert_eq!(exists, 0);
        assert_eq!(
            c.get(&1).await.unwrap().map(|s| s.len()),
            Some(10_000),
            "L1 still has it"
        );
    }
}
