//! The built-in mixed load and its report.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;

use crate::api::{Envelope, LSN_HEADER, Product, RYW_HEADER};
use crate::{Instance, Shop};

/// How to drive the load.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// How long.
    pub duration: Duration,
    /// Concurrent well-behaved clients (each under its API key's limit).
    pub clients: usize,
    /// Tenants (spread over the shards).
    pub tenants: usize,
    /// Products created per tenant before the load.
    pub products_per_tenant: usize,
    /// Take the payment provider down from 35 % to 65 % of the run.
    pub payment_outage: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// On real servers: pause Redis (SIGSTOP) for the second tenth of the run, NATS for the
    /// fourth, and stop WAL replay on one replica from 60 % to 80 % of it.
    pub chaos: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            clients: 12,
            tenants: 6,
            products_per_tenant: 20,
            payment_outage: true,
            progress: true,
            chaos: false,
        }
    }
}

/// What the load saw, and what the shop reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Instances served.
    pub instances: usize,
    /// Seconds of load.
    pub seconds: f64,
    /// Requests sent.
    pub requests: u64,
    /// Answers by class: 2xx, 4xx other than 429, 429, 5xx, transport errors.
    pub ok_2xx: u64,
    /// 4xx other than 429 (expected ones: 404 after a delete, 422 for a declined order).
    pub client_4xx: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// 5xx answers.
    pub server_5xx: u64,
    /// Requests that got no HTTP answer.
    pub transport_errors: u64,
    /// Latency percentiles over all requests but the 429s, milliseconds.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// L1 hits / lookups over all instances.
    pub l1_hit_ratio: f64,
    /// L2 hits / lookups.
    pub l2_hit_ratio: f64,
    /// Product reads answered from the database because the reader's token was newer than the
    /// cache (the invalidation was still travelling).
    pub ryw_reads_to_db: u64,
    /// Payment breaker state changes over all instances.
    pub breaker_transitions: u64,
    /// Payment calls the breakers refused.
    pub breaker_rejected: u64,
    /// Outbox events published.
    pub outbox_published: u64,
    /// Product events applied to the search table (each once).
    pub events_applied: u64,
    /// Events still in an outbox at the end (0 once drained).
    pub outbox_depth: i64,
    /// Orders placed (sagas completed).
    pub sagas_completed: u64,
    /// Orders compensated (payment declined or down, or out of stock).
    pub sagas_compensated: u64,
    /// Sagas waiting for an operator.
    pub sagas_parked: u64,
    /// Writes followed by a read on another instance with the write's token.
    pub ryw_checks: u64,
    /// Of those, reads that returned an older version or a deleted product.
    pub ryw_violations: u64,
}

impl Report {
    /// The report for people.
    pub fn render(&self) -> String {
        format!(
            "storefront: {instances} instance(s), {seconds:.1} s of mixed load\n\
             requests            {requests} ({rps:.0}/s): 2xx {ok}, 4xx {c4}, 429 {rl}, 5xx {s5}, no answer {te}\n\
             latency             p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms (429s not timed)\n\
             cache hit ratio     L1 {l1:.1} %, L2 {l2:.1} % (of L1 misses)\n\
             rate limiting       {rl} requests denied (429)\n\
             payment breaker     {bt} state changes, {br} calls refused while open\n\
             outbox              {op} events published, {ea} applied to search once each, {od} pending\n\
             sagas               {sc} completed, {sx} compensated, {sp} parked\n\
             read-your-writes    {rc} checks across instances, {rv} violations ({rd} reads sent to the database)",
            instances = self.instances,
            seconds = self.seconds,
            requests = self.requests,
            rps = self.requests as f64 / self.seconds.max(0.001),
            ok = self.ok_2xx,
            c4 = self.client_4xx,
            rl = self.rate_limited,
            s5 = self.server_5xx,
            te = self.transport_errors,
            p50 = self.p50_ms,
            p95 = self.p95_ms,
            p99 = self.p99_ms,
            l1 = self.l1_hit_ratio * 100.0,
            l2 = self.l2_hit_ratio * 100.0,
            bt = self.breaker_transitions,
            br = self.breaker_rejected,
            op = self.outbox_published,
            ea = self.events_applied,
            od = self.outbox_depth,
            sc = self.sagas_completed,
            sx = self.sagas_compensated,
            sp = self.sagas_parked,
            rc = self.ryw_checks,
            rv = self.ryw_violations,
            rd = self.ryw_reads_to_db,
        )
    }

