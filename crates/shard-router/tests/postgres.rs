//! Against real PostgreSQL servers from the testkit: hash compatibility with `PARTITION BY
//! HASH`, scatter-gather with a paused shard, and resharding a 100,000-row table while writers
//! keep writing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, Row};
use stanchion_shard_router::cutover::{Cutover, CutoverError, MovedTable, guard_write, install};
use stanchion_shard_router::{
    Key, OnShardFailure, PgHash, RouteError, Scatter, ShardFailure, ShardMap, ShardRouter, Sharder,
    merge_sorted, plan,
};
use stanchion_testkit::{Node, PostgresCluster};

async fn pool(cluster: &PostgresCluster, connections: u32) -> PgPool {
    let db = cluster.create_database().unwrap();
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&db.primary_url)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_hash_puts_keys_where_partition_by_hash_does() {
    let cluster = PostgresCluster::start(0).unwrap();
    let pool = pool(&cluster, 2).await;
    for (ty, modulus) in [("bigint", 7_u32), ("text", 5), ("integer", 4)] {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE p_{ty} (k {ty} NOT NULL) PARTITION BY HASH (k)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        for r in 0..modulus {
            sqlx::query(AssertSqlSafe(format!(
                "CREATE TABLE p_{ty}_{r} PARTITION OF p_{ty} FOR VALUES WITH (MODULUS {modulus}, REMAINDER {r})"
            )))
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    // Integers across the range (negative, 32-bit edges, 64-bit edges) and text of every length
    // around lookup3's 12-byte blocks, including multi-byte UTF-8.
    let mut ints: Vec<i64> = (-500..500).collect();
    ints.extend([
        i64::MIN,
        i64::MAX,
        i64::from(i32::MIN),
        i64::from(i32::MAX),
        i64::from(i32::MAX) + 1,
        -(1 << 40),
        1 << 53,
    ]);
    let mut texts: Vec<String> = (0..40).map(|n| "x".repeat(n)).collect();
    texts.extend((0..500).map(|i| format!("tenant-{i}")));
    texts.extend(["é", "日本語のキー", "emoji 🦀 key", ""].map(String::from));
    sqlx::query("INSERT INTO p_bigint SELECT unnest($1::bigint[])")
        .bind(&ints)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO p_text SELECT unnest($1::text[])")
        .bind(&texts)
        .execute(&pool)
        .await
        .unwrap();
    let small: Vec<i32> = (-300..300).collect();
    sqlx::query("INSERT INTO p_integer SELECT unnest($1::integer[])")
        .bind(&small)
        .execute(&pool)
        .await
        .unwrap();

    let placed = |rows: Vec<sqlx::postgres::PgRow>| -> Vec<(String, u32)> {
        rows.iter()
            .map(|r| {
                let part: String = r.get(1);
                let rem = part.rsplit('_').next().unwrap().parse().unwrap();
                (r.get::<String, _>(0), rem)
            })
            .collect()
    };
    let (pg7, pg5, pg4) = (
        PgHash::new(7).unwrap(),
        PgHash::new(5).unwrap(),
        PgHash::new(4).unwrap(),
    );
    let rows = sqlx::query("SELECT k::text, tableoid::regclass::text FROM p_bigint")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut checked = 0;
    for (k, part) in placed(rows) {
        let k: i64 = k.parse().unwrap();
        assert_eq!(pg7.shard(Key::Int(k)).unwrap(), part, "bigint {k}");
        checked += 1;
    }
    let rows = sqlx::query("SELECT k, tableoid::regclass::text FROM p_text")
        .fetch_all(&pool)
        .await
        .unwrap();
    for (k, part) in placed(rows) {
        assert_eq!(pg5.shard(Key::Text(&k)).unwrap(), part, "text {k:?}");
        checked += 1;
    }
    let rows = sqlx::query("SELECT k::text, tableoid::regclass::text FROM p_integer")
        .fetch_all(&pool)
        .await
        .unwrap();
    for (k, part) in placed(rows) {
        let k: i64 = k.parse().unwrap();
        assert_eq!(pg4.shard(Key::Int(k)).unwrap(), part, "integer {k}");
        checked += 1;
    }
    assert_eq!(checked, ints.len() + texts.len() + small.len());
}

async fn shards(n: usize) -> (Vec<PostgresCluster>, Vec<PgPool>) {
    let mut clusters = Vec::new();
    let mut pools = Vec::new();
    for _ in 0..n {
        let c = PostgresCluster::start(0).unwrap();
        pools.push(pool(&c, 8).await);
        clusters.push(c);
    }
    (clusters, pools)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scatter_gather_with_a_paused_shard_answers_per_policy_within_the_deadline() {
    let (clusters, pools) = shards(3).await;
    let router = ShardRouter::new(ShardMap::uniform(4096, 3).unwrap(), pools.clone()).unwrap();
    for p in &pools {
        sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, created bigint NOT NULL)")
            .execute(p)
            .await
            .unwrap();
    }
    // 300 orders, each on the shard its id routes to.
    let ids: Vec<i64> = (1..=300).collect();
    let groups = router.group(ids.iter().map(|i| Key::Int(*i)));
    for g in groups.values() {
        let mine: Vec<i64> = g.indexes.iter().map(|i| ids[*i]).collect();
        sqlx::query("INSERT INTO orders SELECT id, id * 10 FROM unnest($1::bigint[]) AS id")
            .bind(&mine)
            .execute(&g.target)
            .await
            .unwrap();
    }
    // A batch lookup: one `= ANY($1)` per shard, everything found.
    let wanted: Vec<i64> = vec![3, 77, 150, 151, 299];
    let groups = router.group(wanted.iter().map(|i| Key::Int(*i)));
    let scatter = Scatter::new(Duration::from_millis(500))
        .unwrap()
        .concurrency(2)
        .unwrap();
    let targets: Vec<(u32, (PgPool, Vec<i64>))> = groups
        .into_iter()
        .map(|(shard, g)| {
            (
                shard,
                (g.target, g.indexes.iter().map(|i| wanted[*i]).collect()),
            )
        })
        .collect();
    let got = scatter
        .run(targets, |_, (pool, keys)| async move {
            sqlx::query_scalar::<_, i64>("SELECT id FROM orders WHERE id = ANY($1)")
                .bind(keys)
                .fetch_all(&pool)
                .await
        })
        .await
        .unwrap();
    let mut found: Vec<i64> = got.answers.into_iter().flat_map(|(_, v)| v).collect();
    found.sort();
    assert_eq!(found, wanted);

    // A paginated list over every shard: newest first, 25 per page, merged.
    let page = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT created FROM orders ORDER BY created DESC LIMIT 25")
            .fetch_all(&pool)
            .await
    };
    let all = scatter.run(router.all(), |_, p| page(p)).await.unwrap();
    let lists = all.answers.into_iter().map(|(_, v)| v).collect();
    let merged = merge_sorted(lists, |c| std::cmp::Reverse(*c), 25);
    assert_eq!(
        merged,
        (276..=300).rev().map(|i| i * 10).collect::<Vec<_>>()
    );

    // Shard 1 hangs (SIGSTOP): the partial policy answers with the others and a timeout for
    // shard 1, within the deadline; the fail policy fails within it.
    clusters[1].pause(Node::Primary).unwrap();
    let deadline = Duration::from_millis(300);
    let partial = Scatter::new(deadline)
        .unwrap()
        .on_failure(OnShardFailure::Partial);
    let started = Instant::now();
    let got = partial.run(router.all(), |_, p| page(p)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(
        got.answers.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert_eq!(got.failures.len(), 1);
    assert!(matches!(got.failures[0], (1, ShardFailure::TimedOut(_))));
    assert!(took < deadline + Duration::from_millis(150), "{took:?}");
    let started = Instant::now();
    let failed = Scatter::new(deadline)
        .unwrap()
        .run(router.all(), |_, p| page(p))
        .await
        .unwrap_err();
    assert_eq!(failed.shard, 1);
    assert!(started.elapsed() < deadline + Duration::from_millis(150));
    println!("paused shard: partial answer in {took:?} (deadline {deadline:?})");
    clusters[1].resume(Node::Primary).unwrap();

    // A shard that is gone (killed, not coming back) is an error for that shard, not a hang.
    let mut clusters = clusters;
    clusters[2].kill(Node::Primary).unwrap();
    let got = partial.run(router.all(), |_, p| page(p)).await.unwrap();
    assert_eq!(
        got.answers.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!(got.failures[0].0, 2);
}

/// Writes one row under the map the writer holds, retrying as the router's errors say.
async fn write(
    map: &RwLock<Arc<(ShardMap, Vec<PgPool>)>>,
    key: i64,
    value: i64,
    stats: &Stats,
) -> Result<(), sqlx::Error> {
    let mut held = map.read().unwrap().clone();
    loop {
        let slot = held.0.slot(Key::Int(key));
        let shard = held.0.owner(slot).unwrap();
        let pool = &held.1[shard as usize];
        let mut tx = pool.begin().await?;
        match guard_write(&mut tx, slot).await {
            Ok(()) => {}
            Err(CutoverError::Route(RouteError::SlotMoved { version, .. })) => {
                drop(tx);
                stats.moved.fetch_add(1, Ordering::Relaxed);
                // Reload: the published map must be at least the version the slot moved at.
                loop {
                    held = map.read().unwrap().clone();
                    if held.0.version() >= version {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                continue;
            }
            Err(CutoverError::Route(RouteError::SlotFenced { .. })) => {
                drop(tx);
                stats.fenced.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
                held = map.read().unwrap().clone();
                continue;
            }
            Err(CutoverError::Db(e)) => return Err(e),
            Err(e) => panic!("{e}"),
        }
        sqlx::query(
            "INSERT INTO products (id, slot, price) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET price = excluded.price",
        )
        .bind(key)
        .bind(slot as i32)
        .bind(value)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(());
    }
}

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    moved: AtomicU64,
    fenced: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_100k_rows_while_writers_write_loses_and_duplicates_nothing() {
    let (_clusters, pools) = shards(3).await;
    let v1 = ShardMap::uniform(4096, 2).unwrap();
    for (i, p) in pools.iter().enumerate() {
        sqlx::query(
            "CREATE TABLE products (id bigint PRIMARY KEY, slot integer NOT NULL, price bigint NOT NULL, name text NOT NULL DEFAULT 'product')",
        )
        .execute(p)
        .await
        .unwrap();
        sqlx::query("CREATE INDEX ON products (slot)")
            .execute(p)
            .await
            .unwrap();
        let owned = if i < 2 {
            v1.slots_of(i as u32)
        } else {
            Vec::new()
        };
        install(p, &owned, v1.version()).await.unwrap();
    }
    // 100,000 rows under v1.
    let mut expected: HashMap<i64, i64> = HashMap::new();
    let mut by_shard: BTreeMap<u32, (Vec<i64>, Vec<i32>)> = BTreeMap::new();
    for id in 0..100_000_i64 {
        let slot = v1.slot(Key::Int(id));
        let e = by_shard.entry(v1.owner(slot).unwrap()).or_default();
        e.0.push(id);
        e.1.push(slot as i32);
        expected.insert(id, id);
    }
    for (shard, (ids, slots)) in &by_shard {
        sqlx::query(
            "INSERT INTO products (id, slot, price) SELECT * FROM unnest($1::bigint[], $2::integer[], $1::bigint[])",
        )
        .bind(ids)
        .bind(slots)
        .execute(&pools[*shard as usize])
        .await
        .unwrap();
    }

    // The published map: v1 over the first two databases.
    let published = Arc::new(RwLock::new(Arc::new((v1.clone(), pools[..2].to_vec()))));
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Four writers: updates of existing rows and inserts of new ones, each writer on its own
    // keys, each remembering what it committed.
    let mut writers = Vec::new();
    for w in 0..4_i64 {
        let (published, stats, stop) = (published.clone(), stats.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut mine: HashMap<i64, i64> = HashMap::new();
            let mut n = 0_i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (key, value) = if n % 2 == 0 {
                    (1_000_000 + w * 1_000_000 + n, n)
                } else {
                    ((n * 7919 + w * 25_000) % 100_000, 1_000_000 + n)
                };
                write(&published, key, value, &stats).await.unwrap();
                stats.writes.fetch_add(1, Ordering::Relaxed);
                mine.insert(key, value);
            }
            mine
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // v2 adds the third database: every move goes to it.
    let v2 = v1.add_shard().unwrap();
    let p = plan(&v1, &v2).unwrap();
    let table = MovedTable::new("products", "id", "slot").unwrap();
    let mut reports = Vec::new();
    for ((from, to), slots) in p.by_route() {
        let cutover = Cutover::new(
            pools[from as usize].clone(),
            pools[to as usize].clone(),
            slots,
            v2.version(),
            vec![table.clone()],
        );
        // Publish v2 right after the first switch: writers with v1 are refused on the moved
        // slots until then, and reload.
        let report = cutover.run().await.unwrap();
        *published.write().unwrap() = Arc::new((v2.clone(), pools.clone()));
        reports.push(report);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        expected.extend(w.await.unwrap());
    }

    // Full comparison: every row exactly once, on the shard v2 names, with the last value.
    let mut seen: HashMap<i64, (u32, i64)> = HashMap::new();
    for (shard, pool) in pools.iter().enumerate() {
        let rows = sqlx::query("SELECT id, slot, price FROM products")
            .fetch_all(pool)
            .await
            .unwrap();
        for r in rows {
            let (id, slot, price): (i64, i32, i64) = (r.get(0), r.get(1), r.get(2));
            assert_eq!(
                v2.owner(slot as u32),
                Some(shard as u32),
                "row {id} on shard {shard}"
            );
            assert!(
                seen.insert(id, (shard as u32, price)).is_none(),
                "row {id} twice"
            );
        }
    }
    assert_eq!(seen.len(), expected.len(), "rows lost or invented");
    for (id, value) in &expected {
        assert_eq!(seen.get(id).map(|s| s.1), Some(*value), "row {id}");
    }
    // A writer still holding v1 is refused on a moved slot, never writes to the old place.
    let old = Arc::new(RwLock::new(Arc::new((v1.clone(), pools[..2].to_vec()))));
    let moved_slot = p.moves()[0].slot;
    let mut tx = pools[p.moves()[0].from as usize].begin().await.unwrap();
    let refused = guard_write(&mut tx, moved_slot).await.unwrap_err();
    assert!(
        matches!(refused, CutoverError::Route(RouteError::SlotMoved { version, .. }) if version == v2.version()),
        "{refused}"
    );
    drop(tx);
    drop(old);
    let total_moves: usize = p.moves().len();
    let fenced_max = reports.iter().map(|r| r.fenced_for).max().unwrap();
    println!(
        "resharded {} slots ({} rows copied live, {} synced under the fence, {} released) while {} writes committed; writers refused: {} moved, {} fenced; longest fence {:?}",
        total_moves,
        reports.iter().map(|r| r.copied).sum::<u64>(),
        reports.iter().map(|r| r.synced).sum::<u64>(),
        reports.iter().map(|r| r.released).sum::<u64>(),
        stats.writes.load(Ordering::Relaxed),
        stats.moved.load(Ordering::Relaxed),
        stats.fenced.load(Ordering::Relaxed),
        fenced_max
    );
    assert!(
        stats.writes.load(Ordering::Relaxed) > 100,
        "writers kept writing"
    );
    assert!(stats.moved.load(Ordering::Relaxed) + stats.fenced.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_refuses_slots_the_source_does_not_own_and_abort_undoes_a_fence() {
    let (_clusters, pools) = shards(2).await;
    for p in &pools {
        sqlx::query("CREATE TABLE t (id bigint PRIMARY KEY, slot integer NOT NULL)")
            .execute(p)
            .await
            .unwrap();
    }
    install(&pools[0], &[1, 2], 1).await.unwrap();
    install(&pools[1], &[3], 1).await.unwrap();
    let table = MovedTable::new("t", "id", "slot").unwrap();
    let wrong = Cutover::new(
        pools[0].clone(),
        pools[1].clone(),
        vec![2, 3],
        2,
        vec![table.clone()],
    );
    assert!(matches!(
        wrong.run().await,
        Err(CutoverError::NotOwner { owned: 1, asked: 2 })
    ));
    assert!(matches!(
        MovedTable::new("t; drop table t", "id", "slot"),
        Err(CutoverError::BadIdentifier { field: "table" })
    ));
    // A fence left by a failed cutover: writers are refused until abort.
    sqlx::query("UPDATE stanchion_slot_owner SET state = 'fenced' WHERE slot = 1")
        .execute(&pools[0])
        .await
        .unwrap();
    let mut tx = pools[0].begin().await.unwrap();
    assert!(matches!(
        guard_write(&mut tx, 1).await,
        Err(CutoverError::Route(RouteError::SlotFenced { slot: 1 }))
    ));
    drop(tx);
    Cutover::new(pools[0].clone(), pools[1].clone(), vec![1], 2, vec![table])
        .abort()
        .await
        .unwrap();
    let mut tx = pools[0].begin().await.unwrap();
    guard_write(&mut tx, 1).await.unwrap();
    // A slot no database here ever owned: refused as moved (reload the map).
    assert!(matches!(
        guard_write(&mut tx, 4000).await,
        Err(CutoverError::Route(RouteError::SlotMoved {
            slot: 4000,
            ..
        }))
    ));
}

/// `run()` again picks up wherever an earlier run stopped after its fence: inside its switch
/// (the target took the slots, the source still has them fenced), where a write made on the
/// target under the new map must survive; and after the switch, where only the release is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_a_cutover_again_after_its_switch_began_keeps_the_targets_writes() {
    let (_clusters, pools) = shards(2).await;
    for p in &pools {
        sqlx::query(
            "CREATE TABLE t (id bigint PRIMARY KEY, slot integer NOT NULL, price bigint NOT NULL)",
        )
        .execute(p)
        .await
        .unwrap();
    }
    install(&pools[0], &[1, 2, 3], 1).await.unwrap();
    sqlx::query("INSERT INTO t SELECT g, g % 3 + 1, g FROM generate_series(0, 299) g")
        .execute(&pools[0])
        .await
        .unwrap();
    // The state a run leaves when its process dies between the two halves of its switch: rows
    // copied, the target owning slots 1 and 2 at version 2, the source still fencing them.
    let rows: Vec<(i64, i32, i64)> =
        sqlx::query_as("SELECT id, slot, price FROM t WHERE slot IN (1, 2)")
            .fetch_all(&pools[0])
            .await
            .unwrap();
    for (id, slot, price) in &rows {
        sqlx::query("INSERT INTO t VALUES ($1, $2, $3)")
            .bind(id)
            .bind(slot)
            .bind(price)
            .execute(&pools[1])
            .await
            .unwrap();
    }
    install(&pools[1], &[1, 2], 2).await.unwrap();
    sqlx::query("UPDATE stanchion_slot_owner SET state = 'fenced' WHERE slot IN (1, 2)")
        .execute(&pools[0])
        .await
        .unwrap();
    // A writer that already has map version 2 writes on the target.
    let mut tx = pools[1].begin().await.unwrap();
    guard_write(&mut tx, 2).await.unwrap();
    sqlx::query("UPDATE t SET price = -7 WHERE id = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let table = MovedTable::new("t", "id", "slot").unwrap();
    let cutover = Cutover::new(
        pools[0].clone(),
        pools[1].clone(),
        vec![1, 2],
        2,
        vec![table],
    );
    let report = cutover.run().await.unwrap();
    assert_eq!(report.released, rows.len() as u64);
    let price: i64 = sqlx::query_scalar("SELECT price FROM t WHERE id = 1")
        .fetch_one(&pools[1])
        .await
        .unwrap();
    assert_eq!(price, -7, "the target's write survived");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM t WHERE slot IN (1, 2)")
        .fetch_one(&pools[0])
        .await
        .unwrap();
    assert_eq!(left, 0);
    let mut tx = pools[0].begin().await.unwrap();
    assert!(matches!(
        guard_write(&mut tx, 1).await,
        Err(CutoverError::Route(RouteError::SlotMoved {
            version: 2,
            ..
        }))
    ));
    drop(tx);
    // Once more, with the switch done: only the release runs, and finds nothing.
    assert_eq!(cutover.run().await.unwrap().released, 0);
    // A source that still owns its slots goes through every step whatever the target says.
    let slot3 = Cutover::new(
        pools[0].clone(),
        pools[1].clone(),
        vec![3],
        3,
        vec![MovedTable::new("t", "id", "slot").unwrap()],
    );
    install(&pools[1], &[3], 3).await.unwrap();
    let report = slot3.run().await.unwrap();
    assert_eq!(report.released, 100);
    let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM t WHERE slot = 3")
        .fetch_one(&pools[1])
        .await
        .unwrap();
    assert_eq!(moved, 100, "copied, not assumed");
}

/// Every process of a fleet installs the directory and ownership tables when it starts: all
/// at once, on a fresh database, each install succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_installing_the_tables_at_once_all_succeed() {
    use stanchion_shard_router::directory::Directory;
    let cluster = PostgresCluster::start(0).unwrap();
    for _ in 0..5 {
        let db = cluster.create_database().unwrap();
        let mut pools = Vec::new();
        for _ in 0..8 {
            pools.push(
                PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&db.primary_url)
                    .await
                    .unwrap(),
            );
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(pools.len()));
        let tasks: Vec<_> = pools
            .into_iter()
            .map(|pool| {
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    let dir = Directory::new(
                        pool.clone(),
                        10,
                        Duration::from_secs(60),
                        Duration::from_secs(60),
                    )
                    .unwrap();
                    barrier.wait().await;
                    let directory = dir.install().await.map_err(|e| e.to_string());
                    let owners = install(&pool, &[1, 2], 1).await.map_err(|e| e.to_string());
                    (directory, owners)
                })
            })
            .collect();
        for t in tasks {
            let (directory, owners) = t.await.unwrap();
            assert!(directory.is_ok(), "{directory:?}");
            assert!(owners.is_ok(), "{owners:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_pins_keys_from_a_table_and_caches_hits_and_misses_within_bounds() {
    use stanchion_shard_router::directory::{Directory, DirectoryError};
    let cluster = PostgresCluster::start(0).unwrap();
    let pool = pool(&cluster, 4).await;
    let router =
        ShardRouter::new(ShardMap::uniform(64, 4).unwrap(), vec!["a", "b", "c", "d"]).unwrap();
    let dir = Directory::new(
        pool.clone(),
        50,
        Duration::from_secs(60),
        Duration::from_millis(300),
    )
    .unwrap();
    dir.install().await.unwrap();
    // A key nobody pinned follows its slot.
    let hashed = router.route(Key::from("tenant-9"));
    assert_eq!(
        dir.route(&router, Key::from("tenant-9"))
            .await
            .unwrap()
            .shard,
        hashed.shard
    );
    // Pinned through this directory: seen at once.
    let other = (hashed.shard + 1) % 4;
    dir.pin(Key::from("tenant-9"), other).await.unwrap();
    assert_eq!(
        dir.route(&router, Key::from("tenant-9"))
            .await
            .unwrap()
            .target,
        ["a", "b", "c", "d"][other as usize]
    );
    // Pinned by another process (straight into the table): a cached miss hides it until the
    // miss TTL passes, then it is seen.
    assert_eq!(dir.lookup(Key::Int(77)).await.unwrap(), None);
    sqlx::query("INSERT INTO stanchion_shard_directory (key, shard) VALUES ('i:77', 2)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        dir.lookup(Key::Int(77)).await.unwrap(),
        None,
        "a cached miss"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(dir.lookup(Key::Int(77)).await.unwrap(), Some(2));
    // A shard the map does not have is an error, not a panic or a wrong route.
    sqlx::query("INSERT INTO stanchion_shard_directory (key, shard) VALUES ('t:ghost', 9)")
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        dir.route(&router, Key::from("ghost")).await,
        Err(DirectoryError::UnknownShard { shard: 9 })
    ));
    // Bounded: 1,000 distinct lookups keep at most 50 hits and 50 misses.
    for i in 0..1000_i64 {
        dir.lookup(Key::Int(10_000 + i)).await.unwrap();
    }
    assert!(dir.cached() <= 100, "{} cached", dir.cached());
    // The database gone: a lookup that misses the cache is an error, a cached hit still answers.
    let mut cluster = cluster;
    cluster.kill(Node::Primary).unwrap();
    assert_eq!(
        dir.lookup(Key::from("tenant-9")).await.unwrap(),
        Some(other)
    );
    assert!(matches!(
        dir.lookup(Key::Int(-1)).await,
        Err(DirectoryError::Db(_))
    ));
}
