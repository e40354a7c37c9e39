//! PostgreSQL read replicas over sqlx, with lag awareness and read-your-writes tokens.
//!
//! # Quick example
//! ```no_run
//! use stanchion_replica_router::{Consistency, ReplicaRouter};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let router = ReplicaRouter::builder()
//!     .primary("primary", "postgres://app@10.0.0.1/shop")
//!     .replica("replica", "postgres://app@10.0.0.2/shop")
//!     .build()
//!     .await?;
//! let token = router.write_token().await?;
//! let mut conn = router.read(Consistency::AtLeast(token)).await?;
//! let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *conn).await?;
//! # let _ = one;
//! # Ok(()) }
//! ```
//!
//! # Concepts
//! - [`ReplicaRouter`] (built by [`ReplicaRouterBuilder`]): pools per node, a background
//!   health and lag checker, failover detection.
//! - [`Consistency`]: `Any`, `MaxStaleness`, `AfterWrite`, `AtLeast(WriteToken)`,
//!   `Session(&SessionToken)`, `Primary`. [`ReadConn`] is the connection a read gets.
//! - [`WriteToken`] / [`SessionToken`] / [`Lsn`]: WAL positions as read-your-writes proofs.
//! - [`ReplicaPolicy`] over a [`ReplicaSet`]: [`PowerOfTwo`] (default), [`RoundRobin`],
//!   [`Random`], [`Weighted`], [`LeastInFlight`].
//!
//! # Feature flags
//! | feature | what |
//! |---|---|
//! | `metrics` | `replica.ejections`, `replica.failovers` counters |
//!
//! # Observability
//! `tracing` events with `db.node`, `db.role`, `db.previous`, `reason`; selection itself logs
//! nothing. See the README.
//!
//! # MSRV
//! Rust 1.94.

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod builder;
mod conn;
mod error;
mod failover;
mod health;
mod policy;
mod replayed;
mod router;
mod token;

pub use crate::builder::ReplicaRouterBuilder;
pub use crate::conn::ReadConn;
pub use crate::error::{BuildError, RouteError};
pub use crate::policy::{
    LeastInFlight, PowerOfTwo, Random, ReplicaPolicy, ReplicaSet, RoundRobin, Weighted,
};
pub use crate::router::{
    Consistency, Fallback, MAX_NODES, NodeStatus, ReplicaRouter, Role, Route, TokenReads,
};
pub use crate::token::{Lsn, SessionToken, TokenParseError, WriteToken};
