//! PostgreSQL: the outbox table in its own schema, LISTEN/NOTIFY wake-ups and
//! `FOR UPDATE SKIP LOCKED` lane claims.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tokio::sync::Notify;

use crate::config::OutboxConfig;
use crate::error::{EnqueueError, StoreError};
use crate::event::{Event, Message, MessageId, decode_headers};
use crate::store::{
    DeadLetter, Failure, LaneClaim, Marked, Next, OutboxStore, Pending, StoreStats, Wakeups,
    error_text,
};

/// The PostgreSQL schema of an outbox (and its inbox table), as SQL a migration tool can run.
/// Idempotent: every statement is `IF NOT EXISTS` / `ON CONFLICT DO NOTHING`.
///
/// ```
/// let config = stanchion_outbox::OutboxConfig::builder().namespace("shop").build()?;
/// let sql = stanchion_outbox::postgres_schema(&config);
/// assert!(sql.contains("CREATE TABLE IF NOT EXISTS shop.outbox ("));
/// # Ok::<(), stanchion_outbox::BuildError>(())
/// ```
pub fn postgres_schema(config: &OutboxConfig) -> String {
    let ns = config.namespace();
    let last_lane = config.lanes() - 1;
    format!(
        "CREATE SCHEMA IF NOT EXISTS {ns};
CREATE TABLE IF NOT EXISTS {ns}.outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lane integer NOT NULL,
    ordering_key text NOT NULL,
    event_type text NOT NULL,
    payload bytea NOT NULL,
    headers text NOT NULL DEFAULT '{{}}',
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    published_at timestamptz,
    dead_at timestamptz,
    last_error text
);
CREATE INDEX IF NOT EXISTS outbox_pending ON {ns}.outbox (lane, id)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_pending_id ON {ns}.outbox (id)
    WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_published ON {ns}.outbox (published_at)
    WHERE published_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_dead ON {ns}.outbox (id) WHERE dead_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {ns}.outbox_lanes (
    lane integer PRIMARY KEY,
    owner text,
    token bigint NOT NULL DEFAULT 0,
    lease_until timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO {ns}.outbox_lanes (lane) SELECT generate_series(0, {last_lane}) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {ns}.inbox (
    consumer text NOT NULL,
    message_id text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer, message_id)
);
"
    )
}

type Sql = AssertSqlSafe<Arc<str>>;

#[derive(Debug)]
struct Statements {
    insert: Arc<str>,
    insert_batch: Arc<str>,
    lanes: Arc<str>,
    claim: Arc<str>,
    pending: Arc<str>,
    publish: Arc<str>,
    fail: Arc<str>,
    release: Arc<str>,
    stats: Arc<str>,
    dead: Arc<str>,
    requeue: Arc<str>,
    purge_dead: Arc<str>,
    purge_published: Arc<str>,
}

