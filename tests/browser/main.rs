//! The browser test: headless Chromium (Debian's `chromium`, driven through `chromedriver` with
//! plain W3C WebDriver calls) loads a page from rowcast over HTTPS with the self-signed
//! certificate of the README's run command, runs the README's console snippet (a WebSocket
//! subscribing to ids 0..1023), and must receive both the INSERT and the UPDATE of a product that
//! REST creates and changes in that range. The server's counters must show that the browser's
//! WebSocket came over HTTP/2 (extended CONNECT), as the page did.
//!
//! Without chromedriver the test says so and passes, unless `ROWCAST_BROWSER_TEST=require`
//! (set by tests/run-all.sh, which installs Chromium), where that is a failure.

// Items in the shared harness are `pub` for the other test binary.
#![allow(unreachable_pub, dead_code, unused_imports)]
// A failed unwrap in a test is a failed test, with its location.
#![allow(clippy::unwrap_used)]

#[path = "../it/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use support::{fresh_database, product};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The README's browser-console snippet for the HTTPS page, word for word but with the port of
/// this run, plus one line that keeps what arrives where the test can read it.
fn readme_snippet(port: u16) -> String {
    format!(
        r#"ws = new WebSocket("wss://localhost:{port}/websocket"); ws.onmessage = m => console.log(m.data);
ws.onopen = () => ws.send(JSON.stringify({{command:"subscribe", productIDs:[...Array(1024).keys()]}}))
window.received = []; ws.addEventListener("message", m => window.received.push(JSON.parse(m.data)));"#
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns Some, failing after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// rowcast as the README runs it (self-signed HTTPS), on free ports, with its log parsed for
/// the certificate's SPKI pin.
struct Rowcast {
    child: Child,
    plain: String,
    https_port: u16,
    spki_pin: String,
}

async fn start_rowcast() -> Rowcast {
    let (_name, url) = fresh_database().await;
    let (plain_port, https_port) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_rowcast"))
        .args(["--listen", &format!("127.0.0.1:{plain_port}")])
        .args(["--tls-listen", &format!("127.0.0.1:{https_port}")])
        .args(["--tls-self-signed", "--log-format", "json"])
        .env("DATABASE_URL", &url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
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
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "rowcast healthy", || async {
        let stats: Value = http
            .get(format!("{plain}/stats"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (stats["listener"]["connected"] == json!(true)).then_some(())
    })
    .await;
    Rowcast {
        child,
        plain,
        https_port,
        spki_pin,
    }
}

/// A WebDriver session on a headless Chromium that trusts exactly the given certificate key.
struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
    profile: std::path::PathBuf,
}

impl Browser {
    async fn start(spki_pin: &str) -> Self {
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let server = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(30), "chromedriver ready", || async {
            let status: Value = http
                .get(format!("{server}/status"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (status["value"]["ready"] == json!(true)).then_some(())
        })
        .await;
        let profile =
            std::env::temp_dir().join(format!("rowcast-chromium-{:016x}", rand::random::<u64>()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                    // Trust rowcast's self-signed certificate by its key, and nothing else.
                    format!("--ignore-certificate-errors-spki-list={spki_pin}"),
                ],
            },
        }}});
        let session: Value = http
            .post(format!("{server}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {session}"));
        Self {
            driver,
            base: format!("{server}/session/{id}"),
            http,
            profile,
        }
    }

    async fn call(&self, path: &str, body: Value) -> Value {
        let response: Value = self
            .http
            .post(format!("{}/{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            response["value"].get("error").is_none(),
            "WebDriver {path} failed: {response}"
        );
        response["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call("url", json!({"url": url})).await;
    }

    async fn run(&self, script: &str) -> Value {
        self.call("execute/sync", json!({"script": script, "args": []}))
            .await
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.base).send().await;
        drop(self.driver);
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[tokio::test]
async fn a_page_over_h2_gets_both_changes_on_a_websocket_over_h2() {
    if !Path::new(CHROMEDRIVER).exists() {
        let required = std::env::var("ROWCAST_BROWSER_TEST").is_ok_and(|v| v == "require");
        assert!(
            !required,
            "ROWCAST_BROWSER_TEST=require but {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver"
        );
        eprintln!("skipped: {CHROMEDRIVER} not found (apt-get install chromium chromium-driver)");
        return;
    }
    let mut rowcast = start_rowcast().await;
    let browser = Browser::start(&rowcast.spki_pin).await;
    let page = format!("https://localhost:{}/healthz", rowcast.https_port);
    browser.open(&page).await;
    let protocol = browser
        .run("return performance.getEntriesByType('navigation')[0].nextHopProtocol")
        .await;
    assert_eq!(protocol, "h2", "the page itself must come over HTTP/2");

    browser.run(&readme_snippet(rowcast.https_port)).await;
    let ack = eventually(Duration::from_secs(10), "the subscribe ack", || async {
        let received = browser.run("return window.received").await;
        received.as_array()?.first().cloned()
    })
    .await;
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

    let changes = eventually(
        Duration::from_secs(10),
        "both changes in the page",
        || async {
            let received = browser.run("return window.received").await;
            let changes: Vec<Value> = received
                .as_array()?
                .iter()
                .filter(|m| m["type"] == "change")
                .cloned()
                .collect();
            (changes.len() >= 2).then_some(changes)
        },
    )
    .await;
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0]["action"], "INSERT");
    assert_eq!(changes[1]["action"], "UPDATE");
    assert_eq!(changes[1]["product"]["productId"], 512);
    assert_eq!(changes[1]["product"]["unitsAvailable"], 2);

    // The server saw the browser's WebSocket arrive as an HTTP/2 extended CONNECT.
    let stats: Value = http
        .get(format!("{}/stats", rowcast.plain))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let transport = &stats["transport"];
    assert_eq!(transport["websocketUpgradesHttp2"], 1, "{transport}");
    assert_eq!(transport["websocketUpgradesHttp1"], 0, "{transport}");

    browser.quit().await;
    let _ = rowcast.child.start_kill();
    let _ = rowcast.child.wait().await;
}
