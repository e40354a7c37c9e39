//! Anchors: the bare round trips every server-backed Stanchion bench is compared with.
//!
//! `cargo bench -p stanchion-benches --bench anchors`

use criterion::{Criterion, criterion_group, criterion_main};
use stanchion_testkit::{PostgresCluster, RedisServer};

fn redis_get(c: &mut Criterion) {
    let server = RedisServer::start().expect("redis-server starts");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let conn = rt.block_on(async {
        let client = redis::Client::open(server.url()).expect("valid url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connects");
        redis::cmd("SET")
            .arg("anchor:key")
            .arg("value")
            .query_async::<()>(&mut conn)
            .await
            .expect("SET");
        conn
    });
    let mut group = c.benchmark_group("anchor");
    group.bench_function("redis_get", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = conn.clone();
            async move {
                let v: Option<String> = redis::cmd("GET")
                    .arg("anchor:key")
                    .query_async(&mut conn)
                    .await
                    .expect("GET");
                std::hint::black_box(v)
            }
        })
    });
    group.finish();
}

fn sqlx_select_1(c: &mut Criterion) {
    let cluster = PostgresCluster::start(0).expect("postgres starts");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let url = cluster.url(stanchion_testkit::Node::Primary);
    let pool = rt.block_on(async {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("connects")
    });
    let mut group = c.benchmark_group("anchor");
    group.bench_function("sqlx_select_1", |b| {
        b.to_async(&rt).iter(|| {
            let pool = pool.clone();
            async move {
                let v: i32 = sqlx::query_scalar("SELECT 1")
                    .fetch_one(&pool)
                    .await
                    .expect("SELECT 1");
                std::hint::black_box(v)
            }
        })
    });
    group.finish();
    rt.block_on(pool.close());
}

criterion_group!(anchors, redis_get, sqlx_select_1);
criterion_main!(anchors);
