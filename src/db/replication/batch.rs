//! The reader's changelog writes: one batch of changes, its position and its notification in
//! one statement (one round trip), and, for `--replication-commit async`, the session setting and
//! the WAL positions that tell when an unflushed batch is durable.

use tokio_postgres::Client;

use super::{ReplicationDbError, RowChange, format_lsn, parse_lsn};
use crate::product::Seq;

/// What one batch of the reader writes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Changes in commit order.
    pub changes: Vec<RowChange>,
    /// A gap to announce after the changes (a TRUNCATE, or a new slot after a lost one): the
    /// horizon moves past a fresh seq, so subscribers are reset.
    pub gap: bool,
    /// The reader is armed after this batch.
    pub armed: bool,
    /// The end of the batch's last transaction.
    pub lsn: u64,
}

/// Writes a batch in one transaction — the changes with fresh seqs in order, the gap, the
/// applied position — and sends ONE notification for it. Returns the last seq written, if any.
///
/// Without a gap (every batch but a TRUNCATE's or a new slot's) that is one statement, typed so
/// that parse, bind and execute go in one round trip: a change's latency from commit to clients
/// includes this write, and each round trip on a busy machine costs a scheduling delay.
/// `--replication-commit async`: this session's commits (the changelog batches) stop waiting
/// for their WAL flush.
pub async fn commit_without_waiting_for_flush(db: &Client) -> Result<(), ReplicationDbError> {
    db.batch_execute("SET synchronous_commit = off").await?;
    Ok(())
}

/// The server's WAL positions at one moment.
#[derive(Debug, Clone, Copy)]
pub struct WalPositions {
    /// Where the next record will be inserted: past every commit already returned.
    pub insert: u64,
    /// How far the WAL is on disk.
    pub flush: u64,
}

/// Reads [`WalPositions`].
pub async fn wal_positions(db: &Client) -> Result<WalPositions, ReplicationDbError> {
    let row = db
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
            &[],
        )
        .await?;
    let position = |index: usize| -> Result<u64, ReplicationDbError> {
        let text: String = row.try_get(index)?;
        parse_lsn(&text).ok_or_else(|| ReplicationDbError::Lsn(text))
    };
    Ok(WalPositions {
        insert: position(0)?,
        flush: position(1)?,
    })
}

pub async fn write_batch(
    db: &mut Client,
    batch: &Batch,
) -> Result<Option<Seq>, ReplicationDbError> {
    if !batch.gap {
        return Ok(changes_and_position(&*db, batch).await?);
    }
    let tx = db.transaction().await?;
    // A gap is never written unflushed (`--replication-commit async`): it is rare, and a
    // new slot's gap lost in a crash would not be decoded again.
    tx.batch_execute("SET LOCAL synchronous_commit = on")
        .await?;
    changes_and_position(&tx, batch).await?;
    // The horizon moves past a fresh seq: every listener re-bases and resets its subscribers.
    let horizon: i64 = tx
        .query_one(
            "UPDATE changelog_horizon
             SET pruned_through = greatest(pruned_through, nextval('product_change_seq'))
             RETURNING pruned_through",
            &[],
        )
        .await?
        .try_get(0)?;
    tx.execute(
        "SELECT pg_notify('product_change', json_build_object('seq', $1::bigint)::text)",
        &[&horizon],
    )
    .await?;
    tx.commit().await?;
    Ok(Seq::try_from(horizon).ok())
}

/// `sql/replication_write_batch.sql`: the changes, the position and the notification.
async fn changes_and_position(
    db: &impl tokio_postgres::GenericClient,
    batch: &Batch,
) -> Result<Option<Seq>, tokio_postgres::Error> {
    use tokio_postgres::types::Type;
    let c = BatchColumns::of(&batch.changes);
    let lsn = format_lsn(batch.lsn);
    let row = db
        .query_typed_one(
            include_str!("../../../sql/replication_write_batch.sql"),
            &[
                (&c.product_id, Type::INT8_ARRAY),
                (&c.action, Type::TEXT_ARRAY),
                (&c.manufacturer, Type::TEXT_ARRAY),
                (&c.price_per_unit, Type::TEXT_ARRAY),
                (&c.units_available, Type::INT4_ARRAY),
                (&c.product_name, Type::TEXT_ARRAY),
                (&c.committed_at_micros, Type::INT8_ARRAY),
                (&lsn, Type::TEXT),
                (&batch.armed, Type::BOOL),
            ],
        )
        .await?;
    let last: Option<i64> = row.try_get(0)?;
    Ok(last.and_then(|seq| Seq::try_from(seq).ok()))
}

/// A batch as one array per field (the query's `unnest` parameters).
struct BatchColumns {
    product_id: Vec<i64>,
    action: Vec<&'static str>,
    manufacturer: Vec<String>,
    price_per_unit: Vec<String>,
    units_available: Vec<i32>,
    product_name: Vec<String>,
    committed_at_micros: Vec<i64>,
}

impl BatchColumns {
    fn of(changes: &[RowChange]) -> Self {
        let mut columns = Self {
            product_id: Vec::with_capacity(changes.len()),
            action: Vec::with_capacity(changes.len()),
            manufacturer: Vec::with_capacity(changes.len()),
            price_per_unit: Vec::with_capacity(changes.len()),
            units_available: Vec::with_capacity(changes.len()),
            product_name: Vec::with_capacity(changes.len()),
            committed_at_micros: Vec::with_capacity(changes.len()),
        };
        for change in changes {
            columns.product_id.push(change.product_id);
            columns.action.push(change.action);
            columns.manufacturer.push(change.manufacturer.clone());
            columns.price_per_unit.push(change.price_per_unit.clone());
            columns.units_available.push(change.units_available);
            columns.product_name.push(change.product_name.clone());
            columns.committed_at_micros.push(change.committed_at_micros);
        }
        columns
    }
}
