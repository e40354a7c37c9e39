//! The router: pools per node, health and lag checks, selection, tokens, failover.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::Transaction;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, Postgres};

use crate::error::{BuildError, RouteError, is_connection_error};
use crate::policy::{PowerOfTwo, ReplicaPolicy, ReplicaSet};
use crate::token::{Lsn, SessionToken, WriteToken};

/// Most nodes a router manages.
pub const MAX_NODES: usize = 64;
const UNKNOWN: u64 = u64::MAX;

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

struct Node {
    name: String,
    weight: u32,
    options: PgConnectOptions,
    /// Sessions with `default_transaction_read_only = on`: a write sent to the read side fails.
    read_pool: PgPool,
    write_pool: RwLock<PgPool>,
    probe_pool: PgPool,
    admitted: AtomicBool,
    seen: AtomicBool,
    ejected_at_ms: AtomicU64,
    ok_streak: AtomicU32,
    in_flight: AtomicU32,
    latency_us: AtomicU64,
    replay_lsn: AtomicU64,
    /// The node's timeline as the last probe saw it (0: unknown).
    timeline: AtomicU32,
    lag_bytes: AtomicU64,
    lag_ms: AtomicU64,
}

#[derive(Debug, Clone)]
struct Config {
    health_interval: Duration,
    probe_timeout: Duration,
    eject_lag_bytes: u64,
    readmit_lag_bytes: u64,
    eject_lag: Duration,
    readmit_lag: Duration,
    readmit_after: u32,
    min_ejection: Duration,
    no_replica: Fallback,
    token_wait: Duration,
    token_fallback: Fallback,
}

/// Where a node is: a URL to parse at build, or sqlx options made by the caller.
#[derive(Clone)]
enum Target {
    Url(String),
    Options(Box<PgConnectOptions>),
}

/// The longest duration accepted for the router's intervals, timeouts and waits.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Settings of a [`ReplicaRouter`].
#[must_use]
pub struct ReplicaRouterBuilder {
    primary: Option<(String, Target)>,
    replicas: Vec<(String, Target, u32)>,
    config: Config,
    pool: PgPoolOptions,
    policy: Box<dyn ReplicaPolicy>,
}

impl fmt::Debug for ReplicaRouterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Node names only: URLs may carry passwords.
        f.debug_struct("ReplicaRouterBuilder")
            .field("primary", &self.primary.as_ref().map(|p| &p.0))
            .field(
                "replicas",
                &self.replicas.iter().map(|r| &r.0).collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for ReplicaRouterBuilder {
    fn default() -> Self {
        Self {
            primary: None,
            replicas: Vec::new(),
            config: Config {
                health_interval: Duration::from_millis(500),
                probe_timeout: Duration::from_secs(1),
                eject_lag_bytes: 64 * 1024 * 1024,
                readmit_lag_bytes: 16 * 1024 * 1024,
                eject_lag: Duration::from_secs(30),
                readmit_lag: Duration::from_secs(5),
                readmit_after: 3,
                min_ejection: Duration::from_secs(5),
                no_replica: Fallback::Primary,
                token_wait: Duration::from_millis(20),
                token_fallback: Fallback::Primary,
            },
            pool: PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(2)),
            policy: Box::new(PowerOfTwo),
        }
    }
}

impl ReplicaRouterBuilder {
    /// The primary's URL (`postgres://user:password@host:port/db`) and a name for logs.
    pub fn primary(mut self, name: &str, url: &str) -> Self {
        self.primary = Some((name.to_owned(), Target::Url(url.to_owned())));
        self
    }

    /// The primary, as sqlx connect options (TLS, statement cache size, application name,
    /// socket, anything `PgConnectOptions` can say). The router sets
    /// `default_transaction_read_only = on` on the read pools and nothing else.
    pub fn primary_with(mut self, name: &str, options: PgConnectOptions) -> Self {
        self.primary = Some((name.to_owned(), Target::Options(Box::new(options))));
        self
    }

    /// A streaming replica.
    pub fn replica(self, name: &str, url: &str) -> Self {
        self.weighted_replica(name, url, 1)
    }

