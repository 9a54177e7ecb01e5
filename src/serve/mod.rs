//! The accept loop and each connection's life: admission (a global and a per-address connection
//! limit), the TLS handshake (bounded by a timeout), HTTP/1.1 or HTTP/2 by ALPN (hyper-util's
//! auto builder; on plain TCP it sniffs, so h2c prior knowledge keeps working), WebSocket
//! upgrades on both (HTTP/2 advertises extended CONNECT, RFC 8441), a deadline for the first
//! complete request and hyper's header-read timeout for the next ones (slow-loris clients), a
//! write deadline for peers that stop reading (`deadline`), and connection-level graceful
//! shutdown.
//!
//! Admission (`admission`): a connection's ticket lives inside its byte stream, so it travels
//! with the stream into an upgraded WebSocket: a WebSocket counts against the limits as long as
//! it is open, not just until its upgrade request was answered. The write deadline lives in the
//! same stream, under TLS and hyper, so every connection has it whatever it carries.
//!
//! Each request gets two extensions the router may read: `ConnectInfo<SocketAddr>` (the peer)
//! and the `Scheme` the connection really used (not what the client claims). Counters for
//! operators are in [`TransportStats`]. This follows axum's `low-level-rustls` example: the TLS
//! handshake happens inside the connection's task, so a slow one blocks nobody else.
//!
//! Each plain TCP socket is shared (`socket`): after an HTTP/1.1 WebSocket upgrade the session
//! takes it back from hyper ([`plain_upgraded`]) so that the distributor can write into it too.
//!
//! Imports `config`, `shutdown` and `http_error`; the TLS acceptor comes from `tls` through `app`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::uri::Scheme;
use axum::http::{Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::Instrument;

use crate::config::split_host_port;

mod admission;
mod deadline;
mod socket;

use crate::shutdown::Shutdown;
use admission::Guarded;
pub use admission::{Connections, TransportSnapshot, TransportStats};
use socket::SharedTcp;
pub use socket::{PlainStream, PlainUpgraded, plain_upgraded};

/// HTTP/2 connections are pinged this often, so a peer that vanished (no FIN, no RST) is found
/// and its connection slot freed; WebSockets have their own heartbeat on top.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an HTTP/2 ping may go unanswered.
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one HTTP/2 connection may have open, WebSockets included (hyper's default, made
/// explicit): with it, the per-address connection limit also bounds one client's WebSockets.
/// Browsers open far fewer per page.
const H2_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Wait after a failed `accept` (out of descriptors, out of memory) before the next one, so the
/// loop does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(200);

/// TLS for a listener: the acceptor and how long a handshake may take.
#[derive(Clone)]
pub struct Handshake {
    /// Builds each connection's TLS session from the current certificate.
    pub acceptor: TlsAcceptor,
    /// Longest handshake before the connection is dropped.
    pub timeout: Duration,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Accepts connections on `listener` until shutdown, then stops accepting, asks every open
/// connection to finish (HTTP/1.1: after the current response; HTTP/2: GOAWAY, open streams
/// finish) and returns when they have. Upgraded HTTP/1.1 WebSockets have left hyper by then;
/// they are tracked and closed by their sessions.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Handshake>,
    router: Router,
    connections: Connections,
    shutdown: Shutdown,
) {
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Per-connection errors (the peer reset before we accepted) need no pause;
                // resource exhaustion does.
                if !matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) {
                    tracing::warn!(cause = %err, "accept failed; pausing before the next one");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                    }
                }
                continue;
            }
        };
        let Some(guard) = connections.admit(peer.ip()) else {
            TransportStats::bump(&connections.0.stats.0.refused);
            tracing::debug!(%peer, "connection limit reached; closing the new connection");
            drop(stream);
            continue;
        };
        // Small writes (WebSocket frames) should leave at once.
        let _ = stream.set_nodelay(true);
        let io = Guarded::new(SharedTcp(Arc::new(stream)), guard);
        let task = connection(
            io,
            peer,
            tls.clone(),
            router.clone(),
            connections.clone(),
            shutdown.clone(),
        );
        tasks.spawn(task.instrument(tracing::debug_span!("connection", %peer)));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// One connection: TLS (if any), then HTTP until the peer leaves, the connection upgrades,
