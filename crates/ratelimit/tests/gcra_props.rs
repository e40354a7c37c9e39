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
        let mut state = [0u64; 4];
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
        let mut s_both = [0u64; 4];
        let (mut s_fast, mut s_slow) = ([0u64; 4], [0u64; 4]);
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
