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
}
