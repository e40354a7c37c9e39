//! stanchion-saga next to bare one-row insert transactions on the same PostgreSQL server, at the
//! same concurrency (8 connections), in one run: three-step sagas with no-op steps. A saga writes
//! one statement and one commit per step plus one at the start (the PostgreSQL log puts a
//! transition and its history line in one statement), so 4 commits a saga.
//!
//! `cargo bench -p stanchion-benches --bench saga && scripts/bench-report`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use stanchion_saga::{Executor, PgSagaLog, SagaDef, Step};
use stanchion_testkit::PostgresCluster;

const CONNECTIONS: u32 = 8;

fn noop_saga() -> SagaDef {
    SagaDef::builder("noop", 1)
        .step(Step::compensatable(
            "a",
            |_| async { Ok(json!(1)) },
            |_| async { Ok(()) },
        ))
        .step(Step::pivot("b", |_| async { Ok(json!(2)) }))
        .step(Step::retriable("c", |_| async { Ok(json!(3)) }))
        .build()
        .expect("saga")
}

fn benches(c: &mut Criterion) {
    let cluster = PostgresCluster::start(0).expect("postgres");
    let db = cluster.create_database().expect("database");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (pool, executor) = rt.block_on(async {
        let pool = PgPoolOptions::new()
            .max_connections(CONNECTIONS)
            .connect(&db.primary_url)
            .await
            .expect("pool");
        sqlx::query("CREATE TABLE bare (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text NOT NULL)")
            .execute(&pool)
            .await
            .expect("table");
        let log = PgSagaLog::new(pool.clone(), "bench").expect("log");
        log.migrate().await.expect("migrate");
        let executor = Executor::builder(log)
            .register(noop_saga())
            .max_in_flight(CONNECTIONS as usize)
            .start()
            .expect("executor");
        (pool, executor)
    });

    let mut g = c.benchmark_group("saga_three_noop_steps_8_connections");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("bare_one_row_insert_transaction", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let pool = pool.clone();
            async move {
                let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let start = Instant::now();
                let tasks: Vec<_> = (0..CONNECTIONS)
                    .map(|_| {
                        let (pool, next) = (pool.clone(), next.clone());
                        tokio::spawn(async move {
                            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < iters {
                                let mut tx = pool.begin().await.expect("begin");
                                sqlx::query("INSERT INTO bare (v) VALUES ('x')")
                                    .execute(&mut *tx)
                                    .await
                                    .expect("insert");
                                tx.commit().await.expect("commit");
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task");
                }
                start.elapsed()
            }
        })
    });
    g.bench_function("stanchion_saga", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let executor = executor.clone();
            async move {
                let before = executor.stats().completed;
                let start = Instant::now();
                // Eight clients begin sagas; `begin` waits for a free slot of the executor's 8.
                let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let clients: Vec<_> = (0..CONNECTIONS)
                    .map(|_| {
                        let (executor, next) = (executor.clone(), next.clone());
                        tokio::spawn(async move {
                            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < iters {
                                executor.begin("noop", &json!({})).await.expect("begin");
                            }
                        })
                    })
                    .collect();
                for c in clients {
                    c.await.expect("client");
                }
                while executor.stats().completed - before < iters {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
                start.elapsed()
            }
        })
    });
    g.finish();
    rt.block_on(executor.shutdown(Duration::from_secs(5)));
}

criterion_group!(saga, benches);
criterion_main!(saga);
