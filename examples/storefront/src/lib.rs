//! The storefront: a small shop backend composed of the seven Stanchion crates.
//!
//! - [`Shop`] holds what several service instances share, as separate processes would share
//!   servers: the shard databases (products with their outboxes), the orders database (saga
//!   log, search table, inbox), the cache's L2 store and bus, the rate limiters, the relays and
//!   the event consumers, and the payment provider.
//! - [`Instance`] is one service instance: its own L1 cache, its own payment breaker and its own
//!   saga executor, serving HTTP on its own port.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), storefront::Error> {
//! let shop = storefront::Shop::embedded(storefront::ShopConfig::default()).await?;
//! let instance = storefront::Instance::start(&shop, 0).await?;
//! let addr = instance.serve("127.0.0.1:0").await?;
//! println!("listening on http://{addr}");
//! # Ok(()) }
//! ```

pub mod api;
pub mod auth;
mod backend;
mod db;
mod events;
pub mod load;
mod orders;
pub mod payment;
mod real;
pub mod status;
mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::sqlite::SqlitePool;
use stanchion_breaker::Pipeline;
use stanchion_outbox::{ChannelPublisher, OutboxConfig, Relay, SqliteInbox, SqliteOutbox};
use stanchion_ratelimit::{Limits, LocalLimiter, Quota, RateLimiter};
use stanchion_saga::{Executor, SqliteSagaLog};
use stanchion_shard_router::{ShardMap, ShardRouter};
use stanchion_tiered_cache::{MemoryCacheStore, Policy, TieredCache};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

pub use crate::api::Product;
pub use crate::payment::{PaymentConfig, PaymentProvider};
pub use crate::real::{RealServers, ServerUrls};

use crate::backend::{Limiters, ProductCache, RelayRun, SagaLog, Sagas};
use crate::store::{OrdersDb, Shard};

/// Everything that can stop the storefront from starting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is out of range.
    #[error("configuration: {0}")]
    Config(String),
    /// A database could not be opened or migrated.
    #[error("database: {0}")]
    Database(String),
    /// The listener could not be bound.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// A component failed to start.
    #[error("{0}")]
    Start(String),
}

/// Settings of the shared part.
#[derive(Debug, Clone)]
pub struct ShopConfig {
    /// Shard databases (tenants are spread over them by the shard map).
    pub shards: usize,
    /// The simulated payment provider.
    pub payment: PaymentConfig,
    /// Requests per second and API key (one client of the built-in load exceeds it).
    pub per_key_per_second: u32,
    /// Requests per second and client IP (the load all comes from 127.0.0.1).
    pub per_ip_per_second: u32,
    /// The bearer tokens' HMAC secret (at least 32 bytes).
    pub token_secret: Vec<u8>,
}

impl Default for ShopConfig {
    fn default() -> Self {
        Self {
            shards: 2,
            payment: PaymentConfig::default(),
            per_key_per_second: 50,
            per_ip_per_second: 20_000,
            token_secret: b"storefront demo secret: change me in production!".to_vec(),
        }
    }
}

/// Counters of the shared part.
#[derive(Debug, Default)]
pub(crate) struct ShopCounters {
    pub(crate) events_applied: AtomicU64,
    pub(crate) events_duplicate: AtomicU64,
    pub(crate) events_failed: AtomicU64,
}

/// What every instance shares.
#[derive(Debug)]
pub struct Shop {
    _dir: Option<tempfile::TempDir>,
    /// The servers `--real` started (kept running as long as the shop lives).
    pub servers: Option<RealServers>,
    pub(crate) shards: ShardRouter<Shard>,
    pub(crate) shard_list: Vec<Shard>,
    pub(crate) orders: OrdersDb,
    pub(crate) saga_log: SagaLog,
    pub(crate) cache: L2,
    pub(crate) limiters: Limiters,
    pub(crate) api_key: stanchion_ratelimit::HeaderKey,
    pub(crate) instances: std::sync::Mutex<Vec<std::sync::Weak<InstanceInner>>>,
    /// The payment provider every instance charges.
    pub payment: Arc<PaymentProvider>,
    pub(crate) signer: auth::Signer,
    pub(crate) relays: Mutex<Vec<RelayRun>>,
    pub(crate) consumers: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) counters: ShopCounters,
    pub(crate) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub(crate) health: Health,
}

