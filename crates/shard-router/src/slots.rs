//! Logical slots: key -> one of a fixed number of slots -> a physical shard, through a
//! versioned map; and the plan that turns one map into another.

use std::collections::BTreeMap;

use crate::error::{BuildError, KeyError};
use crate::key::{Key, fast_range};
use crate::sharder::{ShardId, Sharder};

/// The most slots a map may have (slot numbers fit in 16 bits, ids carry them in 16 bits).
pub const MAX_SLOTS: u32 = 1 << 16;

/// The slot of a key among `slots`: the key's stable hash mapped onto `0..slots`. Fixed for the
/// life of the data: the slot count never changes, only which shard owns a slot.
///
/// ```
/// use stanchion_shard_router::{Key, slot_of};
/// assert!(slot_of(Key::from("tenant-7"), 4096) < 4096);
/// ```
#[inline]
pub fn slot_of(key: Key<'_>, slots: u32) -> u32 {
    fast_range(key.hash64(), slots)
}

/// A versioned, serializable table from slot to shard.
///
/// Keys hash to a fixed number of slots (4,096 is typical); the map says which physical shard
/// owns each slot. A shard is added by moving whole slots to it ([`ShardMap::add_shard`]), a hot
/// shard split by moving half of its slots ([`ShardMap::split`]); [`plan`] lists the moves
/// between two maps and the cutover carries them out. Every change bumps the version, and
/// writers holding an older version are refused on a moved slot.
///
/// ```
/// use stanchion_shard_router::{Key, ShardMap, Sharder, plan};
/// let v1 = ShardMap::uniform(4096, 3)?;
/// let v2 = v1.add_shard()?;
/// assert_eq!(v2.version(), v1.version() + 1);
/// let moves = plan(&v1, &v2)?;
/// // The new shard takes a quarter of the slots, and nothing else moves.
/// assert_eq!(moves.moves().len(), 1024);
/// assert!(moves.moves().iter().all(|m| m.to == 3));
/// assert_eq!(moves.apply(&v1)?, v2);
/// assert!(v2.shard(Key::Int(99))? < 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(try_from = "MapRepr", into = "MapRepr")
)]
pub struct ShardMap {
    version: u64,
    shards: u32,
    table: Box<[u16]>,
}

/// The serialized form: version, shard count and the owner of every slot, checked on the way in.
#[cfg(feature = "serde")]
#[derive(serde::Serialize, serde::Deserialize)]
struct MapRepr {
    version: u64,
    shards: u32,
    slots: Vec<u32>,
}

#[cfg(feature = "serde")]
impl TryFrom<MapRepr> for ShardMap {
    type Error = BuildError;
    fn try_from(r: MapRepr) -> Result<Self, BuildError> {
        let owners: Vec<Option<u32>> = r.slots.into_iter().map(Some).collect();
        ShardMap::from_owners(r.version, r.shards, &owners)
    }
}

#[cfg(feature = "serde")]
impl From<ShardMap> for MapRepr {
    fn from(m: ShardMap) -> Self {
        MapRepr {
            version: m.version,
            shards: m.shards,
            slots: m.table.iter().map(|s| u32::from(*s)).collect(),
        }
    }
}

impl ShardMap {
    /// Version 1: `slots` slots over `shards` shards in contiguous, equal blocks.
    pub fn uniform(slots: u32, shards: u32) -> Result<Self, BuildError> {
        check_counts(slots, shards)?;
        if shards > slots {
            return Err(BuildError::TooLarge {
                field: "shards",
                value: u64::from(shards),
                max: u64::from(slots),
            });
        }
        let owners: Vec<Option<u32>> = (0..slots)
            .map(|s| Some((u64::from(s) * u64::from(shards) / u64::from(slots)) as u32))
            .collect();
        Self::from_owners(1, shards, &owners)
    }

    /// A map from an explicit owner per slot (`None`: unassigned, which is refused, naming the
    /// slot). Every shard `0..shards` must own at least one slot.
    pub fn from_owners(
        version: u64,
        shards: u32,
        owners: &[Option<u32>],
    ) -> Result<Self, BuildError> {
        let slots = u32::try_from(owners.len()).unwrap_or(u32::MAX);
        check_counts(slots, shards)?;
        let mut table = Vec::with_capacity(owners.len());
        let mut owned = vec![false; shards as usize];
        for (slot, owner) in owners.iter().enumerate() {
            let slot = slot as u32;
            let shard = owner.ok_or(BuildError::UnassignedSlot { slot })?;
            if shard >= shards {
                return Err(BuildError::UnknownShard {
                    slot,
                    shard,
                    shards,
                });
            }
            owned[shard as usize] = true;
            table.push(shard as u16);
        }
        if let Some(idle) = owned.iter().position(|o| !o) {
            return Err(BuildError::IdleShard { shard: idle as u32 });
        }
        Ok(ShardMap {
            version,
            shards,
            table: table.into_boxed_slice(),
        })
    }

