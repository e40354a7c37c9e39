//! Tags on a real Redis: one invalidation drops every value carrying a tag, in every namespace
//! and on every instance; a load that overlaps it never caches its older value; instances that
//! miss the message (or start later) still judge entries right.
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use stanchion_testkit::RedisServer;
use stanchion_tiered_cache::{
    CacheError, CacheStore, MemoryCacheStore, Policy, RedisCacheStore, TieredCache,
};
use support::{Store, gated_load, hour, manager, prefix, store};

/// (name, category id)
type Product = (String, u32);

fn category_of(_: &u64, p: &Product) -> Vec<String> {
    vec![format!("category:{}", p.1)]
}

async fn products<S: CacheStore>(s: S, p: &str, policy: Policy) -> TieredCache<u64, Product, S> {
    let c = TieredCache::builder("product", s, policy)
        .key_prefix(p)
        .tags(category_of)
        .build()
        .unwrap();
    assert!(c.wait_for_bus(Duration::from_secs(5)).await);
    c
}

/// Product lists by category id, tagged with their category.
async fn lists(s: Store, p: &str) -> TieredCache<u32, Vec<u64>, Store> {
    let c = TieredCache::builder("product_list", s, hour())
        .key_prefix(p)
        .tags(|category: &u32, _: &Vec<u64>| vec![format!("category:{category}")])
        .build()
        .unwrap();
    assert!(c.wait_for_bus(Duration::from_secs(5)).await);
    c
}

