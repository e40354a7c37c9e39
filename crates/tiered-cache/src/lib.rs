//! An in-process cache (L1, [moka]) in front of a shared one (L2, Redis), for web backends
//! running on many instances.
//!
//! - **One load per key**, in a process (single flight) and, with a lease, across every
//!   instance sharing the L2: a hot key expiring on fifty pods calls the database once.
//! - **Invalidation that reaches every instance**: L1 copies are dropped through the store's
//!   pub/sub bus, L2 keeps a short tombstone so that a load begun before an invalidation does
//!   not write its older value back, and a whole namespace is invalidated by moving to a new
//!   generation (no key scans, works on Redis Cluster).
//! - **Redis failing is not an error** for calls with a loader: L2 calls have a tight timeout,
//!   a [`SkipPolicy`] stops calling a failing L2 for a while, and L1 plus the loader serve.
//! - **Per-type policies** ([`Policy`]): TTL with jitter, a shorter L1 TTL, soft TTL with one
//!   background refresh per key, cached "not found", stale values served when loading fails,
//!   probabilistic early refresh.
//!
//! # Quick example
//! ```
//! use std::time::Duration;
//! use stanchion_tiered_cache::{MemoryCacheStore, Policy, TieredCache};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let policy = Policy::builder(Duration::from_secs(3600)).build()?;
//! let cache = TieredCache::<u64, String, _>::builder("product", MemoryCacheStore::new(), policy)
//!     .build()?;
//! let loaded = cache
//!     .get_or_load(&1, || async { Ok::<_, std::io::Error>(Some("lamp".to_string())) })
//!     .await?;
//! assert_eq!(loaded.as_deref(), Some("lamp"));
//! cache.invalidate(&1).await?;
//! assert_eq!(cache.get(&1).await?, None);
//! # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
//! ```
//!
//! # Concepts
//! | seam | what it decides | default |
//! |---|---|---|
//! | [`CacheStore`] | where L2 entries, leases and bus messages live | [`MemoryCacheStore`]; `RedisCacheStore` (feature `redis`) |
//! | [`Codec`] | value bytes | [`Postcard`]; `Json` (feature `json`) |
//! | [`SkipPolicy`] | when to stop calling a failing L2 | [`ConsecutiveFailures`] (3 failures, 5 s) |
//! | [`Clock`] | wall time for TTLs | [`SystemClock`]; [`ManualClock`] in tests |
//!
//! # Feature flags
//! | feature | enables |
//! |---|---|
//! | `redis` | `RedisCacheStore` (single server and Redis Cluster) |
//! | `json` | the `Json` codec |
//! | `metrics` | counters `cache.<stat>` (every field of [`Stats`]) through the `metrics` facade, labelled `cache.namespace` |
//!
//! # Observability
//! [`TieredCache::stats`] returns every counter. Events: `warn` when L2 is skipped, when a
//! corrupt L2 entry is read and when a stale value is served because the loader failed;
//! `info`/`warn` when the bus reconnects or loses its connection; fields `cache.namespace`,
//! `error`.
//!
//! # MSRV
//! Rust 1.94.
//!
//! [moka]: https://docs.rs/moka

mod batch;
mod bus;
mod cache;
mod clock;
mod codec;
mod entry;
mod error;
mod memory;
mod policy;
#[cfg(feature = "redis")]
mod redis;
mod skip;
mod stats;
mod store;

pub use batch::{BatchLoadError, BatchLoader, MAX_BATCH_KEYS, MAX_BATCH_WINDOW};
pub use cache::{TieredCache, TieredCacheBuilder};
pub use clock::{Clock, ManualClock, SystemClock};
#[cfg(feature = "json")]
pub use codec::Json;
pub use codec::{Codec, Postcard};
pub use error::{BuildError, CacheError, CodecError, StoreError};
pub use memory::MemoryCacheStore;
pub use policy::{MAX_TTL, Policy, PolicyBuilder, Tiers};
#[cfg(feature = "redis")]
pub use redis::RedisCacheStore;
pub use skip::{ConsecutiveFailures, SkipPolicy};
pub use stats::Stats;
pub use store::{BusEvent, CacheStore, Expect, Subscription};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
