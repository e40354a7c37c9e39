//! The health checker: probes, lag, admission and ejection; WAL positions and timelines.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::postgres::Postgres;

use crate::error::RouteError;
use crate::router::{Inner, UNKNOWN};
use crate::token::{Lsn, WriteToken};

pub(crate) struct Probe {
    pub(crate) in_recovery: bool,
    pub(crate) lsn: Option<Lsn>,
    /// Its timeline, if it could be read.
    pub(crate) timeline: Option<u32>,
    /// When the query was sent.
    pub(crate) asked_at: std::time::Instant,
}

/// The timeline in a WAL file name (its first eight hexadecimal digits).
pub(crate) fn timeline_of_wal_file(name: &str) -> Option<u32> {
    name.get(..8).and_then(|t| u32::from_str_radix(t, 16).ok())
}

/// The primary's WAL insert position, as the end of the last record inserted, with its
/// timeline.
pub(crate) async fn insert_position<'e, E>(
    executor: E,
    node: &str,
) -> Result<WriteToken, RouteError>
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
pub(crate) fn end_of_last_record(lsn: u64, block: i32, segment: i64) -> u64 {
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
pub(crate) struct Samples {
    /// (primary position, router milliseconds), positions strictly increasing.
    pub(crate) seen: std::collections::VecDeque<(u64, u64)>,
}

impl Samples {
    pub(crate) fn record(&mut self, lsn: u64, now_ms: u64) {
        if self.seen.back().is_none_or(|&(last, _)| lsn > last) {
            if self.seen.len() == MAX_SAMPLES {
                self.seen.pop_front();
            }
            self.seen.push_back((lsn, now_ms));
        }
    }

    /// Milliseconds a replica at `replay` has been missing something, at least.
    pub(crate) fn lag_ms(&self, replay: u64, now_ms: u64) -> u64 {
        // None: the replica is at or past every sampled position.
        let first_beyond = self.seen.iter().find(|&&(lsn, _)| lsn > replay);
        first_beyond.map_or(0, |&(_, at)| now_ms.saturating_sub(at))
    }
}

impl Inner {
    pub(crate) fn eject(&self, i: usize, why: &str) {
        let node = &self.nodes[i];
        node.ok_streak.store(0, Ordering::Release);
        if node.admitted.swap(false, Ordering::AcqRel) {
            node.ejected_at_ms.store(self.now_ms(), Ordering::Release);
            tracing::warn!(db.node = %node.name, db.role = "replica", reason = why, "replica ejected");
            #[cfg(feature = "metrics")]
            metrics::counter!("replica.ejections", "db.node" => node.name.clone()).increment(1);
        }
    }

    pub(crate) async fn probe(&self, i: usize) -> Result<Probe, String> {
        let node = &self.nodes[i];
        let query = async {
            let mut conn = node.probe_pool.acquire().await?;
            let asked_at = std::time::Instant::now();
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
            Ok::<_, sqlx::Error>((in_recovery, lsn, timeline, asked_at))
        };
        match tokio::time::timeout(self.config.probe_timeout, query).await {
            Ok(Ok((in_recovery, lsn, timeline, asked_at))) => Ok(Probe {
                in_recovery,
                lsn: lsn.as_deref().and_then(Lsn::parse),
                timeline: timeline.filter(|&t| t != 0),
                asked_at,
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.config.probe_timeout)),
        }
    }

    pub(crate) async fn check_round(self: &Arc<Self>) {
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
        let primary_lsn = match &results[p] {
            Some(Ok(probe)) if !probe.in_recovery && self.accept_primary(p, probe) => probe.lsn,
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
            if let Some(Ok(Probe {
                in_recovery: true,
                lsn: Some(replay),
                asked_at,
                ..
            })) = &result
            {
                node.note_replayed(replay.0, timeline, *asked_at);
            }
            let (lag_bytes, lag_ms) = match (&result, primary_lsn) {
                (Some(Ok(probe)), Some(primary)) if probe.in_recovery => match probe.lsn {
                    Some(replay) => {
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
