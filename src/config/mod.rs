//! Configuration: every setting rowcast has, parsed once (flags or `ROWCAST_*` environment
//! variables) and passed down. Each default is a `DEFAULT_*` const with the reason for its value.
//! Imports nothing of ours; nothing else reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod acme;
mod budgets;
mod changelog;
mod presence;
mod source;
mod values;

pub use acme::AcmeSettings;
pub use budgets::Budgets;
pub use changelog::{
    ChangelogSettings, DEFAULT_CHANGELOG_MAX_ROWS, DEFAULT_CHANGELOG_PRUNE_INTERVAL,
    DEFAULT_CHANGELOG_RETENTION,
};
pub use presence::PresenceSettings;
pub use source::{ReplicationCommit, Source, SourceSettings};
pub use values::{HostName, IpPrefix, Origin, Secret, split_host_port};

/// Loopback only: a fresh install must not expose an unauthenticated write API to the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Outside the invoking user's home, because when rowcast runs as root the cluster runs as the
/// `postgres` user, who cannot enter /root; /var/tmp survives reboots, unlike /tmp.
pub const DEFAULT_EMBEDDED_DATA_DIR: &str = "/var/tmp/rowcast";
/// Enough for REST concurrency on a small machine; Postgres's default max_connections is 100.
pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 16;
/// Replays and snapshots get a pool of their own, of one connection per two CPU cores (at least
/// one, at most 4). A replay page or a snapshot is one indexed read of milliseconds, so even one
/// connection serves hundreds of resumes a second; more would let clients that replay in a loop
/// (`"since":0`, snapshots) keep more of the database's CPU busy than REST can spare when it
/// runs on the same machine: measured in BENCHMARKS.md ("Hostile"), 4 connections on 2 cores
/// made REST p99 6x slower under a snapshot flood, 1 kept it within 1.6x.
pub fn default_db_history_connections() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    u32::try_from(cores / 2).unwrap_or(u32::MAX).clamp(1, 4)
}
/// History reads that may wait for a connection or run at once: a reconnect storm of a few
/// hundred clients (as many as `--max-concurrent-upgrades` lets in at once) queues, while a
/// larger crowd is told at once to come back later (close 1013) instead of each holding a
/// session and memory while it waits.
pub const DEFAULT_DB_HISTORY_QUEUE: usize = 256;
/// How long a history read waits for a connection, like REST's 5 s: a read takes milliseconds,
/// so a wait this long means the history connections are stuck; the client is better told to
/// come back later.
pub const DEFAULT_DB_HISTORY_ACQUIRE_TIMEOUT: &str = "5s";
/// Messages queued for one WebSocket before it counts as too slow: room for a burst of
/// thousands of changes, while a stuck client costs at most this many shared frame handles.
pub const DEFAULT_OUTBOX_CAPACITY: usize = 4096;
/// Bytes of change frames queued for one WebSocket before the slow-client policy applies: a
/// product can be ~1 MB, so a count alone would let one session hold gigabytes. 8 MiB holds
/// thousands of typical changes; what does not fit is read from the changelog when the client
/// gets there (see `distributor::outbox`).
pub const DEFAULT_OUTBOX_BYTES: usize = 8 << 20;
/// A client that has not reached changes left to the changelog within this long after its
/// queue overflowed had stopped reading (a prompt reader drains a full queue in milliseconds,
/// even over a slow link): it gets the newest version of each product instead of every one.
pub const DEFAULT_CONFLATE_AFTER: &str = "1s";
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
    /// Apply database migrations and exit (with `--source replication`, also create the
    /// publication and, when no instance leads, the slot and switch).
    Migrate,
    /// Manage the logical replication of `--source replication`.
    #[command(subcommand)]
    Replication(ReplicationCommand),
}

