//! The WebSocket opening handshake, and the answer to one whose session could not register
//! ([`registration_refused`]).
//!
//! The handshake (RFC 6455 §4.2 on HTTP/1.1, RFC 8441 on HTTP/2), answered
//! here rather than by axum's `WebSocketUpgrade` because the session needs the upgraded
//! connection itself: on plain TCP, its socket, which the distributor writes into directly.
//! Checks what axum checks, with the same answers' meaning, as JSON errors that say what was
//! wrong.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;

use crate::distributor::{Budget, RegisterError};

/// A valid WebSocket handshake request, ready to be answered.
#[derive(Debug)]
pub struct Handshake {
    /// `Sec-WebSocket-Key` (HTTP/1.1 only; HTTP/2 has none).
    key: Option<HeaderValue>,
    /// Resolves to the connection once the answer is sent.
    pub on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// HTTP/1.1 handshakes are GETs.
    #[error("a WebSocket handshake over HTTP/1.1 must be a GET")]
    NotGet,
    /// HTTP/2 handshakes are extended CONNECTs.
    #[error("a WebSocket over HTTP/2 must be opened with CONNECT and :protocol websocket")]
    NotConnect,
    /// `Connection: upgrade` is missing.
    #[error("missing `Connection: upgrade`: this endpoint only speaks WebSocket")]
    ConnectionHeader,
    /// `Upgrade: websocket` is missing.
    #[error("missing `Upgrade: websocket`: this endpoint only speaks WebSocket")]
    UpgradeHeader,
    /// `Sec-WebSocket-Version: 13` is missing.
    #[error("`Sec-WebSocket-Version` must be 13")]
    Version,
    /// `Sec-WebSocket-Key` is missing.
    #[error("missing `Sec-WebSocket-Key`")]
    Key,
    /// The connection cannot be upgraded (a proxy or client that does not pass upgrades).
    #[error("this connection cannot be upgraded to a WebSocket")]
    NotUpgradable,
}

impl IntoResponse for HandshakeError {
    fn into_response(self) -> Response {
        let (status, code) = match self {
            Self::NotGet | Self::NotConnect => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            Self::NotUpgradable => (StatusCode::UPGRADE_REQUIRED, "upgrade_required"),
            _ => (StatusCode::BAD_REQUEST, "bad_websocket_handshake"),
        };
        crate::http_error::respond(status, code, self.to_string())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = HandshakeError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let key = if parts.version <= Version::HTTP_11 {
            if parts.method != Method::GET {
                return Err(HandshakeError::NotGet);
            }
            if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
                return Err(HandshakeError::ConnectionHeader);
            }
            if !header_is(&parts.headers, header::UPGRADE, "websocket") {
                return Err(HandshakeError::UpgradeHeader);
            }
            Some(
                parts
                    .headers
                    .get(header::SEC_WEBSOCKET_KEY)
                    .ok_or(HandshakeError::Key)?
                    .clone(),
            )
        } else {
            let websocket = parts
                .extensions
                .get::<hyper::ext::Protocol>()
                .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"));
            if parts.method != Method::CONNECT || !websocket {
                return Err(HandshakeError::NotConnect);
            }
            None
        };
        if !header_is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(HandshakeError::Version);
        }
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(HandshakeError::NotUpgradable)?;
        Ok(Self { key, on_upgrade })
    }
}

impl Handshake {
    /// The answer that completes the handshake: 101 with the accept key on HTTP/1.1, 200 on
    /// HTTP/2 (RFC 8441: a successful CONNECT).
    pub fn accept(&self) -> Response {
        let Some(key) = &self.key else {
            return StatusCode::OK.into_response();
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, "upgrade"),
                (header::UPGRADE, "websocket"),
                (header::SEC_WEBSOCKET_ACCEPT, accept.as_str()),
            ],
        )
            .into_response()
    }
}

fn header_is(headers: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// True if the comma-separated header holds `token` (`Connection: keep-alive, Upgrade`).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The HTTP answer to a session that could not register: 429 when the client's address holds
/// its share of sessions, 503 when the server holds all it may (both with `Retry-After`; the
/// client should back off), 503 while the process stops. Shared by WebSockets and SSE.
pub fn registration_refused(err: RegisterError) -> Response {
    let (status, code, message) = match err {
        RegisterError::Gone => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is stopping".to_owned(),
        ),
        RegisterError::OverBudget(over) => match over.budget {
            Budget::Server => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_sessions",
                format!(
                    "the server holds its limit of {} sessions; try again later",
                    over.limit
                ),
            ),
            Budget::Address | Budget::Connection => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sessions_from_address",
                format!(
                    "your address holds its limit of {} sessions; close one first",
                    over.limit
                ),
            ),
        },
    };
    let mut response = crate::http_error::respond(status, code, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}