/// The cache's shared second tier.
#[derive(Debug, Clone)]
pub(crate) enum L2 {
    Memory(MemoryCacheStore),
    Redis(stanchion_tiered_cache::RedisCacheStore<redis::aio::ConnectionManager>),
}

pub(crate) const OUTBOX_NAMESPACE: &str = "shop";
pub(crate) const SAGA_NAMESPACE: &str = "shop";

fn config_error(e: impl std::fmt::Display) -> Error {
    Error::Config(e.to_string())
}

pub(crate) fn outbox_config() -> Result<OutboxConfig, Error> {
    OutboxConfig::builder()
        .namespace(OUTBOX_NAMESPACE)
        .build()
        .map_err(config_error)
}

pub(crate) fn quota(per_second: u32) -> Result<Limits, Error> {
    Ok(Limits::single(
        Quota::per_second(per_second).map_err(config_error)?,
    ))
}

/// The parts `embedded` and `real` build differently.
pub(crate) struct Parts {
    pub(crate) dir: Option<tempfile::TempDir>,
    pub(crate) servers: Option<RealServers>,
    pub(crate) shard_list: Vec<Shard>,
    pub(crate) orders: OrdersDb,
    pub(crate) saga_log: SagaLog,
    pub(crate) cache: L2,
    pub(crate) limiters: Limiters,
    /// JetStream for the product events (`--real`); in-process channels otherwise.
    pub(crate) nats: Option<async_nats::jetstream::Context>,
    /// What `/health/ready` asks besides the databases (`--real`).
    pub(crate) health: Health,
}

/// Connections `/health/ready` checks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Health {
    pub(crate) redis: Option<redis::aio::ConnectionManager>,
    pub(crate) nats: Option<async_nats::Client>,
}

/// The JetStream stream of product events and the subject prefix it covers.
pub(crate) const EVENT_STREAM: &str = "STOREFRONT_PRODUCTS";
pub(crate) const EVENT_SUBJECTS: &str = "storefront.products";

impl Shop {
    /// The embedded default: SQLite files in a temporary directory, in-memory L2 and limiter
    /// stores, in-process publishers. Nothing to install.
    pub async fn embedded(config: ShopConfig) -> Result<Arc<Self>, Error> {
        check(&config)?;
        let dir = tempfile::tempdir()?;
        let outbox_config = outbox_config()?;
        let mut shard_list = Vec::with_capacity(config.shards);
        for index in 0..config.shards {
            let pool = open(dir.path(), &format!("shard-{index}.db")).await?;
            db::migrate_shard(&pool, &outbox_config)
                .await
                .map_err(|e| Error::Database(e.to_string()))?;
            let outbox = SqliteOutbox::new(pool.clone(), outbox_config.clone());
            shard_list.push(Shard::Sqlite {
                index,
                pool,
                outbox,
            });
        }
        let orders = open(dir.path(), "orders.db").await?;
        db::migrate_orders(&orders, &outbox_config, SAGA_NAMESPACE)
            .await
            .map_err(|e| Error::Database(e.to_string()))?;
        let saga_log = SqliteSagaLog::new(orders.clone(), SAGA_NAMESPACE).map_err(config_error)?;
        let local = |limits: Limits| -> Result<RateLimiter<LocalLimiter<String>>, Error> {
            RateLimiter::local(limits).build().map_err(config_error)
        };
        let parts = Parts {
            dir: Some(dir),
            servers: None,
            shard_list,
            orders: OrdersDb::Sqlite {
                pool: orders,
                inbox: SqliteInbox::new(&outbox_config),
            },
            saga_log: SagaLog::Sqlite(saga_log),
            cache: L2::Memory(MemoryCacheStore::new()),
            limiters: Limiters::Local {
                by_key: local(quota(config.per_key_per_second)?)?,
                by_ip: local(quota(config.per_ip_per_second)?)?,
            },
            nats: None,
            health: Health::default(),
        };
        Self::assemble(config, parts).await
    }

