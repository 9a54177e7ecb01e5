//! The attackers of `hostile`: each attack is a set of tasks that abuse one part of the
//! protocol while the honest population runs, and count what they did and how the server
//! answered. An attacker is never a correctness check: every refusal (an `error` frame, a
//! close code, a 4xx/5xx, a reset, a timeout) is tallied under its own label and the attacker
//! goes on (after `RETRY` when the connection is gone), so a server that defends itself
//! shows up as refusals, and one that lacks an endpoint as `http_404`s.
//!
//! Every attacker task runs until its attack is stopped: the task body is raced against the
//! stop signal and dropped when it fires, which closes its sockets. Nothing here spawns a
//! task of its own (an HTTP/2 connection is polled beside its streams in the same task), so
//! stopping an attack leaves nothing running.
//!
//! The tasks run on a runtime of their own (`hostile` passes it in): an attacker that always
//! has work (an ack flood into a server that keeps reading never waits) would otherwise
//! occupy the worker threads that the honest receivers' wake-ups queue on, and the honest
//! latency would measure the bench's scheduler rather than the server. On separate threads
//! they share the cores by the kernel's fairness, as separate clients would.

use crate::proto::{self, ServerFrame};
use crate::rest::Rest;
use crate::target::Target;
use crate::ws::{Connector, WsError, WsStream};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, Message};

/// Attack subscriptions use ids from here up, far above any product a bench run creates, so
/// they never overlap the honest products.
pub const ATTACK_ID_BASE: u64 = 10_000_000;
/// Wait before an attacker reconnects or retries after its connection failed or ended: keeps a
/// refused attacker from spinning this process's CPU instead of loading the server.
const RETRY: Duration = Duration::from_millis(100);
/// A resubscribing attacker reads after each `subscribed` until the stream is quiet this long
/// (the replay or snapshot has arrived) …
const QUIET: Duration = Duration::from_millis(50);
/// … or this long has passed.
const QUIET_MAX: Duration = Duration::from_secs(1);
/// Receive buffer of a stalled SSE reader: small, so the server meets a full window within a
/// phase instead of after the megabytes loopback autotuning would otherwise absorb.
const STALL_RCVBUF: u32 = 4096;
/// How long a stalled SSE reader waits for the response's first bytes (which it peeks at, never
/// consumes) to tell a stream from a refusal.
const STALL_PEEK: Duration = Duration::from_secs(2);

/// The attacks, in the default phase order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Attack {
    /// Sockets subscribing 100 000 ids each, in large subscribe commands.
    #[value(name = "subs")]
    Subs,
    /// Sockets resubscribing to a few honest products with `"since":0` in a loop.
    #[value(name = "since0")]
    Since0,
    /// `/stats` and `/metrics` as fast as keep-alive connections allow.
    #[value(name = "ops")]
    Ops,
    /// Sockets sending empty unsubscribes without ever reading the acks.
    #[value(name = "ackflood")]
    Ackflood,
    /// SSE requests whose readers never read a byte.
    #[value(name = "sse-stall")]
    SseStall,
    /// HTTP/2 (h2c) connections each carrying many SSE streams.
    #[value(name = "h2streams")]
    H2streams,
    /// Sockets subscribing with `"snapshot":true` and unsubscribing in a loop.
    #[value(name = "snapshots")]
    Snapshots,
    /// REST reads as fast as keep-alive connections allow.
    #[value(name = "rest-flood")]
    RestFlood,
}

impl Attack {
    pub const ALL: [Attack; 8] = [
        Attack::Subs,
        Attack::Since0,
        Attack::Ops,
        Attack::Ackflood,
        Attack::SseStall,
        Attack::H2streams,
        Attack::Snapshots,
        Attack::RestFlood,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Subs => "subs",
            Self::Since0 => "since0",
            Self::Ops => "ops",
            Self::Ackflood => "ackflood",
            Self::SseStall => "sse-stall",
            Self::H2streams => "h2streams",
            Self::Snapshots => "snapshots",
            Self::RestFlood => "rest-flood",
        }
    }

    /// Client sockets (file descriptors) the attack holds at once.
    pub fn sockets(self, s: &AttackSizes) -> usize {
        match self {
            Self::Subs => s.subs_sockets,
            Self::Since0 => s.since0_sockets,
            Self::Ops => s.ops_conns,
            Self::Ackflood => s.ackflood_sockets,
            Self::SseStall => s.sse_readers,
            Self::H2streams => s.h2_conns,
            Self::Snapshots => s.snapshot_sockets,
            Self::RestFlood => s.rest_conns,
        }
    }
}

