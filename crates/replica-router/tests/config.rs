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
