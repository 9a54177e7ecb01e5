//! The product domain: ids, products, the inputs that create or change them, and the change
//! events the database announces. Everything that comes from outside (REST bodies, notification
//! payloads, WebSocket ids) is turned into these types by a `parse` function here, so code past
//! the edge never re-checks. No I/O; serde shapes are the wire shapes (camelCase).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A product's id: a non-negative 64-bit integer. Stored products have ids from 1 (the identity
/// column); 0 can be named (and subscribed to: the classic browser snippet subscribes to
/// `[...Array(1024).keys()]`, which starts at 0) but never exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProductId(i64);

impl ProductId {
    /// The largest id: 2^53 - 1, the largest integer a browser's JSON parser (a double) keeps
    /// exact. Larger ids would silently change in JavaScript clients, and a client-chosen id
    /// near i64::MAX would push the identity sequence to its end and stop every POST without
    /// an id.
    pub const MAX: i64 = (1 << 53) - 1;

    /// Accepts ids in `0..=ProductId::MAX`.
    pub fn new(raw: i64) -> Option<Self> {
        (0..=Self::MAX).contains(&raw).then_some(Self(raw))
    }

    /// The id as stored in the database.
    pub fn get(self) -> i64 {
        self.0
    }

    /// Reads an id from a JSON value: an integer (no fraction, no string) in range.
    pub fn from_json(value: &Value) -> Option<Self> {
        value.as_i64().and_then(Self::new)
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A stored product, exactly as REST serves it and as change notifications carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Product {
    /// Primary key.
    pub product_id: ProductId,
    /// Who makes it; never empty.
    pub manufacturer: String,
    /// Price as free text (e.g. `"12.50"` or `"500EUR"`), stored and returned exactly.
    pub price_per_unit: String,
    /// Stock level; never negative.
    pub units_available: i32,
    /// Display name; never empty.
    pub product_name: String,
}

/// What a change did to a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// The product was created.
    Insert,
    /// The product was changed (its new state is carried).
    Update,
    /// The product was deleted (its last state is carried).
    Delete,
}

impl Action {
    /// The action named as the changelog and the WAL reader spell it (`INSERT`, `UPDATE`,
    /// `DELETE`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "INSERT" => Some(Self::Insert),
            "UPDATE" => Some(Self::Update),
            "DELETE" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// A change's position in commit order: every committed change has a unique one, and a lower
/// seq always committed (and became visible) earlier.
pub type Seq = u64;

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Position in commit order.
    pub seq: Seq,
    /// INSERT, UPDATE or DELETE.
    pub action: Action,
    /// The new row, or the old row for DELETE.
    pub product: Product,
}

/// Where a new subscription's stream of changes begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionStart {
    /// With changes committed after the subscription is applied.
    Live,
    /// With every change after this seq (a resume), replayed from the changelog.
    Since(Seq),
    /// With a consistent snapshot of the products, then every change after it.
    Snapshot,
}

/// Why a subscriber's stream cannot go on with a replay and starts again from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetCause {
    /// Changes after the position were pruned by retention.
    Pruned {
        /// Changes at or below this may be gone.
        pruned_through: Seq,
    },
    /// The database's history is not the one the position came from: its seq went backwards
    /// or the change at the position is a different one (a restore, a failover to a lagging
    /// replica, a re-created database).
    Rewound {
        /// The database's newest seq when this was noticed.
        latest: Seq,
    },
}

/// The seq a `product_change` notification names, if it names one. Notifications are hints
/// that something was committed, never the change itself: any database login may NOTIFY, so
/// what subscribers receive is always read from the changelog, and a payload only saves a read
/// when it names a seq already published.
pub fn notification_hint(payload: &str) -> Option<Seq> {
    #[derive(Deserialize)]
    struct Hint {
        seq: Seq,
    }
    serde_json::from_str::<Hint>(payload)
        .ok()
        .map(|hint| hint.seq)
}

/// A client input that breaks a rule; `field` names the JSON field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The camelCase JSON field name (or `body` for the whole document).
    pub field: &'static str,
    /// What was wrong, in words a client developer understands.
    pub message: String,
}

impl ValidationError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// The body of POST and PUT: every field of a product; the id is optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductInput {
    /// For POST: absent or 0 = assign one. For PUT: absent, or equal to the path id.
    #[serde(default)]
    pub product_id: Option<i64>,
    /// See [`Product::manufacturer`].
    pub manufacturer: String,
    /// See [`Product::price_per_unit`].
    pub price_per_unit: String,
    /// Signed so that a negative number gets a validation message instead of a type error.
    pub units_available: i64,
    /// See [`Product::product_name`].
    pub product_name: String,
}

/// A validated product without an id decision: what POST/PUT store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProduct {
    /// Present when the client chose an id.
    pub product_id: Option<ProductId>,
    /// Validated manufacturer.
    pub manufacturer: String,
    /// Validated decimal price text.
    pub price_per_unit: String,
    /// Validated stock level.
    pub units_available: i32,
    /// Validated name.
    pub product_name: String,
}

