//! The shop's order flow as a test: inventory and payment as small in-memory services that
//! apply each idempotency key once, and crash points the steps can stop at.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use stanchion_saga::{
    Executor, RetryPolicy, SagaDef, SagaId, SagaLogStore, Status, Step, StepContext, StepError,
};

/// A service that applies each idempotency key once and counts calls.
#[derive(Default)]
pub struct Service {
    applied: Mutex<HashMap<String, Value>>,
    pub calls: AtomicU64,
    /// Per saga: how many of its steps run right now here (must never exceed 1).
    active: Mutex<HashMap<String, u32>>,
    pub max_active: AtomicU64,
}

impl Service {
    pub fn apply(&self, key: &str, v: Value) -> Value {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.applied
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_insert(v)
            .clone()
    }
    pub fn has(&self, key: &str) -> bool {
        self.applied.lock().unwrap().contains_key(key)
    }
    pub fn keys(&self) -> HashSet<String> {
        self.applied.lock().unwrap().keys().cloned().collect()
    }
    /// Counts a step of `saga` running here until the guard drops (also when an aborted
    /// executor drops the step's future).
    fn enter<'a>(&'a self, saga: &str) -> Active<'a> {
        let mut a = self.active.lock().unwrap();
        let n = a.entry(saga.to_owned()).or_insert(0);
        *n += 1;
        self.max_active.fetch_max(u64::from(*n), Ordering::SeqCst);
        Active {
            service: self,
            saga: saga.to_owned(),
        }
    }
}

pub struct Active<'a> {
    service: &'a Service,
    saga: String,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let mut a = self.service.active.lock().unwrap();
        if let Some(n) = a.get_mut(&self.saga) {
            *n -= 1;
        }
    }
}

/// Crash points: a step reaching the armed point signals the test and never returns, so the
/// test can abort the executor there, as a process dying at that instant.
#[derive(Default)]
pub struct Chaos {
    armed: Mutex<Option<String>>,
    pub hit: AtomicBool,
}

