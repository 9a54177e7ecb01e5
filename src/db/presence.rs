//! The presence queries (migrations 0008, 0009): one instance's heartbeat and liveness lock, its
//! watcher counts, and the sums over every live instance. The schedule that calls them is
//! `presence`'s.
//!
//! Imports `product` only.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgExecutor, Row};

use crate::product::ProductId;

/// Advisory lock class of the liveness locks (`"rowp"`); the second key is an instance's
/// `lock_key` (migration 0009).
pub const LIVENESS_LOCK_CLASS: i32 = 0x726F_7770;

/// A session of its own holding this instance's liveness lock: PostgreSQL releases the lock
/// when the session ends, however the process ends, and other instances then sweep its counts.
#[derive(Debug)]
pub struct LivenessLock {
    session: PgConnection,
    key: i32,
}

impl LivenessLock {
    /// Opens the session and takes a free key (random: instances never coordinate keys).
    pub async fn take(options: &PgConnectOptions) -> Result<Self, sqlx::Error> {
        let mut session = PgConnection::connect_with(options).await?;
        loop {
            let key = rand::random::<i32>();
            let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(LIVENESS_LOCK_CLASS)
                .bind(key)
                .fetch_one(&mut session)
                .await?;
            if taken {
                return Ok(Self { session, key });
            }
        }
    }

    /// The key other instances see in this instance's row.
    pub fn key(&self) -> i32 {
        self.key
    }

    /// Fails if the session (and with it the lock) is gone.
    pub async fn check(&mut self) -> Result<(), sqlx::Error> {
        self.session.ping().await
    }

    /// Ends the session, releasing the lock.
    pub async fn release(self) {
        // Closing fails only if the session is gone already, which released the lock too.
        let _ = self.session.close().await;
    }
}

/// Keeps instance `instance` alive for `expiry`, holding its liveness lock under `lock_key`
/// (None: it holds none); true if its row had to be created (first heartbeat, or the table
/// lost it: the caller writes all its counts again).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    instance: i64,
    expiry: Duration,
    lock_key: Option<i32>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(include_str!("../../sql/presence_heartbeat.sql"))
        .bind(instance)
        .bind(expiry.as_secs_f64())
        .bind(lock_key)
        .fetch_one(db)
        .await
}

/// Deletes, with their counts, instances whose heartbeat expired or whose liveness lock is
/// free (except `caller`'s own row from the lock test).
pub async fn expire(db: impl PgExecutor<'_>, caller: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(include_str!("../../sql/presence_expire.sql"))
        .bind(caller)
        .execute(db)
        .await?
        .rows_affected())
}

/// Deletes instance `instance` and its counts (it stops).
pub async fn leave(db: impl PgExecutor<'_>, instance: i64) -> Result<(), sqlx::Error> {
    sqlx::query(include_str!("../../sql/presence_leave.sql"))
        .bind(instance)
        .execute(db)
        .await?;
    Ok(())
}

/// Sets instance `instance`'s watcher counts of `counts`' products (0 deletes the row).
pub async fn write(
    db: impl PgExecutor<'_>,
    instance: i64,
    counts: &[(ProductId, usize)],
) -> Result<(), sqlx::Error> {
    let products: Vec<i64> = counts.iter().map(|(product, _)| product.get()).collect();
    // A count is bounded by the sessions of one process, far below i32::MAX.
    let watchers: Vec<i32> = counts
        .iter()
        .map(|(_, n)| i32::try_from(*n).unwrap_or(i32::MAX))
        .collect();
    sqlx::query(include_str!("../../sql/presence_write.sql"))
        .bind(instance)
        .bind(products)
        .bind(watchers)
        .execute(db)
        .await?;
    Ok(())
}

/// The watchers of `products` summed over every live instance; products without any are
/// absent.
pub async fn sums(
    db: impl PgExecutor<'_>,
    products: &[ProductId],
) -> Result<HashMap<ProductId, u64>, sqlx::Error> {
    let ids: Vec<i64> = products.iter().map(|product| product.get()).collect();
    let rows = sqlx::query(include_str!("../../sql/presence_sums.sql"))
        .bind(ids)
        .fetch_all(db)
        .await?;
    let mut sums = HashMap::with_capacity(rows.len());
    for row in rows {
        let product: i64 = row.try_get("product_id")?;
        let watchers: i64 = row.try_get("watchers")?;
        if let Some(product) = ProductId::new(product) {
            sums.insert(product, u64::try_from(watchers).unwrap_or(0));
        }
    }
    Ok(sums)
}