    /// A streaming replica, as sqlx connect options (see [`primary_with`](Self::primary_with)).
    pub fn replica_with(mut self, name: &str, options: PgConnectOptions) -> Self {
        self.replicas
            .push((name.to_owned(), Target::Options(Box::new(options)), 1));
        self
    }

    /// A streaming replica with a weight for [`Weighted`](crate::Weighted).
    pub fn weighted_replica(mut self, name: &str, url: &str, weight: u32) -> Self {
        self.replicas
            .push((name.to_owned(), Target::Url(url.to_owned()), weight));
        self
    }

    /// How often health and lag are checked (default 500 ms).
    pub fn health_interval(mut self, every: Duration) -> Self {
        self.config.health_interval = every;
        self
    }

    /// How long a health probe may take before the node counts as failed (default 1 s).
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.config.probe_timeout = timeout;
        self
    }

    /// Ejects a replica lagging more than `eject` bytes; readmits it below `readmit` (defaults
    /// 64 MiB and 16 MiB).
    pub fn lag_bytes(mut self, eject: u64, readmit: u64) -> Self {
        self.config.eject_lag_bytes = eject;
        self.config.readmit_lag_bytes = readmit;
        self
    }

    /// Ejects a replica lagging more than `eject` in time; readmits it below `readmit`
    /// (defaults 30 s and 5 s).
    pub fn lag_time(mut self, eject: Duration, readmit: Duration) -> Self {
        self.config.eject_lag = eject;
        self.config.readmit_lag = readmit;
        self
    }

    /// An ejected replica comes back after this many consecutive good probes (default 3) and
    /// no sooner than `min_ejection` after it was ejected (default 5 s), so it cannot flap.
    pub fn readmission(mut self, good_probes: u32, min_ejection: Duration) -> Self {
        self.config.readmit_after = good_probes;
        self.config.min_ejection = min_ejection;
        self
    }

    /// Where reads go when no replica is usable (default the primary).
    pub fn when_no_replica(mut self, fallback: Fallback) -> Self {
        self.config.no_replica = fallback;
        self
    }

    /// A token read waits up to `wait` for a replica to catch up (default 20 ms), then falls
    /// back as configured (default the primary).
    pub fn token_wait(mut self, wait: Duration, fallback: Fallback) -> Self {
        self.config.token_wait = wait;
        self.config.token_fallback = fallback;
        self
    }

    /// Pool settings for every node (default 16 connections, 2 s acquire timeout).
    pub fn pool_options(mut self, options: PgPoolOptions) -> Self {
        self.pool = options;
        self
    }

    /// The replica selection policy (default [`PowerOfTwo`]).
    pub fn policy(mut self, policy: impl ReplicaPolicy) -> Self {
        self.policy = Box::new(policy);
        self
    }

    /// Validates the settings, creates the pools (connections open lazily), runs a first health
    /// check and starts the background checker.
    pub async fn build(self) -> Result<ReplicaRouter, BuildError> {
        let c = &self.config;
        let Some((primary_name, primary_url)) = &self.primary else {
            return Err(BuildError::new("primary", "set", "nothing"));
        };
        for (field, d, zero_ok) in [
            ("health_interval", c.health_interval, false),
            ("probe_timeout", c.probe_timeout, false),
            ("lag_time.eject", c.eject_lag, true),
            ("lag_time.readmit", c.readmit_lag, true),
            ("readmission.min_ejection", c.min_ejection, true),
            ("token_wait", c.token_wait, true),
        ] {
            if d.is_zero() && !zero_ok {
                return Err(BuildError::new(field, "greater than zero", "0s"));
            }
            if d > MAX_DURATION {
                return Err(BuildError::new(field, "at most 24 hours", format!("{d:?}")));
            }
        }
        if c.readmit_lag_bytes > c.eject_lag_bytes {
            return Err(BuildError::new(
                "lag_bytes.readmit",
                "at most the eject threshold",
                format!("{} > {}", c.readmit_lag_bytes, c.eject_lag_bytes),
            ));
        }
        if c.readmit_lag > c.eject_lag {
            return Err(BuildError::new(
                "lag_time.readmit",
                "at most the eject threshold",
                format!("{:?} > {:?}", c.readmit_lag, c.eject_lag),
            ));
        }
        if c.readmit_after == 0 {
            return Err(BuildError::new("readmission.good_probes", "at least 1", 0));
        }
        if 1 + self.replicas.len() > MAX_NODES {
            return Err(BuildError::new(
                "replicas",
                "at most 63",
                self.replicas.len(),
            ));
        }
        let mut specs = vec![(primary_name.clone(), primary_url.clone(), 1)];
        specs.extend(self.replicas.iter().cloned());
        let mut nodes = Vec::with_capacity(specs.len());
        let mut seen: Vec<(String, String, u16, Option<String>)> = Vec::new();
        for (name, target, weight) in specs {
            if name.is_empty() {
                return Err(BuildError::new("node name", "not empty", "\"\""));
            }
            // Never echo the URL: it may hold a password.
            let bad_url = || {
                BuildError::new(
                    "node url",
                    "a postgres:// URL",
                    format!("the URL of {name}"),
                )
            };
            let options = match target {
                Target::Options(options) => *options,
                Target::Url(url) => {
                    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                        return Err(bad_url());
                    }
                    PgConnectOptions::from_str(&url).map_err(|_| bad_url())?
                }
            };
            let id = (
                name.clone(),
                options.get_host().to_owned(),
                options.get_port(),
                options.get_database().map(str::to_owned),
            );
            if seen.iter().any(|s| s.0 == id.0) {
                return Err(BuildError::new("node name", "unique", name));
            }
            if seen
                .iter()
                .any(|s| s.1 == id.1 && s.2 == id.2 && s.3 == id.3)
            {
                return Err(BuildError::new(
                    "node url",
                    "a different server or database for every node",
                    format!("{name} repeats {}:{}", id.1, id.2),
                ));
            }
            seen.push(id);
            let options = if options.get_application_name().is_some() {
                options
            } else {
                options.application_name("stanchion-replica-router")
            };
            let read_options = options
                .clone()
                .options([("default_transaction_read_only", "on")]);
            nodes.push(Node {
                read_pool: self.pool.clone().connect_lazy_with(read_options),
                write_pool: RwLock::new(self.pool.clone().connect_lazy_with(options.clone())),
                probe_pool: PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(c.probe_timeout)
                    .test_before_acquire(false)
                    .connect_lazy_with(options.clone()),
                options,
                name,
                weight,
                admitted: AtomicBool::new(false),
                seen: AtomicBool::new(false),
                ejected_at_ms: AtomicU64::new(0),
                ok_streak: AtomicU32::new(0),
                in_flight: AtomicU32::new(0),
                latency_us: AtomicU64::new(0),
                replay_lsn: AtomicU64::new(0),
                timeline: AtomicU32::new(0),
                lag_bytes: AtomicU64::new(UNKNOWN),
                lag_ms: AtomicU64::new(UNKNOWN),
            });
        }
        let inner = Arc::new(Inner {
            nodes,
            primary: AtomicUsize::new(0),
            primary_lsn: AtomicU64::new(0),
            policy: self.policy,
            config: self.config,
            start: Instant::now(),
            failover: tokio::sync::Mutex::new(()),
            searching: AtomicBool::new(false),
            searches: AtomicU64::new(0),
            primary_up: AtomicBool::new(true),
            samples: std::sync::Mutex::default(),
            timeline: AtomicU32::new(0),
            stop: tokio::sync::watch::channel(false).0,
            pool: self.pool,
        });
        inner.check_round().await;
        let weak = Arc::downgrade(&inner);
        let mut stop = inner.stop.subscribe();
        let every = inner.config.health_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                inner.check_round().await;
            }
        });
        Ok(ReplicaRouter { inner })
    }
}

