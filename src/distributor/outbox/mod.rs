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
//! **The direct lane.** A plain WebSocket's socket can be attached to its outbox
//! ([`OutboxReceiver::attach_socket`]). While the lane is open the actor writes each change's
//! finished frame straight into the socket with a write that never waits, and the session's
//! task is not woken at all. The lane is open only while nothing else is pending for the
//! session: its queue is empty and the session has nothing of its own to write (it opens the lane
//! itself, under the queue's lock, when it is idle: [`LaneGate::try_open`]). The first write the
//! socket cannot take whole closes the lane: if nothing was written the change is queued as
//! usual; if part of it was, the rest is kept as the lane's tail, which the session writes before
//! anything else ([`LaneGate::close`]). Any write of the session's own (a reply, a ping, a pong)
//! closes the lane first. So the order of everything the client receives is the order the actor
//! decided, the slow-client policy applies exactly as before from the first change that would
//! have blocked, and a client that keeps up costs one non-blocking write per change.
//!
//! A plain mutex guards each queue: it is per session, held for a push or a batch pop, and never
//! across an await, so actor and writer rarely meet. (The subscription maps, the shared state,
//! stay lock-free inside the actor.)

use std::collections::VecDeque;
use std::io;
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
    lane: Lane<F>,
}

/// A socket the actor may write finished frames into without waiting.
pub trait DirectSocket: Send + Sync + std::fmt::Debug {
    /// Writes what the socket takes now; `WouldBlock` if it takes nothing.
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
}

/// A plain TCP socket written straight through its descriptor. Not through tokio's
/// `try_write`: that also consults the socket's readiness state, one more cache line per
/// subscriber in a pass over thousands of them, and a failed attempt here must not change what
/// the session's own writes wait for. (If the kernel refuses, the session's next write finds out
/// by itself.) The `Arc` keeps the descriptor open for as long as the lane may use it.
#[derive(Debug)]
pub struct RawTcp {
    fd: std::os::fd::RawFd,
    _socket: Arc<tokio::net::TcpStream>,
}

impl RawTcp {
    /// Writes into `socket` through its descriptor.
    pub fn new(socket: Arc<tokio::net::TcpStream>) -> Self {
        use std::os::fd::AsRawFd;
        Self {
            fd: socket.as_raw_fd(),
            _socket: socket,
        }
    }
}

impl DirectSocket for RawTcp {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::{MsgFlags, send};
        // Never wait, and a peer that went away is an error, not a SIGPIPE.
        send(
            self.fd,
            bytes,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(io::Error::from)
    }
}

/// The direct lane of one outbox (see the module doc).
#[derive(Debug)]
struct Lane<F> {
    socket: Option<Arc<dyn DirectSocket>>,
    /// The actor may write into `socket`: the queue is empty and the session writes nothing.
    open: bool,
    /// A frame the actor wrote in part, and how much of it: the session writes the rest first.
    tail: Option<(F, usize)>,
}

impl<F> Default for Lane<F> {
    fn default() -> Self {
        Self {
            socket: None,
            open: false,
            tail: None,
        }
    }
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
    /// Written whole into the session's socket by the pushing thread (the direct lane).
    Written,
    /// Written in part by the pushing thread: the session writes the rest (its tail) before
    /// anything else, and counts the change as delivered once its last byte is written (an
    /// eviction may end the session first).
    Started,
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
            lane: Lane::default(),
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
        frame: &F,
        products: impl FnOnce() -> Vec<ProductId>,
    ) -> Pushed {
        let shared = &*self.0;
        let mut queue = shared.lock();
        if queue.closed {
            return Pushed::Closed;
        }
        if queue.lane.open && queue.items.is_empty() {
            if let Some(socket) = &queue.lane.socket {
                let wire = frame.wire();
                match socket.try_write(wire) {
                    Ok(written) if written == wire.len() => return Pushed::Written,
                    Ok(written) => {
                        queue.lane.open = false;
                        queue.lane.tail = Some((frame.clone(), written));
                        drop(queue);
                        shared.ready.notify_one();
                        return Pushed::Started;
                    }
                    // Full, or failed (the session finds out with its own next write): the
                    // change takes the session's path, and so does everything after it.
                    Err(_) => queue.lane.open = false,
                }
            }
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
                frame: frame.clone(),
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
        // Whatever follows must not overtake this on the lane: the session reopens it once it
        // has written everything.
        queue.lane.open = false;
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
        let mut queue = self.0.lock();
        queue.closed = true;
        queue.lane.open = false;
        drop(queue);
        self.0.ready.notify_one();
    }

    /// Ends the stream and drops what is queued: the receiver gets `false` at once.
    pub(crate) fn discard(&self) {
        let mut queue = self.0.lock();
        queue.closed = true;
        queue.lane.open = false;
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
                if queue.lane.tail.is_some() {
                    // Nothing to take, but the rest of a direct write is the session's to write.
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
    /// Lets the actor write finished frames into `socket` while the lane is open (it opens
    /// only through [`LaneGate::try_open`]).
    pub fn attach_socket(&self, socket: Arc<dyn DirectSocket>) {
        self.0.lock().lane.socket = Some(socket);
    }

    /// The session's control of the lane, for the stream its writes go through.
    pub fn gate(&self) -> LaneGate<F> {
        LaneGate(Arc::clone(&self.0))
    }

    /// Frees the queue's buffer if it is empty. The queue keeps its capacity between messages
    /// so that a busy session does not allocate per change; an idle one calls this now and then.
    pub fn release_idle_memory(&self) {
        let mut queue = self.0.lock();
        if queue.items.is_empty() {
            queue.items = VecDeque::new();
        }
    }
}

/// The session's side of the direct lane: every write of its own closes the lane first
/// ([`Self::close`]); when it is idle it opens it again ([`Self::try_open`]).
#[derive(Debug)]
pub struct LaneGate<F>(Arc<Shared<F>>);

impl<F> LaneGate<F> {
    /// Closes the lane (the actor queues from now on) and hands over the rest of a frame the
    /// actor wrote in part: the frame and how much of it was written. Cheap when already closed.
    pub fn close(&self) -> Option<(F, usize)> {
        let mut queue = self.0.lock();
        queue.lane.open = false;
        queue.lane.tail.take()
    }

    /// Opens the lane if nothing waits in the queue and no tail is left; true if it is open.
    /// The caller must have nothing of its own left to write.
    pub fn try_open(&self) -> bool {
        let mut queue = self.0.lock();
        let lane_free = queue.items.is_empty()
            && queue.lane.tail.is_none()
            && !queue.closed
            && queue.lane.socket.is_some();
        queue.lane.open = lane_free;
        lane_free
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
mod tests;