impl Statements {
    fn new(config: &OutboxConfig) -> Self {
        let ns = config.namespace();
        let notify = if config.notify() {
            ", n AS (SELECT pg_notify($6, '')) SELECT ins.id FROM ins, n"
        } else {
            " SELECT ins.id FROM ins WHERE $6::text IS NOT NULL OR true"
        };
        let pending = format!("{ns}.outbox.published_at IS NULL AND {ns}.outbox.dead_at IS NULL");
        let done = if config.keep_published() {
            format!("UPDATE {ns}.outbox SET published_at = clock_timestamp()")
        } else {
            format!("DELETE FROM {ns}.outbox")
        };
        // A relay's fair share: the lanes over the relays holding lanes now, itself included,
        // rounded up.
        let lanes = config.lanes();
        let share = format!(
            "SELECT ({lanes} + count(DISTINCT o.owner)) / (1 + count(DISTINCT o.owner)) \
             FROM {ns}.outbox_lanes o WHERE o.lease_until >= clock_timestamp() AND o.owner <> $1"
        );
        let s = |t: String| -> Arc<str> { t.into() };
        Self {
            insert: s(format!(
                "WITH ins AS (INSERT INTO {ns}.outbox (lane, ordering_key, event_type, payload, headers) \
                 VALUES ($1, $2, $3, $4, $5) RETURNING id){notify}"
            )),
            insert_batch: s(format!(
                "WITH ins AS (INSERT INTO {ns}.outbox (lane, ordering_key, event_type, payload, headers) \
                 SELECT lane, k, t, p, h FROM unnest($1::int4[], $2::text[], $3::text[], $4::bytea[], $5::text[]) \
                 WITH ORDINALITY AS u(lane, k, t, p, h, o) ORDER BY o RETURNING id){notify}"
            )),
            lanes: s(format!("SELECT count(*) FROM {ns}.outbox_lanes")),
            claim: s(format!(
                "UPDATE {ns}.outbox_lanes l SET owner = $1, token = l.token + 1, \
                 lease_until = clock_timestamp() + make_interval(secs => $2) \
                 WHERE l.lane IN (SELECT c.lane FROM {ns}.outbox_lanes c \
                   WHERE c.lease_until < clock_timestamp() \
                   AND EXISTS (SELECT 1 FROM {ns}.outbox WHERE {ns}.outbox.lane = c.lane AND {pending}) \
                   ORDER BY c.lease_until, c.lane LIMIT LEAST($3, ({share})) FOR UPDATE SKIP LOCKED) \
                 RETURNING l.lane, l.token"
            )),
            pending: s(format!(
                "SELECT id, lane, ordering_key, event_type, payload, headers, attempts, \
                 (next_attempt_at <= clock_timestamp()) AS due, \
                 (extract(epoch FROM clock_timestamp() - enqueued_at) * 1000000)::int8 AS age_us, \
                 (extract(epoch FROM enqueued_at) * 1000)::int8 AS enqueued_ms \
                 FROM {ns}.outbox WHERE lane = ANY($1) AND {pending} AND id > $2 ORDER BY id LIMIT $3"
            )),
            publish: s(format!(
                "WITH renewed AS (UPDATE {ns}.outbox_lanes l SET lease_until = clock_timestamp() + make_interval(secs => $3) \
                   FROM unnest($1::int4[], $2::int8[]) AS c(lane, token) \
                   WHERE $7 AND l.lane = c.lane AND l.token = c.token RETURNING l.lane), \
                 held AS (SELECT lane FROM renewed UNION ALL \
                   SELECT l.lane FROM {ns}.outbox_lanes l, unnest($1::int4[], $2::int8[]) AS c(lane, token) \
                   WHERE NOT $7 AND l.lane = c.lane AND l.token = c.token), \
                 done AS ({done} \
                   WHERE id = ANY($4) AND {pending} AND lane IN (SELECT lane FROM held) RETURNING 1) \
                 SELECT h.held, p.* FROM (SELECT coalesce(array_agg(lane), '{{}}') AS held FROM held) h \
                 LEFT JOIN LATERAL ( \
                   SELECT id, lane, ordering_key, event_type, payload, headers, attempts, \
                   (next_attempt_at <= clock_timestamp()) AS due, \
                   (extract(epoch FROM clock_timestamp() - enqueued_at) * 1000000)::int8 AS age_us, \
                   (extract(epoch FROM enqueued_at) * 1000)::int8 AS enqueued_ms \
                   FROM {ns}.outbox WHERE lane = ANY($1) AND {pending} AND id > $5 \
                   ORDER BY id LIMIT $6) p ON true"
            )),
            fail: s(format!(
                "WITH held AS (UPDATE {ns}.outbox_lanes SET lease_until = lease_until \
                   WHERE lane = $1 AND token = $2 RETURNING lane) \
                 UPDATE {ns}.outbox SET attempts = attempts + 1, last_error = $4, \
                   next_attempt_at = clock_timestamp() + make_interval(secs => $5), \
                   dead_at = CASE WHEN attempts + 1 >= $6 THEN clock_timestamp() END \
                 WHERE id = $3 AND EXISTS (SELECT 1 FROM held) RETURNING dead_at IS NOT NULL"
            )),
            release: s(format!(
                "UPDATE {ns}.outbox_lanes l SET owner = NULL, lease_until = clock_timestamp() - interval '1 microsecond' \
                 FROM unnest($1::int4[], $2::int8[]) AS c(lane, token) \
                 WHERE l.lane = c.lane AND l.token = c.token"
            )),
            stats: s(format!(
                "SELECT (SELECT count(*) FROM {ns}.outbox WHERE {pending}) AS depth, \
                 (SELECT (extract(epoch FROM clock_timestamp() - enqueued_at) * 1000)::int8 \
                    FROM {ns}.outbox WHERE {pending} ORDER BY id LIMIT 1) AS oldest_ms, \
                 (SELECT count(*) FROM {ns}.outbox WHERE dead_at IS NOT NULL) AS dead"
            )),
            dead: s(format!(
                "SELECT id, ordering_key, event_type, attempts, coalesce(last_error, '') AS error \
                 FROM {ns}.outbox WHERE dead_at IS NOT NULL AND id > $1 ORDER BY id LIMIT $2"
            )),
            requeue: s(format!(
                "UPDATE {ns}.outbox SET dead_at = NULL, attempts = 0, last_error = NULL, \
                 next_attempt_at = '-infinity' WHERE id = ANY($1) AND dead_at IS NOT NULL"
            )),
            purge_dead: s(format!(
                "DELETE FROM {ns}.outbox WHERE id = ANY($1) AND dead_at IS NOT NULL"
            )),
            purge_published: s(format!(
                "DELETE FROM {ns}.outbox WHERE id IN (SELECT id FROM {ns}.outbox \
                 WHERE published_at < clock_timestamp() - make_interval(secs => $1) LIMIT $2)"
            )),
        }
    }
}

