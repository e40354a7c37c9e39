//! The storefront on real servers (`--real`): PostgreSQL primary + two streaming replicas behind
//! the replica router, Redis for the cache and the limits. Started by the testkit.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use storefront::load::{self, LoadConfig};
use storefront::{Instance, PaymentConfig, Shop, ShopConfig};

struct Running {
    shop: Arc<Shop>,
    instances: Vec<Instance>,
    addrs: Vec<SocketAddr>,
    http: reqwest::Client,
    admin: String,
}

async fn start(config: ShopConfig) -> Running {
    let shop = Shop::real(config).await.unwrap();
    let (mut instances, mut addrs) = (Vec::new(), Vec::new());
    for i in 0..2 {
        let instance = Instance::start(&shop, i).await.unwrap();
        addrs.push(instance.serve("127.0.0.1:0").await.unwrap());
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
        addrs,
        http: reqwest::Client::new(),
        admin,
    }
}

impl Running {
    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addrs[i])
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = req.bearer_auth(&self.admin).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }
}

/// Replay stopped on one replica: every read that carries the write's tokens still sees the write
/// (the cache is bypassed for an older copy and the replica router skips the replica behind),
/// on the other instance, for single reads and for lists, which are served by replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_tokens_see_the_write_while_a_replica_is_behind() {
    let s = start(ShopConfig::default()).await;
    let (status, _, body) = s
        .send(s.http.post(s.url(0, "/products")).json(&json!({
            "name": "teapot", "category": "kitchen", "price_cents": 900, "stock": 10
        })))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["data"]["id"].as_i64().unwrap();
    for i in 0..2 {
        assert_eq!(
            s.send(s.http.get(s.url(i, &format!("/products/{id}"))))
                .await
                .0,
            200
        );
    }
    let servers = s.shop.servers.as_ref().unwrap();
    servers.postgres.as_ref().unwrap().pause_replay(0).unwrap();
    for round in 0..15 {
        let (status, headers, body) = s
            .send(
                s.http
                    .put(s.url(0, &format!("/products/{id}")))
                    .json(&json!({ "price_cents": 1000 + round })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let lsn = headers["x-rw-lsn"].to_str().unwrap().to_owned();
        let version = headers["x-rw-token"].to_str().unwrap().to_owned();
        let (_, _, read) = s
            .send(
                s.http
                    .get(s.url(1, &format!("/products/{id}")))
                    .header("x-rw-token", &version)
                    .header("x-rw-lsn", &lsn),
            )
            .await;
        assert_eq!(
            read["data"]["price_cents"],
            1000 + round,
            "round {round}: {read}"
        );
        let (_, _, list) = s
            .send(
                s.http
                    .get(s.url(1, "/products?category=kitchen"))
                    .header("x-rw-lsn", &lsn),
            )
            .await;
        assert_eq!(
            list["data"][0]["price_cents"],
            1000 + round,
            "round {round}: {list}"
        );
    }
    servers.postgres.as_ref().unwrap().resume_replay(0).unwrap();
    // The replicas and the router are visible in the status.
    let (_, _, status) = s.send(s.http.get(s.url(0, "/status"))).await;
    assert!(status["data"]["replica_lag_ms"].is_number(), "{status}");
}

/// Deletes through Redis: both instances' caches drop the product; orders run on the
/// PostgreSQL saga log and are compensated when payment is declined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_and_orders_on_real_servers() {
    let s = start(ShopConfig {
        payment: PaymentConfig {
            decline_rate: 0.0,
            error_rate: 0.0,
            latency: Duration::from_millis(1),
        },
        ..ShopConfig::default()
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let (_, _, body) = s
            .send(s.http.post(s.url(n % 2, "/products")).json(&json!({
                "name": format!("mug {n}"), "category": "mugs", "price_cents": 500, "stock": 3
            })))
            .await;
        ids.push(body["data"]["id"].as_i64().unwrap());
    }
    for id in &ids {
        for i in 0..2 {
            assert_eq!(
                s.send(s.http.get(s.url(i, &format!("/products/{id}"))))
                    .await
                    .0,
                200
            );
        }
    }
    let (status, _, body) = s
        .send(
            s.http
                .post(s.url(1, "/orders"))
                .json(&json!({ "product_id": ids[0], "qty": 2 })),
        )
        .await;
    assert_eq!(
        (status, body["data"]["status"].as_str()),
        (201, Some("completed")),
        "{body}"
    );
    s.shop.payment.set_config(PaymentConfig {
        decline_rate: 1.0,
        error_rate: 0.0,
        latency: Duration::from_millis(1),
    });
    let (status, _, body) = s
        .send(
            s.http
                .post(s.url(0, "/orders"))
                .json(&json!({ "product_id": ids[0], "qty": 1 })),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("order_failed")),
        "{body}"
    );
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(
            s.send(s.http.delete(s.url(n % 2, &format!("/products/{id}"))))
                .await
                .0,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in &ids {
        for i in 0..2 {
            let (status, _, body) = s
                .send(s.http.get(s.url(i, &format!("/products/{id}"))))
                .await;
            assert_eq!(status, 404, "product {id} on instance {i}: {body}");
        }
    }
    // The search table (orders database, through the outbox and the inbox) lost them too.
    assert!(s.shop.drain_outboxes(Duration::from_secs(10)).await);
    let (_, _, hits) = s.send(s.http.get(s.url(0, "/search?q=mug"))).await;
    assert_eq!(hits["data"], json!([]), "{hits}");
    assert_eq!(
        s.instances[0].saga_stats().parked + s.instances[1].saga_stats().parked,
        0
    );
    // Readiness checks the databases, Redis and NATS: Redis frozen -> 503 naming it.
    let ready = |i: usize| {
        s.http
            .get(format!("http://{}/health/ready", s.addrs[i]))
            .send()
    };
    assert_eq!(ready(0).await.unwrap().status(), 200);
    let redis = s.shop.servers.as_ref().unwrap().redis.as_ref().unwrap();
    redis.pause().unwrap();
    let r = ready(1).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"]["failing"], json!(["redis"]), "{body}");
    redis.resume().unwrap();
    assert_eq!(ready(1).await.unwrap().status(), 200);
}

/// The built-in load with chaos: Redis paused, replay stopped on a replica, the payment provider
/// down, each for a part of the run. The service keeps answering (no 5xx, no lost request), no
/// read is older than the reader's write, every event is delivered, no saga is parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_with_chaos_keeps_every_promise() {
    let s = start(ShopConfig::default()).await;
    let config = LoadConfig {
        duration: Duration::from_secs(8),
        progress: false,
        chaos: true,
        ..LoadConfig::default()
    };
    let report = load::run(&s.shop, &s.instances, &s.addrs, &config)
        .await
        .unwrap();
    println!("{}", report.render());
    assert!(report.healthy(), "{}", report.render());
    assert!(
        report.ryw_checks > 20 && report.sagas_completed > 0,
        "{}",
        report.render()
    );
    assert!(report.rate_limited > 0, "{}", report.render());
    assert_eq!(
        report.events_applied,
        report.outbox_published,
        "{}",
        report.render()
    );
}

