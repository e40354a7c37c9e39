//! tower / axum middleware (feature `tower`): limits each request under a key, answers 429 with
//! `Retry-After` when denied, and puts the IETF draft `RateLimit-Policy` and `RateLimit` headers
//! (and optionally the legacy `X-RateLimit-*` trio) on every response.

mod key;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

pub use self::key::{
    ClientIp, HeaderKey, IpNet, KeyExtractor, MIN_KEY_SECRET_LEN, PeerAddr, ProxyHeader,
};

use crate::gcra::{Decision, Verdict};
use crate::limiter::RateLimiter;
use crate::quota::{Limits, QuotaSelector};
use crate::store::RateLimitStore;

/// What to do with a request whose key cannot be found (no peer address, no API key header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Answer 400: a misconfiguration shows at once instead of silently not limiting.
    #[default]
    Reject,
    /// Let it through unlimited.
    Allow,
}

/// What every clone of a layer and its services share.
struct Shared<S, Q, X> {
    limiter: RateLimiter<S, Q>,
    extractor: X,
}

/// Settings of one layer value (copied into the services it makes), so that a setter on a
/// clone of a layer changes that clone, never nothing.
#[derive(Debug, Clone, Copy, Default)]
struct Options {
    legacy_headers: bool,
    exempt_preflight: bool,
    missing_key: MissingKey,
}

/// Limits requests with a [`RateLimiter`]. Clones of the layer, and every service it makes,
/// share one limiter.
///
/// ```
/// use stanchion_ratelimit::{ClientIp, Limits, LocalLimiter, Quota, RateLimitLayer, RateLimiter};
/// let limiter = RateLimiter::builder(
///     LocalLimiter::<String>::new(Limits::new())?,
///     Limits::single(Quota::per_second(10)?),
/// )
/// .build()?;
/// let layer = RateLimitLayer::new(limiter, ClientIp::trusting(["10.0.0.0/8"])?)
///     .legacy_headers(true)
///     .exempt_cors_preflight(true);
/// # let _ = layer;
/// # Ok::<(), stanchion_ratelimit::BuildError>(())
/// ```
pub struct RateLimitLayer<S, Q, X> {
    shared: Arc<Shared<S, Q, X>>,
    options: Options,
}

impl<S, Q, X> Clone for RateLimitLayer<S, Q, X> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            options: self.options,
        }
    }
}

impl<S, Q, X> fmt::Debug for RateLimitLayer<S, Q, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("legacy_headers", &self.options.legacy_headers)
            .field("exempt_preflight", &self.options.exempt_preflight)
            .field("missing_key", &self.options.missing_key)
            .finish_non_exhaustive()
    }
}

impl<S, Q, X> RateLimitLayer<S, Q, X> {
    /// Limits under the key `extractor` finds.
    pub fn new(limiter: RateLimiter<S, Q>, extractor: X) -> Self {
        Self {
            shared: Arc::new(Shared { limiter, extractor }),
            options: Options::default(),
        }
    }

    /// Also send `X-RateLimit-Limit`, `-Remaining` and `-Reset` (default off). A setter changes
    /// this layer value and the services it makes afterwards; clones made before keep theirs.
    #[must_use]
    pub fn legacy_headers(mut self, on: bool) -> Self {
        self.options.legacy_headers = on;
        self
    }

    /// Let CORS preflight requests (`OPTIONS` with `Access-Control-Request-Method`) through
    /// without counting them (default off).
    #[must_use]
    pub fn exempt_cors_preflight(mut self, on: bool) -> Self {
        self.options.exempt_preflight = on;
        self
    }

    /// What to do when no key is found (default [`MissingKey::Reject`]).
    #[must_use]
    pub fn missing_key(mut self, mode: MissingKey) -> Self {
        self.options.missing_key = mode;
        self
    }
}

impl<Svc, S, Q, X> tower::Layer<Svc> for RateLimitLayer<S, Q, X> {
    type Service = RateLimitService<Svc, S, Q, X>;

    fn layer(&self, inner: Svc) -> Self::Service {
        RateLimitService {
            inner,
            shared: Arc::clone(&self.shared),
            options: self.options,
        }
    }
}

