//! The distributor: the one owner of who-is-subscribed-to-what. Sessions and the listener hold a
//! cheap cloneable [`DistributorHandle`] and talk to the actor only through its bounded command
//! channel; the actor hands each change to the outboxes of the subscribed sessions.
//!
//! It treats frames as opaque (`F`): it knows who wants product N, not what a message looks
//! like, so a change is encoded once by the listener and the same buffer is cloned (a reference
//! count, no copy) into every subscriber's outbox.
//!
//! The actor never waits for a session: each session has an [`outbox`] whose slow-client
//! policy (conflate, or disconnect with 1013) bounds what a slow reader costs and keeps it from
//! delaying anyone else. A plain WebSocket's outbox may also hold its socket: while that
//! session is idle and caught up, the actor writes the change's finished frame straight into it
//! (one non-blocking write, no task woken: the direct lane, see [`outbox`]), and falls back to
//! the queue for that session alone the moment its socket would block.
//!
//! Every change carries its `seq` (commit order). The actor remembers the last seq it
//! published, and each subscribe ack carries it: the subscriber's live stream holds exactly the
//! changes after that position, which lets the session fill in a resume or snapshot from the
//! changelog without a gap or a duplicate.
//!
//! It also enforces the budgets that add up over sessions (sessions and subscriptions, in all
//! and per client address), since it alone knows the totals. Operators read its counts without
//! asking it: the actor copies its running totals into atomics ([`counts`]) after each batch of
//! commands, so `/stats` and `/metrics` cost the actor nothing however often they are asked;
//! the views that walk its maps ([`Views`]) are asked for by one cache, at most once a second.
//!
//! Two additions beside the by-id maps (`actor::all_and_presence`): sessions subscribed to
//! the whole catalog (`"all":true`), a small set every publish also walks, and presence: the
//! actor notes which products' local subscriber counts changed (only once a presence task asks,
//! [`DistributorHandle::presence_changes`]) and hands the presence task's encoded counts to the
//! sessions that asked for them ([`DistributorHandle::publish_presence`]); sessions that did not
//! ask get nothing.
//!
//! Imports `product` (ids) and `config` (limits and budgets) only.

mod actor;
mod counts;
pub mod outbox;
mod subscriptions;

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Budgets, IpPrefix, Limits};
use crate::product::{ProductId, ResetCause, Seq, SubscriptionStart};

pub use actor::ALL_SUBSCRIPTION_WEIGHT;
pub use outbox::{DirectSocket, LaneGate, OutboxReceiver, RawTcp};
pub use subscriptions::{Budget, OverLimit, SessionId};

/// What the distributor needs of an encoded message (in the app, `protocol::Frame`): opaque,
/// cheap to clone (shared), and of a known size, so queues are bounded by bytes and by count.
pub trait FrameBytes: Clone + Send + 'static {
    /// Bytes the message holds.
    fn byte_len(&self) -> usize;

    /// The bytes written into a socket on the direct lane (see [`outbox`]): the whole frame.
    fn wire(&self) -> &[u8];
}

impl FrameBytes for &'static str {
    fn byte_len(&self) -> usize {
        self.len()
    }

    fn wire(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl FrameBytes for u64 {
    fn byte_len(&self) -> usize {
        8
    }

    fn wire(&self) -> &[u8] {
        &[]
    }
}

/// Commands in flight to the actor before senders wait: absorbs bursts of notifications and
/// commands without letting any client grow it without bound.
const COMMAND_CAPACITY: usize = 4096;

/// What a session's outbox carries, in the order the actor decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<F> {
    /// A change frame, shared by all its recipients.
    Change {
        /// The product it changed.
        product: ProductId,
        /// Its position in commit order.
        seq: Seq,
        /// The encoded message.
        frame: F,
    },
    /// The subscribe was applied; every change with seq > `position` follows in this outbox.
    Subscribed {
        /// The products, as requested (deduplicated).
        products: Vec<ProductId>,
        /// The last seq published before the subscription took effect.
        position: Seq,
        /// Where the client asked its stream to begin.
        start: SubscriptionStart,
        /// The session's subscription count after this command (for its log span).
        total: usize,
    },
    /// The unsubscribe was applied.
    Unsubscribed {
        /// The products, as requested (deduplicated).
        products: Vec<ProductId>,
        /// The session's subscription count after this command.
        total: usize,
    },
    /// The subscribe was refused whole: it would take a budget past its limit.
    Refused(OverLimit),
    /// The subscribe to every product was applied; every change with seq > `position` follows.
    SubscribedAll {
        /// The last seq published before the subscription took effect.
        position: Seq,
        /// Where the client asked its stream to begin.
        start: SubscriptionStart,
    },
    /// The subscribe to every product was dropped (by-id subscriptions stay).
    UnsubscribedAll,
    /// A product's watcher count, encoded by the presence task, for a session that asked.
    Presence {
        /// The encoded message.
        frame: F,
    },
    /// Changes to `products` with `after < seq <= upto` were not queued because the queue was
    /// full: the session reads them from the changelog when it gets here, at its own pace (see
    /// `outbox`). Further changes extend `upto` while this is the last entry.
    Gap {
        /// The session's subscriptions when the gap opened.
        products: Vec<ProductId>,
        /// Changes after this seq are missing from the queue.
        after: Seq,
        /// ...up to and including this one.
        upto: Seq,
        /// A session that reaches the gap after this instant had stopped reading
        /// (`--conflate-after` past the moment it opened).
        stale_at: std::time::Instant,
    },
    /// The stream cannot continue from the changelog (history pruned during an outage, or the
    /// database rewound): the session must start its subscriptions again from a snapshot.
    /// Changes after `position` follow in the outbox.
    Reset {
        /// The session's subscriptions.
        products: Vec<ProductId>,
        /// The last seq published before the reset.
        since: Seq,
        /// The position the distributor continues from.
        position: Seq,
        /// Why.
        cause: ResetCause,
    },
}