/// Servers given by URL (as a user with their own PostgreSQL, Redis and NATS would run it): the
/// shop creates its databases there, and a second shop over the same servers (a restart) finds
/// what the first wrote, reading it through a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_on_servers_given_by_url_keeps_its_data_across_restarts() {
    use stanchion_testkit::{NatsServer, Node, PostgresCluster, RedisServer};
    let (pg, redis, nats) = tokio::task::spawn_blocking(|| {
        (
            PostgresCluster::start(1).unwrap(),
            RedisServer::start().unwrap(),
            NatsServer::start().unwrap(),
        )
    })
    .await
    .unwrap();
    let urls = storefront::ServerUrls {
        database: Some(pg.url(Node::Primary)),
        replicas: vec![pg.url(Node::Replica(0))],
        redis: Some(redis.url()),
        nats: Some(nats.url()),
    };
    // URLs carry passwords: the debug form says only which are set.
    let secret = storefront::ServerUrls {
        database: Some("postgres://app:hunter2@db/shop".into()),
        ..urls.clone()
    };
    assert!(!format!("{secret:?}").contains("hunter2"));

    let id = {
        let shop = Shop::connect(ShopConfig::default(), urls.clone())
            .await
            .unwrap();
        assert!(
            shop.servers.as_ref().unwrap().postgres.is_none(),
            "no cluster of its own"
        );
        let instance = Instance::start(&shop, 0).await.unwrap();
        let addr = instance.serve("127.0.0.1:0").await.unwrap();
        let admin = shop.token(
            "admin",
            "initech",
            &["products:write"],
            Duration::from_secs(60),
        );
        let r = reqwest::Client::new()
            .post(format!("http://{addr}/api/v1/products"))
            .bearer_auth(&admin)
            .json(&json!({ "name": "stapler", "category": "office", "price_cents": 1500, "stock": 1 }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        assert!(shop.drain_outboxes(Duration::from_secs(10)).await);
        instance.shutdown().await;
        shop.shutdown().await;
        body["data"]["id"].as_i64().unwrap()
    };
    let shop = Shop::connect(ShopConfig::default(), urls).await.unwrap();
    let instance = Instance::start(&shop, 0).await.unwrap();
    let addr = instance.serve("127.0.0.1:0").await.unwrap();
    let reader = shop.token("reader", "initech", &[], Duration::from_secs(60));
    let http = reqwest::Client::new();
    let got: Value = http
        .get(format!("http://{addr}/api/v1/products/{id}"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["data"]["name"], "stapler", "{got}");
    // Lists are served by the replica; it has the row (replayed long ago).
    let list: Value = http
        .get(format!("http://{addr}/api/v1/products?category=office"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["meta"]["total"], 1, "{list}");
    // The search table was filled once, by the first shop's consumer.
    let hits: Value = http
        .get(format!("http://{addr}/api/v1/search?q=stap"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hits["data"][0]["product_id"], id, "{hits}");
    drop((pg, redis, nats));
}