    /// Whether the run kept its promises: no 5xx, no lost requests, no stale read after a write,
    /// nothing left in an outbox, no parked saga.
    pub fn healthy(&self) -> bool {
        self.server_5xx == 0
            && self.transport_errors == 0
            && self.ryw_violations == 0
            && self.outbox_depth == 0
            && self.sagas_parked == 0
    }
}

#[derive(Debug, Default)]
struct Tally {
    requests: AtomicU64,
    ok: AtomicU64,
    c4: AtomicU64,
    limited: AtomicU64,
    s5: AtomicU64,
    transport: AtomicU64,
    ryw_checks: AtomicU64,
    ryw_violations: AtomicU64,
}

struct Client {
    http: reqwest::Client,
    bases: Vec<String>,
    tally: Tally,
    latencies: Mutex<Vec<u32>>,
}

impl Client {
    /// Sends one request, records its class and latency; the status and body when answered.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Option<(u16, reqwest::header::HeaderMap, bytes_body::Body)> {
        let start = Instant::now();
        self.tally.requests.fetch_add(1, Ordering::Relaxed);
        let result = req.send().await;
        let answer = match result {
            Ok(r) => {
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                match r.bytes().await {
                    Ok(b) => Some((status, headers, bytes_body::Body(b.to_vec()))),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        let micros = u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX);
        // Latency of what the service did: the limiter's 429s (mostly the greedy client's) are
        // counted, not timed, so they do not flatter the percentiles.
        if answer.as_ref().is_none_or(|a| a.0 != 429) {
            self.latencies.lock().await.push(micros);
        }
        let counter = match answer.as_ref().map(|a| a.0) {
            None => &self.tally.transport,
            Some(200..=299) => &self.tally.ok,
            Some(429) => &self.tally.limited,
            Some(500..) => &self.tally.s5,
            Some(_) => &self.tally.c4,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        answer
    }
}

mod bytes_body {
    /// A response body.
    #[derive(Debug)]
    pub(super) struct Body(pub(super) Vec<u8>);
    impl Body {
        pub(super) fn json<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
            serde_json::from_slice(&self.0).ok()
        }
    }
}

struct Tenant {
    token: String,
    products: Mutex<Vec<i64>>,
}

const CATEGORIES: [&str; 4] = ["lamps", "desks", "chairs", "rugs"];

/// Runs the load against `addrs` (one per instance) and reports.
pub async fn run(
    shop: &Arc<Shop>,
    instances: &[Instance],
    addrs: &[std::net::SocketAddr],
    config: &LoadConfig,
) -> Result<Report, crate::Error> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| crate::Error::Start(format!("http client: {e}")))?;
    let client = Arc::new(Client {
        http,
        bases: addrs.iter().map(|a| format!("http://{a}/api/v1")).collect(),
        tally: Tally::default(),
        latencies: Mutex::new(Vec::new()),
    });
    let perms = ["products:write", "products:delete", "orders:create"];
    let mut tenants = Vec::new();
    for t in 0..config.tenants.max(1) {
        let token = shop.token(
            "load",
            &format!("tenant-{t}"),
            &perms,
            Duration::from_secs(3600),
        );
        let tenant = Arc::new(Tenant {
            token,
            products: Mutex::new(Vec::new()),
        });
        for p in 0..config.products_per_tenant.max(1) {
            if let Some(id) = create(&client, &tenant, 0, p).await {
                tenant.products.lock().await.push(id);
            }
        }
        tenants.push(tenant);
    }
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..config.clients.max(1) {
        let (client, tenants, stop) = (Arc::clone(&client), tenants.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let key = format!("client-{c}");
            while !stop.load(Ordering::Relaxed) {
                one_operation(&client, &tenants, &key).await;
                // Well-behaved: at most ~20 requests a second per key.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    // One client ignores its limit: four connections as fast as they go under one API key.
    for _ in 0..4 {
        let (client, tenant, stop) = (
            Arc::clone(&client),
            Arc::clone(&tenants[0]),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = pick(&tenant).await;
                let url = format!("{}/products/{id}", client.bases[0]);
                let req = client
                    .http
                    .get(url)
                    .bearer_auth(&tenant.token)
                    .header("x-api-key", "greedy");
                client.send(req).await;
                tokio::task::yield_now().await;
            }
        }));
    }
    let bar = if config.progress {
        indicatif::ProgressBar::new(config.duration.as_secs().max(1))
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut outage = false;
    let (mut redis_paused, mut nats_paused, mut replay_paused) = (false, false, false);
    let servers = if config.chaos {
        shop.servers.as_ref()
    } else {
        None
    };
    while started.elapsed() < config.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let f = started.elapsed().as_secs_f64() / config.duration.as_secs_f64().max(0.001);
        let want = config.payment_outage && (0.35..0.65).contains(&f);
        if want != outage {
            shop.payment.set_down(want);
            outage = want;
        }
        if let Some(servers) = servers {
            let want = (0.1..0.2).contains(&f);
            if want != redis_paused {
                let r = match &servers.redis {
                    Some(r) if want => r.pause(),
                    Some(r) => r.resume(),
                    None => Ok(()),
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "chaos: Redis pause/resume failed");
                }
                redis_paused = want;
            }
            let want = (0.3..0.4).contains(&f);
            if want != nats_paused {
                let r = match &servers.nats {
                    Some(n) if want => n.pause(),
                    Some(n) => n.resume(),
                    None => Ok(()),
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "chaos: NATS pause/resume failed");
                }
                nats_paused = want;
            }
            let want = (0.6..0.8).contains(&f);
            if want != replay_paused {
                let r = match &servers.postgres {
                    Some(p) if want => p.pause_replay(0),
                    Some(p) => p.resume_replay(0),
                    None => Ok(()),
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "chaos: replay pause/resume failed");
                }
                replay_paused = want;
            }
        }
        bar.set_position(started.elapsed().as_secs());
        bar.set_message(format!(
            "{} requests",
            client.tally.requests.load(Ordering::Relaxed)
        ));
    }
    shop.payment.set_down(false);
    if let Some(servers) = servers {
        if let (true, Some(r)) = (redis_paused, &servers.redis) {
            let _ = r.resume();
        }
        if let (true, Some(n)) = (nats_paused, &servers.nats) {
            let _ = n.resume();
        }
        if let (true, Some(p)) = (replay_paused, &servers.postgres) {
            let _ = p.resume_replay(0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    shop.drain_outboxes(Duration::from_secs(10)).await;
    Ok(report(shop, instances, &client, seconds).await)
}

async fn report(shop: &Shop, instances: &[Instance], client: &Client, seconds: f64) -> Report {
    let mut lat = std::mem::take(&mut *client.latencies.lock().await);
    lat.sort_unstable();
    let q = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        f64::from(lat[i.min(lat.len() - 1)]) / 1000.0
    };
    let status = crate::status::shop_status(shop).await;
    let (mut l1h, mut l1m, mut l2h, mut l2m) = (0, 0, 0, 0);
    let (mut bt, mut br, mut sc, mut sx, mut sp, mut rd) = (0, 0, 0, 0, 0, 0);
    for i in instances {
        let c = i.cache_stats();
        (l1h, l1m, l2h, l2m) = (
            l1h + c.l1_hits,
            l1m + c.l1_misses,
            l2h + c.l2_hits,
            l2m + c.l2_misses,
        );
        if let Some(b) = i.breaker_stats() {
            bt += b.transitions;
            br += b.rejected;
        }
        let s = i.saga_stats();
        (sc, sx, sp) = (sc + s.completed, sx + s.compensated, sp + s.parked);
        rd += i.ryw_bypasses();
    }
    let ratio = |h: u64, m: u64| {
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    };
    let t = &client.tally;
    Report {
        instances: instances.len(),
        seconds,
        requests: t.requests.load(Ordering::Relaxed),
        ok_2xx: t.ok.load(Ordering::Relaxed),
        client_4xx: t.c4.load(Ordering::Relaxed),
        rate_limited: t.limited.load(Ordering::Relaxed),
        server_5xx: t.s5.load(Ordering::Relaxed),
        transport_errors: t.transport.load(Ordering::Relaxed),
        p50_ms: q(0.50),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        l1_hit_ratio: ratio(l1h, l1m),
        l2_hit_ratio: ratio(l2h, l2m),
        ryw_reads_to_db: rd,
        breaker_transitions: bt,
        breaker_rejected: br,
        outbox_published: status.outbox_published,
        events_applied: status.events_applied,
        outbox_depth: status.outbox_depth,
        sagas_completed: sc,
        sagas_compensated: sx,
        sagas_parked: sp,
        ryw_checks: t.ryw_checks.load(Ordering::Relaxed),
        ryw_violations: t.ryw_violations.load(Ordering::Relaxed),
    }
}

async fn pick(tenant: &Tenant) -> i64 {
    let ids = tenant.products.lock().await;
    if ids.is_empty() {
        1
    } else {
        ids[fastrand::usize(..ids.len())]
    }
}

async fn create(client: &Client, tenant: &Tenant, instance: usize, n: usize) -> Option<i64> {
    let body = json!({
        "name": format!("product {n} {}", fastrand::u32(..)),
        "category": CATEGORIES[n % CATEGORIES.len()],
        "price_cents": 100 + fastrand::i64(0..10_000),
        "stock": 1_000_000,
    });
    let url = format!("{}/products", client.bases[instance % client.bases.len()]);
    let (status, _, body) = client
        .send(client.http.post(url).bearer_auth(&tenant.token).json(&body))
        .await?;
    if status != 201 {
        return None;
    }
    body.json::<Envelope<Product>>()?.data.map(|p| p.id)
}

/// `req` carrying the read-your-writes headers a write answered with.
fn with_tokens(
    mut req: reqwest::RequestBuilder,
    written: &reqwest::header::HeaderMap,
) -> reqwest::RequestBuilder {
    for name in [RYW_HEADER, LSN_HEADER] {
        if let Some(v) = written.get(name) {
            req = req.header(name, v.clone());
        }
    }
    req
}

/// One operation of a well-behaved client, picked by weight.
async fn one_operation(client: &Client, tenants: &[Arc<Tenant>], key: &str) {
    let tenant = &tenants[fastrand::usize(..tenants.len())];
    let n = client.bases.len();
    let (a, b) = (fastrand::usize(..n), fastrand::usize(..n));
    let other = if n > 1 && a == b { (a + 1) % n } else { b };
    let base = &client.bases[a];
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth(&tenant.token).header("x-api-key", key);
    match fastrand::u32(..100) {
        0..70 => {
            let id = pick(tenant).await;
            client
                .send(auth(client.http.get(format!("{base}/products/{id}"))))
                .await;
        }
        70..80 => {
            // Update on one instance, read back on another with the write's token.
            let id = pick(tenant).await;
            let patch = json!({ "price_cents": fastrand::i64(100..10_000) });
            let Some((200, headers, body)) = client
                .send(auth(
                    client
                        .http
                        .put(format!("{base}/products/{id}"))
                        .json(&patch),
                ))
                .await
            else {
                return;
            };
            let Some(written) = body.json::<Envelope<Product>>().and_then(|e| e.data) else {
                return;
            };
            let url = format!("{}/products/{id}", client.bases[other]);
            let req = with_tokens(auth(client.http.get(url)), &headers);
            client.tally.ryw_checks.fetch_add(1, Ordering::Relaxed);
            let fresh = match client.send(req).await {
                Some((200, _, body)) => body
                    .json::<Envelope<Product>>()
                    .and_then(|e| e.data)
                    .is_some_and(|p| p.version >= written.version),
                // A concurrent delete of the same product by another client is not staleness.
                Some((404, _, _)) => !tenant.products.lock().await.contains(&id),
                _ => true,
            };
            if !fresh {
                client.tally.ryw_violations.fetch_add(1, Ordering::Relaxed);
            }
        }
        80..83 => {
            // Delete on one instance: gone on another at once; a replacement keeps the catalogue.
            let id = pick(tenant).await;
            {
                let mut ids = tenant.products.lock().await;
                let Some(pos) = ids.iter().position(|x| *x == id) else {
                    return;
                };
                if ids.len() < 5 {
                    return;
                }
                ids.swap_remove(pos);
            }
            let Some((200, headers, _)) = client
                .send(auth(client.http.delete(format!("{base}/products/{id}"))))
                .await
            else {
                return;
            };
            let url = format!("{}/products/{id}", client.bases[other]);
            let req = with_tokens(auth(client.http.get(url)), &headers);
            client.tally.ryw_checks.fetch_add(1, Ordering::Relaxed);
            if let Some((200, _, _)) = client.send(req).await {
                client.tally.ryw_violations.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(new) = create(client, tenant, a, fastrand::usize(..1000)).await {
                tenant.products.lock().await.push(new);
            }
        }
        83..88 => {
            let category = CATEGORIES[fastrand::usize(..CATEGORIES.len())];
            let page = fastrand::u32(1..3);
            client
                .send(auth(client.http.get(format!(
                    "{base}/products?category={category}&page={page}&per_page=5"
                ))))
                .await;
        }
        88..90 => {
            client
                .send(auth(client.http.get(format!("{base}/search?q=product"))))
                .await;
        }
        _ => {
            let id = pick(tenant).await;
            let order = json!({ "product_id": id, "qty": 1 });
            client
                .send(auth(
                    client.http.post(format!("{base}/orders")).json(&order),
                ))
                .await;
        }
    }
}