impl NewProduct {
    /// Validates a POST/PUT body. A `productId` of 0 means "assign one".
    pub fn parse(input: ProductInput) -> Result<Self, ValidationError> {
        let product_id = match input.product_id {
            None | Some(0) => None,
            Some(raw) => Some(ProductId::new(raw).ok_or_else(|| {
                ValidationError::new(
                    "productId",
                    "must be an integer from 1 to 9007199254740991 (or 0 to assign one)",
                )
            })?),
        };
        Ok(Self {
            product_id,
            manufacturer: parse_name("manufacturer", input.manufacturer)?,
            price_per_unit: parse_price(input.price_per_unit)?,
            units_available: parse_units(input.units_available)?,
            product_name: parse_name("productName", input.product_name)?,
        })
    }
}

/// A validated JSON merge patch (RFC 7396) of a product: `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProductPatch {
    /// New manufacturer, if given.
    pub manufacturer: Option<String>,
    /// New price, if given.
    pub price_per_unit: Option<String>,
    /// New stock level, if given.
    pub units_available: Option<i32>,
    /// New name, if given.
    pub product_name: Option<String>,
}

impl ProductPatch {
    /// Validates a merge-patch document for product `path_id`. Every product field is required,
    /// so `null` (which would remove a member) is refused; `productId`, if present, must equal
    /// the path id.
    pub fn parse(path_id: ProductId, document: Value) -> Result<Self, ValidationError> {
        let Value::Object(members) = document else {
            return Err(ValidationError::new(
                "body",
                "a merge patch must be a JSON object",
            ));
        };
        let mut patch = Self::default();
        for (key, value) in members {
            match key.as_str() {
                "productId" => {
                    if ProductId::from_json(&value) != Some(path_id) {
                        return Err(id_mismatch(path_id));
                    }
                }
                "manufacturer" => {
                    patch.manufacturer = Some(parse_name(
                        "manufacturer",
                        string_member("manufacturer", value)?,
                    )?);
                }
                "pricePerUnit" => {
                    patch.price_per_unit =
                        Some(parse_price(string_member("pricePerUnit", value)?)?);
                }
                "unitsAvailable" => {
                    let units = value.as_i64().ok_or_else(|| {
                        ValidationError::new("unitsAvailable", "must be an integer")
                    })?;
                    patch.units_available = Some(parse_units(units)?);
                }
                "productName" => {
                    patch.product_name = Some(parse_name(
                        "productName",
                        string_member("productName", value)?,
                    )?);
                }
                _ => return Err(unknown_field(&key)),
            }
        }
        Ok(patch)
    }

    /// True when the patch changes nothing (an empty object).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The error for a body whose `productId` differs from the id in the path.
pub fn id_mismatch(path_id: ProductId) -> ValidationError {
    ValidationError::new(
        "productId",
        format!("must be absent or equal to the id in the path ({path_id})"),
    )
}

fn unknown_field(key: &str) -> ValidationError {
    ValidationError::new(
        "body",
        format!(
            "unknown field `{key}`; expected productId, manufacturer, pricePerUnit, unitsAvailable or productName"
        ),
    )
}

fn string_member(field: &'static str, value: Value) -> Result<String, ValidationError> {
    match value {
        Value::String(text) => Ok(text),
        Value::Null => Err(ValidationError::new(
            field,
            "cannot be removed (null); every product field is required",
        )),
        _ => Err(ValidationError::new(field, "must be a string")),
    }
}

/// Longest text accepted in a name field: far above real names (a 100 KB name must still work)
/// while keeping one row well below the HTTP body limit.
const MAX_TEXT_CHARS: usize = 200_000;

fn parse_name(field: &'static str, value: String) -> Result<String, ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.chars().count() > MAX_TEXT_CHARS {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_TEXT_CHARS} characters"),
        ));
    }
    if value.contains('\0') {
        return Err(ValidationError::new(
            field,
            "must not contain NUL characters",
        ));
    }
    Ok(value)
}

/// Longest price text accepted: far above any real price with its currency ("500EUR",
/// "12.50 USD / unit"), small enough that a price is never the reason a row is large.
const MAX_PRICE_CHARS: usize = 64;

/// Prices are free text, as in the Go service rowcast replaces (its documented request sends
/// `"500EUR"`): stored and returned exactly, never parsed into a number, so no rounding and no
/// currency is lost. Only what no price can be is refused: empty, blank, overlong, or NUL.
fn parse_price(value: String) -> Result<String, ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::new(
            "pricePerUnit",
            "must not be empty; send the price as text, like \"12.50\" or \"500EUR\"",
        ));
    }
    if value.chars().count() > MAX_PRICE_CHARS {
        return Err(ValidationError::new(
            "pricePerUnit",
            format!("must be at most {MAX_PRICE_CHARS} characters"),
        ));
    }
    if value.contains('\0') {
        return Err(ValidationError::new(
            "pricePerUnit",
            "must not contain NUL characters",
        ));
    }
    Ok(value)
}

