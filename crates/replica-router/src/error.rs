//! Errors: configuration (build time) and routing (call time).

use std::time::Duration;

/// Invalid router configuration, rejected by `build()`.
///
/// ```
/// use stanchion_replica_router::ReplicaRouter;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let err = ReplicaRouter::builder().build().await.unwrap_err();
/// assert_eq!(err.field(), "primary");
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: must be {expected}, got {got}")]
pub struct BuildError {
    field: &'static str,
    expected: &'static str,
    got: String,
}

impl BuildError {
    pub(crate) fn new(field: &'static str, expected: &'static str, got: impl ToString) -> Self {
        Self {
            field,
            expected,
            got: got.to_string(),
        }
    }

    /// The offending setting.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

/// A read or write that could not be routed or ran into the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// No replica is usable and the router is configured to fail rather than read from the
    /// primary.
    #[error("no usable replica")]
    NoReplica,
    /// No replica replayed past the token within the wait, and the router is configured to fail
    /// rather than read from the primary.
    #[error("no replica caught up with the write token within {waited:?}")]
    TokenTimeout {
        /// How long the router waited.
        waited: Duration,
    },
    /// The database failed (connect, query, commit). sqlx's message never contains the
    /// password of the URL.
    #[error("database error on {node}")]
    Database {
        /// The node's configured name.
        node: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The token names a write the primary has not made: a later timeline or position than the
    /// primary's own (a forged token, or one from another cluster). Refused after one check on
    /// the primary, instead of waiting for replicas that can never catch up.
    #[error("write token {token} is ahead of the primary ({primary})")]
    TokenAhead {
        /// The token.
        token: String,
        /// The primary's position when checked.
        primary: String,
    },
    /// The primary did not answer the last health round (killed, hung, or slower than the probe
    /// timeout) and no other node is a primary: the write was refused at once instead of
    /// waiting on a dead server. Retry after a failover, or when the primary answers again.
    #[error("primary {node} is unreachable")]
    PrimaryUnavailable {
        /// The configured name of the node last known as primary.
        node: String,
    },
    /// The node the router took for the primary refused a write because it is read-only (it was
    /// demoted or a standby): the router re-checks which node is primary at once.
    #[error("{node} is read-only (no longer the primary?)")]
    ReadOnly {
        /// The node's configured name.
        node: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

impl RouteError {
    pub(crate) fn db(node: &str, source: sqlx::Error) -> Self {
        if is_read_only(&source) {
            return Self::ReadOnly {
                node: node.to_owned(),
                source,
            };
        }
        Self::Database {
            node: node.to_owned(),
            source,
        }
    }

    /// Whether retrying later may succeed (a node down, a failover under way).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::NoReplica
            | Self::TokenTimeout { .. }
            | Self::ReadOnly { .. }
            | Self::PrimaryUnavailable { .. } => true,
            Self::TokenAhead { .. } => false,
            Self::Database { source, .. } => is_connection_error(source),
        }
    }
}

impl RouteError {
    /// Whether the error says the node is broken (unreachable, shut down, protocol failure), as
    /// opposed to busy: a pool that timed out waiting for a free connection is saturated, not
    /// failed, and ejecting it would push its load onto the others until they saturate too.
    pub(crate) fn is_node_failure(&self) -> bool {
        match self {
            Self::Database { source, .. } => {
                !matches!(source, sqlx::Error::PoolTimedOut) && is_connection_error(source)
            }
            _ => false,
        }
    }
}

/// SQLSTATE 25006 `read_only_sql_transaction`.
pub(crate) fn is_read_only(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "25006")
}

/// Errors that say "this node is unreachable" rather than "this query is wrong".
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
            // 08xxx connection exceptions.
            c.starts_with("57P") || c.starts_with("08")
        }),
        _ => false,
    }
}
