//! Presence: how many sockets watch each product, summed over every instance on the database,
//! for the clients that asked (`"presence":true` in a by-id subscribe). Counts only, never who.
//!
//! One task per instance, on the background pool. Every [`TICK`] it asks the distributor which
//! local subscriber counts changed ([`DistributorHandle::presence_changes`]: the actor notes
//! them as subscribes come and go, so asking costs what changed, not what exists), writes them
//! to `presence_counts` under this instance's random id, reads the sums over every live instance
//! for the products its presence clients watch, and hands a `presence` message to the
//! distributor for each product whose sum changed, at most once per [`MIN_GAP`] per product
//! (a count that changes faster is sent when the second is up, with its newest value).
//!
//! Liveness: a heartbeat each `--presence-expiry`/5 keeps this instance's row in
//! `presence_instances`; readers count only instances whose heartbeat has not expired, and each
//! heartbeat deletes expired instances with their counts. Each instance also holds a liveness
//! lock on a session of its own (migration 0009), which PostgreSQL releases when the process
//! dies, so each heartbeat also deletes the instances whose lock is free: a killed or crashed
//! instance's watchers leave the totals within one heartbeat (and a restarted instance sweeps
//! its predecessor before its first count), not at the expiry, which remains for instances that
//! hang with their sessions open. Clients hear of it a tick and at most [`MIN_GAP`] later. On
//! shutdown the task deletes its instance at once.
//!
//! A failed query is logged and retried at the next tick; after one, all counts are written
//! again, so nothing a failure lost stays lost. Latency from a subscribe on one instance to a
//! client on another: at most two ticks plus [`MIN_GAP`] (well under 2 s).
//!
//! Imports `db` (the presence queries), `distributor` (local counts, delivery), `protocol` (the
//! message), `product`, `config` (the expiry) and `shutdown`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::time::Instant;

use crate::config::PresenceSettings;
use crate::db::presence::{self as queries, LivenessLock};
use crate::distributor::{DistributorHandle, PresenceChanges};
use crate::product::ProductId;
use crate::protocol::{self, Frame};
use crate::shutdown::Shutdown;

/// How often local changes are written and sums read: 4 times a second, so a change reaches
/// every instance's clients well within the second a client may wait between counts anyway.
pub const TICK: Duration = Duration::from_millis(250);

/// How long the liveness lock's session may take to answer or to open: an unreachable
/// database must not hold up the tick (the heartbeat that follows reports the outage).
const LOCK_SESSION_TIMEOUT: Duration = Duration::from_secs(2);

/// At most one presence message per product per this interval (issue 16: "at most once per
/// second per product").
pub const MIN_GAP: Duration = Duration::from_secs(1);

/// What one product's clients were told last.
#[derive(Debug, Clone, Copy)]
struct Sent {
    watchers: u64,
    at: Instant,
}

/// The task's state between ticks.
#[derive(Debug)]
struct Presence {
    /// This instance's id in the presence tables (random per start).
    instance: i64,
    /// Local subscriber counts, as last written (products with none are absent).
    local: HashMap<ProductId, usize>,
    /// Local counts not yet written.
    unwritten: HashMap<ProductId, usize>,
    /// Everything must be written again (first heartbeat, lost rows, a failed write).
    rewrite: bool,
    /// What each watched product's clients were told last.
    sent: HashMap<ProductId, Sent>,
    /// Products whose count is due even if unchanged (a client just asked).
    due: HashSet<ProductId>,
    /// The products local presence clients hold (as the distributor last said).
    watched: Vec<ProductId>,
    /// The last tick's database work failed: further failures are not logged again until one
    /// succeeds (a database outage would otherwise log four warnings a second).
    failing: bool,
    next_heartbeat: Instant,
    /// Where the liveness lock's session connects.
    lock_options: PgConnectOptions,
    /// The liveness lock, while its session lives.
    lock: Option<LivenessLock>,
    /// Taking the lock failed last time (logged once until it succeeds).
    lock_failing: bool,
}

