//! A directory of pinned keys in a PostgreSQL table, with a bounded cache of hits and misses
//! (feature `postgres`).

use std::fmt::Write;
use std::time::Duration;

use moka::sync::Cache;
use sqlx::PgPool;

use crate::error::BuildError;
use crate::key::Key;
use crate::router::{Route, ShardRouter};
use crate::sharder::ShardId;

/// The directory table.
pub const DIRECTORY_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS stanchion_shard_directory (
    key text PRIMARY KEY,
    shard integer NOT NULL CHECK (shard >= 0)
)";

/// A directory lookup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The database refused or the connection failed.
    #[error("directory: {0}")]
    Db(#[from] sqlx::Error),
    /// The directory names a shard the router's map does not have.
    #[error("the directory puts this key on shard {shard}, which the map does not have")]
    UnknownShard {
        /// The shard named.
        shard: i32,
    },
}

/// Keys pinned to a shard (a large tenant on a database of its own), kept in a table that every
/// process reads, in front of the router's hash. Lookups are cached: hits for `hit_ttl`, misses
/// (keys that follow their slot, nearly all of them) for `miss_ttl`, at most `capacity` keys.
/// A change made through [`Directory::pin`] is seen at once by this process and within the TTL
/// by the others.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool, router: stanchion_shard_router::ShardRouter<sqlx::PgPool>) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use stanchion_shard_router::{Key, directory::Directory};
/// let dir = Directory::new(pool, 100_000, Duration::from_secs(60), Duration::from_secs(10))?;
/// dir.install().await?;
/// dir.pin(Key::from("big-tenant"), 3).await?;
/// let route = dir.route(&router, Key::from("big-tenant")).await?;
/// assert_eq!(route.shard, 3);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Directory {
    pool: PgPool,
    hits: Cache<String, ShardId>,
    misses: Cache<String, ()>,
}

fn encode(key: Key<'_>) -> String {
    match key {
        Key::Int(v) => format!("i:{v}"),
        Key::Text(s) => format!("t:{s}"),
        Key::Bytes(b) => {
            let mut out = String::with_capacity(2 + b.len() * 2);
            out.push_str("b:");
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
            out
        }
    }
}

impl Directory {
    /// A directory over `pool`'s table, caching at most `capacity` keys (1 to 10,000,000),
    /// hits for `hit_ttl` and misses for `miss_ttl` (each at most one day).
    pub fn new(
        pool: PgPool,
        capacity: u64,
        hit_ttl: Duration,
        miss_ttl: Duration,
    ) -> Result<Self, BuildError> {
        if capacity == 0 {
            return Err(BuildError::Zero { field: "capacity" });
        }
        if capacity > 10_000_000 {
            return Err(BuildError::TooLarge {
                field: "capacity",
                value: capacity,
                max: 10_000_000,
            });
        }
        for (field, ttl) in [("hit_ttl (s)", hit_ttl), ("miss_ttl (s)", miss_ttl)] {
            if ttl > Duration::from_secs(86_400) {
                return Err(BuildError::TooLarge {
                    field,
                    value: ttl.as_secs(),
                    max: 86_400,
                });
            }
        }
        Ok(Directory {
            pool,
            hits: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(hit_ttl)
                .build(),
            misses: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(miss_ttl)
                .build(),
        })
    }

    /// Creates the table if it is missing. Every process may call it as it starts, all at
    /// once: the creation runs under an advisory lock.
    pub async fn install(&self) -> Result<(), DirectoryError> {
        crate::cutover::create_table(&self.pool, DIRECTORY_TABLE_SQL).await?;
        Ok(())
    }

    /// The shard a key is pinned to, if any.
    pub async fn lookup(&self, key: Key<'_>) -> Result<Option<ShardId>, DirectoryError> {
        let k = encode(key);
        if let Some(shard) = self.hits.get(&k) {
            return Ok(Some(shard));
        }
        if self.misses.contains_key(&k) {
            return Ok(None);
        }
        let found: Option<i32> =
            sqlx::query_scalar("SELECT shard FROM stanchion_shard_directory WHERE key = $1")
                .bind(&k)
                .fetch_optional(&self.pool)
                .await?;
        match found {
            Some(shard) => {
                let shard =
                    u32::try_from(shard).map_err(|_| DirectoryError::UnknownShard { shard })?;
                self.hits.insert(k, shard);
                Ok(Some(shard))
            }
            None => {
                self.misses.insert(k, ());
                Ok(None)
            }
        }
    }

    /// The route of a key: its pinned shard if the directory has one, else the router's.
    pub async fn route<T: Clone>(
        &self,
        router: &ShardRouter<T>,
        key: Key<'_>,
    ) -> Result<Route<T>, DirectoryError> {
        match self.lookup(key).await? {
            Some(shard) => router.route_on(shard).ok_or(DirectoryError::UnknownShard {
                shard: i32::try_from(shard).unwrap_or(i32::MAX),
            }),
            None => Ok(router.route(key)),
        }
    }

    /// Pins `key` to `shard` (for every process: this one at once, the others within their
    /// miss TTL).
    pub async fn pin(&self, key: Key<'_>, shard: ShardId) -> Result<(), DirectoryError> {
        let k = encode(key);
        let shard_i32 =
            i32::try_from(shard).map_err(|_| DirectoryError::UnknownShard { shard: i32::MAX })?;
        sqlx::query(
            "INSERT INTO stanchion_shard_directory (key, shard) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET shard = excluded.shard",
        )
        .bind(&k)
        .bind(shard_i32)
        .execute(&self.pool)
        .await?;
        self.misses.invalidate(&k);
        self.hits.insert(k, shard);
        Ok(())
    }

    /// Removes a pin.
    pub async fn unpin(&self, key: Key<'_>) -> Result<(), DirectoryError> {
        let k = encode(key);
        sqlx::query("DELETE FROM stanchion_shard_directory WHERE key = $1")
            .bind(&k)
            .execute(&self.pool)
            .await?;
        self.hits.invalidate(&k);
        self.misses.insert(k, ());
        Ok(())
    }

    /// Keys held in the cache now (hits and misses).
    pub fn cached(&self) -> u64 {
        self.hits.run_pending_tasks();
        self.misses.run_pending_tasks();
        self.hits.entry_count() + self.misses.entry_count()
    }
}
