//! The same delivery guarantees on SQLite, the embedded default (one relay per database file).

mod support;

use std::time::{Duration, Instant};

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use stanchion_outbox::{
    ChannelPublisher, Event, MessageId, OutboxConfig, OutboxStore, Relay, SqliteInbox, SqliteOutbox,
};
use support::*;

#[derive(Clone)]
struct Lite {
    pool: SqlitePool,
    outbox: SqliteOutbox,
    _dir: std::sync::Arc<tempfile::TempDir>,
}

impl Lite {
    async fn new(lanes: u32) -> Self {
        Self::keeping(lanes, true).await
    }
    async fn keeping(lanes: u32, keep_published: bool) -> Self {
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
        let config = OutboxConfig::builder()
            .namespace("shop")
            .lanes(lanes)
            .keep_published(keep_published)
            .build()
            .unwrap();
        let outbox = SqliteOutbox::new(pool.clone(), config);
        outbox.migrate().await.unwrap();
        // Migrating twice is harmless.
        outbox.migrate().await.unwrap();
        Self {
            pool,
            outbox,
            _dir: std::sync::Arc::new(dir),
        }
    }
}

impl Db for Lite {
    type Store = SqliteOutbox;
    fn store(&self) -> SqliteOutbox {
        self.outbox.clone()
    }
    async fn enqueue(&self, events: Vec<Event>, batch: bool, commit: bool) -> Vec<MessageId> {
        let mut tx = self.pool.begin().await.unwrap();
        let ids = if batch {
            self.outbox.enqueue_batch(&mut tx, &events).await.unwrap()
        } else {
            let mut ids = Vec::new();
            for e in &events {
                ids.push(self.outbox.enqueue(&mut tx, e).await.unwrap());
            }
            ids
        };
        if commit {
            tx.commit().await.unwrap();
            ids
        } else {
            tx.rollback().await.unwrap();
            Vec::new()
        }
    }
    async fn dead_letters(&self) -> Vec<stanchion_outbox::DeadLetter> {
        self.outbox.dead_letters(None, 100).await.unwrap()
    }
    async fn requeue(&self, ids: Vec<MessageId>) -> u64 {
        self.outbox.requeue(&ids).await.unwrap()
    }
    async fn purge_dead(&self, ids: Vec<MessageId>) -> u64 {
        self.outbox.purge_dead(&ids).await.unwrap()
    }
    async fn purge_published(&self) -> u64 {
        self.outbox
            .purge_published(Duration::ZERO, 7)
            .await
            .unwrap()
    }
    fn keeps_published(&self) -> bool {
        self.outbox.config().keep_published()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_committed_events_once_in_key_order() {
    support::delivers_committed_events_once_in_key_order(Lite::new(8).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_published_rows_deleted_delivery_and_dead_letters_are_the_same() {
    support::delivers_committed_events_once_in_key_order(Lite::keeping(8, false).await).await;
    support::a_poison_event_dead_letters_without_blocking_other_keys(Lite::keeping(4, false).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_turn_keeps_its_lanes() {
    support::a_long_turn_keeps_its_lanes(Lite::new(1).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_claim_a_fair_share_of_the_lanes() {
    support::relays_claim_a_fair_share_of_the_lanes(Lite::new(12).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_waiting_for_a_retry_do_not_starve_the_others() {
    support::lanes_waiting_for_a_retry_do_not_starve_the_others(Lite::new(4).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_dead_letters_without_blocking_other_keys() {
    support::a_poison_event_dead_letters_without_blocking_other_keys(Lite::new(4).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_holds_events_and_loses_none() {
    support::a_broker_outage_holds_events_and_loses_none(Lite::new(4).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_transaction_stays_usable() {
    let db = Lite::new(4).await;
    let mut tx = db.pool.begin().await.unwrap();
    for (event, what) in bad_events() {
        let e = db.outbox.enqueue(&mut tx, &event).await.unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    db.outbox.enqueue(&mut tx, &ev("k", 1)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.outbox.stats().await.unwrap().depth, 1);
}

/// The in-process wake-up fires before the caller commits; the relay's quick re-checks still
/// publish within milliseconds although it polls only every 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_wake_up_publishes_promptly() {
    let db = Lite::new(4).await;
    let (publisher, rx) = ChannelPublisher::new(1024);
    let seen = Collected::spawn(rx);
    let relay = Relay::builder(db.store(), publisher)
        .poll_interval(Duration::from_secs(10))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let mut tx = db.pool.begin().await.unwrap();
        let id = db.outbox.enqueue(&mut tx, &ev("k", i)).await.unwrap();
        // A commit that comes a little after the wake-up.
        tokio::time::sleep(Duration::from_millis(5)).await;
        tx.commit().await.unwrap();
        let t = Instant::now();
        seen.wait_for(&[id], Duration::from_secs(5)).await;
        worst = worst.max(t.elapsed());
    }
    assert!(worst < Duration::from_millis(500), "slowest {worst:?}");
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A relay aborted mid-stream (as a crash) and a new one started after the lease: nothing lost,
/// and the inbox applies each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_relay_is_replaced_and_the_inbox_applies_each_event_once() {
    let db = Lite::new(8).await;
    sqlx::query("CREATE TABLE effects (message_id INTEGER NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let (publisher, mut rx) = ChannelPublisher::new(100_000);
    let inbox = SqliteInbox::new(db.outbox.config());
    let delivered = Collected::default();
    let consumer = {
        let pool = db.pool.clone();
        let delivered = delivered.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let mut tx = pool.begin().await.unwrap();
                if inbox
                    .first_delivery(&mut tx, "mailer", &m.dedup_id("shop"))
                    .await
                    .unwrap()
                {
                    sqlx::query("INSERT INTO effects VALUES (?)")
                        .bind(m.id.0)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                delivered.0.lock().unwrap().push(m);
            }
        })
    };
    let relay = |name: &str| {
        Relay::builder(db.store(), publisher.clone())
            .name(name)
            .batch_size(10)
            .lease(Duration::from_millis(400))
            .publish_timeout(Duration::from_millis(200))
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap()
    };
    let mut committed = Vec::new();
    let first = relay("first").start().await.unwrap();
    for round in 0..5 {
        let events = (0..200)
            .map(|i| ev(&format!("k{}", i % 13), round * 200 + i))
            .collect();
        committed.extend(db.enqueue(events, true, true).await);
        if round == 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    first.abort();
    let second = relay("second").start().await.unwrap();
    delivered
        .wait_for(&committed, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let duplicates = check_delivery(&committed, &delivered.snapshot());
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(effects as usize, committed.len());
    second.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(publisher);
    consumer.await.unwrap();
    eprintln!(
        "{} events, {duplicates} duplicates after one crash",
        committed.len()
    );
}