    /// Real servers from the testkit: a PostgreSQL primary with two streaming replicas (one
    /// database per shard and one for orders, each behind a replica router) and Redis (the
    /// cache's L2 and bus, the shared limiters). Needs `postgres` and `redis-server` installed
    /// (`scripts/test` installs them).
    pub async fn real(config: ShopConfig) -> Result<Arc<Self>, Error> {
        Self::connect(config, ServerUrls::default()).await
    }

    /// Like [`real`](Self::real), on the servers `urls` names; the testkit starts the others.
    /// The shop creates its databases on the PostgreSQL primary if they do not exist
    /// (`storefront_shard_N`, `storefront_orders`) and keeps what they hold.
    pub async fn connect(config: ShopConfig, urls: ServerUrls) -> Result<Arc<Self>, Error> {
        check(&config)?;
        let parts = real::parts(&config, urls).await?;
        Self::assemble(config, parts).await
    }

    async fn assemble(config: ShopConfig, parts: Parts) -> Result<Arc<Self>, Error> {
        let map = ShardMap::uniform(1024, u32::try_from(config.shards).unwrap_or(1))
            .map_err(config_error)?;
        let shards = ShardRouter::new(map, parts.shard_list.clone()).map_err(config_error)?;
        let shop = Arc::new(Shop {
            _dir: parts.dir,
            servers: parts.servers,
            shards,
            shard_list: parts.shard_list,
            orders: parts.orders,
            saga_log: parts.saga_log,
            cache: parts.cache,
            limiters: parts.limiters,
            api_key: stanchion_ratelimit::HeaderKey::new("x-api-key", &config.token_secret)
                .map_err(config_error)?,
            instances: std::sync::Mutex::new(Vec::new()),
            payment: Arc::new(PaymentProvider::new(config.payment)),
            signer: auth::Signer::new(&config.token_secret)?,
            relays: Mutex::new(Vec::new()),
            consumers: Mutex::new(Vec::new()),
            counters: ShopCounters::default(),
            metrics: install_metrics(),
            health: parts.health,
        });
        shop.start_relays(parts.nats).await?;
        Ok(shop)
    }

    /// One relay per shard outbox. Embedded: each publishes to its own channel, read by a
    /// consumer of its own. Real: all publish to one JetStream stream (dedup ids carry the shard),
    /// read by one durable consumer. Consumers keep the search table through the inbox.
    async fn start_relays(
        self: &Arc<Self>,
        nats: Option<async_nats::jetstream::Context>,
    ) -> Result<(), Error> {
        let mut relays = self.relays.lock().await;
        let mut consumers = self.consumers.lock().await;
        for shard in &self.shard_list {
            let name = format!("relay-shard-{}", shard.index());
            let source = format!("shard-{}", shard.index());
            let relay = match (shard, &nats) {
                (Shard::Pg { outbox, .. }, Some(js)) => {
                    let publisher =
                        stanchion_outbox::JetStreamPublisher::new(js.clone(), EVENT_SUBJECTS)
                            .source(source);
                    publisher
                        .ensure_stream(EVENT_STREAM, Duration::from_secs(120))
                        .await
                        .map_err(|e| Error::Start(format!("JetStream stream: {e}")))?;
                    RelayRun::PgJetStream(start_relay(outbox.clone(), publisher, name, 200).await?)
                }
                (Shard::Pg { outbox, .. }, None) => {
                    let (publisher, rx) = ChannelPublisher::new(1024);
                    consumers.push(tokio::spawn(events::consume(Arc::clone(self), source, rx)));
                    RelayRun::Pg(start_relay(outbox.clone(), publisher, name, 200).await?)
                }
                (Shard::Sqlite { outbox, .. }, _) => {
                    let (publisher, rx) = ChannelPublisher::new(1024);
                    consumers.push(tokio::spawn(events::consume(Arc::clone(self), source, rx)));
                    RelayRun::Sqlite(start_relay(outbox.clone(), publisher, name, 50).await?)
                }
            };
            relays.push(relay);
        }
        if let Some(js) = &nats {
            let consumer = stanchion_outbox::JetStreamConsumer::durable(
                js,
                EVENT_STREAM,
                "search",
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| Error::Start(format!("JetStream consumer: {e}")))?;
            consumers.push(tokio::spawn(events::consume_jetstream(
                Arc::clone(self),
                consumer,
            )));
        }
        Ok(())
    }

