//! The `metrics` feature read back through a recorder: every counter a cache reports through
//! the facade (`cache.<field>`, labelled with the cache's namespace) matches `stats()` of the
//! instances that share the namespace, on a real Redis with two instances and a second
//! namespace kept apart.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use stanchion_testkit::RedisServer;
use stanchion_tiered_cache::{Stats, TieredCache};
use support::{Cache, hour, instance, prefix, store};

/// Reads one counter of a `Stats`.
type Field = fn(&Stats) -> u64;

async fn load(cache: &Cache<String>, key: u64) -> Option<String> {
    cache
        .get_or_load(&key, move || async move {
            Ok::<_, std::io::Error>(Some(format!("value {key}")))
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_counts_what_stats_count_per_namespace() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this process");
    let server = RedisServer::start().unwrap();
    let p = prefix("metrics");
    let a = instance(&server.url(), &p, None).await;
    let b = instance(&server.url(), &p, None).await;
    let other: Cache<String> =
        TieredCache::builder("category", store(&server.url(), &p).await, hour())
            .key_prefix(&p)
            .build()
            .unwrap();

    for key in 0..10 {
        load(&a, key).await; // misses everywhere, loads
        load(&b, key).await; // L1 miss, L2 hit
        load(&a, key).await; // L1 hit
    }
    assert_eq!(a.get(&99).await.unwrap(), None);
    a.invalidate(&3).await.unwrap();
    load(&other, 1).await;
    // B applies A's invalidation.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while b.stats().invalidations_received == 0 {
        assert!(std::time::Instant::now() < until, "{:?}", b.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let DebugValue::Counter(n) = value {
            let key = key.key();
            let namespace = key
                .labels()
                .find(|l| l.key() == "cache.namespace")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            seen.insert((key.name().to_owned(), namespace), n);
        }
    }
    let metric = |name: &str, ns: &str| {
        seen.get(&(format!("cache.{name}"), ns.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    let (sa, sb, so) = (a.stats(), b.stats(), other.stats());
    eprintln!("a {sa:?}\nb {sb:?}\nother {so:?}\nmetrics {seen:?}");
    let fields: [(&str, Field); 8] = [
        ("l1_hits", |s| s.l1_hits),
        ("l1_misses", |s| s.l1_misses),
        ("l2_hits", |s| s.l2_hits),
        ("l2_misses", |s| s.l2_misses),
        ("loads", |s| s.loads),
        ("invalidations_sent", |s| s.invalidations_sent),
        ("invalidations_received", |s| s.invalidations_received),
        ("l2_errors", |s| s.l2_errors),
    ];
    for (name, field) in fields {
        assert_eq!(
            metric(name, "product"),
            field(&sa) + field(&sb),
            "cache.{name} for product"
        );
        assert_eq!(
            metric(name, "category"),
            field(&so),
            "cache.{name} for category"
        );
    }
    // And the run did what the comments say.
    assert_eq!((sa.loads, sb.loads, so.loads), (10, 0, 1));
    assert_eq!(sb.l2_hits, 10);
    assert_eq!(sa.l1_hits, 10);
    assert_eq!(sa.invalidations_sent, 1);
}
