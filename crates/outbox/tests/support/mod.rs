//! Shared helpers: a collector of published messages and the checks every delivery test makes.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stanchion_outbox::{Message, MessageId, PublishError, Publisher};
use tokio::sync::mpsc;

/// Everything a channel delivered, in delivery order.
#[derive(Clone, Default)]
pub struct Collected(pub Arc<Mutex<Vec<Message>>>);

impl Collected {
    /// Drains `rx` into the collection in the background.
    pub fn spawn(mut rx: mpsc::Receiver<Message>) -> Self {
        let c = Self::default();
        let inner = Arc::clone(&c.0);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                inner.lock().unwrap().push(m);
            }
        });
        c
    }
    pub fn snapshot(&self) -> Vec<Message> {
        self.0.lock().unwrap().clone()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    /// Waits until every id in `ids` has been delivered at least once.
    pub async fn wait_for(&self, ids: &[MessageId], timeout: Duration) {
        let start = Instant::now();
        loop {
            let seen: std::collections::HashSet<MessageId> =
                self.snapshot().iter().map(|m| m.id).collect();
            let missing = ids.iter().filter(|i| !seen.contains(i)).count();
            if missing == 0 {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{missing} of {} events not delivered after {timeout:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Checks delivery: every committed id delivered, nothing else delivered, and per key the first
/// deliveries in increasing id order. Returns the number of duplicate deliveries.
pub fn check_delivery(committed: &[MessageId], delivered: &[Message]) -> usize {
    let committed_set: std::collections::HashSet<MessageId> = committed.iter().copied().collect();
    let mut first: HashMap<MessageId, usize> = HashMap::new();
    let mut per_key: BTreeMap<String, Vec<MessageId>> = BTreeMap::new();
    let mut duplicates = 0;
    for (i, m) in delivered.iter().enumerate() {
        assert!(
            committed_set.contains(&m.id),
            "message {} was delivered but its transaction did not commit",
            m.id
        );
        if first.insert(m.id, i).is_some() {
            duplicates += 1;
        } else {
            per_key.entry(m.key.clone()).or_default().push(m.id);
        }
    }
    for id in committed {
        assert!(
            first.contains_key(id),
            "committed event {id} was never delivered"
        );
    }
    for (key, ids) in &per_key {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "key {key}: first deliveries out of order: {ids:?}"
        );
    }
    duplicates
}

/// A publisher that rejects every event whose type is `poison`, and otherwise forwards.
pub struct RejectPoison<P>(pub P);

impl<P: Publisher> Publisher for RejectPoison<P> {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        let good: Vec<Message> = batch
            .iter()
            .filter(|m| m.event_type != "poison")
            .cloned()
            .collect();
        let mut forwarded = self.0.publish(&good).await.into_iter();
        batch
            .iter()
            .map(|m| {
                if m.event_type == "poison" {
                    Err(PublishError::rejected("poison is refused by the broker"))
                } else {
                    forwarded
                        .next()
                        .unwrap_or_else(|| Err(PublishError::unavailable("missing")))
                }
            })
            .collect()
    }
}

/// A publisher that can be switched to "broker down".
#[derive(Clone)]
pub struct Switchable<P> {
    pub inner: P,
    pub down: Arc<std::sync::atomic::AtomicBool>,
}

impl<P: Publisher + Clone> Publisher for Switchable<P> {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return batch
                .iter()
                .map(|_| Err(PublishError::unavailable("switched off")))
                .collect();
        }
        self.inner.publish(batch).await
    }
}

use stanchion_outbox::{ChannelPublisher, Event, OutboxStore, Relay, StoreStats};

/// What the generic delivery tests need from a database.
pub trait Db: Clone + Send + Sync + 'static {
    type Store: OutboxStore + Clone;
    fn store(&self) -> Self::Store;
    /// Enqueues `events` in one transaction (batch or one by one), commits or rolls back;
    /// returns the ids when committed.
    fn enqueue(
        &self,
        events: Vec<Event>,
        batch: bool,
        commit: bool,
    ) -> impl std::future::Future<Output = Vec<MessageId>> + Send;
    fn dead_letters(
        &self,
    ) -> impl std::future::Future<Output = Vec<stanchion_outbox::DeadLetter>> + Send;
    fn requeue(&self, ids: Vec<MessageId>) -> impl std::future::Future<Output = u64> + Send;
    fn purge_dead(&self, ids: Vec<MessageId>) -> impl std::future::Future<Output = u64> + Send;
    fn purge_published(&self) -> impl std::future::Future<Output = u64> + Send;
    /// Whether the outbox keeps published rows (or deletes them as they are published).
    fn keeps_published(&self) -> bool;
}

