//! Errors: configuration refused at build time, keys a sharder cannot place, ids, routing.

use std::time::Duration;

/// Configuration refused when it is built. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A count that must be at least one was zero.
    #[error("`{field}` must be at least 1")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// A count above what the structure can hold.
    #[error("`{field}` is {value}; at most {max} is allowed")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// What was given.
        value: u64,
        /// The largest allowed.
        max: u64,
    },
    /// A weight of zero (a shard that would never receive a key): remove the shard instead.
    #[error("`weights[{shard}]` is {weight}; weights must be finite and above zero")]
    BadWeight {
        /// The shard.
        shard: u32,
        /// The weight given.
        weight: String,
    },
    /// A ring or a rendezvous set without shards.
    #[error("`{field}` is empty: a sharder needs at least one shard")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// The ranges leave keys without a shard.
    #[error("`ranges[{index}]`: gap: {detail}")]
    RangeGap {
        /// The range after the gap (or the count of ranges for a gap at the top).
        index: usize,
        /// Which keys have no range.
        detail: String,
    },
    /// Two ranges claim the same keys, or a range is empty or reversed.
    #[error("`ranges[{index}]`: {detail}")]
    RangeOverlap {
        /// The range at fault.
        index: usize,
        /// What is wrong.
        detail: String,
    },
    /// A slot of a shard map has no shard.
    #[error("`slots[{slot}]` is not assigned to a shard")]
    UnassignedSlot {
        /// The first unassigned slot.
        slot: u32,
    },
    /// A slot assigned to a shard that does not exist.
    #[error("`slots[{slot}]` names shard {shard}, but the map has {shards} shards")]
    UnknownShard {
        /// The slot.
        slot: u32,
        /// The shard it names.
        shard: u32,
        /// How many shards the map has.
        shards: u32,
    },
    /// A shard of the map owns no slot (it would receive nothing; remove it or give it slots).
    #[error("shard {shard} owns no slot in `slots`")]
    IdleShard {
        /// The shard.
        shard: u32,
    },
    /// Two maps that cannot be compared (different slot counts).
    #[error("the maps have {old} and {new} slots; a plan needs the same slot count")]
    SlotCountChanged {
        /// Slots of the old map.
        old: u32,
        /// Slots of the new map.
        new: u32,
    },
    /// A new map must have a higher version than the one it replaces.
    #[error("`version` {new} is not above the current version {current}")]
    StaleVersion {
        /// The version in use.
        current: u64,
        /// The version offered.
        new: u64,
    },
    /// An id layout whose fields do not fit, or a node id that does not fit its field.
    #[error("id layout: {0}")]
    IdLayout(String),
    /// The router was given a different number of shards than its map names.
    #[error("the map has {map} shards but {given} were given")]
    ShardCountMismatch {
        /// Shards in the map.
        map: u32,
        /// Shards handed to the router.
        given: usize,
    },
}

/// A key the sharder cannot place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// This sharder places only keys of another kind (ranges built over integers get a text key).
    #[error("{sharder} places {expected} keys, not {kind} keys")]
    Kind {
        /// The sharder.
        sharder: &'static str,
        /// The kind it places.
        expected: &'static str,
        /// The kind it was given.
        kind: &'static str,
    },
}

/// An id could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The clock went back further than the generator tolerates; it never issues an id below
    /// one it issued. Retry after `retry_after`, or fix the clock.
    #[error(
        "the clock went back {behind:?} (tolerance {tolerance:?}); retry after {retry_after:?}"
    )]
    ClockWentBack {
        /// How far behind the last issued time the clock is.
        behind: Duration,
        /// The configured tolerance.
        tolerance: Duration,
        /// When the clock will have caught up.
        retry_after: Duration,
    },
    /// Every sequence number of the time units the generator may borrow ahead is used.
    #[error("id sequence exhausted for this time unit; retry after {retry_after:?}")]
    Exhausted {
        /// When a new time unit starts.
        retry_after: Duration,
    },
    /// The slot does not fit the layout's slot field.
    #[error("slot {slot} does not fit in {bits} bits")]
    SlotTooLarge {
        /// The slot given.
        slot: u32,
        /// The layout's slot bits.
        bits: u8,
    },
    /// The clock is past the last time the layout can represent.
    #[error("the id layout's time field is exhausted (epoch plus {lifetime:?} is past)")]
    OutOfTime {
        /// How long the layout lasts after its epoch.
        lifetime: Duration,
    },
    /// The clock reads before the layout's epoch.
    #[error("the clock reads before the id layout's epoch")]
    BeforeEpoch,
}

/// A routing decision that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The slot is being moved or has moved: the caller's map is older than the slot's owner
    /// knows. Reload the map (its version must be at least `version`) and route again.
    #[error("slot {slot} moved (map version {version} or later owns it); reload the shard map")]
    SlotMoved {
        /// The slot.
        slot: u32,
        /// The map version that moved it.
        version: u64,
    },
    /// The slot is fenced for a cutover: writes wait for the new owner.
    #[error("slot {slot} is fenced for a move; retry after the cutover")]
    SlotFenced {
        /// The slot.
        slot: u32,
    },
}
