//! A transactional outbox: events written in the same transaction as the business change, and
//! relays that publish them afterwards, losing nothing.
//!
//! - [`Event`]: what the application writes, with an ordering key (the aggregate id), a type, a
//!   payload and headers (a `traceparent` among them).
//! - [`PgOutbox`] (feature `postgres`) and [`SqliteOutbox`] (feature `sqlite`, the embedded
//!   default): `enqueue(&mut tx, &event)` in the caller's transaction, one statement (a batch
//!   is one statement too); the raw schema ([`postgres_schema`], [`sqlite_schema`]) for teams
//!   with their own migration tool, `migrate()` behind the `migrate` feature; dead-letter
//!   operations and retention.
//! - [`OutboxStore`]: the relay-side seam both stores implement.
//! - [`Relay`]: claims lanes under a lease, publishes in per-key order, retries with backoff
//!   and jitter, dead-letters after N attempts, stops gracefully; [`RelayStats`].
//! - [`Publisher`]: the broker seam; [`ChannelPublisher`] in process, [`RedisStreamPublisher`]
//!   (feature `redis`), [`JetStreamPublisher`] (feature `nats`).
//! - [`PgInbox`] / [`SqliteInbox`]: at most one effect per message id in the consumer's own
//!   transaction; [`RedisStreamConsumer`] reads with consumer groups and takes over a dead
//!   consumer's entries.
//!
//! Guarantees: at-least-once publishing (an event is published after its transaction commits,
//! possibly more than once if a relay dies between publishing and recording it), per-key order
//! (a key's events are published in id order; a failing event holds back only its own key until
//! it succeeds or is dead-lettered), and with an inbox, an exactly-once effect per consumer.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use stanchion_outbox::{ChannelPublisher, Event, OutboxConfig, Relay, SqliteOutbox};
//! // One connection: an in-memory database shared by several connections locks whole tables.
//! let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
//! let outbox = SqliteOutbox::new(pool.clone(), OutboxConfig::default());
//! sqlx::raw_sql(sqlx::AssertSqlSafe(stanchion_outbox::sqlite_schema(outbox.config()))).execute(&pool).await?;
//! sqlx::query("CREATE TABLE products (id INTEGER PRIMARY KEY)").execute(&pool).await?;
//! sqlx::query("INSERT INTO products VALUES (42)").execute(&pool).await?;
//!
//! let (publisher, mut published) = ChannelPublisher::new(16);
//! let relay = Relay::builder(outbox.clone(), publisher).build()?.start().await?;
//!
//! // The delete and its event commit together, or neither does.
//! let mut tx = pool.begin().await?;
//! sqlx::query("DELETE FROM products WHERE id = 42").execute(&mut *tx).await?;
//! outbox.enqueue(&mut tx, &Event::json("product-42", "product.deleted", &42)?).await?;
//! tx.commit().await?;
//!
//! let m = published.recv().await.unwrap();
//! assert_eq!((m.key.as_str(), m.event_type.as_str()), ("product-42", "product.deleted"));
//! relay.shutdown(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! | feature | gives |
//! |---|---|
//! | `sqlite` (default) | [`SqliteOutbox`], [`SqliteInbox`] |
//! | `postgres` | [`PgOutbox`], [`PgInbox`] |
//! | `migrate` | `migrate()` on the stores |
//! | `redis` | [`RedisStreamPublisher`], [`RedisStreamConsumer`] |
//! | `nats` | [`JetStreamPublisher`], [`JetStreamConsumer`] |
//! | `metrics` | counters, gauges and a latency histogram (see `docs/operations.md`) |

mod config;
mod error;
mod event;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod inbox;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "postgres")]
mod pg;
mod publish;
#[cfg(feature = "redis")]
mod redis;
mod relay;
#[cfg(feature = "sqlite")]
mod sqlite;
mod store;

pub use config::{OutboxConfig, OutboxConfigBuilder};
pub use error::{
    BoxError, BuildError, ConsumeError, EnqueueError, InboxError, PublishError, RelayError,
    StoreError,
};
pub use event::{Event, Headers, MAX_KEY_BYTES, Message, MessageId, TRACEPARENT};
#[cfg(feature = "postgres")]
pub use inbox::PgInbox;
#[cfg(feature = "sqlite")]
pub use inbox::SqliteInbox;
#[cfg(feature = "nats")]
pub use nats::{JetStreamConsumer, JetStreamDelivery, JetStreamPublisher};
#[cfg(feature = "postgres")]
pub use pg::{PgOutbox, postgres_schema};
pub use publish::{ChannelPublisher, Publisher};
#[cfg(feature = "redis")]
pub use redis::{Delivery, RedisStreamConsumer, RedisStreamPublisher};
pub use relay::{Relay, RelayBuilder, RelayHandle, RelayStats};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteOutbox, sqlite_schema};
pub use store::{
    DeadLetter, Failure, LaneClaim, Marked, Next, OutboxStore, Pending, StoreStats, Wakeups,
};

#[cfg(all(doctest, feature = "sqlite"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
