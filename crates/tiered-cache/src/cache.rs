//! The cache: L1 (moka) in front of an L2 [`CacheStore`], single-flight loads, leases across
//! instances, invalidation over the store's bus.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{Notify, Semaphore, watch};

use crate::bus::{Body, MAX_KEYS_PER_MESSAGE, Message};
use crate::clock::{Clock, SystemClock};
use crate::codec::{Codec, Postcard};
use crate::entry::{self, Kind, MAX_TAG_BYTES, MAX_TAGS, Tagged, Times};
use crate::error::{BuildError, CacheError, CodecError, StoreError};
use crate::policy::Policy;
use crate::skip::{ConsecutiveFailures, SkipPolicy};
use crate::stats::{Counters, Stats, add, bump};
use crate::store::{BusEvent, CacheStore, Expect, Subscription};

/// Bumps a counter (and its `metrics` twin under the feature).
macro_rules! count {
    ($inner:expr, $field:ident) => {{
        bump(&$inner.stats.$field);
        #[cfg(feature = "metrics")]
        crate::stats::emit(&$inner.labels, concat!("cache.", stringify!($field)));
    }};
}

/// Adds `n` to a counter (and its `metrics` twin) at once.
macro_rules! count_n {
    ($inner:expr, $field:ident, $n:expr) => {{
        let n: u64 = $n;
        add(&$inner.stats.$field, n);
        #[cfg(feature = "metrics")]
        crate::stats::emit_n(&$inner.labels, concat!("cache.", stringify!($field)), n);
    }};
}

/// Stripes of invalidation epochs: an L1 insert is skipped when its key's stripe moved since
/// the lookup began (an invalidation raced with the load).
const STRIPES: usize = 64;

/// A copy in process memory. moka clones it on every read: everything but the value is
/// plain data (or an `Arc`), so a read costs the value's clone (use `Arc<T>` for large
/// values) and no second pointer chase.
#[derive(Debug, Clone)]
struct L1Entry<V> {
    value: Option<V>,
    times: Times,
    generation: u64,
    /// Dropped from L1 at this time (ms).
    l1_until: u64,
    /// The entry's tags and the tag time of its load.
    tags: Option<Arc<Tagged>>,
}

type Shared<V> = Result<Option<V>, CacheError>;

/// What a load captured before it began, to judge its value by afterwards.
#[derive(Debug, Clone, Copy)]
struct Before {
    /// The key's invalidation stripe epoch.
    epoch: u64,
    /// The tag clock: the value is stale if one of its tags moved past it.
    tag_time: u64,
    started: Instant,
}

/// One load in progress in this process; callers for the same key wait on it.
struct Flight<V> {
    done: watch::Sender<Option<Shared<V>>>,
}

/// Removes its flight when dropped: if the leader is cancelled or panics before finishing,
/// the followers see the channel close and retry (one of them leads).
struct FlightGuard<K: Hash + Eq, V> {
    flights: Arc<Flights<K, V>>,
    key: K,
    flight: Arc<Flight<V>>,
}

impl<K: Hash + Eq, V> FlightGuard<K, V> {
    fn finish(self, outcome: Shared<V>) {
        self.flight.done.send_replace(Some(outcome));
    }
}

impl<K: Hash + Eq, V> Drop for FlightGuard<K, V> {
    fn drop(&mut self) {
        let mut map = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        if map
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            map.remove(&self.key);
        }
    }
}

type Flights<K, V> = Mutex<HashMap<K, Arc<Flight<V>>>>;

type Weigher<K, V> = Arc<dyn Fn(&K, &V) -> u32 + Send + Sync>;

type Tagger<K, V> = Arc<dyn Fn(&K, &V) -> Vec<String> + Send + Sync>;

/// Most tag generations an instance keeps in memory.
const MAX_KNOWN_TAGS: u64 = 100_000;

/// What an instance knows of the tags' generations in L2.
struct Tags {
    /// Each tag's generation, kept for the L1 TTL: a lost bus message is made good by reading
    /// L2 again.
    gens: moka::sync::Cache<String, u64>,
    /// The newest generation of any tag this instance has seen: the tag time of loads
    /// starting now. Lower than L2's only makes entries look older than they are.
    clock: AtomicU64,
    /// Whether `clock` was read from L2 since the bus (re)connected.
    clock_known: AtomicBool,
}

/// A caller waiting for another instance's load of an L2 key.
#[derive(Debug, Default)]
struct Waiter {
    notify: Notify,
    failed: AtomicBool,
}

/// Lease settings.
#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    wait: Duration,
}

struct Inner<K, V, S, C> {
    namespace: String,
    prefix: String,
    store: S,
    codec: C,
    policy: Policy,
    l1: Option<moka::sync::Cache<K, L1Entry<V>>>,
    clock: Arc<dyn Clock>,
    skip: Arc<dyn SkipPolicy>,
    l2_timeout: Duration,
    lease: Option<Lease>,
    max_value_bytes: usize,
    compress_above: Option<usize>,
    flights: Arc<Flights<K, V>>,
    waiters: Mutex<HashMap<String, Arc<Waiter>>>,
    refreshes: Arc<Semaphore>,
    epochs: [AtomicU64; STRIPES],
    hasher: foldhash::fast::FixedState,
    generation: AtomicU64,
    generation_known: AtomicBool,
    instance: u64,
    bus_up: watch::Sender<bool>,
    stats: Counters,
    tagger: Option<Tagger<K, V>>,
    tags: Tags,
    #[cfg(feature = "metrics")]
    labels: Vec<metrics::Label>,
}

/// An in-process moka cache (L1) in front of a shared [`CacheStore`] (L2), for values of one
/// type under one namespace and [`Policy`].
///
/// - `get_or_load` calls the loader once per key in this process however many callers miss
///   at once, and, with [`TieredCacheBuilder::lease`], once across every instance sharing the
///   store: the others wait (woken by the value's arrival) for a bounded time.
/// - `invalidate` reaches every instance's L1 through the store's bus, and a load that began
///   before an invalidation never writes its older value back.
/// - When L2 fails, calls with a loader still get values: L2 calls have a timeout, and after
///   repeated failures the [`SkipPolicy`] skips L2 for a while.
///
/// Keys are written into L2 keys and bus messages with `Display` and read back with `FromStr`.
/// `V` is cloned out of L1 on each hit: use `Arc<T>` for large values.
///
/// ```
/// use std::time::Duration;
/// use stanchion_tiered_cache::{MemoryCacheStore, Policy, TieredCache};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let policy = Policy::builder(Duration::from_secs(3600)).soft_ttl(Duration::from_secs(3000)).build()?;
/// let products = TieredCache::<u64, String, _>::builder("product", MemoryCacheStore::new(), policy)
///     .build()?;
/// let name = products
///     .get_or_load(&42, || async { Ok::<_, std::io::Error>(Some("desk lamp".to_string())) })
///     .await?;
/// assert_eq!(name.as_deref(), Some("desk lamp"));
/// assert_eq!(products.stats().loads, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
pub struct TieredCache<K, V, S = crate::MemoryCacheStore, C = Postcard> {
    inner: Arc<Inner<K, V, S, C>>,
}

impl<K, V, S, C> Clone for TieredCache<K, V, S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V, S, C> fmt::Debug for TieredCache<K, V, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TieredCache")
            .field("namespace", &self.inner.namespace)
            .field("policy", &self.inner.policy)
            .field("instance", &self.inner.instance)
            .finish_non_exhaustive()
    }
}

/// Builds a [`TieredCache`]; see [`TieredCache::builder`].
#[must_use]
pub struct TieredCacheBuilder<K, V, S, C = Postcard> {
    namespace: String,
    prefix: String,
    store: S,
    codec: C,
    policy: Policy,
    l1_entries: Option<u64>,
    l1_weigher: Option<(u64, Weigher<K, V>)>,
    clock: Arc<dyn Clock>,
    skip: Option<Arc<dyn SkipPolicy>>,
    l2_timeout: Duration,
    lease: Option<Lease>,
    max_value_bytes: usize,
    compress_above: Option<usize>,
    max_refreshes: usize,
    tagger: Option<Tagger<K, V>>,
    _types: PhantomData<fn(K, V)>,
}

