//! The LISTEN task: one tokio-postgres connection of its own (`application_name`
//! `rowcast-listener`) that LISTENs on `product_change`, parses each payload once, encodes the
//! outbound frame once, and publishes it through the distributor handle.
//!
//! The connection is watched two ways: TCP keepalives, and a health query every
//! `--listener-health-interval` bounded by `--listener-health-timeout`, because a hung backend
//! raises no error on its own. On any failure it reconnects with exponential backoff and jitter.
//!
//! Nothing is lost while the connection is down: every change is also in the changelog with a
//! commit-ordered `seq`. The listener remembers the last seq it published; after each `LISTEN`
//! it reads the changelog from there, and when a notification skips ahead (a gap, or a row too
//! large for a notification that carries only its seq) it reads the missing part. Changes are
//! published strictly in seq order, each exactly once.
//!
//! **Dispatch lag** (`rowcast_dispatch_lag_seconds`) is measured from the moment a notification
//! is read off the LISTEN socket to the moment its change (and any missing earlier ones read
//! from the changelog) has entered the distributor. The payload does not carry the commit time,
//! and it is not added: `Change` parsing refuses unknown fields, so a new payload field would
//! make older instances on the same database skip every notification during a rolling upgrade,
//! and `committed_at` comes from the database's clock, so the difference to ours would measure
//! clock skew as well. The trigger runs at commit time and Postgres delivers the notification
//! right after the commit, so arrival is commit plus the network; what the histogram shows is
//! the part rowcast controls: notifications waiting behind others, parsing, changelog reads
//! for gaps, and a busy distributor inbox. Changes read during the catch-up after a reconnect
//! have no arrival time and are not in the histogram (`rowcast_changes_received_total
//! {source="changelog"}` counts them).
//!
//! Imports `product`, `protocol`, `distributor`, `config`, `shutdown`, `metrics`, and
//! `db::changelog` (the same reads clients' resumes use; its own LISTEN connection stays
//! tokio-postgres).

use std::pin::pin;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls, Notification};
use tracing::Instrument;

use crate::config::ListenerSettings;
use crate::db::changelog::{self, ChangelogError};
use crate::distributor::DistributorHandle;
use crate::metrics::Metrics;
use crate::product::{Change, Notice, Seq};
use crate::protocol;
use crate::shutdown::Shutdown;

/// The channel the trigger in `migrations/0002_product_change_trigger.sql` notifies.
pub const CHANNEL: &str = "product_change";

/// First reconnect delay; doubles up to `--listener-max-backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Notifications buffered between the connection driver and the forwarding loop.
const NOTIFICATION_BUFFER: usize = 1024;

