//! Server-Sent Events for clients that cannot use a WebSocket:
//! `GET /products/events?ids=1,2,3[&since=N]` (or `?all=true[&since=N]` for every product,
//! present and future) streams the same JSON messages as the WebSocket,
//! each change with `id: <seq>`. A reconnecting `EventSource` sends `Last-Event-ID`, and the
//! stream resumes after it with no gap and no duplicate (the same `Feed` as WebSockets).
//!
//! Slow readers get the WebSocket's policies: the same outbox (conflate, or eviction under
//! `--slow-client-policy disconnect`, which ends the stream), and a bound on every write. A
//! WebSocket bounds its writes itself (the heartbeat window); an SSE stream cannot, because it
//! does not write: hyper polls it for the next event only when the previous one has gone out,
//! and not at all while the socket is full. The connection's write deadline (`--write-timeout`,
//! in `serve`) is the bound instead: a reader that stops reading over HTTP/1.1 (or a whole HTTP/2
//! connection that stops) is closed after it, hyper drops this stream, and the drop guard
//! disconnects it from the distributor. Whenever hyper does poll again, eviction and shutdown are
//! checked before anything else is sent.
//!
//! Not covered: over HTTP/2 a peer can keep one stream's window at zero while its connection
//! still moves (it answers pings, other streams flow), so the socket never blocks and the
//! deadline never fires. hyper 1.x has no per-stream send timeout (nor does h2's server builder),
//! keeps the stream's `SendStream` to itself, and while an event waits for stream window it polls
//! only for window and RST_STREAM, never this body, so the stream cannot end itself either.
//! Such a stream ends when the peer opens its window (the next poll sees the eviction or the
//! shutdown), resets the stream, or its connection closes (on shutdown after `--shutdown-grace`
//! at the latest). Until then it holds one of its connection's 200 stream slots, the event hyper
//! holds, the batch this stream took, and its outbox, which the slow-client policy bounds
//! (`--outbox-capacity`/`--outbox-bytes`; emptied at eviction); it delays nobody else. Closing
//! the whole connection from here would take its other streams down with it, which a
//! multiplexing browser shares between tabs.
//!
//! Under `--auth-reads` a stream opened with credentials ends after the rotation `access` asks
//! for ([`SseState::rotate_after`]): `EventSource` reconnects by itself, resumes after
//! `Last-Event-ID`, and its reconnect renews the stream cookie before that expires.
//!
//! A stream whose replay or snapshot finds the change history busy gets one `history_busy`
//! error message and ends: the browser's `EventSource` reconnects by itself (after its retry
//! delay) and resumes after `Last-Event-ID`, as after any dropped stream.
//!
//! Imports `distributor` (subscriptions), `feed` (what to send, in order), `db` (the history
//! reader the feed reads through, and its errors), `protocol` (`Frame`, error messages),
//! `product` (ids and seqs), `metrics` (events and bytes sent), `http_error` (400 bodies),
//! `session` (the answer to a refused registration, the same as for WebSockets) and `shutdown`.

use std::collections::VecDeque;
use std::convert::Infallible;

use std::net::SocketAddr;

use axum::Extension;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Stream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::db::{HistoryError, HistoryReader};
use crate::distributor::{DistributorHandle, SessionGuard};
use crate::feed::{Feed, Outgoing};
use crate::metrics::{Metrics, Transport};
use crate::product::{ProductId, Seq, SubscriptionStart};
use crate::protocol::{self, ErrorCode, Frame};
use crate::shutdown::Shutdown;

/// What the SSE handler needs.
#[derive(Debug, Clone)]
pub struct SseState {
    /// Where subscriptions live.
    pub distributor: DistributorHandle<Frame>,
    /// Where replays and snapshots are read from.
    pub history: HistoryReader,
    /// Ends streams on shutdown.
    pub shutdown: Shutdown,
    /// Per-connection subscription cap (same as WebSockets).
    pub max_subscriptions: usize,
    /// Where delivered events and bytes are counted.
    pub metrics: Metrics,
    /// Streams end after this (credential rotation, see `access`); None: they do not.
    pub rotate_after: Option<std::time::Duration>,
}

/// `?ids=1,2,3&since=N[&ticket=…]` or `?all=true&since=N[&ticket=…]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    ids: Option<String>,
    all: Option<String>,
    since: Option<String>,
    /// The credential `access` checked (and consumed) before the handler runs: accepted here so
    /// a ticketed request is not refused as an unknown field after its ticket is spent.
    #[serde(default, rename = "ticket")]
    _ticket: Option<serde::de::IgnoredAny>,
}