pub fn ev(key: &str, n: usize) -> Event {
    Event::json(
        key,
        "test.event",
        &serde_json::json!({ "key": key, "n": n }),
    )
    .unwrap()
    .with_trace_context(format!("00-{:032x}-{:016x}-01", n + 1, n + 1))
}

pub async fn wait_drained<S: OutboxStore>(store: &S, timeout: Duration) -> StoreStats {
    let start = Instant::now();
    loop {
        let s = store.stats().await.unwrap();
        if s.depth == 0 {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "not drained after {timeout:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Commits, rolls back, batches: exactly the committed events arrive, in per-key order, once,
/// with their headers, and the store drains.
pub async fn delivers_committed_events_once_in_key_order<D: Db>(db: D) {
    let (publisher, rx) = ChannelPublisher::new(1024);
    let seen = Collected::spawn(rx);
    let relay = Relay::builder(db.store(), publisher)
        .batch_size(50)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut committed = Vec::new();
    for round in 0..40 {
        let events: Vec<Event> = (0..5)
            .map(|i| ev(&format!("k{}", (round + i) % 7), round * 5 + i))
            .collect();
        let commit = round % 4 != 3;
        let ids = db.enqueue(events, round % 2 == 0, commit).await;
        if commit {
            assert_eq!(ids.len(), 5);
            committed.extend(ids);
        } else {
            assert!(ids.is_empty());
        }
    }
    seen.wait_for(&committed, Duration::from_secs(20)).await;
    let stats = wait_drained(&db.store(), Duration::from_secs(10)).await;
    assert_eq!(stats.dead_letters, 0);
    // Give a stray duplicate or a rolled-back event time to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered = seen.snapshot();
    let duplicates = check_delivery(&committed, &delivered);
    assert_eq!(
        duplicates, 0,
        "no relay died, so nothing is published twice"
    );
    assert_eq!(delivered.len(), committed.len());
    let m = &delivered[0];
    assert!(
        m.headers
            .get("traceparent")
            .is_some_and(|t| t.starts_with("00-"))
    );
    let payload: serde_json::Value = m.json().unwrap();
    assert_eq!(payload["key"], serde_json::Value::String(m.key.clone()));
    let rs = relay.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(rs.published, committed.len() as u64);
    assert!(rs.latency_p99_us > 0 && rs.latency_max_us >= rs.latency_p99_us);
    // Kept, every published row is there to purge; deleted on publish, none is left.
    let expected = if db.keeps_published() {
        committed.len() as u64
    } else {
        0
    };
    assert_eq!(db.purge_published().await, expected);
}

/// A rejected event is retried with backoff, dead-lettered after `max_attempts`, holds back the
/// later events of its key until then (and only those), and can be requeued or purged.
pub async fn a_poison_event_dead_letters_without_blocking_other_keys<D: Db>(db: D) {
    let (publisher, rx) = ChannelPublisher::new(1024);
    let seen = Collected::spawn(rx);
    let relay = Relay::builder(db.store(), RejectPoison(publisher))
        .max_attempts(3)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(50))
        .poll_interval(Duration::from_millis(30))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let before = db.enqueue(vec![ev("victim", 0)], false, true).await;
    let poison = db
        .enqueue(
            vec![Event::new("victim", "poison", b"{}".to_vec())],
            false,
            true,
        )
        .await;
    let after = db.enqueue(vec![ev("victim", 2)], false, true).await;
    let others: Vec<MessageId> = db
        .enqueue(
            (0..20).map(|i| ev(&format!("other{i}"), i)).collect(),
            true,
            true,
        )
        .await;
    // Other keys flow while the poison event is still being retried.
    seen.wait_for(&others, Duration::from_secs(10)).await;
    seen.wait_for(&before, Duration::from_secs(10)).await;
    seen.wait_for(&after, Duration::from_secs(20)).await;
    let delivered = seen.snapshot();
    let pos = |id: MessageId| delivered.iter().position(|m| m.id == id).unwrap();
    assert!(pos(before[0]) < pos(after[0]));
    assert!(!delivered.iter().any(|m| m.id == poison[0]));
    let dead = db.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id, poison[0]);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].error.contains("poison is refused"),
        "{}",
        dead[0].error
    );
    let stats = relay.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.failed_attempts, 3);
    assert_eq!(db.store().stats().await.unwrap().dead_letters, 1);
    // Requeued, it is tried again (and dead-letters again); purged, it is gone.
    assert_eq!(db.requeue(poison.clone()).await, 1);
    assert_eq!(db.store().stats().await.unwrap().depth, 1);
    assert_eq!(db.requeue(poison.clone()).await, 0, "no longer dead");
    let relay = Relay::builder(db.store(), RejectPoison(ChannelPublisher::new(8).0))
        .max_attempts(1)
        .poll_interval(Duration::from_millis(30))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let start = Instant::now();
    while db.dead_letters().await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(db.purge_dead(poison).await, 1);
    assert!(db.dead_letters().await.is_empty());
}

