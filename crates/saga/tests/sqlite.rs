//! The saga executor on SQLite (one executor per database file, the embedded default).

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use stanchion_saga::{SqliteSagaLog, Status};
use support::*;

async fn log() -> (SqliteSagaLog, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("sagas.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let log = SqliteSagaLog::new(pool, "shop").unwrap();
    log.migrate().await.unwrap();
    log.migrate().await.unwrap();
    (log, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_boundary_recovers_with_each_effect_once() {
    let (log, _dir) = log().await;
    crash_at_every_boundary(log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_complete_or_compensate_and_retriable_steps_retry() {
    let (log, _dir) = log().await;
    let shop = Arc::new(Shop::default());
    let exec = executor(log.clone(), shop.clone(), "one");
    shop.confirm_failures
        .store(5, std::sync::atomic::Ordering::SeqCst);
    let id = exec.begin("order", &json!({ "sku": "tea" })).await.unwrap();
    let done = exec.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done.status, Status::Completed);
    check_effects(&shop, &id, done.status);
    // Five failures of the step after the pivot, each recorded, then success.
    let history = exec.history(&id).await.unwrap();
    let failed = history.iter().filter(|h| h.kind == "step_failed").count();
    assert_eq!(failed, 5, "{history:?}");
    let kinds: Vec<&str> = history.iter().map(|h| h.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"started"));
    assert_eq!(kinds.last(), Some(&"completed"));
    exec.shutdown(Duration::from_secs(5)).await;
}

/// On SQLite too: a step's work in the log transaction fails once (rolled back, a failed
/// attempt), then commits with the step's record: one row per saga. A step whose work is for a
/// PostgreSQL log is refused by an executor over SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_work_in_the_log_transaction_commits_with_it() {
    use stanchion_saga::{Executor, RetryPolicy, SagaDef, Step, StepError};
    use std::sync::atomic::{AtomicBool, Ordering};
    let (log, _dir) = log().await;
    let pool = log.pool().clone();
    sqlx::raw_sql("CREATE TABLE outbox_events (saga TEXT NOT NULL, key TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let fail_once = Arc::new(AtomicBool::new(true));
    let charge = {
        let fail_once = fail_once.clone();
        Step::pivot("charge", |_| async { Ok(json!({ "receipt": 7 })) })
            .retry(RetryPolicy::new(
                3,
                Duration::from_millis(5),
                Duration::from_millis(20),
            ))
            .in_sqlite_log_transaction(move |conn, ctx, _output| {
                let fail_once = fail_once.clone();
                let (saga, key) = (ctx.saga_id().to_string(), ctx.idempotency_key());
                Box::pin(async move {
                    sqlx::query("INSERT INTO outbox_events (saga, key) VALUES (?, ?)")
                        .bind(&saga)
                        .bind(&key)
                        .execute(&mut *conn)
                        .await
                        .map_err(StepError::transient)?;
                    if fail_once.swap(false, Ordering::SeqCst) {
                        return Err(StepError::transient("broker table locked"));
                    }
                    Ok(())
                })
            })
    };
    let def = SagaDef::builder("paid", 1).step(charge).build().unwrap();
    let exec = Executor::builder(log.clone())
        .register(def)
        .start()
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(exec.begin("paid", &json!({})).await.unwrap());
    }
    for id in &ids {
        let done = exec.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(done.status, Status::Completed);
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE saga = ?")
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 1, "saga {id}");
    }
    let mut failed = 0;
    for id in &ids {
        let history = exec.history(id).await.unwrap();
        failed += history.iter().filter(|h| h.kind == "step_failed").count();
    }
    assert_eq!(failed, 1, "one saga's work failed once and was retried");
    exec.shutdown(Duration::from_secs(5)).await;

    let for_postgres = Step::pivot("charge", |_| async { Ok(json!(null)) })
        .in_postgres_log_transaction(|_, _, _| Box::pin(async { Ok(()) }));
    let refused = Executor::builder(log)
        .register(
            SagaDef::builder("pg", 1)
                .step(for_postgres)
                .build()
                .unwrap(),
        )
        .start();
    assert!(
        matches!(
            &refused,
            Err(stanchion_saga::DefinitionError::Setting {
                field: "log transaction",
                ..
            })
        ),
        "{refused:?}"
    );
}
