//! The browser side, in headless Chromium: `rowcast.js` keeps an application's view exact
//! through a server restart and bursts of changes, the dashboard shows edits from another
//! tab and survives a restart (reconnecting → resumed, missed change applied), and a page served
//! over HTTPS/HTTP2 with the self-signed certificate receives changes on a WebSocket over HTTP/2.
//! Under `--auth-reads`, an `EventSource` opened with a single-use ticket reconnects by itself
//! after a restart (its stream cookie stands in for the spent ticket) and misses nothing.
//! A screenshot of the dashboard is saved as `target/dashboard.png`.
//!
//! rowcast runs as the real binary on a fixed port, so the page can reconnect to the same
//! address after a kill and restart.
//!
//! Without chromedriver these tests say so and pass, unless `ROWCAST_BROWSER_TEST=require`
//! (set by tests/run-all.sh, which installs Chromium), where that is a failure.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::support::process::{free_port, rowcast, wait_until_serving};
use crate::support::webdriver::{Browser, skip_without_chromedriver};
use crate::support::{TestDatabase, get_json, post_product, product};

const LIMIT: Duration = Duration::from_secs(20);

struct Server {
    child: Child,
    port: u16,
    database_url: String,
    /// Set when the server made its own database: dropped with the last holder.
    database: Option<TestDatabase>,
}

impl Server {
    async fn start(database_url: &str, port: u16) -> Self {
        Self::start_with(database_url, port, &[]).await
    }

    /// With extra command-line flags.
    async fn start_with(database_url: &str, port: u16, flags: &[&str]) -> Self {
        let child = rowcast(port)
            .args(flags)
            .env("DATABASE_URL", database_url)
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            port,
            database_url: database_url.to_owned(),
            database: None,
        };
        let ready = format!("{}/readyz", server.base());
        wait_until_serving(&mut server.child, &reqwest::Client::new(), &ready).await;
        server
    }

    /// A rowcast on a fresh database and a free port.
    async fn start_fresh() -> Self {
        let database = TestDatabase::create().await;
        let mut server = Self::start(&database.url, free_port()).await;
        server.database = Some(database);
        server
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the process outright (no close frames): what a crash looks like to the page.
    /// Returns what a restart needs, and the database guard to keep until the test ends.
    async fn kill(mut self) -> (String, u16, Option<TestDatabase>) {
        self.child.kill().await.unwrap();
        (self.database_url, self.port, self.database)
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

#[tokio::test]
async fn rowcast_js_sees_every_change_once_in_order_across_a_server_restart() {
    if skip_without_chromedriver() {
        return;
    }
    let server = Server::start_fresh().await;
    let port = server.port;
    let base = server.base();
    let http = reqwest::Client::new();
    let a = post_product(&http, &base, "Alpha").await;
    let b = post_product(&http, &base, "Beta").await;

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
    let (database_url, port, _database) = server.kill().await;
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
    if skip_without_chromedriver() {
        return;
    }
    let server = Server::start_fresh().await;
    let base = server.base();
    let http = reqwest::Client::new();
    for name in ["Anvil", "Bellows", "Chisel", "Drill press", "Escapement"] {
        post_product(&http, &base, name).await;
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
    assert_eq!(
        watcher
            .eval("return document.getElementById('page').textContent;")
            .await,
        "ids 1–5"
    );

    // A product created elsewhere joins the page, and the page's label follows its rows.
    post_product(&http, &base, "Forge").await;
    watcher
        .wait_for(
            "return document.querySelectorAll('#rows tr').length === 6 \
             && document.getElementById('page').textContent === 'ids 1–6';",
            "the new product's row appears and the label covers it",
            LIMIT,
        )
        .await;

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
    let (database_url, port, _database) = server.kill().await;
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

/// The README's browser-console snippet for the HTTPS page, word for word but with the port of
/// this run, plus one line that keeps what arrives where the test can read it.
fn readme_snippet(port: u16) -> String {
    format!(
        r#"ws = new WebSocket("wss://localhost:{port}/websocket"); ws.onmessage = m => console.log(m.data);
ws.onopen = () => ws.send(JSON.stringify({{command:"subscribe", productIDs:[...Array(1024).keys()]}}))
window.received = []; ws.addEventListener("message", m => window.received.push(JSON.parse(m.data)));"#
    )
}

/// rowcast as the README runs it (self-signed HTTPS), on free ports, with its log parsed for
/// the certificate's SPKI pin.
struct SelfSigned {
    _child: Child,
    _database: TestDatabase,
    plain: String,
    https_port: u16,
    spki_pin: String,
}

impl SelfSigned {
    async fn start() -> Self {
        let database = TestDatabase::create().await;
        let url = database.url.clone();
        let (plain_port, https_port) = (free_port(), free_port());
        let mut child = rowcast(plain_port)
            .args(["--tls-listen", &format!("127.0.0.1:{https_port}")])
            .args(["--tls-self-signed", "--log-format", "json"])
            .env("DATABASE_URL", &url)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (pin_tx, pin_rx) = tokio::sync::oneshot::channel();
        // Reads the log to its end (a full pipe would block the server), picking out the pin.
        tokio::spawn(async move {
            let mut pin_tx = Some(pin_tx);
            let echo = std::env::var_os("TEST_LOG").is_some();
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("rowcast: {line}");
                }
                let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(pin) = entry["fields"]["spki_sha256_base64"].as_str() {
                    if let Some(tx) = pin_tx.take() {
                        let _ = tx.send(pin.to_owned());
                    }
                }
            }
        });
        let spki_pin = tokio::time::timeout(Duration::from_secs(60), pin_rx)
            .await
            .expect("rowcast logs its self-signed certificate within 60 s")
            .expect("rowcast logs the SPKI pin of its self-signed certificate");
        let plain = format!("http://127.0.0.1:{plain_port}");
        // Ready: database migrated and the LISTEN connection up.
        let ready = format!("{plain}/readyz");
        wait_until_serving(&mut child, &reqwest::Client::new(), &ready).await;
        Self {
            _child: child,
            _database: database,
            plain,
            https_port,
            spki_pin,
        }
    }
}

/// A page loaded over HTTPS with the self-signed certificate of the README's run command runs the
/// README's console snippet (a WebSocket subscribing to ids 0..1023) and must receive both the
/// INSERT and the UPDATE of a product that REST creates and changes in that range. The server's
/// counters must show that the browser's WebSocket came over HTTP/2 (extended CONNECT), as the
/// page did.
#[tokio::test]
async fn a_page_over_h2_gets_both_changes_on_a_websocket_over_h2() {
    if skip_without_chromedriver() {
        return;
    }
    let rowcast = SelfSigned::start().await;
    // Trust rowcast's self-signed certificate by its key, and nothing else.
    let pin = format!("--ignore-certificate-errors-spki-list={}", rowcast.spki_pin);
    let browser = Browser::start_with(&[pin]).await;
    let page = format!("https://localhost:{}/healthz", rowcast.https_port);
    browser.goto(&page).await;
    let protocol = browser.page_protocol().await;
    assert_eq!(protocol, "h2", "the page itself must come over HTTP/2");

    browser.eval(&readme_snippet(rowcast.https_port)).await;
    let wait = Duration::from_secs(10);
    browser
        .wait_for(
            "return window.received.length >= 1;",
            "the subscribe ack",
            wait,
        )
        .await;
    let ack = browser.eval("return window.received[0];").await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["productIDs"].as_array().unwrap().len(), 1024);

    let http = reqwest::Client::new();
    let mut body = product("Browser anvil");
    body["productId"] = json!(512);
    let created = http
        .post(format!("{}/products", rowcast.plain))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let patched = http
        .patch(format!("{}/products/512", rowcast.plain))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"unitsAvailable":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);

    let changes = "window.received.filter(m => m.type === 'change')";
    browser
        .wait_for(
            &format!("return {changes}.length >= 2;"),
            "both changes in the page",
            wait,
        )
        .await;
    let changes: Vec<Value> =
        serde_json::from_value(browser.eval(&format!("return {changes};")).await).unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0]["action"], "INSERT");
    assert_eq!(changes[1]["action"], "UPDATE");
    assert_eq!(changes[1]["product"]["productId"], 512);
    assert_eq!(changes[1]["product"]["unitsAvailable"], 2);

    // The server saw the browser's WebSocket arrive as an HTTP/2 extended CONNECT.
    let stats = get_json(&http, &format!("{}/stats", rowcast.plain)).await;
    let transport = &stats["transport"];
    assert_eq!(transport["websocketUpgradesHttp2"], 1, "{transport}");
    assert_eq!(transport["websocketUpgradesHttp1"], 0, "{transport}");
}

