//! `--real`: the same shop on real servers from the testkit.
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use stanchion_outbox::{PgInbox, PgOutbox};
use stanchion_ratelimit::{Limits, RateLimiter, RedisStore};
use stanchion_replica_router::ReplicaRouter;
use stanchion_saga::PgSagaLog;
use stanchion_testkit::{NatsServer, PostgresCluster, RedisServer, TestDatabase};
use stanchion_tiered_cache::RedisCacheStore;

use crate::backend::{Limiters, SagaLog};
use crate::store::{OrdersDb, Shard};
use crate::{Error, L2, Parts, ShopConfig, config_error};

/// The servers a `--real` shop runs on; they stop when it is dropped.
#[derive(Debug)]
pub struct RealServers {
    /// PostgreSQL: a primary and two streaming replicas.
    pub postgres: PostgresCluster,
    /// Redis.
    pub redis: RedisServer,
    /// NATS with JetStream.
    pub nats: NatsServer,
}

fn start_error(what: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Start(format!("{what}: {e}"))
}

/// A replica router over `db` on the primary and both replicas.
async fn router(db: &TestDatabase) -> Result<Arc<ReplicaRouter>, Error> {
    let mut builder = ReplicaRouter::builder()
        .primary("primary", &db.primary_url)
        .health_interval(Duration::from_millis(200));
    for (i, url) in db.replica_urls.iter().enumerate() {
        builder = builder.replica(&format!("replica-{i}"), url);
    }
    builder
        .build()
        .await
        .map(Arc::new)
        .map_err(|e| Error::Start(format!("replica router: {e}")))
}

async fn run_schema(router: &ReplicaRouter, schema: String) -> Result<(), Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(schema))
        .execute(&router.primary_pool())
        .await
        .map(|_| ())
        .map_err(|e| Error::Database(e.to_string()))
}

pub(crate) async fn parts(config: &ShopConfig) -> Result<Parts, Error> {
    let (postgres, redis, nats) = tokio::task::spawn_blocking(|| {
        let pg = PostgresCluster::start(2).map_err(|e| e.to_string());
        let redis = RedisServer::start().map_err(|e| e.to_string());
        let nats = NatsServer::start().map_err(|e| e.to_string());
        (pg, redis, nats)
    })
    .await
    .map_err(|e| Error::Start(e.to_string()))?;
    let postgres = postgres.map_err(start_error("PostgreSQL"))?;
    let redis = redis.map_err(start_error("Redis"))?;
    let nats = nats.map_err(start_error("NATS"))?;
    let js = async_nats::jetstream::new(
        async_nats::connect(nats.url())
            .await
            .map_err(|e| Error::Start(format!("NATS: {e}")))?,
    );
    let outbox_config = crate::outbox_config()?;

    let mut shard_list = Vec::with_capacity(config.shards);
    for index in 0..config.shards {
        let db = postgres
            .create_database()
            .map_err(|e| Error::Start(format!("shard database: {e}")))?;
        let router = router(&db).await?;
        run_schema(&router, crate::db::PG_SHARD_SCHEMA.to_owned()).await?;
        run_schema(&router, stanchion_outbox::postgres_schema(&outbox_config)).await?;
        let outbox = PgOutbox::new(router.primary_pool(), outbox_config.clone());
        shard_list.push(Shard::Pg {
            index,
            router,
            outbox,
        });
    }
    let db = postgres
        .create_database()
        .map_err(|e| Error::Start(format!("orders database: {e}")))?;
    let orders = router(&db).await?;
    run_schema(&orders, crate::db::PG_ORDERS_SCHEMA.to_owned()).await?;
    run_schema(&orders, stanchion_outbox::postgres_schema(&outbox_config)).await?;
    run_schema(
        &orders,
        stanchion_saga::postgres_schema(crate::SAGA_NAMESPACE).map_err(config_error)?,
    )
    .await?;
    let saga_log =
        PgSagaLog::new(orders.primary_pool(), crate::SAGA_NAMESPACE).map_err(config_error)?;
    // Replicas have the schemas before the first read goes to them.
    let wait = tokio::task::spawn_blocking(move || {
        let r = (0..2).try_for_each(|i| postgres.wait_replayed(i, Duration::from_secs(30)));
        (postgres, r)
    })
    .await
    .map_err(|e| Error::Start(e.to_string()))?;
    let postgres = wait.0;
    wait.1
        .map_err(|e| Error::Start(format!("replicas did not replay the schema: {e}")))?;

    let client =
        redis::Client::open(redis.url()).map_err(|e| Error::Start(format!("Redis: {e}")))?;
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
        nats: Some(js),
        shard_list,
        orders: OrdersDb::Pg {
            router: orders,
            inbox: PgInbox::new(&outbox_config),
        },
        saga_log: SagaLog::Pg(saga_log),
    })
}