impl<K, V, S, C> fmt::Debug for TieredCacheBuilder<K, V, S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TieredCacheBuilder")
            .field("namespace", &self.namespace)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<K, V, S> TieredCache<K, V, S, Postcard> {
    /// Starts a cache for the values under `namespace` (a short name such as `"product"`)
    /// in `store`, expiring as `policy` says.
    pub fn builder(namespace: &str, store: S, policy: Policy) -> TieredCacheBuilder<K, V, S> {
        TieredCacheBuilder {
            namespace: namespace.to_owned(),
            prefix: String::new(),
            store,
            codec: Postcard,
            policy,
            l1_entries: None,
            l1_weigher: None,
            clock: Arc::new(SystemClock),
            skip: None,
            l2_timeout: Duration::from_millis(100),
            lease: None,
            max_value_bytes: 1 << 20,
            compress_above: Some(1024),
            max_refreshes: 16,
            tagger: None,
            _types: PhantomData,
        }
    }
}

impl<K, V, S, C> TieredCacheBuilder<K, V, S, C> {
    /// Encodes values with `codec` instead of [`Postcard`].
    pub fn codec<C2>(self, codec: C2) -> TieredCacheBuilder<K, V, S, C2> {
        TieredCacheBuilder {
            namespace: self.namespace,
            prefix: self.prefix,
            store: self.store,
            codec,
            policy: self.policy,
            l1_entries: self.l1_entries,
            l1_weigher: self.l1_weigher,
            clock: self.clock,
            skip: self.skip,
            l2_timeout: self.l2_timeout,
            lease: self.lease,
            max_value_bytes: self.max_value_bytes,
            compress_above: self.compress_above,
            max_refreshes: self.max_refreshes,
            tagger: self.tagger,
            _types: PhantomData,
        }
    }
    /// Prefixes every L2 key (default: none), e.g. `"shop:"`.
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }
    /// Bounds L1 by entries (default: 10,000).
    pub fn l1_capacity(mut self, entries: u64) -> Self {
        self.l1_entries = Some(entries);
        self.l1_weigher = None;
        self
    }
    /// Bounds L1 by weight instead: `weigher` gives each entry's size (in bytes, say), and the
    /// sum stays under `max_weight`.
    pub fn l1_weigher(
        mut self,
        max_weight: u64,
        weigher: impl Fn(&K, &V) -> u32 + Send + Sync + 'static,
    ) -> Self {
        self.l1_weigher = Some((max_weight, Arc::new(weigher)));
        self.l1_entries = None;
        self
    }
    /// The time source for TTLs (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }
    /// When to skip L2 (default: [`ConsecutiveFailures`] of 3, for 5 s).
    pub fn skip_policy(mut self, policy: impl SkipPolicy) -> Self {
        self.skip = Some(Arc::new(policy));
        self
    }
    /// Each L2 call's timeout (default 100 ms; 1 ms to 10 s).
    pub fn l2_timeout(mut self, timeout: Duration) -> Self {
        self.l2_timeout = timeout;
        self
    }
    /// Loads across instances take a lease in L2 (`SET NX PX ttl`): one instance loads while
    /// the others wait up to `wait` for its value, then load themselves. `ttl` bounds how long
    /// a crashed holder blocks others; it should exceed the slowest load. When `wait` is
    /// longer than `ttl`, a waiter whose value has not come once the holder's lease must have
    /// lapsed (its process died) contends for the lease again: one of them loads for all
    /// ([`Stats::lease_takeovers`]), so a crashed holder costs one reload after `ttl`, not one
    /// per instance after `wait`. A holder still loading past `ttl` is taken over too (two
    /// loads at once): keep `ttl` above the slowest load.
    pub fn lease(mut self, ttl: Duration, wait: Duration) -> Self {
        self.lease = Some(Lease { ttl, wait });
        self
    }
    /// Values larger than this (encoded) are not written to L2 (default 1 MiB).
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }
    /// lz4-compress encoded values of at least this many bytes (default 1 KiB; `None`: never).
    pub fn compress_above(mut self, bytes: Option<usize>) -> Self {
        self.compress_above = bytes;
        self
    }
    /// Most background refreshes at once (default 16); a due refresh beyond it waits for a
    /// later caller.
    pub fn max_refreshes(mut self, n: usize) -> Self {
        self.max_refreshes = n;
        self
    }
    /// Tags each loaded or inserted value with `tagger(key, value)` (up to 32 tags of 1 to
    /// 128 bytes; a value given more or longer ones is served but not cached, and counted in
    /// [`Stats::invalid_tags`]). [`TieredCache::invalidate_tag`] then drops every value
    /// carrying the tag, in every namespace under the same key prefix, on every instance.
    /// Cached "not found" answers have no value to tag and are not tagged.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use stanchion_tiered_cache::{MemoryCacheStore, Policy, TieredCache};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let policy = Policy::builder(Duration::from_secs(60)).build()?;
    /// // (product id) -> (name, category id)
    /// let products = TieredCache::<u64, (String, u32), _>::builder("product", MemoryCacheStore::new(), policy)
    ///     .tags(|_id, (_name, category)| vec![format!("category:{category}")])
    ///     .build()?;
    /// let load = || async { Ok::<_, std::io::Error>(Some(("lamp".to_string(), 7))) };
    /// products.get_or_load(&1, load).await?;
    /// products.get_or_load(&1, load).await?;
    /// assert_eq!(products.stats().loads, 1);
    /// products.invalidate_tag("category:7").await?;
    /// products.get_or_load(&1, load).await?;
    /// assert_eq!(products.stats().loads, 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
    /// ```
    pub fn tags(mut self, tagger: impl Fn(&K, &V) -> Vec<String> + Send + Sync + 'static) -> Self {
        self.tagger = Some(Arc::new(tagger));
        self
    }
}

