//! `Outbox`: one session's bounded queue from the actor to the session's writer, with the
//! slow-client policy applied at the moment the actor pushes.
//!
//! - `Conflate` (default): when the queue reaches its capacity, pending changes are compacted
//!   to the latest one per product (acks stay), then the new one is added. A slow client thus
//!   converges to the current state of each product, skipping superseded versions, and its
//!   queue never holds more than about twice max(capacity, its subscription count).
//! - `Disconnect`: when the queue is full the push fails and the actor evicts the session
//!   (close 1013).
//!
//! A plain mutex guards each queue: it is per session, held for a push or a batch pop, and never
//! across an await, so actor and writer rarely meet. (The subscription maps, the shared state,
//! stay lock-free inside the actor.)

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::Delivery;
use crate::config::SlowClientPolicy;

#[derive(Debug)]
struct Queue<F> {
    items: VecDeque<Delivery<F>>,
    /// Length at which the next push compacts (conflate) or fails (disconnect).
    limit: usize,
    closed: bool,
}

#[derive(Debug)]
struct Shared<F> {
    queue: Mutex<Queue<F>>,
    ready: Notify,
    capacity: usize,
    policy: SlowClientPolicy,
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
    /// Queued after superseded changes were dropped; the count dropped.
    Conflated(usize),
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

/// A new outbox holding `capacity` messages before the policy applies.
pub(crate) fn outbox<F>(
    capacity: usize,
    policy: SlowClientPolicy,
) -> (OutboxSender<F>, OutboxReceiver<F>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            limit: capacity,
            closed: false,
        }),
        ready: Notify::new(),
        capacity,
        policy,
    });
    (OutboxSender(Arc::clone(&shared)), OutboxReceiver(shared))
}

impl<F> OutboxSender<F> {
    /// Queues a message, applying the slow-client policy. Never waits.
    pub(crate) fn push(&self, delivery: Delivery<F>) -> Pushed {
        let shared = &*self.0;
        let mut queue = shared.lock();
        if queue.closed {
            return Pushed::Closed;
        }
        let mut result = Pushed::Queued;
        if queue.items.len() >= queue.limit {
            match shared.policy {
                SlowClientPolicy::Disconnect => return Pushed::Full,
                SlowClientPolicy::Conflate => {
                    let dropped = conflate(&mut queue.items);
                    // Compact again only after the queue doubled, so compaction stays amortized
                    // O(1) per push even when most entries are distinct products.
                    queue.limit = shared.capacity.max(queue.items.len() * 2);
                    result = Pushed::Conflated(dropped);
                }
            }
        }
        queue.items.push_back(delivery);
        drop(queue);
        shared.ready.notify_one();
        result
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
}

/// Keeps only the newest change per product (and every non-change), in their order.
fn conflate<F>(items: &mut VecDeque<Delivery<F>>) -> usize {
    let before = items.len();
    let mut seen = HashSet::with_capacity(before);
    let mut kept = VecDeque::with_capacity(before);
    while let Some(item) = items.pop_back() {
        let keep = match &item {
            Delivery::Change { product, .. } => seen.insert(*product),
            _ => true,
        };
        if keep {
            kept.push_front(item);
        }
    }
    *items = kept;
    before - items.len()
}

impl<F> OutboxReceiver<F> {
    /// Moves up to `max` queued messages into `batch`, waiting for at least one. Returns false
    /// once the outbox is closed and drained. Cancel-safe: nothing is taken until it returns.
    pub async fn recv_batch(&mut self, batch: &mut impl Extend<Delivery<F>>, max: usize) -> bool {
        loop {
            {
                let mut queue = self.0.lock();
                if !queue.items.is_empty() {
                    let take = queue.items.len().min(max);
                    batch.extend(queue.items.drain(..take));
                    if queue.items.len() < self.0.capacity {
                        queue.limit = self.0.capacity;
                    }
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

impl<F> Drop for OutboxReceiver<F> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::product::ProductId;

    fn change(product: i64, seq: u64) -> Delivery<u64> {
        Delivery::Change {
            product: ProductId::new(product).unwrap(),
            seq,
            frame: seq,
        }
    }

    fn seqs(batch: &[Delivery<u64>]) -> Vec<u64> {
        batch
            .iter()
            .filter_map(|d| match d {
                Delivery::Change { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn conflation_keeps_the_latest_change_per_product_in_order() {
        let (tx, mut rx) = outbox(4, SlowClientPolicy::Conflate);
        let mut seq = 0;
        for _ in 0..100 {
            for product in 1..=3 {
                seq += 1;
                assert_ne!(tx.push(change(product, seq)), Pushed::Closed);
            }
        }
        assert!(
            tx.len() <= 8,
            "bounded by about twice the products: {}",
            tx.len()
        );
        let mut batch = Vec::new();
        assert!(rx.recv_batch(&mut batch, 100).await);
        let got = seqs(&batch);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in seq order: {got:?}");
        for product in 1..=3_i64 {
            let last = batch.iter().rev().find_map(|d| match d {
                Delivery::Change {
                    product: p, seq, ..
                } if p.get() == product => Some(*seq),
                _ => None,
            });
            assert_eq!(
                last,
                Some(297 + product as u64),
                "latest of product {product}"
            );
        }
    }

    #[tokio::test]
    async fn disconnect_policy_refuses_when_full_and_close_ends_the_stream() {
        let (tx, mut rx) = outbox(2, SlowClientPolicy::Disconnect);
        assert_eq!(tx.push(change(1, 1)), Pushed::Queued);
        assert_eq!(tx.push(change(1, 2)), Pushed::Queued);
        assert_eq!(tx.push(change(1, 3)), Pushed::Full);
        tx.close();
        let mut batch = Vec::new();
        assert!(rx.recv_batch(&mut batch, 10).await);
        assert_eq!(seqs(&batch), vec![1, 2]);
        assert!(!rx.recv_batch(&mut batch, 10).await);
        drop(rx);
        let (tx, rx) = outbox::<u64>(2, SlowClientPolicy::Disconnect);
        drop(rx);
        assert_eq!(tx.push(change(1, 1)), Pushed::Closed);
    }
}
