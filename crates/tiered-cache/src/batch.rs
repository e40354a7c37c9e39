//! Batched loading: concurrent single-key misses within a short window go to the database as one
//! `load_many` call, so an N+1 pattern (a page of orders, then each line's product) becomes one
//! query per window.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::oneshot;

use crate::cache::TieredCache;
use crate::codec::Codec;
use crate::error::{BuildError, CacheError};
use crate::store::CacheStore;

/// The longest window a batch waits for more keys.
pub const MAX_BATCH_WINDOW: Duration = Duration::from_secs(1);
/// The most keys one `load_many` call may be given.
pub const MAX_BATCH_KEYS: usize = 10_000;

type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;
type LoadMany<K, V> = Arc<
    dyn Fn(Vec<K>) -> Pin<Box<dyn Future<Output = Result<HashMap<K, V>, SharedError>> + Send>>
        + Send
        + Sync,
>;
type Waiter<V> = oneshot::Sender<Result<Option<V>, BatchLoadError>>;

/// Why a batched load gave no value: the `load_many` call failed (its error, shared by every
/// key of the batch) or panicked. Reaches callers as [`CacheError::Load`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BatchLoadError {
    /// `load_many` returned an error.
    #[error("the batched load failed")]
    Failed(#[source] SharedError),
    /// `load_many` panicked.
    #[error("the batched load panicked")]
    Panicked,
}

struct Pending<K, V> {
    /// Increases with every batch sent, so a window's timer only sends its own batch.
    batch: u64,
    waiters: Vec<(K, Waiter<V>)>,
}

struct Shared<K, V> {
    load_many: LoadMany<K, V>,
    max_keys: usize,
    window: Duration,
    pending: Mutex<Pending<K, V>>,
}

/// Loads a cache's misses in batches: [`get`](Self::get) is
/// [`TieredCache::get_or_load`](crate::TieredCache::get_or_load) (single flight per key, the
/// lease across instances, cached "not found", stale values on failure) whose loader, instead
/// of querying for one key, joins the current batch. A batch is sent to `load_many` when it
/// holds `max_keys` keys or `window` after its first key, whichever comes first. Made by
/// [`TieredCache::batch_loader`](crate::TieredCache::batch_loader); clones share the batches.
///
/// ```
/// # use std::{collections::HashMap, time::Duration};
/// # use stanchion_tiered_cache::{MemoryCacheStore, Policy, TieredCache};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// # let policy = Policy::builder(Duration::from_secs(60)).build()?;
/// let products = TieredCache::<u64, String, _>::builder("product", MemoryCacheStore::new(), policy).build()?;
/// let loader = products.batch_loader(64, Duration::from_millis(2), |ids: Vec<u64>| async move {
///     // SELECT id, name FROM products WHERE id = ANY($1)
///     Ok::<_, std::io::Error>(ids.into_iter().map(|id| (id, format!("product {id}"))).collect::<HashMap<_, _>>())
/// })?;
/// let names = futures_util::future::join_all((1..=3).map(|id| {
///     let loader = loader.clone();
///     async move { loader.get(&id).await }
/// }))
/// .await;
/// assert_eq!(names[2].as_ref().unwrap().as_deref(), Some("product 3"));
/// assert_eq!(loader.batches(), 1); // three misses, one query
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
pub struct BatchLoader<K, V, S, C> {
    cache: TieredCache<K, V, S, C>,
    shared: Arc<Shared<K, V>>,
    batches: Arc<std::sync::atomic::AtomicU64>,
}

impl<K, V, S, C> Clone for BatchLoader<K, V, S, C> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            shared: Arc::clone(&self.shared),
            batches: Arc::clone(&self.batches),
        }
    }
}

impl<K, V, S, C> fmt::Debug for BatchLoader<K, V, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchLoader")
            .field("max_keys", &self.shared.max_keys)
            .field("window", &self.shared.window)
            .finish_non_exhaustive()
    }
}