/// How big each attack is.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct AttackSizes {
    /// subs: attacking sockets.
    #[arg(long, default_value_t = 200)]
    pub subs_sockets: usize,
    /// subs: ids each socket subscribes (ids from 10 000 000 up, none an honest product).
    #[arg(long, default_value_t = 100_000)]
    pub subs_ids: usize,
    /// subs: ids per subscribe command (the next is sent when its ack or refusal arrives).
    #[arg(long, default_value_t = 10_000)]
    pub subs_chunk: usize,
    /// since0: sockets resubscribing with `"since":0`.
    #[arg(long, default_value_t = 500)]
    pub since0_sockets: usize,
    /// since0: honest products each of them resubscribes to.
    #[arg(long, default_value_t = 5)]
    pub since0_ids: usize,
    /// ops: keep-alive HTTP/1.1 connections requesting /stats and /metrics.
    #[arg(long, default_value_t = 64)]
    pub ops_conns: usize,
    /// ops: send `Authorization: Bearer <T>` (default: no token, so a 401 is a refusal).
    #[arg(long)]
    #[serde(skip)]
    pub ops_token: Option<String>,
    /// ackflood: write-only sockets flooding empty unsubscribes.
    #[arg(long, default_value_t = 20)]
    pub ackflood_sockets: usize,
    /// sse-stall: SSE readers that never read.
    #[arg(long, default_value_t = 200)]
    pub sse_readers: usize,
    /// sse-stall: honest products each stalled stream asks for (the first N).
    #[arg(long, default_value_t = 100)]
    pub sse_ids: usize,
    /// h2streams: HTTP/2 connections (h2c, prior knowledge).
    #[arg(long, default_value_t = 20)]
    pub h2_conns: usize,
    /// h2streams: concurrent SSE streams per connection.
    #[arg(long, default_value_t = 200)]
    pub h2_streams: usize,
    /// h2streams: honest products each stream asks for (the first N).
    #[arg(long, default_value_t = 10)]
    pub h2_ids: usize,
    /// snapshots: sockets subscribing with `"snapshot":true` and unsubscribing in a loop.
    #[arg(long, default_value_t = 200)]
    pub snapshot_sockets: usize,
    /// snapshots: honest products in each snapshot subscribe (the first N).
    #[arg(long, default_value_t = 100)]
    pub snapshot_ids: usize,
    /// rest-flood: keep-alive connections reading `/products?limit=100` and `/products/{id}`.
    #[arg(long, default_value_t = 64)]
    pub rest_conns: usize,
}

/// What one attack did, counted by all its tasks.
#[derive(Debug, Default)]
pub struct Tally {
    requests: AtomicU64,
    ok: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
    outcomes: Mutex<BTreeMap<String, u64>>,
}

/// A copy of a [`Tally`] for the report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TallySnapshot {
    /// Commands, requests or streams the attackers sent or opened. `requests − ok − refused`
    /// were still unanswered when the attack stopped, or went down with their connection
    /// (which is counted once, under its own label).
    pub requests: u64,
    /// Of those, answered as asked (an ack, a 2xx, a stream).
    pub ok: u64,
    /// Frames or events read besides the answers (changes, replays, snapshots, SSE data).
    pub frames: u64,
    /// Response or stream bytes read (HTTP attacks).
    pub bytes: u64,
    /// Everything else, by label: `http_<status>`, `error:<code>`, `close_<code>`, `eof`,
    /// `reply_timeout`, `connect`, `handshake_http_<status>`, `send:<error>`, ….
    pub outcomes: BTreeMap<String, u64>,
    /// Σ outcomes: refusals, closes and errors the attackers met.
    pub refused: u64,
}

