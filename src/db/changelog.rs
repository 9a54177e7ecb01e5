//! Reads and retention of the changelog (`product_changes`, filled by the trigger of migration
//! 0003 in commit order): the listener's catch-up, clients' resumes and snapshots, and pruning
//! (the query; `retention` owns its schedule).
//!
//! The reads take any executor — a pool, or one connection that the caller already holds — so
//! that each caller chooses the pool its reads come from (`db::Pools`): the listener reads on the
//! background pool, clients' replays and snapshots through `db::HistoryReader`.

use std::time::Duration;

use sqlx::{PgExecutor, PgPool, Postgres, Row};

use crate::product::{Action, Change, Product, ProductId, Seq};

/// Rows fetched per changelog query at most, so a long catch-up or replay streams in bounded
/// memory.
pub const PAGE_ROWS: i64 = 1000;
/// Bytes of change JSON per changelog page at most (past its first row): rows can be ~1 MB each,
/// so rows alone do not bound a page's memory. 4 MiB keeps pages of typical rows at
/// [`PAGE_ROWS`] while a backlog of large rows still advances several rows per read.
pub const PAGE_BYTES: i64 = 4 << 20;
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

/// One page of changes, with what the same database snapshot said about retention.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Changes at or below this may already be deleted: a reader whose position is below it
    /// cannot tell whether it missed some.
    pub pruned_through: Seq,
    /// The changes, in seq order.
    pub changes: Vec<LoggedChange>,
    /// True if more changes may follow the last one (the page was cut by rows or bytes).
    pub more: bool,
    /// For reads after a position: the commit time of the change at that position, if it
    /// exists (see `sql/changelog_after.sql`).
    pub committed_at_of: Option<String>,
}

/// A change as the changelog holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedChange {
    /// The change.
    pub change: Change,
    /// When it was recorded (the database's clock, in microseconds since the Unix epoch, as
    /// text: the same whatever a session's TimeZone and DateStyle): with the seq, it identifies
    /// this change in this database's history.
    pub committed_at: String,
    /// In a conflated read, how many changes of this product it stands for (1 otherwise).
    pub versions: u64,
}

/// Where the changelog stands (see `sql/changelog_position.sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The newest seq of a committed change (or the horizon, if that is higher).
    pub latest: Seq,
    /// The newest change's commit time, if there is a change.
    pub latest_committed_at: Option<String>,
    /// Changes at or below this may have been pruned.
    pub pruned_through: Seq,
    /// The commit time of the change at the seq asked about, if it exists.
    pub committed_at_of: Option<String>,
}

fn to_seq(value: i64) -> Seq {
    // Sequence values start at 1 and pruned_through at 0.
    Seq::try_from(value).unwrap_or(0)
}

