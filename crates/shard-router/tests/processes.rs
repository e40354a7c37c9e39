//! The cutover's failure table re-checked across operating-system processes: the cutover runs
//! in a copy of this binary that is killed (SIGKILL) at a chosen step, and what it leaves is
//! judged from outside, on real PostgreSQL servers, then recovered the way the README says.
//!
//! - Killed between the fence and the switch: writes to the moving slots are refused
//!   (`SlotFenced`), the others go on; `run()` again finishes the move.
//! - Killed while copying (before the fence): the source still owns and takes writes;
//!   `abort()` removes the partial copies and `run()` then finishes the move, or `run()` again
//!   at once finishes it over the partial copies.
//! - Killed while releasing (after the switch): the target owns the slots, the source refuses
//!   them as moved; `release()` removes the dead rows left on the source.
//!
//! After each: every row exactly once, on the shard the new map names, with its value.
//! It has its own `main` (no test harness): a child is this binary with `CHILD` set.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use stanchion_shard_router::cutover::{Cutover, CutoverError, MovedTable, guard_write, install};
use stanchion_shard_router::{Key, RouteError, ShardMap, plan};
use stanchion_testkit::PostgresCluster;
use stanchion_testkit::child::{self, KillOnDrop};

const CHILD: &str = "STANCHION_SHARD_ROUTER_CHILD";
const SOURCE: &str = "STANCHION_SHARD_ROUTER_SOURCE";
const TARGET: &str = "STANCHION_SHARD_ROUTER_TARGET";

const ROWS: i64 = 40_000;
const SLOTS: u32 = 256;

/// Where the cutover's process is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillAt {
    Copying,
    Fenced,
    Releasing,
}

fn main() {
    let runtime = child::runtime();
    if std::env::var(CHILD).is_ok() {
        child::exit_with_parent();
        runtime.block_on(async {
            let (source, target) = (
                connect(&std::env::var(SOURCE).unwrap()).await,
                connect(&std::env::var(TARGET).unwrap()).await,
            );
            cutover(&source, &target).run().await.unwrap();
        });
        return;
    }
    let servers = OnceLock::new();
    let servers = || {
        servers.get_or_init(|| {
            [
                PostgresCluster::start(0).unwrap(),
                PostgresCluster::start(0).unwrap(),
            ]
        })
    };
    let run =
        |kill_at, abort_first| runtime.block_on(killed_cutover(servers(), kill_at, abort_first));
    child::run_tests(&[
        (
            "a_cutover_killed_after_its_fence_is_finished_by_running_it_again",
            &|| {
                run(KillAt::Fenced, false);
            },
        ),
        (
            "a_cutover_killed_while_copying_is_aborted_and_run_again",
            &|| {
                run(KillAt::Copying, true);
            },
        ),
        (
            "a_cutover_killed_while_copying_is_finished_by_running_it_again",
            &|| {
                run(KillAt::Copying, false);
            },
        ),
        (
            "a_cutover_killed_while_releasing_is_finished_by_release",
            &|| {
                run(KillAt::Releasing, false);
            },
        ),
    ]);
}

async fn connect(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .unwrap()
}

/// v1: every slot on the first database; v2 adds the second.
fn maps() -> (ShardMap, ShardMap) {
    let v1 = ShardMap::uniform(SLOTS, 1).unwrap();
    let v2 = v1.add_shard().unwrap();
    (v1, v2)
}

/// The slots moving from the first database to the second.
fn moving() -> Vec<u32> {
    let (v1, v2) = maps();
    let routes = plan(&v1, &v2).unwrap().by_route();
    assert_eq!(routes.len(), 1);
    routes.into_values().next().unwrap()
}

