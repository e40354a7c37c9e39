//! The databases behind the handlers, on either engine: SQLite files (the embedded default) or
//! PostgreSQL through the replica router (`--real`). The SQL is written once with `$n`
//! parameters; SQLite reads them as `?n`.
use std::sync::Arc;

use serde::Deserialize;
use sqlx::AssertSqlSafe;
use sqlx::sqlite::SqlitePool;
use stanchion_outbox::{
    Event, Message, OutboxStore, PgInbox, PgOutbox, SqliteInbox, SqliteOutbox, StoreStats,
};
use stanchion_replica_router::{Consistency, ReplicaRouter, WriteToken};

use crate::api::{NewProduct, Product, ProductPatch, SearchHit};

/// A database failed; the message names the component, never a URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum StoreError {
    /// The database answered with an error or not at all.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The replica router refused or failed.
    #[error("routing: {0}")]
    Route(#[from] stanchion_replica_router::RouteError),
    /// The outbox refused the event.
    #[error("outbox: {0}")]
    Outbox(#[from] stanchion_outbox::EnqueueError),
    /// The outbox store failed.
    #[error("outbox store: {0}")]
    OutboxStore(#[from] stanchion_outbox::StoreError),
    /// The inbox failed.
    #[error("inbox: {0}")]
    Inbox(#[from] stanchion_outbox::InboxError),
    /// An event could not be encoded or decoded.
    #[error("event: {0}")]
    Event(String),
}

/// The SQL of `pg` with `?n` parameters for SQLite.
fn lite(pg: &str) -> String {
    pg.replace('$', "?")
}

fn sql(s: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(s)
}

const COLUMNS: &str = "id, tenant, name, category, price_cents, stock, version, updated_ms";

/// One product write: what it does to the row and the event it enqueues.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Write<'a> {
    Create(&'a NewProduct),
    Update(i64, &'a ProductPatch),
    Delete(i64),
}

impl Write<'_> {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Create(_) => "product.created",
            Self::Update(..) => "product.updated",
            Self::Delete(_) => "product.deleted",
        }
    }

    fn sql(&self) -> String {
        match self {
            Self::Create(_) => format!(
                "INSERT INTO products (tenant, name, category, price_cents, stock, version, created_ms, updated_ms) \
                 VALUES ($1, $2, $3, $4, $5, 1, $6, $6) RETURNING {COLUMNS}"
            ),
            Self::Update(..) => format!(
                "UPDATE products SET name = COALESCE($3, name), category = COALESCE($4, category), \
                 price_cents = COALESCE($5, price_cents), stock = COALESCE($6, stock), \
                 version = version + 1, updated_ms = $7 \
                 WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL RETURNING {COLUMNS}"
            ),
            Self::Delete(_) => format!(
                "UPDATE products SET deleted_at = $3, version = version + 1, updated_ms = $3 \
                 WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL RETURNING {COLUMNS}"
            ),
        }
    }
}

/// Binds a write's parameters in `$n` order (the same for both engines).
macro_rules! bind_write {
    ($q:expr, $w:expr, $tenant:expr, $now:expr) => {
        match $w {
            Write::Create(n) => $q
                .bind($tenant)
                .bind(n.name.trim())
                .bind(n.category.trim())
                .bind(n.price_cents)
                .bind(n.stock)
                .bind($now),
            Write::Update(id, p) => $q
                .bind($tenant)
                .bind(id)
                .bind(p.name.as_deref().map(str::trim))
                .bind(p.category.as_deref().map(str::trim))
                .bind(p.price_cents)
                .bind(p.stock)
                .bind($now),
            Write::Delete(id) => $q.bind($tenant).bind(id).bind($now),
        }
    };
}

/// A committed write: the row as written and, on PostgreSQL, the WAL position proving it.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) product: Product,
    pub(crate) token: Option<WriteToken>,
}

/// What a reservation found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reserve {
    /// Held (now or by an earlier run of the same step): the line's price.
    Held(i64),
    /// Not enough stock, or no such live product: nothing changed.
    Unavailable,
}

/// One shard: its database and the outbox in it.
#[derive(Debug, Clone)]
pub(crate) enum Shard {
    Sqlite {
        index: usize,
        pool: SqlitePool,
        outbox: SqliteOutbox,
    },
    Pg {
        index: usize,
        router: Arc<ReplicaRouter>,
        outbox: PgOutbox,
    },
}