struct Inner {
    nodes: Vec<Node>,
    primary: AtomicUsize,
    primary_lsn: AtomicU64,
    policy: Box<dyn ReplicaPolicy>,
    config: Config,
    start: Instant,
    failover: tokio::sync::Mutex<()>,
    /// A primary search is running or queued: failed writes start at most one.
    searching: AtomicBool,
    /// Primary searches started, for tests and dashboards.
    searches: AtomicU64,
    /// The primary answered the last health round (see [`NodeStatus::primary_unreachable`]).
    primary_up: AtomicBool,
    samples: std::sync::Mutex<Samples>,
    /// The newest timeline any primary was seen on. A node that claims to be primary on an older
    /// one (an old primary back without a rewind) is fenced.
    timeline: AtomicU32,
    stop: tokio::sync::watch::Sender<bool>,
    pool: PgPoolOptions,
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
    inner: Arc<Inner>,
}

impl fmt::Debug for ReplicaRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaRouter")
            .field("nodes", &self.status())
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// A pooled connection for one read, with a read-only session. Dereferences to
/// `PgConnection`; counts as in flight on its node until dropped.
pub struct ReadConn {
    conn: PoolConnection<Postgres>,
    route: Route,
    guard: InFlight,
}

impl fmt::Debug for ReadConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadConn")
            .field("route", &self.route)
            .finish()
    }
}

