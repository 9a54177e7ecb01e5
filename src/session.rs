//! One WebSocket session: the upgrade handler, a reader that turns client frames into
//! distributor commands, and the writer, the sole owner of the socket's sending half, which
//! writes outbox messages, error replies, pings and the final close frame.
//!
//! The session registers with the distributor on start and sends `disconnect` exactly once on
//! exit (a drop guard covers panics and cancellation). It ends on: client close, heartbeat
//! timeout (1008), oversized frame (1009), eviction as a slow client (1013), distributor gone
//! (1011), or process shutdown (1001).
//!
//! Imports `protocol`, `distributor`, `feed` (what to write, in order), `config`, `shutdown`,
//! `metrics` (messages and bytes written).

use std::pin::pin;
use std::time::Duration;

use std::net::SocketAddr;

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Heartbeat, Limits};
use crate::distributor::{DistributorHandle, SessionGuard, SessionId};
use crate::feed::{Feed, Outgoing};
use crate::metrics::{Metrics, Transport};
use crate::protocol::{self, ClientCommand, close_code, error_code};
use crate::shutdown::Shutdown;

/// Reader → writer messages in flight. Small: if the client floods bad frames without reading
/// our replies, the reader waits, which stops reading from that client (backpressure).
const CONTROL_CAPACITY: usize = 16;
/// How long the writer tries to deliver a close frame to a peer that may not be reading.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the upgrade handler needs; cloned per connection.
#[derive(Debug, Clone)]
pub struct SessionState {
    /// Where subscriptions live.
    pub distributor: DistributorHandle<Utf8Bytes>,
    /// Per-session limits.
    pub limits: Limits,
    /// Ping cadence and patience.
    pub heartbeat: Heartbeat,
    /// Process shutdown; sessions are tracked by it.
    pub shutdown: Shutdown,
    /// Where replays and snapshots are read from.
    pub pool: sqlx::PgPool,
    /// Where delivered messages and bytes are counted.
    pub metrics: Metrics,
}

/// `GET /websocket` (HTTP/1.1 upgrade) and `CONNECT /websocket` (HTTP/2, RFC 8441).
pub async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<SessionState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    let limits = state.limits;
    let peer = peer.map(|Extension(ConnectInfo(peer))| peer);
    ws.read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| {
            let shutdown = state.shutdown.clone();
            shutdown.track(run(socket, state, peer))
        })
}

