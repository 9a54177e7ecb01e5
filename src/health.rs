//! Operator endpoints: `/healthz` (the process answers), `/stats` (the distributor's counts,
//! the LISTEN connection's state, the history queue and the transport counters, as JSON), `/readyz` (may this
//! instance take traffic?) and `/metrics` (Prometheus text), plus the middleware that times
//! every HTTP request by route. Reads state through handles and status channels; changes
//! nothing. The response bodies derive their OpenAPI schemas here, on the real types.
//!
//! `/stats` and `/metrics` cost the distributor nothing per request, however often they are
//! asked (a dashboard per operator, a scraper, or an attacker): its running totals are atomics,
//! and the two views that walk its maps (messages waiting, top products) come from
//! [`ViewsCache`], which asks the actor at most once per [`VIEWS_MAX_AGE`].
//!
//! `/healthz` answers while the process runs; `/readyz` answers 200 only when the
//! database answers, every migration this binary knows is applied, and the LISTEN connection
//! is up — without LISTEN an instance still serves REST, but its subscribers would see changes
//! late (after the reconnect's catch-up), so a load balancer should prefer another. Otherwise
//! 503 with every failing check named.
//!
//! Imports `acme` (the served certificate's expiry and renewal counters), `metrics`, `distributor`, `listener` and `serve` (state copied into bodies and gauges
//! at request time), `protocol` (the distributor's `Frame`), `product` (ids in `topProducts`),
//! `db` (the readiness queries on the REST pool, the history reader's counters), `http_error`,
//! and `shutdown` (the metrics upkeep task).

use std::time::Duration;

use crate::db::RestPool;
use axum::extract::{FromRef, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::time::Instant;

use utoipa::ToSchema;

use crate::acme::{TlsSnapshot, TlsWatch};
use crate::db::{self, HistoryReader, HistoryStats};
use crate::distributor::{DistributorGone, DistributorHandle, Stats, Views};
use crate::listener::{ListenerStatus, ListenerWatch};
use crate::metrics::Metrics;
use crate::product::ProductId;
use crate::protocol::Frame;
use crate::serve::{TransportSnapshot, TransportStats};

/// Products listed in `topProducts`: what fits a dashboard panel.
const TOP_PRODUCTS: usize = 10;

/// How old `messagesWaiting` and `topProducts` may be. A dashboard refreshes about once a
/// second; the walk they need takes the actor ~1 ms per 10 000 sessions.
pub const VIEWS_MAX_AGE: Duration = Duration::from_secs(1);

/// How long a readiness probe waits for the database: below Kubernetes' default probe timeout
/// (1 s), so a hung database gives a 503 with a reason, not a probe timeout.
const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: HeaderValue = HeaderValue::from_static("text/plain; version=0.0.4");

/// The body of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Health)]
pub(crate) struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    status: &'static str,
}

/// The body of `/stats`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Stats)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatsBody {
    #[serde(flatten)]
    distributor: Stats,
    /// Messages waiting in all outboxes (at most a second old).
    messages_waiting: usize,
    /// Times sessions waited before reading a command because they sent faster than
    /// `--command-rate`.
    commands_throttled: u64,
    listener: ListenerStatus,
    /// Clients' replays and snapshots: the history pool and its queue.
    history: HistoryStats,
    transport: TransportSnapshot,
    /// The served certificate and its ACME renewals; absent without TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsSnapshot>,
    /// Changes dispatched per second, averaged over the last 5 s.
    changes_per_second: f64,
    /// The most-subscribed products, most first (at most 10; at most a second old).
    top_products: Vec<TopProduct>,
}

/// The distributor's [`Views`], fetched at most once per [`VIEWS_MAX_AGE`] whoever asks and
/// however often; cheap to clone. Requests arriving while it refreshes wait for that one
/// refresh instead of each asking the actor.
#[derive(Debug, Clone, Default)]
pub struct ViewsCache(std::sync::Arc<tokio::sync::Mutex<Option<(Instant, Views)>>>);

impl ViewsCache {
    async fn get(&self, distributor: &DistributorHandle<Frame>) -> Result<Views, DistributorGone> {
        let mut cached = self.0.lock().await;
        if let Some((at, views)) = cached.as_ref() {
            if at.elapsed() < VIEWS_MAX_AGE {
                return Ok(views.clone());
            }
        }
        let views = distributor.views(TOP_PRODUCTS).await?;
        *cached = Some((Instant::now(), views.clone()));
        Ok(views)
    }
}

/// One entry of `topProducts`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct TopProduct {
    #[schema(value_type = i64)]
    product_id: ProductId,
    subscribers: usize,
}