/// What a valid request asks for.
struct StreamRequest {
    /// The products; None: every product (`all=true`).
    ids: Option<Vec<ProductId>>,
    start: SubscriptionStart,
}

/// Parses the query and `Last-Event-ID`; what is wrong with them (the 400's message) when they
/// are not valid.
fn parse_request(
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
    max_subscriptions: usize,
) -> Result<StreamRequest, String> {
    let Ok(Query(query)) = query else {
        return Err("expected ?ids=1,2,3 or ?all=true, and optionally &since=<seq>".to_owned());
    };
    let all = match query.all.as_deref().map(str::trim) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(format!("`all` must be true or false; got {other:?}")),
    };
    let raw_ids = query.ids.filter(|ids| !ids.trim().is_empty());
    let ids = match (all, raw_ids) {
        (true, Some(_)) => {
            return Err("use either `ids` or `all=true`, not both".to_owned());
        }
        (true, None) => None,
        (false, Some(raw_ids)) => Some(parse_ids(&raw_ids, max_subscriptions)?),
        (false, None) => {
            return Err(
                "`ids` is required: a comma-separated list of product ids (or `all=true`)"
                    .to_owned(),
            );
        }
    };
    // The browser's reconnect position wins over the one in the URL it first opened.
    let position = match headers.get("last-event-id") {
        Some(value) => Some((
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
            "Last-Event-ID",
        )),
        None => query.since.map(|since| (since, "`since`")),
    };
    let start = match position.filter(|(raw, _)| !raw.trim().is_empty()) {
        Some((raw, what)) => SubscriptionStart::Since(parse_seq(&raw, what)?),
        None => SubscriptionStart::Live,
    };
    Ok(StreamRequest { ids, start })
}

/// Middleware that refuses an invalid request (400) before the access guard runs, so a request
/// the handler would refuse does not consume its single-use ticket.
pub async fn check_request(
    State(state): State<SseState>,
    request: Request,
    next: Next,
) -> Response {
    let query = Query::<EventsQuery>::try_from_uri(request.uri());
    if let Err(message) = parse_request(query, request.headers(), state.max_subscriptions) {
        return bad_request(&message);
    }
    next.run(request).await
}

fn bad_request(message: &str) -> Response {
    crate::http_error::respond(StatusCode::BAD_REQUEST, "invalid_query", message)
}

fn parse_ids(raw: &str, max: usize) -> Result<Vec<ProductId>, String> {
    let mut ids = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, part) in raw.split(',').enumerate() {
        let id = part
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(ProductId::new)
            .ok_or_else(|| {
                format!(
                    "ids[{index}] = {part:?} is not a product id (an integer from 0 to {})",
                    ProductId::MAX
                )
            })?;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    if ids.len() > max {
        return Err(format!("at most {max} ids per stream; got {}", ids.len()));
    }
    Ok(ids)
}

fn parse_seq(raw: &str, what: &str) -> Result<Seq, String> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .and_then(|seq| Seq::try_from(seq).ok())
        .ok_or_else(|| {
            format!("{what} must be a seq from a change event (an integer ≥ 0); got {raw:?}")
        })
}

/// `GET /products/events`.
#[utoipa::path(get, path = "/products/events", tag = "subscriptions",
    params(
        ("ids" = Option<String>, Query, description = "Comma-separated product ids, e.g. `1,2,3` (required unless `all=true`)"),
        ("all" = Option<bool>, Query, description = "`true`: every product, present and future, instead of `ids` (counts 1 024 against the subscription budgets)"),
        ("since" = Option<i64>, Query, description = "Resume after this seq (first connection; reconnects send `Last-Event-ID`)", minimum = 0),
        ("Last-Event-ID" = Option<String>, Header, description = "Set by a reconnecting `EventSource`: the seq of the last change seen"),
        ("ticket" = Option<String>, Query, description = "Under `--auth-reads`: a single-use ticket from `POST /ws-ticket`; the answer sets the `rowcast_stream` cookie that lets reconnects in without it"),
    ),
    responses(
        (status = 200, description = "An event stream: each `data:` is one message of docs/protocol.md; changes carry `id: <seq>`",
         content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad `ids`, `all` or `since` (`invalid_query`)", body = crate::http_error::ErrorBody),
        (status = 401, description = "Under `--auth-reads`: no valid ticket, token or stream cookie (`invalid_ticket`, `unauthorized`)", body = crate::http_error::ErrorBody),
        (status = 429, description = "Your address holds its share of sessions (`too_many_sessions_from_address`)", body = crate::http_error::ErrorBody),
        (status = 503, description = "The server holds all the sessions it may (`too_many_sessions`), or is stopping", body = crate::http_error::ErrorBody),
    ))]