/// Runs presence for this instance until shutdown, then removes its counts.
pub async fn run(
    pool: PgPool,
    lock_options: PgConnectOptions,
    distributor: DistributorHandle<Frame>,
    settings: PresenceSettings,
    shutdown: Shutdown,
) {
    let mut presence = Presence::new(rand::random::<i64>(), lock_options);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Ok(changes) = distributor.presence_changes().await else {
            break;
        };
        let counts = presence.step(&pool, &settings, changes).await;
        if !counts.is_empty() && distributor.publish_presence(counts).await.is_err() {
            break;
        }
    }
    if let Err(err) = queries::leave(&pool, presence.instance).await {
        tracing::warn!(cause = %err, "could not remove this instance's presence counts; they expire");
    }
    if let Some(lock) = presence.lock.take() {
        lock.release().await;
    }
}

impl Presence {
    fn new(instance: i64, lock_options: PgConnectOptions) -> Self {
        Self {
            instance,
            local: HashMap::new(),
            unwritten: HashMap::new(),
            // Nothing of this instance is in the tables yet.
            rewrite: true,
            sent: HashMap::new(),
            due: HashSet::new(),
            watched: Vec::new(),
            failing: false,
            next_heartbeat: Instant::now(),
            lock_options,
            lock: None,
            lock_failing: false,
        }
    }