/// `/stats` and `/metrics`: the operator routes, guarded together (`access::guard_operations`).
pub fn operations_router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    DistributorHandle<Frame>: FromRef<S>,
    ViewsCache: FromRef<S>,
    ListenerWatch: FromRef<S>,
    HistoryReader: FromRef<S>,
    TransportStats: FromRef<S>,
    TlsWatch: FromRef<S>,
    Metrics: FromRef<S>,
{
    Router::new()
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
}

/// `/healthz`: never guarded.
pub fn liveness_router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new().route("/healthz", get(healthz))
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// `GET /stats`.
#[utoipa::path(get, path = "/stats", tag = "operations",
    responses(
        (status = 200, description = "Counts, rates and the LISTEN state", body = StatsBody),
        (status = 503, description = "The server is stopping", body = crate::http_error::ErrorBody),
    ))]
pub(crate) async fn stats(
    State(distributor): State<DistributorHandle<Frame>>,
    State(views): State<ViewsCache>,
    State(listener): State<ListenerWatch>,
    State(history): State<HistoryReader>,
    State(transport): State<TransportStats>,
    State(tls): State<TlsWatch>,
    State(metrics): State<Metrics>,
) -> Response {
    match views.get(&distributor).await {
        Ok(views) => Json(StatsBody {
            distributor: distributor.stats(),
            messages_waiting: views.messages_waiting,
            commands_throttled: metrics.commands_throttled(),
            listener: *listener.borrow(),
            history: history.stats(),
            transport: transport.snapshot(),
            tls: tls.snapshot(),
            changes_per_second: metrics.changes_per_second(),
            top_products: views
                .top_products
                .into_iter()
                .map(|(product_id, subscribers)| TopProduct {
                    product_id,
                    subscribers,
                })
                .collect(),
        })
        .into_response(),
        Err(_) => crate::http_error::respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is stopping",
        ),
    }
}

/// `/readyz`.
pub fn readiness_router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    RestPool: FromRef<S>,
    ListenerWatch: FromRef<S>,
{
    Router::new().route("/readyz", get(readyz))
}

/// The body of `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Readiness)]
pub(crate) struct Readiness {
    /// `ready` or `unavailable`.
    #[schema(example = "ready")]
    status: &'static str,
    /// Each failed check, in words; empty when ready.
    reasons: Vec<String>,
}

/// `GET /readyz`.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready: database reachable, migrated, LISTEN connected", body = Readiness),
        (status = 503, description = "Not ready; `reasons` names each failed check", body = Readiness),
    ))]
pub(crate) async fn readyz(
    State(pool): State<RestPool>,
    State(listener): State<ListenerWatch>,
) -> Response {
    let mut reasons = Vec::new();
    match tokio::time::timeout(DATABASE_PROBE_TIMEOUT, applied_migrations(&pool)).await {
        Err(_) => reasons.push(format!(
            "database did not answer within {DATABASE_PROBE_TIMEOUT:?}"
        )),
        Ok(Err(err)) => reasons.push(format!("database unreachable: {err}")),
        Ok(Ok(applied)) => {
            let missing: Vec<String> = db::MIGRATOR
                .iter()
                .filter(|migration| !applied.contains(&migration.version))
                .map(|migration| format!("{} {}", migration.version, migration.description))
                .collect();
            if !missing.is_empty() {
                reasons.push(format!("migrations not applied: {}", missing.join(", ")));
            }
        }
    }
    if !listener.borrow().connected {
        reasons.push("LISTEN connection is down (reconnecting)".to_owned());
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if reasons.is_empty() {
            "ready"
        } else {
            "unavailable"
        },
        reasons,
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// Versions of the migrations recorded as applied successfully.
async fn applied_migrations(pool: &RestPool) -> Result<Vec<i64>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let applied = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(&mut *conn)
        .await?;
    conn.settle();
    Ok(applied)
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4",
               content_type = "text/plain; version=0.0.4", body = String)))]
