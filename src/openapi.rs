//! The OpenAPI 3.1 document served at `/openapi.json`, assembled by utoipa from the
//! `#[utoipa::path]` annotations on the handlers themselves (`api::products`, `health`, `sse`),
//! plus the schemas of the operator endpoints' bodies. The WebSocket protocol is not
//! HTTP request/response and lives in `docs/protocol.md`.
//!
//! It names the handlers; the schemas are derived next to the types the handlers return, so the
//! document cannot drift from the real bodies, and none of the modules it documents imports it.
//!
//! Imports `api`, `health` and `sse` (the annotated handlers and their bodies); only `web`,
//! which serves the document, imports this module.

use utoipa::OpenApi;

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
        crate::health::healthz,
        crate::health::stats,
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
