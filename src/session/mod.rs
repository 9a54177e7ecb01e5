//! One WebSocket session: the upgrade handler (`handshake`) and one loop that owns the socket,
//! reading client frames (commands go to the distributor, bad ones get an error reply) and
//! writing outbox messages, pings and the final close frame.
//!
//! **Frames are built once.** Every message is a [`Frame`] holding its finished WebSocket frame;
//! the session writes those bytes as they are (gathered, one system call per batch), and uses
//! tungstenite only to read and for control frames. On plain TCP the session hands its socket
//! to the distributor while it has nothing to write (the *direct lane*, `io`): a change then
//! reaches the client in the distributor's own pass, one non-blocking write, without this task
//! waking. A socket that would block sends the session back to its queue, with the same order and
//! slow-client policy as ever; when it has caught up it opens the lane again.
//!
//! One task with one loop, not a reader and a writer joined by a channel: an idle session is
//! then just this future, its socket and its outbox (the channel and the split socket's shared
//! lock cost ~2 KB per connection; see BENCHMARKS.md). While it writes it does not read; every
//! write is bounded by the heartbeat window, and a client that floods commands without reading
//! our replies is simply not read from until it does (backpressure).
//!
//! The session registers with the distributor before the upgrade is answered, so a session
//! budget that is used up is a plain HTTP refusal (429/503, [`registration_refused`], shared
//! with SSE), and sends `disconnect` exactly once on exit (a drop guard covers panics,
//! cancellation and an upgrade that never completes). It ends on: client close, heartbeat
//! timeout (1008), oversized frame (1009), eviction as a slow client (1013), a replay or
//! snapshot refused because the change history is busy (1013: the client resumes later), a
//! failed history read or distributor gone (1011), or process shutdown (1001).
//!
//! Commands are paced ([`CommandPace`]): past `--command-burst`, a session reads the next client
//! frame only when `--command-rate` allows (a frame costs one command per started KiB), so a
//! flood reaches the distributor at that pace and the rest waits in the flooder's own socket
//! buffers. Nothing is dropped.
//!
//! Imports `protocol`, `distributor`, `feed` (what to write, in order), `db` (the history reader
//! the feed reads through, and its errors), `config`, `shutdown`, `metrics` (messages and bytes
//! written), `http_error` (refusals), `serve` (the plain socket of an upgraded connection).

mod handshake;
mod io;
mod pace;

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Budgets, Heartbeat, Limits};
use crate::db::{HistoryError, HistoryReader};
use crate::distributor::{DistributorHandle, RawTcp, Registration, SessionGuard, SessionId};
use crate::feed::{Feed, Outgoing};
use crate::metrics::{Metrics, Transport};
use crate::protocol::{self, ClientCommand, CloseCode, ErrorCode, Frame, Versions};
use crate::shutdown::Shutdown;

pub use handshake::{Handshake, HandshakeError, registration_refused};
use io::SessionIo;
use pace::CommandPace;

/// How long the session tries to deliver a close frame to a peer that may not be reading.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the upgrade handler needs; cloned per connection.
#[derive(Debug, Clone)]
pub struct SessionState {
    /// Where subscriptions live.
    pub distributor: DistributorHandle<Frame>,
    /// Per-session limits.
    pub limits: Limits,
    /// The command rate (the rest of the budgets are the distributor's).
    pub budgets: Budgets,
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
    State(state): State<SessionState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    handshake: Handshake,
) -> Response {
    let limits = state.limits;
    let peer = peer.map(|Extension(ConnectInfo(peer))| peer);
    let registration = match state.distributor.register(peer.map(|p| p.ip())).await {
        Ok(registration) => registration,
        Err(err) => return registration_refused(err),
    };
    // Until the upgrade completes, the guard alone holds the session: if it never does, the
    // registration is dropped with it.
    let guard = SessionGuard::new(state.distributor.clone(), registration.id);
    let response = handshake.accept();
    let on_upgrade = handshake.on_upgrade;
    let config = WebSocketConfig::default()
        .read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes));
    let shutdown = state.shutdown.clone();
    tokio::spawn(shutdown.track(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (io, read_ahead) = match crate::serve::plain_upgraded(upgraded) {
            Ok(plain) => {
                // Plain TCP: the distributor may write changes straight into the socket.
                registration
                    .outbox
                    .attach_socket(Arc::new(RawTcp::new(plain.socket)));
                let io = SessionIo::plain(
                    plain.stream,
                    registration.outbox.gate(),
                    state.metrics.clone(),
                );
                (io, plain.read_ahead.to_vec())
            }
            Err(upgraded) => (SessionIo::upgraded(TokioIo::new(upgraded)), Vec::new()),
        };
        let socket =
            WebSocketStream::from_partially_read(io, read_ahead, Role::Server, Some(config)).await;
        run(socket, state, peer, registration, guard).await;
    }));
    response
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
    socket: WebSocketStream<SessionIo>,
    state: SessionState,
    peer: Option<SocketAddr>,
    registration: Registration<Frame>,
    guard: SessionGuard<Frame>,
) -> impl Future<Output = ()> + Send + 'static {
    let SessionState {
        distributor,
        heartbeat,
        shutdown,
        history,
        metrics,
        budgets,
        limits: _,
    } = state;
    let mut session = Session {
        socket,
        distributor,
        heartbeat,
        shutdown,
        metrics,
        every_version: false,
        pace: CommandPace::new(&budgets),
    };
    async move {
        let id = registration.id;
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

/// Sleeps until `deadline`, or forever without one (the branch is disabled then anyway).
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.code().into(),
        reason: reason.into(),
    }))
}

/// A write did not complete: the peer is gone or did not read within the window.
#[derive(Debug)]
struct WriteFailed;

