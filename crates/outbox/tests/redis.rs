//! Against real Redis from the testkit: the Redis Streams publisher through a killed, paused,
//! dead and clustered Redis, and the consumer group reader with XAUTOCLAIM and an inbox.

mod support;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use stanchion_outbox::{
    ConsumeError, Event, MessageId, OutboxConfig, OutboxStore, PgInbox, PgOutbox,
    RedisStreamConsumer, RedisStreamPublisher, Relay, SqliteOutbox,
};
use stanchion_testkit::{PostgresCluster, RedisCluster, RedisServer};
use support::*;

/// An embedded outbox (SQLite in memory) for the broker-side tests.
async fn sqlite_outbox() -> SqliteOutbox {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    let outbox = SqliteOutbox::new(pool, OutboxConfig::builder().lanes(4).build().unwrap());
    outbox.migrate().await.unwrap();
    outbox
}

async fn enqueue(outbox: &SqliteOutbox, events: Vec<Event>) -> Vec<MessageId> {
    let pool = outbox.pool().clone();
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox.enqueue_batch(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    ids
}

/// Stream entries' (dedup id, key) in stream order.
async fn entries(conn: &mut ConnectionManager, stream: &str) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            let get = |f: &str| match e.map.get(f) {
                Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).unwrap(),
                other => panic!("field {f}: {other:?}"),
            };
            (get("id"), get("key"))
        })
        .collect()
}

async fn wait_depth_zero<S: OutboxStore>(store: &S, timeout: Duration) {
    wait_drained(store, timeout).await;
}

/// Redis killed: events accumulate in the outbox (not dead-lettered); restarted, they all
/// drain into the stream in per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted_loses_nothing() {
    let mut server = RedisServer::start().unwrap();
    let outbox = sqlite_outbox().await;
    let conn = manager(&server.url()).await;
    let relay = Relay::builder(
        outbox.clone(),
        RedisStreamPublisher::new(conn.clone(), "events").source("stanchion"),
    )
    .max_attempts(2)
    .publish_timeout(Duration::from_millis(300))
    .unavailable_backoff(Duration::from_millis(200))
    .poll_interval(Duration::from_millis(50))
    .build()
    .unwrap()
    .start()
    .await
    .unwrap();
    let before = enqueue(
        &outbox,
        (0..50).map(|i| ev(&format!("k{}", i % 5), i)).collect(),
    )
    .await;
    wait_depth_zero(&outbox, Duration::from_secs(10)).await;
    tokio::task::block_in_place(|| server.kill().unwrap());
    let during = enqueue(
        &outbox,
        (0..100).map(|i| ev(&format!("k{}", i % 5), i)).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = outbox.stats().await.unwrap();
    assert_eq!((s.depth, s.dead_letters), (100, 0), "{s:?}");
    assert!(relay.stats().unavailable > 0);
    tokio::task::block_in_place(|| server.restart().unwrap());
    wait_depth_zero(&outbox, Duration::from_secs(15)).await;
    let mut reader = manager(&server.url()).await;
    let got = entries(&mut reader, "events").await;
    // The restarted server kept nothing from before (no persistence): the stream holds exactly
    // the events written during the outage, once each, in per-key order.
    let want: Vec<String> = during.iter().map(|id| format!("stanchion:{id}")).collect();
    let mut got_ids: Vec<String> = got.iter().map(|(id, _)| id.clone()).collect();
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (id, key) in &got {
        per_key
            .entry(key.clone())
            .or_default()
            .push(id.rsplit_once(':').unwrap().1.parse().unwrap());
    }
    for ids in per_key.values() {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }
    got_ids.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got_ids, want_sorted);
    assert_eq!(before.len(), 50);
    let stats = relay.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.failed_attempts, 0);
    assert_eq!(stats.published, 150);
}

