//! Events as the application writes them, and messages as relays and consumers see them.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::error::EnqueueError;

/// Event headers: string names to string values (a `traceparent` among them, say).
pub type Headers = BTreeMap<String, String>;

/// The W3C trace-context header name [`Event::with_trace_context`] sets.
pub const TRACEPARENT: &str = "traceparent";

/// Longest ordering key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// An event to write into the outbox inside a business transaction.
///
/// ```
/// use stanchion_outbox::Event;
/// let e = Event::json("product-42", "product.deleted", &serde_json::json!({"id": 42}))?
///     .with_trace_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(e.key(), "product-42");
/// assert_eq!(e.payload(), br#"{"id":42}"#);
/// # Ok::<(), stanchion_outbox::EnqueueError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    key: String,
    event_type: String,
    payload: Vec<u8>,
    headers: Headers,
}

impl Event {
    /// An event with an already encoded payload. `key` orders events: two events with the same
    /// key are published in the order they were enqueued (use the aggregate id).
    pub fn new(
        key: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            key: key.into(),
            event_type: event_type.into(),
            payload: payload.into(),
            headers: Headers::new(),
        }
    }

    /// An event whose payload is `payload` as JSON. A value that does not serialize is an error
    /// here, before anything touches the transaction.
    pub fn json<T: Serialize + ?Sized>(
        key: impl Into<String>,
        event_type: impl Into<String>,
        payload: &T,
    ) -> Result<Self, EnqueueError> {
        let bytes = serde_json::to_vec(payload).map_err(EnqueueError::Serialize)?;
        Ok(Self::new(key, event_type, bytes))
    }

    /// Adds (or replaces) a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the W3C `traceparent` header, so a consumer's span can link to the request that
    /// caused the event.
    #[must_use]
    pub fn with_trace_context(self, traceparent: impl Into<String>) -> Self {
        self.with_header(TRACEPARENT, traceparent)
    }

    /// The ordering key.
    pub fn key(&self) -> &str {
        &self.key
    }
    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    /// The encoded payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Checks the event against the limits and returns its encoded headers.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn validate(&self, max_bytes: usize) -> Result<String, EnqueueError> {
        if self.event_type.is_empty() {
            return Err(EnqueueError::Invalid {
                field: "event_type",
                reason: "is empty",
            });
        }
        if self.key.len() > MAX_KEY_BYTES {
            return Err(EnqueueError::Invalid {
                field: "key",
                reason: "is over 1,024 bytes",
            });
        }
        let headers = encode_headers(&self.headers);
        let size = self
            .payload
            .len()
            .saturating_add(self.key.len())
            .saturating_add(self.event_type.len())
            .saturating_add(headers.len());
        if size > max_bytes {
            return Err(EnqueueError::TooLarge {
                size,
                limit: max_bytes,
            });
        }
        Ok(headers)
    }
}

#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "redis")),
    allow(dead_code)
)]
pub(crate) fn encode_headers(h: &Headers) -> String {
    // A map of strings always serializes.
    serde_json::to_string(h).unwrap_or_else(|_| "{}".to_owned())
}

#[cfg_attr(
    not(any(feature = "postgres", feature = "sqlite", feature = "redis")),
    allow(dead_code)
)]
pub(crate) fn decode_headers(text: &str) -> Result<Headers, String> {
    serde_json::from_str(text).map_err(|e| format!("headers are not a JSON object of strings: {e}"))
}

/// The id the outbox gave an event: unique in its outbox table, never reused (PostgreSQL
/// identity, SQLite `AUTOINCREMENT`), increasing in enqueue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub i64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An event read back from the outbox, as a [`Publisher`](crate::Publisher) and a consumer see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// The outbox id; consumers deduplicate on it (see [`Message::dedup_id`]).
    pub id: MessageId,
    /// The ordering key.
    pub key: String,
    /// The event type.
    pub event_type: String,
    /// The encoded payload.
    pub payload: Vec<u8>,
    /// The headers.
    pub headers: Headers,
    /// When the event was enqueued, in milliseconds since the Unix epoch (database clock).
    pub enqueued_at_ms: i64,
    /// Failed publish attempts before this one.
    pub attempts: u32,
}

impl Message {
    /// A message, for publishers and consumers written outside this crate (and their tests).
    pub fn new(
        id: MessageId,
        key: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            id,
            key: key.into(),
            event_type: event_type.into(),
            payload: payload.into(),
            headers: Headers::new(),
            enqueued_at_ms: 0,
            attempts: 0,
        }
    }

    /// The payload parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// The id an inbox and a broker deduplicate on: `"{source}:{id}"`, where `source` names the
    /// outbox (its namespace), so two outboxes publishing to one stream never collide.
    pub fn dedup_id(&self, source: &str) -> String {
        format!("{source}:{}", self.id)
    }
}
