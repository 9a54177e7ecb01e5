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
use crate::support::secure::tls_connect;

/// rowcast built in this process with ACME flags.
struct Running {
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
        tls: app.tls_addr().unwrap(),
        shutdown,
        server: tokio::spawn(app.run()),
    }
}

impl Running {
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
        eprintln!("skipped: no pebble (apt-get install pebble)");
        return;
    }
    let database = TestDatabase::create().await;
    let cache = cache_dir();
    let (_pebble, app, _root, _leaf) = issued(&database, &cache).await;
    #[cfg(unix)]
    for file in ["account.json", "cert.pem", "key.pem"] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(cache.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    app.stop().await;
    let _ = std::fs::remove_dir_all(cache);
}

#[tokio::test]
async fn a_restart_serves_the_cached_certificate_without_the_ca() {
    if !Pebble::available() {
        eprintln!("skipped: no pebble (apt-get install pebble)");
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