impl Chaos {
    pub fn arm(&self, point: &str) {
        *self.armed.lock().unwrap() = Some(point.to_owned());
        self.hit.store(false, Ordering::SeqCst);
    }
    pub async fn at(&self, point: &str) {
        let now = {
            let mut a = self.armed.lock().unwrap();
            if a.as_deref() == Some(point) {
                *a = None;
                true
            } else {
                false
            }
        };
        if now {
            self.hit.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
    }
    pub async fn wait_hit(&self) {
        for _ in 0..1000 {
            if self.hit.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the crash point was never reached");
    }
}

#[derive(Default)]
pub struct Shop {
    pub inventory: Service,
    pub payment: Service,
    pub orders: Service,
    pub chaos: Chaos,
    /// Every card is declined (the pivot fails permanently).
    pub decline_all: AtomicBool,
    /// Transient failures to inject into the confirm step (after the pivot).
    pub confirm_failures: AtomicU64,
    /// How long each action takes, in milliseconds.
    pub step_delay_ms: AtomicU64,
}

impl Shop {
    async fn delay(&self) {
        let ms = self.step_delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

fn sid(ctx: &StepContext) -> String {
    ctx.saga_id().to_string()
}

/// reserve (compensatable) -> charge (pivot) -> confirm (retriable).
pub fn order_saga(shop: Arc<Shop>, version: u32) -> SagaDef {
    let (s1, s2, s3, s4) = (shop.clone(), shop.clone(), shop.clone(), shop);
    let fast = RetryPolicy::new(3, Duration::from_millis(5), Duration::from_millis(20));
    SagaDef::builder("order", version)
        .step(
            Step::compensatable(
                "reserve",
                move |ctx| {
                    let shop = s1.clone();
                    async move {
                        let _active = shop.inventory.enter(&sid(&ctx));
                        shop.delay().await;
                        shop.chaos.at("reserve.before").await;
                        let input: Value = ctx.input()?;
                        let hold = shop.inventory.apply(
                            &ctx.idempotency_key(),
                            json!({ "sku": input["sku"], "hold": 1 }),
                        );
                        shop.chaos.at("reserve.after").await;
                        Ok(hold)
                    }
                },
                move |ctx| {
                    let shop = s2.clone();
                    async move {
                        shop.chaos.at("release.before").await;
                        shop.inventory
                            .apply(&ctx.idempotency_key(), json!("released"));
                        shop.chaos.at("release.after").await;
                        Ok(())
                    }
                },
            )
            .retry(fast)
            .timeout(Duration::from_millis(150)),
        )
        .step(
            Step::pivot("charge", move |ctx| {
                let shop = s3.clone();
                async move {
                    let _active = shop.payment.enter(&sid(&ctx));
                    shop.delay().await;
                    shop.chaos.at("charge.before").await;
                    if shop.decline_all.load(Ordering::SeqCst) {
                        return Err(StepError::permanent("card declined"));
                    }
                    let receipt = shop
                        .payment
                        .apply(&ctx.idempotency_key(), json!({ "amount": 42 }));
                    shop.chaos.at("charge.after").await;
                    Ok(receipt)
                }
            })
            .retry(fast)
            .timeout(Duration::from_millis(150)),
        )
        .step(
            Step::retriable("confirm", move |ctx| {
                let shop = s4.clone();
                async move {
                    let _active = shop.orders.enter(&sid(&ctx));
                    shop.delay().await;
                    shop.chaos.at("confirm.before").await;
                    // Needs both earlier outputs.
                    let _hold: Value = ctx.output("reserve")?;
                    let _receipt: Value = ctx.output("charge")?;
                    if shop
                        .confirm_failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return Err(StepError::transient("orders service 503"));
                    }
                    shop.orders
                        .apply(&ctx.idempotency_key(), json!("confirmed"));
                    shop.chaos.at("confirm.after").await;
                    Ok(json!("confirmed"))
                }
            })
            .retry(fast)
            .timeout(Duration::from_millis(150)),
        )
        .build()
        .unwrap()
}

/// Checks the effects of one finished order against its final status.
pub fn check_effects(shop: &Shop, id: &SagaId, status: Status) {
    let k = |step: &str| format!("{id}:{step}");
    let reserved = shop.inventory.has(&k("reserve"));
    let released = shop.inventory.has(&k("reserve:compensation"));
    let charged = shop.payment.has(&k("charge"));
    let confirmed = shop.orders.has(&k("confirm"));
    match status {
        Status::Completed => {
            assert!(
                reserved && charged && confirmed,
                "{id}: completed without every effect"
            );
            assert!(!released, "{id}: compensated after the pivot");
        }
        Status::Compensated => {
            assert!(!charged && !confirmed, "{id}: compensated but charged");
            assert_eq!(
                reserved, released,
                "{id}: a reservation left held (or released without one)"
            );
        }
        other => panic!("{id} ended {other}"),
    }
}

/// The crash points of the happy path and of the declined path.
pub const FORWARD_POINTS: [&str; 6] = [
    "reserve.before",
    "reserve.after",
    "charge.before",
    "charge.after",
    "confirm.before",
    "confirm.after",
];
pub const COMPENSATION_POINTS: [&str; 4] = [
    "reserve.before",
    "reserve.after",
    "release.before",
    "release.after",
];

pub fn executor<L: SagaLogStore + Clone>(log: L, shop: Arc<Shop>, name: &str) -> Executor<L> {
    Executor::builder(log)
        .name(name)
        .register(order_saga(shop, 1))
        .lease(Duration::from_millis(400))
        .poll_interval(Duration::from_millis(50))
        .start()
        .unwrap()
}

/// For every crash point: begin an order, stop the executor dead at the point, start a new
/// executor, and check the order finishes with each effect applied once and nothing
/// compensated after the pivot.
pub async fn crash_at_every_boundary<L: SagaLogStore + Clone>(log: L) {
    for (declined, points) in [
        (false, &FORWARD_POINTS[..]),
        (true, &COMPENSATION_POINTS[..]),
    ] {
        for point in points {
            let shop = Arc::new(Shop::default());
            let first = executor(log.clone(), shop.clone(), "first");
            shop.chaos.arm(point);
            shop.decline_all.store(declined, Ordering::SeqCst);
            let id = first
                .begin("order", &json!({ "sku": "tea" }))
                .await
                .unwrap();
            shop.chaos.wait_hit().await;
            first.abort().await;
            let second = executor(log.clone(), shop.clone(), "second");
            let done = second.wait(&id, Duration::from_secs(10)).await.unwrap();
            let want = if declined {
                Status::Compensated
            } else {
                Status::Completed
            };
            assert_eq!(done.status, want, "crash at {point}: {done:?}");
            check_effects(&shop, &id, done.status);
            assert!(second.stats().resumed >= 1, "crash at {point}: not resumed");
            let history = second.history(&id).await.unwrap();
            assert_eq!(history.first().map(|h| h.kind.as_str()), Some("started"));
            second.shutdown(Duration::from_secs(5)).await;
        }
    }
}
