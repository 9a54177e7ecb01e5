//! Automatic certificates from an ACME CA (pebble, validating TLS-ALPN-01 for real against
//! rowcast's HTTPS listener): issuance, reuse of the cache across a restart without the CA,
//! renewal under an open WebSocket, and a CA that is down at renewal time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::support::TestDatabase;
use crate::support::pebble::Pebble;
use crate::support::process::free_port;
use crate::support::secure::{tls_connect, wss_http1_with};

/// rowcast built in this process with ACME flags.
struct Running {
    plain: SocketAddr,
    tls: SocketAddr,
    shutdown: rowcast::shutdown::Shutdown,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(
    database: &TestDatabase,
    tls_port: u16,
    directory: &str,
    directory_ca: &Path,
    cache: &Path,
    extra: &[&str],
) -> Running {
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let mut args = vec![
        "rowcast",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        &tls_listen,
        "--database-url",
        &database.url,
        "--acme-domain",
        "localhost",
        "--acme-directory",
        directory,
        "--acme-directory-ca",
        directory_ca.to_str().unwrap(),
        "--acme-cache-dir",
        cache.to_str().unwrap(),
        "--acme-email",
        "ops@example.com",
    ];
    args.extend_from_slice(extra);
    let cli = <rowcast::config::Cli as clap::Parser>::try_parse_from(args).unwrap();
    let shutdown = rowcast::shutdown::Shutdown::new();
    let app = rowcast::App::build(cli.config, shutdown.clone())
        .await
        .unwrap();
    Running {
        plain: app.local_addr().unwrap(),
        tls: app.tls_addr().unwrap(),
        shutdown,
        server: tokio::spawn(app.run()),
    }
}

impl Running {
    async fn stats(&self) -> serde_json::Value {
        let url = format!("http://{}/stats", self.plain);
        crate::support::get_json(&reqwest::Client::new(), &url).await
    }

    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.plain);
        reqwest::get(url).await.unwrap().text().await.unwrap()
    }

    /// Waits until `/stats` shows at least `failures` failed renewals.
    async fn wait_for_failures(&self, failures: u64) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let stats = self.stats().await;
            let seen = stats["tls"]["acme"]["renewalFailures"].as_u64().unwrap();
            if seen >= failures {
                return stats;
            }
            assert!(tokio::time::Instant::now() < deadline, "{stats}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("stops")
            .unwrap()
            .unwrap();
    }
}

fn client_trusting(root: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The leaf a handshake verified against `root` is shown, or None if verification fails.
async fn verified_leaf(addr: SocketAddr, root: &CertificateDer<'static>) -> Option<Vec<u8>> {
    let tls = tls_connect(addr, client_trusting(root)).await.ok()?;
    Some(tls.get_ref().1.peer_certificates()?[0].to_vec())
}

fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("rowcast-acme-{:016x}", rand::random::<u64>()))
}

