//! The distributor: the one owner of who-is-subscribed-to-what. Sessions and the listener hold a
//! cheap cloneable [`DistributorHandle`] and talk to the actor only through its bounded command
//! channel; the actor hands each change to the outboxes of the subscribed sessions.
//!
//! It treats frames as opaque (`F`): it knows who wants product N, not what a message looks
//! like, so a change is encoded once by the listener and the same buffer is cloned (a reference
//! count, no copy) into every subscriber's outbox.
//!
//! Slow-client policy: each session's outbox is bounded ([`crate::config::Limits::outbox_capacity`]).
//! The actor never waits for a session: if an outbox is full, the session is removed from the
//! maps at once and its `evicted` token is cancelled, so the session closes the socket with 1013
//! (Try Again Later). Memory per slow client is therefore bounded by the outbox capacity, and no
//! other session is delayed by it.
//!
//! Imports `product` (ids) and `config` (limits) only.

mod actor;
mod subscriptions;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::product::ProductId;

pub use subscriptions::{OverLimit, SessionId};

/// Commands in flight to the actor before senders wait: absorbs bursts of notifications and
/// commands without letting any client grow it without bound.
const COMMAND_CAPACITY: usize = 4096;

/// What a session's outbox carries, in the order the actor decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<F> {
    /// A change frame, shared by all its recipients.
    Change(F),
    /// The subscribe was applied; changes committed after this is read are delivered.
    Subscribed(Vec<ProductId>),
    /// The unsubscribe was applied.
    Unsubscribed(Vec<ProductId>),
    /// The subscribe was refused whole because of the per-session cap.
    Refused(OverLimit),
}

/// A counting snapshot of the actor's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Connected sessions.
    pub sessions: usize,
    /// (session, product) subscription pairs.
    pub subscriptions: usize,
    /// Products with at least one subscriber.
    pub products_with_subscribers: usize,
    /// Changes published to the actor since start.
    pub changes_published: u64,
    /// Messages put into session outboxes since start.
    pub messages_queued: u64,
    /// Sessions disconnected because their outbox was full.
    pub slow_sessions_evicted: u64,
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
    pub outbox: mpsc::Receiver<Delivery<F>>,
    /// Cancelled when the actor dropped the session for being too slow.
    pub evicted: CancellationToken,
}

enum Command<F> {
    Register {
        reply: oneshot::Sender<Registration<F>>,
    },
    Subscribe {
        id: SessionId,
        products: Vec<ProductId>,
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
        frame: F,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
}

/// A cheap, cloneable way to reach the distributor actor. The actor runs until the last handle
/// is dropped.
#[derive(Debug)]
pub struct DistributorHandle<F> {
    commands: mpsc::Sender<Command<F>>,
}

impl<F> Clone for DistributorHandle<F> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
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
            Self::Stats { .. } => "Stats",
        })
    }
}

