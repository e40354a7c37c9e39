//! NATS JetStream: a publisher with message-id deduplication and publish acknowledgements, and
//! a durable pull consumer.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, Context};
use futures_util::StreamExt;

use crate::error::{ConsumeError, PublishError};
use crate::event::{Headers, Message, MessageId};
use crate::publish::Publisher;

/// Header names the publisher sets next to the event's own headers.
const KEY: &str = "Outbox-Key";
const TYPE: &str = "Outbox-Type";
const ENQUEUED: &str = "Outbox-Enqueued-Ms";
const MSG_ID: &str = "Nats-Msg-Id";

/// Publishes each message to JetStream on `{prefix}.{event type}` with a `Nats-Msg-Id` header
/// (the dedup id), so a message the relay publishes twice within the stream's duplicate window
/// is stored once; a message counts as published only once JetStream acknowledged it. The
/// wave's messages are sent back to back and their acknowledgements awaited together.
///
/// The stream must exist and cover the subjects (see [`JetStreamPublisher::ensure_stream`]);
/// until it does, publishing counts as the broker being unavailable and events wait.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use stanchion_outbox::JetStreamPublisher;
/// let js = async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await?);
/// let publisher = JetStreamPublisher::new(js, "shop.events").source("shop");
/// publisher.ensure_stream("SHOP_EVENTS", std::time::Duration::from_secs(120)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct JetStreamPublisher {
    js: Context,
    prefix: Arc<str>,
    source: Arc<str>,
}

impl std::fmt::Debug for JetStreamPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamPublisher")
            .field("prefix", &self.prefix)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl JetStreamPublisher {
    /// Publishes to subjects `{prefix}.{event type}`.
    pub fn new(js: Context, prefix: impl Into<String>) -> Self {
        Self {
            js,
            prefix: prefix.into().into(),
            source: "stanchion".into(),
        }
    }

    /// The `source` part of the dedup id (see [`Message::dedup_id`]).
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into().into();
        self
    }

    /// Creates the stream `name` over `{prefix}.>` with file storage and the given duplicate
    /// window (how long JetStream remembers message ids), if it does not exist.
    pub async fn ensure_stream(
        &self,
        name: &str,
        duplicate_window: Duration,
    ) -> Result<(), ConsumeError> {
        self.js
            .get_or_create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{}.>", self.prefix)],
                duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| ConsumeError::Broker(Box::new(e)))?;
        Ok(())
    }
}

fn classify(e: jetstream::context::PublishError) -> PublishError {
    match e.kind() {
        // Down, slow, or no stream bound to the subject yet: wait, do not burn attempts.
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => PublishError::unavailable(e),
        _ => PublishError::rejected(e),
    }
}

impl Publisher for JetStreamPublisher {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        let mut acks = Vec::with_capacity(batch.len());
        for m in batch {
            let mut headers = HeaderMap::new();
            for (k, v) in &m.headers {
                headers.insert(k.as_str(), v.as_str());
            }
            headers.insert(NATS_MESSAGE_ID, m.dedup_id(&self.source).as_str());
            headers.insert(KEY, m.key.as_str());
            headers.insert(TYPE, m.event_type.as_str());
            headers.insert(ENQUEUED, m.enqueued_at_ms.to_string().as_str());
            let subject = format!("{}.{}", self.prefix, m.event_type);
            acks.push(
                self.js
                    .publish_with_headers(subject, headers, m.payload.clone().into())
                    .await,
            );
        }
        let waits = acks.into_iter().map(|a| async move {
            match a {
                Ok(fut) => fut.await.map(|_| ()).map_err(classify),
                Err(e) => Err(classify(e)),
            }
        });
        futures_util::future::join_all(waits).await
    }
}

/// A message fetched by a [`JetStreamConsumer`]; acknowledge it after its effect committed.
#[derive(Debug)]
#[non_exhaustive]
pub struct JetStreamDelivery {
    /// The dedup id from `Nats-Msg-Id`, for an inbox (empty if missing).
    pub dedup_id: String,
    /// The message, or why it is not an outbox message.
    pub message: Result<Message, ConsumeError>,
    /// How many times JetStream has delivered it (1 the first time).
    pub delivered: u64,
    raw: jetstream::Message,
}

impl JetStreamDelivery {
    /// Acknowledges the message (JetStream will not redeliver it).
    pub async fn ack(&self) -> Result<(), ConsumeError> {
        self.raw.ack().await.map_err(ConsumeError::Broker)
    }
}

/// A durable pull consumer: its position survives restarts of the consumer and of the server;
/// a message not acknowledged within `ack_wait` is delivered again (to this or another instance
/// of the same durable consumer).
#[derive(Debug, Clone)]
pub struct JetStreamConsumer {
    consumer: PullConsumer,
}

impl JetStreamConsumer {
    /// Binds to (creating if needed) the durable consumer `durable` on stream `stream`, with
    /// explicit acknowledgements.
    pub async fn durable(
        js: &Context,
        stream: &str,
        durable: &str,
        ack_wait: Duration,
    ) -> Result<Self, ConsumeError> {
        let stream = js
            .get_stream(stream)
            .await
            .map_err(|e| ConsumeError::Broker(Box::new(e)))?;
        let consumer = stream
            .get_or_create_consumer(
                durable,
                pull::Config {
                    durable_name: Some(durable.to_owned()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| ConsumeError::Broker(Box::new(e)))?;
        Ok(Self { consumer })
    }

    /// Up to `max` messages, waiting at most `expires` for them.
    pub async fn fetch(
        &self,
        max: usize,
        expires: Duration,
    ) -> Result<Vec<JetStreamDelivery>, ConsumeError> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max.max(1))
            .expires(expires)
            .messages()
            .await
            .map_err(|e| ConsumeError::Broker(Box::new(e)))?;
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            let m = m.map_err(ConsumeError::Broker)?;
            out.push(parse(m));
        }
        Ok(out)
    }
}

fn parse(raw: jetstream::Message) -> JetStreamDelivery {
    let delivered = raw.info().map(|i| i.delivered.max(0) as u64).unwrap_or(0);
    let empty = HeaderMap::new();
    let h = raw.headers.as_ref().unwrap_or(&empty);
    let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
    // The standard header by its constant: a plain `&str` name is looked up as a custom header.
    let dedup_id = h
        .get(NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let entry = raw.subject.to_string();
    let message = (|| -> Result<Message, String> {
        let id = dedup_id
            .rsplit_once(':')
            .and_then(|(_, n)| n.parse::<i64>().ok())
            .ok_or_else(|| "header `Nats-Msg-Id` is not `{source}:{number}`".to_owned())?;
        let mut headers = Headers::new();
        for (k, vs) in h.iter() {
            let k = k.to_string();
            if [MSG_ID, KEY, TYPE, ENQUEUED].contains(&k.as_str()) {
                continue;
            }
            if let Some(v) = vs.last() {
                headers.insert(k, v.as_str().to_owned());
            }
        }
        Ok(Message {
            id: MessageId(id),
            key: get(KEY).ok_or("header `Outbox-Key` is missing")?,
            event_type: get(TYPE).ok_or("header `Outbox-Type` is missing")?,
            payload: raw.payload.to_vec(),
            headers,
            enqueued_at_ms: get(ENQUEUED)
                .and_then(|v| v.parse().ok())
                .ok_or("header `Outbox-Enqueued-Ms` is missing or not a number")?,
            attempts: 0,
        })
    })()
    .map_err(|reason| ConsumeError::Corrupt { entry, reason });
    JetStreamDelivery {
        dedup_id,
        message,
        delivered,
        raw,
    }
}
