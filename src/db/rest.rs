//! The REST pool ([`RestPool`]): the connections REST requests, WebSocket tickets and
//! `/readyz` run their statements on. A `deadpool` of sqlx connections instead of sqlx's own
//! pool, because sqlx 0.8 pings every connection it takes back (`return_to_pool`, not
//! configurable): a second database round trip after every REST statement, ~13 % of rowcast's
//! CPU per PUT and as much again in PostgreSQL. Here a connection is checked only when there is
//! a reason to doubt it: it sat idle (it may have died with a restart, a failover or a proxy's
//! idle timeout), or its last use did not end cleanly (a statement failed, or the request was
//! cancelled mid-statement and the connection may still owe a reply, which the ping drains).

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};

/// A connection handed out again within this long of its last use is trusted as it is; one
/// idle for longer is pinged first. One in steady use that breaks fails its statement either
/// way, with or without a ping just before it.
pub const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Connections are replaced after this long (sqlx's default `max_lifetime`), so that server-side
/// memory a long-lived backend accumulates (caches, prepared statements) is returned.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// One pooled connection and whether its last use ended cleanly.
#[derive(Debug)]
pub struct Tracked {
    connection: PgConnection,
    settled: bool,
}

/// Opens and checks the pool's connections.
#[derive(Debug)]
pub struct Manager {
    options: PgConnectOptions,
}

impl managed::Manager for Manager {
    type Type = Tracked;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Tracked, sqlx::Error> {
        Ok(Tracked {
            connection: PgConnection::connect_with(&self.options).await?,
            settled: true,
        })
    }

    async fn recycle(
        &self,
        tracked: &mut Tracked,
        metrics: &Metrics,
    ) -> RecycleResult<sqlx::Error> {
        if metrics.age() >= MAX_LIFETIME {
            return Err(RecycleError::message(
                "connection reached its maximum lifetime",
            ));
        }
        if tracked.settled && metrics.last_used() < PING_WHEN_IDLE_FOR {
            return Ok(());
        }
        // A dead connection fails here; deadpool drops it and hands out (or opens) another.
        tracked.connection.ping().await?;
        tracked.settled = true;
        Ok(())
    }
}

/// The REST pool; cheap to clone.
#[derive(Clone)]
pub struct RestPool {
    pool: Pool<Manager>,
}

impl std::fmt::Debug for RestPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestPool")
            .field("status", &self.pool.status())
            .finish()
    }
}

impl RestPool {
    /// A pool of at most `max_connections`, opened lazily; waiting for a connection (or opening
    /// one) gives up after `acquire_timeout`.
    pub fn new(
        options: PgConnectOptions,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        let pool = Pool::builder(Manager { options })
            .max_size(usize::try_from(max_connections).unwrap_or(usize::MAX))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(acquire_timeout))
            .create_timeout(Some(acquire_timeout))
            .recycle_timeout(Some(acquire_timeout))
            .build()
            .map_err(|err| sqlx::Error::Configuration(err.to_string().into()))?;
        Ok(Self { pool })
    }

    /// A connection for one request. Call [`Lease::settle`] when its statements succeeded;
    /// a lease dropped without it (an error, a cancelled request) is pinged before its next use.
    pub async fn acquire(&self) -> Result<Lease, sqlx::Error> {
        let mut object = self.pool.get().await.map_err(|err| match err {
            PoolError::Backend(err) => err,
            PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
            PoolError::Closed => sqlx::Error::PoolClosed,
            other => sqlx::Error::Configuration(other.to_string().into()),
        })?;
        object.settled = false;
        Ok(Lease { object })
    }

    /// Stops handing out connections and closes the idle ones politely (a `Terminate`, so the
    /// server logs no broken connection); connections in use are dropped when returned.
    pub async fn close(&self) {
        let idle = self.pool.retain(|_, _| false).removed;
        self.pool.close();
        for tracked in idle {
            let _ = tracked.connection.close().await;
        }
    }
}

/// A connection borrowed from the [`RestPool`]; derefs to the sqlx connection.
pub struct Lease {
    object: Object<Manager>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("settled", &self.object.settled)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Marks the connection as left in a clean state: it goes back without a check.
    pub fn settle(mut self) {
        self.object.settled = true;
    }
}

impl Deref for Lease {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.object.connection
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.object.connection
    }
}
