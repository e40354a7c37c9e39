//! stanchion-ratelimit next to governor 0.10 (in-process) and a bare EVALSHA (Redis), in one run.
//!
//! `cargo bench -p stanchion-benches --bench ratelimit && scripts/bench-report`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use stanchion_ratelimit::{Limits, LocalLimiter, Quota, RateLimitStore, RedisStore};
use stanchion_testkit::{RedisCluster, RedisServer};

const KEYS: u64 = 10_000;

const MINIMAL_GCRA: &str = r#"
local t = redis.call("TIME")
local now = t[1] * 1000000 + t[2]
local em = tonumber(ARGV[1]) local cap = tonumber(ARGV[2])
local tat = tonumber(redis.call("GET", KEYS[1])) or now
if tat < now then tat = now end
local new = tat + em
if new - now > cap then return {1, 0} end
redis.call("SET", KEYS[1], string.format("%d", new), "PX", math.floor((new - now) / 1000) + 1)
return {0, math.floor((cap - (new - now)) / em)}
"#;

/// The same minimal GCRA for every key of one call (the ceiling of a script that coalesces
/// checks, as the store does): `ARGV[1]` emission interval, `ARGV[2]` capacity.
const MINIMAL_GCRA_MANY: &str = r#"
local t = redis.call("TIME")
local now = t[1] * 1000000 + t[2]
local em = tonumber(ARGV[1]) local cap = tonumber(ARGV[2])
local tats = redis.call("MGET", unpack(KEYS))
local out = {}
for i, key in ipairs(KEYS) do
  local tat = tonumber(tats[i]) or now
  if tat < now then tat = now end
  local new = tat + em
  if new - now > cap then out[i] = 0 else
    redis.call("SET", key, string.format("%d", new), "PX", math.floor((new - now) / 1000) + 1)
    out[i] = math.floor((cap - (new - now)) / em) + 1
  end
end
return out
"#;

fn in_process(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit_keyed");
    let per_second = NonZeroU32::new(1_000_000).expect("non-zero");
    let governor = governor::RateLimiter::keyed(governor::Quota::per_second(per_second));
    let ours =
        LocalLimiter::<u64>::new(Limits::single(Quota::per_second(1_000_000).unwrap())).unwrap();
    // Warm both maps with every key.
    for k in 0..KEYS {
        let _ = governor.check_key(&k);
        let _ = ours.check(&k, 1);
    }
    let mut k = 0u64;
    g.bench_function("governor_check_key", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            black_box(governor.check_key(&k).is_ok())
        })
    });
    let mut k = 0u64;
    g.bench_function("stanchion_local_check", |b| {
        b.iter(|| {
            k = (k + 1) % KEYS;
            black_box(ours.check(&k, 1).is_allowed())
        })
    });
    g.finish();
}

