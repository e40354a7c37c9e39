//! Read-your-writes re-checked across operating-system processes, as a web fleet uses it: one
//! process writes and hands each write token on as text (as a cookie or header would carry it),
//! another process, with a router of its own that saw none of those writes, reads with the
//! tokens. One replica's replay is paused throughout, the other streams as usual.
//!
//! Every read sees its write; none goes to the paused replica; the streaming replica takes
//! reads it has caught up with, so the guarantee is not kept by sending everything to the
//! primary.
//!
//! It has its own `main` (no test harness): a child is this binary with `CHILD` set.

mod support;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use stanchion_replica_router::{Consistency, ReplicaRouter, Role, WriteToken};
use stanchion_testkit::PostgresCluster;
use stanchion_testkit::child::{self, KillOnDrop};

const CHILD: &str = "STANCHION_REPLICA_ROUTER_CHILD";
const PRIMARY: &str = "STANCHION_REPLICA_ROUTER_PRIMARY";
const R0: &str = "STANCHION_REPLICA_ROUTER_R0";
const R1: &str = "STANCHION_REPLICA_ROUTER_R1";

const WRITES: i64 = 200;

fn main() {
    let runtime = child::runtime();
    if let Ok(role) = std::env::var(CHILD) {
        runtime.block_on(async {
            let router = router().await;
            match role.as_str() {
                "writer" => writer(&router).await,
                "reader" => reader(&router).await,
                other => panic!("unknown role {other}"),
            }
            router.close().await;
        });
        return;
    }
    child::run_tests(&[(
        "a_token_written_in_one_process_is_honoured_by_another",
        &|| runtime.block_on(a_token_written_in_one_process_is_honoured_by_another()),
    )]);
}

/// A router over the nodes named in the environment, checking health every 100 ms.
async fn router() -> ReplicaRouter {
    let var = |k| std::env::var(k).unwrap();
    support::builder_for(&var(PRIMARY), [&var(R0), &var(R1)])
        .build()
        .await
        .unwrap()
}

async fn a_token_written_in_one_process_is_honoured_by_another() {
    let cluster = PostgresCluster::start(2).unwrap();
    let db = support::setup(&cluster).await;
    cluster.pause_replay(0).unwrap();
    let child = |role: &str| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.env(CHILD, role)
            .env(PRIMARY, &db.primary_url)
            .env(R0, &db.replica_urls[0])
            .env(R1, &db.replica_urls[1]);
        c
    };
    let mut writer = KillOnDrop(child("writer").stdout(Stdio::piped()).spawn().unwrap());
    let tokens = writer.0.stdout.take().unwrap();
    let mut reader = KillOnDrop(
        child("reader")
            .stdin(Stdio::from(tokens))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let report = reader.0.stdout.take().unwrap();
    let lines: Vec<String> = std::io::BufReader::new(report)
        .lines()
        .map(Result::unwrap)
        .collect();
    assert!(writer.0.wait().unwrap().success(), "the writer failed");
    assert!(reader.0.wait().unwrap().success(), "the reader failed");
    cluster.resume_replay(0).unwrap();
    let summary = lines.last().expect("the reader's summary");
    println!("{summary}");
    let field = |name: &str| -> i64 {
        summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {summary:?}"))
    };
    assert_eq!(field("reads"), WRITES);
    assert_eq!(field("stale"), 0, "a read missed its write");
    assert_eq!(field("r0"), 0, "a read went to the paused replica");
    assert!(field("r1") > 0, "no read went to the streaming replica");
}

/// Writes `v = i` for i in 1..=WRITES, one transaction each, and prints `i token` per write.
async fn writer(router: &ReplicaRouter) {
    let mut out = std::io::stdout().lock();
    for i in 1..=WRITES {
        let mut tx = router.begin_write().await.unwrap();
        sqlx::query("UPDATE counters SET v = $1 WHERE id = 0")
            .bind(i)
            .execute(&mut *tx)
            .await
            .unwrap();
        let token = router.commit(tx).await.unwrap();
        writeln!(out, "{i} {token}").unwrap();
        out.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads each token from standard input and reads `v` with it: it must be at least `i`.
async fn reader(router: &ReplicaRouter) {
    let (mut reads, mut stale, mut r0, mut r1, mut primary) = (0, 0, 0, 0, 0);
    let mut input = std::io::stdin().lock();
    loop {
        let mut line = String::new();
        if tokio::task::block_in_place(|| input.read_line(&mut line)).unwrap() == 0 {
            break;
        }
        let (i, token) = line.trim().split_once(' ').unwrap();
        let i: i64 = i.parse().unwrap();
        let token: WriteToken = token.parse().unwrap();
        let mut conn = router.read(Consistency::AtLeast(token)).await.unwrap();
        let v: i64 = sqlx::query_scalar("SELECT v FROM counters WHERE id = 0")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        reads += 1;
        if v < i {
            stale += 1;
        }
        match (conn.route().role, conn.route().node.as_str()) {
            (Role::Primary, _) => primary += 1,
            (_, "r0") => r0 += 1,
            _ => r1 += 1,
        }
    }
    println!("reads={reads} stale={stale} r0={r0} r1={r1} primary={primary}");
}
