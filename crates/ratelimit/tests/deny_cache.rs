//! The deny cache answers only what the store would certainly deny, exactly as the store would:
//! compared, request for request, with a limiter that asks Redis every time.
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use stanchion_ratelimit::{Decision, Limits, Quota, RateLimiter, RedisStore, Source, Verdict};
use stanchion_testkit::RedisServer;

type Limiter = RateLimiter<RedisStore<redis::aio::ConnectionManager>>;

async fn pair(server: &RedisServer, limits: Limits) -> (Limiter, Limiter) {
    let make = |capacity: usize, prefix: String| {
        let limits = limits.clone();
        async move {
            let store = RedisStore::new(support::manager(&server.url()).await, &prefix);
            RateLimiter::builder(store, limits)
                .timeout(Duration::from_secs(2))
                .deny_cache_capacity(capacity)
                .build()
                .unwrap()
        }
    };
    (
        make(1000, support::prefix("cached")).await,
        make(0, support::prefix("store-only")).await,
    )
}

/// Equal but for the source and for durations read a moment apart on two clocks.
fn assert_same(cached: &Decision, store: &Decision, what: &str) {
    assert_same_within(cached, store, what, Duration::from_millis(15));
}

/// As [`assert_same`], with durations allowed to differ by `slack` (at least the time between
/// the two reads: on a loaded machine the second read can come tens of milliseconds later).
fn assert_same_within(cached: &Decision, store: &Decision, what: &str, slack: Duration) {
    assert_eq!(
        (cached.verdict, cached.quota, cached.limit, cached.remaining),
        (store.verdict, store.quota, store.limit, store.remaining),
        "{what}: cached {cached:?} store {store:?}"
    );
    let close = |a: Duration, b: Duration| a.abs_diff(b) <= slack;
    assert!(
        close(cached.reset_after, store.reset_after),
        "{what}: {cached:?} {store:?}"
    );
    match (cached.retry_after, store.retry_after) {
        (Some(a), Some(b)) => assert!(close(a, b), "{what}: {cached:?} {store:?}"),
        (a, b) => assert_eq!(a.is_some(), b.is_some(), "{what}: {cached:?} {store:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_quota_denial_is_reported_as_the_store_reports_it() {
    let server = RedisServer::shared().unwrap();
    let limits = Limits::new()
        .with("second", Quota::per_second(10).unwrap())
        .unwrap()
        .with("minute", Quota::per_minute(2).unwrap())
        .unwrap();
    let (cached, store) = pair(server, limits).await;
    for _ in 0..3 {
        cached.check("u", 1).await.unwrap();
        store.check("u", 1).await.unwrap();
    }
    // The fourth request: denied by the per-minute quota (index 1, limit 2, reset ~60 s).
    let from_cache = cached.check("u", 1).await.unwrap();
    let from_store = store.check("u", 1).await.unwrap();
    assert_eq!(from_cache.source, Source::DenyCache, "{from_cache:?}");
    assert_eq!((from_store.quota, from_store.limit), (1, 2));
    assert_same(&from_cache, &from_store, "fourth request");
    assert!(from_cache.reset_after > Duration::from_secs(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cheaper_request_and_a_peek_go_to_the_store() {
    let server = RedisServer::shared().unwrap();
    let (cached, _) = pair(server, Limits::single(Quota::per_minute(5).unwrap())).await;
    assert!(cached.check("u", 3).await.unwrap().is_allowed());
    // Cost 3 with 2 left: denied by the store and remembered.
    let denied = cached.check("u", 3).await.unwrap();
    assert_eq!(
        (denied.verdict, denied.source),
        (Verdict::Denied, Source::Shared)
    );
    assert_eq!(
        cached.check("u", 3).await.unwrap().source,
        Source::DenyCache
    );
    // A peek reports, from the store, and consumes nothing.
    let peek = cached.check("u", 0).await.unwrap();
    assert_eq!(
        (peek.verdict, peek.source, peek.remaining),
        (Verdict::Allowed, Source::Shared, 2)
    );
    // A cheaper request the store admits is admitted.
    let cheaper = cached.check("u", 2).await.unwrap();
    assert_eq!(
        (cheaper.verdict, cheaper.source),
        (Verdict::Allowed, Source::Shared)
    );
}

/// Whether two decisions taken a moment apart may differ only because a token was emitted
/// between the two reads: one of them within `margin` (the time between the reads, at least
/// 15 ms) of the moment its quota's count changes (a multiple of that quota's emission interval
/// `emission[quota]` before `reset_after`), or a denial that ends within `margin`.
fn straddles_an_emission(
    a: &Decision,
    b: &Decision,
    emission: &[Duration],
    margin: Duration,
) -> bool {
    const MARGIN_FLOOR: Duration = Duration::from_millis(15);
    let margin = margin.max(MARGIN_FLOOR);
    let near_boundary = |d: &Decision| {
        let Some(&t) = emission.get(d.quota) else {
            return false;
        };
        let into = Duration::from_nanos((d.reset_after.as_nanos() % t.as_nanos()) as u64);
        into <= margin || t - into <= margin
    };
    let ends_soon = |d: &Decision| d.retry_after.is_some_and(|r| r <= margin);
    if a.verdict != b.verdict {
        return ends_soon(a) || ends_soon(b);
    }
    // A token emitted in between changes the count by one, or makes the other quota the
    // tightest (reported instead, with its own count).
    a.remaining.abs_diff(b.remaining) <= 1
        && (a.remaining != b.remaining || a.quota != b.quota)
        && (near_boundary(a) || near_boundary(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_with_the_deny_cache_equals_the_store_alone() {
    let server = RedisServer::shared().unwrap();
    let burst = Quota::per_second(20).unwrap().burst(4).unwrap();
    let slow = Quota::new(6, Duration::from_secs(2)).unwrap();
    let emission = [burst.emission_interval(), slow.emission_interval()];
    let limits = Limits::new()
        .with("burst", burst)
        .unwrap()
        .with("slow", slow)
        .unwrap();
    let (cached, store) = pair(server, limits).await;
    // A fixed pseudo-random schedule of costs and pauses (xorshift), the same for both.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut from_cache, mut at_a_boundary) = (0, 0);
    // A key whose two copies diverged (one limiter admitted what the other denied) is retired
    // for a fresh one: waiting for it to refill would have to wait for every quota, not only
    // the one a decision reports.
    let mut generation = [0_u32; 2];
    for step in 0..300 {
        let which = usize::from(next() % 3 != 0);
        let key = format!("{}{}", ["a", "b"][which], generation[which]);
        let key = key.as_str();
        let cost = (next() % 4) as u32; // 0 (a peek) to 3
        let before = std::time::Instant::now();
        let c = cached.check(key, cost).await.unwrap();
        let s = store.check(key, cost).await.unwrap();
        // The two decisions were taken at most this far apart.
        let gap = before.elapsed() + Duration::from_millis(5);
        from_cache += usize::from(c.source == Source::DenyCache);
        let same = (c.verdict, c.quota, c.limit, c.remaining)
            == (s.verdict, s.quota, s.limit, s.remaining);
        if !same && straddles_an_emission(&c, &s, &emission, gap) {
            // The two limiters read the time a moment apart and a token was emitted in
            // between: not a difference the cache made. If one admitted what the other
            // denied, their states differ from here on: go on with a fresh key.
            at_a_boundary += 1;
            if c.verdict != s.verdict {
                generation[which] += 1;
            }
            continue;
        }
        let slack = gap.max(Duration::from_millis(15));
        assert_same_within(
            &c,
            &s,
            &format!("step {step}, key {key}, cost {cost}"),
            slack,
        );
        if next() % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(next() % 120)).await;
        }
    }
    eprintln!(
        "300 decisions: {from_cache} from the deny cache, {at_a_boundary} read across an emission"
    );
    assert!(from_cache > 20, "the cache answered {from_cache}");
    // A boundary is a few milliseconds in every 50 or 333: if many decisions "straddle" one,
    // the tolerance is hiding real differences.
    assert!(at_a_boundary <= 10, "{at_a_boundary} decisions differed");
}
