//! SQLite: the embedded default. One relay (SQLite has one writer at a time), polling plus an
//! in-process wake-up when this process enqueues.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Row, SqliteConnection};
use tokio::sync::Notify;

use crate::config::OutboxConfig;
use crate::error::{EnqueueError, StoreError};
use crate::event::{Event, Message, MessageId, decode_headers};
use crate::store::{
    DeadLetter, Failure, LaneClaim, Marked, Next, OutboxStore, Pending, StoreStats, Wakeups,
    error_text,
};

/// The SQLite schema of an outbox (and its inbox table): tables prefixed `{namespace}_`.
/// Idempotent.
///
/// ```
/// let config = stanchion_outbox::OutboxConfig::builder().namespace("shop").build()?;
/// assert!(stanchion_outbox::sqlite_schema(&config).contains("CREATE TABLE IF NOT EXISTS shop_outbox ("));
/// # Ok::<(), stanchion_outbox::BuildError>(())
/// ```
pub fn sqlite_schema(config: &OutboxConfig) -> String {
    let ns = config.namespace();
    let last_lane = config.lanes() - 1;
    format!(
        "CREATE TABLE IF NOT EXISTS {ns}_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    lane INTEGER NOT NULL,
    ordering_key TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload BLOB NOT NULL,
    headers TEXT NOT NULL DEFAULT '{{}}',
    enqueued_us INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_us INTEGER NOT NULL DEFAULT 0,
    published_us INTEGER,
    dead_us INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS {ns}_outbox_pending ON {ns}_outbox (lane, id)
    WHERE published_us IS NULL AND dead_us IS NULL;
CREATE INDEX IF NOT EXISTS {ns}_outbox_pending_id ON {ns}_outbox (id)
    WHERE published_us IS NULL AND dead_us IS NULL;
CREATE INDEX IF NOT EXISTS {ns}_outbox_published ON {ns}_outbox (published_us)
    WHERE published_us IS NOT NULL;
CREATE INDEX IF NOT EXISTS {ns}_outbox_dead ON {ns}_outbox (id) WHERE dead_us IS NOT NULL;
CREATE TABLE IF NOT EXISTS {ns}_outbox_lanes (
    lane INTEGER PRIMARY KEY,
    owner TEXT,
    token INTEGER NOT NULL DEFAULT 0,
    lease_until_us INTEGER NOT NULL DEFAULT 0
);
WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x < {last_lane})
INSERT OR IGNORE INTO {ns}_outbox_lanes (lane) SELECT x FROM n;
CREATE TABLE IF NOT EXISTS {ns}_inbox (
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    processed_us INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;
"
    )
}

/// Microseconds since the Unix epoch (SQLite timestamps are this process's clock).
pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[derive(Debug)]
struct Statements {
    insert: Arc<str>,
    lanes: Arc<str>,
    claim: Arc<str>,
    pending: Arc<str>,
    renew: Arc<str>,
    publish: Arc<str>,
    fail: Arc<str>,
    release: Arc<str>,
    stats: Arc<str>,
    dead: Arc<str>,
    requeue: Arc<str>,
    purge_dead: Arc<str>,
    purge_published: Arc<str>,
    ns: Arc<str>,
}

