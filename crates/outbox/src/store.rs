//! The relay-side seam: claiming lanes, reading pending events, recording outcomes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::StoreError;
use crate::event::{Message, MessageId};

/// A lane held by one relay until `lease` runs out. Every write the relay makes for the lane
/// checks the claim's `token`, so a relay whose lease expired (and whose lane another relay now
/// holds) can no longer mark anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneClaim {
    /// Lane number.
    pub lane: u32,
    /// Fencing token: increases with every claim of the lane.
    pub token: i64,
}

/// A pending event as the relay reads it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Pending {
    /// The lane it belongs to.
    pub lane: u32,
    /// The event.
    pub message: Message,
    /// Whether its retry backoff has passed (database clock). An event that is not due blocks
    /// the later events of its key.
    pub due: bool,
    /// Time since it was enqueued, in microseconds (database clock).
    pub age_us: i64,
}

/// Which batch [`OutboxStore::mark_published`] should read next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    /// Read events after this id.
    pub after: MessageId,
    /// At most this many.
    pub limit: usize,
}

/// What [`OutboxStore::mark_published`] did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Marked {
    /// Lanes whose lease was still held (their events were marked).
    pub held: Vec<u32>,
    /// The next batch, when asked for.
    pub next: Vec<Pending>,
}

impl Marked {
    /// A result, for stores written outside this crate.
    pub fn new(held: Vec<u32>, next: Vec<Pending>) -> Self {
        Self { held, next }
    }
}

/// A dead-lettered event, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The event id.
    pub id: MessageId,
    /// Its ordering key.
    pub key: String,
    /// Its type.
    pub event_type: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last publish error.
    pub error: String,
}

/// The outcome of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Scheduled for another attempt.
    Retry,
    /// Dead-lettered: its key is unblocked.
    Dead,
    /// The lane's lease was lost: nothing recorded.
    LeaseLost,
}

/// What the outbox table holds, from the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Events waiting to be published (not dead).
    pub depth: u64,
    /// Age of the oldest pending event, in milliseconds (0 when none).
    pub oldest_pending_ms: u64,
    /// Dead-lettered events kept.
    pub dead_letters: u64,
}

/// Relay-side storage of an outbox: [`PgOutbox`](crate::PgOutbox) and
/// [`SqliteOutbox`](crate::SqliteOutbox) implement it. Writers use the stores' own `enqueue`
/// methods, which take the caller's connection.
pub trait OutboxStore: Send + Sync + 'static {
    /// Checks the schema is what this store expects (the lane count).
    fn check(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Claims up to `max` lanes that have pending events and whose lease has expired, least
    /// recently held first, for `lease`.
    fn claim_lanes(
        &self,
        owner: &str,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<LaneClaim>, StoreError>> + Send;

    /// Pending events of the held lanes in id order, starting after `after`.
    fn pending(
        &self,
        claims: &[LaneClaim],
        after: Option<MessageId>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Pending>, StoreError>> + Send;

    /// Marks events published and, with `lease`, renews the leases for that long, in one
    /// statement (`None`: the leases are checked, not renewed; the relay claimed them moments
    /// ago, and a check writes nothing); with `next`, the same statement also reads the
    /// following batch (pending events of the lanes still held, after `next.after`), so a busy
    /// relay makes one round trip per batch. Events of lanes whose lease was lost are not
    /// marked.
    fn mark_published(
        &self,
        claims: &[LaneClaim],
        ids: &[MessageId],
        lease: Option<Duration>,
        next: Option<Next>,
    ) -> impl Future<Output = Result<Marked, StoreError>> + Send;

    /// Records a failed attempt: retry after `retry_in`, or dead-letter once `max_attempts` is
    /// reached.
    fn mark_failed(
        &self,
        claim: LaneClaim,
        id: MessageId,
        error: &str,
        retry_in: Duration,
        max_attempts: u32,
    ) -> impl Future<Output = Result<Failure, StoreError>> + Send;

    /// Gives lanes back at once.
    fn release(&self, claims: &[LaneClaim]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Depth, oldest pending age and dead letters.
    fn stats(&self) -> impl Future<Output = Result<StoreStats, StoreError>> + Send;

    /// A signal the relay waits on between polls: notified when events may have been enqueued
    /// (PostgreSQL NOTIFY, an in-process signal on SQLite). The store keeps it going until the
    /// returned guard is dropped.
    fn wakeups(&self) -> impl Future<Output = Result<Wakeups, StoreError>> + Send;
}

/// Wake-ups for a relay, from [`OutboxStore::wakeups`].
#[derive(Debug)]
pub struct Wakeups {
    pub(crate) notify: Arc<Notify>,
    pub(crate) task: Option<tokio::task::JoinHandle<()>>,
}

impl Wakeups {
    /// Wake-ups driven by `notify`, with an optional task that feeds it (aborted on drop).
    pub fn new(notify: Arc<Notify>, task: Option<tokio::task::JoinHandle<()>>) -> Self {
        Self { notify, task }
    }
    /// Waits for the next wake-up.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) fn error_text(e: &str) -> String {
    // Bounded, whatever a publisher puts in its errors.
    const MAX: usize = 2000;
    if e.len() <= MAX {
        return e.to_owned();
    }
    let mut end = MAX;
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &e[..end])
}
