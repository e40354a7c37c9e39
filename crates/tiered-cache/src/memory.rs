//! An L2 store in process memory: the embedded default for examples, and a stand-in for Redis
//! where several caches in one process play several instances.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::entry::stamp_of;
use crate::error::StoreError;
use crate::store::{BusEvent, CacheStore, Expect, Subscription};

#[derive(Debug, Default)]
struct State {
    values: HashMap<String, (Vec<u8>, Instant)>,
    counters: HashMap<String, u64>,
    leases: HashMap<String, (u64, Instant)>,
    /// Entries left after the last sweep of expired ones.
    swept_to: usize,
}

/// Entries, leases and the bus in this process. Clones share everything. Expired entries are
/// dropped when read and when the map doubles past its last cleaned size.
///
/// ```
/// use stanchion_tiered_cache::{MemoryCacheStore, Policy, TieredCache};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = MemoryCacheStore::new();
/// let policy = Policy::builder(std::time::Duration::from_secs(60)).build()?;
/// let a = TieredCache::<u32, String, _>::builder("product", store.clone(), policy.clone()).build()?;
/// let b = TieredCache::<u32, String, _>::builder("product", store, policy).build()?;
/// a.insert(&1, "lamp".to_string()).await?;
/// assert_eq!(b.get(&1).await?, Some("lamp".to_string()));
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct MemoryCacheStore {
    state: Arc<Mutex<State>>,
    bus: broadcast::Sender<BusEvent>,
}

impl Default for MemoryCacheStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCacheStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            bus: broadcast::channel(4096).0,
        }
    }

    /// Entries held, expired ones included until they are cleaned.
    pub fn len(&self) -> usize {
        self.lock().values.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn live<'a>(state: &'a mut State, key: &str, now: Instant) -> Option<&'a Vec<u8>> {
        if state
            .values
            .get(key)
            .is_some_and(|(_, until)| *until <= now)
        {
            state.values.remove(key);
        }
        state.values.get(key).map(|(v, _)| v)
    }

    fn put(state: &mut State, key: String, value: Vec<u8>, ttl_ms: u64, now: Instant) {
        state
            .values
            .insert(key, (value, now + Duration::from_millis(ttl_ms.max(1))));
        let len = state.values.len();
        if len > 1024 && len > state.swept_to.saturating_mul(2) {
            state.values.retain(|_, (_, until)| *until > now);
            state.swept_to = state.values.len();
        }
    }
}

impl CacheStore for MemoryCacheStore {
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        Ok(keys
            .iter()
            .map(|k| Self::live(&mut state, k, now).cloned())
            .collect())
    }

    async fn set(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl_ms: u64,
        expect: Expect,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        let current = Self::live(&mut state, key, now);
        let ok = match expect {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Stamp(s) => current.map(|v| stamp_of(v)) == Some(s),
        };
        if ok {
            Self::put(&mut state, key.to_owned(), value, ttl_ms, now);
        }
        Ok(ok)
    }

    async fn set_many(&self, entries: Vec<(String, Vec<u8>, u64)>) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        for (k, v, ttl) in entries {
            Self::put(&mut state, k, v, ttl, now);
        }
        Ok(())
    }

    async fn counter(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self.lock().counters.get(key).copied().unwrap_or(0))
    }

    async fn incr(&self, key: &str) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let c = state.counters.entry(key.to_owned()).or_insert(0);
        *c = c.saturating_add(1);
        Ok(*c)
    }

    async fn raise(&self, key: &str, value: u64) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let c = state.counters.entry(key.to_owned()).or_insert(0);
        *c = (*c).max(value);
        Ok(*c)
    }

    async fn try_lease(&self, key: &str, token: u64, ttl_ms: u64) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.leases.get(key).is_some_and(|(_, until)| *until > now) {
            return Ok(false);
        }
        state.leases.insert(
            key.to_owned(),
            (token, now + Duration::from_millis(ttl_ms.max(1))),
        );
        Ok(true)
    }

    async fn release_lease(&self, key: &str, token: u64) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.leases.get(key).is_some_and(|(t, _)| *t == token) {
            state.leases.remove(key);
        }
        Ok(())
    }

    async fn publish(&self, message: Vec<u8>) -> Result<(), StoreError> {
        // No subscriber is not an error.
        let _ = self.bus.send(BusEvent::Message(message));
        Ok(())
    }

    fn subscribe(&self) -> Subscription {
        Subscription::new(self.bus.subscribe(), true)
    }
}