impl Tally {
    fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn ok(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    fn frame(&self, bytes: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn note(&self, label: impl Into<String>) {
        *crate::scenario::lock(&self.outcomes)
            .entry(label.into())
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> TallySnapshot {
        let outcomes = crate::scenario::lock(&self.outcomes).clone();
        TallySnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            refused: outcomes.values().sum(),
            outcomes,
        }
    }
}

/// What every attacker needs.
#[derive(Debug)]
pub struct Ctx {
    pub target: Target,
    pub connector: Connector,
    /// The honest products, in creation order (attacks that read real rows take the first N).
    pub honest_ids: Arc<Vec<u64>>,
    pub sizes: AttackSizes,
    /// Bound on one connect (TCP + handshake).
    pub connect_timeout: Duration,
    /// Bound on waiting for one ack.
    pub ack_timeout: Duration,
}

impl Ctx {
    /// The first `n` honest products (at least one, at most all).
    fn hot(&self, n: usize) -> &[u64] {
        &self.honest_ids[..n.max(1).min(self.honest_ids.len())]
    }

    fn events_path(&self, n: usize) -> String {
        let ids: Vec<String> = self.hot(n).iter().map(u64::to_string).collect();
        format!("/products/events?ids={}", ids.join(","))
    }
}

/// An attack in progress.
#[derive(Debug)]
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    tally: Arc<Tally>,
}

impl Running {
    /// What the attack did so far.
    pub fn tally(&self) -> TallySnapshot {
        self.tally.snapshot()
    }

    /// Stops every attacker and waits (at most `timeout`) for their tasks to end; aborts any
    /// still running then. Returns the final tally and how many tasks had to be aborted.
    pub async fn stop(self, timeout: Duration) -> (TallySnapshot, usize) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut aborted = 0;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
                aborted += 1;
            }
        }
        (self.tally.snapshot(), aborted)
    }
}

/// Starts `attack` with the sizes in `ctx`, its tasks on `runtime`.
pub fn launch(attack: Attack, ctx: &Arc<Ctx>, runtime: &tokio::runtime::Handle) -> Running {
    let (stop, stopped) = watch::channel(false);
    let tally = Arc::new(Tally::default());
    let s = &ctx.sizes;
    let mut tasks = Vec::with_capacity(attack.sockets(s));
    let mut spawn = |body: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| {
        let mut stopped = stopped.clone();
        tasks.push(runtime.spawn(async move {
            tokio::select! {
                () = body => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
        }));
    };
    match attack {
        Attack::Subs => {
            let chunk = s.subs_chunk.max(1);
            for k in 0..s.subs_sockets {
                let base = ATTACK_ID_BASE + (k * s.subs_ids) as u64;
                let ids: Vec<u64> = (base..base + s.subs_ids as u64).collect();
                let commands = ids
                    .chunks(chunk)
                    .map(|c| Message::text(proto::subscribe_text(c)))
                    .collect();
                spawn(Box::pin(subs(ctx.clone(), tally.clone(), commands)));
            }
        }
        Attack::Since0 | Attack::Snapshots => {
            let (n, ids) = if attack == Attack::Since0 {
                (s.since0_sockets, ctx.hot(s.since0_ids))
            } else {
                (s.snapshot_sockets, ctx.hot(s.snapshot_ids))
            };
            let (subscribe, until) = if attack == Attack::Since0 {
                (proto::subscribe_since_text(ids, 0), None)
            } else {
                (proto::subscribe_snapshot_text(ids), Some("snapshot"))
            };
            let cycle = Arc::new(Resubscribe {
                subscribe: Message::text(subscribe),
                unsubscribe: Message::text(proto::unsubscribe_text(ids)),
                until,
            });
            for _ in 0..n {
                spawn(Box::pin(resubscribe(
                    ctx.clone(),
                    tally.clone(),
                    cycle.clone(),
                )));
            }
        }
        Attack::Ops | Attack::RestFlood => {
            let (n, paths, token) = if attack == Attack::Ops {
                (
                    s.ops_conns,
                    vec!["/stats".to_owned(), "/metrics".to_owned()],
                    s.ops_token.clone(),
                )
            } else {
                let paths = ctx
                    .hot(100)
                    .iter()
                    .flat_map(|id| ["/products?limit=100".to_owned(), format!("/products/{id}")])
                    .collect();
                (s.rest_conns, paths, None)
            };
            let paths = Arc::new(paths);
            for k in 0..n {
                spawn(Box::pin(http_flood(
                    ctx.clone(),
                    tally.clone(),
                    paths.clone(),
                    token.clone(),
                    k,
                )));
            }
        }
        Attack::Ackflood => {
            for _ in 0..s.ackflood_sockets {
                spawn(Box::pin(ackflood(ctx.clone(), tally.clone())));
            }
        }
        Attack::SseStall => {
            let request = Arc::new(format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
                ctx.events_path(s.sse_ids),
                ctx.target.authority()
            ));
            for _ in 0..s.sse_readers {
                spawn(Box::pin(sse_stall(
                    ctx.clone(),
                    tally.clone(),
                    request.clone(),
                )));
            }
        }
        Attack::H2streams => {
            let uri = Arc::new(format!(
                "{}{}",
                ctx.target.base_url,
                ctx.events_path(s.h2_ids)
            ));
            for _ in 0..s.h2_conns {
                spawn(Box::pin(h2_connection(
                    ctx.clone(),
                    tally.clone(),
                    uri.clone(),
                )));
            }
        }
    }
    Running { stop, tasks, tally }
}

