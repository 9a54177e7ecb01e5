//! The client side of one WebSocket: connect (optionally from a chosen 127.0.0.x source
//! address), subscribe/unsubscribe and wait for the ack, close politely.
//!
//! Source addresses: one (src ip, dst ip:port) tuple has ~28k ephemeral ports
//! (32768–60999), so above ~25k connections — or in `churn`, where closed sockets linger
//! in TIME_WAIT — sockets are spread over 127.0.0.2, .3, … (every 127/8 address is local
//! on Linux loopback).
//!
//! Buffers are small (8 KiB read, eager write): the client holds up to ~19 500
//! connections that each receive a few hundred bytes at a time.
//!
//! `wss://` targets are reached over rustls with the target's client configuration (see
//! `tls`); every socket is a `MaybeTlsStream`, plain or TLS, so scenarios need not care.

use crate::proto::{self, ServerFrame};
use crate::target::{Scheme, Target};
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message, protocol::WebSocketConfig};
use tokio_tungstenite::{Connector as TlsConnector, MaybeTlsStream, WebSocketStream};

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Ports usable per source address before we move to the next one (the ephemeral range
/// is 28 232 ports; the rest is headroom for TIME_WAIT and other sockets).
pub const CONNS_PER_SOURCE_IP: usize = 25_000;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("client process is out of file descriptors (RLIMIT_NOFILE)")]
    FdLimit,
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("handshake: {0}")]
    Handshake(tungstenite::Error),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("server sent error `{code}`: {message}")]
    Server { code: String, message: String },
    #[error("connection closed while waiting for {0}")]
    Closed(&'static str),
    #[error("ack lists {got} ids, expected {want}")]
    AckMismatch { got: usize, want: usize },
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
}

impl WsError {
    /// A short stable label for counting failures by kind in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::FdLimit => "client_fd_limit",
            Self::Connect(_) => "connect",
            Self::Handshake(_) => "handshake",
            Self::Timeout(_) => "timeout",
            Self::Server { .. } => "server_error_frame",
            Self::Closed(_) => "closed",
            Self::AckMismatch { .. } => "ack_mismatch",
            Self::Ws(_) => "websocket",
        }
    }
}

/// Opens WebSockets to one target, spreading source addresses.
#[derive(Debug, Clone)]
pub struct Connector {
    url: String,
    addr: SocketAddr,
    /// The target's TLS client configuration (`wss://`), None for `ws://`.
    tls: Option<Arc<rustls::ClientConfig>>,
    sources: Vec<Option<IpAddr>>,
    pub timeout: Duration,
}

impl Connector {
    /// `spread` source addresses (1 = let the kernel choose). Spreading applies only to
    /// an IPv4 loopback target.
    pub fn new(target: &Target, spread: usize) -> Self {
        let loopback_v4 = matches!(target.addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
        let sources = if spread <= 1 || !loopback_v4 {
            vec![None]
        } else {
            // 127.0.0.1 first, then .2, .3, … (u8 wraps past .254 are not reachable: at
            // 25k per address that is 6M connections, far beyond the fd limit).
            (0..spread.min(254))
                .map(|i| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8))))
                .collect()
        };
        Self {
            url: target.ws_url.clone(),
            addr: target.addr,
            tls: match target.scheme {
                Scheme::Plain => None,
                Scheme::Tls => target.tls.clone(),
            },
            sources,
            timeout: Duration::from_secs(10),
        }
    }

    /// Source addresses needed for `conns` simultaneous connections.
    pub fn spread_for(conns: usize) -> usize {
        conns.div_ceil(CONNS_PER_SOURCE_IP).max(1)
    }

    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// Connects client number `index` (which picks its source address) and completes the
    /// WebSocket handshake, bounded by `self.timeout`.
    pub async fn connect(&self, index: usize) -> Result<WsStream, WsError> {
        let source = self.sources[index % self.sources.len()];
        tokio::time::timeout(self.timeout, self.connect_inner(source))
            .await
            .map_err(|_| WsError::Timeout("connect + handshake"))?
    }

    async fn connect_inner(&self, source: Option<IpAddr>) -> Result<WsStream, WsError> {
        let map_io = |e: std::io::Error| {
            if crate::fdlimit::is_fd_exhaustion(&e) {
                WsError::FdLimit
            } else {
                WsError::Connect(e)
            }
        };
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(map_io)?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(map_io)?;
        }
        let tcp = socket.connect(self.addr).await.map_err(map_io)?;
        tcp.set_nodelay(true).map_err(map_io)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0);
        // A TLS target always has a configuration (`Target::parse` refuses one without);
        // `Plain` wraps the socket as it is.
        let connector = match &self.tls {
            Some(c) => TlsConnector::Rustls(c.clone()),
            None => TlsConnector::Plain,
        };
        let (ws, _resp) = tokio_tungstenite::client_async_tls_with_config(
            self.url.as_str(),
            tcp,
            Some(config),
            Some(connector),
        )
        .await
        .map_err(|e| match e {
            tungstenite::Error::Io(io) if crate::fdlimit::is_fd_exhaustion(&io) => WsError::FdLimit,
            other => WsError::Handshake(other),
        })?;
        Ok(ws)
    }
}

