//! End-to-end HTTP tests: a real client against two instances on the embedded default.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use storefront::{Instance, PaymentConfig, Shop, ShopConfig};

struct Running {
    shop: Arc<Shop>,
    instances: Vec<Instance>,
    bases: Vec<String>,
    http: reqwest::Client,
    admin: String,
}

async fn start(config: ShopConfig) -> Running {
    let shop = Shop::embedded(config).await.unwrap();
    let (mut instances, mut bases) = (Vec::new(), Vec::new());
    for i in 0..2 {
        let instance = Instance::start(&shop, i).await.unwrap();
        let addr: SocketAddr = instance.serve("127.0.0.1:0").await.unwrap();
        bases.push(format!("http://{addr}"));
        instances.push(instance);
    }
    let admin = shop.token(
        "admin",
        "acme",
        &["products:write", "products:delete", "orders:create"],
        Duration::from_secs(600),
    );
    Running {
        shop,
        instances,
        bases,
        http: reqwest::Client::new(),
        admin,
    }
}

async fn json_of(r: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body)
}

impl Running {
    async fn create(&self, instance: usize, name: &str, category: &str) -> (Value, String) {
        let r = self
            .http
            .post(format!("{}/api/v1/products", self.bases[instance]))
            .bearer_auth(&self.admin)
            .json(&json!({ "name": name, "category": category, "price_cents": 1250, "stock": 5 }))
            .send()
            .await
            .unwrap();
        let (status, headers, body) = json_of(r).await;
        assert_eq!(status, 201, "{body}");
        let token = headers["x-rw-token"].to_str().unwrap().to_owned();
        (body["data"].clone(), token)
    }

    async fn get(
        &self,
        instance: usize,
        path: &str,
        token: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .get(format!("{}/api/v1{path}", self.bases[instance]))
            .bearer_auth(&self.admin);
        if let Some(t) = token {
            req = req.header("x-rw-token", t);
        }
        json_of(req.send().await.unwrap()).await
    }
}

