//! Product queries, one SQL file per query under `sql/`. Maps database errors that mean
//! something to a client (no such row, duplicate id) to [`StoreError`]; everything else is
//! `StoreError::Database`, which the API reports as a 500 without details.

use sqlx::Connection as _;

use super::RestPool;

use crate::product::{NewProduct, Product, ProductId, ProductPatch};

/// Outcome of a product query that did not produce a product.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No product has this id.
    #[error("product {0} does not exist")]
    NotFound(ProductId),
    /// A product with this id already exists.
    #[error("product {0} already exists")]
    Conflict(ProductId),
    /// Every id the identity sequence may hand out (up to [`ProductId::MAX`]) is used up; a
    /// client may still create products by choosing a free id.
    #[error(
        "no product id is left to assign: generated ids end at {max}; choose a free productId",
        max = ProductId::MAX
    )]
    IdsExhausted,
    /// Anything else: connection loss, timeouts, bugs. Details go to the log only.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// Generated-id inserts retry this often on a duplicate key, which happens only when a
/// concurrent client-chosen id raced the sequence adjustment.
const INSERT_ATTEMPTS: usize = 5;

#[derive(sqlx::FromRow)]
struct ProductRow {
    product_id: i64,
    manufacturer: String,
    price_per_unit: String,
    units_available: i32,
    product_name: String,
}

impl ProductRow {
    fn into_product(self) -> Result<Product, StoreError> {
        // The column has CHECK (product_id > 0), so a negative id is a broken database.
        let product_id = ProductId::new(self.product_id).ok_or_else(|| {
            StoreError::Database(sqlx::Error::Decode(
                format!("product_id {} is negative", self.product_id).into(),
            ))
        })?;
        Ok(Product {
            product_id,
            manufacturer: self.manufacturer,
            price_per_unit: self.price_per_unit,
            units_available: self.units_available,
            product_name: self.product_name,
        })
    }
}

/// SQLSTATE 2200H: `nextval` reached the sequence's MAXVALUE (migration 0005 caps it at
/// [`ProductId::MAX`]).
fn is_sequence_exhausted(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|db| db.code().as_deref() == Some("2200H"))
}

fn is_duplicate_key(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|db| db.constraint() == Some("products_pkey"))
}

/// Products with id > `after`, ascending, at most `limit`.
pub async fn list(pool: &RestPool, after: i64, limit: i64) -> Result<Vec<Product>, StoreError> {
    let mut conn = pool.acquire().await?;
    let rows = sqlx::query_as::<_, ProductRow>(include_str!("../../sql/products_list.sql"))
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    conn.settle();
    rows.into_iter().map(ProductRow::into_product).collect()
}

/// One product.
pub async fn get(pool: &RestPool, id: ProductId) -> Result<Product, StoreError> {
    let mut conn = pool.acquire().await?;
    let row = sqlx::query_as::<_, ProductRow>(include_str!("../../sql/products_get.sql"))
        .bind(id.get())
        .fetch_optional(&mut *conn)
        .await?;
    conn.settle();
    row.ok_or(StoreError::NotFound(id))?.into_product()
}

/// Creates a product, with the client's id if it chose one.
pub async fn insert(pool: &RestPool, new: &NewProduct) -> Result<Product, StoreError> {
    match new.product_id {
        Some(id) => insert_with_id(pool, id, new).await,
        None => insert_generated(pool, new).await,
    }
}

async fn insert_generated(pool: &RestPool, new: &NewProduct) -> Result<Product, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = sqlx::query_as::<_, ProductRow>(include_str!("../../sql/products_insert.sql"))
            .bind(&new.manufacturer)
            .bind(&new.price_per_unit)
            .bind(new.units_available)
            .bind(&new.product_name)
            .fetch_one(&mut *conn)
            .await;
        match result {
            Ok(row) => {
                conn.settle();
                return row.into_product();
            }
            Err(err) if is_duplicate_key(&err) && attempt < INSERT_ATTEMPTS => continue,
            Err(err) if is_sequence_exhausted(&err) => return Err(StoreError::IdsExhausted),
            Err(err) => return Err(err.into()),
        }
    }
}

async fn insert_with_id(
    pool: &RestPool,
    id: ProductId,
    new: &NewProduct,
) -> Result<Product, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let row =
        sqlx::query_as::<_, ProductRow>(include_str!("../../sql/products_insert_with_id.sql"))
            .bind(id.get())
            .bind(&new.manufacturer)
            .bind(&new.price_per_unit)
            .bind(new.units_available)
            .bind(&new.product_name)
            .fetch_one(&mut *tx)
            .await
            .map_err(|err| {
                if is_duplicate_key(&err) {
                    StoreError::Conflict(id)
                } else {
                    err.into()
                }
            })?;
    sqlx::query(include_str!("../../sql/products_advance_id_sequence.sql"))
        .bind(id.get())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    conn.settle();
    row.into_product()
}

/// Replaces every field of an existing product.
pub async fn replace(
    pool: &RestPool,
    id: ProductId,
    new: &NewProduct,
) -> Result<Product, StoreError> {
    let mut conn = pool.acquire().await?;
    let row = sqlx::query_as::<_, ProductRow>(include_str!("../../sql/products_replace.sql"))
        .bind(id.get())
        .bind(&new.manufacturer)
        .bind(&new.price_per_unit)
        .bind(new.units_available)
        .bind(&new.product_name)
        .fetch_optional(&mut *conn)
        .await?;
    conn.settle();
    row.ok_or(StoreError::NotFound(id))?.into_product()
}

/// Changes the given fields of an existing product.
pub async fn patch(
    pool: &RestPool,
    id: ProductId,
    patch: &ProductPatch,
) -> Result<Product, StoreError> {
    let mut conn = pool.acquire().await?;
    let row = sqlx::query_as::<_, ProductRow>(include_str!("../../sql/products_patch.sql"))
        .bind(id.get())
        .bind(patch.manufacturer.as_deref())
        .bind(patch.price_per_unit.as_deref())
        .bind(patch.units_available)
        .bind(patch.product_name.as_deref())
        .fetch_optional(&mut *conn)
        .await?;
    conn.settle();
    row.ok_or(StoreError::NotFound(id))?.into_product()
}

/// Deletes a product.
pub async fn delete(pool: &RestPool, id: ProductId) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    let result = sqlx::query(include_str!("../../sql/products_delete.sql"))
        .bind(id.get())
        .execute(&mut *conn)
        .await?;
    conn.settle();
    if result.rows_affected() == 0 {
        return Err(StoreError::NotFound(id));
    }
    Ok(())
}
