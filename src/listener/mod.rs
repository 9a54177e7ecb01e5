//! The LISTEN task: one tokio-postgres connection of its own (`application_name`
//! `rowcast-listener`) that LISTENs on `product_change` and publishes, in seq order, every change
//! the changelog holds after the last one it published, each encoded once.
//!
//! **Notifications are hints, never the truth.** Any database login may NOTIFY on any channel,
//! so a payload proves nothing. A notification only wakes the task; what it publishes is read
//! from the changelog (`product_changes`), which only the trigger can write (migration 0005). All
//! notifications that arrived while a read was running are served by the next single read; a
//! notification naming a seq already published costs nothing; a forged, garbled, replayed or
//! out-of-range one costs at most one read that finds nothing new.
//!
//! The source does not matter here: with `--source replication` the changelog is written by
//! the elected WAL reader (`replication`), which sends one notification per batch it commits,
//! and this task reads after its position exactly as it does behind the trigger (on the
//! reader's own instance, see the hand-off below).
//!
//! The connection is watched two ways: TCP keepalives, and a health query every
//! `--listener-health-interval` bounded by `--listener-health-timeout`, because a hung backend
//! raises no error on its own. On any failure it reconnects with exponential backoff and jitter;
//! the backoff is reset only once a connection has caught up and stayed healthy for a health
//! interval, so a catch-up that keeps failing cannot turn into a reconnect storm.
//!
//! Nothing is lost while the connection is down: after each `LISTEN` the task reads the
//! changelog from its position. Gaps it cannot fill are announced, never skipped silently:
//! - if retention pruned changes after its position (an outage longer than retention), or
//! - if the database's history no longer continues from its position (checked at every health
//!   tick: the change it published last must still be there with the same commit time, and the
//!   newest seq must not be below it — a restore, a failover to a lagging replica, a re-created
//!   database),
//!
//! it re-bases on the database's newest seq and tells the distributor to reset every
//! subscription (each subscriber then gets `reset` and a snapshot).
//!
//! **Dispatch lag** (`rowcast_dispatch_lag_seconds`) is measured from the moment the first of a
//! batch of notifications is read off the LISTEN socket to the moment the changes read for it
//! have entered the distributor: notifications waiting behind others, the changelog read, and a
//! busy distributor inbox. Changes read during the catch-up after a reconnect or at a health
//! tick have no arrival time (`rowcast_changes_received_total{source="changelog"}` counts them);
//! nor have changes handed over by the reader (`source="reader"`).
//!
//! **The leader's own batches are handed over, not read back.** With `--source replication`, the
//! instance whose reader leads gets each batch's committed changes from the reader (`handoff`)
//! and publishes them when they follow its position. While its reader leads, this task does not
//! even LISTEN (`UNLISTEN`, then a read; `LISTEN` and a read again when the leadership ends):
//! every change comes from that reader, and its notifications would wake this connection's
//! backend and this task once per batch for nothing. A notification that still arrives from the
//! leading session's backend (sent before the `UNLISTEN`) needs no read. Every other case reads.
//!
//! Its changelog reads run on a connection of its own, opened beside the LISTEN connection and
//! replaced with it, which no client can reach: a crowd of clients replaying history exhausts the
//! history pool, never this task's connections, so their load cannot delay publishing or make the
//! health check fail. Not a pooled one: a pool's acquire and release (sqlx pings every connection
//! it takes back) cost a round trip per read, for a task that reads one page at a time anyway.
//!
//! Imports `product`, `protocol`, `distributor`, `config`, `shutdown`, `metrics`, and
//! `db::changelog` (the same queries clients' resumes use; its own LISTEN connection stays
//! tokio-postgres), `db::PgTarget` and `db::tls` (it connects from the pools' parse of the
//! database URL, with the same TLS rules, so the two cannot disagree).

mod connect;
mod handoff;
mod status;

use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Notification};
use tracing::Instrument;

pub use connect::ConnectOptions;
pub use handoff::{FromReader, Handoff, HandoffInbox, HandoffSender, handoff};
pub use status::ListenerStatus;