// ── WebSocket attackers ────────────────────────────────────────────────────────────────────

/// A label for a failed connect: the refusal's status when the handshake got one.
fn connect_label(e: &WsError) -> String {
    match e {
        WsError::Handshake(tungstenite::Error::Http(resp)) => {
            format!("handshake_http_{}", resp.status().as_u16())
        }
        other => other.kind().to_owned(),
    }
}

fn ws_error_label(e: &tungstenite::Error) -> &'static str {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => "closed",
        tungstenite::Error::Io(_) => "io",
        tungstenite::Error::Protocol(_) => "protocol",
        tungstenite::Error::Capacity(_) => "capacity",
        _ => "websocket",
    }
}

/// Connects, or tallies why not and waits `RETRY`.
async fn connect(ctx: &Ctx, tally: &Tally) -> Option<WsStream> {
    match ctx.connector.connect(0).await {
        Ok(ws) => Some(ws),
        Err(e) => {
            tally.note(connect_label(&e));
            tokio::time::sleep(RETRY).await;
            None
        }
    }
}

/// The connection ended (the label says how): reconnect.
struct Ended(String);

fn ended_by(msg: Option<Result<Message, tungstenite::Error>>) -> Ended {
    Ended(match msg {
        Some(Ok(Message::Close(Some(frame)))) => format!("close_{}", u16::from(frame.code)),
        Some(Ok(Message::Close(None))) => "close".to_owned(),
        Some(Err(e)) => ws_error_label(&e).to_owned(),
        _ => "eof".to_owned(),
    })
}

/// Sends `msg` (counted as a request) and reads until a frame of type `want` (ok), an `error`
/// frame (`error:<code>`) or `ack_timeout` (`reply_timeout`); other frames are counted as
/// frames. `Err` when the connection is gone.
async fn exchange(
    ws: &mut WsStream,
    msg: &Message,
    want: &str,
    ctx: &Ctx,
    tally: &Tally,
) -> Result<(), Ended> {
    tally.request();
    if let Err(e) = ws.send(msg.clone()).await {
        return Err(Ended(format!("send:{}", ws_error_label(&e))));
    }
    let deadline = Instant::now() + ctx.ack_timeout;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline.into(), ws.next()).await else {
            tally.note("reply_timeout");
            return Ok(());
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Err(ended_by(next)),
            Some(Ok(_)) => continue,
        };
        match ServerFrame::parse(&text) {
            Ok(f) if f.kind == want => {
                tally.ok();
                return Ok(());
            }
            Ok(f) if f.kind == "error" => {
                tally.note(format!("error:{}", f.error.as_deref().unwrap_or("?")));
                return Ok(());
            }
            _ => tally.frame(text.len()),
        }
    }
}

/// Reads (counting frames) until a frame of type `until` arrives, the stream is quiet for
/// `QUIET`, or `QUIET_MAX` has passed. `Err` when the connection is gone.
async fn read_quiet(ws: &mut WsStream, until: Option<&str>, tally: &Tally) -> Result<(), Ended> {
    let deadline = Instant::now() + QUIET_MAX;
    loop {
        let wait = QUIET.min(deadline.saturating_duration_since(Instant::now()));
        let Ok(next) = tokio::time::timeout(wait, ws.next()).await else {
            return Ok(());
        };
        match next {
            Some(Ok(Message::Text(text))) => {
                tally.frame(text.len());
                if until.is_some_and(|k| ServerFrame::parse(&text).is_ok_and(|f| f.kind == k)) {
                    return Ok(());
                }
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Err(ended_by(next)),
            Some(Ok(_)) => {}
        }
    }
}

/// Reads until the connection ends, counting frames.
async fn hold(ws: &mut WsStream, tally: &Tally) -> Ended {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => tally.frame(text.len()),
            next @ (Some(Ok(Message::Close(_)) | Err(_)) | None) => return ended_by(next),
            Some(Ok(_)) => {}
        }
    }
}

