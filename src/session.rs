//! One WebSocket session: the upgrade handler and one loop that owns the socket, reading client
//! frames (commands go to the distributor, bad ones get an error reply) and writing outbox
//! messages, pings and the final close frame.
//!
//! One task with one loop, not a reader and a writer joined by a channel: an idle session is
//! then just this future, its socket and its outbox (the channel and the split socket's shared
//! lock cost ~2 KB per connection; see BENCHMARKS.md). While it writes it does not read; every
//! write is bounded by the heartbeat window, and a client that floods commands without reading
//! our replies is simply not read from until it does (backpressure).
//!
//! The session registers with the distributor on start and sends `disconnect` exactly once on
//! exit (a drop guard covers panics and cancellation). It ends on: client close, heartbeat
//! timeout (1008), oversized frame (1009), eviction as a slow client (1013), a replay or
//! snapshot refused because the change history is busy (1013: the client resumes later), a
//! failed history read or distributor gone (1011), or process shutdown (1001).
//!
//! Imports `protocol`, `distributor`, `feed` (what to write, in order), `db` (the history reader
//! the feed reads through, and its errors), `config`, `shutdown`, `metrics` (messages and bytes
//! written).

use std::pin::pin;
use std::time::Duration;

use std::net::SocketAddr;

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::SinkExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Heartbeat, Limits};
use crate::db::{HistoryError, HistoryReader};
use crate::distributor::{DistributorHandle, SessionGuard, SessionId};
use crate::feed::{Feed, Outgoing};
use crate::metrics::{Metrics, Transport};
use crate::protocol::{self, ClientCommand, CloseCode, ErrorCode, Frame, Versions};
use crate::shutdown::Shutdown;

/// How long the session tries to deliver a close frame to a peer that may not be reading.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the upgrade handler needs; cloned per connection.
#[derive(Debug, Clone)]
pub struct SessionState {
    /// Where subscriptions live.
    pub distributor: DistributorHandle<Frame>,
    /// Per-session limits.
    pub limits: Limits,
    /// Ping cadence and patience.
    pub heartbeat: Heartbeat,
    /// Process shutdown; sessions are tracked by it.
    pub shutdown: Shutdown,
    /// Where replays and snapshots are read from.
    pub history: HistoryReader,
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

/// What a client frame asks of the session.
#[derive(Debug)]
enum Reply {
    /// Nothing to answer (a command went to the distributor, a pong, a ping tungstenite answers).
    None,
    /// Tell the client its frame could not be used.
    Error(ErrorCode, String),
    /// The client answered a ping.
    Pong,
    /// The session ends.
    End(SessionEnd),
}

/// Why a session ended: one closed table, each with the close frame it sends (if any) and the
/// word the log uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The process is shutting down.
    Shutdown,
    /// The distributor dropped the session for overflowing its queue (disconnect policy).
    Evicted,
    /// The distributor stopped (the process is stopping).
    DistributorGone,
    /// No pong within the heartbeat timeout.
    HeartbeatTimeout,
    /// The client sent a frame over the size limit.
    FrameTooBig,
    /// A replay or snapshot got no turn at the change history (its queue was full, or no
    /// connection came free in time); nothing was read, so the client can resume.
    HistoryBusy,
    /// A replay or snapshot could not be read.
    ChangelogUnreadable,
    /// The client closed, or the connection failed while reading.
    PeerClosed,
    /// A write failed or did not finish within the heartbeat window.
    WriteFailed,
}

impl SessionEnd {
    /// The close frame to send: code and reason. None when the peer is gone or unreachable.
    fn close_frame(self) -> Option<(CloseCode, &'static str)> {
        Some(match self {
            Self::Shutdown => (CloseCode::GoingAway, "server shutting down"),
            Self::Evicted => (
                CloseCode::TryAgainLater,
                "too slow: message queue overflowed",
            ),
            Self::DistributorGone => (CloseCode::Internal, "server is stopping"),
            Self::HeartbeatTimeout => (CloseCode::Policy, "no pong within the heartbeat timeout"),
            Self::FrameTooBig => (CloseCode::TooBig, "message larger than the server accepts"),
            Self::HistoryBusy => (CloseCode::TryAgainLater, protocol::HISTORY_BUSY),
            Self::ChangelogUnreadable => (
                CloseCode::Internal,
                "could not read the change history; reconnect and resume",
            ),
            Self::PeerClosed | Self::WriteFailed => return None,
        })
    }