impl ReadConn {
    /// Where this read went.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Reports that a query on this connection failed because of the node (not the query): the
    /// node is ejected at once, and readmitted by the health checker.
    pub fn mark_failed(self) {
        self.guard.inner.eject(self.guard.index, "query failed");
    }

    /// Starts a read-only transaction (`BEGIN READ ONLY`) for several consistent statements.
    pub async fn begin(&mut self) -> Result<Transaction<'_, Postgres>, RouteError> {
        let node = self.route.node.clone();
        Transaction::begin(
            &mut *self.conn,
            Some(sqlx::SqlSafeStr::into_sql_str("BEGIN READ ONLY")),
        )
        .await
        .map_err(|e| RouteError::db(&node, e))
    }
}

impl Deref for ReadConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for ReadConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

struct InFlight {
    inner: Arc<Inner>,
    index: usize,
    since: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let node = &self.inner.nodes[self.index];
        node.in_flight.fetch_sub(1, Ordering::AcqRel);
        // Exponential moving average, weight 1/8.
        let took = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        let old = node.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            old - old / 8 + took / 8
        };
        node.latency_us.store(new.max(1), Ordering::Relaxed);
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
        let inner = &self.inner;
        let node = &inner.nodes[i];
        node.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight {
            inner: Arc::clone(inner),
            index: i,
            since: Instant::now(),
        };
        let conn = node
            .read_pool
            .acquire()
            .await
            .map_err(|e| RouteError::db(&node.name, e))?;
        let role = if i == inner.primary.load(Ordering::Acquire) {
            Role::Primary
        } else {
            Role::Replica
        };
        Ok(ReadConn {
            conn,
            route: Route {
                node: node.name.clone(),
                role,
                fallback,
            },
            guard,
        })
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
            while let Some(i) = inner.policy.pick(&self.view(tried, UNKNOWN)) {
                tried |= 1 << i;
                let mut conn = match self.acquire(i, false).await {
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
                // Checked on the very connection the caller will read from: replay only moves
                // forward while the server runs, so this read sees the token's write.
                // Bounded like a probe: a hung replica must not hold the read forever.
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
                        inner.nodes[i].replay_lsn.fetch_max(lsn.0, Ordering::AcqRel);
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

struct Probe {
    in_recovery: bool,
    lsn: Option<Lsn>,
    /// Its timeline, if it could be read.
    timeline: Option<u32>,
}

/// The timeline in a WAL file name (its first eight hexadecimal digits).
fn timeline_of_wal_file(name: &str) -> Option<u32> {
    name.get(..8).and_then(|t| u32::from_str_radix(t, 16).ok())
}

/// The primary's WAL insert position, as the end of the last record inserted, with its
/// timeline.
async fn insert_position<'e, E>(executor: E, node: &str) -> Result<WriteToken, RouteError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let (lsn, wal_file, block, segment): (String, String, i32, i64) = sqlx::query_as(
        "SELECT pg_current_wal_insert_lsn()::text, \
         pg_walfile_name(pg_current_wal_insert_lsn()), \
         current_setting('wal_block_size')::int, \
         pg_size_bytes(current_setting('wal_segment_size'))",
    )
    .fetch_one(executor)
    .await
    .map_err(|e| RouteError::db(node, e))?;
    let bad = || RouteError::Database {
        node: node.to_owned(),
        source: sqlx::Error::Protocol(format!("unexpected WAL position {lsn:?} ({wal_file:?})")),
    };
    let position = Lsn::parse(&lsn)
        .map(|l| Lsn(end_of_last_record(l.0, block, segment)))
        .ok_or_else(bad)?;
    let timeline = timeline_of_wal_file(&wal_file).ok_or_else(bad)?;
    Ok(WriteToken::on_timeline(position, timeline))
}