fn q(s: &Arc<str>) -> Sql {
    AssertSqlSafe(Arc::clone(s))
}

/// A transactional outbox in PostgreSQL.
///
/// Writers call [`PgOutbox::enqueue`] with their own transaction; a [`Relay`](crate::Relay)
/// publishes through the [`OutboxStore`] side. Clones share the pool.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use stanchion_outbox::{Event, OutboxConfig, PgOutbox};
/// let outbox = PgOutbox::new(pool.clone(), OutboxConfig::default());
/// let mut tx = pool.begin().await?;
/// sqlx::query("DELETE FROM products WHERE id = $1").bind(42_i64).execute(&mut *tx).await?;
/// outbox.enqueue(&mut tx, &Event::json("product-42", "product.deleted", &42)?).await?;
/// tx.commit().await?; // the event exists exactly when the delete does
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgOutbox {
    pool: PgPool,
    config: Arc<OutboxConfig>,
    sql: Arc<Statements>,
    channel: Arc<str>,
}

impl PgOutbox {
    /// An outbox over `pool` (used by relays and operations; writers bring their own connection).
    pub fn new(pool: PgPool, config: OutboxConfig) -> Self {
        Self {
            pool,
            sql: Arc::new(Statements::new(&config)),
            channel: config.channel().into(),
            config: Arc::new(config),
        }
    }

