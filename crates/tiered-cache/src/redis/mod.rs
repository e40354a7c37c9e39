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

struct Inner<C> {
    conn: C,
    set_if: redis::Script,
    release: redis::Script,
    raise: redis::Script,
    channel: String,
    bus: broadcast::Sender<BusEvent>,
    subscriber: Option<redis::Client>,
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
/// Cluster forwards `PUBLISH` to every node). The subscriber reconnects by itself, and each
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
        let Some(client) = self.inner.subscriber.clone() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no tokio runtime: the invalidation bus is not started");
            return;
        };
        let bus = self.inner.bus.clone();
        let channel = self.inner.channel.clone();
        let stop = self.inner.stop.subscribe();
        handle.spawn(subscriber_loop(client, channel, bus, stop));
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
        redis::cmd("PUBLISH")
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
