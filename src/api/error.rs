//! `ApiError`: the one place that decides a REST error's status, machine code and message.
//! Client mistakes say exactly what was wrong; server faults say nothing internal and are logged
//! once, here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::db::products::StoreError;
use crate::product::ValidationError;

/// Everything a REST handler can answer instead of success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (JSON syntax, path or query parameters): 400.
    #[error("{message}")]
    BadRequest {
        /// Machine code, e.g. `malformed_json`.
        code: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The body is not JSON (by Content-Type): 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body is larger than the configured limit: 413.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The JSON is well-formed but breaks a rule (field missing, wrong type, out of range): 422.
    #[error("{0}")]
    Validation(String),
    /// No such product or route: 404.
    #[error("{0}")]
    NotFound(String),
    /// The method is not defined for this path: 405.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// A product with the given id exists already: 409.
    #[error("{0}")]
    Conflict(String),
    /// No id is left for a product created without one: 409.
    #[error("{0}")]
    IdsExhausted(String),
    /// A server fault; the cause is logged (with its chain of sources), never sent: 500.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::IdsExhausted(_) => (StatusCode::CONFLICT, "product_ids_exhausted"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            Self::Internal(cause) => {
                tracing::error!(cause = %error_chain(cause.as_ref()), "request failed with a server error");
                "the server could not complete the request; it has been logged".to_owned()
            }
            other => other.to_string(),
        };
        crate::http_error::respond(status, code, message)
    }
}

impl From<ValidationError> for ApiError {
    fn from(err: ValidationError) -> Self {
        Self::Validation(err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(_) => Self::NotFound(err.to_string()),
            StoreError::Conflict(_) => Self::Conflict(err.to_string()),
            StoreError::IdsExhausted => Self::IdsExhausted(err.to_string()),
            StoreError::Database(cause) => Self::Internal(Box::new(cause)),
        }
    }
}

/// An error and its sources, outermost first: what the log needs to find the cause.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
