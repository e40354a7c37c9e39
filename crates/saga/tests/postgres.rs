//! The saga executor on real PostgreSQL from the testkit: crashes at every boundary, two
//! executors over one log, a restarted server, definitions that are missing or changed, parked
//! compensations.

mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use stanchion_saga::{
    Executor, PgSagaLog, RetryPolicy, SagaDef, SagaError, Status, Step, StepError,
};
use stanchion_testkit::{Node, PostgresCluster};
use support::*;

fn cluster() -> &'static PostgresCluster {
    static C: OnceLock<PostgresCluster> = OnceLock::new();
    C.get_or_init(|| PostgresCluster::start(0).unwrap())
}

/// A saga log in a new database of `cluster`, migrated, and its pool (for the test's own
/// tables).
async fn log_and_pool(
    cluster: &PostgresCluster,
    connections: u32,
    acquire: Duration,
) -> (PgSagaLog, sqlx::PgPool) {
    let db = cluster.create_database().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(acquire)
        .connect(&db.primary_url)
        .await
        .unwrap();
    let log = PgSagaLog::new(pool.clone(), "shop").unwrap();
    log.migrate().await.unwrap();
    (log, pool)
}

async fn log_on(cluster: &PostgresCluster, acquire: Duration) -> PgSagaLog {
    log_and_pool(cluster, 8, acquire).await.0
}