impl Statements {
    fn new(config: &OutboxConfig) -> Self {
        let ns = config.namespace();
        let pending = "published_us IS NULL AND dead_us IS NULL";
        // A relay's fair share, as on PostgreSQL.
        let lanes = config.lanes();
        let share = format!(
            "SELECT ({lanes} + count(DISTINCT o.owner)) / (1 + count(DISTINCT o.owner)) \
             FROM {ns}_outbox_lanes o WHERE o.lease_until_us >= ?2 AND o.owner <> ?1"
        );
        let s = |t: String| -> Arc<str> { t.into() };
        Self {
            insert: s(format!(
                "INSERT INTO {ns}_outbox (lane, ordering_key, event_type, payload, headers, enqueued_us) \
                 VALUES (?, ?, ?, ?, ?, ?) RETURNING id"
            )),
            lanes: s(format!("SELECT count(*) FROM {ns}_outbox_lanes")),
            claim: s(format!(
                "UPDATE {ns}_outbox_lanes SET owner = ?1, token = token + 1, lease_until_us = ?2 + ?3 \
                 WHERE lane IN (SELECT c.lane FROM {ns}_outbox_lanes c WHERE c.lease_until_us < ?2 \
                   AND EXISTS (SELECT 1 FROM {ns}_outbox o WHERE o.lane = c.lane AND o.{pending}) \
                   ORDER BY c.lease_until_us, c.lane LIMIT min(?4, ({share}))) \
                 RETURNING lane, token"
            )),
            pending: s(format!(
                "SELECT id, lane, ordering_key, event_type, payload, headers, attempts, \
                 (next_attempt_us <= ?1) AS due, ?1 - enqueued_us AS age_us, enqueued_us / 1000 AS enqueued_ms \
                 FROM {ns}_outbox WHERE lane IN (SELECT value FROM json_each(?2)) AND {pending} AND id > ?3 \
                 ORDER BY id LIMIT ?4"
            )),
            renew: s(format!(
                "UPDATE {ns}_outbox_lanes SET lease_until_us = max(lease_until_us, ?3) WHERE lane = ?1 AND token = ?2"
            )),
            publish: s(format!(
                "{done} WHERE id IN (SELECT value FROM json_each(?2)) AND {pending} \
                 AND lane IN (SELECT value FROM json_each(?3))",
                done = if config.keep_published() {
                    format!("UPDATE {ns}_outbox SET published_us = ?1")
                } else {
                    // ?1 (the publish time) is bound and unused: the row goes.
                    format!("DELETE FROM {ns}_outbox")
                }
            )),
            fail: s(format!(
                "UPDATE {ns}_outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_us = ?3 + ?4, \
                 dead_us = CASE WHEN attempts + 1 >= ?5 THEN ?3 END \
                 WHERE id = ?1 RETURNING dead_us IS NOT NULL"
            )),
            release: s(format!(
                "UPDATE {ns}_outbox_lanes SET owner = NULL, lease_until_us = ?3 WHERE lane = ?1 AND token = ?2"
            )),
            stats: s(format!(
                "SELECT (SELECT count(*) FROM {ns}_outbox WHERE {pending}) AS depth, \
                 (SELECT ?1 - enqueued_us FROM {ns}_outbox WHERE {pending} ORDER BY id LIMIT 1) AS oldest_us, \
                 (SELECT count(*) FROM {ns}_outbox WHERE dead_us IS NOT NULL) AS dead"
            )),
            dead: s(format!(
                "SELECT id, ordering_key, event_type, attempts, coalesce(last_error, '') AS error \
                 FROM {ns}_outbox WHERE dead_us IS NOT NULL AND id > ? ORDER BY id LIMIT ?"
            )),
            requeue: s(format!(
                "UPDATE {ns}_outbox SET dead_us = NULL, attempts = 0, last_error = NULL, next_attempt_us = 0 \
                 WHERE id IN (SELECT value FROM json_each(?)) AND dead_us IS NOT NULL"
            )),
            purge_dead: s(format!(
                "DELETE FROM {ns}_outbox WHERE id IN (SELECT value FROM json_each(?)) AND dead_us IS NOT NULL"
            )),
            purge_published: s(format!(
                "DELETE FROM {ns}_outbox WHERE id IN (SELECT id FROM {ns}_outbox \
                 WHERE published_us IS NOT NULL AND published_us < ? LIMIT ?)"
            )),
            ns: ns.into(),
        }
    }
}

fn q(s: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::clone(s))
}

fn lane_list(lanes: impl Iterator<Item = u32>) -> String {
    let v: Vec<u32> = lanes.collect();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".to_owned())
}

fn id_list(ids: &[MessageId]) -> String {
    let v: Vec<i64> = ids.iter().map(|m| m.0).collect();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".to_owned())
}

