//! `Outbox`: one session's bounded queue from the actor to the session's writer, with the
//! slow-client policy applied at the moment the actor pushes.
//!
//! - `Conflate` (default): when the queue is full, the change is not queued; a
//!   [`Delivery::Gap`] marker is, naming the session's products and the seqs left out, and
//!   every later change only moves the marker's end while it is the last entry. The session
//!   reads the gap from the changelog when it reaches the marker, at the pace it drains (`feed`):
//!   a client that reads promptly gets every version even after a burst far larger than its
//!   queue (a catch-up after an outage); one that reached the marker only long after it opened
//!   had stopped reading, and gets the newest version of each product, marked as conflated. A
//!   queue thus never holds more than its capacity of changes plus one marker.
//! - `Disconnect`: when the queue is full the push fails and the actor evicts the session
//!   (close 1013) and drops its queue at once: none of it will be sent, and the session may not
//!   look at its outbox for a long while (an SSE stream whose peer keeps an HTTP/2 window shut
//!   is not polled until the peer opens it).
//!
//! A plain mutex guards each queue: it is per session, held for a push or a batch pop, and never
//! across an await, so actor and writer rarely meet. (The subscription maps, the shared state,
//! stay lock-free inside the actor.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{Delivery, FrameBytes};
use crate::config::SlowClientPolicy;
use crate::product::{ProductId, Seq};

#[derive(Debug)]
struct Queue<F> {
    items: VecDeque<Delivery<F>>,
    /// Bytes of the change frames in `items`.
    bytes: usize,
    /// Entries in `items` that are not changes (acks, refusals, resets, gap markers).
    replies: usize,
    /// What those entries hold ([`reply_bytes`]): an ack echoes up to 100 000 ids.
    reply_bytes: usize,
    closed: bool,
}

#[derive(Debug)]
struct Shared<F> {
    queue: Mutex<Queue<F>>,
    ready: Notify,
    capacity: usize,
    max_bytes: usize,
    policy: SlowClientPolicy,
    conflate_after: Duration,
}

impl<F> Shared<F> {
    fn lock(&self) -> MutexGuard<'_, Queue<F>> {
        // A panic while holding this lock leaves a queue of plain values, still consistent.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued as is.
    Queued,
    /// Not queued: left to the session's gap marker (conflate policy).
    Deferred,
    /// Refused: the queue is full (disconnect policy).
    Full,
    /// Refused: the session is gone.
    Closed,
}

/// The actor's end.
#[derive(Debug)]
pub(crate) struct OutboxSender<F>(Arc<Shared<F>>);

/// The session's end. Dropping it closes the outbox.
#[derive(Debug)]
pub struct OutboxReceiver<F>(Arc<Shared<F>>);

impl<F> Clone for OutboxSender<F> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

/// A new outbox holding `capacity` messages or `max_bytes` of change frames (whichever comes
/// first; one change always fits an empty queue) before the policy applies.
pub(crate) fn outbox<F>(
    capacity: usize,
    max_bytes: usize,
    policy: SlowClientPolicy,
    conflate_after: Duration,
) -> (OutboxSender<F>, OutboxReceiver<F>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            bytes: 0,
            replies: 0,
            reply_bytes: 0,
            closed: false,
        }),
        ready: Notify::new(),
        capacity,
        max_bytes,
        policy,
        conflate_after,
    });
    (OutboxSender(Arc::clone(&shared)), OutboxReceiver(shared))
}

impl<F: FrameBytes> OutboxSender<F> {
    /// Queues a change, applying the slow-client policy. `products` names the session's
    /// subscriptions; it is called only when a gap opens. Never waits.
    pub(crate) fn push_change(
        &self,
        product: ProductId,
        seq: Seq,
        frame: F,
        products: impl FnOnce() -> Vec<ProductId>,
    ) -> Pushed {
        let shared = &*self.0;
        let mut queue = shared.lock();
        if queue.closed {
            return Pushed::Closed;
        }
        if let Some(Delivery::Gap { upto, .. }) = queue.items.back_mut() {
            // Order: nothing may overtake changes that are waiting in the changelog.
            *upto = seq;
            return Pushed::Deferred;
        }
        let bytes = frame.byte_len();
        let fits_bytes = queue.bytes == 0 || queue.bytes + bytes <= shared.max_bytes;
        if queue.items.len() < shared.capacity && fits_bytes {
            queue.bytes += bytes;
            queue.items.push_back(Delivery::Change {
                product,
                seq,
                frame,
            });
            drop(queue);
            shared.ready.notify_one();
            return Pushed::Queued;
        }
        match shared.policy {
            SlowClientPolicy::Disconnect => Pushed::Full,
            SlowClientPolicy::Conflate => {
                let gap = Delivery::Gap {
                    products: products(),
                    after: seq.saturating_sub(1),
                    upto: seq,
                    stale_at: Instant::now() + shared.conflate_after,
                };
                queue.replies += 1;
                queue.reply_bytes += reply_bytes(&gap);
                queue.items.push_back(gap);
                drop(queue);
                shared.ready.notify_one();
                Pushed::Deferred
            }
        }
    }

