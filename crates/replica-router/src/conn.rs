//! The connection handed out for a read.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use sqlx::Transaction;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, Postgres};

use crate::error::RouteError;
use crate::router::{Inner, Route};

/// A pooled connection for one read, with a read-only session. Dereferences to
/// `PgConnection`; counts as in flight on its node until dropped.
pub struct ReadConn {
    pub(crate) conn: PoolConnection<Postgres>,
    pub(crate) route: Route,
    pub(crate) guard: InFlight,
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

pub(crate) struct InFlight {
    pub(crate) inner: Arc<Inner>,
    pub(crate) index: usize,
    pub(crate) since: Instant,
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
