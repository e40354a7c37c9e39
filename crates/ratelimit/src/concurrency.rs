//! Concurrency limits: in-flight requests per key, as Stripe runs beside its rate limiters.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::{BuildError, KeyError};

/// A request refused because its key already has `max` requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{in_flight} requests already in flight for this key (limit {max})")]
pub struct TooManyInFlight {
    /// Requests in flight when refused.
    pub in_flight: u32,
    /// The limit.
    pub max: u32,
}

/// In-flight requests per key in one process. A [`ConcurrencyPermit`] is released on drop, so a
/// cancelled or panicking request frees its slot. Keys with nothing in flight take no memory.
/// Cheap to clone; clones share the counts.
///
/// ```
/// use stanchion_ratelimit::ConcurrencyLimiter;
/// let limiter = ConcurrencyLimiter::new(2)?;
/// let a = limiter.try_acquire("user-1")?;
/// let b = limiter.try_acquire("user-1")?;
/// assert!(limiter.try_acquire("user-1").is_err());
/// drop(a);
/// assert!(limiter.try_acquire("user-1").is_ok());
/// # drop(b);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ConcurrencyLimiter {
    max: u32,
    counts: Arc<Mutex<HashMap<String, u32>>>,
}

impl fmt::Debug for ConcurrencyLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimiter")
            .field("max", &self.max)
            .field("keys", &self.counts.lock().map(|c| c.len()).unwrap_or(0))
            .finish()
    }
}

/// A slot held in a [`ConcurrencyLimiter`]; released on drop.
#[derive(Debug)]
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct ConcurrencyPermit {
    key: String,
    counts: Arc<Mutex<HashMap<String, u32>>>,
}

impl ConcurrencyLimiter {
    /// At most `max` requests in flight per key (at least 1).
    pub fn new(max: u32) -> Result<Self, BuildError> {
        if max == 0 {
            return Err(BuildError::new("max_in_flight", "at least 1", 0));
        }
        Ok(Self {
            max,
            counts: Arc::default(),
        })
    }

    /// A slot for `key`, or the refusal.
    pub fn try_acquire(&self, key: &str) -> Result<ConcurrencyPermit, ConcurrencyError> {
        if key.is_empty() {
            return Err(ConcurrencyError::Key(KeyError::Empty));
        }
        let mut counts = match self.counts.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = counts.entry(key.to_owned()).or_insert(0);
        if *n >= self.max {
            return Err(ConcurrencyError::Full(TooManyInFlight {
                in_flight: *n,
                max: self.max,
            }));
        }
        *n += 1;
        Ok(ConcurrencyPermit {
            key: key.to_owned(),
            counts: Arc::clone(&self.counts),
        })
    }

    /// Requests in flight for `key`.
    pub fn in_flight(&self, key: &str) -> u32 {
        self.counts
            .lock()
            .ok()
            .and_then(|c| c.get(key).copied())
            .unwrap_or(0)
    }
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        let mut counts = match self.counts.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Why a concurrency slot was not granted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConcurrencyError {
    /// The key is at its limit.
    #[error(transparent)]
    Full(TooManyInFlight),
    /// The key was refused.
    #[error(transparent)]
    Key(KeyError),
    /// The shared store failed (the caller chooses: fail open or closed).
    #[error(transparent)]
    Store(crate::error::StoreError),
}

impl ConcurrencyError {
    /// Whether the key is simply at its limit.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full(_))
    }
}

#[cfg(feature = "redis")]
pub use self::shared::{RedisConcurrencyLimiter, RedisLease};

#[cfg(feature = "redis")]
mod shared {
    use std::fmt;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use redis::aio::ConnectionLike;

    use super::{ConcurrencyError, TooManyInFlight};
    use crate::error::{BuildError, KeyError, StoreError};

    const ACQUIRE: &str = r"
-- KEYS[1] sorted set of leases (score: expiry in ms); ARGV: max, ttl_ms, lease id, now_ms or 0
local now = tonumber(ARGV[4])
if now == 0 then
  local t = redis.call('TIME')
  now = t[1] * 1000 + math.floor(t[2] / 1000)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 1000)
return {1, n + 1}
";

    const RENEW: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
