//! The SQL side of `--source replication`: publication and slot, the switch between the row
//! trigger and the reader (migration 0007 says why it is one commit), the reader's batched
//! changelog writes (`batch`) and the slot's health. The stream itself belongs to the top-level `replication` module.
//!
//! Names: the publication and the slot share one name ([`ReplicationNames`]), by default
//! `rowcast_<database>`: slots are per cluster, so the database's name keeps two deployments
//! on one server (and parallel tests) apart; `--replication-name` overrides it.

use sqlx::PgExecutor;
use tokio_postgres::Client;

use super::PgTarget;

mod batch;

pub use batch::{
    Batch, BatchWriter, WalPositions, Written, commit_without_waiting_for_flush, wal_positions,
};

/// Advisory lock key of the elected reader: `(1919906675, 2)`, beside the trigger's commit
/// lock `(1919906675, 1)` (migration 0003). Held by the reader's session for as long as it
/// leads; PostgreSQL releases it when that session ends, however it ends.
pub const READER_LOCK: (i32, i32) = (1_919_906_675, 2);

/// A batch is written when nothing more is waiting, or at this many changes…
pub const BATCH_ROWS: usize = 1000;
/// …or this many bytes of text (rows can be ~1 MB), like a changelog page (`changelog`).
pub const BATCH_BYTES: usize = 4 << 20;

/// The prefix of the logical message that marks the switch (sql/replication_switch_on.sql).
pub const MARKER_PREFIX: &str = "rowcast";
/// Its content.
pub const MARKER_CONTENT: &[u8] = b"source=replication";

/// A failure of the replication SQL.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationDbError {
    /// The database refused or did not answer (a pool's query).
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    /// The database refused or did not answer (the reader's session).
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The session's TLS was refused; the message says why in plain words.
    #[error("cannot connect to the database over TLS: {0}")]
    Tls(String),
    /// The slot stayed in use while it was to be dropped.
    #[error("the replication slot stayed in use; stop the instances that run --source replication")]
    SlotInUse,
    /// `wal_level` is not `logical`: no slot can be created.
    #[error(
        "wal_level is '{0}': --source replication needs wal_level=logical on the server \
         (postgresql.conf, then a restart)"
    )]
    WalLevel(String),
    /// The name cannot be used for a slot.
    #[error(
        "replication name '{0}' is not usable: 1 to 63 characters of a-z, 0-9 and _ are allowed"
    )]
    BadName(String),
    /// The database was switched to replication and this instance runs `--source notify`.
    #[error(
        "this database's changelog is written by the replication reader (an instance ran with \
         --source replication); run every instance with --source replication, or run \
         `rowcast replication drop` to go back to notify"
    )]
    InReplicationMode,
    /// The server answered a WAL position that is not one.
    #[error("the server reported an unreadable WAL position '{0}'")]
    Lsn(String),
}

/// The publication's and the slot's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationNames {
    name: String,
}

impl ReplicationNames {
    /// The configured name, or `rowcast_<database>` with every other character than a-z, 0-9
    /// and `_` replaced by `_` and cut at 63 bytes.
    pub fn new(configured: Option<&str>, database: &str) -> Result<Self, ReplicationDbError> {
        if let Some(name) = configured {
            let valid = !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            return if valid {
                Ok(Self {
                    name: name.to_owned(),
                })
            } else {
                Err(ReplicationDbError::BadName(name.to_owned()))
            };
        }
        let mut name: String = format!("rowcast_{database}")
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        name.truncate(63);
        Ok(Self { name })
    }

    /// The slot's (and publication's) name.
    pub fn slot(&self) -> &str {
        &self.name
    }

    /// The publication's name.
    pub fn publication(&self) -> &str {
        &self.name
    }
}

/// What the changelog_source row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceState {
    /// True once the switch to the reader has committed.
    pub replication: bool,
    /// True once the reader decoded the switch's marker (or started on a new slot after it).
    pub armed: bool,
    /// The end of the last transaction the reader wrote to the changelog.
    pub applied_lsn: Option<u64>,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// `reserved`, `extended`, `unreserved` or `lost` (`None` on servers that do not say).
    pub wal_status: Option<String>,
    /// The walsender streaming from it, if any.
    pub active_pid: Option<i32>,
    /// The position the server will resume from.
    pub confirmed_flush_lsn: Option<u64>,
    /// WAL bytes not yet confirmed.
    pub lag_bytes: i64,
    /// WAL bytes the server keeps for the slot.
    pub retained_bytes: i64,
}