/// subs: subscribe every chunk in turn (the next as soon as the last is answered), then hold
/// the socket open; reconnect and start over if the server closes it.
async fn subs(ctx: Arc<Ctx>, tally: Arc<Tally>, commands: Vec<Message>) {
    loop {
        let Some(mut ws) = connect(&ctx, &tally).await else {
            continue;
        };
        let mut ended = None;
        for c in &commands {
            if let Err(e) = exchange(&mut ws, c, "subscribed", &ctx, &tally).await {
                ended = Some(e);
                break;
            }
        }
        let Ended(how) = match ended {
            Some(e) => e,
            None => hold(&mut ws, &tally).await,
        };
        tally.note(how);
        tokio::time::sleep(RETRY).await;
    }
}

/// One resubscribing cycle: subscribe, read what follows, unsubscribe.
#[derive(Debug)]
struct Resubscribe {
    subscribe: Message,
    unsubscribe: Message,
    /// Stop reading after the subscribe at this frame type (else when the stream is quiet).
    until: Option<&'static str>,
}

/// since0 / snapshots: run the cycle as fast as the server answers; reconnect when closed.
async fn resubscribe(ctx: Arc<Ctx>, tally: Arc<Tally>, cycle: Arc<Resubscribe>) {
    loop {
        let Some(mut ws) = connect(&ctx, &tally).await else {
            continue;
        };
        let Ended(how) = loop {
            let round = async {
                exchange(&mut ws, &cycle.subscribe, "subscribed", &ctx, &tally).await?;
                read_quiet(&mut ws, cycle.until, &tally).await?;
                exchange(&mut ws, &cycle.unsubscribe, "unsubscribed", &ctx, &tally).await
            };
            if let Err(e) = round.await {
                break e;
            }
        };
        tally.note(how);
        tokio::time::sleep(RETRY).await;
    }
}

