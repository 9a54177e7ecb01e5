//! The presence queries (migration 0008): one instance's heartbeat, its watcher counts, and the
//! sums over every live instance. The schedule that calls them is `presence`'s.
//!
//! Imports `product` only.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{PgExecutor, Row};

use crate::product::ProductId;

/// Keeps instance `instance` alive for `expiry`; true if its row had to be created (first
/// heartbeat, or the table lost it: the caller writes all its counts again).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    instance: i64,
    expiry: Duration,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(include_str!("../../sql/presence_heartbeat.sql"))
        .bind(instance)
        .bind(expiry.as_secs_f64())
        .fetch_one(db)
        .await
}

/// Deletes instances whose heartbeat expired, with their counts.
pub async fn expire(db: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(include_str!("../../sql/presence_expire.sql"))
        .execute(db)
        .await?
        .rows_affected())
}

/// Deletes instance `instance` and its counts (it stops).
pub async fn leave(db: impl PgExecutor<'_>, instance: i64) -> Result<(), sqlx::Error> {
    sqlx::query(include_str!("../../sql/presence_leave.sql"))
        .bind(instance)
        .execute(db)
        .await?;
    Ok(())
}

/// Sets instance `instance`'s watcher counts of `counts`' products (0 deletes the row).
pub async fn write(
    db: impl PgExecutor<'_>,
    instance: i64,
    counts: &[(ProductId, usize)],
) -> Result<(), sqlx::Error> {
    let products: Vec<i64> = counts.iter().map(|(product, _)| product.get()).collect();
    // A count is bounded by the sessions of one process, far below i32::MAX.
    let watchers: Vec<i32> = counts
        .iter()
        .map(|(_, n)| i32::try_from(*n).unwrap_or(i32::MAX))
        .collect();
    sqlx::query(include_str!("../../sql/presence_write.sql"))
        .bind(instance)
        .bind(products)
        .bind(watchers)
        .execute(db)
        .await?;
    Ok(())
}

/// The watchers of `products` summed over every live instance; products without any are
/// absent.
pub async fn sums(
    db: impl PgExecutor<'_>,
    products: &[ProductId],
) -> Result<HashMap<ProductId, u64>, sqlx::Error> {
    let ids: Vec<i64> = products.iter().map(|product| product.get()).collect();
    let rows = sqlx::query(include_str!("../../sql/presence_sums.sql"))
        .bind(ids)
        .fetch_all(db)
        .await?;
    let mut sums = HashMap::with_capacity(rows.len());
    for row in rows {
        let product: i64 = row.try_get("product_id")?;
        let watchers: i64 = row.try_get("watchers")?;
        if let Some(product) = ProductId::new(product) {
            sums.insert(product, u64::try_from(watchers).unwrap_or(0));
        }
    }
    Ok(sums)
}
