//! Bad configuration is a build error; passwords never reach Debug output or errors.

use std::time::Duration;

use stanchion_replica_router::ReplicaRouter;
use stanchion_testkit::{Node, PostgresCluster};

#[tokio::test]
async fn bad_configuration_names_the_field() {
    let url = "postgres://u:p@127.0.0.1:5432/db";
    let field = |e: stanchion_replica_router::BuildError| e.field();
    assert_eq!(
        field(
            ReplicaRouter::builder()
                .replica("r", url)
                .build()
                .await
                .unwrap_err()
        ),
        "primary"
    );
    assert_eq!(
        field(
            ReplicaRouter::builder()
                .primary("a", url)
                .replica("a", "postgres://u@127.0.0.1:5433/db")
                .build()
                .await
                .unwrap_err()
        ),
        "node name"
    );
    assert_eq!(
        field(
            ReplicaRouter::builder()
                .primary("a", url)
                .replica("b", url)
                .build()
                .await
                .unwrap_err()
        ),
        "node url"
    );
    assert_eq!(
        field(
            ReplicaRouter::builder()
                .primary("a", url)
                .lag_bytes(10, 20)
                .build()
                .await
                .unwrap_err()
        ),
        "lag_bytes.readmit"
    );
    assert_eq!(
        field(
            ReplicaRouter::builder()
                .primary("a", url)
                .lag_time(Duration::from_secs(1), Duration::from_secs(2))
                .build()
                .await
                .unwrap_err()
        ),
        "lag_time.readmit"
    );
    assert_eq!(
        field(
            ReplicaRouter::builder()
                .primary("a", url)
                .health_interval(Duration::ZERO)
                .build()
                .await
                .unwrap_err()
        ),
        "health_interval"
    );
    // Durations that would overflow `Instant` arithmetic are refused, not saturated silently.
    for (builder, name) in [
        (
            ReplicaRouter::builder()
                .primary("a", url)
                .token_wait(Duration::MAX, stanchion_replica_router::Fallback::Primary),
            "token_wait",
        ),
        (
            ReplicaRouter::builder()
                .primary("a", url)
                .health_interval(Duration::MAX),
            "health_interval",
        ),
        (
            ReplicaRouter::builder()
                .primary("a", url)
                .probe_timeout(Duration::from_secs(u64::MAX)),
            "probe_timeout",
        ),
        (
            ReplicaRouter::builder()
                .primary("a", url)
                .readmission(1, Duration::MAX),
            "readmission.min_ejection",
        ),
        (
            ReplicaRouter::builder()
                .primary("a", url)
                .lag_time(Duration::MAX, Duration::from_secs(1)),
            "lag_time.eject",
        ),
    ] {
        assert_eq!(field(builder.build().await.unwrap_err()), name);
    }
    let err = ReplicaRouter::builder()
        .primary("a", "mysql://root:hunter2@x/db")
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.field(), "node url");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test]
async fn passwords_stay_out_of_debug_logs_and_errors() {
    let mut cluster = PostgresCluster::builder()
        .replicas(1)
        .password("s3cret-pw")
        .start()
        .unwrap();
    let db = cluster.create_database().unwrap();
    let router = ReplicaRouter::builder()
        .primary("primary", &db.primary_url)
        .replica("r0", &db.replica_urls[0])
        .probe_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let builder = ReplicaRouter::builder().primary("primary", &db.primary_url);
    assert!(!format!("{builder:?}").contains("s3cret-pw"));
    assert!(!format!("{router:?}").contains("s3cret-pw"));
    cluster.kill(Node::Primary).unwrap();
    let err = router.write_token().await.unwrap_err();
    assert!(!format!("{err}").contains("s3cret-pw"));
    assert!(!format!("{err:?}").contains("s3cret-pw"), "{err:?}");
    router.close().await;
}

#[tokio::test]
async fn nodes_can_be_given_as_sqlx_connect_options() {
    use sqlx::postgres::PgConnectOptions;
    use stanchion_replica_router::Consistency;
    let cluster = PostgresCluster::shared().unwrap();
    let db = cluster.create_database().unwrap();
    let options = |url: &str| {
        url.parse::<PgConnectOptions>()
            .unwrap()
            .application_name("shop-api")
            .statement_cache_capacity(16)
    };
    let router = ReplicaRouter::builder()
        .primary_with("primary", options(&db.primary_url))
        .replica_with("r0", options(&db.replica_urls[0]))
        .probe_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    for c in [Consistency::Any, Consistency::Primary] {
        let mut conn = router.read(c).await.unwrap();
        let (name, read_only): (String, String) = sqlx::query_as(
            "SELECT current_setting('application_name'), current_setting('default_transaction_read_only')",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!((name.as_str(), read_only.as_str()), ("shop-api", "on"));
    }
    let mut tx = router.begin_write().await.unwrap();
    let name: String = sqlx::query_scalar("SELECT current_setting('application_name')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(name, "shop-api");
    drop(tx);
    router.close().await;
}
