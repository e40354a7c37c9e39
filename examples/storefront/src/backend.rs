//! The components whose type depends on the engine: one enum each, so the handlers are written
//! once. Embedded: SQLite, in-memory cache store and limiters. Real: PostgreSQL and Redis.
use std::time::Duration;

use redis::aio::ConnectionManager;
use stanchion_outbox::{
    ChannelPublisher, JetStreamPublisher, PgOutbox, RelayHandle, RelayStats, SqliteOutbox,
};
use stanchion_ratelimit::{LocalLimiter, RateLimiter, RedisStore};
use stanchion_saga::{
    Executor, ExecutorStats, PgSagaLog, SagaError, SagaId, SagaRecord, SqliteSagaLog,
};
use stanchion_tiered_cache::{CacheError, MemoryCacheStore, RedisCacheStore, Stats, TieredCache};

use crate::api::Product;

/// The products cache of one instance.
#[derive(Debug, Clone)]
pub(crate) enum ProductCache {
    Memory(TieredCache<String, Product, MemoryCacheStore>),
    Redis(TieredCache<String, Product, RedisCacheStore<ConnectionManager>>),
}

impl ProductCache {
    pub(crate) async fn get_or_load<F, Fut, E>(
        &self,
        key: &String,
        loader: F,
    ) -> Result<Option<Product>, CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Option<Product>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        match self {
            Self::Memory(c) => c.get_or_load(key, loader).await,
            Self::Redis(c) => c.get_or_load(key, loader).await,
        }
    }

    pub(crate) async fn invalidate(&self, key: &String) -> Result<(), CacheError> {
        match self {
            Self::Memory(c) => c.invalidate(key).await,
            Self::Redis(c) => c.invalidate(key).await,
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        match self {
            Self::Memory(c) => c.stats(),
            Self::Redis(c) => c.stats(),
        }
    }
}

/// The saga executor of one instance.
#[derive(Debug, Clone)]
pub(crate) enum Sagas {
    Sqlite(Executor<SqliteSagaLog>),
    Pg(Executor<PgSagaLog>),
}

impl Sagas {
    pub(crate) async fn begin<I: serde::Serialize + ?Sized>(
        &self,
        name: &str,
        input: &I,
    ) -> Result<SagaId, SagaError> {
        match self {
            Self::Sqlite(e) => e.begin(name, input).await,
            Self::Pg(e) => e.begin(name, input).await,
        }
    }

    pub(crate) async fn wait(
        &self,
        id: &SagaId,
        timeout: Duration,
    ) -> Result<SagaRecord, SagaError> {
        match self {
            Self::Sqlite(e) => e.wait(id, timeout).await,
            Self::Pg(e) => e.wait(id, timeout).await,
        }
    }

    pub(crate) async fn get(&self, id: &SagaId) -> Result<Option<SagaRecord>, SagaError> {
        match self {
            Self::Sqlite(e) => e.get(id).await,
            Self::Pg(e) => e.get(id).await,
        }
    }

    pub(crate) fn stats(&self) -> ExecutorStats {
        match self {
            Self::Sqlite(e) => e.stats(),
            Self::Pg(e) => e.stats(),
        }
    }

    pub(crate) async fn shutdown(&self, timeout: Duration) {
        match self {
            Self::Sqlite(e) => e.shutdown(timeout).await,
            Self::Pg(e) => e.shutdown(timeout).await,
        }
    }
}

/// The saga log every instance's executor shares.
#[derive(Debug, Clone)]
pub(crate) enum SagaLog {
    Sqlite(SqliteSagaLog),
    Pg(PgSagaLog),
}

/// The two limiters (per API key, per client IP), shared by every instance.
#[derive(Debug, Clone)]
pub(crate) enum Limiters {
    Local {
        by_key: RateLimiter<LocalLimiter<String>>,
        by_ip: RateLimiter<LocalLimiter<String>>,
    },
    Redis {
        by_key: RateLimiter<RedisStore<ConnectionManager>>,
        by_ip: RateLimiter<RedisStore<ConnectionManager>>,
    },
}

/// A running relay.
#[derive(Debug)]
pub(crate) enum RelayRun {
    Sqlite(RelayHandle<SqliteOutbox, ChannelPublisher>),
    Pg(RelayHandle<PgOutbox, ChannelPublisher>),
    PgJetStream(RelayHandle<PgOutbox, JetStreamPublisher>),
}

impl RelayRun {
    pub(crate) fn stats(&self) -> RelayStats {
        match self {
            Self::Sqlite(r) => r.stats(),
            Self::Pg(r) => r.stats(),
            Self::PgJetStream(r) => r.stats(),
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        match self {
            Self::Sqlite(r) => r.is_finished(),
            Self::Pg(r) => r.is_finished(),
            Self::PgJetStream(r) => r.is_finished(),
        }
    }

    pub(crate) async fn shutdown(self, timeout: Duration) {
        let _ = match self {
            Self::Sqlite(r) => r.shutdown(timeout).await,
            Self::Pg(r) => r.shutdown(timeout).await,
            Self::PgJetStream(r) => r.shutdown(timeout).await,
        };
    }
}