    /// Queues a message that is not a change (an ack, a refusal, a reset). Under the disconnect
    /// policy a full queue refuses it.
    pub(crate) fn push(&self, delivery: Delivery<F>) -> Pushed {
        let shared = &*self.0;
        let mut queue = shared.lock();
        if queue.closed {
            return Pushed::Closed;
        }
        // Replies are bounded under either policy, by count and by bytes: a client that sends
        // commands without reading the answers (an ack flood) fills its queue with them, and
        // nothing can be conflated or left to the changelog for them, so such a client is
        // evicted.
        let bytes = reply_bytes(&delivery);
        let over_bytes = queue.reply_bytes > 0 && queue.reply_bytes + bytes > shared.max_bytes;
        let full = over_bytes
            || match shared.policy {
                SlowClientPolicy::Disconnect => queue.items.len() >= shared.capacity,
                SlowClientPolicy::Conflate => queue.replies >= shared.capacity,
            };
        if full {
            return Pushed::Full;
        }
        queue.replies += 1;
        queue.reply_bytes += bytes;
        queue.items.push_back(delivery);
        drop(queue);
        shared.ready.notify_one();
        Pushed::Queued
    }

    /// Messages waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.0.lock().items.len()
    }

    /// Ends the stream: the receiver gets what is queued, then `false`.
    pub(crate) fn close(&self) {
        self.0.lock().closed = true;
        self.0.ready.notify_one();
    }

    /// Ends the stream and drops what is queued: the receiver gets `false` at once.
    pub(crate) fn discard(&self) {
        let mut queue = self.0.lock();
        queue.closed = true;
        let items = std::mem::take(&mut queue.items);
        queue.bytes = 0;
        queue.replies = 0;
        queue.reply_bytes = 0;
        drop(queue);
        self.0.ready.notify_one();
        // Dropped outside the lock: the frames may be the last handles to large buffers.
        drop(items);
    }
}

impl<F: FrameBytes> OutboxReceiver<F> {
    /// Moves up to `max` queued messages into `batch`, waiting for at least one. Returns false
    /// once the outbox is closed and drained. Cancel-safe: nothing is taken until it returns.
    pub async fn recv_batch(&mut self, batch: &mut impl Extend<Delivery<F>>, max: usize) -> bool {
        loop {
            {
                let mut queue = self.0.lock();
                if !queue.items.is_empty() {
                    let take = queue.items.len().min(max);
                    let (mut bytes, mut replies, mut reply_bytes_taken) = (0, 0, 0);
                    for item in queue.items.iter().take(take) {
                        match item {
                            Delivery::Change { frame, .. } => bytes += frame.byte_len(),
                            reply => {
                                replies += 1;
                                reply_bytes_taken += reply_bytes(reply);
                            }
                        }
                    }
                    queue.bytes -= bytes;
                    queue.replies -= replies;
                    queue.reply_bytes -= reply_bytes_taken;
                    batch.extend(queue.items.drain(..take));
                    return true;
                }
                if queue.closed {
                    return false;
                }
            }
            self.0.ready.notified().await;
        }
    }
}

impl<F> OutboxReceiver<F> {
    /// Frees the queue's buffer if it is empty. The queue keeps its capacity between messages
    /// so that a busy session does not allocate per change; an idle one calls this now and then.
    pub fn release_idle_memory(&self) {
        let mut queue = self.0.lock();
        if queue.items.is_empty() {
            queue.items = VecDeque::new();
        }
    }
}

/// Memory a queued reply holds: its entry and the ids it carries.
fn reply_bytes<F>(reply: &Delivery<F>) -> usize {
    let ids = match reply {
        Delivery::Subscribed { products, .. }
        | Delivery::Unsubscribed { products, .. }
        | Delivery::Gap { products, .. }
        | Delivery::Reset { products, .. } => products.len(),
        Delivery::Change { .. }
        | Delivery::Refused(_)
        | Delivery::SubscribedAll { .. }
        | Delivery::UnsubscribedAll
        | Delivery::Presence { .. } => 0,
    };
    std::mem::size_of::<Delivery<F>>() + ids * std::mem::size_of::<ProductId>()
}

