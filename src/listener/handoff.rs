//! The hand-off from this instance's replication reader (`--source replication`, while it
//! leads) to its listener: the changes each of its batches committed, with the seqs and commit
//! times the changelog holds for them, so the leader's own listener publishes them without
//! reading them back (one round trip and one database session's work per batch saved; other
//! instances read the changelog as before).
//!
//! Nothing is trusted that a read would not show: the reader sends only what its own statement
//! committed and returned, and the listener publishes a handed-over change only when its seq
//! follows the last one published; anything else (a seq gap, a gap batch, a hand-off dropped
//! because the listener fell behind) makes it read the changelog instead. The notification a
//! batch sends is then redundant for this listener, which knows it by its sender: the backend
//! pid of the leading session.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, watch};

use crate::db::changelog::LoggedChange;

/// Batches in flight between the reader and the listener. A full inbox drops the hand-off and
/// marks the inbox overflowed, which costs the listener one read; the bound keeps a listener
/// that is away (reconnecting) from holding the reader's batches in memory.
const INBOX_BATCHES: usize = 16;

/// What one committed batch tells the listener.
#[derive(Debug)]
pub enum Handoff {
    /// These changes committed, in seq order.
    Committed(Vec<LoggedChange>),
    /// Something committed that only a changelog read shows (a gap, whose horizon moved).
    Read,
}

/// The reader's end.
#[derive(Debug, Clone)]
pub struct HandoffSender {
    batches: mpsc::Sender<Handoff>,
    leader_pid: Arc<watch::Sender<Option<i32>>>,
    overflowed: Arc<AtomicBool>,
}

/// The listener's end.
#[derive(Debug)]
pub struct HandoffInbox {
    batches: mpsc::Receiver<Handoff>,
    leader_pid: watch::Receiver<Option<i32>>,
    overflowed: Arc<AtomicBool>,
}

/// A connected pair.
pub fn handoff() -> (HandoffSender, HandoffInbox) {
    let (batches_tx, batches) = mpsc::channel(INBOX_BATCHES);
    let (pid_tx, leader_pid) = watch::channel(None);
    let overflowed = Arc::new(AtomicBool::new(false));
    (
        HandoffSender {
            batches: batches_tx,
            leader_pid: Arc::new(pid_tx),
            overflowed: overflowed.clone(),
        },
        HandoffInbox {
            batches,
            leader_pid,
            overflowed,
        },
    )
}

impl HandoffSender {
    /// The reader leads on the session whose backend has this pid (None: it does not lead).
    pub fn leading(&self, backend_pid: Option<i32>) {
        self.leader_pid.send_replace(backend_pid);
    }

    /// Hands one committed batch over, never waiting: the reader serves every instance, so a
    /// listener that is behind costs itself a read, never the reader time.
    pub fn send(&self, handoff: Handoff) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.batches.try_send(handoff) {
            // Set after the failed send: the inbox is full, so the listener has batches to
            // take and sees the mark when it takes the next one.
            self.overflowed.store(true, Ordering::Release);
        }
    }
}

impl HandoffInbox {
    /// The next hand-off; pending for ever once the reader is gone.
    pub async fn recv(&mut self) -> Handoff {
        match self.batches.recv().await {
            Some(handoff) => handoff,
            None => std::future::pending().await,
        }
    }

    /// Whether a notification from this backend is a batch the reader hands over itself.
    pub fn announced_by_reader(&self, sender_pid: i32) -> bool {
        *self.leader_pid.borrow() == Some(sender_pid)
    }

    /// True once if hand-offs were dropped since the last call: the listener must read.
    pub fn take_overflow(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_inbox_drops_the_batch_and_marks_the_inbox_once() {
        let (sender, mut inbox) = handoff();
        for _ in 0..INBOX_BATCHES {
            sender.send(Handoff::Read);
        }
        assert!(!inbox.take_overflow(), "nothing dropped yet");
        sender.send(Handoff::Committed(Vec::new()));
        assert!(inbox.take_overflow());
        assert!(!inbox.take_overflow(), "the mark is taken once");
        for _ in 0..INBOX_BATCHES {
            assert!(
                matches!(inbox.recv().await, Handoff::Read),
                "the dropped one is the last"
            );
        }
    }

    #[test]
    fn only_the_leading_sessions_notifications_are_announced_by_the_reader() {
        let (sender, inbox) = handoff();
        assert!(!inbox.announced_by_reader(42));
        sender.leading(Some(42));
        assert!(inbox.announced_by_reader(42));
        assert!(!inbox.announced_by_reader(43));
        sender.leading(None);
        assert!(
            !inbox.announced_by_reader(42),
            "a pid of an ended leadership"
        );
    }
}
