//! Against a real `nats-server` with JetStream from the testkit: deduplication by message id,
//! a killed, paused and dead server, and a durable consumer that gets unacknowledged messages
//! again, with an inbox making the effect exactly-once.

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use sqlx::sqlite::SqlitePoolOptions;
use stanchion_outbox::{
    Event, JetStreamConsumer, JetStreamPublisher, Message, MessageId, OutboxConfig, OutboxStore,
    Publisher, Relay, SqliteInbox, SqliteOutbox,
};
use stanchion_testkit::NatsServer;
use support::*;

async fn js(server: &NatsServer) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_millis(300))
        .request_timeout(Some(Duration::from_millis(500)))
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .unwrap();
    jetstream::new(client)
}

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
    let mut tx = outbox.pool().begin().await.unwrap();
    let ids = outbox.enqueue_batch(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    ids
}

async fn stream_len(js: &jetstream::Context, name: &str) -> u64 {
    let mut s = js.get_stream(name).await.unwrap();
    s.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_twice_is_stored_once() {
    let server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let publisher = JetStreamPublisher::new(js.clone(), "shop.events").source("shop");
    publisher
        .ensure_stream("SHOP", Duration::from_secs(60))
        .await
        .unwrap();
    let m = Message::new(MessageId(7), "p-1", "product.deleted", b"{}".to_vec());
    for _ in 0..3 {
        let out = publisher.publish(std::slice::from_ref(&m)).await;
        assert!(out[0].is_ok(), "{:?}", out[0]);
    }
    assert_eq!(stream_len(&js, "SHOP").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_stream_events_wait_instead_of_dead_lettering() {
    let server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let outbox = sqlite_outbox().await;
    let publisher = JetStreamPublisher::new(js.clone(), "late.events");
    let relay = Relay::builder(outbox.clone(), publisher.clone())
        .max_attempts(1)
        .publish_timeout(Duration::from_millis(800))
        .unavailable_backoff(Duration::from_millis(200))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    enqueue(&outbox, (0..5).map(|i| ev("k", i)).collect()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = outbox.stats().await.unwrap();
    assert_eq!((s.depth, s.dead_letters), (5, 0));
    publisher
        .ensure_stream("LATE", Duration::from_secs(60))
        .await
        .unwrap();
    wait_drained(&outbox, Duration::from_secs(10)).await;
    assert_eq!(stream_len(&js, "LATE").await, 5);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// NATS killed: events wait in the outbox; restarted (its JetStream storage kept), they drain,
/// and messages the client re-sent after reconnecting are stored once (message-id dedup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_then_restarted_loses_nothing_and_stores_each_event_once() {
    let mut server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let publisher = JetStreamPublisher::new(js.clone(), "shop.events");
    publisher
        .ensure_stream("SHOP", Duration::from_secs(120))
        .await
        .unwrap();
    let outbox = sqlite_outbox().await;
    let relay = Relay::builder(outbox.clone(), publisher)
        .publish_timeout(Duration::from_millis(800))
        .unavailable_backoff(Duration::from_millis(200))
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut ids = enqueue(
        &outbox,
        (0..50).map(|i| ev(&format!("k{}", i % 5), i)).collect(),
    )
    .await;
    wait_drained(&outbox, Duration::from_secs(10)).await;
    tokio::task::block_in_place(|| server.kill().unwrap());
    ids.extend(
        enqueue(
            &outbox,
            (50..150).map(|i| ev(&format!("k{}", i % 5), i)).collect(),
        )
        .await,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = outbox.stats().await.unwrap();
    assert_eq!((s.depth, s.dead_letters), (100, 0), "{s:?}");
    assert!(relay.stats().unavailable > 0);
    tokio::task::block_in_place(|| server.restart().unwrap());
    wait_drained(&outbox, Duration::from_secs(20)).await;
    assert_eq!(stream_len(&js, "SHOP").await, 150);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_paused_then_resumed_drains_once() {
    let server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let publisher = JetStreamPublisher::new(js.clone(), "shop.events");
    publisher
        .ensure_stream("SHOP", Duration::from_secs(120))
        .await
        .unwrap();
    let outbox = sqlite_outbox().await;
    let relay = Relay::builder(outbox.clone(), publisher)
        .publish_timeout(Duration::from_millis(600))
        .unavailable_backoff(Duration::from_millis(200))
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    server.pause().unwrap();
    enqueue(
        &outbox,
        (0..40).map(|i| ev(&format!("k{}", i % 4), i)).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(outbox.stats().await.unwrap().depth, 40);
    server.resume().unwrap();
    wait_drained(&outbox, Duration::from_secs(20)).await;
    assert_eq!(stream_len(&js, "SHOP").await, 40);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nats_keeps_events_pending_and_the_relay_stops() {
    let mut server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let publisher = JetStreamPublisher::new(js.clone(), "shop.events");
    publisher
        .ensure_stream("SHOP", Duration::from_secs(120))
        .await
        .unwrap();
    let outbox = sqlite_outbox().await;
    let relay = Relay::builder(outbox.clone(), publisher)
        .max_attempts(1)
        .publish_timeout(Duration::from_millis(500))
        .unavailable_backoff(Duration::from_millis(300))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    tokio::task::block_in_place(|| server.kill().unwrap());
    enqueue(&outbox, (0..10).map(|i| ev("k", i)).collect()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = outbox.stats().await.unwrap();
    assert_eq!((s.depth, s.dead_letters), (10, 0));
    let t = Instant::now();
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// A durable consumer that does not acknowledge gets the message again after `ack_wait`; the
/// inbox applies it once. A second binding to the same durable name resumes where it left off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_gets_unacknowledged_messages_again_and_the_inbox_applies_once() {
    let server = NatsServer::start().unwrap();
    let js = js(&server).await;
    let publisher = JetStreamPublisher::new(js.clone(), "shop.events").source("stanchion");
    publisher
        .ensure_stream("SHOP", Duration::from_secs(120))
        .await
        .unwrap();
    let outbox = sqlite_outbox().await;
    sqlx::query("CREATE TABLE effects (id INTEGER NOT NULL)")
        .execute(outbox.pool())
        .await
        .unwrap();
    let relay = Relay::builder(outbox.clone(), publisher)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let ids = enqueue(
        &outbox,
        (0..30).map(|i| ev(&format!("k{}", i % 3), i)).collect(),
    )
    .await;
    wait_drained(&outbox, Duration::from_secs(10)).await;
    let inbox = SqliteInbox::new(outbox.config());
    let consumer = JetStreamConsumer::durable(&js, "SHOP", "indexer", Duration::from_millis(500))
        .await
        .unwrap();
    // First pass: apply 10, "crash" before acknowledging them.
    let first = consumer.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(first.len(), 10);
    for d in &first {
        let m = d.message.as_ref().unwrap();
        assert!(m.headers.contains_key("traceparent"));
        let mut tx = outbox.pool().begin().await.unwrap();
        if inbox
            .first_delivery(&mut tx, "indexer", &d.dedup_id)
            .await
            .unwrap()
        {
            sqlx::query("INSERT INTO effects VALUES (?)")
                .bind(m.id.0)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A new binding of the durable consumer: everything arrives, the first 10 again.
    let consumer = JetStreamConsumer::durable(&js, "SHOP", "indexer", Duration::from_millis(500))
        .await
        .unwrap();
    let mut redelivered = 0;
    let mut seen = 0;
    let start = Instant::now();
    while seen < 30 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "only {seen} of 30"
        );
        for d in consumer
            .fetch(10, Duration::from_millis(500))
            .await
            .unwrap()
        {
            let m = d.message.as_ref().unwrap();
            if d.delivered > 1 {
                redelivered += 1;
            }
            let mut tx = outbox.pool().begin().await.unwrap();
            if inbox
                .first_delivery(&mut tx, "indexer", &d.dedup_id)
                .await
                .unwrap()
            {
                sqlx::query("INSERT INTO effects VALUES (?)")
                    .bind(m.id.0)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
            d.ack().await.unwrap();
            seen += 1;
        }
    }
    assert_eq!(redelivered, 10);
    let effects: Vec<i64> = sqlx::query_scalar("SELECT id FROM effects ORDER BY id")
        .fetch_all(outbox.pool())
        .await
        .unwrap();
    let want: Vec<i64> = ids.iter().map(|m| m.0).collect();
    assert_eq!(effects, want);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}
