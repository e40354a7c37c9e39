//! The live status page in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `scripts/test`) loads `/` while the built-in load runs; the page's script must have filled the
//! per-instance table, and the numbers must move between two loads.
use std::net::SocketAddr;
use std::time::Duration;

use storefront::load::{self, LoadConfig};
use storefront::{Instance, Shop, ShopConfig};

/// The page as the browser left it after running its script for a while.
async fn rendered(url: String) -> String {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=3000",
                "--dump-dom",
                &url,
            ])
            .output()
            .expect("chromium runs (scripts/test installs it)");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// The cells of the per-instance table, row by row.
fn instance_rows(dom: &str) -> Vec<Vec<String>> {
    let start = dom.find("id=\"instances\"").expect("the instances table");
    let body = &dom[start..];
    let body =
        &body[body.find("<tbody>").expect("a tbody")..body.find("</tbody>").expect("a tbody end")];
    body.split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let text = &cell[cell.find('>').map_or(0, |i| i + 1)..];
                    text[..text.find("</td>").unwrap_or(text.len())].to_owned()
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_live_numbers_in_a_browser() {
    let shop = Shop::embedded(ShopConfig::default()).await.unwrap();
    let (mut instances, mut addrs) = (Vec::new(), Vec::<SocketAddr>::new());
    for i in 0..2 {
        let instance = Instance::start(&shop, i).await.unwrap();
        addrs.push(instance.serve("127.0.0.1:0").await.unwrap());
        instances.push(instance);
    }
    let config = LoadConfig {
        duration: Duration::from_secs(12),
        progress: false,
        ..LoadConfig::default()
    };
    let load = {
        let (shop, instances, addrs) = (shop.clone(), instances.clone(), addrs.clone());
        tokio::spawn(async move { load::run(&shop, &instances, &addrs, &config).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let url = format!("http://{}/", addrs[1]);
    let first = instance_rows(&rendered(url.clone()).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = instance_rows(&rendered(url).await);
    load.await.unwrap().unwrap();

    assert_eq!(first.len(), 2, "one row per instance: {first:?}");
    assert_eq!(second.len(), 2, "{second:?}");
    for row in first.iter().chain(&second) {
        assert!(row[0].starts_with('#'), "{row:?}");
        assert!(
            row[1].parse::<u64>().is_ok(),
            "requests is a number: {row:?}"
        );
        assert!(
            row[5].ends_with('%') && row[6].ends_with('%'),
            "hit ratios: {row:?}"
        );
        assert!(
            ["Closed", "Open", "HalfOpen"].contains(&row[3].as_str()),
            "breaker state: {row:?}"
        );
    }
    let requests =
        |rows: &[Vec<String>]| -> u64 { rows.iter().map(|r| r[1].parse::<u64>().unwrap()).sum() };
    assert!(requests(&first) > 0, "{first:?}");
    assert!(
        requests(&second) > requests(&first),
        "the numbers move: {first:?} then {second:?}"
    );
}
