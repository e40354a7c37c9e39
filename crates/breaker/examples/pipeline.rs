//! Real Redis GETs behind a bulkhead, a circuit breaker, retries and a timeout. Redis is paused
//! (SIGSTOP) half-way: watch the calls time out, the breaker open and fail fast, and a probe
//! close it again once Redis resumes.
//!
//! `cargo run -p stanchion-breaker --example pipeline`

use std::time::{Duration, Instant};

use stanchion_breaker::{
    Bulkhead, CallError, CircuitBreaker, ConsecutiveFailures, Jitter, OpenWait, Pipeline, Retry,
    Timeout,
};
use stanchion_testkit::RedisServer;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis = RedisServer::start()?;
    let client = redis::Client::open(redis.url())?;
    let conn = client.get_multiplexed_async_connection().await?;

    let breaker = CircuitBreaker::builder()
        .name("redis")
        .policy(ConsecutiveFailures::new(3)?)
        .open_wait(OpenWait::Fixed(Duration::from_secs(1)))
        .half_open_calls(1)
        .build()?;
    let pipeline = Pipeline::new()
        .bulkhead(Bulkhead::builder().max_concurrent(16).build()?)
        .breaker(breaker.clone())
        .retry(
            Retry::builder()
                .max_attempts(2)
                .backoff(Duration::from_millis(10), Duration::from_millis(50))
                .jitter(Jitter::Full)
                .build()?,
        )
        .timeout(Timeout::new(Duration::from_millis(100))?);

    let get = || {
        let conn = conn.clone();
        pipeline.call(move || {
            let mut conn = conn.clone();
            async move {
                redis::cmd("GET")
                    .arg("greeting")
                    .query_async::<Option<String>>(&mut conn)
                    .await
            }
        })
    };

    for phase in ["healthy", "paused", "resumed"] {
        match phase {
            "paused" => redis.pause()?,
            "resumed" => {
                redis.resume()?;
                tokio::time::sleep(Duration::from_millis(1100)).await;
            }
            _ => {}
        }
        println!("-- redis {phase}");
        for _ in 0..5 {
            let start = Instant::now();
            let outcome = match get().await {
                Ok(value) => format!("ok {value:?}"),
                Err(CallError::Timeout { attempts, .. }) => {
                    format!("timed out ({attempts} attempts)")
                }
                Err(CallError::Open { retry_after, .. }) => {
                    format!("rejected by the open breaker (retry after {retry_after:?})")
                }
                Err(e) => format!("error: {e}"),
            };
            println!(
                "{outcome:<60} {:>8.2?}  breaker {}",
                start.elapsed(),
                breaker.state()
            );
        }
    }
    println!("stats: {:?}", breaker.stats());
    Ok(())
}
