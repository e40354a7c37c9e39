//! The saga log in SQLite, the embedded default (one executor per database file).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Row};

use crate::def::{LogTxWork, StepContext};
use crate::error::SagaError;
use crate::log::{
    HistoryEntry, NewSaga, SagaId, SagaLogStore, SagaRecord, Status, Transition, WorkWrite,
};

/// The SQLite schema of the saga log: tables `{namespace}_sagas` and `{namespace}_saga_events`.
///
/// ```
/// assert!(stanchion_saga::sqlite_schema("shop")?.contains("CREATE TABLE IF NOT EXISTS shop_sagas ("));
/// # Ok::<(), stanchion_saga::DefinitionError>(())
/// ```
pub fn sqlite_schema(namespace: &str) -> Result<String, crate::DefinitionError> {
    crate::check_namespace(namespace)?;
    Ok(schema(namespace))
}

/// The schema of an already checked namespace.
fn schema(ns: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ns}_sagas (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    position INTEGER NOT NULL DEFAULT 0,
    input TEXT NOT NULL,
    outputs TEXT NOT NULL DEFAULT '{{}}',
    attempts INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 1,
    owner TEXT,
    lease_until_us INTEGER NOT NULL DEFAULT 0,
    deadline_us INTEGER,
    error TEXT,
    parked_from TEXT,
    created_us INTEGER NOT NULL,
    updated_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS {ns}_sagas_unfinished ON {ns}_sagas (lease_until_us)
    WHERE status IN ('running', 'compensating');
CREATE TABLE IF NOT EXISTS {ns}_saga_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    saga_id TEXT NOT NULL,
    at_us INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS {ns}_saga_events_saga ON {ns}_saga_events (saga_id, seq);
"
    )
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn db(e: sqlx::Error) -> SagaError {
    SagaError::Database(e)
}

#[derive(Debug)]
struct Sql {
    create: Arc<str>,
    event: Arc<str>,
    claim: Arc<str>,
    write: Arc<str>,
    get: Arc<str>,
    history: Arc<str>,
    parked: Arc<str>,
    operate: Arc<str>,
}

fn q(s: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::clone(s))
}

const COLUMNS: &str = "id, name, version, status, position, input, outputs, attempts, generation, \
     error, parked_from, (deadline_us IS NOT NULL AND deadline_us < ?9) AS deadline_passed";

/// The saga log in SQLite.
#[derive(Debug, Clone)]
pub struct SqliteSagaLog {
    pool: SqlitePool,
    #[cfg_attr(not(feature = "migrate"), allow(dead_code))]
    namespace: Arc<str>,
    sql: Arc<Sql>,
}

impl SqliteSagaLog {
    /// A log with tables prefixed `{namespace}_`.
    pub fn new(pool: SqlitePool, namespace: &str) -> Result<Self, crate::DefinitionError> {
        crate::check_namespace(namespace)?;
        let ns = namespace;
        let s = |t: String| -> Arc<str> { t.into() };
        Ok(Self {
            pool,
            namespace: ns.into(),
            sql: Arc::new(Sql {
                create: s(format!(
                    "INSERT INTO {ns}_sagas (id, name, version, status, input, owner, lease_until_us, deadline_us, created_us, updated_us) \
                     VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)"
                )),
                event: s(format!(
                    "INSERT INTO {ns}_saga_events (saga_id, at_us, kind, step, detail) VALUES (?, ?, ?, ?, ?)"
                )),
                claim: s(format!(
                    "UPDATE {ns}_sagas SET owner = ?1, lease_until_us = ?9 + ?2, generation = generation + 1 \
                     WHERE id IN (SELECT id FROM {ns}_sagas WHERE status IN ('running', 'compensating') \
                       AND lease_until_us < ?9 ORDER BY lease_until_us LIMIT ?3) \
                     RETURNING {COLUMNS}"
                )),
                write: s(format!(
                    "UPDATE {ns}_sagas SET status = ?3, position = ?4, outputs = coalesce(?5, outputs), \
                     attempts = ?6, error = ?7, parked_from = ?8, \
                     lease_until_us = CASE WHEN ?10 IS NULL THEN 0 ELSE ?9 + ?10 END, \
                     owner = CASE WHEN ?10 IS NULL THEN NULL ELSE owner END, updated_us = ?9 \
                     WHERE id = ?1 AND generation = ?2"
                )),
                get: s(format!("SELECT {COLUMNS} FROM {ns}_sagas WHERE id = ?1")),
                history: s(format!(
                    "SELECT seq, kind, step, detail FROM {ns}_saga_events WHERE saga_id = ? ORDER BY seq"
                )),
                parked: s(format!(
                    "SELECT {COLUMNS} FROM {ns}_sagas WHERE status = 'parked' ORDER BY updated_us LIMIT ?1"
                )),
                operate: s(format!(
                    "UPDATE {ns}_sagas SET status = CASE WHEN ?2 THEN 'resolved' ELSE parked_from END, \
                     attempts = 0, owner = NULL, lease_until_us = 0, updated_us = ?3 \
                     WHERE id = ?1 AND status = 'parked' AND (?2 OR parked_from IS NOT NULL)"
                )),
            }),
        })
    }

