//! The REST wire shapes as OpenAPI schemas. These mirror `product`'s serde types (which stay
//! free of web concerns) with the rules the parsers enforce, so generated clients and the
//! schemathesis run see the same constraints; the schemathesis run in `tests/run-all.sh`
//! fails if a response ever drifts from them. (`Deserialize` is derived only so the serde
//! attributes, which utoipa reads, are allowed.)

use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

/// A stored product, as every endpoint returns it and as change messages carry it.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = Product)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductSchema {
    /// Primary key.
    #[schema(minimum = 1, format = Int64)]
    pub product_id: i64,
    /// Who makes it; never empty.
    #[schema(min_length = 1)]
    pub manufacturer: String,
    /// Price as free text (e.g. `"12.50"`, `"500EUR"`), returned exactly as stored.
    #[schema(min_length = 1, example = "500EUR")]
    pub price_per_unit: String,
    /// Stock level.
    #[schema(minimum = 0, maximum = 2147483647, format = Int32)]
    pub units_available: i32,
    /// Display name; never empty.
    #[schema(min_length = 1)]
    pub product_name: String,
}

/// The body of POST and PUT: every field; the id is optional (POST: absent or 0 assigns one;
/// PUT: absent or equal to the path id).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = ProductInput)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductInputSchema {
    /// Absent or 0: assign one.
    #[schema(minimum = 0, format = Int64)]
    pub product_id: Option<i64>,
    /// Not blank, at most 200000 characters, no NUL.
    #[schema(min_length = 1, max_length = 200000)]
    pub manufacturer: String,
    /// Free text, not blank, at most 64 characters, no NUL (e.g. `"12.50"`, `"500EUR"`).
    #[schema(min_length = 1, max_length = 64, example = "500EUR")]
    pub price_per_unit: String,
    /// Stock level.
    #[schema(minimum = 0, maximum = 2147483647, format = Int64)]
    pub units_available: i64,
    /// Not blank, at most 200000 characters, no NUL.
    #[schema(min_length = 1, max_length = 200000)]
    pub product_name: String,
}

/// A JSON merge patch (RFC 7396): the members given are changed; `null` is refused because
/// every field is required.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = ProductPatch)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductPatchSchema {
    /// If present, must equal the id in the path.
    #[schema(minimum = 0, format = Int64)]
    pub product_id: Option<i64>,
    /// New manufacturer.
    #[schema(min_length = 1, max_length = 200000)]
    pub manufacturer: Option<String>,
    /// New price: free text, not blank, at most 64 characters.
    #[schema(min_length = 1, max_length = 64)]
    pub price_per_unit: Option<String>,
    /// New stock level.
    #[schema(minimum = 0, maximum = 2147483647, format = Int64)]
    pub units_available: Option<i64>,
    /// New name.
    #[schema(min_length = 1, max_length = 200000)]
    pub product_name: Option<String>,
}

/// The `{id}` path parameter.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdParam {
    /// Product id.
    #[param(minimum = 0, format = Int64)]
    pub id: i64,
}