    /// The word the log uses.
    fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Evicted => "evicted",
            Self::DistributorGone => "distributor gone",
            Self::HeartbeatTimeout => "heartbeat timeout",
            Self::FrameTooBig => "frame too big",
            Self::HistoryBusy => "history busy",
            Self::ChangelogUnreadable => "changelog read failed",
            Self::PeerClosed => "peer closed",
            Self::WriteFailed => "write failed",
        }
    }
}

/// The session's whole life. A plain function returning one `async move` block, and
/// everything big owned by that block and only borrowed below it: an `async fn` keeps a second
/// copy of each by-value argument, and each by-value hand-over to a nested future a third, which
/// had made every idle session's task 4.2 KB (BENCHMARKS.md, "Idle connection memory").
fn run(
    socket: WebSocket,
    state: SessionState,
    peer: Option<SocketAddr>,
) -> impl Future<Output = ()> + Send + 'static {
    let SessionState {
        distributor,
        heartbeat,
        shutdown,
        history,
        metrics,
        limits: _,
    } = state;
    let mut session = Session {
        socket,
        distributor,
        heartbeat,
        shutdown,
        metrics,
        every_version: false,
    };
    async move {
        let Ok(registration) = session.distributor.register().await else {
            session.end(SessionEnd::DistributorGone).await;
            return;
        };
        let id = registration.id;
        let guard = SessionGuard::new(session.distributor.clone(), id);
        let mut feed = Feed::new(registration.outbox, history, session.metrics.clone());
        let evicted = registration.evicted;
        // The peer address, never the request's query: tickets travel there.
        let span = tracing::info_span!(
            "session",
            session_id = %id,
            peer = peer.map(tracing::field::display),
            subscriptions = 0_usize,
        );
        async {
            tracing::debug!("session started");
            let end = session.serve(id, &mut feed, &evicted).await;
            session.end(end).await;
            tracing::debug!(reason = end.as_str(), "session ended");
        }
        .instrument(span)
        .await;
        guard.disconnect().await;
    }
}

fn is_too_big(err: &axum::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|cause| cause.downcast_ref::<tungstenite::Error>())
        .is_some_and(|cause| matches!(cause, tungstenite::Error::Capacity(_)))
}

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.code(),
        reason: Utf8Bytes::from_static(reason),
    }))
}

struct Session {
    socket: WebSocket,
    distributor: DistributorHandle<Frame>,
    heartbeat: Heartbeat,
    shutdown: Shutdown,
    metrics: Metrics,
    /// The client asked for every version (`"delivery":"all"`); handed to the feed.
    every_version: bool,
}

