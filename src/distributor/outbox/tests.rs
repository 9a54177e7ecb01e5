//! The outbox's queue bounds, gap markers and direct lane, without a socket or a runtime.

use super::*;

fn id(raw: i64) -> ProductId {
    ProductId::new(raw).unwrap()
}

fn push(tx: &OutboxSender<u64>, product: i64, seq: u64) -> Pushed {
    tx.push_change(id(product), seq, &seq, || vec![id(1), id(2)])
}

/// A socket that takes up to `room` bytes in all, then would block.
#[derive(Debug)]
struct FakeSocket {
    taken: Mutex<Vec<u8>>,
    room: Mutex<usize>,
}

impl FakeSocket {
    fn with_room(room: usize) -> Arc<Self> {
        Arc::new(Self {
            taken: Mutex::new(Vec::new()),
            room: Mutex::new(room),
        })
    }
}

impl DirectSocket for FakeSocket {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        let mut room = self.room.lock().unwrap();
        if *room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = bytes.len().min(*room);
        *room -= n;
        self.taken.lock().unwrap().extend_from_slice(&bytes[..n]);
        Ok(n)
    }
}

fn push_str(tx: &OutboxSender<&'static str>, seq: u64, frame: &'static str) -> Pushed {
    tx.push_change(id(1), seq, &frame, || vec![id(1)])
}

#[tokio::test]
async fn the_lane_writes_directly_until_the_socket_blocks_then_the_tail_and_queue_follow_in_order()
{
    let (tx, mut rx) = outbox::<&'static str>(
        8,
        1 << 20,
        SlowClientPolicy::Disconnect,
        Duration::from_secs(1),
    );
    let socket = FakeSocket::with_room(10);
    assert_eq!(
        push_str(&tx, 1, "aaaa"),
        Pushed::Queued,
        "no socket attached"
    );
    rx.attach_socket(socket.clone());
    let gate = rx.gate();
    assert!(!gate.try_open(), "a queued change must be written first");
    let mut batch = Vec::new();
    assert!(rx.recv_batch(&mut batch, 10).await);
    assert!(gate.try_open(), "idle: the lane opens");
    assert_eq!(push_str(&tx, 2, "bbbb"), Pushed::Written);
    // 6 bytes of room left: "cccccccc" is written in part, the rest is the tail.
    assert_eq!(push_str(&tx, 3, "cccccccc"), Pushed::Started);
    assert_eq!(socket.taken.lock().unwrap().as_slice(), b"bbbbcccccc");
    // The lane closed: the next change is queued behind the tail, never written past it.
    assert_eq!(push_str(&tx, 4, "dd"), Pushed::Queued);
    assert_eq!(socket.taken.lock().unwrap().len(), 10);
    assert!(!gate.try_open(), "a tail and a queued change are pending");
    assert_eq!(
        gate.close(),
        Some(("cccccccc", 6)),
        "the session writes the rest"
    );
    assert_eq!(gate.close(), None, "once");
    batch.clear();
    assert!(rx.recv_batch(&mut batch, 10).await);
    assert!(matches!(batch[..], [Delivery::Change { seq: 4, .. }]));
    // A reply closes the lane: later changes queue behind it.
    *socket.room.lock().unwrap() = 100;
    assert!(gate.try_open());
    assert_eq!(
        tx.push(Delivery::Unsubscribed {
            products: Vec::new(),
            total: 0
        }),
        Pushed::Queued
    );
    assert_eq!(push_str(&tx, 5, "ee"), Pushed::Queued);
    // An evicted or closed session gets nothing more on the lane.
    batch.clear();
    assert!(rx.recv_batch(&mut batch, 10).await);
    assert!(gate.try_open());
    tx.discard();
    assert_eq!(push_str(&tx, 6, "ff"), Pushed::Closed);
    assert!(!gate.try_open());
    assert_eq!(socket.taken.lock().unwrap().as_slice(), b"bbbbcccccc");
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
    let (tx, mut rx) = outbox::<u64>(100, 20, SlowClientPolicy::Conflate, Duration::from_secs(1));
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
