//! One thin handler per product endpoint: extract and parse, call `db::products`, respond.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::ApiState;
use super::error::ApiError;
use super::json::ApiJson;
use crate::db::products as store;
use crate::product::{NewProduct, ProductId, ProductInput, ProductPatch, id_mismatch};

/// Page size when the client does not say.
const DEFAULT_PAGE_SIZE: i64 = 100;
/// Largest page, so one request cannot make the server read the whole table.
const MAX_PAGE_SIZE: i64 = 1000;

/// `?after=<id>&limit=<n>` of `GET /products`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

fn parse_id(raw: &str) -> Result<ProductId, ApiError> {
    raw.parse::<i64>()
        .ok()
        .and_then(ProductId::new)
        .ok_or_else(|| ApiError::BadRequest {
            code: "invalid_product_id",
            message: format!(
                "product id in the path must be an integer from 0 to {}; got {raw:?}",
                i64::MAX
            ),
        })
}

/// `GET /products`: keyset pagination in id order; a `Link: rel="next"` header names the next
/// page when there is one.
pub(super) async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest {
        code: "invalid_query",
        message: rejection.body_text(),
    })?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            message: "`after` must be a product id (0 or more)".to_owned(),
        });
    }
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            message: format!("`limit` must be from 1 to {MAX_PAGE_SIZE}; got {limit}"),
        });
    }
    // One row more than asked tells whether another page exists.
    let mut products = store::list(&state.pool, after, limit + 1).await?;
    let next = if products.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
        products.pop();
        products.last().map(|last| last.product_id)
    } else {
        None
    };
    let mut response = ApiJson(products).into_response();
    if let Some(last) = next {
        let link = format!("</products?after={last}&limit={limit}>; rel=\"next\"");
        if let Ok(value) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}

/// `GET /products/{id}`.
pub(super) async fn get(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    Ok(ApiJson(store::get(&state.pool, id).await?).into_response())
}

/// `POST /products`: 201 with `Location`; the id is assigned unless the body chose one.
pub(super) async fn create(
    State(state): State<ApiState>,
    ApiJson(input): ApiJson<ProductInput>,
) -> Result<Response, ApiError> {
    let new = NewProduct::parse(input)?;
    let product = store::insert(&state.pool, &new).await?;
    let location = format!("/products/{}", product.product_id);
    let mut response = (StatusCode::CREATED, ApiJson(product)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// `PUT /products/{id}`: replaces an existing product.
pub(super) async fn replace(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    ApiJson(input): ApiJson<ProductInput>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let new = NewProduct::parse(input)?;
    if new.product_id.is_some_and(|body_id| body_id != id) {
        return Err(id_mismatch(id).into());
    }
    Ok(ApiJson(store::replace(&state.pool, id, &new).await?).into_response())
}

/// `PATCH /products/{id}`: JSON merge patch (`application/merge-patch+json` or
/// `application/json`). An empty patch changes nothing and announces nothing.
pub(super) async fn patch(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    ApiJson(document): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let patch = ProductPatch::parse(id, document)?;
    let product = if patch.is_empty() {
        store::get(&state.pool, id).await?
    } else {
        store::patch(&state.pool, id, &patch).await?
    };
    Ok(ApiJson(product).into_response())
}

/// `DELETE /products/{id}`: 204, or 404 if it did not exist.
pub(super) async fn delete(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&raw)?;
    store::delete(&state.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
