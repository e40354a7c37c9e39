//! Redis Streams: a publisher (pipelined XADD, optional MAXLEN, Redis Cluster) and a consumer
//! (consumer groups, XAUTOCLAIM of a dead consumer's pending entries).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, Value};

use crate::error::{ConsumeError, PublishError};
use crate::event::{Headers, Message, MessageId, decode_headers};
use crate::publish::Publisher;

/// Which stream a message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Streams {
    Fixed(Arc<str>),
    PerType(Arc<str>),
}

/// Publishes each message with `XADD` to a Redis stream: one stream for everything, or one per
/// event type. Messages for one stream go in one pipeline; different streams are sent
/// concurrently, each as single-key commands, so it works unchanged on Redis Cluster (give it a
/// `ClusterConnection`).
///
/// Entry fields: `id` (the dedup id, `"{source}:{outbox id}"`), `key`, `type`, `payload`,
/// `headers` (a JSON object) and `enqueued_ms`.
///
/// ```no_run
/// # async fn demo(url: &str) -> Result<(), Box<dyn std::error::Error>> {
/// use stanchion_outbox::RedisStreamPublisher;
/// let conn = redis::Client::open(url)?.get_connection_manager().await?;
/// let publisher = RedisStreamPublisher::new(conn, "shop:events").max_len(1_000_000);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStreamPublisher<C> {
    conn: C,
    streams: Streams,
    max_len: Option<usize>,
    source: Arc<str>,
}

impl<C> std::fmt::Debug for RedisStreamPublisher<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamPublisher")
            .field("streams", &self.streams)
            .field("max_len", &self.max_len)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisStreamPublisher<C> {
    /// Publishes everything to `stream`. The dedup source defaults to `stanchion` (set it to
    /// the outbox namespace with [`RedisStreamPublisher::source`]).
    pub fn new(conn: C, stream: impl Into<String>) -> Self {
        Self {
            conn,
            streams: Streams::Fixed(stream.into().into()),
            max_len: None,
            source: "stanchion".into(),
        }
    }
    /// Publishes each event type to its own stream, `{prefix}{event type}`. Per-key order then
    /// holds within each stream.
    pub fn per_type(conn: C, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            streams: Streams::PerType(prefix.into().into()),
            max_len: None,
            source: "stanchion".into(),
        }
    }
    /// Trims each stream to about `n` entries (`MAXLEN ~ n`) as it grows. Entries not yet read
    /// by a slow consumer group can be trimmed: size it for the longest consumer outage.
    #[must_use]
    pub fn max_len(mut self, n: usize) -> Self {
        self.max_len = Some(n);
        self
    }
    /// The `source` part of the dedup id (see [`Message::dedup_id`]).
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into().into();
        self
    }

    fn stream_of(&self, m: &Message) -> String {
        match &self.streams {
            Streams::Fixed(s) => s.to_string(),
            Streams::PerType(p) => format!("{p}{}", m.event_type),
        }
    }

    async fn send(&self, stream: String, batch: Vec<&Message>) -> Vec<Result<(), PublishError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for m in &batch {
            let headers = crate::event::encode_headers(&m.headers);
            let cmd = pipe.cmd("XADD").arg(&stream);
            if let Some(n) = self.max_len {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*")
                .arg("id")
                .arg(m.dedup_id(&self.source))
                .arg("key")
                .arg(&m.key)
                .arg("type")
                .arg(&m.event_type)
                .arg("payload")
                .arg(&m.payload)
                .arg("headers")
                .arg(headers)
                .arg("enqueued_ms")
                .arg(m.enqueued_at_ms);
        }
        let mut conn = self.conn.clone();
        match pipe
            .query_async::<Vec<redis::RedisResult<Value>>>(&mut conn)
            .await
        {
            Ok(results) if results.len() == batch.len() => results
                .into_iter()
                .map(|r| r.map(|_| ()).map_err(classify))
                .collect(),
            Ok(_) => batch
                .iter()
                .map(|_| {
                    Err(PublishError::unavailable(
                        "Redis answered a pipeline with the wrong number of replies",
                    ))
                })
                .collect(),
            Err(e) => {
                let text = e.to_string();
                batch
                    .iter()
                    .map(|_| Err(PublishError::unavailable(text.clone())))
                    .collect()
            }
        }
    }
}

