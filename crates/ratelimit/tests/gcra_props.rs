//! Property tests of the GCRA against a plain reference: it never admits more than
//! `rate x time + burst` in any interval, and admits whenever a leaky bucket would.

use std::time::Duration;

use proptest::prelude::*;
use stanchion_ratelimit::{Limits, Quota, Verdict, gcra};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn never_admits_more_than_rate_times_time_plus_burst(
        rate in 1u32..50,
        period_ms in 1u64..5_000,
        burst in 1u32..20,
        steps in prop::collection::vec((0u64..400_000, 0u32..6), 1..300),
    ) {
        let quota = Quota::new(rate, Duration::from_millis(period_ms)).unwrap().burst(burst).unwrap();
        let limits = Limits::single(quota);
        let t = quota.emission_interval().as_micros() as u64;
        let mut state = gcra::State::default();
        let mut now = 1_000_000_000u64;
        // (time, admitted cost) of every admitted request.
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        // Reference: a leaky bucket holding "time owed", draining one microsecond per
        // microsecond; a request adds cost * T and is admitted if the level stays <= burst * T.
        let mut level: u64 = 0;
        let mut last = now;
        for (advance, cost) in steps {
            now += advance;
            level = level.saturating_sub(now - last);
            last = now;
            let d = gcra::check(&limits, &mut state, now, cost);
            let reference_admits = cost <= burst && level + u64::from(cost) * t <= u64::from(burst) * t;
            if cost > burst {
                prop_assert_eq!(d.verdict, Verdict::Impossible);
            } else {
                prop_assert_eq!(d.verdict == Verdict::Allowed, reference_admits, "at {} cost {}", now, cost);
            }
            if d.verdict == Verdict::Allowed {
                level += u64::from(cost) * t;
                admitted.push((now, u64::from(cost)));
            } else if d.verdict == Verdict::Denied {
                // The retry hint is exactly when the reference would admit.
                let wait = d.retry_after.unwrap().as_micros() as u64;
                prop_assert_eq!(level + u64::from(cost) * t - u64::from(burst) * t, wait);
            }
        }
        // Every window [a, b] of admitted requests holds at most burst + (b - a) / T units.
        for i in 0..admitted.len() {
            let mut sum = 0u64;
            for j in i..admitted.len() {
                sum += admitted[j].1;
                let span = admitted[j].0 - admitted[i].0;
                prop_assert!(sum <= u64::from(burst) + span / t, "{} units in {} us", sum, span);
            }
        }
    }

    #[test]
    fn several_quotas_admit_only_what_each_alone_would(
        steps in prop::collection::vec((0u64..300_000, 1u32..4), 1..200),
    ) {
        let fast = Quota::per_second(10).unwrap();
        let slow = Quota::per_minute(30).unwrap().burst(5).unwrap();
        let both = Limits::new().with("fast", fast).unwrap().with("slow", slow).unwrap();
        let mut s_both = gcra::State::default();
        let (mut s_fast, mut s_slow) = (gcra::State::default(), gcra::State::default());
        let mut now = 5_000_000u64;
        for (advance, cost) in steps {
            now += advance;
            let d = gcra::check(&both, &mut s_both, now, cost);
            // Peek each quota alone (cost 0 never consumes), then apply only if both admit.
            let mut f = s_fast; let mut s = s_slow;
            let fast_ok = gcra::check(&Limits::single(fast), &mut f, now, cost).verdict == Verdict::Allowed;
            let slow_ok = gcra::check(&Limits::single(slow), &mut s, now, cost).verdict == Verdict::Allowed;
            prop_assert_eq!(d.verdict == Verdict::Allowed, fast_ok && slow_ok);
            if fast_ok && slow_ok { s_fast = f; s_slow = s; }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The documented bound against the quota's true rate (not its rounded interval): in any
    /// window of admitted requests, at most `burst + span x rate / period` units.
    #[test]
    fn the_true_rate_bound_holds_for_any_quota(
        rate in 1u32..2_000_000,
        period_us in 1u64..4_000_000,
        burst in 1u32..8,
        steps in prop::collection::vec((0u64..20_000, 1u32..3), 1..300),
    ) {
        prop_assume!(u64::from(rate) <= period_us);
        let Ok(quota) = Quota::new(rate, Duration::from_micros(period_us)).and_then(|q| q.burst(burst)) else {
            return Ok(());
        };
        let limits = Limits::single(quota);
        let mut state = gcra::State::default();
        let mut now = 1_000_000_000u64;
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for (advance, cost) in steps {
            now += advance;
            if gcra::check(&limits, &mut state, now, cost).verdict == Verdict::Allowed {
                admitted.push((now, u64::from(cost)));
            }
        }
        for i in 0..admitted.len() {
            let mut sum = 0u128;
            for j in i..admitted.len() {
                sum += u128::from(admitted[j].1);
                let span = u128::from(admitted[j].0 - admitted[i].0);
                let allowed = u128::from(burst) + span * u128::from(rate) / u128::from(period_us);
                prop_assert!(sum <= allowed, "{} units in {} us at {}/{} us, burst {}", sum, span, rate, period_us, burst);
            }
        }
    }
}

#[test]
fn three_per_second_with_a_burst_of_one_denies_a_request_a_third_of_a_second_later() {
    // governor denies the second request; the emission interval used to be rounded down to
    // 333,333 µs and admitted it.
    let limits = Limits::single(Quota::per_second(3).unwrap().burst(1).unwrap());
    let mut state = gcra::State::default();
    let start = 10_000_000u64;
    assert_eq!(
        gcra::check(&limits, &mut state, start, 1).verdict,
        Verdict::Allowed
    );
    assert_eq!(
        gcra::check(&limits, &mut state, start + 333_333, 1).verdict,
        Verdict::Denied
    );
    assert_eq!(
        gcra::check(&limits, &mut state, start + 333_334, 1).verdict,
        Verdict::Allowed
    );
}

#[test]
fn high_rates_never_admit_more_than_a_million_a_second() {
    for rate in [500_001u32, 750_000, 999_999, 1_000_000] {
        let quota = Quota::per_second(rate).unwrap().burst(1).unwrap();
        let limits = Limits::single(quota);
        let mut state = gcra::State::default();
        let mut admitted = 0u64;
        for us in 0..1_000_000u64 {
            if gcra::check(&limits, &mut state, 5_000_000 + us, 1).verdict == Verdict::Allowed {
                admitted += 1;
            }
        }
        assert!(
            admitted <= u64::from(rate) + 1,
            "{rate}/s admitted {admitted}"
        );
    }
}
