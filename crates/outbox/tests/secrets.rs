//! The passwords of PostgreSQL and Redis never reach what the outbox shows: its tracing events
//! (every level), the errors it returns, its `Debug` output, the stream's entries. Both servers
//! require a password, work, and then die for good: Redis first (events wait), then
//! PostgreSQL (the relay and the store fail).
//!
//! Its own binary: it installs a global tracing subscriber.

mod support;

use std::fmt::Write as _;
use std::time::Duration;

use redis::AsyncCommands;
use sqlx::postgres::PgPoolOptions;
use stanchion_outbox::{OutboxConfig, OutboxStore, PgOutbox, RedisStreamPublisher, Relay};
use stanchion_testkit::{Node, PostgresCluster, RedisServer};
use support::{ev, manager, wait_drained};

const PG_PASSWORD: &str = "pg-pw-51c7aa";
const REDIS_PASSWORD: &str = "redis-pw-e02b9f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_logs_errors_debug_output_or_streams() {
    let events = stanchion_testkit::events::capture();
    let mut pg = PostgresCluster::builder()
        .replicas(0)
        .password(PG_PASSWORD)
        .start()
        .unwrap();
    let db = pg.create_database().unwrap();
    assert!(db.primary_url.contains(PG_PASSWORD));
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(300))
        .connect(&db.primary_url)
        .await
        .unwrap();
    let outbox = PgOutbox::new(
        pool.clone(),
        OutboxConfig::builder().lanes(4).build().unwrap(),
    );
    outbox.migrate().await.unwrap();
    let mut redis_server = RedisServer::builder()
        .password(REDIS_PASSWORD)
        .start()
        .unwrap();
    let redis_url = redis_server.url();
    assert!(redis_url.contains(REDIS_PASSWORD));
    let publisher = RedisStreamPublisher::new(manager(&redis_url).await, "events");
    let relay = Relay::builder(outbox.clone(), publisher)
        .poll_interval(Duration::from_millis(50))
        .publish_timeout(Duration::from_millis(300))
        .unavailable_backoff(Duration::from_millis(300))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let enqueue = |from: usize| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await?;
            let batch: Vec<_> = (from..from + 20).map(|n| ev("order-1", n)).collect();
            outbox
                .enqueue_batch(&mut tx, &batch)
                .await
                .map_err(|e| sqlx::Error::Protocol(format!("enqueue: {e}")))?;
            tx.commit().await
        }
    };
    enqueue(0).await.unwrap();
    wait_drained(&outbox, Duration::from_secs(10)).await;
    let mut conn = manager(&redis_url).await;
    let stream: redis::streams::StreamRangeReply = conn.xrange_all("events").await.unwrap();
    assert_eq!(stream.ids.len(), 20);

    // Redis dies for good: events wait, the relay logs its failures.
    tokio::task::block_in_place(|| redis_server.kill().unwrap());
    enqueue(20).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(outbox.stats().await.unwrap().depth, 20);
    // Then PostgreSQL dies for good.
    tokio::task::block_in_place(|| pg.kill(Node::Primary).unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut errors = Vec::new();
    if let Err(e) = outbox.stats().await {
        errors.push(format!("{e}\n{e:?}"));
    }
    if let Err(e) = enqueue(40).await {
        errors.push(format!("{e}\n{e:?}"));
    }
    let relay_stats = relay.stats();
    assert!(relay_stats.store_errors > 0, "{relay_stats:?}");
    match relay.shutdown(Duration::from_secs(5)).await {
        Ok(s) => errors.push(format!("{s:?}")),
        Err(e) => errors.push(format!("{e}\n{e:?}")),
    }
    assert!(errors.len() >= 2, "{errors:?}");

    let mut shown = events.text();
    assert!(shown.contains("WARN"), "the outages were logged:\n{shown}");
    let _ = write!(
        shown,
        "\n{}\n{outbox:?}\n{relay_stats:?}\n{stream:?}",
        errors.join("\n")
    );
    for secret in [PG_PASSWORD, REDIS_PASSWORD] {
        assert!(!shown.contains(secret), "{secret} appears in:\n{shown}");
    }
    eprintln!(
        "{} lines of events and errors checked",
        shown.lines().count()
    );
}
