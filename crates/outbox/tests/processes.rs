//! The delivery guarantees checked from outside, across operating-system processes: relays run
//! as separate processes (this test binary started again with `OUTBOX_CHILD_RELAY` set) on one
//! PostgreSQL outbox, publishing to one Redis stream, and are killed with SIGKILL at random while
//! writers commit. Nothing a process holds survives its death: no destructor, no lease release,
//! no in-memory state. Afterwards a consumer group reads the stream through an inbox: every
//! committed event arrives, first deliveries keep per-key order, and the effects equal the
//! events exactly once.
//!
//! A test binary without the libtest harness, so that its `main` can be a relay.

use std::process::Child;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use sqlx::postgres::PgPoolOptions;
use stanchion_outbox::{
    Event, MessageId, OutboxConfig, PgInbox, PgOutbox, RedisStreamConsumer, RedisStreamPublisher,
    Relay,
};
use stanchion_testkit::{PostgresCluster, RedisServer, child};

const STREAM: &str = "shop-events";
const LANES: u32 = 8;

fn config() -> OutboxConfig {
    OutboxConfig::builder()
        .namespace("shop")
        .lanes(LANES)
        .build()
        .expect("config")
}

async fn manager(url: &str) -> ConnectionManager {
    let client = redis::Client::open(url).expect("redis url");
    ConnectionManager::new(client).await.expect("redis")
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match std::env::var("OUTBOX_CHILD_RELAY") {
        Ok(name) => rt.block_on(child_relay(name)),
        Err(_) => child::run_as_test("relays_in_processes_killed_at_random_lose_nothing", || {
            rt.block_on(relays_in_processes_killed_at_random_lose_nothing());
        }),
    }
}

/// A relay process: runs until killed, or until the test process is gone (its end of our
/// stdin closes), so that a failed run leaves no relay behind.
async fn child_relay(name: String) {
    child::exit_with_parent();
    let database = std::env::var("OUTBOX_CHILD_DATABASE").expect("database url");
    let redis_url = std::env::var("OUTBOX_CHILD_REDIS").expect("redis url");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&database)
        .await
        .expect("postgres");
    let store = PgOutbox::new(pool, config());
    let publisher = RedisStreamPublisher::new(manager(&redis_url).await, STREAM);
    let _relay = Relay::builder(store, publisher)
        .name(name)
        .batch_size(20)
        .lanes_per_turn(4)
        .batches_per_lane(3)
        .lease(Duration::from_millis(500))
        .publish_timeout(Duration::from_millis(200))
        .poll_interval(Duration::from_millis(50))
        .build()
        .expect("relay")
        .start()
        .await
        .expect("start");
    std::future::pending::<()>().await;
}

fn spawn_relay(n: usize, database: &str, redis_url: &str) -> Child {
    let name = format!("relay-{n}");
    child::spawn_self(&[
        ("OUTBOX_CHILD_RELAY", &name),
        ("OUTBOX_CHILD_DATABASE", database),
        ("OUTBOX_CHILD_REDIS", redis_url),
    ])
    .expect("spawn relay process")
}

