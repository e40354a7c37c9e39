//! PostgreSQL read replicas over sqlx, with lag awareness and read-your-writes tokens.

mod error;
mod policy;
mod router;
mod token;

pub use crate::error::{BuildError, RouteError};
pub use crate::policy::{
    LeastInFlight, PowerOfTwo, Random, ReplicaPolicy, ReplicaSet, RoundRobin, Weighted,
};
pub use crate::router::{
    Consistency, Fallback, MAX_NODES, NodeStatus, ReadConn, ReplicaRouter, ReplicaRouterBuilder,
    Role, Route,
};
pub use crate::token::{Lsn, SessionToken, TokenParseError, WriteToken};
