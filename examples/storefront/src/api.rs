//! HTTP: routes, the JSON envelope, errors, authentication and middleware.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, request::Parts};
use axum::middleware::{self, Next};
use axum::response::AppendHeaders;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use stanchion_ratelimit::{ClientIp, MissingKey, RateLimitLayer};
use stanchion_replica_router::WriteToken;
use stanchion_saga::Status;
use stanchion_shard_router::Key;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::auth::{Claims, TokenError};
use crate::backend::Limiters;
use crate::orders::{ORDER_SAGA, OrderInput};
use crate::store::{Shard, Write, Written};
use crate::{Instance, InstanceInner};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// The read-your-writes header: `<product id>:<version>` from a write, sent back on reads.
pub const RYW_HEADER: &str = "x-rw-token";
/// The write-position header: on PostgreSQL, the WAL position of the caller's last write; reads
/// that send it back are served by a replica that has replayed it (or the primary).
pub const LSN_HEADER: &str = "x-rw-lsn";

/// A product as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Product {
    /// Id, unique within the tenant's shard.
    pub id: i64,
    /// The owning tenant.
    pub tenant: String,
    /// Display name.
    pub name: String,
    /// Category (lists are by category).
    pub category: String,
    /// Price in cents.
    pub price_cents: i64,
    /// Units in stock.
    pub stock: i64,
    /// Bumped by every write, deletes included.
    pub version: i64,
    /// Last write, milliseconds since the epoch.
    pub updated_ms: i64,
}

/// The JSON envelope of every API answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Whether the request did what it asked.
    pub success: bool,
    /// The result.
    pub data: Option<T>,
    /// What went wrong.
    pub error: Option<ErrorBody>,
    /// Pagination of lists.
    pub meta: Option<Meta>,
}

/// An error's machine-readable code and human message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `invalid_token`, `token_expired`, `forbidden`, `not_found`, `invalid_json`, ...
    pub code: String,
    /// For people.
    pub message: String,
}

/// Pagination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// 1-based page.
    pub page: u32,
    /// Items per page.
    pub per_page: u32,
    /// Items over all pages.
    pub total: i64,
}

fn ok<T: Serialize>(status: StatusCode, data: T) -> Response {
    let body = Envelope {
        success: true,
        data: Some(data),
        error: None,
        meta: None,
    };
    (status, Json(body)).into_response()
}

/// Everything a handler can answer with instead of data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// No bearer token.
    #[error("a bearer token is required")]
    Unauthorized,
    /// The token has expired.
    #[error("the token has expired")]
    TokenExpired,
    /// The token is malformed or wrongly signed.
    #[error("the token is not valid")]
    InvalidToken,
    /// The token lacks a permission.
    #[error("this needs the `{0}` permission")]
    Forbidden(&'static str),
    /// No such resource.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request is malformed.
    #[error("{1}")]
    BadRequest(&'static str, String),
    /// The body is over [`MAX_BODY_BYTES`].
    #[error("the body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// The order could not be placed (payment declined, out of stock).
    #[error("{0}")]
    OrderFailed(String),
    /// A dependency failed.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::TokenExpired => (StatusCode::UNAUTHORIZED, "token_expired"),
            Self::InvalidToken => (StatusCode::UNAUTHORIZED, "invalid_token"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::BadRequest(code, _) => (StatusCode::BAD_REQUEST, code),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::OrderFailed(_) => (StatusCode::UNPROCESSABLE_ENTITY, "order_failed"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let body: Envelope<()> = Envelope {
            success: false,
            data: None,
            error: Some(ErrorBody {
                code: code.to_owned(),
                message: self.to_string(),
            }),
            meta: None,
        };
        (status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::TooLarge
        } else {
            Self::BadRequest("invalid_json", r.body_text())
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    // The message names the component, not connection strings or secrets.
    tracing::error!(error = %e, "{what} failed");
    ApiError::Unavailable(format!("{what} is unavailable"))
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Auth(pub Claims);

impl FromRequestParts<Instance> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Instance) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .ok_or(ApiError::Unauthorized)?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::InvalidToken)?;
        state
            .inner
            .shop
            .signer
            .verify(token.trim(), crate::auth::now_s())
            .map(Auth)
            .map_err(|e| match e {
                TokenError::Expired => ApiError::TokenExpired,
                _ => ApiError::InvalidToken,
            })
    }
}

impl Auth {
    fn require(&self, perm: &'static str) -> Result<(), ApiError> {
        if self.0.can(perm) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(perm))
        }
    }
}

