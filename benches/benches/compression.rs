//! The tiered cache's L2 compression: lz4_flex (what it uses, above 1 KiB) next to zstd at
//! levels 1 and 3, on values like the shop's: one product (524 bytes of JSON) and a category
//! page of 50 products (26 KiB). Time to compress and to decompress; the compressed sizes are
//! printed.
//!
//! `cargo bench -p stanchion-benches --bench compression && scripts/bench-report`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

fn product(i: u64) -> serde_json::Value {
    let colour = ["white", "blue", "green", "sand"][(i % 4) as usize];
    serde_json::json!({
        "id": i,
        "sku": format!("SKU-{:08}", i * 7919 % 100_000_000),
        "name": format!("Stoneware tea cup {i}, 250 ml, hand glazed"),
        "category": "kitchen/tableware/cups",
        "price_cents": 1_200 + (i * 37) % 5_000,
        "currency": "EUR",
        "stock": (i * 13) % 400,
        "description": format!(
            "A hand-glazed stoneware cup for tea or coffee. Dishwasher safe, holds 250 ml. \
             Each one is glazed by hand, so colour and pattern vary slightly. Batch {}.",
            i % 17
        ),
        "attributes": { "colour": colour,
                        "material": "stoneware", "weight_g": 240 + i % 30 },
        "images": [format!("https://cdn.example.com/p/{i}/1.jpg"),
                   format!("https://cdn.example.com/p/{i}/2.jpg")],
        "updated_at": format!("2026-11-{:02}T10:{:02}:00Z", 1 + i % 28, i % 60),
    })
}

fn benches(c: &mut Criterion) {
    let one = serde_json::to_vec(&product(42)).expect("json");
    let page: Vec<serde_json::Value> = (0..50).map(product).collect();
    let page = serde_json::to_vec(&page).expect("json");
    for (label, value) in [("product", &one), ("page_of_50", &page)] {
        let lz4 = lz4_flex::compress_prepend_size(value);
        let z1 = zstd::bulk::compress(value, 1).expect("zstd");
        let z3 = zstd::bulk::compress(value, 3).expect("zstd");
        eprintln!(
            "{label}: {} bytes; lz4 {} ({:.2}x), zstd-1 {} ({:.2}x), zstd-3 {} ({:.2}x)",
            value.len(),
            lz4.len(),
            value.len() as f64 / lz4.len() as f64,
            z1.len(),
            value.len() as f64 / z1.len() as f64,
            z3.len(),
            value.len() as f64 / z3.len() as f64,
        );
        let mut g = c.benchmark_group(format!("compress_{label}"));
        g.bench_function("lz4_flex", |b| {
            b.iter(|| black_box(lz4_flex::compress_prepend_size(black_box(value))))
        });
        g.bench_function("zstd_1", |b| {
            b.iter(|| black_box(zstd::bulk::compress(black_box(value), 1).expect("zstd")))
        });
        g.bench_function("zstd_3", |b| {
            b.iter(|| black_box(zstd::bulk::compress(black_box(value), 3).expect("zstd")))
        });
        g.finish();
        let mut g = c.benchmark_group(format!("decompress_{label}"));
        g.bench_function("lz4_flex", |b| {
            b.iter(|| black_box(lz4_flex::decompress_size_prepended(black_box(&lz4)).expect("lz4")))
        });
        g.bench_function("zstd_1", |b| {
            b.iter(|| black_box(zstd::bulk::decompress(black_box(&z1), value.len()).expect("zstd")))
        });
        g.bench_function("zstd_3", |b| {
            b.iter(|| black_box(zstd::bulk::decompress(black_box(&z3), value.len()).expect("zstd")))
        });
        g.finish();
    }
}

criterion_group!(compression, benches);
criterion_main!(compression);
