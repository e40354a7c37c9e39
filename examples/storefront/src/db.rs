//! The embedded databases: one SQLite file per shard (products, their outbox, reservations) and
//! one for orders (saga log, search table, inbox), all in WAL mode in a temporary directory.
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use stanchion_outbox::OutboxConfig;

/// The products of one shard. Rows are soft-deleted (`deleted_at`); the partial index serves
/// the list by category over live rows only, in id order for keyset pages.
const SHARD_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS products (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    price_cents INTEGER NOT NULL,
    stock INTEGER NOT NULL,
    version INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX IF NOT EXISTS products_live_by_category
    ON products (tenant, category, id) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS products_deleted
    ON products (tenant, deleted_at);
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    product_id INTEGER NOT NULL,
    qty INTEGER NOT NULL,
    released INTEGER NOT NULL DEFAULT 0
);
";

/// Orders, the search table kept by the product-event consumer, and payments seen.
const ORDERS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS search (
    tenant TEXT NOT NULL,
    product_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (tenant, product_id)
);
CREATE INDEX IF NOT EXISTS search_by_name ON search (tenant, name);
";

/// Opens (creating) the SQLite database file `path` with WAL, a busy timeout and `max`
/// connections.
pub(crate) async fn open(path: &Path, max: u32) -> Result<SqlitePool, sqlx::Error> {
    let url = format!("sqlite://{}", path.display());
    let options = SqliteConnectOptions::from_str(&url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(max)
        .connect_with(options)
        .await
}

/// Creates a shard's tables and its outbox.
pub(crate) async fn migrate_shard(
    pool: &SqlitePool,
    outbox: &OutboxConfig,
) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SHARD_SCHEMA).execute(pool).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(stanchion_outbox::sqlite_schema(outbox)))
        .execute(pool)
        .await?;
    Ok(())
}

/// Creates the orders database's tables, the saga log and the inbox.
pub(crate) async fn migrate_orders(
    pool: &SqlitePool,
    outbox: &OutboxConfig,
    saga_namespace: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    sqlx::raw_sql(ORDERS_SCHEMA).execute(pool).await?;
    // The inbox table lives in the outbox schema of the consumer's database.
    sqlx::raw_sql(sqlx::AssertSqlSafe(stanchion_outbox::sqlite_schema(outbox)))
        .execute(pool)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(stanchion_saga::sqlite_schema(
        saga_namespace,
    )?))
    .execute(pool)
    .await?;
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The products of one shard on PostgreSQL (same shape as the SQLite one).
pub(crate) const PG_SHARD_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS products (
    id BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    price_cents BIGINT NOT NULL,
    stock BIGINT NOT NULL,
    version BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX IF NOT EXISTS products_live_by_category
    ON products (tenant, category, id) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS products_deleted ON products (tenant, deleted_at);
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    product_id BIGINT NOT NULL,
    qty BIGINT NOT NULL,
    released INTEGER NOT NULL DEFAULT 0
);
";

/// The search table on PostgreSQL.
pub(crate) const PG_ORDERS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS search (
    tenant TEXT NOT NULL,
    product_id BIGINT NOT NULL,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (tenant, product_id)
);
CREATE INDEX IF NOT EXISTS search_by_name ON search (tenant, name);
";