async fn log() -> PgSagaLog {
    log_on(cluster(), Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_boundary_recovers_with_each_effect_once() {
    crash_at_every_boundary(log().await).await;
}

/// Two executors over one log, many orders begun on both, one executor aborted midway: every
/// order ends completed with its effects once, and no saga ever had two steps running at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_executors_never_run_one_saga_at_once() {
    let log = log().await;
    let shop = Arc::new(Shop::default());
    let a = executor(log.clone(), shop.clone(), "a");
    let b = executor(log.clone(), shop.clone(), "b");
    // Slow steps and failing confirmations, so sagas are still running when `a` dies.
    shop.step_delay_ms.store(20, Ordering::SeqCst);
    shop.confirm_failures.store(40, Ordering::SeqCst);
    let mut ids = Vec::new();
    for i in 0..60 {
        let e = if i % 2 == 0 { &a } else { &b };
        ids.push(
            e.begin("order", &json!({ "sku": format!("sku-{i}") }))
                .await
                .unwrap(),
        );
    }
    a.abort().await;
    for id in &ids {
        let done = b.wait(id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(done.status, Status::Completed, "{done:?}");
        check_effects(&shop, id, done.status);
    }
    for s in [&shop.inventory, &shop.payment, &shop.orders] {
        assert_eq!(
            s.max_active.load(Ordering::SeqCst),
            1,
            "a saga ran two steps at once"
        );
    }
    let stats = b.stats();
    assert!(stats.resumed > 0, "{stats:?}");
    b.shutdown(Duration::from_secs(5)).await;
}

/// PostgreSQL restarted while orders run: writes are retried and every order finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_continue_after_a_postgres_restart() {
    let mut cluster = PostgresCluster::start(0).unwrap();
    let log = log_on(&cluster, Duration::from_millis(500)).await;
    let shop = Arc::new(Shop::default());
    let exec = Executor::builder(log.clone())
        .name("restart")
        .register(order_saga(shop.clone(), 1))
        .lease(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(100))
        .start()
        .unwrap();
    shop.confirm_failures.store(40, Ordering::SeqCst);
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(exec.begin("order", &json!({ "sku": i })).await.unwrap());
    }
    tokio::task::block_in_place(|| cluster.restart(Node::Primary).unwrap());
    for id in &ids {
        let done = exec.wait(id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(done.status, Status::Completed);
        check_effects(&shop, id, done.status);
    }
    exec.shutdown(Duration::from_secs(5)).await;
}

/// PostgreSQL killed for good while orders run (it never comes back): what the caller sees is
/// a prompt error from `begin`, `wait` and `get` (each within the pool's acquire timeout, none
/// holding the database's password), no step started past what the log recorded, and a
/// shutdown that still ends within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_postgres_fails_calls_promptly_and_the_executor_still_stops() {
    let password = "pg-secret-4d1f";
    let mut cluster = PostgresCluster::builder()
        .replicas(0)
        .password(password)
        .start()
        .unwrap();
    assert!(cluster.url(Node::Primary).contains(password));
    let log = log_on(&cluster, Duration::from_millis(300)).await;
    let shop = Arc::new(Shop::default());
    let exec = Executor::builder(log.clone())
        .name("dead")
        .register(order_saga(shop.clone(), 1))
        .lease(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(100))
        .start()
        .unwrap();
    // Slowish steps (within their 150 ms timeout): orders are mid-saga when the server dies.
    shop.step_delay_ms.store(50, Ordering::SeqCst);
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(exec.begin("order", &json!({ "sku": i })).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(75)).await;
    tokio::task::block_in_place(|| cluster.kill(Node::Primary).unwrap());
    let prompt = Duration::from_secs(2);
    let t = Instant::now();
    let begun = exec.begin("order", &json!({ "sku": "late" })).await;
    assert!(matches!(begun, Err(SagaError::Database(_))), "{begun:?}");
    assert!(t.elapsed() < prompt, "begin took {:?}", t.elapsed());
    let t = Instant::now();
    let waited = exec.wait(&ids[0], Duration::from_secs(30)).await;
    assert!(matches!(waited, Err(SagaError::Database(_))), "{waited:?}");
    assert!(t.elapsed() < prompt, "wait took {:?}", t.elapsed());
    for e in [begun.unwrap_err(), waited.unwrap_err()] {
        assert!(!e.to_string().contains(password), "{e}");
        assert!(!format!("{e:?}").contains(password), "{e:?}");
    }
    // Running sagas cannot record their steps; a step whose start was not recorded does not
    // run, so the effects stop within a step or two of the death.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = || {
        [&shop.inventory, &shop.payment, &shop.orders]
            .iter()
            .map(|s| s.calls.load(Ordering::SeqCst))
            .sum::<u64>()
    };
    let ran = calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = calls();
    assert_eq!(ran, later, "steps kept running with the log dead");
    // The orders were cut short: not every step of every order ran.
    let all_steps = 10 * 3;
    assert!(
        ran < all_steps,
        "{ran} step calls: the orders finished before the kill"
    );
    eprintln!("{ran} of {all_steps} step calls a second after the log died; none in the next two");
    let t = Instant::now();
    exec.shutdown(Duration::from_secs(3)).await;
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "shutdown took {:?}",
        t.elapsed()
    );
}

