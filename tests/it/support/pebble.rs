//! A private pebble (Let's Encrypt's test ACME server, Debian package `pebble`) for one test:
//! free ports, a generated config and HTTPS certificate (the package ships none), killed when
//! dropped. Validation is real: pebble's TLS-ALPN-01 port is the one rowcast's HTTPS listener
//! is told to bind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::process::{Child, Command};

use super::process::{free_port, test_log};
use super::secure::TestCa;

/// Where Debian installs the binary.
const PEBBLE: &str = "/usr/bin/pebble";

pub struct Pebble {
    child: Child,
    /// Signs pebble's own HTTPS certificate (not the ones it issues).
    pub https_ca: TestCa,
    pub directory: String,
    management: u16,
    config: PathBuf,
}

impl Pebble {
    /// False (the test then skips) when pebble is not installed, unless
    /// `ROWCAST_ACME_TEST=require` (set by `tests/run-all.sh`, which installs it): then a missing
    /// pebble fails the test instead of letting it pass without checking anything.
    pub fn available() -> bool {
        if Path::new(PEBBLE).exists() {
            return true;
        }
        let required = std::env::var("ROWCAST_ACME_TEST").is_ok_and(|v| v == "require");
        assert!(
            !required,
            "ROWCAST_ACME_TEST=require but {PEBBLE} is not installed"
        );
        false
    }

    /// Starts pebble validating TLS-ALPN-01 on `tls_port` of 127.0.0.1.
    pub async fn start(tls_port: u16) -> Self {
        let https_ca = TestCa::new();
        let cert = https_ca.issue_for("pebble", &["localhost", "127.0.0.1"]);
        let (listen, management) = (free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": cert.cert,
                "privateKey": cert.key,
                // Nothing listens there: rowcast answers TLS-ALPN-01 only.
                "httpPort": free_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_path = https_ca.dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let pebble = Self {
            child: spawn(&config_path),
            https_ca,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management,
            config: config_path,
        };
        pebble.wait_until_serving().await;
        pebble
    }

    /// Starts pebble again on the same ports after [`Self::stop`]. It remembers nothing: new
    /// roots, no accounts (a CA that was reset).
    pub async fn restart(&mut self) {
        self.child = spawn(&self.config);
        self.wait_until_serving().await;
    }

    async fn wait_until_serving(&self) {
        let http = self.https_ca.https_client(true);
        let directory = self.directory.clone();
        super::wait_until(
            Duration::from_secs(20),
            "pebble serves its directory",
            || {
                let request = http.get(&directory).send();
                async move { request.await.is_ok_and(|r| r.status().is_success()) }
            },
        )
        .await;
    }

    /// The file rowcast's `--acme-directory-ca` takes.
    pub fn directory_ca(&self) -> PathBuf {
        self.https_ca.ca_file()
    }

    /// The root pebble issues under (generated at each start).
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        let pem = self
            .https_ca
            .https_client(true)
            .get(url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap()
    }

    /// Stops pebble now (a CA that went away).
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

fn spawn(config: &Path) -> Child {
    Command::new(PEBBLE)
        .arg("-config")
        .arg(config)
        // Validate at once instead of after a random 0-15 s, and never reject a nonce
        // (pebble rejects 5 % by default to exercise clients' retries).
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdin(Stdio::null())
        .stdout(test_log())
        .stderr(test_log())
        .kill_on_drop(true)
        .spawn()
        .expect("pebble starts")
}