/// A loader returning `value`.
fn product(
    value: (&str, u32),
) -> impl FnOnce() -> std::future::Ready<Result<Option<Product>, std::io::Error>> + Send + 'static {
    let v = (value.0.to_owned(), value.1);
    move || std::future::ready(Ok(Some(v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_invalidation_reaches_every_namespace_on_every_instance() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("tags");
    let url = server.url();
    let (pa, pb) = (
        products(store(&url, &p).await, &p, hour()).await,
        products(store(&url, &p).await, &p, hour()).await,
    );
    let (la, lb) = (
        lists(store(&url, &p).await, &p).await,
        lists(store(&url, &p).await, &p).await,
    );
    let list = |ids: Vec<u64>| move || std::future::ready(Ok::<_, std::io::Error>(Some(ids)));
    // Products 0..20 in categories 7 and 8, and both lists, cached on both instances.
    for id in 0..20u64 {
        let category = 7 + u32::from(id % 2 == 1);
        for c in [&pa, &pb] {
            c.get_or_load(&id, product(("old", category)))
                .await
                .unwrap();
        }
    }
    for c in [&la, &lb] {
        for category in [7u32, 8] {
            c.get_or_load(&category, list(vec![1, 2])).await.unwrap();
        }
    }
    assert_eq!(pa.stats().loads + pb.stats().loads, 20, "b read a's values");
    let started = Instant::now();
    pb.invalidate_tag("category:7").await.unwrap();
    // Instance a drops products of category 7 and the category-7 list; b did at once.
    for id in (0..20u64).step_by(2) {
        while pa.get(&id).await.unwrap().is_some() {
            assert!(started.elapsed() < Duration::from_secs(2), "product {id}");
            tokio::task::yield_now().await;
        }
        assert_eq!(pb.get(&id).await.unwrap(), None, "product {id} on b");
    }
    while la.get(&7).await.unwrap().is_some() {
        assert!(started.elapsed() < Duration::from_secs(2), "list");
        tokio::task::yield_now().await;
    }
    eprintln!(
        "tag invalidation seen by the other instance after {:?}",
        started.elapsed()
    );
    assert_eq!(lb.get(&7).await.unwrap(), None);
    // Category 8 is untouched, in both tiers and namespaces.
    for id in (1..20u64).step_by(2) {
        assert_eq!(pa.get(&id).await.unwrap(), Some(("old".into(), 8)), "{id}");
    }
    assert_eq!(lb.get(&8).await.unwrap(), Some(vec![1, 2]));
    // A fresh instance (nothing in L1, the tags read from Redis) agrees.
    let pc = products(store(&url, &p).await, &p, hour()).await;
    assert_eq!(pc.get(&0).await.unwrap(), None);
    assert_eq!(pc.get(&1).await.unwrap(), Some(("old".into(), 8)));
    // The next load caches again, and a later instance reads it from Redis.
    pa.get_or_load(&0, product(("new", 7))).await.unwrap();
    let pd = products(store(&url, &p).await, &p, hour()).await;
    assert_eq!(pd.get(&0).await.unwrap(), Some(("new".into(), 7)));
    assert_eq!(pd.stats().l2_hits, 1);
    assert!(la.stats().invalidations_received >= 1);
}

/// A reader loads a product's old row; a writer moves the product's category tag; the
/// reader's load then returns. The old value is served to that reader but cached nowhere.
async fn overlapping_load<S: CacheStore + Clone>(make: impl Fn() -> S, p: &str) {
    let reader = products(make(), p, hour()).await;
    let writer = products(make(), p, hour()).await;
    let gated = gated_load(&reader, 1, ("old".to_string(), 7));
    gated.started.await.unwrap();
    writer.invalidate_tag("category:7").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // let the message arrive
    gated.release.send(()).unwrap();
    assert_eq!(gated.load.await.unwrap().unwrap(), Some(("old".into(), 7)));
    assert_eq!(
        reader.stats().stale_writes_refused,
        1,
        "{:?}",
        reader.stats()
    );
    let calls = Arc::new(AtomicUsize::new(0));
    for c in [&reader, &writer] {
        let got = c
            .get_or_load(&1, {
                let calls = Arc::clone(&calls);
                move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(Some(("new".to_string(), 7)))
                }
            })
            .await
            .unwrap();
        assert_eq!(got, Some(("new".into(), 7)));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the old value was cached nowhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overlapping_a_tag_invalidation_caches_nothing_redis() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("tag-race");
    let conn = manager(&server.url()).await;
    let client = redis::Client::open(server.url()).unwrap();
    overlapping_load(
        || RedisCacheStore::new(conn.clone(), Some(client.clone()), &p),
        &p,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overlapping_a_tag_invalidation_caches_nothing_memory() {
    let shared = MemoryCacheStore::new();
    overlapping_load(|| shared.clone(), "m").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_without_the_bus_stops_serving_a_tagged_value_within_its_l1_ttl() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("tag-nobus");
    let l1 = Duration::from_millis(300);
    let policy = Policy::builder(Duration::from_secs(3600))
        .l1_ttl(l1)
        .build()
        .unwrap();
    let no_bus = RedisCacheStore::new(manager(&server.url()).await, None, &p);
    let deaf = TieredCache::builder("product", no_bus, policy)
        .key_prefix(&p)
        .tags(category_of)
        .build()
        .unwrap();
    let writer = products(store(&server.url(), &p).await, &p, hour()).await;
    deaf.get_or_load(&3, product(("old", 7))).await.unwrap();
    let started = Instant::now();
    writer.invalidate_tag("category:7").await.unwrap();
    // Until its L1 copy and its knowledge of the tag expire, the deaf instance may serve
    // the old value; never after.
    while deaf.get(&3).await.unwrap().is_some() {
        assert!(started.elapsed() < l1 + Duration::from_millis(200));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "without the bus, a tagged value went after {:?}",
        started.elapsed()
    );
    assert_eq!(deaf.stats().invalidations_received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tags_are_refused_and_values_with_them_are_not_cached() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("tag-bad");
    let c: TieredCache<u64, String, Store> =
        TieredCache::builder("note", store(&server.url(), &p).await, hour())
            .key_prefix(&p)
            .tags(|id: &u64, _: &String| match id {
                0 => (0..33).map(|i| format!("t{i}")).collect(),
                1 => vec![String::new()],
                2 => vec!["x".repeat(129)],
                // Duplicates count once: 32 distinct tags are fine.
                _ => (0..64).map(|i| format!("t{}", i % 32)).collect(),
            })
            .build()
            .unwrap();
    for id in 0..4u64 {
        for _ in 0..2 {
            let v = c
                .get_or_load(&id, || async {
                    Ok::<_, std::io::Error>(Some("v".to_string()))
                })
                .await
                .unwrap();
            assert_eq!(v.as_deref(), Some("v"), "served all the same");
        }
    }
    let s = c.stats();
    assert_eq!((s.invalid_tags, s.loads), (6, 7), "{s:?}");
    assert!(matches!(
        c.invalidate_tag("").await,
        Err(CacheError::InvalidTag { len: 0 })
    ));
    assert!(matches!(
        c.invalidate_tag(&"y".repeat(129)).await,
        Err(CacheError::InvalidTag { len: 129 })
    ));
    // An insert whose value cannot be tagged drops the old copy instead of keeping it.
    c.insert(&3, "a".into()).await.unwrap();
    assert_eq!(c.get(&3).await.unwrap().as_deref(), Some("a"));
    c.insert(&0, "b".into()).await.unwrap();
    assert_eq!(c.get(&0).await.unwrap(), None);
    // One of the 32 tags of key 3 invalidated: gone.
    c.invalidate_tag("t17").await.unwrap();
    assert_eq!(c.get(&3).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_values_are_current_and_a_later_tag_invalidation_drops_them() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("tag-insert");
    let a = products(store(&server.url(), &p).await, &p, hour()).await;
    let b = products(store(&server.url(), &p).await, &p, hour()).await;
    // Many invalidations before: the tag is well past the clock b started with.
    for _ in 0..5 {
        a.invalidate_tag("category:7").await.unwrap();
    }
    b.insert(&9, ("lamp".into(), 7)).await.unwrap();
    let fresh = products(store(&server.url(), &p).await, &p, hour()).await;
    assert_eq!(fresh.get(&9).await.unwrap(), Some(("lamp".into(), 7)));
    a.invalidate_tag("category:7").await.unwrap();
    let started = Instant::now();
    while b.get(&9).await.unwrap().is_some() || fresh.get(&9).await.unwrap().is_some() {
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raise_keeps_the_larger_counter_exactly_past_two_to_the_53() {
    let server = RedisServer::shared().unwrap();
    let p = prefix("raise");
    let redis = RedisCacheStore::new(manager(&server.url()).await, None, &p);
    let memory = MemoryCacheStore::new();
    let big = (1u64 << 60) + 1;
    for key in [format!("{p}c"), format!("{p}d")] {
        assert_eq!(redis.raise(&key, 7).await.unwrap(), 7, "absent counts as 0");
        assert_eq!(redis.raise(&key, 5).await.unwrap(), 7);
        assert_eq!(redis.raise(&key, big).await.unwrap(), big);
        // One less than `big` is the same double: compared as numbers, this would be lost.
        assert_eq!(redis.raise(&key, big - 1).await.unwrap(), big);
        assert_eq!(redis.counter(&key).await.unwrap(), big);
        assert_eq!(memory.raise(&key, big).await.unwrap(), big);
        assert_eq!(memory.raise(&key, 3).await.unwrap(), big);
    }
    assert_eq!(redis.incr(&format!("{p}c")).await.unwrap(), big + 1);
}
