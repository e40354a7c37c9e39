//! Crash recovery checked from outside, across operating-system processes: executors run as
//! separate processes (this test binary started again with `SAGA_CHILD_EXECUTOR` set), each
//! beginning order sagas on one PostgreSQL log, and are killed with SIGKILL at random. Nothing
//! a process holds survives: no lease given back, no destructor. A last executor then takes over
//! whatever was left. Every saga must end completed or compensated, each step's effect applied
//! once (the "services" are tables keyed by the step's idempotency key, counting every call),
//! and nothing compensated after the pivot.
//!
//! A test binary without the libtest harness, so that its `main` can be an executor.

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use stanchion_saga::{Executor, PgSagaLog, RetryPolicy, SagaDef, Step, StepError};
use stanchion_testkit::{PostgresCluster, child};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match std::env::var("SAGA_CHILD_EXECUTOR") {
        Ok(name) => rt.block_on(child_executor(name)),
        Err(_) => child::run_as_test(
            "executors_in_processes_killed_at_random_finish_every_saga_once",
            || {
                rt.block_on(executors_in_processes_killed_at_random_finish_every_saga_once());
            },
        ),
    }
}

/// A call to a service that applies each idempotency key once: every call is counted, the
/// effect is recorded only the first time.
async fn call(pool: &PgPool, key: &str, saga: &str, effect: &str) -> Result<(), StepError> {
    // A little work, so that kills land inside steps too.
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..15))).await;
    sqlx::query(
        "WITH c AS (INSERT INTO calls (key, n) VALUES ($1, 1) \
           ON CONFLICT (key) DO UPDATE SET n = calls.n + 1) \
         INSERT INTO effects (key, saga, effect) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(saga)
    .bind(effect)
    .execute(pool)
    .await
    .map_err(StepError::transient)?;
    Ok(())
}

fn order(pool: PgPool) -> SagaDef {
    let fast = RetryPolicy::new(5, Duration::from_millis(5), Duration::from_millis(50));
    let (p1, p2, p3, p4) = (pool.clone(), pool.clone(), pool.clone(), pool);
    SagaDef::builder("order", 1)
        .step(
            Step::compensatable(
                "reserve",
                move |ctx| {
                    let pool = p1.clone();
                    async move {
                        let saga = ctx.saga_id().as_str().to_owned();
                        call(&pool, &ctx.idempotency_key(), &saga, "reserve").await?;
                        Ok(json!("held"))
                    }
                },
                move |ctx| {
                    let pool = p2.clone();
                    async move {
                        let saga = ctx.saga_id().as_str().to_owned();
                        call(&pool, &ctx.idempotency_key(), &saga, "release").await
                    }
                },
            )
            .retry(fast)
            .timeout(Duration::from_millis(250)),
        )
        .step(
            Step::pivot("charge", move |ctx| {
                let pool = p3.clone();
                async move {
                    let input: Value = ctx.input()?;
                    if input["decline"] == json!(true) {
                        return Err(StepError::permanent("card declined"));
                    }
                    let saga = ctx.saga_id().as_str().to_owned();
                    call(&pool, &ctx.idempotency_key(), &saga, "charge").await?;
                    Ok(json!("charged"))
                }
            })
            .retry(fast)
            .timeout(Duration::from_millis(250)),
        )
        .step(
            Step::retriable("confirm", move |ctx| {
                let pool = p4.clone();
                async move {
                    let saga = ctx.saga_id().as_str().to_owned();
                    call(&pool, &ctx.idempotency_key(), &saga, "confirm").await?;
                    Ok(json!("confirmed"))
                }
            })
            .retry(fast)
            .timeout(Duration::from_millis(250)),
        )
        .build()
        .expect("definition")
}

async fn executor(database: &str, name: &str) -> (Executor<PgSagaLog>, PgPool) {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(database)
        .await
        .expect("postgres");
    let log = PgSagaLog::new(pool.clone(), "shop").expect("log");
    let exec = Executor::builder(log)
        .name(name)
        .register(order(pool.clone()))
        .lease(Duration::from_millis(600))
        .poll_interval(Duration::from_millis(50))
        .max_in_flight(16)
        .start()
        .expect("executor");
    (exec, pool)
}

