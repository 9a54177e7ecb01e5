//! Configuration: every setting rowcast has, parsed once (flags or `ROWCAST_*` environment
//! variables) and passed down. Each default is a `DEFAULT_*` const with the reason for its value.
//! Imports nothing of ours; nothing else reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Loopback only: a fresh install must not expose an unauthenticated write API to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Outside the invoking user's home, because when rowcast runs as root the cluster runs as the
/// `postgres` user, who cannot enter /root; /var/tmp survives reboots, unlike /tmp.
pub const DEFAULT_EMBEDDED_DATA_DIR: &str = "/var/tmp/rowcast";
/// Enough for REST concurrency on a small machine; Postgres's default max_connections is 100.
pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 16;
/// Messages queued for one WebSocket before it counts as too slow: room for a burst of
/// thousands of changes, while a stuck client costs at most this many shared frame handles.
pub const DEFAULT_OUTBOX_CAPACITY: usize = 4096;
/// Per-connection subscription cap: the dashboard-sized use (a few thousand ids) fits many times,
/// while one connection cannot grow the maps without bound.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 100_000;
/// Largest client frame: a subscribe of 20 000 ids fits; larger is a client bug or abuse.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 * 1024;
/// Small socket read buffer: tungstenite zero-fills its read buffer per connection, and the
/// default 128 KiB made idle connections cost ~135 KB each; commands are small.
pub const DEFAULT_WS_READ_BUFFER_BYTES: usize = 1024;
/// Frames are flushed as soon as the writer has nothing more queued, so the buffer only has to
/// hold one batch; a small value keeps idle connections cheap.
pub const DEFAULT_WS_WRITE_BUFFER_BYTES: usize = 8 * 1024;
/// Browsers and proxies commonly drop idle connections after 60 s; pinging every 30 s keeps them
/// open and finds dead peers.
pub const DEFAULT_HEARTBEAT_INTERVAL: &str = "30s";
/// A live peer answers a ping within milliseconds; 10 s tolerates a congested mobile link.
pub const DEFAULT_HEARTBEAT_TIMEOUT: &str = "10s";
/// REST bodies are single products; 1 MiB leaves room for large names and stops memory abuse.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// How often the LISTEN connection proves it is alive with a query: a hung backend raises no
/// error by itself, so this bounds how long a dead connection goes unnoticed.
pub const DEFAULT_LISTENER_HEALTH_INTERVAL: &str = "2s";
/// How long that query may take before the connection counts as dead.
pub const DEFAULT_LISTENER_HEALTH_TIMEOUT: &str = "3s";
/// Longest wait between LISTEN reconnect attempts, so recovery after an outage is quick.
pub const DEFAULT_LISTENER_MAX_BACKOFF: &str = "5s";
/// Changes are kept this long for resumes: long enough for a laptop's overnight sleep.
pub const DEFAULT_CHANGELOG_RETENTION: &str = "24h";
/// And at most this many, so a write burst cannot fill the disk (~1 KB per change).
pub const DEFAULT_CHANGELOG_MAX_ROWS: u64 = 1_000_000;
/// How often retention runs.
pub const DEFAULT_CHANGELOG_PRUNE_INTERVAL: &str = "10s";

/// How long shutdown waits for sessions and requests to finish before exiting anyway.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "5s";

/// rowcast: pushes committed Postgres product changes to browsers over WebSockets.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings shared by all commands.
    #[command(flatten)]
    pub config: Config,
}

/// The commands of the binary.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
}

/// What happens when a client reads more slowly than its changes arrive and its queue fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowClientPolicy {
    /// Drop superseded versions: keep only the latest pending change per product. The client
    /// converges to the current state; memory is bounded by its subscription count.
    Conflate,
    /// Disconnect the client with close 1013 (Try Again Later).
    Disconnect,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Every setting of a running rowcast.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the HTTP/WebSocket server binds (port 0 picks a free port).
    #[arg(long, env = "ROWCAST_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// PostgreSQL to use, e.g. postgres://user:pass@host/db. Without it rowcast starts a private
    /// cluster of its own (the embedded default) in --embedded-data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where the embedded cluster keeps its data (kept across runs); must be reachable by the
    /// `postgres` user when rowcast runs as root.
    #[arg(long, env = "ROWCAST_EMBEDDED_DATA_DIR", default_value = DEFAULT_EMBEDDED_DATA_DIR)]
    pub embedded_data_dir: PathBuf,

    /// Size of the REST connection pool.
    #[arg(long, env = "ROWCAST_DB_MAX_CONNECTIONS", default_value_t = DEFAULT_DB_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub db_max_connections: u32,

    /// Per-session limits.
    #[command(flatten)]
    pub limits: Limits,

    /// WebSocket keep-alive.
    #[command(flatten)]
    pub heartbeat: Heartbeat,

    /// LISTEN connection health checks and reconnects.
    #[command(flatten)]
    pub listener: ListenerSettings,

    /// Changelog retention (resume window).
    #[command(flatten)]
    pub changelog: ChangelogSettings,

    /// How long shutdown waits for open sessions and requests (e.g. 5s, 500ms).
    #[arg(long, env = "ROWCAST_SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE,
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log output format.
    #[arg(long, env = "ROWCAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Limits that bound what one client can make the server hold.
