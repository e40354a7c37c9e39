//! `nats-server` with JetStream on loopback.

use std::fmt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::error::{Result, TestkitError};
use crate::process::{base_dir, find_binary, free_port, log_tail, signal, stop_child, wait_until};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `nats-server` process with JetStream enabled (file storage in its temporary directory), on
/// a free loopback port. Killed and removed on drop, and by a watchdog if the test process dies.
/// A restart keeps the JetStream storage, as a real server's disk would.
///
/// ```no_run
/// let mut server = stanchion_testkit::NatsServer::start()?;
/// let url = server.url(); // nats://127.0.0.1:PORT
/// server.pause()?; // SIGSTOP: connections stay open, nothing is answered
/// server.resume()?;
/// server.kill()?;
/// server.restart()?;
/// # Ok::<(), stanchion_testkit::TestkitError>(())
/// ```
pub struct NatsServer {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    monitor_port: u16,
    child: Option<Child>,
    _base: tempfile::TempDir,
}

impl fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsServer")
            .field("port", &self.port)
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl NatsServer {
    /// Starts a server and waits until JetStream reports healthy.
    pub fn start() -> Result<Self> {
        let binary = find_binary("nats-server", "nats-server")?;
        let base = base_dir("stanchion-nats-")?;
        let dir = base.path().to_path_buf();
        let mut server = Self {
            binary,
            dir,
            port: free_port()?,
            monitor_port: free_port()?,
            child: None,
            _base: base,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.join("nats.log");
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.join("jetstream"))
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TestkitError::io("spawning nats-server", e))?;
        self.child = Some(child);
        let monitor = self.monitor_port;
        let mut child = self.child.as_mut();
        wait_until(
            &format!("nats-server on port {}", self.port),
            READY_TIMEOUT,
            || {
                if let Some(child) = child.as_deref_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    return Err(format!("exited with {status}; log: {}", log_tail(&log)));
                }
                healthy(monitor)
            },
        )
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same JetStream storage.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// Freezes the server with SIGSTOP.
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
                "nats-server on port {} is not running",
                self.port
            ))),
        }
    }
}

/// `GET /healthz` on the monitoring port answers 200 once JetStream is ready.
fn healthy(monitor_port: u16) -> std::result::Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", monitor_port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    if reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(reply.lines().next().unwrap_or("no reply").to_owned())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), Signal::SIGCONT);
            stop_child(&mut child, Signal::SIGKILL, Duration::from_secs(1));
        }
    }
}
