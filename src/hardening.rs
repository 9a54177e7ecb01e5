//! HTTP-level hardening, as tower(-http) layers applied by `app`: the request timeout, the
//! request body limit, concurrency limits that shed load with 503 instead of queueing without
//! bound, security headers on every response (HSTS on HTTPS when plain HTTP redirects), and
//! JSON bodies for the bare error responses those layers produce, so every error a client sees
//! has rowcast's `{"error","message"}` shape.
//!
//! Connection-level protection (connection limits, TLS handshake and header-read timeouts)
//! lives in `serve`. Imports only `http_error` (the one error body); `app` passes the configured
//! numbers.

use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::Request;
use axum::http::uri::Scheme;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Router};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;

/// HSTS lifetime once an operator has turned plain HTTP into redirects: one year, the common
/// choice that lets browsers go straight to HTTPS without a first plain request.
const HSTS: HeaderValue = HeaderValue::from_static("max-age=31536000");
/// How long a shed client should wait before retrying, in seconds.
const RETRY_AFTER_SECONDS: HeaderValue = HeaderValue::from_static("1");

/// What a hardening layer refused; each variant decides status and code.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Refusal {
    /// Too many requests of this kind in flight: 503 with `Retry-After`.
    #[error("the server is busy; retry shortly")]
    Overloaded,
    /// The request took longer than `--request-timeout`: 503.
    #[error("the request took too long and was abandoned")]
    Timeout,
    /// The body is larger than `--max-body-bytes`: 413.
    #[error("request body is larger than the server accepts")]
    PayloadTooLarge,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, code) = match self {
            Self::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        };
        let mut response = crate::http_error::respond(status, code, self.to_string());
        if matches!(self, Self::Overloaded) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, RETRY_AFTER_SECONDS);
        }
        response
    }
}

/// At most `max` requests of `router`'s routes in flight at once (one budget for all of them);
/// the next one is answered 503 at once rather than queued, so a burst cannot pile up waiting
/// requests and their memory behind a slow database.
pub fn limit_concurrency<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    max: usize,
) -> Router<S> {
    router.route_layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(|_: BoxError| async {
                Refusal::Overloaded
            }))
            .load_shed()
            .layer(GlobalConcurrencyLimitLayer::new(max)),
    )
}

/// The outer layers every route gets: body limit, timeout, security headers, JSON error bodies.
/// `hsts`: send Strict-Transport-Security on HTTPS responses.
pub fn outer_layers(
    router: Router,
    max_body_bytes: usize,
    request_timeout: Duration,
    hsts: bool,
) -> Router {
    let router = router
        // A backstop for routes whose extractors set no limit of their own; the REST extractors
        // enforce the same size with their own JSON errors.
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        // The status is only a marker: `json_errors` below turns it into a JSON `timeout` error.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            request_timeout,
        ))
        .layer(middleware::map_response(json_errors))
        .layer(security_header(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        // rowcast serves data, never pages to be framed: refuse framing (clickjacking).
        .layer(security_header(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(security_header(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        ))
        .layer(security_header(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ));
    if hsts {
        router.layer(middleware::from_fn(strict_transport_security))
    } else {
        router
    }
}

fn security_header(name: HeaderName, value: HeaderValue) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::if_not_present(name, value)
}

/// Replaces the bodiless errors of the tower-http layers with rowcast's JSON errors.
async fn json_errors(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Refusal::PayloadTooLarge.into_response(),
        StatusCode::GATEWAY_TIMEOUT => Refusal::Timeout.into_response(),
        _ => response,
    }
}

async fn strict_transport_security(request: Request, next: Next) -> Response {
    let https = request.extensions().get::<Scheme>() == Some(&Scheme::HTTPS);
    let mut response = next.run(request).await;
    if https {
        response
            .headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, HSTS);
    }
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::routing::{get, post};
    use tokio::sync::Notify;
    use tower::ServiceExt as _;

    use super::*;

    async fn json_body(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn requests_over_the_limit_are_shed_with_503_while_one_is_in_flight() {
        let release = Arc::new(Notify::new());
        let held = release.clone();
        let router = limit_concurrency(
            Router::new()
                .route(
                    "/slow",
                    get(move || {
                        let held = held.clone();
                        async move { held.notified().await }
                    }),
                )
                .route("/fast", get(|| async {})),
            1,
        );
        let request = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        let slow = tokio::spawn(router.clone().oneshot(request("/slow")));
        // Let the slow request take the only slot.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;

        let shed = router.clone().oneshot(request("/fast")).await.unwrap();
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.headers()[header::RETRY_AFTER], "1");
        assert_eq!(json_body(shed).await["error"], "overloaded");

        release.notify_one();
        assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
        let after = router.oneshot(request("/fast")).await.unwrap();
        assert_eq!(after.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn layer_errors_are_json_and_every_response_has_security_headers() {
        let router = outer_layers(
            Router::new()
                .route("/echo", post(|body: String| async move { body }))
                .route("/stuck", get(std::future::pending::<&'static str>)),
            8,
            Duration::from_millis(50),
            false,
        );
        let big = Request::post("/echo")
            .header(header::CONTENT_LENGTH, "9")
            .body(Body::from("123456789"))
            .unwrap();
        let refused = router.clone().oneshot(big).await.unwrap();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(refused.headers()[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(json_body(refused).await["error"], "payload_too_large");

        let stuck = Request::get("/stuck").body(Body::empty()).unwrap();
        let timed_out = router.clone().oneshot(stuck).await.unwrap();
        assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json_body(timed_out).await["error"], "timeout");

        let fine = Request::post("/echo").body(Body::from("hi")).unwrap();
        let fine = router.oneshot(fine).await.unwrap();
        assert_eq!(fine.status(), StatusCode::OK);
        let headers = fine.headers();
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            "frame-ancestors 'none'"
        );
        assert!(headers.get(header::STRICT_TRANSPORT_SECURITY).is_none());
    }
}