impl From<tungstenite::Error> for WriteFailed {
    fn from(_: tungstenite::Error) -> Self {
        Self
    }
}

impl From<std::io::Error> for WriteFailed {
    fn from(_: std::io::Error) -> Self {
        Self
    }
}

struct Session {
    socket: WebSocketStream<SessionIo>,
    distributor: DistributorHandle<Frame>,
    heartbeat: Heartbeat,
    shutdown: Shutdown,
    metrics: Metrics,
    /// The client asked for every version (`"delivery":"all"`); handed to the feed.
    every_version: bool,
    /// When the next client frame may be read.
    pace: CommandPace,
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
            } else if self.socket.get_ref().has_lane()
                && !evicted.is_cancelled()
                && feed.lane_may_open()
                && let Err(end) = self.open_lane(evicted).await
            {
                return end;
            }
            let paced = self.pace.wait_until(Instant::now());
            if paced.is_some() {
                self.metrics.command_throttled();
            }
            let step = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                () = evicted.cancelled() => return SessionEnd::Evicted,
                // The pace allows the next command: read on below.
                () = sleep_until_some(paced), if paced.is_some() => Ok(()),
                // Before the heartbeat: a pong that arrived during a long write still counts.
                frame = self.socket.next(), if paced.is_none() => match self.answer(id, frame).await {
                    Reply::None => Ok(()),
                    Reply::Error(code, message) => {
                        let frame = Frame::new(&protocol::encode_error(code, &message));
                        self.write_within_window(&frame).await
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
                    self.socket.get_mut().release_idle_memory();
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
        frame: Option<Result<Message, tungstenite::Error>>,
    ) -> Reply {
        match &frame {
            Some(Ok(Message::Text(text))) => self.pace.spend(Instant::now(), text.len()),
            Some(Ok(Message::Binary(data))) => self.pace.spend(Instant::now(), data.len()),
            _ => {}
        }
        match frame {
            Some(Ok(Message::Text(text))) => match ClientCommand::parse(text.as_str()) {
                Ok(command) => {
                    let sent = match command {
                        ClientCommand::Subscribe(products, start, versions, presence) => {
                            self.every_version |= versions == Versions::All;
                            if presence && self.distributor.want_presence(id).await.is_err() {
                                return Reply::End(SessionEnd::DistributorGone);
                            }
                            self.distributor.subscribe(id, products, start).await
                        }
                        ClientCommand::Unsubscribe(products) => {
                            self.distributor.unsubscribe(id, products).await
                        }
                        ClientCommand::SubscribeAll(start, versions) => {
                            self.every_version |= versions == Versions::All;
                            self.distributor.subscribe_all(id, start).await
                        }
                        ClientCommand::UnsubscribeAll => self.distributor.unsubscribe_all(id).await,
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
            // tungstenite answers pings by itself; it never yields raw frames when reading.
            Some(Ok(Message::Ping(_) | Message::Frame(_))) => Reply::None,
            Some(Ok(Message::Close(_))) | None => Reply::End(SessionEnd::PeerClosed),
            Some(Err(tungstenite::Error::Capacity(_))) => Reply::End(SessionEnd::FrameTooBig),
            Some(Err(_)) => Reply::End(SessionEnd::PeerClosed),
        }
    }

    /// How long any write may take: a peer that stops reading cannot hold the session.
    fn write_window(&self) -> Duration {
        self.heartbeat.interval + self.heartbeat.timeout
    }

    async fn send_within_window(&mut self, message: Message) -> Result<(), WriteFailed> {
        match tokio::time::timeout(self.write_window(), self.socket.send(message)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(WriteFailed),
        }
    }

    /// Writes one pre-built frame (after anything tungstenite holds, such as a pong).
    async fn write_within_window(&mut self, frame: &Frame) -> Result<(), WriteFailed> {
        let window = self.write_window();
        let socket = &mut self.socket;
        let write = async {
            // Whatever tungstenite holds (a pong) goes first, then the frame as it is.
            socket.flush().await?;
            let io = socket.get_mut();
            io.enqueue(frame.clone());
            io.flush().await?;
            Ok::<_, WriteFailed>(())
        };
        match tokio::time::timeout(window, write).await {
            Ok(result) => {
                result?;
                self.metrics
                    .delivered(Transport::WebSocket, 1, frame.wire().len());
                Ok(())
            }
            Err(_) => Err(WriteFailed),
        }
    }

    /// Finishes everything of the session's own (tungstenite's buffer, a tail the distributor
    /// left) and opens the direct lane, so that the distributor writes the next changes itself.
    /// Bounded like any write; eviction and shutdown interrupt it.
    async fn open_lane(&mut self, evicted: &CancellationToken) -> Result<(), SessionEnd> {
        let window = self.write_window();
        let shutdown = &self.shutdown;
        let socket = &mut self.socket;
        let flushed = tokio::select! {
            result = socket.flush() => result.map_err(|_| SessionEnd::WriteFailed),
            () = evicted.cancelled() => return Ok(()),
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(window) => Err(SessionEnd::WriteFailed),
        };
        flushed?;
        socket.get_mut().try_open_lane();
        Ok(())
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
        let bytes = messages
            .iter()
            .map(|outgoing| outgoing.text.wire().len())
            .sum();
        let shutdown = &self.shutdown;
        let sink = &mut self.socket;
        let write = async {
            // Whatever tungstenite holds (a pong) goes first, then the frames as they are.
            sink.flush().await?;
            let io = sink.get_mut();
            for outgoing in messages.drain(..) {
                io.enqueue(outgoing.text);
            }
            io.flush().await?;
            Ok::<_, WriteFailed>(())
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
            SinkExt::close(&mut self.socket).await
        })
        .await;
    }
}
