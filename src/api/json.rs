//! `ApiJson<T>`: axum's JSON extractor and response, with rejections turned into [`ApiError`]
//! so a bad body gets the same `{"error","message"}` shape as every other error.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// JSON request body or response, with rowcast's error mapping.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    /// Every rowcast body is a JSON object; anything else is refused before field-by-field
    /// deserialization, which would otherwise read an array as a struct's fields by position.
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<Value>::from_request(req, state)
            .await
            .map_err(|rejection| rejection_to_error(&rejection))?;
        if !value.is_object() {
            return Err(ApiError::Validation(
                "the body must be a JSON object".to_owned(),
            ));
        }
        serde_path_to_error::deserialize(value)
            .map(Self)
            .map_err(|err| {
                let path = err.path().to_string();
                let inner = err.into_inner();
                ApiError::Validation(if path == "." {
                    inner.to_string()
                } else {
                    format!("{path}: {inner}")
                })
            })
    }
}

fn rejection_to_error(rejection: &JsonRejection) -> ApiError {
    let detail = rejection.body_text();
    match rejection.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(
            "send the body as JSON with `Content-Type: application/json`".to_owned(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("request body is larger than the server accepts".to_owned())
        }
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::Validation(strip_prefix(&detail)),
        StatusCode::BAD_REQUEST => ApiError::BadRequest {
            code: "malformed_json",
            message: strip_prefix(&detail),
        },
        _ => ApiError::BadRequest {
            code: "bad_request",
            message: detail,
        },
    }
}

/// axum's texts start with a generic sentence; the field path and reason follow the colon.
fn strip_prefix(detail: &str) -> String {
    for prefix in [
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to parse the request body as JSON: ",
    ] {
        if let Some(rest) = detail.strip_prefix(prefix) {
            return rest.to_owned();
        }
    }
    detail.to_owned()
}

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
