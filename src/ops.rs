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

/// What the operator endpoints read.
#[derive(Debug, Clone)]
pub struct OpsState {
    /// For subscription counts.
    pub distributor: DistributorHandle<Utf8Bytes>,
    /// The LISTEN task's latest status.
    pub listener: watch::Receiver<ListenerStatus>,
}

#[derive(Serialize)]
struct StatsBody {
    #[serde(flatten)]
    distributor: Stats,
    listener: ListenerStatus,
}

/// `/healthz` and `/stats`.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn stats(State(state): State<OpsState>) -> Response {
    match state.distributor.stats().await {
        Ok(distributor) => Json(StatsBody {
            distributor,
            listener: *state.listener.borrow(),
        })
        .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": "unavailable", "message": "the server is stopping"})),
        )
            .into_response(),
    }
}
