//! Failover: which node is the primary, fencing by timeline, one search at a time.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::{RouteError, is_connection_error};
use crate::health::Probe;
use crate::router::Inner;

impl Inner {
    /// Whether node `i`, answering as a primary, may be taken as one: not if it is on a timeline
    /// older than the newest a primary was seen on (an old primary back without a rewind:
    /// fenced). Otherwise its timeline becomes the newest known.
    pub(crate) fn accept_primary(&self, i: usize, probe: &Probe) -> bool {
        let newest = self.timeline.load(Ordering::Acquire);
        if probe.timeline.is_some_and(|t| t < newest) {
            tracing::error!(
                db.node = %self.nodes[i].name,
                db.timeline = probe.timeline,
                db.newest_timeline = newest,
                "a node accepts writes on an old timeline (an old primary back without a rewind?): fenced, never taken as primary"
            );
            return false;
        }
        if let Some(t) = probe.timeline {
            self.timeline.fetch_max(t, Ordering::AcqRel);
        }
        true
    }

    /// The nodes on a timeline older than `timeline`, or on an unknown one, as a skip mask (none
    /// when `timeline` itself is unknown).
    pub(crate) fn older_than(&self, timeline: u32) -> u64 {
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
    pub(crate) fn writable_primary(self: &Arc<Self>) -> Result<usize, RouteError> {
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

    pub(crate) fn write_failed(self: &Arc<Self>, p: usize, e: sqlx::Error) -> RouteError {
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
    pub(crate) fn search_primary(self: &Arc<Self>) {
        if self.searching.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            inner.find_primary().await;
            inner.searching.store(false, Ordering::Release);
        });
    }

    /// Finds the node that is not in recovery and makes it the primary. `true` if it changed.
    pub(crate) async fn find_primary(self: &Arc<Self>) -> bool {
        let _guard = self.failover.lock().await;
        self.searches.fetch_add(1, Ordering::Relaxed);
        let current = self.primary.load(Ordering::Acquire);
        let order = std::iter::once(current).chain((0..self.nodes.len()).filter(|&i| i != current));
        for i in order {
            match self.probe(i).await {
                Ok(probe) if !probe.in_recovery => {
                    if !self.accept_primary(i, &probe) {
                        continue;
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
