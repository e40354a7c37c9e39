//! The shop's order flow as a saga on SQLite (no server needed): reserve stock, charge the card
//! (the pivot), confirm the order. Three orders: one that goes through, one whose card is
//! declined (the reservation is released), and one whose confirmation fails twice first (retried
//! after the pivot, never compensated). Each saga's history is printed from the log.
//!
//! `cargo run -p stanchion-saga --features migrate --example order`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::sqlite::SqlitePoolOptions;
use stanchion_saga::{Executor, RetryPolicy, SagaDef, SqliteSagaLog, Step, StepError};

/// A stand-in for the inventory and payment services: each applies an idempotency key once.
#[derive(Default)]
struct Services {
    applied: Mutex<HashMap<String, Value>>,
    confirm_failures: AtomicU32,
}

impl Services {
    fn apply(&self, key: &str, effect: Value) -> Value {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        applied.entry(key.to_owned()).or_insert(effect).clone()
    }
}

fn order_saga(services: Arc<Services>) -> Result<SagaDef, stanchion_saga::DefinitionError> {
    let quick = RetryPolicy::new(3, Duration::from_millis(20), Duration::from_millis(100));
    let (reserve, release, charge, confirm) = (
        services.clone(),
        services.clone(),
        services.clone(),
        services,
    );
    SagaDef::builder("order", 1)
        .step(
            Step::compensatable(
                "reserve",
                move |ctx| {
                    let s = reserve.clone();
                    async move {
                        let input: Value = ctx.input()?;
                        Ok(s.apply(
                            &ctx.idempotency_key(),
                            json!({ "hold": input["sku"], "qty": input["qty"] }),
                        ))
                    }
                },
                move |ctx| {
                    let s = release.clone();
                    async move {
                        s.apply(&ctx.idempotency_key(), json!("released"));
                        Ok(())
                    }
                },
            )
            .retry(quick),
        )
        .step(
            Step::pivot("charge", move |ctx| {
                let s = charge.clone();
                async move {
                    let input: Value = ctx.input()?;
                    if input["card"] == "declined" {
                        return Err(StepError::permanent("card declined"));
                    }
                    Ok(s.apply(
                        &ctx.idempotency_key(),
                        json!({ "receipt": ctx.saga_id().as_str() }),
                    ))
                }
            })
            .retry(quick),
        )
        .step(
            Step::retriable("confirm", move |ctx| {
                let s = confirm.clone();
                async move {
                    let left = s.confirm_failures.load(Ordering::SeqCst);
                    if left > 0 {
                        s.confirm_failures.store(left - 1, Ordering::SeqCst);
                        return Err(StepError::transient("orders service answered 503"));
                    }
                    Ok(s.apply(&ctx.idempotency_key(), json!("confirmed")))
                }
            })
            .retry(quick),
        )
        .build()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One connection: an in-memory database shared by several connections locks whole tables.
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await?;
    let log = SqliteSagaLog::new(pool, "shop")?;
    log.migrate().await?;
    let services = Arc::new(Services::default());
    let executor = Executor::builder(log)
        .register(order_saga(services.clone())?)
        .start()?;

    for (what, input, confirm_failures) in [
        (
            "goes through",
            json!({ "sku": "tea", "qty": 1, "card": "ok" }),
            0,
        ),
        (
            "card declined",
            json!({ "sku": "mug", "qty": 2, "card": "declined" }),
            0,
        ),
        (
            "confirmation fails twice",
            json!({ "sku": "pot", "qty": 1, "card": "ok" }),
            2,
        ),
    ] {
        services
            .confirm_failures
            .store(confirm_failures, Ordering::SeqCst);
        let id = executor.begin("order", &input).await?;
        let done = executor.wait(&id, Duration::from_secs(10)).await?;
        println!("order {} ({what}): {:?}", id.as_str(), done.status);
        if let Some(error) = &done.error {
            println!("  why: {error}");
        }
        for entry in executor.history(&id).await? {
            let step = entry.step.as_deref().unwrap_or("");
            let detail = entry.detail.as_deref().unwrap_or("");
            println!("  {:>3} {:<20} {step:<8} {detail}", entry.seq, entry.kind);
        }
    }
    executor.shutdown(Duration::from_secs(5)).await;
    let applied = services.applied.lock().unwrap_or_else(|e| e.into_inner());
    let mut keys: Vec<&String> = applied.keys().collect();
    keys.sort();
    println!("effects applied once each, by idempotency key:");
    for key in keys {
        println!("  {key} = {}", applied[key]);
    }
    Ok(())
}