/// ackflood: send empty unsubscribes as fast as the socket takes them and never read the
/// replies (the read half is kept, unpolled, so the socket stays open).
async fn ackflood(ctx: Arc<Ctx>, tally: Arc<Tally>) {
    let msg = Message::text(proto::unsubscribe_text(&[]));
    loop {
        let Some(ws) = connect(&ctx, &tally).await else {
            continue;
        };
        let (mut sink, _never_read) = ws.split();
        for n in 0u64.. {
            tally.request();
            if let Err(e) = sink.send(msg.clone()).await {
                tally.note(format!("send:{}", ws_error_label(&e)));
                break;
            }
            // A socket that always has room never returns Pending: let the others run.
            if n % 64 == 63 {
                tokio::task::yield_now().await;
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

// ── HTTP attackers ─────────────────────────────────────────────────────────────────────────

/// ops / rest-flood: GET `paths` in turn (starting at `offset`) on one keep-alive connection
/// as fast as the answers come.
async fn http_flood(
    ctx: Arc<Ctx>,
    tally: Arc<Tally>,
    paths: Arc<Vec<String>>,
    token: Option<String>,
    offset: usize,
) {
    let mut rest = Rest::with_bearer(&ctx.target, token.as_deref());
    for i in offset.. {
        let path = &paths[i % paths.len()];
        tally.request();
        match rest.request(Method::GET, path, None).await {
            Ok((status, body)) => {
                tally.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                if status.is_success() {
                    tally.ok();
                } else {
                    tally.note(format!("http_{}", status.as_u16()));
                }
            }
            Err(e) => {
                tally.note(e.kind());
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

async fn tcp_connect(ctx: &Ctx, rcvbuf: Option<u32>) -> std::io::Result<TcpStream> {
    let socket = match ctx.target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    let tcp = tokio::time::timeout(ctx.connect_timeout, socket.connect(ctx.target.addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// `http_<status>` from the start of a raw HTTP/1.x response.
fn status_label(head: &[u8]) -> String {
    let text = String::from_utf8_lossy(head);
    match text.split_whitespace().nth(1) {
        Some(code) if text.starts_with("HTTP/") => format!("http_{code}"),
        _ => "not_http".to_owned(),
    }
}

/// sse-stall: send the request over raw TCP (small receive buffer) and never read: the
/// response's first bytes are only peeked at, left in the buffer, to tell a 200 from a
/// refusal. The socket is then held as it is until the attack stops.
async fn sse_stall(ctx: Arc<Ctx>, tally: Arc<Tally>, request: Arc<String>) {
    let mut tcp = loop {
        match tcp_connect(&ctx, Some(STALL_RCVBUF)).await {
            Ok(tcp) => break tcp,
            Err(e) => {
                tally.note(if crate::fdlimit::is_fd_exhaustion(&e) {
                    "client_fd_limit"
                } else {
                    "connect"
                });
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    tally.request();
    if tcp.write_all(request.as_bytes()).await.is_err() {
        tally.note("send:io");
    } else {
        let mut head = [0u8; 16];
        match tokio::time::timeout(STALL_PEEK, tcp.peek(&mut head)).await {
            Ok(Ok(0)) => tally.note("eof"),
            Ok(Ok(n)) if head[..n].starts_with(b"HTTP/1.1 200") => tally.ok(),
            Ok(Ok(n)) => tally.note(status_label(&head[..n])),
            Ok(Err(_)) => tally.note("io"),
            Err(_) => tally.note("no_response"),
        }
    }
    // Hold the socket, unread, until the attack is stopped (which drops it, and `tcp` with it).
    std::future::pending::<()>().await;
}

/// h2streams: one HTTP/2 connection with `h2_streams` SSE streams read as they come; streams
/// that end are reopened, a connection that ends is reopened.
async fn h2_connection(ctx: Arc<Ctx>, tally: Arc<Tally>, uri: Arc<String>) {
    loop {
        let Ok(tcp) = tcp_connect(&ctx, None).await else {
            tally.note("connect");
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let handshake = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        );
        let Ok((sender, conn)) = handshake.await else {
            tally.note("h2_handshake");
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let streams = futures_util::future::join_all(
            (0..ctx.sizes.h2_streams).map(|_| h2_stream(sender.clone(), &uri, &tally)),
        );
        // The connection is driven here, beside its streams: no task outlives the attack.
        tokio::select! {
            r = conn => tally.note(if r.is_ok() { "h2_conn_closed" } else { "h2_conn_error" }),
            _ = streams => {}
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One stream slot: open the SSE request, read its body to the end, reopen.
async fn h2_stream(
    mut sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    uri: &str,
    tally: &Tally,
) {
    loop {
        if sender.ready().await.is_err() {
            // The connection is gone; `h2_connection` notes it and reconnects.
            return;
        }
        let Ok(req) = Request::get(uri).body(Empty::<Bytes>::new()) else {
            tally.note("bad_uri");
            return;
        };
        tally.request();
        match sender.send_request(req).await {
            Ok(resp) => {
                if resp.status().is_success() {
                    tally.ok();
                } else {
                    tally.note(format!("http_{}", resp.status().as_u16()));
                }
                let mut body = resp.into_body();
                let ended = loop {
                    match body.frame().await {
                        Some(Ok(f)) => {
                            if let Some(d) = f.data_ref() {
                                tally.frame(d.len());
                            }
                        }
                        Some(Err(_)) => break "h2_stream_reset",
                        None => break "h2_stream_ended",
                    }
                };
                tally.note(ended);
            }
            Err(_) => tally.note("h2_request_error"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_response_head() {
        assert_eq!(status_label(b"HTTP/1.1 404 Not Found\r\n"), "http_404");
        assert_eq!(status_label(b"HTTP/1.1 200 O"), "http_200");
        assert_eq!(status_label(b"\x00\x00\x12\x04"), "not_http");
    }

    #[test]
    fn every_attack_has_a_distinct_name_and_clap_value() {
        use clap::ValueEnum;
        let mut names: Vec<&str> = Attack::ALL.iter().map(|a| a.name()).collect();
        for a in Attack::ALL {
            let v = a.to_possible_value().map(|v| v.get_name().to_owned());
            assert_eq!(v.as_deref(), Some(a.name()));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Attack::ALL.len());
    }

    #[test]
    fn tally_sums_refusals() {
        let t = Tally::default();
        t.request();
        t.request();
        t.ok();
        t.note("http_404");
        t.note("http_404");
        t.note("close_1013");
        let s = t.snapshot();
        assert_eq!((s.requests, s.ok, s.refused), (2, 1, 3));
        assert_eq!(s.outcomes.get("http_404"), Some(&2));
    }
}
