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
