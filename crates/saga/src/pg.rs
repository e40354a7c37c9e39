//! The saga log in PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, Row};

use crate::def::{LogTxWork, StepContext};
use crate::error::SagaError;
use crate::log::{
    HistoryEntry, NewSaga, SagaId, SagaLogStore, SagaRecord, Status, Transition, WorkWrite,
};

/// The PostgreSQL schema of the saga log in schema `namespace`: idempotent SQL for your own
/// migration tool.
///
/// ```
/// let sql = stanchion_saga::postgres_schema("shop")?;
/// assert!(sql.contains("CREATE TABLE IF NOT EXISTS shop.sagas ("));
/// # Ok::<(), stanchion_saga::DefinitionError>(())
/// ```
pub fn postgres_schema(namespace: &str) -> Result<String, crate::DefinitionError> {
    crate::check_namespace(namespace)?;
    Ok(schema(namespace))
}

/// The schema of an already checked namespace.
fn schema(ns: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {ns};
CREATE TABLE IF NOT EXISTS {ns}.sagas (
    id text PRIMARY KEY,
    name text NOT NULL,
    version integer NOT NULL,
    status text NOT NULL,
    position bigint NOT NULL DEFAULT 0,
    input text NOT NULL,
    outputs text NOT NULL DEFAULT '{{}}',
    attempts integer NOT NULL DEFAULT 0,
    generation bigint NOT NULL DEFAULT 1,
    owner text,
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    deadline_at timestamptz,
    error text,
    parked_from text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
) WITH (fillfactor = 80);
-- Indexes name only columns a step's write leaves alone (id, status), so those writes can be
-- HOT updates; the unfinished and parked sets are small and sorted after the index lookup.
CREATE INDEX IF NOT EXISTS sagas_unfinished ON {ns}.sagas (id)
    WHERE status IN ('running', 'compensating');
CREATE INDEX IF NOT EXISTS sagas_parked ON {ns}.sagas (id) WHERE status = 'parked';
CREATE TABLE IF NOT EXISTS {ns}.saga_events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind text NOT NULL,
    step text,
    detail text
);
CREATE INDEX IF NOT EXISTS saga_events_saga ON {ns}.saga_events (saga_id, seq);
"
    )
}

#[derive(Debug)]
struct Sql {
    create: Arc<str>,
    claim: Arc<str>,
    write: Arc<str>,
    get: Arc<str>,
    history: Arc<str>,
    parked: Arc<str>,
    operate: Arc<str>,
}

const COLUMNS: &str = "id, name, version, status, position, input, outputs, attempts, generation, \
     error, parked_from, (deadline_at IS NOT NULL AND deadline_at < clock_timestamp()) AS deadline_passed";

/// The saga log in PostgreSQL. Clones share the pool.
#[derive(Debug, Clone)]
pub struct PgSagaLog {
    pool: PgPool,
    #[cfg_attr(not(feature = "migrate"), allow(dead_code))]
    namespace: Arc<str>,
    sql: Arc<Sql>,
}

fn q(s: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::clone(s))
}

fn db(e: sqlx::Error) -> SagaError {
    SagaError::Database(e)
}

