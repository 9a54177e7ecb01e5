//! A minimal W3C WebDriver client for the browser tests: starts Debian's `chromedriver` on a free
//! port and drives one headless Chromium with a fresh profile. Just what the tests use:
//! navigate, run a script, read the page's protocol, take a screenshot.
//!
//! Without chromedriver a browser test says so and passes (see [`skip_without_chromedriver`]),
//! unless `ROWCAST_BROWSER_TEST=require` (set by tests/run-all.sh, which installs Chromium),
//! where that is a failure.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use super::process::free_port;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// True when the calling browser test should return at once: chromedriver is missing and
/// `ROWCAST_BROWSER_TEST` is not `require` (with `require`, a missing chromedriver fails).
pub fn skip_without_chromedriver() -> bool {
    if Path::new(CHROMEDRIVER).exists() {
        return false;
    }
    let required = std::env::var("ROWCAST_BROWSER_TEST").is_ok_and(|v| v == "require");
    assert!(
        !required,
        "ROWCAST_BROWSER_TEST=require but {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver"
    );
    eprintln!("skipped: {CHROMEDRIVER} not found (apt-get install chromium chromium-driver)");
    true
}

#[derive(Debug)]
pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver_url: String,
    _driver: Child,
    _profile: TempDir,
}

#[derive(Debug)]
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    /// A headless Chromium with a 1280×800 window.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`Browser::start`] with extra Chromium flags (e.g. a certificate's SPKI pin).
    pub async fn start_with(extra_args: &[String]) -> Self {
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (Debian packages chromium, chromium-driver) is installed");
        let driver_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while http
            .get(format!("{driver_url}/status"))
            .send()
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile =
            std::env::temp_dir().join(format!("rowcast-chromium-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&profile).unwrap();
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,800",
        ]
        .map(str::to_owned)
        .into();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.extend_from_slice(extra_args);
        let created: Value = http
            .post(format!("{driver_url}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args}
            }}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("a WebDriver session: {created}"))
            .to_owned();
        Self {
            http,
            session,
            driver_url,
            _driver: driver,
            _profile: TempDir(profile),
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.driver_url, self.session);
        let request = self.http.request(method, url);
        let request = if body.is_null() {
            request
        } else {
            request.json(&body)
        };
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(
            answer["value"]["error"].is_null(),
            "WebDriver {path} failed: {answer}"
        );
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "url", json!({"url": url}))
            .await;
    }

    /// Runs `script` (a function body; `return` its result) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// The protocol the current page came over (`h2`, `http/1.1`), as the browser reports it.
    pub async fn page_protocol(&self) -> Value {
        self.eval("return performance.getEntriesByType('navigation')[0].nextHopProtocol")
            .await
    }

    /// Polls `script` until it returns true.
    pub async fn wait_for(&self, script: &str, what: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.eval(script).await == json!(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let data = self
            .command(reqwest::Method::GET, "screenshot", Value::Null)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.driver_url, self.session);
        // Best effort: chromedriver is killed on drop anyway, taking Chromium with it.
        let _ = std::thread::spawn(move || {
            let _ = std::process::Command::new("curl")
                .args(["-s", "-X", "DELETE", &url])
                .stdout(Stdio::null())
                .status();
        })
        .join();
    }
}