/// Request ids: a process-random prefix and a counter.
#[derive(Debug, Clone)]
struct Ids {
    prefix: u32,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl MakeRequestId for Ids {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{:08x}-{n:010}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// The application: routes, then (outside in) request id, tracing, security headers, limits.
pub(crate) fn router(instance: Instance) -> Router {
    let shop = &instance.inner.shop;
    let api = Router::new()
        .route("/products", get(list_products).post(create_product))
        .route(
            "/products/{id}",
            get(get_product).put(update_product).delete(delete_product),
        )
        .route("/search", get(search))
        .route("/orders", axum::routing::post(place_order))
        .route("/orders/{id}", get(get_order))
        .route("/status", get(crate::status::status));
    // Per API key inside, per client IP outside; the same limiters serve every instance.
    let key = shop.api_key.clone();
    let api = match &shop.limiters {
        Limiters::Local { by_key, by_ip } => api
            .layer(RateLimitLayer::new(by_key.clone(), key).missing_key(MissingKey::Allow))
            .layer(RateLimitLayer::new(by_ip.clone(), ClientIp::direct())),
        Limiters::Redis { by_key, by_ip } => api
            .layer(RateLimitLayer::new(by_key.clone(), key).missing_key(MissingKey::Allow))
            .layer(RateLimitLayer::new(by_ip.clone(), ClientIp::direct())),
    };
    let api = api.layer(middleware::from_fn_with_state(
        instance.clone(),
        count_and_wrap_limits,
    ));
    let x_request_id = HeaderName::from_static("x-request-id");
    let ids = Ids {
        prefix: fastrand::u32(..),
        next: Arc::default(),
    };
    let instance_id = instance.inner.id;
    Router::new()
        .nest("/api/v1", api)
        .route("/", get(|| async { Html(crate::status::PAGE) }))
        .route("/health/live", get(|| async { ok(StatusCode::OK, "live") }))
        .route("/health/ready", get(crate::status::ready))
        .route("/metrics", get(crate::status::metrics))
        .fallback(|| async { ApiError::NotFound("route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(security_headers))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(
            TraceLayer::new_for_http().make_span_with(move |req: &http::Request<_>| {
                tracing::info_span!(
                    "http.request",
                    request_id = %request_id(req.headers()),
                    instance = instance_id,
                    method = %req.method(),
                    path = %req.uri().path(),
                )
            }),
        )
        .layer(SetRequestIdLayer::new(x_request_id, ids))
        .with_state(instance)
}

/// Security headers on every response (kept when a handler set its own).
async fn security_headers(req: Request, next: Next) -> Response {
    use http::header;
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'",
        ),
    ] {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    }
    response
}

/// Counts requests and 429s, and gives the limiter's 429 the API's envelope (its headers kept).
async fn count_and_wrap_limits(
    State(instance): State<Instance>,
    req: Request,
    next: Next,
) -> Response {
    let c = &instance.inner.counters;
    c.requests.fetch_add(1, Ordering::Relaxed);
    let response = next.run(req).await;
    if response.status() != StatusCode::TOO_MANY_REQUESTS {
        return response;
    }
    c.limited.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("storefront.rate_limited").increment(1);
    let (parts, _) = response.into_parts();
    let body: Envelope<()> = Envelope {
        success: false,
        data: None,
        error: Some(ErrorBody {
            code: "rate_limited".into(),
            message: "too many requests".into(),
        }),
        meta: None,
    };
    let mut out = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    for (name, value) in &parts.headers {
        if name != http::header::CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

fn shard_of(inner: &InstanceInner, tenant: &str) -> Shard {
    inner.shop.shards.route(Key::from(tenant)).target
}

fn cache_key(tenant: &str, id: i64) -> String {
    format!("{tenant}/{id}")
}

/// The read-your-writes headers of a write: the product's version, and on PostgreSQL the WAL
/// position of the commit (a replica that has replayed it has the write).
fn ryw_headers(w: &Written) -> Vec<(HeaderName, String)> {
    let mut h = vec![(
        HeaderName::from_static(RYW_HEADER),
        format!("{}:{}", w.product.id, w.product.version),
    )];
    if let Some(token) = &w.token {
        h.push((HeaderName::from_static(LSN_HEADER), token.to_string()));
    }
    h
}

/// The caller's last write position, if it sent a valid one.
fn lsn_token(headers: &HeaderMap) -> Option<WriteToken> {
    headers.get(LSN_HEADER)?.to_str().ok()?.parse().ok()
}

/// A new product's fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub(crate) name: String,
    pub(crate) category: String,
    pub(crate) price_cents: i64,
    pub(crate) stock: i64,
}

/// Fields to change; absent ones are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    pub(crate) name: Option<String>,
    pub(crate) category: Option<String>,
    pub(crate) price_cents: Option<i64>,
    pub(crate) stock: Option<i64>,
}

fn check_text(field: &'static str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.trim().is_empty() || v.chars().count() > max {
        return Err(ApiError::BadRequest(
            "invalid_field",
            format!("{field} must be 1 to {max} characters"),
        ));
    }
    Ok(())
}

fn check_amount(field: &'static str, v: i64) -> Result<(), ApiError> {
    if !(0..=1_000_000_000).contains(&v) {
        return Err(ApiError::BadRequest(
            "invalid_field",
            format!("{field} must be 0 to 1000000000"),
        ));
    }
    Ok(())
}

/// Runs a product write (row + event in one transaction), then drops the key from every
/// instance's cache: after the commit, so no instance can reload the old row into it. A create
/// also drops a negative entry cached before the insert, which would hide the product.
async fn write(
    instance: &Instance,
    tenant: &str,
    w: Write<'_>,
    headers: &HeaderMap,
) -> Result<Written, ApiError> {
    let shard = shard_of(&instance.inner, tenant);
    let written = shard
        .write(tenant, w, &request_id(headers))
        .await
        .map_err(|e| internal("products database", e))?
        .ok_or(ApiError::NotFound("product"))?;
    let key = cache_key(tenant, written.product.id);
    if let Err(e) = instance.inner.products.invalidate(&key).await {
        // The L2 entry then lives until its TTL; the read-your-writes token still bypasses it.
        tracing::warn!(error = %e, "cache invalidation failed");
    }
    Ok(written)
}

async fn create_product(
    State(instance): State<Instance>,
    auth: Auth,
    headers: HeaderMap,
    body: Result<Json<NewProduct>, JsonRejection>,
) -> Result<Response, ApiError> {
    auth.require("products:write")?;
    let Json(new) = body?;
    check_text("name", &new.name, 200)?;
    check_text("category", &new.category, 50)?;
    check_amount("price_cents", new.price_cents)?;
    check_amount("stock", new.stock)?;
    let written = write(&instance, &auth.0.tenant, Write::Create(&new), &headers).await?;
    let h = ryw_headers(&written);
    Ok((AppendHeaders(h), ok(StatusCode::CREATED, written.product)).into_response())
}

/// The version a read must reach for `id`, from the caller's read-your-writes header.
fn required_version(headers: &HeaderMap, id: i64) -> Option<i64> {
    let v = headers.get(RYW_HEADER)?.to_str().ok()?;
    let (pid, version) = v.split_once(':')?;
    (pid.parse::<i64>().ok()? == id)
        .then(|| version.parse().ok())
        .flatten()
}

async fn get_product(
    State(instance): State<Instance>,
    auth: Auth,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let inner = &instance.inner;
    let tenant = auth.0.tenant.clone();
    let shard = shard_of(inner, &tenant);
    let key = cache_key(&tenant, id);
    let loader_shard = shard.clone();
    // The cache fills from the primary (never from a replica that may not have the write the
    // invalidation was for).
    let cached = inner
        .products
        .get_or_load(&key, move || async move {
            loader_shard.get(&tenant, id, None).await
        })
        .await;
    let product = match cached {
        Ok(p) => p,
        // The cache failing is not the database failing: read through.
        Err(e) => {
            tracing::warn!(error = %e, "cache failed; reading the database");
            shard
                .get(&auth.0.tenant, id, None)
                .await
                .map_err(|e| internal("products database", e))?
        }
    };
    let product = match required_version(&headers, id) {
        // The caller wrote a newer version than this instance's copy (the invalidation is still
        // on its way): read a database node that has the caller's write.
        Some(need) if product.as_ref().is_none_or(|p| p.version < need) => {
            inner.counters.ryw_bypass.fetch_add(1, Ordering::Relaxed);
            shard
                .get(&auth.0.tenant, id, lsn_token(&headers))
                .await
                .map_err(|e| internal("products database", e))?
        }
        _ => product,
    };
    let product = product.ok_or(ApiError::NotFound("product"))?;
    Ok(ok(StatusCode::OK, product))
}

async fn update_product(
    State(instance): State<Instance>,
    auth: Auth,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: Result<Json<ProductPatch>, JsonRejection>,
) -> Result<Response, ApiError> {
    auth.require("products:write")?;
    let Json(patch) = body?;
    if let Some(n) = &patch.name {
        check_text("name", n, 200)?;
    }
    if let Some(c) = &patch.category {
        check_text("category", c, 50)?;
    }
    if let Some(p) = patch.price_cents {
        check_amount("price_cents", p)?;
    }
    if let Some(s) = patch.stock {
        check_amount("stock", s)?;
    }
    let written = write(
        &instance,
        &auth.0.tenant,
        Write::Update(id, &patch),
        &headers,
    )
    .await?;
    let h = ryw_headers(&written);
    Ok((AppendHeaders(h), ok(StatusCode::OK, written.product)).into_response())
}

async fn delete_product(
    State(instance): State<Instance>,
    auth: Auth,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth.require("products:delete")?;
    let written = write(&instance, &auth.0.tenant, Write::Delete(id), &headers).await?;
    let h = ryw_headers(&written);
    Ok((
        AppendHeaders(h),
        ok(StatusCode::OK, serde_json::json!({ "deleted": id })),
    )
        .into_response())
}

/// `?category=&page=&per_page=`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    category: String,
    page: Option<u32>,
    per_page: Option<u32>,
}