impl Session {
    /// Reads and writes until the session must end; returns why, for the log.
    async fn serve(
        &mut self,
        id: SessionId,
        feed: &mut Feed,
        evicted: &CancellationToken,
    ) -> SessionEnd {
        // One timer for the session's life, reset instead of re-created: the next ping while
        // the peer is answering, the pong deadline while a ping is unanswered.
        let heartbeat = tokio::time::sleep(self.heartbeat.interval);
        tokio::pin!(heartbeat);
        let mut ping_sent: Option<Instant> = None;
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
                    if let Err(end) = self.write_from_feed(feed, &mut messages, evicted).await {
                        return end;
                    }
                    continue;
                }
            }
            let step = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                () = evicted.cancelled() => return SessionEnd::Evicted,
                // Before the heartbeat: a pong that arrived during a long write still counts.
                frame = self.socket.recv() => match self.answer(id, frame).await {
                    Reply::None => Ok(()),
                    Reply::Error(code, message) => {
                        let text = protocol::encode_error(code, &message);
                        self.send_within_window(Message::Text(text.into())).await
                    }
                    Reply::Pong => {
                        if let Some(sent) = ping_sent.take() {
                            heartbeat.as_mut().reset(sent + self.heartbeat.interval);
                        }
                        Ok(())
                    }
                    Reply::End(end) => return end,
                },
                more = feed.recv() => {
                    if !more && !evicted.is_cancelled() {
                        return SessionEnd::DistributorGone;
                    }
                    Ok(())
                },
                () = &mut heartbeat => {
                    if ping_sent.is_some() {
                        return SessionEnd::HeartbeatTimeout;
                    }
                    // Buffers kept for the next batch are freed once per heartbeat: an idle
                    // session then costs its socket and this future, a busy one reallocates
                    // them at most once per interval.
                    feed.release_idle_memory();
                    messages = Vec::new();
                    let now = Instant::now();
                    ping_sent = Some(now);
                    heartbeat.as_mut().reset(now + self.heartbeat.timeout);
                    self.send_within_window(Message::Ping(bytes::Bytes::new())).await
                }
            };
            if step.is_err() {
                return SessionEnd::WriteFailed;
            }
            if self.every_version {
                feed.keep_every_version();
            }
        }
    }

    /// Handles one client frame (or the end of the stream).
    async fn answer(
        &mut self,
        id: SessionId,
        frame: Option<Result<Message, axum::Error>>,
    ) -> Reply {
        match frame {
            Some(Ok(Message::Text(text))) => match ClientCommand::parse(text.as_str()) {
                Ok(command) => {
                    let sent = match command {
                        ClientCommand::Subscribe(products, start, versions) => {
                            self.every_version |= versions == Versions::All;
                            self.distributor.subscribe(id, products, start).await
                        }
                        ClientCommand::Unsubscribe(products) => {
                            self.distributor.unsubscribe(id, products).await
                        }
                    };
                    match sent {
                        Ok(()) => Reply::None,
                        Err(_) => Reply::End(SessionEnd::DistributorGone),
                    }
                }
                Err(err) => Reply::Error(err.code, err.message),
            },
            Some(Ok(Message::Binary(_))) => Reply::Error(
                ErrorCode::BinaryFrame,
                "binary frames are not supported; send commands as JSON text frames".to_owned(),
            ),
            Some(Ok(Message::Pong(_))) => Reply::Pong,
            // tungstenite answers pings by itself.
            Some(Ok(Message::Ping(_))) => Reply::None,
            Some(Ok(Message::Close(_))) | None => Reply::End(SessionEnd::PeerClosed),
            Some(Err(err)) if is_too_big(&err) => Reply::End(SessionEnd::FrameTooBig),
            Some(Err(_)) => Reply::End(SessionEnd::PeerClosed),
        }
    }

    /// How long any write may take: a peer that stops reading cannot hold the session.
    fn write_window(&self) -> Duration {
        self.heartbeat.interval + self.heartbeat.timeout
    }

    async fn send_within_window(&mut self, message: Message) -> Result<(), axum::Error> {
        match tokio::time::timeout(self.write_window(), self.socket.send(message)).await {
            Ok(result) => result,
            Err(_) => Err(axum::Error::new(
                "peer did not accept data within the heartbeat window",
            )),
        }
    }

    /// Writes the feed's next messages and flushes once. A peer that stops reading cannot
    /// hold the writer: eviction, shutdown or the heartbeat window end the write.
    async fn write_from_feed(
        &mut self,
        feed: &mut Feed,
        messages: &mut Vec<Outgoing>,
        evicted: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        messages.clear();
        match feed.fill(messages).await {
            Ok(()) => {}
            // Load, not a fault: counted in /stats and /metrics rather than logged per client,
            // since a reconnect storm refuses hundreds at once.
            Err(HistoryError::Busy(busy)) => {
                tracing::debug!(cause = %busy, "replay or snapshot refused: history busy");
                return Err(SessionEnd::HistoryBusy);
            }
            Err(err @ HistoryError::Changelog(_)) => {
                tracing::error!(cause = %err, "cannot read the changelog for a replay or snapshot");
                return Err(SessionEnd::ChangelogUnreadable);
            }
        }
        let window = self.write_window();
        let count = messages.len();
        let bytes = messages.iter().map(|outgoing| outgoing.text.len()).sum();
        let shutdown = &self.shutdown;
        let sink = &mut self.socket;
        let write = async {
            for outgoing in messages.drain(..) {
                sink.feed(Message::Text(outgoing.text)).await?;
            }
            sink.flush().await
        };
        let write = pin!(write);
        let written = tokio::select! {
            result = write => result.map_err(|_| SessionEnd::WriteFailed),
            // Interrupted: the batch was not (all) written, so it is not counted as delivered;
            // the loop then ends the session.
            () = evicted.cancelled() => return Ok(()),
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(window) => Err(SessionEnd::WriteFailed),
        };
        written?;
        self.metrics.delivered(Transport::WebSocket, count, bytes);
        Ok(())
    }

    /// Sends the ending's close frame, if it has one, and closes the socket, within a bound.
    async fn end(&mut self, end: SessionEnd) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if let Some((code, reason)) = end.close_frame() {
                self.socket.send(close(code, reason)).await?;
            }
            self.socket.close().await
        })
        .await;
    }
}
