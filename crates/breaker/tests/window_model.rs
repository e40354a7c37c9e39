//! The sliding windows open on exactly the call where resilience4j's would: a reference that
//! keeps every call and judges the rates after each one, against random outcomes, durations and
//! clock steps.

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;
use stanchion_breaker::{CountWindow, FailurePolicy, Record, TimeWindow};

#[derive(Debug, Clone, Copy)]
struct Call {
    failure: bool,
    slow: bool,
    /// Seconds the clock moves before this call finishes.
    step: u64,
}

fn call() -> impl Strategy<Value = Call> {
    (
        prop::bool::weighted(0.4),
        prop::bool::weighted(0.3),
        prop_oneof![6 => Just(0u64), 3 => 1u64..3, 1 => 3u64..15],
    )
        .prop_map(|(failure, slow, step)| Call {
            failure,
            slow,
            step,
        })
}

/// Judged after every call, as resilience4j does.
fn exceeded(calls: &[(bool, bool)], minimum: usize, failure_pct: u32, slow_pct: u32) -> bool {
    let n = calls.len();
    if n < minimum || n == 0 {
        return false;
    }
    let failures = calls.iter().filter(|c| c.0).count();
    let slow = calls.iter().filter(|c| c.1).count();
    failures * 100 >= failure_pct as usize * n || slow * 100 >= slow_pct as usize * n
}

fn record(c: &Call, now_s: u64) -> Record {
    Record {
        failure: c.failure,
        elapsed_nanos: if c.slow { 200_000_000 } else { 1_000_000 },
        now_nanos: now_s * 1_000_000_000,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn a_count_window_opens_where_the_reference_does(
        size in 1u32..12,
        minimum_frac in 0.0f64..=1.0,
        failure_pct in 1u32..=100,
        slow_pct in 1u32..=100,
        calls in prop::collection::vec(call(), 1..80),
    ) {
        let minimum = ((f64::from(size) * minimum_frac).ceil() as u32).clamp(1, size);
        let w = CountWindow::builder(size)
            .failure_rate(f64::from(failure_pct))
            .slow_call_rate(Duration::from_millis(100), f64::from(slow_pct))
            .minimum_calls(minimum)
            .build()
            .unwrap();
        let mut kept: VecDeque<(bool, bool)> = VecDeque::new();
        for (i, c) in calls.iter().enumerate() {
            kept.push_back((c.failure, c.slow));
            if kept.len() > size as usize {
                kept.pop_front();
            }
            let expected = exceeded(kept.make_contiguous(), minimum as usize, failure_pct, slow_pct);
            let real = w.record(&record(c, 0));
            prop_assert_eq!(real, expected, "call {} of {:?}", i, calls);
            if real {
                // The breaker opens here and resets the window; the model stops with it.
                break;
            }
        }
    }

    #[test]
    fn a_time_window_opens_where_the_reference_does(
        seconds in 1u64..8,
        minimum in 1u32..10,
        failure_pct in 1u32..=100,
        slow_pct in 1u32..=100,
        calls in prop::collection::vec(call(), 1..80),
    ) {
        let w = TimeWindow::builder(Duration::from_secs(seconds))
            .failure_rate(f64::from(failure_pct))
            .slow_call_rate(Duration::from_millis(100), f64::from(slow_pct))
            .minimum_calls(minimum)
            .build()
            .unwrap();
        let mut now = 1000u64;
        let mut kept: Vec<(u64, bool, bool)> = Vec::new();
        for (i, c) in calls.iter().enumerate() {
            now += c.step;
            kept.push((now, c.failure, c.slow));
            kept.retain(|k| k.0 + seconds > now);
            let judged: Vec<(bool, bool)> = kept.iter().map(|k| (k.1, k.2)).collect();
            let expected = exceeded(&judged, minimum as usize, failure_pct, slow_pct);
            let real = w.record(&record(c, now));
            prop_assert_eq!(real, expected, "call {} of {:?}", i, calls);
            prop_assert_eq!(w.counts_at(now * 1_000_000_000).calls, judged.len() as u64);
            if real {
                break;
            }
        }
    }
}