/// Sends `subscribe` for `ids` and waits for the `subscribed` ack.
pub async fn subscribe(ws: &mut WsStream, ids: &[u64], timeout: Duration) -> Result<(), WsError> {
    ws.send(Message::text(proto::subscribe_text(ids))).await?;
    await_ack(ws, "subscribed", ids.len(), timeout).await
}

/// Sends `unsubscribe` for `ids` and waits for the `unsubscribed` ack.
pub async fn unsubscribe(ws: &mut WsStream, ids: &[u64], timeout: Duration) -> Result<(), WsError> {
    ws.send(Message::text(proto::unsubscribe_text(ids))).await?;
    await_ack(ws, "unsubscribed", ids.len(), timeout).await
}

/// Reads until an ack of `kind` arrives. Change frames for earlier subscriptions may
/// arrive first and are skipped (callers subscribe before any writes they measure).
async fn await_ack(
    ws: &mut WsStream,
    kind: &'static str,
    want: usize,
    timeout: Duration,
) -> Result<(), WsError> {
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let Ok(frame) = ServerFrame::parse(&t) else {
                        continue;
                    };
                    if frame.kind == kind {
                        let got = frame.product_ids.map_or(0, |v| v.len());
                        return if got == want {
                            Ok(())
                        } else {
                            Err(WsError::AckMismatch { got, want })
                        };
                    }
                    if frame.kind == "error" {
                        return Err(WsError::Server {
                            code: frame.error.unwrap_or_default().into_owned(),
                            message: frame.message.unwrap_or_default().into_owned(),
                        });
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Err(WsError::Closed(kind)),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| WsError::Timeout(kind))?
}

/// Starts the close handshake and waits (bounded) for the server to finish it, so the
/// server — not the client — ends up holding TIME_WAIT, as RFC 6455 §7.1.1 intends.
pub async fn close(ws: &mut WsStream, timeout: Duration) {
    let drain = async {
        // An error here means the connection is already gone, which is the goal.
        if ws.close(None).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    };
    let _ = tokio::time::timeout(timeout, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Target;

    fn testdata(file: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/testdata")
            .join(file)
    }

    /// A one-connection `wss://` server: TLS with the test certificate, then a WebSocket that
    /// acks one subscribe.
    async fn one_shot_wss() -> SocketAddr {
        let config =
            crate::tls::server_config(&testdata("server.pem"), &testdata("server.key")).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // A client that refuses our certificate ends the handshake: nothing more to do.
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
            let mut ws = tokio_tungstenite::accept_async(tls).await.unwrap();
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(t) = msg {
                    assert!(t.contains("subscribe"), "{t}");
                    let ack = r#"{"type":"subscribed","productIDs":[7]}"#;
                    ws.send(Message::text(ack)).await.unwrap();
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn wss_with_a_ca_file_connects_and_subscribes() {
        let addr = one_shot_wss().await;
        let ca = testdata("ca.pem");
        let spec = format!("t=https://{addr},ca={}", ca.display());
        let target = Target::parse(&spec, "/websocket").unwrap();
        let mut ws = Connector::new(&target, 1).connect(0).await.unwrap();
        assert!(matches!(ws.get_ref(), MaybeTlsStream::Rustls(_)));
        subscribe(&mut ws, &[7], Duration::from_secs(5))
            .await
            .unwrap();
        close(&mut ws, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn wss_refuses_a_certificate_its_ca_did_not_sign_unless_insecure() {
        // The leaf alone, not its CA, as the trust anchor: the chain does not verify.
        let leaf_only =
            std::env::temp_dir().join(format!("rowcast-bench-leaf-{}.pem", std::process::id()));
        let pem = std::fs::read_to_string(testdata("server.pem")).unwrap();
        let end = pem.find("-----END CERTIFICATE-----").unwrap() + 25;
        std::fs::write(&leaf_only, &pem[..end]).unwrap();
        let addr = one_shot_wss().await;
        let spec = format!("t=https://{addr},ca={}", leaf_only.display());
        let target = Target::parse(&spec, "/websocket").unwrap();
        let err = Connector::new(&target, 1).connect(0).await.unwrap_err();
        assert!(matches!(err, WsError::Handshake(_)), "{err}");
        let _ = std::fs::remove_file(&leaf_only);

        let addr = one_shot_wss().await;
        let target = Target::parse(&format!("t=https://{addr},insecure"), "/websocket").unwrap();
        let mut ws = Connector::new(&target, 1).connect(0).await.unwrap();
        subscribe(&mut ws, &[7], Duration::from_secs(5))
            .await
            .unwrap();
    }
}