    /// The pool relays and operations use.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The configuration.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Creates the schema, tables and lanes if missing ([`postgres_schema`]), under an advisory
    /// lock so several processes may migrate at once.
    #[cfg(feature = "migrate")]
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::Database)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("stanchion_outbox:{}", self.config.namespace()))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::Database)?;
        sqlx::raw_sql(AssertSqlSafe(postgres_schema(&self.config)))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::Database)?;
        tx.commit().await.map_err(StoreError::Database)
    }

    /// Writes `event` in the caller's transaction (one statement, with the NOTIFY). Nothing is
    /// published unless that transaction commits.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        event: &Event,
    ) -> Result<MessageId, EnqueueError> {
        let headers = event.validate(self.config.max_event_bytes())?;
        let lane = self.config.lane_of(event.key()) as i32;
        let id: i64 = sqlx::query_scalar(q(&self.sql.insert))
            .bind(lane)
            .bind(event.key())
            .bind(event.event_type())
            .bind(event.payload())
            .bind(headers)
            .bind(&*self.channel)
            .fetch_one(conn)
            .await
            .map_err(EnqueueError::Database)?;
        Ok(MessageId(id))
    }

    /// Writes `events` in one statement, in order (ids increase in slice order).
    pub async fn enqueue_batch(
        &self,
        conn: &mut PgConnection,
        events: &[Event],
    ) -> Result<Vec<MessageId>, EnqueueError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut lanes = Vec::with_capacity(events.len());
        let mut keys = Vec::with_capacity(events.len());
        let mut types = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        let mut headers = Vec::with_capacity(events.len());
        for e in events {
            headers.push(e.validate(self.config.max_event_bytes())?);
            lanes.push(self.config.lane_of(e.key()) as i32);
            keys.push(e.key());
            types.push(e.event_type());
            payloads.push(e.payload());
        }
        let ids: Vec<i64> = sqlx::query_scalar(q(&self.sql.insert_batch))
            .bind(lanes)
            .bind(keys)
            .bind(types)
            .bind(payloads)
            .bind(headers)
            .bind(&*self.channel)
            .fetch_all(conn)
            .await
            .map_err(EnqueueError::Database)?;
        let mut ids: Vec<MessageId> = ids.into_iter().map(MessageId).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Dead letters in id order, after `after` (for paging), at most `limit`.
    pub async fn dead_letters(
        &self,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(q(&self.sql.dead))
            .bind(after.map_or(0, |m| m.0))
            .bind(clamp_limit(limit))
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

    /// Puts dead letters back in line with their attempts reset. Their keys' later events may
    /// already be published: a requeued event is then published after them.
    pub async fn requeue(&self, ids: &[MessageId]) -> Result<u64, StoreError> {
        let ids: Vec<i64> = ids.iter().map(|m| m.0).collect();
        let r = sqlx::query(q(&self.sql.requeue))
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        Ok(r.rows_affected())
    }

    /// Deletes dead letters.
    pub async fn purge_dead(&self, ids: &[MessageId]) -> Result<u64, StoreError> {
        let ids: Vec<i64> = ids.iter().map(|m| m.0).collect();
        let r = sqlx::query(q(&self.sql.purge_dead))
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        Ok(r.rows_affected())
    }

    /// Deletes events published more than `older_than` ago, `batch` rows per statement so no
    /// statement holds locks for long. Returns the rows deleted.
    pub async fn purge_published(
        &self,
        older_than: Duration,
        batch: usize,
    ) -> Result<u64, StoreError> {
        let batch = clamp_limit(batch).max(1);
        let mut total = 0;
        loop {
            let r = sqlx::query(q(&self.sql.purge_published))
                .bind(older_than.as_secs_f64())
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

fn clamp_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn attempts(id: i64, n: i32) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::Corrupt {
        id,
        reason: format!("attempts is {n}"),
    })
}

fn row_to_pending(r: &sqlx::postgres::PgRow) -> Result<Pending, StoreError> {
    let db = StoreError::Database;
    let id: i64 = r.try_get("id").map_err(db)?;
    let headers: String = r.try_get("headers").map_err(StoreError::Database)?;
    let headers = decode_headers(&headers).map_err(|reason| StoreError::Corrupt { id, reason })?;
    let lane: i32 = r.try_get("lane").map_err(StoreError::Database)?;
    Ok(Pending {
        lane: lane.max(0) as u32,
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

impl OutboxStore for PgOutbox {
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
            .bind(lease.as_secs_f64())
            .bind(clamp_limit(max))
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        rows.iter()
            .map(|r| {
                let lane: i32 = r.try_get("lane").map_err(StoreError::Database)?;
                Ok(LaneClaim {
                    lane: u32::try_from(lane).map_err(|_| StoreError::Corrupt {
                        id: i64::from(lane),
                        reason: "negative lane".into(),
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
        let lanes: Vec<i32> = claims.iter().map(|c| c.lane as i32).collect();
        let rows = sqlx::query(q(&self.sql.pending))
            .bind(lanes)
            .bind(after.map_or(0, |m| m.0))
            .bind(clamp_limit(limit))
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
        let lanes: Vec<i32> = claims.iter().map(|c| c.lane as i32).collect();
        let tokens: Vec<i64> = claims.iter().map(|c| c.token).collect();
        let ids: Vec<i64> = ids.iter().map(|m| m.0).collect();
        // Without `next`, an id past every row reads nothing.
        let (after, limit) = next.map_or((i64::MAX, 0), |n| (n.after.0, clamp_limit(n.limit)));
        let rows = sqlx::query(q(&self.sql.publish))
            .bind(lanes)
            .bind(tokens)
            .bind(lease.unwrap_or_default().as_secs_f64())
            .bind(ids)
            .bind(after)
            .bind(limit)
            .bind(lease.is_some())
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        let mut marked = Marked::default();
        for (i, r) in rows.iter().enumerate() {
            if i == 0 {
                let held: Vec<i32> = r.try_get("held").map_err(StoreError::Database)?;
                marked.held = held.into_iter().map(|l| l.max(0) as u32).collect();
            }
            let id: Option<i64> = r.try_get("id").map_err(StoreError::Database)?;
            if id.is_some() {
                marked.next.push(row_to_pending(r)?);
            }
        }
        // The next batch was read from every claimed lane (a plain array filter plans far
        // better than a join with the renewed lanes); keep the held ones.
        marked.next.retain(|p| marked.held.contains(&p.lane));
        Ok(marked)
    }

    async fn mark_failed(
        &self,
        claim: LaneClaim,
        id: MessageId,
        error: &str,
        retry_in: Duration,
        max_attempts: u32,
    ) -> Result<Failure, StoreError> {
        let dead: Option<bool> = sqlx::query_scalar(q(&self.sql.fail))
            .bind(claim.lane as i32)
            .bind(claim.token)
            .bind(id.0)
            .bind(error_text(error))
            .bind(retry_in.as_secs_f64())
            .bind(i32::try_from(max_attempts).unwrap_or(i32::MAX))
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        Ok(match dead {
            None => Failure::LeaseLost,
            Some(true) => Failure::Dead,
            Some(false) => Failure::Retry,
        })
    }

    async fn release(&self, claims: &[LaneClaim]) -> Result<(), StoreError> {
        let lanes: Vec<i32> = claims.iter().map(|c| c.lane as i32).collect();
        let tokens: Vec<i64> = claims.iter().map(|c| c.token).collect();
        sqlx::query(q(&self.sql.release))
            .bind(lanes)
            .bind(tokens)
            .execute(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        Ok(())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let r = sqlx::query(q(&self.sql.stats))
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        let depth: i64 = r.try_get("depth").map_err(StoreError::Database)?;
        let oldest: Option<i64> = r.try_get("oldest_ms").map_err(StoreError::Database)?;
        let dead: i64 = r.try_get("dead").map_err(StoreError::Database)?;
        Ok(StoreStats {
            depth: depth.max(0) as u64,
            oldest_pending_ms: oldest.unwrap_or(0).max(0) as u64,
            dead_letters: dead.max(0) as u64,
        })
    }

    async fn wakeups(&self) -> Result<Wakeups, StoreError> {
        let notify = Arc::new(Notify::new());
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(StoreError::Database)?;
        listener
            .listen(&self.channel)
            .await
            .map_err(StoreError::Database)?;
        let n = Arc::clone(&notify);
        let task = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(_) => n.notify_one(),
                    Err(_) => {
                        // The listener reconnects on the next `recv`; notifications sent while
                        // it was away are lost, so wake the relay to poll once.
                        n.notify_one();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(Wakeups::new(notify, Some(task)))
    }
}
