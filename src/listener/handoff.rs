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
//! pid of the leading session. While the reader leads, the listener does not LISTEN at all
//! (the reader writes every change the changelog gets), so a dropped hand-off also wakes it:
//! no notification would.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, mpsc, watch};

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

/// What [`HandoffInbox::next`] yields.
#[derive(Debug)]
pub enum FromReader {
    /// A hand-off to take.
    Batch(Handoff),
    /// The reader may have started or stopped leading.
    Leadership,
}

/// The reader's end.
#[derive(Debug, Clone)]
pub struct HandoffSender {
    batches: mpsc::Sender<Handoff>,
    leader_pid: Arc<watch::Sender<Option<i32>>>,
    overflowed: Arc<AtomicBool>,
    overflow_wake: Arc<Notify>,
}

/// The listener's end.
#[derive(Debug)]
pub struct HandoffInbox {
    batches: mpsc::Receiver<Handoff>,
    leader_pid: watch::Receiver<Option<i32>>,
    overflowed: Arc<AtomicBool>,
    overflow_wake: Arc<Notify>,
}

/// A connected pair.
pub fn handoff() -> (HandoffSender, HandoffInbox) {
    let (batches_tx, batches) = mpsc::channel(INBOX_BATCHES);
    let (pid_tx, leader_pid) = watch::channel(None);
    let overflowed = Arc::new(AtomicBool::new(false));
    let overflow_wake = Arc::new(Notify::new());
    (
        HandoffSender {
            batches: batches_tx,
            leader_pid: Arc::new(pid_tx),
            overflowed: overflowed.clone(),
            overflow_wake: overflow_wake.clone(),
        },
        HandoffInbox {
            batches,
            leader_pid,
            overflowed,
            overflow_wake,
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
            // The batches before it may all be taken before the mark is looked at again.
            self.overflow_wake.notify_one();
        }
    }
}

impl HandoffInbox {
    /// What the reader has for the listener next: a batch, a [`Handoff::Read`] once those
    /// waiting are taken if one was dropped, or a change of leadership (which
    /// [`Self::reader_leads`] tells). Pending for ever once the reader is gone.
    pub async fn next(&mut self) -> FromReader {
        tokio::select! {
            biased;
            Some(handoff) = self.batches.recv() => FromReader::Batch(handoff),
            () = self.overflow_wake.notified() => FromReader::Batch(Handoff::Read),
            Ok(()) = self.leader_pid.changed() => FromReader::Leadership,
            else => std::future::pending().await,
        }
    }

    /// Whether this instance's reader leads now; marks that state seen.
    pub fn reader_leads(&mut self) -> bool {
        self.leader_pid.borrow_and_update().is_some()
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
                matches!(inbox.next().await, FromReader::Batch(Handoff::Read)),
                "the dropped one is the last"
            );
        }
    }

    #[tokio::test]
    async fn a_dropped_batch_wakes_the_inbox_once_those_before_it_are_taken() {
        let (sender, mut inbox) = handoff();
        for _ in 0..INBOX_BATCHES {
            sender.send(Handoff::Committed(Vec::new()));
        }
        sender.send(Handoff::Committed(Vec::new()));
        for _ in 0..INBOX_BATCHES {
            assert!(matches!(
                inbox.next().await,
                FromReader::Batch(Handoff::Committed(_))
            ));
        }
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), inbox.next()).await;
        assert!(
            matches!(woken, Ok(FromReader::Batch(Handoff::Read))),
            "with no batch left, the drop still asks for a read"
        );
    }

    #[tokio::test]
    async fn leadership_changes_are_seen_once_each() {
        let (sender, mut inbox) = handoff();
        assert!(!inbox.reader_leads());
        sender.leading(Some(7));
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), inbox.next()).await;
        assert!(matches!(seen, Ok(FromReader::Leadership)));
        assert!(inbox.reader_leads());
        let again = tokio::time::timeout(std::time::Duration::from_millis(50), inbox.next()).await;
        assert!(again.is_err(), "nothing new since it looked");
        sender.leading(None);
        assert!(matches!(inbox.next().await, FromReader::Leadership));
        assert!(!inbox.reader_leads());
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
