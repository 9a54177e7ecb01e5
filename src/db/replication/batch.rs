//! The reader's changelog writes: one batch of changes, its position and its notification in
//! one statement (one round trip), and, for `--replication-commit async`, the session setting and
//! the WAL positions that tell when an unflushed batch is durable.

use tokio_postgres::{Client, Row, Statement};

use super::{ReplicationDbError, RowChange, format_lsn, parse_lsn};

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

/// `--replication-commit async`: this session's commits (the changelog batches) stop waiting
/// for their WAL flush.
pub async fn commit_without_waiting_for_flush(db: &Client) -> Result<(), ReplicationDbError> {
    db.batch_execute("SET synchronous_commit = off").await?;
    Ok(())
}

/// The server's WAL positions at one moment. An insert position read after a commit returned
/// lies past that commit's record, so a flush up to it makes the commit durable.
#[derive(Debug, Clone, Copy)]
pub struct WalPositions {
    /// Where the next record will be inserted.
    pub insert: u64,
    /// How far the WAL is on disk.
    pub flush: u64,
}

/// Reads [`WalPositions`] now.
pub async fn wal_positions(db: &Client) -> Result<WalPositions, ReplicationDbError> {
    let row = db
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
            &[],
        )
        .await?;
    WalPositions::from_row(&row, 0)
}

impl WalPositions {
    /// The insert and flush positions in columns `at` and `at + 1`, as text.
    fn from_row(row: &Row, at: usize) -> Result<Self, ReplicationDbError> {
        let position = |index: usize| -> Result<u64, ReplicationDbError> {
            let text: String = row.try_get(index)?;
            parse_lsn(&text).ok_or(ReplicationDbError::Lsn(text))
        };
        Ok(Self {
            insert: position(at)?,
            flush: position(at + 1)?,
        })
    }
}

/// The reader's batch statement, parsed and planned once per session: a batch is then one
/// Bind/Execute round trip, and the server does not plan the statement again for every batch
/// (planning it cost more than running it for the usual batch of one to a few changes).
#[derive(Debug)]
pub struct BatchWriter {
    statement: Statement,
    backend_pid: i32,
}

/// What a committed batch gave its changes.
#[derive(Debug)]
pub struct Written {
    /// The WAL positions read while the batch was written, before its own commit.
    pub wal: WalPositions,
    /// The seq given to each change, in commit order.
    pub seqs: Vec<i64>,
    /// Each change's commit time, exactly as the listener's changelog reads give it.
    pub committed_at: Vec<String>,
}

impl BatchWriter {
    /// Prepares the statement on the reader's session. Its plan is generic: only the arrays'
    /// lengths vary between batches, so there is nothing to gain from planning per batch.
    pub async fn prepare(db: &Client) -> Result<Self, ReplicationDbError> {
        use tokio_postgres::types::Type;
        db.batch_execute("SET plan_cache_mode = force_generic_plan")
            .await?;
        let backend_pid: i32 = db
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .try_get(0)?;
        let statement = db
            .prepare_typed(
                include_str!("../../../sql/replication_write_batch.sql"),
                &[
                    Type::INT8_ARRAY,
                    Type::TEXT_ARRAY,
                    Type::TEXT_ARRAY,
                    Type::TEXT_ARRAY,
                    Type::INT4_ARRAY,
                    Type::TEXT_ARRAY,
                    Type::INT8_ARRAY,
                    Type::TEXT,
                    Type::BOOL,
                ],
            )
            .await?;
        Ok(Self {
            statement,
            backend_pid,
        })
    }

    /// The process id of the session's backend: the sender its notifications carry.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Writes a batch in one transaction — the changes with fresh seqs in order, the gap, the
    /// applied position — and sends ONE notification for it. Returns what it gave the changes
    /// and the WAL positions read while it was written, before its own commit.
    ///
    /// Without a gap (every batch but a TRUNCATE's or a new slot's) that is one statement and
    /// one round trip: a change's latency from commit to clients includes this write, and each
    /// round trip on a busy machine costs a scheduling delay.
    pub async fn write(
        &self,
        db: &mut Client,
        batch: &Batch,
    ) -> Result<Written, ReplicationDbError> {
        if !batch.gap {
            return self.changes_and_position(&*db, batch).await;
        }
        let tx = db.transaction().await?;
        // A gap is never written unflushed (`--replication-commit async`): it is rare, and a
        // new slot's gap lost in a crash would not be decoded again.
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .await?;
        let written = self.changes_and_position(&tx, batch).await?;
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
        Ok(written)
    }

    /// `sql/replication_write_batch.sql`: the changes, the position and the notification.
    async fn changes_and_position(
        &self,
        db: &impl tokio_postgres::GenericClient,
        batch: &Batch,
    ) -> Result<Written, ReplicationDbError> {
        let c = BatchColumns::of(&batch.changes);
        let lsn = format_lsn(batch.lsn);
        let row = db
            .query_one(
                &self.statement,
                &[
                    &c.product_id,
                    &c.action,
                    &c.manufacturer,
                    &c.price_per_unit,
                    &c.units_available,
                    &c.product_name,
                    &c.committed_at_micros,
                    &lsn,
                    &batch.armed,
                ],
            )
            .await?;
        // array_agg over no rows is NULL.
        let seqs: Option<Vec<i64>> = row.try_get(4)?;
        let committed_at: Option<Vec<String>> = row.try_get(5)?;
        Ok(Written {
            wal: WalPositions::from_row(&row, 2)?,
            seqs: seqs.unwrap_or_default(),
            committed_at: committed_at.unwrap_or_default(),
        })
    }
}

/// A batch as one array per field (the query's `unnest` parameters).
struct BatchColumns<'a> {
    product_id: Vec<i64>,
    action: Vec<&'static str>,
    manufacturer: Vec<&'a str>,
    price_per_unit: Vec<&'a str>,
    units_available: Vec<i32>,
    product_name: Vec<&'a str>,
    committed_at_micros: Vec<i64>,
}

impl<'a> BatchColumns<'a> {
    fn of(changes: &'a [RowChange]) -> Self {
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
            columns.manufacturer.push(&change.manufacturer);
            columns.price_per_unit.push(&change.price_per_unit);
            columns.units_available.push(change.units_available);
            columns.product_name.push(&change.product_name);
            columns.committed_at_micros.push(change.committed_at_micros);
        }
        columns
    }
}
