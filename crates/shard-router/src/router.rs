//! The router: keys to the things that hold their shard (sqlx pools, or anything `Clone`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use crate::error::BuildError;
use crate::hot::ShardCounters;
use crate::id::IdLayout;
use crate::key::Key;
use crate::sharder::{ShardId, Sharder};
use crate::slots::ShardMap;

/// Routes keys through a [`ShardMap`] to one `T` per shard (a `sqlx::PgPool`, a
/// `sqlx::SqlitePool`, a client, a name): one key, a batch grouped by shard, an id by the slot it
/// carries, or every shard. Pinned keys (a large tenant on its own shard) override the hash.
///
/// The map and the shards are swapped together and atomically by [`ShardRouter::update`], whose
/// version must be higher; a route says which version it was made with.
///
/// ```
/// use stanchion_shard_router::{Key, ShardMap, ShardRouter};
/// let router = ShardRouter::new(ShardMap::uniform(4096, 2)?, vec!["db-a", "db-b"])?;
/// let route = router.route(Key::from("tenant-1"));
/// assert!(["db-a", "db-b"].contains(&route.target));
/// router.pin(Key::from("big-tenant"), 1)?;
/// assert_eq!(router.route(Key::from("big-tenant")).target, "db-b");
/// let groups = router.group([Key::Int(1), Key::Int(2), Key::Int(3)]);
/// assert_eq!(groups.values().map(|g| g.indexes.len()).sum::<usize>(), 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ShardRouter<T> {
    state: RwLock<Arc<State<T>>>,
}

#[derive(Debug)]
struct State<T> {
    map: ShardMap,
    shards: Vec<T>,
    counters: Arc<ShardCounters>,
    pins: HashMap<OwnedKey, ShardId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum OwnedKey {
    Int(i64),
    Bytes(Vec<u8>),
}

impl From<Key<'_>> for OwnedKey {
    fn from(k: Key<'_>) -> Self {
        match k {
            Key::Int(v) => OwnedKey::Int(v),
            Key::Text(s) => OwnedKey::Bytes(s.as_bytes().to_vec()),
            Key::Bytes(b) => OwnedKey::Bytes(b.to_vec()),
        }
    }
}

/// Where one key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<T> {
    /// The shard.
    pub shard: ShardId,
    /// The key's slot (`None` for a pinned key, which is placed without its slot).
    pub slot: Option<u32>,
    /// The map version the route was made with.
    pub version: u64,
    /// What holds the shard.
    pub target: T,
}

/// The keys of a batch that share a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group<T> {
    /// What holds the shard.
    pub target: T,
    /// Positions in the batch of the keys on this shard.
    pub indexes: Vec<usize>,
}

impl<T: Clone> ShardRouter<T> {
    /// A router over `map`, with `shards[i]` holding shard `i`.
    pub fn new(map: ShardMap, shards: Vec<T>) -> Result<Self, BuildError> {
        check(&map, shards.len())?;
        Ok(ShardRouter {
            state: RwLock::new(Arc::new(State {
                counters: Arc::new(ShardCounters::new(shards.len() as u32)),
                map,
                shards,
                pins: HashMap::new(),
            })),
        })
    }

    fn state(&self) -> Arc<State<T>> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The shard of one key (a slot map places every key of every kind).
    pub fn route(&self, key: Key<'_>) -> Route<T> {
        let s = self.state();
        let (shard, slot) = match pinned(&s, key) {
            Some(shard) => (shard, None),
            None => {
                let slot = s.map.slot(key);
                (s.map.owner(slot).expect("a slot of the map"), Some(slot))
            }
        };
        s.counters.add(shard, 1);
        Route {
            shard,
            slot,
            version: s.map.version(),
            target: s.shards[shard as usize].clone(),
        }
    }

    /// The target of a shard chosen elsewhere (a directory entry): `None` if the map has no
    /// such shard.
    pub fn route_on(&self, shard: ShardId) -> Option<Route<T>> {
        let s = self.state();
        let target = s.shards.get(shard as usize)?.clone();
        s.counters.add(shard, 1);
        Some(Route {
            shard,
            slot: None,
            version: s.map.version(),
            target,
        })
    }

    /// The shard of a slot (for an id, use [`ShardRouter::route_id`]).
    pub fn route_slot(&self, slot: u32) -> Option<Route<T>> {
        let s = self.state();
        let shard = s.map.owner(slot)?;
        s.counters.add(shard, 1);
        Some(Route {
            shard,
            slot: Some(slot),
            version: s.map.version(),
            target: s.shards[shard as usize].clone(),
        })
    }

