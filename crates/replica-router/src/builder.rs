//! Settings of a router, validated by `build()`.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::error::BuildError;
use crate::policy::{PowerOfTwo, ReplicaPolicy};
use crate::router::{Fallback, Inner, MAX_NODES, Node, ReplicaRouter, UNKNOWN};

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) health_interval: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) eject_lag_bytes: u64,
    pub(crate) readmit_lag_bytes: u64,
    pub(crate) eject_lag: Duration,
    pub(crate) readmit_lag: Duration,
    pub(crate) readmit_after: u32,
    pub(crate) min_ejection: Duration,
    pub(crate) no_replica: Fallback,
    pub(crate) token_wait: Duration,
    pub(crate) token_fallback: Fallback,
    pub(crate) known_positions: bool,
}

/// Where a node is: a URL to parse at build, or sqlx options made by the caller.
#[derive(Clone)]
enum Target {
    Url(String),
    Options(Box<PgConnectOptions>),
}

/// The longest duration accepted for the router's intervals, timeouts and waits.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

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
                known_positions: true,
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

    /// Whether a token read may skip its check query on a connection opened before the
    /// router last read that replica's replay position at or past the token (default on).
    ///
    /// This relies on a restart of the replica ending every connection to it, which holds for
    /// direct connections. Turn it off behind a pooler that keeps client connections open
    /// across server restarts (PgBouncer, pgcat, a cloud proxy): every token read then asks its
    /// connection for the replay position first, as before.
    ///
    /// ```
    /// let builder = stanchion_replica_router::ReplicaRouter::builder().known_positions(false);
    /// # let _ = builder;
    /// ```
    pub fn known_positions(mut self, enabled: bool) -> Self {
        self.config.known_positions = enabled;
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
    ///
    /// On the read pools the router sets its own `before_acquire` hook, which notes how old
    /// each reused connection is so that token reads on connections older than the last known
    /// replay position need no check query; a `before_acquire` hook set here applies to the
    /// write pools only. `after_connect` and `after_release` hooks apply to every pool.
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
                read_pool: self
                    .pool
                    .clone()
                    .before_acquire(crate::replayed::note_birth)
                    .connect_lazy_with(read_options),
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
                replayed: std::sync::Mutex::default(),
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
            token_reads_known: AtomicU64::new(0),
            token_reads_checked: AtomicU64::new(0),
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
