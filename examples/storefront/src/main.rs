//! `cargo run -p storefront`: the shop on its embedded default, a mixed load, a report.
use std::process::ExitCode;
use std::time::Duration;

use storefront::load::{self, LoadConfig};
use storefront::{Instance, Shop, ShopConfig};

const USAGE: &str =
    "usage: storefront [--duration SECS] [--instances N] [--serve] [--port PORT] [--json]

  (no flags)      start 2 instances on embedded SQLite and in-memory stores, drive a mixed load
                  for 10 s, print a report, exit 0 when the run kept every promise
  --real          run on real servers the testkit starts: PostgreSQL primary + 2 streaming
                  replicas (a database per shard, reads through the replica router), Redis
                  (cache L2 and invalidation bus, shared rate limits) and NATS JetStream (product
                  events); needs postgresql, redis-server and nats-server (scripts/test installs
                  them)
  --chaos         with --real: Redis paused (SIGSTOP) for the second tenth of the run, NATS for
                  the fourth, WAL replay stopped on one replica from 60 % to 80 % (the payment
                  outage runs anyway)
  --database-url  use your PostgreSQL primary (implies --real; the shop creates the databases
                  storefront_shard_N and storefront_orders on it if missing, so CREATEDB is needed)
  --replica-url   a streaming replica of that primary (repeat for each)
  --redis-url     use your Redis (implies --real)
  --nats-url      use your NATS with JetStream (implies --real)
                  servers not given by URL are started by the testkit
  --duration S    seconds of load (default 10)
  --instances N   service instances in this process, sharing the stores (default 2, at most 16)
  --serve         keep serving after the load (Ctrl-C stops); the status page is at /
  --port P        first instance's port (default: any free port); others take the next ones
  --json          print the report as JSON
  --no-load       with --serve: serve only";

struct Args {
    real: bool,
    urls: storefront::ServerUrls,
    chaos: bool,
    duration: Duration,
    instances: usize,
    serve: bool,
    port: u16,
    json: bool,
    load: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        real: false,
        urls: storefront::ServerUrls::default(),
        chaos: false,
        duration: Duration::from_secs(10),
        instances: 2,
        serve: false,
        port: 0,
        json: false,
        load: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--duration" => {
                let s: f64 = value("--duration")?
                    .parse()
                    .map_err(|_| "--duration takes seconds".to_owned())?;
                if !(0.5..=86_400.0).contains(&s) {
                    return Err("--duration must be 0.5 to 86400 seconds".into());
                }
                a.duration = Duration::from_secs_f64(s);
            }
            "--instances" => {
                a.instances = value("--instances")?
                    .parse()
                    .map_err(|_| "--instances takes a number".to_owned())?;
                if !(1..=16).contains(&a.instances) {
                    return Err("--instances must be 1 to 16".into());
                }
            }
            "--port" => {
                a.port = value("--port")?
                    .parse()
                    .map_err(|_| "--port takes a port number".to_owned())?
            }
            "--serve" => a.serve = true,
            "--real" => a.real = true,
            "--chaos" => a.chaos = true,
            "--database-url" => a.urls.database = Some(value("--database-url")?),
            "--replica-url" => a.urls.replicas.push(value("--replica-url")?),
            "--redis-url" => a.urls.redis = Some(value("--redis-url")?),
            "--nats-url" => a.urls.nats = Some(value("--nats-url")?),
            "--json" => a.json = true,
            "--no-load" => a.load = false,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let u = &a.urls;
    if !u.replicas.is_empty() && u.database.is_none() {
        return Err("--replica-url needs --database-url (the primary)".into());
    }
    if u.database.is_some() || u.redis.is_some() || u.nats.is_some() {
        if a.chaos {
            return Err(
                "--chaos pauses the testkit's servers, not yours: leave out the URLs".into(),
            );
        }
        a.real = true;
    }
    if a.chaos && !a.real {
        return Err("--chaos needs --real (it pauses real servers)".into());
    }
    if !a.load && !a.serve {
        return Err("--no-load only makes sense with --serve".into());
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("storefront: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Structured JSON logs on stderr; RUST_LOG=info shows every request with its request id.
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("storefront: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, storefront::Error> {
    let shop = if args.real {
        if !args.json {
            println!(
                "starting PostgreSQL (primary + 2 streaming replicas) and Redis from the testkit"
            );
        }
        Shop::connect(ShopConfig::default(), args.urls.clone()).await?
    } else {
        Shop::embedded(ShopConfig::default()).await?
    };
    let mut instances = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..args.instances {
        let instance = Instance::start(&shop, i).await?;
        let port = if args.port == 0 {
            0
        } else {
            args.port.saturating_add(u16::try_from(i).unwrap_or(0))
        };
        addrs.push(instance.serve(&format!("127.0.0.1:{port}")).await?);
        instances.push(instance);
    }
    if !args.json {
        for (i, a) in addrs.iter().enumerate() {
            println!("instance {i}: http://{a}/ (status page), http://{a}/api/v1/...");
        }
    }
    let mut code = ExitCode::SUCCESS;
    if args.load {
        let config = LoadConfig {
            duration: args.duration,
            progress: !args.json,
            chaos: args.chaos,
            ..LoadConfig::default()
        };
        let report = load::run(&shop, &instances, &addrs, &config).await?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        } else {
            println!("{}", report.render());
        }
        if !report.healthy() {
            eprintln!("storefront: the run broke a promise (see the report)");
            code = ExitCode::FAILURE;
        }
    }
    if args.serve {
        println!("serving; Ctrl-C stops");
        let _ = tokio::signal::ctrl_c().await;
    }
    for i in &instances {
        i.shutdown().await;
    }
    shop.shutdown().await;
    Ok(code)
}
