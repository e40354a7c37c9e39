//! Failovers: tokens across timelines and the fencing of an old primary, on real replication.

mod support;

use std::time::{Duration, Instant};

use stanchion_replica_router::{Consistency, ReplicaRouter, RouteError, WriteToken};
use stanchion_testkit::{Node, PostgresCluster};
use support::{builder, setup};

async fn wait_for_primary(router: &ReplicaRouter, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while router.primary_name() != name || router.begin_write().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{name} never became the primary: {:?}",
            router.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_left_on_the_old_timeline_never_serves_a_token_of_the_new_one() {
    let mut cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        .probe_timeout(Duration::from_millis(300))
        .readmission(1, Duration::from_millis(100))
        // Keep every replica admitted whatever its lag: only timelines keep token reads safe.
        .lag_bytes(u64::MAX, u64::MAX)
        .lag_time(Duration::from_secs(3600), Duration::from_secs(3600))
        .token_wait(
            Duration::from_millis(50),
            stanchion_replica_router::Fallback::Primary,
        )
        .build()
        .await
        .unwrap();
    let before: WriteToken = router.write_token().await.unwrap();
    assert_eq!(before.timeline(), Some(1));

    // r0 stops receiving; the primary writes a few MB that only r1 replays; the primary dies.
    cluster.kill(Node::Replica(0)).unwrap();
    cluster
        .sql(
            Node::Primary,
            &db.name,
            "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
        )
        .unwrap();
    cluster.wait_replayed(1, Duration::from_secs(20)).unwrap();
    cluster.kill(Node::Primary).unwrap();
    // r0 comes back with only its own WAL and is promoted: timeline 2 forks far behind r1.
    cluster.restart(Node::Replica(0)).unwrap();
    cluster.promote(0).unwrap();
    wait_for_primary(&router, "r0").await;

    let mut stale = 0;
    let mut on_r1 = 0;
    for i in 0..50i64 {
        let mut tx = router.begin_write().await.unwrap();
        sqlx::query("UPDATE counters SET v = $1 WHERE id = 9")
            .bind(1000 + i)
            .execute(&mut *tx)
            .await
            .unwrap();
        let token = router.commit(tx).await.unwrap();
        assert_eq!(token.timeline(), Some(2), "{token}");
        // The new write's position is below what r1 replayed on the old timeline.
        let mut conn = router.read(Consistency::AtLeast(token)).await.unwrap();
        let v: i64 = sqlx::query_scalar("SELECT v FROM counters WHERE id = 9")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        stale += usize::from(v != 1000 + i);
        on_r1 += usize::from(conn.route().node == "r1");
    }
    let r1 = router
        .status()
        .into_iter()
        .find(|s| s.name == "r1")
        .unwrap();
    eprintln!("after the failover: {stale} stale token reads of 50, {on_r1} on r1 ({r1:?})");
    assert_eq!(stale, 0);
    assert_eq!(on_r1, 0);
    // An old token without a timeline is held to the newest timeline too.
    let old: WriteToken = format!("w1:{}", before.lsn()).parse().unwrap();
    let conn = router.read(Consistency::AtLeast(old)).await.unwrap();
    assert_ne!(conn.route().node, "r1");
    drop(conn);
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_back_without_a_rewind_is_never_taken_as_primary() {
    let mut cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        .probe_timeout(Duration::from_millis(300))
        .readmission(1, Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    cluster.kill(Node::Primary).unwrap();
    cluster.promote(0).unwrap();
    wait_for_primary(&router, "r0").await;
    // The old primary restarts as it was: a primary on timeline 1.
    cluster.restart(Node::Primary).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Now the new primary dies too: the only node accepting writes is the stale one.
    cluster.kill(Node::Replica(0)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut refused = 0;
    while Instant::now() < deadline {
        match router.begin_write().await {
            Ok(_) => panic!(
                "a write went to {} on the old timeline: {:?}",
                router.primary_name(),
                router.status()
            ),
            Err(e) => {
                assert!(e.is_transient(), "{e:?}");
                refused += 1;
            }
        }
        assert_ne!(router.primary_name(), "primary");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused > 0);
    assert!(matches!(
        router.begin_write().await,
        Err(RouteError::PrimaryUnavailable { .. })
    ));
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_the_future_fails_fast() {
    let cluster = PostgresCluster::shared().unwrap();
    let db = setup(cluster).await;
    let router = builder(&db)
        .probe_timeout(Duration::from_millis(300))
        .readmission(1, Duration::from_millis(100))
        .token_wait(
            Duration::from_secs(5),
            stanchion_replica_router::Fallback::Primary,
        )
        .build()
        .await
        .unwrap();
    let now = router.write_token().await.unwrap();
    for forged in [
        WriteToken::on_timeline(stanchion_replica_router::Lsn(now.lsn().0 + (1 << 40)), 1),
        WriteToken::on_timeline(now.lsn(), 99),
    ] {
        let t = Instant::now();
        let err = router.read(Consistency::AtLeast(forged)).await.unwrap_err();
        assert!(matches!(err, RouteError::TokenAhead { .. }), "{err:?}");
        assert!(!err.is_transient());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // A real token from a moment ago is served.
    assert!(router.read(Consistency::AtLeast(now)).await.is_ok());
    router.close().await;
}
