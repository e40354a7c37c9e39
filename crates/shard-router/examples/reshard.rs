//! Adds a third PostgreSQL database to two while writers keep writing: the plan, the cutover
//! and what the writers saw.
//!
//! `cargo run -p stanchion-shard-router --features postgres --example reshard`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use stanchion_shard_router::cutover::{Cutover, CutoverError, MovedTable, guard_write, install};
use stanchion_shard_router::{Key, RouteError, ShardMap, plan};
use stanchion_testkit::PostgresCluster;

type Published = Arc<RwLock<Arc<(ShardMap, Vec<PgPool>)>>>;

async fn write(
    map: &Published,
    id: i64,
    refused: &AtomicU64,
) -> Result<(), Box<dyn std::error::Error>> {
    loop {
        let held = map.read().map_err(|_| "poisoned")?.clone();
        let slot = held.0.slot(Key::Int(id));
        let shard = held.0.owner(slot).ok_or("slot outside the map")?;
        let mut tx = held.1[shard as usize].begin().await?;
        match guard_write(&mut tx, slot).await {
            Ok(()) => {}
            Err(CutoverError::Route(
                RouteError::SlotMoved { .. } | RouteError::SlotFenced { .. },
            )) => {
                refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        sqlx::query("INSERT INTO items (id, slot) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
            .bind(id)
            .bind(slot as i32)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(());
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("starting three PostgreSQL servers...");
    let mut servers = Vec::new();
    let mut pools = Vec::new();
    for _ in 0..3 {
        let server = PostgresCluster::start(0)?;
        let db = server.create_database()?;
        pools.push(
            PgPoolOptions::new()
                .max_connections(4)
                .connect(&db.primary_url)
                .await?,
        );
        servers.push(server);
    }
    let v1 = ShardMap::uniform(4096, 2)?;
    for (i, pool) in pools.iter().enumerate() {
        sqlx::query("CREATE TABLE items (id bigint PRIMARY KEY, slot integer NOT NULL)")
            .execute(pool)
            .await?;
        sqlx::query("CREATE INDEX ON items (slot)")
            .execute(pool)
            .await?;
        let owned = if i < 2 {
            v1.slots_of(i as u32)
        } else {
            Vec::new()
        };
        install(pool, &owned, v1.version()).await?;
    }
    let published: Published = Arc::new(RwLock::new(Arc::new((v1.clone(), pools[..2].to_vec()))));
    let refused = Arc::new(AtomicU64::new(0));
    for id in 0..20_000 {
        write(&published, id, &refused).await?;
    }
    println!("20,000 rows on two databases");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (published, refused, stop) = (published.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            let mut id = 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                if write(&published, id, &refused).await.is_err() {
                    break;
                }
                id += 1;
            }
            id - 1_000_000
        })
    };
    let v2 = v1.add_shard()?;
    let p = plan(&v1, &v2)?;
    println!("plan v1 -> v2: {} of 4096 slots move", p.moves().len());
    let table = MovedTable::new("items", "id", "slot")?;
    for ((from, to), slots) in p.by_route() {
        let n = slots.len();
        let report = Cutover::new(
            pools[from as usize].clone(),
            pools[to as usize].clone(),
            slots,
            v2.version(),
            vec![table.clone()],
        )
        .run()
        .await?;
        *published.write().map_err(|_| "poisoned")? = Arc::new((v2.clone(), pools.clone()));
        println!(
            "  {n} slots {from} -> {to}: {} rows copied live, {} synced under the fence, fenced {:?}, total {:?}",
            report.copied, report.synced, report.fenced_for, report.total
        );
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.await?;
    for (i, pool) in pools.iter().enumerate() {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(pool)
            .await?;
        println!("database {i}: {n} rows");
    }
    println!(
        "the writer committed {written} rows during the move; {} attempts were refused (fenced or moved) and retried",
        refused.load(Ordering::Relaxed)
    );
    Ok(())
}
