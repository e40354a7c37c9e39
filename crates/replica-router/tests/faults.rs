//! What callers see when servers die, hang, slow down or saturate, on real replication.

mod support;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stanchion_replica_router::{Consistency, ReplicaRouter, RouteError};
use stanchion_testkit::{Node, PostgresCluster};
use support::setup;

/// The shared router settings with a 300 ms probe timeout: faults are noticed sooner.
fn builder(db: &stanchion_testkit::TestDatabase) -> stanchion_replica_router::ReplicaRouterBuilder {
    support::builder(db).probe_timeout(Duration::from_millis(300))
}

async fn read_once(router: &ReplicaRouter) -> Result<i64, RouteError> {
    let mut conn = router.read(Consistency::Any).await?;
    let node = conn.route().node.clone();
    sqlx::query_scalar("SELECT v FROM counters WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| RouteError::Database { node, source: e })
}

fn admitted(router: &ReplicaRouter, name: &str) -> bool {
    router.status().iter().any(|s| s.name == name && s.admitted)
}

/// Reads from 4 tasks until `until`; returns the instants of served reads and the failures.
async fn read_load(router: &ReplicaRouter, until: Instant) -> (Vec<Instant>, usize) {
    let served = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (router, served, failed) = (router.clone(), served.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                match read_once(&router).await {
                    Ok(_) => served.lock().unwrap().push(Instant::now()),
                    Err(_) => *failed.lock().unwrap() += 1,
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut served = Arc::try_unwrap(served).unwrap().into_inner().unwrap();
    served.sort();
    let failed = *failed.lock().unwrap();
    (served, failed)
}

fn longest_gap(served: &[Instant], from: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &t in served.iter().filter(|&&t| t >= from) {
        longest = longest.max(t - last);
        last = t;
    }
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_keep_flowing_to_replicas_when_the_primary_dies_and_writes_fail_fast() {
    let mut cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db).build().await.unwrap();
    assert!(admitted(&router, "r0") && admitted(&router, "r1"));

    let start = Instant::now();
    let load = {
        let router = router.clone();
        tokio::spawn(async move { read_load(&router, start + Duration::from_secs(3)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    cluster.kill(Node::Primary).unwrap();
    // Let several health rounds see the dead primary.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = router.status();
    assert!(status.iter().all(|s| s.primary_unreachable), "{status:?}");
    assert!(
        admitted(&router, "r0") && admitted(&router, "r1"),
        "{status:?}"
    );
    for s in status.iter().filter(|s| s.name != "primary") {
        assert_eq!(s.lag_bytes, Some(0), "{s:?}");
    }

    let t = Instant::now();
    let err = router.begin_write().await.unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(err, RouteError::PrimaryUnavailable { .. }) && err.is_transient(),
        "{err:?}"
    );
    assert!(took < Duration::from_millis(50), "a write waited {took:?}");
    let err = router.read(Consistency::Primary).await.unwrap_err();
    assert!(
        matches!(err, RouteError::PrimaryUnavailable { .. }),
        "{err:?}"
    );

    let (served, failed) = load.await.unwrap();
    let gap = longest_gap(&served, killed);
    let after = served.iter().filter(|&&t| t >= killed).count();
    eprintln!(
        "primary killed: {after} reads served in the 2 s after, {failed} failed, longest gap {gap:?}"
    );
    assert_eq!(failed, 0, "no read failed");
    assert!(after > 100, "{after} reads served after the kill");
    // Within one health interval (100 ms), with room for a loaded 2-core machine.
    assert!(gap < Duration::from_millis(250), "longest gap {gap:?}");
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stays_dead_keeps_writes_failing_fast_and_reads_served() {
    let mut cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let router = builder(&db).build().await.unwrap();
    cluster.kill(Node::Primary).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Many health rounds later, nothing has changed for the caller.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(read_once(&router).await.is_ok());
        let t = Instant::now();
        assert!(matches!(
            router.begin_write().await,
            Err(RouteError::PrimaryUnavailable { .. })
        ));
        assert!(t.elapsed() < Duration::from_millis(50));
    }
    assert!(admitted(&router, "r0") && admitted(&router, "r1"));
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_failed_writes_starts_one_primary_search_at_a_time() {
    let mut cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    // A long health interval: only the writes can notice the dead primary.
    let router = builder(&db)
        .health_interval(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let before = router.primary_searches();
    cluster.kill(Node::Primary).unwrap();
    let mut writes = Vec::new();
    for _ in 0..50 {
        let router = router.clone();
        writes.push(tokio::spawn(
            async move { router.begin_write().await.is_err() },
        ));
    }
    for w in writes {
        assert!(w.await.unwrap(), "a write to a dead primary failed");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let searches = router.primary_searches() - before;
    eprintln!("50 failed writes started {searches} primary searches");
    assert!(
        (1..=3).contains(&searches),
        "{searches} searches for 50 failed writes"
    );
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_replica_pool_is_not_ejected() {
    let cluster = PostgresCluster::shared().unwrap();
    let db = setup(cluster).await;
    let router = builder(&db)
        .pool_options(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_millis(50)),
        )
        .build()
        .await
        .unwrap();
    assert!(admitted(&router, "r0") && admitted(&router, "r1"));
    // 16 readers at once, each holding its connection 150 ms: most acquires time out.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = (0, 0);
            for _ in 0..3 {
                match router.read(Consistency::Any).await {
                    Ok(mut conn) => {
                        sqlx::query("SELECT pg_sleep(0.15)")
                            .execute(&mut *conn)
                            .await
                            .unwrap();
                        outcomes.0 += 1;
                    }
                    Err(_) => outcomes.1 += 1,
                }
            }
            outcomes
        }));
    }
    let (mut ok, mut timed_out) = (0, 0);
    for t in tasks {
        let (o, e) = t.await.unwrap();
        ok += o;
        timed_out += e;
    }
    eprintln!("burst on 1-connection pools: {ok} served, {timed_out} timed out");
    assert!(timed_out > 0, "the burst saturated the pools");
    assert!(
        admitted(&router, "r0") && admitted(&router, "r1"),
        "saturation ejected a replica: {:?}",
        router.status()
    );
    router.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_costs_bounded_waits_and_is_ejected() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = setup(&cluster).await;
    let acquire_timeout = Duration::from_millis(300);
    let router = builder(&db)
        .pool_options(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(acquire_timeout),
        )
        .readmission(2, Duration::from_millis(200))
        // Turns: half of the reads try the hung replica until it is ejected.
        .policy(stanchion_replica_router::RoundRobin::default())
        .build()
        .await
        .unwrap();
    // Warm both pools, so the hung replica has idle connections to hand out.
    for _ in 0..20 {
        read_once(&router).await.unwrap();
    }
    let token = router.write_token().await.unwrap();
    cluster.pause(Node::Replica(1)).unwrap();
    let paused = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut failed = 0;
    for i in 0..40 {
        let t = Instant::now();
        let consistency = if i % 2 == 0 {
            Consistency::Any
        } else {
            Consistency::AtLeast(token)
        };
        match tokio::time::timeout(Duration::from_secs(5), async {
            let mut conn = router.read(consistency).await?;
            let node = conn.route().node.clone();
            sqlx::query_scalar::<_, i64>("SELECT v FROM counters WHERE id = 1")
                .fetch_one(&mut *conn)
                .await
                .map(|_| node.clone())
                .map_err(|e| RouteError::Database { node, source: e })
        })
        .await
        {
            Ok(Ok(node)) => assert_ne!(node, "r1"),
            Ok(Err(_)) => failed += 1,
            Err(_) => panic!("a read waited 5 s on a hung replica"),
        }
        slowest = slowest.max(t.elapsed());
    }
    let ejected_after = {
        let deadline = Instant::now() + Duration::from_secs(3);
        while admitted(&router, "r1") {
            assert!(Instant::now() < deadline, "{:?}", router.status());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        paused.elapsed()
    };
    eprintln!(
        "replica paused with SIGSTOP: slowest read {slowest:?}, {failed} failed of 40, ejected within {ejected_after:?}"
    );
    assert_eq!(failed, 0);
    // One acquire timeout at most, plus scheduling slack on a loaded machine.
    assert!(
        slowest < acquire_timeout + Duration::from_millis(700),
        "{slowest:?}"
    );
    cluster.resume(Node::Replica(1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admitted(&router, "r1") {
        assert!(
            Instant::now() < deadline,
            "never readmitted: {:?}",
            router.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    router.close().await;
}
