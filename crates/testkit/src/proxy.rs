//! A fault-injecting TCP proxy for loopback: latency, blackhole, connection reset.

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::error::{Result, TestkitError};

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fault {
    /// Forward bytes as they come.
    #[default]
    None,
    /// Delay every chunk, in both directions, by this long (throughput is kept).
    Latency(Duration),
    /// Accept connections and read nothing, forward nothing, answer nothing, until the fault is
    /// cleared; then forwarding resumes where it stopped (like a network partition that heals,
    /// TCP's retransmissions included).
    Blackhole,
    /// Reset (TCP RST) every open connection, and every new one as soon as it is accepted.
    Reset,
}

/// A TCP proxy on a free loopback port in front of `upstream`, whose behaviour can be changed
/// while connections are open. Runs on its own thread with its own tokio runtime, so it works
/// from sync and async tests alike; stops on drop.
///
/// ```no_run
/// use std::time::Duration;
/// use stanchion_testkit::{Fault, FaultProxy, RedisServer};
/// let redis = RedisServer::start()?;
/// let proxy = FaultProxy::start(redis.addr())?;
/// let url = format!("redis://{}/", proxy.addr()); // clients connect here
/// proxy.set(Fault::Latency(Duration::from_millis(50)));
/// proxy.set(Fault::Blackhole);
/// proxy.set(Fault::None);
/// # Ok::<(), stanchion_testkit::TestkitError>(())
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: Arc<std::sync::RwLock<SocketAddr>>,
    fault: watch::Sender<Fault>,
    accepted: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream())
            .field("fault", &*self.fault.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// Starts forwarding from a free loopback port to `upstream` (which must be on loopback).
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        if !upstream.ip().is_loopback() {
            return Err(TestkitError::Usage(format!(
                "the fault proxy only forwards to loopback addresses, not {upstream}"
            )));
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| TestkitError::io("binding the fault proxy", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| TestkitError::io("configuring the fault proxy socket", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("reading the fault proxy address", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestkitError::io("building the fault proxy runtime", e))?;
        let (fault, fault_rx) = watch::channel(Fault::None);
        let (stop, stop_rx) = oneshot::channel();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let upstream = Arc::new(std::sync::RwLock::new(upstream));
        let target = Arc::clone(&upstream);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        () = accept_loop(listener, target, fault_rx, counter) => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime aborts every connection task and closes its sockets.
            })
            .map_err(|e| TestkitError::io("spawning the fault proxy thread", e))?;
        Ok(Self {
            addr,
            upstream,
            fault,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address traffic is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        match self.upstream.read() {
            Ok(a) => *a,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Sends new connections to another server (on loopback) from now on; open ones stay
    /// where they are. With [`Fault::Reset`] first, this is what a client sees when the server
    /// behind an address is replaced: its connections end, and the next ones reach a server
    /// that may know less.
    pub fn retarget(&self, upstream: SocketAddr) -> Result<()> {
        if !upstream.ip().is_loopback() {
            return Err(TestkitError::Usage(format!(
                "the fault proxy only forwards to loopback addresses, not {upstream}"
            )));
        }
        match self.upstream.write() {
            Ok(mut a) => *a = upstream,
            Err(poisoned) => *poisoned.into_inner() = upstream,
        }
        Ok(())
    }

    /// Changes the fault; open connections follow at once.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// How many client connections were accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Arc<std::sync::RwLock<SocketAddr>>,
    fault: watch::Receiver<Fault>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let target = match upstream.read() {
            Ok(a) => *a,
            Err(poisoned) => *poisoned.into_inner(),
        };
        tokio::spawn(connection(client, target, fault.clone()));
    }
}

fn reset(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let _ = sock.set_linger(Some(Duration::ZERO));
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut fault: watch::Receiver<Fault>) {
    // Hold new connections while blackholed; reset them while resetting.
    loop {
        let current = *fault.borrow_and_update();
        match current {
            Fault::Blackhole => {
                if fault.changed().await.is_err() {
                    return;
                }
            }
            Fault::Reset => {
                reset(&client);
                return;
            }
            _ => break,
        }
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    let client = Arc::new(client);
    let server = Arc::new(server);
    let up = pump(Arc::clone(&client), Arc::clone(&server), fault.clone());
    let down = pump(Arc::clone(&server), Arc::clone(&client), fault.clone());
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut down_done = false;
    while !(up_done && down_done) {
        let outcome = tokio::select! {
            o = &mut up, if !up_done => { up_done = true; o }
            o = &mut down, if !down_done => { down_done = true; o }
        };
        if outcome == Outcome::Reset {
            reset(&client);
            reset(&server);
            return;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Closed,
    Reset,
}

/// Copies `from` to `to`, delaying each chunk by the latency in force when it was read.
async fn pump(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    mut fault: watch::Receiver<Fault>,
) -> Outcome {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let writer = {
        let to = Arc::clone(&to);
        async move {
            while let Some((due, chunk)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if write_all(&to, &chunk).await.is_err() {
                    return;
                }
            }
            let _ = socket2::SockRef::from(&*to).shutdown(Shutdown::Write);
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let current = *fault.borrow_and_update();
            let latency = match current {
                Fault::Reset => return Outcome::Reset,
                Fault::Blackhole => {
                    if fault.changed().await.is_err() {
                        return Outcome::Closed;
                    }
                    continue;
                }
                Fault::Latency(d) => d,
                Fault::None => Duration::ZERO,
            };
            tokio::select! {
                // A fault change and data arriving together: the change goes first, so a fault
                // set before bytes were sent applies to those bytes.
                biased;
                changed = fault.changed() => {
                    if changed.is_err() {
                        return Outcome::Closed;
                    }
                }
                read = read_some(&from, &mut buf) => match read {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(n) => {
                        if tx.send((Instant::now() + latency, buf[..n].to_vec())).await.is_err() {
                            return Outcome::Closed;
                        }
                    }
                },
            }
        }
    };
    let writer = tokio::spawn(writer);
    let outcome = reader.await;
    if outcome == Outcome::Reset {
        writer.abort();
    } else {
        // Let queued chunks go out, then the writer half-closes `to`.
        let _ = writer.await;
    }
    outcome
}

async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
