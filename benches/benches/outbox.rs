//! stanchion-outbox next to bare SQL on the same PostgreSQL server, in one run:
//!
//! - relay throughput (time per event, events pre-inserted, relay started, until all are
//!   published) with the in-process publisher and with Redis Streams, next to a bare
//!   `FOR UPDATE SKIP LOCKED` claim-and-mark loop of the same batch size (100);
//! - enqueue-to-publish latency at 1,000 events/s with NOTIFY (mean per event from criterion,
//!   p50/p99 from the relay's histogram, printed), next to a bare insert + NOTIFY until a
//!   listener receives it;
//! - the cost added to a business transaction: insert + enqueue + commit next to insert + commit.
//!
//! `cargo bench -p stanchion-benches --bench outbox && scripts/bench-report`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use stanchion_outbox::{
    ChannelPublisher, Event, Message, OutboxConfig, PgOutbox, PublishError, Publisher,
    RedisStreamPublisher, Relay,
};
use stanchion_testkit::{PostgresCluster, RedisServer};
use tokio::sync::Notify;

const BATCH: usize = 100;

/// Accepts everything at once, like a channel whose reader keeps up (`CountOk` counts).
#[derive(Clone, Default)]
struct Accept;

impl Publisher for Accept {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        batch.iter().map(|_| Ok(())).collect()
    }
}

/// Events per timed chunk. Each chunk is written in one transaction and then drained; between
/// chunks (untimed) published rows are deleted and the table vacuumed, as autovacuum would keep a
/// production table. Without that, dead index entries pile up within a long run and every
/// oldest-first claim (the bare loop's and the relay's alike) slows down with the run's length.
const CHUNK: u64 = 2000;

fn event(k: u64) -> Event {
    Event::new(format!("agg-{}", k % 1000), "bench.event", vec![b'x'; 200])
}

/// Times `iters` events through a running relay: per chunk, from the commit that makes them
/// visible until the publisher has seen them all.
async fn relay_per_event(
    outbox: &PgOutbox,
    pool: &PgPool,
    seen: &AtomicU64,
    progress: &Notify,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = CHUNK.min(iters - done);
        let events: Vec<Event> = (done..done + n).map(event).collect();
        let mut tx = pool.begin().await.expect("begin");
        outbox
            .enqueue_batch(&mut tx, &events)
            .await
            .expect("enqueue");
        let before = seen.load(Ordering::Relaxed);
        tx.commit().await.expect("commit");
        let start = Instant::now();
        // Wait without spinning (a spinning task would take one of the two cores).
        loop {
            let next = progress.notified();
            tokio::pin!(next);
            next.as_mut().enable();
            if seen.load(Ordering::Relaxed) - before >= n {
                break;
            }
            next.await;
        }
        total += start.elapsed();
        done += n;
        outbox
            .purge_published(Duration::ZERO, 10_000)
            .await
            .expect("purge");
        let vacuum = format!("VACUUM {}.outbox", outbox.config().namespace());
        sqlx::query(sqlx::AssertSqlSafe(vacuum))
            .execute(pool)
            .await
            .expect("vacuum");
    }
    total
}

/// Counts the outcomes that succeeded, then hands them back.
#[derive(Clone)]
struct CountOk<P> {
    inner: P,
    seen: Arc<AtomicU64>,
    progress: Arc<Notify>,
}

impl<P: Publisher> Publisher for CountOk<P> {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        let out = self.inner.publish(batch).await;
        let ok = out.iter().filter(|r| r.is_ok()).count() as u64;
        self.seen.fetch_add(ok, Ordering::Relaxed);
        self.progress.notify_waiters();
        out
    }
}

async fn start_relay<P: Publisher>(
    outbox: &PgOutbox,
    publisher: P,
) -> stanchion_outbox::RelayHandle<PgOutbox, P> {
    Relay::builder(outbox.clone(), publisher)
        .batch_size(BATCH)
        .build()
        .expect("relay")
        .start()
        .await
        .expect("start")
}

