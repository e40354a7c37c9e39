//! How many shared checks per second one Redis takes, and where the CPU goes.
//!
//! Starts a private `redis-server` (testkit), keeps 64 (or IN_FLIGHT) checks in flight on one
//! `ConnectionManager` and prints, per check: wall time, this process's CPU time and the
//! server's CPU time (`INFO cpu`), for a bare `EVALSHA` of `return 1` and for `RedisStore` with one
//! and with two quotas over 1,000 keys.
//!
//! ```sh
//! cargo run --release -p stanchion-ratelimit --features redis --example redis_throughput [CHECKS [IN_FLIGHT]]
//! ```

use std::sync::Arc;
use std::time::Instant;

use stanchion_ratelimit::{Limits, Quota, RateLimitStore, RedisStore};
use stanchion_testkit::RedisServer;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// This process's user + system CPU seconds (Linux `/proc/self/stat`, 100 ticks per second).
fn own_cpu_seconds() -> Result<f64, Error> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after_name = stat
        .rsplit(')')
        .next()
        .ok_or("unexpected /proc/self/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64, Error> {
        Ok(fields
            .get(i)
            .ok_or("short /proc/self/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// The server's user + system CPU seconds.
async fn server_cpu_seconds(conn: &mut redis::aio::ConnectionManager) -> Result<f64, Error> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let mut total = 0.0;
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            total += v.trim().parse::<f64>()?;
        }
    }
    Ok(total)
}

#[derive(Clone, Copy)]
enum Workload {
    Trivial,
    OneQuota,
    TwoQuotas,
}

struct Setup {
    conn: redis::aio::ConnectionManager,
    trivial: redis::Script,
    store: RedisStore<redis::aio::ConnectionManager>,
    one: Limits,
    two: Limits,
}

async fn one_check(setup: &Setup, workload: Workload, i: u64) -> Result<(), Error> {
    let key = format!("k{}", i % 1000);
    match workload {
        Workload::Trivial => {
            let mut conn = setup.conn.clone();
            let _: i64 = setup.trivial.invoke_async(&mut conn).await?;
        }
        Workload::OneQuota => {
            setup.store.check(&key, &setup.one, 1).await?;
        }
        Workload::TwoQuotas => {
            setup.store.check(&key, &setup.two, 1).await?;
        }
    }
    Ok(())
}

async fn run(
    setup: &Arc<Setup>,
    workload: Workload,
    checks: u64,
    in_flight: u64,
) -> Result<[f64; 3], Error> {
    let mut conn = setup.conn.clone();
    let server_before = server_cpu_seconds(&mut conn).await?;
    let own_before = own_cpu_seconds()?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for first in 0..in_flight {
        let setup = Arc::clone(setup);
        tasks.push(tokio::spawn(async move {
            let mut i = first;
            while i < checks {
                one_check(&setup, workload, i).await?;
                i += in_flight;
            }
            Ok::<(), Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let wall = start.elapsed().as_secs_f64();
    let own = own_cpu_seconds()? - own_before;
    let server = server_cpu_seconds(&mut conn).await? - server_before;
    let per_check = |seconds: f64| seconds * 1e6 / checks as f64;
    Ok([per_check(wall), per_check(own), per_check(server)])
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let checks: u64 = args.next().map_or(Ok(200_000), |n| n.parse())?;
    let in_flight: u64 = args.next().map_or(Ok(64), |n| n.parse())?;
    let server = RedisServer::start()?;
    let conn = redis::aio::ConnectionManager::new(redis::Client::open(server.url())?).await?;
    let setup = Arc::new(Setup {
        store: RedisStore::new(conn.clone(), "throughput:"),
        conn,
        trivial: redis::Script::new("return 1"),
        one: Limits::single(Quota::per_second(1_000_000)?),
        two: Limits::new()
            .with("second", Quota::per_second(1_000_000)?)?
            .with("hour", Quota::per_hour(1_000_000_000)?)?,
    });
    let workloads = [
        ("bare EVALSHA of `return 1`", Workload::Trivial),
        ("RedisStore, one quota", Workload::OneQuota),
        ("RedisStore, two quotas", Workload::TwoQuotas),
    ];
    // A first round warms connections, the script cache and the keys; the second is reported.
    for (_, workload) in workloads {
        run(&setup, workload, checks / 4, in_flight).await?;
    }
    println!("{checks} checks, {in_flight} in flight; microseconds per check");
    println!(
        "{:<28} {:>8} {:>11} {:>11}",
        "", "wall", "client CPU", "Redis CPU"
    );
    let mut trivial_wall = None;
    for (name, workload) in workloads {
        let [wall, own, redis] = run(&setup, workload, checks, in_flight).await?;
        let share = trivial_wall
            .map(|t: f64| {
                format!(
                    "  ({:.0} % of the trivial script's throughput)",
                    100.0 * t / wall
                )
            })
            .unwrap_or_default();
        trivial_wall.get_or_insert(wall);
        println!("{name:<28} {wall:>8.2} {own:>11.2} {redis:>11.2}{share}");
    }
    let stats = setup.store.batch_stats();
    println!(
        "coalescing: {:.1} checks per script call",
        stats.checks as f64 / stats.script_calls.max(1) as f64
    );
    Ok(())
}
