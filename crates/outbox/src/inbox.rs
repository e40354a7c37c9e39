//! The consumer side: at most one effect per message id, inside the consumer's own transaction.
//!
//! Brokers deliver at least once (a relay that dies between publishing and marking publishes
//! again; a consumer that dies before acknowledging gets the message again). The inbox turns that
//! into an exactly-once *effect*: in the transaction that applies the message, record its id; if
//! the id is already there, skip the effect. The record and the effect commit or roll back
//! together. Two consumers handed the same message at once serialize on the primary key: the
//! second waits for the first to commit and then sees the id.

use std::sync::Arc;
use std::time::Duration;

use sqlx::AssertSqlSafe;

use crate::config::OutboxConfig;
use crate::error::InboxError;

fn check(consumer: &str, message_id: &str) -> Result<(), InboxError> {
    for (field, v) in [("consumer", consumer), ("message_id", message_id)] {
        if v.is_empty() {
            return Err(InboxError::Invalid {
                field,
                reason: "is empty",
            });
        }
        if v.len() > 512 {
            return Err(InboxError::Invalid {
                field,
                reason: "is over 512 bytes",
            });
        }
    }
    Ok(())
}

/// An inbox in PostgreSQL (the `{namespace}.inbox` table of [`postgres_schema`](crate::postgres_schema)).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, msg: stanchion_outbox::Message) -> Result<(), Box<dyn std::error::Error>> {
/// use stanchion_outbox::{OutboxConfig, PgInbox};
/// let inbox = PgInbox::new(&OutboxConfig::default());
/// let mut tx = pool.begin().await?;
/// if inbox.first_delivery(&mut tx, "search-indexer", &msg.dedup_id("stanchion")).await? {
///     sqlx::query("DELETE FROM search_docs WHERE product_id = $1").bind(&msg.key).execute(&mut *tx).await?;
/// }
/// tx.commit().await?; // then acknowledge the message to the broker
/// # Ok(()) }
/// ```
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PgInbox {
    insert: Arc<str>,
    purge: Arc<str>,
}

#[cfg(feature = "postgres")]
impl PgInbox {
    /// The inbox of the outbox schema `config` names.
    pub fn new(config: &OutboxConfig) -> Self {
        let ns = config.namespace();
        Self {
            insert: format!(
                "INSERT INTO {ns}.inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            )
            .into(),
            purge: format!(
                "DELETE FROM {ns}.inbox WHERE (consumer, message_id) IN (SELECT consumer, message_id \
                 FROM {ns}.inbox WHERE processed_at < clock_timestamp() - make_interval(secs => $1) LIMIT $2)"
            )
            .into(),
        }
    }

    /// Records `message_id` for `consumer` in the caller's transaction. `true`: first delivery,
    /// apply the effect in the same transaction. `false`: already applied, skip it.
    pub async fn first_delivery(
        &self,
        conn: &mut sqlx::PgConnection,
        consumer: &str,
        message_id: &str,
    ) -> Result<bool, InboxError> {
        check(consumer, message_id)?;
        let r = sqlx::query(AssertSqlSafe(Arc::clone(&self.insert)))
            .bind(consumer)
            .bind(message_id)
            .execute(conn)
            .await
            .map_err(InboxError::Database)?;
        Ok(r.rows_affected() == 1)
    }

    /// Forgets ids recorded more than `older_than` ago (keep it longer than any redelivery can
    /// take), 10,000 rows per statement.
    pub async fn purge_older_than(
        &self,
        pool: &sqlx::PgPool,
        older_than: Duration,
    ) -> Result<u64, InboxError> {
        let mut total = 0;
        loop {
            let n = sqlx::query(AssertSqlSafe(Arc::clone(&self.purge)))
                .bind(older_than.as_secs_f64())
                .bind(10_000_i64)
                .execute(pool)
                .await
                .map_err(InboxError::Database)?
                .rows_affected();
            total += n;
            if n < 10_000 {
                return Ok(total);
            }
        }
    }
}

/// An inbox in SQLite (the `{namespace}_inbox` table of [`sqlite_schema`](crate::sqlite_schema)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use stanchion_outbox::{OutboxConfig, SqliteInbox};
/// let config = OutboxConfig::default();
/// // One connection: an in-memory database shared by several connections locks whole tables.
/// let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// sqlx::raw_sql(sqlx::AssertSqlSafe(stanchion_outbox::sqlite_schema(&config))).execute(&pool).await?;
/// let inbox = SqliteInbox::new(&config);
/// let mut conn = pool.acquire().await?;
/// assert!(inbox.first_delivery(&mut conn, "mailer", "stanchion:1").await?);
/// assert!(!inbox.first_delivery(&mut conn, "mailer", "stanchion:1").await?);
/// # Ok(()) }
/// ```
#[cfg(feature = "sqlite")]
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    insert: Arc<str>,
    purge: Arc<str>,
}

#[cfg(feature = "sqlite")]
impl SqliteInbox {
    /// The inbox of the outbox namespace `config` names.
    pub fn new(config: &OutboxConfig) -> Self {
        let ns = config.namespace();
        Self {
            insert: format!(
                "INSERT INTO {ns}_inbox (consumer, message_id, processed_us) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
            )
            .into(),
            purge: format!(
                "DELETE FROM {ns}_inbox WHERE (consumer, message_id) IN (SELECT consumer, message_id FROM {ns}_inbox WHERE processed_us < ? LIMIT 10000)"
            )
            .into(),
        }
    }

    /// Records `message_id` for `consumer` in the caller's transaction; `true` on first delivery.
    pub async fn first_delivery(
        &self,
        conn: &mut sqlx::SqliteConnection,
        consumer: &str,
        message_id: &str,
    ) -> Result<bool, InboxError> {
        check(consumer, message_id)?;
        let r = sqlx::query(AssertSqlSafe(Arc::clone(&self.insert)))
            .bind(consumer)
            .bind(message_id)
            .bind(crate::sqlite::now_us())
            .execute(conn)
            .await
            .map_err(InboxError::Database)?;
        Ok(r.rows_affected() == 1)
    }

    /// Forgets ids recorded more than `older_than` ago, 10,000 rows per statement.
    pub async fn purge_older_than(
        &self,
        pool: &sqlx::SqlitePool,
        older_than: Duration,
    ) -> Result<u64, InboxError> {
        let cutoff = crate::sqlite::now_us()
            .saturating_sub(i64::try_from(older_than.as_micros()).unwrap_or(i64::MAX));
        let mut total = 0;
        loop {
            let n = sqlx::query(AssertSqlSafe(Arc::clone(&self.purge)))
                .bind(cutoff)
                .execute(pool)
                .await
                .map_err(InboxError::Database)?
                .rows_affected();
            total += n;
            if n < 10_000 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_huge_ids_are_refused() {
        assert!(check("c", "").is_err());
        assert!(check("", "m").is_err());
        assert!(check("c", &"x".repeat(513)).is_err());
        assert!(check("c", "stanchion:1").is_ok());
    }
}