#[derive(Debug, Clone, Copy, Args)]
pub struct Limits {
    /// Messages queued for one WebSocket before it is disconnected as too slow (close 1013).
    #[arg(long, env = "ROWCAST_OUTBOX_CAPACITY", default_value_t = DEFAULT_OUTBOX_CAPACITY,
          value_parser = parse_positive)]
    pub outbox_capacity: usize,

    /// What to do when a client's queue is full: conflate (keep the latest change per product)
    /// or disconnect (close 1013).
    #[arg(long, env = "ROWCAST_SLOW_CLIENT_POLICY", value_enum, default_value_t = SlowClientPolicy::Conflate)]
    pub slow_client_policy: SlowClientPolicy,

    /// Most products one WebSocket may subscribe to.
    #[arg(long, env = "ROWCAST_MAX_SUBSCRIPTIONS", default_value_t = DEFAULT_MAX_SUBSCRIPTIONS,
          value_parser = parse_positive)]
    pub max_subscriptions: usize,

    /// Largest WebSocket message a client may send, in bytes (larger: close 1009).
    #[arg(long, env = "ROWCAST_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES,
          value_parser = parse_positive)]
    pub max_frame_bytes: usize,

    /// WebSocket read buffer per connection, in bytes.
    #[arg(long, env = "ROWCAST_WS_READ_BUFFER_BYTES", default_value_t = DEFAULT_WS_READ_BUFFER_BYTES,
          value_parser = parse_positive)]
    pub ws_read_buffer_bytes: usize,

    /// WebSocket write buffer per connection, in bytes.
    #[arg(long, env = "ROWCAST_WS_WRITE_BUFFER_BYTES", default_value_t = DEFAULT_WS_WRITE_BUFFER_BYTES,
          value_parser = parse_positive)]
    pub ws_write_buffer_bytes: usize,

    /// Largest REST request body, in bytes (larger: 413).
    #[arg(long, env = "ROWCAST_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES,
          value_parser = parse_positive)]
    pub max_body_bytes: usize,
}

/// Server-side pings that keep connections open and detect dead peers.
#[derive(Debug, Clone, Copy, Args)]
pub struct Heartbeat {
    /// Time between pings to each WebSocket (e.g. 30s).
    #[arg(long = "heartbeat-interval", env = "ROWCAST_HEARTBEAT_INTERVAL",
          default_value = DEFAULT_HEARTBEAT_INTERVAL, value_parser = parse_duration)]
    pub interval: Duration,

    /// How long a peer may take to answer a ping before it is disconnected.
    #[arg(long = "heartbeat-timeout", env = "ROWCAST_HEARTBEAT_TIMEOUT",
          default_value = DEFAULT_HEARTBEAT_TIMEOUT, value_parser = parse_duration)]
    pub timeout: Duration,
}

/// How the LISTEN task notices a dead connection and reconnects.
#[derive(Debug, Clone, Copy, Args)]
pub struct ListenerSettings {
    /// Time between health queries on the LISTEN connection.
    #[arg(long = "listener-health-interval", env = "ROWCAST_LISTENER_HEALTH_INTERVAL",
          default_value = DEFAULT_LISTENER_HEALTH_INTERVAL, value_parser = parse_duration)]
    pub health_interval: Duration,

    /// How long a health query may take before the connection is replaced.
    #[arg(long = "listener-health-timeout", env = "ROWCAST_LISTENER_HEALTH_TIMEOUT",
          default_value = DEFAULT_LISTENER_HEALTH_TIMEOUT, value_parser = parse_duration)]
    pub health_timeout: Duration,

    /// Longest wait between reconnect attempts (backoff doubles from 100ms up to this).
    #[arg(long = "listener-max-backoff", env = "ROWCAST_LISTENER_MAX_BACKOFF",
          default_value = DEFAULT_LISTENER_MAX_BACKOFF, value_parser = parse_duration)]
    pub max_backoff: Duration,
}

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

/// Parses "30s", "500ms", "2m" or plain seconds ("30"); zero is refused.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; use e.g. 30s, 500ms or 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s, m or h"
            ));
        }
    };
    if !(seconds > 0.0 && seconds < 1e9) {
        return Err(format!("{text:?} must be greater than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(value) => Ok(value),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("rowcast").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_parse_and_match_the_documented_values() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cli.config.heartbeat.interval, Duration::from_secs(30));
        assert_eq!(cli.config.limits.max_frame_bytes, 256 * 1024);
    }

    #[test]
    fn durations_accept_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "0s", "fast", "5 weeks", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_are_reported_with_the_flag_name() {
        let err = parse(&["--outbox-capacity", "0"]).unwrap_err().to_string();
        assert!(
            err.contains("--outbox-capacity") && err.contains("at least 1"),
            "{err}"
        );
        let err = parse(&["--listen", "localhost"]).unwrap_err().to_string();
        assert!(err.contains("--listen"), "{err}");
        assert!(parse(&["migrate"]).unwrap().command.is_some());
    }
}
