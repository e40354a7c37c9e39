//! The fault proxy forwards, adds latency, blackholes and resets.

use std::time::{Duration, Instant};

use stanchion_testkit::{Fault, FaultProxy, RedisServer};

fn connect(proxy: &FaultProxy) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://{}/", proxy.addr()))?;
    let conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(conn)
}

fn ping(conn: &mut redis::Connection) -> redis::RedisResult<String> {
    redis::cmd("PING").query(conn)
}

#[test]
fn forwards_and_adds_at_least_the_configured_latency() {
    let redis = RedisServer::shared().unwrap();
    let proxy = FaultProxy::start(redis.addr()).unwrap();
    let mut conn = connect(&proxy).unwrap();
    assert_eq!(ping(&mut conn).unwrap(), "PONG");
    assert_eq!(proxy.accepted(), 1);

    proxy.set(Fault::Latency(Duration::from_millis(40)));
    let start = Instant::now();
    assert_eq!(ping(&mut conn).unwrap(), "PONG");
    let rtt = start.elapsed();
    // Each direction is delayed, so a round trip takes at least twice the latency.
    assert!(rtt >= Duration::from_millis(80), "round trip took {rtt:?}");
    assert!(rtt < Duration::from_millis(400), "round trip took {rtt:?}");

    proxy.set(Fault::None);
    let start = Instant::now();
    assert_eq!(ping(&mut conn).unwrap(), "PONG");
    assert!(start.elapsed() < Duration::from_millis(40));
}

#[test]
fn blackhole_accepts_but_never_answers_until_cleared() {
    let redis = RedisServer::shared().unwrap();
    let proxy = FaultProxy::start(redis.addr()).unwrap();
    let mut open = connect(&proxy).unwrap();
    proxy.set(Fault::Blackhole);
    let err = ping(&mut open).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // New connections are accepted at the TCP level but the handshake is never answered.
    let before = proxy.accepted();
    assert!(connect(&proxy).is_err());
    assert_eq!(proxy.accepted(), before + 1);

    proxy.set(Fault::None);
    let mut fresh = connect(&proxy).unwrap();
    assert_eq!(ping(&mut fresh).unwrap(), "PONG");
}

#[test]
fn reset_breaks_open_connections_and_refuses_new_ones() {
    let redis = RedisServer::shared().unwrap();
    let proxy = FaultProxy::start(redis.addr()).unwrap();
    let mut open = connect(&proxy).unwrap();
    assert_eq!(ping(&mut open).unwrap(), "PONG");
    proxy.set(Fault::Reset);
    std::thread::sleep(Duration::from_millis(50));
    let err = ping(&mut open).unwrap_err();
    assert!(!err.is_timeout(), "a reset is reported at once, got {err}");
    assert!(connect(&proxy).and_then(|mut c| ping(&mut c)).is_err());

    proxy.set(Fault::None);
    assert_eq!(ping(&mut connect(&proxy).unwrap()).unwrap(), "PONG");
}

#[test]
fn refuses_non_loopback_upstreams() {
    let err = FaultProxy::start("192.0.2.1:6379".parse().unwrap()).unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}