impl<F> Drop for OutboxReceiver<F> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: i64) -> ProductId {
        ProductId::new(raw).unwrap()
    }

    fn push(tx: &OutboxSender<u64>, product: i64, seq: u64) -> Pushed {
        tx.push_change(id(product), seq, seq, || vec![id(1), id(2)])
    }

    #[tokio::test]
    async fn a_full_queue_opens_one_gap_that_grows_until_the_reader_takes_it() {
        let (tx, mut rx) = outbox(
            2,
            1 << 20,
            SlowClientPolicy::Conflate,
            Duration::from_secs(1),
        );
        assert_eq!(push(&tx, 1, 1), Pushed::Queued);
        assert_eq!(push(&tx, 2, 2), Pushed::Queued);
        for seq in 3..=50 {
            assert_eq!(push(&tx, 1 + (seq as i64 % 2), seq), Pushed::Deferred);
        }
        assert_eq!(tx.len(), 3, "two changes and one marker");
        let mut batch = Vec::new();
        assert!(rx.recv_batch(&mut batch, 1).await);
        // The marker is still last: later changes keep extending it.
        assert_eq!(push(&tx, 1, 51), Pushed::Deferred);
        assert!(rx.recv_batch(&mut batch, 10).await);
        assert!(matches!(
            &batch[2],
            Delivery::Gap { after: 2, upto: 51, products, .. } if *products == vec![id(1), id(2)]
        ));
        assert_eq!(push(&tx, 1, 52), Pushed::Queued, "in order again");
    }

    #[tokio::test]
    async fn unread_replies_are_bounded_under_the_conflate_policy_too() {
        let (tx, mut rx) = outbox::<u64>(
            3,
            1 << 20,
            SlowClientPolicy::Conflate,
            Duration::from_secs(1),
        );
        let ack = || Delivery::Unsubscribed {
            products: Vec::new(),
            total: 0,
        };
        for _ in 0..3 {
            assert_eq!(tx.push(ack()), Pushed::Queued);
        }
        assert_eq!(tx.push(ack()), Pushed::Full, "the fourth unread reply");
        assert_eq!(
            push(&tx, 1, 1),
            Pushed::Deferred,
            "a change still goes to a gap"
        );
        let mut batch = Vec::new();
        assert!(rx.recv_batch(&mut batch, 2).await);
        assert_eq!(
            tx.push(ack()),
            Pushed::Queued,
            "taken replies free their room"
        );
    }

    #[tokio::test]
    async fn unread_replies_are_bounded_by_the_ids_they_carry() {
        // 1 MiB holds 131 072 ids: two acks of 100 000 ids do not fit.
        let (tx, mut rx) = outbox::<u64>(
            4096,
            1 << 20,
            SlowClientPolicy::Conflate,
            Duration::from_secs(1),
        );
        let ack = || Delivery::Subscribed {
            products: (0..100_000).map(id).collect(),
            position: 0,
            start: crate::product::SubscriptionStart::Live,
            total: 100_000,
        };
        assert_eq!(tx.push(ack()), Pushed::Queued, "one always fits");
        assert_eq!(tx.push(ack()), Pushed::Full);
        let mut batch = Vec::new();
        assert!(rx.recv_batch(&mut batch, 10).await);
        assert_eq!(tx.push(ack()), Pushed::Queued, "taken bytes are free again");
    }

    #[tokio::test]
    async fn queues_are_bounded_by_bytes_as_well_as_count() {
        let (tx, mut rx) =
            outbox::<u64>(100, 20, SlowClientPolicy::Conflate, Duration::from_secs(1));
        assert_eq!(push(&tx, 1, 1), Pushed::Queued);
        assert_eq!(push(&tx, 1, 2), Pushed::Queued);
        assert_eq!(
            push(&tx, 1, 3),
            Pushed::Deferred,
            "24 bytes would exceed 20"
        );
        let mut batch = Vec::new();
        assert!(rx.recv_batch(&mut batch, 10).await);
        assert_eq!(batch.len(), 3);
        assert_eq!(
            push(&tx, 1, 4),
            Pushed::Queued,
            "the taken bytes are free again"
        );
    }

    #[tokio::test]
    async fn disconnect_policy_refuses_when_full_and_close_or_discard_ends_the_stream() {
        let (tx, mut rx) = outbox(
            2,
            1 << 20,
            SlowClientPolicy::Disconnect,
            Duration::from_secs(1),
        );
        assert_eq!(push(&tx, 1, 1), Pushed::Queued);
        assert_eq!(push(&tx, 1, 2), Pushed::Queued);
        assert_eq!(push(&tx, 1, 3), Pushed::Full);
        tx.close();
        let mut batch = Vec::new();
        assert!(rx.recv_batch(&mut batch, 10).await);
        assert_eq!(batch.len(), 2);
        assert!(!rx.recv_batch(&mut batch, 10).await);
        drop(rx);
        let (tx, mut rx) = outbox(
            2,
            1 << 20,
            SlowClientPolicy::Disconnect,
            Duration::from_secs(1),
        );
        assert_eq!(push(&tx, 1, 1), Pushed::Queued);
        tx.discard();
        assert_eq!(tx.len(), 0, "an evicted session's queue is freed at once");
        assert!(!rx.recv_batch(&mut batch, 10).await);
        assert_eq!(push(&tx, 1, 2), Pushed::Closed);
        drop(rx);
        let (tx, rx) = outbox::<u64>(
            2,
            1 << 20,
            SlowClientPolicy::Disconnect,
            Duration::from_secs(1),
        );
        drop(rx);
        assert_eq!(push(&tx, 1, 1), Pushed::Closed);
    }
}
