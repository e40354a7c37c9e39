//! A PostgreSQL primary with streaming replicas on loopback.

use std::fmt;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::error::{Result, TestkitError};
use crate::process::{
    RunAs, base_dir, find_binary, free_port, log_tail, run, stop_child, wait_until,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const SUPERUSER: &str = "postgres";

/// A node of a [`PostgresCluster`], named by the role it was started with.
///
/// After [`PostgresCluster::promote`] the names keep pointing at the same servers: `Replica(0)`
/// may then be the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    /// The server made by `initdb`.
    Primary,
    /// The `i`-th server made by `pg_basebackup` (0-based).
    Replica(usize),
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Primary => f.write_str("primary"),
            Node::Replica(i) => write!(f, "replica{i}"),
        }
    }
}

/// Options for a [`PostgresCluster`].
///
/// ```no_run
/// let cluster = stanchion_testkit::PostgresCluster::builder()
///     .replicas(2)
///     .password("s3cret")
///     .start()?;
/// assert!(cluster.url(stanchion_testkit::Node::Primary).contains("s3cret"));
/// # Ok::<(), stanchion_testkit::TestkitError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PostgresClusterBuilder {
    replicas: usize,
    password: Option<String>,
}

impl Default for PostgresClusterBuilder {
    fn default() -> Self {
        Self {
            replicas: 2,
            password: None,
        }
    }
}

impl PostgresClusterBuilder {
    /// How many streaming replicas to start (default 2; 0 is a lone primary).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Requires a SCRAM password for TCP connections (including replication).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Runs `initdb`, starts the primary, clones each replica with `pg_basebackup`, starts them
    /// and waits until every replica streams.
    pub fn start(self) -> Result<PostgresCluster> {
        PostgresCluster::start_with(self)
    }
}

struct PgNode {
    node: Node,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

struct Binaries {
    postgres: PathBuf,
    initdb: PathBuf,
    basebackup: PathBuf,
    psql: PathBuf,
}

/// A PostgreSQL primary (from `initdb`) and N streaming replicas (from `pg_basebackup`), each a
/// `postgres` process on a free loopback port. Stopped and removed on drop, and by a watchdog if
/// the test process dies without running destructors.
///
/// When the tests run as root, the servers run as the `postgres` user.
///
/// ```no_run
/// use stanchion_testkit::{Node, PostgresCluster};
/// let cluster = PostgresCluster::start(2)?;
/// let db = cluster.create_database()?;
/// cluster.sql(Node::Primary, &db.name, "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")?;
/// cluster.wait_replayed(0, std::time::Duration::from_secs(5))?;
/// assert_eq!(cluster.sql(Node::Replica(0), &db.name, "SELECT count(*) FROM t")?, "1");
/// # Ok::<(), stanchion_testkit::TestkitError>(())
/// ```
pub struct PostgresCluster {
    bins: Binaries,
    run_as: Option<RunAs>,
    password: Option<String>,
    nodes: Vec<PgNode>,
    base: tempfile::TempDir,
}

impl fmt::Debug for PostgresCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresCluster")
            .field(
                "ports",
                &self
                    .nodes
                    .iter()
                    .map(|n| (n.node, n.port))
                    .collect::<Vec<_>>(),
            )
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dir", &self.base.path())
            .finish()
    }
}

/// A database created for one test, present on the primary and (once replayed) every replica.
#[derive(Clone, PartialEq, Eq)]
pub struct TestDatabase {
    /// The database name.
    pub name: String,
    /// URL of the database on the primary.
    pub primary_url: String,
    /// URLs of the database on each replica, in replica order.
    pub replica_urls: Vec<String>,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("replicas", &self.replica_urls.len())
            .finish_non_exhaustive()
    }
}

impl PostgresCluster {
    /// A primary with `replicas` streaming replicas, no password.
    pub fn start(replicas: usize) -> Result<Self> {
        Self::builder().replicas(replicas).start()
    }

    /// Options for a new cluster.
    pub fn builder() -> PostgresClusterBuilder {
        PostgresClusterBuilder::default()
    }

