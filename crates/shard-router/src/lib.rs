//! Keys to logical slots to physical databases.
//!
//! - [`Sharder`]: a pure, synchronous key -> shard function, with [`Modulo`], [`JumpHash`],
//!   [`Rendezvous`] (weighted), [`Ring`] (virtual nodes), [`Ranges`] and [`PgHash`] (the
//!   partition PostgreSQL's own `PARTITION BY HASH` picks).
//! - [`ShardMap`]: key -> one of a fixed number of slots -> shard, versioned and serializable
//!   (feature `serde`); [`plan`] lists the slot moves between two maps; adding a shard or
//!   splitting a hot one moves the fewest slots.
//! - [`ShardRouter`]: routes a key, a batch grouped by shard, or an id by the slot it carries to
//!   one `T` per shard (sqlx pools, or anything `Clone`), with pinned keys.
//! - [`Scatter`]: queries over many shards with a concurrency limit, a deadline and a partial
//!   failure policy; [`merge_sorted`] for paginated lists across shards.
//! - [`IdGenerator`]: 63-bit and 53-bit ids that carry their slot.
//! - [`HotKeys`] and [`ShardCounters`]: hot keys and hot shards in bounded memory.
//! - Feature `postgres`: a directory of pinned keys in a table with a bounded cache, and the
//!   fenced slot cutover that moves rows between databases while
//!   writers keep writing, and the write guard that refuses writers holding an old map.
//!
//! ```
//! use stanchion_shard_router::{Key, ShardMap, ShardRouter, plan};
//! // 4,096 slots over two databases; a third is added by moving a third of the slots.
//! let v1 = ShardMap::uniform(4096, 2)?;
//! let router = ShardRouter::new(v1.clone(), vec!["pg-a", "pg-b"])?;
//! let before = router.route(Key::from("tenant-42"));
//! let v2 = v1.add_shard()?;
//! assert_eq!(plan(&v1, &v2)?.moves().len(), 1365);
//! router.update(v2, vec!["pg-a", "pg-b", "pg-c"])?;
//! let after = router.route(Key::from("tenant-42"));
//! assert!(after.target == before.target || after.target == "pg-c");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "postgres")]
pub mod cutover;
#[cfg(feature = "postgres")]
pub mod directory;
mod error;
mod hot;
mod id;
mod key;
mod pg;
mod router;
mod scatter;
mod sharder;
mod slots;

pub use error::{BuildError, IdError, KeyError, RouteError};
pub use hot::{HotKey, HotKeys, ShardCounters};
pub use id::{IdClock, IdGenerator, IdLayout, IdParts, ManualIdClock, SystemIdClock};
pub use key::Key;
pub use pg::PgHash;
pub use router::{Group, Route, ShardRouter};
pub use scatter::{Gathered, OnShardFailure, Scatter, ScatterError, ShardFailure, merge_sorted};
pub use sharder::{JumpHash, Modulo, Ranges, Rendezvous, Ring, ShardId, Sharder};
pub use slots::{MAX_SLOTS, Move, Plan, ShardMap, plan, slot_of};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