impl<K, V, S, C> TieredCacheBuilder<K, V, S, C>
where
    K: Hash + Eq + Clone + fmt::Display + FromStr + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: CacheStore,
    C: Codec<V>,
{
    /// Builds the cache and, when its policy uses L1, starts listening to the store's bus.
    ///
    /// # Errors
    /// An empty namespace (or one with `:` or whitespace), a zero L1 capacity, an L2 timeout
    /// outside 1 ms to 10 s, lease times outside 1 ms to 1 h, a value limit under 64 bytes,
    /// zero refreshes, or no tokio runtime to run the bus listener on.
    pub fn build(self) -> Result<TieredCache<K, V, S, C>, BuildError> {
        if self.namespace.is_empty()
            || self
                .namespace
                .chars()
                .any(|c| c == ':' || c.is_whitespace())
        {
            return Err(BuildError::new(
                "namespace",
                format!(
                    "a non-empty name without ':' or spaces, got {:?}",
                    self.namespace
                ),
            ));
        }
        let ms = Duration::from_millis;
        if self.l2_timeout < ms(1) || self.l2_timeout > Duration::from_secs(10) {
            return Err(BuildError::new(
                "l2_timeout",
                format!("between 1 ms and 10 s, got {:?}", self.l2_timeout),
            ));
        }
        if let Some(l) = self.lease {
            for (field, d) in [("lease ttl", l.ttl), ("lease wait", l.wait)] {
                if d < ms(1) || d > Duration::from_secs(3600) {
                    return Err(BuildError::new(
                        field,
                        format!("between 1 ms and 1 h, got {d:?}"),
                    ));
                }
            }
        }
        if self.max_value_bytes < 64 {
            return Err(BuildError::new("max_value_bytes", "at least 64"));
        }
        if self.max_refreshes == 0 {
            return Err(BuildError::new("max_refreshes", "at least 1"));
        }
        let l1 = if self.policy.tiers().l1() {
            // moka drops copies after the L1 TTL (a fixed TTL keeps its read path as cheap as
            // a plain cache's); each copy's own `l1_until` is checked on read.
            let builder = moka::sync::Cache::builder().time_to_live(self.policy.l1_ttl());
            Some(match self.l1_weigher {
                Some((max, weigher)) => {
                    if max == 0 {
                        return Err(BuildError::new("l1 max_weight", "at least 1"));
                    }
                    builder
                        .max_capacity(max)
                        .weigher(move |k: &K, e: &L1Entry<V>| {
                            e.value.as_ref().map_or(1, |v| weigher(k, v).max(1))
                        })
                        .build()
                }
                None => {
                    let n = self.l1_entries.unwrap_or(10_000);
                    if n == 0 {
                        return Err(BuildError::new("l1_capacity", "at least 1"));
                    }
                    builder.max_capacity(n).build()
                }
            })
        } else {
            None
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BuildError::new(
                "runtime",
                "build the cache inside a tokio runtime (its bus listener runs there)",
            )
        })?;
        let skip = match self.skip {
            Some(s) => s,
            None => Arc::new(ConsecutiveFailures::new(3, Duration::from_secs(5))?),
        };
        let known_tags_ttl = self.policy.l1_ttl().max(Duration::from_millis(1));
        let inner = Arc::new(Inner {
            #[cfg(feature = "metrics")]
            labels: vec![metrics::Label::new(
                "cache.namespace",
                self.namespace.clone(),
            )],
            namespace: self.namespace,
            prefix: self.prefix,
            store: self.store,
            codec: self.codec,
            policy: self.policy,
            l1,
            clock: self.clock,
            skip,
            l2_timeout: self.l2_timeout,
            lease: self.lease,
            max_value_bytes: self.max_value_bytes,
            compress_above: self.compress_above,
            flights: Arc::default(),
            waiters: Mutex::default(),
            refreshes: Arc::new(Semaphore::new(self.max_refreshes)),
            epochs: std::array::from_fn(|_| AtomicU64::new(0)),
            hasher: foldhash::fast::FixedState::default(),
            generation: AtomicU64::new(0),
            generation_known: AtomicBool::new(false),
            instance: fastrand::u64(1..),
            bus_up: watch::channel(false).0,
            stats: Counters::default(),
            tagger: self.tagger,
            tags: Tags {
                gens: moka::sync::Cache::builder()
                    .max_capacity(MAX_KNOWN_TAGS)
                    .time_to_live(known_tags_ttl)
                    .build(),
                clock: AtomicU64::new(0),
                clock_known: AtomicBool::new(false),
            },
        });
        let subscription = inner.store.subscribe();
        runtime.spawn(listen(Arc::downgrade(&inner), subscription));
        Ok(TieredCache { inner })
    }
}

/// Applies bus events until the cache is dropped.
async fn listen<K, V, S, C>(cache: Weak<Inner<K, V, S, C>>, mut sub: Subscription)
where
    K: Hash + Eq + Clone + fmt::Display + FromStr + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: CacheStore,
    C: Codec<V>,
{
    while let Some(event) = sub.recv().await {
        let Some(inner) = cache.upgrade() else {
            return;
        };
        match event {
            BusEvent::Connected => {
                inner.clear_l1();
                // The generation and tags may have moved while nobody listened.
                inner.generation_known.store(false, Ordering::Release);
                inner.tags.gens.invalidate_all();
                inner.tags.clock_known.store(false, Ordering::Release);
                inner.bus_up.send_replace(true);
            }
            BusEvent::Lost => {
                // Keep serving L1 (clearing it now would send every read to the loader just
                // when Redis is down); copies are bounded by the L1 TTL and are cleared when
                // the bus is back, since messages sent meanwhile were missed.
                inner.bus_up.send_replace(false);
            }
            BusEvent::Message(bytes) => {
                let Some(m) = Message::decode(&bytes) else {
                    tracing::debug!("unreadable bus message ignored");
                    continue;
                };
                let tag = matches!(m.body, Body::Tag { .. });
                if m.origin == inner.instance || (m.namespace != inner.namespace && !tag) {
                    continue;
                }
                inner.apply(m.body);
            }
        }
    }
}

enum Role<K: Hash + Eq, V> {
    Leader(FlightGuard<K, V>),
    Follower(watch::Receiver<Option<Shared<V>>>),
}

/// What the leader learned from L2 before loading.
struct Found<V> {
    /// What a write-back must find in L2 (what was there before the load).
    expect: Expect,
    /// Whether L2 answered (writes are skipped when it did not).
    l2_ok: bool,
    /// An expired value still within `max_stale`, served if the load fails.
    fallback: Option<L1Entry<V>>,
}

