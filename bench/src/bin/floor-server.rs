//! floor-server: the in-memory floor rowcast is measured against. It speaks the same
//! public protocol (REST `/products`, `/stats`, WebSocket `/websocket`) but has no
//! database: a `POST`/`PUT`/`PATCH`/`DELETE` fans the change out directly, under one lock,
//! to every subscriber's bounded outbox. Whatever latency and CPU the bench measures here
//! is the cost of the protocol, the sockets and the load client itself — the part no
//! server can avoid on this machine.
//!
//! Shape (kept as small as a floor should be): one `Hub` behind a std mutex (held only for
//! map updates and non-blocking `try_send`s, never across an await), one task per
//! connection that selects between its reader and its writer, each frame encoded once and
//! shared as `Utf8Bytes`. A subscriber whose outbox is full is evicted (close 1013).
//!
//! With `--tls-cert`/`--tls-key` the listener speaks TLS (tokio-rustls on ring, ALPN
//! `http/1.1`) for REST and WebSockets alike, so `https://`/`wss://` runs have a floor too.
//!
//! With `--database-url` every `PUT` and `PATCH` also writes the product to PostgreSQL first
//! (one upsert, prepared once, on one tokio-postgres connection that pipelines concurrent
//! requests' statements): the floor for a server that answers a REST write after one database
//! round trip, with nothing else (no pool, no validation beyond JSON, no change read back).
//!
//! Prints `listening on ADDR` as its first stdout line (so `rowcast-bench --floor` can
//! start it on port 0), then runs until SIGINT/SIGTERM.

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, CONTENT_TYPE, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rowcast_bench::proto::ClientCommand;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Debug, Parser)]
#[command(about = "In-memory fan-out server speaking rowcast's protocol (the benchmark floor)")]
struct Args {
    /// Address to listen on (port 0 = any free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:18090")]
    listen: SocketAddr,
    /// Add a commit-ordered `"seq"` to change frames, like later rowcast versions.
    #[arg(long)]
    seq: bool,
    /// Frames a subscriber may have queued before it is evicted as too slow.
    #[arg(long, default_value_t = 4096)]
    outbox: usize,
    /// Serve TLS with this PEM certificate chain (leaf first); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Write every PUT and PATCH to this PostgreSQL (plain text; a `products` table as rowcast's
    /// migrations create it) before answering.
    #[arg(long)]
    database_url: Option<String>,
}

/// The upsert a `PUT` or `PATCH` runs with `--database-url`.
const UPSERT: &str = "INSERT INTO products \
     (product_id, manufacturer, price_per_unit, units_available, product_name) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (product_id) DO UPDATE SET manufacturer = excluded.manufacturer, \
     price_per_unit = excluded.price_per_unit, units_available = excluded.units_available, \
     product_name = excluded.product_name \
     RETURNING product_id";

/// The database a `PUT` or `PATCH` writes to, with `--database-url`.
#[derive(Debug)]
struct Database {
    client: tokio_postgres::Client,
    upsert: tokio_postgres::Statement,
}

impl Database {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("floor-server: database connection: {e}");
            }
        });
        let upsert = client.prepare(UPSERT).await?;
        Ok(Self { client, upsert })
    }

    async fn put(&self, id: u64, product: &Value) -> Result<(), tokio_postgres::Error> {
        let text = |key: &str| product[key].as_str().unwrap_or_default().to_owned();
        let units = i32::try_from(product["unitsAvailable"].as_i64().unwrap_or(0)).unwrap_or(0);
        let id = i64::try_from(id).unwrap_or(i64::MAX);
        self.client
            .query_one(
                &self.upsert,
                &[
                    &id,
                    &text("manufacturer"),
                    &text("pricePerUnit"),
                    &units,
                    &text("productName"),
                ],
            )
            .await
            .map(drop)
    }
}

/// Largest REST body or WebSocket message accepted; products are tiny.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug)]
struct Session {
    outbox: mpsc::Sender<Utf8Bytes>,
    kick: Arc<Notify>,
    subs: HashSet<u64>,
}

#[derive(Debug, Default)]
struct HubState {
    products: HashMap<u64, Value>,
    /// product → sessions subscribed to it (mirrors `Session::subs`).
    by_product: HashMap<u64, HashSet<u64>>,
    sessions: HashMap<u64, Session>,
    subscriptions: u64,
    seq: u64,
    evicted: u64,
}

