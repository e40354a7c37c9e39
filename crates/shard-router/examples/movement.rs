//! Balance and movement of every sharder over 200,000 keys: what adding one shard costs.
//!
//! `cargo run -p stanchion-shard-router --release --example movement`

use stanchion_shard_router::{JumpHash, Key, Modulo, Rendezvous, Ring, ShardMap, Sharder};

const KEYS: i64 = 200_000;

fn moved(a: &dyn Sharder, b: &dyn Sharder) -> f64 {
    let n = (0..KEYS)
        .filter(|k| a.shard(Key::Int(*k)).ok() != b.shard(Key::Int(*k)).ok())
        .count();
    n as f64 * 100.0 / KEYS as f64
}

fn max_over_mean(s: &dyn Sharder) -> f64 {
    let mut load = vec![0_u64; s.shard_count() as usize];
    for k in 0..KEYS {
        if let Ok(shard) = s.shard(Key::Int(k)) {
            load[shard as usize] += 1;
        }
    }
    *load.iter().max().unwrap_or(&0) as f64 * load.len() as f64 / KEYS as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "n -> n+1", "ideal %", "jump %", "hrw %", "slots %", "modulo %"
    );
    for n in [2_u32, 4, 8, 16, 32] {
        let map = ShardMap::uniform(4096, n)?;
        println!(
            "{:>10} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            format!("{n} -> {}", n + 1),
            100.0 / f64::from(n + 1),
            moved(&JumpHash::new(n)?, &JumpHash::new(n + 1)?),
            moved(&Rendezvous::new(n)?, &Rendezvous::new(n + 1)?),
            moved(&map, &map.add_shard()?),
            moved(&Modulo::new(n)?, &Modulo::new(n + 1)?),
        );
    }
    println!();
    println!("max/mean load on 16 shards:");
    println!("  jump       {:.4}", max_over_mean(&JumpHash::new(16)?));
    println!(
        "  slots      {:.4}",
        max_over_mean(&ShardMap::uniform(4096, 16)?)
    );
    println!("  rendezvous {:.4}", max_over_mean(&Rendezvous::new(16)?));
    for vnodes in [10, 40, 160, 640] {
        let ring = Ring::new(16, vnodes)?;
        println!(
            "  ring x{vnodes:<4} {:.4}  ({} KiB)",
            max_over_mean(&ring),
            ring.heap_bytes() / 1024
        );
    }
    Ok(())
}
