//! Balance and movement over 1,000,000 keys, asserted (issue 14's figures). Printed with
//! `cargo test -p stanchion-shard-router --release --test distribution -- --nocapture`.

use stanchion_shard_router::{JumpHash, Key, Modulo, Rendezvous, Ring, ShardMap, Sharder};

const KEYS: i64 = 1_000_000;

fn loads(s: &dyn Sharder) -> Vec<u64> {
    let mut load = vec![0_u64; s.shard_count() as usize];
    for k in 0..KEYS {
        load[s.shard(Key::Int(k)).unwrap() as usize] += 1;
    }
    load
}

fn max_over_mean(load: &[u64]) -> f64 {
    let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
    *load.iter().max().unwrap() as f64 / mean
}

fn moved(a: &dyn Sharder, b: &dyn Sharder) -> f64 {
    let mut n = 0_u64;
    for k in 0..KEYS {
        // Text keys here, integer keys above: both kinds are covered.
        let key = format!("tenant-{k}");
        if a.shard(Key::from(key.as_str())).unwrap() != b.shard(Key::from(key.as_str())).unwrap() {
            n += 1;
        }
    }
    n as f64 / KEYS as f64
}

#[test]
fn jump_hash_and_slots_balance_a_million_keys_on_16_shards() {
    let jump = max_over_mean(&loads(&JumpHash::new(16).unwrap()));
    let slots = max_over_mean(&loads(&ShardMap::uniform(4096, 16).unwrap()));
    let hrw = max_over_mean(&loads(&Rendezvous::new(16).unwrap()));
    let ring = max_over_mean(&loads(&Ring::new(16, 160).unwrap()));
    let modulo = max_over_mean(&loads(&Modulo::new(16).unwrap()));
    println!(
        "max/mean on 16 shards: jump {jump:.4}, slots(4096) {slots:.4}, rendezvous {hrw:.4}, ring(160 vnodes) {ring:.4}, modulo {modulo:.4}"
    );
    assert!(jump <= 1.02, "jump {jump}");
    assert!(slots <= 1.02, "slots {slots}");
    assert!(hrw <= 1.02, "rendezvous {hrw}");
    assert!(modulo <= 1.02, "modulo {modulo}");
    // A ring's balance depends on its vnodes: reported, bounded loosely.
    assert!(ring <= 1.25, "ring {ring}");
}

#[test]
fn growing_by_one_shard_moves_one_in_n_plus_one() {
    for n in [4_u32, 8, 16, 31] {
        let ideal = 1.0 / f64::from(n + 1);
        let jump = moved(&JumpHash::new(n).unwrap(), &JumpHash::new(n + 1).unwrap());
        let hrw = moved(
            &Rendezvous::new(n).unwrap(),
            &Rendezvous::new(n + 1).unwrap(),
        );
        let v1 = ShardMap::uniform(4096, n).unwrap();
        let slots = moved(&v1, &v1.add_shard().unwrap());
        let ring = moved(&Ring::new(n, 160).unwrap(), &Ring::new(n + 1, 160).unwrap());
        let modulo = moved(&Modulo::new(n).unwrap(), &Modulo::new(n + 1).unwrap());
        println!(
            "{n} -> {}: ideal {:.2} %, jump {:.2} %, rendezvous {:.2} %, slots {:.2} %, ring {:.2} %, modulo {:.2} %",
            n + 1,
            ideal * 100.0,
            jump * 100.0,
            hrw * 100.0,
            slots * 100.0,
            ring * 100.0,
            modulo * 100.0
        );
        for (name, f) in [("jump", jump), ("rendezvous", hrw), ("slots", slots)] {
            assert!(
                (f - ideal).abs() <= 0.002,
                "{name}: {n} -> {}: moved {f}, ideal {ideal}",
                n + 1
            );
        }
        assert!(modulo > 0.5, "modulo moves most keys: {modulo}");
    }
}

#[test]
fn weighted_rendezvous_follows_its_weights() {
    let hrw = Rendezvous::weighted(&[1.0, 1.0, 2.0]).unwrap();
    let load = loads(&hrw);
    let share = load[2] as f64 / KEYS as f64;
    println!("weights 1:1:2 -> {load:?}");
    assert!((share - 0.5).abs() < 0.005, "{share}");
}

#[test]
fn ring_memory_is_twelve_bytes_a_point() {
    let ring = Ring::new(16, 160).unwrap();
    println!(
        "ring of 16 shards x 160 vnodes: {} points, {} bytes",
        ring.points(),
        ring.heap_bytes()
    );
    assert_eq!(ring.heap_bytes(), ring.points() * 12);
}
