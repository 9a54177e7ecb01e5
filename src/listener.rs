//! The LISTEN task: one tokio-postgres connection of its own (`application_name`
//! `rowcast-listener`) that LISTENs on `product_change`, parses each payload once, encodes the
//! outbound frame once, and publishes it through the distributor handle.
//!
//! The connection is watched two ways: TCP keepalives, and a health query every
//! `--listener-health-interval` bounded by `--listener-health-timeout`, because a hung backend
//! raises no error on its own. On any failure it reconnects with exponential backoff and jitter.
//!
//! Changes committed while the connection is down are not seen by plain LISTEN/NOTIFY: Postgres
//! queues notifications only for connected listeners. Until the changelog (sequence numbers and
//! catch-up) exists, such changes are lost for WebSocket subscribers, and this is logged as a
//! gap on every reconnect. The loop is written so that catch-up slots in after `LISTEN` succeeds.
//!
//! Imports `product`, `protocol`, `distributor`, `config`, `shutdown`.

use std::pin::pin;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls, Notification};
use tracing::Instrument;

use crate::config::ListenerSettings;
use crate::distributor::DistributorHandle;
use crate::product::Change;
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
}

/// The LISTEN task's inputs.
#[derive(Debug)]
pub struct Listener {
    config: tokio_postgres::Config,
    settings: ListenerSettings,
    distributor: DistributorHandle<Utf8Bytes>,
    status: watch::Sender<ListenerStatus>,
}

/// The database URL could not be read by tokio-postgres.
#[derive(Debug, thiserror::Error)]
#[error("invalid database URL for the LISTEN connection: {0}")]
pub struct InvalidUrl(#[source] tokio_postgres::Error);

impl Listener {
    /// Prepares the task; nothing connects until [`Self::run`].
    pub fn new(
        database_url: &str,
        settings: ListenerSettings,
        distributor: DistributorHandle<Utf8Bytes>,
    ) -> Result<(Self, watch::Receiver<ListenerStatus>), InvalidUrl> {
        let mut config = tokio_postgres::Config::from_str(database_url).map_err(InvalidUrl)?;
        config
            .application_name("rowcast-listener")
            .connect_timeout(settings.health_timeout)
            .keepalives(true)
            .keepalives_idle(settings.health_interval)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        let (status, receiver) = watch::channel(ListenerStatus::default());
        Ok((
            Self {
                config,
                settings,
                distributor,
                status,
            },
            receiver,
        ))
    }

    /// Runs until shutdown: connect, LISTEN, forward; on failure back off and reconnect.
    pub async fn run(self, shutdown: Shutdown) {
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
                    "LISTEN connection lost; reconnecting. Changes committed until it is back are not delivered"
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
    async fn listen_once(&self) -> (bool, ConnectionEnded) {
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
                            if notifications_tx.send(notification).await.is_err() {
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
        self.status.send_modify(|status| status.connected = true);
        tracing::info!(channel = CHANNEL, "listening for product changes");

        let mut health = tokio::time::interval(self.settings.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            tokio::select! {
                notification = notifications.recv() => match notification {
                    Some(notification) => {
                        if self.forward(&notification).await.is_err() {
                            break ConnectionEnded::DistributorGone;
                        }
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

    /// Parses one notification and publishes its frame; unparseable payloads are skipped.
    async fn forward(
        &self,
        notification: &Notification,
    ) -> Result<(), crate::distributor::DistributorGone> {
        let change = match Change::parse(notification.payload()) {
            Ok(change) => change,
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
        let frame = Utf8Bytes::from(protocol::encode_change(&change));
        self.status
            .send_modify(|status| status.changes_received += 1);
        self.distributor
            .publish(change.product.product_id, frame)
            .await
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