fn event_of(p: &Product, event_type: &str, request_id: &str) -> Result<Event, StoreError> {
    let event = Event::json(format!("{}/{}", p.tenant, p.id), event_type, p)
        .map_err(|e| StoreError::Event(e.to_string()))?;
    Ok(if request_id.is_empty() {
        event
    } else {
        event.with_header("request-id", request_id)
    })
}

const GET: &str = "SELECT id, tenant, name, category, price_cents, stock, version, updated_ms \
                   FROM products WHERE tenant = $1 AND id = $2 AND deleted_at IS NULL";
const COUNT: &str =
    "SELECT count(*) FROM products WHERE tenant = $1 AND category = $2 AND deleted_at IS NULL";
const PAGE: &str = "SELECT id, tenant, name, category, price_cents, stock, version, updated_ms \
                    FROM products WHERE tenant = $1 AND category = $2 AND deleted_at IS NULL \
                    ORDER BY id LIMIT $3 OFFSET $4";
const HOLD: &str = "INSERT INTO reservations (order_id, tenant, product_id, qty) VALUES ($1, $2, $3, $4) \
                    ON CONFLICT (order_id) DO NOTHING";
const TAKE: &str = "UPDATE products SET stock = stock - $1 WHERE tenant = $2 AND id = $3 \
                    AND deleted_at IS NULL AND stock >= $1 RETURNING price_cents";
const PRICE: &str = "SELECT price_cents FROM products WHERE tenant = $1 AND id = $2";
const UNHOLD: &str =
    "UPDATE reservations SET released = 1 WHERE order_id = $1 AND released = 0 RETURNING qty";
const GIVE_BACK: &str = "UPDATE products SET stock = stock + $1 WHERE tenant = $2 AND id = $3";

impl Shard {
    pub(crate) fn index(&self) -> usize {
        match self {
            Self::Sqlite { index, .. } | Self::Pg { index, .. } => *index,
        }
    }

    /// The write, its event in the same transaction, the commit. `None`: no such live product.
    pub(crate) async fn write(
        &self,
        tenant: &str,
        w: Write<'_>,
        request_id: &str,
    ) -> Result<Option<Written>, StoreError> {
        let now = crate::db::now_ms();
        // The row and its event in the caller's transaction `$tx`; `None` ends the write.
        macro_rules! row_and_event {
            ($tx:expr, $sql:expr, $outbox:expr) => {{
                let q = sqlx::query_as::<_, Product>(sql($sql));
                let Some(product) = bind_write!(q, w, tenant, now)
                    .fetch_optional(&mut *$tx)
                    .await?
                else {
                    return Ok(None);
                };
                $outbox
                    .enqueue(&mut $tx, &event_of(&product, w.event_type(), request_id)?)
                    .await?;
                product
            }};
        }
        match self {
            Self::Sqlite { pool, outbox, .. } => {
                let mut tx = pool.begin().await?;
                let product = row_and_event!(tx, lite(&w.sql()), outbox);
                tx.commit().await?;
                Ok(Some(Written {
                    product,
                    token: None,
                }))
            }
            Self::Pg { router, outbox, .. } => {
                let mut tx = router.begin_write().await?;
                let product = row_and_event!(tx, w.sql(), outbox);
                let token = router.commit(tx).await?;
                Ok(Some(Written {
                    product,
                    token: Some(token),
                }))
            }
        }
    }

    /// The live product. On PostgreSQL `None` reads the primary (what fills the cache: a lagging
    /// replica must never refill it after an invalidation), a token reads a replica that has it.
    pub(crate) async fn get(
        &self,
        tenant: &str,
        id: i64,
        at_least: Option<WriteToken>,
    ) -> Result<Option<Product>, StoreError> {
        match self {
            Self::Sqlite { pool, .. } => Ok(sqlx::query_as(sql(lite(GET)))
                .bind(tenant)
                .bind(id)
                .fetch_optional(pool)
                .await?),
            Self::Pg { router, .. } => {
                let consistency = at_least.map_or(Consistency::Primary, Consistency::AtLeast);
                let mut conn = router.read(consistency).await?;
                Ok(sqlx::query_as(sql(GET.to_owned()))
                    .bind(tenant)
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?)
            }
        }
    }

