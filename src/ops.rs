//! Operator endpoints: `/healthz` (the process answers) and `/stats` (the distributor's counts
//! and the LISTEN connection's state, as JSON). Reads the distributor through its handle and the
//! listener through its status channel; changes nothing.

use axum::extract::State;
use axum::extract::ws::Utf8Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use crate::distributor::{DistributorHandle, Stats};
use crate::listener::ListenerStatus;
use crate::metrics::Metrics;
use crate::product::ProductId;
use crate::serve::{TransportSnapshot, TransportStats};

/// What the operator endpoints read.
#[derive(Debug, Clone)]
pub struct OpsState {
    /// For subscription counts.
    pub distributor: DistributorHandle<Utf8Bytes>,
    /// The LISTEN task's latest status.
    pub listener: watch::Receiver<ListenerStatus>,
    /// Connection counters (open, refused, timeouts, WebSockets by HTTP version).
    pub transport: TransportStats,
    /// For the changes-per-second average.
    pub metrics: Metrics,
}

/// Products listed in `topProducts`: what fits a dashboard panel.
const TOP_PRODUCTS: usize = 10;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatsBody {
    #[serde(flatten)]
    distributor: Stats,
    listener: ListenerStatus,
    transport: TransportSnapshot,
    /// Changes dispatched per second, averaged over the last few seconds.
    changes_per_second: f64,
    /// The most-subscribed products, most first.
    top_products: Vec<TopProduct>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TopProduct {
    product_id: ProductId,
    subscribers: usize,
}

/// `/healthz` and `/stats`.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .with_state(state)
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = crate::openapi::HealthSchema)))]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /stats`.
#[utoipa::path(get, path = "/stats", tag = "operations",
    responses(
        (status = 200, description = "Counts, rates and the LISTEN state", body = crate::openapi::StatsSchema),
        (status = 503, description = "The server is stopping", body = crate::http_error::ErrorBody),
    ))]
pub(crate) async fn stats(State(state): State<OpsState>) -> Response {
    let counts = async {
        let distributor = state.distributor.stats().await?;
        let top = state.distributor.top_products(TOP_PRODUCTS).await?;
        Ok::<_, crate::distributor::DistributorGone>((distributor, top))
    };
    match counts.await {
        Ok((distributor, top)) => Json(StatsBody {
            distributor,
            listener: *state.listener.borrow(),
            transport: state.transport.snapshot(),
            changes_per_second: state.metrics.changes_per_second(),
            top_products: top
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
