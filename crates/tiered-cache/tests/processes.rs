//! The cross-instance guarantees re-checked across operating-system processes, as a fleet of
//! pods runs them: this binary starts copies of itself as the instances (each its own process,
//! its own L1, one real Redis), and judges them from outside through Redis.
//!
//! - Four processes, 100 concurrent misses each, lease on: one loader call in all; an insert
//!   made by a fifth process then reaches every process's L1 through the bus.
//! - A process holding the lease is killed (SIGKILL) in the middle of its load: an instance
//!   waiting for its value gives up after its bounded wait and loads itself; nobody hangs.
//!   When the lease lapses before the wait ends, one of three waiting instances takes it over
//!   and loads for all of them.
//!
//! It has its own `main` (no test harness): a child is this binary with `CHILD` set.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use stanchion_testkit::RedisServer;
use stanchion_testkit::child::{self, KillOnDrop};
use support::{instance, manager, prefix};

/// Set in a child: its role. `URL` and `PREFIX` tell it where to work.
const CHILD: &str = "STANCHION_TIERED_CACHE_CHILD";
const URL: &str = "STANCHION_TIERED_CACHE_URL";
const PREFIX: &str = "STANCHION_TIERED_CACHE_PREFIX";

fn main() {
    let runtime = child::runtime();
    if let Ok(role) = std::env::var(CHILD) {
        child::exit_with_parent();
        let url = std::env::var(URL).unwrap();
        let p = std::env::var(PREFIX).unwrap();
        runtime.block_on(async {
            match role.as_str() {
                "stampede" => stampede_child(&url, &p).await,
                "holder" => holder_child(&url, &p, 2, Duration::from_secs(3)).await,
                "short-holder" => holder_child(&url, &p, 3, Duration::from_secs(1)).await,
                other => panic!("unknown role {other}"),
            }
        });
        return;
    }
    let server = OnceLock::new();
    let server = || server.get_or_init(|| RedisServer::start().unwrap());
    child::run_tests(&[
        (
            "four_processes_load_once_and_see_each_others_writes",
            &|| {
                runtime.block_on(four_processes_load_once_and_see_each_others_writes(server()));
            },
        ),
        ("a_killed_lease_holder_blocks_nobody_past_the_wait", &|| {
            runtime.block_on(a_killed_lease_holder_blocks_nobody_past_the_wait(server()));
        }),
        (
            "a_killed_lease_holders_lapsed_lease_is_taken_over_by_one_waiter",
            &|| {
                runtime.block_on(
                    a_killed_lease_holders_lapsed_lease_is_taken_over_by_one_waiter(server()),
                );
            },
        ),
    ]);
}

/// Starts this binary as a child in `role` (it exits if this process goes away).
fn spawn(role: &str, url: &str, p: &str) -> KillOnDrop {
    KillOnDrop(child::spawn_self(&[(CHILD, role), (URL, url), (PREFIX, p)]).unwrap())
}

