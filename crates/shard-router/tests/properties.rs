//! Property tests: determinism, minimal movement, plans, ids, hot keys.

use std::collections::HashMap;

use proptest::prelude::*;
use stanchion_shard_router::{
    HotKeys, IdGenerator, IdLayout, JumpHash, Key, ManualIdClock, Rendezvous, ShardMap, Sharder,
    plan,
};

const EPOCH: u64 = 1_767_225_600_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_sharder_is_deterministic_and_in_range(k in any::<i64>(), t in ".{0,40}", n in 1_u32..200) {
        let sharders: Vec<Box<dyn Sharder>> = vec![
            Box::new(JumpHash::new(n).unwrap()),
            Box::new(Rendezvous::new(n).unwrap()),
            Box::new(ShardMap::uniform(4096, n).unwrap()),
            Box::new(stanchion_shard_router::Ring::new(n, 8).unwrap()),
            Box::new(stanchion_shard_router::PgHash::new(n).unwrap()),
        ];
        for s in &sharders {
            let a = s.shard(Key::Int(k)).unwrap();
            prop_assert!(a < n);
            prop_assert_eq!(a, s.shard(Key::Int(k)).unwrap());
            let b = s.shard(Key::Text(&t)).unwrap();
            prop_assert!(b < n);
            prop_assert_eq!(b, s.shard(Key::Text(&t)).unwrap());
        }
    }

    /// Growing jump hash or rendezvous moves a key only onto the new shard.
    #[test]
    fn growth_moves_keys_only_to_the_new_shard(k in any::<i64>(), n in 1_u32..100) {
        let (j0, j1) = (JumpHash::new(n).unwrap(), JumpHash::new(n + 1).unwrap());
        let (a, b) = (j0.shard(Key::Int(k)).unwrap(), j1.shard(Key::Int(k)).unwrap());
        prop_assert!(a == b || b == n);
        let (r0, r1) = (Rendezvous::new(n).unwrap(), Rendezvous::new(n + 1).unwrap());
        let (a, b) = (r0.shard(Key::Int(k)).unwrap(), r1.shard(Key::Int(k)).unwrap());
        prop_assert!(a == b || b == n);
    }

    /// A plan applied to its old map gives the new map; it lists exactly the changed slots; and
    /// adding a shard moves only slots onto the new shard, as few as balance needs.
    #[test]
    fn plans_are_exact(slots in 1_u32..2000, shards in 1_u32..20, steps in proptest::collection::vec(0_u8..3, 1..6)) {
        prop_assume!(shards <= slots);
        let mut map = ShardMap::uniform(slots, shards).unwrap();
        for step in steps {
            let next = match step {
                0 if map.shard_count() < slots => map.add_shard().unwrap(),
                1 => {
                    let load = map.load();
                    let hot = (0..load.len()).max_by_key(|i| load[*i]).unwrap() as u32;
                    if load[hot as usize] < 2 { continue; }
                    map.split(hot).unwrap()
                }
                _ => {
                    let slot = slots / 2;
                    let to = (map.owner(slot).unwrap() + 1) % map.shard_count();
                    match map.reassign(slot, to) { Ok(m) => m, Err(_) => continue }
                }
            };
            let p = plan(&map, &next).unwrap();
            prop_assert_eq!(p.apply(&map).unwrap(), next.clone());
            let changed = (0..slots).filter(|s| map.owner(*s) != next.owner(*s)).count();
            prop_assert_eq!(p.moves().len(), changed);
            if step == 0 {
                prop_assert!(p.moves().iter().all(|m| m.to == map.shard_count()));
                prop_assert_eq!(p.moves().len() as u32, slots / (map.shard_count() + 1));
            }
            map = next;
        }
    }

    /// An id gives back its slot and node; ids from one generator strictly increase.
    #[test]
    fn ids_round_trip(slots in proptest::collection::vec(0_u32..4096, 1..200), node in 0_u32..16, start in 0_u64..1_000_000_000, js in any::<bool>()) {
        let layout = if js {
            IdLayout::js_safe(EPOCH)
        } else {
            IdLayout::bigint(EPOCH)
        };
        let clock = ManualIdClock::new(EPOCH + start);
        let node = node % (if js { 8 } else { 16 });
        let ids = IdGenerator::with_clock(layout, node, clock).unwrap();
        let mut last = -1_i64;
        for slot in slots {
            let slot = slot % layout.slots();
            let id = match ids.try_next(slot) {
                Ok(id) => id,
                Err(_) => break, // the unit's sequence ran out: a manual clock never moves on
            };
            prop_assert!(id > last);
            prop_assert!(id >= 0);
            prop_assert!((id as u64) < (1_u64 << layout.total_bits()));
            prop_assert_eq!(layout.slot(id), slot);
            let parts = layout.decode(id);
            prop_assert_eq!(parts.node, u64::from(node));
            prop_assert_eq!(parts.slot, slot);
            last = id;
        }
    }

    /// Space-Saving's guarantees against exact counts on skewed streams.
    #[test]
    fn hot_keys_keep_their_guarantees(stream in proptest::collection::vec((0_u32..400, 0_u32..8), 1..3000), capacity in 1_usize..40) {
        let hot = HotKeys::new(capacity).unwrap();
        let mut exact: HashMap<u32, u64> = HashMap::new();
        for (k, skew) in stream {
            // Half of the keys fold onto a few heavy ones.
            let key = if skew < 4 { k % 5 } else { k };
            hot.observe(&key);
            *exact.entry(key).or_default() += 1;
        }
        let total = hot.total();
        let top = hot.top(capacity);
        let bound = total / capacity as u64;
        for entry in &top {
            let truth = exact[&entry.key];
            prop_assert!(entry.count >= truth);
            prop_assert!(entry.count - entry.error <= truth);
            prop_assert!(entry.error <= bound);
        }
        for (key, truth) in &exact {
            if *truth > bound {
                prop_assert!(top.iter().any(|e| e.key == *key), "key {} seen {} > {}", key, truth, bound);
            }
        }
    }
}

#[cfg(feature = "serde")]
#[test]
fn a_map_survives_json_and_a_bad_one_is_refused() {
    let map = ShardMap::uniform(64, 3).unwrap().add_shard().unwrap();
    let json = serde_json::to_string(&map).unwrap();
    let back: ShardMap = serde_json::from_str(&json).unwrap();
    assert_eq!(back, map);
    let bad = json.replacen("\"shards\":4", "\"shards\":5", 1);
    let err = serde_json::from_str::<ShardMap>(&bad).unwrap_err();
    assert!(err.to_string().contains("shard 4 owns no slot"), "{err}");
}