    /// The shard of a row from its id alone (the id carries its slot; see [`IdLayout`]).
    /// `None` if the id's slot is past the map's slots.
    pub fn route_id(&self, layout: &IdLayout, id: i64) -> Option<Route<T>> {
        self.route_slot(layout.slot(id))
    }

    /// A batch of keys grouped by shard: run one `= ANY($1)` query per group.
    pub fn group<'k>(
        &self,
        keys: impl IntoIterator<Item = Key<'k>>,
    ) -> BTreeMap<ShardId, Group<T>> {
        let s = self.state();
        let mut out: BTreeMap<ShardId, Group<T>> = BTreeMap::new();
        for (i, key) in keys.into_iter().enumerate() {
            let shard = pinned(&s, key)
                .unwrap_or_else(|| s.map.owner(s.map.slot(key)).expect("a slot of the map"));
            s.counters.add(shard, 1);
            out.entry(shard)
                .or_insert_with(|| Group {
                    target: s.shards[shard as usize].clone(),
                    indexes: Vec::new(),
                })
                .indexes
                .push(i);
        }
        out
    }

    /// Every shard, in order: for a scatter-gather over all of them.
    pub fn all(&self) -> Vec<(ShardId, T)> {
        let s = self.state();
        s.shards
            .iter()
            .enumerate()
            .map(|(i, t)| (i as ShardId, t.clone()))
            .collect()
    }

    /// The map in use.
    pub fn map(&self) -> ShardMap {
        self.state().map.clone()
    }

    /// The version of the map in use.
    pub fn version(&self) -> u64 {
        self.state().map.version()
    }

    /// Routed keys per shard since the map was last updated with [`ShardRouter::update`] (a
    /// hot shard shows here).
    pub fn counts(&self) -> Vec<u64> {
        self.state().counters.snapshot()
    }

    /// Places `key` on `shard` whatever its hash says (a tenant with a shard of its own).
    /// Rows of a pinned key are not moved by slot moves: move them yourself, then pin.
    pub fn pin(&self, key: Key<'_>, shard: ShardId) -> Result<(), BuildError> {
        self.edit(|s| {
            if shard >= s.map.shard_count() {
                return Err(BuildError::UnknownShard {
                    slot: 0,
                    shard,
                    shards: s.map.shard_count(),
                });
            }
            s.pins.insert(key.into(), shard);
            Ok(())
        })
    }

    /// Removes a pin; the key follows its slot again.
    pub fn unpin(&self, key: Key<'_>) {
        let _ = self.edit(|s| {
            s.pins.remove(&OwnedKey::from(key));
            Ok(())
        });
    }

    /// Swaps in a newer map and the shards it names (`shards[i]` holds shard `i`), atomically
    /// for every later route. Refused if the version is not higher or the counts differ.
    pub fn update(&self, map: ShardMap, shards: Vec<T>) -> Result<(), BuildError> {
        check(&map, shards.len())?;
        let mut guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        if map.version() <= guard.map.version() {
            return Err(BuildError::StaleVersion {
                current: guard.map.version(),
                new: map.version(),
            });
        }
        let pins = guard.pins.clone();
        *guard = Arc::new(State {
            counters: Arc::new(ShardCounters::new(shards.len() as u32)),
            map,
            shards,
            pins,
        });
        Ok(())
    }

    fn edit(
        &self,
        f: impl FnOnce(&mut State<T>) -> Result<(), BuildError>,
    ) -> Result<(), BuildError> {
        let mut guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut next = State {
            map: guard.map.clone(),
            shards: guard.shards.clone(),
            counters: guard.counters.clone(),
            pins: guard.pins.clone(),
        };
        f(&mut next)?;
        *guard = Arc::new(next);
        Ok(())
    }
}

fn pinned<T>(s: &State<T>, key: Key<'_>) -> Option<ShardId> {
    if s.pins.is_empty() {
        return None;
    }
    s.pins.get(&OwnedKey::from(key)).copied()
}

fn check(map: &ShardMap, given: usize) -> Result<(), BuildError> {
    if map.shard_count() as usize != given {
        return Err(BuildError::ShardCountMismatch {
            map: map.shard_count(),
            given,
        });
    }
    Ok(())
}
