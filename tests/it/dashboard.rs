//! The dashboard's activity views in headless Chromium: the event log shows a change made
//! through REST, the changes-per-second plot draws (a screenshot is kept as
//! `target/dashboard-activity.png`, a CI artifact), and a row's watcher count goes from 1 to 2
//! when a second tab opens. And `rowcast.js`'s `subscribeAll`: a paged snapshot, then every
//! change once, in order, across a server crash and restart.
//!
//! Without chromedriver these tests say so and pass, unless `ROWCAST_BROWSER_TEST=require`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::process::{free_port, rowcast, wait_until_serving};
use crate::support::webdriver::{Browser, skip_without_chromedriver};
use crate::support::ws::ARRIVAL;
use crate::support::{TestDatabase, post_product, product};

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
        post_product(&http, &base, name).await;
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

#[tokio::test]
async fn rowcast_js_subscribe_all_sees_every_change_once_in_order_across_a_restart() {
    if skip_without_chromedriver() {
        return;
    }
    let database = TestDatabase::create().await;
    let port = free_port();
    let start = || {
        rowcast(port)
            .env("DATABASE_URL", &database.url)
            .spawn()
            .unwrap()
    };
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut child = start();
    wait_until_serving(&mut child, &http, &format!("{base}/readyz")).await;
    let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
    sqlx::query(
        "INSERT INTO products (manufacturer, price_per_unit, units_available, product_name)
         SELECT 'Acme', '1.00', 0, 'p' || i FROM generate_series(1, 2500) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();

    let browser = Browser::start().await;
    browser.goto(&format!("{base}/healthz")).await;
    browser
        .eval(&format!(
            r#"window.seen = []; window.rows = 0; window.pages = 0; window.states = [];
            import("/rowcast.js").then(({{ connect }}) => {{
              const client = connect("ws://127.0.0.1:{port}/websocket", {{
                onState: (state) => window.states.push(state),
              }});
              client.subscribeAll({{
                snapshot: true,
                onSnapshot: (products, {{ seq, more }}) => {{
                  window.rows += products.length; window.pages += 1; window.snapshotSeq = seq;
                }},
                onChange: (c) => window.seen.push(c.seq),
              }});
            }});
            return true;"#
        ))
        .await;
    browser
        .wait_for(
            "return window.rows === 2500 && window.pages >= 3;",
            "the paged snapshot arrives",
            LIMIT,
        )
        .await;
    let snapshot_seq = browser.eval("return window.snapshotSeq;").await;
    let add = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "UPDATE products SET units_available = units_available + 1 WHERE product_id = $1",
            )
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    for id in 1..=10 {
        add(id * 100).await;
    }
    browser
        .wait_for(
            "return window.seen.length >= 10;",
            "the first changes arrive",
            LIMIT,
        )
        .await;

    // Crash, write while it is down, restart on the same port, write again.
    child.kill().await.unwrap();
    for id in 11..=20 {
        add(id * 100).await;
    }
    let mut child = start();
    wait_until_serving(&mut child, &http, &format!("{base}/readyz")).await;
    for id in 1..=5 {
        add(id).await;
    }
    let expected: Vec<u64> =
        sqlx::query_scalar::<_, i64>("SELECT seq FROM product_changes WHERE seq > $1 ORDER BY seq")
            .bind(snapshot_seq.as_i64().unwrap())
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|seq| u64::try_from(seq).unwrap())
            .collect();
    assert_eq!(expected.len(), 25);
    browser
        .wait_for(
            "return window.seen.length >= 25;",
            "every change arrives",
            ARRIVAL,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen: Vec<u64> = serde_json::from_value(browser.eval("return window.seen;").await).unwrap();
    assert_eq!(seen, expected, "every change exactly once, in order");
    let states: Vec<String> =
        serde_json::from_value(browser.eval("return window.states;").await).unwrap();
    assert!(states.iter().any(|s| s == "resumed"), "{states:?}");
    assert_eq!(
        browser.eval("return window.rows;").await,
        2500,
        "no second snapshot"
    );
}
