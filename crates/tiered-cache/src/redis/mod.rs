//! The Redis L2 store: entries as strings with a TTL, conditional writes and leases through
//! small Lua scripts, and invalidations over pub/sub.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionLike;
use tokio::sync::{broadcast, watch};

use crate::error::StoreError;
use crate::store::{BusEvent, CacheStore, Expect, Subscription};

/// Writes ARGV[1] with a TTL of ARGV[2] ms if the condition ARGV[3] holds: "any", "absent",
/// or "stamp" with the 8 stamp bytes in ARGV[4] (bytes 4 to 11 of the current value, Lua
/// counting).
const SET_IF: &str = r#"
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'absent' then
  if cur then return 0 end
elseif ARGV[3] == 'stamp' then
  if not cur then return 0 end
  local stamp = string.sub(cur, 4, 11)
  if stamp .. string.rep('\0', 8 - #stamp) ~= ARGV[4] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Sets KEYS[1] to ARGV[1] if that is more than it holds; returns what it holds afterwards.
/// Both are decimal strings without leading zeros, compared as such (Lua numbers are doubles,
/// exact only to 2^53).
const RAISE: &str = r#"
local cur = redis.call('GET', KEYS[1]) or '0'
local new = ARGV[1]
if #new > #cur or (#new == #cur and new > cur) then
  redis.call('SET', KEYS[1], new)
  return new
end
return cur
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

fn backend(e: &redis::RedisError) -> StoreError {
    // redis-rs error texts name the failure, never the URL or its password.
    StoreError::Backend(format!("{:?}: {e}", e.kind()))
}

/// Where the bus listens.
enum Subscriber {
    /// No bus.
    None,
    /// `SUBSCRIBE` on a dedicated connection to one server (on a cluster, any node: Redis
    /// Cluster forwards `PUBLISH` to every node).
    Channel(redis::Client),
    /// `SSUBSCRIBE` through a RESP3 cluster connection, which follows the channel's slot.
    Sharded(Box<redis::cluster::ClusterClient>),
}

impl Subscriber {
    fn is_some(&self) -> bool {
        !matches!(self, Self::None)
    }
}

struct Inner<C> {
    conn: C,
    set_if: redis::Script,
    release: redis::Script,
    raise: redis::Script,
    channel: String,
    bus: broadcast::Sender<BusEvent>,
    subscriber: Subscriber,
    /// Dropped with the store: stops the subscriber task.
    stop: watch::Sender<bool>,
    started: std::sync::Once,
}

impl<C> Drop for Inner<C> {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Entries, leases and the invalidation bus in Redis, through any async redis-rs connection: a
/// `redis::aio::ConnectionManager` for a single server, a
/// `redis::cluster_async::ClusterConnection` for Redis Cluster (multi-key reads are split by
/// slot, one `MGET` per node, concurrently).
///
/// Invalidations travel on the pub/sub channel `PREFIX` + `bus`, read through a dedicated
/// subscriber connection from `subscriber` (for a cluster, a client of any one node: Redis
/// Cluster forwards `PUBLISH` to every node; or sharded pub/sub with
/// [`RedisCacheStore::sharded`], which follows the channel's slot through failovers). The subscriber reconnects by itself, and each
/// connection is reported as [`BusEvent::Connected`], each loss as [`BusEvent::Lost`]. Clones share everything.
///
/// ```no_run
/// use stanchion_tiered_cache::RedisCacheStore;
/// # async fn f() -> redis::RedisResult<()> {
/// let client = redis::Client::open("redis://127.0.0.1:6379")?;
/// let conn = client.get_connection_manager().await?;
/// let store = RedisCacheStore::new(conn, Some(client), "shop:");
/// # Ok(()) }
/// ```
pub struct RedisCacheStore<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for RedisCacheStore<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for RedisCacheStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheStore")
            .field("channel", &self.inner.channel)
            .field("subscriber", &self.inner.subscriber.is_some())
            .finish_non_exhaustive()
    }
}

