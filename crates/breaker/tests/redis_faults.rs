//! A breaker and a timeout around real Redis GETs: pause Redis (SIGSTOP) and the breaker opens
//! and fails fast; resume it and a probe closes the breaker.

use std::time::{Duration, Instant};

use stanchion_breaker::{
    BreakerError, CircuitBreaker, ConsecutiveFailures, OpenWait, State, Timeout, TimeoutError,
};
use stanchion_testkit::RedisServer;

type GetResult = Result<Option<String>, BreakerError<TimeoutError<redis::RedisError>>>;

async fn guarded_get(
    breaker: &CircuitBreaker<ConsecutiveFailures>,
    timeout: Timeout,
    conn: &redis::aio::MultiplexedConnection,
) -> GetResult {
    let mut conn = conn.clone();
    breaker
        .call(timeout.call(async move {
            redis::cmd("GET")
                .arg("breaker:k")
                .query_async::<Option<String>>(&mut conn)
                .await
        }))
        .await
}

#[tokio::test]
async fn paused_redis_opens_the_breaker_and_resumed_redis_closes_it() {
    let server = RedisServer::start().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    // Responses to requests sent while paused arrive after resume; the multiplexer matches them.
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let breaker = CircuitBreaker::builder()
        .name("redis")
        .policy(ConsecutiveFailures::new(3).unwrap())
        .open_wait(OpenWait::Fixed(Duration::from_millis(500)))
        .half_open_calls(1)
        .build()
        .unwrap();
    let timeout = Timeout::new(Duration::from_millis(100)).unwrap();
    assert_eq!(guarded_get(&breaker, timeout, &conn).await.unwrap(), None);

    server.pause().unwrap();
    for _ in 0..3 {
        let start = Instant::now();
        let err = guarded_get(&breaker, timeout, &conn).await.unwrap_err();
        assert!(
            matches!(err, BreakerError::Inner(TimeoutError::Elapsed(_))),
            "{err:?}"
        );
        assert!(
            start.elapsed() < Duration::from_millis(300),
            "bounded by the timeout"
        );
    }
    assert_eq!(breaker.state(), State::Open);
    // Open: calls fail fast without touching Redis.
    for _ in 0..100 {
        let start = Instant::now();
        let err = guarded_get(&breaker, timeout, &conn).await.unwrap_err();
        assert!(err.is_rejected());
        // Far below the 100 ms timeout a call to the paused Redis would wait for (the margin
        // is for a preempted test thread on a loaded machine, not for any I/O).
        assert!(
            start.elapsed() < Duration::from_millis(20),
            "took {:?}",
            start.elapsed()
        );
    }

    server.resume().unwrap();
    tokio::time::sleep(Duration::from_millis(550)).await;
    // The probe succeeds and the breaker closes.
    assert_eq!(guarded_get(&breaker, timeout, &conn).await.unwrap(), None);
    assert_eq!(breaker.state(), State::Closed);
    assert!(breaker.stats().rejected >= 100);
}

#[tokio::test]
async fn killed_redis_opens_the_breaker_and_a_restart_heals_it() {
    let mut server = RedisServer::start().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let breaker = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(2).unwrap())
        .open_wait(OpenWait::Fixed(Duration::from_millis(200)))
        .half_open_calls(1)
        .build()
        .unwrap();
    let timeout = Timeout::new(Duration::from_millis(200)).unwrap();
    let get = || {
        let client = client.clone();
        breaker.call(timeout.call(async move {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("GET")
                .arg("k")
                .query_async::<Option<String>>(&mut conn)
                .await
        }))
    };
    get().await.unwrap();
    server.kill().unwrap();
    // Connection refused: a failure reported at once, not a timeout.
    for _ in 0..2 {
        let err = get().await.unwrap_err();
        assert!(
            matches!(err, BreakerError::Inner(TimeoutError::Inner(_))),
            "{err:?}"
        );
    }
    assert_eq!(breaker.state(), State::Open);
    server.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    get().await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
}
