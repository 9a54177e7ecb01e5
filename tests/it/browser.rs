//! The browser side, in headless Chromium: `rowcast.js` keeps an application's view exact
//! through a server restart and bursts of changes, and the dashboard shows edits from another
//! tab and survives a restart (reconnecting → resumed, missed change applied). A screenshot of
//! the dashboard is saved as `target/dashboard.png`.
//!
//! rowcast runs as the real binary on a fixed port, so the page can reconnect to the same
//! address after a kill and restart.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::process::{Child, Command};

use crate::support::webdriver::{Browser, free_port};
use crate::support::{fresh_database, product};

const LIMIT: Duration = Duration::from_secs(20);

struct Server {
    child: Child,
    port: u16,
    database_url: String,
}

impl Server {
    async fn start(database_url: &str, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_rowcast"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", database_url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let server = Self {
            child,
            port,
            database_url: database_url.to_owned(),
        };
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("{}/readyz", server.base()))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return server;
            }
            assert!(tokio::time::Instant::now() < deadline, "rowcast not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the process outright (no close frames): what a crash looks like to the page.
    async fn kill(mut self) -> (String, u16) {
        self.child.kill().await.unwrap();
        (self.database_url, self.port)
    }
}

async fn patch(http: &reqwest::Client, base: &str, id: i64, units: i64) {
    let response = http
        .patch(format!("{base}/products/{id}"))
        .json(&json!({"unitsAvailable": units}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

async fn create(http: &reqwest::Client, base: &str, name: &str) -> i64 {
    let response = http
        .post(format!("{base}/products"))
        .json(&product(name))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json::<serde_json::Value>().await.unwrap()["productId"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn rowcast_js_sees_every_change_once_in_order_across_a_server_restart() {
    let (_name, database_url) = fresh_database().await;
    let port = free_port();
    let server = Server::start(&database_url, port).await;
    let base = server.base();
    let http = reqwest::Client::new();
    let a = create(&http, &base, "Alpha").await;
    let b = create(&http, &base, "Beta").await;

    let browser = Browser::start().await;
    browser.goto(&format!("{base}/healthz")).await;
    browser
        .eval(&format!(
            r#"window.seen = []; window.states = [];
            import("/rowcast.js").then(({{ connect }}) => {{
              const client = connect("ws://127.0.0.1:{port}/websocket", {{
                onState: (state, info) => window.states.push(state + ":" + JSON.stringify(info)),
              }});
              client.subscribe([{a}, {b}], {{
                onChange: (c) => window.seen.push([c.seq, c.product.productId, c.product.unitsAvailable]),
              }});
              window.client = client;
            }});
            return true;"#
        ))
        .await;
    browser
        .wait_for(
            "return window.states.some(s => s.startsWith('connected'));",
            "rowcast.js connects",
            LIMIT,
        )
        .await;
    // The subscribe is sent right after connecting; give its ack a moment before writing.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut expected = Vec::new();
    for units in 1..=15 {
        let id = if units % 2 == 0 { a } else { b };
        patch(&http, &base, id, units).await;
        expected.push((id, units));
    }
    browser
        .wait_for(
            "return window.seen.length >= 15;",
            "the first burst arrives",
            LIMIT,
        )
        .await;

    // Crash the server, write while it is down (behind its back, as any writer could), and
    // restart it on the same port while another burst is underway.
    let (database_url, port) = server.kill().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    for units in 16..=25 {
        let id = if units % 2 == 0 { a } else { b };
        sqlx::query("UPDATE products SET units_available = $1 WHERE product_id = $2")
            .bind(i32::try_from(units).unwrap())
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        expected.push((id, units));
    }
    let server = Server::start(&database_url, port).await;
    for units in 26..=60 {
        let id = if units % 2 == 0 { a } else { b };
        patch(&http, &base, id, units).await;
        expected.push((id, units));
    }
    browser
        .wait_for(
            &format!("return window.seen.length >= {};", expected.len()),
            "every change arrives",
            LIMIT,
        )
        .await;
    // Anything extra (a duplicate) would arrive right behind.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen: Vec<(u64, i64, i64)> =
        serde_json::from_value(browser.eval("return window.seen;").await).unwrap();
    let got: Vec<(i64, i64)> = seen.iter().map(|(_, id, units)| (*id, *units)).collect();
    assert_eq!(got, expected, "every change exactly once, in order");
    assert!(
        seen.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "seqs strictly increase: {seen:?}"
    );
    let states: Vec<String> =
        serde_json::from_value(browser.eval("return window.states;").await).unwrap();
    assert!(
        states.iter().any(|s| s.starts_with("reconnecting")),
        "{states:?}"
    );
    assert!(
        states.iter().any(|s| s.starts_with("resumed")),
        "{states:?}"
    );
    drop(server);
}

#[tokio::test]
async fn dashboard_shows_edits_from_another_tab_and_resumes_after_a_restart() {
    let (_name, database_url) = fresh_database().await;
    let port = free_port();
    let server = Server::start(&database_url, port).await;
    let base = server.base();
    let http = reqwest::Client::new();
    for name in ["Anvil", "Bellows", "Chisel", "Drill press", "Escapement"] {
        create(&http, &base, name).await;
    }
    let watcher = Browser::start().await;
    let editor = Browser::start().await;
    for tab in [&watcher, &editor] {
        tab.goto(&format!("{base}/")).await;
        tab.wait_for(
            "return document.getElementById('connection').dataset.state === 'connected' \
             && document.querySelectorAll('#rows tr').length === 5;",
            "the dashboard loads its rows and connects",
            LIMIT,
        )
        .await;
    }
    // Let the snapshot subscribes settle.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Edit product 2 through the other tab's form.
    editor
        .eval(
            r#"document.querySelector('#product-2 button').click();
            const form = document.getElementById('editor');
            form.elements.unitsAvailable.value = '42';
            form.requestSubmit();
            return true;"#,
        )
        .await;
    watcher
        .wait_for(
            "const row = document.getElementById('product-2'); \
             return row.classList.contains('flash') && row.children[4].textContent === '42';",
            "the edit appears highlighted in the other tab",
            LIMIT,
        )
        .await;

    // Restart the server while a product changes.
    let (database_url, port) = server.kill().await;
    watcher
        .wait_for(
            "return document.getElementById('connection').dataset.state === 'reconnecting';",
            "the page shows it is reconnecting",
            LIMIT,
        )
        .await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    sqlx::query("UPDATE products SET units_available = 7 WHERE product_id = 3")
        .execute(&pool)
        .await
        .unwrap();
    let _server = Server::start(&database_url, port).await;
    watcher
        .wait_for(
            "const pill = document.getElementById('connection'); \
             return pill.dataset.state === 'resumed' && pill.textContent.startsWith('resumed from seq ') \
             && document.getElementById('product-3').children[4].textContent === '7';",
            "the page resumes and applies the missed change",
            LIMIT,
        )
        .await;
    // Leave the highlight visible in the screenshot.
    sqlx::query("UPDATE products SET units_available = 8 WHERE product_id = 4")
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let png = watcher.screenshot().await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    std::fs::write(&path, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
}