/// 64 checks in flight at all times on one multiplexed connection; time per check.
fn redis_in_flight(c: &mut Criterion) {
    const IN_FLIGHT: u64 = 64;
    let server = RedisServer::start().expect("redis-server");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let conn = rt.block_on(async {
        let client = redis::Client::open(server.url()).expect("url");
        redis::aio::ConnectionManager::new(client)
            .await
            .expect("connects")
    });
    let mut g = c.benchmark_group("ratelimit_redis_64_in_flight");
    g.measurement_time(Duration::from_secs(8));

    async fn drive<F, Fut>(iters: u64, one: F) -> Duration
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let one = Arc::new(one);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..IN_FLIGHT {
            let one = one.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = t;
                while i < iters {
                    one(i).await;
                    i += IN_FLIGHT;
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        start.elapsed()
    }

    /// Store checks, 64 in flight, keys cycling over 1,000.
    async fn drive_checks<C>(iters: u64, store: Arc<RedisStore<C>>, limits: Arc<Limits>) -> Duration
    where
        C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        drive(iters, move |i| {
            let (store, limits) = (store.clone(), limits.clone());
            async move {
                let key = format!("k{}", i % 1000);
                let d = store.check(&key, &limits, 1).await.expect("check");
                black_box(d);
            }
        })
        .await
    }

    let trivial = Arc::new(redis::Script::new("return 1"));
    g.bench_function("bare_evalsha_trivial", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (conn, script) = (conn.clone(), trivial.clone());
            drive(iters, move |_| {
                let (mut conn, script) = (conn.clone(), script.clone());
                async move {
                    let v: i64 = script.invoke_async(&mut conn).await.expect("EVALSHA");
                    black_box(v);
                }
            })
        })
    });
    // The ceiling of any GCRA script: one quota, TIME + GET + SET, no validation.
    let minimal = Arc::new(redis::Script::new(MINIMAL_GCRA));
    g.bench_function("bare_evalsha_minimal_gcra", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (conn, script) = (conn.clone(), minimal.clone());
            drive(iters, move |i| {
                let (mut conn, script) = (conn.clone(), script.clone());
                async move {
                    let v: Vec<i64> = script
                        .key(format!("min:{{k{}}}", i % 1000))
                        .arg(1u64)
                        .arg(1_000_000u64)
                        .invoke_async(&mut conn)
                        .await
                        .expect("EVALSHA");
                    black_box(v);
                }
            })
        })
    });
    // Like for like with the store's coalescing: checks grouped 64 to a call of the minimal
    // script over many keys, two calls in flight (the store's own limit).
    let many = Arc::new(redis::Script::new(MINIMAL_GCRA_MANY));
    g.bench_function("bare_evalsha_minimal_gcra_64_keys_per_call", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (conn, script) = (conn.clone(), many.clone());
            async move {
                let start = Instant::now();
                let mut calls = Vec::new();
                for lane in 0..2u64 {
                    let (mut conn, script) = (conn.clone(), script.clone());
                    calls.push(tokio::spawn(async move {
                        let mut i = lane * 64;
                        while i < iters {
                            let mut inv = script.prepare_invoke();
                            for k in i..(i + 64).min(iters) {
                                inv.key(format!("many:{{k{}}}", k % 1000));
                            }
                            let v: Vec<i64> = inv
                                .arg(1u64)
                                .arg(1_000_000u64)
                                .invoke_async(&mut conn)
                                .await
                                .expect("EVALSHA");
                            black_box(v);
                            i += 128;
                        }
                    }));
                }
                for c in calls {
                    c.await.expect("task");
                }
                start.elapsed()
            }
        })
    });
    let store = Arc::new(RedisStore::new(conn.clone(), "bench:"));
    let limits = Arc::new(
        Limits::new()
            .with("second", Quota::per_second(1_000_000).unwrap())
            .unwrap()
            .with("hour", Quota::per_hour(1_000_000_000).unwrap())
            .unwrap(),
    );
    let one_limit = Arc::new(Limits::single(Quota::per_second(1_000_000).unwrap()));
    for (name, limits) in [
        ("stanchion_redis_check_one_limit", one_limit),
        ("stanchion_redis_check_two_limits", limits.clone()),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt)
                .iter_custom(|iters| drive_checks(iters, store.clone(), limits.clone()))
        });
    }
    // The same checks on a three-master Redis Cluster: keys spread over many hash slots, each
    // batch sent as one call per slot, all at once.
    let cluster = RedisCluster::start(3).expect("redis cluster");
    let cluster_store = rt.block_on(async {
        let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("urls");
        let conn = client.get_async_connection().await.expect("connects");
        Arc::new(RedisStore::new(conn, "bench:").for_cluster())
    });
    let one_limit = Arc::new(Limits::single(Quota::per_second(1_000_000).unwrap()));
    g.bench_function("stanchion_redis_cluster_check_one_limit", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| drive_checks(iters, cluster_store.clone(), one_limit.clone()))
    });
    g.finish();
    let stats = cluster_store.batch_stats();
    eprintln!(
        "cluster coalescing: {stats:?} ({:.1} checks per script call)",
        stats.checks as f64 / stats.script_calls.max(1) as f64
    );
    drop(cluster);
    let stats = store.batch_stats();
    eprintln!(
        "coalescing: {stats:?} ({:.1} checks per script call)",
        stats.checks as f64 / stats.script_calls.max(1) as f64
    );

    let mut g = c.benchmark_group("ratelimit_redis_sequential");
    g.bench_function("bare_evalsha_trivial", |b| {
        b.to_async(&rt).iter(|| {
            let (mut conn, script) = (conn.clone(), trivial.clone());
            async move {
                let v: i64 = script.invoke_async(&mut conn).await.expect("EVALSHA");
                black_box(v)
            }
        })
    });
    g.bench_function("stanchion_redis_check_two_limits", |b| {
        b.to_async(&rt).iter(|| {
            let (store, limits) = (store.clone(), limits.clone());
            async move { black_box(store.check("seq", &limits, 1).await.expect("check")) }
        })
    });
    g.finish();
}

criterion_group!(benches, in_process, redis_in_flight);
criterion_main!(benches);