/// A saga whose definition is not registered on the executor that finds it is parked with a
/// clear error, not lost; registered again, an operator's retry finishes it. A saga that began
/// under version 1 finishes under version 1 after version 2 is deployed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_changed_definitions() {
    let log = log().await;
    let shop = Arc::new(Shop::default());
    let first = executor(log.clone(), shop.clone(), "v1");
    shop.chaos.arm("charge.before");
    let id = first
        .begin("order", &json!({ "sku": "tea" }))
        .await
        .unwrap();
    shop.chaos.wait_hit().await;
    first.abort().await;

    // An executor that knows no `order` saga.
    let other = Executor::builder(log.clone())
        .register(
            SagaDef::builder("refund", 1)
                .step(
                    Step::pivot("pay_back", |_| async { Ok(json!(null)) })
                        .timeout(Duration::from_millis(100)),
                )
                .build()
                .unwrap(),
        )
        .lease(Duration::from_millis(400))
        .poll_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    let parked = other.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(parked.status, Status::Parked);
    assert!(
        parked
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no definition `order` version 1")
    );
    assert_eq!(other.parked(10).await.unwrap().len(), 1);
    assert!(matches!(
        other.begin("order", &json!({})).await,
        Err(SagaError::UnknownSaga(_))
    ));
    other.shutdown(Duration::from_secs(5)).await;

    // Versions 1 and 2 registered: the parked v1 saga is retried and finishes under v1 (whose
    // steps are the shop's); new sagas use v2.
    let v2_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = v2_ran.clone();
    let v2 = SagaDef::builder("order", 2)
        .step(
            Step::pivot("all_at_once", move |_| {
                let flag = flag.clone();
                async move {
                    flag.store(true, Ordering::SeqCst);
                    Ok(json!(null))
                }
            })
            .timeout(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    let both = Executor::builder(log.clone())
        .register(order_saga(shop.clone(), 1))
        .register(v2)
        .lease(Duration::from_millis(400))
        .poll_interval(Duration::from_millis(50))
        .start()
        .unwrap();
    both.retry_parked(&id, "order v1 deployed again")
        .await
        .unwrap();
    assert!(matches!(
        both.retry_parked(&id, "twice").await,
        Err(SagaError::WrongStatus { .. })
    ));
    let done = both.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!((done.status, done.version), (Status::Completed, 1));
    check_effects(&shop, &id, done.status);
    assert!(!v2_ran.load(Ordering::SeqCst));
    let new = both.begin("order", &json!({})).await.unwrap();
    let done = both.wait(&new, Duration::from_secs(10)).await.unwrap();
    assert_eq!((done.status, done.version), (Status::Completed, 2));
    assert!(v2_ran.load(Ordering::SeqCst));
    let kinds: Vec<String> = both
        .history(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.kind)
        .collect();
    assert!(kinds.contains(&"parked".to_owned()) && kinds.contains(&"retried".to_owned()));
    both.shutdown(Duration::from_secs(5)).await;
}

/// A compensation that keeps failing is parked with its error; an operator resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_compensation_is_parked_and_resolved_by_an_operator() {
    let log = log().await;
    let def = SagaDef::builder("stuck", 1)
        .step(
            Step::compensatable(
                "hold",
                |_| async { Ok(json!(1)) },
                |_| async { Err::<(), _>(StepError::transient("warehouse API down")) },
            )
            .retry(RetryPolicy::new(
                3,
                Duration::from_millis(5),
                Duration::from_millis(10),
            ))
            .timeout(Duration::from_millis(100)),
        )
        .step(
            Step::pivot("pay", |_| async {
                Err::<serde_json::Value, _>(StepError::permanent("declined"))
            })
            .timeout(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    let exec = Executor::builder(log)
        .register(def)
        .lease(Duration::from_millis(400))
        .start()
        .unwrap();
    let id = exec.begin("stuck", &json!({})).await.unwrap();
    let parked = exec.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(parked.status, Status::Parked);
    assert_eq!(parked.parked_from, Some(Status::Compensating));
    assert!(parked.error.unwrap().contains("warehouse API down"));
    exec.resolve(&id, "released by hand").await.unwrap();
    let r = exec.get(&id).await.unwrap().unwrap();
    assert_eq!(r.status, Status::Resolved);
    assert_eq!(exec.stats().parked, 1);
    exec.shutdown(Duration::from_secs(5)).await;
}

/// A deadline that passes before the pivot compensates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_before_the_pivot_compensates() {
    let log = log().await;
    let undone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let u = undone.clone();
    let def = SagaDef::builder("slow", 1)
        .step(
            Step::compensatable(
                "hold",
                |_| async {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Ok(json!(1))
                },
                move |_| {
                    let u = u.clone();
                    async move {
                        u.store(true, Ordering::SeqCst);
                        Ok(())
                    }
                },
            )
            .timeout(Duration::from_millis(190)),
        )
        .step(Step::pivot("pay", |_| async { Ok(json!(1)) }).timeout(Duration::from_millis(100)))
        .deadline(Duration::from_millis(100))
        .build()
        .unwrap();
    let exec = Executor::builder(log)
        .register(def)
        .lease(Duration::from_millis(400))
        .start()
        .unwrap();
    let t = Instant::now();
    let id = exec.begin("slow", &json!({})).await.unwrap();
    let done = exec.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        done.status,
        Status::Compensated,
        "{done:?} after {:?}",
        t.elapsed()
    );
    assert!(undone.load(Ordering::SeqCst));
    // A compensated saga still says why it was compensated.
    assert_eq!(
        done.error.as_deref(),
        Some("deadline passed before the pivot")
    );
    exec.shutdown(Duration::from_secs(5)).await;
}

