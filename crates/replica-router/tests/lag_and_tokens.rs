//! Lag on an idle primary, and write tokens under asynchronous commit, on real replication.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::Connection;
use stanchion_replica_router::{Consistency, ReplicaRouter, Role};
use stanchion_testkit::{Node, PostgresCluster};
use support::{builder, setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_keeps_up_with_an_idle_primary_is_never_ejected_for_lag() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        // Only the rounds this test runs: each one right after a single small record.
        .health_interval(Duration::from_secs(3600))
        .lag_time(Duration::from_millis(500), Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let mut primary = sqlx::PgConnection::connect(&db.primary_url).await.unwrap();
    // The replicas' last replayed transaction gets old: an idle primary.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut lagging_rounds = 0;
    for attempt in 0..40 {
        // One small WAL record outside any transaction, then a health round at once.
        sqlx::query("SELECT pg_logical_emit_message(false, 'stanchion', 'tick')")
            .execute(&mut primary)
            .await
            .unwrap();
        router.check_now().await;
        let status = router.status();
        for s in status.iter().filter(|s| s.role == Role::Replica) {
            assert!(s.admitted, "attempt {attempt}: {s:?}");
            if s.lag_bytes.is_some_and(|b| b > 0) {
                lagging_rounds += 1;
            }
        }
        if attempt % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    eprintln!(
        "40 single records: a replica was caught behind in {lagging_rounds} rounds, never ejected"
    );
    router.close().await;
}

/// Writes with `synchronous_commit = off` set per connection (`per_transaction = false`) or
/// with `SET LOCAL` in each transaction, then reads with the token from 8 tasks.
async fn async_commit_cycles(router: &ReplicaRouter, cycles: u64, per_transaction: bool) -> u64 {
    let stale = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..8 {
        let (router, stale) = (router.clone(), stale.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..cycles / 8 {
                let mut tx = router.begin_write().await.unwrap();
                let set = if per_transaction {
                    "SET LOCAL synchronous_commit = off"
                } else {
                    "SET synchronous_commit = off"
                };
                sqlx::query(set).execute(&mut *tx).await.unwrap();
                let written: i64 =
                    sqlx::query_scalar("UPDATE counters SET v = v + 1 WHERE id = $1 RETURNING v")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await
                        .unwrap();
                let token = router.commit(tx).await.unwrap();
                let mut conn = router.read(Consistency::AtLeast(token)).await.unwrap();
                let read: i64 = sqlx::query_scalar("SELECT v FROM counters WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                if read < written {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stale.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_hold_under_asynchronous_commit_per_connection_and_per_transaction() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        .health_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let per_connection = async_commit_cycles(&router, 4000, false).await;
    let per_transaction = async_commit_cycles(&router, 4000, true).await;
    eprintln!(
        "synchronous_commit = off: {per_connection} stale of 4000 (per connection), \
         {per_transaction} stale of 4000 (per transaction)"
    );
    assert_eq!(per_connection, 0);
    assert_eq!(per_transaction, 0);
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_forward_on_what_its_reads_saw_not_only_on_its_writes() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db)
        .health_interval(Duration::from_millis(100))
        // Turns, so that reads alternate between the stale and the fresh replica.
        .policy(stanchion_replica_router::RoundRobin::default())
        // Keep the paused replica admitted: only the session keeps reads off it.
        .lag_bytes(u64::MAX, u64::MAX)
        .lag_time(Duration::from_secs(3600), Duration::from_secs(3600))
        .token_wait(
            Duration::from_millis(20),
            stanchion_replica_router::Fallback::Primary,
        )
        .build()
        .await
        .unwrap();
    cluster.pause_replay(0).unwrap();
    // Another user's write: this session never gets its token.
    cluster
        .sql(
            Node::Primary,
            &db.name,
            "UPDATE counters SET v = 42 WHERE id = 5",
        )
        .unwrap();
    cluster.wait_replayed(1, Duration::from_secs(10)).unwrap();

    // The control: reads without a session still land on the stale replica.
    let mut stale_any = 0;
    for _ in 0..100 {
        let mut conn = router.read(Consistency::Any).await.unwrap();
        let v: i64 = sqlx::query_scalar("SELECT v FROM counters WHERE id = 5")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        stale_any += usize::from(v != 42);
    }
    assert!(
        stale_any > 0,
        "reads without a session reach the paused replica"
    );

    let session = stanchion_replica_router::SessionToken::default();
    let read = |session| {
        let router = router.clone();
        async move {
            let mut conn = router.read(Consistency::Session(session)).await.unwrap();
            let v: i64 = sqlx::query_scalar("SELECT v FROM counters WHERE id = 5")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            (v, conn.route().node.clone())
        }
    };
    // Until a read lands on r1, the session may see the old value on r0.
    let mut seen_new = false;
    let mut old_reads = 0;
    for _ in 0..200 {
        let (v, node) = read(&session).await;
        if v == 42 {
            assert_eq!(node, "r1");
            seen_new = true;
            break;
        }
        old_reads += 1;
    }
    assert!(
        seen_new,
        "no read landed on r1 in 200 tries: {:?}",
        router.status()
    );
    // From now on the session never goes back, though r0 is still admitted and stale.
    let mut nodes = std::collections::HashSet::new();
    for _ in 0..200 {
        let (v, node) = read(&session).await;
        assert_eq!(
            v, 42,
            "the session went back after seeing the write (on {node})"
        );
        nodes.insert(node);
    }
    eprintln!("{old_reads} reads before the session saw the write; after it, reads on {nodes:?}");
    assert!(!nodes.contains("r0"), "{nodes:?}");
    cluster.resume_replay(0).unwrap();
    router.close().await;
}
