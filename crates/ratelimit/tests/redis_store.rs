//! The Redis store on a real server and a real cluster: the script agrees with the Rust GCRA,
//! shared limits are accurate across limiter instances, keys expire, corrupt state is reported.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use stanchion_ratelimit::{
    FailureMode, Limits, Quota, RateLimitStore, RateLimiter, RedisStore, Source, Verdict, gcra,
};
use stanchion_testkit::{RedisCluster, RedisServer};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The Lua script and `gcra::check` are the same algorithm: identical decisions, step by step.
    #[test]
    fn the_script_decides_exactly_like_the_rust_gcra(
        rate in 1u32..20,
        burst in 1u32..10,
        second_rate in 1u32..100,
        two in any::<bool>(),
        steps in prop::collection::vec((0u64..500_000, 0u32..5), 1..40),
    ) {
        let rt = runtime();
        let server = RedisServer::shared().unwrap();
        let first = Limits::new()
            .with("a", Quota::per_second(rate).unwrap().burst(burst).unwrap()).unwrap();
        // One quota takes the Rust fast path, two the general one: both must match the script.
        let limits = if two {
            first.with("b", Quota::per_minute(second_rate).unwrap()).unwrap()
        } else {
            first
        };
        let key = support::prefix("equiv");
        rt.block_on(async {
            let conn = support::manager(&server.url()).await;
            let mut state = gcra::State::default();
            let mut now = 1_700_000_000_000_000u64;
            for (advance, cost) in steps {
                now += advance;
                let store = RedisStore::new(conn.clone(), "eq:").with_fixed_now(now);
                let theirs = store.check(&key, &limits, cost).await.unwrap();
                let ours = gcra::check(&limits, &mut state, now, cost);
                prop_assert_eq!(theirs.verdict, ours.verdict);
                prop_assert_eq!(theirs.quota, ours.quota);
                prop_assert_eq!(theirs.remaining, ours.remaining);
                prop_assert_eq!(theirs.reset_after, ours.reset_after);
                prop_assert_eq!(theirs.retry_after, ours.retry_after);
            }
            Ok(())
        })?;
    }
}

