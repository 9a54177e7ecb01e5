//! What rowcast serves to browsers besides the API: the live dashboard (`/`), the client library
//! (`/rowcast.js`) and its TypeScript declarations (`/rowcast.d.ts`), the OpenAPI document (`/openapi.json`) and its reference page (`/docs/api`,
//! `/docs/api.js`).
//! Every asset is compiled into the binary (`include_str!`), so the pages work offline and need
//! no CDN; the dashboard's response names its assets in `Link: rel=preload` headers so the
//! browser fetches them in parallel with the HTML.
//!
//! Imports `openapi` (the document, built once).

use std::sync::OnceLock;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const DASHBOARD_HTML: &str = include_str!("../web/index.html");
const DASHBOARD_JS: &str = include_str!("../web/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../web/dashboard.css");
const CLIENT_JS: &str = include_str!("../web/rowcast.js");
const CLIENT_TYPES: &str = include_str!("../web/rowcast.d.ts");
const API_HTML: &str = include_str!("../web/api.html");
const API_JS: &str = include_str!("../web/api.js");

const HTML: HeaderValue = HeaderValue::from_static("text/html; charset=utf-8");
const JAVASCRIPT: HeaderValue = HeaderValue::from_static("text/javascript; charset=utf-8");
/// What TypeScript tooling and CDNs serve `.d.ts` files as.
const TYPESCRIPT: HeaderValue = HeaderValue::from_static("application/typescript; charset=utf-8");
const CSS: HeaderValue = HeaderValue::from_static("text/css; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// The assets change only with the binary; a short cache keeps a redeploy visible within a
/// minute without a fingerprinted file name.
const CACHE: HeaderValue = HeaderValue::from_static("public, max-age=60");
/// Preloads for the dashboard: its script (a module importing rowcast.js) and style sheet.
const DASHBOARD_PRELOAD: HeaderValue = HeaderValue::from_static(
    "</dashboard.css>; rel=preload; as=style, </dashboard.js>; rel=modulepreload, \
     </rowcast.js>; rel=modulepreload",
);
/// Pages may run only their own scripts and talk only to their own origin (`'self'` covers
/// ws: and wss: to the same host in current browsers; listed explicitly for older ones).
const PAGE_POLICY: HeaderValue = HeaderValue::from_static(
    "default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'",
);

/// `/`, `/dashboard.js`, `/dashboard.css`, `/rowcast.js`, `/rowcast.d.ts`, `/openapi.json`,
/// `/docs/api`.
pub fn router() -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route(
            "/dashboard.js",
            get(|| async { asset(JAVASCRIPT, DASHBOARD_JS) }),
        )
        .route(
            "/dashboard.css",
            get(|| async { asset(CSS, DASHBOARD_CSS) }),
        )
        .route(
            "/rowcast.js",
            get(|| async { asset(JAVASCRIPT, CLIENT_JS) }),
        )
        .route(
            "/rowcast.d.ts",
            get(|| async { asset(TYPESCRIPT, CLIENT_TYPES) }),
        )
        .route("/docs/api", get(|| async { page(API_HTML) }))
        .route("/docs/api.js", get(|| async { asset(JAVASCRIPT, API_JS) }))
        .route("/openapi.json", get(openapi))
}

fn asset(content_type: HeaderValue, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, CACHE),
        ],
        body,
    )
        .into_response()
}

fn page(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HTML),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
        ],
        body,
    )
        .into_response()
}

async fn dashboard() -> Response {
    let mut response = page(DASHBOARD_HTML);
    response
        .headers_mut()
        .insert(header::LINK, DASHBOARD_PRELOAD);
    response
}

async fn openapi() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let body = DOCUMENT.get_or_init(crate::openapi::document).clone();
    ([(header::CONTENT_TYPE, JSON)], body).into_response()
}
