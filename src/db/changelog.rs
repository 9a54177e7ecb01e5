//! Reads and retention of the changelog (`product_changes`, filled by the trigger of migration
//! 0003 in commit order): the listener's catch-up, clients' resumes and snapshots, and pruning.

use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::product::{Action, Change, Product, ProductId, Seq};
use crate::shutdown::Shutdown;

/// Rows fetched per changelog query, so a long catch-up or replay streams in bounded memory.
pub const PAGE: i64 = 1000;
/// Rows deleted per retention transaction: short transactions, no long-held row locks.
const PRUNE_BATCH: i64 = 1000;

/// A changelog read that failed.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    /// The database did not answer.
    #[error("changelog query failed: {0}")]
    Database(#[from] sqlx::Error),
    /// A row did not hold a valid change (a bug or manual edit).
    #[error("changelog row {seq} is not a valid change: {cause}")]
    Corrupt {
        /// The row's seq.
        seq: i64,
        /// What was wrong.
        cause: String,
    },
}

/// The rows of some products as of one position in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every change with seq <= this is reflected, none after it.
    pub seq: Seq,
    /// The rows that exist.
    pub products: Vec<Product>,
}

fn to_seq(value: i64) -> Seq {
    // Sequence values start at 1 and pruned_through at 0.
    Seq::try_from(value).unwrap_or(0)
}

fn to_param(seq: Seq) -> i64 {
    // Seqs come from a bigint sequence or are checked to fit when a client sends one.
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn decode(row: &sqlx::postgres::PgRow) -> Result<Change, ChangelogError> {
    let seq: i64 = row.try_get("seq")?;
    let action: String = row.try_get("action")?;
    let product: String = row.try_get("product")?;
    let corrupt = |cause: String| ChangelogError::Corrupt { seq, cause };
    let action: Action = serde_json::from_value(serde_json::Value::String(action))
        .map_err(|err| corrupt(err.to_string()))?;
    let product: Product =
        serde_json::from_str(&product).map_err(|err| corrupt(err.to_string()))?;
    Ok(Change {
        seq: to_seq(seq),
        action,
        product,
    })
}

/// The last seq of a committed change (0 if none yet).
pub async fn latest_seq(pool: &PgPool) -> Result<Seq, ChangelogError> {
    let seq: i64 = sqlx::query_scalar(include_str!("../../sql/changelog_latest_seq.sql"))
        .fetch_one(pool)
        .await?;
    Ok(to_seq(seq))
}

/// Up to [`PAGE`] changes to any product after `after`, in seq order.
pub async fn after(pool: &PgPool, after: Seq) -> Result<Vec<Change>, ChangelogError> {
    let query = sqlx::query(include_str!("../../sql/changelog_after.sql"))
        .bind(to_param(after))
        .bind(PAGE);
    fetch_page(pool, query).await
}

/// Up to [`PAGE`] changes to `products` with `after < seq <= upto`, in seq order.
pub async fn for_products(
    pool: &PgPool,
    products: &[ProductId],
    after: Seq,
    upto: Seq,
) -> Result<Vec<Change>, ChangelogError> {
    let ids: Vec<i64> = products.iter().map(|id| id.get()).collect();
    let query = sqlx::query(include_str!("../../sql/changelog_for_products.sql"))
        .bind(ids)
        .bind(to_param(after))
        .bind(to_param(upto))
        .bind(PAGE);
    fetch_page(pool, query).await
}

/// Runs a query for one page of changes and decodes its rows.
async fn fetch_page(
    pool: &PgPool,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> Result<Vec<Change>, ChangelogError> {
    query.fetch_all(pool).await?.iter().map(decode).collect()
}

/// Changes with seq at or below this may have been pruned.
pub async fn pruned_through(pool: &PgPool) -> Result<Seq, ChangelogError> {
    let seq: i64 = sqlx::query_scalar(include_str!("../../sql/changelog_horizon.sql"))
        .fetch_one(pool)
        .await?;
    Ok(to_seq(seq))
}

/// The current rows of `products` and the seq they reflect, read in one snapshot: because seq
/// order is commit order, the rows reflect exactly the changes with seq <= the returned seq.
pub async fn snapshot(pool: &PgPool, products: &[ProductId]) -> Result<Snapshot, ChangelogError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let seq: i64 = sqlx::query_scalar(include_str!("../../sql/changelog_latest_seq.sql"))
        .fetch_one(&mut *tx)
        .await?;
    let ids: Vec<i64> = products.iter().map(|id| id.get()).collect();
    let rows = sqlx::query(include_str!("../../sql/snapshot_products.sql"))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let products = rows
        .iter()
        .map(|row| {
            let id: i64 = row.try_get("product_id")?;
            Ok(Product {
                product_id: ProductId::new(id).ok_or_else(|| ChangelogError::Corrupt {
                    seq,
                    cause: format!("product id {id} is negative"),
                })?,
                manufacturer: row.try_get("manufacturer")?,
                price_per_unit: row.try_get("price_per_unit")?,
                units_available: row.try_get("units_available")?,
                product_name: row.try_get("product_name")?,
            })
        })
        .collect::<Result<_, ChangelogError>>()?;
    Ok(Snapshot {
        seq: to_seq(seq),
        products,
    })
}

/// Applies retention once: announces the cut, then deletes up to it in small batches.
/// Returns the rows deleted.
pub async fn prune(
    pool: &PgPool,
    retention: Duration,
    max_rows: u64,
) -> Result<u64, ChangelogError> {
    let cut: i64 = sqlx::query_scalar(include_str!("../../sql/changelog_prune_cut.sql"))
        .bind(retention.as_secs_f64())
        .bind(i64::try_from(max_rows).unwrap_or(i64::MAX))
        .fetch_one(pool)
        .await?;
    if cut <= 0 {
        return Ok(0);
    }
    sqlx::query(include_str!("../../sql/changelog_advance_horizon.sql"))
        .bind(cut)
        .execute(pool)
        .await?;
    let mut deleted = 0;
    loop {
        let batch = sqlx::query(include_str!("../../sql/changelog_prune_batch.sql"))
            .bind(cut)
            .bind(PRUNE_BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        deleted += batch;
        if batch < PRUNE_BATCH as u64 {
            return Ok(deleted);
        }
    }
}

/// Runs retention every `interval` until shutdown.
pub async fn run_retention(
    pool: PgPool,
    settings: crate::config::ChangelogSettings,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(settings.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match prune(&pool, settings.retention, settings.max_rows).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "changelog retention"),
            Err(err) => tracing::warn!(cause = %err, "changelog retention failed; will retry"),
        }
    }
}
