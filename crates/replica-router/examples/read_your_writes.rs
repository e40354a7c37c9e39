//! A real primary and two streaming replicas (testkit); replay is paused on one replica. Writes
//! followed by reads with and without a write token show what the token buys.
//!
//! `cargo run -p stanchion-replica-router --example read_your_writes`

use std::time::Duration;

use stanchion_replica_router::{Consistency, ReplicaRouter, Role};
use stanchion_testkit::{Node, PostgresCluster};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = PostgresCluster::start(2)?;
    let db = cluster.create_database()?;
    cluster.sql(
        Node::Primary,
        &db.name,
        "CREATE TABLE carts (user_id int PRIMARY KEY, items int)",
    )?;
    cluster.sql(Node::Primary, &db.name, "INSERT INTO carts VALUES (42, 0)")?;
    cluster.wait_replayed(0, Duration::from_secs(5))?;
    cluster.wait_replayed(1, Duration::from_secs(5))?;

    let router = ReplicaRouter::builder()
        .primary("primary", &db.primary_url)
        .replica("replica-0", &db.replica_urls[0])
        .replica("replica-1", &db.replica_urls[1])
        // Keep the paused replica in rotation to show what happens without tokens.
        .lag_time(Duration::from_secs(3600), Duration::from_secs(3600))
        .build()
        .await?;
    cluster.pause_replay(0)?;
    println!("replay paused on replica-0");

    for with_token in [false, true] {
        let (mut stale, mut on_replica) = (0, 0);
        for _ in 0..500 {
            let mut tx = router.begin_write().await?;
            let written: i32 = sqlx::query_scalar(
                "UPDATE carts SET items = items + 1 WHERE user_id = 42 RETURNING items",
            )
            .fetch_one(&mut *tx)
            .await?;
            let token = router.commit(tx).await?;
            let consistency = if with_token {
                Consistency::AtLeast(token)
            } else {
                Consistency::Any
            };
            let mut read = router.read(consistency).await?;
            let seen: i32 = sqlx::query_scalar("SELECT items FROM carts WHERE user_id = 42")
                .fetch_one(&mut *read)
                .await?;
            stale += i32::from(seen < written);
            on_replica += i32::from(read.route().role == Role::Replica);
        }
        println!(
            "500 write-then-read cycles {}: {stale} stale reads, {on_replica} served by replicas",
            if with_token {
                "with tokens   "
            } else {
                "without tokens"
            }
        );
    }
    for node in router.status() {
        println!(
            "  {:<10} {:?} admitted={} lag={:?} bytes={:?}",
            node.name, node.role, node.admitted, node.lag, node.lag_bytes
        );
    }
    cluster.resume_replay(0)?;
    router.close().await;
    Ok(())
}
