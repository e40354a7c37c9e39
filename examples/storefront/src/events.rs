//! The product-event consumer: keeps the search table current, applying each event once through
//! the inbox (a redelivered event finds its id recorded and changes nothing).
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Deserialize;
use stanchion_outbox::{Message, OutboxConfig, SqliteInbox};
use tokio::sync::mpsc;

use crate::Shop;

/// The body of every `product.*` event.
#[derive(Debug, Deserialize)]
struct ProductEvent {
    tenant: String,
    id: i64,
    name: String,
    category: String,
    version: i64,
}

/// Applies messages from one shard's relay until its channel closes.
pub(crate) async fn consume(
    shop: Arc<Shop>,
    config: OutboxConfig,
    source: String,
    mut rx: mpsc::Receiver<Message>,
) {
    let inbox = SqliteInbox::new(&config);
    while let Some(message) = rx.recv().await {
        let span = tracing::info_span!(
            "search.apply",
            outbox.id = message.id.0,
            event.r#type = %message.event_type,
            request_id = message.headers.get("request-id").map(String::as_str).unwrap_or(""),
        );
        let _entered = span.enter();
        match apply(&shop, &inbox, &source, &message).await {
            Ok(true) => shop.counters.events_applied.fetch_add(1, Ordering::Relaxed),
            Ok(false) => shop
                .counters
                .events_duplicate
                .fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(error = %e, "product event not applied");
                shop.counters.events_failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

async fn apply(
    shop: &Shop,
    inbox: &SqliteInbox,
    source: &str,
    message: &Message,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let event: ProductEvent = serde_json::from_slice(&message.payload)?;
    let mut tx = shop.orders.begin().await?;
    if !inbox
        .first_delivery(&mut tx, "search", &message.dedup_id(source))
        .await?
    {
        return Ok(false);
    }
    if message.event_type == "product.deleted" {
        sqlx::query("DELETE FROM search WHERE tenant = ? AND product_id = ?")
            .bind(&event.tenant)
            .bind(event.id)
            .execute(&mut *tx)
            .await?;
    } else {
        // Versions only move forward, whatever order events of different keys arrive in.
        sqlx::query(
            "INSERT INTO search (tenant, product_id, name, category, version) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, product_id) DO UPDATE SET name = excluded.name, \
             category = excluded.category, version = excluded.version \
             WHERE excluded.version > search.version",
        )
        .bind(&event.tenant)
        .bind(event.id)
        .bind(&event.name)
        .bind(&event.category)
        .bind(event.version)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}