async fn relays_in_processes_killed_at_random_lose_nothing() {
    let cluster = PostgresCluster::start(0).expect("postgres");
    let redis_server = RedisServer::start().expect("redis");
    let db = cluster.create_database().expect("database");
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&db.primary_url)
        .await
        .expect("pool");
    let outbox = PgOutbox::new(pool.clone(), config());
    outbox.migrate().await.expect("migrate");
    sqlx::raw_sql("CREATE TABLE effects (dedup_id text PRIMARY KEY)")
        .execute(&pool)
        .await
        .expect("effects table");

    let mut relays: Vec<Child> = (0..3)
        .map(|n| spawn_relay(n, &db.primary_url, &redis_server.url()))
        .collect();
    let mut spawned = relays.len();

    // Writers commit events on 30 keys (and roll some back) while relays are killed.
    let writing_until = Instant::now() + Duration::from_secs(5);
    let mut writers = Vec::new();
    for w in 0..2usize {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut n = 0usize;
            while Instant::now() < writing_until {
                let events: Vec<Event> = (0..1 + n % 3)
                    .map(|i| {
                        let key = format!("agg{}", (w * 11 + n + i) % 30);
                        Event::json(&key, "test.event", &serde_json::json!({ "w": w, "n": n }))
                            .expect("event")
                    })
                    .collect();
                let mut tx = pool.begin().await.expect("begin");
                let ids = outbox
                    .enqueue_batch(&mut tx, &events)
                    .await
                    .expect("enqueue");
                if n % 10 == 9 {
                    tx.rollback().await.expect("rollback");
                } else {
                    tx.commit().await.expect("commit");
                    committed.extend(ids);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            committed
        }));
    }
    let mut killed = 0;
    while Instant::now() < writing_until {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let victim = fastrand::usize(0..relays.len());
        for r in &mut relays {
            assert!(
                r.try_wait().expect("status").is_none(),
                "a relay process exited on its own"
            );
        }
        relays[victim].kill().expect("SIGKILL");
        relays[victim].wait().expect("reap");
        killed += 1;
        relays[victim] = spawn_relay(spawned, &db.primary_url, &redis_server.url());
        spawned += 1;
    }
    let mut committed: Vec<MessageId> = Vec::new();
    for w in writers {
        committed.extend(w.await.expect("writer"));
    }

    // The surviving relays drain the outbox.
    let drained_by = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = stanchion_outbox::OutboxStore::stats(&outbox)
            .await
            .expect("stats");
        if stats.depth == 0 {
            break;
        }
        assert!(Instant::now() < drained_by, "not drained: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for mut r in relays {
        r.kill().expect("SIGKILL");
        r.wait().expect("reap");
    }

    // A consumer group reads the stream from the start; effects go through the inbox.
    let consumer =
        RedisStreamConsumer::new(manager(&redis_server.url()).await, STREAM, "indexer", "c1");
    consumer.ensure_group().await.expect("group");
    let inbox = PgInbox::new(outbox.config());
    let mut delivered: Vec<(MessageId, String)> = Vec::new();
    loop {
        let batch = consumer.read(500, None).await.expect("read");
        if batch.is_empty() {
            break;
        }
        let mut acks = Vec::new();
        for d in batch {
            let m = d.message.expect("every entry is a message");
            let mut tx = pool.begin().await.expect("begin");
            if inbox
                .first_delivery(&mut tx, "indexer", &d.dedup_id)
                .await
                .expect("inbox")
            {
                sqlx::query("INSERT INTO effects VALUES ($1)")
                    .bind(&d.dedup_id)
                    .execute(&mut *tx)
                    .await
                    .expect("effect");
            }
            tx.commit().await.expect("commit");
            acks.push(d.entry_id);
            delivered.push((m.id, m.key.clone()));
        }
        consumer.ack(&acks).await.expect("ack");
    }

    // Every committed event delivered, nothing else; first deliveries in id order per key.
    let committed_set: std::collections::HashSet<MessageId> = committed.iter().copied().collect();
    let mut first = std::collections::HashSet::new();
    let mut per_key: std::collections::BTreeMap<String, Vec<MessageId>> = Default::default();
    let mut duplicates = 0;
    for (id, key) in &delivered {
        assert!(
            committed_set.contains(id),
            "event {id} was published but its transaction rolled back"
        );
        if first.insert(*id) {
            per_key.entry(key.clone()).or_default().push(*id);
        } else {
            duplicates += 1;
        }
    }
    let missing = committed.iter().filter(|id| !first.contains(id)).count();
    assert_eq!(missing, 0, "{missing} committed events never published");
    for (key, ids) in &per_key {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "key {key}: first deliveries out of order"
        );
    }
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(&pool)
        .await
        .expect("count");
    println!(
        "{} events committed, {} deliveries ({duplicates} duplicates), {killed} relay processes \
         killed (SIGKILL), {effects} effects",
        committed.len(),
        delivered.len()
    );
    assert!(killed >= 5, "the run killed {killed} relays");
    assert_eq!(
        usize::try_from(effects).expect("count"),
        committed.len(),
        "the inbox makes each event's effect happen once"
    );
}
