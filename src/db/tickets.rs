//! WebSocket tickets shared by every instance on the database (table `ws_tickets`, migration
//! 0006): only SHA-256 digests, with their expiry. `access` owns what a ticket is and when one
//! is asked for; this module only stores and consumes digests, one SQL file per query.

use std::time::Duration;

use super::RestPool;

/// Stores `digest`, valid for `ttl`, unless `max_outstanding` unexpired tickets are already
/// stored; prunes expired ones. False when the bound refused it.
pub async fn issue(
    pool: &RestPool,
    digest: &[u8; 32],
    ttl: Duration,
    max_outstanding: i64,
) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let stored = sqlx::query(include_str!("../../sql/ws_ticket_issue.sql"))
        .bind(digest.as_slice())
        .bind(ttl.as_secs_f64())
        .bind(max_outstanding)
        .fetch_optional(&mut *conn)
        .await?;
    conn.settle();
    Ok(stored.is_some())
}

/// Consumes the ticket with `digest`: true if it was stored and unexpired. One statement, so
/// it succeeds once across all instances.
pub async fn redeem(pool: &RestPool, digest: &[u8; 32]) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let consumed = sqlx::query(include_str!("../../sql/ws_ticket_redeem.sql"))
        .bind(digest.as_slice())
        .fetch_optional(&mut *conn)
        .await?;
    conn.settle();
    Ok(consumed.is_some())
}
