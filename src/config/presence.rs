//! Presence settings: how often an instance shares its watcher counts through PostgreSQL, and
//! how long the counts of an instance that stopped refreshing them (it died) still count.

use std::time::Duration;

use clap::Args;

use super::parse_duration;

/// Counts of an instance that has not refreshed its heartbeat for this long are ignored and then
/// deleted: a dead instance's watchers leave the totals within it. 5 s is five heartbeats (one a
/// second), so a busy database or a GC-like pause of a few hundred milliseconds never drops a
/// live instance's watchers, while a dead one's linger only briefly.
pub(super) const DEFAULT_PRESENCE_EXPIRY: &str = "5s";

/// Presence (watcher counts summed over every instance on the database).
#[derive(Debug, Clone, Copy, Args)]
pub struct PresenceSettings {
    /// An instance's watcher counts stop counting this long after its last heartbeat (it died
    /// without removing them). Heartbeats go out five times per expiry.
    #[arg(long = "presence-expiry", env = "ROWCAST_PRESENCE_EXPIRY",
          default_value = DEFAULT_PRESENCE_EXPIRY, value_parser = parse_presence_expiry)]
    pub expiry: Duration,
}

impl PresenceSettings {
    /// Time between heartbeats: five per expiry, so a few late ones never expire a live
    /// instance.
    pub fn heartbeat(&self) -> Duration {
        self.expiry / 5
    }
}

/// At least one second: shorter would expire live instances under ordinary database latency.
fn parse_presence_expiry(text: &str) -> Result<Duration, String> {
    let expiry = parse_duration(text)?;
    if expiry < Duration::from_secs(1) {
        return Err(format!("{text:?} must be at least 1s"));
    }
    Ok(expiry)
}
