//! The Redis store: one Lua script, one round trip per check, on a single server or a cluster.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::error::StoreError;
use crate::gcra::{Decision, Source, Verdict};
use crate::quota::Limits;
use crate::store::RateLimitStore;

/// The GCRA script (also usable from other languages sharing the same keys).
pub const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// GCRA state in Redis, through any async redis-rs connection: a
/// `redis::aio::ConnectionManager` (reconnects by itself) for a single server, a
/// `redis::cluster_async::ClusterConnection` for Redis Cluster.
///
/// Each key is one string `PREFIX{KEY}` (the braces are a hash tag: everything about a key lives
/// in one cluster slot) holding the quotas' TATs joined by `:`, written with `SET .. PX` so it
/// expires when its last TAT passes. The check
/// is `EVALSHA` of [`GCRA_SCRIPT`] (loaded again on `NOSCRIPT`), using the server's clock.
///
/// ```no_run
/// use stanchion_ratelimit::{Limits, Quota, RateLimitStore, RedisStore};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let store = RedisStore::new(redis::aio::ConnectionManager::new(client).await?, "rl:");
/// let limits = Limits::single(Quota::per_second(100)?);
/// let decision = store.check("api-key-42", &limits, 1).await?;
/// println!("{decision:?}");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore<C> {
    conn: C,
    prefix: Arc<str>,
    script: Arc<redis::Script>,
    fixed_now: Option<u64>,
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over `conn`, namespacing its keys with `prefix`.
    pub fn new(conn: C, prefix: &str) -> Self {
        Self {
            conn,
            prefix: Arc::from(prefix),
            script: Arc::new(redis::Script::new(GCRA_SCRIPT)),
            fixed_now: None,
        }
    }

    /// Uses `now` (microseconds) instead of the server's clock: for deterministic tests only.
    #[doc(hidden)]
    pub fn with_fixed_now(mut self, now: u64) -> Self {
        self.fixed_now = Some(now.max(1));
        self
    }

    /// The Redis key holding `key`'s state.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{{{}}}", self.prefix, key)
    }
}

impl<C> RateLimitStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn check(&self, key: &str, limits: &Limits, cost: u32) -> Result<Decision, StoreError> {
        let mut invocation = self.script.key(self.redis_key(key));
        invocation
            .arg(self.fixed_now.unwrap_or(0))
            .arg(cost)
            .arg(limits.len());
        for (_, q) in limits.quotas() {
            invocation
                .arg(q.emission_micros())
                .arg(q.capacity_micros())
                .arg(q.burst_size());
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(StoreError::Redis)?;
        parse(&reply, limits)
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(StoreError::Redis)
    }
}

fn parse(reply: &[i64], limits: &Limits) -> Result<Decision, StoreError> {
    let [verdict, quota, remaining, reset, retry, corrupt] = reply else {
        return Err(StoreError::Protocol(format!(
            "expected 6 integers, got {}",
            reply.len()
        )));
    };
    let quota = usize::try_from(*quota)
        .ok()
        .filter(|q| *q < limits.len())
        .ok_or_else(|| StoreError::Protocol(format!("quota index {quota} out of range")))?;
    let micros = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| StoreError::Protocol(format!("negative {what} {v}")))
    };
    let verdict = match verdict {
        0 => Verdict::Allowed,
        1 => Verdict::Denied,
        2 => Verdict::Impossible,
        other => return Err(StoreError::Protocol(format!("unknown verdict {other}"))),
    };
    if *corrupt > 0 {
        tracing::warn!(
            ratelimit.corrupt_fields = corrupt,
            "rate-limit state in Redis was not a TAT; it was reset"
        );
    }
    Ok(Decision {
        verdict,
        quota,
        limit: limits.quota(quota).map_or(0, |q| q.burst_size()),
        remaining: u32::try_from(micros(*remaining, "remaining")?).unwrap_or(u32::MAX),
        reset_after: Duration::from_micros(micros(*reset, "reset")?),
        retry_after: (verdict == Verdict::Denied)
            .then(|| micros(*retry, "retry_after").map(Duration::from_micros))
            .transpose()?,
        shadow_denied: false,
        source: Source::Shared,
    })
}