/// What the listener reports about itself (for `/stats` and readiness).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    /// True while LISTEN is active on a healthy connection.
    pub connected: bool,
    /// Connections replaced after a failure since start.
    pub reconnects: u64,
    /// Notifications received and published.
    pub changes_received: u64,
    /// Notifications whose payload could not be parsed (logged and skipped).
    pub payloads_skipped: u64,
    /// Changes read from the changelog instead of a notification (catch-up, gaps, large rows).
    pub changes_read_from_changelog: u64,
    /// The seq of the last change published.
    pub last_seq: Seq,
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnded {
    #[error("connecting failed: {0}")]
    Connect(#[source] tokio_postgres::Error),
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
}

impl From<crate::distributor::DistributorGone> for ConnectionEnded {
    fn from(_: crate::distributor::DistributorGone) -> Self {
        Self::DistributorGone
    }
}

/// The LISTEN task's inputs.
#[derive(Debug)]
pub struct Listener {
    config: tokio_postgres::Config,
    settings: ListenerSettings,
    distributor: DistributorHandle<Utf8Bytes>,
    pool: sqlx::PgPool,
    status: watch::Sender<ListenerStatus>,
    last_seq: Seq,
    metrics: Metrics,
}

/// The database URL could not be read by tokio-postgres.
#[derive(Debug, thiserror::Error)]
#[error("invalid database URL for the LISTEN connection: {0}")]
pub struct InvalidUrl(#[source] tokio_postgres::Error);

impl Listener {
    /// Prepares the task; nothing connects until [`Self::run`]. `last_seq` is the position the
    /// distributor starts from: every change after it will be published.
    pub fn new(
        database_url: &str,
        settings: ListenerSettings,
        distributor: DistributorHandle<Utf8Bytes>,
        pool: sqlx::PgPool,
        last_seq: Seq,
        metrics: Metrics,
    ) -> Result<(Self, watch::Receiver<ListenerStatus>), InvalidUrl> {
        let mut config = tokio_postgres::Config::from_str(database_url).map_err(InvalidUrl)?;
        config
            .application_name("rowcast-listener")
            .connect_timeout(settings.health_timeout)
            .keepalives(true)
            .keepalives_idle(settings.health_interval)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        let (status, receiver) = watch::channel(ListenerStatus {
            last_seq,
            ..ListenerStatus::default()
        });
        Ok((
            Self {
                config,
                settings,
                distributor,
                pool,
                status,
                last_seq,
                metrics,
            },
            receiver,
        ))
    }

    /// Runs until shutdown: connect, LISTEN, forward; on failure back off and reconnect.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut backoff = INITIAL_BACKOFF;
        let mut attempts: u64 = 0;
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.listen_once() => outcome,
            };
            self.status.send_modify(|status| status.connected = false);
            let (was_listening, err) = outcome;
            if matches!(err, ConnectionEnded::DistributorGone) {
                return;
            }
            if was_listening {
                backoff = INITIAL_BACKOFF;
                tracing::warn!(
                    cause = %err,
                    last_seq = self.last_seq,
                    "LISTEN connection lost; reconnecting, then catching up from the changelog"
                );
            } else {
                tracing::warn!(cause = %err, retry_in = ?backoff, "LISTEN connection failed");
            }
            attempts += 1;
            self.status
                .send_modify(|status| status.reconnects = attempts);
            let delay = jitter(backoff);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(self.settings.max_backoff);
        }
    }

    /// One connection's life. Returns whether LISTEN was established, and why it ended.
    async fn listen_once(&mut self) -> (bool, ConnectionEnded) {
        let (client, mut connection) = match self.config.connect(NoTls).await {
            Ok(pair) => pair,
            Err(err) => return (false, ConnectionEnded::Connect(err)),
        };
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
        if let Err(err) = self.catch_up(None).await {
            return (true, err);
        }
        self.status.send_modify(|status| status.connected = true);
        tracing::info!(
            channel = CHANNEL,
            last_seq = self.last_seq,
            "listening for product changes"
        );

        let mut health = tokio::time::interval(self.settings.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            tokio::select! {
                notification = notifications.recv() => match notification {
                    Some((notification, arrived)) => {
                        if let Err(err) = self.forward(&notification).await {
                            break err;
                        }
                        self.metrics.observe_dispatch_lag(arrived.elapsed());
                    }
                    None => break match driver_result(driver).await {
                        Some(err) => ConnectionEnded::Lost(err),
                        None => ConnectionEnded::Closed,
                    },
                },
                _ = health.tick() => {
                    match tokio::time::timeout(self.settings.health_timeout, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => break ConnectionEnded::Lost(err),
                        Err(_) => break ConnectionEnded::Unhealthy(self.settings.health_timeout),
                    }
                }
            }
        };
        drop(abort_driver);
        (true, ended)
    }

    /// Publishes one notification's change, reading the changelog first if earlier changes
    /// are missing or the payload carried only a seq. Unparseable payloads are skipped.
    async fn forward(&mut self, notification: &Notification) -> Result<(), ConnectionEnded> {
        let notice = match Notice::parse(notification.payload()) {
            Ok(notice) => notice,
            Err(err) => {
                self.status
                    .send_modify(|status| status.payloads_skipped += 1);
                tracing::warn!(
                    cause = %err,
                    payload_bytes = notification.payload().len(),
                    "skipping a notification whose payload is not a product change"
                );
                return Ok(());
            }
        };
        if notice.seq() <= self.last_seq {
            // Already published by a catch-up that overlapped with LISTEN.
            return Ok(());
        }
        match notice {
            Notice::Full(change) if change.seq == self.last_seq + 1 => {
                self.publish(&change).await?;
                self.status
                    .send_modify(|status| status.changes_received += 1);
                Ok(())
            }
            // A gap (a seq taken by a transaction that failed at commit, or a notification not
            // yet seen) or a large row: the changelog has everything up to this seq.
            other => self.catch_up(Some(other.seq())).await,
        }
    }

    /// Publishes every change in the changelog after the last published seq, up to `upto`.
    async fn catch_up(&mut self, upto: Option<Seq>) -> Result<(), ConnectionEnded> {
        loop {
            let page = changelog::after(&self.pool, self.last_seq).await?;
            let full_page = page.len() >= changelog::PAGE as usize;
            let mut read = 0;
            for change in &page {
                if upto.is_some_and(|upto| change.seq > upto) {
                    return Ok(());
                }
                self.publish(change).await?;
                read += 1;
            }
            self.status
                .send_modify(|status| status.changes_read_from_changelog += read);
            if !full_page {
                if let Some(upto) = upto.filter(|upto| *upto > self.last_seq) {
                    // Seqs taken by transactions that never committed leave holes for good.
                    self.last_seq = upto;
                }
                return Ok(());
            }
        }
    }

    async fn publish(&mut self, change: &Change) -> Result<(), ConnectionEnded> {
        let frame = Utf8Bytes::from(protocol::encode_change(change));
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
