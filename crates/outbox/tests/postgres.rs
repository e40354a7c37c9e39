//! Against real PostgreSQL from the testkit: the delivery guarantees with several relays that
//! are aborted and restarted, late commits, a restarted and a dead server, and the inbox.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use stanchion_outbox::{
    ChannelPublisher, EnqueueError, Event, MessageId, OutboxConfig, OutboxStore, PgInbox, PgOutbox,
    Relay, StoreError,
};
use stanchion_testkit::{Node, PostgresCluster};
use support::*;

fn cluster() -> &'static PostgresCluster {
    static C: OnceLock<PostgresCluster> = OnceLock::new();
    C.get_or_init(|| PostgresCluster::start(0).unwrap())
}

async fn pool_on(cluster: &PostgresCluster, connections: u32) -> PgPool {
    let db = cluster.create_database().unwrap();
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&db.primary_url)
        .await
        .unwrap()
}

async fn outbox_on(pool: &PgPool, lanes: u32) -> PgOutbox {
    outbox_with(pool, lanes, true).await
}

async fn outbox_with(pool: &PgPool, lanes: u32, keep_published: bool) -> PgOutbox {
    let config = OutboxConfig::builder()
        .namespace("shop")
        .lanes(lanes)
        .keep_published(keep_published)
        .build()
        .unwrap();
    let outbox = PgOutbox::new(pool.clone(), config);
    outbox.migrate().await.unwrap();
    outbox
}

#[derive(Clone)]
struct Pg {
    pool: PgPool,
    outbox: PgOutbox,
}

impl Pg {
    async fn new(lanes: u32) -> Self {
        Self::keeping(lanes, true).await
    }
    async fn keeping(lanes: u32, keep_published: bool) -> Self {
        let pool = pool_on(cluster(), 10).await;
        let outbox = outbox_with(&pool, lanes, keep_published).await;
        Self { pool, outbox }
    }
}