/// The service made by [`RateLimitLayer`].
pub struct RateLimitService<Svc, S, Q, X> {
    inner: Svc,
    shared: Arc<Shared<S, Q, X>>,
    options: Options,
}

impl<Svc, S, Q, X> RateLimitService<Svc, S, Q, X> {
    /// The inner service.
    pub fn get_ref(&self) -> &Svc {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut Svc {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> Svc {
        self.inner
    }
}

impl<Svc: Clone, S, Q, X> Clone for RateLimitService<Svc, S, Q, X> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            options: self.options,
        }
    }
}

impl<Svc: fmt::Debug, S, Q, X> fmt::Debug for RateLimitService<Svc, S, Q, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The response future of [`RateLimitService`].
pub type RateLimitFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<Svc, S, Q, X, ReqBody, ResBody> tower::Service<Request<ReqBody>>
    for RateLimitService<Svc, S, Q, X>
where
    Svc: tower::Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    S: RateLimitStore,
    Q: QuotaSelector<str>,
    X: KeyExtractor<ReqBody>,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = Svc::Error;
    type Future = RateLimitFuture<Response<ResBody>, Svc::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The ready service handles this request; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.shared);
        let options = self.options;
        let preflight = options.exempt_preflight
            && req.method() == Method::OPTIONS
            && req.headers().contains_key("access-control-request-method");
        let key = if preflight {
            None
        } else {
            config.extractor.extract(&req)
        };
        Box::pin(async move {
            if preflight {
                return inner.call(req).await;
            }
            let Some(key) = key else {
                return match options.missing_key {
                    MissingKey::Allow => inner.call(req).await,
                    MissingKey::Reject => Ok(status(StatusCode::BAD_REQUEST)),
                };
            };
            let decision = match config.limiter.check(&key, 1).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "rate-limit key refused");
                    return Ok(status(StatusCode::BAD_REQUEST));
                }
            };
            let limits = config.limiter.limits_for(&key);
            if decision.verdict != Verdict::Allowed {
                let mut res = status(StatusCode::TOO_MANY_REQUESTS);
                if let Some(wait) = decision.retry_after {
                    res.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        HeaderValue::from(ceil_secs(wait)),
                    );
                }
                write_headers(res.headers_mut(), limits, &decision, options.legacy_headers);
                return Ok(res);
            }
            let mut res = inner.call(req).await?;
            write_headers(res.headers_mut(), limits, &decision, options.legacy_headers);
            Ok(res)
        })
    }
}

fn status<B: Default>(code: StatusCode) -> Response<B> {
    let mut res = Response::new(B::default());
    *res.status_mut() = code;
    res
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Writes `RateLimit-Policy` (every quota: `"name";q=burst;w=seconds to refill`) and `RateLimit`
/// (the deciding quota: `"name";r=remaining;t=seconds to full`), and the legacy trio if asked.
/// Nothing is written for a decision that carries no quota (a fail-open fallback).
pub fn write_headers(headers: &mut HeaderMap, limits: &Limits, decision: &Decision, legacy: bool) {
    if decision.limit == 0 || limits.is_empty() {
        return;
    }
    let policy = limits
        .quotas()
        .map(|(name, q)| {
            let window = ceil_secs(q.emission_interval() * q.burst_size()).max(1);
            format!("\"{name}\";q={};w={window}", q.burst_size())
        })
        .collect::<Vec<_>>()
        .join(", ");
    let reset = ceil_secs(decision.reset_after);
    let current = format!(
        "\"{}\";r={};t={reset}",
        limits.name(decision.quota),
        decision.remaining
    );
    if let Ok(v) = HeaderValue::from_str(&policy) {
        headers.insert("ratelimit-policy", v);
    }
    if let Ok(v) = HeaderValue::from_str(&current) {
        headers.insert("ratelimit", v);
    }
    if legacy {
        headers.insert("x-ratelimit-limit", HeaderValue::from(decision.limit));
        headers.insert(
            "x-ratelimit-remaining",
            HeaderValue::from(decision.remaining),
        );
        headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
    }
}
