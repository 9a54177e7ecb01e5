//! `HistoryReader`: the one way clients' replays and snapshots read the changelog. It owns the
//! history pool and a bounded queue in front of it: at most `--db-history-queue` reads wait for a
//! connection or hold one at once. A read that finds the queue full, or that waits longer than
//! `--db-history-acquire-timeout` while every history connection is in use, fails at once with
//! [`HistoryError::Busy`] — not a database failure: the client is told to come back later and
//! resume, instead of a growing crowd of waiters holding sessions (and memory) while the
//! database works through them.
//!
//! Each read takes its slot and its connection for one query (a page, a position, a snapshot's
//! transaction) and gives both back, so a long replay lets others in between its pages.
//!
//! Imports `db::changelog` (the queries) and `product`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::changelog::{self, ChangelogError, Page, Position, Scope, Snapshot};
use crate::product::{ProductId, Seq};

/// Why a history read was refused without touching the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// As many reads as the queue holds are already waiting or running.
    #[error("{queue} history reads are already waiting or running")]
    QueueFull {
        /// The queue's bound (`--db-history-queue`).
        queue: usize,
    },
    /// Every history connection stayed in use for the whole wait.
    #[error("no history connection came free within {waited:?}")]
    TimedOut {
        /// How long the read waited (`--db-history-acquire-timeout`).
        waited: Duration,
    },
}

/// A history read that failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// No slot or no connection: the read was not attempted. Nothing is wrong with the data;
    /// the client should come back later and resume.
    #[error("change history is busy: {0}")]
    Busy(#[from] Busy),
    /// The read itself failed (the database, or a corrupt row).
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
}

impl From<sqlx::Error> for HistoryError {
    fn from(err: sqlx::Error) -> Self {
        Self::Changelog(err.into())
    }
}

/// What `/stats` shows under `history`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = HistoryState)]
#[serde(rename_all = "camelCase")]
pub struct HistoryStats {
    /// Size of the history pool (`--db-history-connections`).
    pub connections: u32,
    /// Reads that may wait or run at once (`--db-history-queue`).
    pub queue: usize,
    /// Reads waiting for a connection now.
    pub waiting: u64,
    /// Reads holding a connection now.
    pub reading: u64,
    /// Reads refused since start because the queue was full or no connection came free in time
    /// (each ended a WebSocket with 1013 or an event stream with `history_busy`).
    pub busy_refusals: u64,
}

/// The history pool behind its bounded queue; cheap to clone (a reference count).
#[derive(Debug, Clone)]
pub struct HistoryReader(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    /// One permit per read that waits for a connection or holds one. Never closed.
    slots: Semaphore,
    connections: u32,
    queue: usize,
    waiting: AtomicU64,
    reading: AtomicU64,
    busy_refusals: AtomicU64,
}

/// A read's place: its queue permit and its connection. Fields drop in order: the connection
/// goes back to the pool before the permit lets the next read in.
struct Slot<'a> {
    connection: PoolConnection<Postgres>,
    _reading: Counted<'a>,
    _permit: SemaphorePermit<'a>,
}

/// Counts one read in a gauge while it lives; a read whose future is dropped (its client went
/// away) is uncounted too.
struct Counted<'a>(&'a AtomicU64);

impl<'a> Counted<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HistoryReader {
    /// Puts a queue of `queue` slots in front of `pool`, a pool of `connections`.
    pub fn new(pool: PgPool, connections: u32, queue: usize) -> Self {
        Self(Arc::new(Inner {
            pool,
            slots: Semaphore::new(queue),
            connections,
            queue,
            waiting: AtomicU64::new(0),
            reading: AtomicU64::new(0),
            busy_refusals: AtomicU64::new(0),
        }))
    }

    /// The counters now.
    pub fn stats(&self) -> HistoryStats {
        let inner = &*self.0;
        HistoryStats {
            connections: inner.connections,
            queue: inner.queue,
            waiting: inner.waiting.load(Ordering::Relaxed),
            reading: inner.reading.load(Ordering::Relaxed),
            busy_refusals: inner.busy_refusals.load(Ordering::Relaxed),
        }
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.0.pool.close().await;
    }

    /// Where the changelog stands, and the commit time of the change at `seq`.
    pub async fn position(&self, seq: Seq) -> Result<Position, HistoryError> {
        let mut slot = self.slot().await?;
        Ok(changelog::position(&mut *slot.connection, seq).await?)
    }

    /// One page of changes in `scope` with `after < seq <= upto`.
    pub async fn range(
        &self,
        scope: Scope<'_>,
        after: Seq,
        upto: Seq,
    ) -> Result<Page, HistoryError> {
        let mut slot = self.slot().await?;
        Ok(changelog::range(&mut *slot.connection, scope, after, upto).await?)
    }

    /// One page of the newest change of each product in `scope` in `range` after `cursor`.
    pub async fn latest(
        &self,
        scope: Scope<'_>,
        range: (Seq, Seq),
        cursor: Seq,
    ) -> Result<Page, HistoryError> {
        let mut slot = self.slot().await?;
        Ok(changelog::latest(&mut *slot.connection, scope, range, cursor).await?)
    }

    /// The current rows of `products` and the seq they reflect.
    pub async fn snapshot(&self, products: &[ProductId]) -> Result<Snapshot, HistoryError> {
        let mut slot = self.slot().await?;
        Ok(changelog::snapshot(&mut *slot.connection, products).await?)
    }

    /// Every current row and the seq they reflect.
    pub async fn snapshot_all(&self) -> Result<Snapshot, HistoryError> {
        let mut slot = self.slot().await?;
        Ok(changelog::snapshot_all(&mut *slot.connection).await?)
    }

    /// Takes a queue slot at once (or refuses), then waits for a connection within the pool's
    /// acquire timeout.
    async fn slot(&self) -> Result<Slot<'_>, HistoryError> {
        let inner = &*self.0;
        // `try_acquire` fails only when no permit is free: the semaphore is never closed.
        let Ok(permit) = inner.slots.try_acquire() else {
            return Err(self.refuse(Busy::QueueFull { queue: inner.queue }));
        };
        let waiting = Counted::new(&inner.waiting);
        let connection = match inner.pool.acquire().await {
            Ok(connection) => connection,
            // Busy only if the wait was for connections other reads held; a pool that timed
            // out with connections to spare could not open one (the database is unreachable),
            // which is a database failure like any other.
            Err(sqlx::Error::PoolTimedOut)
                if inner.reading.load(Ordering::Relaxed) >= u64::from(inner.connections) =>
            {
                let waited = inner.pool.options().get_acquire_timeout();
                return Err(self.refuse(Busy::TimedOut { waited }));
            }
            Err(err) => return Err(err.into()),
        };
        drop(waiting);
        Ok(Slot {
            connection,
            _reading: Counted::new(&inner.reading),
            _permit: permit,
        })
    }

    fn refuse(&self, busy: Busy) -> HistoryError {
        self.0.busy_refusals.fetch_add(1, Ordering::Relaxed);
        busy.into()
    }
}