/// The same cutover the child runs; small batches, so the copy takes many steps.
fn cutover(source: &PgPool, target: &PgPool) -> Cutover {
    let table = MovedTable::new("products", "id", "slot").unwrap();
    Cutover::new(
        source.clone(),
        target.clone(),
        moving(),
        maps().1.version(),
        vec![table],
    )
    .batch(500)
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Whether a write of `slot` on `pool` is admitted, or the error that refuses it.
async fn guard(pool: &PgPool, slot: u32) -> Result<(), CutoverError> {
    let mut tx = pool.begin().await.unwrap();
    guard_write(&mut tx, slot).await
}

async fn killed_cutover(servers: &[PostgresCluster; 2], kill_at: KillAt, abort_first: bool) {
    let dbs = [
        servers[0].create_database().unwrap(),
        servers[1].create_database().unwrap(),
    ];
    let (source, target) = (
        connect(&dbs[0].primary_url).await,
        connect(&dbs[1].primary_url).await,
    );
    let (v1, v2) = maps();
    for p in [&source, &target] {
        sqlx::query(
            "CREATE TABLE products (id bigint PRIMARY KEY, slot integer NOT NULL, price bigint NOT NULL)",
        )
        .execute(p)
        .await
        .unwrap();
        sqlx::query("CREATE INDEX ON products (slot)")
            .execute(p)
            .await
            .unwrap();
    }
    install(&source, &v1.slots_of(0), v1.version())
        .await
        .unwrap();
    install(&target, &[], v1.version()).await.unwrap();
    let (ids, slots): (Vec<i64>, Vec<i32>) = (0..ROWS)
        .map(|id| (id, v1.slot(Key::Int(id)) as i32))
        .unzip();
    sqlx::query(
        "INSERT INTO products (id, slot, price) SELECT * FROM unnest($1::bigint[], $2::integer[], $1::bigint[])",
    )
    .bind(&ids)
    .bind(&slots)
    .execute(&source)
    .await
    .unwrap();
    let moving = moving();
    let staying = v1
        .slots_of(0)
        .into_iter()
        .find(|s| !moving.contains(s))
        .unwrap();

    let mut child = KillOnDrop(
        child::spawn_self(&[
            (CHILD, "cutover"),
            (SOURCE, &dbs[0].primary_url),
            (TARGET, &dbs[1].primary_url),
        ])
        .unwrap(),
    );
    // Watch the databases for the step to kill it at.
    let started = Instant::now();
    loop {
        let fenced = count(
            &source,
            "SELECT count(*) FROM stanchion_slot_owner WHERE state = 'fenced'",
        )
        .await;
        let copied = count(&target, "SELECT count(*) FROM products").await;
        let at_step = match kill_at {
            KillAt::Copying => copied >= 1000,
            KillAt::Fenced => fenced > 0,
            KillAt::Releasing => {
                count(
                    &source,
                    "SELECT count(*) FROM stanchion_slot_owner WHERE state = 'moved'",
                )
                .await
                    > 0
            }
        };
        if at_step {
            break;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the cutover ended before the step to kill it at"
        );
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "killed, not finished");
    let copied = count(&target, "SELECT count(*) FROM products").await;
    let moving_rows = ids
        .iter()
        .filter(|&&id| moving.contains(&v1.slot(Key::Int(id))))
        .count() as i64;
    println!(
        "killed ({kill_at:?}) after {:?}: {copied} of {moving_rows} moving rows on the target",
        started.elapsed()
    );

    // What the kill left, seen from outside.
    let moving_write = guard(&source, moving[0]).await;
    assert!(
        guard(&source, staying).await.is_ok(),
        "a staying slot takes writes"
    );
    if kill_at != KillAt::Releasing {
        assert!(
            matches!(
                guard(&target, moving[0]).await,
                Err(CutoverError::Route(RouteError::SlotFenced { .. }))
            ),
            "the target does not take writes of a slot it has not received"
        );
    }
    let cutover = cutover(&source, &target);
    if kill_at == KillAt::Releasing {
        assert!(
            matches!(
                moving_write,
                Err(CutoverError::Route(RouteError::SlotMoved { version, .. })) if version == v2.version()
            ),
            "{moving_write:?}"
        );
        assert!(guard(&target, moving[0]).await.is_ok(), "the target owns");
        let dead = count(
            &source,
            &format!(
                "SELECT count(*) FROM products WHERE slot = ANY('{{{}}}'::integer[])",
                moving
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        )
        .await;
        println!("{dead} dead rows left on the source");
        assert!(dead > 0, "the release had finished before the kill");
        let released = cutover.release().await.unwrap();
        assert_eq!(released as i64, dead);
    } else if kill_at == KillAt::Fenced {
        assert!(
            matches!(
                moving_write,
                Err(CutoverError::Route(RouteError::SlotFenced { .. }))
            ),
            "{moving_write:?}"
        );
        cutover.run().await.expect("run() again after a fence");
    } else {
        assert!(
            moving_write.is_ok(),
            "before the fence the source still owns: {moving_write:?}"
        );
        // A write that lands on the source meanwhile must move with the slot.
        let id = *ids
            .iter()
            .find(|&&id| v1.slot(Key::Int(id)) == moving[0])
            .unwrap();
        sqlx::query("UPDATE products SET price = -1 WHERE id = $1")
            .bind(id)
            .execute(&source)
            .await
            .unwrap();
        if abort_first {
            cutover.abort().await.unwrap();
            assert_eq!(count(&target, "SELECT count(*) FROM products").await, 0);
        }
        cutover
            .run()
            .await
            .expect("run() after a kill while copying");
        let moved: i64 = sqlx::query_scalar("SELECT price FROM products WHERE id = $1")
            .bind(id)
            .fetch_one(&target)
            .await
            .unwrap();
        assert_eq!(
            moved, -1,
            "the write made after the kill moved with its row"
        );
        sqlx::query("UPDATE products SET price = id WHERE id = $1")
            .bind(id)
            .execute(&target)
            .await
            .unwrap();
    }

    // Every row exactly once, where v2 puts it, with its value.
    let mut seen = std::collections::HashSet::new();
    for (shard, pool) in [&source, &target].into_iter().enumerate() {
        for r in sqlx::query("SELECT id, slot, price FROM products")
            .fetch_all(pool)
            .await
            .unwrap()
        {
            let (id, slot, price): (i64, i32, i64) = (r.get(0), r.get(1), r.get(2));
            assert_eq!(v2.owner(slot as u32), Some(shard as u32), "row {id}");
            assert_eq!(price, id, "row {id}");
            assert!(seen.insert(id), "row {id} twice");
        }
    }
    assert_eq!(seen.len() as i64, ROWS, "rows lost");
    assert!(matches!(
        guard(&source, moving[0]).await,
        Err(CutoverError::Route(RouteError::SlotMoved { version, .. })) if version == v2.version()
    ));
    assert!(guard(&target, moving[0]).await.is_ok());
}