pub(crate) async fn metrics(
    State(distributor): State<DistributorHandle<Frame>>,
    State(views): State<ViewsCache>,
    State(listener): State<ListenerWatch>,
    State(history): State<HistoryReader>,
    State(transport): State<TransportStats>,
    State(tls): State<TlsWatch>,
    State(metrics): State<Metrics>,
) -> Response {
    let gauge = |name, value: usize| metrics.gauge(name, &[]).set(value as f64);
    if let Ok(views) = views.get(&distributor).await {
        gauge("rowcast_messages_waiting", views.messages_waiting);
    }
    {
        let stats = distributor.stats();
        gauge("rowcast_sessions", stats.sessions);
        gauge("rowcast_subscriptions", stats.subscriptions);
        gauge(
            "rowcast_products_with_subscribers",
            stats.products_with_subscribers,
        );
        gauge("rowcast_all_subscribers", stats.all_subscribers);
        metrics.publish_delivered(
            stats.messages_written_directly,
            stats.bytes_written_directly,
        );
        metrics
            .counter("rowcast_changes_published_total", &[])
            .absolute(stats.changes_published);
        metrics
            .counter("rowcast_messages_queued_total", &[])
            .absolute(stats.messages_queued);
        metrics
            .counter("rowcast_queue_overflows_total", &[("policy", "disconnect")])
            .absolute(stats.slow_sessions_evicted);
        metrics
            .counter("rowcast_queue_overflows_total", &[("policy", "conflate")])
            .absolute(stats.changes_deferred);
        metrics
            .counter("rowcast_stream_resets_total", &[])
            .absolute(stats.resets);
        let refused = stats.refused;
        for (what, budget, count) in [
            ("sessions", "server", refused.sessions_server),
            ("sessions", "address", refused.sessions_address),
            (
                "subscriptions",
                "connection",
                refused.subscriptions_connection,
            ),
            ("subscriptions", "address", refused.subscriptions_address),
            ("subscriptions", "server", refused.subscriptions_server),
        ] {
            metrics
                .counter(
                    "rowcast_budget_refusals_total",
                    &[("what", what), ("budget", budget)],
                )
                .absolute(count);
        }
    }
    metrics
        .counter("rowcast_commands_throttled_total", &[])
        .absolute(metrics.commands_throttled());
    let listener = *listener.borrow();
    metrics
        .gauge("rowcast_listener_connected", &[])
        .set(if listener.connected { 1.0 } else { 0.0 });
    metrics
        .counter("rowcast_listener_reconnects_total", &[])
        .absolute(listener.reconnects);
    metrics
        .gauge("rowcast_listener_failed_attempts", &[])
        .set(listener.failed_attempts as f64);
    metrics
        .counter("rowcast_listener_payloads_skipped_total", &[])
        .absolute(listener.payloads_skipped);
    metrics
        .counter(
            "rowcast_changes_received_total",
            &[("source", "notification")],
        )
        .absolute(listener.changes_received);
    metrics
        .counter("rowcast_changes_received_total", &[("source", "changelog")])
        .absolute(listener.changes_read_from_changelog);
    metrics
        .counter("rowcast_changes_received_total", &[("source", "reader")])
        .absolute(listener.changes_handed_over);
    let history = history.stats();
    metrics
        .counter("rowcast_history_reads_refused_total", &[])
        .absolute(history.busy_refusals);
    metrics
        .gauge("rowcast_history_reads_waiting", &[])
        .set(history.waiting as f64);
    metrics
        .gauge("rowcast_history_reads_running", &[])
        .set(history.reading as f64);
    // Seqs fit in 2^53 for the lifetime of any database, so the f64 gauge is exact.
    metrics
        .gauge("rowcast_last_seq", &[])
        .set(listener.last_seq as f64);
    metrics
        .gauge("rowcast_changes_per_second", &[])
        .set(metrics.changes_per_second());
    metrics
        .counter("rowcast_write_timeouts_total", &[])
        .absolute(transport.snapshot().write_timeouts);
    if let Some(tls) = tls.snapshot() {
        if let Some(expiry) = tls.certificate_expiry_unix() {
            metrics
                .gauge("rowcast_tls_certificate_expiry_seconds", &[])
                .set(expiry as f64);
        }
        if let Some(acme) = tls.acme() {
            metrics
                .counter("rowcast_acme_renewal_failures_total", &[])
                .absolute(acme.renewal_failures);
        }
    }
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], metrics.render()).into_response()
}

/// Times each request to its response head, labelled by the matched route template (never the
/// raw path, whose ids would make the label set unbounded), method and status.
pub async fn time_requests(
    State(metrics): State<Metrics>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| route_label(path.as_str()));
    // Extension methods are arbitrary strings: folded into one label value.
    let method = match *request.method() {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS
        | Method::CONNECT => request.method().as_str().to_owned(),
        _ => "other".to_owned(),
    };
    let response = next.run(request).await;
    metrics.request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// `/products/{id}` → `/products/:id`. Braces are legal in a label value, but common lenient
/// parsers (the `prometheus-parse` crate, some log shippers) cut the label set at the first `}`
/// and silently drop the sample; the colon form reads the same and parses everywhere.
fn route_label(template: &str) -> String {
    template.replace('{', ":").replace('}', "")
}

/// Folds histogram samples into buckets every few seconds, so an instance nobody scrapes does
/// not accumulate raw samples.
pub async fn run_upkeep(metrics: Metrics, shutdown: crate::shutdown::Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => metrics.run_upkeep(),
        }
    }
}