/// The actor's running totals, readable at any time without asking it (see [`counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = DistributorStats)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Connected sessions.
    pub sessions: usize,
    /// (session, product) subscription pairs.
    pub subscriptions: usize,
    /// Products with at least one subscriber.
    pub products_with_subscribers: usize,
    /// Sessions subscribed to every product (`"all":true`); each also counts 1 024 against the
    /// address and server subscription budgets (not in `subscriptions`).
    pub all_subscribers: usize,
    /// Changes published to the actor since start.
    pub changes_published: u64,
    /// Messages put into session outboxes since start.
    pub messages_queued: u64,
    /// Changes the actor wrote straight into subscribers' sockets (the direct lane of plain
    /// WebSockets), since start: delivered without passing through a queue.
    pub messages_written_directly: u64,
    /// Bytes of those changes' frames (headers included) handed to the sockets.
    pub bytes_written_directly: u64,
    /// Sessions disconnected because their outbox was full (disconnect policy), or because they
    /// left more replies unread than their queue holds (either policy).
    pub slow_sessions_evicted: u64,
    /// Changes not queued because a session's queue was full: the session reads them from the
    /// changelog when it catches up (conflate policy).
    pub changes_deferred: u64,
    /// Times the stream was reset (history pruned during an outage, or rewound).
    pub resets: u64,
    /// The seq of the last change published.
    #[schema(value_type = u64)]
    pub last_seq: Seq,
    /// Sessions and subscribes refused by a budget, by budget.
    pub refused: Refusals,
}

/// Refusals by budget since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Refusals {
    /// Sessions refused because the server held `--max-sessions`.
    pub sessions_server: u64,
    /// Sessions refused because their address held `--max-sessions-per-ip`.
    pub sessions_address: u64,
    /// Subscribes refused by the per-connection cap (`--max-subscriptions`).
    pub subscriptions_connection: u64,
    /// Subscribes refused by the per-address budget (`--max-subscriptions-per-ip`).
    pub subscriptions_address: u64,
    /// Subscribes refused by the server-wide budget (`--max-total-subscriptions`).
    pub subscriptions_server: u64,
}

impl Refusals {
    fn count(&mut self, sessions: bool, budget: Budget) {
        let counter = match (sessions, budget) {
            (true, Budget::Server) => &mut self.sessions_server,
            (true, _) => &mut self.sessions_address,
            (false, Budget::Connection) => &mut self.subscriptions_connection,
            (false, Budget::Address) => &mut self.subscriptions_address,
            (false, Budget::Server) => &mut self.subscriptions_server,
        };
        *counter += 1;
    }
}

/// What only a walk over the actor's maps can tell: asked for rarely (see `health`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Views {
    /// Messages waiting in all outboxes right now.
    pub messages_waiting: usize,
    /// The most-subscribed products, most first, with their subscriber counts.
    pub top_products: Vec<(ProductId, usize)>,
}

/// Why a session could not register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The process is stopping.
    #[error("the distributor has stopped")]
    Gone,
    /// A session budget is used up.
    #[error("session budget used up: {0:?}")]
    OverBudget(OverLimit),
}

impl From<DistributorGone> for RegisterError {
    fn from(_: DistributorGone) -> Self {
        Self::Gone
    }
}

/// The actor is gone (the process is shutting down); the caller should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the distributor has stopped")]
pub struct DistributorGone;

