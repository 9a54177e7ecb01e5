//! The dashboard's activity views in headless Chromium: the event log shows a change made
//! through REST, the changes-per-second plot draws (a screenshot is kept as
//! `target/dashboard-activity.png`, a CI artifact), and a row's watcher count goes from 1 to 2
//! when a second tab opens.
//!
//! Without chromedriver these tests say so and pass, unless `ROWCAST_BROWSER_TEST=require`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::process::{free_port, rowcast, wait_until_serving};
use crate::support::webdriver::{Browser, skip_without_chromedriver};
use crate::support::{TestDatabase, product};

const LIMIT: Duration = Duration::from_secs(20);

/// The text of product `id`'s watcher cell.
fn watchers_are(id: i64, count: u64) -> String {
    format!(
        "const cell = document.querySelector('#product-{id} td.watchers'); \
         return cell !== null && cell.textContent === '{count}';"
    )
}

#[tokio::test]
async fn the_dashboard_logs_changes_plots_their_rate_and_counts_watchers() {
    if skip_without_chromedriver() {
        return;
    }
    let database = TestDatabase::create().await;
    let port = free_port();
    let mut child = rowcast(port)
        .env("DATABASE_URL", &database.url)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_until_serving(&mut child, &http, &format!("{base}/readyz")).await;
    for name in ["Anvil", "Bellows", "Chisel"] {
        let response = http
            .post(format!("{base}/products"))
            .json(&product(name))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }

    let first = Browser::start().await;
    first.goto(&format!("{base}/")).await;
    first
        .wait_for(
            "return document.getElementById('connection').dataset.state === 'connected' \
             && document.querySelectorAll('#rows tr').length === 3;",
            "the dashboard loads its rows and connects",
            LIMIT,
        )
        .await;
    first
        .wait_for(&watchers_are(1, 1), "one tab watches product 1", LIMIT)
        .await;

    // A change made through REST appears in the event log.
    let created: Value = http
        .post(format!("{base}/products"))
        .json(&product("Drill press"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seq_script = format!(
        "const row = document.querySelector('#log tr'); \
         return row !== null && row.children[1].textContent === 'INSERT' \
         && row.children[2].textContent === '{} Drill press' \
         && /^[0-9]+ s$/.test(row.children[3].textContent);",
        created["productId"]
    );
    first
        .wait_for(&seq_script, "the event log shows the REST insert", LIMIT)
        .await;

    // A burst of changes over a few seconds, for the plot.
    for units in 0..24 {
        let response = http
            .patch(format!("{base}/products/2"))
            .json(&json!({"unitsAvailable": units}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first
        .wait_for(
            "const plot = document.getElementById('rate-plot'); \
             return Number(plot.dataset.total) === 25 && Number(plot.dataset.max) >= 2;",
            "the plot counts every change",
            LIMIT,
        )
        .await;

    // A second tab watches the same rows.
    let second = Browser::start().await;
    second.goto(&format!("{base}/")).await;
    for tab in [&first, &second] {
        tab.wait_for(&watchers_are(1, 2), "two tabs watch product 1", LIMIT)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let png = first.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard-activity.png"), &png).unwrap();

    // The second tab's client closing its socket brings the count back down.
    second
        .eval("window.rowcastClient.close(); return true;")
        .await;
    first
        .wait_for(&watchers_are(1, 1), "one tab again", LIMIT)
        .await;
}
