//! Database access: the connection pools ([`Pools`]: one per kind of work, so that none can
//! starve another), migrations, the product queries (`products`), the changelog queries
//! (`changelog`), the SQL of `--source replication` (`replication`: publication, slot, the
//! switch from the trigger, the reader's batched writes), the bounded queue clients' history reads wait in (`history`), the
//! WebSocket tickets every instance shares (`tickets`) and the watcher counts every instance
//! shares (`presence`). The private
//! cluster used when no `DATABASE_URL` is given is the `rowcast-embedded-postgres` crate
//! (`crates/embedded-postgres`), started by `app`. The database URL is parsed once into a
//! [`PgTarget`] (`target`), which the pools and the LISTEN connection both connect from, with
//! TLS to PostgreSQL set up in `tls`. Imports `product` only (callers pass plain values such as
//! [`PoolSizes`], not `config`); knows nothing of sessions, the distributor, schedules or
//! shutdown (`retention` runs the prune query).

pub mod changelog;
pub mod history;
pub mod presence;
pub mod products;
pub mod replication;
pub mod rest;
pub mod target;
pub mod tickets;
pub mod tls;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgPool};

pub use history::{Busy, HistoryError, HistoryReader, HistoryStats};
pub use rest::{Lease, RestPool};
pub use target::PgTarget;

/// The migrations in `migrations/`, embedded at build time (`build.rs` reruns on changes).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long REST requests and background tasks wait for a pooled connection. A query of theirs
/// takes milliseconds, so 5 s of waiting means the pool is stuck; failing then beats queueing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

// The sqlx pools (history, background) ping a connection before handing it out only when it has
// been idle this long, as the REST pool does: sqlx's default pings on every acquire, a full round
// trip that doubled the database work of every statement.
use rest::PING_WHEN_IDLE_FOR;

/// Connections of the background pool: the retention task and the presence task (and the
/// start-up position read). Each runs one query at a time, so with one connection each neither
/// ever waits for the other, and no client can reach this pool. The listener reads the changelog
/// on a connection of its own (`listener`).
pub const BACKGROUND_CONNECTIONS: u32 = 2;

/// Failures talking to the database outside a request.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL could not be parsed.
    #[error("invalid database URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The database could not be reached.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// The TLS files the URL names (`sslrootcert`, `sslcert`, `sslkey`) are unusable.
    #[error("cannot set up TLS to the database: {0}")]
    TlsSetup(#[source] tls::TlsSetupError),
    /// The TLS connection was refused; the message says why in plain words.
    #[error("cannot connect to the database over TLS: {message}")]
    Tls {
        /// What went wrong, e.g. "certificate signed by an unknown CA; set sslrootcert".
        message: String,
        /// The error as sqlx reported it.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// How large each pool is; plain values, so that `db` needs no `config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSizes {
    /// REST requests and `/readyz`.
    pub rest: u32,
    /// Clients' replays and snapshots.
    pub history: u32,
    /// History reads that may wait for a connection or hold one at once; more are refused.
    pub history_queue: usize,
    /// How long a history read waits for a connection before it is refused.
    pub history_acquire_timeout: Duration,
}

/// The database connections of one rowcast, in three pools so that no kind of work can take
/// another's connections: clients re-subscribing with `since` in a loop exhaust the history
/// pool, not REST, and neither can delay the listener, whose catch-up decides how soon every
/// subscriber sees a change. Each part of the app is handed only the pool it uses. Each pool
/// has its own `application_name` (`rowcast`, `rowcast-history`, `rowcast-background`), so
/// `pg_stat_activity` shows which kind of work holds a connection.
#[derive(Debug, Clone)]
pub struct Pools {
    /// REST requests, WebSocket tickets and `/readyz` (which answers "can this instance serve
    /// REST").
    pub rest: RestPool,
    /// Clients' replays and snapshots, behind a bounded queue.
    pub history: HistoryReader,
    /// Retention and presence ([`BACKGROUND_CONNECTIONS`]).
    pub background: PgPool,
    /// Where presence opens the one session that holds its liveness lock (no pool: the
    /// session must live as long as the instance).
    pub presence_session: PgConnectOptions,
}

impl Pools {
    /// Opens every pool; fails fast if the database cannot be reached.
    pub async fn connect(target: &PgTarget, sizes: PoolSizes) -> Result<Self, DbError> {
        let rest = open_rest(target, sizes.rest).await?;
        let history = open(
            target,
            "rowcast-history",
            sizes.history,
            sizes.history_acquire_timeout,
        )
        .await?;
        let background = open(
            target,
            "rowcast-background",
            BACKGROUND_CONNECTIONS,
            ACQUIRE_TIMEOUT,
        )
        .await?;
        Ok(Self {
            rest,
            history: HistoryReader::new(history, sizes.history, sizes.history_queue),
            background,
            presence_session: target.pool_options().application_name("rowcast-presence"),
        })
    }

    /// Closes every pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        tokio::join!(
            self.rest.close(),
            self.history.close(),
            self.background.close()
        );
    }
}

/// Opens one pool of `max_connections` (the embedded cluster's setup and `rowcast migrate` use
/// one connection); fails fast if the database cannot be reached.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let target = PgTarget::parse(url)?;
    open(&target, "rowcast", max_connections, ACQUIRE_TIMEOUT).await
}

/// Opens the REST pool and one connection of it, so that an unreachable database fails the
/// start as the other pools do.
async fn open_rest(target: &PgTarget, max_connections: u32) -> Result<RestPool, DbError> {
    let pool = RestPool::new(
        target.pool_options().application_name("rowcast"),
        max_connections,
        ACQUIRE_TIMEOUT,
    )
    .map_err(DbError::Connect)?;
    let lease = pool
        .acquire()
        .await
        .map_err(|err| connect_failure(target, err))?;
    lease.settle();
    Ok(pool)
}

fn connect_failure(target: &PgTarget, err: sqlx::Error) -> DbError {
    match target.describe_tls_failure(&err) {
        Some(message) => DbError::Tls {
            message,
            source: err,
        },
        None => DbError::Connect(err),
    }
}

async fn open(
    target: &PgTarget,
    application_name: &str,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for < PING_WHEN_IDLE_FOR {
                    return Ok(true);
                }
                // A dead connection is closed and the pool tries another.
                Ok(connection.ping().await.is_ok())
            })
        })
        .connect_with(target.pool_options().application_name(application_name))
        .await
        .map_err(|err| connect_failure(target, err))
}

/// Applies pending migrations (idempotent; safe with several instances starting at once, since
/// sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// [`migrate`] on a connection of the REST pool.
pub async fn migrate_rest(pool: &RestPool) -> Result<(), DbError> {
    let mut lease = pool.acquire().await.map_err(DbError::Connect)?;
    MIGRATOR.run(&mut *lease).await?;
    lease.settle();
    Ok(())
}
