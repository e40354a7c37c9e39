//! Durations from configuration or from a server never panic and never overflow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stanchion_breaker::{
    Bulkhead, CircuitBreaker, Clock, ConsecutiveFailures, Jitter, ManualClock, OpenWait, Retry,
    RetryDecision, RetryError, State, Timeout,
};

#[tokio::test(start_paused = true)]
async fn a_day_long_retry_after_hint_is_capped_by_default() {
    let retry = Retry::builder().max_attempts(2).build().unwrap();
    assert_eq!(retry.max_hint(), Duration::from_secs(60));
    let hint = |_: &&str| RetryDecision::RetryAfter(Duration::from_secs(86_400));
    let tries = Arc::new(AtomicU32::new(0));
    let start = tokio::time::Instant::now();
    let _ = retry
        .call_with(&hint, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("503") }
        })
        .await;
    assert_eq!(tries.load(Ordering::SeqCst), 2);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_hint_cap_is_configurable() {
    let retry = Retry::builder()
        .max_attempts(2)
        .max_hint(Duration::from_secs(2))
        .build()
        .unwrap();
    let hint = |_: &&str| RetryDecision::RetryAfter(Duration::from_secs(30));
    let start = tokio::time::Instant::now();
    let _ = retry
        .call_with(&hint, || async { Err::<(), _>("429") })
        .await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_huge_hint_with_max_elapsed_gives_up_without_panicking() {
    // Without the cap and with saturating arithmetic, `elapsed + Duration::MAX` overflowed.
    let retry = Retry::builder()
        .max_attempts(5)
        .max_hint(Duration::MAX)
        .max_elapsed(Duration::from_secs(10))
        .build()
        .unwrap();
    let hint = |_: &&str| RetryDecision::RetryAfter(Duration::MAX);
    let err = retry
        .call_with(&hint, || async { Err::<(), _>("503") })
        .await
        .unwrap_err();
    assert!(
        matches!(err, RetryError::Exhausted { attempts: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn backoff_delays_saturate_near_duration_max() {
    let retry = Retry::builder()
        .backoff(Duration::from_secs(1), Duration::MAX)
        .multiplier(1e300)
        .jitter(Jitter::Proportional(1.0))
        .build()
        .unwrap();
    for attempt in [1, 2, 10, 1000, u32::MAX] {
        let _ = retry.delay(attempt);
    }
    let exact = Retry::builder()
        .backoff(Duration::MAX, Duration::MAX)
        .jitter(Jitter::None)
        .build()
        .unwrap();
    assert_eq!(exact.delay(u32::MAX), Duration::MAX);
}

#[test]
fn an_open_wait_of_duration_max_holds_the_breaker_open_without_overflow() {
    let clock = ManualClock::new();
    clock.advance(Duration::from_secs(5));
    let breaker = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .open_wait(OpenWait::Fixed(Duration::MAX))
        .clock(clock.clone())
        .build()
        .unwrap();
    let _ = breaker.call_sync(|| Err::<(), _>(()));
    assert_eq!(breaker.state(), State::Open);
    clock.advance(Duration::from_secs(365 * 24 * 3600));
    let rejected = breaker.try_acquire().unwrap_err();
    assert_eq!(rejected.state, State::Open);
    assert!(rejected.retry_after.unwrap() > Duration::from_secs(1_000_000));
}

#[test]
fn a_manual_clock_saturates_instead_of_wrapping() {
    let clock = ManualClock::new();
    clock.advance(Duration::from_secs(10));
    clock.advance(Duration::MAX);
    assert_eq!(clock.now_nanos(), u64::MAX);
    clock.advance(Duration::from_secs(1));
    assert_eq!(clock.now_nanos(), u64::MAX);
}

#[tokio::test(start_paused = true)]
async fn timeouts_and_bulkhead_waits_of_duration_max_do_not_panic() {
    let timeout = Timeout::new(Duration::MAX).unwrap();
    assert_eq!(timeout.call(async { Ok::<_, ()>(3) }).await.unwrap(), 3);
    let bulkhead = Bulkhead::builder()
        .max_concurrent(1)
        .max_wait(Duration::MAX)
        .build()
        .unwrap();
    let held = bulkhead.try_acquire().unwrap();
    let waiter = tokio::spawn({
        let b = bulkhead.clone();
        async move { b.call(async { Ok::<_, ()>(5) }).await.ok() }
    });
    tokio::time::sleep(Duration::from_secs(3600)).await;
    drop(held);
    assert_eq!(waiter.await.unwrap(), Some(5));
}