    /// The map's version (1 for a new map; each change adds one).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The number of slots.
    pub fn slots(&self) -> u32 {
        self.table.len() as u32
    }

    /// The slot of a key in this map.
    #[inline]
    pub fn slot(&self, key: Key<'_>) -> u32 {
        slot_of(key, self.slots())
    }

    /// The shard owning `slot` (`None` past the last slot).
    #[inline]
    pub fn owner(&self, slot: u32) -> Option<ShardId> {
        self.table.get(slot as usize).map(|s| u32::from(*s))
    }

    /// Slots owned by each shard.
    pub fn load(&self) -> Vec<u32> {
        let mut load = vec![0_u32; self.shards as usize];
        for s in self.table.iter() {
            load[*s as usize] += 1;
        }
        load
    }

    /// The slots a shard owns.
    pub fn slots_of(&self, shard: ShardId) -> Vec<u32> {
        (0..self.slots())
            .filter(|s| u32::from(self.table[*s as usize]) == shard)
            .collect()
    }

    /// The next version with one more shard, which takes `slots / (n + 1)` slots (rounded down)
    /// from the shards that own the most, one at a time: the fewest moves that leave every
    /// shard within one slot of the others (if they were before).
    pub fn add_shard(&self) -> Result<Self, BuildError> {
        let new = self.shards;
        if u64::from(new) + 1 > u64::from(self.slots()) {
            return Err(BuildError::TooLarge {
                field: "shards",
                value: u64::from(new) + 1,
                max: u64::from(self.slots()),
            });
        }
        let take = self.slots() / (new + 1);
        let mut owned: Vec<Vec<u32>> = vec![Vec::new(); new as usize];
        for (slot, shard) in self.table.iter().enumerate() {
            owned[*shard as usize].push(slot as u32);
        }
        let mut table = self.table.to_vec();
        for _ in 0..take {
            // The shard with the most slots gives its highest slot (ties: the lowest shard).
            let (donor, _) = owned
                .iter()
                .enumerate()
                .max_by_key(|(i, o)| (o.len(), std::cmp::Reverse(*i)))
                .expect("a map has at least one shard");
            let slot = owned[donor].pop().expect("the donor owns the most slots");
            table[slot as usize] = new as u16;
        }
        Ok(ShardMap {
            version: self.version + 1,
            shards: new + 1,
            table: table.into_boxed_slice(),
        })
    }

    /// The next version with one more shard that takes every other slot of `shard` (half its
    /// slots, and so about half its keys): for a shard that is hot or full.
    pub fn split(&self, shard: ShardId) -> Result<Self, BuildError> {
        let slots = self.slots_of(shard);
        if shard >= self.shards {
            return Err(BuildError::UnknownShard {
                slot: 0,
                shard,
                shards: self.shards,
            });
        }
        if slots.len() < 2 {
            return Err(BuildError::TooLarge {
                field: "split: slots of the shard",
                value: slots.len() as u64,
                max: 1,
            });
        }
        let new = self.shards;
        let mut table = self.table.to_vec();
        for slot in slots.iter().skip(1).step_by(2) {
            table[*slot as usize] = new as u16;
        }
        Ok(ShardMap {
            version: self.version + 1,
            shards: new + 1,
            table: table.into_boxed_slice(),
        })
    }

    /// The next version with `slot` owned by `shard` (an existing shard). For hand-made moves.
    pub fn reassign(&self, slot: u32, shard: ShardId) -> Result<Self, BuildError> {
        let mut owners: Vec<Option<u32>> = self.table.iter().map(|s| Some(u32::from(*s))).collect();
        let Some(entry) = owners.get_mut(slot as usize) else {
            return Err(BuildError::TooLarge {
                field: "slot",
                value: u64::from(slot),
                max: u64::from(self.slots()) - 1,
            });
        };
        *entry = Some(shard);
        Self::from_owners(self.version + 1, self.shards, &owners)
    }
}

fn check_counts(slots: u32, shards: u32) -> Result<(), BuildError> {
    if slots == 0 {
        return Err(BuildError::Zero { field: "slots" });
    }
    if slots > MAX_SLOTS {
        return Err(BuildError::TooLarge {
            field: "slots",
            value: u64::from(slots),
            max: u64::from(MAX_SLOTS),
        });
    }
    if shards == 0 {
        return Err(BuildError::Zero { field: "shards" });
    }
    Ok(())
}

impl Sharder for ShardMap {
    #[inline]
    fn shard(&self, key: Key<'_>) -> Result<ShardId, KeyError> {
        Ok(u32::from(self.table[self.slot(key) as usize]))
    }
    fn shard_count(&self) -> u32 {
        self.shards
    }
}

