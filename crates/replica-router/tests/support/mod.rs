//! Shared helpers: a database with a `counters` table replayed on both replicas, and a router
//! over the testkit's cluster with short health intervals.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use stanchion_replica_router::{ReplicaRouter, ReplicaRouterBuilder};
use stanchion_testkit::{Node, PostgresCluster, TestDatabase};

/// A router over the primary and both replicas, checking every 100 ms.
pub fn builder(db: &TestDatabase) -> ReplicaRouterBuilder {
    builder_for(&db.primary_url, [&db.replica_urls[0], &db.replica_urls[1]])
}

/// The same router given the nodes' URLs (replicas named `r0`, `r1`).
pub fn builder_for(primary: &str, replicas: [&str; 2]) -> ReplicaRouterBuilder {
    ReplicaRouter::builder()
        .primary("primary", primary)
        .replica("r0", replicas[0])
        .replica("r1", replicas[1])
        .health_interval(Duration::from_millis(100))
        .probe_timeout(Duration::from_millis(500))
}

/// A new database with `counters (id 0..=15, v 0)`, replayed on both replicas.
pub async fn setup(cluster: &PostgresCluster) -> TestDatabase {
    let db = cluster.create_database().unwrap();
    cluster
        .sql(
            Node::Primary,
            &db.name,
            "CREATE TABLE counters (id int PRIMARY KEY, v bigint NOT NULL); \
             INSERT INTO counters SELECT g, 0 FROM generate_series(0, 15) g",
        )
        .unwrap();
    cluster.wait_replayed(0, Duration::from_secs(10)).unwrap();
    cluster.wait_replayed(1, Duration::from_secs(10)).unwrap();
    db
}
