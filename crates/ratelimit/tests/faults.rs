//! Redis paused (SIGSTOP) or killed mid-test: each failure mode behaves as documented, no caller
//! waits past the timeout, decisions are immediate once Redis is known to be down, and the
//! limiter goes back to Redis once it answers again.

mod support;

use std::time::{Duration, Instant};

use stanchion_ratelimit::{FailureMode, Limits, Quota, RateLimiter, RedisStore, Source, Verdict};
use stanchion_testkit::RedisServer;

const TIMEOUT: Duration = Duration::from_millis(50);
const RECHECK: Duration = Duration::from_millis(200);

async fn limiter(
    server: &RedisServer,
    mode: FailureMode,
    limits: Limits,
) -> RateLimiter<RedisStore<redis::aio::ConnectionManager>> {
    let store = RedisStore::new(
        support::manager(&server.url()).await,
        &support::prefix("fault"),
    );
    RateLimiter::builder(store, limits)
        .timeout(TIMEOUT)
        .recheck_interval(RECHECK)
        .failure_mode(mode)
        .build()
        .unwrap()
}

/// Runs `n` checks, asserting each one's latency bound, and returns the decisions.
async fn timed_checks(
    limiter: &RateLimiter<RedisStore<redis::aio::ConnectionManager>>,
    key: &str,
    n: usize,
) -> Vec<stanchion_ratelimit::Decision> {
    let mut out = Vec::new();
    for i in 0..n {
        let start = Instant::now();
        let d = limiter.check(key, 1).await.unwrap();
        let took = start.elapsed();
        let bound = if i == 0 {
            TIMEOUT + Duration::from_millis(30)
        } else {
            // Far below the 50 ms timeout: decided without waiting for Redis (the margin is for
            // a loaded CI machine, not for any wait).
            Duration::from_millis(15)
        };
        assert!(
            took <= bound,
            "check {i} took {took:?} (bound {bound:?}), {d:?}"
        );
        out.push(d);
    }
    out
}

