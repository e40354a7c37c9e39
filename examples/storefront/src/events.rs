//! The product-event consumer: keeps the search table current, applying each event once through
//! the inbox (a redelivered event finds its id recorded and changes nothing).
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::time::Duration;

use stanchion_outbox::{JetStreamConsumer, Message};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::Shop;

/// Applies messages from one shard's relay until its channel closes.
pub(crate) async fn consume(shop: Arc<Shop>, source: String, mut rx: mpsc::Receiver<Message>) {
    while let Some(message) = rx.recv().await {
        let span = tracing::info_span!(
            "search.apply",
            outbox.id = message.id.0,
            event.r#type = %message.event_type,
            request_id = message.headers.get("request-id").map(String::as_str).unwrap_or(""),
        );
        apply(&shop, &message.dedup_id(&source), &message, &span).await;
    }
}

/// Applies one message, counting what happened; `true` when it may be acknowledged (applied now
/// or earlier).
async fn apply(shop: &Shop, dedup_id: &str, message: &Message, span: &tracing::Span) -> bool {
    let result = shop
        .orders
        .apply(dedup_id, message)
        .instrument(span.clone())
        .await;
    let (counter, done) = match result {
        Ok(true) => (&shop.counters.events_applied, true),
        Ok(false) => (&shop.counters.events_duplicate, true),
        Err(e) => {
            tracing::warn!(parent: span, error = %e, "product event not applied");
            (&shop.counters.events_failed, false)
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    done
}

/// Applies messages from the JetStream durable consumer; each is acknowledged after its effect
/// committed, so a crash in between means a redelivery the inbox recognises.
pub(crate) async fn consume_jetstream(shop: Arc<Shop>, consumer: JetStreamConsumer) {
    loop {
        let batch = match consumer.fetch(64, Duration::from_millis(500)).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "JetStream fetch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for delivery in batch {
            let message = match &delivery.message {
                Ok(m) => m,
                Err(e) => {
                    // Not an outbox message: counted and acknowledged, never retried forever.
                    tracing::warn!(error = %e, "corrupt message on the product stream");
                    shop.counters.events_failed.fetch_add(1, Ordering::Relaxed);
                    let _ = delivery.ack().await;
                    continue;
                }
            };
            let span = tracing::info_span!(
                "search.apply",
                outbox.dedup_id = %delivery.dedup_id,
                event.r#type = %message.event_type,
                request_id = message.headers.get("request-id").map(String::as_str).unwrap_or(""),
            );
            if apply(&shop, &delivery.dedup_id, message, &span).await
                && let Err(e) = delivery.ack().await
            {
                tracing::warn!(parent: &span, error = %e, "ack failed; the inbox absorbs the redelivery");
            }
        }
    }
}