/// A transactional outbox in SQLite, the embedded default. Same API as
/// [`PgOutbox`](crate::PgOutbox); run one relay per database file.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use stanchion_outbox::{Event, OutboxConfig, OutboxStore, SqliteOutbox};
/// // One connection: an in-memory database shared by several connections locks whole tables.
/// let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// let outbox = SqliteOutbox::new(pool.clone(), OutboxConfig::default());
/// # #[cfg(feature = "migrate")]
/// outbox.migrate().await?;
/// # #[cfg(not(feature = "migrate"))]
/// # sqlx::raw_sql(sqlx::AssertSqlSafe(stanchion_outbox::sqlite_schema(outbox.config()))).execute(&pool).await?;
/// let mut tx = pool.begin().await?;
/// outbox.enqueue(&mut tx, &Event::new("order-7", "order.placed", b"{}".to_vec())).await?;
/// tx.rollback().await?;
/// assert_eq!(outbox.stats().await?.depth, 0); // rolled back: nothing to publish
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    config: Arc<OutboxConfig>,
    sql: Arc<Statements>,
    wake: Arc<Notify>,
}

impl SqliteOutbox {
    /// An outbox over `pool`.
    pub fn new(pool: SqlitePool, config: OutboxConfig) -> Self {
        Self {
            pool,
            sql: Arc::new(Statements::new(&config)),
            config: Arc::new(config),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The pool relays and operations use.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The configuration.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Creates the tables and lanes if missing ([`sqlite_schema`]).
    #[cfg(feature = "migrate")]
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::Database)?;
        sqlx::raw_sql(AssertSqlSafe(sqlite_schema(&self.config)))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::Database)?;
        tx.commit().await.map_err(StoreError::Database)
    }

    /// Writes `event` in the caller's transaction (one statement) and wakes this process's relay.
    pub async fn enqueue(
        &self,
        conn: &mut SqliteConnection,
        event: &Event,
    ) -> Result<MessageId, EnqueueError> {
        let headers = event.validate(self.config.max_event_bytes())?;
        let id: i64 = sqlx::query_scalar(q(&self.sql.insert))
            .bind(i64::from(self.config.lane_of(event.key())))
            .bind(event.key())
            .bind(event.event_type())
            .bind(event.payload())
            .bind(headers)
            .bind(now_us())
            .fetch_one(conn)
            .await
            .map_err(EnqueueError::Database)?;
        self.wake.notify_one();
        Ok(MessageId(id))
    }

    /// Writes `events` in one statement (up to 5,000 events per statement; more take one
    /// statement per 5,000), in order.
    pub async fn enqueue_batch(
        &self,
        conn: &mut SqliteConnection,
        events: &[Event],
    ) -> Result<Vec<MessageId>, EnqueueError> {
        let mut encoded = Vec::with_capacity(events.len());
        for e in events {
            encoded.push(e.validate(self.config.max_event_bytes())?);
        }
        let mut out = Vec::with_capacity(events.len());
        let now = now_us();
        for (chunk, headers) in events.chunks(5000).zip(encoded.chunks(5000)) {
            let mut sql = format!(
                "INSERT INTO {}_outbox (lane, ordering_key, event_type, payload, headers, enqueued_us) VALUES ",
                self.sql.ns
            );
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 {
                    "(?,?,?,?,?,?)"
                } else {
                    ",(?,?,?,?,?,?)"
                });
            }
            sql.push_str(" RETURNING id");
            let mut query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
            for (e, h) in chunk.iter().zip(headers) {
                query = query
                    .bind(i64::from(self.config.lane_of(e.key())))
                    .bind(e.key())
                    .bind(e.event_type())
                    .bind(e.payload())
                    .bind(h.as_str())
                    .bind(now);
            }
            let ids = query
                .fetch_all(&mut *conn)
                .await
                .map_err(EnqueueError::Database)?;
            out.extend(ids.into_iter().map(MessageId));
        }
        out.sort_unstable();
        if !out.is_empty() {
            self.wake.notify_one();
        }
        Ok(out)
    }

    /// Dead letters in id order, after `after`, at most `limit`.
    pub async fn dead_letters(
        &self,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(q(&self.sql.dead))
            .bind(after.map_or(0, |m| m.0))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.try_get("id").map_err(StoreError::Database)?;
                Ok(DeadLetter {
                    id: MessageId(id),
                    key: r.try_get("ordering_key").map_err(StoreError::Database)?,
                    event_type: r.try_get("event_type").map_err(StoreError::Database)?,
                    attempts: attempts(id, r.try_get("attempts").map_err(StoreError::Database)?)?,
                    error: r.try_get("error").map_err(StoreError::Database)?,
                })
            })
            .collect()
    }

    /// Puts dead letters back in line with their attempts reset.
    pub async fn requeue(&self, ids: &[MessageId]) -> Result<u64, StoreError> {
        let r = sqlx::query(q(&self.sql.requeue))
            .bind(id_list(ids))
            .execute(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        self.wake.notify_one();
        Ok(r.rows_affected())
    }

    /// Deletes dead letters.
    pub async fn purge_dead(&self, ids: &[MessageId]) -> Result<u64, StoreError> {
        let r = sqlx::query(q(&self.sql.purge_dead))
            .bind(id_list(ids))
            .execute(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        Ok(r.rows_affected())
    }

    /// Deletes events published more than `older_than` ago, `batch` rows per statement.
    pub async fn purge_published(
        &self,
        older_than: Duration,
        batch: usize,
    ) -> Result<u64, StoreError> {
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let r = sqlx::query(q(&self.sql.purge_published))
                .bind(now_us().saturating_sub(us(older_than)))
                .bind(batch)
                .execute(&self.pool)
                .await
                .map_err(StoreError::Database)?;
            total += r.rows_affected();
            if r.rows_affected() < batch as u64 {
                return Ok(total);
            }
        }
    }
}

