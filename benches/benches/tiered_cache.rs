//! stanchion-tiered-cache next to its anchors, in one run: a bare moka `get` (L1 hit), a bare
//! Redis GET plus postcard decode (L2 hit), a bare MGET of 100 keys plus decode (`get_many`);
//! and the memory an L1 entry costs beyond moka's own, printed before the timings. Every row
//! alternates with its anchor (blocks of 1,000 calls in process memory, single calls to Redis),
//! only its own calls timed.
//!
//! `cargo bench -p stanchion-benches --bench tiered_cache && scripts/bench-report`

use std::alloc::System;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use stanchion_testkit::RedisServer;
use stanchion_tiered_cache::{MemoryCacheStore, Policy, RedisCacheStore, TieredCache, Tiers};
use stats_alloc::{Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &stats_alloc::INSTRUMENTED_SYSTEM;

/// A product as the shop caches it (about 120 bytes encoded).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Product {
    id: u64,
    name: String,
    description: String,
    price_cents: u64,
    stock: u32,
    tags: Vec<String>,
}

fn product(id: u64) -> Product {
    Product {
        id,
        name: format!("Desk lamp {id}"),
        description: "An adjustable desk lamp with a warm LED and a weighted base.".into(),
        price_cents: 4_999,
        stock: 12,
        tags: vec!["lighting".into(), "office".into()],
    }
}

const KEYS: u64 = 1_000;

fn policy(tiers: Tiers) -> Policy {
    Policy::builder(Duration::from_secs(3600))
        .tiers(tiers)
        .build()
        .expect("policy")
}

/// Runs `iters` calls of `timed` in blocks of 1,000, each after a block of `other` (untimed);
/// returns the time of `timed`'s blocks.
fn alternate(iters: u64, other: &dyn Fn(u64, u64), timed: &dyn Fn(u64, u64)) -> Duration {
    const BLOCK: u64 = 1_000;
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = BLOCK.min(iters - done);
        other(done, n);
        let start = Instant::now();
        timed(done, n);
        total += start.elapsed();
        done += n;
    }
    total
}

/// `iters` calls of `timed`, each after a call of `other` (untimed), with key `i % KEYS`;
/// returns the time of `timed`'s calls.
async fn alternate_calls<A, FA, B, FB>(iters: u64, other: A, timed: B) -> Duration
where
    A: Fn(u64) -> FA,
    FA: std::future::Future,
    B: Fn(u64) -> FB,
    FB: std::future::Future,
{
    let mut total = Duration::ZERO;
    for i in 0..iters {
        other(i % KEYS).await;
        let start = Instant::now();
        timed(i % KEYS).await;
        total += start.elapsed();
    }
    total
}

fn l1_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut g = c.benchmark_group("tiered_cache_l1_hit");
    let moka: moka::sync::Cache<u64, Arc<Product>> = moka::sync::Cache::new(10_000);
    for k in 0..KEYS {
        moka.insert(k, Arc::new(product(k)));
    }
    let ours: TieredCache<u64, Arc<Product>, MemoryCacheStore> = rt.block_on(async {
        let c = TieredCache::builder("p", MemoryCacheStore::new(), policy(Tiers::L1Only))
            .build()
            .expect("cache");
        for k in 0..KEYS {
            c.insert(&k, Arc::new(product(k))).await.expect("insert");
        }
        c
    });
    // Blocks of calls alternate with blocks of the other side's (untimed), so both sides run
    // under the same conditions; separate runs of these rows moved by a quarter here.
    let moka_block = |from: u64, n: u64| {
        for i in from..from + n {
            black_box(moka.get(&(i % KEYS)));
        }
    };
    let get_block = |from: u64, n: u64| {
        rt.block_on(async {
            for i in from..from + n {
                black_box(ours.get(&(i % KEYS)).await.ok().flatten());
            }
        })
    };
    let load_block = |from: u64, n: u64| {
        rt.block_on(async {
            for i in from..from + n {
                let got = ours
                    .get_or_load(&(i % KEYS), || async {
                        Ok::<Option<Arc<Product>>, std::io::Error>(None)
                    })
                    .await;
                black_box(got.ok().flatten());
            }
        })
    };
    g.bench_function("moka_get", |b| {
        b.iter_custom(|iters| alternate(iters, &get_block, &moka_block))
    });
    g.bench_function("stanchion_get", |b| {
        b.iter_custom(|iters| alternate(iters, &moka_block, &get_block))
    });
    g.bench_function("stanchion_get_or_load", |b| {
        b.iter_custom(|iters| alternate(iters, &moka_block, &load_block))
    });
    g.finish();
}