/// a timeout hits, or shutdown drains it.
async fn connection(
    io: Guarded<SharedTcp>,
    peer: SocketAddr,
    tls: Option<Handshake>,
    router: Router,
    connections: Connections,
    shutdown: Shutdown,
) {
    let stats = &connections.0.stats.0;
    let Some(handshake) = tls else {
        return http(
            TokioIo::new(io),
            None,
            peer,
            router,
            &connections,
            &shutdown,
        )
        .await;
    };
    let accepted = tokio::select! {
        () = shutdown.cancelled() => return,
        accepted = tokio::time::timeout(handshake.timeout, handshake.acceptor.accept(io)) => accepted,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            TransportStats::bump(&stats.tls_failures);
            tracing::debug!(cause = %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            TransportStats::bump(&stats.tls_timeouts);
            tracing::debug!("TLS handshake did not finish in time; closing");
            return;
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    http(
        TokioIo::new(stream),
        Some(h2),
        peer,
        router,
        &connections,
        &shutdown,
    )
    .await;
}

/// Serves HTTP on an established stream. `alpn_h2`: Some(choice) when TLS negotiated the
/// protocol, None on plain TCP (hyper-util reads the first bytes to tell h2c from HTTP/1.1).
async fn http<I>(
    io: I,
    alpn_h2: Option<bool>,
    peer: SocketAddr,
    router: Router,
    connections: &Connections,
    shutdown: &Shutdown,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let inner = &connections.0;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(inner.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    let builder = match alpn_h2 {
        Some(true) => builder.http2_only(),
        Some(false) => builder.http1_only(),
        None => builder,
    };
    let scheme = if alpn_h2.is_some() {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };

    // hyper's header-read timeout covers each HTTP/1.1 head once hyper reads one, but not the
    // protocol sniffing before it, nor an HTTP/2 client that never sends its preface or first
    // HEADERS: this deadline covers the time to the first request on every path.
    let first_request = Arc::new(Notify::new());
    let service = {
        let first_request = first_request.clone();
        let stats = inner.stats.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            first_request.notify_one();
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(scheme.clone());
            let websocket = websocket_request(&request);
            let router = router.clone();
            let stats = stats.clone();
            async move {
                let response = router.oneshot(request).await?;
                if let Some(version) = websocket {
                    count_upgrade(&stats, version, response.status());
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut conn = pin!(builder.serve_connection_with_upgrades(io, service));
    let mut deadline = pin!(tokio::time::sleep(inner.header_read_timeout));
    let mut started = false;
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(cause = %err, "connection ended with an error");
                }
                return;
            }
            () = first_request.notified(), if !started => started = true,
            () = &mut deadline, if !started => {
                TransportStats::bump(&inner.stats.0.header_timeouts);
                tracing::debug!("no complete request within the header read timeout; closing");
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The HTTP version of a WebSocket handshake request, or None for any other request.
fn websocket_request<B>(request: &hyper::Request<B>) -> Option<Version> {
    let is_websocket = match request.version() {
        Version::HTTP_2 => {
            request.method() == Method::CONNECT
                && request
                    .extensions()
                    .get::<hyper::ext::Protocol>()
                    .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"))
        }
        _ => request
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket")),
    };
    is_websocket.then(|| request.version())
}

fn count_upgrade(stats: &TransportStats, version: Version, status: StatusCode) {
    let counters = &stats.0;
    match version {
        Version::HTTP_2 if status.is_success() => TransportStats::bump(&counters.ws_http2),
        Version::HTTP_11 if status == StatusCode::SWITCHING_PROTOCOLS => {
            TransportStats::bump(&counters.ws_http1);
        }
        _ => {}
    }
}

/// The router of a plain listener under `--http-redirect`: every request is answered with a
/// 308 to the same host and path on HTTPS (308 keeps the method and body, unlike 301).
pub fn redirect_to_https(https_port: u16) -> Router {
    Router::new().fallback(redirect).with_state(https_port)
}

async fn redirect(State(https_port): State<u16>, request: Request) -> Response {
    let authority = request
        .uri()
        .authority()
        .map(|authority| authority.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .map(str::to_owned)
        });
    let Some((host, _)) = authority.as_deref().and_then(split_host_port) else {
        return crate::http_error::respond(
            StatusCode::BAD_REQUEST,
            "missing_host",
            "a Host header is needed to redirect to HTTPS",
        );
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let location = format!("https://{host}{port}{path}");
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, location)],
    )
        .into_response()
}