impl<K, V, S, C> TieredCache<K, V, S, C>
where
    K: Hash + Eq + Clone + fmt::Display + FromStr + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: CacheStore,
    C: Codec<V>,
{
    /// The value of `key` from L1 or L2, without loading; `Ok(None)` on a miss (or a cached
    /// "not found"). Stale values (past the soft TTL) are returned; expired ones are not.
    ///
    /// # Errors
    /// [`CacheError::Store`] when L1 misses and L2 fails, times out or is skipped.
    pub async fn get(&self, key: &K) -> Result<Option<V>, CacheError> {
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        if let Some(e) = inner.l1_get(key, now)
            && now < e.times.expires_at
        {
            count!(inner, l1_hits);
            return Ok(e.value);
        }
        count!(inner, l1_misses);
        if !inner.policy.tiers().l2() {
            return Ok(None);
        }
        Box::pin(inner.get_from_l2(key, now)).await
    }

    /// The value of `key`, loading it with `loader` on a miss. `loader` returns `Ok(None)` for
    /// "no such value" (cached for the policy's `negative_ttl`).
    ///
    /// One loader call per key at a time in this process; with a lease, one across instances.
    /// A value past its soft TTL is returned at once while one background refresh runs
    /// `loader`. When the loader fails, a value expired less than `max_stale` ago is served.
    /// Failures of L2 never reach the caller: L1 and the loader carry on.
    ///
    /// # Errors
    /// [`CacheError::Load`] (the loader's error, shared with every caller coalesced onto it)
    /// or [`CacheError::LoaderPanicked`], when no stale value can be served instead.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use stanchion_tiered_cache::{MemoryCacheStore, Policy, TieredCache};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let policy = Policy::builder(Duration::from_secs(60)).negative_ttl(Duration::from_secs(5)).build()?;
    /// let users = TieredCache::<u64, String, _>::builder("user", MemoryCacheStore::new(), policy).build()?;
    /// let load = || async { Ok::<Option<String>, std::io::Error>(None) };
    /// assert_eq!(users.get_or_load(&7, load).await?, None);
    /// assert_eq!(users.get_or_load(&7, load).await?, None); // "not found" was cached
    /// assert_eq!(users.stats().loads, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
    /// ```
    pub async fn get_or_load<F, Fut, E>(&self, key: &K, loader: F) -> Result<Option<V>, CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        match inner.l1_get(key, now) {
            // The common hit, fresh with no early refresh to consider, the same as `get`'s.
            Some(e) if now < e.times.fresh_until && inner.policy.early_refresh().is_none() => {
                count!(inner, l1_hits);
                Ok(e.value)
            }
            found => match self.l1_hit(key, loader, now, found) {
                Ok(value) => Ok(value),
                Err((loader, fallback)) => Box::pin(self.miss(key, loader, fallback)).await,
            },
        }
    }

    /// The rest of the hit path, synchronous, given what L1 held at `now`: a usable copy
    /// (starting a refresh if one is due), or the loader back with the expired copy, if any.
    #[allow(clippy::type_complexity)]
    fn l1_hit<F, Fut, E>(
        &self,
        key: &K,
        loader: F,
        now: u64,
        found: Option<L1Entry<V>>,
    ) -> Result<Option<V>, (F, Option<L1Entry<V>>)>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let inner = &self.inner;
        let Some(e) = found else {
            count!(inner, l1_misses);
            return Err((loader, None));
        };
        if now >= e.times.expires_at {
            count!(inner, l1_misses);
            return Err((loader, Some(e)));
        }
        count!(inner, l1_hits);
        let stale = now >= e.times.fresh_until;
        if stale
            || inner.policy.early_refresh().is_some_and(|_| {
                inner
                    .policy
                    .refresh_early(&e.times, now, 1.0 - fastrand::f64())
            })
        {
            if stale {
                count!(inner, stale_served);
            }
            self.spawn_refresh(key, loader);
        }
        Ok(e.value)
    }

    /// The miss path: wait for this process's load of `key`, or lead it.
    async fn miss<F, Fut, E>(
        &self,
        key: &K,
        loader: F,
        mut fallback: Option<L1Entry<V>>,
    ) -> Result<Option<V>, CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let inner = &self.inner;
        let mut loader = loader;
        loop {
            match inner.join(key) {
                Role::Follower(mut rx) => {
                    count!(inner, coalesced);
                    if let Ok(done) = rx.wait_for(Option::is_some).await
                        && let Some(outcome) = done.clone()
                    {
                        return outcome;
                    }
                    // The leader was cancelled: look again, then try (perhaps as the leader).
                    let now = inner.clock.now_ms();
                    match self.l1_hit(key, loader, now, inner.l1_get(key, now)) {
                        Ok(value) => return Ok(value),
                        Err((l, f)) => {
                            loader = l;
                            fallback = f.or(fallback);
                        }
                    }
                }
                Role::Leader(guard) => {
                    // Another leader may have filled L1 just before this one took over.
                    let now = inner.clock.now_ms();
                    if let Some(e) = inner.l1_get(key, now)
                        && now < e.times.fresh_until
                    {
                        let value = e.value.clone();
                        guard.finish(Ok(value.clone()));
                        return Ok(value);
                    }
                    let (outcome, unused) = inner.lead(key, loader, fallback.take(), false).await;
                    guard.finish(outcome.clone());
                    if let Some(l) = unused {
                        self.spawn_refresh(key, l);
                    }
                    return outcome;
                }
            }
        }
    }

    /// Starts one background refresh of `key` unless one is running or the cap is reached.
    fn spawn_refresh<F, Fut, E>(&self, key: &K, loader: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let Ok(permit) = Arc::clone(&inner.refreshes).try_acquire_owned() else {
            return;
        };
        // Registered before spawning: callers arriving meanwhile start no second refresh.
        let Role::Leader(guard) = inner.join(key) else {
            return; // a load of this key is already running
        };
        let key = key.clone();
        count!(inner, refreshes);
        tokio::spawn(async move {
            let _permit = permit;
            let fallback = inner.l1_get(&key, inner.clock.now_ms());
            let (outcome, _) = inner.lead(&key, loader, fallback, true).await;
            guard.finish(outcome);
        });
    }

    /// Values of `keys` from L1 and one L2 round trip (one per node on a cluster), in order;
    /// misses are `None`.
    ///
    /// # Errors
    /// [`CacheError::Store`] when some key misses L1 and L2 fails.
    pub async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<V>>, CacheError> {
        let (found, _) = self.inner.lookup_many(keys, true).await?;
        Ok(found.into_iter().map(|f| f.and_then(|e| e.value)).collect())
    }

    /// Values of `keys`, in order, with one `loader` call for every key that missed both tiers.
    /// Keys missing from the loader's map are "not found" (cached for `negative_ttl`). L2
    /// failing makes every miss a loader key, never an error.
    ///
    /// # Errors
    /// [`CacheError::Load`] or [`CacheError::LoaderPanicked`] when the loader fails.
    ///
    /// ```
    /// # use std::{collections::HashMap, time::Duration};
    /// # use stanchion_tiered_cache::{MemoryCacheStore, Policy, TieredCache};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let policy = Policy::builder(Duration::from_secs(60)).build()?;
    /// let prices = TieredCache::<u32, u64, _>::builder("price", MemoryCacheStore::new(), policy).build()?;
    /// let load = |ids: Vec<u32>| async move {
    ///     Ok::<_, std::io::Error>(ids.into_iter().map(|id| (id, u64::from(id) * 100)).collect::<HashMap<_, _>>())
    /// };
    /// assert_eq!(prices.get_or_load_many(&[1, 2], load).await?, vec![Some(100), Some(200)]);
    /// assert_eq!(prices.get_or_load_many(&[2, 3], load).await?, vec![Some(200), Some(300)]);
    /// assert_eq!(prices.stats().loads, 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
    /// ```
    pub async fn get_or_load_many<F, Fut, E>(
        &self,
        keys: &[K],
        loader: F,
    ) -> Result<Vec<Option<V>>, CacheError>
    where
        F: FnOnce(Vec<K>) -> Fut,
        Fut: Future<Output = Result<HashMap<K, V>, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let inner = &self.inner;
        let epoch_before: Vec<u64> = keys.iter().map(|k| inner.epoch(k)).collect();
        let (found, expects) = inner
            .lookup_many(keys, false)
            .await
            .unwrap_or_else(|_| (vec![None; keys.len()], vec![None; keys.len()]));
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        let mut out: Vec<Option<V>> = found
            .iter()
            .map(|f| f.as_ref().and_then(|e| e.value.clone()))
            .collect();
        if missing.is_empty() {
            return Ok(out);
        }
        let ask: Vec<K> = missing.iter().map(|&i| keys[i].clone()).collect();
        count!(inner, loads);
        let tag_time = inner.tags.clock.load(Ordering::Acquire);
        let started = Instant::now();
        let loaded = AssertUnwindSafe(loader(ask)).catch_unwind().await;
        add(
            &inner.stats.load_micros,
            started.elapsed().as_micros() as u64,
        );
        let mut loaded = match loaded {
            Ok(Ok(map)) => map,
            Ok(Err(e)) => {
                count!(inner, load_errors);
                return Err(CacheError::Load(Arc::new(e)));
            }
            Err(_) => {
                count!(inner, load_errors);
                return Err(CacheError::LoaderPanicked);
            }
        };
        let load_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        for i in missing {
            let value = loaded.remove(&keys[i]);
            let expect = expects[i].unwrap_or(Expect::Absent);
            inner
                .store_loaded(
                    &keys[i],
                    value.clone(),
                    load_ms,
                    expect,
                    true,
                    Before {
                        epoch: epoch_before[i],
                        tag_time,
                        started,
                    },
                )
                .await;
            out[i] = value;
        }
        Ok(out)
    }

    /// Writes `value` for `key` to both tiers at once (write-through) and tells the other
    /// instances to drop their copies.
    ///
    /// # Errors
    /// [`CacheError::Codec`] when the value cannot be encoded; [`CacheError::Store`] when L2
    /// or the bus fails (L1 is updated regardless).
    pub async fn insert(&self, key: &K, value: V) -> Result<(), CacheError> {
        let inner = &self.inner;
        inner.bump_epoch(key);
        // The generation and the tag clock first: the value's tag time must not lag them.
        let skey = match inner.policy.tiers().l2() || inner.tagger.is_some() {
            true => Some(inner.store_key(key).await),
            false => None,
        };
        let Ok(tags) = inner.tags_of(key, &value, None).await else {
            // The value cannot be cached: the old one goes everywhere instead.
            return self.invalidate_many(std::slice::from_ref(key)).await;
        };
        let now = inner.clock.now_ms();
        let times = inner.policy.times(now, 0, true, fastrand::f64());
        let stamp = fastrand::u64(1..);
        let mut result = Ok(());
        if inner.policy.tiers().l2()
            && let Some(bytes) = inner.entry_bytes(Some(&value), stamp, times, tags.as_deref())?
        {
            let keep = inner.policy.l2_keep_ms(&times, now);
            result = match skey {
                Some(Ok(skey)) => inner
                    .l2(inner.store.set(&skey, bytes, keep, Expect::Any))
                    .await
                    .map(drop),
                Some(Err(e)) => Err(e),
                None => Ok(()),
            };
        }
        let entry = inner.l1_entry(Some(value), times, tags, now);
        inner.l1_put(key, &entry, inner.epoch(key));
        let sent = inner.publish(Body::Keys(vec![key.to_string()])).await;
        result.and(sent).map_err(CacheError::from)
    }

    /// Drops `key` from every instance's L1 and from L2 (leaving a short tombstone so that a
    /// load begun before this call does not write its older value back).
    ///
    /// # Errors
    /// [`CacheError::Store`] when L2 or the bus fails: this instance's L1 is cleared anyway,
    /// but L2 and other instances may serve the old value until their TTLs.
    pub async fn invalidate(&self, key: &K) -> Result<(), CacheError> {
        self.invalidate_many(std::slice::from_ref(key)).await
    }

    /// [`TieredCache::invalidate`] for several keys (one bus message per 512 keys).
    ///
    /// # Errors
    /// As [`TieredCache::invalidate`].
    pub async fn invalidate_many(&self, keys: &[K]) -> Result<(), CacheError> {
        let inner = &self.inner;
        for k in keys {
            inner.bump_epoch(k);
            if let Some(l1) = &inner.l1 {
                l1.invalidate(k);
            }
        }
        let mut result = Ok(());
        if inner.policy.tiers().l2() {
            let ttl = inner.policy.tombstone_ttl().as_millis() as u64;
            let now = inner.clock.now_ms();
            let mut writes = Vec::with_capacity(keys.len());
            for k in keys {
                let tomb = entry::encode(
                    Kind::Tombstone,
                    fastrand::u64(1..),
                    Times {
                        loaded_at: now,
                        fresh_until: now,
                        expires_at: now,
                        load_ms: 0,
                    },
                    None,
                    &[],
                    None,
                );
                match inner.store_key(k).await {
                    Ok(skey) => writes.push((skey, tomb, ttl)),
                    Err(e) => result = Err(e),
                }
            }
            if !writes.is_empty()
                && let Err(e) = inner.l2(inner.store.set_many(writes)).await
            {
                result = Err(e);
            }
        }
        for chunk in keys.chunks(MAX_KEYS_PER_MESSAGE) {
            let names = chunk.iter().map(ToString::to_string).collect();
            if let Err(e) = inner.publish(Body::Keys(names)).await {
                result = Err(e);
            }
        }
        result.map_err(CacheError::from)
    }

    /// Invalidates every value of this namespace on every instance by moving to a new
    /// generation in L2: no key scan, and it works the same on a cluster. Old entries are
    /// never read again and expire with their TTLs.
    ///
    /// # Errors
    /// [`CacheError::Store`] when L2 fails (nothing changes then) or the bus fails (other
    /// instances then learn the generation within their L1 TTL, or on reconnecting).
    pub async fn invalidate_all(&self) -> Result<(), CacheError> {
        let inner = &self.inner;
        let generation = inner.l2(inner.store.incr(&inner.generation_key())).await?;
        inner.set_generation(generation);
        inner.publish(Body::Generation(generation)).await?;
        Ok(())
    }

    /// Invalidates every value tagged `tag` (see [`TieredCacheBuilder::tags`]) in every
    /// namespace under this cache's key prefix, on every instance: the tag moves to a new
    /// generation in L2 (no key scan; two single-key calls, so it works the same on a
    /// cluster) and the bus tells the other instances. A load that began before this call
    /// does not cache its value under the tag.
    ///
    /// Other instances stop serving their copies when the bus message arrives; if it is lost,
    /// within the L1 TTL (each instance keeps a tag's generation no longer than that).
    /// Each invalidated tag leaves one counter in L2, without expiry.
    ///
    /// # Errors
    /// [`CacheError::InvalidTag`] for an empty tag or one over 128 bytes;
    /// [`CacheError::Store`] when L2 fails (the tag may then be invalidated or not: call
    /// again) or the bus fails (the tag is invalidated; other instances see it within their
    /// L1 TTL).
    pub async fn invalidate_tag(&self, tag: &str) -> Result<(), CacheError> {
        if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
            return Err(CacheError::InvalidTag { len: tag.len() });
        }
        let inner = &self.inner;
        let clock = inner.l2(inner.store.incr(&inner.tag_clock_key())).await?;
        let generation = inner
            .l2(inner.store.raise(&inner.tag_key(tag), clock))
            .await?;
        inner.learn_tag(tag, generation);
        inner
            .publish(Body::Tag {
                prefix: inner.prefix.clone(),
                name: tag.to_owned(),
                generation,
            })
            .await?;
        Ok(())
    }

    /// Loads `keys` that are in neither tier, at most `concurrency` loader calls at once,
    /// and returns how many were loaded. Errors of single keys are counted in
    /// [`Stats::load_errors`] and skipped.
    pub async fn warm<F, Fut, E>(&self, keys: Vec<K>, concurrency: usize, loader: F) -> usize
    where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        use futures_util::StreamExt;
        let loader = Arc::new(loader);
        let before = self.inner.stats.loads.load(Ordering::Relaxed);
        futures_util::stream::iter(keys)
            .for_each_concurrent(concurrency.max(1), |k| {
                let loader = Arc::clone(&loader);
                async move {
                    let key = k.clone();
                    let _ = self.get_or_load(&key, move || loader(k)).await;
                }
            })
            .await;
        let after = self.inner.stats.loads.load(Ordering::Relaxed);
        usize::try_from(after.saturating_sub(before)).unwrap_or(usize::MAX)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// Waits until the bus listener is subscribed (at most `timeout`); says whether it is.
    /// Invalidations published by others before then are not seen by this instance (its L1
    /// is cleared when the subscription starts).
    pub async fn wait_for_bus(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.bus_up.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Copies held in process memory (approximate: moka counts lazily).
    pub fn l1_len(&self) -> u64 {
        self.inner.l1.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }
}

