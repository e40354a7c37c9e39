//! `--real`: the same shop on real servers, started by the testkit or given by URL.
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use stanchion_outbox::{PgInbox, PgOutbox};
use stanchion_ratelimit::{Limits, RateLimiter, RedisStore};
use stanchion_replica_router::ReplicaRouter;
use stanchion_saga::PgSagaLog;
use stanchion_testkit::{NatsServer, Node, PostgresCluster, RedisServer};
use stanchion_tiered_cache::RedisCacheStore;

use crate::backend::{Limiters, SagaLog};
use crate::store::{OrdersDb, Shard};
use crate::{Error, L2, Parts, ShopConfig, config_error};

/// Servers you already run; each one left out is started by the testkit.
#[derive(Clone, Default)]
pub struct ServerUrls {
    /// The PostgreSQL primary (`postgres://user:password@host/db`); the shop creates its own
    /// databases (`storefront_shard_N`, `storefront_orders`) on it, so the user needs CREATEDB.
    pub database: Option<String>,
    /// Streaming replicas of that primary (reads go there through the replica router).
    pub replicas: Vec<String>,
    /// Redis.
    pub redis: Option<String>,
    /// NATS with JetStream enabled.
    pub nats: Option<String>,
}

impl std::fmt::Debug for ServerUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs carry passwords: only whether each is set.
        f.debug_struct("ServerUrls")
            .field("database", &self.database.is_some())
            .field("replicas", &self.replicas.len())
            .field("redis", &self.redis.is_some())
            .field("nats", &self.nats.is_some())
            .finish()
    }
}

/// The servers the testkit started for a shop; they stop when it is dropped.
#[derive(Debug)]
pub struct RealServers {
    /// PostgreSQL: a primary and two streaming replicas (unless a database URL was given).
    pub postgres: Option<PostgresCluster>,
    /// Redis (unless a URL was given).
    pub redis: Option<RedisServer>,
    /// NATS with JetStream (unless a URL was given).
    pub nats: Option<NatsServer>,
}

fn start_error(what: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Start(format!("{what}: {e}"))
}

fn options(url: &str, database: &str) -> Result<PgConnectOptions, Error> {
    // The parse error never echoes the URL (it may hold a password).
    PgConnectOptions::from_str(url)
        .map(|o| o.database(database))
        .map_err(|_| Error::Config("a PostgreSQL URL does not parse".into()))
}

/// Creates `database` on the primary unless it exists.
async fn ensure_database(primary: &str, database: &str) -> Result<(), Error> {
    let mut admin = PgConnection::connect_with(
        &PgConnectOptions::from_str(primary)
            .map_err(|_| Error::Config("the database URL does not parse".into()))?,
    )
    .await
    .map_err(|e| Error::Database(format!("connecting to the primary: {e}")))?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(database)
        .fetch_optional(&mut admin)
        .await
        .map_err(|e| Error::Database(e.to_string()))?;
    if exists.is_none() {
        // The name is ours (letters, digits, underscores), never the caller's input.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut admin)
            .await
            .map_err(|e| Error::Database(format!("creating {database}: {e}")))?;
    }
    Ok(())
}

/// A replica router over `database` on the primary and every replica.
async fn router(
    primary: &str,
    replicas: &[String],
    database: &str,
) -> Result<Arc<ReplicaRouter>, Error> {
    let mut builder = ReplicaRouter::builder()
        .primary_with("primary", options(primary, database)?)
        .health_interval(Duration::from_millis(200));
    for (i, url) in replicas.iter().enumerate() {
        builder = builder.replica_with(&format!("replica-{i}"), options(url, database)?);
    }
    builder
        .build()
        .await
        .map(Arc::new)
        .map_err(|e| Error::Start(format!("replica router: {e}")))
}