fn l2(c: &mut Criterion) {
    let server = RedisServer::start().expect("redis-server");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (conn, ours) = rt.block_on(async {
        let client = redis::Client::open(server.url()).expect("client");
        let conn = client.get_connection_manager().await.expect("connection");
        let store = RedisCacheStore::new(conn.clone(), None, "bench:");
        let ours: TieredCache<u64, Product, _> =
            TieredCache::builder("p", store, policy(Tiers::L2Only))
                .key_prefix("bench:")
                .compress_above(None)
                .build()
                .expect("cache");
        for k in 0..KEYS {
            ours.insert(&k, product(k)).await.expect("insert");
        }
        // The anchor's keys: the same value, postcard bytes only.
        let mut c = conn.clone();
        for k in 0..KEYS {
            let bytes = postcard::to_stdvec(&product(k)).expect("encode");
            let _: () = redis::cmd("SET")
                .arg(format!("bare:{k}"))
                .arg(bytes)
                .query_async(&mut c)
                .await
                .expect("set");
        }
        (conn, ours)
    });
    // Each timed call is preceded by an untimed call of the other side (the anchor before
    // ours, ours before the anchor), so both sides run under the same conditions: on this
    // two-core machine, separate runs of a Redis round trip drift by a quarter.
    let bare_get = |k: u64| {
        let mut conn = conn.clone();
        async move {
            let bytes: Vec<u8> = redis::cmd("GET")
                .arg(format!("bare:{k}"))
                .query_async(&mut conn)
                .await
                .expect("get");
            black_box(postcard::from_bytes::<Product>(&bytes).expect("decode"))
        }
    };
    let ours_get = |k: u64| {
        let ours = &ours;
        async move { black_box(ours.get(&k).await.expect("get")) }
    };
    let mut g = c.benchmark_group("tiered_cache_l2_hit");
    g.bench_function("bare_get_decode", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| alternate_calls(iters, ours_get, bare_get))
    });
    g.bench_function("stanchion_get", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| alternate_calls(iters, bare_get, ours_get))
    });
    g.finish();

    let mut g = c.benchmark_group("tiered_cache_get_many_100");
    let keys: Vec<u64> = (0..100).collect();
    let bare: Vec<String> = keys.iter().map(|k| format!("bare:{k}")).collect();
    let bare_mget = || {
        let mut conn = conn.clone();
        let bare = &bare;
        async move {
            let all: Vec<Vec<u8>> = redis::cmd("MGET")
                .arg(bare)
                .query_async(&mut conn)
                .await
                .expect("mget");
            let decoded: Vec<Product> = all
                .iter()
                .map(|b| postcard::from_bytes(b).expect("decode"))
                .collect();
            black_box(decoded)
        }
    };
    let ours_many = || {
        let ours = &ours;
        let keys = &keys;
        async move { black_box(ours.get_many(keys).await.expect("get_many")) }
    };
    g.bench_function("bare_mget_decode", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| alternate_calls(iters, |_| ours_many(), |_| bare_mget()))
    });
    g.bench_function("stanchion_get_many", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| alternate_calls(iters, |_| bare_mget(), |_| ours_many()))
    });
    g.finish();
}

/// Bytes allocated per entry: raw moka holding `Arc<Product>` next to the cache's L1 holding
/// the same, with the value's own allocations subtracted from both.
fn memory() {
    const N: u64 = 100_000;
    let values: Vec<Arc<Product>> = (0..N).map(|k| Arc::new(product(k))).collect();
    let measure = |fill: &dyn Fn()| {
        let region = Region::new(GLOBAL);
        fill();
        let s = region.change();
        (s.bytes_allocated as f64 - s.bytes_deallocated as f64) / N as f64
    };
    let moka_bytes = measure(&|| {
        let m: moka::sync::Cache<u64, Arc<Product>> = moka::sync::Cache::new(2 * N);
        for (k, v) in values.iter().enumerate() {
            m.insert(k as u64, Arc::clone(v));
        }
        m.run_pending_tasks();
        std::mem::forget(m);
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ours_bytes = measure(&|| {
        rt.block_on(async {
            let c: TieredCache<u64, Arc<Product>, MemoryCacheStore> =
                TieredCache::builder("p", MemoryCacheStore::new(), policy(Tiers::L1Only))
                    .l1_capacity(2 * N)
                    .build()
                    .expect("cache");
            for (k, v) in values.iter().enumerate() {
                c.insert(&(k as u64), Arc::clone(v)).await.expect("insert");
            }
            c.l1_len();
            std::mem::forget(c);
        })
    });
    eprintln!(
        "memory per L1 entry ({N} entries): moka {moka_bytes:.0} B, stanchion-tiered-cache {ours_bytes:.0} B, \
         {:.0} B more per entry",
        ours_bytes - moka_bytes
    );
}

fn all(c: &mut Criterion) {
    memory();
    l1_hit(c);
    l2(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
