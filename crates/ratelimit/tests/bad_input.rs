//! Bad input gets a clear error or a documented safe behaviour, never a panic.

use std::time::Duration;

use stanchion_ratelimit::{
    ConcurrencyLimiter, FailureMode, KeyError, Limits, LocalLimiter, Plans, Quota, RateLimiter,
    Verdict,
};

#[test]
fn invalid_quotas_name_their_field() {
    let field = |r: Result<Quota, stanchion_ratelimit::QuotaError>| r.unwrap_err().field();
    assert_eq!(field(Quota::new(0, Duration::from_secs(1))), "rate");
    assert_eq!(field(Quota::new(10, Duration::ZERO)), "period");
    assert_eq!(
        field(Quota::new(10, Duration::from_secs(400 * 86_400))),
        "period"
    );
    assert_eq!(
        field(Quota::new(10, Duration::from_secs(u64::MAX))),
        "period"
    );
    assert_eq!(field(Quota::per_second(10).unwrap().burst(0)), "burst");
    // Faster than one request per microsecond cannot be represented.
    assert_eq!(field(Quota::per_second(2_000_000)), "rate");
    // A burst whose refill takes centuries.
    assert_eq!(field(Quota::per_hour(1).unwrap().burst(u32::MAX)), "burst");
    let err = Quota::new(0, Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rate") && err.contains("at least 1"), "{err}");
    // Converted for `?` in a builder chain: same field, same message.
    let quota_err = Quota::per_second(2_000_000).unwrap_err();
    let build_err = stanchion_ratelimit::BuildError::from(quota_err);
    assert_eq!(build_err.field(), "rate");
    assert_eq!(build_err.to_string(), quota_err.to_string());
}

/// Quotas are constants: the constructors are `const fn`.
#[test]
fn quotas_can_be_constants() {
    const LOGIN: Quota = match Quota::per_minute(5) {
        Ok(q) => match q.burst(2) {
            Ok(q) => q,
            Err(_) => panic!("burst"),
        },
        Err(_) => panic!("rate"),
    };
    const TOO_FAST: Result<Quota, stanchion_ratelimit::QuotaError> = Quota::per_second(2_000_000);
    assert_eq!(LOGIN.burst_size(), 2);
    assert_eq!(LOGIN.emission_interval(), Duration::from_secs(12));
    assert_eq!(TOO_FAST.unwrap_err().field(), "rate");
}

#[test]
fn invalid_limit_sets_and_plans_are_rejected() {
    let q = Quota::per_second(1).unwrap();
    assert_eq!(Limits::new().with("", q).unwrap_err().field(), "limit name");
    assert_eq!(
        Limits::new().with("bad name", q).unwrap_err().field(),
        "limit name"
    );
    assert_eq!(
        Limits::new()
            .with("a", q)
            .unwrap()
            .with("a", q)
            .unwrap_err()
            .field(),
        "limit name"
    );
    let five = (0..5).try_fold(Limits::new(), |l, i| l.with(&format!("q{i}"), q));
    assert_eq!(five.unwrap_err().field(), "limits");
    assert_eq!(
        Plans::new(vec![], |_: &str| 0).unwrap_err().field(),
        "plans"
    );
    assert_eq!(
        Plans::new(vec![Limits::new()], |_: &str| 0)
            .unwrap_err()
            .field(),
        "plans"
    );
}

#[tokio::test]
async fn limiter_settings_and_keys_are_checked() {
    let store = || LocalLimiter::<String>::new(Limits::new()).unwrap();
    let limits = Limits::single(Quota::per_second(5).unwrap());
    let build = |b: stanchion_ratelimit::RateLimiterBuilder<LocalLimiter<String>, Limits>| {
        b.build().unwrap_err().field()
    };
    assert_eq!(
        build(RateLimiter::builder(store(), limits.clone()).timeout(Duration::ZERO)),
        "timeout"
    );
    assert_eq!(
        build(
            RateLimiter::builder(store(), limits.clone())
                .failure_mode(FailureMode::Local { instances: 0 })
        ),
        "failure_mode.instances"
    );
    // Durations that would overflow `now + recheck` are refused, not left to panic later.
    assert_eq!(
        build(RateLimiter::builder(store(), limits.clone()).recheck_interval(Duration::MAX)),
        "recheck_interval"
    );
    assert_eq!(
        build(RateLimiter::builder(store(), limits.clone()).timeout(Duration::MAX)),
        "timeout"
    );
    // An empty set of limits would allow everything: refused.
    assert_eq!(
        build(RateLimiter::builder(store(), Limits::new())),
        "limits"
    );
    let limiter = RateLimiter::builder(store(), limits)
        .max_key_len(64)
        .build()
        .unwrap();
    assert_eq!(limiter.check("", 1).await.unwrap_err(), KeyError::Empty);
    let long = "x".repeat(65);
    assert_eq!(
        limiter.check(&long, 1).await.unwrap_err(),
        KeyError::TooLong { len: 65, max: 64 }
    );
    // Unicode and control characters are just bytes of a key.
    assert!(
        limiter
            .check("ключ\u{0}\n{}", 1)
            .await
            .unwrap()
            .is_allowed()
    );
    // A cost above the burst is "impossible", not a denial with a retry time.
    let d = limiter.check("k", 6).await.unwrap();
    assert_eq!(d.verdict, Verdict::Impossible);
    assert_eq!(d.retry_after, None);
    // Huge costs do not overflow.
    assert_eq!(
        limiter.check("k", u32::MAX).await.unwrap().verdict,
        Verdict::Impossible
    );
    assert_eq!(
        ConcurrencyLimiter::new(0).unwrap_err().field(),
        "max_in_flight"
    );
}
