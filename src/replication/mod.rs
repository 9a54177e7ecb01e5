//! `--source replication`: the elected reader that turns the WAL of `products` into changelog
//! rows, so that user transactions never NOTIFY (PostgreSQL serializes every notifying commit).
//!
//! **One reader per database.** Every instance runs this task; the one whose session holds the
//! advisory lock [`db::replication::READER_LOCK`] leads, the others retry every health interval
//! and take over when its session ends. The leader's session also writes the changelog, so a
//! leader that lost its session (and with it the lock) can commit nothing more.
//!
//! **Every instance still delivers through its LISTEN task** (`listener`): the reader writes
//! each batch of transactions in one transaction — fresh seqs in commit order, the slot position
//! it reached — and sends ONE notification for it; each instance's listener reads the
//! changelog after its position, exactly as in notify mode. Seqs, resume, snapshots and resets
//! are therefore the same in both modes, and identical on every instance. The leader's own
//! listener is handed each committed batch instead (`listener::HandoffSender`: the seqs and
//! commit times the statement returned), which saves it the read.
//!
//! **Exactly once.** The slot is confirmed only up to what a committed batch holds (and, while
//! nothing is pending, up to every keepalive's position, so WAL does not pile up when only
//! other tables are written). After a crash the server resends from the confirmed position;
//! transactions that end at or before `changelog_source.applied_lsn` (written with the rows)
//! are skipped.
//!
//! **Never silent.** A missing or invalidated slot (`wal_status = lost`, e.g. past
//! `max_slot_wal_keep_size`) or a TRUNCATE (whose rows are not in the WAL) moves the changelog
//! horizon past a fresh seq: every listener re-bases and its subscribers get `reset` and a
//! snapshot. A lost slot is dropped and created again.
//!
//! The switch from the trigger (migration 0007): the leader creates the slot first, then
//! switches in one commit that disables the triggers and emits a marker message; products
//! changes decoded before the marker were recorded by the trigger and are skipped.
//!
//! Imports `config`, `db` (`db::replication`, `db::PgTarget`, `db::changelog`'s row type),
//! `product`, `metrics`, `shutdown`, and `listener`'s hand-off, its one way downstream (the
//! distributor is untouched by the source).

mod decoder;
mod durable;
pub mod pgoutput;

use std::time::Duration;

use futures_util::FutureExt;
use metrics::Gauge;
use pgwire_replication::{Lsn, ReplicationClient};
use tokio_postgres::Client;

use crate::config::{ListenerSettings, ReplicationCommit};
use crate::db::PgTarget;
use crate::db::changelog::LoggedChange;
use crate::db::replication::{
    self as sql, Batch, BatchWriter, ReplicationDbError, ReplicationNames, RowChange, Written,
};
use crate::listener::{Handoff, HandoffSender};
use crate::metrics::Metrics;
use crate::product::{Action, Change, Product, ProductId};
use crate::shutdown::Shutdown;
use decoder::Decoder;
use durable::DurableConfirm;

/// First retry delay after a failure; doubles up to `--listener-max-backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// How often the reader reports its position to the server while it has something to confirm:
/// short, so a quiet stream's slot advances within a second (pg_recvlogical's 10 s would keep
/// that much more WAL and make the slot look stuck on dashboards).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// With `--replication-commit async`, how often the reader asks how far the WAL is flushed
/// while a confirmation waits for it (the WAL writer flushes within 3 × `wal_writer_delay`,
/// 600 ms by default, usually far sooner).
const FLUSH_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Events buffered between the stream's socket and this task.
const STREAM_BUFFER: usize = 4096;

/// Why one leadership (or attempt at it) ended.
#[derive(Debug, thiserror::Error)]
enum ReaderError {
    #[error(transparent)]
    Db(#[from] ReplicationDbError),
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    #[error("the replication stream ended")]
    StreamEnded,
    #[error("undecodable pgoutput message: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("a products row in the stream is unusable: {0}")]
    Row(String),
    #[error("the replication slot was lost (wal_status=lost); it is created again")]
    SlotLost,
}

/// The reader's gauges in `/metrics`.
#[derive(Debug, Clone)]
struct Gauges {
    leader: Gauge,
    lag_bytes: Gauge,
    retained_bytes: Gauge,
    slot_resets: metrics::Counter,
}

/// The reader task's inputs.
#[derive(Debug)]
pub struct Reader {
    target: PgTarget,
    names: ReplicationNames,
    settings: ListenerSettings,
    commit: ReplicationCommit,
    handoff: HandoffSender,
    gauges: Gauges,
}

impl Reader {
    /// Prepares the task; nothing connects until [`Self::run`].
    pub fn new(
        target: PgTarget,
        names: ReplicationNames,
        settings: ListenerSettings,
        commit: ReplicationCommit,
        handoff: HandoffSender,
        metrics: &Metrics,
    ) -> Self {
        Self {
            target,
            names,
            settings,
            commit,
            handoff,
            gauges: Gauges {
                leader: metrics.gauge("rowcast_replication_leader", &[]),
                lag_bytes: metrics.gauge("rowcast_replication_slot_lag_bytes", &[]),
                retained_bytes: metrics.gauge("rowcast_replication_slot_retained_wal_bytes", &[]),
                slot_resets: metrics.counter("rowcast_replication_slot_resets_total", &[]),
            },
        }
    }

