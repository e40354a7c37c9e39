//! Every state transition, driven by a manual clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stanchion_breaker::{
    BreakerError, BreakerEvent, CircuitBreaker, ConsecutiveFailures, CountWindow, FailurePolicy,
    ManualClock, OpenWait, Outcome, Registry, State, TimeWindow,
};

fn breaker(
    threshold: u32,
    probes: u32,
) -> (
    CircuitBreaker<ConsecutiveFailures, ManualClock>,
    ManualClock,
) {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .name("dep")
        .policy(ConsecutiveFailures::new(threshold).unwrap())
        .clock(clock.clone())
        .open_wait(OpenWait::Fixed(Duration::from_secs(10)))
        .half_open_calls(probes)
        .build()
        .unwrap();
    (b, clock)
}

fn fail<P: FailurePolicy, C: stanchion_breaker::Clock>(
    b: &CircuitBreaker<P, C>,
) -> Result<(), BreakerError<&'static str>> {
    b.call_sync(|| Err("boom"))
}

fn succeed<P: FailurePolicy, C: stanchion_breaker::Clock>(
    b: &CircuitBreaker<P, C>,
) -> Result<(), BreakerError<&'static str>> {
    b.call_sync(|| Ok(()))
}

#[test]
fn opens_after_three_consecutive_failures_and_a_success_resets_the_count() {
    let (b, _) = breaker(3, 1);
    fail(&b).unwrap_err();
    fail(&b).unwrap_err();
    succeed(&b).unwrap();
    fail(&b).unwrap_err();
    fail(&b).unwrap_err();
    assert_eq!(b.state(), State::Closed);
    assert!(matches!(fail(&b), Err(BreakerError::Inner("boom"))));
    assert_eq!(b.state(), State::Open);
}

#[test]
fn open_rejects_with_the_remaining_wait_then_half_opens_on_the_next_call() {
    let (b, clock) = breaker(1, 2);
    fail(&b).unwrap_err();
    clock.advance(Duration::from_secs(4));
    let err = succeed(&b).unwrap_err();
    assert!(err.is_rejected());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(6)));
    // The wait has passed, but with on-next-call transitions the state changes only on a call.
    clock.advance(Duration::from_secs(6));
    assert_eq!(b.state(), State::Open);
    succeed(&b).unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    succeed(&b).unwrap();
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.stats().rejected, 1);
}