#[derive(Debug)]
struct Hub {
    state: Mutex<HubState>,
    database: Option<Database>,
    next_id: AtomicU64,
    next_session: AtomicU64,
    with_seq: bool,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        // Nothing panics while holding the lock; if something did, the maps are still
        // consistent per operation, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Encodes the change once and queues it to every subscriber, in one critical section
    /// so every connection sees changes in the same (seq) order.
    fn publish(&self, st: &mut HubState, action: &str, product: &Value) {
        let Some(id) = product.get("productId").and_then(Value::as_u64) else {
            return;
        };
        st.seq += 1;
        let Some(subs) = st.by_product.get(&id) else {
            return;
        };
        let frame = if self.with_seq {
            json!({"type": "change", "seq": st.seq, "action": action, "product": product})
        } else {
            json!({"type": "change", "action": action, "product": product})
        };
        let frame = Utf8Bytes::from(frame.to_string());
        let mut slow = Vec::new();
        for sid in subs {
            if let Some(s) = st.sessions.get(sid) {
                if s.outbox.try_send(frame.clone()).is_err() {
                    slow.push(*sid);
                }
            }
        }
        for sid in slow {
            if let Some(s) = Self::remove(st, sid) {
                st.evicted += 1;
                s.kick.notify_one();
            }
        }
    }

    /// Removes a session and all its subscriptions; returns it.
    fn remove(st: &mut HubState, sid: u64) -> Option<Session> {
        let s = st.sessions.remove(&sid)?;
        for p in &s.subs {
            if let Some(set) = st.by_product.get_mut(p) {
                set.remove(&sid);
                if set.is_empty() {
                    st.by_product.remove(p);
                }
            }
        }
        st.subscriptions -= s.subs.len() as u64;
        Some(s)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rowcast_bench::fdlimit::raise();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
            rowcast_bench::tls::server_config(cert, key)?,
        )),
        _ => None,
    };
    let listener = TcpListener::bind(args.listen).await?;
    let mut out = std::io::stdout();
    writeln!(out, "listening on {}", listener.local_addr()?)?;
    out.flush()?;
    let database = match &args.database_url {
        Some(url) => Some(Database::connect(url).await?),
        None => None,
    };
    let hub = Arc::new(Hub {
        state: Mutex::new(HubState::default()),
        database,
        next_id: AtomicU64::new(1),
        next_session: AtomicU64::new(1),
        with_seq: args.seq,
    });
    let outbox = args.outbox.max(1);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Typically EMFILE: wait for connections to close instead of spinning.
                    eprintln!("floor-server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        };
        let _ = tcp.set_nodelay(true);
        let hub = hub.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve(tcp, hub, outbox).await,
                Some(acceptor) => {
                    // A handshake that fails or stalls is the client's problem; drop it.
                    let handshake = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(tcp));
                    if let Ok(Ok(stream)) = handshake.await {
                        serve(stream, hub, outbox).await;
                    }
                }
            }
        });
    }
    Ok(())
}

/// Longest TLS handshake the floor waits for.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 (with WebSocket upgrades) on one accepted connection, plain or TLS.
async fn serve<S>(io: S, hub: Arc<Hub>, outbox: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let svc = service_fn(move |req| handle(req, hub.clone(), outbox));
    // Errors are client resets; nothing to do about them here.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Option<&Value>) -> Resp {
    let mut r = Response::new(Full::new(
        body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
    ));
    *r.status_mut() = status;
    if body.is_some() {
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Resp {
    reply(status, Some(&json!({"error": code, "message": message})))
}

async fn handle(req: Request<Incoming>, hub: Arc<Hub>, outbox: usize) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    Ok(match (method, segments.as_slice()) {
        (Method::GET, ["websocket"]) => upgrade(req, hub, outbox),
        (Method::GET, ["stats"]) => {
            let st = hub.lock();
            reply(
                StatusCode::OK,
                Some(&json!({
                    "sessions": st.sessions.len(), "subscriptions": st.subscriptions,
                    "products": st.products.len(), "evicted": st.evicted,
                })),
            )
        }
        (Method::POST, ["products"]) => match body_object(req).await {
            Ok(mut p) => {
                let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
                p.insert("productId".into(), id.into());
                let p = Value::Object(p);
                let mut st = hub.lock();
                st.products.insert(id, p.clone());
                hub.publish(&mut st, "INSERT", &p);
                reply(StatusCode::CREATED, Some(&p))
            }
            Err(r) => r,
        },
        (m, ["products", id]) => {
            let Ok(id) = id.parse::<u64>() else {
                return Ok(error(StatusCode::NOT_FOUND, "not_found", "no such product"));
            };
            match m {
                Method::GET => match hub.lock().products.get(&id) {
                    Some(p) => reply(StatusCode::OK, Some(p)),
                    None => error(StatusCode::NOT_FOUND, "not_found", "no such product"),
                },
                Method::PUT | Method::PATCH => match body_object(req).await {
                    Ok(body) => {
                        let p = {
                            let st = hub.lock();
                            let Some(old) = st.products.get(&id) else {
                                return Ok(error(
                                    StatusCode::NOT_FOUND,
                                    "not_found",
                                    "no such product",
                                ));
                            };
                            let mut p = if m == Method::PUT {
                                serde_json::Map::new()
                            } else {
                                old.as_object().cloned().unwrap_or_default()
                            };
                            for (k, v) in body {
                                // JSON merge patch: null removes (PATCH); PUT replaces whole.
                                if v.is_null() {
                                    p.remove(&k);
                                } else {
                                    p.insert(k, v);
                                }
                            }
                            p.insert("productId".into(), id.into());
                            Value::Object(p)
                        };
                        if let Some(database) = &hub.database
                            && let Err(e) = database.put(id, &p).await
                        {
                            eprintln!("floor-server: PUT {id}: {e}");
                            return Ok(error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "database",
                                "the database refused the write",
                            ));
                        }
                        let mut st = hub.lock();
                        st.products.insert(id, p.clone());
                        hub.publish(&mut st, "UPDATE", &p);
                        reply(StatusCode::OK, Some(&p))
                    }
                    Err(r) => r,
                },
                Method::DELETE => {
                    let mut st = hub.lock();
                    match st.products.remove(&id) {
                        Some(p) => {
                            hub.publish(&mut st, "DELETE", &p);
                            reply(StatusCode::NO_CONTENT, None)
                        }
                        None => error(StatusCode::NOT_FOUND, "not_found", "no such product"),
                    }
                }
                _ => error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "method not allowed",
                ),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    })
}

async fn body_object(req: Request<Incoming>) -> Result<serde_json::Map<String, Value>, Resp> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "body too large or unreadable",
            )
        })?
        .to_bytes();
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "body must be a JSON object",
        )),
    }
}