/// `rowcast replication …`.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum ReplicationCommand {
    /// Hand the changelog back to the trigger (subscribers get a reset), then drop the slot and
    /// the publication. Stop the `--source replication` instances first: a running reader
    /// would create them again.
    Drop,
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

    /// Size of the REST connection pool (REST requests and /readyz).
    #[arg(long, env = "ROWCAST_DB_MAX_CONNECTIONS", default_value_t = DEFAULT_DB_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub db_max_connections: u32,

    /// The history pool: clients' replays and snapshots.
    #[command(flatten)]
    pub history: HistorySettings,

    /// Per-session limits.
    #[command(flatten)]
    pub limits: Limits,

    /// Server-wide and per-address budgets, and the command rate.
    #[command(flatten)]
    pub budgets: Budgets,

    /// WebSocket keep-alive.
    #[command(flatten)]
    pub heartbeat: Heartbeat,

    /// LISTEN connection health checks and reconnects.
    #[command(flatten)]
    pub listener: ListenerSettings,

    /// Where changelog rows come from (`--source`).
    #[command(flatten)]
    pub source: SourceSettings,

    /// Changelog retention (resume window).
    #[command(flatten)]
    pub changelog: ChangelogSettings,

    /// Watcher counts shared through PostgreSQL.
    #[command(flatten)]
    pub presence: PresenceSettings,

    /// How long shutdown waits for open sessions and requests (e.g. 5s, 500ms).
    #[arg(long, env = "ROWCAST_SHUTDOWN_GRACE", default_value = DEFAULT_SHUTDOWN_GRACE,
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log output format.
    #[arg(long, env = "ROWCAST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// HTTPS listener and certificate.
    #[command(flatten)]
    pub tls: TlsSettings,

    /// Origin check and optional token authentication.
    #[command(flatten)]
    pub access: AccessSettings,

    /// Timeouts and connection limits.
    #[command(flatten)]
    pub hardening: Hardening,
}

/// Limits that bound what one client can make the server hold.
#[derive(Debug, Clone, Copy, Args)]
pub struct Limits {
    /// Messages queued for one WebSocket before its queue counts as full (see
    /// `--slow-client-policy`).
    #[arg(long, env = "ROWCAST_OUTBOX_CAPACITY", default_value_t = DEFAULT_OUTBOX_CAPACITY,
          value_parser = parse_positive)]
    pub outbox_capacity: usize,

    /// Bytes of change messages queued for one WebSocket before its queue counts as full.
    #[arg(long, env = "ROWCAST_OUTBOX_BYTES", default_value_t = DEFAULT_OUTBOX_BYTES,
          value_parser = parse_positive)]
    pub outbox_bytes: usize,

    /// How long after its queue overflowed a client counts as having stopped reading (conflate
    /// policy): it then gets the newest version of each product, marked `"conflated":true`.
    #[arg(long, env = "ROWCAST_CONFLATE_AFTER", default_value = DEFAULT_CONFLATE_AFTER,
          value_parser = parse_duration)]
    pub conflate_after: Duration,

    /// What to do when a client's queue is full: conflate (changes that do not fit are read
    /// from the changelog when the client catches up; a client that stopped reading gets the
    /// newest version of each product, marked `"conflated":true`) or disconnect (close 1013).
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

/// The pool clients' replays (`since`, gaps) and snapshots read from, and the bounded queue in
/// front of it; REST and the background tasks have pools of their own.
#[derive(Debug, Clone, Copy, Args)]
pub struct HistorySettings {
    /// Size of the history connection pool (default: one per two CPU cores, from 1 to 4).
    #[arg(long = "db-history-connections", env = "ROWCAST_DB_HISTORY_CONNECTIONS",
          default_value_t = default_db_history_connections(),
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,

    /// History reads that may wait for a connection or hold one at once; one more is refused
    /// at once (WebSocket close 1013, SSE `history_busy`). Below --db-history-connections,
    /// connections beyond it stay unused.
    #[arg(long = "db-history-queue", env = "ROWCAST_DB_HISTORY_QUEUE",
          default_value_t = DEFAULT_DB_HISTORY_QUEUE, value_parser = parse_positive)]
    pub queue: usize,

    /// How long a history read waits for a connection before it is refused like one that found
    /// the queue full.
    #[arg(long = "db-history-acquire-timeout", env = "ROWCAST_DB_HISTORY_ACQUIRE_TIMEOUT",
          default_value = DEFAULT_DB_HISTORY_ACQUIRE_TIMEOUT, value_parser = parse_duration)]
    pub acquire_timeout: Duration,
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

