//! The futures of every public async method are `Send` (axum handlers and `tokio::spawn`
//! need it), checked at compile time and by spawning them on the multi-threaded runtime.

use std::collections::HashMap;
use std::time::Duration;

use stanchion_tiered_cache::{CacheStore, MemoryCacheStore, Policy, TieredCache};

fn assert_send<T: Send>(t: T) -> T {
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_future_is_send() {
    let policy = Policy::builder(Duration::from_secs(60)).build().unwrap();
    let c: TieredCache<u64, String, MemoryCacheStore> =
        TieredCache::builder("p", MemoryCacheStore::new(), policy)
            .build()
            .unwrap();
    let load = || async { Ok::<_, std::io::Error>(Some("v".to_string())) };
    let many = |ids: Vec<u64>| async move {
        Ok::<_, std::io::Error>(
            ids.into_iter()
                .map(|i| (i, i.to_string()))
                .collect::<HashMap<_, _>>(),
        )
    };
    let batched = c.batch_loader(8, Duration::from_millis(1), many).unwrap();
    let cc = c.clone();
    tokio::spawn(async move {
        assert_send(batched.get(&9)).await.unwrap();
        assert_send(cc.get_or_load(&1, load)).await.unwrap();
        assert_send(cc.get(&1)).await.unwrap();
        assert_send(cc.get_many(&[1, 2])).await.unwrap();
        assert_send(cc.get_or_load_many(&[1, 2], many))
            .await
            .unwrap();
        assert_send(cc.insert(&3, "x".into())).await.unwrap();
        assert_send(cc.invalidate(&3)).await.unwrap();
        assert_send(cc.invalidate_many(&[1, 2])).await.unwrap();
        assert_send(cc.invalidate_all()).await.unwrap();
        assert_send(cc.invalidate_tag("category:7")).await.unwrap();
        assert_send(cc.warm(vec![5, 6], 2, |k: u64| async move {
            Ok::<_, std::io::Error>(Some(k.to_string()))
        }))
        .await;
        assert_send(cc.wait_for_bus(Duration::from_millis(10))).await;
        // A store's bus subscription, for code that listens to it directly.
        let mut bus = MemoryCacheStore::new().subscribe();
        assert!(matches!(
            assert_send(bus.recv()).await,
            Some(stanchion_tiered_cache::BusEvent::Connected)
        ));
    })
    .await
    .unwrap();
    assert!(c.stats().loads >= 3);
}

#[test]
fn handles_are_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<TieredCache<u64, String, MemoryCacheStore>>();
    check::<MemoryCacheStore>();
    check::<
        stanchion_tiered_cache::BatchLoader<
            u64,
            String,
            MemoryCacheStore,
            stanchion_tiered_cache::Postcard,
        >,
    >();
    #[cfg(feature = "redis")]
    check::<stanchion_tiered_cache::RedisCacheStore<redis::aio::ConnectionManager>>();
}
