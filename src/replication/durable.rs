//! Which slot positions may be confirmed when the reader's batches commit without waiting for
//! their WAL flush (`--replication-commit async`). Confirming a position tells PostgreSQL it may
//! forget the WAL before it; if the batch that recorded those changes were then lost in a crash
//! (its commit not yet flushed), the changes would be gone from the changelog for good. So each
//! confirmation waits until the server's flush position has passed the batch's commit. Pure
//! bookkeeping; the reader feeds it positions read from the server.

use std::collections::VecDeque;

/// Confirmations held back until the WAL they depend on is flushed.
#[derive(Debug, Default)]
pub(super) struct DurableConfirm {
    /// Flush position that makes the batches written so far durable (0: nothing to wait for).
    required: u64,
    /// Highest flush position seen.
    flushed: u64,
    /// `(required flush, slot position)`, both ascending.
    held: VecDeque<(u64, u64)>,
}

impl DurableConfirm {
    /// A batch was committed; every WAL insert position read after its commit (`bound`) lies
    /// past its commit record, so a flush up to `bound` makes it durable.
    pub(super) fn written(&mut self, bound: u64) {
        self.required = self.required.max(bound);
    }

    /// The server's WAL is flushed up to `flush`; returns the newest position now safe to
    /// confirm, if any was held.
    pub(super) fn flushed(&mut self, flush: u64) -> Option<u64> {
        self.flushed = self.flushed.max(flush);
        let mut release = None;
        while let Some(&(required, position)) = self.held.front() {
            if required > self.flushed {
                break;
            }
            release = Some(position);
            self.held.pop_front();
        }
        release
    }

    /// The reader would confirm `position`: returns it if every batch it depends on is flushed,
    /// else holds it (to be returned by [`Self::flushed`]).
    pub(super) fn offer(&mut self, position: u64) -> Option<u64> {
        if self.held.is_empty() && self.required <= self.flushed {
            return Some(position);
        }
        match self.held.back_mut() {
            // The same batches: the newer position replaces the older one.
            Some((required, held)) if *required == self.required => {
                *held = (*held).max(position);
            }
            _ => self.held.push_back((self.required, position)),
        }
        None
    }

    /// True while some position waits for a flush.
    pub(super) fn waiting(&self) -> bool {
        !self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_unflushed_batches_a_position_is_confirmed_at_once() {
        let mut gate = DurableConfirm::default();
        assert_eq!(gate.offer(100), Some(100));
        gate.written(150);
        assert_eq!(gate.flushed(150), None, "nothing was held");
        assert_eq!(gate.offer(200), Some(200));
        assert!(!gate.waiting());
    }

    #[test]
    fn a_position_waits_until_the_flush_passes_the_batch_it_depends_on() {
        let mut gate = DurableConfirm::default();
        gate.written(1_000);
        assert_eq!(gate.offer(900), None);
        assert!(gate.waiting());
        assert_eq!(
            gate.flushed(999),
            None,
            "the batch's commit is not flushed yet"
        );
        assert_eq!(gate.flushed(1_000), Some(900));
        assert!(!gate.waiting());
        assert_eq!(
            gate.offer(950),
            Some(950),
            "a keepalive after it goes through"
        );
    }

    #[test]
    fn under_steady_batches_older_positions_are_released_before_newer_ones_are_durable() {
        let mut gate = DurableConfirm::default();
        gate.written(1_000);
        assert_eq!(gate.offer(900), None);
        assert_eq!(
            gate.offer(905),
            None,
            "a keepalive for the same batches replaces it"
        );
        gate.written(2_000);
        assert_eq!(gate.offer(1_900), None);
        gate.written(3_000);
        assert_eq!(gate.offer(2_900), None);
        // The flush never catches up with the newest batch, yet confirmations advance.
        assert_eq!(gate.flushed(2_500), Some(1_900));
        assert_eq!(gate.flushed(2_600), None);
        assert_eq!(gate.flushed(3_000), Some(2_900));
        assert!(!gate.waiting());
    }

    #[test]
    fn a_flush_seen_before_the_offer_counts() {
        let mut gate = DurableConfirm::default();
        gate.written(1_000);
        assert_eq!(gate.flushed(1_200), None);
        assert_eq!(gate.offer(900), Some(900));
    }
}