/// The order's "charge" step writes an outbox row in the log's own transaction. The executor
/// dies after the row's insert and before the commit: no row, and the step is not recorded; a
/// second executor runs it again. The work then fails once (a failed attempt, retried). In the
/// end: one row per saga, written with the commit that recorded the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_work_in_the_log_transaction_commits_with_it_or_not_at_all() {
    let (log, pool) = log_and_pool(cluster(), 8, Duration::from_secs(30)).await;
    sqlx::raw_sql("CREATE TABLE outbox_events (saga text NOT NULL, key text NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let chaos = Arc::new(Chaos::default());
    let fail_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let def = |chaos: Arc<Chaos>, fail_once: Arc<std::sync::atomic::AtomicBool>| {
        SagaDef::builder("paid", 1)
            .step(
                Step::compensatable(
                    "reserve",
                    |_| async { Ok(json!("held")) },
                    |_| async { Ok(()) },
                )
                .timeout(Duration::from_secs(1)),
            )
            .step(
                Step::pivot("charge", |_| async { Ok(json!({ "receipt": 7 })) })
                    .retry(RetryPolicy::new(
                        3,
                        Duration::from_millis(5),
                        Duration::from_millis(20),
                    ))
                    .timeout(Duration::from_secs(1))
                    .in_postgres_log_transaction(move |conn, ctx, output| {
                        let (chaos, fail_once) = (chaos.clone(), fail_once.clone());
                        let (saga, key) = (ctx.saga_id().to_string(), ctx.idempotency_key());
                        assert_eq!(output["receipt"], 7, "the work sees the action's output");
                        Box::pin(async move {
                            sqlx::query("INSERT INTO outbox_events (saga, key) VALUES ($1, $2)")
                                .bind(&saga)
                                .bind(&key)
                                .execute(&mut *conn)
                                .await
                                .map_err(StepError::transient)?;
                            chaos.at("work.inserted").await;
                            if fail_once.swap(false, Ordering::SeqCst) {
                                return Err(StepError::transient("broker table locked"));
                            }
                            Ok(())
                        })
                    }),
            )
            .build()
            .unwrap()
    };
    let start = |name: &str| {
        Executor::builder(log.clone())
            .name(name)
            .register(def(chaos.clone(), fail_once.clone()))
            .lease(Duration::from_secs(3))
            .poll_interval(Duration::from_millis(50))
            .start()
            .unwrap()
    };
    let rows = |saga: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_events WHERE saga = $1")
                .bind(saga)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    // Dies between the work's insert and the commit.
    chaos.arm("work.inserted");
    let first = start("first");
    let id = first.begin("paid", &json!({})).await.unwrap();
    chaos.wait_hit().await;
    first.abort().await;
    assert_eq!(
        rows(id.to_string()).await,
        0,
        "rolled back with the transaction"
    );
    let kinds: Vec<String> = first
        .history(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.kind)
        .collect();
    assert_eq!(kinds, ["started", "step_completed"], "charge not recorded");

    // A second executor takes the saga over once the lease expires; the work fails once first.
    fail_once.store(true, Ordering::SeqCst);
    let second = start("second");
    let done = second.wait(&id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(rows(id.to_string()).await, 1, "one row, with the commit");
    let kinds: Vec<String> = second
        .history(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.kind)
        .collect();
    assert_eq!(
        kinds,
        ["started", "step_completed", "step_failed", "completed"],
        "the failed work is a failed attempt; the completion is recorded once"
    );

    // Without faults, many sagas: one row each.
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(second.begin("paid", &json!({})).await.unwrap());
    }
    for id in &ids {
        assert_eq!(
            second
                .wait(id, Duration::from_secs(10))
                .await
                .unwrap()
                .status,
            Status::Completed
        );
        assert_eq!(rows(id.to_string()).await, 1);
    }
    second.shutdown(Duration::from_secs(5)).await;
}