#[test]
fn half_open_admits_exactly_the_probe_count() {
    let (b, clock) = breaker(1, 2);
    fail(&b).unwrap_err();
    clock.advance(Duration::from_secs(10));
    let p1 = b.try_acquire().unwrap();
    let p2 = b.try_acquire().unwrap();
    let third = b.try_acquire().unwrap_err();
    assert_eq!(third.state, State::HalfOpen);
    p1.record(Outcome::Success);
    assert_eq!(b.state(), State::HalfOpen);
    p2.record(Outcome::Success);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn a_failed_probe_reopens_with_a_growing_wait() {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .clock(clock.clone())
        .open_wait(OpenWait::exponential(
            Duration::from_secs(1),
            2.0,
            Duration::from_secs(5),
        ))
        .half_open_calls(1)
        .build()
        .unwrap();
    fail(&b).unwrap_err();
    let mut waits = Vec::new();
    for _ in 0..4 {
        let wait = succeed(&b).unwrap_err().retry_after().unwrap();
        waits.push(wait.as_secs());
        clock.advance(wait);
        fail(&b).unwrap_err(); // the probe fails
    }
    assert_eq!(waits, vec![1, 2, 4, 5]);
    assert_eq!(b.stats().consecutive_opens, 5);
    // A successful probe closes and the next open starts from the initial wait again.
    clock.advance(Duration::from_secs(5));
    succeed(&b).unwrap();
    assert_eq!(b.state(), State::Closed);
    fail(&b).unwrap_err();
    assert_eq!(
        succeed(&b).unwrap_err().retry_after(),
        Some(Duration::from_secs(1))
    );
}

#[test]
fn a_dropped_probe_gives_its_permit_back() {
    let (b, clock) = breaker(1, 1);
    fail(&b).unwrap_err();
    clock.advance(Duration::from_secs(10));
    let probe = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err());
    drop(probe); // cancelled, panicked, never recorded
    let probe = b.try_acquire().unwrap();
    probe.record(Outcome::Success);
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test]
async fn a_cancelled_probe_future_never_leaves_the_breaker_stuck() {
    let (b, clock) = breaker(1, 1);
    fail(&b).unwrap_err();
    clock.advance(Duration::from_secs(10));
    let hung = b.call(async {
        std::future::pending::<()>().await;
        Ok::<(), &str>(())
    });
    // Cancel it after it took the only probe permit.
    let _ = tokio::time::timeout(Duration::from_millis(5), hung).await;
    assert!(b.call(async { Ok::<_, &str>(()) }).await.is_ok());
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn a_panicking_probe_gives_its_permit_back() {
    let (b, clock) = breaker(1, 1);
    fail(&b).unwrap_err();
    clock.advance(Duration::from_secs(10));
    let shared = b.clone();
    let panicked = std::thread::spawn(move || {
        let _ = shared.call_sync(|| -> Result<(), ()> { panic!("handler bug") });
    })
    .join();
    assert!(panicked.is_err());
    succeed(&b).unwrap();
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn ignored_outcomes_are_not_counted_and_return_probe_permits() {
    let (b, clock) = breaker(2, 1);
    let ignore = |_: &Result<(), &str>| Outcome::Ignored;
    for _ in 0..10 {
        let _ = b.call_sync_with(&ignore, || Err("429"));
    }
    assert_eq!(b.state(), State::Closed);
    fail(&b).unwrap_err();
    fail(&b).unwrap_err();
    clock.advance(Duration::from_secs(10));
    let _ = b.call_sync_with(&ignore, || Err("429"));
    assert_eq!(b.state(), State::HalfOpen);
    succeed(&b).unwrap(); // the permit came back
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn outcomes_of_calls_admitted_before_a_transition_are_dropped() {
    let (b, clock) = breaker(1, 1);
    let slow_success = b.try_acquire().unwrap();
    fail(&b).unwrap_err();
    assert_eq!(b.state(), State::Open);
    clock.advance(Duration::from_secs(10));
    let probe = b.try_acquire().unwrap();
    // The old call's success must not count as the probe's.
    slow_success.record(Outcome::Success);
    assert_eq!(b.state(), State::HalfOpen);
    probe.record(Outcome::Failure);
    assert_eq!(b.state(), State::Open);
}

#[test]
fn forced_open_and_disabled_are_operator_switches() {
    let (b, _) = breaker(1, 1);
    b.force_open();
    let err = succeed(&b).unwrap_err();
    assert!(matches!(
        err,
        BreakerError::Open {
            state: State::ForcedOpen,
            retry_after: None
        }
    ));
    b.disable();
    for _ in 0..5 {
        fail(&b).unwrap_err();
    }
    assert_eq!(b.state(), State::Disabled);
    b.reset();
    assert_eq!(b.state(), State::Closed);
    fail(&b).unwrap_err();
    assert_eq!(b.state(), State::Open);
}

#[test]
fn automatic_half_open_is_visible_without_a_call() {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .clock(clock.clone())
        .open_wait(OpenWait::Fixed(Duration::from_secs(3)))
        .automatic_half_open(true)
        .build()
        .unwrap();
    fail(&b).unwrap_err();
    assert_eq!(b.state(), State::Open);
    clock.advance(Duration::from_secs(3));
    assert_eq!(b.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn automatic_half_open_fires_on_a_timer() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let b = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .open_wait(OpenWait::Fixed(Duration::from_secs(3)))
        .automatic_half_open(true)
        .on_event(move |e: &BreakerEvent<'_>| {
            if let BreakerEvent::Transition { to, .. } = e {
                log.lock().unwrap().push(*to);
            }
        })
        .build()
        .unwrap();
    let _ = b.call(async { Err::<(), _>("x") }).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(*events.lock().unwrap(), vec![State::Open, State::HalfOpen]);
}

#[test]
fn a_count_window_opens_on_the_rate_once_it_has_enough_calls() {
    let b = CircuitBreaker::builder()
        .policy(
            CountWindow::builder(10)
                .failure_rate(50.0)
                .minimum_calls(10)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    for i in 0..9 {
        let _ = b.call_sync(|| if i % 2 == 0 { Err("x") } else { Ok(()) });
    }
    assert_eq!(b.state(), State::Closed, "9 calls < minimum");
    fail(&b).unwrap_err();
    assert_eq!(b.state(), State::Open); // 6 of 10 failed
}

#[test]
fn a_time_window_with_slow_calls_opens_when_calls_are_slow() {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .policy(
            TimeWindow::builder(Duration::from_secs(5))
                .failure_rate(50.0)
                .slow_call_rate(Duration::from_millis(500), 50.0)
                .minimum_calls(4)
                .build()
                .unwrap(),
        )
        .clock(clock.clone())
        .build()
        .unwrap();
    for _ in 0..3 {
        let permit = b.try_acquire().unwrap();
        clock.advance(Duration::from_secs(1)); // slow, but successful
        permit.record(Outcome::Success);
    }
    assert_eq!(b.state(), State::Closed);
    let permit = b.try_acquire().unwrap();
    clock.advance(Duration::from_millis(600));
    permit.record(Outcome::Success);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.stats().window.slow_calls, 4);
}

#[test]
fn bad_configuration_is_a_build_error_naming_the_field() {
    let field = |e: stanchion_breaker::BuildError| e.field();
    assert_eq!(
        field(
            CircuitBreaker::builder()
                .half_open_calls(0)
                .build()
                .unwrap_err()
        ),
        "half_open_calls"
    );
    assert_eq!(
        field(
            CircuitBreaker::builder()
                .open_wait(OpenWait::Fixed(Duration::ZERO))
                .build()
                .unwrap_err()
        ),
        "open_wait"
    );
    assert_eq!(
        field(
            CircuitBreaker::builder()
                .open_wait(OpenWait::exponential(
                    Duration::from_secs(1),
                    f64::NAN,
                    Duration::from_secs(2)
                ))
                .build()
                .unwrap_err()
        ),
        "open_wait.multiplier"
    );
    assert_eq!(
        field(CountWindow::builder(0).build().unwrap_err()),
        "window_size"
    );
    assert_eq!(
        field(
            CountWindow::builder(5)
                .failure_rate(150.0)
                .build()
                .unwrap_err()
        ),
        "failure_rate"
    );
    let message = CountWindow::builder(5)
        .failure_rate(150.0)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("failure_rate") && message.contains("150"),
        "{message}"
    );
}

#[test]
fn registry_hands_out_one_shared_breaker_per_name() {
    let registry = Registry::new(|name: &str| {
        CircuitBreaker::builder()
            .name(name)
            .policy(ConsecutiveFailures::new(1)?)
            .build()
    });
    let a = registry.get("replica-a").unwrap();
    let _ = a.call_sync(|| Err::<(), _>(()));
    assert_eq!(registry.get("replica-a").unwrap().state(), State::Open);
    assert_eq!(registry.get("replica-b").unwrap().state(), State::Closed);
    let stats = registry.stats();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[0].0, "replica-a");
    assert_eq!(stats[0].1.state, State::Open);
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<CircuitBreaker>();
    check::<CircuitBreaker<ConsecutiveFailures, ManualClock>>();
    check::<Registry>();
    check::<stanchion_breaker::Pipeline>();
    check::<stanchion_breaker::Retry>();
    check::<stanchion_breaker::Bulkhead>();
    check::<BreakerError<std::io::Error>>();
    fn future_is_send<F: std::future::Future + Send>(_: F) {}
    let b = CircuitBreaker::builder().build().unwrap();
    future_is_send(b.call(async { Ok::<_, std::io::Error>(()) }));
}

#[test]
fn a_policy_that_panics_on_reset_does_not_wedge_the_breaker() {
    #[derive(Debug)]
    struct PanicsOnReset(ConsecutiveFailures);
    impl FailurePolicy for PanicsOnReset {
        fn record(&self, r: &stanchion_breaker::Record) -> bool {
            self.0.record(r)
        }
        fn reset(&self) {
            panic!("policy bug");
        }
    }
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .policy(PanicsOnReset(ConsecutiveFailures::new(1).unwrap()))
        .clock(clock.clone())
        .open_wait(OpenWait::Fixed(Duration::from_secs(1)))
        .half_open_calls(1)
        .build()
        .unwrap();
    let _ = b.call_sync(|| Err::<(), _>(()));
    clock.advance(Duration::from_secs(1));
    // Closing calls `reset`, which panics while the transition lock is held.
    let shared = b.clone();
    let closing = std::thread::spawn(move || shared.call_sync(|| Ok::<_, ()>(()))).join();
    assert!(closing.is_err());
    // Not stuck in half-open: the panicking probe's permit came back.
    assert_eq!(b.state(), State::HalfOpen);
    assert!(b.try_acquire().is_ok());
    // Operators can still switch it.
    b.force_open();
    assert_eq!(b.state(), State::ForcedOpen);
    b.disable();
    assert_eq!(b.state(), State::Disabled);
}

fn rate_rule_breaker(
    probes: u32,
    percent: f64,
) -> (
    CircuitBreaker<ConsecutiveFailures, ManualClock>,
    ManualClock,
) {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .policy(ConsecutiveFailures::new(1).unwrap())
        .clock(clock.clone())
        .open_wait(OpenWait::Fixed(Duration::from_secs(1)))
        .half_open_calls(probes)
        .half_open_failure_rate(percent)
        .build()
        .unwrap();
    fail(&b).unwrap_err();
    clock.advance(Duration::from_secs(1));
    (b, clock)
}

#[test]
fn the_rate_rule_closes_when_few_enough_probes_fail() {
    // resilience4j: 4 permitted probes, 50 %: one failure of four is 25 %, close.
    let (b, _) = rate_rule_breaker(4, 50.0);
    fail(&b).unwrap_err();
    assert_eq!(b.state(), State::HalfOpen, "one failure does not decide");
    succeed(&b).unwrap();
    succeed(&b).unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    succeed(&b).unwrap();
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn the_rate_rule_reopens_when_the_probe_failure_rate_reaches_the_threshold() {
    let (b, _) = rate_rule_breaker(4, 50.0);
    succeed(&b).unwrap();
    fail(&b).unwrap_err();
    assert_eq!(b.state(), State::HalfOpen);
    // Two of four failed: 50 % whatever the last probe does, so it opens now.
    fail(&b).unwrap_err();
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.stats().consecutive_opens, 2);
}

#[test]
fn the_rate_rule_ignores_ignored_probes() {
    let (b, _) = rate_rule_breaker(2, 60.0);
    let p = b.try_acquire().unwrap();
    p.record(Outcome::Ignored);
    fail(&b).unwrap_err(); // 1 of 1 so far
    assert_eq!(b.state(), State::HalfOpen);
    succeed(&b).unwrap(); // 1 of 2 = 50 % < 60 %
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn a_bad_half_open_rate_or_probe_count_is_a_build_error() {
    for bad in [0.0, -1.0, 100.5, f64::NAN] {
        let err = CircuitBreaker::builder()
            .half_open_failure_rate(bad)
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "half_open_failure_rate");
    }
    let err = CircuitBreaker::builder()
        .half_open_calls(70_000)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "half_open_calls");
}