impl<K, V, S, C> TieredCache<K, V, S, C>
where
    K: Hash + Eq + Clone + fmt::Display + FromStr + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: CacheStore,
    C: Codec<V>,
{
    /// A [`BatchLoader`] over this cache: misses within `window` (up to `max_keys` of them) are
    /// loaded with one `load_many` call, which returns the values it found (a key it leaves out
    /// is cached as "not found" when the policy caches those).
    ///
    /// # Errors
    /// [`BuildError`] when `max_keys` is 0 or above [`MAX_BATCH_KEYS`], or `window` is zero or
    /// longer than [`MAX_BATCH_WINDOW`].
    pub fn batch_loader<F, Fut, E>(
        &self,
        max_keys: usize,
        window: Duration,
        load_many: F,
    ) -> Result<BatchLoader<K, V, S, C>, BuildError>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<HashMap<K, V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        if max_keys == 0 || max_keys > MAX_BATCH_KEYS {
            return Err(BuildError::new(
                "batch max_keys",
                format!("between 1 and {MAX_BATCH_KEYS}, got {max_keys}"),
            ));
        }
        if window.is_zero() || window > MAX_BATCH_WINDOW {
            return Err(BuildError::new(
                "batch window",
                format!("between 1 ns and {MAX_BATCH_WINDOW:?}, got {window:?}"),
            ));
        }
        let load_many: LoadMany<K, V> = Arc::new(move |keys| {
            let fut = load_many(keys);
            Box::pin(async move { fut.await.map_err(|e| Arc::new(e) as SharedError) })
        });
        Ok(BatchLoader {
            cache: self.clone(),
            shared: Arc::new(Shared {
                load_many,
                max_keys,
                window,
                pending: Mutex::new(Pending {
                    batch: 0,
                    waiters: Vec::new(),
                }),
            }),
            batches: Arc::default(),
        })
    }
}

impl<K, V, S, C> BatchLoader<K, V, S, C>
where
    K: Hash + Eq + Clone + fmt::Display + FromStr + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: CacheStore,
    C: Codec<V>,
{
    /// The value of `key`: from L1 or L2 when cached, otherwise loaded in the current batch.
    ///
    /// # Errors
    /// As [`TieredCache::get_or_load`](crate::TieredCache::get_or_load); a failed or panicked
    /// `load_many` is [`CacheError::Load`] holding a [`BatchLoadError`] for every key of its
    /// batch (unless a stale value can be served).
    pub async fn get(&self, key: &K) -> Result<Option<V>, CacheError> {
        let shared = Arc::clone(&self.shared);
        let batches = Arc::clone(&self.batches);
        let key_owned = key.clone();
        self.cache
            .get_or_load(key, move || join(shared, batches, key_owned))
            .await
    }

    /// The `load_many` calls made so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cache this loader fills.
    pub fn cache(&self) -> &TieredCache<K, V, S, C> {
        &self.cache
    }
}

/// Joins the current batch with `key` and waits for its value.
async fn join<K, V>(
    shared: Arc<Shared<K, V>>,
    batches: Arc<std::sync::atomic::AtomicU64>,
    key: K,
) -> Result<Option<V>, BatchLoadError>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    let (tx, rx) = oneshot::channel();
    let (full, timer) = {
        let mut pending = shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pending.waiters.push((key, tx));
        let first = pending.waiters.len() == 1;
        if pending.waiters.len() >= shared.max_keys {
            pending.batch += 1;
            (Some(std::mem::take(&mut pending.waiters)), None)
        } else {
            (None, first.then_some(pending.batch))
        }
    };
    if let Some(waiters) = full {
        tokio::spawn(send(Arc::clone(&shared), Arc::clone(&batches), waiters));
    }
    if let Some(batch) = timer {
        // The batch's window starts with its first key; its timer sends it unless it filled up
        // (and was sent) first.
        let (shared, batches) = (Arc::clone(&shared), Arc::clone(&batches));
        tokio::spawn(async move {
            tokio::time::sleep(shared.window).await;
            let waiters = {
                let mut pending = shared
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if pending.batch != batch || pending.waiters.is_empty() {
                    return;
                }
                pending.batch += 1;
                std::mem::take(&mut pending.waiters)
            };
            send(shared, batches, waiters).await;
        });
    }
    // A sender dropped without an answer (its task was cancelled at shutdown) is a failure,
    // never a wait forever.
    rx.await.unwrap_or(Err(BatchLoadError::Panicked))
}

/// Calls `load_many` with a batch's keys and answers each waiter.
async fn send<K, V>(
    shared: Arc<Shared<K, V>>,
    batches: Arc<std::sync::atomic::AtomicU64>,
    waiters: Vec<(K, Waiter<V>)>,
) where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    // A key appears once per batch even if two single flights of it met here (a set, not a
    // scan of the keys so far: a batch may hold thousands).
    let mut distinct: std::collections::HashSet<&K> =
        std::collections::HashSet::with_capacity(waiters.len());
    let keys: Vec<K> = waiters
        .iter()
        .filter(|(k, _)| distinct.insert(k))
        .map(|(k, _)| k.clone())
        .collect();
    batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let loaded = std::panic::AssertUnwindSafe((shared.load_many)(keys))
        .catch_unwind()
        .await;
    match loaded {
        Ok(Ok(map)) => {
            for (k, tx) in waiters {
                let _ = tx.send(Ok(map.get(&k).cloned()));
            }
        }
        Ok(Err(e)) => {
            for (_, tx) in waiters {
                let _ = tx.send(Err(BatchLoadError::Failed(Arc::clone(&e))));
            }
        }
        Err(_) => {
            for (_, tx) in waiters {
                let _ = tx.send(Err(BatchLoadError::Panicked));
            }
        }
    }
}