fn upgrade(req: Request<Incoming>, hub: Arc<Hub>, outbox: usize) -> Resp {
    let is_ws = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).filter(|_| is_ws) else {
        return error(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "expected a WebSocket upgrade",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(MAX_BODY));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        session(ws, hub, outbox).await;
    });
    let mut r = reply(StatusCode::SWITCHING_PROTOCOLS, None);
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

async fn session<S>(ws: WebSocketStream<S>, hub: Arc<Hub>, outbox: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(outbox);
    let kick = Arc::new(Notify::new());
    let sid = hub.next_session.fetch_add(1, Ordering::Relaxed);
    hub.lock().sessions.insert(
        sid,
        Session {
            outbox: tx.clone(),
            kick: kick.clone(),
            subs: HashSet::new(),
        },
    );
    let (mut sink, mut stream) = ws.split();
    let writer = async {
        while let Some(frame) = rx.recv().await {
            sink.feed(Message::Text(frame)).await?;
            // Batch whatever else is queued into one flush (one write syscall).
            while let Ok(frame) = rx.try_recv() {
                sink.feed(Message::Text(frame)).await?;
            }
            sink.flush().await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    let reader = async {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(text) = msg else {
                if msg.is_close() {
                    break;
                }
                continue;
            };
            let reply = match serde_json::from_str::<ClientCommand>(&text) {
                Ok(cmd) if cmd.command == "subscribe" || cmd.command == "unsubscribe" => {
                    let subscribe = cmd.command == "subscribe";
                    let mut st = hub.lock();
                    let st = &mut *st;
                    let Some(s) = st.sessions.get_mut(&sid) else {
                        break;
                    };
                    for &p in &cmd.product_ids {
                        let changed = if subscribe {
                            s.subs.insert(p)
                        } else {
                            s.subs.remove(&p)
                        };
                        if !changed {
                            continue;
                        }
                        if subscribe {
                            st.by_product.entry(p).or_default().insert(sid);
                            st.subscriptions += 1;
                        } else {
                            if let Some(set) = st.by_product.get_mut(&p) {
                                set.remove(&sid);
                                if set.is_empty() {
                                    st.by_product.remove(&p);
                                }
                            }
                            st.subscriptions -= 1;
                        }
                    }
                    json!({"type": if subscribe { "subscribed" } else { "unsubscribed" }, "productIDs": cmd.product_ids})
                }
                Ok(_) => {
                    json!({"type": "error", "error": "unknown_command", "message": "command must be subscribe or unsubscribe"})
                }
                Err(e) => {
                    json!({"type": "error", "error": "bad_command", "message": e.to_string()})
                }
            };
            // Queued behind any changes already in the outbox, so the ack follows the
            // subscription becoming active.
            if tx.send(Utf8Bytes::from(reply.to_string())).await.is_err() {
                break;
            }
        }
    };
    let evicted = tokio::select! {
        _ = writer => false,
        _ = reader => false,
        _ = kick.notified() => true,
    };
    Hub::remove(&mut hub.lock(), sid);
    if evicted {
        let frame = CloseFrame {
            code: CloseCode::Again,
            reason: "too slow".into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    }
}