/// An executor process: begins orders until killed, or until the test process is gone (its end
/// of our stdin closes).
async fn child_executor(name: String) {
    child::exit_with_parent();
    let database = std::env::var("SAGA_CHILD_DATABASE").expect("database url");
    let (exec, _pool) = executor(&database, &name).await;
    loop {
        let decline = fastrand::u8(0..10) < 2;
        if exec
            .begin("order", &json!({ "decline": decline }))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spawn_executor(n: usize, database: &str) -> Child {
    let name = format!("executor-{n}");
    child::spawn_self(&[
        ("SAGA_CHILD_EXECUTOR", &name),
        ("SAGA_CHILD_DATABASE", database),
    ])
    .expect("spawn executor process")
}

async fn executors_in_processes_killed_at_random_finish_every_saga_once() {
    let cluster = PostgresCluster::start(0).expect("postgres");
    let db = cluster.create_database().expect("database");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.primary_url)
        .await
        .expect("pool");
    PgSagaLog::new(pool.clone(), "shop")
        .expect("log")
        .migrate()
        .await
        .expect("migrate");
    sqlx::raw_sql(
        "CREATE TABLE calls (key text PRIMARY KEY, n int NOT NULL);
         CREATE TABLE effects (key text PRIMARY KEY, saga text NOT NULL, effect text NOT NULL);",
    )
    .execute(&pool)
    .await
    .expect("tables");

    let mut children: Vec<Child> = (0..3).map(|n| spawn_executor(n, &db.primary_url)).collect();
    let mut spawned = children.len();
    let mut killed = 0;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for c in &mut children {
            assert!(
                c.try_wait().expect("status").is_none(),
                "an executor process exited on its own"
            );
        }
        let victim = fastrand::usize(0..children.len());
        children[victim].kill().expect("SIGKILL");
        children[victim].wait().expect("reap");
        killed += 1;
        children[victim] = spawn_executor(spawned, &db.primary_url);
        spawned += 1;
    }
    for mut c in children {
        c.kill().expect("SIGKILL");
        c.wait().expect("reap");
    }

    // A last executor takes over every saga the killed ones left, once their leases expire.
    let (last, _) = executor(&db.primary_url, "last").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM shop.sagas WHERE status IN ('running', 'compensating')",
        )
        .fetch_one(&pool)
        .await
        .expect("count");
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} sagas still open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last.shutdown(Duration::from_secs(5)).await;

    let statuses: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM shop.sagas")
        .fetch_all(&pool)
        .await
        .expect("sagas");
    let effects: Vec<(String, String)> = sqlx::query_as("SELECT saga, effect FROM effects")
        .fetch_all(&pool)
        .await
        .expect("effects");
    let mut by_saga: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for (saga, effect) in &effects {
        by_saga.entry(saga).or_default().push(effect);
    }
    let (mut completed, mut compensated) = (0, 0);
    for (id, status) in &statuses {
        let mut got = by_saga.remove(id.as_str()).unwrap_or_default();
        got.sort_unstable();
        match status.as_str() {
            "completed" => {
                completed += 1;
                assert_eq!(got, ["charge", "confirm", "reserve"], "saga {id}");
            }
            "compensated" => {
                compensated += 1;
                // Declined at the pivot: the hold is released (or was never made, if the
                // executor died before the reservation ran); never charged.
                assert!(
                    got.is_empty() || got == ["release", "reserve"],
                    "saga {id} compensated with effects {got:?}"
                );
            }
            other => panic!("saga {id} ended {other}"),
        }
    }
    assert!(by_saga.is_empty(), "effects of unknown sagas: {by_saga:?}");
    let calls: i64 = sqlx::query_scalar("SELECT coalesce(sum(n), 0)::int8 FROM calls")
        .fetch_one(&pool)
        .await
        .expect("calls");
    println!(
        "{} sagas: {completed} completed, {compensated} compensated; {} effects from {calls} \
         service calls; {killed} executor processes killed (SIGKILL)",
        statuses.len(),
        effects.len()
    );
    assert!(killed >= 10, "the run killed {killed} executors");
    assert!(
        completed > 0 && compensated > 0,
        "both endings were exercised"
    );
}