/// A broker that is down: events wait (no attempt counted, nothing dead-lettered), then all
/// drain in order once it is back.
pub async fn a_broker_outage_holds_events_and_loses_none<D: Db>(db: D) {
    let (publisher, rx) = ChannelPublisher::new(4096);
    let seen = Collected::spawn(rx);
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let relay = Relay::builder(
        db.store(),
        Switchable {
            inner: publisher,
            down: Arc::clone(&down),
        },
    )
    .max_attempts(2)
    .unavailable_backoff(Duration::from_millis(100))
    .build()
    .unwrap()
    .start()
    .await
    .unwrap();
    let mut committed = Vec::new();
    for i in 0..30 {
        committed.extend(
            db.enqueue(vec![ev(&format!("k{}", i % 5), i)], false, true)
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = db.store().stats().await.unwrap();
    assert_eq!(during.depth, 30);
    assert_eq!(during.dead_letters, 0, "an outage is not the events' fault");
    assert!(relay.stats().unavailable > 0);
    assert_eq!(seen.len(), 0);
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    seen.wait_for(&committed, Duration::from_secs(10)).await;
    assert_eq!(check_delivery(&committed, &seen.snapshot()), 0);
    let s = relay.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(s.failed_attempts, 0);
}

/// Bad input is refused before any SQL runs, and the transaction stays usable.
pub fn bad_events() -> Vec<(Event, &'static str)> {
    vec![
        (Event::new("k", "", b"{}".to_vec()), "event_type"),
        (Event::new("k".repeat(1025), "t", b"{}".to_vec()), "key"),
        (Event::new("k", "t", vec![b'x'; 2 << 20]), "over the limit"),
    ]
}

/// Lanes whose every event waits for a retry do not stand in front of the others: with two
/// lanes claimed per turn and both lowest lanes holding a rejected event in a long backoff, an
/// event on a third lane is published at once (claims go to the lanes held least recently).
/// The outbox has 4 lanes.
pub async fn lanes_waiting_for_a_retry_do_not_starve_the_others<D: Db>(db: D) {
    let config = stanchion_outbox::OutboxConfig::builder()
        .lanes(4)
        .build()
        .unwrap();
    let key_in = |lane: u32| {
        (0..)
            .map(|i| format!("key{i}"))
            .find(|k| config.lane_of(k) == lane)
            .unwrap()
    };
    let (a, b, healthy) = (key_in(0), key_in(1), key_in(3));
    let (publisher, rx) = ChannelPublisher::new(1024);
    let seen = Collected::spawn(rx);
    let relay = Relay::builder(db.store(), RejectPoison(publisher))
        .lanes_per_turn(2)
        .concurrency(1)
        .max_attempts(50)
        .retry_backoff(Duration::from_secs(3), Duration::from_secs(3))
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    db.enqueue(
        vec![
            Event::new(a.as_str(), "poison", b"{}".to_vec()),
            Event::new(b.as_str(), "poison", b"{}".to_vec()),
        ],
        true,
        true,
    )
    .await;
    let start = Instant::now();
    while relay.stats().failed_attempts < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "poison never tried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ids = db.enqueue(vec![ev(&healthy, 0)], false, true).await;
    let start = Instant::now();
    seen.wait_for(&ids, Duration::from_secs(10)).await;
    let took = start.elapsed();
    // Well inside the poison events' 3 s backoff: the healthy lane was claimed at once.
    assert!(
        took < Duration::from_millis(1500),
        "published after {took:?}"
    );
    relay.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Relays claim a fair share of the lanes: a relay alone takes every lane with events, one
/// that finds others holding lanes takes the lanes over the relays, rounded up. (Needs an
/// outbox of 12 lanes.)
pub async fn relays_claim_a_fair_share_of_the_lanes<D: Db>(db: D) {
    let config = stanchion_outbox::OutboxConfig::builder()
        .lanes(12)
        .build()
        .unwrap();
    let events: Vec<Event> = (0..12)
        .map(|lane| {
            let key = (0..)
                .map(|i| format!("key{i}"))
                .find(|k| config.lane_of(k) == lane)
                .unwrap();
            ev(&key, lane as usize)
        })
        .collect();
    db.enqueue(events, true, true).await;
    let store = db.store();
    let lease = Duration::from_secs(30);
    let claim = |owner: &'static str, max: usize| {
        let store = store.clone();
        async move { store.claim_lanes(owner, max, lease).await.unwrap() }
    };
    let alone = claim("a", 1_000).await;
    assert_eq!(alone.len(), 12, "a relay alone takes every lane");
    store.release(&alone).await.unwrap();
    let b = claim("b", 2).await;
    assert_eq!(b.len(), 2, "the cap holds");
    let a = claim("a", 1_000).await;
    assert_eq!(a.len(), 6, "b holds lanes: a takes 12 / 2");
    let c = claim("c", 1_000).await;
    assert_eq!(c.len(), 4, "a and b hold lanes: c takes 12 / 3");
    let d = claim("d", 1_000).await;
    assert_eq!(d.len(), 0, "nothing left");
    store.release(&a).await.unwrap();
    let d = claim("d", 1_000).await;
    assert_eq!(
        d.len(),
        4,
        "b and c hold lanes: d takes 12 / 3 of the 6 free"
    );
    // Claims never overlap.
    let mut all: Vec<u32> = b.iter().chain(&c).chain(&d).map(|l| l.lane).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 10);
}

/// A publisher that takes `delay` per batch.
#[derive(Clone)]
pub struct Slow<P> {
    pub inner: P,
    pub delay: Duration,
}

impl<P: Publisher + Clone> Publisher for Slow<P> {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<(), PublishError>> {
        tokio::time::sleep(self.delay).await;
        self.inner.publish(batch).await
    }
}

/// A turn that lasts several leases keeps its lane (the relay renews as it goes): a second
/// relay polling all along never takes the lane, and nothing is published twice. (Needs an
/// outbox of 1 lane.)
pub async fn a_long_turn_keeps_its_lanes<D: Db>(db: D) {
    // Ten keys: a batch of 10 is one publish call of 10.
    let events: Vec<Event> = (0..240).map(|n| ev(&format!("k{}", n % 10), n)).collect();
    let ids = db.enqueue(events, true, true).await;
    let (publisher, rx) = ChannelPublisher::new(4096);
    let seen = Collected::spawn(rx);
    let relay = |poll: Duration| {
        Relay::builder(
            db.store(),
            Slow {
                inner: publisher.clone(),
                delay: Duration::from_millis(25),
            },
        )
        .batch_size(10)
        .batches_per_lane(100)
        .concurrency(1)
        .lease(Duration::from_millis(300))
        .publish_timeout(Duration::from_millis(150))
        .poll_interval(poll)
        .build()
        .unwrap()
    };
    let first = relay(Duration::from_millis(20)).start().await.unwrap();
    // The first relay's turn is under way (24 batches of 25 ms: about two leases).
    let start = Instant::now();
    while first.stats().published == 0 {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = relay(Duration::from_millis(10)).start().await.unwrap();
    seen.wait_for(&ids, Duration::from_secs(20)).await;
    let duplicates = check_delivery(&ids, &seen.snapshot());
    let (a, b) = (first.stats(), second.stats());
    assert_eq!(duplicates, 0, "first {a:?}, second {b:?}");
    assert_eq!(
        b.published, 0,
        "the second relay never held the lane: {b:?}"
    );
    first.shutdown(Duration::from_secs(5)).await.unwrap();
    second.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A Redis connection that gives up quickly (no retries), as a relay's publisher should.
pub async fn manager(url: &str) -> redis::aio::ConnectionManager {
    stanchion_testkit::connection_manager(url).await.unwrap()
}