impl SlotState {
    /// The slot can never stream again.
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// One product row of the stream, as the reader writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChange {
    /// `INSERT`, `UPDATE` or `DELETE`.
    pub action: &'static str,
    /// The row's id.
    pub product_id: i64,
    /// `manufacturer`, as the column's text.
    pub manufacturer: String,
    /// `price_per_unit`, as the column's text.
    pub price_per_unit: String,
    /// `units_available`.
    pub units_available: i32,
    /// `product_name`, as the column's text.
    pub product_name: String,
    /// The commit time, microseconds since 2000-01-01 UTC (PostgreSQL's epoch).
    pub committed_at_micros: i64,
}

impl RowChange {
    /// Bytes of text this change holds (to bound batches).
    pub fn text_bytes(&self) -> usize {
        self.manufacturer.len() + self.price_per_unit.len() + self.product_name.len() + 64
    }
}

/// Parses PostgreSQL's `X/Y` LSN text.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    Some((hi << 32) | lo)
}

/// Formats an LSN as PostgreSQL's `X/Y` text.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The reader's (or a command's) own session: a tokio-postgres connection from the same parsed
/// URL and TLS rules as the pools, its driver spawned. One session, not a pool: the advisory
/// lock and every changelog write of a leader live and die with it. (tokio-postgres rather than
/// a sqlx `PgConnection`: sqlx's executor impls make a spawned task that reuses one borrowed
/// connection across several queries fail the `Send` check, rust-lang/rust#64552.)
pub async fn session(
    target: &PgTarget,
    application_name: &str,
) -> Result<Session, ReplicationDbError> {
    let mut config = target.listen_config();
    config.application_name(application_name);
    let (client, connection) =
        config.connect(target.connector()).await.map_err(|err| {
            match target.describe_tls_failure(&err) {
                Some(message) => ReplicationDbError::Tls(message),
                None => ReplicationDbError::Postgres(err),
            }
        })?;
    let driver = tokio::spawn(async move {
        // Ends when the client is dropped or the connection fails; the client then reports it.
        let _ = connection.await;
    });
    Ok(Session {
        client,
        _driver: DropAbort(driver.abort_handle()),
    })
}

/// A session of [`session`]; dropping it ends the connection.
#[derive(Debug)]
pub struct Session {
    /// The connection's client.
    pub client: tokio_postgres::Client,
    _driver: DropAbort,
}

#[derive(Debug)]
struct DropAbort(tokio::task::AbortHandle);

impl Drop for DropAbort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fails unless the server runs with `wal_level=logical`.
pub async fn check_wal_level(db: impl PgExecutor<'_>) -> Result<(), ReplicationDbError> {
    let level: String = sqlx::query_scalar("SHOW wal_level").fetch_one(db).await?;
    if level == "logical" {
        Ok(())
    } else {
        Err(ReplicationDbError::WalLevel(level))
    }
}

/// Fails if the reader writes this database's changelog (for `--source notify` at start).
pub async fn ensure_notify_mode(db: impl PgExecutor<'_>) -> Result<(), ReplicationDbError> {
    let replication: bool =
        sqlx::query_scalar("SELECT source = 'replication' FROM changelog_source")
            .fetch_one(db)
            .await?;
    if replication {
        return Err(ReplicationDbError::InReplicationMode);
    }
    Ok(())
}

/// Fails unless the server runs with `wal_level=logical` (on a session).
pub async fn session_wal_level(db: &Client) -> Result<(), ReplicationDbError> {
    let level: String = db.query_one("SHOW wal_level", &[]).await?.try_get(0)?;
    if level == "logical" {
        Ok(())
    } else {
        Err(ReplicationDbError::WalLevel(level))
    }
}

/// Takes the reader's advisory lock if free; true if this session now leads.
pub async fn try_lead(db: &Client) -> Result<bool, ReplicationDbError> {
    Ok(db
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&READER_LOCK.0, &READER_LOCK.1],
        )
        .await?
        .try_get(0)?)
}

/// Creates the publication for `products` unless it exists (needs ownership of `products`).
pub async fn ensure_publication(
    db: &Client,
    names: &ReplicationNames,
) -> Result<(), ReplicationDbError> {
    let exists: bool = db
        .query_one(
            "SELECT exists(SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&names.publication()],
        )
        .await?
        .try_get(0)?;
    if !exists {
        // The name was checked to be [a-z0-9_]: safe to splice.
        db.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE products",
            names.publication()
        ))
        .await?;
    }
    Ok(())
}

