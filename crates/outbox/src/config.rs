//! The outbox's table layout and limits, shared by the writer and the relays.

use crate::error::BuildError;

/// Where the outbox lives and what it accepts. Build it once and give the same configuration to
/// the writers' store and the relays' store.
///
/// ```
/// use stanchion_outbox::OutboxConfig;
/// let config = OutboxConfig::builder().namespace("shop").lanes(32).build()?;
/// assert_eq!(config.namespace(), "shop");
/// assert!(OutboxConfig::builder().namespace("shop; drop table").build().is_err());
/// # Ok::<(), stanchion_outbox::BuildError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    namespace: String,
    lanes: u32,
    max_event_bytes: usize,
    notify: bool,
    keep_published: bool,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            namespace: "stanchion".to_owned(),
            lanes: 64,
            max_event_bytes: 1 << 20,
            notify: true,
            keep_published: true,
        }
    }
}

impl OutboxConfig {
    /// A builder starting from the defaults: namespace `stanchion`, 64 lanes, events up to
    /// 1 MiB, NOTIFY on.
    pub fn builder() -> OutboxConfigBuilder {
        OutboxConfigBuilder {
            config: Self::default(),
        }
    }
    /// PostgreSQL schema, or SQLite table prefix (`{namespace}_outbox`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// Number of lanes: ordering keys hash to lanes, one relay holds a lane at a time.
    pub fn lanes(&self) -> u32 {
        self.lanes
    }
    /// Largest accepted event (payload + key + type + encoded headers), in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }
    /// Whether PostgreSQL enqueues send a NOTIFY that wakes the relays.
    pub fn notify(&self) -> bool {
        self.notify
    }
    /// Whether published rows are kept (marked with their publish time) or deleted when they
    /// are published.
    pub fn keep_published(&self) -> bool {
        self.keep_published
    }
    /// The lane an ordering key belongs to.
    pub fn lane_of(&self, key: &str) -> u32 {
        // `lanes` is at most 65,536, so the remainder fits.
        (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % u64::from(self.lanes)) as u32
    }
    /// The LISTEN/NOTIFY channel of this outbox.
    pub fn channel(&self) -> String {
        format!("{}_outbox", self.namespace)
    }
}

/// Builder for [`OutboxConfig`].
#[derive(Debug, Clone)]
#[must_use]
pub struct OutboxConfigBuilder {
    config: OutboxConfig,
}

impl OutboxConfigBuilder {
    /// PostgreSQL schema / SQLite table prefix; `[a-z_][a-z0-9_]{0,39}`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.namespace = namespace.into();
        self
    }
    /// Lanes (1 to 65,536). More lanes let more relays work in parallel; the count is fixed once
    /// events exist (changing it needs a drained outbox).
    pub fn lanes(mut self, lanes: u32) -> Self {
        self.config.lanes = lanes;
        self
    }
    /// Largest accepted event in bytes (at most 512 MiB).
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.config.max_event_bytes = bytes;
        self
    }
    /// Send a NOTIFY with each PostgreSQL enqueue (default on). Off, relays poll.
    pub fn notify(mut self, on: bool) -> Self {
        self.config.notify = on;
        self
    }
    /// Keep published rows, marked with their publish time, until `purge_published` removes
    /// them (default on: a recent history of what was published, for operators). Off, the relay
    /// deletes each row in the statement that would have marked it: no history, nothing for
    /// `purge_published` to do, and less work for the database per event (a delete adds no index
    /// entries where a mark adds two; see `docs/benchmarks.md` for the measured difference).
    /// Dead letters are kept either way.
    ///
    /// ```
    /// let config = stanchion_outbox::OutboxConfig::builder().keep_published(false).build()?;
    /// assert!(!config.keep_published());
    /// # Ok::<(), stanchion_outbox::BuildError>(())
    /// ```
    pub fn keep_published(mut self, on: bool) -> Self {
        self.config.keep_published = on;
        self
    }
    /// Validates and builds.
    pub fn build(self) -> Result<OutboxConfig, BuildError> {
        let c = self.config;
        validate_name("namespace", &c.namespace)?;
        if c.lanes == 0 {
            return Err(BuildError::Zero { field: "lanes" });
        }
        if c.lanes > 65_536 {
            return Err(BuildError::OutOfRange {
                field: "lanes",
                reason: format!("must be at most 65,536, got {}", c.lanes),
            });
        }
        if c.max_event_bytes == 0 {
            return Err(BuildError::Zero {
                field: "max_event_bytes",
            });
        }
        if c.max_event_bytes > 512 << 20 {
            return Err(BuildError::OutOfRange {
                field: "max_event_bytes",
                reason: format!("must be at most 512 MiB, got {}", c.max_event_bytes),
            });
        }
        Ok(c)
    }
}

pub(crate) fn validate_name(field: &'static str, name: &str) -> Result<(), BuildError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BuildError::InvalidName {
            field,
            len: name.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_carry_sql_are_refused() {
        for bad in [
            "",
            "Shop",
            "1shop",
            "shop-x",
            "shop;drop",
            "a\"b",
            &"x".repeat(41),
        ] {
            assert!(
                OutboxConfig::builder().namespace(bad).build().is_err(),
                "{bad}"
            );
        }
        for good in ["shop", "_x", "s2_outbox"] {
            assert!(OutboxConfig::builder().namespace(good).build().is_ok());
        }
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(
            OutboxConfig::builder().lanes(0).build(),
            Err(BuildError::Zero { field: "lanes" })
        );
        assert!(OutboxConfig::builder().lanes(65_537).build().is_err());
        assert!(OutboxConfig::builder().max_event_bytes(0).build().is_err());
        assert!(
            OutboxConfig::builder()
                .max_event_bytes(usize::MAX)
                .build()
                .is_err()
        );
    }

    #[test]
    fn a_key_always_lands_in_the_same_lane_and_lanes_fill_evenly() {
        let c = OutboxConfig::builder().lanes(16).build().unwrap();
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            let key = format!("order-{i}");
            let lane = c.lane_of(&key);
            assert_eq!(lane, c.lane_of(&key));
            counts[lane as usize] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }
}
