//! What an executor reports, read back from outside: the `metrics` feature through a recorder,
//! and the `saga` / `saga.step` spans through a tracing layer. The order saga on SQLite (the
//! embedded default): orders that complete, one whose step after the pivot fails twice first,
//! one declined (compensated), and a saga whose compensation fails (parked).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use stanchion_saga::{Executor, RetryPolicy, SagaDef, SqliteSagaLog, Status, Step, StepError};
use support::{Shop, order_saga};
use tracing_subscriber::layer::SubscriberExt;

/// A span's name and its fields, as text.
type SpanSeen = (String, HashMap<String, String>);

/// Records every new span's name and fields.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanSeen>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").replace('"', ""),
        );
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields));
    }
}

fn undoable_then_stuck() -> SagaDef {
    let once = RetryPolicy::new(2, Duration::from_millis(5), Duration::from_millis(10));
    SagaDef::builder("stuck", 1)
        .step(
            Step::compensatable(
                "hold",
                |_| async { Ok(json!("held")) },
                |_| async { Err(StepError::permanent("the hold service lost the hold")) },
            )
            .retry(once)
            .timeout(Duration::from_millis(150)),
        )
        .step(
            Step::pivot("pay", |_| async {
                Err(StepError::permanent("card declined"))
            })
            .retry(once)
            .timeout(Duration::from_millis(150)),
        )
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_spans_cover_every_outcome_and_step() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this process");
    let spans = Spans::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .expect("the only subscriber in this process");

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
    let shop = Arc::new(Shop::default());
    let exec = Executor::builder(log)
        .name("observed")
        .register(order_saga(shop.clone(), 1))
        .register(undoable_then_stuck())
        .lease(Duration::from_millis(400))
        .poll_interval(Duration::from_millis(50))
        .start()
        .unwrap();

    let mut statuses = Vec::new();
    for _ in 0..3 {
        let id = exec.begin("order", &json!({ "sku": "tea" })).await.unwrap();
        statuses.push(
            exec.wait(&id, Duration::from_secs(10))
                .await
                .unwrap()
                .status,
        );
    }
    shop.confirm_failures
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let id = exec.begin("order", &json!({ "sku": "tea" })).await.unwrap();
    statuses.push(
        exec.wait(&id, Duration::from_secs(10))
            .await
            .unwrap()
            .status,
    );
    shop.decline_all
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let id = exec.begin("order", &json!({ "sku": "tea" })).await.unwrap();
    statuses.push(
        exec.wait(&id, Duration::from_secs(10))
            .await
            .unwrap()
            .status,
    );
    let id = exec.begin("stuck", &json!({})).await.unwrap();
    statuses.push(
        exec.wait(&id, Duration::from_secs(10))
            .await
            .unwrap()
            .status,
    );
    exec.shutdown(Duration::from_secs(5)).await;
    use Status::*;
    assert_eq!(
        statuses,
        [
            Completed,
            Completed,
            Completed,
            Completed,
            Compensated,
            Parked
        ]
    );

    // Counters by (metric, saga), and step durations by (step, phase, outcome).
    let mut counters: HashMap<(String, String), u64> = HashMap::new();
    let mut durations: HashMap<(String, String, String), usize> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_default()
        };
        match value {
            DebugValue::Counter(n) => {
                counters.insert((key.name().to_owned(), label("saga.name")), n);
            }
            DebugValue::Histogram(samples) if key.name() == "saga.step_duration" => {
                *durations
                    .entry((label("saga.step"), label("phase"), label("outcome")))
                    .or_default() += samples.len();
            }
            _ => {}
        }
    }
    eprintln!("counters {counters:?}\ndurations {durations:?}");
    let counter = |m: &str, saga: &str| {
        counters
            .get(&(m.to_owned(), saga.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(counter("saga.started", "order"), 5);
    assert_eq!(counter("saga.completed", "order"), 4);
    assert_eq!(counter("saga.compensated", "order"), 1);
    assert_eq!(counter("saga.started", "stuck"), 1);
    assert_eq!(counter("saga.parked", "stuck"), 1);
    assert_eq!(counter("saga.parked", "order"), 0);
    let d = |step: &str, phase: &str, outcome: &str| {
        durations
            .get(&(step.to_owned(), phase.to_owned(), outcome.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(d("reserve", "action", "ok"), 5);
    assert_eq!(d("charge", "action", "ok"), 4);
    assert_eq!(
        d("charge", "action", "error"),
        1,
        "declined: permanent, once"
    );
    assert_eq!(d("confirm", "action", "ok"), 4);
    assert_eq!(d("confirm", "action", "error"), 2);
    assert_eq!(d("reserve", "compensation", "ok"), 1);
    assert_eq!(
        d("hold", "compensation", "error"),
        1,
        "permanent: parked at once"
    );

    // One `saga` span per saga, one `saga.step` span per attempt, named after its step.
    let spans = spans.0.lock().unwrap().clone();
    let sagas = spans.iter().filter(|(n, _)| n == "saga").count();
    assert_eq!(sagas, 6);
    let steps: Vec<&HashMap<String, String>> = spans
        .iter()
        .filter(|(n, _)| n == "saga.step")
        .map(|(_, f)| f)
        .collect();
    let attempts = |step: &str, compensating: &str| {
        steps
            .iter()
            .filter(|f| {
                f.get("saga.step").map(String::as_str) == Some(step)
                    && f.get("saga.compensating").map(String::as_str) == Some(compensating)
            })
            .count()
    };
    assert_eq!(
        attempts("confirm", "false"),
        6,
        "four successes, two failures"
    );
    assert_eq!(attempts("reserve", "true"), 1);
    assert_eq!(attempts("hold", "true"), 1);
}