impl PgSagaLog {
    /// A log in schema `namespace` (`[a-z_][a-z0-9_]{0,39}`).
    pub fn new(pool: PgPool, namespace: &str) -> Result<Self, crate::DefinitionError> {
        crate::check_namespace(namespace)?;
        let ns = namespace;
        let s = |t: String| -> Arc<str> { t.into() };
        Ok(Self {
            pool,
            namespace: ns.into(),
            sql: Arc::new(Sql {
                create: s(format!(
                    "WITH s AS (INSERT INTO {ns}.sagas (id, name, version, status, input, owner, lease_until, deadline_at) \
                     VALUES ($1, $2, $3, 'running', $4, $5, clock_timestamp() + make_interval(secs => $6), \
                     CASE WHEN $7::float8 IS NULL THEN NULL ELSE clock_timestamp() + make_interval(secs => $7) END) \
                     RETURNING id) INSERT INTO {ns}.saga_events (saga_id, kind) SELECT id, 'started' FROM s"
                )),
                claim: s(format!(
                    "UPDATE {ns}.sagas s SET owner = $1, lease_until = clock_timestamp() + make_interval(secs => $2), \
                     generation = s.generation + 1 \
                     WHERE s.id IN (SELECT id FROM {ns}.sagas WHERE status IN ('running', 'compensating') \
                       AND lease_until < clock_timestamp() ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED) \
                     RETURNING {COLUMNS}"
                )),
                write: s(format!(
                    "WITH u AS (UPDATE {ns}.sagas SET status = $3, position = $4, outputs = coalesce($5, outputs), \
                       attempts = $6, error = $7, parked_from = $8, \
                       lease_until = CASE WHEN $9::float8 IS NULL THEN '-infinity' \
                         ELSE clock_timestamp() + make_interval(secs => $9) END, \
                       owner = CASE WHEN $9::float8 IS NULL THEN NULL ELSE owner END, \
                       updated_at = clock_timestamp() \
                     WHERE id = $1 AND generation = $2 RETURNING id) \
                     INSERT INTO {ns}.saga_events (saga_id, kind, step, detail) \
                     SELECT id, $10, $11, $7 FROM u RETURNING seq"
                )),
                get: s(format!("SELECT {COLUMNS} FROM {ns}.sagas WHERE id = $1")),
                history: s(format!(
                    "SELECT seq, kind, step, detail FROM {ns}.saga_events WHERE saga_id = $1 ORDER BY seq"
                )),
                parked: s(format!(
                    "SELECT {COLUMNS} FROM {ns}.sagas WHERE status = 'parked' ORDER BY updated_at LIMIT $1"
                )),
                operate: s(format!(
                    "WITH u AS (UPDATE {ns}.sagas SET \
                       status = CASE WHEN $2 THEN 'resolved' ELSE parked_from END, \
                       attempts = 0, owner = NULL, lease_until = '-infinity', updated_at = clock_timestamp() \
                     WHERE id = $1 AND status = 'parked' AND ($2 OR parked_from IS NOT NULL) RETURNING id) \
                     INSERT INTO {ns}.saga_events (saga_id, kind, detail) \
                     SELECT id, CASE WHEN $2 THEN 'resolved' ELSE 'retried' END, $3 FROM u RETURNING seq"
                )),
            }),
        })
    }

    /// Creates the schema if missing, under an advisory lock.
    #[cfg(feature = "migrate")]
    pub async fn migrate(&self) -> Result<(), SagaError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("stanchion_saga:{}", self.namespace))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let sql = schema(&self.namespace);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn record(r: &PgRow) -> Result<SagaRecord, SagaError> {
    let status: String = r.try_get("status").map_err(db)?;
    let parked_from: Option<String> = r.try_get("parked_from").map_err(db)?;
    let version: i32 = r.try_get("version").map_err(db)?;
    let attempts: i32 = r.try_get("attempts").map_err(db)?;
    Ok(SagaRecord {
        id: SagaId(r.try_get("id").map_err(db)?),
        name: r.try_get("name").map_err(db)?,
        version: version.max(0) as u32,
        // An unknown status is parked by the executor, not unwrapped.
        status: Status::parse(&status).unwrap_or(Status::Parked),
        position: r.try_get("position").map_err(db)?,
        input: r.try_get("input").map_err(db)?,
        outputs: r.try_get("outputs").map_err(db)?,
        attempts: attempts.max(0) as u32,
        generation: r.try_get("generation").map_err(db)?,
        error: r.try_get("error").map_err(db)?,
        deadline_passed: r.try_get("deadline_passed").map_err(db)?,
        parked_from: parked_from.as_deref().and_then(Status::parse),
    })
}