    /// Runs until shutdown: try to lead; while leading, stream; on failure back off and retry.
    pub async fn run(self, shutdown: Shutdown) {
        let mut backoff = INITIAL_BACKOFF;
        // A follower keeps its session between attempts (one idle connection, not one per
        // interval); a leader's ends with its leadership.
        let mut follower = None;
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.lead_once(&mut follower) => outcome,
            };
            self.gauges.leader.set(0.0);
            let delay = match outcome {
                Ok(()) => {
                    backoff = INITIAL_BACKOFF;
                    self.settings.health_interval
                }
                Err(err) => {
                    tracing::warn!(cause = %err, retry_in = ?backoff, "replication reader stopped");
                    let delay = backoff;
                    backoff = (backoff * 2).min(self.settings.max_backoff);
                    delay
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt: Ok(()) if another instance leads (the session is kept in `follower` for
    /// the next attempt); else streams until something fails.
    async fn lead_once(&self, follower: &mut Option<sql::Session>) -> Result<(), ReaderError> {
        let mut session = match follower.take() {
            Some(session) => session,
            None => sql::session(&self.target, "rowcast-replication").await?,
        };
        if !sql::try_lead(&session.client).await? {
            *follower = Some(session);
            return Ok(());
        }
        self.gauges.leader.set(1.0);
        tracing::info!(slot = self.names.slot(), "leading the replication reader");
        let writer = BatchWriter::prepare(&session.client).await?;
        let start = prepare(&mut session.client, &writer, &self.names, &self.gauges).await?;
        self.handoff.leading(Some(writer.backend_pid()));
        let ended = self.stream(&mut session.client, &writer, start).await;
        // Before the session (and its pid) goes: a notification from another backend that
        // gets the pid later must not be taken for this leader's.
        self.handoff.leading(None);
        ended
        // Dropping the session closes its connection, and the server releases the lock at once.
    }

    async fn stream(
        &self,
        conn: &mut Client,
        writer: &BatchWriter,
        start: Start,
    ) -> Result<(), ReaderError> {
        let config = self
            .target
            .replication_config(self.names.slot(), self.names.publication())
            .with_start_lsn(Lsn(start.confirmed))
            .with_status_interval(STATUS_INTERVAL)
            .with_wakeup_interval(self.settings.health_interval)
            .with_buffer_size(STREAM_BUFFER)
            .with_application_name("rowcast-replication-stream");
        let mut client = ReplicationClient::connect(config).await?;
        let mut decoder = Decoder::new(start.armed, start.applied_lsn);
        let mut health = tokio::time::interval(self.settings.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let unflushed = self.commit == ReplicationCommit::Async;
        if unflushed {
            sql::commit_without_waiting_for_flush(conn).await?;
        }
        let mut durable = DurableConfirm::default();
        let mut flush_probe = tokio::time::interval(FLUSH_PROBE_INTERVAL);
        flush_probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = client.recv() => {
                    decoder.handle(event?.ok_or(ReaderError::StreamEnded)?)?;
                    // Everything already waiting joins this batch (bounded).
                    while !decoder.batch_full() {
                        match client.recv().now_or_never() {
                            Some(event) => decoder.handle(event?.ok_or(ReaderError::StreamEnded)?)?,
                            None => break,
                        }
                    }
                    if decoder.ready_to_write() {
                        let written = writer.write(conn, &decoder.batch).await?;
                        let wal = written.wal;
                        self.handoff.send(if decoder.batch.gap {
                            Handoff::Read
                        } else {
                            handed_over(std::mem::take(&mut decoder.batch.changes), written)
                        });
                        decoder.written();
                        if unflushed {
                            // Read by this batch's statement: after the previous commit, before
                            // this one.
                            durable.bounded(wal.insert);
                            durable.committed();
                            if let Some(lsn) = durable.flushed(wal.flush) {
                                client.update_applied_lsn(Lsn(lsn));
                            }
                        }
                    }
                    if let Some(lsn) = decoder.confirm.take().and_then(|lsn| durable.offer(lsn)) {
                        client.update_applied_lsn(Lsn(lsn));
                    }
                }
                _ = flush_probe.tick(), if durable.waiting() => {
                    let wal = sql::wal_positions(conn).await?;
                    durable.bounded(wal.insert);
                    if let Some(lsn) = durable.flushed(wal.flush) {
                        client.update_applied_lsn(Lsn(lsn));
                    }
                }
                _ = health.tick() => {
                    // Also proves the leader's session (and so its lock) is alive.
                    match sql::slot_state(conn, &self.names).await? {
                        Some(slot) if !slot.is_lost() => report(&self.gauges, &slot),
                        _ => return Err(ReaderError::SlotLost),
                    }
                }
            }
        }
    }
}

/// A committed batch as the changelog holds it: the decoded rows with the seqs and commit times
/// the statement gave them. Anything unexpected asks the listener to read instead.
fn handed_over(rows: Vec<RowChange>, written: Written) -> Handoff {
    if rows.len() != written.seqs.len() || rows.len() != written.committed_at.len() {
        return Handoff::Read;
    }
    let mut changes = Vec::with_capacity(rows.len());
    for ((row, seq), committed_at) in rows.into_iter().zip(written.seqs).zip(written.committed_at) {
        let Some(action) = Action::from_name(row.action) else {
            return Handoff::Read;
        };
        let (Some(product_id), Ok(seq)) = (ProductId::new(row.product_id), u64::try_from(seq))
        else {
            return Handoff::Read;
        };
        changes.push(LoggedChange {
            change: Change {
                seq,
                action,
                product: Product {
                    product_id,
                    manufacturer: row.manufacturer,
                    price_per_unit: row.price_per_unit,
                    units_available: row.units_available,
                    product_name: row.product_name,
                },
            },
            committed_at,
            versions: 1,
        });
    }
    Handoff::Committed(changes)
}

/// Where a leadership starts streaming.
struct Start {
    confirmed: u64,
    armed: bool,
    applied_lsn: Option<u64>,
}

/// Publication, slot and switch, in that order (module doc); a lost or missing slot after the
/// switch is replaced and announced as a gap.
async fn prepare(
    conn: &mut Client,
    writer: &BatchWriter,
    names: &ReplicationNames,
    gauges: &Gauges,
) -> Result<Start, ReaderError> {
    sql::session_wal_level(conn).await?;
    sql::ensure_publication(conn, names).await?;
    let state = sql::source_state(conn).await?;
    let slot = sql::slot_state(conn, names).await?;
    let usable = slot.as_ref().is_some_and(|slot| !slot.is_lost());
    if !usable {
        if slot.is_some() {
            sql::drop_slot(conn, names).await?;
        }
        sql::create_slot(conn, names).await?;
        if state.replication {
            // Changes since the old slot's position are gone: announce the gap, then stream
            // from the new slot, armed (the marker is behind it).
            gauges.slot_resets.increment(1);
            tracing::warn!(
                slot = names.slot(),
                "the replication slot was missing or lost; created a new one, \
                 every subscriber gets a reset"
            );
            let slot = sql::slot_state(conn, names)
                .await?
                .ok_or(ReaderError::SlotLost)?;
            writer
                .write(
                    conn,
                    &Batch {
                        gap: true,
                        armed: true,
                        lsn: slot.confirmed_flush_lsn.unwrap_or(0),
                        ..Batch::default()
                    },
                )
                .await?;
        }
    }
    if sql::switch_on(conn).await? {
        tracing::info!("the changelog is now written by the replication reader");
    }
    let state = sql::source_state(conn).await?;
    let slot = sql::slot_state(conn, names)
        .await?
        .ok_or(ReaderError::SlotLost)?;
    report(gauges, &slot);
    Ok(Start {
        confirmed: slot.confirmed_flush_lsn.unwrap_or(0),
        armed: state.armed,
        applied_lsn: state.applied_lsn,
    })
}

fn report(gauges: &Gauges, slot: &sql::SlotState) {
    // Gauges are f64; WAL sizes stay far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    {
        gauges.lag_bytes.set(slot.lag_bytes as f64);
        gauges.retained_bytes.set(slot.retained_bytes as f64);
    }
}

/// `rowcast migrate --source replication`: the publication always; the slot and the switch
/// when no instance leads (else the leader does them).
pub async fn prepare_for_migrate(
    target: &PgTarget,
    names: &ReplicationNames,
) -> Result<(), ReplicationDbError> {
    let mut session = sql::session(target, "rowcast-migrate").await?;
    sql::session_wal_level(&session.client).await?;
    sql::ensure_publication(&session.client, names).await?;
    if sql::try_lead(&session.client).await? {
        if sql::slot_state(&session.client, names).await?.is_none() {
            sql::create_slot(&session.client, names).await?;
        }
        // The slot exists now, so the switch's marker is in its stream. (A slot that goes
        // missing after the switch is the reader's to replace and announce.)
        sql::switch_on(&mut session.client).await?;
    }
    Ok(())
}

/// `rowcast replication drop`: back to the trigger (a reset for subscribers), then the slot and
/// the publication go.
pub async fn drop_all(
    target: &PgTarget,
    names: &ReplicationNames,
) -> Result<(), ReplicationDbError> {
    let mut session = sql::session(target, "rowcast-replication-drop").await?;
    if sql::switch_off(&mut session.client).await? {
        tracing::info!("the changelog is written by the trigger again; subscribers get a reset");
    }
    sql::drop_slot(&session.client, names).await?;
    sql::drop_publication(&session.client, names).await?;
    tracing::info!(
        slot = names.slot(),
        "replication slot and publication dropped"
    );
    Ok(())
}
