//! The shared quota re-checked across operating-system processes, as a fleet of pods runs it:
//! this binary starts copies of itself, each a `RateLimiter` on its own connection to one real
//! Redis, in the production configuration (the local deny cache on), and judges what they
//! admitted together from outside.
//!
//! - Four processes hammer one key for two seconds: together they admit within the quota's
//!   bound (burst + rate x time), and no less than 97 % of it: the per-process deny caches
//!   answer a denied key's checks without a round trip yet deny nothing the store would
//!   have allowed.
//! - The same with a process killed (SIGKILL) halfway: the other three take up its share, and
//!   the total stays within the same bounds.
//!
//! It has its own `main` (no test harness): a child is this binary with `CHILD` set.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use stanchion_ratelimit::{Limits, Quota, RateLimiter, RedisStore, Source};
use stanchion_testkit::RedisServer;
use stanchion_testkit::child::{self, KillOnDrop};

const CHILD: &str = "STANCHION_RATELIMIT_CHILD";
const URL: &str = "STANCHION_RATELIMIT_URL";
const PREFIX: &str = "STANCHION_RATELIMIT_PREFIX";
/// The window every child hammers in, as Unix times in milliseconds.
const START: &str = "STANCHION_RATELIMIT_START_MS";
const END: &str = "STANCHION_RATELIMIT_END_MS";

const RATE: u32 = 500;
const BURST: u32 = 100;

fn main() {
    let runtime = child::runtime();
    if std::env::var(CHILD).is_ok() {
        child::exit_with_parent();
        runtime.block_on(hammer_child());
        return;
    }
    let server = OnceLock::new();
    let server = || server.get_or_init(|| RedisServer::start().unwrap());
    child::run_tests(&[
        (
            "four_processes_share_one_quota_with_their_deny_caches_on",
            &|| {
                runtime.block_on(fleet(server(), false));
            },
        ),
        (
            "a_process_killed_mid_window_leaves_the_others_within_the_quota",
            &|| {
                runtime.block_on(fleet(server(), true));
            },
        ),
    ]);
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Four children hammer one key over a common two-second window; with `kill_one`, the first
/// is killed a second in. Their admissions, reported through Redis, must fit the quota.
async fn fleet(server: &RedisServer, kill_one: bool) {
    let url = server.url();
    let p = support::prefix(if kill_one { "killed" } else { "fleet" });
    let start = unix_ms() + 1500; // time for the children to start and connect
    let end = start + 2000;
    let (start_ms, end_ms) = (start.to_string(), end.to_string());
    let mut children: Vec<KillOnDrop> = (0..4)
        .map(|_| {
            KillOnDrop(
                child::spawn_self(&[
                    (CHILD, "hammer"),
                    (URL, &url),
                    (PREFIX, &p),
                    (START, &start_ms),
                    (END, &end_ms),
                ])
                .unwrap(),
            )
        })
        .collect();
    if kill_one {
        tokio::time::sleep(Duration::from_millis(
            (start + 1000).saturating_sub(unix_ms()),
        ))
        .await;
        children[0].0.kill().unwrap();
        assert!(!children[0].0.wait().unwrap().success());
    }
    for (i, c) in children.iter_mut().enumerate() {
        if kill_one && i == 0 {
            continue;
        }
        let status = child::exited(&mut c.0, Duration::from_secs(30)).await;
        assert!(status.is_some_and(|s| s.success()), "child {i}: {status:?}");
    }
    let mut conn = support::manager(&url).await;
    let admitted: u64 = conn.get(format!("{p}admitted")).await.unwrap();
    let (shared, local): (u64, u64) = (
        conn.get(format!("{p}shared")).await.unwrap(),
        conn.get(format!("{p}deny_cache")).await.unwrap(),
    );
    let seconds = (end - start) as f64 / 1000.0;
    // A check may reach Redis a little before or after the window's edges (10 ms either side).
    let most = f64::from(BURST) + f64::from(RATE) * (seconds + 0.01) + 1.0;
    println!(
        "admitted {admitted} in {seconds} s (bound {most:.0}); {shared} checks answered by \
         Redis, {local} by the deny caches"
    );
    assert!(admitted as f64 <= most, "admitted {admitted} > {most}");
    assert!(local > 0, "the deny caches answered nothing");
    // The killed process may have admitted up to 8 checks (one per task) it never reported.
    let unreported = if kill_one { 8.0 } else { 0.0 };
    let least = 0.97 * (f64::from(BURST) + f64::from(RATE) * (seconds - 0.01)) - unreported;
    assert!(
        admitted as f64 >= least,
        "admitted {admitted} < {least}: over-denied"
    );
}

/// One instance: 8 tasks check one key from `START` to `END`; the counts go to Redis in
/// small steps, so a process killed midway has reported what it admitted until shortly before.
async fn hammer_child() {
    let var = |k| std::env::var(k).unwrap();
    let (url, p) = (var(URL), var(PREFIX));
    let (start, end): (u64, u64) = (var(START).parse().unwrap(), var(END).parse().unwrap());
    let limits = Limits::single(Quota::per_second(RATE).unwrap().burst(BURST).unwrap());
    let store = RedisStore::new(support::manager(&url).await, &p);
    let limiter = RateLimiter::builder(store, limits)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut conn = support::manager(&url).await;
    tokio::time::sleep(Duration::from_millis(start.saturating_sub(unix_ms()))).await;
    // Checks answered by Redis, and by the deny cache.
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (limiter, counts, mut conn, p) =
                (limiter.clone(), counts.clone(), conn.clone(), p.clone());
            tokio::spawn(async move {
                while unix_ms() < end {
                    let d = limiter.check("hot-key", 1).await.unwrap();
                    assert_ne!(d.source, Source::Fallback, "Redis was up");
                    if d.is_allowed() {
                        // Reported at once: this process may be killed at any moment.
                        let _: u64 = conn.incr(format!("{p}admitted"), 1).await.unwrap();
                    }
                    let i = usize::from(d.source == Source::DenyCache);
                    counts[i].fetch_add(1, Ordering::Relaxed);
                    // At most a check a millisecond per task: up to 64 times the quota in all.
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let _: u64 = conn
        .incr(format!("{p}shared"), counts[0].load(Ordering::Relaxed))
        .await
        .unwrap();
    let _: u64 = conn
        .incr(format!("{p}deny_cache"), counts[1].load(Ordering::Relaxed))
        .await
        .unwrap();
}