    /// Creates the tables if missing.
    #[cfg(feature = "migrate")]
    pub async fn migrate(&self) -> Result<(), SagaError> {
        let sql = schema(&self.namespace);
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn record(r: &SqliteRow) -> Result<SagaRecord, SagaError> {
    let status: String = r.try_get("status").map_err(db)?;
    let parked_from: Option<String> = r.try_get("parked_from").map_err(db)?;
    let version: i64 = r.try_get("version").map_err(db)?;
    let attempts: i64 = r.try_get("attempts").map_err(db)?;
    Ok(SagaRecord {
        id: SagaId(r.try_get("id").map_err(db)?),
        name: r.try_get("name").map_err(db)?,
        version: u32::try_from(version).unwrap_or(u32::MAX),
        status: Status::parse(&status).unwrap_or(Status::Parked),
        position: r.try_get("position").map_err(db)?,
        input: r.try_get("input").map_err(db)?,
        outputs: r.try_get("outputs").map_err(db)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        generation: r.try_get("generation").map_err(db)?,
        error: r.try_get("error").map_err(db)?,
        deadline_passed: r.try_get("deadline_passed").map_err(db)?,
        parked_from: parked_from.as_deref().and_then(Status::parse),
    })
}

impl SqliteSagaLog {
    /// The transition and its history line, in `tx` (not committed); `false`: fenced out.
    async fn write_on(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        t: &Transition,
    ) -> Result<bool, SagaError> {
        let now = now_us();
        let n = sqlx::query(q(&self.sql.write))
            .bind(t.id.as_str())
            .bind(t.generation)
            .bind(t.status.as_str())
            .bind(t.position)
            .bind(t.outputs.as_deref())
            .bind(i64::from(t.attempts))
            .bind(t.error.as_deref())
            .bind(t.parked_from.map(Status::as_str))
            .bind(now)
            .bind(t.lease.map(us))
            .execute(&mut **tx)
            .await
            .map_err(db)?
            .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        sqlx::query(q(&self.sql.event))
            .bind(t.id.as_str())
            .bind(now)
            .bind(t.event)
            .bind(t.step.as_deref())
            .bind(t.error.as_deref())
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        Ok(true)
    }
}

impl SagaLogStore for SqliteSagaLog {
    async fn create(&self, saga: &NewSaga) -> Result<(), SagaError> {
        let now = now_us();
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(q(&self.sql.create))
            .bind(saga.id.as_str())
            .bind(&saga.name)
            .bind(i64::from(saga.version))
            .bind(&saga.input)
            .bind(&saga.owner)
            .bind(now.saturating_add(us(saga.lease)))
            .bind(saga.deadline.map(|d| now.saturating_add(us(d))))
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(q(&self.sql.event))
            .bind(saga.id.as_str())
            .bind(now)
            .bind("started")
            .bind(None::<String>)
            .bind(None::<String>)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, SagaError> {
        let rows = sqlx::query(q(&self.sql.claim))
            .bind(owner)
            .bind(us(lease))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(0) // ?4..?8 unused
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(now_us())
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(record).collect()
    }

    async fn write(&self, t: &Transition) -> Result<bool, SagaError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        if !self.write_on(&mut tx, t).await? {
            return Ok(false);
        }
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    fn runs(&self, work: &LogTxWork) -> bool {
        matches!(work, LogTxWork::Sqlite(_))
    }

    async fn write_with_work(
        &self,
        t: &Transition,
        work: &LogTxWork,
        ctx: &StepContext,
        output: &serde_json::Value,
    ) -> Result<WorkWrite, SagaError> {
        #[allow(unreachable_patterns)] // with the `postgres` feature off, Sqlite is the only one
        let work = match work {
            LogTxWork::Sqlite(w) => w,
            other => return Err(SagaError::Unsupported(other.database())),
        };
        let mut tx = self.pool.begin().await.map_err(db)?;
        if let Err(e) = work(&mut tx, ctx, output).await {
            let _ = tx.rollback().await;
            return Ok(WorkWrite::WorkFailed(e));
        }
        if !self.write_on(&mut tx, t).await? {
            let _ = tx.rollback().await;
            return Ok(WorkWrite::Fenced);
        }
        tx.commit().await.map_err(db)?;
        Ok(WorkWrite::Written)
    }

    async fn get(&self, id: &SagaId) -> Result<Option<SagaRecord>, SagaError> {
        let row = sqlx::query(q(&self.sql.get))
            .bind(id.as_str())
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(now_us())
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
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(0)
            .bind(now_us())
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(record).collect()
    }

    async fn operate(&self, id: &SagaId, resolve: bool, note: &str) -> Result<bool, SagaError> {
        let now = now_us();
        let mut tx = self.pool.begin().await.map_err(db)?;
        let n = sqlx::query(q(&self.sql.operate))
            .bind(id.as_str())
            .bind(resolve)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        sqlx::query(q(&self.sql.event))
            .bind(id.as_str())
            .bind(now)
            .bind(if resolve { "resolved" } else { "retried" })
            .bind(None::<String>)
            .bind(note)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }
}