/// Reader → writer events.
#[derive(Debug)]
enum Control {
    /// Tell the client its frame could not be used.
    Error(&'static str, String),
    /// The client answered a ping.
    Pong,
    /// Close the socket with this code and reason.
    Close(u16, &'static str),
    /// The client closed or the connection failed.
    PeerGone,
}

async fn run(mut socket: WebSocket, state: SessionState, peer: Option<SocketAddr>) {
    let Ok(registration) = state.distributor.register().await else {
        let _ = socket
            .send(close(close_code::INTERNAL, "server is stopping"))
            .await;
        return;
    };
    let id = registration.id;
    let guard = SessionGuard::new(state.distributor.clone(), id);
    async {
        tracing::debug!("session started");
        let (sink, stream) = socket.split();
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let writer = Writer {
            sink,
            heartbeat: state.heartbeat,
            shutdown: state.shutdown.clone(),
            metrics: state.metrics.clone(),
        };
        let evicted = registration.evicted;
        let feed = Feed::new(
            registration.outbox,
            state.pool.clone(),
            state.metrics.clone(),
        );
        // The writer decides when the session ends; the reader only reports to it.
        tokio::select! {
            biased;
            reason = writer.run(feed, evicted, control_rx) => {
                tracing::debug!(reason, "session ended");
            }
            () = read(stream, id, &state.distributor, control) => {}
        }
    }
    // The peer address, never the request's query: tickets travel there.
    .instrument(tracing::info_span!(
        "session",
        session_id = %id,
        peer = peer.map(tracing::field::display),
        subscriptions = 0_usize,
    ))
    .await;
    guard.disconnect().await;
}

/// Reads client frames until the peer is gone, then waits to be dropped by the writer.
async fn read(
    mut stream: SplitStream<WebSocket>,
    id: SessionId,
    distributor: &DistributorHandle<Utf8Bytes>,
    control: mpsc::Sender<Control>,
) {
    while let Some(message) = stream.next().await {
        let event = match message {
            Ok(Message::Text(text)) => match ClientCommand::parse(text.as_str()) {
                Ok(command) => {
                    let sent = match command {
                        ClientCommand::Subscribe(products, start) => {
                            distributor.subscribe(id, products, start).await
                        }
                        ClientCommand::Unsubscribe(products) => {
                            distributor.unsubscribe(id, products).await
                        }
                    };
                    if sent.is_err() {
                        Some(Control::Close(close_code::INTERNAL, "server is stopping"))
                    } else {
                        None
                    }
                }
                Err(err) => Some(Control::Error(err.code, err.message)),
            },
            Ok(Message::Binary(_)) => Some(Control::Error(
                error_code::BINARY_FRAME,
                "binary frames are not supported; send commands as JSON text frames".to_owned(),
            )),
            Ok(Message::Pong(_)) => Some(Control::Pong),
            // tungstenite answers pings by itself.
            Ok(Message::Ping(_)) => None,
            Ok(Message::Close(_)) => break,
            Err(err) if is_too_big(&err) => Some(Control::Close(
                close_code::TOO_BIG,
                "message larger than the server accepts",
            )),
            Err(_) => break,
        };
        if let Some(event) = event {
            let closing = matches!(event, Control::Close(..));
            if control.send(event).await.is_err() || closing {
                break;
            }
        }
    }
    let _ = control.send(Control::PeerGone).await;
    std::future::pending::<()>().await;
}

fn is_too_big(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|cause| cause.downcast_ref::<tungstenite::Error>())
        .is_some_and(|cause| matches!(cause, tungstenite::Error::Capacity(_)))
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

struct Writer {
    sink: SplitSink<WebSocket, Message>,
    heartbeat: Heartbeat,
    shutdown: Shutdown,
    metrics: Metrics,
}

impl Writer {
    /// Writes until the session must end; returns why, for the log.
    async fn run(
        mut self,
        mut feed: Feed,
        evicted: CancellationToken,
        mut control: mpsc::Receiver<Control>,
    ) -> &'static str {
        // Two timers for the session's life, reset instead of re-created per loop turn: the
        // next ping, and (armed while a ping is unanswered) the pong deadline.
        let ping = tokio::time::sleep(self.heartbeat.interval);
        let pong = tokio::time::sleep(self.heartbeat.timeout);
        tokio::pin!(ping, pong);
        let mut awaiting_pong = false;
        // Grown on first use, not up front: most sessions sit idle most of the time.
        let mut messages = Vec::new();
        loop {
            // Work the feed already holds (a replay in pages, a long batch) goes first; shutdown
            // and eviction are checked between pages.
            if feed.has_pending() {
                if self.shutdown.is_triggered() || evicted.is_cancelled() {
                    // Closing: the select below sends the close frame; the rest is not written.
                    feed.discard();
                } else {
                    if let Err(reason) = self
                        .write_from_feed(&mut feed, &mut messages, &evicted)
                        .await
                    {
                        return reason;
                    }
                    continue;
                }
            }
            let step = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    self.close(close_code::GOING_AWAY, "server shutting down").await;
                    return "shutdown";
                }
                () = evicted.cancelled() => {
                    self.close(close_code::TRY_AGAIN_LATER, "too slow: message queue overflowed").await;
                    return "evicted";
                }
                event = control.recv() => match event {
                    Some(Control::Error(code, message)) => {
                        self.sink.send(Message::Text(protocol::encode_error(code, &message).into())).await
                    }
                    Some(Control::Pong) => {
                        awaiting_pong = false;
                        Ok(())
                    }
                    Some(Control::Close(code, reason)) => {
                        self.close(code, reason).await;
                        return reason;
                    }
                    Some(Control::PeerGone) | None => {
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.sink.close()).await;
                        return "peer closed";
                    }
                },
                more = feed.recv() => {
                    if !more && !evicted.is_cancelled() {
                        self.close(close_code::INTERNAL, "server is stopping").await;
                        return "distributor gone";
                    }
                    Ok(())
                },
                () = &mut pong, if awaiting_pong => {
                    self.close(close_code::POLICY, "no pong within the heartbeat timeout").await;
                    return "heartbeat timeout";
                }
                () = &mut ping => {
                    ping.as_mut().reset(Instant::now() + self.heartbeat.interval);
                    if !awaiting_pong {
                        awaiting_pong = true;
                        pong.as_mut().reset(Instant::now() + self.heartbeat.timeout);
                    }
                    self.sink.send(Message::Ping(bytes::Bytes::new())).await
                }
            };
            if step.is_err() {
                return "write failed";
            }
        }
    }

    /// Writes the feed's next messages and flushes once. A peer that stops reading cannot
    /// hold the writer: eviction, shutdown or the heartbeat window end the write.
    async fn write_from_feed(
        &mut self,
        feed: &mut Feed,
        messages: &mut Vec<Outgoing>,
        evicted: &CancellationToken,
    ) -> Result<(), &'static str> {
        messages.clear();
        if let Err(err) = feed.fill(messages).await {
            tracing::error!(cause = %err, "cannot read the changelog for a replay or snapshot");
            self.close(
                close_code::INTERNAL,
                "could not read the change history; reconnect and resume",
            )
            .await;
            return Err("changelog read failed");
        }
        let window = self.heartbeat.interval + self.heartbeat.timeout;
        let count = messages.len();
        let bytes = messages.iter().map(|outgoing| outgoing.text.len()).sum();
        let shutdown = &self.shutdown;
        let sink = &mut self.sink;
        let write = async {
            for outgoing in messages.drain(..) {
                sink.feed(Message::Text(outgoing.text)).await?;
            }
            sink.flush().await
        };
        let write = pin!(write);
        let result = tokio::select! {
            result = write => result,
            () = evicted.cancelled() => Ok(()),
            () = shutdown.cancelled() => Ok(()),
            () = tokio::time::sleep(window) => {
                Err(axum::Error::new("peer did not accept data within the heartbeat window"))
            }
        };
        result.map_err(|_| "write failed")?;
        self.metrics.delivered(Transport::WebSocket, count, bytes);
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            self.sink.send(close(code, reason)).await?;
            self.sink.close().await
        })
        .await;
    }
}
