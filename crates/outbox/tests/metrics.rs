//! The `metrics` feature, read back through a recorder: what a relay on SQLite (the embedded
//! default) reports while it publishes, retries, dead-letters and waits out a broker outage.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use stanchion_outbox::{ChannelPublisher, Event, OutboxConfig, Relay, SqliteOutbox};
use support::{RejectPoison, Switchable, ev};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_reports_published_failed_dead_unavailable_latency_and_depth() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this process");

    let dir = tempfile::tempdir().unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("shop.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let config = OutboxConfig::builder().lanes(4).build().unwrap();
    let outbox = SqliteOutbox::new(pool.clone(), config);
    outbox.migrate().await.unwrap();

    let mut events: Vec<Event> = (0..50).map(|n| ev(&format!("k{}", n % 5), n)).collect();
    events.push(Event::json("poisoned", "poison", &serde_json::json!({})).unwrap());
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_batch(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();

    let (channel, mut rx) = ChannelPublisher::new(1000);
    let down = Arc::new(AtomicBool::new(true));
    let publisher = RejectPoison(Switchable {
        inner: channel,
        down: Arc::clone(&down),
    });
    let relay = Relay::builder(outbox.clone(), publisher)
        .max_attempts(2)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(20))
        .poll_interval(Duration::from_millis(20))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // The broker is down for a while, then comes back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    down.store(false, Ordering::SeqCst);
    let mut received = 0;
    let until = Instant::now() + Duration::from_secs(20);
    while received < 50 {
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, rx.recv())
            .await
            .expect("50 events within 20 s")
            .expect("channel open");
        received += 1;
    }
    while relay.stats().dead_lettered < 1 {
        assert!(Instant::now() < until, "{:?}", relay.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.shutdown(Duration::from_secs(5)).await.unwrap();

    let mut counters = std::collections::HashMap::new();
    let mut gauges = std::collections::HashSet::new();
    let mut latencies = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        match value {
            DebugValue::Counter(n) => {
                counters.insert(name, n);
            }
            DebugValue::Gauge(_) => {
                gauges.insert(name);
            }
            DebugValue::Histogram(samples) if name == "outbox.publish_latency" => {
                latencies += samples.len();
            }
            DebugValue::Histogram(_) => {}
        }
    }
    eprintln!("counters {counters:?}, gauges {gauges:?}, {latencies} latency samples");
    assert_eq!(counters.get("outbox.published"), Some(&50));
    assert_eq!(counters.get("outbox.dead_lettered"), Some(&1));
    assert_eq!(counters.get("outbox.failed_attempts"), Some(&2));
    assert!(counters.get("outbox.unavailable").is_some_and(|&n| n >= 1));
    assert_eq!(latencies, 50);
    for gauge in [
        "outbox.depth",
        "outbox.oldest_pending_age",
        "outbox.dead_letters_kept",
    ] {
        assert!(gauges.contains(gauge), "{gauge} missing from {gauges:?}");
    }
}
