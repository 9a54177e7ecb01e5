//! TLS for the tests: a throwaway CA that issues server certificates (PEM files for
//! `--tls-cert`/`--tls-key`, leaf first, then the CA: a real chain), clients that trust only that
//! CA, and WebSocket clients over HTTP/1.1 (wss) and over HTTP/2 extended CONNECT (RFC 8441),
//! speaking rowcast's protocol.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};

use super::ws::ARRIVAL;

/// A certificate authority for one test, with a directory for the files it issues.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: PathBuf,
}

/// A server certificate issued by a [`TestCa`], written to disk.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The leaf, to compare with what a client is shown.
    pub leaf: CertificateDer<'static>,
}

impl ServerCert {
    /// The flags that make rowcast serve this certificate.
    pub fn flags(&self) -> [String; 4] {
        [
            "--tls-cert".into(),
            self.cert.to_str().unwrap().into(),
            "--tls-key".into(),
            self.key.to_str().unwrap().into(),
        ]
    }
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            // A name of its own: a client trusting another test CA must not find this one's
            // issuer by name.
            .push(
                rcgen::DnType::CommonName,
                format!("rowcast test CA {:08x}", rand::random::<u32>()),
            );
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!("rowcast-ca-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { issuer, dir }
    }

    /// Issues a certificate for localhost and 127.0.0.1 and writes `<name>.crt` (chain) and
    /// `<name>.key` (PKCS#8).
    pub fn issue(&self, name: &str) -> ServerCert {
        self.issue_for(name, &["localhost", "127.0.0.1"])
    }

    /// Issues a certificate for `names` (DNS names or IP addresses), written as [`Self::issue`]
    /// writes.
    pub fn issue_for(&self, name: &str, names: &[&str]) -> ServerCert {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let params = CertificateParams::new(names).unwrap();
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.join(format!("{name}.crt"));
        let key_path = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, format!("{}{}", leaf.pem(), self.issuer.pem())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        ServerCert {
            cert: cert_path,
            key: key_path,
            leaf: leaf.der().clone(),
        }
    }

    /// Writes the CA certificate to `ca.pem` (for `sslrootcert`) and returns its path.
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.join("ca.pem");
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }

    /// A rustls client that trusts this CA only and offers `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// An HTTPS client trusting this CA; HTTP/1.1 only, or h2 preferred (by ALPN).
    pub fn https_client(&self, http1_only: bool) -> reqwest::Client {
        let builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_der(self.issuer.der()).unwrap());
        let builder = if http1_only {
            builder.http1_only()
        } else {
            builder
        };
        builder.build().unwrap()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection to `addr` as `localhost`, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The certificate a new connection to `addr` is shown.
pub async fn served_leaf(addr: SocketAddr, ca: &TestCa) -> CertificateDer<'static> {
    let tls = tls_connect(addr, ca.client_config(&[b"http/1.1"]))
        .await
        .expect("TLS handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A WebSocket over TLS, either transport.
pub struct SecureWs {
    pub socket: WebSocketStream<Box<dyn Io>>,
    /// For HTTP/2: the connection's request handle, kept so the connection stays open.
    _connection: Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>,
}

/// Opens `wss://localhost/<path_and_query>` over HTTP/1.1 (ALPN `http/1.1`, Upgrade), with an
/// optional Origin. Err carries the refusal's HTTP status.
pub async fn wss_http1(
    addr: SocketAddr,
    ca: &TestCa,
    path_and_query: &str,
    origin: Option<&str>,
) -> Result<SecureWs, StatusCode> {
    wss_http1_with(
        addr,
        ca.client_config(&[b"http/1.1"]),
        path_and_query,
        origin,
    )
    .await
}

/// [`wss_http1`] with a client configuration of the caller's (which must offer `http/1.1`).
pub async fn wss_http1_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path_and_query: &str,
    origin: Option<&str>,
) -> Result<SecureWs, StatusCode> {
    let tls = tls_connect(addr, config).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let url = format!("wss://localhost:{}{path_and_query}", addr.port());
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    let boxed: Box<dyn Io> = Box::new(tls);
    match tokio_tungstenite::client_async(request, boxed).await {
        Ok((socket, _)) => Ok(SecureWs {
            socket,
            _connection: None,
        }),
        Err(tungstenite::Error::Http(response)) => Err(response.status()),
        Err(other) => panic!("WebSocket handshake failed: {other}"),
    }
}

/// An HTTP/2 connection over TLS (ALPN `h2` only), ready for extended CONNECT: a first GET has
/// completed, so the server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) have arrived.
pub async fn h2_connection(
    addr: SocketAddr,
    ca: &TestCa,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tls = tls_connect(addr, ca.client_config(&[b"h2"]))
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let health = Request::get(format!("https://localhost:{}/healthz", addr.port()))
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(health).await.expect("GET /healthz");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    sender
}

/// Opens a WebSocket as an HTTP/2 stream (RFC 8441: CONNECT with `:protocol websocket`) on
/// `sender`'s connection. Err carries the refusal's HTTP status.
pub async fn wss_http2_on(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    port: u16,
    path_and_query: &str,
    origin: Option<&str>,
) -> Result<SecureWs, StatusCode> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://localhost:{port}{path_and_query}"))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"));
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    let response = sender
        .send_request(request.body(Empty::new()).unwrap())
        .await
        .expect("extended CONNECT answered");
    if response.status() != StatusCode::OK {
        return Err(response.status());
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .expect("CONNECT stream upgrades");
    let boxed: Box<dyn Io> = Box::new(TokioIo::new(upgraded));
    let socket = WebSocketStream::from_raw_socket(boxed, Role::Client, None).await;
    Ok(SecureWs {
        socket,
        _connection: Some(sender.clone()),
    })
}

/// A WebSocket over HTTP/2 on a connection of its own.
pub async fn wss_http2(
    addr: SocketAddr,
    ca: &TestCa,
    path_and_query: &str,
    origin: Option<&str>,
) -> Result<SecureWs, StatusCode> {
    let mut sender = h2_connection(addr, ca).await;
    wss_http2_on(&mut sender, addr.port(), path_and_query, origin).await
}

impl SecureWs {
    /// Subscribes and waits for the ack.
    pub async fn subscribe(&mut self, ids: &[i64]) {
        let command = json!({"command": "subscribe", "productIDs": ids}).to_string();
        self.socket.send(Message::text(command)).await.unwrap();
        let ack = self.next_json().await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }

    /// The next data message as JSON.
    pub async fn next_json(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(ARRIVAL, self.socket.next())
                .await
                .expect("a message arrives in time");
            match message {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next change message.
    pub async fn next_change(&mut self) -> Value {
        let message = self.next_json().await;
        assert_eq!(message["type"], "change", "{message}");
        message
    }
}
