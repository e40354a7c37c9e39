//! The order saga: reserve inventory (compensatable) -> charge payment (pivot) -> complete
//! (retriable). Each step is idempotent by the key the saga crate hands it.
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use stanchion_breaker::{CallError, Pipeline};
use stanchion_saga::{RetryPolicy, SagaDef, Step, StepContext, StepError};
use stanchion_shard_router::Key;

use crate::Shop;
use crate::payment::{self, PaymentError};
use crate::store::Reserve;

/// The saga's name.
pub(crate) const ORDER_SAGA: &str = "place-order";

/// What an order saga starts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OrderInput {
    pub(crate) tenant: String,
    pub(crate) product_id: i64,
    pub(crate) qty: i64,
}

/// The saga definition, bound to the shop's shards and to one instance's payment pipeline.
pub(crate) fn definition(shop: &Arc<Shop>, payments: &Pipeline) -> Result<SagaDef, crate::Error> {
    let (reserve_shop, release_shop, confirm_shop) =
        (Arc::clone(shop), Arc::clone(shop), Arc::clone(shop));
    let charge_shop = Arc::clone(shop);
    let pipeline = payments.clone();
    SagaDef::builder(ORDER_SAGA, 1)
        .step(
            Step::compensatable(
                "reserve",
                move |ctx| reserve(Arc::clone(&reserve_shop), ctx),
                move |ctx| release(Arc::clone(&release_shop), ctx),
            )
            .retry(RetryPolicy::new(
                5,
                Duration::from_millis(10),
                Duration::from_millis(200),
            )),
        )
        .step(
            Step::pivot("charge", move |ctx| {
                let (shop, pipeline) = (Arc::clone(&charge_shop), pipeline.clone());
                async move { charge(&shop, &pipeline, ctx).await }
            })
            .timeout(Duration::from_secs(2)),
        )
        .step(Step::retriable("complete", move |ctx| {
            complete(Arc::clone(&confirm_shop), ctx)
        }))
        .deadline(Duration::from_secs(30))
        .build()
        .map_err(|e| crate::Error::Config(e.to_string()))
}

fn db_error(e: crate::store::StoreError) -> StepError {
    StepError::transient(format!("database: {e}"))
}

/// Takes `qty` off the product's stock and records the reservation under the order's id, in one
/// transaction on the product's shard. A second run finds the reservation and changes nothing.
async fn reserve(shop: Arc<Shop>, ctx: StepContext) -> Result<serde_json::Value, StepError> {
    let input: OrderInput = ctx.input()?;
    if input.qty <= 0 {
        return Err(StepError::permanent("quantity must be positive"));
    }
    let shard = shop.shards.route(Key::from(input.tenant.as_str())).target;
    match shard
        .reserve(
            ctx.saga_id().as_str(),
            &input.tenant,
            input.product_id,
            input.qty,
        )
        .await
        .map_err(db_error)?
    {
        Reserve::Held(amount_cents) => Ok(json!({ "amount_cents": amount_cents })),
        Reserve::Unavailable => Err(StepError::permanent("out of stock or no such product")),
    }
}

/// Gives the stock back once: the reservation is marked released in the same transaction.
async fn release(shop: Arc<Shop>, ctx: StepContext) -> Result<(), StepError> {
    let input: OrderInput = ctx.input()?;
    let shard = shop.shards.route(Key::from(input.tenant.as_str())).target;
    shard
        .release(ctx.saga_id().as_str(), &input.tenant, input.product_id)
        .await
        .map_err(db_error)
}

/// Charges through the instance's breaker, retry and timeout. A decline or an open breaker
/// ends the saga (compensated); other failures are retried by the saga step as transient.
async fn charge(
    shop: &Shop,
    pipeline: &Pipeline,
    ctx: StepContext,
) -> Result<serde_json::Value, StepError> {
    #[derive(Deserialize)]
    struct Reserved {
        amount_cents: i64,
    }
    let reserved: Reserved = ctx.output("reserve")?;
    let key = ctx.idempotency_key();
    match payment::charge(pipeline, &shop.payment, &key, reserved.amount_cents).await {
        Ok(receipt) => Ok(json!({ "receipt": receipt })),
        Err(CallError::Failed {
            error: PaymentError::Declined,
            ..
        }) => Err(StepError::permanent("payment declined")),
        Err(e) if e.is_rejected() => {
            Err(StepError::permanent(format!("payment not attempted: {e}")))
        }
        Err(e) => Err(StepError::permanent(format!("payment failed: {e}"))),
    }
}

/// Nothing left to do but say so; kept as a step so a crash after the charge still completes.
async fn complete(_shop: Arc<Shop>, ctx: StepContext) -> Result<serde_json::Value, StepError> {
    let receipt: serde_json::Value = ctx.output("charge")?;
    Ok(json!({ "completed": true, "receipt": receipt["receipt"] }))
}