impl PgSagaLog {
    /// The transition and its history line (one statement), on `executor`.
    async fn write_on<'e, E>(&self, executor: E, t: &Transition) -> Result<bool, SagaError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Postgres>,
    {
        let seq: Option<i64> = sqlx::query_scalar(q(&self.sql.write))
            .bind(t.id.as_str())
            .bind(t.generation)
            .bind(t.status.as_str())
            .bind(t.position)
            .bind(t.outputs.as_deref())
            .bind(i32::try_from(t.attempts).unwrap_or(i32::MAX))
            .bind(t.error.as_deref())
            .bind(t.parked_from.map(Status::as_str))
            .bind(t.lease.map(|d| d.as_secs_f64()))
            .bind(t.event)
            .bind(t.step.as_deref())
            .fetch_optional(executor)
            .await
            .map_err(db)?;
        Ok(seq.is_some())
    }
}

impl SagaLogStore for PgSagaLog {
    async fn create(&self, saga: &NewSaga) -> Result<(), SagaError> {
        sqlx::query(q(&self.sql.create))
            .bind(saga.id.as_str())
            .bind(&saga.name)
            .bind(i32::try_from(saga.version).unwrap_or(i32::MAX))
            .bind(&saga.input)
            .bind(&saga.owner)
            .bind(saga.lease.as_secs_f64())
            .bind(saga.deadline.map(|d| d.as_secs_f64()))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, SagaError> {
        let rows = sqlx::query(q(&self.sql.claim))
            .bind(owner)
            .bind(lease.as_secs_f64())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(record).collect()
    }

    async fn write(&self, t: &Transition) -> Result<bool, SagaError> {
        self.write_on(&self.pool, t).await
    }

    fn runs(&self, work: &LogTxWork) -> bool {
        matches!(work, LogTxWork::Postgres(_))
    }

    async fn write_with_work(
        &self,
        t: &Transition,
        work: &LogTxWork,
        ctx: &StepContext,
        output: &serde_json::Value,
    ) -> Result<WorkWrite, SagaError> {
        #[allow(unreachable_patterns)] // with the `sqlite` feature off, Postgres is the only one
        let work = match work {
            LogTxWork::Postgres(w) => w,
            other => return Err(SagaError::Unsupported(other.database())),
        };
        let mut tx = self.pool.begin().await.map_err(db)?;
        if let Err(e) = work(&mut tx, ctx, output).await {
            let _ = tx.rollback().await;
            return Ok(WorkWrite::WorkFailed(e));
        }
        if !self.write_on(&mut *tx, t).await? {
            let _ = tx.rollback().await;
            return Ok(WorkWrite::Fenced);
        }
        tx.commit().await.map_err(db)?;
        Ok(WorkWrite::Written)
    }

    async fn get(&self, id: &SagaId) -> Result<Option<SagaRecord>, SagaError> {
        let row = sqlx::query(q(&self.sql.get))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(record).transpose()
    }

    async fn history(&self, id: &SagaId) -> Result<Vec<HistoryEntry>, SagaError> {
        let rows = sqlx::query(q(&self.sql.history))
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(HistoryEntry {
                    seq: r.try_get("seq").map_err(db)?,
                    kind: r.try_get("kind").map_err(db)?,
                    step: r.try_get("step").map_err(db)?,
                    detail: r.try_get("detail").map_err(db)?,
                })
            })
            .collect()
    }

    async fn parked(&self, limit: usize) -> Result<Vec<SagaRecord>, SagaError> {
        let rows = sqlx::query(q(&self.sql.parked))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(record).collect()
    }

    async fn operate(&self, id: &SagaId, resolve: bool, note: &str) -> Result<bool, SagaError> {
        let seq: Option<i64> = sqlx::query_scalar(q(&self.sql.operate))
            .bind(id.as_str())
            .bind(resolve)
            .bind(note)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(seq.is_some())
    }
}