/// Loopback only, like `--listen`; 8443 is the customary unprivileged HTTPS port.
pub const DEFAULT_TLS_LISTEN: &str = "127.0.0.1:8443";
/// A real client completes a TLS handshake in a few round trips (well under a second even across
/// continents); 10 s tolerates a congested mobile link and frees a stalled socket soon.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: &str = "10s";
/// Time a connection gets to send a complete request head — the first one, and each next one on
/// an idle HTTP/1.1 keep-alive connection. Browsers send a head in one packet; a slow-loris
/// client trickling bytes holds a socket no longer than this.
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";
/// A REST request is one indexed query; 30 s is far beyond a healthy one and bounds what a stuck
/// database or a client that never finishes its body costs.
pub const DEFAULT_REQUEST_TIMEOUT: &str = "30s";
/// Time a connection may go without the peer accepting any of the bytes the server has for it
/// (the socket's send buffer stays full). A client that reads drains its socket within
/// milliseconds, and a congested link within a few TCP retransmissions; one that has taken
/// nothing for 30 s has stopped reading (a frozen tab, a peer gone without FIN, a client that
/// sends a request and never reads), and without this bound it would hold its connection and
/// what is queued for it forever. The same patience as `--request-timeout`, and below the
/// WebSocket heartbeat window (interval + timeout, 30 s + 10 s), so a stalled HTTP/1.1 WebSocket
/// is closed by this first; the heartbeat window stays, bounding a peer that reads a trickle
/// (each bit of progress re-arms this deadline) and WebSockets over HTTP/2, whose streams this
/// connection-level deadline cannot see.
pub const DEFAULT_WRITE_TIMEOUT: &str = "30s";
/// REST requests in flight at once. Each needs one of the few pooled database connections, so
/// past a few hundred waiting requests queueing only adds latency: shed the rest with 503.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 512;
/// WebSocket upgrade requests in flight at once. An upgrade is answered in microseconds, so this
/// bites only in a connect storm (every client reconnecting after a restart); those over it get
/// 503 and retry with their backoff.
pub const DEFAULT_MAX_CONCURRENT_UPGRADES: usize = 256;
/// Open connections in all (HTTP and HTTPS, WebSockets included), kept below the file-descriptor
/// limit (commonly 20 000–65 536 for services) with room for the database pool and logs, so the
/// server refuses tidily instead of failing `accept` with EMFILE.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Open connections per client address. A browser needs at most ~6 HTTP/1.1 connections to a site
/// plus one per WebSocket (or a single HTTP/2 connection for everything); 1024 lets a large office
/// behind one NAT address in, while one host cannot take more than a small share of the fd budget.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1024;
/// Addresses the per-address limit does not apply to: loopback, where a local TLS-terminating
/// proxy, a benchmark or the operator's own tools connect from (the global limit still applies).
pub const DEFAULT_PER_IP_LIMIT_EXEMPT: &str = "127.0.0.0/8,::1/128";
/// Long enough for a page to fetch a ticket and open its WebSocket on a slow link; short enough
/// that a ticket leaked through a URL in a screenshot or history is useless soon after.
pub const DEFAULT_WS_TICKET_TTL: &str = "30s";
/// Long enough to ride out a server restart or a dropped network (EventSource retries every few
/// seconds); short enough that a copied cookie is useless soon after. Streams end at half of it
/// so that their reconnect renews the cookie in time.
pub const DEFAULT_STREAM_CREDENTIAL_TTL: &str = "10m";
/// Shortest accepted API token: below 16 characters a token is guessable online.
pub const MIN_API_TOKEN_LEN: usize = 16;

/// HTTPS: a second listener, on only when a certificate source is given. The plain `--listen`
/// listener keeps serving (or, with `--http-redirect`, redirects to HTTPS), so scripts and the
/// console snippet that use `http://`/`ws://` keep working. TLS is opt-in rather than the
/// binary's default so that instances started by tests and scripts never contend for port 8443;
/// the README's quick-start command passes `--tls-self-signed`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("tls_source").multiple(false)))]
pub struct TlsSettings {
    /// Address the HTTPS listener binds when TLS is on (port 0 picks a free port). It serves
    /// HTTP/2 and HTTP/1.1 (ALPN) on the same port, REST and WebSockets alike.
    #[arg(id = "tls_listen", long = "tls-listen", env = "ROWCAST_TLS_LISTEN", default_value = DEFAULT_TLS_LISTEN)]
    pub listen: SocketAddr,

