//! Two instances of a shop caching product names, sharing one L2: 50 requests for a cold key
//! at once make one database call; the other instance is served from L2; an invalidation on
//! one instance drops the other's in-process copy; every instance's counters at the end.
//!
//! `cargo run -p stanchion-tiered-cache --example product_cache` runs on the in-memory store
//! (no server). With `--features redis -- --redis` it starts a real Redis from the testkit and
//! uses `RedisCacheStore` with its pub/sub invalidation bus.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stanchion_tiered_cache::{CacheStore, MemoryCacheStore, Policy, TieredCache};

/// The "database": counts its calls.
#[derive(Default)]
struct Db {
    calls: AtomicU32,
}

impl Db {
    async fn product_name(&self, id: u64) -> Result<Option<String>, std::io::Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await; // a slow query
        Ok(Some(format!("product {id}")))
    }
}

async fn run<S: CacheStore + Clone>(
    a_store: S,
    b_store: S,
) -> Result<(), Box<dyn std::error::Error>> {
    let policy = Policy::builder(Duration::from_secs(3600))
        .l1_ttl(Duration::from_secs(300))
        .build()?;
    let a = TieredCache::<u64, String, S>::builder("product", a_store, policy.clone())
        .key_prefix("example:")
        .build()?;
    let b = TieredCache::<u64, String, S>::builder("product", b_store, policy)
        .key_prefix("example:")
        .build()?;
    a.wait_for_bus(Duration::from_secs(5)).await;
    b.wait_for_bus(Duration::from_secs(5)).await;
    let db = Arc::new(Db::default());

    // 50 concurrent requests for a cold key on instance A: one load.
    let mut requests = Vec::new();
    for _ in 0..50 {
        let (a, db) = (a.clone(), db.clone());
        requests.push(tokio::spawn(async move {
            a.get_or_load(&42, move || async move { db.product_name(42).await })
                .await
        }));
    }
    for r in requests {
        assert_eq!(r.await??.as_deref(), Some("product 42"));
    }
    println!(
        "50 concurrent requests on A: {} database call(s)",
        db.calls.load(Ordering::SeqCst)
    );

    // Instance B finds it in L2.
    let loader_db = db.clone();
    let on_b = b
        .get_or_load(&42, move || async move { loader_db.product_name(42).await })
        .await?;
    println!(
        "B reads {:?}: database calls still {}, B's L2 hits {}",
        on_b,
        db.calls.load(Ordering::SeqCst),
        b.stats().l2_hits
    );

    // The product is renamed: A invalidates, B's in-process copy goes too.
    a.invalidate(&42).await?;
    for _ in 0..100 {
        if b.stats().invalidations_received > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let loader_db = db.clone();
    b.get_or_load(&42, move || async move { loader_db.product_name(42).await })
        .await?;
    println!(
        "after A invalidated: B received {} invalidation(s) and loaded again (database calls {})",
        b.stats().invalidations_received,
        db.calls.load(Ordering::SeqCst)
    );
    println!("A: {:?}", a.stats());
    println!("B: {:?}", b.stats());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--redis") {
        #[cfg(feature = "redis")]
        {
            let server = stanchion_testkit::RedisServer::start()?;
            let store = || async {
                let client = redis::Client::open(server.url())?;
                let conn = client.get_connection_manager().await?;
                Ok::<_, redis::RedisError>(stanchion_tiered_cache::RedisCacheStore::new(
                    conn,
                    Some(client),
                    "example:",
                ))
            };
            println!("on a real Redis ({})", server.addr());
            return run(store().await?, store().await?).await;
        }
        #[cfg(not(feature = "redis"))]
        return Err("--redis needs the `redis` feature: add `--features redis`".into());
    }
    println!(
        "on the in-memory store (clones share one L2 and one bus, like two instances on one Redis)"
    );
    let store = MemoryCacheStore::new();
    run(store.clone(), store).await
}
