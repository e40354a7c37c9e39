//! The product-event consumer: keeps the search table current, applying each event once through
//! the inbox (a redelivered event finds its id recorded and changes nothing).
use std::sync::Arc;
use std::sync::atomic::Ordering;

use stanchion_outbox::Message;
use tokio::sync::mpsc;

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
        let result = {
            let _entered = span.enter();
            shop.orders.apply(&source, &message).await
        };
        let counter = match result {
            Ok(true) => &shop.counters.events_applied,
            Ok(false) => &shop.counters.events_duplicate,
            Err(e) => {
                tracing::warn!(parent: &span, error = %e, "product event not applied");
                &shop.counters.events_failed
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