impl<C> RedisCacheStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over `conn`. `subscriber` is the client the invalidation bus subscribes
    /// through (`None`: no bus; instances then learn of invalidations only through L2 and
    /// their L1 TTL). The caller's keys are already prefixed; `prefix` names the channel.
    pub fn new(conn: C, subscriber: Option<redis::Client>, prefix: &str) -> Self {
        let subscriber = match subscriber {
            Some(c) => Subscriber::Channel(c),
            None => Subscriber::None,
        };
        Self::with_subscriber(conn, subscriber, prefix)
    }

    fn with_subscriber(conn: C, subscriber: Subscriber, prefix: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                conn,
                set_if: redis::Script::new(SET_IF),
                release: redis::Script::new(RELEASE),
                raise: redis::Script::new(RAISE),
                channel: format!("{prefix}bus"),
                bus: broadcast::channel(4096).0,
                subscriber,
                stop: watch::channel(false).0,
                started: std::sync::Once::new(),
            }),
        }
    }

    fn conn(&self) -> C {
        self.inner.conn.clone()
    }

    fn start_subscriber(&self) {
        if !self.inner.subscriber.is_some() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no tokio runtime: the invalidation bus is not started");
            return;
        };
        let bus = self.inner.bus.clone();
        let channel = self.inner.channel.clone();
        let stop = self.inner.stop.subscribe();
        match &self.inner.subscriber {
            Subscriber::Channel(client) => {
                handle.spawn(subscriber_loop(client.clone(), channel, bus, stop));
            }
            Subscriber::Sharded(client) => {
                handle.spawn(sharded_loop((**client).clone(), channel, bus, stop));
            }
            Subscriber::None => {}
        }
    }
}

impl RedisCacheStore<redis::cluster_async::ClusterConnection> {
    /// A store on Redis Cluster whose bus uses sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE`,
    /// Redis 7 or later): a message goes to the shard that owns the channel's slot instead
    /// of being forwarded to every node of the cluster, which is what plain `PUBLISH` costs
    /// on a large cluster.
    ///
    /// `nodes` are the cluster's addresses (URLs, with password or TLS as for
    /// `redis::cluster::ClusterClient`); the bus opens its own RESP3 cluster connection on
    /// them, which follows the channel's slot when it moves or its master fails over. Every
    /// disconnection is reported as [`BusEvent::Lost`] and the (re)subscription as
    /// [`BusEvent::Connected`], so caches clear their L1 as for the plain bus.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when `nodes` are not valid addresses (the text never holds
    /// the addresses, which may carry passwords).
    ///
    /// ```no_run
    /// use stanchion_tiered_cache::RedisCacheStore;
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let nodes = vec!["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"];
    /// let conn = redis::cluster::ClusterClient::new(nodes.clone())?.get_async_connection().await?;
    /// let store = RedisCacheStore::sharded(conn, nodes, "shop:")?;
    /// # Ok(()) }
    /// ```
    pub fn sharded<T: redis::IntoConnectionInfo>(
        conn: redis::cluster_async::ClusterConnection,
        nodes: impl IntoIterator<Item = T>,
        prefix: &str,
    ) -> Result<Self, StoreError> {
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(1))
            .build()
            .map_err(|e| {
                StoreError::Backend(format!("invalid cluster node addresses ({:?})", e.kind()))
            })?;
        Ok(Self::with_subscriber(
            conn,
            Subscriber::Sharded(Box::new(client)),
            prefix,
        ))
    }
}

/// The sharded bus: one RESP3 cluster connection subscribed with `SSUBSCRIBE`; pushes come
/// through a channel. After any disconnection the subscription is renewed until a node
/// confirms it (the renewal also makes the connection learn a new owner of the slot).
async fn sharded_loop(
    client: redis::cluster::ClusterClient,
    channel: String,
    bus: broadcast::Sender<BusEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            return;
        }
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
        let config = redis::cluster::ClusterConfig::new().set_push_sender(tx);
        let connected = tokio::time::timeout(Duration::from_secs(2), async {
            let mut conn = client.get_async_connection_with_config(config).await?;
            conn.ssubscribe(&channel).await?;
            Ok::<_, redis::RedisError>(conn)
        })
        .await;
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(error = %backend(&e), "invalidation bus cannot connect");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(_) => {
                tracing::debug!("invalidation bus connection timed out");
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let mut renew = false;
        loop {
            let tick = tokio::time::sleep(Duration::from_millis(100));
            tokio::select! {
                p = pushes.recv() => match p {
                    Some(p) => match p.kind {
                        redis::PushKind::SMessage => {
                            if let Some(redis::Value::BulkString(m)) = p.data.into_iter().nth(1) {
                                let _ = bus.send(BusEvent::Message(m));
                            }
                        }
                        redis::PushKind::SSubscribe => {
                            renew = false;
                            let _ = bus.send(BusEvent::Connected);
                        }
                        redis::PushKind::Disconnection | redis::PushKind::SUnsubscribe => {
                            if !renew {
                                tracing::warn!(cache.channel = %channel, "invalidation bus lost its connection");
                                let _ = bus.send(BusEvent::Lost);
                            }
                            renew = true;
                        }
                        _ => {}
                    },
                    None => break,
                },
                _ = tick, if renew => {
                    let again = tokio::time::timeout(Duration::from_secs(1), conn.ssubscribe(&channel)).await;
                    if !matches!(again, Ok(Ok(()))) {
                        tracing::debug!("invalidation bus: subscription not renewed yet");
                    }
                }
                _ = stop.changed() => return,
            }
        }
        let _ = bus.send(BusEvent::Lost);
    }
}