impl Db for Pg {
    type Store = PgOutbox;
    fn store(&self) -> PgOutbox {
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
    support::delivers_committed_events_once_in_key_order(Pg::new(8).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_published_rows_deleted_delivery_and_dead_letters_are_the_same() {
    support::delivers_committed_events_once_in_key_order(Pg::keeping(8, false).await).await;
    support::a_poison_event_dead_letters_without_blocking_other_keys(Pg::keeping(4, false).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_turn_keeps_its_lanes() {
    support::a_long_turn_keeps_its_lanes(Pg::new(1).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_claim_a_fair_share_of_the_lanes() {
    support::relays_claim_a_fair_share_of_the_lanes(Pg::new(12).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_waiting_for_a_retry_do_not_starve_the_others() {
    support::lanes_waiting_for_a_retry_do_not_starve_the_others(Pg::new(4).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_dead_letters_without_blocking_other_keys() {
    support::a_poison_event_dead_letters_without_blocking_other_keys(Pg::new(4).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_holds_events_and_loses_none() {
    support::a_broker_outage_holds_events_and_loses_none(Pg::new(4).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_transaction_stays_usable() {
    let db = Pg::new(4).await;
    sqlx::query("CREATE TABLE products (id bigint PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO products VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    // A payload that does not serialize (a map with non-string keys).
    let mut bad = std::collections::HashMap::new();
    bad.insert(vec![1u8], 1);
    assert!(matches!(
        Event::json("k", "t", &bad),
        Err(EnqueueError::Serialize(_))
    ));
    for (event, what) in bad_events() {
        let e = db.outbox.enqueue(&mut tx, &event).await.unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
        let e = db
            .outbox
            .enqueue_batch(&mut tx, &[ev("ok", 1), event])
            .await
            .unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    // The transaction is still usable and commits both the business row and a good event.
    db.outbox.enqueue(&mut tx, &ev("k", 1)).await.unwrap();
    tx.commit().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(db.outbox.stats().await.unwrap().depth, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_count_that_differs_from_the_table_refuses_to_start() {
    let db = Pg::new(4).await;
    let other = PgOutbox::new(
        db.pool.clone(),
        OutboxConfig::builder()
            .namespace("shop")
            .lanes(8)
            .build()
            .unwrap(),
    );
    let err = Relay::builder(other, ChannelPublisher::new(1).0)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            stanchion_outbox::RelayError::Store(StoreError::LaneMismatch {
                configured: 8,
                found: 4
            })
        ),
        "{err}"
    );
}

/// Transactions that take their ids early and commit late (the case an `id > last_seen`
/// cursor skips): every one is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_out_of_id_order_are_not_skipped() {
    let db = Pg::new(4).await;
    let (publisher, rx) = ChannelPublisher::new(4096);
    let seen = Collected::spawn(rx);
    // The relay gets its own small pool: the writers below hold all of theirs in open
    // transactions, and a relay sharing that pool would wait for them (as it would in production).
    let relay_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with((*db.pool.connect_options()).clone())
        .await
        .unwrap();
    let relay_outbox = PgOutbox::new(relay_pool, db.outbox.config().clone());
    let relay = Relay::builder(relay_outbox, publisher)
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..24u64 {
        let db = db.clone();
        writers.push(tokio::spawn(async move {
            let mut tx = db.pool.begin().await.unwrap();
            let id = db
                .outbox
                .enqueue(&mut tx, &ev(&format!("w{w}"), w as usize))
                .await
                .unwrap();
            // Early ids commit last: writer 0 holds its transaction longest.
            tokio::time::sleep(Duration::from_millis(600 - 25 * w)).await;
            tx.commit().await.unwrap();
            id
        }));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut ids = Vec::new();
    for w in writers {
        ids.push(w.await.unwrap());
    }
    seen.wait_for(&ids, Duration::from_secs(10)).await;
    let delivered = seen.snapshot();
    // The late (low) ids really were published after higher ones.
    let first = delivered.first().unwrap().id;
    assert!(
        first > *ids.iter().min().unwrap(),
        "commits were not out of order: ids {ids:?}, delivered {:?}",
        delivered.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    assert_eq!(check_delivery(&ids, &delivered), 0);
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Four relays share the lanes while relay tasks are aborted (as a crash would) and restarted
/// every 150 ms and writers keep writing: every committed event arrives, first deliveries are
/// in per-key order, duplicates come only from aborted relays' unmarked batches, and the inbox
/// turns the deliveries into exactly one effect per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_aborted_and_restarted_lose_nothing_and_the_inbox_removes_duplicates() {
    let db = Pg::new(16).await;
    sqlx::raw_sql(
        "CREATE TABLE effects (seq bigserial PRIMARY KEY, message_id bigint, key text);
         CREATE TABLE aggs (key text PRIMARY KEY, n bigint NOT NULL);",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (publisher, mut rx) = ChannelPublisher::new(100_000);
    let inbox = PgInbox::new(db.outbox.config());
    // The consumer: each delivery applied through the inbox in its own transaction.
    let delivered = Collected::default();
    let consumer = {
        let pool = db.pool.clone();
        let delivered = delivered.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let mut tx = pool.begin().await.unwrap();
                if inbox
                    .first_delivery(&mut tx, "indexer", &m.dedup_id("shop"))
                    .await
                    .unwrap()
                {
                    sqlx::query("INSERT INTO effects (message_id, key) VALUES ($1, $2)")
                        .bind(m.id.0)
                        .bind(&m.key)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                delivered.0.lock().unwrap().push(m);
            }
        })
    };
    let start_relay = |i: usize| {
        let store = db.store();
        let publisher = publisher.clone();
        async move {
            Relay::builder(store, publisher)
                .name(format!("relay-{i}"))
                .batch_size(20)
                .lanes_per_turn(4)
                .batches_per_lane(3)
                .lease(Duration::from_millis(600))
                .publish_timeout(Duration::from_millis(200))
                .poll_interval(Duration::from_millis(50))
                .build()
                .unwrap()
                .start()
                .await
                .unwrap()
        }
    };
    let mut relays = Vec::new();
    for i in 0..4 {
        relays.push(Some(start_relay(i).await));
    }
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..3usize {
        let db = db.clone();
        let writing = Arc::clone(&writing);
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut n = 0;
            while writing.load(Ordering::SeqCst) {
                let events: Vec<Event> = (0..1 + n % 4)
                    .map(|i| ev(&format!("agg{}", (w * 7 + n + i) % 40), n))
                    .collect();
                // As the application would: the transaction updates its aggregates' rows
                // (locked, in key order) before enqueueing, so transactions on one aggregate
                // commit in the order of their outbox ids.
                let mut keys: Vec<String> = events.iter().map(|e| e.key().to_owned()).collect();
                keys.sort();
                keys.dedup();
                let mut tx = db.pool.begin().await.unwrap();
                for k in &keys {
                    sqlx::query(
                        "INSERT INTO aggs (key, n) VALUES ($1, 1) \
                         ON CONFLICT (key) DO UPDATE SET n = aggs.n + 1",
                    )
                    .bind(k)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
                let got = if n % 2 == 0 {
                    db.outbox.enqueue_batch(&mut tx, &events).await.unwrap()
                } else {
                    let mut got = Vec::new();
                    for e in &events {
                        got.push(db.outbox.enqueue(&mut tx, e).await.unwrap());
                    }
                    got
                };
                if n % 10 == 9 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    ids.extend(got);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ids
        }));
    }
    let mut aborted = 0;
    let chaos_until = Instant::now() + Duration::from_secs(4);
    let mut next = 4;
    while Instant::now() < chaos_until {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let victim = fastrand::usize(0..relays.len());
        if let Some(r) = relays[victim].take() {
            r.abort();
            aborted += 1;
        }
        relays[victim] = Some(start_relay(next).await);
        next += 1;
    }
    writing.store(false, Ordering::SeqCst);
    let mut committed = Vec::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    assert!(
        committed.len() > 500,
        "only {} events written",
        committed.len()
    );
    delivered
        .wait_for(&committed, Duration::from_secs(30))
        .await;
    wait_drained(&db.outbox, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = delivered.snapshot();
    let duplicates = check_delivery(&committed, &all);
    // An aborted relay can leave at most its claimed lanes' unmarked batches behind.
    assert!(
        duplicates <= aborted * 4 * 20,
        "{duplicates} duplicates from {aborted} aborts"
    );
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(effects as usize, committed.len(), "one effect per event");
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT message_id) FROM effects")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(distinct, effects);
    for r in relays.into_iter().flatten() {
        r.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    drop(publisher);
    consumer.await.unwrap();
    eprintln!(
        "{} events, {} deliveries, {duplicates} duplicates, {aborted} relays aborted",
        committed.len(),
        all.len()
    );
}

/// PostgreSQL restarted under two relays while a writer keeps writing: the relays reconnect
/// (the listener too) and every committed event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_survive_a_postgres_restart_and_lose_nothing() {
    let mut cluster = PostgresCluster::start(0).unwrap();
    let pool = pool_on(&cluster, 6).await;
    let outbox = outbox_on(&pool, 8).await;
    let db = Pg { pool, outbox };
    let (publisher, rx) = ChannelPublisher::new(100_000);
    let seen = Collected::spawn(rx);
    let mut relays = Vec::new();
    for _ in 0..2 {
        relays.push(
            Relay::builder(db.store(), publisher.clone())
                .poll_interval(Duration::from_millis(100))
                .build()
                .unwrap()
                .start()
                .await
                .unwrap(),
        );
    }
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let db = db.clone();
        let writing = Arc::clone(&writing);
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut n = 0;
            while writing.load(Ordering::SeqCst) {
                n += 1;
                // Writes fail while the server is down; only committed ones count.
                let Ok(mut tx) = db.pool.begin().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let Ok(id) = db
                    .outbox
                    .enqueue(&mut tx, &ev(&format!("k{}", n % 9), n))
                    .await
                else {
                    continue;
                };
                if tx.commit().await.is_ok() {
                    ids.push(id);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| cluster.restart(Node::Primary).unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writing.store(false, Ordering::SeqCst);
    let committed = writer.await.unwrap();
    seen.wait_for(&committed, Duration::from_secs(30)).await;
    // The restarted server's notifications reach the relays again: a fresh event arrives fast.
    let fresh = db.enqueue(vec![ev("after", 0)], false, true).await;
    let t = Instant::now();
    seen.wait_for(&fresh, Duration::from_secs(5)).await;
    eprintln!(
        "first event after the restart published in {:?}",
        t.elapsed()
    );
    let mut all = committed.clone();
    all.extend(fresh);
    check_delivery(&all, &seen.snapshot());
    for r in relays {
        r.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

/// PostgreSQL killed and not coming back: the relay reports store errors, does not spin or
/// panic, and still stops when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_postgres_is_reported_and_the_relay_still_stops() {
    let mut cluster = PostgresCluster::start(0).unwrap();
    let db = cluster.create_database().unwrap();
    // A short acquire timeout: each store call fails after it (the pool's own setting).
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(300))
        .connect(&db.primary_url)
        .await
        .unwrap();
    let outbox = outbox_on(&pool, 4).await;
    let (publisher, _rx) = ChannelPublisher::new(16);
    let relay = Relay::builder(outbox.clone(), publisher)
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    tokio::task::block_in_place(|| cluster.kill(Node::Primary).unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = relay.stats();
    assert!(s.store_errors >= 2, "{s:?}");
    // Backing off: not one error per poll interval (60 in 3 s).
    assert!(s.store_errors < 40, "{s:?}");
    assert!(outbox.stats().await.is_err());
    let t = Instant::now();
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
}

/// NOTIFY wakes an idle relay: with a 10 s poll interval, events still arrive in milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_relay() {
    let db = Pg::new(4).await;
    let (publisher, rx) = ChannelPublisher::new(1024);
    let seen = Collected::spawn(rx);
    let relay = Relay::builder(db.store(), publisher)
        .poll_interval(Duration::from_secs(10))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let ids = db.enqueue(vec![ev("k", i)], false, true).await;
        let t = Instant::now();
        seen.wait_for(&ids, Duration::from_secs(5)).await;
        worst = worst.max(t.elapsed());
    }
    assert!(worst < Duration::from_secs(1), "slowest {worst:?}");
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A relay asked to stop gives its lanes back: another relay takes over at once, not after the
/// lease (which is long here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_gives_its_lanes_back() {
    let db = Pg::new(4).await;
    let (publisher, rx) = ChannelPublisher::new(100_000);
    let seen = Collected::spawn(rx);
    let first = Relay::builder(db.store(), publisher.clone())
        .lease(Duration::from_secs(120))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let ids = db
        .enqueue(
            (0..3000).map(|i| ev(&format!("k{}", i % 50), i)).collect(),
            true,
            true,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    first.shutdown(Duration::from_secs(5)).await.unwrap();
    let second = Relay::builder(db.store(), publisher)
        .lease(Duration::from_secs(120))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    seen.wait_for(&ids, Duration::from_secs(10)).await;
    assert_eq!(check_delivery(&ids, &seen.snapshot()), 0);
    second.shutdown(Duration::from_secs(5)).await.unwrap();
    let owners: Vec<Option<String>> = sqlx::query_scalar("SELECT owner FROM shop.outbox_lanes")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(owners.iter().all(Option::is_none), "{owners:?}");
}

/// Every process of a fleet migrates when it starts: eight at once on a fresh database, three
/// times over, all succeed (the schema is created under an advisory lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_migrating_at_once_all_succeed() {
    for _ in 0..3 {
        let db = cluster().create_database().unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&db.primary_url)
                .await
                .unwrap();
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                let store = PgOutbox::new(
                    pool,
                    OutboxConfig::builder()
                        .namespace("shop")
                        .lanes(16)
                        .build()
                        .unwrap(),
                );
                barrier.wait().await;
                store.migrate().await.map_err(|e| e.to_string())
            }));
        }
        for t in tasks {
            let migrated = t.await.unwrap();
            assert!(migrated.is_ok(), "{migrated:?}");
        }
    }
}
