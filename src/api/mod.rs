//! The REST API for products: routes, handlers, the JSON extractor and the error type. Imports
//! `db`, `product` and `http_error` (the error body); it never talks to the distributor: changes
//! reach subscribers only through the database trigger, so REST and any other writer behave the
//! same.

mod error;
mod json;
pub(crate) mod products;
pub mod schema;

use crate::db::RestPool;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::get;

pub use error::ApiError;
pub use json::ApiJson;

/// The `/products` routes, with JSON errors for 404 and 405 and the body size limit. The
/// handlers take only the pool (`State<RestPool>`), from whatever state the app holds.
pub fn router<S>(max_body_bytes: usize) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    RestPool: FromRef<S>,
{
    Router::new()
        .route("/products", get(products::list).post(products::create))
        .route(
            "/products/{id}",
            get(products::get)
                .put(products::replace)
                .patch(products::patch)
                .delete(products::delete),
        )
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// Answer for paths no route serves.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such path".to_owned())
}

/// Answer for a method a path does not support.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