pub async fn events(
    State(state): State<SseState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(peer))| peer);
    let StreamRequest { ids, start } = match parse_request(query, &headers, state.max_subscriptions)
    {
        Ok(request) => request,
        Err(message) => return bad_request(&message),
    };
    let registration = match state.distributor.register(peer.map(|p| p.ip())).await {
        Ok(registration) => registration,
        Err(err) => return crate::session::registration_refused(err),
    };
    let guard = SessionGuard::new(state.distributor.clone(), registration.id);
    let subscribed = match ids {
        Some(ids) => {
            state
                .distributor
                .subscribe(registration.id, ids, start)
                .await
        }
        None => {
            state
                .distributor
                .subscribe_all(registration.id, start)
                .await
        }
    };
    if subscribed.is_err() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let stream = EventStream {
        feed: Feed::new(
            registration.outbox,
            state.history.clone(),
            state.metrics.clone(),
        ),
        metrics: state.metrics.clone(),
        evicted: registration.evicted,
        shutdown: state.shutdown.clone(),
        queue: VecDeque::new(),
        ended: false,
        rotate_at: state
            .rotate_after
            .map(|after| tokio::time::Instant::now() + after),
        _guard: guard,
    };
    let mut response = Response::new(Body::from_stream(stream.into_stream()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A comment sent after this long without an event, so that proxies and clients see the
/// stream alive (what axum's default SSE keep-alive sends).
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

struct EventStream {
    feed: Feed,
    evicted: CancellationToken,
    shutdown: Shutdown,
    queue: VecDeque<Outgoing>,
    /// The last event was sent: the stream ends at the next poll.
    ended: bool,
    /// When the stream ends so that the client reconnects and renews its credential.
    rotate_at: Option<tokio::time::Instant>,
    metrics: Metrics,
    /// Disconnects from the distributor when the client goes away and the stream is dropped.
    _guard: SessionGuard<Frame>,
}

impl EventStream {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> {
        futures_util::stream::unfold(self, |mut this| async move {
            let event = this.next_event().await?;
            Some((Ok(event), this))
        })
    }

    /// The next event's bytes: shared with every other stream sending the same change.
    async fn next_event(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        loop {
            // Checked before anything already taken is handed out: hyper may not have polled
            // this stream for a long while (its socket or stream window was full), and a stream
            // that was evicted or is stopping in the meantime sends nothing more, as a
            // WebSocket sends nothing after its close frame.
            let rotate_at = self.rotate_at;
            let rotated = rotate_at.is_some_and(|at| tokio::time::Instant::now() >= at);
            if self.shutdown.is_triggered() || self.evicted.is_cancelled() || rotated {
                return None;
            }
            if let Some(outgoing) = self.queue.pop_front() {
                let event = outgoing.text.event(outgoing.seq);
                self.metrics.delivered(Transport::Sse, 1, event.len());
                return Some(event);
            }
            if self.feed.has_pending() {
                let mut batch = Vec::new();
                match self.feed.fill(&mut batch).await {
                    Ok(()) => {}
                    // Load, not a fault: counted in /stats and /metrics, not logged per client.
                    Err(HistoryError::Busy(busy)) => {
                        tracing::debug!(cause = %busy, "event stream refused: history busy");
                        // What the batch held before the refusal is dropped with it: the
                        // client resumes after the last change it got, which precedes all of it.
                        self.ended = true;
                        let text =
                            protocol::encode_error(ErrorCode::HistoryBusy, protocol::HISTORY_BUSY);
                        let event = Frame::new(&text).event(None);
                        self.metrics.delivered(Transport::Sse, 1, event.len());
                        return Some(event);
                    }
                    Err(err @ HistoryError::Changelog(_)) => {
                        tracing::error!(cause = %err, "cannot read the changelog for an event stream");
                        return None;
                    }
                }
                self.queue.extend(batch);
                continue;
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return None,
                () = self.evicted.cancelled() => return None,
                () = rotation(rotate_at) => return None,
                more = self.feed.recv() => if !more { return None },
                () = tokio::time::sleep(KEEP_ALIVE) => return Some(Bytes::from_static(b":\n\n")),
            }
        }
    }
}

/// Completes at `at`, or never.
async fn rotation(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
