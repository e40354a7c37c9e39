//! The Redis helpers do what they say: password, kill/restart, pause/resume, cluster.

use std::time::{Duration, Instant};

use stanchion_testkit::{RedisCluster, RedisServer};

fn get(conn: &mut redis::Connection, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(key).query(conn)
}

#[test]
fn shared_server_is_reused_within_a_binary() {
    let a = RedisServer::shared().unwrap();
    let b = RedisServer::shared().unwrap();
    assert_eq!(a.port(), b.port());
    let mut conn = a.connection().unwrap();
    redis::cmd("SET")
        .arg("shared:k")
        .arg("v")
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(get(&mut conn, "shared:k").unwrap().as_deref(), Some("v"));
}

#[test]
fn password_is_required_and_redacted_from_debug() {
    let server = RedisServer::builder()
        .password("hunter2-secret")
        .start()
        .unwrap();
    assert!(server.url().contains("hunter2-secret"));
    assert!(!format!("{server:?}").contains("hunter2-secret"));
    let anonymous = format!("redis://127.0.0.1:{}/", server.port());
    let client = redis::Client::open(anonymous).unwrap();
    let mut conn = client.get_connection().unwrap();
    let err = get(&mut conn, "k").unwrap_err();
    assert!(err.to_string().contains("NOAUTH"), "{err}");
    assert_eq!(get(&mut server.connection().unwrap(), "k").unwrap(), None);
}

#[test]
fn kill_refuses_connections_and_restart_serves_on_the_same_port() {
    let mut server = RedisServer::start().unwrap();
    let port = server.port();
    server.kill().unwrap();
    assert!(!server.is_running());
    assert!(server.connection().is_err());
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert_eq!(get(&mut server.connection().unwrap(), "k").unwrap(), None);
}

#[test]
fn pause_makes_a_client_time_out_and_resume_heals_it() {
    let server = RedisServer::start().unwrap();
    let mut conn = server.connection().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    server.pause().unwrap();
    let start = Instant::now();
    let err = get(&mut conn, "k").unwrap_err();
    assert!(err.is_timeout(), "expected a timeout, got {err}");
    assert!(start.elapsed() >= Duration::from_millis(190));
    server.resume().unwrap();
    let mut fresh = server.connection().unwrap();
    assert_eq!(get(&mut fresh, "k").unwrap(), None);
}

#[test]
fn cluster_answers_a_key_that_lives_on_another_node() {
    let cluster = RedisCluster::start(3).unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut conn = client.get_connection().unwrap();
    // Find a key that node 0 does not own: node 0 answers it with MOVED.
    let mut direct = cluster.nodes()[0].connection().unwrap();
    let mut moved_key = None;
    for i in 0..100 {
        let key = format!("k{i}");
        redis::cmd("SET")
            .arg(&key)
            .arg(i)
            .query::<()>(&mut conn)
            .unwrap();
        if let Err(e) = get(&mut direct, &key) {
            assert_eq!(
                e.kind(),
                redis::ErrorKind::Server(redis::ServerErrorKind::Moved),
                "{e}"
            );
            moved_key = Some((key, i));
        }
    }
    let (key, value) = moved_key.expect("some of 100 keys live on nodes 1 and 2");
    assert_eq!(get_cluster(&mut conn, &key), Some(value.to_string()));
}

fn get_cluster(conn: &mut redis::cluster::ClusterConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query(conn).unwrap()
}

#[test]
fn cluster_needs_three_masters() {
    let err = RedisCluster::start(2).unwrap_err();
    assert!(err.to_string().contains("at least 3"), "{err}");
}
