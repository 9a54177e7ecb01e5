//! Where the changelog's rows come from (`--source`), and the replication reader's names.

use clap::{Args, ValueEnum};

/// How committed product changes reach the changelog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// A row trigger records each change and NOTIFYs (needs nothing but a login; every
    /// committing writer serializes on PostgreSQL's notify lock, ~3-4k commits/s measured).
    #[default]
    Notify,
    /// One elected instance decodes the WAL (logical replication, `pgoutput`) and writes the
    /// changelog in batches; writers never NOTIFY. Needs wal_level=logical and a role with the
    /// REPLICATION privilege that owns the tables (see README "Replication source").
    Replication,
}

/// When the replication reader's changelog batches count as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ReplicationCommit {
    /// Each batch waits for its WAL flush, like any commit: a PostgreSQL crash loses no batch.
    #[default]
    Sync,
    /// Batches commit without waiting for the flush (`synchronous_commit = off` on the reader's
    /// session only), so a change costs one WAL flush, the writer's, instead of two; the slot is
    /// confirmed only once a batch's WAL is flushed. A PostgreSQL crash or failover within
    /// about 0.6 s of a batch can lose that batch's changelog rows: the reader writes them again
    /// under new seqs and every listener sees the rewound changelog and resets its subscribers
    /// (a snapshot), never a silent gap.
    Async,
}

/// `--source` and the names of the replication slot and publication.
#[derive(Debug, Clone, Args)]
pub struct SourceSettings {
    /// Where changelog rows come from: `notify` (trigger + NOTIFY) or `replication` (WAL).
    /// Every instance on one database must use the same source.
    #[arg(long = "source", env = "ROWCAST_SOURCE", value_enum, default_value_t = Source::Notify)]
    pub source: Source,

    /// Name of the replication slot and publication (a-z, 0-9, _; at most 63). Default:
    /// `rowcast_<database>`, because slots are per server and the database tells deployments
    /// sharing a server apart.
    #[arg(long = "replication-name", env = "ROWCAST_REPLICATION_NAME")]
    pub replication_name: Option<String>,

    /// With `--source replication`: `sync` (each changelog batch waits for its WAL flush) or
    /// `async` (it does not: up to 2.7× the write rate at one writer; a PostgreSQL crash may
    /// then reset subscribers instead of losing nothing). See README "Replication source".
    #[arg(long = "replication-commit", env = "ROWCAST_REPLICATION_COMMIT", value_enum,
          default_value_t = ReplicationCommit::Sync)]
    pub replication_commit: ReplicationCommit,
}