    /// A page of a category and the category's size. On PostgreSQL from any admitted replica,
    /// or one that has the caller's last write.
    pub(crate) async fn list(
        &self,
        tenant: &str,
        category: &str,
        limit: i64,
        offset: i64,
        at_least: Option<WriteToken>,
    ) -> Result<(Vec<Product>, i64), StoreError> {
        match self {
            Self::Sqlite { pool, .. } => {
                let total = sqlx::query_scalar(sql(lite(COUNT)))
                    .bind(tenant)
                    .bind(category)
                    .fetch_one(pool)
                    .await?;
                let items = sqlx::query_as(sql(lite(PAGE)))
                    .bind(tenant)
                    .bind(category)
                    .bind(limit)
                    .bind(offset)
                    .fetch_all(pool)
                    .await?;
                Ok((items, total))
            }
            Self::Pg { router, .. } => {
                let consistency = at_least.map_or(Consistency::Any, Consistency::AtLeast);
                let mut conn = router.read(consistency).await?;
                let total = sqlx::query_scalar(sql(COUNT.to_owned()))
                    .bind(tenant)
                    .bind(category)
                    .fetch_one(&mut *conn)
                    .await?;
                let items = sqlx::query_as(sql(PAGE.to_owned()))
                    .bind(tenant)
                    .bind(category)
                    .bind(limit)
                    .bind(offset)
                    .fetch_all(&mut *conn)
                    .await?;
                Ok((items, total))
            }
        }
    }

