//! Concurrency limits in one process and across instances through Redis leases.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stanchion_ratelimit::{ConcurrencyLimiter, RedisConcurrencyLimiter};
use stanchion_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_permits_bound_in_flight_requests_and_free_on_cancel() {
    let limiter = ConcurrencyLimiter::new(3).unwrap();
    let in_flight = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (limiter, in_flight, most) = (limiter.clone(), in_flight.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                if let Ok(permit) = limiter.try_acquire("k") {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(most.load(Ordering::SeqCst) <= 3);
    // A request cancelled while holding a permit frees it.
    let held = {
        let limiter = limiter.clone();
        tokio::spawn(async move {
            let _permit = limiter.try_acquire("k").unwrap();
            std::future::pending::<()>().await;
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(limiter.in_flight("k"), 1);
    held.abort();
    let _ = held.await;
    assert_eq!(limiter.in_flight("k"), 0);
}

#[tokio::test]
async fn redis_leases_are_shared_across_instances_released_and_expire() {
    let server = RedisServer::shared().unwrap();
    let prefix = support::prefix("cc");
    let a = RedisConcurrencyLimiter::new(
        support::manager(&server.url()).await,
        &prefix,
        2,
        Duration::from_millis(300),
    )
    .unwrap();
    let b = RedisConcurrencyLimiter::new(
        support::manager(&server.url()).await,
        &prefix,
        2,
        Duration::from_millis(300),
    )
    .unwrap();
    let first = a.acquire("tenant").await.unwrap();
    let second = b.acquire("tenant").await.unwrap();
    let refused = a.acquire("tenant").await.unwrap_err();
    assert!(refused.is_full(), "{refused}");
    first.release().await.unwrap();
    let third = b.acquire("tenant").await.unwrap();
    // A holder that vanishes without releasing (its process died): the lease expires.
    std::mem::forget(second);
    std::mem::forget(third);
    assert!(a.acquire("tenant").await.unwrap_err().is_full());
    tokio::time::sleep(Duration::from_millis(350)).await;
    let after = a.acquire("tenant").await.unwrap();
    // Renewing keeps a long request's lease alive past its ttl.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(after.renew().await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _other = a.acquire("tenant").await.unwrap();
    assert!(
        a.acquire("tenant").await.unwrap_err().is_full(),
        "the renewed lease still counts"
    );
    // Dropping a lease releases it from a spawned task.
    drop(after);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(a.acquire("tenant").await.is_ok());
}

#[tokio::test]
async fn renewing_an_expired_redis_lease_says_false_and_frees_nothing_twice() {
    let server = RedisServer::shared().unwrap();
    let prefix = format!("renew-{}:", std::process::id());
    let limiter = RedisConcurrencyLimiter::new(
        support::manager(&server.url()).await,
        &prefix,
        1,
        Duration::from_millis(100),
    )
    .unwrap();
    let lease = limiter.acquire("job").await.unwrap();
    // Within the ttl: renewed.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(lease.renew().await.unwrap());
    // Past the ttl, before any other acquire swept it: expired, so not renewed.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!lease.renew().await.unwrap(), "renewed 150 ms past its ttl");
    // The slot is free for someone else, and the late holder cannot take it back.
    let other = limiter.acquire("job").await.unwrap();
    assert!(!lease.renew().await.unwrap());
    assert!(limiter.acquire("job").await.unwrap_err().is_full());
    drop(other);
}