impl<F: Clone + Send + 'static> DistributorHandle<F> {
    /// Starts the actor on the current tokio runtime.
    pub fn spawn(limits: Limits) -> Self {
        let (commands, inbox) = mpsc::channel(COMMAND_CAPACITY);
        actor::spawn(inbox, limits);
        Self { commands }
    }

    async fn send(&self, command: Command<F>) -> Result<(), DistributorGone> {
        self.commands
            .send(command)
            .await
            .map_err(|_| DistributorGone)
    }

    /// Registers a new session and returns its id and outbox.
    pub async fn register(&self) -> Result<Registration<F>, DistributorGone> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Register { reply }).await?;
        answer.await.map_err(|_| DistributorGone)
    }

    /// Asks for `products`; the answer arrives in the session's outbox.
    pub async fn subscribe(
        &self,
        id: SessionId,
        products: Vec<ProductId>,
    ) -> Result<(), DistributorGone> {
        self.send(Command::Subscribe { id, products }).await
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

    /// Hands one encoded change to every subscriber of `product`.
    pub async fn publish(&self, product: ProductId, frame: F) -> Result<(), DistributorGone> {
        self.send(Command::Publish { product, frame }).await
    }

    /// Current counts.
    pub async fn stats(&self) -> Result<Stats, DistributorGone> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Stats { reply }).await?;
        answer.await.map_err(|_| DistributorGone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(outbox_capacity: usize, max_subscriptions: usize) -> Limits {
        Limits {
            outbox_capacity,
            max_subscriptions,
            max_frame_bytes: 1024,
            ws_read_buffer_bytes: 1024,
            ws_write_buffer_bytes: 1024,
            max_body_bytes: 1024,
        }
    }

    fn ids(raw: &[i64]) -> Vec<ProductId> {
        raw.iter().map(|&id| ProductId::new(id).unwrap()).collect()
    }

    #[tokio::test]
    async fn fans_out_in_order_and_acks_before_changes() {
        let distributor = DistributorHandle::<&'static str>::spawn(limits(16, 10));
        let mut a = distributor.register().await.unwrap();
        let mut b = distributor.register().await.unwrap();
        distributor.subscribe(a.id, ids(&[1])).await.unwrap();
        distributor.subscribe(b.id, ids(&[1, 2])).await.unwrap();
        distributor.publish(ids(&[1])[0], "one").await.unwrap();
        distributor.publish(ids(&[2])[0], "two").await.unwrap();

        assert_eq!(a.outbox.recv().await, Some(Delivery::Subscribed(ids(&[1]))));
        assert_eq!(a.outbox.recv().await, Some(Delivery::Change("one")));
        assert_eq!(
            b.outbox.recv().await,
            Some(Delivery::Subscribed(ids(&[1, 2])))
        );
        assert_eq!(b.outbox.recv().await, Some(Delivery::Change("one")));
        assert_eq!(b.outbox.recv().await, Some(Delivery::Change("two")));
        assert!(a.outbox.try_recv().is_err(), "a is not subscribed to 2");
    }

    #[tokio::test]
    async fn full_outbox_evicts_only_that_session() {
        let distributor = DistributorHandle::<u32>::spawn(limits(2, 10));
        let slow = distributor.register().await.unwrap();
        let mut fast = distributor.register().await.unwrap();
        let product = ids(&[1])[0];
        distributor.subscribe(slow.id, vec![product]).await.unwrap();
        distributor.subscribe(fast.id, vec![product]).await.unwrap();
        assert!(fast.outbox.recv().await.is_some());
        for n in 0..5 {
            distributor.publish(product, n).await.unwrap();
            assert_eq!(fast.outbox.recv().await, Some(Delivery::Change(n)));
        }
        slow.evicted.cancelled().await;
        let stats = distributor.stats().await.unwrap();
        assert_eq!(stats.sessions, 1);
        assert_eq!(stats.slow_sessions_evicted, 1);
        assert_eq!(stats.subscriptions, 1);
    }

    #[tokio::test]
    async fn refused_subscribe_is_reported_and_maps_empty_after_disconnects() {
        let distributor = DistributorHandle::<u32>::spawn(limits(16, 2));
        let mut a = distributor.register().await.unwrap();
        distributor.subscribe(a.id, ids(&[1, 2, 3])).await.unwrap();
        assert!(matches!(a.outbox.recv().await, Some(Delivery::Refused(_))));
        distributor.subscribe(a.id, ids(&[1, 2])).await.unwrap();
        let b = distributor.register().await.unwrap();
        distributor.subscribe(b.id, ids(&[2])).await.unwrap();
        assert_eq!(distributor.stats().await.unwrap().subscriptions, 3);
        distributor.disconnect(a.id).await;
        distributor.disconnect_soon(b.id);
        let stats = distributor.stats().await.unwrap();
        assert_eq!(
            (
                stats.sessions,
                stats.subscriptions,
                stats.products_with_subscribers
            ),
            (0, 0, 0)
        );
        assert_eq!(
            a.outbox.recv().await,
            Some(Delivery::Subscribed(ids(&[1, 2])))
        );
        assert_eq!(
            a.outbox.recv().await,
            None,
            "outbox closes when the session is dropped"
        );
    }
}
