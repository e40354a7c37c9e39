//! The router: node state, routing of reads and writes, tokens. The builder, the read
//! connection, the health checker and failover live in their own modules.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::Transaction;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, Postgres};

use crate::builder::{Config, MAX_DURATION, ReplicaRouterBuilder};
use crate::conn::{InFlight, ReadConn};
use crate::error::{RouteError, is_connection_error};
use crate::health::{Samples, insert_position};
use crate::policy::{ReplicaPolicy, ReplicaSet};
use crate::replayed::acquire_noting_birth;
use crate::token::{Lsn, SessionToken, WriteToken};

/// Most nodes a router manages.
pub const MAX_NODES: usize = 64;
pub(crate) const UNKNOWN: u64 = u64::MAX;

/// How fresh a read must be.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Consistency<'a> {
    /// Any healthy replica (within the router's lag thresholds).
    Any,
    /// A healthy replica whose measured replay lag is at most this.
    MaxStaleness(Duration),
    /// A node that has replayed past this write: the read sees it (read-your-writes).
    AtLeast(WriteToken),
    /// Monotonic reads for a session: at least the session's position, which the read then
    /// moves forward to what it saw.
    Session(&'a SessionToken),
    /// The primary, for reads that must see everything now.
    Primary,
    /// The primary if the caller wrote less than `window` ago, any replica otherwise. Rails'
    /// approach: weaker than tokens, since a replica can lag longer than any window.
    AfterWrite {
        /// When the caller last wrote.
        at: Instant,
        /// How long after a write reads go to the primary.
        window: Duration,
    },
}

/// Where reads go when no replica is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fallback {
    /// Read from the primary (default).
    #[default]
    Primary,
    /// Fail with [`RouteError::NoReplica`] or [`RouteError::TokenTimeout`].
    Error,
}

/// The role a node plays now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Takes writes.
    Primary,
    /// Serves reads.
    Replica,
}

/// Where a read went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The node's configured name.
    pub node: String,
    /// Its role.
    pub role: Role,
    /// Whether this read fell back to the primary.
    pub fallback: bool,
}

/// A snapshot of one node, for health endpoints and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStatus {
    /// The configured name.
    pub name: String,
    /// Its role now.
    pub role: Role,
    /// Whether reads may go to it (replicas only).
    pub admitted: bool,
    /// Replay lag behind the primary in bytes, if known.
    pub lag_bytes: Option<u64>,
    /// Replay lag in time, if known.
    pub lag: Option<Duration>,
    /// Reads in flight.
    pub in_flight: u32,
    /// The primary did not answer the last health round (killed, hung, or slower than the
    /// probe timeout): writes fail fast with [`RouteError::PrimaryUnavailable`], reads keep going
    /// to admitted replicas, and replica lag is measured from the primary's last known position.
    pub primary_unreachable: bool,
}

/// Counts of token reads by how they were routed (see [`ReplicaRouter::token_reads`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TokenReads {
    /// Routed to a connection older than a reading of its replica's replay position that
    /// covers the token: no check query.
    pub known: u64,
    /// Connections on which `pg_last_wal_replay_lsn()` was asked first (the replica was not
    /// known to be far enough, or the connection is newer than the last reading).
    pub checked: u64,
}

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) weight: u32,
    pub(crate) options: PgConnectOptions,
    /// Sessions with `default_transaction_read_only = on`: a write sent to the read side fails.
    pub(crate) read_pool: PgPool,
    pub(crate) write_pool: RwLock<PgPool>,
    pub(crate) probe_pool: PgPool,
    pub(crate) admitted: AtomicBool,
    pub(crate) seen: AtomicBool,
    pub(crate) ejected_at_ms: AtomicU64,
    pub(crate) ok_streak: AtomicU32,
    pub(crate) in_flight: AtomicU32,
    pub(crate) latency_us: AtomicU64,
    /// Its last replay position read, and when (see `replayed.rs`).
    pub(crate) replayed: std::sync::Mutex<crate::replayed::Replayed>,
    /// The node's timeline as the last probe saw it (0: unknown).
    pub(crate) timeline: AtomicU32,
    pub(crate) lag_bytes: AtomicU64,
    pub(crate) lag_ms: AtomicU64,
}

