//! Secure transport as a client sees it: REST over TLS with HTTP/2 and HTTP/1.1 (by ALPN), wss
//! over HTTP/1.1 and WebSockets over HTTP/2 extended CONNECT, certificate reload on SIGHUP
//! without dropping open sockets, the plain-HTTP redirect, and stalled clients cut off in time.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::{StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::process::{
    free_port, rowcast, send_signal, terminate_and_wait, wait_until_serving,
};
use crate::support::secure::{
    ServerCert, TestCa, h2_connection, served_leaf, tls_connect, wss_http1, wss_http2, wss_http2_on,
};
use crate::support::{TestApp, TestDatabase, product, spawn_app_with, wait_until};

async fn spawn_tls_app(cert: &ServerCert, extra: &[&str]) -> TestApp {
    let flags = cert.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    spawn_app_with(&args).await
}

/// rowcast built straight from flags, for configurations the harness cannot watch (its
/// readiness check reads /stats over plain HTTP).
struct Running {
    plain: std::net::SocketAddr,
    tls: std::net::SocketAddr,
    fingerprint: String,
    shutdown: rowcast::shutdown::Shutdown,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _database: TestDatabase,
}

async fn run_with(flags: &[&str]) -> Running {
    let database = TestDatabase::create().await;
    let url = database.url.clone();
    let mut args = vec![
        "rowcast",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--database-url",
        &url,
    ];
    args.extend_from_slice(flags);
    let cli = <rowcast::config::Cli as clap::Parser>::try_parse_from(args).unwrap();
    let shutdown = rowcast::shutdown::Shutdown::new();
    let app = rowcast::App::build(cli.config, shutdown.clone())
        .await
        .unwrap();
    Running {
        plain: app.local_addr().unwrap(),
        tls: app.tls_addr().unwrap(),
        fingerprint: app.tls_fingerprint().unwrap(),
        shutdown,
        server: tokio::spawn(app.run()),
        _database: database,
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

fn https_url(app: &TestApp, path: &str) -> String {
    format!("https://localhost:{}{path}", app.tls_addr.unwrap().port())
}

#[tokio::test]
async fn rest_over_tls_negotiates_http2_or_http1_and_writes_reach_subscribers() {
    let ca = TestCa::new();
    let app = spawn_tls_app(&ca.issue("server"), &[]).await;
    let addr = app.tls_addr.unwrap();
    let mut ws = wss_http1(addr, &ca, "/websocket", None).await.unwrap();
    ws.subscribe(&[1, 2]).await;

    for (http1_only, version, id) in [(false, Version::HTTP_2, 1), (true, Version::HTTP_11, 2)] {
        let client = ca.https_client(http1_only);
        let mut body = product(&format!("over {version:?}"));
        body["productId"] = id.into();
        let created = client
            .post(https_url(&app, "/products"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(created.version(), version);
        assert_eq!(created.status(), StatusCode::CREATED);
        let change = ws.next_change().await;
        assert_eq!(change["product"]["productId"], id);

        let read = client
            .get(https_url(&app, &format!("/products/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(read.version(), version);
        assert_eq!(read.status(), StatusCode::OK);
        let headers = read.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["x-frame-options"], "DENY");
        // HSTS only once plain HTTP redirects: otherwise it would break the plain listener.
        assert!(headers.get("strict-transport-security").is_none());
    }
    // The plain listener still serves everything.
    let plain = app
        .http
        .get(format!("{}/products/1", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), StatusCode::OK);
}

#[tokio::test]
async fn websockets_work_over_http1_and_over_http2_extended_connect() {
    let ca = TestCa::new();
    let app = spawn_tls_app(&ca.issue("server"), &[]).await;
    let addr = app.tls_addr.unwrap();

    let mut over_h1 = wss_http1(addr, &ca, "/websocket", None).await.unwrap();
    // Two WebSockets and a REST call share one HTTP/2 connection, as in a browser.
    let mut connection = h2_connection(addr, &ca).await;
    let mut over_h2 = wss_http2_on(&mut connection, addr.port(), "/websocket", None)
        .await
        .unwrap();
    let mut also_h2 = wss_http2_on(&mut connection, addr.port(), "/websocket", None)
        .await
        .unwrap();
    for ws in [&mut over_h1, &mut over_h2, &mut also_h2] {
        ws.subscribe(&[7]).await;
    }
    let mut body = product("Tunnelled");
    body["productId"] = 7.into();
    let created = ca
        .https_client(false)
        .post(https_url(&app, "/products"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    for ws in [&mut over_h1, &mut over_h2, &mut also_h2] {
        let change = ws.next_change().await;
        assert_eq!(change["action"], "INSERT");
        assert_eq!(change["product"]["productName"], "Tunnelled");
    }

    let transport = &app.stats().await["transport"];
    assert_eq!(transport["websocketUpgradesHttp1"], 1, "{transport}");
    assert_eq!(transport["websocketUpgradesHttp2"], 2, "{transport}");
}

#[tokio::test]
async fn a_self_signed_certificate_serves_localhost_and_reports_its_fingerprint() {
    let running = run_with(&["--tls-self-signed"]).await;
    let addr = running.tls;

    // Accept whatever certificate is shown, and compare it with the reported fingerprint.
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let health = client
        .get(format!("https://localhost:{}/healthz", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.version(), Version::HTTP_2);

    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAny))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tls_connect(addr, std::sync::Arc::new(config))
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let digest = ring::digest::digest(&ring::digest::SHA256, &leaf);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(running.fingerprint, hex.join(":"));
    running.stop().await;
}

/// Accepts any server certificate (the self-signed test compares it by fingerprint instead).
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn old_protocol_versions_are_refused() {
    let ca = TestCa::new();
    let app = spawn_tls_app(&ca.issue("server"), &[]).await;
    // rustls cannot even offer TLS 1.1 or older; a ClientHello that offers only TLS 1.0 is
    // hand-made: record header, handshake header, legacy_version 3.1, no supported_versions.
    let mut hello = vec![0x01, 0x00, 0x00, 0x00, 0x03, 0x01];
    hello.extend_from_slice(&[0u8; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let len = hello.len() - 4;
    hello[1..4].copy_from_slice(&[0, (len >> 8) as u8, len as u8]);
    let mut record = vec![
        0x16,
        0x03,
        0x01,
        (hello.len() >> 8) as u8,
        hello.len() as u8,
    ];
    record.extend_from_slice(&hello);
    let mut tcp = TcpStream::connect(app.tls_addr.unwrap()).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes");
    // An alert record (21), never a ServerHello (22).
    assert_eq!(answer.first(), Some(&0x15), "{answer:?}");
    assert_eq!(app.stats().await["transport"]["tlsHandshakeFailures"], 1);
}

#[tokio::test]
async fn plain_http_redirects_to_https_except_health_and_https_sends_hsts() {
    let ca = TestCa::new();
    let cert = ca.issue("server");
    let flags = cert.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.push("--http-redirect");
    let app = run_with(&args).await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let plain_port = app.plain.port();
    let response = no_redirects
        .post(format!("http://localhost:{plain_port}/products?x=1"))
        .json(&product("redirected"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        response.headers()["location"],
        format!("https://localhost:{}/products?x=1", app.tls.port()).as_str()
    );
    let health = no_redirects
        .get(format!("http://{}/healthz", app.plain))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = no_redirects
        .get(format!("http://{}/readyz", app.plain))
        .send()
        .await
        .unwrap();
    assert_ne!(ready.status(), StatusCode::PERMANENT_REDIRECT);

    // Following the redirect lands on HTTPS, which asks browsers to stay there.
    let followed = ca
        .https_client(false)
        .get(format!("http://localhost:{plain_port}/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(followed.status(), StatusCode::OK);
    assert_eq!(followed.url().scheme(), "https");
    assert_eq!(
        followed.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    app.stop().await;
}

#[tokio::test]
async fn stalled_handshakes_and_request_heads_are_cut_off_in_time() {
    let ca = TestCa::new();
    let app = spawn_tls_app(
        &ca.issue("server"),
        &[
            "--tls-handshake-timeout",
            "500ms",
            "--header-read-timeout",
            "500ms",
        ],
    )
    .await;
    let tls_addr = app.tls_addr.unwrap();
    let plain_addr: std::net::SocketAddr =
        app.base_url.trim_start_matches("http://").parse().unwrap();

    // Connects, optionally sends a fragment, then waits for the server to close.
    async fn closed_after(
        stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
        send: &[u8],
    ) -> Duration {
        let started = Instant::now();
        if !send.is_empty() {
            stream.write_all(send).await.unwrap();
        }
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("the server closes a stalled connection")
            {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    }
    let within = |elapsed: Duration, what: &str| {
        assert!(
            elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(2500),
            "{what}: closed after {elapsed:?}"
        );
    };

    // TLS: nothing at all, and a ClientHello record header whose body never comes.
    let mut silent = TcpStream::connect(tls_addr).await.unwrap();
    within(closed_after(&mut silent, b"").await, "silent TLS client");
    let mut partial = TcpStream::connect(tls_addr).await.unwrap();
    within(
        closed_after(&mut partial, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await,
        "partial ClientHello",
    );
    // After the handshake: an HTTP/1.1 head that never ends, and an h2 client that never
    // sends its preface.
    let mut h1 = tls_connect(tls_addr, ca.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    within(
        closed_after(&mut h1, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n").await,
        "endless HTTP/1.1 head over TLS",
    );
    let mut h2 = tls_connect(tls_addr, ca.client_config(&[b"h2"]))
        .await
        .unwrap();
    within(closed_after(&mut h2, b"").await, "silent h2 client");
    // Plain HTTP: silence, and a trickled head.
    let mut plain = TcpStream::connect(plain_addr).await.unwrap();
    within(closed_after(&mut plain, b"").await, "silent plain client");
    let mut trickle = TcpStream::connect(plain_addr).await.unwrap();
    within(
        closed_after(&mut trickle, b"GET /healthz HTTP/1.1\r\nHo").await,
        "endless plain head",
    );

    let transport = &app.stats().await["transport"];
    assert_eq!(transport["tlsHandshakeTimeouts"], 2, "{transport}");
    assert!(
        transport["headerReadTimeouts"].as_u64() >= Some(2),
        "{transport}"
    );
    // A prompt client is served as usual.
    let ok = ca
        .https_client(false)
        .get(https_url(&app, "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn sighup_swaps_the_certificate_for_new_connections_and_open_websockets_keep_receiving() {
    let ca = TestCa::new();
    let first = ca.issue("first");
    let second = ca.issue("second");
    let live = ca.issue("live");
    std::fs::copy(&first.cert, &live.cert).unwrap();
    std::fs::copy(&first.key, &live.key).unwrap();

    let database = TestDatabase::create().await;
    let url = database.url.clone();
    let (plain_port, tls_port) = (free_port(), free_port());
    let mut child = rowcast(plain_port)
        .args(["--tls-listen", &format!("127.0.0.1:{tls_port}")])
        .args(live.flags())
        .env("DATABASE_URL", &url)
        .spawn()
        .unwrap();
    let tls_addr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let https = ca.https_client(false);
    let stats = format!("https://localhost:{tls_port}/stats");
    wait_until_serving(&mut child, &https, &stats).await;
    assert_eq!(served_leaf(tls_addr, &ca).await, first.leaf);

    let mut over_h1 = wss_http1(tls_addr, &ca, "/websocket", None).await.unwrap();
    let mut over_h2 = wss_http2(tls_addr, &ca, "/websocket", None).await.unwrap();
    over_h1.subscribe(&[1]).await;
    over_h2.subscribe(&[1]).await;

    std::fs::copy(&second.cert, &live.cert).unwrap();
    std::fs::copy(&second.key, &live.key).unwrap();
    send_signal(&child, Signal::SIGHUP);
    wait_until(Duration::from_secs(10), "the new certificate", || async {
        served_leaf(tls_addr, &ca).await == second.leaf
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop rowcast"
    );

    // Sockets opened under the old certificate still receive changes.
    let created = https
        .post(format!("https://localhost:{tls_port}/products"))
        .json(&product("After reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    for ws in [&mut over_h1, &mut over_h2] {
        let change = ws.next_change().await;
        assert_eq!(change["product"]["productName"], "After reload");
    }

    // A broken file on the next SIGHUP keeps the current certificate.
    std::fs::write(&live.cert, "garbage").unwrap();
    send_signal(&child, Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served_leaf(tls_addr, &ca).await, second.leaf);

    let status = terminate_and_wait(&mut child, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
}