fn attempts(id: i64, n: i64) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::Corrupt {
        id,
        reason: format!("attempts is {n}"),
    })
}

fn row_to_pending(r: &SqliteRow) -> Result<Pending, StoreError> {
    let id: i64 = r.try_get("id").map_err(StoreError::Database)?;
    let headers: String = r.try_get("headers").map_err(StoreError::Database)?;
    let headers = decode_headers(&headers).map_err(|reason| StoreError::Corrupt { id, reason })?;
    let lane: i64 = r.try_get("lane").map_err(StoreError::Database)?;
    Ok(Pending {
        lane: u32::try_from(lane).map_err(|_| StoreError::Corrupt {
            id,
            reason: format!("lane is {lane}"),
        })?,
        message: Message {
            id: MessageId(id),
            key: r.try_get("ordering_key").map_err(StoreError::Database)?,
            event_type: r.try_get("event_type").map_err(StoreError::Database)?,
            payload: r.try_get("payload").map_err(StoreError::Database)?,
            headers,
            enqueued_at_ms: r.try_get("enqueued_ms").map_err(StoreError::Database)?,
            attempts: attempts(id, r.try_get("attempts").map_err(StoreError::Database)?)?,
        },
        due: r.try_get("due").map_err(StoreError::Database)?,
        age_us: r.try_get("age_us").map_err(StoreError::Database)?,
    })
}

impl OutboxStore for SqliteOutbox {
    async fn check(&self) -> Result<(), StoreError> {
        let found: i64 = sqlx::query_scalar(q(&self.sql.lanes))
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        if found != i64::from(self.config.lanes()) {
            return Err(StoreError::LaneMismatch {
                configured: self.config.lanes(),
                found: u32::try_from(found).unwrap_or(u32::MAX),
            });
        }
        Ok(())
    }

