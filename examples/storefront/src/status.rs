//! Health, Prometheus metrics, the status JSON and the live status page.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::{Instance, InstanceInner, Shop};

/// The status page: static HTML polling `/api/v1/status` once a second.
pub(crate) const PAGE: &str = include_str!("../static/index.html");

/// Events waiting in every shard's outbox.
pub(crate) async fn outbox_depth(shop: &Shop) -> Result<i64, crate::store::StoreError> {
    let mut depth = 0u64;
    for shard in &shop.shard_list {
        depth = depth.saturating_add(shard.outbox_stats().await?.depth);
    }
    Ok(i64::try_from(depth).unwrap_or(i64::MAX))
}

/// The largest replay lag of any replica behind any shard's router, in milliseconds (`None` on
/// the embedded default, which has no replicas).
fn replica_lag_ms(shop: &Shop) -> Option<u64> {
    let mut worst: Option<u64> = None;
    for shard in &shop.shard_list {
        if let crate::store::Shard::Pg { router, .. } = shard {
            for node in router.status() {
                if let Some(lag) = node.lag {
                    let ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
                    worst = Some(worst.map_or(ms, |w| w.max(ms)));
                } else if node.role == stanchion_replica_router::Role::Replica {
                    worst = Some(worst.unwrap_or(0));
                }
            }
        }
    }
    worst
}

/// One instance's figures.
#[derive(Debug, Serialize)]
pub struct InstanceStatus {
    /// Instance number.
    pub id: usize,
    /// Requests to the API.
    pub requests: u64,
    /// Answered 429.
    pub rate_limited: u64,
    /// The payment breaker's state.
    pub breaker_state: String,
    /// Its state changes.
    pub breaker_transitions: u64,
    /// Calls it refused.
    pub breaker_rejected: u64,
    /// L1 hits / (hits + misses).
    pub l1_hit_ratio: f64,
    /// L2 hits / (hits + misses).
    pub l2_hit_ratio: f64,
    /// Invalidations received from other instances.
    pub invalidations_received: u64,
    /// Sagas this instance's executor completed.
    pub sagas_completed: u64,
    /// ... compensated.
    pub sagas_compensated: u64,
    /// ... parked.
    pub sagas_parked: u64,
    /// Reads that went to the database because the caller's token was newer than the cache.
    pub ryw_bypasses: u64,
}

/// The shop's figures.
#[derive(Debug, Serialize)]
pub struct ShopStatus {
    /// Every live instance.
    pub instances: Vec<InstanceStatus>,
    /// Events not yet published.
    pub outbox_depth: i64,
    /// Events published by all relays.
    pub outbox_published: u64,
    /// Commit-to-publish latency, p50 over relays' windows (worst relay), microseconds.
    pub publish_p50_us: u64,
    /// ... p99.
    pub publish_p99_us: u64,
    /// Product events applied to the search table (first deliveries).
    pub events_applied: u64,
    /// Redeliveries the inbox recognised.
    pub events_duplicate: u64,
    /// The worst replica replay lag behind any shard, milliseconds (none when embedded).
    pub replica_lag_ms: Option<u64>,
    /// Replicas the routers currently send reads to, over all shards.
    pub replicas_admitted: usize,
}

fn ratio(hits: u64, misses: u64) -> f64 {
    let total = hits.saturating_add(misses);
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

pub(crate) fn instance_status(i: &InstanceInner) -> InstanceStatus {
    let cache = i.products.stats();
    let sagas = i.executor.stats();
    let breaker = i.payments.circuit_breaker().map(|b| b.stats());
    InstanceStatus {
        id: i.id,
        requests: i.counters.requests.load(Ordering::Relaxed),
        rate_limited: i.counters.limited.load(Ordering::Relaxed),
        breaker_state: breaker.map_or_else(|| "none".into(), |b| format!("{:?}", b.state)),
        breaker_transitions: breaker.map_or(0, |b| b.transitions),
        breaker_rejected: breaker.map_or(0, |b| b.rejected),
        l1_hit_ratio: ratio(cache.l1_hits, cache.l1_misses),
        l2_hit_ratio: ratio(cache.l2_hits, cache.l2_misses),
        invalidations_received: cache.invalidations_received,
        sagas_completed: sagas.completed,
        sagas_compensated: sagas.compensated,
        sagas_parked: sagas.parked,
        ryw_bypasses: i.counters.ryw_bypass.load(Ordering::Relaxed),
    }
}

/// The shop's status as one JSON value.
pub async fn shop_status(shop: &Shop) -> ShopStatus {
    let live: Vec<Arc<InstanceInner>> = shop
        .instances
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    let (mut published, mut p50, mut p99) = (0u64, 0u64, 0u64);
    for relay in shop.relays.lock().await.iter() {
        let s = relay.stats();
        published = published.saturating_add(s.published);
        p50 = p50.max(s.latency_p50_us);
        p99 = p99.max(s.latency_p99_us);
    }
    ShopStatus {
        instances: live.iter().map(|i| instance_status(i)).collect(),
        outbox_depth: outbox_depth(shop).await.unwrap_or(-1),
        outbox_published: published,
        publish_p50_us: p50,
        publish_p99_us: p99,
        events_applied: shop.counters.events_applied.load(Ordering::Relaxed),
        events_duplicate: shop.counters.events_duplicate.load(Ordering::Relaxed),
        replica_lag_ms: replica_lag_ms(shop),
        replicas_admitted: shop
            .shard_list
            .iter()
            .map(|s| match s {
                crate::store::Shard::Pg { router, .. } => router
                    .status()
                    .iter()
                    .filter(|n| n.role == stanchion_replica_router::Role::Replica && n.admitted)
                    .count(),
                crate::store::Shard::Sqlite { .. } => 0,
            })
            .sum(),
    }
}

pub(crate) async fn status(State(instance): State<Instance>) -> Response {
    let s = shop_status(&instance.inner.shop).await;
    axum::Json(crate::api::Envelope {
        success: true,
        data: Some(s),
        error: None,
        meta: None,
    })
    .into_response()
}

/// Ready when every database answers and every relay runs.
pub(crate) async fn ready(State(instance): State<Instance>) -> Response {
    let shop = &instance.inner.shop;
    let mut problems = Vec::new();
    for shard in &shop.shard_list {
        if !shard.ping().await {
            problems.push(format!("shard {} database", shard.index()));
        }
    }
    if !shop.orders.ping().await {
        problems.push("orders database".to_owned());
    }
    if let Some(redis) = &shop.health.redis {
        let mut conn = redis.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        if !matches!(
            tokio::time::timeout(Duration::from_millis(500), ping).await,
            Ok(Ok(_))
        ) {
            problems.push("redis".to_owned());
        }
    }
    if let Some(nats) = &shop.health.nats
        && nats.connection_state() != async_nats::connection::State::Connected
    {
        problems.push("nats".to_owned());
    }
    if shop.relays.lock().await.iter().any(|r| r.is_finished()) {
        problems.push("an outbox relay stopped".to_owned());
    }
    let body = serde_json::json!({
        "success": problems.is_empty(),
        "data": { "checks": problems.is_empty(), "failing": problems },
        "error": if problems.is_empty() { serde_json::Value::Null } else {
            serde_json::json!({ "code": "not_ready", "message": "a dependency is down" })
        },
        "meta": null,
    });
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// Prometheus text format.
pub(crate) async fn metrics(State(instance): State<Instance>) -> Response {
    match &instance.inner.shop.metrics {
        Some(handle) => (
            [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed",
        )
            .into_response(),
    }
}