async fn list_products(
    State(instance): State<Instance>,
    auth: Auth,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest("invalid_query", e.body_text()))?;
    let page = q.page.unwrap_or(1).max(1);
    let per_page = q.per_page.unwrap_or(20);
    if !(1..=100).contains(&per_page) || page > 100_000 {
        return Err(ApiError::BadRequest(
            "invalid_query",
            "per_page must be 1 to 100, page at most 100000".into(),
        ));
    }
    let shard = shard_of(&instance.inner, &auth.0.tenant);
    let (items, total) = shard
        .list(
            &auth.0.tenant,
            &q.category,
            i64::from(per_page),
            i64::from(page - 1) * i64::from(per_page),
            lsn_token(&headers),
        )
        .await
        .map_err(|e| internal("products database", e))?;
    let body = Envelope {
        success: true,
        data: Some(items),
        error: None,
        meta: Some(Meta {
            page,
            per_page,
            total,
        }),
    };
    Ok(Json(body).into_response())
}

/// `?q=` prefix of a product name.
#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    q: String,
}

/// One search hit.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct SearchHit {
    /// The product.
    pub product_id: i64,
    /// Its name as of the last event applied.
    pub name: String,
    /// Its category.
    pub category: String,
    /// The product version the search table has.
    pub version: i64,
}

