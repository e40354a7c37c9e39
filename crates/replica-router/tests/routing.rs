//! The router against a real PostgreSQL primary with two streaming replicas (testkit).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stanchion_replica_router::{
    Consistency, Fallback, ReplicaRouter, Role, RouteError, SessionToken,
};
use stanchion_testkit::{Node, PostgresCluster};
use support::{builder, setup};

/// Increments counter `id` on the primary and returns the new value and its token.
async fn bump(router: &ReplicaRouter, id: i32) -> (i64, stanchion_replica_router::WriteToken) {
    let mut tx = router.begin_write().await.unwrap();
    let v: i64 = sqlx::query_scalar("UPDATE counters SET v = v + 1 WHERE id = $1 RETURNING v")
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    (v, router.commit(tx).await.unwrap())
}

async fn read_value(router: &ReplicaRouter, id: i32, c: Consistency<'_>) -> (i64, Role) {
    let mut conn = router.read(c).await.unwrap();
    let v: i64 = sqlx::query_scalar("SELECT v FROM counters WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    (v, conn.route().role)
}

/// Runs `cycles` write-then-read cycles over 8 tasks; returns (stale reads, reads on replicas).
async fn cycles(router: &ReplicaRouter, cycles: u64, with_token: bool) -> (u64, u64) {
    let stale = Arc::new(AtomicU64::new(0));
    let on_replica = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..8 {
        let (router, stale, on_replica) = (router.clone(), stale.clone(), on_replica.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..cycles / 8 {
                let (written, token) = bump(&router, id).await;
                let consistency = if with_token {
                    Consistency::AtLeast(token)
                } else {
                    Consistency::Any
                };
                let (read, role) = read_value(&router, id, consistency).await;
                if read < written {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                if role == Role::Replica {
                    on_replica.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (
        stale.load(Ordering::Relaxed),
        on_replica.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_read_stale_data_and_reads_without_tokens_do() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        // Keep the paused replica admitted, so reads without tokens can land on it.
        .lag_bytes(u64::MAX, u64::MAX)
        .lag_time(Duration::from_secs(3600), Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    cluster.pause_replay(0).unwrap();

    let start = Instant::now();
    let (stale, on_replica) = cycles(&router, 10_000, true).await;
    eprintln!(
        "10000 token cycles in {:?}: {stale} stale, {on_replica} served by a replica",
        start.elapsed()
    );
    assert_eq!(stale, 0, "a token read returned data older than its write");
    assert!(
        on_replica > 5_000,
        "token reads mostly stay on replicas ({on_replica})"
    );

    let (stale, _) = cycles(&router, 2_000, false).await;
    eprintln!("2000 cycles without tokens: {stale} stale");
    assert!(
        stale > 0,
        "without tokens the paused replica serves stale reads"
    );
    cluster.resume_replay(0).unwrap();
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_read_monotonically_and_windows_and_staleness_route_as_documented() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        .lag_bytes(u64::MAX, u64::MAX)
        .lag_time(Duration::from_secs(3600), Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    cluster.pause_replay(0).unwrap();
    let session = SessionToken::default();
    let mut last = 0;
    for _ in 0..200 {
        let (_, token) = bump(&router, 1).await;
        // Another request of the same session (a different page) writes nothing but must not
        // see the past; half of the time it learns the write only through the session.
        session.observe(token);
        let (v, _) = read_value(&router, 1, Consistency::Session(&session)).await;
        assert!(v >= last, "session went back from {last} to {v}");
        last = v;
    }
    // Rails-style window: right after a write, the primary.
    let (_, role) = read_value(
        &router,
        1,
        Consistency::AfterWrite {
            at: Instant::now(),
            window: Duration::from_secs(2),
        },
    )
    .await;
    assert_eq!(role, Role::Primary);
    // Bounded staleness excludes the paused replica once its lag is measured.
    cluster
        .sql(
            Node::Primary,
            &db.name,
            "UPDATE counters SET v = v + 1 WHERE id = 2",
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    router.check_now().await;
    for _ in 0..50 {
        assert_eq!(
            router.select(Consistency::MaxStaleness(Duration::from_millis(500))),
            Some("r1")
        );
    }
    cluster.resume_replay(0).unwrap();
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_held_back_is_ejected_above_the_threshold_and_readmitted_after() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        .lag_bytes(256 * 1024, 64 * 1024)
        .readmission(2, Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let admitted = |name: &str| router.status().iter().any(|s| s.name == name && s.admitted);
    assert!(admitted("r0") && admitted("r1"));
    cluster.pause_replay(0).unwrap();
    cluster
        .sql(Node::Primary, &db.name, "CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 20000) g")
        .unwrap();
    cluster.wait_replayed(1, Duration::from_secs(10)).unwrap();
    router.check_now().await;
    assert!(!admitted("r0"), "{:?}", router.status());
    // r1 may have been caught mid-replay of the big write by the background checker: it comes
    // back once caught up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admitted("r1") {
        assert!(
            Instant::now() < deadline,
            "r1 never readmitted: {:?}",
            router.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!admitted("r0"), "{:?}", router.status());
    for _ in 0..100 {
        assert_eq!(router.select(Consistency::Any), Some("r1"));
    }
    cluster.resume_replay(0).unwrap();
    cluster.wait_replayed(0, Duration::from_secs(10)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admitted("r0") {
        assert!(
            Instant::now() < deadline,
            "never readmitted: {:?}",
            router.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_costs_no_failed_read_and_is_readmitted_after_restart() {
    let mut cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        .readmission(2, Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // Warm both replicas' pools.
    for _ in 0..20 {
        read_value(&router, 0, Consistency::Any).await;
    }
    cluster.kill_replica(1).unwrap();
    let mut failed = 0;
    for _ in 0..500 {
        let result = async {
            let mut conn = router.read(Consistency::Any).await?;
            let v: Result<i64, sqlx::Error> =
                sqlx::query_scalar("SELECT v FROM counters WHERE id = 0")
                    .fetch_one(&mut *conn)
                    .await;
            match v {
                Ok(v) => Ok::<_, RouteError>(v),
                Err(e) => {
                    conn.mark_failed();
                    Err(RouteError::Database {
                        node: "?".into(),
                        source: e,
                    })
                }
            }
        }
        .await;
        failed += u32::from(result.is_err());
    }
    // Pooled connections to the dead replica fail their first query (they were open when it
    // died); the router ejects it at once, so at most one read per such connection fails.
    assert!(failed <= 16, "{failed} failed reads");
    router.check_now().await;
    assert!(!router.status().iter().any(|s| s.name == "r1" && s.admitted));
    let mut failed_after = 0;
    for _ in 0..200 {
        let r = read_value_checked(&router).await;
        failed_after += u32::from(r.is_err());
    }
    assert_eq!(failed_after, 0, "reads after ejection all succeed");
    cluster.restart_replica(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !router.status().iter().any(|s| s.name == "r1" && s.admitted) {
        assert!(
            Instant::now() < deadline,
            "never readmitted: {:?}",
            router.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    router.close().await;
}

async fn read_value_checked(router: &ReplicaRouter) -> Result<i64, RouteError> {
    let mut conn = router.read(Consistency::Any).await?;
    let node = conn.route().node.clone();
    sqlx::query_scalar("SELECT v FROM counters WHERE id = 0")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| RouteError::Database { node, source: e })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_a_promoted_replica_after_detection() {
    let mut cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db).build().await.unwrap();
    bump(&router, 3).await;
    cluster.kill(Node::Primary).unwrap();
    cluster.promote(0).unwrap();
    // Until the checker notices (within one interval), writes fail with a transient error.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match router.begin_write().await {
            Ok(mut tx) => {
                sqlx::query("UPDATE counters SET v = v + 100 WHERE id = 3")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let token = router.commit(tx).await.unwrap();
                assert_eq!(router.primary_name(), "r0");
                let (v, _) = read_value(&router, 3, Consistency::AtLeast(token)).await;
                assert_eq!(v, 101);
                break;
            }
            Err(e) => {
                assert!(e.is_transient(), "{e:?}");
                assert!(Instant::now() < deadline, "no new primary found");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(
        router
            .status()
            .iter()
            .any(|s| s.name == "r0" && s.role == Role::Primary)
    );
    router.close().await;
}

#[tokio::test]
async fn the_read_side_refuses_writes_loudly() {
    let cluster = PostgresCluster::shared().unwrap();
    let db = setup(cluster).await;
    let router = builder(&db).build().await.unwrap();
    for c in [Consistency::Any, Consistency::Primary] {
        let mut conn = router.read(c).await.unwrap();
        let err = sqlx::query("UPDATE counters SET v = 0")
            .execute(&mut *conn)
            .await
            .unwrap_err();
        let code = err
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("25006"), "{err}");
    }
    // A read-only transaction for several statements.
    let mut conn = router.read(Consistency::Any).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM counters")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 16);
    drop(tx);
    drop(conn);
    // `close` waits for connections in use to come back, like sqlx's `Pool::close`.
    router.close().await;
}

#[tokio::test]
async fn no_replica_falls_back_to_the_primary_or_fails_as_configured() {
    let cluster = PostgresCluster::shared().unwrap();
    let db = setup(cluster).await;
    // Replicas that do not exist (free ports): never admitted.
    let bogus = |port: u16| format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
    let fallback = ReplicaRouter::builder()
        .primary("primary", &db.primary_url)
        .replica("gone", &bogus(1))
        .probe_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let conn = fallback.read(Consistency::Any).await.unwrap();
    assert_eq!(conn.route().role, Role::Primary);
    assert!(conn.route().fallback);
    drop(conn);
    let strict = ReplicaRouter::builder()
        .primary("primary", &db.primary_url)
        .replica("gone", &bogus(1))
        .probe_timeout(Duration::from_millis(200))
        .when_no_replica(Fallback::Error)
        .token_wait(Duration::from_millis(5), Fallback::Error)
        .build()
        .await
        .unwrap();
    assert!(matches!(
        strict.read(Consistency::Any).await,
        Err(RouteError::NoReplica)
    ));
    let token = strict.write_token().await.unwrap();
    assert!(matches!(
        strict.read(Consistency::AtLeast(token)).await,
        Err(RouteError::TokenTimeout { .. })
    ));
    fallback.close().await;
    strict.close().await;
}