/// Redis paused (SIGSTOP): publishes time out and count as an outage; resumed, everything drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_then_resumed_drains() {
    let server = RedisServer::start().unwrap();
    let outbox = sqlite_outbox().await;
    let relay = Relay::builder(
        outbox.clone(),
        RedisStreamPublisher::new(manager(&server.url()).await, "events"),
    )
    .publish_timeout(Duration::from_millis(300))
    .unavailable_backoff(Duration::from_millis(200))
    .poll_interval(Duration::from_millis(50))
    .build()
    .unwrap()
    .start()
    .await
    .unwrap();
    server.pause().unwrap();
    let ids = enqueue(
        &outbox,
        (0..40).map(|i| ev(&format!("k{}", i % 4), i)).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(outbox.stats().await.unwrap().depth, 40);
    assert!(relay.stats().unavailable > 0);
    server.resume().unwrap();
    wait_depth_zero(&outbox, Duration::from_secs(15)).await;
    let got = entries(&mut manager(&server.url()).await, "events").await;
    // A publish that timed out may still have reached Redis: duplicates are allowed, losses not.
    for id in &ids {
        let want = format!("stanchion:{id}");
        assert!(got.iter().any(|(g, _)| *g == want), "{want} missing");
    }
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Redis killed and never restarted: the events stay pending, nothing is dead-lettered, the
/// relay keeps backing off and stops when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_keeps_events_pending_and_the_relay_stops() {
    let mut server = RedisServer::start().unwrap();
    let outbox = sqlite_outbox().await;
    let relay = Relay::builder(
        outbox.clone(),
        RedisStreamPublisher::new(manager(&server.url()).await, "events"),
    )
    .max_attempts(1)
    .publish_timeout(Duration::from_millis(300))
    .unavailable_backoff(Duration::from_millis(400))
    .build()
    .unwrap()
    .start()
    .await
    .unwrap();
    tokio::task::block_in_place(|| server.kill().unwrap());
    enqueue(&outbox, (0..20).map(|i| ev("k", i)).collect()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = outbox.stats().await.unwrap();
    assert_eq!((s.depth, s.dead_letters), (20, 0));
    assert!(s.oldest_pending_ms >= 1500, "{s:?}");
    let r = relay.stats();
    assert!(r.unavailable >= 2 && r.unavailable < 30, "{r:?}");
    let t = Instant::now();
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// On Redis Cluster, one stream per event type spreads over slots; every event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_per_type_streams_on_redis_cluster() {
    let cluster = RedisCluster::shared().unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let conn = client.get_async_connection().await.unwrap();
    let prefix = format!("outbox-{}:", fastrand::u64(..));
    let outbox = sqlite_outbox().await;
    let relay = Relay::builder(
        outbox.clone(),
        RedisStreamPublisher::per_type(conn.clone(), prefix.clone()).max_len(10_000),
    )
    .build()
    .unwrap()
    .start()
    .await
    .unwrap();
    let events: Vec<Event> = (0..300)
        .map(|i| {
            Event::new(
                format!("agg{}", i % 17),
                format!("type{}", i % 12),
                format!("{i}").into_bytes(),
            )
        })
        .collect();
    enqueue(&outbox, events).await;
    wait_depth_zero(&outbox, Duration::from_secs(15)).await;
    let mut total = 0;
    let mut slots = std::collections::HashSet::new();
    let mut c = conn.clone();
    for t in 0..12 {
        let key = format!("{prefix}type{t}");
        let slot: u32 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        slots.insert(slot * 3 / 16384);
        let n: usize = redis::cmd("XLEN")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        total += n;
    }
    assert_eq!(total, 300);
    // Twelve streams under a random prefix: all in one node's third by chance is (1/3)^11.
    assert!(
        slots.len() > 1,
        "the streams all landed on one node's range"
    );
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

fn pg() -> &'static PostgresCluster {
    static C: OnceLock<PostgresCluster> = OnceLock::new();
    C.get_or_init(|| PostgresCluster::start(0).unwrap())
}

async fn pg_pool() -> PgPool {
    let db = pg().create_database().unwrap();
    PgPoolOptions::new()
        .max_connections(8)
        .connect(&db.primary_url)
        .await
        .unwrap()
}

/// End to end: PostgreSQL outbox -> relay -> Redis stream -> two consumers of a group, one of
/// which dies holding entries -> the other takes them over with XAUTOCLAIM -> effects through a
/// PostgreSQL inbox. Entries published twice (a duplicate XADD) and a corrupt entry are handled:
/// exactly one effect per event, nothing left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_take_over_a_dead_consumers_entries_and_apply_each_event_once() {
    let server = RedisServer::shared().unwrap();
    let pool = pg_pool().await;
    let config = OutboxConfig::builder().namespace("shop").build().unwrap();
    let outbox = PgOutbox::new(pool.clone(), config.clone());
    outbox.migrate().await.unwrap();
    sqlx::query("CREATE TABLE effects (message_id text PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let stream = format!("shop-events-{}", fastrand::u64(..));
    let conn = manager(&server.url()).await;
    let relay = Relay::builder(
        outbox.clone(),
        RedisStreamPublisher::new(conn.clone(), stream.clone()).source("shop"),
    )
    .build()
    .unwrap()
    .start()
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox
        .enqueue_batch(
            &mut tx,
            &(0..200)
                .map(|i| ev(&format!("p{}", i % 11), i))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_drained(&outbox, Duration::from_secs(10)).await;
    // A duplicate of one entry (as a relay that died before marking would produce) and a
    // corrupt entry.
    let mut c = conn.clone();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("id")
        .arg(format!("shop:{}", ids[3]))
        .arg("key")
        .arg("p3")
        .arg("type")
        .arg("test.event")
        .arg("payload")
        .arg("{}")
        .arg("headers")
        .arg("{}")
        .arg("enqueued_ms")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("garbage")
        .arg("1")
        .query_async(&mut c)
        .await
        .unwrap();

    let inbox = PgInbox::new(&config);
    let dying = RedisStreamConsumer::new(manager(&server.url()).await, &stream, "indexer", "a");
    dying.ensure_group().await.unwrap();
    dying.ensure_group().await.unwrap(); // idempotent
    let taken = dying.read(60, None).await.unwrap();
    assert_eq!(taken.len(), 60);
    // ... and "a" dies without acknowledging.

    let survivor = RedisStreamConsumer::new(manager(&server.url()).await, &stream, "indexer", "b");
    let mut corrupt = 0;
    let apply = |batch: Vec<stanchion_outbox::Delivery>| {
        let pool = pool.clone();
        let inbox = inbox.clone();
        async move {
            let mut acks = Vec::new();
            let mut bad = 0;
            for d in batch {
                match d.message {
                    Ok(m) => {
                        let mut tx = pool.begin().await.unwrap();
                        if inbox
                            .first_delivery(&mut tx, "indexer", &d.dedup_id)
                            .await
                            .unwrap()
                        {
                            sqlx::query("INSERT INTO effects VALUES ($1)")
                                .bind(m.dedup_id("shop"))
                                .execute(&mut *tx)
                                .await
                                .unwrap();
                        }
                        tx.commit().await.unwrap();
                    }
                    Err(ConsumeError::Corrupt { .. }) => bad += 1,
                    Err(e) => panic!("{e}"),
                }
                acks.push(d.entry_id);
            }
            (acks, bad)
        }
    };
    loop {
        let batch = survivor
            .read(50, Some(Duration::from_millis(100)))
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        let (acks, bad) = apply(batch).await;
        corrupt += bad;
        survivor.ack(&acks).await.unwrap();
    }
    // Too early: a's entries are not idle long enough yet.
    assert!(
        survivor
            .claim_idle(Duration::from_secs(60), 100)
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claimed = survivor
        .claim_idle(Duration::from_millis(200), 100)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 60);
    let (acks, bad) = apply(claimed).await;
    corrupt += bad;
    assert_eq!(survivor.ack(&acks).await.unwrap(), 60);
    assert_eq!(corrupt, 1);
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(effects, 200);
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("indexer")
        .query_async(&mut c)
        .await
        .unwrap();
    let count = match pending {
        redis::Value::Array(ref v) => match v.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => panic!("{pending:?}"),
        },
        _ => panic!("{pending:?}"),
    };
    assert_eq!(count, 0);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}