/// Waits until every replica has replayed `table` of `database` (its schema), so that the first
/// reads sent there find it.
async fn wait_for_table(replicas: &[String], database: &str, table: &str) -> Result<(), Error> {
    for url in replicas {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let found = async {
                let mut c = PgConnection::connect_with(&options(url, database)?)
                    .await
                    .map_err(|e| Error::Database(e.to_string()))?;
                sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
                    .bind(table)
                    .fetch_one(&mut c)
                    .await
                    .map_err(|e| Error::Database(e.to_string()))
            }
            .await;
            match found {
                Ok(Some(_)) => break,
                _ if std::time::Instant::now() >= deadline => {
                    return Err(Error::Start(format!(
                        "a replica did not replay the schema of {database} within 30 s"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

async fn run_schema(router: &ReplicaRouter, schema: String) -> Result<(), Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(schema))
        .execute(&router.primary_pool())
        .await
        .map(|_| ())
        .map_err(|e| Error::Database(e.to_string()))
}

pub(crate) async fn parts(config: &ShopConfig, urls: ServerUrls) -> Result<Parts, Error> {
    let (start_pg, start_redis, start_nats) = (
        urls.database.is_none(),
        urls.redis.is_none(),
        urls.nats.is_none(),
    );
    let (postgres, redis, nats) = tokio::task::spawn_blocking(move || {
        let pg = start_pg
            .then(|| PostgresCluster::start(2).map_err(|e| e.to_string()))
            .transpose();
        let redis = start_redis
            .then(|| RedisServer::start().map_err(|e| e.to_string()))
            .transpose();
        let nats = start_nats
            .then(|| NatsServer::start().map_err(|e| e.to_string()))
            .transpose();
        (pg, redis, nats)
    })
    .await
    .map_err(|e| Error::Start(e.to_string()))?;
    let postgres = postgres.map_err(start_error("PostgreSQL"))?;
    let redis = redis.map_err(start_error("Redis"))?;
    let nats = nats.map_err(start_error("NATS"))?;
    let (primary, replicas) = match (&urls.database, &postgres) {
        (Some(url), _) => (url.clone(), urls.replicas.clone()),
        (None, Some(cluster)) => (
            cluster.url(Node::Primary),
            (0..cluster.replica_count())
                .map(|i| cluster.url(Node::Replica(i)))
                .collect(),
        ),
        (None, None) => return Err(Error::Start("no PostgreSQL".into())),
    };
    let redis_url = urls
        .redis
        .clone()
        .or_else(|| redis.as_ref().map(RedisServer::url))
        .unwrap_or_default();
    let nats_url = urls
        .nats
        .clone()
        .or_else(|| nats.as_ref().map(NatsServer::url))
        .unwrap_or_default();
    let nats_client = async_nats::connect(nats_url)
        .await
        .map_err(|e| Error::Start(format!("NATS: {e}")))?;
    let js = async_nats::jetstream::new(nats_client.clone());
    let outbox_config = crate::outbox_config()?;

    let mut shard_list = Vec::with_capacity(config.shards);
    for index in 0..config.shards {
        let database = format!("storefront_shard_{index}");
        ensure_database(&primary, &database).await?;
        let router = router(&primary, &replicas, &database).await?;
        run_schema(&router, crate::db::PG_SHARD_SCHEMA.to_owned()).await?;
        run_schema(&router, stanchion_outbox::postgres_schema(&outbox_config)).await?;
        wait_for_table(&replicas, &database, "products").await?;
        let outbox = PgOutbox::new(router.primary_pool(), outbox_config.clone());
        shard_list.push(Shard::Pg {
            index,
            router,
            outbox,
        });
    }
    let database = "storefront_orders";
    ensure_database(&primary, database).await?;
    let orders = router(&primary, &replicas, database).await?;
    run_schema(&orders, crate::db::PG_ORDERS_SCHEMA.to_owned()).await?;
    run_schema(&orders, stanchion_outbox::postgres_schema(&outbox_config)).await?;
    run_schema(
        &orders,
        stanchion_saga::postgres_schema(crate::SAGA_NAMESPACE).map_err(config_error)?,
    )
    .await?;
    wait_for_table(&replicas, database, "search").await?;
    let saga_log =
        PgSagaLog::new(orders.primary_pool(), crate::SAGA_NAMESPACE).map_err(config_error)?;

    let client = redis::Client::open(redis_url).map_err(|e| Error::Start(format!("Redis: {e}")))?;
    let manager: ConnectionManager = client
        .get_connection_manager()
        .await
        .map_err(|e| Error::Start(format!("Redis: {e}")))?;
    let limiter = |prefix: &str, limits: Limits| {
        RateLimiter::builder(RedisStore::new(manager.clone(), prefix), limits)
            .build()
            .map_err(config_error)
    };
    Ok(Parts {
        dir: None,
        limiters: Limiters::Redis {
            by_key: limiter(
                "storefront:rl:key:",
                crate::quota(config.per_key_per_second)?,
            )?,
            by_ip: limiter("storefront:rl:ip:", crate::quota(config.per_ip_per_second)?)?,
        },
        cache: L2::Redis(RedisCacheStore::new(
            manager.clone(),
            Some(client),
            "storefront:",
        )),
        servers: Some(RealServers {
            postgres,
            redis,
            nats,
        }),
        shard_list,
        orders: OrdersDb::Pg {
            router: orders,
            inbox: PgInbox::new(&outbox_config),
        },
        saga_log: SagaLog::Pg(saga_log),
        nats: Some(js),
        health: crate::Health {
            redis: Some(manager),
            nats: Some(nats_client),
        },
    })
}