#[test]
fn operator_switches_to_the_current_state_publish_no_transition() {
    let clock = ManualClock::new();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let b = CircuitBreaker::builder()
        .policy(CountWindow::builder(10).minimum_calls(10).build().unwrap())
        .clock(clock)
        .on_event(move |e: &BreakerEvent<'_>| {
            if let BreakerEvent::Transition { from, to, .. } = e {
                log.lock().unwrap().push((*from, *to));
            }
        })
        .build()
        .unwrap();
    for _ in 0..3 {
        fail(&b).unwrap_err();
    }
    assert_eq!(b.stats().window.failures, 3);
    // reset on a closed breaker empties the window but is no transition.
    b.reset();
    assert_eq!(b.stats().window.calls, 0);
    b.disable();
    b.disable();
    b.force_open();
    b.force_open();
    b.reset();
    b.reset();
    assert_eq!(
        *events.lock().unwrap(),
        vec![
            (State::Closed, State::Disabled),
            (State::Disabled, State::ForcedOpen),
            (State::ForcedOpen, State::Closed),
        ]
    );
    assert_eq!(b.stats().transitions, 3);
}

#[test]
fn stats_of_a_time_window_show_only_calls_in_the_window() {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder()
        .policy(
            TimeWindow::builder(Duration::from_secs(10))
                .failure_rate(50.0)
                .slow_call_rate(Duration::from_millis(100), 50.0)
                .minimum_calls(100)
                .build()
                .unwrap(),
        )
        .clock(clock.clone())
        .build()
        .unwrap();
    clock.advance(Duration::from_secs(50));
    for _ in 0..4 {
        fail(&b).unwrap_err();
    }
    assert_eq!(b.stats().window.failures, 4);
    clock.advance(Duration::from_secs(11));
    let w = b.stats().window;
    assert_eq!((w.calls, w.failures, w.slow_calls), (0, 0, 0), "{w:?}");
}
