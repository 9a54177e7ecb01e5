//! One thin handler per product endpoint: extract and parse, call `db::products`, respond.
//! Each carries its OpenAPI description (`#[utoipa::path]`), next to the code it describes;
//! `openapi` collects them into `/openapi.json`.

use crate::db::RestPool;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::json::ApiJson;
use super::schema::{IdParam, ProductInputSchema, ProductPatchSchema, ProductSchema};
use crate::db::products as store;
use crate::http_error::ErrorBody;
use crate::product::{NewProduct, ProductId, ProductInput, ProductPatch, id_mismatch};

/// Page size when the client does not say.
const DEFAULT_PAGE_SIZE: i64 = 100;
/// Largest page, so one request cannot make the server read the whole table.
const MAX_PAGE_SIZE: i64 = 1000;

/// `?after=<id>&limit=<n>` of `GET /products`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Return products with ids above this one (the last id of the previous page).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
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
                ProductId::MAX
            ),
        })
}

/// `GET /products`: keyset pagination in id order; a `Link: rel="next"` header names the next
/// page when there is one.
#[utoipa::path(get, path = "/products", tag = "products", params(ListQuery),
    responses(
        (status = 200, description = "A page of products in id order", body = [ProductSchema],
         headers(("link" = String, description = "`</products?after=N&limit=L>; rel=\"next\"` when more follow"))),
        (status = 400, description = "Bad query parameter (`invalid_query`)", body = ErrorBody),
    ))]
pub(crate) async fn list(
    State(pool): State<RestPool>,
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
    let mut products = store::list(&pool, after, limit + 1).await?;
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
#[utoipa::path(get, path = "/products/{id}", tag = "products", params(IdParam),
    responses(
        (status = 200, description = "The product", body = ProductSchema),
        (status = 400, description = "The id is not a product id (`invalid_product_id`)", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
    ))]
pub(crate) async fn get(
    State(pool): State<RestPool>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    Ok(ApiJson(store::get(&pool, id).await?).into_response())
}

/// `POST /products`: 201 with `Location`; the id is assigned unless the body chose one.
#[utoipa::path(post, path = "/products", tag = "products", request_body = ProductInputSchema,
    responses(
        (status = 201, description = "Created", body = ProductSchema,
         headers(("location" = String, description = "`/products/{id}`"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "A product with the given id exists", body = ErrorBody),
        (status = 413, description = "Body larger than `--max-body-bytes`", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 422, description = "A field breaks a rule; the message names it", body = ErrorBody),
    ))]
pub(crate) async fn create(
    State(pool): State<RestPool>,
    ApiJson(input): ApiJson<ProductInput>,
) -> Result<Response, ApiError> {
    let new = NewProduct::parse(input)?;
    let product = store::insert(&pool, &new).await?;
    let location = format!("/products/{}", product.product_id);
    let mut response = (StatusCode::CREATED, ApiJson(product)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// `PUT /products/{id}`: replaces an existing product.
#[utoipa::path(put, path = "/products/{id}", tag = "products", params(IdParam),
    request_body = ProductInputSchema,
    responses(
        (status = 200, description = "Replaced", body = ProductSchema),
        (status = 400, description = "Malformed JSON or id", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 413, description = "Body larger than `--max-body-bytes`", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 422, description = "A field breaks a rule, or `productId` differs from the path", body = ErrorBody),
    ))]
pub(crate) async fn replace(
    State(pool): State<RestPool>,
    Path(raw): Path<String>,
    ApiJson(input): ApiJson<ProductInput>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let new = NewProduct::parse(input)?;
    if new.product_id.is_some_and(|body_id| body_id != id) {
        return Err(id_mismatch(id).into());
    }
    Ok(ApiJson(store::replace(&pool, id, &new).await?).into_response())
}

/// `PATCH /products/{id}`: JSON merge patch (`application/merge-patch+json` or
/// `application/json`). An empty patch changes nothing and announces nothing.
#[utoipa::path(patch, path = "/products/{id}", tag = "products", params(IdParam),
    request_body(content(
        (ProductPatchSchema = "application/merge-patch+json"),
        (ProductPatchSchema = "application/json"),
    )),
    responses(
        (status = 200, description = "Patched", body = ProductSchema),
        (status = 400, description = "Malformed JSON or id", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 413, description = "Body larger than `--max-body-bytes`", body = ErrorBody),
        (status = 415, description = "Not a JSON body", body = ErrorBody),
        (status = 422, description = "A field breaks a rule (`null` is refused)", body = ErrorBody),
    ))]
pub(crate) async fn patch(
    State(pool): State<RestPool>,
    Path(raw): Path<String>,
    ApiJson(document): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let patch = ProductPatch::parse(id, document)?;
    let product = if patch.is_empty() {
        store::get(&pool, id).await?
    } else {
        store::patch(&pool, id, &patch).await?
    };
    Ok(ApiJson(product).into_response())
}

/// `DELETE /products/{id}`: 204, or 404 if it did not exist.
#[utoipa::path(delete, path = "/products/{id}", tag = "products", params(IdParam),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "The id is not a product id", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
    ))]
pub(crate) async fn delete(
    State(pool): State<RestPool>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&raw)?;
    store::delete(&pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