    /// Certificate chain (PEM, leaf first) for the HTTPS listener. Re-read with the key on SIGHUP.
    #[arg(
        long = "tls-cert",
        env = "ROWCAST_TLS_CERT",
        group = "tls_source",
        requires = "key"
    )]
    pub cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, RSA or EC) of the certificate.
    #[arg(long = "tls-key", env = "ROWCAST_TLS_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Serve HTTPS with a certificate generated at start for localhost, 127.0.0.1 and ::1; its
    /// SHA-256 fingerprint is logged. For development: browsers warn until you trust it.
    #[arg(
        long = "tls-self-signed",
        env = "ROWCAST_TLS_SELF_SIGNED",
        group = "tls_source"
    )]
    pub self_signed: bool,

    /// How long a client may take to complete the TLS handshake.
    #[arg(long = "tls-handshake-timeout", env = "ROWCAST_TLS_HANDSHAKE_TIMEOUT",
          default_value = DEFAULT_TLS_HANDSHAKE_TIMEOUT, value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Make the plain `--listen` listener answer every request with a 308 redirect to HTTPS
    /// (health endpoints excepted). Requires TLS.
    #[arg(
        long = "http-redirect",
        env = "ROWCAST_HTTP_REDIRECT",
        requires = "tls_source"
    )]
    pub http_redirect: bool,

    /// Certificates from an ACME CA, when `--acme-domain` is given.
    #[command(flatten)]
    pub acme: AcmeSettings,
}

impl TlsSettings {
    /// True when an HTTPS listener is configured.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.self_signed || !self.acme.domains.is_empty()
    }
}

/// Who may use the server: the Host allowlist, the WebSocket origin check and the optional API
/// token.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("token_source").multiple(false)))]
pub struct AccessSettings {
    /// Origin a browser WebSocket may come from, e.g. https://app.example.com (repeatable, or
    /// comma-separated in the variable). Default: only pages of the same host as the request.
    /// Requests without an Origin header (non-browser clients) are always allowed.
    #[arg(long = "allowed-origin", env = "ROWCAST_ALLOWED_ORIGINS", value_delimiter = ',',
          value_parser = Origin::parse)]
    pub allowed_origins: Vec<Origin>,

    /// Host name requests may be addressed to (`Host`, or HTTP/2 `:authority`; the port is not
    /// compared), e.g. rowcast.example.com (repeatable, or comma-separated in the variable);
    /// localhost, 127.0.0.1 and [::1] are always allowed. Default: on a loopback --listen only
    /// those; on any other address no check, since rowcast cannot know its public names.
    #[arg(long = "allowed-host", env = "ROWCAST_ALLOWED_HOSTS", value_delimiter = ',',
          value_parser = HostName::parse)]
    pub allowed_hosts: Vec<HostName>,

    /// Token REST writes must carry as `Authorization: Bearer <token>` (at least 16 characters).
    /// Off by default: anyone who reaches the port may write.
    #[arg(long = "api-token", env = "ROWCAST_API_TOKEN", hide_env_values = true,
          group = "token_source", value_parser = Secret::parse)]
    pub api_token: Option<Secret>,

    /// File holding the API token (surrounding whitespace ignored), instead of --api-token.
    #[arg(
        long = "api-token-file",
        env = "ROWCAST_API_TOKEN_FILE",
        group = "token_source"
    )]
    pub api_token_file: Option<PathBuf>,

    /// Also require the token for reads (GET /products, /stats) and WebSocket subscriptions
    /// (a ticket from POST /ws-ticket, or the Authorization header). Health checks stay open.
    #[arg(
        long = "auth-reads",
        env = "ROWCAST_AUTH_READS",
        requires = "token_source"
    )]
    pub auth_reads: bool,

    /// Token `/stats` and `/metrics` then require as `Authorization: Bearer <token>` (at least
    /// 16 characters), whatever --auth-reads says. Off by default: they are reads like any other.
    #[arg(long = "ops-token", env = "ROWCAST_OPS_TOKEN", hide_env_values = true,
          value_parser = Secret::parse)]
    pub ops_token: Option<Secret>,

    /// How long a WebSocket ticket from POST /ws-ticket stays valid (it is single-use).
    #[arg(long = "ws-ticket-ttl", env = "ROWCAST_WS_TICKET_TTL",
          default_value = DEFAULT_WS_TICKET_TTL, value_parser = parse_duration)]
    pub ws_ticket_ttl: Duration,

    /// How long the event-stream cookie (set when a stream opens with a ticket or the token)
    /// lets `EventSource` reconnect; authenticated streams end at half of it to renew it.
    #[arg(long = "stream-credential-ttl", env = "ROWCAST_STREAM_CREDENTIAL_TTL",
          default_value = DEFAULT_STREAM_CREDENTIAL_TTL, value_parser = parse_duration)]
    pub stream_credential_ttl: Duration,
}

