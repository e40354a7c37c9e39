//! What the router knows of each replica's replay position, and when a pooled connection may be
//! routed a token read on that knowledge alone, without asking its server first.
//!
//! A standby's replay position only moves forward while its server runs. It can go back when
//! the server restarts (crash recovery starts over from a restartpoint and opens for reads once
//! consistent, which can be before the position it had reached), and a restart ends every
//! connection to it. So a position read at instant `t` on any connection to a server holds for
//! every connection to that server that was already open at `t` and still works: had the
//! server restarted since, the connection would be dead (the pool's ping or the read fails; it
//! never reads stale rows). A connection opened after `t` may be talking to a restarted server
//! that is behind `t`'s position, so a token read on it still asks (`pg_last_wal_replay_lsn()`).
//!
//! A connection's age comes from sqlx's `before_acquire` hook on the read pools, which runs on
//! the acquiring task; [`acquire_noting_birth`] reads it back through a task-local. A pool that
//! did not call the hook (a new connection, or a future sqlx that calls it elsewhere) leaves the
//! birth unknown, and the read asks: the fallback is the safe path, never the fast one.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Instant;

use sqlx::pool::{PoolConnection, PoolConnectionMetadata};
use sqlx::postgres::{PgConnection, PgPool, Postgres};

use crate::router::{Inner, Node};

tokio::task_local! {
    static BORN: Cell<Option<Instant>>;
}

/// A replay position and when the query that read it was sent.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Replayed {
    pub(crate) lsn: u64,
    /// The node's timeline when it was read (0: unknown).
    pub(crate) timeline: u32,
    /// `None` until the first reading.
    pub(crate) asked_at: Option<Instant>,
}

impl Replayed {
    /// Whether this reading shows the token `(lsn, timeline)` replayed on a connection opened at
    /// `born`.
    pub(crate) fn covers(&self, lsn: u64, timeline: u32, born: Option<Instant>) -> bool {
        self.covers_position(lsn, timeline)
            && matches!((born, self.asked_at), (Some(b), Some(a)) if b < a)
    }

    /// Whether the reading is at or past the token, whatever the connection.
    pub(crate) fn covers_position(&self, lsn: u64, timeline: u32) -> bool {
        self.asked_at.is_some() && timeline != 0 && self.timeline >= timeline && self.lsn >= lsn
    }
}

type HookFuture<'c> = Pin<Box<dyn Future<Output = Result<bool, sqlx::Error>> + Send + 'c>>;

/// The read pools' `before_acquire` hook: notes when the idle connection being handed out was
/// opened, for the task acquiring it. Accepts every connection.
pub(crate) fn note_birth(_: &mut PgConnection, meta: PoolConnectionMetadata) -> HookFuture<'_> {
    let born = Instant::now().checked_sub(meta.age);
    // Outside `acquire_noting_birth` (no task-local) there is nobody to tell.
    let _ = BORN.try_with(|b| b.set(born));
    Box::pin(std::future::ready(Ok(true)))
}

/// A connection from `pool` and, when the pool reused an idle one, when that one was opened.
pub(crate) async fn acquire_noting_birth(
    pool: &PgPool,
) -> (
    Result<PoolConnection<Postgres>, sqlx::Error>,
    Option<Instant>,
) {
    BORN.scope(Cell::new(None), async {
        let conn = pool.acquire().await;
        (conn, BORN.with(Cell::get))
    })
    .await
}

impl Node {
    pub(crate) fn replayed(&self) -> Replayed {
        match self.replayed.lock() {
            Ok(r) => *r,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Records a replay position read by a query sent at `asked_at`; the newest reading wins,
    /// even when it is lower (the server restarted).
    pub(crate) fn note_replayed(&self, lsn: u64, timeline: u32, asked_at: Instant) {
        let mut r = match self.replayed.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if r.asked_at.is_none_or(|t| asked_at >= t) {
            *r = Replayed {
                lsn,
                timeline,
                asked_at: Some(asked_at),
            };
        }
    }
}

impl Inner {
    /// Nodes whose last reading is at or past the token: a token read tries them first.
    pub(crate) fn known_ahead(&self, lsn: u64, timeline: u32) -> u64 {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.replayed().covers_position(lsn, timeline))
            .fold(0, |mask, (i, _)| mask | (1 << i))
    }

    pub(crate) fn count_token_read(&self, known: bool) {
        let counter = if known {
            &self.token_reads_known
        } else {
            &self.token_reads_checked
        };
        counter.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(
            "replica.token_reads",
            "check" => if known { "known" } else { "queried" }
        )
        .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reading_covers_only_connections_opened_before_it_was_asked() {
        let t0 = Instant::now();
        let asked = t0 + Duration::from_millis(10);
        let r = Replayed {
            lsn: 1000,
            timeline: 2,
            asked_at: Some(asked),
        };
        assert!(r.covers(1000, 2, Some(t0)));
        assert!(r.covers(999, 1, Some(t0)), "older timeline, lower position");
        assert!(!r.covers(1001, 2, Some(t0)), "token ahead of the reading");
        assert!(!r.covers(1000, 3, Some(t0)), "token on a newer timeline");
        assert!(!r.covers(1000, 0, Some(t0)), "token timeline unknown");
        assert!(
            !r.covers(1000, 2, Some(asked + Duration::from_millis(1))),
            "connection opened after the reading: its server may have restarted behind it"
        );
        assert!(
            !r.covers(1000, 2, Some(asked)),
            "opened at the same instant"
        );
        assert!(!r.covers(1000, 2, None), "age unknown");
        assert!(
            !Replayed::default().covers(0, 1, Some(t0)),
            "nothing read yet"
        );
    }
}