    /// A bearer token for `sub` on `tenant` with `perms`, valid for `ttl`.
    pub fn token(&self, sub: &str, tenant: &str, perms: &[&str], ttl: Duration) -> String {
        self.signer.sign(&auth::Claims {
            sub: sub.to_owned(),
            tenant: tenant.to_owned(),
            perms: perms.iter().map(|p| (*p).to_owned()).collect(),
            exp: auth::now_s().saturating_add(ttl.as_secs()),
        })
    }

    /// Events the product-event consumer applied to the search table (first deliveries).
    pub fn events_applied(&self) -> u64 {
        self.counters.events_applied.load(Ordering::Relaxed)
    }

    /// Waits until every outbox is drained (nothing pending) and the consumers have seen every
    /// published event, or `timeout` passes; `true` when drained.
    pub async fn drain_outboxes(&self, timeout: Duration) -> bool {
        let start = std::time::Instant::now();
        loop {
            if status::outbox_depth(self).await.unwrap_or(i64::MAX) == 0 {
                // Published is not yet consumed: wait for the consumers to see every message.
                let published: u64 = self
                    .relays
                    .lock()
                    .await
                    .iter()
                    .map(|r| r.stats().published)
                    .sum();
                let c = &self.counters;
                let seen = c.events_applied.load(Ordering::Relaxed)
                    + c.events_duplicate.load(Ordering::Relaxed)
                    + c.events_failed.load(Ordering::Relaxed);
                if seen >= published {
                    return true;
                }
            }
            if start.elapsed() >= timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the relays (giving their lanes back) and the consumers.
    pub async fn shutdown(&self) {
        for relay in self.relays.lock().await.drain(..) {
            relay.shutdown(Duration::from_secs(5)).await;
        }
        for consumer in self.consumers.lock().await.drain(..) {
            consumer.abort();
        }
    }
}

/// A relay named `name` over `outbox`, polling every `poll_ms` between wake-ups.
async fn start_relay<S: stanchion_outbox::OutboxStore, P: stanchion_outbox::Publisher>(
    outbox: S,
    publisher: P,
    name: String,
    poll_ms: u64,
) -> Result<stanchion_outbox::RelayHandle<S, P>, Error> {
    Relay::builder(outbox, publisher)
        .name(name)
        .poll_interval(Duration::from_millis(poll_ms))
        .build()
        .map_err(config_error)?
        .start()
        .await
        .map_err(|e| Error::Start(format!("outbox relay: {e}")))
}

fn check(config: &ShopConfig) -> Result<(), Error> {
    if config.shards == 0 || config.shards > 64 {
        return Err(Error::Config(format!(
            "shards must be 1 to 64 (got {})",
            config.shards
        )));
    }
    Ok(())
}

async fn open(dir: &Path, file: &str) -> Result<SqlitePool, Error> {
    db::open(&dir.join(file), 4)
        .await
        .map_err(|e| Error::Database(format!("{file}: {e}")))
}

/// The process-wide Prometheus recorder, installed once (the first shop built in a process).
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .ok()
        })
        .clone()
}

/// Counters of one instance.
#[derive(Debug, Default)]
pub(crate) struct InstanceCounters {
    pub(crate) requests: AtomicU64,
    pub(crate) limited: AtomicU64,
    pub(crate) ryw_bypass: AtomicU64,
}