/// One slot changing owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Move {
    /// The slot.
    pub slot: u32,
    /// Its owner in the old map.
    pub from: ShardId,
    /// Its owner in the new map.
    pub to: ShardId,
}

/// Exactly the slots that change owner between two maps, in slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    from_version: u64,
    to_version: u64,
    to_shards: u32,
    moves: Vec<Move>,
}

/// The moves that turn `old` into `new` (same slot count; `new` must have a higher version).
pub fn plan(old: &ShardMap, new: &ShardMap) -> Result<Plan, BuildError> {
    if old.slots() != new.slots() {
        return Err(BuildError::SlotCountChanged {
            old: old.slots(),
            new: new.slots(),
        });
    }
    if new.version <= old.version {
        return Err(BuildError::StaleVersion {
            current: old.version,
            new: new.version,
        });
    }
    let moves = old
        .table
        .iter()
        .zip(new.table.iter())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(slot, (a, b))| Move {
            slot: slot as u32,
            from: u32::from(*a),
            to: u32::from(*b),
        })
        .collect();
    Ok(Plan {
        from_version: old.version,
        to_version: new.version,
        to_shards: new.shards,
        moves,
    })
}

impl Plan {
    /// Every move, in slot order.
    pub fn moves(&self) -> &[Move] {
        &self.moves
    }

    /// The moves grouped by (from, to): one copy job per pair of shards.
    pub fn by_route(&self) -> BTreeMap<(ShardId, ShardId), Vec<u32>> {
        let mut out: BTreeMap<(ShardId, ShardId), Vec<u32>> = BTreeMap::new();
        for m in &self.moves {
            out.entry((m.from, m.to)).or_default().push(m.slot);
        }
        out
    }

    /// The version the plan starts from.
    pub fn from_version(&self) -> u64 {
        self.from_version
    }

    /// The version the plan ends at.
    pub fn to_version(&self) -> u64 {
        self.to_version
    }

    /// The map this plan produces from `old`, which must be the map it was planned from (its
    /// version, and every moved slot still owned by its `from` shard).
    pub fn apply(&self, old: &ShardMap) -> Result<ShardMap, BuildError> {
        if old.version != self.from_version {
            return Err(BuildError::StaleVersion {
                current: old.version,
                new: self.from_version,
            });
        }
        let mut owners: Vec<Option<u32>> = old.table.iter().map(|s| Some(u32::from(*s))).collect();
        for m in &self.moves {
            if owners.get(m.slot as usize).copied().flatten() != Some(m.from) {
                return Err(BuildError::UnknownShard {
                    slot: m.slot,
                    shard: m.from,
                    shards: old.shards,
                });
            }
            owners[m.slot as usize] = Some(m.to);
        }
        ShardMap::from_owners(self.to_version, self.to_shards, &owners)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_shards_keeps_slots_within_one_of_each_other() {
        let mut map = ShardMap::uniform(4096, 1).unwrap();
        for n in 2..=40 {
            map = map.add_shard().unwrap();
            let load = map.load();
            assert_eq!(load.len(), n);
            let (lo, hi) = (load.iter().min().unwrap(), load.iter().max().unwrap());
            assert!(hi - lo <= 1, "{n} shards: {load:?}");
        }
    }

    #[test]
    fn bad_maps_name_the_field() {
        assert_eq!(
            ShardMap::uniform(0, 1).unwrap_err(),
            BuildError::Zero { field: "slots" }
        );
        assert_eq!(
            ShardMap::uniform(16, 0).unwrap_err(),
            BuildError::Zero { field: "shards" }
        );
        assert_eq!(
            ShardMap::from_owners(1, 2, &[Some(0), None, Some(1)]).unwrap_err(),
            BuildError::UnassignedSlot { slot: 1 }
        );
        assert_eq!(
            ShardMap::from_owners(1, 2, &[Some(0), Some(2)]).unwrap_err(),
            BuildError::UnknownShard {
                slot: 1,
                shard: 2,
                shards: 2
            }
        );
        assert_eq!(
            ShardMap::from_owners(1, 3, &[Some(0), Some(2)]).unwrap_err(),
            BuildError::IdleShard { shard: 1 }
        );
        assert!(matches!(
            ShardMap::uniform(MAX_SLOTS + 1, 1),
            Err(BuildError::TooLarge { field: "slots", .. })
        ));
    }

    #[test]
    fn split_moves_half_of_one_shard() {
        let v1 = ShardMap::uniform(64, 4).unwrap();
        let v2 = v1.split(2).unwrap();
        let p = plan(&v1, &v2).unwrap();
        assert_eq!(p.moves().len(), 8);
        assert!(p.moves().iter().all(|m| m.from == 2 && m.to == 4));
        assert_eq!(v2.load(), vec![16, 16, 8, 16, 8]);
    }
}
