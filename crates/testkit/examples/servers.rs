//! Brings up what Stanchion's tests run against, shows each fault helper once, and prints how
//! long each step took.
//!
//! `cargo run -p stanchion-testkit --example servers`

use std::time::{Duration, Instant};

use stanchion_testkit::{Fault, FaultProxy, Node, PostgresCluster, RedisCluster, RedisServer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let redis = RedisServer::start()?;
    println!(
        "redis-server ready on {} in {:?}",
        redis.addr(),
        t.elapsed()
    );

    let t = Instant::now();
    let redis_cluster = RedisCluster::start(3)?;
    println!(
        "Redis Cluster with {} masters ready in {:?}",
        redis_cluster.nodes().len(),
        t.elapsed()
    );

    let t = Instant::now();
    let pg = PostgresCluster::start(2)?;
    println!(
        "PostgreSQL primary + 2 streaming replicas ready in {:?}",
        t.elapsed()
    );

    let db = pg.create_database()?;
    pg.sql(Node::Primary, &db.name, "CREATE TABLE orders (id int)")?;
    pg.pause_replay(0)?;
    pg.sql(
        Node::Primary,
        &db.name,
        "INSERT INTO orders SELECT generate_series(1, 1000)",
    )?;
    pg.wait_replayed(1, Duration::from_secs(10))?;
    let count = |node| pg.sql(node, &db.name, "SELECT count(*) FROM orders");
    println!(
        "replay paused on replica0: lag {} bytes; rows seen: primary {}, replica0 {}, replica1 {}",
        pg.replay_lag_bytes(0)?,
        count(Node::Primary)?,
        count(Node::Replica(0))?,
        count(Node::Replica(1))?
    );
    pg.resume_replay(0)?;
    pg.wait_replayed(0, Duration::from_secs(10))?;
    println!(
        "replay resumed: lag {} bytes, replica0 sees {} rows",
        pg.replay_lag_bytes(0)?,
        count(Node::Replica(0))?
    );

    let proxy = FaultProxy::start(redis.addr())?;
    let client = redis::Client::open(format!("redis://{}/", proxy.addr()))?;
    let mut conn = client.get_connection()?;
    for fault in [Fault::None, Fault::Latency(Duration::from_millis(25))] {
        proxy.set(fault);
        let t = Instant::now();
        let _: String = redis::cmd("PING").query(&mut conn)?;
        println!("PING through the proxy with {fault:?}: {:?}", t.elapsed());
    }
    Ok(())
}