/// One service instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub(crate) inner: Arc<InstanceInner>,
}

#[derive(Debug)]
pub(crate) struct InstanceInner {
    pub(crate) id: usize,
    pub(crate) shop: Arc<Shop>,
    pub(crate) products: ProductCache,
    pub(crate) payments: Pipeline,
    pub(crate) executor: Sagas,
    pub(crate) counters: InstanceCounters,
}

impl Instance {
    /// Instance number `id` over `shop`: its own L1 (sharing L2 and the invalidation bus), its
    /// own payment breaker, its own saga executor over the shared log.
    pub async fn start(shop: &Arc<Shop>, id: usize) -> Result<Self, Error> {
        let policy = Policy::builder(Duration::from_secs(600))
            .l1_ttl(Duration::from_secs(60))
            .negative_ttl(Duration::from_secs(5))
            .build()
            .map_err(config_error)?;
        let products = match &shop.cache {
            L2::Memory(store) => ProductCache::Memory(
                TieredCache::builder("product", store.clone(), policy)
                    .lease(Duration::from_secs(2), Duration::from_millis(200))
                    .build()
                    .map_err(config_error)?,
            ),
            L2::Redis(store) => ProductCache::Redis(
                TieredCache::builder("product", store.clone(), policy)
                    .key_prefix("storefront:")
                    .lease(Duration::from_secs(2), Duration::from_millis(200))
                    .build()
                    .map_err(config_error)?,
            ),
        };
        let payments = payment::pipeline(&format!("instance-{id}"))?;
        let definition = orders::definition(shop, &payments)?;
        let name = format!("instance-{id}");
        let executor = match &shop.saga_log {
            SagaLog::Sqlite(log) => Sagas::Sqlite(
                Executor::builder(log.clone())
                    .name(name)
                    .register(definition)
                    .start()
                    .map_err(config_error)?,
            ),
            SagaLog::Pg(log) => Sagas::Pg(
                Executor::builder(log.clone())
                    .name(name)
                    .register(definition)
                    .start()
                    .map_err(config_error)?,
            ),
        };
        let inner = Arc::new(InstanceInner {
            id,
            shop: Arc::clone(shop),
            products,
            payments,
            executor,
            counters: InstanceCounters::default(),
        });
        shop.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&inner));
        Ok(Self { inner })
    }

    /// This instance's number.
    pub fn id(&self) -> usize {
        self.inner.id
    }

    /// The HTTP application (routes and middleware).
    pub fn router(&self) -> axum::Router {
        api::router(self.clone())
    }

    /// Binds `addr` and serves in the background; the bound address.
    pub async fn serve(&self, addr: &str) -> Result<SocketAddr, Error> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let app = self
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "server stopped");
            }
        });
        Ok(local)
    }

    /// The cache's counters (for reports).
    pub fn cache_stats(&self) -> stanchion_tiered_cache::Stats {
        self.inner.products.stats()
    }

    /// The saga executor's counters.
    pub fn saga_stats(&self) -> stanchion_saga::ExecutorStats {
        self.inner.executor.stats()
    }

    /// The payment breaker's counters.
    pub fn breaker_stats(&self) -> Option<stanchion_breaker::Stats> {
        self.inner.payments.circuit_breaker().map(|b| b.stats())
    }

    /// Requests this instance answered with 429.
    pub fn limited(&self) -> u64 {
        self.inner.counters.limited.load(Ordering::Relaxed)
    }

    /// Reads whose cached copy was older than the caller's read-your-writes token.
    pub fn ryw_bypasses(&self) -> u64 {
        self.inner.counters.ryw_bypass.load(Ordering::Relaxed)
    }

    /// Stops the executor (its sagas resume on other instances once their lease expires).
    pub async fn shutdown(&self) {
        self.inner.executor.shutdown(Duration::from_secs(5)).await;
    }
}
