//! The database password never reaches what the shard router shows: its tracing events (every
//! level), the errors of the directory, the cutover and the write guard, their `Debug` output.
//! PostgreSQL requires a password, works, then dies for good.
//!
//! Its own binary: it installs a global tracing subscriber.

use std::fmt::Write as _;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use stanchion_shard_router::cutover::{Cutover, MovedTable, guard_write, install};
use stanchion_shard_router::directory::Directory;
use stanchion_shard_router::{Key, ShardMap, ShardRouter};
use stanchion_testkit::{Node, PostgresCluster};

const PASSWORD: &str = "shard-pw-6e0f13";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_reaches_logs_errors_or_debug_output() {
    let events = stanchion_testkit::events::capture();
    let mut servers = Vec::new();
    let mut pools = Vec::new();
    for _ in 0..2 {
        let cluster = PostgresCluster::builder()
            .replicas(0)
            .password(PASSWORD)
            .start()
            .unwrap();
        let db = cluster.create_database().unwrap();
        assert!(db.primary_url.contains(PASSWORD));
        pools.push(
            PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_millis(300))
                .connect(&db.primary_url)
                .await
                .unwrap(),
        );
        servers.push(cluster);
    }
    for p in &pools {
        sqlx::query("CREATE TABLE t (id bigint PRIMARY KEY, slot integer NOT NULL)")
            .execute(p)
            .await
            .unwrap();
    }
    install(&pools[0], &[1, 2], 1).await.unwrap();
    sqlx::query("INSERT INTO t SELECT g, g % 2 + 1 FROM generate_series(0, 99) g")
        .execute(&pools[0])
        .await
        .unwrap();
    let table = MovedTable::new("t", "id", "slot").unwrap();
    let cutover = Cutover::new(pools[0].clone(), pools[1].clone(), vec![2], 2, vec![table]);
    let report = cutover.run().await.unwrap();
    let router = ShardRouter::new(ShardMap::uniform(64, 2).unwrap(), vec!["a", "b"]).unwrap();
    let dir = Directory::new(
        pools[0].clone(),
        50,
        Duration::from_secs(60),
        Duration::from_secs(60),
    )
    .unwrap();
    dir.install().await.unwrap();
    dir.route(&router, Key::from("tenant-1")).await.unwrap();

    // Both databases die and do not come back.
    for s in &mut servers {
        tokio::task::block_in_place(|| s.kill(Node::Primary).unwrap());
    }
    let mut errors = Vec::new();
    if let Err(e) = dir.route(&router, Key::from("tenant-2")).await {
        errors.push(format!("{e}\n{e:?}"));
    }
    if let Err(e) = dir.pin(Key::from("tenant-3"), 1).await {
        errors.push(format!("{e}\n{e:?}"));
    }
    if let Err(e) = cutover.run().await {
        errors.push(format!("{e}\n{e:?}"));
    }
    if let Err(e) = cutover.abort().await {
        errors.push(format!("{e}\n{e:?}"));
    }
    match pools[0].acquire().await {
        Ok(mut conn) => {
            if let Err(e) = guard_write(&mut conn, 1).await {
                errors.push(format!("{e}\n{e:?}"));
            }
        }
        Err(e) => errors.push(format!("{e}\n{e:?}")),
    }
    assert!(errors.len() >= 4, "{errors:?}");
    let mut shown = events.text();
    let _ = write!(
        shown,
        "\n{}\n{cutover:?}\n{report:?}\n{dir:?}\n{router:?}",
        errors.join("\n")
    );
    assert!(
        !shown.contains(PASSWORD),
        "the password appears in:\n{shown}"
    );
    eprintln!(
        "{} lines of events and errors checked",
        shown.lines().count()
    );
}