fn parse_units(value: i64) -> Result<i32, ValidationError> {
    if value < 0 {
        return Err(ValidationError::new(
            "unitsAvailable",
            "must not be negative",
        ));
    }
    i32::try_from(value).map_err(|_| {
        ValidationError::new("unitsAvailable", format!("must be at most {}", i32::MAX))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(value: Value) -> ProductInput {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn action_names_are_the_ones_the_wire_format_uses() {
        for action in [Action::Insert, Action::Update, Action::Delete] {
            let name = serde_json::to_value(action).unwrap();
            assert_eq!(Action::from_name(name.as_str().unwrap()), Some(action));
        }
        assert_eq!(Action::from_name("insert"), None);
        assert_eq!(Action::from_name("TRUNCATE"), None);
    }

    fn valid() -> Value {
        json!({"manufacturer": "Acme", "pricePerUnit": "12.50", "unitsAvailable": 3, "productName": "Anvil"})
    }

    #[test]
    fn new_product_accepts_valid_input_and_treats_zero_id_as_absent() {
        let mut body = valid();
        body["productId"] = json!(0);
        let product = NewProduct::parse(input(body)).unwrap();
        assert_eq!(product.product_id, None);
        assert_eq!(product.units_available, 3);
    }

    #[test]
    fn new_product_rejects_each_bad_field_by_name() {
        for (field, bad) in [
            ("manufacturer", json!("  ")),
            ("productName", json!("")),
            ("pricePerUnit", json!("")),
            ("pricePerUnit", json!("   ")),
            ("pricePerUnit", json!("9".repeat(65))),
            ("pricePerUnit", json!("5\u{0}")),
            ("unitsAvailable", json!(-1)),
            ("unitsAvailable", json!(3_000_000_000_i64)),
            ("productId", json!(-4)),
        ] {
            let mut body = valid();
            body[field] = bad.clone();
            let err = NewProduct::parse(input(body)).unwrap_err();
            assert_eq!(err.field, field, "{bad}");
        }
    }

    #[test]
    fn prices_are_free_text_as_in_the_original_service() {
        for price in ["500EUR", "12,50", "-1", "1.", "12.50", "€ 3"] {
            let mut body = valid();
            body["pricePerUnit"] = json!(price);
            let product = NewProduct::parse(input(body)).unwrap();
            assert_eq!(product.price_per_unit, price, "kept exactly");
        }
    }

    #[test]
    fn unknown_fields_are_refused_by_the_body_type() {
        let mut body = valid();
        body["colour"] = json!("red");
        assert!(serde_json::from_value::<ProductInput>(body).is_err());
    }

    #[test]
    fn patch_takes_given_fields_and_refuses_null_unknown_and_other_ids() {
        let id = ProductId::new(7).unwrap();
        let patch = ProductPatch::parse(id, json!({"unitsAvailable": 9, "productId": 7})).unwrap();
        assert_eq!(patch.units_available, Some(9));
        assert_eq!(patch.manufacturer, None);
        assert!(ProductPatch::parse(id, json!({})).unwrap().is_empty());

        let null = ProductPatch::parse(id, json!({"productName": null})).unwrap_err();
        assert_eq!(null.field, "productName");
        let other = ProductPatch::parse(id, json!({"productId": 8})).unwrap_err();
        assert_eq!(other.field, "productId");
        let unknown = ProductPatch::parse(id, json!({"colour": "red"})).unwrap_err();
        assert!(unknown.message.contains("colour"));
        assert!(ProductPatch::parse(id, json!([1])).is_err());
    }

    #[test]
    fn notification_hints_name_a_seq_or_nothing() {
        assert_eq!(
            notification_hint(r#"{"seq":8,"action":"UPDATE","productId":3}"#),
            Some(8)
        );
        assert_eq!(notification_hint(r#"{"seq":8,"anything":[1]}"#), Some(8));
        for garbage in ["", "null", "{}", r#"{"seq":-1}"#, r#"{"seq":"8"}"#, "\u{0}"] {
            assert_eq!(notification_hint(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn product_ids_must_be_non_negative_integers() {
        assert!(ProductId::from_json(&json!(1)).is_some());
        assert!(ProductId::from_json(&json!(0)).is_some());
        assert!(ProductId::from_json(&json!(9_007_199_254_740_991_i64)).is_some());
        for bad in [
            json!(9_007_199_254_740_992_i64),
            json!(-1),
            json!(1.5),
            json!("1"),
            json!(u64::MAX),
        ] {
            assert!(ProductId::from_json(&bad).is_none(), "{bad}");
        }
    }
}