/// What changelog_source says.
pub async fn source_state(db: &Client) -> Result<SourceState, ReplicationDbError> {
    let row = db
        .query_one(
            "SELECT source = 'replication', armed, applied_lsn::text FROM changelog_source",
            &[],
        )
        .await?;
    Ok(SourceState {
        replication: row.try_get(0)?,
        armed: row.try_get(1)?,
        applied_lsn: row
            .try_get::<_, Option<String>>(2)?
            .as_deref()
            .and_then(parse_lsn),
    })
}

/// The slot's state, or None if it does not exist.
pub async fn slot_state(
    db: &Client,
    names: &ReplicationNames,
) -> Result<Option<SlotState>, ReplicationDbError> {
    let Some(row) = db
        .query_opt(
            include_str!("../../../sql/replication_slot_state.sql"),
            &[&names.slot()],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(SlotState {
        wal_status: row.try_get("wal_status")?,
        active_pid: row.try_get("active_pid")?,
        confirmed_flush_lsn: row
            .try_get::<_, Option<String>>("confirmed_flush_lsn")?
            .as_deref()
            .and_then(parse_lsn),
        lag_bytes: row.try_get("lag_bytes")?,
        retained_bytes: row.try_get("retained_bytes")?,
    }))
}

/// Drops the slot (ending the walsender that streams from it first), if it exists.
pub async fn drop_slot(db: &Client, names: &ReplicationNames) -> Result<(), ReplicationDbError> {
    for _ in 0..50 {
        let Some(state) = slot_state(db, names).await? else {
            return Ok(());
        };
        if let Some(pid) = state.active_pid {
            db.query_one("SELECT pg_terminate_backend($1)", &[&pid])
                .await?;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        match db
            .query_one("SELECT pg_drop_replication_slot($1)", &[&names.slot()])
            .await
        {
            Ok(_) => return Ok(()),
            // Taken again between the look and the drop (a reader reconnecting): try again.
            Err(err) if err.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
    Err(ReplicationDbError::SlotInUse)
}

/// Creates the slot (pgoutput). Must run outside a transaction.
pub async fn create_slot(db: &Client, names: &ReplicationNames) -> Result<(), ReplicationDbError> {
    db.query_one(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&names.slot()],
    )
    .await?;
    Ok(())
}

/// Switches the changelog from the trigger to the reader, if it is not already (one
/// transaction, sql/replication_switch_on.sql). Returns true if it switched now.
pub async fn switch_on(db: &mut Client) -> Result<bool, ReplicationDbError> {
    switch(
        db,
        true,
        include_str!("../../../sql/replication_switch_on.sql"),
    )
    .await
}

/// Switches the changelog back to the trigger, announcing a gap (sql/replication_switch_off.sql).
/// Returns true if it switched now.
pub async fn switch_off(db: &mut Client) -> Result<bool, ReplicationDbError> {
    switch(
        db,
        false,
        include_str!("../../../sql/replication_switch_off.sql"),
    )
    .await
}

async fn switch(
    db: &mut Client,
    to_replication: bool,
    sql: &str,
) -> Result<bool, ReplicationDbError> {
    let tx = db.transaction().await?;
    let replication: bool = tx
        .query_one(
            "SELECT source = 'replication' FROM changelog_source FOR UPDATE",
            &[],
        )
        .await?
        .try_get(0)?;
    if replication == to_replication {
        return Ok(false);
    }
    tx.batch_execute(sql).await?;
    tx.commit().await?;
    Ok(true)
}

/// Drops the publication if it exists.
pub async fn drop_publication(
    db: &Client,
    names: &ReplicationNames,
) -> Result<(), ReplicationDbError> {
    db.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {}",
        names.publication()
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_follow_the_database() {
        let names = ReplicationNames::new(None, "Shop-DB").unwrap();
        assert_eq!(names.slot(), "rowcast_shop_db");
        let long = ReplicationNames::new(None, &"x".repeat(100)).unwrap();
        assert_eq!(long.slot().len(), 63);
        assert!(ReplicationNames::new(Some("Bad Name"), "db").is_err());
        assert_eq!(
            ReplicationNames::new(Some("edge_1"), "db").unwrap().slot(),
            "edge_1"
        );
    }

    #[test]
    fn lsns_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nonsense"), None);
    }
}