#[tokio::test]
async fn an_event_source_opened_with_a_ticket_reconnects_by_itself_under_auth_reads() {
    if skip_without_chromedriver() {
        return;
    }
    const TOKEN: &str = "browser-token-0123456789";
    let flags = ["--api-token", TOKEN, "--auth-reads"];
    let database = TestDatabase::create().await;
    let server = Server::start_with(&database.url, free_port(), &flags).await;
    let base = server.base();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let id = post_product(&http, &base, "Ticketed").await;
    // What a backend holding the token does for its page.
    let ticket: Value = http
        .post(format!("{base}/ws-ticket"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = ticket["ticket"].as_str().unwrap();

    let browser = Browser::start().await;
    browser.goto(&format!("{base}/healthz")).await;
    browser
        .eval(&format!(
            r#"window.seen = []; window.opens = 0;
            const source = new EventSource("/products/events?ids={id}&ticket={ticket}");
            source.onopen = () => window.opens++;
            source.onmessage = (m) => {{
              if (m.lastEventId) window.seen.push([Number(m.lastEventId), JSON.parse(m.data).product.unitsAvailable]);
            }};
            window.source = source;
            return true;"#
        ))
        .await;
    browser
        .wait_for("return window.opens === 1;", "the stream opens", LIMIT)
        .await;
    patch(&http, &base, id, 1).await;
    browser
        .wait_for(
            "return window.seen.length === 1;",
            "the first change arrives",
            LIMIT,
        )
        .await;

    // Crash the server, change the product while it is down, restart it: the page does nothing.
    let (database_url, port, _) = server.kill().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    sqlx::query("UPDATE products SET units_available = 2 WHERE product_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let _server = Server::start_with(&database_url, port, &flags).await;
    browser
        .wait_for(
            "return window.opens >= 2 && window.seen.length >= 2;",
            "EventSource reconnects with its cookie and gets the missed change",
            LIMIT,
        )
        .await;
    patch(&http, &base, id, 3).await;
    browser
        .wait_for(
            "return window.seen.length >= 3;",
            "live changes flow again",
            LIMIT,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen: Vec<(u64, i64)> =
        serde_json::from_value(browser.eval("return window.seen;").await).unwrap();
    let units: Vec<i64> = seen.iter().map(|(_, units)| *units).collect();
    assert_eq!(units, [1, 2, 3], "every change once, none missed: {seen:?}");
    assert!(
        seen.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "{seen:?}"
    );
    assert_eq!(browser.eval("return window.source.readyState;").await, 1);
    drop(database);
}