/// Connects, subscribes and forwards messages until the store is dropped; reports every
/// connection as `Connected` and every loss as `Lost`.
async fn subscriber_loop(
    client: redis::Client,
    channel: String,
    bus: broadcast::Sender<BusEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut first = true;
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            return;
        }
        let connected = tokio::time::timeout(Duration::from_secs(2), async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(ps)
        })
        .await;
        match connected {
            Ok(Ok(ps)) => {
                backoff = Duration::from_millis(50);
                if !first {
                    tracing::info!(cache.channel = %channel, "invalidation bus reconnected");
                }
                first = false;
                let _ = bus.send(BusEvent::Connected);
                let mut messages = ps.into_on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(m) => {
                                let _ = bus.send(BusEvent::Message(m.get_payload_bytes().to_vec()));
                            }
                            None => break,
                        },
                        _ = stop.changed() => return,
                    }
                }
                tracing::warn!(cache.channel = %channel, "invalidation bus lost its connection");
                let _ = bus.send(BusEvent::Lost);
            }
            Ok(Err(e)) => tracing::debug!(error = %backend(&e), "invalidation bus cannot connect"),
            Err(_) => tracing::debug!("invalidation bus connection timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

impl<C> CacheStore for RedisCacheStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        let values: Vec<Option<Vec<u8>>> = if keys.len() == 1 {
            vec![
                redis::cmd("GET")
                    .arg(&keys[0])
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| backend(&e))?,
            ]
        } else {
            redis::cmd("MGET")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(&e))?
        };
        if values.len() != keys.len() {
            return Err(StoreError::Protocol(format!(
                "{} values for {} keys",
                values.len(),
                keys.len()
            )));
        }
        Ok(values)
    }

    async fn set(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl_ms: u64,
        expect: Expect,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let ttl = ttl_ms.max(1);
        if expect == Expect::Any {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl)
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| backend(&e))?;
            return Ok(true);
        }
        let mut call = self.inner.set_if.key(key);
        call.arg(value).arg(ttl);
        match expect {
            Expect::Stamp(s) => call.arg("stamp").arg(s.to_le_bytes().to_vec()),
            _ => call.arg("absent"),
        };
        let wrote: i64 = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| backend(&e))?;
        Ok(wrote == 1)
    }

    async fn set_many(&self, entries: Vec<(String, Vec<u8>, u64)>) -> Result<(), StoreError> {
        // One SET per key, concurrently: on a cluster the keys live on different nodes.
        let writes = entries.into_iter().map(|(k, v, ttl)| {
            let mut conn = self.conn();
            async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(v)
                    .arg("PX")
                    .arg(ttl.max(1))
                    .query_async::<()>(&mut conn)
                    .await
            }
        });
        for r in futures_util::future::join_all(writes).await {
            r.map_err(|e| backend(&e))?;
        }
        Ok(())
    }

    async fn counter(&self, key: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let v: Option<u64> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| backend(&e))?;
        Ok(v.unwrap_or(0))
    }

    async fn incr(&self, key: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        redis::cmd("INCR")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| backend(&e))
    }

    async fn raise(&self, key: &str, value: u64) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let held: String = self
            .inner
            .raise
            .key(key)
            .arg(value.to_string())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| backend(&e))?;
        held.parse()
            .map_err(|_| StoreError::Protocol(format!("counter {key:?} holds {held:?}")))
    }

    async fn try_lease(&self, key: &str, token: u64, ttl_ms: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| backend(&e))?;
        Ok(set.is_some())
    }

    async fn release_lease(&self, key: &str, token: u64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        self.inner
            .release
            .key(key)
            .arg(token)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| backend(&e))?;
        Ok(())
    }

    async fn publish(&self, message: Vec<u8>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let command = match self.inner.subscriber {
            Subscriber::Sharded(_) => "SPUBLISH",
            _ => "PUBLISH",
        };
        redis::cmd(command)
            .arg(&self.inner.channel)
            .arg(message)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| backend(&e))?;
        Ok(())
    }

    fn subscribe(&self) -> Subscription {
        let rx = self.inner.bus.subscribe();
        self.inner.started.call_once(|| self.start_subscriber());
        Subscription::new(rx, false)
    }
}