/// Starts pebble and rowcast, and waits until rowcast serves a certificate pebble issued.
async fn issued(
    database: &TestDatabase,
    cache: &Path,
) -> (Pebble, Running, CertificateDer<'static>, Vec<u8>) {
    let tls_port = free_port();
    let pebble = Pebble::start(tls_port).await;
    let root = pebble.issuing_root().await;
    let app = start(
        database,
        tls_port,
        &pebble.directory,
        &pebble.directory_ca(),
        cache,
        &[],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let leaf = loop {
        if let Some(leaf) = verified_leaf(app.tls, &root).await {
            break leaf;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pebble-issued certificate within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    (pebble, app, root, leaf)
}

#[tokio::test]
async fn pebble_issues_the_certificate_https_serves() {
    if !Pebble::available() {
        return;
    }
    let database = TestDatabase::create().await;
    let cache = cache_dir();
    let (_pebble, app, _root, _leaf) = issued(&database, &cache).await;
    // One subdirectory for this directory URL and name; secrets readable by rowcast only.
    let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(entries.len(), 1);
    let subdir = entries[0].as_ref().unwrap().path();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(mode(&subdir), 0o700);
        for file in ["account.json", "cert.pem", "key.pem"] {
            assert_eq!(mode(&subdir.join(file)), 0o600, "{file}");
        }
    }
    app.stop().await;
    let _ = std::fs::remove_dir_all(cache);
}

#[tokio::test]
async fn a_restart_serves_the_cached_certificate_without_the_ca() {
    if !Pebble::available() {
        return;
    }
    let database = TestDatabase::create().await;
    let cache = cache_dir();
    let (mut pebble, app, root, leaf) = issued(&database, &cache).await;
    app.stop().await;
    let directory = pebble.directory.clone();
    let directory_ca = pebble.directory_ca();
    pebble.stop().await;

    let app = start(
        &database,
        free_port(),
        &directory,
        &directory_ca,
        &cache,
        &[],
    )
    .await;
    // At once: served from the cache before the listener accepted anything.
    assert_eq!(verified_leaf(app.tls, &root).await, Some(leaf));
    app.stop().await;
    let _ = std::fs::remove_dir_all(cache);
}

/// Longer than pebble's certificate lifetime (5 years): the cached certificate is due at once.
const RENEW_NOW: [&str; 2] = ["--acme-renew-before", "2000d"];

#[tokio::test]
async fn a_ca_down_at_renewal_leaves_the_old_certificate_serving_and_counts_retries() {
    if !Pebble::available() {
        return;
    }
    let database = TestDatabase::create().await;
    let cache = cache_dir();
    let (mut pebble, app, root, leaf) = issued(&database, &cache).await;
    app.stop().await;
    pebble.stop().await;

    let (directory, directory_ca) = (pebble.directory.clone(), pebble.directory_ca());
    let app = start(
        &database,
        free_port(),
        &directory,
        &directory_ca,
        &cache,
        &RENEW_NOW,
    )
    .await;
    // Attempts at 0, 1 and 3 s (backoff doubling): two failures within a few seconds.
    let stats = app.wait_for_failures(2).await;
    let acme = &stats["tls"]["acme"];
    assert!(acme["renewalAttempts"].as_u64().unwrap() >= 2, "{stats}");
    assert!(acme["lastRenewalError"].is_string(), "{stats}");
    assert!(
        stats["tls"]["certificateExpiryUnix"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(verified_leaf(app.tls, &root).await, Some(leaf));

    let metrics = app.metrics().await;
    let samples = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_owned())))
        .unwrap()
        .samples;
    let value = |name: &str| match samples.iter().find(|s| s.metric == name).map(|s| &s.value) {
        Some(prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v)) => *v,
        other => panic!("{name}: {other:?}\n{metrics}"),
    };
    assert!(value("rowcast_acme_renewal_failures_total") >= 2.0);
    assert!(value("rowcast_tls_certificate_expiry_seconds") > 1.7e9);
    app.stop().await;
    let _ = std::fs::remove_dir_all(cache);
}

#[tokio::test]
async fn renewal_swaps_the_certificate_under_an_open_websocket() {
    if !Pebble::available() {
        return;
    }
    let database = TestDatabase::create().await;
    let cache = cache_dir();
    let (mut pebble, app, old_root, old_leaf) = issued(&database, &cache).await;
    let tls_port = app.tls.port();
    app.stop().await;
    // Down while rowcast starts, so the WebSocket below is open before the renewal can succeed.
    pebble.stop().await;

    let (directory, directory_ca) = (pebble.directory.clone(), pebble.directory_ca());
    let app = start(
        &database,
        tls_port,
        &directory,
        &directory_ca,
        &cache,
        &RENEW_NOW,
    )
    .await;
    let mut ws = wss_http1_with(app.tls, client_trusting(&old_root), "/websocket", None)
        .await
        .unwrap();
    ws.subscribe(&[7]).await;
    app.wait_for_failures(1).await;

    // Back, forgetting everything: rowcast registers a new account and renews.
    pebble.restart().await;
    let new_root = pebble.issuing_root().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let new_leaf = loop {
        if let Some(leaf) = verified_leaf(app.tls, &new_root).await {
            break leaf;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(new_leaf, old_leaf);
    let stats = app.stats().await;
    assert!(
        stats["tls"]["acme"]["lastRenewalError"].is_null(),
        "{stats}"
    );

    // The WebSocket opened under the old certificate still receives.
    let mut body = crate::support::product("renewed");
    body["productId"] = 7.into();
    let created = reqwest::Client::new()
        .post(format!("http://{}/products", app.plain))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let change = ws.next_change().await;
    assert_eq!(change["product"]["productId"], 7);
    app.stop().await;
    let _ = std::fs::remove_dir_all(cache);
}