/// The insert position points past a page header when the last record ended at a page
/// boundary; a replica that replayed that record reports the boundary. Step back over the
/// header so that such a token is reachable without another write. Offsets 24 and 40 (the short
/// and long page headers) can be nothing but a header's end at those places: the first record
/// on a page starts after the header, so it cannot end there.
fn end_of_last_record(lsn: u64, block: i32, segment: i64) -> u64 {
    const SHORT_HEADER: u64 = 24;
    const LONG_HEADER: u64 = 40;
    let (Ok(block), Ok(segment)) = (u64::try_from(block), u64::try_from(segment)) else {
        return lsn;
    };
    if block == 0 || segment == 0 {
        return lsn;
    }
    if lsn % segment == LONG_HEADER {
        lsn - LONG_HEADER
    } else if lsn % block == SHORT_HEADER && lsn % segment != SHORT_HEADER {
        lsn - SHORT_HEADER
    } else {
        lsn
    }
}

/// Most primary positions kept for measuring lag in time (at the default 500 ms interval, about
/// two minutes of history).
const MAX_SAMPLES: usize = 256;

/// When the primary was first seen at or past each position: a replica at replay position `r`
/// lacks only what the primary wrote after the last sample at or below `r`, so its lag in time
/// is measured on the router's own clock, from the first sample beyond `r`. An idle primary
/// that writes one small record just before a round therefore shows a lag of zero for a
/// replica that had replayed everything before it, however old its last transaction is.
#[derive(Debug, Default)]
struct Samples {
    /// (primary position, router milliseconds), positions strictly increasing.
    seen: std::collections::VecDeque<(u64, u64)>,
}

impl Samples {
    fn record(&mut self, lsn: u64, now_ms: u64) {
        if self.seen.back().is_none_or(|&(last, _)| lsn > last) {
            if self.seen.len() == MAX_SAMPLES {
                self.seen.pop_front();
            }
            self.seen.push_back((lsn, now_ms));
        }
    }

    /// Milliseconds a replica at `replay` has been missing something, at least.
    fn lag_ms(&self, replay: u64, now_ms: u64) -> u64 {
        // None: the replica is at or past every sampled position.
        let first_beyond = self.seen.iter().find(|&&(lsn, _)| lsn > replay);
        first_beyond.map_or(0, |&(_, at)| now_ms.saturating_sub(at))
    }
}

impl Inner {
    fn samples(&self) -> std::sync::MutexGuard<'_, Samples> {
        match self.samples.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn write_pool(&self, i: usize) -> PgPool {
        self.write_pool_of(&self.nodes[i])
    }

    fn write_pool_of(&self, node: &Node) -> PgPool {
        match node.write_pool.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn eject(&self, i: usize, why: &str) {
        let node = &self.nodes[i];
        node.ok_streak.store(0, Ordering::Release);
        if node.admitted.swap(false, Ordering::AcqRel) {
            node.ejected_at_ms.store(self.now_ms(), Ordering::Release);
            tracing::warn!(db.node = %node.name, db.role = "replica", reason = why, "replica ejected");
            #[cfg(feature = "metrics")]
            metrics::counter!("replica.ejections", "db.node" => node.name.clone()).increment(1);
        }
    }

    /// The nodes on a timeline older than `timeline`, or on an unknown one, as a skip mask (none
    /// when `timeline` itself is unknown).
    fn older_than(&self, timeline: u32) -> u64 {
        if timeline == 0 {
            return 0;
        }
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.timeline.load(Ordering::Acquire) < timeline)
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }

