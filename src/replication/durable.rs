//! Which slot positions may be confirmed when the reader's batches commit without waiting for
//! their WAL flush (`--replication-commit async`). Confirming a position tells PostgreSQL it may
//! forget the WAL before it; if the batch that recorded those changes were then lost in a crash
//! (its commit not yet flushed), the changes would be gone from the changelog for good. So each
//! confirmation waits until the server's flush position has passed the batch's commit. Pure
//! bookkeeping; the reader feeds it positions read from the server.

use std::collections::VecDeque;

/// Confirmations held back until the WAL they depend on is flushed.
///
/// Where a batch's commit record ends is learned only from an insert position read after the
/// commit returned: the next batch's statement reads one (so steady batches cost no extra round
/// trip), and while something waits with no next batch, the reader's flush probe does.
#[derive(Debug, Default)]
pub(super) struct DurableConfirm {
    /// Flush position that makes the batches bounded so far durable (0: nothing to wait for).
    required: u64,
    /// A batch committed after the last bound was read: its commit's end is not known yet.
    unbounded: bool,
    /// Highest flush position seen.
    flushed: u64,
    /// `(required flush, slot position)` in offer order; `None` waits for the next bound.
    held: VecDeque<(Option<u64>, u64)>,
}

impl DurableConfirm {
    /// `insert` was read after every batch committed so far returned, so it lies past their
    /// commit records: a flush up to it makes them all durable.
    pub(super) fn bounded(&mut self, insert: u64) {
        self.required = self.required.max(insert);
        if self.unbounded {
            for (required, _) in self.held.iter_mut().rev() {
                if required.is_some() {
                    break;
                }
                *required = Some(self.required);
            }
            self.unbounded = false;
        }
    }

    /// A batch was committed without waiting for its flush.
    pub(super) fn committed(&mut self) {
        self.unbounded = true;
    }

    /// The server's WAL is flushed up to `flush`; returns the newest position now safe to
    /// confirm, if any was held.
    pub(super) fn flushed(&mut self, flush: u64) -> Option<u64> {
        self.flushed = self.flushed.max(flush);
        let mut release = None;
        while let Some(&(Some(required), position)) = self.held.front() {
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
        if self.held.is_empty() && !self.unbounded && self.required <= self.flushed {
            return Some(position);
        }
        let required = (!self.unbounded).then_some(self.required);
        match self.held.back_mut() {
            // The same batches: the newer position replaces the older one.
            Some((held_required, held)) if *held_required == required => {
                *held = (*held).max(position);
            }
            _ => self.held.push_back((required, position)),
        }
        None
    }

    /// True while some position waits for a bound or a flush.
    pub(super) fn waiting(&self) -> bool {
        !self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch committed and an insert position read after it (the flush probe's order).
    fn written(gate: &mut DurableConfirm, bound: u64) {
        gate.committed();
        gate.bounded(bound);
    }

    #[test]
    fn without_unflushed_batches_a_position_is_confirmed_at_once() {
        let mut gate = DurableConfirm::default();
        assert_eq!(gate.offer(100), Some(100));
        written(&mut gate, 150);
        assert_eq!(gate.flushed(150), None, "nothing was held");
        assert_eq!(gate.offer(200), Some(200));
        assert!(!gate.waiting());
    }

    #[test]
    fn a_position_waits_until_the_flush_passes_the_batch_it_depends_on() {
        let mut gate = DurableConfirm::default();
        written(&mut gate, 1_000);
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
    fn a_batch_whose_commit_end_is_unknown_holds_its_position_whatever_was_flushed() {
        let mut gate = DurableConfirm::default();
        gate.committed();
        // Its statement read these before it committed: they say nothing about its commit.
        assert_eq!(gate.flushed(5_000), None);
        assert_eq!(gate.offer(900), None);
        assert_eq!(
            gate.flushed(6_000),
            None,
            "no bound yet, so no flush releases it"
        );
        assert!(gate.waiting(), "the flush probe must run");
        gate.bounded(6_500);
        assert_eq!(gate.flushed(6_400), None);
        assert_eq!(gate.flushed(6_500), Some(900));
        assert!(!gate.waiting());
    }

    #[test]
    fn the_next_batch_bounds_the_previous_one_without_a_probe() {
        let mut gate = DurableConfirm::default();
        gate.committed();
        assert_eq!(gate.offer(900), None);
        // The next batch's statement: insert 1_000 bounds the first batch; it commits itself.
        gate.bounded(1_000);
        gate.committed();
        assert_eq!(gate.flushed(1_000), Some(900));
        assert_eq!(gate.offer(1_900), None, "the second batch is not bounded");
        gate.bounded(2_000);
        gate.committed();
        assert_eq!(gate.flushed(1_999), None);
        assert_eq!(gate.offer(2_900), None);
        assert_eq!(gate.flushed(2_000), Some(1_900));
        assert!(gate.waiting(), "the third batch's position still waits");
    }

    #[test]
    fn under_steady_batches_older_positions_are_released_before_newer_ones_are_durable() {
        let mut gate = DurableConfirm::default();
        written(&mut gate, 1_000);
        assert_eq!(gate.offer(900), None);
        assert_eq!(
            gate.offer(905),
            None,
            "a keepalive for the same batches replaces it"
        );
        written(&mut gate, 2_000);
        assert_eq!(gate.offer(1_900), None);
        written(&mut gate, 3_000);
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
        written(&mut gate, 1_000);
        assert_eq!(gate.flushed(1_200), None);
        assert_eq!(gate.offer(900), Some(900));
    }
}