fn to_param(seq: Seq) -> i64 {
    // Seqs come from a bigint sequence or are checked to fit when a client sends one.
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Decodes a page query's rows (see `sql/changelog_after.sql` for their shape).
fn decode_page(rows: &[sqlx::postgres::PgRow]) -> Result<Page, ChangelogError> {
    let mut page = Page::default();
    let mut fetched = 0;
    for row in rows {
        page.pruned_through = to_seq(row.try_get("pruned_through")?);
        match row.try_get::<Option<String>, _>("committed_at_of") {
            Ok(committed_at) => page.committed_at_of = committed_at,
            Err(sqlx::Error::ColumnNotFound(_)) => {}
            Err(err) => return Err(err.into()),
        }
        let Some(seq) = row.try_get::<Option<i64>, _>("seq")? else {
            continue;
        };
        fetched = row.try_get::<i64, _>("fetched")?;
        let action: String = row.try_get("action")?;
        let product: String = row.try_get("product")?;
        let corrupt = |cause: String| ChangelogError::Corrupt { seq, cause };
        let action = Action::from_name(&action)
            .ok_or_else(|| corrupt(format!("unknown action {action:?}")))?;
        let product: Product =
            serde_json::from_str(&product).map_err(|err| corrupt(err.to_string()))?;
        let versions = match row.try_get::<Option<i64>, _>("versions") {
            Ok(versions) => versions.map_or(1, to_seq),
            Err(sqlx::Error::ColumnNotFound(_)) => 1,
            Err(err) => return Err(err.into()),
        };
        page.changes.push(LoggedChange {
            change: Change {
                seq: to_seq(seq),
                action,
                product,
            },
            committed_at: row.try_get("committed_at")?,
            versions,
        });
    }
    let returned = i64::try_from(page.changes.len()).unwrap_or(i64::MAX);
    page.more = fetched > returned || fetched >= PAGE_ROWS;
    Ok(page)
}

/// The last seq of a committed change (0 if none yet).
pub async fn latest_seq(db: impl PgExecutor<'_>) -> Result<Seq, ChangelogError> {
    let seq: i64 = sqlx::query_scalar(include_str!("../../sql/changelog_latest_seq.sql"))
        .fetch_one(db)
        .await?;
    Ok(to_seq(seq))
}

/// Where the changelog stands, and the commit time of the change at `seq` (if it exists).
pub async fn position(db: impl PgExecutor<'_>, seq: Seq) -> Result<Position, ChangelogError> {
    let row = sqlx::query(include_str!("../../sql/changelog_position.sql"))
        .bind(to_param(seq))
        .fetch_one(db)
        .await?;
    Ok(Position {
        latest: to_seq(row.try_get("latest")?),
        latest_committed_at: row.try_get("latest_committed_at")?,
        pruned_through: to_seq(row.try_get("pruned_through")?),
        committed_at_of: row.try_get("committed_at_of")?,
    })
}

/// One page of changes to any product after `after`, in seq order.
pub async fn after(db: impl PgExecutor<'_>, after: Seq) -> Result<Page, ChangelogError> {
    let rows = sqlx::query(include_str!("../../sql/changelog_after.sql"))
        .bind(to_param(after))
        .bind(PAGE_ROWS)
        .bind(PAGE_BYTES)
        .fetch_all(db)
        .await?;
    decode_page(&rows)
}

/// Which products a replay reads: some by id, or every product (a subscribe-all). The two read
/// through separate statements, so that neither plan has to serve both shapes.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// These products only.
    Products(&'a [ProductId]),
    /// Every product.
    All,
}

/// One page of changes in `scope` with `after < seq <= upto`, in seq order.
pub async fn range(
    db: impl PgExecutor<'_>,
    scope: Scope<'_>,
    after: Seq,
    upto: Seq,
) -> Result<Page, ChangelogError> {
    let query = match scope {
        Scope::Products(products) => {
            sqlx::query(include_str!("../../sql/changelog_for_products.sql")).bind(ids_of(products))
        }
        Scope::All => sqlx::query(include_str!("../../sql/changelog_all_range.sql")),
    };
    let rows = query
        .bind(to_param(after))
        .bind(to_param(upto))
        .bind(PAGE_ROWS)
        .bind(PAGE_BYTES)
        .fetch_all(db)
        .await?;
    decode_page(&rows)
}

/// One page of the newest change of each product in `scope` in `range` (exclusive start,
/// inclusive end) that comes after `cursor`, in seq order: a conflated replay.
pub async fn latest(
    db: impl PgExecutor<'_>,
    scope: Scope<'_>,
    range: (Seq, Seq),
    cursor: Seq,
) -> Result<Page, ChangelogError> {
    let query = match scope {
        Scope::Products(products) => {
            sqlx::query(include_str!("../../sql/changelog_latest_per_product.sql"))
                .bind(ids_of(products))
        }
        Scope::All => sqlx::query(include_str!("../../sql/changelog_latest_all.sql")),
    };
    let rows = query
        .bind(to_param(range.0))
        .bind(to_param(range.1))
        .bind(to_param(cursor))
        .bind(PAGE_ROWS)
        .bind(PAGE_BYTES)
        .fetch_all(db)
        .await?;
    decode_page(&rows)
}

fn ids_of(products: &[ProductId]) -> Vec<i64> {
    products.iter().map(|id| id.get()).collect()
}

/// Changes with seq at or below this may have been pruned.
pub async fn pruned_through(db: impl PgExecutor<'_>) -> Result<Seq, ChangelogError> {
    let seq: i64 = sqlx::query_scalar(include_str!("../../sql/changelog_horizon.sql"))
        .fetch_one(db)
        .await?;
    Ok(to_seq(seq))
}

/// The current rows of `products` and the seq they reflect, read in one snapshot: because seq
/// order is commit order, the rows reflect exactly the changes with seq <= the returned seq.
pub async fn snapshot(
    db: impl sqlx::Acquire<'_, Database = Postgres>,
    products: &[ProductId],
) -> Result<Snapshot, ChangelogError> {
    read_snapshot(db, Some(products)).await
}

/// Every current row and the seq they reflect, read in one snapshot (a subscribe-all's
/// snapshot; the caller sends it in pages). Holds the whole table in memory once.
pub async fn snapshot_all(
    db: impl sqlx::Acquire<'_, Database = Postgres>,
) -> Result<Snapshot, ChangelogError> {
    read_snapshot(db, None).await
}

/// The rows of `products` (None: of every product) and the seq they reflect.
async fn read_snapshot(
    db: impl sqlx::Acquire<'_, Database = Postgres>,
    products: Option<&[ProductId]>,
) -> Result<Snapshot, ChangelogError> {
    let mut tx = db.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let seq: i64 = sqlx::query_scalar(include_str!("../../sql/changelog_latest_seq.sql"))
        .fetch_one(&mut *tx)
        .await?;
    let rows = match products {
        Some(products) => {
            let ids: Vec<i64> = products.iter().map(|id| id.get()).collect();
            sqlx::query(include_str!("../../sql/snapshot_products.sql"))
                .bind(ids)
                .fetch_all(&mut *tx)
                .await?
        }
        None => {
            sqlx::query(include_str!("../../sql/snapshot_all.sql"))
                .fetch_all(&mut *tx)
                .await?
        }
    };
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
