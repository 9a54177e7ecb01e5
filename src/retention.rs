//! Owns the changelog's retention schedule: every `--changelog-prune-interval` it calls
//! [`changelog::prune`], which cuts changes older than the retention or beyond the row cap. A
//! run that fails is logged and tried again at the next tick; until shutdown.
//!
//! The loop lives here, not in `db`, so that `db` stays queries only: it knows nothing of
//! schedules or of shutdown.
//!
//! It runs on the background pool (`db::Pools`), so pruning never waits behind clients' replays
//! or REST requests, nor they behind it.
//!
//! Imports `db` (the prune query), `config` (the schedule) and `shutdown`.

use sqlx::PgPool;

use crate::config::ChangelogSettings;
use crate::db::changelog;
use crate::shutdown::Shutdown;

/// Runs retention on `pool` (the background pool) every `settings.prune_interval` until
/// shutdown.
pub async fn run(pool: PgPool, settings: ChangelogSettings, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(settings.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match changelog::prune(&pool, settings.retention, settings.max_rows).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "changelog retention"),
            Err(err) => tracing::warn!(cause = %err, "changelog retention failed; will retry"),
        }
    }
}
