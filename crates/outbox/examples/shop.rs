//! The shop on SQLite, no server needed: products deleted with their events in one transaction,
//! a relay publishing them to an in-process channel, a search indexer applying each through the
//! inbox, and a poison event that is dead-lettered without holding up other products.
//!
//! `cargo run -p stanchion-outbox --features migrate --example shop`

use std::time::{Duration, Instant};

use stanchion_outbox::{
    ChannelPublisher, Event, Message, OutboxConfig, OutboxStore, PublishError, Publisher, Relay,
    SqliteInbox, SqliteOutbox,
};

/// The channel, refusing events of type `product.poison` as a broker would refuse a bad message.
struct Broker(ChannelPublisher);

impl Publisher for Broker {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            if m.event_type == "product.poison" {
                out.push(Err(PublishError::rejected("schema registry: unknown type")));
            } else {
                out.extend(self.0.publish(std::slice::from_ref(m)).await);
            }
        }
        out
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A database file in WAL mode (an in-memory database shared by several connections locks
    // whole tables, so the relay and the writers would get in each other's way).
    let dir = tempfile::tempdir()?;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("shop.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    let outbox = SqliteOutbox::new(pool.clone(), OutboxConfig::builder().lanes(8).build()?);
    outbox.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
         CREATE TABLE search_docs (product_id INTEGER PRIMARY KEY);",
    )
    .execute(&pool)
    .await?;
    for id in 1..=20_i64 {
        sqlx::query("INSERT INTO products VALUES (?, ?)")
            .bind(id)
            .bind(format!("product {id}"))
            .execute(&pool)
            .await?;
        sqlx::query("INSERT INTO search_docs VALUES (?)")
            .bind(id)
            .execute(&pool)
            .await?;
    }

    let (channel, mut rx) = ChannelPublisher::new(256);
    let relay = Relay::builder(outbox.clone(), Broker(channel))
        .max_attempts(3)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .poll_interval(Duration::from_millis(50))
        .build()?
        .start()
        .await?;

    // The indexer: each event applied once, in its own transaction, through the inbox.
    let inbox = SqliteInbox::new(outbox.config());
    let indexer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut applied = 0;
            while let Some(m) = rx.recv().await {
                let mut tx = pool.begin().await?;
                if inbox
                    .first_delivery(&mut tx, "search-indexer", &m.dedup_id("stanchion"))
                    .await?
                {
                    let id: i64 = m.json::<serde_json::Value>()?["id"].as_i64().unwrap_or(0);
                    sqlx::query("DELETE FROM search_docs WHERE product_id = ?")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    applied += 1;
                }
                tx.commit().await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(applied)
        })
    };

    let start = Instant::now();
    for id in 1..=10_i64 {
        let mut tx = pool.begin().await?;
        sqlx::query("DELETE FROM products WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let event = Event::json(
            format!("product-{id}"),
            "product.deleted",
            &serde_json::json!({ "id": id }),
        )?;
        outbox.enqueue(&mut tx, &event).await?;
        if id == 3 {
            outbox
                .enqueue(
                    &mut tx,
                    &Event::new("product-3", "product.poison", b"{}".to_vec()),
                )
                .await?;
        }
        // Every fourth delete is rolled back: no event for it.
        if id % 4 == 0 {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
    }
    while outbox.stats().await?.depth > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = relay.shutdown(Duration::from_secs(5)).await?;
    let applied = indexer.await?.map_err(|e| e.to_string())?;
    let left: Vec<i64> =
        sqlx::query_scalar("SELECT product_id FROM search_docs WHERE product_id <= 10 ORDER BY 1")
            .fetch_all(&pool)
            .await?;
    let dead = outbox.dead_letters(None, 10).await?;
    println!(
        "deleted 8 products (2 deletes rolled back) in {:?}",
        start.elapsed()
    );
    println!(
        "relay: {} published, {} rejected attempts, {} dead-lettered, p99 {} us",
        stats.published, stats.failed_attempts, stats.dead_lettered, stats.latency_p99_us
    );
    println!(
        "indexer applied {applied}; search docs left among 1..=10: {left:?} (the rolled-back 4 and 8)"
    );
    for d in &dead {
        println!(
            "dead letter {} ({}, key {}): {} attempts, {}",
            d.id, d.event_type, d.key, d.attempts, d.error
        );
    }
    assert_eq!(applied, 8);
    assert_eq!(left, vec![4, 8]);
    assert_eq!(dead.len(), 1);
    Ok(())
}
