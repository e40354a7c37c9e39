//! Four limiter instances share one quota through a real Redis (started by the testkit), then
//! Redis is paused to show each failure mode.
//!
//! `cargo run -p stanchion-ratelimit --features redis --example shared`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stanchion_ratelimit::{FailureMode, Limits, Quota, RateLimiter, RedisStore};
use stanchion_testkit::RedisServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = RedisServer::start()?;
    let limits = Limits::single(Quota::per_second(500)?.burst(100)?);
    let connect =
        || async { redis::aio::ConnectionManager::new(redis::Client::open(redis.url())?).await };

    println!("quota: 500/s, burst 100; four instances hammer one key for 2 s");
    let mut handles = Vec::new();
    let start = Instant::now();
    for instance in 0..4 {
        let limiter =
            RateLimiter::builder(RedisStore::new(connect().await?, "demo:"), limits.clone())
                .deny_cache_capacity(0)
                .build()?;
        let admitted = Arc::new(AtomicU64::new(0));
        let counter = admitted.clone();
        handles.push((
            instance,
            admitted,
            tokio::spawn(async move {
                while start.elapsed() < Duration::from_secs(2) {
                    if limiter
                        .check("hot", 1)
                        .await
                        .map(|d| d.is_allowed())
                        .unwrap_or(false)
                    {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }),
        ));
    }
    let mut total = 0;
    for (instance, admitted, handle) in handles {
        handle.await?;
        let n = admitted.load(Ordering::Relaxed);
        total += n;
        println!("  instance {instance}: {n} admitted");
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "  total {total} in {elapsed:.2} s; the quota allows at most {:.0}",
        100.0 + 500.0 * elapsed
    );

    let mut limiters = Vec::new();
    for mode in [
        FailureMode::Open,
        FailureMode::Closed,
        FailureMode::Local { instances: 4 },
    ] {
        let store = RedisStore::new(connect().await?, "demo:");
        limiters.push((
            mode,
            RateLimiter::builder(store, limits.clone())
                .failure_mode(mode)
                .build()?,
        ));
    }
    redis.pause()?;
    println!("redis paused (SIGSTOP); timeout 50 ms");
    for (mode, limiter) in limiters {
        let mut line = format!("  {mode:?}:");
        for _ in 0..3 {
            let t = Instant::now();
            let d = limiter.check("paused", 1).await?;
            line.push_str(&format!(
                " [{:?} {:?} in {:.1?}]",
                d.verdict,
                d.source,
                t.elapsed()
            ));
        }
        println!("{line}");
    }
    redis.resume()?;
    Ok(())
}