/// A trip: hold (compensatable), then flight, hotel and car booked at once (a parallel group),
/// then pay (the pivot, which reads the flight's output). Every call is counted per
/// idempotency key in `calls`; `booked` holds what is applied and not compensated.
fn trip(
    pool: sqlx::PgPool,
    chaos: Arc<Chaos>,
    running: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
) -> SagaDef {
    let call = move |pool: sqlx::PgPool, key: String, what: &'static str, undo: bool| async move {
        let mut tx = pool.begin().await.map_err(StepError::transient)?;
        sqlx::query(
            "INSERT INTO calls (key, n) VALUES ($1, 1) ON CONFLICT (key) DO UPDATE SET n = calls.n + 1",
        )
        .bind(&key)
        .execute(&mut *tx)
        .await
        .map_err(StepError::transient)?;
        let q = if undo {
            "DELETE FROM booked WHERE what = $1 AND key = $2"
        } else {
            "INSERT INTO booked (what, key) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        };
        // The undo names the action's key (the compensation's own key ends in `:compensation`).
        let action_key = key.trim_end_matches(":compensation").to_owned();
        sqlx::query(q)
            .bind(what)
            .bind(action_key)
            .execute(&mut *tx)
            .await
            .map_err(StepError::transient)?;
        tx.commit().await.map_err(StepError::transient)?;
        Ok::<(), StepError>(())
    };
    let branch = |what: &'static str| {
        let (p1, p2, chaos, running, most) = (
            pool.clone(),
            pool.clone(),
            chaos.clone(),
            running.clone(),
            most.clone(),
        );
        Step::compensatable(
            what,
            move |ctx| {
                let (pool, chaos, running, most) =
                    (p1.clone(), chaos.clone(), running.clone(), most.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    let input: serde_json::Value = ctx.input()?;
                    if input["fail"] == what {
                        return Err(StepError::permanent(format!("no {what} available")));
                    }
                    call(pool, ctx.idempotency_key(), what, false).await?;
                    chaos.at(&format!("{what}.booked")).await;
                    Ok(json!({ "booked": what }))
                }
            },
            move |ctx| {
                let pool = p2.clone();
                async move { call(pool, ctx.idempotency_key(), what, true).await }
            },
        )
    };
    let (p_hold, p_release, p_pay) = (pool.clone(), pool.clone(), pool.clone());
    SagaDef::builder("trip", 1)
        .step(
            Step::compensatable(
                "hold",
                move |ctx| {
                    let held = call(p_hold.clone(), ctx.idempotency_key(), "hold", false);
                    async move {
                        held.await?;
                        Ok(json!("held"))
                    }
                },
                move |ctx| call(p_release.clone(), ctx.idempotency_key(), "hold", true),
            )
            .timeout(Duration::from_secs(1)),
        )
        .step(
            Step::parallel(
                "book",
                vec![branch("flight"), branch("hotel"), branch("car")],
            )
            .retry(RetryPolicy::new(
                3,
                Duration::from_millis(5),
                Duration::from_millis(20),
            ))
            .timeout(Duration::from_secs(1)),
        )
        .step(
            Step::pivot("pay", move |ctx| {
                let pool = p_pay.clone();
                async move {
                    let flight: serde_json::Value = ctx.output("flight")?;
                    assert_eq!(flight["booked"], "flight");
                    call(pool, ctx.idempotency_key(), "pay", false).await?;
                    Ok(json!("paid"))
                }
            })
            .timeout(Duration::from_secs(1)),
        )
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_group_runs_its_branches_at_once_and_compensates_all_of_them() {
    use std::sync::atomic::AtomicUsize;
    let (log, pool) = log_and_pool(cluster(), 12, Duration::from_secs(30)).await;
    sqlx::raw_sql(
        "CREATE TABLE calls (key text PRIMARY KEY, n int NOT NULL);
         CREATE TABLE booked (what text NOT NULL, key text NOT NULL, PRIMARY KEY (what, key));",
    )
    .execute(&pool)
    .await
    .unwrap();
    let chaos = Arc::new(Chaos::default());
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let start = |name: &str| {
        Executor::builder(log.clone())
            .name(name)
            .register(trip(
                pool.clone(),
                chaos.clone(),
                running.clone(),
                most.clone(),
            ))
            .lease(Duration::from_secs(3))
            .poll_interval(Duration::from_millis(50))
            .start()
            .unwrap()
    };
    let booked = |id: String| {
        let pool = pool.clone();
        async move {
            let mut rows: Vec<String> = sqlx::query_scalar(
                "SELECT what FROM booked WHERE key LIKE $1 || ':%' ORDER BY what",
            )
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.sort();
            rows
        }
    };
    let calls = |key: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT n FROM calls WHERE key = $1")
                .bind(key)
                .fetch_optional(&pool)
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    let exec = start("one");

    // Fork and join: the three bookings overlap.
    let id = exec.begin("trip", &json!({})).await.unwrap();
    let done = exec.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "all three branches ran at once"
    );
    assert_eq!(
        booked(id.to_string()).await,
        ["car", "flight", "hold", "hotel", "pay"]
    );

    // The hotel is full: the flight and the car were booked and are cancelled, the hotel's
    // compensation runs too (with nothing to undo), then the hold is released.
    let id = exec
        .begin("trip", &json!({ "fail": "hotel" }))
        .await
        .unwrap();
    let done = exec.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done.status, Status::Compensated);
    assert!(
        done.error
            .as_deref()
            .is_some_and(|e| e.contains("branch `hotel`")),
        "{done:?}"
    );
    assert!(booked(id.to_string()).await.is_empty(), "everything undone");
    for what in ["flight", "hotel", "car", "hold"] {
        assert_eq!(
            calls(format!("{id}:{what}:compensation")).await,
            1,
            "{what} compensated once"
        );
    }
    assert_eq!(calls(format!("{id}:pay")).await, 0, "never charged");

    // The executor dies inside the group, after the car was booked; another one runs the
    // group again: every branch is called again with its key, each applied once.
    chaos.arm("car.booked");
    let id = exec.begin("trip", &json!({})).await.unwrap();
    chaos.wait_hit().await;
    exec.abort().await;
    let second = start("two");
    let done = second.wait(&id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(
        booked(id.to_string()).await,
        ["car", "flight", "hold", "hotel", "pay"]
    );
    assert_eq!(
        calls(format!("{id}:car")).await,
        2,
        "the car's call was repeated, applied once"
    );
    second.shutdown(Duration::from_secs(5)).await;
}

/// Every process of a fleet migrates when it starts: eight at once on a fresh database, three
/// times over, all succeed (the schema is created under an advisory lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_migrating_at_once_all_succeed() {
    for _ in 0..3 {
        let db = cluster().create_database().unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&db.primary_url)
                .await
                .unwrap();
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                let store = PgSagaLog::new(pool, "shop").unwrap();
                barrier.wait().await;
                store.migrate().await.map_err(|e| e.to_string())
            }));
        }
        for t in tasks {
            let migrated = t.await.unwrap();
            assert!(migrated.is_ok(), "{migrated:?}");
        }
    }
}