fn benches(c: &mut Criterion) {
    let cluster = PostgresCluster::start(0).expect("postgres");
    let redis = RedisServer::start().expect("redis");
    let db = cluster.create_database().expect("database");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (pool, outbox, deleting, redis_conn) = rt.block_on(async {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(&db.primary_url)
            .await
            .expect("pool");
        let outbox = PgOutbox::new(pool.clone(), OutboxConfig::default());
        outbox.migrate().await.expect("migrate");
        // The same relay on an outbox that deletes rows as it publishes them.
        let deleting = OutboxConfig::builder()
            .namespace("deleting")
            .keep_published(false)
            .build()
            .expect("config");
        let deleting = PgOutbox::new(pool.clone(), deleting);
        deleting.migrate().await.expect("migrate");
        sqlx::raw_sql(
            "CREATE TABLE bare_outbox (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
               k text NOT NULL, payload bytea NOT NULL, published boolean NOT NULL DEFAULT false);
             CREATE INDEX bare_pending ON bare_outbox (id) WHERE NOT published;
             CREATE TABLE products (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);",
        )
        .execute(&pool)
        .await
        .expect("tables");
        let redis_conn = redis::Client::open(redis.url())
            .expect("client")
            .get_connection_manager()
            .await
            .expect("redis");
        (pool, outbox, deleting, redis_conn)
    });

    let mut g = c.benchmark_group("outbox_relay_per_event");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("bare_skip_locked_claim_and_mark_100", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let pool = pool.clone();
            async move {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = CHUNK.min(iters - done);
                    sqlx::query(
                        "INSERT INTO bare_outbox (k, payload) SELECT 'agg-' || (g % 1000), \
                         decode(repeat('78', 200), 'hex') FROM generate_series(1, $1) g",
                    )
                    .bind(n as i64)
                    .execute(&pool)
                    .await
                    .expect("fill");
                    let start = Instant::now();
                    loop {
                        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                            "UPDATE bare_outbox SET published = true WHERE id IN \
                             (SELECT id FROM bare_outbox WHERE NOT published ORDER BY id LIMIT 100 \
                              FOR UPDATE SKIP LOCKED) RETURNING id, payload",
                        )
                        .fetch_all(&pool)
                        .await
                        .expect("claim");
                        if rows.is_empty() {
                            break;
                        }
                        std::hint::black_box(rows);
                    }
                    total += start.elapsed();
                    done += n;
                    sqlx::query("DELETE FROM bare_outbox")
                        .execute(&pool)
                        .await
                        .expect("clean");
                    sqlx::query("VACUUM bare_outbox")
                        .execute(&pool)
                        .await
                        .expect("vacuum");
                }
                total
            }
        })
    });
    let seen = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Notify::new());
    let relay = rt.block_on(start_relay(
        &outbox,
        CountOk {
            inner: Accept,
            seen: Arc::clone(&seen),
            progress: Arc::clone(&progress),
        },
    ));
    g.bench_function("stanchion_relay_in_process", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| relay_per_event(&outbox, &pool, &seen, &progress, iters))
    });
    rt.block_on(relay.shutdown(Duration::from_secs(10)))
        .expect("stop");
    let seen = Arc::new(AtomicU64::new(0));
    let relay = rt.block_on(start_relay(
        &deleting,
        CountOk {
            inner: Accept,
            seen: Arc::clone(&seen),
            progress: Arc::clone(&progress),
        },
    ));
    g.bench_function("stanchion_relay_in_process_deleting_published", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| relay_per_event(&deleting, &pool, &seen, &progress, iters))
    });
    rt.block_on(relay.shutdown(Duration::from_secs(10)))
        .expect("stop");
    let stream = format!("bench-{}", fastrand::u64(..));
    let seen = Arc::new(AtomicU64::new(0));
    let relay = rt.block_on(start_relay(
        &outbox,
        CountOk {
            inner: RedisStreamPublisher::new(redis_conn.clone(), stream.clone()).max_len(100_000),
            seen: Arc::clone(&seen),
            progress: Arc::clone(&progress),
        },
    ));
    g.bench_function("stanchion_relay_redis_streams", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| relay_per_event(&outbox, &pool, &seen, &progress, iters))
    });
    rt.block_on(relay.shutdown(Duration::from_secs(10)))
        .expect("stop");
    g.finish();

    // Enqueue-to-publish latency at 1,000 events/s, NOTIFY on, the relay idle between events.
    let mut g = c.benchmark_group("outbox_latency_1000_per_s");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("bare_insert_notify_until_received", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let pool = pool.clone();
            async move {
                let mut listener = PgListener::connect_with(&pool).await.expect("listener");
                listener.listen("bare_outbox").await.expect("listen");
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    sqlx::query(
                        "WITH ins AS (INSERT INTO bare_outbox (k, payload) VALUES ('k', '\\x00') RETURNING id) \
                         SELECT pg_notify('bare_outbox', id::text) FROM ins",
                    )
                    .execute(&pool)
                    .await
                    .expect("insert");
                    listener.recv().await.expect("recv");
                    total += start.elapsed();
                    tokio::time::sleep(Duration::from_millis(1).saturating_sub(start.elapsed())).await;
                }
                total
            }
        })
    });
    let (latency_relay, received) = rt.block_on(async {
        let (publisher, rx) = ChannelPublisher::new(100_000);
        let relay = Relay::builder(outbox.clone(), publisher)
            .poll_interval(Duration::from_secs(5))
            .build()
            .expect("relay")
            .start()
            .await
            .expect("start");
        (relay, Arc::new(tokio::sync::Mutex::new(rx)))
    });
    latency_relay.reset_latency();
    let samples = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    g.bench_function("stanchion_commit_until_published", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (outbox, pool) = (outbox.clone(), pool.clone());
            let (received, samples) = (Arc::clone(&received), Arc::clone(&samples));
            async move {
                let mut rx = received.lock().await;
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let began = Instant::now();
                    let mut tx = pool.begin().await.expect("begin");
                    outbox
                        .enqueue(
                            &mut tx,
                            &Event::new(format!("k{}", i % 100), "t", b"{}".to_vec()),
                        )
                        .await
                        .expect("enqueue");
                    tx.commit().await.expect("commit");
                    let committed = Instant::now();
                    rx.recv().await.expect("published");
                    let d = committed.elapsed();
                    samples.lock().expect("samples").push(d);
                    total += d;
                    // One event a millisecond.
                    tokio::time::sleep(Duration::from_millis(1).saturating_sub(began.elapsed()))
                        .await;
                }
                total
            }
        })
    });
    g.finish();
    let mut all = samples.lock().expect("samples").clone();
    all.sort();
    if !all.is_empty() {
        let q = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
        let s = latency_relay.stats();
        eprintln!(
            "outbox commit-to-publish at 1,000 events/s over {} events: p50 {:?}, p99 {:?}, max {:?}; \
             relay histogram (enqueue to publish): p50 {} us, p99 {} us",
            all.len(),
            q(0.5),
            q(0.99),
            all.last().copied().unwrap_or_default(),
            s.latency_p50_us,
            s.latency_p99_us,
        );
    }
    rt.block_on(async {
        latency_relay
            .shutdown(Duration::from_secs(5))
            .await
            .expect("stop");
    });

    let mut g = c.benchmark_group("outbox_business_transaction");
    g.bench_function("bare_insert_commit", |b| {
        b.to_async(&rt).iter(|| {
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("INSERT INTO products (name) VALUES ('tea')")
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                tx.commit().await.expect("commit");
            }
        })
    });
    g.bench_function("stanchion_insert_enqueue_commit", |b| {
        b.to_async(&rt).iter(|| {
            let (pool, outbox) = (pool.clone(), outbox.clone());
            async move {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("INSERT INTO products (name) VALUES ('tea')")
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                outbox
                    .enqueue(&mut tx, &Event::new("p", "product.created", b"{}".to_vec()))
                    .await
                    .expect("enqueue");
                tx.commit().await.expect("commit");
            }
        })
    });
    g.bench_function("stanchion_insert_enqueue_batch_10_commit", |b| {
        let events: Vec<Event> = (0..10)
            .map(|i| Event::new(format!("p{i}"), "product.created", b"{}".to_vec()))
            .collect();
        b.to_async(&rt).iter(|| {
            let (pool, outbox, events) = (pool.clone(), outbox.clone(), events.clone());
            async move {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("INSERT INTO products (name) VALUES ('tea')")
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                outbox
                    .enqueue_batch(&mut tx, &events)
                    .await
                    .expect("enqueue");
                tx.commit().await.expect("commit");
            }
        })
    });
    g.finish();
    drop(redis);
}

criterion_group!(outbox, benches);
criterion_main!(outbox);