    /// The primary's index, or a fast error while it is known to be unreachable.
    fn writable_primary(self: &Arc<Self>) -> Result<usize, RouteError> {
        let p = self.primary.load(Ordering::Acquire);
        if self.primary_up.load(Ordering::Acquire) {
            Ok(p)
        } else {
            self.search_primary();
            Err(RouteError::PrimaryUnavailable {
                node: self.nodes[p].name.clone(),
            })
        }
    }

    fn write_failed(self: &Arc<Self>, p: usize, e: sqlx::Error) -> RouteError {
        let err = RouteError::db(&self.nodes[p].name, e);
        if matches!(err, RouteError::ReadOnly { .. })
            || matches!(&err, RouteError::Database { source, .. } if is_connection_error(source))
        {
            self.search_primary();
        }
        err
    }

    /// Starts a primary search in the background unless one is already running: a burst of
    /// failed writes makes one search, not one each piling up on the probe pool.
    fn search_primary(self: &Arc<Self>) {
        if self.searching.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            inner.find_primary().await;
            inner.searching.store(false, Ordering::Release);
        });
    }

    async fn probe(&self, i: usize) -> Result<Probe, String> {
        let node = &self.nodes[i];
        let query = async {
            let mut conn = node.probe_pool.acquire().await?;
            let (in_recovery, lsn, wal_file): (bool, Option<String>, Option<String>) =
                sqlx::query_as(
                    "SELECT pg_is_in_recovery(), \
                     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text \
                          ELSE pg_current_wal_lsn()::text END, \
                     CASE WHEN pg_is_in_recovery() THEN NULL \
                          ELSE pg_walfile_name(pg_current_wal_lsn()) END",
                )
                .fetch_one(&mut *conn)
                .await?;
            let timeline = if in_recovery {
                // A standby's replay timeline, at least: what its WAL receiver streams (visible
                // with pg_read_all_stats), or the timeline of its last restartpoint or minimum
                // recovery point. Best effort: without the privileges it is unknown.
                sqlx::query_scalar::<_, Option<i32>>(
                    "SELECT GREATEST( \
                       (SELECT received_tli FROM pg_stat_wal_receiver), \
                       (SELECT timeline_id FROM pg_control_checkpoint()), \
                       (SELECT min_recovery_end_timeline FROM pg_control_recovery()))",
                )
                .fetch_one(&mut *conn)
                .await
                .ok()
                .flatten()
                .and_then(|t| u32::try_from(t).ok())
            } else {
                wal_file.as_deref().and_then(timeline_of_wal_file)
            };
            Ok::<_, sqlx::Error>((in_recovery, lsn, timeline))
        };
        match tokio::time::timeout(self.config.probe_timeout, query).await {
            Ok(Ok((in_recovery, lsn, timeline))) => Ok(Probe {
                in_recovery,
                lsn: lsn.as_deref().and_then(Lsn::parse),
                timeline: timeline.filter(|&t| t != 0),
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.config.probe_timeout)),
        }
    }

    async fn check_round(self: &Arc<Self>) {
        let p = self.primary.load(Ordering::Acquire);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..self.nodes.len() {
            let inner = Arc::clone(self);
            set.spawn(async move { (i, inner.probe(i).await) });
        }
        let mut results: Vec<Option<Result<Probe, String>>> =
            (0..self.nodes.len()).map(|_| None).collect();
        while let Some(Ok((i, r))) = set.join_next().await {
            results[i] = Some(r);
        }
        let newest = self.timeline.load(Ordering::Acquire);
        let primary_lsn = match &results[p] {
            Some(Ok(probe)) if !probe.in_recovery => {
                if probe.timeline.is_some_and(|t| t < newest) {
                    tracing::error!(
                        db.node = %self.nodes[p].name,
                        db.role = "primary",
                        db.timeline = probe.timeline,
                        db.newest_timeline = newest,
                        "the primary is on an old timeline (a failed-over primary back without a rewind?): fenced"
                    );
                    None
                } else {
                    if let Some(t) = probe.timeline {
                        self.timeline.fetch_max(t, Ordering::AcqRel);
                    }
                    probe.lsn
                }
            }
            _ => None,
        };
        if primary_lsn.is_none() {
            tracing::warn!(db.node = %self.nodes[p].name, db.role = "primary", "primary unreachable or in recovery; looking for the primary");
            if self.find_primary().await {
                return;
            }
            if self.primary_up.swap(false, Ordering::AcqRel) {
                tracing::warn!(
                    db.node = %self.nodes[p].name,
                    db.role = "primary",
                    "no primary answers: writes fail fast, reads stay on admitted replicas"
                );
            }
        } else if !self.primary_up.swap(true, Ordering::AcqRel) {
            tracing::info!(db.node = %self.nodes[p].name, db.role = "primary", "primary answers again");
        }
        let now = self.now_ms();
        if let Some(lsn) = primary_lsn {
            self.primary_lsn.fetch_max(lsn.0, Ordering::AcqRel);
            self.samples().record(lsn.0, now);
        }
        // Without an answer from the primary, replicas are judged against its last known
        // position: one that had caught up stays admitted, one far behind is still ejected.
        let primary_lsn = primary_lsn.or_else(|| {
            let last = self.primary_lsn.load(Ordering::Acquire);
            (last != 0).then_some(Lsn(last))
        });
        let c = &self.config;
        for (i, result) in results.into_iter().enumerate() {
            if i == p {
                continue;
            }
            let node = &self.nodes[i];
            let timeline = match &result {
                Some(Ok(probe)) if probe.in_recovery => probe.timeline.unwrap_or(0),
                _ => 0,
            };
            node.timeline.store(timeline, Ordering::Release);
            let (lag_bytes, lag_ms) = match (&result, primary_lsn) {
                (Some(Ok(probe)), Some(primary)) if probe.in_recovery => match probe.lsn {
                    Some(replay) => {
                        node.replay_lsn.fetch_max(replay.0, Ordering::AcqRel);
                        let bytes = primary.0.saturating_sub(replay.0);
                        // Equal positions mean no lag, however old the last replayed
                        // transaction is; otherwise, since the primary first went past it.
                        let ms = if bytes == 0 {
                            0
                        } else {
                            self.samples().lag_ms(replay.0, now)
                        };
                        (bytes, ms)
                    }
                    None => (UNKNOWN, UNKNOWN),
                },
                _ => (UNKNOWN, UNKNOWN),
            };
            node.lag_bytes.store(lag_bytes, Ordering::Relaxed);
            node.lag_ms.store(lag_ms, Ordering::Relaxed);
            let healthy = matches!(&result, Some(Ok(probe)) if probe.in_recovery);
            let eject_ms = u64::try_from(c.eject_lag.as_millis()).unwrap_or(UNKNOWN);
            let readmit_ms = u64::try_from(c.readmit_lag.as_millis()).unwrap_or(UNKNOWN);
            let too_far =
                lag_bytes == UNKNOWN || lag_bytes > c.eject_lag_bytes || lag_ms > eject_ms;
            let close_enough = lag_bytes <= c.readmit_lag_bytes && lag_ms <= readmit_ms;
            if node.admitted.load(Ordering::Acquire) {
                if !healthy || too_far {
                    let why = match &result {
                        Some(Err(e)) => format!("probe failed: {e}"),
                        Some(Ok(p)) if !p.in_recovery => "not in recovery".to_owned(),
                        _ => format!("lag {lag_bytes} bytes / {lag_ms} ms"),
                    };
                    self.eject(i, &why);
                }
                continue;
            }
            if healthy && close_enough {
                let streak = node.ok_streak.fetch_add(1, Ordering::AcqRel) + 1;
                let first = !node.seen.load(Ordering::Acquire);
                let waited = now.saturating_sub(node.ejected_at_ms.load(Ordering::Acquire));
                let min = u64::try_from(c.min_ejection.as_millis()).unwrap_or(UNKNOWN);
                if first || (streak >= c.readmit_after && waited >= min) {
                    node.admitted.store(true, Ordering::Release);
                    node.seen.store(true, Ordering::Release);
                    tracing::info!(db.node = %node.name, db.role = "replica", "replica admitted");
                }
            } else {
                node.ok_streak.store(0, Ordering::Release);
                if !node.seen.swap(true, Ordering::AcqRel) {
                    node.ejected_at_ms.store(now, Ordering::Release);
                }
            }
        }
    }

    /// Finds the node that is not in recovery and makes it the primary. `true` if it changed.
    async fn find_primary(self: &Arc<Self>) -> bool {
        let _guard = self.failover.lock().await;
        self.searches.fetch_add(1, Ordering::Relaxed);
        let current = self.primary.load(Ordering::Acquire);
        let order = std::iter::once(current).chain((0..self.nodes.len()).filter(|&i| i != current));
        for i in order {
            match self.probe(i).await {
                Ok(probe) if !probe.in_recovery => {
                    let newest = self.timeline.load(Ordering::Acquire);
                    if probe.timeline.is_some_and(|t| t < newest) {
                        tracing::error!(
                            db.node = %self.nodes[i].name,
                            db.timeline = probe.timeline,
                            db.newest_timeline = newest,
                            "a node accepts writes on an old timeline (an old primary back without a rewind?): fenced, never taken as primary"
                        );
                        continue;
                    }
                    if let Some(t) = probe.timeline {
                        self.timeline.fetch_max(t, Ordering::AcqRel);
                    }
                    self.primary_up.store(true, Ordering::Release);
                    if i == current {
                        return false;
                    }
                    let old = &self.nodes[current];
                    let new = &self.nodes[i];
                    // Connections to the old primary are from before the change: drop them. The
                    // replacement has the pool settings the router was built with.
                    let fresh = self.pool.clone().connect_lazy_with(old.options.clone());
                    let stale = match old.write_pool.write() {
                        Ok(mut pool) => std::mem::replace(&mut *pool, fresh),
                        Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fresh),
                    };
                    tokio::spawn(async move { stale.close().await });
                    new.admitted.store(false, Ordering::Release);
                    self.primary.store(i, Ordering::Release);
                    tracing::warn!(
                        db.node = %new.name,
                        db.previous = %old.name,
                        db.role = "primary",
                        "failover: new primary"
                    );
                    #[cfg(feature = "metrics")]
                    metrics::counter!("replica.failovers").increment(1);
                    return true;
                }
                _ => continue,
            }
        }
        false
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