/// Polls the counter `key` until it reaches `n` (panics past `within`).
async fn counter_reaches(
    conn: &mut redis::aio::ConnectionManager,
    key: &str,
    n: u64,
    within: Duration,
) {
    let started = Instant::now();
    loop {
        let v: Option<u64> = conn.get(key).await.unwrap();
        if v.unwrap_or(0) >= n {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{key} stayed at {v:?}, waiting for {n}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn four_processes_load_once_and_see_each_others_writes(server: &RedisServer) {
    let url = server.url();
    let p = prefix("procs");
    let mut conn = manager(&url).await;
    let mut children: Vec<KillOnDrop> = (0..4).map(|_| spawn("stampede", &url, &p)).collect();
    // Every child listens on the bus and waits for the start signal.
    counter_reaches(&mut conn, &format!("{p}ready"), 4, Duration::from_secs(30)).await;
    let _: () = conn.set(format!("{p}go"), 1).await.unwrap();
    counter_reaches(&mut conn, &format!("{p}loaded"), 4, Duration::from_secs(10)).await;
    let loads: u64 = conn.get(format!("{p}loads")).await.unwrap();
    assert_eq!(loads, 1, "400 misses in four processes: one loader call");
    // A fifth process writes a new value: every child's L1 copy ("lamp", an hour's TTL) must
    // give way to it, which only the bus can do.
    let writer = instance(&url, &p, None).await;
    writer.insert(&1, "new".to_string()).await.unwrap();
    for c in &mut children {
        let status = child::exited(&mut c.0, Duration::from_secs(10)).await;
        assert!(status.is_some_and(|s| s.success()), "a child: {status:?}");
    }
}

/// One instance: 100 concurrent misses on key 1 once told to go, then waits for the value
/// another process writes.
async fn stampede_child(url: &str, p: &str) {
    let cache = instance(
        url,
        p,
        Some((Duration::from_secs(5), Duration::from_secs(3))),
    )
    .await;
    let mut conn = manager(url).await;
    let _: u64 = conn.incr(format!("{p}ready"), 1).await.unwrap();
    let started = Instant::now();
    while !conn.exists::<_, bool>(format!("{p}go")).await.unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no start signal"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            let calls = Arc::clone(&calls);
            let mut conn = conn.clone();
            let loads = format!("{p}loads");
            tokio::spawn(async move {
                cache
                    .get_or_load(&1, move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let _: u64 = conn.incr(loads, 1).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, std::io::Error>(Some("lamp".to_string()))
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().as_deref(), Some("lamp"));
    }
    assert!(
        calls.load(Ordering::SeqCst) <= 1,
        "single flight in the process"
    );
    let _: u64 = conn.incr(format!("{p}loaded"), 1).await.unwrap();
    let waiting = Instant::now();
    loop {
        match cache.get(&1).await.unwrap().as_deref() {
            Some("new") => break,
            Some("lamp") => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "the other process's write never reached this L1"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!(
        "child {}: loader calls {}, lease waits {}, new value seen {:?} after its load",
        std::process::id(),
        calls.load(Ordering::SeqCst),
        cache.stats().lease_waits,
        waiting.elapsed()
    );
}

/// Leads the load of `key` under a lease of `ttl` and never finishes it (it is killed).
async fn holder_child(url: &str, p: &str, key: u64, ttl: Duration) {
    let cache = instance(url, p, Some((ttl, Duration::from_secs(1)))).await;
    let mut conn = manager(url).await;
    let holding = format!("{p}holding");
    let _ = cache
        .get_or_load(&key, move || async move {
            let _: () = conn.set(holding, 1).await.unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::io::Error>(Some("never".to_string()))
        })
        .await;
    panic!("the load was meant to outlive this process");
}

async fn a_killed_lease_holder_blocks_nobody_past_the_wait(server: &RedisServer) {
    let url = server.url();
    let p = prefix("killed");
    let mut conn = manager(&url).await;
    let mut holder = spawn("holder", &url, &p);
    counter_reaches(
        &mut conn,
        &format!("{p}holding"),
        1,
        Duration::from_secs(30),
    )
    .await;
    holder.0.kill().unwrap(); // SIGKILL: no lease release, no message
    assert!(!holder.0.wait().unwrap().success());
    // The lease (3 s) outlives its holder; this instance waits at most 1 s for a value that
    // will never come, then loads itself.
    let waiter = instance(
        &url,
        &p,
        Some((Duration::from_secs(3), Duration::from_secs(1))),
    )
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let got = waiter
        .get_or_load(&2, {
            let calls = Arc::clone(&calls);
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(Some("lamp".to_string()))
            }
        })
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(got.as_deref(), Some("lamp"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1500),
        "waited {waited:?} (the wait is 1 s)"
    );
    let stats = waiter.stats();
    assert_eq!(
        (stats.lease_waits, stats.lease_timeouts),
        (1, 1),
        "{stats:?}"
    );
    // What it loaded is in L2: another process finds it there without loading.
    let later = instance(&url, &p, None).await;
    let got = later
        .get_or_load(&2, || async {
            Ok::<_, std::io::Error>(Some("reloaded".to_string()))
        })
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("lamp"));
    assert_eq!(later.stats().loads, 0);
    println!("waiter gave up on the killed holder after {waited:?} and loaded itself");
}

async fn a_killed_lease_holders_lapsed_lease_is_taken_over_by_one_waiter(server: &RedisServer) {
    let url = server.url();
    let p = prefix("takeover");
    let mut conn = manager(&url).await;
    let mut holder = spawn("short-holder", &url, &p);
    counter_reaches(
        &mut conn,
        &format!("{p}holding"),
        1,
        Duration::from_secs(30),
    )
    .await;
    holder.0.kill().unwrap();
    assert!(!holder.0.wait().unwrap().success());
    // Three instances, 20 callers each, willing to wait 5 s; the dead holder's lease (1 s)
    // lapses well before that.
    let lease = Some((Duration::from_secs(1), Duration::from_secs(5)));
    let mut waiters = Vec::new();
    for _ in 0..3 {
        waiters.push(instance(&url, &p, lease).await);
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = waiters
        .iter()
        .flat_map(|w| std::iter::repeat_n(w, 20))
        .map(|w| {
            let (w, calls) = (w.clone(), Arc::clone(&calls));
            tokio::spawn(async move {
                w.get_or_load(&3, move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, std::io::Error>(Some("lamp".to_string()))
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().as_deref(), Some("lamp"));
    }
    let took = started.elapsed();
    let sum = |f: fn(&stanchion_tiered_cache::Stats) -> u64| -> u64 {
        waiters.iter().map(|w| f(&w.stats())).sum()
    };
    println!(
        "three instances served after {took:?}: {} loader call(s), {} takeover(s)",
        calls.load(Ordering::SeqCst),
        sum(|s| s.lease_takeovers)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one waiter loaded for all");
    assert_eq!(sum(|s| s.lease_takeovers), 1);
    assert_eq!(sum(|s| s.lease_timeouts), 0);
    assert!(took < Duration::from_secs(3), "took {took:?} of a 5 s wait");
}
