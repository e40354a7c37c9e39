//! Real servers for Stanchion's tests, benches and examples: `redis-server` (single and
//! cluster), a PostgreSQL primary with streaming replicas, `nats-server` with JetStream, and a
//! fault-injecting TCP proxy. All
//! on loopback, on free ports, in temporary directories that are removed when the handle drops,
//! even when a test panics (and, for servers kept in statics, when the test process exits).
//!
//! No Docker engine runs on our machines, so the testkit starts the Debian packages' binaries
//! directly (see `docs/decisions/0001-workspace.md`). A missing binary is an error that names the
//! package to install, never a silent skip.
//!
//! # Quick example
//! ```no_run
//! use stanchion_testkit::{Node, PostgresCluster, RedisServer};
//!
//! let redis = RedisServer::shared()?;          // one per test binary; use a key prefix per test
//! let pg = PostgresCluster::shared()?;         // primary + 2 streaming replicas
//! let db = pg.create_database()?;              // a database per test
//! pg.sql(Node::Primary, &db.name, "CREATE TABLE t (x int)")?;
//! println!("{} {}", redis.url(), db.primary_url);
//! # Ok::<(), stanchion_testkit::TestkitError>(())
//! ```
//!
//! # Concepts
//! - [`RedisServer`]: `url()`, optional password, `kill()`, `restart()` on the same port,
//!   `pause()` (SIGSTOP) and `resume()` (SIGCONT) to simulate a hung server.
//! - [`RedisCluster`]: three or more masters, ready when `cluster_state:ok`.
//! - [`PostgresCluster`]: a primary and N streaming replicas; `create_database()`,
//!   `pause_replay(i)` / `resume_replay(i)` for controlled lag, `kill`/`restart`, `promote(i)`.
//! - [`FaultProxy`]: latency, blackhole and reset between a client and any loopback server.
//!
//! The synchronous API blocks briefly (starting a server, running `psql`): call it from set-up
//! code or through `tokio::task::spawn_blocking` in async tests that must keep their runtime free.

pub mod child;
mod error;
pub mod events;
mod nats;
mod postgres;
mod process;
mod proxy;
mod redis;

pub use crate::error::{Result, TestkitError};
pub use crate::nats::NatsServer;
pub use crate::postgres::{Node, PostgresCluster, PostgresClusterBuilder, TestDatabase};
pub use crate::proxy::{Fault, FaultProxy};
pub use crate::redis::{
    CLUSTER_SLOTS, RedisCluster, RedisServer, RedisServerBuilder, connection_manager,
};