    /// Holds `qty` for `order_id` once: the reservation row and the stock change commit
    /// together; a second run finds the row and changes nothing.
    pub(crate) async fn reserve(
        &self,
        order_id: &str,
        tenant: &str,
        product_id: i64,
        qty: i64,
    ) -> Result<Reserve, StoreError> {
        macro_rules! run {
            ($tx:expr, $lite:expr) => {{
                let held = sqlx::query(sql($lite(HOLD)))
                    .bind(order_id)
                    .bind(tenant)
                    .bind(product_id)
                    .bind(qty)
                    .execute(&mut *$tx)
                    .await?;
                let price: Option<i64> = if held.rows_affected() == 1 {
                    let taken = sqlx::query_scalar(sql($lite(TAKE)))
                        .bind(qty)
                        .bind(tenant)
                        .bind(product_id)
                        .fetch_optional(&mut *$tx)
                        .await?;
                    if taken.is_none() {
                        return Ok(Reserve::Unavailable); // rolled back with the hold
                    }
                    taken
                } else {
                    sqlx::query_scalar(sql($lite(PRICE)))
                        .bind(tenant)
                        .bind(product_id)
                        .fetch_optional(&mut *$tx)
                        .await?
                };
                price
            }};
        }
        let price = match self {
            Self::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await?;
                let price = run!(tx, lite);
                tx.commit().await?;
                price
            }
            Self::Pg { router, .. } => {
                let mut tx = router.begin_write().await?;
                let price = run!(tx, str::to_owned);
                tx.commit().await?;
                price
            }
        };
        Ok(price.map_or(Reserve::Unavailable, |p| {
            Reserve::Held(p.saturating_mul(qty))
        }))
    }

    /// Gives a reservation's stock back once.
    pub(crate) async fn release(
        &self,
        order_id: &str,
        tenant: &str,
        product_id: i64,
    ) -> Result<(), StoreError> {
        macro_rules! run {
            ($tx:expr, $lite:expr) => {{
                let qty: Option<i64> = sqlx::query_scalar(sql($lite(UNHOLD)))
                    .bind(order_id)
                    .fetch_optional(&mut *$tx)
                    .await?;
                if let Some(qty) = qty {
                    sqlx::query(sql($lite(GIVE_BACK)))
                        .bind(qty)
                        .bind(tenant)
                        .bind(product_id)
                        .execute(&mut *$tx)
                        .await?;
                }
            }};
        }
        match self {
            Self::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await?;
                run!(tx, lite);
                tx.commit().await?;
            }
            Self::Pg { router, .. } => {
                let mut tx = router.begin_write().await?;
                run!(tx, str::to_owned);
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// The outbox's depth, oldest pending age and dead letters.
    pub(crate) async fn outbox_stats(&self) -> Result<StoreStats, StoreError> {
        Ok(match self {
            Self::Sqlite { outbox, .. } => outbox.stats().await?,
            Self::Pg { outbox, .. } => outbox.stats().await?,
        })
    }

    /// Whether the shard's writable database answers.
    pub(crate) async fn ping(&self) -> bool {
        match self {
            Self::Sqlite { pool, .. } => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
            Self::Pg { router, .. } => sqlx::query("SELECT 1")
                .execute(&router.primary_pool())
                .await
                .is_ok(),
        }
    }
}

/// The body of every `product.*` event.
#[derive(Debug, Deserialize)]
struct ProductEvent {
    tenant: String,
    id: i64,
    name: String,
    category: String,
    version: i64,
}

const UPSERT: &str = "INSERT INTO search (tenant, product_id, name, category, version) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (tenant, product_id) DO UPDATE SET name = excluded.name, \
     category = excluded.category, version = excluded.version \
     WHERE excluded.version > search.version";
const UNLIST: &str = "DELETE FROM search WHERE tenant = $1 AND product_id = $2";
const SEARCH: &str = "SELECT product_id, name, category, version FROM search WHERE tenant = $1 AND name LIKE $2 \
     ORDER BY name, product_id LIMIT 50";

/// The orders database: saga log, search table, inbox.
#[derive(Debug, Clone)]
pub(crate) enum OrdersDb {
    Sqlite {
        pool: SqlitePool,
        inbox: SqliteInbox,
    },
    Pg {
        router: Arc<ReplicaRouter>,
        inbox: PgInbox,
    },
}

impl OrdersDb {
    /// Applies a product event to the search table once; `false` for a redelivery.
    pub(crate) async fn apply(&self, id: &str, message: &Message) -> Result<bool, StoreError> {
        let event: ProductEvent = serde_json::from_slice(&message.payload)
            .map_err(|e| StoreError::Event(e.to_string()))?;
        let deleted = message.event_type == "product.deleted";
        macro_rules! run {
            ($tx:expr, $inbox:expr, $lite:expr) => {{
                if !$inbox.first_delivery(&mut $tx, "search", id).await? {
                    return Ok(false);
                }
                if deleted {
                    sqlx::query(sql($lite(UNLIST))).bind(&event.tenant).bind(event.id).execute(&mut *$tx).await?;
                } else {
                    // Versions only move forward, whatever order events of different keys arrive in.
                    sqlx::query(sql($lite(UPSERT)))
                        .bind(&event.tenant)
                        .bind(event.id)
                        .bind(&event.name)
                        .bind(&event.category)
                        .bind(event.version)
                        .execute(&mut *$tx)
                        .await?;
                }
                $tx.commit().await?;
            }};
        }
        match self {
            Self::Sqlite { pool, inbox } => {
                let mut tx = pool.begin().await?;
                run!(tx, inbox, lite);
            }
            Self::Pg { router, inbox } => {
                let mut tx = router.begin_write().await?;
                run!(tx, inbox, str::to_owned);
            }
        }
        Ok(true)
    }

    /// Products whose name starts with `prefix` (searched on a replica on PostgreSQL).
    pub(crate) async fn search(
        &self,
        tenant: &str,
        prefix: &str,
    ) -> Result<Vec<SearchHit>, StoreError> {
        let pattern = format!("{}%", prefix.replace(['%', '_', '\\'], ""));
        Ok(match self {
            Self::Sqlite { pool, .. } => {
                sqlx::query_as(sql(lite(SEARCH)))
                    .bind(tenant)
                    .bind(pattern)
                    .fetch_all(pool)
                    .await?
            }
            Self::Pg { router, .. } => {
                let mut conn = router.read(Consistency::Any).await?;
                sqlx::query_as(sql(SEARCH.to_owned()))
                    .bind(tenant)
                    .bind(pattern)
                    .fetch_all(&mut *conn)
                    .await?
            }
        })
    }

    pub(crate) async fn ping(&self) -> bool {
        match self {
            Self::Sqlite { pool, .. } => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
            Self::Pg { router, .. } => sqlx::query("SELECT 1")
                .execute(&router.primary_pool())
                .await
                .is_ok(),
        }
    }
}
