//! The one JSON error shape of every HTTP answer rowcast gives instead of success:
//! `{"error": <machine code>, "message": <what was wrong>}`. Each boundary keeps its own typed
//! error (`api::ApiError`, `access::Denied`, `hardening::Refusal`, …) and renders it here, so
//! the shape, its content type and its OpenAPI schema are defined once. Imports nothing of ours.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Every error: a machine code and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// e.g. `not_found`, `validation_failed`, `invalid_product_id`.
    #[schema(example = "not_found")]
    pub error: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// The response for an error: `status` with the JSON body.
pub fn respond(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: code,
            message: message.into(),
        }),
    )
        .into_response()
}