/// What a session gets when it registers.
#[derive(Debug)]
pub struct Registration<F> {
    /// This session's id, for later commands.
    pub id: SessionId,
    /// Messages for this session, in order. Ends when the actor drops the session.
    pub outbox: OutboxReceiver<F>,
    /// Cancelled when the actor dropped the session for being too slow.
    pub evicted: CancellationToken,
}

enum Command<F> {
    Register {
        address: Option<IpAddr>,
        reply: oneshot::Sender<Result<Registration<F>, OverLimit>>,
    },
    Subscribe {
        id: SessionId,
        products: Vec<ProductId>,
        start: SubscriptionStart,
    },
    Unsubscribe {
        id: SessionId,
        products: Vec<ProductId>,
    },
    Disconnect {
        id: SessionId,
    },
    Publish {
        product: ProductId,
        seq: Seq,
        frame: F,
    },
    Reset {
        since: Seq,
        position: Seq,
        cause: ResetCause,
    },
    Views {
        top_products: usize,
        reply: oneshot::Sender<Views>,
    },
    SubscribeAll {
        id: SessionId,
        start: SubscriptionStart,
    },
    UnsubscribeAll {
        id: SessionId,
    },
    WantPresence {
        id: SessionId,
    },
    PresenceChanges {
        reply: oneshot::Sender<PresenceChanges>,
    },
    PublishPresence {
        counts: Vec<(ProductId, F)>,
    },
}

/// What the presence task learns from the actor at each tick (see
/// [`DistributorHandle::presence_changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceChanges {
    /// Products whose local subscriber count changed since the last call, with the count now.
    pub counts: Vec<(ProductId, usize)>,
    /// Products a session just asked watcher counts for: send their count even if unchanged.
    pub fresh: Vec<ProductId>,
    /// Every product held by id by a local session that asked for watcher counts, if that set
    /// changed since the last call (None: the same as before).
    pub watched: Option<Vec<ProductId>>,
}

/// Removes a session from the distributor exactly once: explicitly with [`Self::disconnect`]
/// when the session ends normally, or from `Drop` when it panics or is cancelled (a dropped SSE
/// stream, an aborted task).
#[derive(Debug)]
pub struct SessionGuard<F: FrameBytes> {
    distributor: DistributorHandle<F>,
    id: Option<SessionId>,
}

impl<F: FrameBytes> SessionGuard<F> {
    /// Guards session `id`.
    pub fn new(distributor: DistributorHandle<F>, id: SessionId) -> Self {
        Self {
            distributor,
            id: Some(id),
        }
    }

    /// Disconnects now, waiting for room in the actor's inbox.
    pub async fn disconnect(mut self) {
        if let Some(id) = self.id.take() {
            self.distributor.disconnect(id).await;
        }
    }
}

impl<F: FrameBytes> Drop for SessionGuard<F> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.distributor.disconnect_soon(id);
        }
    }
}

/// A cheap, cloneable way to reach the distributor actor. The actor runs until the last handle
/// is dropped.
#[derive(Debug)]
pub struct DistributorHandle<F> {
    commands: mpsc::Sender<Command<F>>,
    counts: Arc<counts::Counts>,
}

impl<F> Clone for DistributorHandle<F> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            counts: Arc::clone(&self.counts),
        }
    }
}

impl<F> std::fmt::Debug for Command<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Register { .. } => "Register",
            Self::Subscribe { .. } => "Subscribe",
            Self::Unsubscribe { .. } => "Unsubscribe",
            Self::Disconnect { .. } => "Disconnect",
            Self::Publish { .. } => "Publish",
            Self::Reset { .. } => "Reset",
            Self::Views { .. } => "Views",
            Self::SubscribeAll { .. } => "SubscribeAll",
            Self::UnsubscribeAll { .. } => "UnsubscribeAll",
            Self::WantPresence { .. } => "WantPresence",
            Self::PresenceChanges { .. } => "PresenceChanges",
            Self::PublishPresence { .. } => "PublishPresence",
        })
    }
}

impl<F: FrameBytes> DistributorHandle<F> {
    /// Starts the actor on the current tokio runtime; `position` is the last seq already
    /// committed, from which the listener continues. Per-address budgets spare `exempt`.
    pub fn spawn(limits: Limits, budgets: Budgets, exempt: Vec<IpPrefix>, position: Seq) -> Self {
        let (commands, inbox) = mpsc::channel(COMMAND_CAPACITY);
        let counts = Arc::new(counts::Counts::default());
        actor::spawn(
            inbox,
            actor::Settings {
                limits,
                budgets,
                exempt,
            },
            Arc::clone(&counts),
            position,
        );
        Self { commands, counts }
    }

