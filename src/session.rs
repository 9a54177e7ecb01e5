//! One WebSocket session: the upgrade handler, a reader that turns client frames into
//! distributor commands, and the writer, the sole owner of the socket's sending half, which
//! writes outbox messages, error replies, pings and the final close frame.
//!
//! The session registers with the distributor on start and sends `disconnect` exactly once on
//! exit (a drop guard covers panics and cancellation). It ends on: client close, heartbeat
//! timeout (1008), oversized frame (1009), eviction as a slow client (1013), distributor gone
//! (1011), or process shutdown (1001).
//!
//! Imports `protocol`, `distributor`, `config`, `shutdown`.

use std::pin::pin;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

use crate::config::{Heartbeat, Limits};
use crate::distributor::{Delivery, DistributorHandle, Registration, SessionId};
use crate::protocol::{self, ClientCommand, close_code, error_code};
use crate::shutdown::Shutdown;

/// Reader → writer messages in flight. Small: if the client floods bad frames without reading
/// our replies, the reader waits, which stops reading from that client (backpressure).
const CONTROL_CAPACITY: usize = 16;
/// Most queued messages written before one flush: batches syscalls without starving pings.
const WRITE_BATCH: usize = 64;
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
}

/// `GET /websocket` (HTTP/1.1 upgrade) and `CONNECT /websocket` (HTTP/2, RFC 8441).
pub async fn upgrade(ws: WebSocketUpgrade, State(state): State<SessionState>) -> Response {
    let limits = state.limits;
    ws.read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| {
            let shutdown = state.shutdown.clone();
            shutdown.track(run(socket, state))
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

/// Sends the final `disconnect` if the session did not (panic, cancellation).
struct DisconnectGuard {
    distributor: DistributorHandle<Utf8Bytes>,
    id: Option<SessionId>,
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.distributor.disconnect_soon(id);
        }
    }
}

async fn run(mut socket: WebSocket, state: SessionState) {
    let Ok(registration) = state.distributor.register().await else {
        let _ = socket
            .send(close(close_code::INTERNAL, "server is stopping"))
            .await;
        return;
    };
    let id = registration.id;
    let mut guard = DisconnectGuard {
        distributor: state.distributor.clone(),
        id: Some(id),
    };
    async {
        tracing::debug!("session started");
        let (sink, stream) = socket.split();
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let writer = Writer {
            sink,
            heartbeat: state.heartbeat,
            shutdown: state.shutdown.clone(),
        };
        // The writer decides when the session ends; the reader only reports to it.
        tokio::select! {
            biased;
            reason = writer.run(registration, control_rx) => {
                tracing::debug!(reason, "session ended");
            }
            () = read(stream, id, &state.distributor, control) => {}
        }
        state.distributor.disconnect(id).await;
    }
    .instrument(tracing::info_span!("session", session_id = %id))
    .await;
    guard.id = None;
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
                        ClientCommand::Subscribe(products) => {
                            distributor.subscribe(id, products).await
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

fn encode(delivery: Delivery<Utf8Bytes>) -> Message {
    Message::Text(match delivery {
        // The shared frame: cloning it into the message bumps a reference count only.
        Delivery::Change(frame) => frame,
        Delivery::Subscribed(products) => protocol::encode_ack(true, &products).into(),
        Delivery::Unsubscribed(products) => protocol::encode_ack(false, &products).into(),
        Delivery::Refused(over) => protocol::encode_error(
            error_code::TOO_MANY_SUBSCRIPTIONS,
            &format!(
                "subscribing to {} more products would exceed the limit of {} per connection \
                 (this connection has {}); nothing was subscribed",
                over.requested, over.limit, over.current
            ),
        )
        .into(),
    })
}

struct Writer {
    sink: SplitSink<WebSocket, Message>,
    heartbeat: Heartbeat,
    shutdown: Shutdown,
}

impl Writer {
    /// Writes until the session must end; returns why, for the log.
    async fn run(
        mut self,
        registration: Registration<Utf8Bytes>,
        mut control: mpsc::Receiver<Control>,
    ) -> &'static str {
        let Registration {
            mut outbox,
            evicted,
            ..
        } = registration;
        let mut next_ping = Instant::now() + self.heartbeat.interval;
        let mut pong_deadline: Option<Instant> = None;
        loop {
            let far = Instant::now() + Duration::from_secs(86_400);
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
                        pong_deadline = None;
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
                delivery = outbox.recv() => match delivery {
                    Some(delivery) => self.write_batch(delivery, &mut outbox, &evicted).await,
                    None if evicted.is_cancelled() => continue,
                    None => {
                        self.close(close_code::INTERNAL, "server is stopping").await;
                        return "distributor gone";
                    }
                },
                () = sleep_until(pong_deadline.unwrap_or(far)), if pong_deadline.is_some() => {
                    self.close(close_code::POLICY, "no pong within the heartbeat timeout").await;
                    return "heartbeat timeout";
                }
                () = sleep_until(next_ping) => {
                    next_ping = Instant::now() + self.heartbeat.interval;
                    if pong_deadline.is_none() {
                        pong_deadline = Some(Instant::now() + self.heartbeat.timeout);
                    }
                    self.sink.send(Message::Ping(bytes::Bytes::new())).await
                }
            };
            if step.is_err() {
                return "write failed";
            }
        }
    }

    /// Writes one delivery and whatever else is already queued, then flushes once. A peer that
    /// stops reading cannot hold the writer: eviction, shutdown or the heartbeat timeout end the
    /// write.
    async fn write_batch(
        &mut self,
        first: Delivery<Utf8Bytes>,
        outbox: &mut mpsc::Receiver<Delivery<Utf8Bytes>>,
        evicted: &tokio_util::sync::CancellationToken,
    ) -> Result<(), axum::Error> {
        let window = self.heartbeat.interval + self.heartbeat.timeout;
        let shutdown = &self.shutdown;
        let sink = &mut self.sink;
        let write = async {
            sink.feed(encode(first)).await?;
            for _ in 1..WRITE_BATCH {
                match outbox.try_recv() {
                    Ok(delivery) => sink.feed(encode(delivery)).await?,
                    Err(_) => break,
                }
            }
            sink.flush().await
        };
        let write = pin!(write);
        tokio::select! {
            result = write => result,
            () = evicted.cancelled() => Ok(()),
            () = shutdown.cancelled() => Ok(()),
            () = tokio::time::sleep(window) => {
                Err(axum::Error::new("peer did not accept data within the heartbeat window"))
            }
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            self.sink.send(close(code, reason)).await?;
            self.sink.close().await
        })
        .await;
    }
}
