//! Token reads routed on replay positions the router already knows (no check query), and the
//! case that knowledge must not cover: a connection opened after it, to a server that may have
//! restarted behind it. Real replication from the testkit.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use stanchion_replica_router::{Consistency, Fallback, ReplicaRouter, Role, SessionToken};
use stanchion_testkit::{FaultProxy, Node, PostgresCluster};
use support::setup;

async fn read_v(router: &ReplicaRouter, consistency: Consistency<'_>) -> (i64, String, Role) {
    let mut conn = router.read(consistency).await.unwrap();
    let v: i64 = sqlx::query_scalar("SELECT v FROM counters WHERE id = 5")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    (v, conn.route().node.clone(), conn.route().role)
}

/// Opens read connections at once until every replica has `n` and gives them back to the pool.
async fn warm(router: &ReplicaRouter, replicas: usize, n: usize) {
    let mut held = Vec::new();
    let mut per_node = std::collections::HashMap::new();
    while per_node.len() < replicas || per_node.values().any(|&c| c < n) {
        assert!(held.len() < 100, "connections went to {per_node:?}");
        let mut conn = router.read(Consistency::Any).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
        *per_node.entry(conn.route().node.clone()).or_insert(0) += 1;
        held.push(conn);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reads_of_writes_the_replicas_are_known_to_have_ask_them_nothing() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = support::builder(&db).build().await.unwrap();
    let mut tx = router.begin_write().await.unwrap();
    sqlx::query("UPDATE counters SET v = 42 WHERE id = 5")
        .execute(&mut *tx)
        .await
        .unwrap();
    let token = router.commit(tx).await.unwrap();
    cluster.wait_replayed(0, Duration::from_secs(10)).unwrap();
    cluster.wait_replayed(1, Duration::from_secs(10)).unwrap();
    // Connections opened first, then a health round reads both replicas past the token.
    warm(&router, 2, 2).await;
    router.check_now().await;
    let before = router.token_reads();
    let session = SessionToken::default();
    session.observe(token);
    for i in 0..400 {
        let consistency = if i % 2 == 0 {
            Consistency::AtLeast(token)
        } else {
            Consistency::Session(&session)
        };
        let (v, node, role) = read_v(&router, consistency).await;
        assert_eq!(v, 42, "read {i} on {node}");
        assert_eq!(role, Role::Replica, "read {i} went to {node}");
    }
    let after = router.token_reads();
    eprintln!("{before:?} -> {after:?}");
    // sqlx gives a connection back to its pool on a spawned task, so a read right after
    // another sometimes finds no idle connection and the pool opens one: that connection is
    // newer than the reading and is asked once. Everything else is routed on the reading.
    let (known, checked) = (after.known - before.known, after.checked - before.checked);
    assert_eq!(known + checked, 400);
    assert!(
        checked <= 12,
        "token reads should ask replicas only on new connections: {after:?}"
    );
    // The session moved to what the reading saw, at least its own write.
    assert!(session.token().lsn() >= token.lsn());
    router.close().await;

    // Turned off (behind a pooler that outlives server restarts), every token read asks.
    let asking = support::builder(&db)
        .known_positions(false)
        .build()
        .await
        .unwrap();
    warm(&asking, 2, 2).await;
    asking.check_now().await;
    for _ in 0..50 {
        let (v, _, _) = read_v(&asking, Consistency::AtLeast(token)).await;
        assert_eq!(v, 42);
    }
    let reads = asking.token_reads();
    assert_eq!((reads.known, reads.checked), (0, 50));
    asking.close().await;
}

fn proxied(url: &str, port: u16, proxy: SocketAddr) -> String {
    let with = url.replace(&format!(":{port}/"), &format!(":{}/", proxy.port()));
    assert_ne!(with, url, "the replica URL names its port");
    with
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opened_after_the_last_reading_is_asked_even_if_the_replica_was_known_ahead() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let port = |i| cluster.port(Node::Replica(i)).unwrap();
    let replica_addr = |i| SocketAddr::from(([127, 0, 0, 1], port(i)));
    // The router's only replica is an address that reaches replica 0 now and, after a
    // "restart", replica 1, which is behind: what a client sees when a standby restarts and
    // opens for reads before it has replayed as far as before.
    let proxy = FaultProxy::start(replica_addr(0)).unwrap();
    let router = ReplicaRouter::builder()
        .primary("primary", &db.primary_url)
        .replica("r", &proxied(&db.replica_urls[0], port(0), proxy.addr()))
        // No background round during the test: the router keeps its reading from before.
        .health_interval(Duration::from_secs(3600))
        .lag_bytes(u64::MAX, u64::MAX)
        .lag_time(Duration::from_secs(3600), Duration::from_secs(3600))
        .token_wait(Duration::from_millis(50), Fallback::Primary)
        .build()
        .await
        .unwrap();
    cluster.pause_replay(1).unwrap();
    let mut tx = router.begin_write().await.unwrap();
    sqlx::query("UPDATE counters SET v = 42 WHERE id = 5")
        .execute(&mut *tx)
        .await
        .unwrap();
    let token = router.commit(tx).await.unwrap();
    cluster.wait_replayed(0, Duration::from_secs(10)).unwrap();
    warm(&router, 1, 2).await;
    router.check_now().await;
    let (v, node, _) = read_v(&router, Consistency::AtLeast(token)).await;
    assert_eq!((v, node.as_str()), (42, "r"), "served by the replica");
    assert_eq!(
        router.token_reads().checked,
        0,
        "{:?}",
        router.token_reads()
    );

    // The server behind the address is replaced by one that has not replayed the write.
    proxy.set(stanchion_testkit::Fault::Reset);
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.retarget(replica_addr(1)).unwrap();
    proxy.set(stanchion_testkit::Fault::None);
    // A plain read opens a connection to it (the old ones fail their ping) and shows it is
    // behind; the connection goes back to the pool, newer than the router's reading.
    let (v, node, role) = read_v(&router, Consistency::Any).await;
    assert_eq!((v, node.as_str(), role), (0, "r", Role::Replica));

    for _ in 0..20 {
        let (v, node, role) = read_v(&router, Consistency::AtLeast(token)).await;
        assert_eq!(
            v,
            42,
            "a token read was served stale by {node} ({role:?}): {:?}",
            router.token_reads()
        );
        assert_eq!(role, Role::Primary, "fell back to the primary");
    }
    assert!(
        router.token_reads().checked >= 20,
        "{:?}",
        router.token_reads()
    );
    cluster.resume_replay(1).unwrap();
    router.close().await;
}
