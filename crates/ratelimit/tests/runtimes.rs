//! A store or limiter whose first runtime shut down (its batching task and connection driver
//! died with it) keeps working on another runtime, or fails with a clear error; it never hangs.

mod support;

use std::time::Duration;

use stanchion_ratelimit::{Limits, Quota, RateLimitStore, RateLimiter, RedisStore, Source};
use stanchion_testkit::RedisServer;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

type Limiter = RateLimiter<RedisStore<redis::aio::ConnectionManager>>;

/// A limiter built on `rt` (its connection's driver runs there), 100 ms recheck.
fn limiter_on(rt: &tokio::runtime::Runtime, server: &RedisServer, test: &str) -> Limiter {
    rt.block_on(async {
        let store = RedisStore::new(
            support::manager(&server.url()).await,
            &support::prefix(test),
        );
        RateLimiter::builder(store, Limits::single(Quota::per_minute(100).unwrap()))
            .timeout(Duration::from_millis(100))
            .recheck_interval(Duration::from_millis(100))
            .build()
            .unwrap()
    })
}

/// Checks `k` on `rt` every 50 ms (none may hang) until one is decided by Redis, at most `n`
/// times; the sources seen.
fn sources_until_shared(rt: &tokio::runtime::Runtime, limiter: &Limiter, n: usize) -> Vec<Source> {
    let mut sources = Vec::new();
    for _ in 0..n {
        let d = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(2), limiter.check("k", 1)).await
            })
            .expect("a check on the second runtime hung")
            .unwrap();
        sources.push(d.source);
        if d.source == Source::Shared {
            break;
        }
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    }
    sources
}

#[test]
fn a_store_whose_first_runtime_shut_down_works_on_the_next() {
    let server = RedisServer::start().unwrap();
    let limits = Limits::single(Quota::per_minute(3).unwrap());
    let first = runtime();
    let store = first.block_on(async {
        let client = redis::Client::open(server.url()).unwrap();
        RedisStore::new(
            redis::aio::ConnectionManager::new(client).await.unwrap(),
            &support::prefix("runtimes"),
        )
    });
    assert!(
        first
            .block_on(store.check("k", &limits, 1))
            .unwrap()
            .is_allowed()
    );
    drop(first);
    let second = runtime();
    let mut answers = Vec::new();
    for _ in 0..4 {
        let answer = second
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), store.check("k", &limits, 1)).await
            })
            .expect("a check on the second runtime hung");
        answers.push(answer);
    }
    eprintln!("{answers:?}");
    // The connection needs one failed call to notice its driver is gone (an error, at once);
    // after that the store answers from Redis again, with the state the first runtime left:
    // 3 per minute in all.
    let decided: Vec<bool> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok().map(|d| d.is_allowed()))
        .collect();
    assert!(decided.len() >= 3, "{answers:?}");
    assert_eq!(1 + decided.iter().filter(|&&a| a).count(), 3, "{answers:?}");
    assert!(!decided[decided.len() - 1]);
}

#[test]
fn a_limiter_whose_first_runtime_shut_down_keeps_deciding() {
    let server = RedisServer::start().unwrap();
    let first = runtime();
    let limiter = limiter_on(&first, &server, "runtimes-limiter");
    assert_eq!(
        first.block_on(limiter.check("k", 1)).unwrap().source,
        Source::Shared
    );
    drop(first);
    let second = runtime();
    let sources = sources_until_shared(&second, &limiter, 40);
    eprintln!("{sources:?}");
    assert_eq!(sources.last(), Some(&Source::Shared), "{sources:?}");
}

/// The probe that clears "down" ran on the first runtime and died with it: the next check on
/// another runtime starts a new probe, and the limiter goes back to Redis once it answers
/// (before, the limiter stayed on its fallback for good).
#[test]
fn a_probe_that_died_with_its_runtime_is_started_again() {
    let mut server = RedisServer::start().unwrap();
    let first = runtime();
    let limiter = limiter_on(&first, &server, "runtimes-probe");
    server.kill().unwrap();
    // Fails over to the fallback and starts a probe on the first runtime.
    let d = first.block_on(limiter.check("k", 1)).unwrap();
    assert_eq!(d.source, Source::Fallback);
    assert!(limiter.is_store_down());
    drop(first);
    server.restart().unwrap();
    let second = runtime();
    let sources = sources_until_shared(&second, &limiter, 60);
    eprintln!("{} checks until Redis was used again", sources.len());
    assert_eq!(sources.last(), Some(&Source::Shared), "{sources:?}");
}
