//! The writer side: a lean HTTP/1.1 keep-alive client (hyper's connection API, no pool)
//! for the REST subset the bench uses: create, replace, read, stats.
//!
//! One `Rest` is one TCP connection with `TCP_NODELAY` (over rustls for an `https://`
//! target, with the target's client configuration), reconnected lazily if the server
//! closed it. A request is never retried once written (POST is not idempotent, and a
//! retried PUT would skew latency); the caller counts the failure.

use crate::proto::ProductBody;
use crate::target::{Scheme, Target};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("https target: `{0}` is not a name TLS can verify")]
    TlsName(String),
    #[error("https target `{0}` has no TLS client configuration")]
    TlsConfig(String),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Build(#[from] hyper::http::Error),
    #[error("{method} {path}: unexpected status {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("{method} {path}: response is not the expected JSON: {source}")]
    Json {
        method: Method,
        path: String,
        source: serde_json::Error,
    },
}

impl RestError {
    /// A short stable label for counting failures by kind in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Tls { .. } | Self::TlsName(_) | Self::TlsConfig(_) => "tls",
            Self::Http(_) => "http_error",
            Self::Build(_) => "bad_request",
            Self::Status { .. } => "status",
            Self::Json { .. } => "json",
        }
    }
}

#[derive(Debug)]
pub struct Rest {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// Sent as `Authorization: Bearer <token>` on every request, when set.
    bearer: Option<String>,
}

impl Rest {
    pub fn new(target: &Target) -> Self {
        Self {
            target: target.clone(),
            sender: None,
            bearer: None,
        }
    }

    /// A client that authenticates every request with `token`.
    pub fn with_bearer(target: &Target, token: Option<&str>) -> Self {
        Self {
            bearer: token.map(str::to_owned),
            ..Self::new(target)
        }
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, RestError> {
        let usable = match self.sender.as_mut() {
            Some(s) => !s.is_closed() && s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let addr = self.target.addr;
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| RestError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
            // Latency is what we measure: never let Nagle hold a request back.
            tcp.set_nodelay(true).map_err(|source| RestError::Connect {
                addr: addr.to_string(),
                source,
            })?;
            let sender = match self.target.scheme {
                Scheme::Plain => handshake(tcp).await?,
                Scheme::Tls => {
                    let config = self
                        .target
                        .tls
                        .clone()
                        .ok_or_else(|| RestError::TlsConfig(self.target.name.clone()))?;
                    let name = crate::tls::server_name(&self.target.host)
                        .ok_or_else(|| RestError::TlsName(self.target.host.clone()))?;
                    let tls = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await
                        .map_err(|source| RestError::Tls {
                            addr: addr.to_string(),
                            source,
                        })?;
                    handshake(tls).await?
                }
            };
            return Ok(self.sender.insert(sender));
        }
        // `usable` is false when there is none.
        self.sender
            .as_mut()
            .ok_or_else(|| RestError::TlsConfig(self.target.name.clone()))
    }

    /// Sends one request; returns status and body.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), RestError> {
        let authority = self.target.authority();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(token) = &self.bearer {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let sender = self.sender().await?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    async fn expect_json(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        want: StatusCode,
    ) -> Result<serde_json::Value, RestError> {
        let (status, bytes) = self.request(method.clone(), path, body).await?;
        if status != want {
            return Err(RestError::Status {
                method,
                path: path.to_owned(),
                status,
                body: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| RestError::Json {
            method,
            path: path.to_owned(),
            source,
        })
    }

    /// `POST /products` → the new product's id.
    pub async fn create_product(&mut self, body: &ProductBody) -> Result<u64, RestError> {
        let json = serde_json::to_vec(body).map_err(|source| RestError::Json {
            method: Method::POST,
            path: "/products".into(),
            source,
        })?;
        let v = self
            .expect_json(Method::POST, "/products", Some(json), StatusCode::CREATED)
            .await?;
        v.get("productId")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| RestError::Status {
                method: Method::POST,
                path: "/products".into(),
                status: StatusCode::CREATED,
                body: "response has no numeric productId".into(),
            })
    }

    /// `PUT /products/{id}` (full replace); returns the status without judging it, so hot
    /// loops can count non-2xx answers instead of aborting.
    pub async fn put_product(
        &mut self,
        id: u64,
        body: &ProductBody,
    ) -> Result<StatusCode, RestError> {
        // ProductBody has only strings and integers: serializing it cannot fail.
        let json = serde_json::to_vec(body).unwrap_or_default();
        let path = format!("/products/{id}");
        Ok(self.request(Method::PUT, &path, Some(json)).await?.0)
    }

    /// `GET /stats` as JSON.
    pub async fn stats(&mut self) -> Result<serde_json::Value, RestError> {
        self.expect_json(Method::GET, "/stats", None, StatusCode::OK)
            .await
    }
}

/// HTTP/1.1 over `io`; the connection is driven by a task of its own.
async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, RestError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        // The connection ends when the server closes it or `sender` drops; either way the
        // next request reconnects, so its error needs no handling here.
        let _ = conn.await;
    });
    Ok(sender)
}

/// Reads `sessions` from `/stats`, if the server reports it.
pub async fn stats_sessions(target: &Target) -> Option<u64> {
    Rest::new(target)
        .stats()
        .await
        .ok()?
        .get("sessions")?
        .as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One request to a one-shot server that answers 401: the bearer token is in the request
    /// head, and a refusal comes back as a status, not an error.
    #[tokio::test]
    async fn bearer_is_sent_and_refusal_is_a_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed before its request head ended");
                head.extend_from_slice(&buf[..n]);
            }
            tcp.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(head).unwrap()
        });
        let target = Target::parse(&format!("t=http://{addr}"), "/websocket").unwrap();
        let mut rest = Rest::with_bearer(&target, Some("s3cret-token"));
        let (status, _) = rest.request(Method::GET, "/stats", None).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let head = server.await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /stats http/1.1\r\n"), "{head}");
        assert!(
            head.contains("authorization: bearer s3cret-token\r\n"),
            "{head}"
        );
    }

    /// The same over TLS: the writer reaches an `https://` target with the target's CA, and
    /// asks for HTTP/1.1 by ALPN.
    #[tokio::test]
    async fn https_target_is_reached_over_tls() {
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata");
        let config =
            crate::tls::server_config(&data.join("server.pem"), &data.join("server.key")).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tls.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed before its request head ended");
                head.extend_from_slice(&buf[..n]);
            }
            let body = br#"{"sessions":3}"#;
            let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            tls.write_all(reply.as_bytes()).await.unwrap();
            tls.write_all(body).await.unwrap();
            tls.flush().await.unwrap();
            alpn
        });
        let spec = format!("t=https://{addr},ca={}", data.join("ca.pem").display());
        let target = Target::parse(&spec, "/websocket").unwrap();
        assert_eq!(stats_sessions(&target).await, Some(3));
        assert_eq!(server.await.unwrap().as_deref(), Some(&b"http/1.1"[..]));
    }
}