    async fn send(&self, command: Command<F>) -> Result<(), DistributorGone> {
        self.commands
            .send(command)
            .await
            .map_err(|_| DistributorGone)
    }

    /// Registers a new session from `address` (None: not known, counted only server-wide)
    /// and returns its id and outbox, unless a session budget is used up.
    pub async fn register(
        &self,
        address: Option<IpAddr>,
    ) -> Result<Registration<F>, RegisterError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Register { address, reply }).await?;
        answer
            .await
            .map_err(|_| RegisterError::Gone)?
            .map_err(RegisterError::OverBudget)
    }

    /// Asks for `products`; the answer arrives in the session's outbox.
    pub async fn subscribe(
        &self,
        id: SessionId,
        products: Vec<ProductId>,
        start: SubscriptionStart,
    ) -> Result<(), DistributorGone> {
        self.send(Command::Subscribe {
            id,
            products,
            start,
        })
        .await
    }

    /// Drops `products`; the answer arrives in the session's outbox.
    pub async fn unsubscribe(
        &self,
        id: SessionId,
        products: Vec<ProductId>,
    ) -> Result<(), DistributorGone> {
        self.send(Command::Unsubscribe { id, products }).await
    }

    /// Removes a session and all its subscriptions. Idempotent.
    pub async fn disconnect(&self, id: SessionId) {
        // Err only if the actor is gone, and then there is nothing left to clean.
        let _ = self.send(Command::Disconnect { id }).await;
    }

    /// Like [`Self::disconnect`] but callable from `Drop`: never blocks.
    pub fn disconnect_soon(&self, id: SessionId) {
        if let Err(mpsc::error::TrySendError::Full(command)) =
            self.commands.try_send(Command::Disconnect { id })
        {
            let commands = self.commands.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = commands.send(command).await;
                });
            }
        }
    }

    /// Hands one encoded change to every subscriber of `product`. Changes must be published in
    /// seq order.
    pub async fn publish(
        &self,
        product: ProductId,
        seq: Seq,
        frame: F,
    ) -> Result<(), DistributorGone> {
        self.send(Command::Publish {
            product,
            seq,
            frame,
        })
        .await
    }

    /// Starts every subscription again from `position`: each session gets a
    /// [`Delivery::Reset`] for its products, and changes after `position` follow. For when the
    /// changelog cannot fill what is missing since the last published change.
    pub async fn reset(
        &self,
        since: Seq,
        position: Seq,
        cause: ResetCause,
    ) -> Result<(), DistributorGone> {
        self.send(Command::Reset {
            since,
            position,
            cause,
        })
        .await
    }

    /// Asks for every product, present and future; the answer arrives in the session's outbox.
    /// Counts [`ALL_SUBSCRIPTION_WEIGHT`] against the address and server budgets.
    pub async fn subscribe_all(
        &self,
        id: SessionId,
        start: SubscriptionStart,
    ) -> Result<(), DistributorGone> {
        self.send(Command::SubscribeAll { id, start }).await
    }

    /// Drops the subscription to every product; by-id subscriptions stay.
    pub async fn unsubscribe_all(&self, id: SessionId) -> Result<(), DistributorGone> {
        self.send(Command::UnsubscribeAll { id }).await
    }

    /// From now on the session gets the watcher counts of the products it subscribes to by id.
    pub async fn want_presence(&self, id: SessionId) -> Result<(), DistributorGone> {
        self.send(Command::WantPresence { id }).await
    }

    /// For the presence task: the local counts that changed since the last call. The actor
    /// notes changes only after the first call, so without a presence task this costs nothing.
    pub async fn presence_changes(&self) -> Result<PresenceChanges, DistributorGone> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::PresenceChanges { reply }).await?;
        answer.await.map_err(|_| DistributorGone)
    }

    /// For the presence task: hands each product's encoded watcher count to its subscribers
    /// that asked for counts.
    pub async fn publish_presence(
        &self,
        counts: Vec<(ProductId, F)>,
    ) -> Result<(), DistributorGone> {
        self.send(Command::PublishPresence { counts }).await
    }

    /// The running totals, as of the actor's last batch of commands. Reads atomics: costs the
    /// actor nothing.
    pub fn stats(&self) -> Stats {
        self.counts.load()
    }

    /// The views that walk the actor's maps (messages waiting, the `top_products` most
    /// subscribed products): O(sessions + products) of the actor's time, so ask rarely.
    pub async fn views(&self, top_products: usize) -> Result<Views, DistributorGone> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Views {
            top_products,
            reply,
        })
        .await?;
        answer.await.map_err(|_| DistributorGone)
    }
}

#[cfg(test)]
mod tests;