    /// A primary with two replicas shared by every test of this test binary. Give each test its
    /// own database with [`create_database`](Self::create_database), and do not inject faults
    /// into it: start a cluster of your own for that.
    pub fn shared() -> Result<&'static PostgresCluster> {
        static SHARED: OnceLock<std::result::Result<PostgresCluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| PostgresCluster::start(2).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| {
                TestkitError::Usage(format!(
                    "the shared PostgreSQL cluster failed to start: {e}"
                ))
            })
    }

    fn start_with(options: PostgresClusterBuilder) -> Result<Self> {
        let bins = Binaries {
            postgres: find_binary("postgres", "postgresql")?,
            initdb: find_binary("initdb", "postgresql")?,
            basebackup: find_binary("pg_basebackup", "postgresql")?,
            psql: find_binary("psql", "postgresql-client")?,
        };
        let run_as = RunAs::unprivileged()?;
        let base = base_dir("stanchion-pg-")?;
        if let Some(user) = run_as {
            user.chown(base.path())?;
        }
        let mut cluster = Self {
            bins,
            run_as,
            password: options.password,
            nodes: Vec::new(),
            base,
        };
        cluster.init_primary()?;
        for i in 0..options.replicas {
            cluster.add_replica(i)?;
        }
        cluster.wait_streaming()?;
        Ok(cluster)
    }

    fn pg_command(&self, program: &PathBuf) -> Command {
        let mut command = Command::new(program);
        if let Some(user) = self.run_as {
            user.apply(&mut command);
        }
        command.current_dir(self.base.path());
        command.env_remove("PGPASSWORD");
        if let Some(password) = &self.password {
            command.env("PGPASSWORD", password);
        }
        command
    }

    fn init_primary(&mut self) -> Result<()> {
        let data = self.base.path().join("primary");
        let mut command = self.pg_command(&self.bins.initdb);
        command.arg("-D").arg(&data).args([
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        if let Some(password) = &self.password {
            let pwfile = self.base.path().join("pwfile");
            std::fs::write(&pwfile, password)
                .map_err(|e| TestkitError::io("writing the password file", e))?;
            if let Some(user) = self.run_as {
                user.chown(&pwfile)?;
            }
            command
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"]);
        } else {
            command.arg("--auth=trust");
        }
        run("initdb", &mut command)?;
        let _ = std::fs::remove_file(self.base.path().join("pwfile"));
        let mut node = PgNode {
            node: Node::Primary,
            log: self.base.path().join("primary.log"),
            data,
            port: free_port()?,
            child: None,
        };
        self.spawn(&mut node)?;
        self.nodes.push(node);
        Ok(())
    }

    fn add_replica(&mut self, i: usize) -> Result<()> {
        let name = Node::Replica(i).to_string();
        let data = self.base.path().join(&name);
        let primary_port = self.nodes[0].port;
        let mut command = self.pg_command(&self.bins.basebackup);
        command
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                SUPERUSER,
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ])
            .arg("-p")
            .arg(primary_port.to_string())
            .arg("-D")
            .arg(&data);
        run(&format!("pg_basebackup for {name}"), &mut command)?;
        // Standby settings written by us rather than `-R`, so the password never lands in a file
        // we did not choose and the application name is known.
        let mut conninfo =
            format!("host=127.0.0.1 port={primary_port} user={SUPERUSER} application_name={name}");
        if let Some(password) = &self.password {
            conninfo.push_str(&format!(" password={}", quote_conninfo(password)));
        }
        let auto = data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!(
            "primary_conninfo = '{}'\n",
            conninfo.replace('\'', "''")
        ));
        std::fs::write(&auto, text).map_err(|e| TestkitError::io("writing standby settings", e))?;
        std::fs::write(data.join("standby.signal"), "")
            .map_err(|e| TestkitError::io("writing standby.signal", e))?;
        if let Some(user) = self.run_as {
            user.chown(&auto)?;
            user.chown(&data.join("standby.signal"))?;
        }
        let mut node = PgNode {
            node: Node::Replica(i),
            log: self.base.path().join(format!("{name}.log")),
            data,
            port: free_port()?,
            child: None,
        };
        self.spawn(&mut node)?;
        self.nodes.push(node);
        Ok(())
    }

    fn spawn(&self, node: &mut PgNode) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| TestkitError::io("opening the server log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| TestkitError::io("opening the server log", e))?;
        let mut command = self.pg_command(&self.bins.postgres);
        command
            .arg("-D")
            .arg(&node.data)
            .arg("-p")
            .arg(node.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "unix_socket_directories="])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=64MB"])
            .args(["-c", "wal_keep_size=512MB", "-c", "hot_standby_feedback=on"])
            .args(["-c", "wal_receiver_status_interval=1s"])
            .args(["-c", "max_standby_streaming_delay=-1"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = command
            .spawn()
            .map_err(|e| TestkitError::io(format!("spawning postgres for {}", node.node), e))?;
        node.child = Some(child);
        let port = node.port;
        let log = node.log.clone();
        let what = format!("postgres {} on port {port}", node.node);
        let child = node.child.as_mut();
        let mut child = child;
        wait_until(&what, READY_TIMEOUT, || {
            if let Some(child) = child.as_deref_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("exited with {status}; log: {}", log_tail(&log)));
            }
            self.sql_port(port, "postgres", "SELECT 1")
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn node(&self, node: Node) -> Result<&PgNode> {
        self.nodes
            .iter()
            .find(|n| n.node == node)
            .ok_or_else(|| TestkitError::Usage(format!("this cluster has no {node}")))
    }

    fn node_mut(&mut self, node: Node) -> Result<&mut PgNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.node == node)
            .ok_or_else(|| TestkitError::Usage(format!("this cluster has no {node}")))
    }

    /// Number of replicas started with the cluster.
    pub fn replica_count(&self) -> usize {
        self.nodes.len() - 1
    }

    /// The TCP port of a node.
    pub fn port(&self, node: Node) -> Result<u16> {
        Ok(self.node(node)?.port)
    }

    /// `postgres://postgres[:password]@127.0.0.1:PORT/postgres` for a node.
    pub fn url(&self, node: Node) -> String {
        self.url_for(node, "postgres")
    }

    /// The URL of `database` on a node.
    pub fn url_for(&self, node: Node, database: &str) -> String {
        let port = self.node(node).map(|n| n.port).unwrap_or_default();
        match &self.password {
            Some(password) => format!(
                "postgres://{SUPERUSER}:{}@127.0.0.1:{port}/{database}",
                percent_encode(password)
            ),
            None => format!("postgres://{SUPERUSER}@127.0.0.1:{port}/{database}"),
        }
    }

    /// Creates a fresh database (unique within this process) and waits until every running
    /// replica has replayed it.
    pub fn create_database(&self) -> Result<TestDatabase> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.sql(
            Node::Primary,
            "postgres",
            &format!("CREATE DATABASE {name}"),
        )?;
        for i in 0..self.replica_count() {
            if self.node(Node::Replica(i))?.child.is_some() {
                self.wait_replayed(i, READY_TIMEOUT)?;
            }
        }
        Ok(TestDatabase {
            primary_url: self.url_for(Node::Primary, &name),
            replica_urls: (0..self.replica_count())
                .map(|i| self.url_for(Node::Replica(i), &name))
                .collect(),
            name,
        })
    }

    /// Runs SQL through `psql` on a node and returns its unaligned, tuples-only output (trimmed).
    pub fn sql(&self, node: Node, database: &str, sql: &str) -> Result<String> {
        let port = self.node(node)?.port;
        self.sql_port(port, database, sql).map_err(|e| match e {
            TestkitError::Command { status, stderr, .. } => TestkitError::Command {
                what: format!("psql on {node}"),
                status,
                stderr,
            },
            other => other,
        })
    }

    fn sql_port(&self, port: u16, database: &str, sql: &str) -> Result<String> {
        let mut command = Command::new(&self.bins.psql);
        command
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", SUPERUSER])
            .arg("-p")
            .arg(port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .env("PGCONNECT_TIMEOUT", "2")
            .env_remove("PGPASSWORD");
        if let Some(password) = &self.password {
            command.env("PGPASSWORD", password);
        }
        run("psql", &mut command).map(|out| out.trim().to_owned())
    }

    /// Waits until every running replica is streaming from the primary.
    pub fn wait_streaming(&self) -> Result<()> {
        let expected: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.node != Node::Primary && n.child.is_some())
            .map(|n| n.node.to_string())
            .collect();
        if expected.is_empty() {
            return Ok(());
        }
        wait_until("replicas streaming", READY_TIMEOUT, || {
            let out = self
                .sql(
                    Node::Primary,
                    "postgres",
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                )
                .map_err(|e| e.to_string())?;
            let streaming: Vec<&str> = out.lines().collect();
            let missing: Vec<&String> = expected
                .iter()
                .filter(|name| !streaming.contains(&name.as_str()))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not streaming yet: {missing:?}"))
            }
        })
    }

    /// The primary's current WAL position (`pg_current_wal_lsn()`), as PostgreSQL prints it.
    pub fn current_wal_lsn(&self) -> Result<String> {
        self.sql(Node::Primary, "postgres", "SELECT pg_current_wal_lsn()")
    }

    /// Replica `i`'s replay position (`pg_last_wal_replay_lsn()`).
    pub fn replay_lsn(&self, i: usize) -> Result<String> {
        self.sql(
            Node::Replica(i),
            "postgres",
            "SELECT pg_last_wal_replay_lsn()",
        )
    }

    /// Bytes of WAL the primary has written that replica `i` has not replayed yet.
    pub fn replay_lag_bytes(&self, i: usize) -> Result<i64> {
        let replayed = self.replay_lsn(i)?;
        if !is_lsn(&replayed) {
            return Err(TestkitError::Usage(format!(
                "replica{i} reported no replay position ({replayed:?})"
            )));
        }
        let out = self.sql(
            Node::Primary,
            "postgres",
            &format!("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{replayed}')::bigint"),
        )?;
        out.parse::<i64>()
            .map_err(|_| TestkitError::Usage(format!("unexpected LSN difference {out:?}")))
    }

    /// Waits until replica `i` has replayed everything the primary had written when called.
    pub fn wait_replayed(&self, i: usize, timeout: Duration) -> Result<()> {
        let target = self.current_wal_lsn()?;
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
        wait_until(
            &format!("replica{i} replaying {target}"),
            timeout,
            || match self.sql(Node::Replica(i), "postgres", &sql) {
                Ok(out) if out == "t" => Ok(()),
                Ok(out) => Err(format!("replay position not reached ({out})")),
                Err(e) => Err(e.to_string()),
            },
        )
    }

    /// Pauses WAL replay on replica `i` (`pg_wal_replay_pause()`): it keeps receiving WAL but
    /// serves an ever older snapshot, a real and controlled replication lag.
    pub fn pause_replay(&self, i: usize) -> Result<()> {
        self.sql(Node::Replica(i), "postgres", "SELECT pg_wal_replay_pause()")
            .map(drop)
    }

    /// Resumes WAL replay on replica `i`.
    pub fn resume_replay(&self, i: usize) -> Result<()> {
        self.sql(
            Node::Replica(i),
            "postgres",
            "SELECT pg_wal_replay_resume()",
        )
        .map(drop)
    }

    /// Kills a node with SIGKILL (a crash, not a shutdown).
    pub fn kill(&mut self, node: Node) -> Result<()> {
        let pg = self.node_mut(node)?;
        if let Some(mut child) = pg.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Kills replica `i` with SIGKILL.
    pub fn kill_replica(&mut self, i: usize) -> Result<()> {
        self.kill(Node::Replica(i))
    }

    /// Starts a killed node again on the same port and data directory (a replica resumes
    /// streaming from where it was; see [`wait_streaming`](Self::wait_streaming)).
    pub fn restart(&mut self, node: Node) -> Result<()> {
        self.kill(node)?;
        let index = self
            .nodes
            .iter()
            .position(|n| n.node == node)
            .ok_or_else(|| TestkitError::Usage(format!("this cluster has no {node}")))?;
        let mut pg = std::mem::replace(
            &mut self.nodes[index],
            PgNode {
                node,
                data: PathBuf::new(),
                log: PathBuf::new(),
                port: 0,
                child: None,
            },
        );
        // A killed postmaster leaves its pid file; the new one checks it is stale and carries on.
        let result = self.spawn(&mut pg);
        self.nodes[index] = pg;
        result
    }

    /// Restarts replica `i` and waits until it streams again.
    pub fn restart_replica(&mut self, i: usize) -> Result<()> {
        self.restart(Node::Replica(i))?;
        self.wait_streaming()
    }

    /// Promotes replica `i` to a primary (`pg_promote()`) and waits until it accepts writes.
    /// The old primary keeps running (kill it to simulate its loss).
    pub fn promote(&self, i: usize) -> Result<()> {
        self.sql(Node::Replica(i), "postgres", "SELECT pg_promote(true, 60)")?;
        wait_until(
            &format!("replica{i} promoted"),
            READY_TIMEOUT,
            || match self.sql(Node::Replica(i), "postgres", "SELECT pg_is_in_recovery()") {
                Ok(out) if out == "f" => Ok(()),
                Ok(out) => Err(format!("still in recovery ({out})")),
                Err(e) => Err(e.to_string()),
            },
        )
    }

    /// Freezes a node with SIGSTOP: the postmaster and every process it started (backends,
    /// WAL receiver, background workers). Its sockets stay open, so clients see a hung server,
    /// not a refused connection: connections already open wait for answers that do not come,
    /// and new ones are accepted by the kernel and never greeted. Undo with
    /// [`resume`](Self::resume).
    pub fn pause(&self, node: Node) -> Result<()> {
        let pid = self.pid(node)?;
        crate::process::signal(pid, Signal::SIGSTOP)?;
        for child in children_of(pid) {
            // A child that exited meanwhile is not an error.
            let _ = crate::process::signal(child, Signal::SIGSTOP);
        }
        Ok(())
    }

    /// Resumes a node frozen by [`pause`](Self::pause) with SIGCONT.
    pub fn resume(&self, node: Node) -> Result<()> {
        let pid = self.pid(node)?;
        for child in children_of(pid) {
            let _ = crate::process::signal(child, Signal::SIGCONT);
        }
        crate::process::signal(pid, Signal::SIGCONT)
    }

    fn pid(&self, node: Node) -> Result<u32> {
        self.node(node)?
            .child
            .as_ref()
            .map(std::process::Child::id)
            .ok_or_else(|| TestkitError::Usage(format!("{node} is not running")))
    }

    /// Whether a node's process is running.
    pub fn is_running(&self, node: Node) -> bool {
        self.node(node).map(|n| n.child.is_some()).unwrap_or(false)
    }

    /// The end of a node's server log, for diagnosing a failed test.
    pub fn log_tail(&self, node: Node) -> Result<String> {
        Ok(log_tail(&self.node(node)?.log))
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        let start = Instant::now();
        // SIGQUIT is PostgreSQL's immediate shutdown: every backend exits at once.
        for node in self.nodes.iter_mut().rev() {
            if let Some(child) = &node.child {
                let _ = crate::process::signal(child.id(), Signal::SIGQUIT);
            }
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let grace = Duration::from_secs(5).saturating_sub(start.elapsed());
                stop_child(&mut child, Signal::SIGQUIT, grace);
            }
        }
    }
}

/// The processes whose parent is `pid` (from `/proc/*/stat`; empty where there is no `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    // The command name is in parentheses and may hold spaces: parse after it.
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn is_lsn(text: &str) -> bool {
    let mut parts = text.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= 8 && p.chars().all(|c| c.is_ascii_hexdigit()))
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_lsns() {
        assert!(is_lsn("0/3000060"));
        assert!(is_lsn("1A/FF"));
        assert!(!is_lsn(""));
        assert!(!is_lsn("0/"));
        assert!(!is_lsn("0/1'; DROP"));
        assert!(!is_lsn("0/1/2"));
    }

    #[test]
    fn encodes_passwords_for_urls() {
        assert_eq!(percent_encode("a b@c"), "a%20b%40c");
        assert_eq!(percent_encode("plain-1"), "plain-1");
    }
}
