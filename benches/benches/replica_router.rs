//! stanchion-replica-router next to a bare sqlx pool, on a real primary and streaming replica.
//!
//! `cargo bench -p stanchion-benches --bench replica_router && scripts/bench-report`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sqlx::postgres::PgPoolOptions;
use stanchion_replica_router::{Consistency, ReplicaRouter};
use stanchion_testkit::{Node, PostgresCluster};

const IN_FLIGHT: u64 = 16;
const QUERY: &str = "SELECT v FROM items WHERE id = 7";

fn benches(c: &mut Criterion) {
    let cluster = PostgresCluster::start(1).expect("postgres");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Eight databases on the one replica stand in for eight replicas: selection cost does not
    // depend on where the servers are.
    let mut names = Vec::new();
    for _ in 0..8 {
        let db = cluster.create_database().expect("database");
        cluster
            .sql(Node::Primary, &db.name, "CREATE TABLE items (id int PRIMARY KEY, v int); INSERT INTO items SELECT g, g FROM generate_series(1, 100) g")
            .expect("table");
        names.push(db);
    }
    cluster
        .wait_replayed(0, Duration::from_secs(10))
        .expect("replayed");
    let pool_options = || PgPoolOptions::new().max_connections(16);
    let (router8, router1, bare) = rt.block_on(async {
        let mut b = ReplicaRouter::builder()
            .primary("primary", &names[0].primary_url)
            .pool_options(pool_options());
        for (i, db) in names.iter().enumerate() {
            b = b.replica(&format!("r{i}"), &db.replica_urls[0]);
        }
        let router8 = b.build().await.expect("router");
        let router1 = ReplicaRouter::builder()
            .primary("primary", &names[0].primary_url)
            .replica("r0", &names[0].replica_urls[0])
            .pool_options(pool_options())
            .build()
            .await
            .expect("router");
        let bare = pool_options()
            .connect(&names[0].replica_urls[0])
            .await
            .expect("pool");
        (router8, router1, bare)
    });
    assert_eq!(
        router8.status().iter().filter(|s| s.admitted).count(),
        8,
        "{:?}",
        router8.status()
    );

    let mut g = c.benchmark_group("replica_select");
    g.bench_function("stanchion_pick_among_8", |b| {
        b.iter(|| black_box(router8.select(Consistency::Any)))
    });
    g.finish();

    let mut g = c.benchmark_group("replica_read_16_in_flight");
    g.measurement_time(Duration::from_secs(8));
    async fn drive<F, Fut>(iters: u64, one: F) -> Duration
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let one = Arc::new(one);
        let start = Instant::now();
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|t| {
                let one = one.clone();
                tokio::spawn(async move {
                    let mut i = t;
                    while i < iters {
                        one().await;
                        i += IN_FLIGHT;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        start.elapsed()
    }
    g.bench_function("bare_pool", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let pool = bare.clone();
            drive(iters, move || {
                let pool = pool.clone();
                async move {
                    let v: i32 = sqlx::query_scalar(QUERY)
                        .fetch_one(&pool)
                        .await
                        .expect("query");
                    black_box(v);
                }
            })
        })
    });
    g.bench_function("stanchion_router_read", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let router = router1.clone();
            drive(iters, move || {
                let router = router.clone();
                async move {
                    let mut conn = router.read(Consistency::Any).await.expect("read");
                    let v: i32 = sqlx::query_scalar(QUERY)
                        .fetch_one(&mut *conn)
                        .await
                        .expect("query");
                    black_box(v);
                }
            })
        })
    });
    // A token for a write older than one health interval: the router has read the replica
    // past it since, and the pool's connections are older than that reading.
    let old_token = rt.block_on(async {
        let mut tx = router1.begin_write().await.expect("begin");
        sqlx::query("UPDATE items SET v = v + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await
            .expect("update");
        let token = router1.commit(tx).await.expect("commit");
        tokio::time::sleep(Duration::from_secs(2)).await;
        token
    });
    // The same reads with every token read asking its replica first (`known_positions(false)`,
    // what every token read did before): the cost of the check query.
    let asking = rt.block_on(async {
        ReplicaRouter::builder()
            .primary("primary", &names[0].primary_url)
            .replica("r0", &names[0].replica_urls[0])
            .pool_options(pool_options())
            .known_positions(false)
            .build()
            .await
            .expect("router")
    });
    for (name, router) in [
        ("stanchion_token_read_old_write_always_checked", &asking),
        ("stanchion_token_read_old_write", &router1),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let router = router.clone();
                drive(iters, move || {
                    let router = router.clone();
                    async move {
                        let mut conn = router
                            .read(Consistency::AtLeast(old_token))
                            .await
                            .expect("read");
                        let v: i32 = sqlx::query_scalar(QUERY)
                            .fetch_one(&mut *conn)
                            .await
                            .expect("query");
                        black_box(v);
                    }
                })
            })
        });
    }
    g.finish();

    // A write, then a read of it: with a token (waits for the replica to replay the write) and,
    // for comparison, without one (may read stale data).
    let mut g = c.benchmark_group("replica_write_then_read_16_in_flight");
    g.measurement_time(Duration::from_secs(8));
    let row = Arc::new(std::sync::atomic::AtomicI32::new(0));
    for (name, with_token) in [
        ("stanchion_then_any_read", false),
        ("stanchion_then_token_read", true),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (router, row) = (router1.clone(), row.clone());
                drive(iters, move || {
                    let (router, row) = (router.clone(), row.clone());
                    async move {
                        let id = 1 + row.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
                        let mut tx = router.begin_write().await.expect("begin");
                        sqlx::query("UPDATE items SET v = v + 1 WHERE id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await
                            .expect("update");
                        let token = router.commit(tx).await.expect("commit");
                        let consistency = if with_token {
                            Consistency::AtLeast(token)
                        } else {
                            Consistency::Any
                        };
                        let mut conn = router.read(consistency).await.expect("read");
                        let v: i32 = sqlx::query_scalar("SELECT v FROM items WHERE id = $1")
                            .bind(id)
                            .fetch_one(&mut *conn)
                            .await
                            .expect("query");
                        black_box(v);
                    }
                })
            })
        });
    }
    g.finish();
    let reads = router1.token_reads();
    eprintln!(
        "token reads: {} routed on a known replay position, {} asked the replica",
        reads.known, reads.checked
    );
    rt.block_on(async {
        router8.close().await;
        router1.close().await;
        asking.close().await;
        bare.close().await;
    });
}

criterion_group!(replica, benches);
criterion_main!(replica);