async fn wait_until_shared(
    limiter: &RateLimiter<RedisStore<redis::aio::ConnectionManager>>,
    key: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = limiter.check(key, 1).await.unwrap();
        if d.source == Source::Shared {
            return;
        }
        assert!(Instant::now() < deadline, "never went back to Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_allows_without_waiting_while_redis_is_paused() {
    let server = RedisServer::start().unwrap();
    let limiter = limiter(
        &server,
        FailureMode::Open,
        Limits::single(Quota::per_minute(1).unwrap()),
    )
    .await;
    assert_eq!(limiter.check("k", 1).await.unwrap().source, Source::Shared);
    server.pause().unwrap();
    let decisions = timed_checks(&limiter, "other", 50).await;
    assert!(
        decisions
            .iter()
            .all(|d| d.is_allowed() && d.source == Source::Fallback)
    );
    assert!(limiter.is_store_down());
    server.resume().unwrap();
    wait_until_shared(&limiter, "third").await;
    assert!(!limiter.is_store_down());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_denies_without_waiting_while_redis_is_paused() {
    let server = RedisServer::start().unwrap();
    let limiter = limiter(
        &server,
        FailureMode::Closed,
        Limits::single(Quota::per_second(100).unwrap()),
    )
    .await;
    server.pause().unwrap();
    let decisions = timed_checks(&limiter, "k", 20).await;
    assert!(
        decisions
            .iter()
            .all(|d| d.verdict == Verdict::Denied && d.retry_after == Some(RECHECK))
    );
    server.resume().unwrap();
    wait_until_shared(&limiter, "k2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_local_divides_the_quota_by_the_instances_while_redis_is_down() {
    let mut server = RedisServer::start().unwrap();
    let limiter = limiter(
        &server,
        FailureMode::Local { instances: 4 },
        Limits::single(Quota::per_minute(20).unwrap()),
    )
    .await;
    server.kill().unwrap();
    let decisions = timed_checks(&limiter, "k", 10).await;
    assert!(decisions.iter().all(|d| d.source == Source::Fallback));
    let allowed = decisions.iter().filter(|d| d.is_allowed()).count();
    assert_eq!(allowed, 5, "20 per minute over 4 instances");
    server.restart().unwrap();
    wait_until_shared(&limiter, "fresh").await;
}

/// More instances than the burst (the case where a larger cost against the full burst let each
/// instance admit a whole burst per burst period): ten instances of 2 per second, Redis dead,
/// every instance asked as fast as it answers for 3 s. Together they admit at most the global
/// rate plus one request per instance (the documented bound), not 2 per second each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_local_with_more_instances_than_the_burst_keeps_the_global_rate() {
    let mut server = RedisServer::start().unwrap();
    let quota = Quota::per_second(2).unwrap();
    let mut limiters = Vec::new();
    for _ in 0..10 {
        limiters.push(
            limiter(
                &server,
                FailureMode::Local { instances: 10 },
                Limits::single(quota),
            )
            .await,
        );
    }
    server.kill().unwrap();
    let start = Instant::now();
    let mut admitted = 0u64;
    let mut asked = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        for l in &limiters {
            let d = l.check("shared-key", 1).await.unwrap();
            asked += 1;
            admitted += u64::from(d.is_allowed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let bound = (2.0 * secs).ceil() as u64 + 10;
    eprintln!("{admitted} of {asked} admitted in {secs:.2} s by 10 instances (bound {bound})");
    assert!(admitted <= bound, "{admitted} admitted in {secs:.2} s");
    // Each instance admitted its first request: the fallback still serves.
    assert!(admitted >= 10, "{admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_restarted_redis_is_used_again() {
    let mut server = RedisServer::start().unwrap();
    let limiter = limiter(
        &server,
        FailureMode::Open,
        Limits::single(Quota::per_second(5).unwrap()),
    )
    .await;
    assert_eq!(limiter.check("k", 1).await.unwrap().source, Source::Shared);
    server.kill().unwrap();
    let start = Instant::now();
    let d = limiter.check("k", 1).await.unwrap();
    assert_eq!(d.source, Source::Fallback);
    assert!(start.elapsed() <= TIMEOUT + Duration::from_millis(30));
    server.restart().unwrap();
    wait_until_shared(&limiter, "k").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_first_timeout_no_caller_waits_again_over_many_recheck_intervals() {
    let server = RedisServer::start().unwrap();
    let limiter = limiter(
        &server,
        FailureMode::Open,
        Limits::single(Quota::per_second(1000).unwrap()),
    )
    .await;
    assert_eq!(limiter.check("k", 1).await.unwrap().source, Source::Shared);
    server.pause().unwrap();
    let start = Instant::now();
    let mut waits = Vec::new();
    // Seven recheck intervals of steady traffic against a Redis that stays paused.
    while start.elapsed() < RECHECK * 7 {
        let t = Instant::now();
        let d = limiter.check("k", 1).await.unwrap();
        let took = t.elapsed();
        if took >= TIMEOUT - Duration::from_millis(5) {
            waits.push((start.elapsed(), took));
        }
        assert_ne!(d.source, Source::Shared);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("callers that waited for the paused Redis: {waits:?}");
    assert_eq!(waits.len(), 1, "only the first caller waits: {waits:?}");
    assert!(limiter.is_store_down());
    server.resume().unwrap();
    wait_until_shared(&limiter, "k").await;
    assert!(!limiter.is_store_down());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limiter_dropped_while_redis_is_down_stops_its_probe() {
    let server = RedisServer::start().unwrap();
    let limiter = limiter(
        &server,
        FailureMode::Open,
        Limits::single(Quota::per_second(1000).unwrap()),
    )
    .await;
    limiter.check("k", 1).await.unwrap();
    server.pause().unwrap();
    let d = limiter.check("k", 1).await.unwrap();
    assert_eq!(d.source, Source::Fallback);
    let metrics = tokio::runtime::Handle::current().metrics();
    let with_probe = metrics.num_alive_tasks();
    drop(limiter);
    // The probe wakes within one recheck interval, finds the limiter gone and ends.
    let deadline = Instant::now() + RECHECK * 10;
    while metrics.num_alive_tasks() >= with_probe {
        assert!(
            Instant::now() < deadline,
            "{} tasks still alive (were {with_probe})",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.resume().unwrap();
}