#[cfg(test)]
mod position_tests {
    use super::*;

    #[test]
    fn a_position_just_past_a_page_header_steps_back_to_the_boundary() {
        let (block, segment) = (8192, 16 << 20);
        assert_eq!(end_of_last_record(8192 + 24, block, segment), 8192);
        assert_eq!(end_of_last_record(3 * 8192 + 24, block, segment), 3 * 8192);
        let seg = 16u64 << 20;
        assert_eq!(end_of_last_record(5 * seg + 40, block, segment), 5 * seg);
        // Offsets a record can end at are kept.
        for lsn in [8192 + 48, 8192 + 40, 8192 + 32, 5 * seg + 24 + 8, 100] {
            assert_eq!(end_of_last_record(lsn, block, segment), lsn);
        }
        assert_eq!(end_of_last_record(8192 + 24, 0, segment), 8192 + 24);
    }

    #[test]
    fn lag_in_time_counts_from_the_first_primary_position_past_the_replica() {
        let mut samples = Samples::default();
        samples.record(100, 0);
        samples.record(100, 500); // idle: the first sighting stays
        samples.record(200, 1000);
        samples.record(300, 1500);
        assert_eq!(samples.lag_ms(300, 2000), 0, "caught up with every sample");
        assert_eq!(
            samples.lag_ms(250, 2000),
            500,
            "missing what came after 1000 ms"
        );
        assert_eq!(samples.lag_ms(100, 2000), 1000);
        assert_eq!(samples.lag_ms(50, 2000), 2000);
        assert_eq!(samples.lag_ms(400, 2000), 0);
    }
}
