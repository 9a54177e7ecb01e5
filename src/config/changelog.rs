//! How long committed changes are kept (`--changelog-*`).

use std::time::Duration;

use clap::Args;

use super::parse_duration;

/// Changes are kept this long for resumes: long enough for a laptop's overnight sleep.
pub const DEFAULT_CHANGELOG_RETENTION: &str = "24h";
/// And at most this many, so a write burst cannot fill the disk (~1 KB per change).
pub const DEFAULT_CHANGELOG_MAX_ROWS: u64 = 1_000_000;
/// How often retention runs.
pub const DEFAULT_CHANGELOG_PRUNE_INTERVAL: &str = "10s";

/// How long committed changes are kept for resumes and catch-up.
#[derive(Debug, Clone, Copy, Args)]
pub struct ChangelogSettings {
    /// Keep changes at least this long (e.g. 24h, 30m).
    #[arg(long = "changelog-retention", env = "ROWCAST_CHANGELOG_RETENTION",
          default_value = DEFAULT_CHANGELOG_RETENTION, value_parser = parse_duration)]
    pub retention: Duration,

    /// Keep at most this many changes.
    #[arg(long = "changelog-max-rows", env = "ROWCAST_CHANGELOG_MAX_ROWS",
          default_value_t = DEFAULT_CHANGELOG_MAX_ROWS,
          value_parser = clap::value_parser!(u64).range(1..=i64::MAX as u64))]
    pub max_rows: u64,

    /// Time between retention runs.
    #[arg(long = "changelog-prune-interval", env = "ROWCAST_CHANGELOG_PRUNE_INTERVAL",
          default_value = DEFAULT_CHANGELOG_PRUNE_INTERVAL, value_parser = parse_duration)]
    pub prune_interval: Duration,
}