async fn search(
    State(instance): State<Instance>,
    auth: Auth,
    query: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest("invalid_query", e.body_text()))?;
    check_text("q", &q.q, 100)?;
    let hits = instance
        .inner
        .shop
        .orders
        .search(&auth.0.tenant, &q.q)
        .await
        .map_err(|e| internal("search database", e))?;
    Ok(ok(StatusCode::OK, hits))
}

/// An order request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    product_id: i64,
    qty: i64,
}

/// An order as the API shows it (its saga's state).
#[derive(Debug, Serialize, Deserialize)]
pub struct OrderView {
    /// The order's id (its saga's id).
    pub id: String,
    /// `running`, `compensating`, `completed`, `compensated`, `parked`, `resolved`.
    pub status: String,
    /// Why it failed, if it did.
    pub reason: Option<String>,
}

fn order_view(r: &stanchion_saga::SagaRecord) -> OrderView {
    OrderView {
        id: r.id.as_str().to_owned(),
        status: r.status.as_str().to_owned(),
        reason: r.error.clone(),
    }
}

async fn place_order(
    State(instance): State<Instance>,
    auth: Auth,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<Response, ApiError> {
    auth.require("orders:create")?;
    let Json(order) = body?;
    if !(1..=1000).contains(&order.qty) {
        return Err(ApiError::BadRequest(
            "invalid_field",
            "qty must be 1 to 1000".into(),
        ));
    }
    let executor = &instance.inner.executor;
    let input = OrderInput {
        tenant: auth.0.tenant.clone(),
        product_id: order.product_id,
        qty: order.qty,
    };
    let id = executor
        .begin(ORDER_SAGA, &input)
        .await
        .map_err(|e| internal("saga log", e))?;
    match executor.wait(&id, Duration::from_secs(10)).await {
        Ok(r) if r.status == Status::Completed => Ok(ok(StatusCode::CREATED, order_view(&r))),
        Ok(r) if r.status == Status::Compensated => Err(ApiError::OrderFailed(format!(
            "order {} was not placed: {}",
            r.id.as_str(),
            r.error.as_deref().unwrap_or("a step failed")
        ))),
        Ok(r) => Ok(ok(StatusCode::ACCEPTED, order_view(&r))),
        Err(stanchion_saga::SagaError::Timeout(_)) => Ok(ok(
            StatusCode::ACCEPTED,
            OrderView {
                id: id.as_str().to_owned(),
                status: "running".into(),
                reason: None,
            },
        )),
        Err(e) => Err(internal("saga log", e)),
    }
}

async fn get_order(
    State(instance): State<Instance>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::NotFound("order"));
    }
    let record = instance
        .inner
        .executor
        .get(&stanchion_saga::SagaId::from(id.as_str()))
        .await
        .map_err(|e| internal("saga log", e))?
        .ok_or(ApiError::NotFound("order"))?;
    // Orders of other tenants are not found, not forbidden (no existence leak).
    let input: Option<OrderInput> = serde_json::from_str(&record.input).ok();
    if input.is_none_or(|i| i.tenant != auth.0.tenant) {
        return Err(ApiError::NotFound("order"));
    }
    Ok(ok(StatusCode::OK, order_view(&record)))
}