/// A server error that says "not now" (out of memory, loading, failing over) is the broker
/// being unavailable; anything else refuses this message.
fn classify(e: RedisError) -> PublishError {
    const TRANSIENT: [&str; 9] = [
        "OOM",
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "MASTERDOWN",
        "READONLY",
        "MOVED",
        "ASK",
    ];
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.code().is_some_and(|c| TRANSIENT.contains(&c));
    if transient {
        PublishError::unavailable(e)
    } else {
        PublishError::rejected(e)
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Publisher for RedisStreamPublisher<C> {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        // Group by stream, remembering each message's place.
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, m) in batch.iter().enumerate() {
            let s = self.stream_of(m);
            let g = *index.entry(s.clone()).or_insert_with(|| {
                groups.push((s, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        let sends = groups.iter().map(|(stream, members)| {
            self.send(stream.clone(), members.iter().map(|&i| &batch[i]).collect())
        });
        let replies = futures_util::future::join_all(sends).await;
        let mut out: Vec<Option<Result<(), PublishError>>> = batch.iter().map(|_| None).collect();
        for ((_, members), results) in groups.iter().zip(replies) {
            for (&i, r) in members.iter().zip(results) {
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(PublishError::unavailable("no reply"))))
            .collect()
    }
}

/// One entry read from a stream by a [`RedisStreamConsumer`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Delivery {
    /// The stream entry id, for [`RedisStreamConsumer::ack`].
    pub entry_id: String,
    /// The dedup id from the entry's `id` field, for an inbox (empty if missing).
    pub dedup_id: String,
    /// The message, or why the entry is not one.
    pub message: Result<Message, ConsumeError>,
}

/// Reads a stream as one consumer of a consumer group. Acknowledge an entry only after its
/// effect has committed (with an inbox, the same transaction recorded its dedup id); entries of
/// a consumer that died stay pending and another consumer takes them over with
/// [`RedisStreamConsumer::claim_idle`]. Use a connection of its own: a blocking read holds the
/// connection for its whole wait.
#[derive(Clone)]
pub struct RedisStreamConsumer<C> {
    conn: C,
    stream: Arc<str>,
    group: Arc<str>,
    consumer: Arc<str>,
}

impl<C> std::fmt::Debug for RedisStreamConsumer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamConsumer")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

fn broker(e: RedisError) -> ConsumeError {
    ConsumeError::Broker(Box::new(e))
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisStreamConsumer<C> {
    /// Consumer `consumer` of `group` on `stream`.
    pub fn new(
        conn: C,
        stream: impl Into<String>,
        group: impl Into<String>,
        consumer: impl Into<String>,
    ) -> Self {
        Self {
            conn,
            stream: stream.into().into(),
            group: group.into().into(),
            consumer: consumer.into().into(),
        }
    }

    /// Creates the group (and the stream) if missing; a new group starts at the stream's first
    /// entry, so it sees everything still kept.
    pub async fn ensure_group(&self) -> Result<(), ConsumeError> {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&*self.stream)
            .arg(&*self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(broker(e)),
        }
    }

    /// New entries for this consumer, up to `count`, waiting up to `block` for the first one
    /// (`None`: do not wait).
    pub async fn read(
        &self,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Delivery>, ConsumeError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&*self.group)
            .arg(&*self.consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&*self.stream).arg(">");
        let mut conn = self.conn.clone();
        let reply: Option<StreamReadReply> = cmd.query_async(&mut conn).await.map_err(broker)?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(parse_entry)
            .collect())
    }

    /// Takes over up to `count` entries that other consumers of the group were given but have
    /// not acknowledged for `min_idle` (a consumer that died), with `XAUTOCLAIM`.
    pub async fn claim_idle(
        &self,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>, ConsumeError> {
        let mut conn = self.conn.clone();
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&*self.stream)
            .arg(&*self.group)
            .arg(&*self.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await
            .map_err(broker)?;
        Ok(reply.claimed.into_iter().map(parse_entry).collect())
    }

    /// Acknowledges entries; returns how many were pending.
    pub async fn ack(&self, entry_ids: &[String]) -> Result<u64, ConsumeError> {
        if entry_ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        redis::cmd("XACK")
            .arg(&*self.stream)
            .arg(&*self.group)
            .arg(entry_ids)
            .query_async(&mut conn)
            .await
            .map_err(broker)
    }
}

fn field_bytes(map: &HashMap<String, Value>, name: &str) -> Option<Vec<u8>> {
    match map.get(name)? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

fn field_text(map: &HashMap<String, Value>, name: &str) -> Result<String, String> {
    let b = field_bytes(map, name).ok_or_else(|| format!("field `{name}` is missing"))?;
    String::from_utf8(b).map_err(|_| format!("field `{name}` is not UTF-8"))
}

fn parse_entry(e: StreamId) -> Delivery {
    let dedup_id = field_text(&e.map, "id").unwrap_or_default();
    let message = (|| -> Result<Message, String> {
        let id = dedup_id
            .rsplit_once(':')
            .and_then(|(_, n)| n.parse::<i64>().ok())
            .ok_or_else(|| "field `id` is not `{source}:{number}`".to_owned())?;
        let headers: Headers = decode_headers(&field_text(&e.map, "headers")?)?;
        Ok(Message {
            id: MessageId(id),
            key: field_text(&e.map, "key")?,
            event_type: field_text(&e.map, "type")?,
            payload: field_bytes(&e.map, "payload")
                .ok_or_else(|| "field `payload` is missing".to_owned())?,
            headers,
            enqueued_at_ms: field_text(&e.map, "enqueued_ms")?
                .parse()
                .map_err(|_| "field `enqueued_ms` is not a number".to_owned())?,
            attempts: 0,
        })
    })()
    .map_err(|reason| ConsumeError::Corrupt {
        entry: e.id.clone(),
        reason,
    });
    Delivery {
        entry_id: e.id,
        dedup_id,
        message,
    }
}