    /// Keeps the liveness lock's session open, opening a new one if it ended. Without it, only
    /// the expiry tells others this instance died, as before migration 0009.
    async fn hold_lock(&mut self) {
        if let Some(lock) = &mut self.lock {
            if let Ok(Ok(())) = tokio::time::timeout(LOCK_SESSION_TIMEOUT, lock.check()).await {
                return;
            }
            self.lock = None;
        }
        let taken =
            tokio::time::timeout(LOCK_SESSION_TIMEOUT, LivenessLock::take(&self.lock_options))
                .await
                .unwrap_or_else(|_| {
                    Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the session did not open within {LOCK_SESSION_TIMEOUT:?}"),
                    )))
                });
        match taken {
            Ok(lock) => {
                self.lock = Some(lock);
                self.lock_failing = false;
            }
            Err(err) if !self.lock_failing => {
                self.lock_failing = true;
                tracing::warn!(
                    cause = %err,
                    "presence: no liveness lock; if this instance dies its watchers count until \
                     --presence-expiry"
                );
            }
            Err(err) => tracing::debug!(cause = %err, "presence: still no liveness lock"),
        }
    }

    /// One tick: heartbeat if due, write local changes, read sums, and return the messages due.
    async fn step(
        &mut self,
        pool: &PgPool,
        settings: &PresenceSettings,
        changes: PresenceChanges,
    ) -> Vec<(ProductId, Frame)> {
        for (product, count) in changes.counts {
            self.unwritten.insert(product, count);
        }
        self.due.extend(changes.fresh);
        if let Some(watched) = changes.watched {
            self.watched = watched;
        }
        if let Err(err) = self.share(pool, settings).await {
            self.failed(&err, "writing this instance's counts");
            self.rewrite = true;
            return Vec::new();
        }
        if std::mem::take(&mut self.failing) {
            tracing::info!("presence: database work succeeds again");
        }
        if self.watched.is_empty() {
            self.sent.clear();
            self.due.clear();
            return Vec::new();
        }
        match queries::sums(pool, &self.watched).await {
            Ok(sums) => {
                let watched = std::mem::take(&mut self.watched);
                let messages = self.due_messages(&watched, &sums, Instant::now());
                self.watched = watched;
                messages
            }
            Err(err) => {
                self.failed(&err, "reading the counts");
                Vec::new()
            }
        }
    }

    /// Logs a failed tick once per outage; the next tick retries.
    fn failed(&mut self, err: &sqlx::Error, what: &str) {
        if self.failing {
            tracing::debug!(cause = %err, what, "presence: still failing");
        } else {
            tracing::warn!(cause = %err, what, "presence: database work failed; retrying every tick");
        }
        self.failing = true;
    }

    /// Heartbeat (when due) and this instance's count changes (all its counts, when its rows
    /// may be gone). What a failed query did not write stays to be written.
    async fn share(
        &mut self,
        pool: &PgPool,
        settings: &PresenceSettings,
    ) -> Result<(), sqlx::Error> {
        let now = Instant::now();
        let mut everything = self.rewrite;
        if now >= self.next_heartbeat || self.rewrite {
            self.hold_lock().await;
            let key = self.lock.as_ref().map(LivenessLock::key);
            everything |= queries::heartbeat(pool, self.instance, settings.expiry, key).await?;
            queries::expire(pool, self.instance).await?;
            self.next_heartbeat = now + settings.heartbeat();
        }
        if !everything && self.unwritten.is_empty() {
            return Ok(());
        }
        let mut batch: HashMap<ProductId, usize> = if everything {
            self.local.clone()
        } else {
            HashMap::new()
        };
        batch.extend(
            self.unwritten
                .iter()
                .map(|(product, count)| (*product, *count)),
        );
        let counts: Vec<(ProductId, usize)> = batch.iter().map(|(p, c)| (*p, *c)).collect();
        queries::write(pool, self.instance, &counts).await?;
        self.unwritten.clear();
        self.rewrite = false;
        for (product, count) in batch {
            if count == 0 {
                self.local.remove(&product);
            } else {
                self.local.insert(product, count);
            }
        }
        Ok(())
    }

    /// The messages due now: products whose sum differs from what their clients were told (or
    /// that a client just asked for), unless they were told within [`MIN_GAP`].
    fn due_messages(
        &mut self,
        watched: &[ProductId],
        sums: &HashMap<ProductId, u64>,
        now: Instant,
    ) -> Vec<(ProductId, Frame)> {
        let watched_set: HashSet<ProductId> = watched.iter().copied().collect();
        self.sent.retain(|product, _| watched_set.contains(product));
        self.due.retain(|product| watched_set.contains(product));
        let mut messages = Vec::new();
        for &product in watched {
            let watchers = sums.get(&product).copied().unwrap_or(0);
            let last = self.sent.get(&product).copied();
            let changed = last.is_none_or(|sent| sent.watchers != watchers);
            if !changed && !self.due.contains(&product) {
                continue;
            }
            if last.is_some_and(|sent| now.duration_since(sent.at) < MIN_GAP) {
                continue;
            }
            self.due.remove(&product);
            self.sent.insert(product, Sent { watchers, at: now });
            messages.push((product, protocol::encode_presence(product, watchers).into()));
        }
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: i64) -> ProductId {
        ProductId::new(raw).unwrap()
    }

    fn presence() -> Presence {
        Presence::new(1, PgConnectOptions::new())
    }

    fn products(messages: &[(ProductId, Frame)]) -> Vec<i64> {
        messages.iter().map(|(product, _)| product.get()).collect()
    }

    #[test]
    fn a_count_is_sent_when_it_changes_at_most_once_a_second_and_when_asked_for() {
        let mut state = presence();
        let start = Instant::now();
        let watched = [id(1), id(2)];
        let sums = HashMap::from([(id(1), 2)]);
        // First sight: both are sent (2 has no watchers anywhere: 0).
        let first = state.due_messages(&watched, &sums, start);
        assert_eq!(products(&first), [1, 2]);
        assert_eq!(
            first[0].1.as_str(),
            r#"{"type":"presence","productId":1,"watchers":2}"#
        );
        // Unchanged: nothing.
        assert!(
            state
                .due_messages(&watched, &sums, start + MIN_GAP)
                .is_empty()
        );
        // Changed within the second: held back, then sent with the newest value.
        let sums = HashMap::from([(id(1), 3)]);
        assert!(state.due_messages(&watched, &sums, start + TICK).is_empty());
        let later = state.due_messages(&watched, &sums, start + MIN_GAP);
        assert_eq!(products(&later), [1]);
        // A client asked for 2: sent although unchanged, once the second is up.
        state.due.insert(id(2));
        assert_eq!(
            products(&state.due_messages(&watched, &sums, start + MIN_GAP * 2)),
            [2]
        );
        // No longer watched: forgotten, so a later watcher is told again.
        assert!(
            state
                .due_messages(&[id(1)], &sums, start + MIN_GAP * 3)
                .is_empty()
        );
        assert!(!state.sent.contains_key(&id(2)));
    }
}
