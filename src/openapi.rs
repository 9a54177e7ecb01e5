//! The OpenAPI 3.1 document served at `/openapi.json`, assembled by utoipa from the
//! `#[utoipa::path]` annotations on the handlers themselves (`api::products`, `ops`, `health`,
//! `sse`), plus the schemas of the operator endpoints' bodies. The WebSocket protocol is not
//! HTTP request/response and lives in `docs/protocol.md`.
//!
//! Like `app`, this module sees all the others; nothing imports it except the handlers'
//! annotations (for schema names).

use utoipa::OpenApi;
use utoipa::ToSchema;

/// The whole document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "rowcast",
        description = "A JSON REST API for products. Every committed change is pushed to WebSocket \
                       (`/websocket`) and SSE (`/products/events`) subscribers; see docs/protocol.md.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(
        crate::api::products::list,
        crate::api::products::create,
        crate::api::products::get,
        crate::api::products::replace,
        crate::api::products::patch,
        crate::api::products::delete,
        crate::sse::events,
        crate::ops::healthz,
        crate::ops::stats,
        crate::health::readyz,
        crate::health::metrics,
    ),
    tags(
        (name = "products", description = "Create, read, change and delete products"),
        (name = "subscriptions", description = "Server-Sent Events; the WebSocket is in docs/protocol.md"),
        (name = "operations", description = "Health, readiness, statistics and metrics"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// The document as JSON text.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_json()
        // Serializing a tree of plain structs and maps cannot fail.
        .expect("the OpenAPI document serializes")
}

/// `/healthz`.
#[derive(Debug, ToSchema)]
#[schema(as = Health)]
pub struct HealthSchema {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: String,
}

/// `/readyz`.
#[derive(Debug, ToSchema)]
#[schema(as = Readiness)]
pub struct ReadinessSchema {
    /// `ready` or `unavailable`.
    #[schema(example = "ready")]
    pub status: String,
    /// Each failed check, in words; empty when ready.
    pub reasons: Vec<String>,
}

/// The LISTEN connection's state in `/stats`.
#[derive(Debug, ToSchema)]
#[schema(as = ListenerState)]
#[allow(non_snake_case, dead_code)]
pub struct ListenerSchema {
    connected: bool,
    reconnects: u64,
    changesReceived: u64,
    payloadsSkipped: u64,
    changesReadFromChangelog: u64,
    lastSeq: u64,
    /// Consecutive failed connection or catch-up attempts (0 while healthy).
    failedAttempts: u64,
    /// Changelog page reads (each bounded by rows and bytes).
    changelogReads: u64,
}

/// One entry of `topProducts`.
#[derive(Debug, ToSchema)]
#[schema(as = TopProduct)]
#[allow(non_snake_case, dead_code)]
pub struct TopProductSchema {
    productId: i64,
    subscribers: u64,
}

/// `/stats`. Further members (e.g. `transport`) may appear.
#[derive(Debug, ToSchema)]
#[schema(as = Stats)]
#[allow(non_snake_case, dead_code)]
pub struct StatsSchema {
    /// Connected sessions (WebSocket and SSE).
    sessions: u64,
    /// (session, product) pairs.
    subscriptions: u64,
    productsWithSubscribers: u64,
    changesPublished: u64,
    messagesQueued: u64,
    slowSessionsEvicted: u64,
    /// Changes left to a changelog read because a session's queue was full.
    changesDeferred: u64,
    /// Times every subscription restarted from a snapshot (gap the changelog cannot fill).
    resets: u64,
    messagesWaiting: u64,
    /// The seq of the last change published.
    lastSeq: u64,
    /// Averaged over the last 5 s.
    changesPerSecond: f64,
    /// The most-subscribed products, most first (at most 10).
    topProducts: Vec<TopProductSchema>,
    listener: ListenerSchema,
    /// Connection counters.
    transport: std::collections::HashMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let document: serde_json::Value = serde_json::from_str(&document()).unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
        for path in [
            "/products",
            "/products/{id}",
            "/products/events",
            "/stats",
            "/readyz",
        ] {
            assert!(document["paths"][path].is_object(), "{path} missing");
        }
    }
}