    async fn claim_lanes(
        &self,
        owner: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<LaneClaim>, StoreError> {
        let rows = sqlx::query(q(&self.sql.claim))
            .bind(owner)
            .bind(now_us())
            .bind(us(lease))
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        rows.iter()
            .map(|r| {
                let lane: i64 = r.try_get("lane").map_err(StoreError::Database)?;
                Ok(LaneClaim {
                    lane: u32::try_from(lane).map_err(|_| StoreError::Corrupt {
                        id: lane,
                        reason: "lane out of range".into(),
                    })?,
                    token: r.try_get("token").map_err(StoreError::Database)?,
                })
            })
            .collect()
    }

    async fn pending(
        &self,
        claims: &[LaneClaim],
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let rows = sqlx::query(q(&self.sql.pending))
            .bind(now_us())
            .bind(lane_list(claims.iter().map(|c| c.lane)))
            .bind(after.map_or(0, |m| m.0))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        rows.iter().map(row_to_pending).collect()
    }

    async fn mark_published(
        &self,
        claims: &[LaneClaim],
        ids: &[MessageId],
        lease: Option<Duration>,
        next: Option<Next>,
    ) -> Result<Marked, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::Database)?;
        let now = now_us();
        let mut held = Vec::with_capacity(claims.len());
        // Without a renewal the lease stays where it is (`max` keeps the later time).
        let until = lease.map_or(0, |l| now.saturating_add(us(l)));
        for c in claims {
            let n = sqlx::query(q(&self.sql.renew))
                .bind(i64::from(c.lane))
                .bind(c.token)
                .bind(until)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::Database)?
                .rows_affected();
            if n == 1 {
                held.push(c.lane);
            }
        }
        sqlx::query(q(&self.sql.publish))
            .bind(now)
            .bind(id_list(ids))
            .bind(lane_list(held.iter().copied()))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::Database)?;
        let mut rows = Vec::new();
        if let Some(n) = next {
            rows = sqlx::query(q(&self.sql.pending))
                .bind(now)
                .bind(lane_list(held.iter().copied()))
                .bind(n.after.0)
                .bind(i64::try_from(n.limit).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::Database)?;
        }
        tx.commit().await.map_err(StoreError::Database)?;
        let next = rows.iter().map(row_to_pending).collect::<Result<_, _>>()?;
        Ok(Marked::new(held, next))
    }

    async fn mark_failed(
        &self,
        claim: LaneClaim,
        id: MessageId,
        error: &str,
        retry_in: Duration,
        max_attempts: u32,
    ) -> Result<Failure, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::Database)?;
        let now = now_us();
        let held = sqlx::query(q(&self.sql.renew))
            .bind(i64::from(claim.lane))
            .bind(claim.token)
            .bind(0_i64)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::Database)?
            .rows_affected()
            == 1;
        if !held {
            return Ok(Failure::LeaseLost);
        }
        let dead: Option<bool> = sqlx::query_scalar(q(&self.sql.fail))
            .bind(id.0)
            .bind(error_text(error))
            .bind(now)
            .bind(us(retry_in))
            .bind(i64::from(max_attempts))
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::Database)?;
        tx.commit().await.map_err(StoreError::Database)?;
        Ok(match dead {
            Some(true) => Failure::Dead,
            // A row gone (purged by an operator) needs nothing more.
            Some(false) | None => Failure::Retry,
        })
    }

    async fn release(&self, claims: &[LaneClaim]) -> Result<(), StoreError> {
        // Released lanes go behind the lanes held less recently (a microsecond back, so a claim
        // in the same microsecond still finds them free).
        let now = now_us().saturating_sub(1);
        for c in claims {
            sqlx::query(q(&self.sql.release))
                .bind(i64::from(c.lane))
                .bind(c.token)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(StoreError::Database)?;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let r = sqlx::query(q(&self.sql.stats))
            .bind(now_us())
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        let depth: i64 = r.try_get("depth").map_err(StoreError::Database)?;
        let oldest: Option<i64> = r.try_get("oldest_us").map_err(StoreError::Database)?;
        let dead: i64 = r.try_get("dead").map_err(StoreError::Database)?;
        Ok(StoreStats {
            depth: depth.max(0) as u64,
            oldest_pending_ms: (oldest.unwrap_or(0).max(0) / 1000) as u64,
            dead_letters: dead.max(0) as u64,
        })
    }

    async fn wakeups(&self) -> Result<Wakeups, StoreError> {
        Ok(Wakeups::new(Arc::clone(&self.wake), None))
    }
}