use crate::config::ListenerSettings;
use crate::db::changelog::{self, ChangelogError, LoggedChange};
use crate::distributor::DistributorHandle;
use crate::metrics::Metrics;
use crate::product::{Change, ResetCause, Seq, notification_hint};
use crate::protocol::{self, Frame};
use crate::shutdown::Shutdown;

/// The channel the trigger in `migrations/0002_product_change_trigger.sql` notifies.
pub const CHANNEL: &str = "product_change";

/// The receiving end of the listener's status: what `/stats`, `/readyz` and `/metrics` read.
pub type ListenerWatch = watch::Receiver<ListenerStatus>;

/// First reconnect delay; doubles up to `--listener-max-backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Notifications buffered between the connection driver and the forwarding loop.
const NOTIFICATION_BUFFER: usize = 1024;

/// What woke a changelog read, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadCause {
    Notification,
    CatchUp,
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnded {
    #[error("connecting failed: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("connecting failed over TLS: {message}")]
    Tls {
        message: String,
        source: tokio_postgres::Error,
    },
    #[error("the connection failed: {0}")]
    Lost(#[source] tokio_postgres::Error),
    #[error("the connection closed")]
    Closed,
    #[error("health query did not answer within {0:?}")]
    Unhealthy(Duration),
    #[error("the distributor stopped")]
    DistributorGone,
    #[error("reading the changelog failed: {0}")]
    Changelog(#[from] ChangelogError),
    #[error("opening the changelog connection failed: {0}")]
    ReadConnection(#[source] sqlx::Error),
    #[error("opening the changelog connection did not finish within {0:?}")]
    ReadConnectionTimeout(Duration),
}

impl From<crate::distributor::DistributorGone> for ConnectionEnded {
    fn from(_: crate::distributor::DistributorGone) -> Self {
        Self::DistributorGone
    }
}

/// The LISTEN task's inputs.
#[derive(Debug)]
pub struct Listener {
    connect: ConnectOptions,
    settings: ListenerSettings,
    distributor: DistributorHandle<Frame>,
    /// The changelog reads of catch-ups and history checks: the connection of the current
    /// LISTEN connection's life (None between lives).
    reader: Option<sqlx::PgConnection>,
    status: watch::Sender<ListenerStatus>,
    last_seq: Seq,
    /// The commit time of the change at `last_seq`, once known: with the seq it identifies
    /// that change in this database's history.
    anchor: Option<String>,
    /// The leading replication reader's batches, when this instance runs one.
    handoff: Option<HandoffInbox>,
    metrics: Metrics,
}

impl Listener {
    /// Prepares the task; nothing connects until [`Self::run`]. `last_seq` is the position the
    /// distributor starts from: every change after it will be published.
    pub fn new(
        connect: ConnectOptions,
        settings: ListenerSettings,
        distributor: DistributorHandle<Frame>,
        last_seq: Seq,
        handoff: Option<HandoffInbox>,
        metrics: Metrics,
    ) -> (Self, ListenerWatch) {
        let (status, receiver) = watch::channel(ListenerStatus {
            last_seq,
            ..ListenerStatus::default()
        });
        (
            Self {
                connect,
                settings,
                distributor,
                reader: None,
                status,
                last_seq,
                anchor: None,
                handoff,
                metrics,
            },
            receiver,
        )
    }

    /// Runs until shutdown: connect, LISTEN, forward; on failure back off and reconnect.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut backoff = INITIAL_BACKOFF;
        let mut attempts: u64 = 0;
        loop {
            let started = tokio::time::Instant::now();
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.listen_once() => outcome,
            };
            self.status.send_modify(|status| {
                status.connected = false;
                status.listening = false;
            });
            let (caught_up, err) = outcome;
            if matches!(err, ConnectionEnded::DistributorGone) {
                return;
            }
            // Only a connection that caught up and then stayed healthy for a health interval
            // earns a fresh backoff; anything shorter counts as one more failed attempt.
            if caught_up && started.elapsed() >= self.settings.health_interval {
                backoff = INITIAL_BACKOFF;
                self.status.send_modify(|status| status.failed_attempts = 0);
                tracing::warn!(
                    cause = %err,
                    last_seq = self.last_seq,
                    "LISTEN connection lost; reconnecting, then catching up from the changelog"
                );
            } else {
                tracing::warn!(cause = %err, retry_in = ?backoff, "LISTEN connection failed");
            }
            attempts += 1;
            self.status.send_modify(|status| {
                status.reconnects = attempts;
                status.failed_attempts += 1;
            });
            let delay = jitter(backoff);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(self.settings.max_backoff);
        }
    }

    /// One connection's life. Returns whether it caught up, and why it ended.
    async fn listen_once(&mut self) -> (bool, ConnectionEnded) {
        let (client, mut connection) = match self.connect.connect().await {
            Ok(pair) => pair,
            Err(err) => return (false, err),
        };
        // A new life gets a new read connection too: whatever broke one may have broken both.
        self.reader = None;
        match self.connect.connect_reads().await {
            Ok(reader) => self.reader = Some(reader),
            Err(err) => return (false, err),
        }
        // The connection object must be polled for the client to work; it also yields the
        // notifications. It runs beside this loop and hands notifications over a channel.
        let (notifications_tx, mut notifications) = mpsc::channel(NOTIFICATION_BUFFER);
        let driver = tokio::spawn(
            async move {
                let mut messages = pin!(futures_util::stream::poll_fn(
                    move |cx| connection.poll_message(cx)
                ));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(notification)) => {
                            let arrived = tokio::time::Instant::now();
                            if notifications_tx
                                .send((notification, arrived))
                                .await
                                .is_err()
                            {
                                return Ok(());
                            }
                        }
                        Ok(_) => {}
                        Err(err) => return Err(err),
                    }
                }
                Ok(())
            }
            .instrument(tracing::debug_span!("listener_connection")),
        );
        let abort_driver = DropAbort(driver.abort_handle());

        if let Err(err) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            return (false, ConnectionEnded::Lost(err));
        }
        // LISTEN is active, so anything committed from now on is notified; whatever committed
        // since the last published seq is in the changelog.
        if let Err(err) = self.check_history().await {
            return (false, err);
        }
        if let Err(err) = self.catch_up(ReadCause::CatchUp).await {
            return (false, err);
        }
        self.status.send_modify(|status| {
            status.connected = true;
            status.listening = true;
            status.failed_attempts = 0;
        });
        if let Err(err) = self.follow_leader(&client).await {
            return (false, err);
        }
        tracing::info!(
            channel = CHANNEL,
            last_seq = self.last_seq,
            "listening for product changes"
        );

        let mut health = tokio::time::interval(self.settings.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.reset();
        let ended = loop {
            tokio::select! {
                notification = notifications.recv() => match notification {
                    Some((notification, arrived)) => {
                        self.status.send_modify(|status| status.notifications += 1);
                        if let Err(err) = self.wake(&notification, &mut notifications).await {
                            break err;
                        }
                        self.metrics.observe_dispatch_lag(arrived.elapsed());
                    }
                    None => break match driver_result(driver).await {
                        Some(err) => ConnectionEnded::Lost(err),
                        None => ConnectionEnded::Closed,
                    },
                },
                from_reader = next_from_reader(self.handoff.as_mut()) => {
                    let taken = match from_reader {
                        FromReader::Batch(handoff) => self.take_handoff(handoff).await,
                        FromReader::Leadership => self.follow_leader(&client).await,
                    };
                    if let Err(err) = taken {
                        break err;
                    }
                }
                _ = health.tick() => {
                    match tokio::time::timeout(self.settings.health_timeout, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => break ConnectionEnded::Lost(err),
                        Err(_) => break ConnectionEnded::Unhealthy(self.settings.health_timeout),
                    }
                    match tokio::time::timeout(self.settings.health_timeout, self.check_history()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => break err,
                        Err(_) => break ConnectionEnded::Unhealthy(self.settings.health_timeout),
                    }
                    // A safety net: anything committed but not yet published (a notification
                    // lost with a connection) is read now.
                    if let Err(err) = self.catch_up(ReadCause::CatchUp).await {
                        break err;
                    }
                }
            }
        };
        drop(abort_driver);
        (true, ended)
    }

    /// LISTENs only while this instance's replication reader does not lead. While it leads it
    /// writes every change the changelog gets and hands each batch over, so its notifications
    /// would wake this connection's backend and this task for nothing, once per batch. Each
    /// switch is followed by a read: it covers whatever committed while no notification could
    /// reach this connection (another leader's batches just before LISTEN, the trigger's last
    /// changes just before UNLISTEN).
    async fn follow_leader(
        &mut self,
        client: &tokio_postgres::Client,
    ) -> Result<(), ConnectionEnded> {
        let leads = self
            .handoff
            .as_mut()
            .is_some_and(HandoffInbox::reader_leads);
        // The status is the one record of whether this connection LISTENs.
        if leads != self.status.borrow().listening {
            return Ok(());
        }
        let command = if leads { "UNLISTEN" } else { "LISTEN" };
        client
            .batch_execute(&format!("{command} {CHANNEL}"))
            .await
            .map_err(ConnectionEnded::Lost)?;
        self.status.send_modify(|status| status.listening = !leads);
        self.catch_up(ReadCause::CatchUp).await
    }

    /// Serves one notification and every other one already waiting with at most one changelog
    /// read. Payloads are hints: one naming a seq already published needs no read.
    async fn wake(
        &mut self,
        first: &Notification,
        more: &mut mpsc::Receiver<(Notification, tokio::time::Instant)>,
    ) -> Result<(), ConnectionEnded> {
        let mut read = self.needs_read(first);
        while let Ok((notification, _)) = more.try_recv() {
            read |= self.needs_read(&notification);
        }
        if read {
            self.catch_up(ReadCause::Notification).await?;
        }
        Ok(())
    }

    fn needs_read(&self, notification: &Notification) -> bool {
        if let Some(inbox) = &self.handoff {
            if inbox.announced_by_reader(notification.process_id()) {
                // Its batch comes through the hand-off (or, if that was dropped, the
                // overflow mark makes the next hand-off read).
                return inbox.take_overflow();
            }
        }
        match notification_hint(notification.payload()) {
            Some(seq) => seq > self.last_seq,
            None => {
                self.status
                    .send_modify(|status| status.payloads_skipped += 1);
                tracing::debug!(
                    payload_bytes = notification.payload().len(),
                    "a notification on the channel names no seq; reading the changelog anyway"
                );
                true
            }
        }
    }

    /// The read connection of this life.
    fn reader(&mut self) -> Result<&mut sqlx::PgConnection, ConnectionEnded> {
        // listen_once opens it before any read; None would be a bug, reported as a lost
        // connection so the task reconnects rather than panics.
        self.reader.as_mut().ok_or(ConnectionEnded::Closed)
    }

    /// Publishes every change in the changelog after the last published seq, a bounded page at
    /// a time; re-bases (and resets subscribers) if retention removed changes it still needed.
    async fn catch_up(&mut self, cause: ReadCause) -> Result<(), ConnectionEnded> {
        loop {
            let after = self.last_seq;
            let page = changelog::after(self.reader()?, after).await?;
            self.status
                .send_modify(|status| status.changelog_reads += 1);
            if self.last_seq > page.pruned_through
                && self.anchor.is_some()
                && page.committed_at_of != self.anchor
            {
                // The change published last is gone or another one: a rewound history that
                // has already grown past our position.
                let position = changelog::position(self.reader()?, 0).await?;
                let latest = position.latest;
                self.rebase(position, ResetCause::Rewound { latest })
                    .await?;
                continue;
            }
            if page.pruned_through > self.last_seq {
                let position = changelog::position(self.reader()?, 0).await?;
                self.rebase(
                    position,
                    ResetCause::Pruned {
                        pruned_through: page.pruned_through,
                    },
                )
                .await?;
                continue;
            }
            for logged in page.changes {
                self.publish(&logged.change).await?;
                // Moved, not copied: kept in step with `last_seq` (see `check_history`).
                self.anchor = Some(logged.committed_at);
                self.status.send_modify(|status| match cause {
                    ReadCause::Notification => status.changes_received += 1,
                    ReadCause::CatchUp => status.changes_read_from_changelog += 1,
                });
            }
            if !page.more {
                return Ok(());
            }
        }
    }

    /// Publishes a batch the reader handed over if it follows the last published change;
    /// reads the changelog in every other case.
    async fn take_handoff(&mut self, handoff: Handoff) -> Result<(), ConnectionEnded> {
        let overflowed = self
            .handoff
            .as_ref()
            .is_some_and(HandoffInbox::take_overflow);
        let changes = match handoff {
            Handoff::Committed(changes) if !overflowed => changes,
            _ => return self.catch_up(ReadCause::Notification).await,
        };
        let published = self.last_seq;
        let fresh = changes
            .into_iter()
            .skip_while(|logged| logged.change.seq <= published);
        for LoggedChange {
            change,
            committed_at,
            ..
        } in fresh
        {
            if change.seq != self.last_seq + 1 {
                // Seqs are not dense (a failed batch, a crash, a gap's horizon take some): a
                // change that does not follow may have one before it that only a read shows.
                return self.catch_up(ReadCause::Notification).await;
            }
            self.publish(&change).await?;
            self.anchor = Some(committed_at);
            self.status
                .send_modify(|status| status.changes_handed_over += 1);
        }
        Ok(())
    }

    /// Checks that the database's history still continues from the last published change;
    /// if not, re-bases on its newest seq and resets every subscription.
    async fn check_history(&mut self) -> Result<(), ConnectionEnded> {
        let since = self.last_seq;
        let position = changelog::position(self.reader()?, since).await?;
        let anchor_gone = self.last_seq > position.pruned_through
            && self
                .anchor
                .as_ref()
                .is_some_and(|anchor| position.committed_at_of.as_ref() != Some(anchor));
        if position.latest < self.last_seq || anchor_gone {
            let latest = position.latest;
            self.rebase(position, ResetCause::Rewound { latest })
                .await?;
        } else if self.anchor.is_none() {
            // At start the position came from the database itself: learn the change there.
            self.anchor = position.committed_at_of;
        }
        Ok(())
    }

    /// Continues from the database's newest change, telling every subscriber to start again.
    async fn rebase(
        &mut self,
        position: changelog::Position,
        cause: ResetCause,
    ) -> Result<(), ConnectionEnded> {
        let since = self.last_seq;
        tracing::warn!(
            since,
            latest = position.latest,
            ?cause,
            "the changelog cannot continue from the last published change; \
             every subscription restarts from a snapshot"
        );
        self.distributor
            .reset(since, position.latest, cause)
            .await?;
        self.last_seq = position.latest;
        self.anchor = position.latest_committed_at;
        self.status
            .send_modify(|status| status.last_seq = position.latest);
        Ok(())
    }

    async fn publish(&mut self, change: &Change) -> Result<(), ConnectionEnded> {
        let frame = Frame::from(protocol::encode_change(change));
        self.distributor
            .publish(change.product.product_id, change.seq, frame)
            .await?;
        self.last_seq = change.seq;
        self.status
            .send_modify(|status| status.last_seq = change.seq);
        self.metrics.change_dispatched();
        Ok(())
    }
}

/// What this instance's reader has for the listener next; pending for ever without a reader.
async fn next_from_reader(inbox: Option<&mut HandoffInbox>) -> FromReader {
    match inbox {
        Some(inbox) => inbox.next().await,
        None => std::future::pending().await,
    }
}

/// The driver's error, if it ended with one.
async fn driver_result(
    driver: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) -> Option<tokio_postgres::Error> {
    match driver.await {
        Ok(Err(err)) => Some(err),
        _ => None,
    }
}

struct DropAbort(tokio::task::AbortHandle);

impl Drop for DropAbort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spreads reconnects of many instances over ±25 % so they do not stampede the database.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.75..1.25))
}
