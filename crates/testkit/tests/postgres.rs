//! The PostgreSQL helpers do what they say: replication, controlled lag, kill/restart, promotion.

use std::time::{Duration, Instant};

use stanchion_testkit::{Node, PostgresCluster};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn primary_and_two_replicas_replicate_pause_restart_and_promote() {
    let start = Instant::now();
    let mut cluster = PostgresCluster::start(2).unwrap();
    eprintln!(
        "primary + 2 streaming replicas ready in {:?}",
        start.elapsed()
    );
    let db = cluster.create_database().unwrap();
    let name = db.name.as_str();

    // A write on the primary appears on every replica.
    cluster
        .sql(
            Node::Primary,
            name,
            "CREATE TABLE t (id int); INSERT INTO t VALUES (1)",
        )
        .unwrap();
    for i in 0..2 {
        cluster.wait_replayed(i, WAIT).unwrap();
        assert_eq!(
            cluster
                .sql(Node::Replica(i), name, "SELECT count(*) FROM t")
                .unwrap(),
            "1"
        );
    }
    // Replicas refuse writes.
    let err = cluster
        .sql(Node::Replica(0), name, "INSERT INTO t VALUES (2)")
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");

    // Paused replay: a positive LSN gap and a stale snapshot; resuming closes both.
    cluster.pause_replay(0).unwrap();
    cluster
        .sql(
            Node::Primary,
            name,
            "INSERT INTO t SELECT generate_series(2, 100)",
        )
        .unwrap();
    cluster.wait_replayed(1, WAIT).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(cluster.replay_lag_bytes(0).unwrap() > 0);
    assert_eq!(
        cluster
            .sql(Node::Replica(0), name, "SELECT count(*) FROM t")
            .unwrap(),
        "1"
    );
    assert_eq!(
        cluster
            .sql(Node::Replica(1), name, "SELECT count(*) FROM t")
            .unwrap(),
        "100"
    );
    cluster.resume_replay(0).unwrap();
    cluster.wait_replayed(0, WAIT).unwrap();
    assert_eq!(cluster.replay_lag_bytes(0).unwrap(), 0);
    assert_eq!(
        cluster
            .sql(Node::Replica(0), name, "SELECT count(*) FROM t")
            .unwrap(),
        "100"
    );

    // A killed replica refuses connections, and after a restart streams and catches up again.
    cluster.kill_replica(1).unwrap();
    assert!(!cluster.is_running(Node::Replica(1)));
    assert!(cluster.sql(Node::Replica(1), name, "SELECT 1").is_err());
    cluster
        .sql(Node::Primary, name, "INSERT INTO t VALUES (101)")
        .unwrap();
    cluster.restart_replica(1).unwrap();
    cluster.wait_replayed(1, WAIT).unwrap();
    assert_eq!(
        cluster
            .sql(Node::Replica(1), name, "SELECT count(*) FROM t")
            .unwrap(),
        "101"
    );

    // A promoted replica accepts writes.
    cluster.kill(Node::Primary).unwrap();
    cluster.promote(0).unwrap();
    cluster
        .sql(Node::Replica(0), name, "INSERT INTO t VALUES (102)")
        .unwrap();
    assert_eq!(
        cluster
            .sql(Node::Replica(0), name, "SELECT max(id) FROM t")
            .unwrap(),
        "102"
    );
}

#[test]
fn databases_are_isolated_on_the_shared_cluster() {
    let cluster = PostgresCluster::shared().unwrap();
    let a = cluster.create_database().unwrap();
    let b = cluster.create_database().unwrap();
    assert_ne!(a.name, b.name);
    assert_eq!(a.replica_urls.len(), 2);
    cluster
        .sql(Node::Primary, &a.name, "CREATE TABLE only_in_a (x int)")
        .unwrap();
    let err = cluster
        .sql(Node::Primary, &b.name, "SELECT * FROM only_in_a")
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    // Created databases are already on the replicas.
    assert_eq!(
        cluster.sql(Node::Replica(1), &b.name, "SELECT 1").unwrap(),
        "1"
    );
}

#[test]
fn passwords_are_required_and_kept_out_of_debug_and_errors() {
    let cluster = PostgresCluster::builder()
        .replicas(1)
        .password("pg-very-secret")
        .start()
        .unwrap();
    assert!(cluster.url(Node::Primary).contains("pg-very-secret"));
    assert!(!format!("{cluster:?}").contains("pg-very-secret"));
    let db = cluster.create_database().unwrap();
    assert!(!format!("{db:?}").contains("pg-very-secret"));
    // The replica streams through a SCRAM-authenticated replication connection.
    cluster
        .sql(Node::Primary, &db.name, "CREATE TABLE t (x int)")
        .unwrap();
    cluster.wait_replayed(0, WAIT).unwrap();
    let err = cluster
        .sql(Node::Replica(0), &db.name, "SELECT * FROM missing")
        .unwrap_err();
    assert!(!err.to_string().contains("pg-very-secret"), "{err}");
    // Without the password, TCP connections are refused.
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-w",
            "-c",
            "SELECT 1",
        ])
        .arg("-p")
        .arg(cluster.port(Node::Primary).unwrap().to_string())
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success());
}