/// Timeouts and limits that bound what abusive or broken clients can hold.
#[derive(Debug, Clone, Args)]
pub struct Hardening {
    /// Time a connection gets to send a complete request head (slow-loris protection).
    #[arg(long = "header-read-timeout", env = "ROWCAST_HEADER_READ_TIMEOUT",
          default_value = DEFAULT_HEADER_READ_TIMEOUT, value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Longest time a connection may go without the peer accepting any data the server has for
    /// it (SSE streams, REST responses, WebSockets over HTTP/1.1); the connection is then closed.
    #[arg(long = "write-timeout", env = "ROWCAST_WRITE_TIMEOUT",
          default_value = DEFAULT_WRITE_TIMEOUT, value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Longest time a REST request may take before it is answered 503.
    #[arg(long = "request-timeout", env = "ROWCAST_REQUEST_TIMEOUT",
          default_value = DEFAULT_REQUEST_TIMEOUT, value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// REST requests handled at once; more are answered 503 at once.
    #[arg(long = "max-concurrent-requests", env = "ROWCAST_MAX_CONCURRENT_REQUESTS",
          default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS, value_parser = parse_positive)]
    pub max_concurrent_requests: usize,

    /// WebSocket upgrades handled at once; more are answered 503 at once.
    #[arg(long = "max-concurrent-upgrades", env = "ROWCAST_MAX_CONCURRENT_UPGRADES",
          default_value_t = DEFAULT_MAX_CONCURRENT_UPGRADES, value_parser = parse_positive)]
    pub max_concurrent_upgrades: usize,

    /// Open connections in all; a connection over the limit is closed as soon as it is accepted.
    #[arg(long = "max-connections", env = "ROWCAST_MAX_CONNECTIONS",
          default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = parse_positive)]
    pub max_connections: usize,

    /// Open connections per client address (0: no limit). Behind a proxy every client has the
    /// proxy's address: exempt it with --per-ip-limit-exempt.
    #[arg(long = "max-connections-per-ip", env = "ROWCAST_MAX_CONNECTIONS_PER_IP",
          default_value_t = DEFAULT_MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,

    /// Addresses or CIDR prefixes the per-address limit does not apply to (comma-separated;
    /// give the flag with no value to exempt none).
    #[arg(long = "per-ip-limit-exempt", env = "ROWCAST_PER_IP_LIMIT_EXEMPT",
          default_value = DEFAULT_PER_IP_LIMIT_EXEMPT, value_delimiter = ',', num_args = 0..,
          value_parser = IpPrefix::parse)]
    pub per_ip_limit_exempt: Vec<IpPrefix>,
}

/// Durations as humans write them (`30s`, `500ms`, `2m`, `1h 30m`), read by `humantime`; a bare
/// number is seconds, as the flags documented before.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).map_err(|err| {
            format!("{text:?} is not a duration ({err}); use e.g. 30s, 500ms or 2m")
        })?,
    };
    if duration.is_zero() || duration.as_secs() >= 1_000_000_000 {
        return Err(format!(
            "{text:?} must be greater than zero and below 30 years"
        ));
    }
    Ok(duration)
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(value) => Ok(value),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

#[cfg(test)]
mod tests;
