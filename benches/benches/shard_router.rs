//! stanchion-shard-router lookups next to the bare key hash they all start from, in one run:
//! modulo, jump hash, the logical slot table, rendezvous and the ring at several shard counts,
//! PostgreSQL's partition hash, and an id. Ring memory is printed before the timings.
//!
//! `cargo bench -p stanchion-benches --bench shard_router && scripts/bench-report`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use stanchion_shard_router::{
    IdGenerator, IdLayout, JumpHash, Key, Modulo, PgHash, Rendezvous, Ring, ShardMap, Sharder,
};

const KEYS: usize = 1024;

fn keys() -> Vec<i64> {
    // Spread-out tenant ids, as a shop's would be.
    (0..KEYS as i64).map(|i| i * 7_919 + 1_000_003).collect()
}

fn bench_sharder(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    s: &dyn Sharder,
) {
    let keys = keys();
    let mut i = 0;
    g.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(s.shard(Key::Int(black_box(keys[i]))).unwrap())
        })
    });
}

fn lookups(c: &mut Criterion) {
    for (n, vnodes) in [(16_u32, 160_u32), (64, 160)] {
        let ring = Ring::new(n, vnodes).expect("ring");
        println!(
            "ring {n} shards x {vnodes} vnodes: {} points, {} KiB",
            ring.points(),
            ring.heap_bytes() / 1024
        );
    }
    let mut g = c.benchmark_group("shard_router_lookup");
    let keys = keys();
    let mut i = 0;
    g.bench_function("hash_only", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(Key::Int(black_box(keys[i])).hash64())
        })
    });
    bench_sharder(&mut g, "modulo_16", &Modulo::new(16).expect("modulo"));
    bench_sharder(&mut g, "jump_16", &JumpHash::new(16).expect("jump"));
    bench_sharder(&mut g, "jump_1024", &JumpHash::new(1024).expect("jump"));
    bench_sharder(
        &mut g,
        "slot_table_4096_16",
        &ShardMap::uniform(4096, 16).expect("map"),
    );
    bench_sharder(&mut g, "rendezvous_16", &Rendezvous::new(16).expect("hrw"));
    bench_sharder(&mut g, "rendezvous_64", &Rendezvous::new(64).expect("hrw"));
    let weights: Vec<f64> = (0..16).map(|i| 1.0 + f64::from(i % 3)).collect();
    bench_sharder(
        &mut g,
        "rendezvous_weighted_16",
        &Rendezvous::weighted(&weights).expect("hrw"),
    );
    bench_sharder(&mut g, "ring_16x160", &Ring::new(16, 160).expect("ring"));
    bench_sharder(&mut g, "ring_64x160", &Ring::new(64, 160).expect("ring"));
    bench_sharder(&mut g, "pg_hash_16", &PgHash::new(16).expect("pg"));
    g.finish();

    let mut g = c.benchmark_group("shard_router_id");
    let ids = IdGenerator::new(IdLayout::bigint(1_767_225_600_000), 0).expect("ids");
    let mut slot = 0;
    g.bench_function("try_next", |b| {
        b.iter(|| {
            slot = (slot + 1) % 4096;
            // Past 64 ids in a millisecond the sequence is exhausted: that error is timed too,
            // as a caller would meet it.
            black_box(ids.try_next(slot).ok())
        })
    });
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