if expiry == false then return 0 end
-- Expired but not yet swept by an acquire: the slot may already be counted as free.
if tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 1000)
return 1
";

    /// In-flight requests per key across every instance, as leases in a Redis sorted set that
    /// expire on their own: a process that dies holding a lease frees the slot after `ttl`.
    /// Cheap to clone.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use stanchion_ratelimit::RedisConcurrencyLimiter;
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let conn = redis::aio::ConnectionManager::new(redis::Client::open("redis://127.0.0.1/")?).await?;
    /// let limiter = RedisConcurrencyLimiter::new(conn, "cl:", 20, Duration::from_secs(30))?;
    /// let lease = limiter.acquire("tenant-7").await?;
    /// // ... handle the request ...
    /// lease.release().await?;
    /// # Ok(()) }
    /// ```
    pub struct RedisConcurrencyLimiter<C> {
        conn: C,
        prefix: Arc<str>,
        max: u32,
        ttl: Duration,
        acquire: Arc<redis::Script>,
        renew: Arc<redis::Script>,
    }

    impl<C: Clone> Clone for RedisConcurrencyLimiter<C> {
        fn clone(&self) -> Self {
            Self {
                conn: self.conn.clone(),
                prefix: Arc::clone(&self.prefix),
                max: self.max,
                ttl: self.ttl,
                acquire: Arc::clone(&self.acquire),
                renew: Arc::clone(&self.renew),
            }
        }
    }

    impl<C> fmt::Debug for RedisConcurrencyLimiter<C> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("RedisConcurrencyLimiter")
                .field("prefix", &self.prefix)
                .field("max", &self.max)
                .field("ttl", &self.ttl)
                .finish_non_exhaustive()
        }
    }

    /// A slot held in a [`RedisConcurrencyLimiter`]. Release it with
    /// [`release`](Self::release); if it is dropped instead, the release is sent from a spawned
    /// task, and if that cannot happen the lease expires after the limiter's `ttl`.
    pub struct RedisLease<C: ConnectionLike + Clone + Send + Sync + 'static> {
        conn: C,
        key: String,
        id: String,
        renew: Arc<redis::Script>,
        ttl: Duration,
        released: bool,
    }

    impl<C: ConnectionLike + Clone + Send + Sync + 'static> fmt::Debug for RedisLease<C> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("RedisLease")
                .field("key", &self.key)
                .field("id", &self.id)
                .finish_non_exhaustive()
        }
    }

    fn lease_id() -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        format!("{:016x}", h.finish())
    }

    impl<C> RedisConcurrencyLimiter<C>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        /// At most `max` leases per key; a lease not released or renewed expires after `ttl`.
        pub fn new(conn: C, prefix: &str, max: u32, ttl: Duration) -> Result<Self, BuildError> {
            if max == 0 {
                return Err(BuildError::new("max_in_flight", "at least 1", 0));
            }
            if ttl < Duration::from_millis(10) {
                return Err(BuildError::new(
                    "lease_ttl",
                    "at least 10 ms",
                    format!("{ttl:?}"),
                ));
            }
            Ok(Self {
                conn,
                prefix: Arc::from(prefix),
                max,
                ttl,
                acquire: Arc::new(redis::Script::new(ACQUIRE)),
                renew: Arc::new(redis::Script::new(RENEW)),
            })
        }

        fn ttl_ms(&self) -> u64 {
            u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
        }

        /// A lease for `key`, or the refusal.
        pub async fn acquire(&self, key: &str) -> Result<RedisLease<C>, ConcurrencyError> {
            if key.is_empty() {
                return Err(ConcurrencyError::Key(KeyError::Empty));
            }
            let redis_key = format!("{}{{{}}}:inflight", self.prefix, key);
            let id = lease_id();
            let mut conn = self.conn.clone();
            let reply: Vec<i64> = self
                .acquire
                .key(&redis_key)
                .arg(self.max)
                .arg(self.ttl_ms())
                .arg(&id)
                .arg(0)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| ConcurrencyError::Store(StoreError::Redis(e)))?;
            match reply.as_slice() {
                [1, _] => Ok(RedisLease {
                    conn: self.conn.clone(),
                    key: redis_key,
                    id,
                    renew: Arc::clone(&self.renew),
                    ttl: self.ttl,
                    released: false,
                }),
                [0, n] => Err(ConcurrencyError::Full(TooManyInFlight {
                    in_flight: u32::try_from(*n).unwrap_or(u32::MAX),
                    max: self.max,
                })),
                other => Err(ConcurrencyError::Store(StoreError::Protocol(format!(
                    "unexpected lease reply {other:?}"
                )))),
            }
        }
    }

    impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLease<C> {
        /// Gives the slot back now.
        pub async fn release(mut self) -> Result<(), StoreError> {
            self.released = true;
            let mut conn = self.conn.clone();
            redis::cmd("ZREM")
                .arg(&self.key)
                .arg(&self.id)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(StoreError::Redis)
        }

        /// Extends the lease by the limiter's `ttl` from now (for long requests); `false` if it
        /// had already expired (the slot may have been given to someone else).
        pub async fn renew(&self) -> Result<bool, StoreError> {
            let mut conn = self.conn.clone();
            let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
            let kept: i64 = self
                .renew
                .key(&self.key)
                .arg(ttl)
                .arg(&self.id)
                .invoke_async(&mut conn)
                .await
                .map_err(StoreError::Redis)?;
            Ok(kept == 1)
        }
    }

    impl<C: ConnectionLike + Clone + Send + Sync + 'static> Drop for RedisLease<C> {
        fn drop(&mut self) {
            if self.released {
                return;
            }
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let (mut conn, key, id) = (
                self.conn.clone(),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.id),
            );
            handle.spawn(async move {
                let _ = redis::cmd("ZREM")
                    .arg(key)
                    .arg(id)
                    .query_async::<i64>(&mut conn)
                    .await;
            });
        }
    }
}
