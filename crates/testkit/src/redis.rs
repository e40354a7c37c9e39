//! `redis-server` on loopback: single servers and a three-master Redis Cluster.

use std::fmt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::error::{Result, TestkitError};
use crate::process::{base_dir, find_binary, free_port, log_tail, signal, stop_child, wait_until};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for a [`RedisServer`].
///
/// ```no_run
/// let server = stanchion_testkit::RedisServer::builder().password("s3cret").start()?;
/// assert!(server.url().contains("s3cret"));
/// # Ok::<(), stanchion_testkit::TestkitError>(())
/// ```
#[derive(Debug, Default, Clone)]
#[must_use]
pub struct RedisServerBuilder {
    password: Option<String>,
}

impl RedisServerBuilder {
    /// Requires clients to authenticate with this password (`requirepass`).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Starts the server and waits until it answers `PING`.
    pub fn start(self) -> Result<RedisServer> {
        let base = Arc::new(base_dir("stanchion-redis-")?);
        RedisServer::start_in(base, "node", self.password, None)
    }
}

/// A `redis-server` process on a free loopback port, with no persistence, in a temporary
/// directory. It is killed and its directory removed on drop, and by a watchdog when the test
/// process dies without running destructors.
///
/// ```no_run
/// let mut server = stanchion_testkit::RedisServer::start()?;
/// let mut conn = server.connection()?;
/// let pong: String = redis::cmd("PING").query(&mut conn).unwrap();
/// assert_eq!(pong, "PONG");
/// server.pause()?; // SIGSTOP: the server hangs, clients time out
/// server.resume()?;
/// # Ok::<(), stanchion_testkit::TestkitError>(())
/// ```
pub struct RedisServer {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    cluster_port: Option<u16>,
    /// `cluster-node-timeout` in milliseconds (cluster nodes only).
    node_timeout_ms: u32,
    password: Option<String>,
    child: Option<Child>,
    _base: Arc<tempfile::TempDir>,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("cluster_port", &self.cluster_port)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl RedisServer {
    /// Starts a server without a password.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// Options for a new server.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// A server shared by every test of this test binary. Use a key prefix per test.
    pub fn shared() -> Result<&'static RedisServer> {
        static SHARED: OnceLock<std::result::Result<RedisServer, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| RedisServer::start().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| {
                TestkitError::Usage(format!("the shared Redis server failed to start: {e}"))
            })
    }

    fn start_in(
        base: Arc<tempfile::TempDir>,
        name: &str,
        password: Option<String>,
        cluster_node_timeout_ms: Option<u32>,
    ) -> Result<Self> {
        let binary = find_binary("redis-server", "redis-server")?;
        let dir = base.path().join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| TestkitError::io(format!("creating {}", dir.display()), e))?;
        let mut server = Self {
            binary,
            dir,
            port: free_port()?,
            cluster_port: match cluster_node_timeout_ms {
                Some(_) => Some(free_port()?),
                None => None,
            },
            node_timeout_ms: cluster_node_timeout_ms.unwrap_or(5000),
            password,
            child: None,
            _base: base,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.join("redis.log");
        let mut command = Command::new(&self.binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--databases", "16"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--pidfile")
            .arg(self.dir.join("redis.pid"))
            .arg("--logfile")
            .arg(&log);
        if let Some(password) = &self.password {
            command.arg("--requirepass").arg(password);
        }
        if let Some(cluster_port) = self.cluster_port {
            command
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout"])
                .arg(self.node_timeout_ms.to_string())
                .arg("--cluster-port")
                .arg(cluster_port.to_string())
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"));
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command
            .spawn()
            .map_err(|e| TestkitError::io("spawning redis-server", e))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let url = self.url();
        let log = self.dir.join("redis.log");
        let port = self.port;
        let child = self.child.as_mut();
        let mut child = child;
        wait_until(
            &format!("redis-server on port {port}"),
            READY_TIMEOUT,
            || {
                if let Some(child) = child.as_deref_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    return Err(format!("exited with {status}; log: {}", log_tail(&log)));
                }
                ping(&url).map_err(|e| format!("{e}; log: {}", log_tail(&log)))
            },
        )
    }

    /// `redis://127.0.0.1:PORT/` (with the password in it when one is set).
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for the fault proxy.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The password, when one was set.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// A synchronous connection (1 s connect timeout), for test set-up.
    pub fn connection(&self) -> Result<redis::Connection> {
        connect(&self.url()).map_err(|source| TestkitError::Redis {
            what: format!("connecting to port {}", self.port),
            source,
        })
    }

    /// Kills the server (SIGKILL). Clients see connection errors until [`restart`](Self::restart).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // A paused process would not die before SIGCONT on some kernels' accounting; resume first.
            let _ = signal(child.id(), Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("redis.pid"));
        Ok(())
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill); kills first if needed).
    /// Data is not kept: persistence is off.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// Freezes the server with SIGSTOP: connections stay open, nothing is answered.
    pub fn pause(&self) -> Result<()> {
        self.send(Signal::SIGSTOP)
    }

    /// Resumes a paused server with SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.send(Signal::SIGCONT)
    }

    /// Whether the process is running (it may be paused).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn send(&self, sig: Signal) -> Result<()> {
        match &self.child {
            Some(child) => signal(child.id(), sig),
            None => Err(TestkitError::Usage(format!(
                "redis-server on port {} is not running",
                self.port
            ))),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), Signal::SIGCONT);
            stop_child(&mut child, Signal::SIGKILL, Duration::from_secs(1));
        }
        let _ = std::fs::remove_file(self.dir.join("redis.pid"));
    }
}

fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(url)?;
    let conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}

/// The text a command such as `INFO replication` or `CLUSTER INFO` answers on `url`.
fn info_text(url: &str, command: &[&str]) -> std::result::Result<String, String> {
    let mut conn = connect(url).map_err(|e| e.to_string())?;
    let mut cmd = redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut conn).map_err(|e| e.to_string())
}

/// Whether `text` (an info reply) has the line `line`.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

fn ping(url: &str) -> std::result::Result<(), String> {
    let mut conn = connect(url).map_err(|e| e.to_string())?;
    let pong: String = redis::cmd("PING")
        .query(&mut conn)
        .map_err(|e| e.to_string())?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(format!("unexpected PING reply {pong:?}"))
    }
}

/// A Redis Cluster of three or more masters, each a [`RedisServer`], ready when every node
/// reports `cluster_state:ok` and knows every other node. [`start`](Self::start) makes masters
/// only; [`start_with_replicas`](Self::start_with_replicas) gives each master a replica that
/// takes over when the master is killed.
///
/// ```no_run
/// let cluster = stanchion_testkit::RedisCluster::start(3)?;
/// assert_eq!(cluster.urls().len(), 3);
/// # Ok::<(), stanchion_testkit::TestkitError>(())
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    /// Masters first, then their replicas in the same order.
    nodes: Vec<RedisServer>,
    masters: usize,
}

/// The number of hash slots in Redis Cluster.
pub const CLUSTER_SLOTS: u16 = 16384;

impl RedisCluster {
    /// Starts `masters` nodes (at least 3) and splits the hash slots evenly between them.
    pub fn start(masters: usize) -> Result<Self> {
        if masters < 3 {
            return Err(TestkitError::Usage(format!(
                "a Redis Cluster needs at least 3 masters, got {masters}"
            )));
        }
        let base = Arc::new(base_dir("stanchion-redis-cluster-")?);
        let nodes = (0..masters)
            .map(|i| {
                RedisServer::start_in(Arc::clone(&base), &format!("node{i}"), None, Some(5000))
            })
            .collect::<Result<Vec<_>>>()?;
        let cluster = Self { nodes, masters };
        cluster.assign_slots()?;
        cluster.wait_ok()?;
        Ok(cluster)
    }

    /// Starts `masters` masters (at least 3) and one replica of each, with a node timeout of
    /// one second: when a master is killed, its replica is promoted within a few seconds
    /// (nodes `masters..2 * masters` are the replicas, in the masters' order).
    ///
    /// ```no_run
    /// let mut cluster = stanchion_testkit::RedisCluster::start_with_replicas(3)?;
    /// cluster.node_mut(0).unwrap().kill()?; // node 3, its replica, takes over
    /// cluster.wait_for_failover(0)?;
    /// # Ok::<(), stanchion_testkit::TestkitError>(())
    /// ```
    pub fn start_with_replicas(masters: usize) -> Result<Self> {
        if masters < 3 {
            return Err(TestkitError::Usage(format!(
                "a Redis Cluster needs at least 3 masters, got {masters}"
            )));
        }
        let base = Arc::new(base_dir("stanchion-redis-cluster-")?);
        let nodes = (0..2 * masters)
            .map(|i| {
                RedisServer::start_in(Arc::clone(&base), &format!("node{i}"), None, Some(1000))
            })
            .collect::<Result<Vec<_>>>()?;
        let cluster = Self { nodes, masters };
        cluster.assign_slots()?;
        cluster.wait_ok()?;
        for i in 0..masters {
            let mut master = cluster.nodes[i].connection()?;
            let id: String = redis::cmd("CLUSTER")
                .arg("MYID")
                .query(&mut master)
                .map_err(|source| TestkitError::Redis {
                    what: format!("reading node {i}'s id"),
                    source,
                })?;
            let mut replica = cluster.nodes[masters + i].connection()?;
            redis::cmd("CLUSTER")
                .arg("REPLICATE")
                .arg(&id)
                .query::<()>(&mut replica)
                .map_err(|source| TestkitError::Redis {
                    what: format!("making node {} a replica of node {i}", masters + i),
                    source,
                })?;
        }
        for i in 0..masters {
            let url = cluster.nodes[masters + i].url();
            wait_until(
                &format!("replica node {} in sync", masters + i),
                READY_TIMEOUT,
                || {
                    let info = info_text(&url, &["INFO", "replication"])?;
                    if has_line(&info, "master_link_status:up") {
                        Ok(())
                    } else {
                        Err("replication link not up yet".into())
                    }
                },
            )?;
        }
        cluster.wait_ok()?;
        Ok(cluster)
    }