/// Four limiter instances, each with its own connection, hammer one key.
async fn hammer(stores: Vec<RateLimiter<impl RateLimitStore>>, seconds: f64) -> (u64, f64, u64) {
    let admitted = Arc::new(AtomicU64::new(0));
    let fallbacks = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for limiter in stores {
        for _ in 0..8 {
            let (limiter, admitted, fallbacks) =
                (limiter.clone(), admitted.clone(), fallbacks.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let d = limiter.check("hot-key", 1).await.unwrap();
                    if d.source == Source::Fallback {
                        fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    if d.is_allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    (
        admitted.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        fallbacks.load(Ordering::Relaxed),
    )
}

fn assert_accurate(admitted: u64, elapsed: f64, rate: f64, burst: f64) {
    let most = burst + rate * elapsed + 1.0;
    // The server saw the first and last check up to a round trip inside our interval.
    let least = 0.99 * (burst + rate * (elapsed - 0.01));
    eprintln!("admitted {admitted} in {elapsed:.3}s: allowed range [{least:.0}, {most:.0}]");
    assert!((admitted as f64) <= most, "admitted {admitted} > {most}");
    assert!((admitted as f64) >= least, "admitted {admitted} < {least}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_share_one_quota_accurately_on_a_single_redis() {
    let server = RedisServer::shared().unwrap();
    let limits = Limits::single(Quota::per_second(1000).unwrap().burst(200).unwrap());
    let prefix = support::prefix("acc");
    let mut limiters = Vec::new();
    for _ in 0..4 {
        let store = RedisStore::new(support::manager(&server.url()).await, &prefix);
        limiters.push(
            RateLimiter::builder(store, limits.clone())
                .timeout(Duration::from_secs(2))
                .failure_mode(FailureMode::Closed)
                .deny_cache_capacity(0)
                .build()
                .unwrap(),
        );
    }
    let (admitted, elapsed, fallbacks) = hammer(limiters, 3.0).await;
    assert_eq!(fallbacks, 0);
    assert_accurate(admitted, elapsed, 1000.0, 200.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_share_one_quota_accurately_on_redis_cluster() {
    let cluster = RedisCluster::shared().unwrap();
    let limits = Limits::single(Quota::per_second(1000).unwrap().burst(200).unwrap());
    let prefix = support::prefix("cluster");
    let mut limiters = Vec::new();
    for _ in 0..4 {
        let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
        let conn = client.get_async_connection().await.unwrap();
        limiters.push(
            RateLimiter::builder(RedisStore::new(conn, &prefix), limits.clone())
                .timeout(Duration::from_secs(2))
                .failure_mode(FailureMode::Closed)
                .deny_cache_capacity(0)
                .build()
                .unwrap(),
        );
    }
    let (admitted, elapsed, fallbacks) = hammer(limiters, 3.0).await;
    assert_eq!(fallbacks, 0);
    assert_accurate(admitted, elapsed, 1000.0, 200.0);
}

#[tokio::test]
async fn several_keys_spread_over_cluster_slots_all_work() {
    let cluster = RedisCluster::shared().unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let store = RedisStore::new(
        client.get_async_connection().await.unwrap(),
        &support::prefix("slots"),
    );
    let limits = Limits::new()
        .with("s", Quota::per_second(2).unwrap())
        .unwrap()
        .with("m", Quota::per_minute(100).unwrap())
        .unwrap();
    for k in 0..50 {
        let key = format!("user-{k}");
        assert!(store.check(&key, &limits, 1).await.unwrap().is_allowed());
        assert!(store.check(&key, &limits, 1).await.unwrap().is_allowed());
        let third = store.check(&key, &limits, 1).await.unwrap();
        assert_eq!(third.verdict, Verdict::Denied);
        assert_eq!(third.quota, 0);
    }
}

#[tokio::test]
async fn state_expires_when_the_key_is_back_to_full_capacity() {
    let server = RedisServer::shared().unwrap();
    let conn = support::manager(&server.url()).await;
    let store = RedisStore::new(conn.clone(), &support::prefix("ttl"));
    let limits = Limits::single(Quota::per_second(10).unwrap());
    store.check("k", &limits, 3).await.unwrap();
    let mut c = conn.clone();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(store.redis_key("k"))
        .query_async(&mut c)
        .await
        .unwrap();
    // 300 ms of debt, plus the one second a key may outlive its state (so most writes keep
    // the TTL instead of moving it).
    assert!(
        (1250..=1302).contains(&ttl),
        "TTL {ttl} ms for 300 ms of debt and 1 s of slack"
    );
    // A peek (cost 0) does not write.
    let other: RedisStore<_> = RedisStore::new(conn.clone(), &support::prefix("peek"));
    other.check("k", &limits, 0).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(other.redis_key("k"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

/// The stored state of one quota: expiry (ms) and TAT (us), two little-endian doubles.
fn decode_state(state: &[u8]) -> (f64, f64) {
    assert_eq!(state.len(), 16, "two doubles, got {state:?}");
    let expiry = f64::from_le_bytes(state[..8].try_into().unwrap());
    let tat = f64::from_le_bytes(state[8..].try_into().unwrap());
    (expiry, tat)
}

#[tokio::test]
async fn corrupt_state_is_reported_and_replaced_not_trusted() {
    let server = RedisServer::shared().unwrap();
    let conn = support::manager(&server.url()).await;
    let store = RedisStore::new(conn.clone(), &support::prefix("corrupt"));
    let limits = Limits::single(Quota::per_second(1).unwrap());
    let mut c = conn.clone();
    let set = |key: String, value: Vec<u8>| {
        let mut c = conn.clone();
        async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .query_async::<()>(&mut c)
                .await
                .unwrap()
        }
    };
    set(store.redis_key("k"), b"not-a-number".to_vec()).await;
    let d = store.check("k", &limits, 1).await.unwrap();
    assert!(d.is_allowed());
    let state: Vec<u8> = redis::cmd("GET")
        .arg(store.redis_key("k"))
        .query_async(&mut c)
        .await
        .unwrap();
    let (expiry_ms, tat_us) = decode_state(&state);
    let wall_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as f64;
    assert!(
        (tat_us - wall_us).abs() < 60e6 && expiry_ms * 1000.0 >= tat_us,
        "replaced by a fresh state, got expiry {expiry_ms} ms, TAT {tat_us} us"
    );
    // Sixteen bytes that are not two whole non-negative numbers are as corrupt as text.
    let negative = [(-5f64).to_le_bytes(), 1.5f64.to_le_bytes()].concat();
    set(store.redis_key("neg"), negative).await;
    assert!(store.check("neg", &limits, 1).await.unwrap().is_allowed());
    let nan = [f64::NAN.to_le_bytes(), f64::INFINITY.to_le_bytes()].concat();
    set(store.redis_key("nan"), nan).await;
    assert!(store.check("nan", &limits, 1).await.unwrap().is_allowed());
    assert!(store.check("nan", &limits, 1).await.unwrap().verdict == Verdict::Denied);
    // A key of the wrong type is an error the failure mode handles, never a panic.
    redis::cmd("HSET")
        .arg(store.redis_key("hash"))
        .arg("f")
        .arg("x")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    assert!(store.check("hash", &limits, 1).await.is_err());
}

#[tokio::test]
async fn a_denied_key_is_remembered_locally_until_its_retry_time() {
    let server = RedisServer::shared().unwrap();
    let store = RedisStore::new(
        support::manager(&server.url()).await,
        &support::prefix("deny"),
    );
    // A generous timeout: this test is about the deny cache, and the shared server is busy with
    // the other tests of this file.
    let limiter = RateLimiter::builder(store, Limits::single(Quota::per_second(1).unwrap()))
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    assert_eq!(
        limiter.check("abuser", 1).await.unwrap().source,
        Source::Shared
    );
    let denied = limiter.check("abuser", 1).await.unwrap();
    assert_eq!(
        (denied.verdict, denied.source),
        (Verdict::Denied, Source::Shared)
    );
    for _ in 0..100 {
        let d = limiter.check("abuser", 1).await.unwrap();
        assert_eq!((d.verdict, d.source), (Verdict::Denied, Source::DenyCache));
        assert!(d.retry_after.unwrap() <= Duration::from_secs(1));
    }
    tokio::time::sleep(denied.retry_after.unwrap()).await;
    let again = limiter.check("abuser", 1).await.unwrap();
    assert_eq!(
        (again.verdict, again.source),
        (Verdict::Allowed, Source::Shared)
    );
}

#[tokio::test]
async fn shadow_mode_allows_and_flags_would_be_denials() {
    let server = RedisServer::shared().unwrap();
    let store = RedisStore::new(
        support::manager(&server.url()).await,
        &support::prefix("shadow"),
    );
    let limiter = RateLimiter::builder(store, Limits::single(Quota::per_minute(1).unwrap()))
        .shadow(true)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let first = limiter.check("k", 1).await.unwrap();
    assert!(first.is_allowed() && !first.shadow_denied);
    for _ in 0..3 {
        let d = limiter.check("k", 1).await.unwrap();
        assert!(d.is_allowed());
        assert!(d.shadow_denied);
    }
}

#[tokio::test]
async fn per_key_plans_apply_their_own_quota_through_redis() {
    let server = RedisServer::shared().unwrap();
    let store = RedisStore::new(
        support::manager(&server.url()).await,
        &support::prefix("plans"),
    );
    let plans = stanchion_ratelimit::Plans::new(
        vec![
            Limits::single(Quota::per_minute(2).unwrap()),
            Limits::single(Quota::per_minute(5).unwrap()),
        ],
        |key: &str| usize::from(key.starts_with("paid:")),
    )
    .unwrap();
    let limiter = RateLimiter::with_selector(store, plans).build().unwrap();
    let mut free = 0;
    let mut paid = 0;
    for _ in 0..10 {
        free += u32::from(limiter.check("free:a", 1).await.unwrap().is_allowed());
        paid += u32::from(limiter.check("paid:b", 1).await.unwrap().is_allowed());
    }
    assert_eq!((free, paid), (2, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_checks_keep_exact_counts_on_one_server() {
    let server = RedisServer::shared().unwrap();
    let store = RedisStore::new(
        support::manager(&server.url()).await,
        &support::prefix("batch"),
    );
    let limits = Limits::single(Quota::per_minute(10).unwrap());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (store, limits) = (store.clone(), limits.clone());
        tasks.push(tokio::spawn(async move {
            let key = if i % 2 == 0 { "same" } else { "other" };
            store.check(key, &limits, 1).await.unwrap().is_allowed()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += u32::from(t.await.unwrap());
    }
    assert_eq!(admitted, 20, "10 per key, whatever the batching");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_checks_over_many_cluster_slots_are_split_by_slot() {
    let cluster = RedisCluster::shared().unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let store = RedisStore::new(
        client.get_async_connection().await.unwrap(),
        &support::prefix("slots-batch"),
    );
    let limits = Limits::single(Quota::per_minute(4).unwrap());
    let mut tasks = Vec::new();
    for i in 0..400 {
        let (store, limits) = (store.clone(), limits.clone());
        tasks.push(tokio::spawn(async move {
            store.check(&format!("user-{}", i % 50), &limits, 1).await
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        // Every check is answered: batches that span slots are split, never failed.
        admitted += u32::from(t.await.unwrap().unwrap().is_allowed());
    }
    assert_eq!(admitted, 200, "4 per key over 50 keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_checks_in_flight_are_coalesced() {
    let server = RedisServer::shared().unwrap();
    let store = RedisStore::new(
        support::manager(&server.url()).await,
        &support::prefix("coalesce"),
    );
    let limits = Limits::single(Quota::per_second(1_000_000).unwrap());
    let mut tasks = Vec::new();
    for t in 0..64 {
        let (store, limits) = (store.clone(), limits.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                store
                    .check(&format!("k{}", (t * 50 + i) % 1000), &limits, 1)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = store.batch_stats();
    eprintln!(
        "{stats:?}: {:.1} checks per script call",
        stats.checks as f64 / stats.script_calls as f64
    );
    assert_eq!(stats.checks, 64 * 50);
    assert!(stats.script_calls * 2 < stats.checks, "{stats:?}");
}

#[tokio::test]
async fn a_key_repeated_in_one_batch_sees_its_own_earlier_checks() {
    let server = RedisServer::shared().unwrap();
    let conn = support::manager(&server.url()).await;
    let store =
        RedisStore::new(conn, &support::prefix("dup")).with_fixed_now(1_700_000_000_000_000);
    let limits = Limits::single(Quota::per_minute(10).unwrap());
    let checks = (0..40).map(|_| store.check("one-key", &limits, 1));
    let decisions: Vec<_> = futures_join_all(checks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let allowed = decisions.iter().filter(|d| d.is_allowed()).count();
    assert_eq!(allowed, 10, "a burst of 10 admits 10 of 40, batched or not");
    let stats = store.batch_stats();
    assert!(
        stats.checks > stats.script_calls,
        "the checks were coalesced: {stats:?}"
    );
}

#[tokio::test]
async fn mixed_limits_and_costs_in_one_batch_decide_like_the_rust_gcra() {
    let server = RedisServer::shared().unwrap();
    let conn = support::manager(&server.url()).await;
    let now = 1_700_000_000_000_000u64;
    let store = RedisStore::new(conn, &support::prefix("mixed")).with_fixed_now(now);
    let sets = [
        Limits::single(Quota::per_second(5).unwrap()),
        Limits::new()
            .with("s", Quota::per_second(3).unwrap().burst(2).unwrap())
            .unwrap()
            .with("h", Quota::per_hour(100).unwrap())
            .unwrap(),
        Limits::single(Quota::per_minute(7).unwrap().burst(4).unwrap()),
    ];
    let cases: Vec<(String, usize, u32)> = (0..48)
        .map(|i| (format!("key-{i}"), i % 3, (i % 7) as u32))
        .collect();
    let checks = cases
        .iter()
        .map(|(key, set, cost)| store.check(key, &sets[*set], *cost));
    let decisions = futures_join_all(checks).await;
    for ((key, set, cost), theirs) in cases.iter().zip(decisions) {
        let theirs = theirs.unwrap();
        let ours = gcra::check(&sets[*set], &mut gcra::State::default(), now, *cost);
        assert_eq!(
            (theirs.verdict, theirs.quota, theirs.remaining),
            (ours.verdict, ours.quota, ours.remaining),
            "{key}: set {set}, cost {cost}"
        );
        assert_eq!(theirs.reset_after, ours.reset_after, "{key}");
        assert_eq!(theirs.retry_after, ours.retry_after, "{key}");
    }
    let stats = store.batch_stats();
    assert!(stats.checks > stats.script_calls, "coalesced: {stats:?}");
}

#[tokio::test]
async fn a_key_never_expires_before_its_state_stops_mattering() {
    let server = RedisServer::shared().unwrap();
    let conn = support::manager(&server.url()).await;
    let store = RedisStore::new(conn.clone(), &support::prefix("keepttl"));
    let limits = Limits::single(Quota::per_second(10).unwrap());
    let mut c = conn.clone();
    // Writes mostly keep the TTL; whatever the path, the key must live at least until the
    // state is back to full (reset_after) and at most a second longer.
    for round in 0..12 {
        let asked = std::time::Instant::now();
        let d = store.check("k", &limits, 1 + round % 3).await.unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(store.redis_key("k"))
            .query_async(&mut c)
            .await
            .unwrap();
        // The TTL was read up to this long after the script set it (a loaded machine can take
        // tens of milliseconds between the two commands); it has run down by as much.
        let since = asked.elapsed().as_millis() as i64;
        let reset = d.reset_after.as_millis() as i64;
        assert!(
            ttl >= reset - since - 2 && ttl <= reset + 1002,
            "round {round}: TTL {ttl} ms for {reset} ms to full capacity, read {since} ms later"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// Polls every future together on this task, so their checks reach the store at once.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_without_the_caller_noticing() {
    // A server of its own: flushing the shared one would disturb the other tests.
    let server = RedisServer::start().unwrap();
    let conn = support::manager(&server.url()).await;
    let store = RedisStore::new(conn.clone(), &support::prefix("noscript"));
    let limits = Limits::single(Quota::per_minute(100).unwrap());
    assert!(store.check("k", &limits, 1).await.unwrap().is_allowed());
    let mut c = conn.clone();
    for _ in 0..3 {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut c)
            .await
            .unwrap();
        let d = store.check("k", &limits, 1).await.unwrap();
        assert!(d.is_allowed(), "{d:?}");
    }
    // The state survived the reloads: four checks so far.
    assert_eq!(store.check("k", &limits, 0).await.unwrap().remaining, 96);
}

#[tokio::test]
async fn empty_limits_allow_without_touching_redis() {
    let server = RedisServer::shared().unwrap();
    let conn = support::manager(&server.url()).await;
    let store = RedisStore::new(conn.clone(), &support::prefix("empty"));
    let d = store.check("k", &Limits::new(), 5).await.unwrap();
    assert!(d.is_allowed());
    assert_eq!(store.batch_stats().script_calls, 0);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(store.redis_key("k"))
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

/// Coalescing waits only to match a larger call already in flight: a check arriving while a
/// single-check call is under way goes out at once, one round trip, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_behind_a_small_call_is_not_held_back() {
    use stanchion_testkit::{Fault, FaultProxy};
    let server = RedisServer::shared().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let conn = support::manager(&format!("redis://{}/", proxy.addr())).await;
    let store = RedisStore::new(conn, &support::prefix("behind"));
    let limits = Limits::single(Quota::per_second(1000).unwrap());
    store.check("warm", &limits, 1).await.unwrap();
    let one_way = Duration::from_millis(100);
    proxy.set(Fault::Latency(one_way));
    let first = {
        let (store, limits) = (store.clone(), limits.clone());
        tokio::spawn(async move { store.check("a", &limits, 1).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = Instant::now();
    let second = store.check("b", &limits, 1).await.unwrap();
    let took = start.elapsed();
    assert!(second.is_allowed());
    assert!(first.await.unwrap().unwrap().is_allowed());
    // One round trip is 200 ms; waiting for the first call to return would make it about 380.
    assert!(
        took < Duration::from_millis(300),
        "the second check took {took:?}"
    );
    assert_eq!(
        store.batch_stats().script_calls,
        3,
        "warm-up, first, second"
    );
}

#[tokio::test]
async fn a_key_of_another_type_fails_only_that_key_not_the_store() {
    let server = RedisServer::shared().unwrap();
    let conn = support::manager(&server.url()).await;
    let store = RedisStore::new(conn.clone(), &support::prefix("wrongtype"));
    let hash_key = store.redis_key("taken");
    let limiter = RateLimiter::builder(store, Limits::single(Quota::per_second(5).unwrap()))
        .timeout(Duration::from_secs(2))
        .failure_mode(stanchion_ratelimit::FailureMode::Open)
        .build()
        .unwrap();
    let mut c = conn.clone();
    redis::cmd("HSET")
        .arg(&hash_key)
        .arg("f")
        .arg("x")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let bad = limiter.check("taken", 1).await.unwrap();
    assert_eq!(bad.source, Source::Fallback, "{bad:?}");
    assert!(
        !limiter.is_store_down(),
        "one bad entry marked the whole store down"
    );
    for i in 0..20 {
        let d = limiter.check(&format!("fine-{i}"), 1).await.unwrap();
        assert_eq!(d.source, Source::Shared, "key {i}: {d:?}");
    }
    // The foreign value is left as it was.
    let kind: String = redis::cmd("TYPE")
        .arg(&hash_key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
}

/// The largest burst a quota of `rate` per `period` accepts.
fn largest_burst(rate: u32, period: Duration) -> u32 {
    let (mut lo, mut hi) = (1u32, u32::MAX);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if Quota::new(rate, period).unwrap().burst(mid).is_ok() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// At the largest capacity a quota accepts, and with clocks far ahead of today, every number
/// the script computes (a TAT plus a whole burst of emission intervals) stays below 2^53, where
/// Lua's doubles are exact: its decisions equal the Rust GCRA's to the microsecond.
#[tokio::test]
async fn the_largest_quotas_decide_exactly_like_the_rust_gcra_for_a_century() {
    let server = RedisServer::shared().unwrap();
    let conn = support::manager(&server.url()).await;
    let year = 365 * 24 * 3600 * 1_000_000u64;
    for (rate, period) in [
        (1, stanchion_ratelimit::MAX_PERIOD),
        (7, stanchion_ratelimit::MAX_PERIOD),
        (3, Duration::from_secs(86_401)),
        (1_000_003, Duration::from_secs(3)),
    ] {
        let burst = largest_burst(rate, period);
        let limits = Limits::single(Quota::new(rate, period).unwrap().burst(burst).unwrap());
        // Today, 2100 and 2126 (an odd number of microseconds, so rounding would show).
        for start in [
            1_764_000_000_000_001u64,
            4_102_444_800_000_001,
            4_102_444_800_000_001 + 26 * year,
        ] {
            let key = support::prefix("exact");
            let mut state = gcra::State::default();
            for (step, (advance, cost)) in [(0, burst), (1, burst), (1, 1), (3, burst / 2), (0, 0)]
                .into_iter()
                .enumerate()
            {
                let now = start + advance;
                let store = RedisStore::new(conn.clone(), "exact:").with_fixed_now(now);
                let theirs = store.check(&key, &limits, cost).await.unwrap();
                let ours = gcra::check(&limits, &mut state, now, cost);
                let what =
                    format!("{rate} per {period:?}, burst {burst}, start {start}, step {step}");
                assert_eq!(theirs.verdict, ours.verdict, "{what}");
                assert_eq!(theirs.remaining, ours.remaining, "{what}");
                assert_eq!(theirs.reset_after, ours.reset_after, "{what}");
                assert_eq!(theirs.retry_after, ours.retry_after, "{what}");
            }
        }
    }
}

/// A batch over many hash slots goes out as one script call per slot, all at once (not one
/// after another): with 64 checks in flight over 64 keys in distinct slots, dozens of calls are
/// under way together, and every check is still answered exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_many_cluster_slots_sends_its_slot_groups_at_once() {
    use redis::cluster_routing::Slot;
    let cluster = RedisCluster::shared().unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let (watched, watch) = support::Watched::new(client.get_async_connection().await.unwrap());
    let store = RedisStore::new(watched, &support::prefix("slots-at-once")).for_cluster();
    // 64 keys, each in a slot of its own.
    let mut keys: Vec<String> = Vec::new();
    let mut slots = std::collections::HashSet::new();
    for i in 0.. {
        let key = format!("client-{i}");
        if slots.insert(Slot::for_key(store.redis_key(&key))) {
            keys.push(key);
        }
        if keys.len() == 64 {
            break;
        }
    }
    let limits = Limits::single(Quota::per_minute(5).unwrap());
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for round in 0..8 {
        for key in &keys {
            let (store, limits, key) = (store.clone(), limits.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                (round, store.check(&key, &limits, 1).await)
            }));
        }
    }
    let mut admitted = 0;
    for t in tasks {
        let (_, d) = t.await.unwrap();
        admitted += u32::from(d.unwrap().is_allowed());
    }
    let took = start.elapsed();
    let stats = store.batch_stats();
    let most = watch.most.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("512 checks over 64 slots in {took:?}; {stats:?}; {most} calls in flight at most");
    assert_eq!(admitted, 64 * 5, "5 per key");
    // Two batches may be under way; each sends its slot groups together.
    assert!(
        most > 8,
        "at most {most} calls in flight: slot groups went one by one"
    );
}