impl<K, V, S, C> Inner<K, V, S, C>
where
    K: Hash + Eq + Clone + fmt::Display + FromStr + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: CacheStore,
    C: Codec<V>,
{
    fn stripe(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    fn epoch(&self, key: &K) -> u64 {
        self.epochs[self.stripe(key)].load(Ordering::Acquire)
    }

    fn bump_epoch(&self, key: &K) {
        self.epochs[self.stripe(key)].fetch_add(1, Ordering::AcqRel);
    }

    fn clear_l1(&self) {
        for e in &self.epochs {
            e.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(l1) = &self.l1 {
            l1.invalidate_all();
        }
        count!(self, l1_clears);
    }

    fn set_generation(&self, generation: u64) {
        let old = self.generation.fetch_max(generation, Ordering::AcqRel);
        self.generation_known.store(true, Ordering::Release);
        if generation > old {
            self.clear_l1();
        }
    }

    fn apply(&self, body: Body) {
        match body {
            Body::Keys(names) => {
                count!(self, invalidations_received);
                for name in names {
                    let Ok(key) = name.parse::<K>() else {
                        tracing::debug!("bus key that does not parse ignored");
                        continue;
                    };
                    self.bump_epoch(&key);
                    if let Some(l1) = &self.l1 {
                        l1.invalidate(&key);
                    }
                }
            }
            Body::Generation(g) => {
                count!(self, invalidations_received);
                self.set_generation(g);
            }
            Body::Filled(skey) => {
                if let Some(w) = self.waiter_if_any(&skey) {
                    w.notify.notify_waiters();
                }
            }
            Body::Failed(skey) => {
                if let Some(w) = self.waiter_if_any(&skey) {
                    w.failed.store(true, Ordering::Release);
                    w.notify.notify_waiters();
                }
            }
            Body::Tag {
                prefix,
                name,
                generation,
            } => {
                if prefix == self.prefix {
                    count!(self, invalidations_received);
                    self.learn_tag(&name, generation);
                }
            }
        }
    }

    fn tag_key(&self, name: &str) -> String {
        format!("{}:tag:{name}", self.prefix)
    }

    /// The counter every tag invalidation moves; a tag's generation is its value then.
    fn tag_clock_key(&self) -> String {
        format!("{}:tags", self.prefix)
    }

    /// Records that tag `name` is at `generation` or later.
    fn learn_tag(&self, name: &str, generation: u64) {
        self.tags
            .gens
            .entry_by_ref(name)
            .and_upsert_with(|old| old.map_or(generation, |e| (*e.value()).max(generation)));
        self.tags.clock.fetch_max(generation, Ordering::AcqRel);
    }

    /// Whether no tag of an entry moved past its tag time: `None` when some tag's generation
    /// is not known here.
    fn tags_current(&self, tagged: &Tagged) -> Option<bool> {
        let mut known = true;
        for name in &tagged.names {
            match self.tags.gens.get(name.as_str()) {
                Some(g) if g > tagged.time => return Some(false),
                Some(_) => {}
                None => known = false,
            }
        }
        known.then_some(true)
    }

    /// Reads from L2 the generations of `names` not known here (concurrently, one call per
    /// tag).
    async fn fetch_tags(&self, names: &[&str]) {
        let mut unknown: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.tags.gens.contains_key(*n))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        if unknown.is_empty() {
            return;
        }
        let keys: Vec<String> = unknown.iter().map(|n| self.tag_key(n)).collect();
        let reads = keys.iter().map(|k| self.l2(self.store.counter(k)));
        let got = futures_util::future::join_all(reads).await;
        for (name, g) in unknown.into_iter().zip(got) {
            if let Ok(g) = g {
                self.learn_tag(name, g);
            }
        }
    }

    /// Empties the slots of entries a tag invalidation made stale (or whose tags cannot be
    /// checked because L2 did not answer).
    async fn drop_stale_tagged(&self, entries: &mut [Option<L1Entry<V>>]) {
        let tagged = |e: &Option<L1Entry<V>>| e.as_ref().and_then(|e| e.tags.clone());
        let all: Vec<Arc<Tagged>> = entries.iter().filter_map(tagged).collect();
        if all.is_empty() {
            return;
        }
        let names: Vec<&str> = all
            .iter()
            .flat_map(|t| t.names.iter().map(String::as_str))
            .collect();
        self.fetch_tags(&names).await;
        for slot in entries {
            if let Some(t) = tagged(slot)
                && self.tags_current(&t) != Some(true)
            {
                *slot = None;
            }
        }
    }

    /// The tags of `value` with the tag time they are judged by: `time` for a load (the tag
    /// clock when it began), or `None` for a value written through (current now). `Err`
    /// when the value must not be cached: its tags are invalid, a tag moved during the load,
    /// or L2 could not say where a tag stands.
    async fn tags_of(
        &self,
        key: &K,
        value: &V,
        time: Option<u64>,
    ) -> Result<Option<Arc<Tagged>>, ()> {
        let Some(tagger) = &self.tagger else {
            return Ok(None);
        };
        let mut names = tagger(key, value);
        if names.is_empty() {
            return Ok(None);
        }
        names.sort_unstable();
        names.dedup();
        if names.len() > MAX_TAGS
            || names
                .iter()
                .any(|n| n.is_empty() || n.len() > MAX_TAG_BYTES)
        {
            count!(self, invalid_tags);
            tracing::warn!(cache.namespace = %self.namespace, cache.tags = names.len(), "tagger gave invalid tags; value not cached");
            return Err(());
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.fetch_tags(&refs).await;
        let mut tagged = Tagged { time: 0, names };
        tagged.time = match time {
            Some(t) => t,
            None => {
                let newest = tagged
                    .names
                    .iter()
                    .filter_map(|n| self.tags.gens.get(n.as_str()));
                newest.fold(self.tags.clock.load(Ordering::Acquire), u64::max)
            }
        };
        match self.tags_current(&tagged) {
            Some(true) => Ok(Some(Arc::new(tagged))),
            Some(false) => {
                count!(self, stale_writes_refused);
                Err(())
            }
            None => Err(()),
        }
    }

    fn waiter_if_any(&self, skey: &str) -> Option<Arc<Waiter>> {
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(skey)
            .cloned()
    }

    fn l1_get(&self, key: &K, now: u64) -> Option<L1Entry<V>> {
        let e = self.l1.as_ref()?.get(key)?;
        (e.generation == self.generation.load(Ordering::Acquire)
            && now < e.l1_until
            && e.tags
                .as_deref()
                .is_none_or(|t| self.tags_current(t) == Some(true)))
        .then_some(e)
    }

    fn l1_entry(
        &self,
        value: Option<V>,
        times: Times,
        tags: Option<Arc<Tagged>>,
        now: u64,
    ) -> L1Entry<V> {
        let l1_ms = self.policy.l1_ttl().as_millis() as u64;
        let keep = self.policy.stale_until(&times);
        L1Entry {
            value,
            times,
            generation: self.generation.load(Ordering::Acquire),
            l1_until: now.saturating_add(l1_ms).min(keep.max(now)),
            tags,
        }
    }

    /// Puts a copy in L1 unless the key was invalidated since `epoch` was read.
    fn l1_put(&self, key: &K, entry: &L1Entry<V>, epoch: u64) {
        let Some(l1) = &self.l1 else { return };
        if self.epoch(key) != epoch {
            return;
        }
        l1.insert(key.clone(), entry.clone());
        // An invalidation that landed between the check and the insert removes it again.
        if self.epoch(key) != epoch {
            l1.invalidate(key);
        }
    }

    fn join(&self, key: &K) -> Role<K, V> {
        let mut map = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = map.get(key) {
            return Role::Follower(f.done.subscribe());
        }
        let flight = Arc::new(Flight {
            done: watch::channel(None).0,
        });
        map.insert(key.clone(), Arc::clone(&flight));
        Role::Leader(FlightGuard {
            flights: Arc::clone(&self.flights),
            key: key.clone(),
            flight,
        })
    }

    fn generation_key(&self) -> String {
        format!("{}{}:gen", self.prefix, self.namespace)
    }

    /// The L2 key of `key` in the current generation (read from L2 when not yet known, with
    /// the tag clock when this cache tags its values).
    async fn store_key(&self, key: &K) -> Result<String, StoreError> {
        let base = self.store_key_base().await?;
        Ok(Self::with_key(&base, key))
    }

    /// `base` followed by `key`.
    fn with_key(base: &str, key: &K) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(base.len() + 24);
        s.push_str(base);
        let _ = write!(s, "{key}");
        s
    }

    /// The L2 keys of the current generation start with this.
    async fn store_key_base(&self) -> Result<String, StoreError> {
        let clock = self.tagger.is_some() && !self.tags.clock_known.load(Ordering::Acquire);
        if clock {
            let (gkey, ckey) = (self.generation_key(), self.tag_clock_key());
            let (g, c) = tokio::join!(
                self.l2(self.store.counter(&gkey)),
                self.l2(self.store.counter(&ckey)),
            );
            self.set_generation(g?);
            self.tags.clock.fetch_max(c?, Ordering::AcqRel);
            self.tags.clock_known.store(true, Ordering::Release);
        } else if !self.generation_known.load(Ordering::Acquire) {
            let g = self.l2(self.store.counter(&self.generation_key())).await?;
            self.set_generation(g);
        }
        let g = self.generation.load(Ordering::Acquire);
        Ok(format!("{}{}:{g}:", self.prefix, self.namespace))
    }

    fn lease_key(&self, skey: &str) -> String {
        format!("{skey}:lease")
    }

    /// Runs one L2 call under the timeout and the skip policy.
    async fn l2<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.skip.allow() {
            count!(self, l2_skipped);
            return Err(StoreError::Skipped);
        }
        match tokio::time::timeout(self.l2_timeout, call).await {
            Ok(Ok(v)) => {
                self.skip.on_success();
                Ok(v)
            }
            Ok(Err(e)) => {
                count!(self, l2_errors);
                self.skip.on_failure();
                tracing::debug!(error = %e, cache.namespace = %self.namespace, "L2 call failed");
                Err(e)
            }
            Err(_) => {
                count!(self, l2_errors);
                self.skip.on_failure();
                Err(StoreError::Timeout(self.l2_timeout))
            }
        }
    }

    async fn publish(&self, body: Body) -> Result<(), StoreError> {
        let sent = self.publish_quiet(body).await;
        if sent.is_ok() {
            count!(self, invalidations_sent);
        }
        sent
    }

    /// `get` past L1: one L2 read.
    async fn get_from_l2(&self, key: &K, now: u64) -> Result<Option<V>, CacheError> {
        let epoch = self.epoch(key);
        let skey = self.store_key(key).await?;
        match self.read_l2(&skey, now).await?.1 {
            Some(e) if now < e.times.expires_at => {
                count!(self, l2_hits);
                self.l1_put(key, &e, epoch);
                Ok(e.value)
            }
            _ => {
                count!(self, l2_misses);
                Ok(None)
            }
        }
    }

    /// One key from L2: see [`Inner::read`].
    async fn read_l2(
        &self,
        skey: &String,
        now: u64,
    ) -> Result<(Expect, Option<L1Entry<V>>), StoreError> {
        let mut got = self
            .l2(self.store.get_many(std::slice::from_ref(skey)))
            .await?;
        let (expect, entry) = self.read(got.pop().flatten(), now);
        let mut slot = [entry];
        self.drop_stale_tagged(&mut slot).await;
        let [entry] = slot;
        Ok((expect, entry))
    }

    /// What L2 held for a key: the condition a write-back must meet (the key still absent,
    /// or still holding the entry read here), and the entry if it is a readable value or
    /// "not found".
    fn read(&self, bytes: Option<Vec<u8>>, now: u64) -> (Expect, Option<L1Entry<V>>) {
        match bytes {
            None => (Expect::Absent, None),
            Some(b) => (
                Expect::Stamp(entry::stamp_of(&b)),
                self.decode_entry(&b, now),
            ),
        }
    }

    /// Decodes an L2 entry; a corrupt one is counted and reported as a miss.
    fn decode_entry(&self, bytes: &[u8], now: u64) -> Option<L1Entry<V>> {
        let raw = match entry::decode(bytes, self.max_value_bytes) {
            Ok(raw) => raw,
            Err(e) => {
                count!(self, corrupt);
                tracing::warn!(error = %e, cache.namespace = %self.namespace, "corrupt L2 entry");
                return None;
            }
        };
        let value = match raw.kind {
            Kind::Tombstone => return None,
            Kind::Absent => None,
            Kind::Value => match self.codec.decode(&raw.payload) {
                Ok(v) => Some(v),
                Err(e) => {
                    count!(self, corrupt);
                    tracing::warn!(error = %e, cache.namespace = %self.namespace, "L2 value does not decode");
                    return None;
                }
            },
        };
        Some(self.l1_entry(value, raw.times, raw.tags.map(Arc::new), now))
    }

    /// L1 and one L2 round trip for `keys`: usable entries (fresh, or stale if
    /// `stale_ok`), and for each miss what a write-back must expect in L2 (`None` for keys
    /// L2 did not answer for).
    #[allow(clippy::type_complexity)]
    async fn lookup_many(
        &self,
        keys: &[K],
        stale_ok: bool,
    ) -> Result<(Vec<Option<L1Entry<V>>>, Vec<Option<Expect>>), CacheError> {
        let now = self.clock.now_ms();
        let mut found: Vec<Option<L1Entry<V>>> = Vec::with_capacity(keys.len());
        let mut expects = vec![None; keys.len()];
        let usable =
            |e: &L1Entry<V>| now < e.times.expires_at && (stale_ok || now < e.times.fresh_until);
        found.extend(
            keys.iter()
                .map(|k| self.l1_get(k, now).filter(|e| usable(e))),
        );
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        count_n!(self, l1_hits, (keys.len() - missing.len()) as u64);
        count_n!(self, l1_misses, missing.len() as u64);
        if missing.is_empty() || !self.policy.tiers().l2() {
            return Ok((found, expects));
        }
        let epochs: Vec<u64> = missing.iter().map(|&i| self.epoch(&keys[i])).collect();
        let base = self.store_key_base().await?;
        let skeys: Vec<String> = missing
            .iter()
            .map(|&i| Self::with_key(&base, &keys[i]))
            .collect();
        let values = self.l2(self.store.get_many(&skeys)).await?;
        for (&i, bytes) in missing.iter().zip(values) {
            let (expect, entry) = self.read(bytes, now);
            expects[i] = Some(expect);
            found[i] = entry;
        }
        // (The L1 hits among them were checked as they were read, and pass again.)
        self.drop_stale_tagged(&mut found).await;
        let mut hits = 0;
        for (n, &i) in missing.iter().enumerate() {
            match &found[i] {
                Some(e) if usable(e) => {
                    hits += 1;
                    self.l1_put(&keys[i], e, epochs[n]);
                }
                _ => found[i] = None,
            }
        }
        count_n!(self, l2_hits, hits);
        count_n!(self, l2_misses, missing.len() as u64 - hits);
        Ok((found, expects))
    }

    /// The leader's work for one key: L2, then (under a lease, if configured) the loader,
    /// then the write-back. Returns the outcome, and the loader back when it was not used
    /// and a refresh is due (the L2 value was stale).
    async fn lead<F, Fut, E>(
        &self,
        key: &K,
        loader: F,
        fallback: Option<L1Entry<V>>,
        refresh: bool,
    ) -> (Shared<V>, Option<F>)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let epoch = self.epoch(key);
        let mut found = Found {
            expect: Expect::Absent,
            l2_ok: false,
            fallback,
        };
        let mut skey = None;
        if self.policy.tiers().l2()
            && let Ok(k) = self.store_key(key).await
        {
            let now = self.clock.now_ms();
            if let Ok((expect, entry)) = self.read_l2(&k, now).await {
                found.l2_ok = true;
                found.expect = expect;
                if let Some(e) = entry {
                    let fresh = now < e.times.fresh_until;
                    if now < e.times.expires_at && (fresh || !refresh) {
                        count!(self, l2_hits);
                        self.l1_put(key, &e, epoch);
                        if !fresh {
                            count!(self, stale_served);
                        }
                        return (Ok(e.value), (!fresh).then_some(loader));
                    }
                    if found
                        .fallback
                        .as_ref()
                        .is_none_or(|f| f.times.loaded_at < e.times.loaded_at)
                    {
                        found.fallback = Some(e);
                    }
                }
                count!(self, l2_misses);
            }
            skey = Some(k);
        }
        if let (Some(lease), Some(k), true) = (self.lease, skey.as_ref(), found.l2_ok) {
            return (
                self.lead_with_lease(key, k, lease, loader, found, epoch)
                    .await,
                None,
            );
        }
        (self.load_and_store(key, loader, found, epoch).await, None)
    }

    async fn lead_with_lease<F, Fut, E>(
        &self,
        key: &K,
        skey: &String,
        lease: Lease,
        loader: F,
        mut found: Found<V>,
        epoch: u64,
    ) -> Shared<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let waiter = {
            let mut map = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(map.entry(skey.to_owned()).or_default())
        };
        let _unregister = Unregister {
            waiters: &self.waiters,
            key: skey,
        };
        let notified = waiter.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let token = fastrand::u64(1..);
        let lkey = self.lease_key(skey);
        let ttl = lease.ttl.as_millis() as u64;
        match self.l2(self.store.try_lease(&lkey, token, ttl)).await {
            Ok(true) => {
                self.load_under_lease(key, skey, &lkey, token, loader, found, epoch)
                    .await
            }
            Ok(false) => {
                count!(self, lease_waits);
                // The holder's lease ends by `ttl` from now at the latest: if its value has
                // not come by then (its process died, or it let the lease lapse), the lease is
                // contended again, so one waiter loads instead of every waiter at `wait`.
                let deadline = tokio::time::Instant::now() + lease.wait;
                let mut retake_at = tokio::time::Instant::now() + lease.ttl;
                let woke = loop {
                    let until = deadline.min(retake_at);
                    if tokio::time::timeout_at(until, notified.as_mut())
                        .await
                        .is_ok()
                    {
                        break true;
                    }
                    if until == deadline {
                        break false;
                    }
                    // The value may have come without its message.
                    if let Some(value) = self.peer_value(key, skey, epoch, &mut found).await {
                        return Ok(value);
                    }
                    match self.l2(self.store.try_lease(&lkey, token, ttl)).await {
                        Ok(true) => {
                            count!(self, lease_takeovers);
                            return self
                                .load_under_lease(key, skey, &lkey, token, loader, found, epoch)
                                .await;
                        }
                        // Another waiter took it over: wait for its value.
                        Ok(false) => retake_at = tokio::time::Instant::now() + lease.ttl,
                        Err(_) => {
                            found.l2_ok = false;
                            break false;
                        }
                    }
                };
                if woke {
                    if let Some(value) = self.peer_value(key, skey, epoch, &mut found).await {
                        return Ok(value);
                    }
                    if waiter.failed.load(Ordering::Acquire) {
                        // The holder's loader failed moments ago: report that rather than
                        // repeat the load on every instance.
                        let now = self.clock.now_ms();
                        return match found.fallback {
                            Some(e) if now < self.policy.stale_until(&e.times) => {
                                count!(self, stale_served);
                                Ok(e.value)
                            }
                            _ => Err(CacheError::PeerLoadFailed),
                        };
                    }
                } else {
                    count!(self, lease_timeouts);
                }
                self.load_and_store(key, loader, found, epoch).await
            }
            Err(_) => {
                // L2 just failed: do not spend another timeout writing back.
                found.l2_ok = false;
                self.load_and_store(key, loader, found, epoch).await
            }
        }
    }

    /// The value another instance stored in L2 under `skey`, if it is there and not expired
    /// (counted as an L2 hit and put in L1). Records what L2 held in `found` for the write-back.
    async fn peer_value(
        &self,
        key: &K,
        skey: &String,
        epoch: u64,
        found: &mut Found<V>,
    ) -> Option<Option<V>> {
        let now = self.clock.now_ms();
        let (expect, entry) = self.read_l2(skey, now).await.ok()?;
        found.expect = expect;
        let e = entry.filter(|e| now < e.times.expires_at)?;
        count!(self, l2_hits);
        self.l1_put(key, &e, epoch);
        Some(e.value)
    }

    /// Loads as the holder of the lease `lkey` (taken with `token`): the load, then the
    /// release, then the message that wakes the instances waiting for it.
    #[allow(clippy::too_many_arguments)]
    async fn load_under_lease<F, Fut, E>(
        &self,
        key: &K,
        skey: &str,
        lkey: &str,
        token: u64,
        loader: F,
        found: Found<V>,
        epoch: u64,
    ) -> Shared<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let outcome = self.load_and_store(key, loader, found, epoch).await;
        let body = match &outcome {
            Ok(_) => Body::Filled(skey.to_owned()),
            Err(_) => Body::Failed(skey.to_owned()),
        };
        let _ = self.l2(self.store.release_lease(lkey, token)).await;
        let _ = self.publish_quiet(body).await;
        outcome
    }

    /// Publishes without counting it as an invalidation.
    async fn publish_quiet(&self, body: Body) -> Result<(), StoreError> {
        let m = Message::new(self.instance, &self.namespace, body);
        self.l2(self.store.publish(m.encode())).await
    }

    /// Calls the loader (catching a panic) and stores what it returned.
    async fn load_and_store<F, Fut, E>(
        &self,
        key: &K,
        loader: F,
        found: Found<V>,
        epoch: u64,
    ) -> Shared<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        count!(self, loads);
        let tag_time = self.tags.clock.load(Ordering::Acquire);
        let started = Instant::now();
        let result = AssertUnwindSafe(async move { loader().await })
            .catch_unwind()
            .await;
        add(
            &self.stats.load_micros,
            started.elapsed().as_micros() as u64,
        );
        let error = match result {
            Ok(Ok(value)) => {
                let load_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
                self.store_loaded(
                    key,
                    value.clone(),
                    load_ms,
                    found.expect,
                    found.l2_ok,
                    Before {
                        epoch,
                        tag_time,
                        started,
                    },
                )
                .await;
                return Ok(value);
            }
            Ok(Err(e)) => CacheError::Load(Arc::new(e)),
            Err(_) => CacheError::LoaderPanicked,
        };
        count!(self, load_errors);
        let now = self.clock.now_ms();
        match found.fallback {
            Some(e) if now < self.policy.stale_until(&e.times) => {
                count!(self, stale_served);
                tracing::warn!(cache.namespace = %self.namespace, "loader failed; serving a stale value");
                Ok(e.value.clone())
            }
            _ => Err(error),
        }
    }

    /// Writes a loaded value (or "not found") to L2 if nothing newer is there, and to L1 if
    /// no invalidation came since the load began.
    async fn store_loaded(
        &self,
        key: &K,
        value: Option<V>,
        load_ms: u32,
        expect: Expect,
        l2_ok: bool,
        before: Before,
    ) {
        if value.is_none() && self.policy.negative_ttl().is_none() {
            return;
        }
        let Before {
            epoch,
            tag_time,
            started,
        } = before;
        let tags = match &value {
            Some(v) => match self.tags_of(key, v, Some(tag_time)).await {
                Ok(t) => t,
                Err(()) => return,
            },
            None => None,
        };
        let now = self.clock.now_ms();
        let times = self
            .policy
            .times(now, load_ms, value.is_some(), fastrand::f64());
        let stamp = fastrand::u64(1..);
        let mut refused = false;
        if self.policy.tiers().l2() && l2_ok {
            if started.elapsed() >= self.policy.tombstone_ttl() {
                // An invalidation's tombstone may have come and gone during this load.
                refused = true;
                count!(self, stale_writes_refused);
            } else if let Some(bytes) = self
                .entry_bytes(value.as_ref(), stamp, times, tags.as_deref())
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, cache.namespace = %self.namespace, "value does not encode; not written to L2");
                    None
                })
            {
                let keep = self.policy.l2_keep_ms(&times, now);
                if let Ok(skey) = self.store_key(key).await {
                    match self.l2(self.store.set(&skey, bytes, keep, expect)).await {
                        Ok(true) => {}
                        Ok(false) => {
                            refused = true;
                            count!(self, stale_writes_refused);
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        if !refused {
            let entry = self.l1_entry(value, times, tags, now);
            self.l1_put(key, &entry, epoch);
        }
    }

    /// The L2 bytes of a value (or of "not found"); `None` when over `max_value_bytes`
    /// (counted).
    fn entry_bytes(
        &self,
        value: Option<&V>,
        stamp: u64,
        times: Times,
        tags: Option<&Tagged>,
    ) -> Result<Option<Vec<u8>>, CodecError> {
        let bytes = match value {
            Some(v) => {
                let payload = self.codec.encode(v)?;
                entry::encode(
                    Kind::Value,
                    stamp,
                    times,
                    tags,
                    &payload,
                    self.compress_above,
                )
            }
            None => entry::encode(Kind::Absent, stamp, times, None, &[], None),
        };
        if bytes.len() > self.max_value_bytes {
            count!(self, oversized);
            return Ok(None);
        }
        Ok(Some(bytes))
    }
}

/// Removes a waiter slot when its last user leaves.
struct Unregister<'a> {
    waiters: &'a Mutex<HashMap<String, Arc<Waiter>>>,
    key: &'a str,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(self.key).is_some_and(|w| Arc::strong_count(w) <= 2) {
            map.remove(self.key);
        }
    }
}