fn error_code(body: &Value) -> &str {
    assert_eq!(body["success"], false, "{body}");
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_pagination_and_headers() {
    let shop = start(ShopConfig::default()).await;
    for i in 0..7 {
        shop.create(i % 2, &format!("lamp {i}"), "lamps").await;
    }
    shop.create(0, "desk", "desks").await;
    let (status, headers, body) = shop
        .get(1, "/products?category=lamps&page=2&per_page=3", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    assert!(body["error"].is_null());
    assert_eq!(
        body["meta"],
        json!({ "page": 2, "per_page": 3, "total": 7 })
    );
    let names: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lamp 3", "lamp 4", "lamp 5"]);
    // Last page, and a page past the end.
    let (_, _, body) = shop
        .get(0, "/products?category=lamps&page=3&per_page=3", None)
        .await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    let (_, _, body) = shop
        .get(0, "/products?category=lamps&page=9&per_page=3", None)
        .await;
    assert_eq!(body["data"], json!([]));
    let (status, _, body) = shop
        .get(0, "/products?category=lamps&per_page=1000", None)
        .await;
    assert_eq!((status, error_code(&body)), (400, "invalid_query"));
    // Security headers and a request id on every answer, errors and the status page included.
    for path in [
        "/api/v1/products?category=lamps",
        "/api/v1/nope",
        "/",
        "/health/live",
    ] {
        let r = shop
            .http
            .get(format!("{}{path}", shop.bases[0]))
            .bearer_auth(&shop.admin)
            .send()
            .await
            .unwrap();
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert!(h.contains_key("content-security-policy"), "{path}");
        assert!(!h["x-request-id"].is_empty(), "{path}");
    }
    // A request id the caller sends is kept.
    let r = shop
        .http
        .get(format!("{}/health/live", shop.bases[0]))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    // Rate-limit headers from the limiter on API answers.
    assert!(
        headers.contains_key("ratelimit") || headers.contains_key("ratelimit-policy"),
        "{headers:?}"
    );
    let (status, _, body) = shop.get(0, "/nothing-here", None).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_errors_are_clear() {
    let shop = start(ShopConfig::default()).await;
    let url = format!("{}/api/v1/products/1", shop.bases[0]);
    let r = json_of(shop.http.get(&url).send().await.unwrap()).await;
    assert_eq!((r.0, error_code(&r.2)), (401, "unauthorized"));
    let r = json_of(
        shop.http
            .get(&url)
            .bearer_auth("not.a.jwt")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.0, error_code(&r.2)), (401, "invalid_token"));
    // Signed with another secret.
    let other = Shop::embedded(ShopConfig {
        token_secret: b"another secret, also at least thirty-two bytes".to_vec(),
        ..ShopConfig::default()
    })
    .await
    .unwrap();
    let forged = other.token(
        "mallory",
        "acme",
        &["products:delete"],
        Duration::from_secs(60),
    );
    let r = json_of(
        shop.http
            .get(&url)
            .bearer_auth(forged)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.0, error_code(&r.2)), (401, "invalid_token"));
    // Expired: signed correctly, past its exp.
    let expired = shop
        .shop
        .token("ann", "acme", &["products:write"], Duration::ZERO);
    let r = json_of(
        shop.http
            .get(&url)
            .bearer_auth(expired)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.0, error_code(&r.2)), (401, "token_expired"));
    // Deleting needs products:delete; a writer cannot.
    let (product, _) = shop.create(0, "chair", "chairs").await;
    let writer = shop
        .shop
        .token("wes", "acme", &["products:write"], Duration::from_secs(60));
    let del = format!("{}/api/v1/products/{}", shop.bases[1], product["id"]);
    let r = json_of(
        shop.http
            .delete(&del)
            .bearer_auth(&writer)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.0, error_code(&r.2)), (403, "forbidden"));
    assert!(
        r.2["error"]["message"]
            .as_str()
            .unwrap()
            .contains("products:delete")
    );
    // A reader of another tenant does not see acme's product.
    let other_tenant = shop
        .shop
        .token("olga", "globex", &[], Duration::from_secs(60));
    let r = json_of(
        shop.http
            .get(&del)
            .bearer_auth(other_tenant)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.0, error_code(&r.2)), (404, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_and_oversized_bodies_get_a_4xx_envelope() {
    let shop = start(ShopConfig::default()).await;
    let url = format!("{}/api/v1/products", shop.bases[0]);
    let send = |body: String| {
        shop.http
            .post(&url)
            .bearer_auth(&shop.admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = json_of(send("{\"name\": ".into()).await.unwrap()).await;
    assert_eq!((r.0, error_code(&r.2)), (400, "invalid_json"));
    let r = json_of(
        send(json!({ "name": "x", "category": "c", "price_cents": "ten", "stock": 1 }).to_string())
            .await
            .unwrap(),
    )
    .await;
    assert!(r.0 == 400 || r.0 == 422, "{}", r.0);
    assert_eq!(r.2["success"], false);
    let r = json_of(
        send(json!({ "name": "", "category": "c", "price_cents": 1, "stock": 1 }).to_string())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.0, error_code(&r.2)), (400, "invalid_field"));
    let r = json_of(
        send(json!({ "name": "x", "category": "c", "price_cents": -1, "stock": 1 }).to_string())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((r.0, error_code(&r.2)), (400, "invalid_field"));
    let huge =
        json!({ "name": "x".repeat(100_000), "category": "c", "price_cents": 1, "stock": 1 })
            .to_string();
    let r = json_of(send(huge).await.unwrap()).await;
    assert_eq!((r.0, error_code(&r.2)), (413, "payload_too_large"));
    // Nothing was created by any of them.
    let (_, _, body) = shop.get(1, "/products?category=c", None).await;
    assert_eq!(body["meta"]["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_read_back_on_every_instance_and_reach_search() {
    let shop = start(ShopConfig::default()).await;
    let (product, _) = shop.create(0, "desk lamp", "lamps").await;
    let id = product["id"].as_i64().unwrap();
    // Both instances cache version 1.
    for i in 0..2 {
        let (status, _, body) = shop.get(i, &format!("/products/{id}"), None).await;
        assert_eq!((status, body["data"]["version"].as_i64()), (200, Some(1)));
    }
    // Updated through instance 0, read on instance 1 with the write's token: never older.
    for round in 0..20 {
        let r = shop
            .http
            .put(format!("{}/api/v1/products/{id}", shop.bases[0]))
            .bearer_auth(&shop.admin)
            .json(&json!({ "price_cents": 2000 + round }))
            .send()
            .await
            .unwrap();
        let (status, headers, body) = json_of(r).await;
        assert_eq!(status, 200);
        let version = body["data"]["version"].as_i64().unwrap();
        let token = headers["x-rw-token"].to_str().unwrap().to_owned();
        let (_, _, read) = shop.get(1, &format!("/products/{id}"), Some(&token)).await;
        assert!(
            read["data"]["version"].as_i64().unwrap() >= version,
            "round {round}: {read}"
        );
        assert_eq!(read["data"]["price_cents"], 2000 + round);
    }
    // Without a token, instance 1 also converges (the invalidation reached it).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, _, read) = shop.get(1, &format!("/products/{id}"), None).await;
    assert_eq!(read["data"]["price_cents"], 2019);
    assert!(shop.instances[1].cache_stats().invalidations_received > 0);
    // The search table follows through the outbox, each event once.
    assert!(shop.shop.drain_outboxes(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, _, hits) = shop.get(1, "/search?q=desk", None).await;
    assert_eq!(hits["data"][0]["product_id"], id);
    assert_eq!(hits["data"][0]["version"], 21);
    assert_eq!(shop.shop.events_applied(), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_product_is_gone_from_every_instance_cache() {
    let shop = start(ShopConfig::default()).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(
            shop.create(n % 2, &format!("rug {n}"), "rugs").await.0["id"]
                .as_i64()
                .unwrap(),
        );
    }
    // Warm both instances' caches.
    for id in &ids {
        for i in 0..2 {
            assert_eq!(shop.get(i, &format!("/products/{id}"), None).await.0, 200);
        }
    }
    for (n, id) in ids.iter().enumerate() {
        let deleter = n % 2;
        let r = shop
            .http
            .delete(format!("{}/api/v1/products/{id}", shop.bases[deleter]))
            .bearer_auth(&shop.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Without any token: every instance's cached copy was dropped by the invalidation bus.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for id in &ids {
        for i in 0..2 {
            let (status, _, body) = shop.get(i, &format!("/products/{id}"), None).await;
            assert_eq!(
                (status, error_code(&body)),
                (404, "not_found"),
                "product {id} on instance {i}"
            );
        }
    }
    // Deleted rows are kept (soft delete) but out of lists; deleting twice is a 404.
    let (_, _, list) = shop.get(0, "/products?category=rugs", None).await;
    assert_eq!(list["meta"]["total"], 0);
    let r = shop
        .http
        .delete(format!("{}/api/v1/products/{}", shop.bases[0], ids[0]))
        .bearer_auth(&shop.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_complete_or_are_compensated_when_payment_fails() {
    let config = ShopConfig {
        payment: PaymentConfig {
            decline_rate: 0.0,
            error_rate: 0.0,
            latency: Duration::from_millis(1),
        },
        ..ShopConfig::default()
    };
    let shop = start(config).await;
    let (product, _) = shop.create(0, "kettle", "kitchen").await;
    let id = product["id"].as_i64().unwrap();
    let order = |qty: i64| {
        shop.http
            .post(format!("{}/api/v1/orders", shop.bases[1]))
            .bearer_auth(&shop.admin)
            .json(&json!({ "product_id": id, "qty": qty }))
            .send()
    };
    let (status, _, body) = json_of(order(2).await.unwrap()).await;
    assert_eq!(
        (status, body["data"]["status"].as_str()),
        (201, Some("completed")),
        "{body}"
    );
    let order_id = body["data"]["id"].as_str().unwrap().to_owned();
    let (_, _, view) = shop.get(0, &format!("/orders/{order_id}"), None).await;
    assert_eq!(view["data"]["status"], "completed");
    // Stock 5 - 2 = 3 (read on the database through a fresh token-less read after invalidation
    // is not what the saga does: it writes the shard directly, so look at the list).
    let (_, _, list) = shop.get(1, "/products?category=kitchen", None).await;
    assert_eq!(list["data"][0]["stock"], 3);

    // Every charge declined: the reservation is released, the order compensated.
    shop.shop.payment.set_config(PaymentConfig {
        decline_rate: 1.0,
        error_rate: 0.0,
        latency: Duration::from_millis(1),
    });
    let (status, _, body) = json_of(order(1).await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (422, "order_failed"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("declined"),
        "{body}"
    );
    let (_, _, list) = shop.get(1, "/products?category=kitchen", None).await;
    assert_eq!(
        list["data"][0]["stock"], 3,
        "the declined order's stock came back"
    );

    // The provider down: retries, then the breaker opens; orders are compensated, never charged.
    shop.shop.payment.set_config(PaymentConfig {
        decline_rate: 0.0,
        error_rate: 0.0,
        latency: Duration::from_millis(1),
    });
    shop.shop.payment.set_down(true);
    let charged_before = shop
        .shop
        .payment
        .charged
        .load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..12 {
        let (status, _, body) = json_of(order(1).await.unwrap()).await;
        assert_eq!((status, error_code(&body)), (422, "order_failed"), "{body}");
    }
    let breaker = shop.instances[1].breaker_stats().unwrap();
    assert!(
        breaker.transitions >= 1 && breaker.rejected >= 1,
        "{breaker:?}"
    );
    assert_eq!(
        shop.shop
            .payment
            .charged
            .load(std::sync::atomic::Ordering::Relaxed),
        charged_before
    );
    let (_, _, list) = shop.get(1, "/products?category=kitchen", None).await;
    assert_eq!(list["data"][0]["stock"], 3);
    // Back up: after the open wait the breaker lets probes through and closes.
    shop.shop.payment.set_down(false);
    let mut placed = false;
    for _ in 0..60 {
        let (status, _, _) = json_of(order(1).await.unwrap()).await;
        if status == 201 {
            placed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(placed, "the breaker never let an order through again");
    let sagas = shop.instances[1].saga_stats();
    assert_eq!(sagas.parked, 0);
    // Out of stock is a compensated order too, with the stock untouched.
    let (status, _, body) = json_of(order(1000).await.unwrap()).await;
    assert_eq!((status, error_code(&body)), (422, "order_failed"), "{body}");
    let (_, _, list) = shop.get(1, "/products?category=kitchen", None).await;
    assert_eq!(list["data"][0]["stock"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_over_its_limit_is_denied_with_headers_others_are_not() {
    let shop = start(ShopConfig {
        per_key_per_second: 20,
        ..ShopConfig::default()
    })
    .await;
    let (product, _) = shop.create(0, "vase", "decor").await;
    let url = |i: usize| format!("{}/api/v1/products/{}", shop.bases[i], product["id"]);
    let mut denied = 0;
    // The limit is shared by both instances: alternate between them.
    for n in 0..60 {
        let r = shop
            .http
            .get(url(n % 2))
            .bearer_auth(&shop.admin)
            .header("x-api-key", "greedy")
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            denied += 1;
            assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
            let (_, _, body) = json_of(r).await;
            assert_eq!(error_code(&body), "rate_limited");
        }
    }
    assert!(denied >= 30, "denied {denied} of 60 at 20/s");
    let polite = shop
        .http
        .get(url(1))
        .bearer_auth(&shop.admin)
        .header("x-api-key", "polite")
        .send()
        .await
        .unwrap();
    assert_eq!(polite.status(), 200);
    assert!(shop.instances[0].limited() + shop.instances[1].limited() >= 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_status() {
    let shop = start(ShopConfig::default()).await;
    shop.create(0, "mug", "kitchen").await;
    let r = shop
        .http
        .get(format!("{}/health/ready", shop.bases[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _, body) = shop.get(0, "/status", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["instances"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"]["instances"][0]["breaker_state"], "Closed");
    let page = shop
        .http
        .get(&shop.bases[0])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("/api/v1/status"));
    let metrics = shop
        .http
        .get(format!("{}/metrics", shop.bases[0]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Counters from the crates' `metrics` features, in the Prometheus text format.
    assert!(metrics.contains("cache_"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    send(&Shop::embedded(ShopConfig::default()));
    let shop = start(ShopConfig::default()).await;
    send(&Instance::start(&shop.shop, 9));
    send(&shop.instances[0].serve("127.0.0.1:0"));
    send(&shop.instances[0].shutdown());
    send(&shop.shop.drain_outboxes(Duration::from_millis(1)));
    send(&shop.shop.shutdown());
    let config = storefront::load::LoadConfig::default();
    send(&storefront::load::run(
        &shop.shop,
        &shop.instances,
        &[],
        &config,
    ));
    send(&storefront::status::shop_status(&shop.shop));
}

/// The main job's load, short, in process: the report keeps every promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_load_keeps_every_promise() {
    let shop = start(ShopConfig::default()).await;
    let addrs: Vec<SocketAddr> = shop
        .bases
        .iter()
        .map(|b| b.trim_start_matches("http://").parse().unwrap())
        .collect();
    let config = storefront::load::LoadConfig {
        duration: Duration::from_secs(8),
        progress: false,
        ..storefront::load::LoadConfig::default()
    };
    let report = storefront::load::run(&shop.shop, &shop.instances, &addrs, &config)
        .await
        .unwrap();
    assert!(report.healthy(), "{}", report.render());
    assert!(report.requests > 500, "{}", report.render());
    assert!(
        report.rate_limited > 0,
        "the greedy client was never limited: {}",
        report.render()
    );
    assert!(report.ryw_checks > 20, "{}", report.render());
    assert!(
        report.sagas_completed > 0 && report.sagas_compensated > 0,
        "{}",
        report.render()
    );
    assert!(
        report.breaker_transitions > 0,
        "the payment outage never opened a breaker: {}",
        report.render()
    );
    assert_eq!(
        report.events_applied,
        report.outbox_published,
        "{}",
        report.render()
    );
    assert!(report.l1_hit_ratio > 0.3, "{}", report.render());
}