    /// Waits until master `i`'s replica has been promoted (after `i` was killed) and the
    /// cluster reports `cluster_state:ok` again from the replica's side.
    pub fn wait_for_failover(&self, i: usize) -> Result<()> {
        let Some(replica) = self.nodes.get(self.masters + i) else {
            return Err(TestkitError::Usage(format!("master {i} has no replica")));
        };
        let url = replica.url();
        wait_until(
            &format!("node {} promoted", self.masters + i),
            Duration::from_secs(30),
            || {
                let info = info_text(&url, &["INFO", "replication"])?;
                let cluster = info_text(&url, &["CLUSTER", "INFO"])?;
                if has_line(&info, "role:master") && has_line(&cluster, "cluster_state:ok") {
                    Ok(())
                } else {
                    Err("not promoted yet".into())
                }
            },
        )
    }

    /// A cluster shared by every test of this test binary. Use a key prefix per test.
    pub fn shared() -> Result<&'static RedisCluster> {
        static SHARED: OnceLock<std::result::Result<RedisCluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| RedisCluster::start(3).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| {
                TestkitError::Usage(format!("the shared Redis Cluster failed to start: {e}"))
            })
    }

    fn assign_slots(&self) -> Result<()> {
        let count = self.masters;
        let slots = usize::from(CLUSTER_SLOTS);
        for (i, node) in self.nodes.iter().take(count).enumerate() {
            let first = i * slots / count;
            let last = (i + 1) * slots / count - 1;
            let mut conn = node.connection()?;
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query::<()>(&mut conn)
                .map_err(|source| TestkitError::Redis {
                    what: format!("assigning slots {first}-{last} to node {i}"),
                    source,
                })?;
        }
        let mut first = self.nodes[0].connection()?;
        for node in &self.nodes[1..] {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port)
                .arg(node.cluster_port.unwrap_or_default())
                .query::<()>(&mut first)
                .map_err(|source| TestkitError::Redis {
                    what: format!("introducing node on port {}", node.port),
                    source,
                })?;
        }
        Ok(())
    }

    fn wait_ok(&self) -> Result<()> {
        let expected = self.nodes.len();
        for node in &self.nodes {
            let url = node.url();
            wait_until(
                &format!("cluster node on port {}", node.port),
                READY_TIMEOUT,
                || {
                    let info = info_text(&url, &["CLUSTER", "INFO"])?;
                    let ok = has_line(&info, "cluster_state:ok");
                    let known = info
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("cluster_known_nodes:"))
                        .and_then(|n| n.parse::<usize>().ok());
                    if ok && known == Some(expected) {
                        Ok(())
                    } else {
                        Err(format!("not yet: {}", info.replace("\r\n", " ")))
                    }
                },
            )?;
        }
        Ok(())
    }

    /// Every node's URL (any of them serves as a seed for a cluster client).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, for fault injection on one of them.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Mutable access to node `i` (to kill or restart it).
    pub fn node_mut(&mut self, i: usize) -> Option<&mut RedisServer> {
        self.nodes.get_mut(i)
    }
}

/// A client connection to `url` that fails fast, as a cache's or a limiter's should: 200 ms to
/// connect, 500 ms per command, no retries (it reconnects on the next command after a failure).
pub async fn connection_manager(url: &str) -> redis::RedisResult<redis::aio::ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(200)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(0);
    redis::aio::ConnectionManager::new_with_config(client, config).await
}
