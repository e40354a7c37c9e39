//! The L2 seam: where entries live between processes, and the bus that carries invalidations.

use std::future::Future;

use tokio::sync::broadcast;

use crate::error::StoreError;

/// The condition of a conditional write ([`CacheStore::set`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// Write only if the key holds nothing.
    Absent,
    /// Write only if the key holds the entry with this stamp (the one read before loading).
    Stamp(u64),
}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusEvent {
    /// A message some instance published.
    Message(Vec<u8>),
    /// The subscriber is (again) listening. Messages published before may have been missed:
    /// process-memory copies are suspect.
    Connected,
    /// Messages may have been lost (the connection dropped, or the subscriber fell behind):
    /// process-memory copies are suspect.
    Lost,
}

/// A stream of [`BusEvent`]s.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<BusEvent>,
    connected: bool,
}

impl Subscription {
    /// Wraps a broadcast receiver; a receiver that lags behind reports [`BusEvent::Lost`].
    /// `connected_now`: the first event is [`BusEvent::Connected`] (a bus that is listening
    /// from the start, as in process memory).
    pub fn new(rx: broadcast::Receiver<BusEvent>, connected_now: bool) -> Self {
        Self {
            rx,
            connected: connected_now,
        }
    }

    /// The next event; `None` once the store is gone.
    pub async fn recv(&mut self) -> Option<BusEvent> {
        if std::mem::take(&mut self.connected) {
            return Some(BusEvent::Connected);
        }
        match self.rx.recv().await {
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(BusEvent::Lost),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// The second tier: entries shared by every instance, leases that let one instance load a key
/// while the others wait, and a publish/subscribe bus for invalidations.
///
/// Keys arrive complete (prefix, namespace and generation included); values are opaque bytes.
/// [`crate::MemoryCacheStore`] keeps everything in the process (clones share it, so several
/// caches in one test behave like instances); `RedisCacheStore` (feature `redis`) is the
/// production implementation.
///
/// ```
/// use stanchion_tiered_cache::{CacheStore, Expect, MemoryCacheStore};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = MemoryCacheStore::new();
/// assert!(store.set("k", b"v".to_vec(), 1_000, Expect::Absent).await?);
/// assert!(!store.set("k", b"w".to_vec(), 1_000, Expect::Absent).await?);
/// assert_eq!(store.get_many(&["k".into()]).await?, vec![Some(b"v".to_vec())]);
/// # Ok::<(), stanchion_tiered_cache::StoreError>(()) }).unwrap();
/// ```
pub trait CacheStore: Send + Sync + 'static {
    /// The values of `keys`, in order (one round trip where the store allows).
    fn get_many(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, StoreError>> + Send;

    /// Writes `value` for `ttl_ms` if `expect` holds; says whether it wrote. For [`Expect::Stamp`]
    /// the stamp is bytes 3 to 11 of the current value (the entry header), zero-padded
    /// when the value is shorter.
    fn set(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl_ms: u64,
        expect: Expect,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Writes every entry unconditionally.
    fn set_many(
        &self,
        entries: Vec<(String, Vec<u8>, u64)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A counter's value (0 when absent).
    fn counter(&self, key: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Adds one to a counter and returns the new value.
    fn incr(&self, key: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Sets a counter to `value` if that is more than it holds (atomically) and returns what
    /// it holds afterwards.
    fn raise(&self, key: &str, value: u64) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Takes the lease `key` for `ttl_ms` if nobody holds it.
    fn try_lease(
        &self,
        key: &str,
        token: u64,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives the lease back if `token` still holds it.
    fn release_lease(
        &self,
        key: &str,
        token: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Sends `message` to every subscriber, this instance's included.
    fn publish(&self, message: Vec<u8>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Subscribes to the bus. The subscription starts with nothing lost.
    fn subscribe(&self) -> Subscription;
}