pub(crate) struct Inner {
    pub(crate) nodes: Vec<Node>,
    pub(crate) primary: AtomicUsize,
    pub(crate) primary_lsn: AtomicU64,
    pub(crate) policy: Box<dyn ReplicaPolicy>,
    pub(crate) config: Config,
    pub(crate) start: Instant,
    pub(crate) failover: tokio::sync::Mutex<()>,
    /// A primary search is running or queued: failed writes start at most one.
    pub(crate) searching: AtomicBool,
    /// Primary searches started, for tests and dashboards.
    pub(crate) searches: AtomicU64,
    /// Token reads routed on a known replay position, and token reads that asked the replica.
    pub(crate) token_reads_known: AtomicU64,
    pub(crate) token_reads_checked: AtomicU64,
    /// The primary answered the last health round (see [`NodeStatus::primary_unreachable`]).
    pub(crate) primary_up: AtomicBool,
    pub(crate) samples: std::sync::Mutex<Samples>,
    /// The newest timeline any primary was seen on. A node that claims to be primary on an older
    /// one (an old primary back without a rewind) is fenced.
    pub(crate) timeline: AtomicU32,
    pub(crate) stop: tokio::sync::watch::Sender<bool>,
    pub(crate) pool: PgPoolOptions,
}

/// Routes reads to PostgreSQL streaming replicas and writes to the primary, over sqlx pools.
/// Cheap to clone; clones share pools and health state. The background checker stops when the
/// last clone is dropped or [`close`](Self::close) is called.
///
/// ```no_run
/// use stanchion_replica_router::{Consistency, ReplicaRouter};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let router = ReplicaRouter::builder()
///     .primary("primary", "postgres://app:secret@db-primary/shop")
///     .replica("replica-a", "postgres://app:secret@db-replica-a/shop")
///     .replica("replica-b", "postgres://app:secret@db-replica-b/shop")
///     .build()
///     .await?;
///
/// let mut tx = router.begin_write().await?;
/// sqlx::query("UPDATE products SET stock = stock - 1 WHERE id = 7").execute(&mut *tx).await?;
/// let token = router.commit(tx).await?; // send it to the client: cookie, header, event
///
/// let mut read = router.read(Consistency::AtLeast(token)).await?;
/// let stock: i32 = sqlx::query_scalar("SELECT stock FROM products WHERE id = 7")
///     .fetch_one(&mut *read)
///     .await?;
/// # let _ = stock;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ReplicaRouter {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for ReplicaRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaRouter")
            .field("nodes", &self.status())
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// The replicas as a policy sees them for one read.
struct View<'a> {
    inner: &'a Inner,
    primary: usize,
    skip: u64,
    max_lag_ms: u64,
}

impl ReplicaSet for View<'_> {
    fn len(&self) -> usize {
        self.inner.nodes.len()
    }
    #[inline]
    fn eligible(&self, i: usize) -> bool {
        let n = &self.inner.nodes[i];
        i != self.primary
            && self.skip & (1 << i) == 0
            && n.admitted.load(Ordering::Relaxed)
            && (self.max_lag_ms == UNKNOWN || n.lag_ms.load(Ordering::Relaxed) <= self.max_lag_ms)
    }
    fn in_flight(&self, i: usize) -> u32 {
        self.inner.nodes[i].in_flight.load(Ordering::Relaxed)
    }
    fn latency_us(&self, i: usize) -> u64 {
        self.inner.nodes[i].latency_us.load(Ordering::Relaxed)
    }
    fn weight(&self, i: usize) -> u32 {
        self.inner.nodes[i].weight
    }
}

impl ReplicaRouter {
    /// Settings.
    pub fn builder() -> ReplicaRouterBuilder {
        ReplicaRouterBuilder::default()
    }

    /// The current primary's pool, for writes outside [`begin_write`](Self::begin_write).
    pub fn primary_pool(&self) -> PgPool {
        let p = self.inner.primary.load(Ordering::Acquire);
        self.inner.write_pool(p)
    }

    /// The current primary's name.
    pub fn primary_name(&self) -> &str {
        &self.inner.nodes[self.inner.primary.load(Ordering::Acquire)].name
    }

