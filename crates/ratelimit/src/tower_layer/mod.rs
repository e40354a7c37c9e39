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
/// use stanchion_ratelimit::{ClientIp, Limits, Quota, RateLimitLayer, RateLimiter};
/// let limiter = RateLimiter::local(Limits::single(Quota::per_second(10)?)).build()?;
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

pin_project_lite::pin_project! {
    /// The response future of [`RateLimitService`]: the inner service's future (with the
    /// rate-limit headers written on its response), or an answer made without it (429, 400).
    /// Nothing is allocated for it when the limiter decides at once (an in-process store, see
    /// [`RateLimiter::check_now`]); with a store that must be awaited (Redis) the wait is boxed
    /// once per request.
    pub struct RateLimitFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Ready { res: Option<Result<Response<B>, E>> },
        Inner { #[pin] fut: F, headers: Option<Planned> },
        Waiting { fut: Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>> },
    }
}

impl<F, B, E> RateLimitFuture<F, B, E> {
    fn ready(res: Result<Response<B>, E>) -> Self {
        Self {
            kind: Kind::Ready { res: Some(res) },
        }
    }

    fn inner(fut: F, headers: Option<Planned>) -> Self {
        Self {
            kind: Kind::Inner { fut, headers },
        }
    }
}

impl<F, B, E> fmt::Debug for RateLimitFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Ready { .. } => "ready",
            Kind::Inner { .. } => "inner",
            Kind::Waiting { .. } => "waiting for the limiter",
        };
        f.debug_struct("RateLimitFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, B, E> Future for RateLimitFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Ready { res } => match res.take() {
                Some(res) => Poll::Ready(res),
                None => panic!("RateLimitFuture polled after it completed"),
            },
            KindProj::Inner { fut, headers } => {
                let mut res = std::task::ready!(fut.poll(cx))?;
                if let Some(h) = headers.take() {
                    h.apply(res.headers_mut());
                }
                Poll::Ready(Ok(res))
            }
            KindProj::Waiting { fut } => fut.as_mut().poll(cx),
        }
    }
}

/// The response to a decided request: 429 with its headers, or the inner service's call with
/// the headers to add to its response.
fn respond<Svc, ReqBody, ResBody>(
    mut inner: Svc,
    req: Request<ReqBody>,
    limits: &Limits,
    decision: &Decision,
    options: Options,
) -> RateLimitFuture<Svc::Future, ResBody, Svc::Error>
where
    Svc: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    let headers = Planned::new(limits, decision, options.legacy_headers);
    if decision.verdict != Verdict::Allowed {
        let mut res = status(StatusCode::TOO_MANY_REQUESTS);
        if let Some(wait) = decision.retry_after {
            res.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(ceil_secs(wait)),
            );
        }
        if let Some(h) = headers {
            h.apply(res.headers_mut());
        }
        return RateLimitFuture::ready(Ok(res));
    }
    RateLimitFuture::inner(inner.call(req), headers)
}

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
    type Future = RateLimitFuture<Svc::Future, ResBody, Svc::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The ready service handles this request; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let options = self.options;
        let preflight = options.exempt_preflight
            && req.method() == Method::OPTIONS
            && req.headers().contains_key("access-control-request-method");
        if preflight {
            return RateLimitFuture::inner(inner.call(req), None);
        }
        let Some(key) = self.shared.extractor.extract(&req) else {
            return match options.missing_key {
                MissingKey::Allow => RateLimitFuture::inner(inner.call(req), None),
                MissingKey::Reject => RateLimitFuture::ready(Ok(status(StatusCode::BAD_REQUEST))),
            };
        };
        let limiter = &self.shared.limiter;
        match limiter.check_now(&key, 1) {
            Some(Ok(decision)) => respond(inner, req, limiter.limits_for(&key), &decision, options),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "rate-limit key refused");
                RateLimitFuture::ready(Ok(status(StatusCode::BAD_REQUEST)))
            }
            None => {
                let shared = Arc::clone(&self.shared);
                RateLimitFuture {
                    kind: Kind::Waiting {
                        fut: Box::pin(async move {
                            let decision = match shared.limiter.check(&key, 1).await {
                                Ok(d) => d,
                                Err(e) => {
                                    tracing::debug!(error = %e, "rate-limit key refused");
                                    return Ok(status(StatusCode::BAD_REQUEST));
                                }
                            };
                            let limits = shared.limiter.limits_for(&key);
                            respond(inner, req, limits, &decision, options).await
                        }),
                    },
                }
            }
        }
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
    if let Some(h) = Planned::new(limits, decision, legacy) {
        h.apply(headers);
    }
}

/// Rate-limit header values, made when the decision is known and written on the response.
struct Planned {
    policy: Option<HeaderValue>,
    current: Option<HeaderValue>,
    /// `X-RateLimit-Limit`, `-Remaining` and `-Reset`.
    legacy: Option<[HeaderValue; 3]>,
}

impl Planned {
    fn new(limits: &Limits, decision: &Decision, legacy: bool) -> Option<Self> {
        if decision.limit == 0 || limits.is_empty() {
            return None;
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
        Some(Self {
            policy: HeaderValue::from_str(&policy).ok(),
            current: HeaderValue::from_str(&current).ok(),
            legacy: legacy.then(|| {
                [
                    HeaderValue::from(decision.limit),
                    HeaderValue::from(decision.remaining),
                    HeaderValue::from(reset),
                ]
            }),
        })
    }

    fn apply(self, headers: &mut HeaderMap) {
        if let Some(v) = self.policy {
            headers.insert("ratelimit-policy", v);
        }
        if let Some(v) = self.current {
            headers.insert("ratelimit", v);
        }
        if let Some([limit, remaining, reset]) = self.legacy {
            headers.insert("x-ratelimit-limit", limit);
            headers.insert("x-ratelimit-remaining", remaining);
            headers.insert("x-ratelimit-reset", reset);
        }
    }
}