    /// Begins a transaction on the primary.
    ///
    /// # Errors
    /// [`RouteError::PrimaryUnavailable`] at once while the primary did not answer the last
    /// health round (no wait on a dead primary's pool); [`RouteError::ReadOnly`] when the node
    /// is no longer the primary; [`RouteError::Database`] otherwise.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, RouteError> {
        let p = self.inner.writable_primary()?;
        let result = self.inner.write_pool(p).begin().await;
        result.map_err(|e| self.inner.write_failed(p, e))
    }

    /// Commits `tx` and returns the token of its write.
    pub async fn commit(
        &self,
        tx: Transaction<'static, Postgres>,
    ) -> Result<WriteToken, RouteError> {
        let p = self.inner.primary.load(Ordering::Acquire);
        tx.commit()
            .await
            .map_err(|e| self.inner.write_failed(p, e))?;
        self.write_token().await
    }

    /// A token for everything committed on the primary so far (after writes made through
    /// [`primary_pool`](Self::primary_pool)).
    ///
    /// The position is the primary's WAL *insert* position, not its write position: with
    /// `synchronous_commit = off` a commit returns once its record is inserted, before it is
    /// written, so `pg_current_wal_lsn()` can still be behind the commit.
    pub async fn write_token(&self) -> Result<WriteToken, RouteError> {
        let p = self.inner.writable_primary()?;
        let token = insert_position(&self.inner.write_pool(p), &self.inner.nodes[p].name)
            .await
            .map_err(|e| match e {
                RouteError::Database { source, .. } => self.inner.write_failed(p, source),
                other => other,
            })?;
        let lsn = token.lsn();
        if let Some(t) = token.timeline() {
            self.inner.timeline.fetch_max(t, Ordering::AcqRel);
        }
        self.inner.primary_lsn.fetch_max(lsn.0, Ordering::AcqRel);
        Ok(token)
    }

    /// A connection for a read of the given freshness.
    pub async fn read(&self, consistency: Consistency<'_>) -> Result<ReadConn, RouteError> {
        match consistency {
            Consistency::Primary => self.read_primary(false).await,
            Consistency::AfterWrite { at, window } if at.elapsed() < window => {
                self.read_primary(false).await
            }
            Consistency::Any | Consistency::AfterWrite { .. } => self.read_replica(UNKNOWN).await,
            Consistency::MaxStaleness(d) => {
                self.read_replica(u64::try_from(d.as_millis()).unwrap_or(UNKNOWN - 1))
                    .await
            }
            Consistency::AtLeast(token) => self.read_token(token, None).await,
            Consistency::Session(session) => self.read_token(session.token(), Some(session)).await,
        }
    }

    /// Which replica a read of this freshness would go to now (no I/O); `None` means the
    /// primary or an error, per the fallback. For dashboards and benchmarks.
    pub fn select(&self, consistency: Consistency<'_>) -> Option<&str> {
        let max_lag = match consistency {
            Consistency::MaxStaleness(d) => u64::try_from(d.as_millis()).unwrap_or(UNKNOWN - 1),
            _ => UNKNOWN,
        };
        let view = self.view(0, max_lag);
        let i = self.inner.policy.pick(&view)?;
        Some(&self.inner.nodes[i].name)
    }

    fn view(&self, skip: u64, max_lag_ms: u64) -> View<'_> {
        View {
            inner: &self.inner,
            primary: self.inner.primary.load(Ordering::Acquire),
            skip,
            max_lag_ms,
        }
    }

    async fn acquire(&self, i: usize, fallback: bool) -> Result<ReadConn, RouteError> {
        self.acquire_aged(i, fallback).await.map(|(conn, _)| conn)
    }

    /// A read connection on node `i` and, for a reused one, when it was opened.
    async fn acquire_aged(
        &self,
        i: usize,
        fallback: bool,
    ) -> Result<(ReadConn, Option<Instant>), RouteError> {
        let inner = &self.inner;
        let node = &inner.nodes[i];
        node.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight {
            inner: Arc::clone(inner),
            index: i,
            since: Instant::now(),
        };
        let (conn, born) = acquire_noting_birth(&node.read_pool).await;
        let conn = conn.map_err(|e| RouteError::db(&node.name, e))?;
        let role = if i == inner.primary.load(Ordering::Acquire) {
            Role::Primary
        } else {
            Role::Replica
        };
        let conn = ReadConn {
            conn,
            route: Route {
                node: node.name.clone(),
                role,
                fallback,
            },
            guard,
        };
        Ok((conn, born))
    }

    async fn read_primary(&self, fallback: bool) -> Result<ReadConn, RouteError> {
        let p = self.inner.writable_primary()?;
        self.acquire(p, fallback).await
    }

    async fn read_replica(&self, max_lag_ms: u64) -> Result<ReadConn, RouteError> {
        let mut skip = 0u64;
        while let Some(i) = self.inner.policy.pick(&self.view(skip, max_lag_ms)) {
            match self.acquire(i, false).await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    if e.is_node_failure() {
                        self.inner.eject(i, "connection failed");
                    }
                    tracing::debug!(error = %e, "replica read failed over to another node");
                    skip |= 1 << i;
                }
            }
        }
        match self.inner.config.no_replica {
            Fallback::Primary => self.read_primary(true).await,
            Fallback::Error => Err(RouteError::NoReplica),
        }
    }

    async fn read_token(
        &self,
        token: WriteToken,
        session: Option<&SessionToken>,
    ) -> Result<ReadConn, RouteError> {
        let inner = &self.inner;
        let start = Instant::now();
        // `token_wait` is at most a day (checked at build); saturate all the same.
        let deadline = start
            .checked_add(inner.config.token_wait)
            .unwrap_or(start + MAX_DURATION);
        // A token without a timeline (`w1:`) is taken to be on the newest timeline known.
        let timeline = token
            .timeline()
            .unwrap_or_else(|| inner.timeline.load(Ordering::Acquire));
        let mut failed = 0u64;
        let mut checked_primary = false;
        loop {
            // Nodes on an older timeline (or an unknown one) cannot be shown to have the write:
            // their positions belong to another history.
            let mut tried = failed | inner.older_than(timeline);
            // Replicas last read at or past the token first: on a connection older than that
            // reading, the read needs no question to the replica (see `replayed.rs`).
            let behind = !inner.known_ahead(token.lsn().0, timeline);
            while let Some(i) = inner
                .policy
                .pick(&self.view(tried | behind, UNKNOWN))
                .or_else(|| inner.policy.pick(&self.view(tried, UNKNOWN)))
            {
                tried |= 1 << i;
                let (mut conn, born) = match self.acquire_aged(i, false).await {
                    Ok(c) => c,
                    Err(e) => {
                        // A saturated pool is not a failed node: skip it for this read only.
                        if e.is_node_failure() {
                            inner.eject(i, "connection failed");
                        }
                        failed |= 1 << i;
                        continue;
                    }
                };
                let known = inner.nodes[i].replayed();
                if inner.config.known_positions && known.covers(token.lsn().0, timeline, born) {
                    inner.count_token_read(true);
                    if let Some(s) = session {
                        // The connection has replayed at least what the reading saw.
                        s.observe(WriteToken::on_timeline(Lsn(known.lsn), known.timeline));
                    }
                    return Ok(conn);
                }
                inner.count_token_read(false);
                // Checked on the very connection the caller will read from: replay only moves
                // forward while the server runs, so this read sees the token's write.
                // Bounded like a probe: a hung replica must not hold the read forever.
                let asked_at = Instant::now();
                let replayed: Result<Option<String>, _> = match tokio::time::timeout(
                    inner.config.probe_timeout,
                    sqlx::query_scalar("SELECT pg_last_wal_replay_lsn()::text")
                        .fetch_one(&mut *conn),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "replay position query timed out",
                    ))),
                };
                match replayed.map(|s| s.as_deref().and_then(Lsn::parse)) {
                    Ok(Some(lsn)) => {
                        let node_timeline = inner.nodes[i].timeline.load(Ordering::Acquire);
                        inner.nodes[i].note_replayed(lsn.0, node_timeline, asked_at);
                        if lsn >= token.lsn() {
                            if let Some(s) = session {
                                let t = inner.nodes[i].timeline.load(Ordering::Acquire);
                                s.observe(WriteToken::on_timeline(lsn, t));
                            }
                            return Ok(conn);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if is_connection_error(&e) {
                            inner.eject(i, "replay position query failed");
                            failed |= 1 << i;
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            if !checked_primary {
                // No replica has it yet: make sure the primary does, once, so that a token
                // from the future (forged, or from another cluster) fails at once instead of
                // polling every replica until the wait ends.
                checked_primary = true;
                if let Some(ahead) = self.token_ahead(token).await {
                    return Err(ahead);
                }
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        match inner.config.token_fallback {
            Fallback::Primary => {
                let mut conn = self.read_primary(true).await?;
                if let Some(s) = session {
                    // What this read can see on the primary includes commits not yet written
                    // (asynchronous commit): move the session to the insert position.
                    let node = conn.route.node.clone();
                    s.observe(insert_position(&mut *conn, &node).await?);
                }
                Ok(conn)
            }
            Fallback::Error => Err(RouteError::TokenTimeout {
                waited: start.elapsed(),
            }),
        }
    }

    /// `Some(error)` when `token` is ahead of what the primary has written (checked on the
    /// primary itself only when the router's own knowledge says so).
    async fn token_ahead(&self, token: WriteToken) -> Option<RouteError> {
        let inner = &self.inner;
        let known = |t: WriteToken| {
            let timeline = inner.timeline.load(Ordering::Acquire);
            let lsn = inner.primary_lsn.load(Ordering::Acquire);
            match t.timeline() {
                Some(tt) if tt > timeline => false,
                Some(tt) if tt < timeline => true,
                _ => t.lsn().0 <= lsn,
            }
        };
        if known(token) {
            return None;
        }
        let p = inner.writable_primary().ok()?;
        let now = insert_position(&inner.write_pool(p), &inner.nodes[p].name)
            .await
            .ok()?;
        if let Some(t) = now.timeline() {
            inner.timeline.fetch_max(t, Ordering::AcqRel);
        }
        inner.primary_lsn.fetch_max(now.lsn().0, Ordering::AcqRel);
        if known(token) {
            None
        } else {
            Some(RouteError::TokenAhead {
                token: token.to_string(),
                primary: now.to_string(),
            })
        }
    }

    /// How many primary searches have started since the router was built (a failed write or an
    /// unanswered health round starts one unless one is already running).
    pub fn primary_searches(&self) -> u64 {
        self.inner.searches.load(Ordering::Relaxed)
    }

    /// How token reads (`AtLeast`, `Session`) were routed since the router was built: on a
    /// replay position already known to cover the token, or after asking the replica.
    ///
    /// ```no_run
    /// # async fn run(router: stanchion_replica_router::ReplicaRouter) {
    /// let reads = router.token_reads();
    /// println!("{} of {} token reads needed no check query", reads.known, reads.known + reads.checked);
    /// # }
    /// ```
    pub fn token_reads(&self) -> TokenReads {
        TokenReads {
            known: self.inner.token_reads_known.load(Ordering::Relaxed),
            checked: self.inner.token_reads_checked.load(Ordering::Relaxed),
        }
    }

    /// Every node's role, admission and lag.
    pub fn status(&self) -> Vec<NodeStatus> {
        let p = self.inner.primary.load(Ordering::Acquire);
        self.inner
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let known = |v: u64| (v != UNKNOWN).then_some(v);
                NodeStatus {
                    name: n.name.clone(),
                    role: if i == p { Role::Primary } else { Role::Replica },
                    admitted: i != p && n.admitted.load(Ordering::Relaxed),
                    lag_bytes: known(n.lag_bytes.load(Ordering::Relaxed)),
                    lag: known(n.lag_ms.load(Ordering::Relaxed)).map(Duration::from_millis),
                    in_flight: n.in_flight.load(Ordering::Relaxed),
                    primary_unreachable: !self.inner.primary_up.load(Ordering::Acquire),
                }
            })
            .collect()
    }

    /// Runs a health and lag check of every node now (the background checker does this every
    /// interval).
    pub async fn check_now(&self) {
        self.inner.check_round().await;
    }

    /// Stops the checker and closes every pool.
    pub async fn close(&self) {
        self.inner.stop.send_replace(true);
        for n in &self.inner.nodes {
            n.read_pool.close().await;
            n.probe_pool.close().await;
            let pool = self.inner.write_pool_of(n);
            pool.close().await;
        }
    }
}
impl Inner {
    pub(crate) fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        match self.samples.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn write_pool(&self, i: usize) -> PgPool {
        self.write_pool_of(&self.nodes[i])
    }

    pub(crate) fn write_pool_of(&self, node: &Node) -> PgPool {
        match node.write_pool.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
