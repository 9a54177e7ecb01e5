//! [`CommandPace`]: how fast one session's commands are read (`--command-rate`,
//! `--command-burst`).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Budgets;

/// GCRA pacing of one session's commands: `burst` at once, then one per `interval`. One
/// instant of state, so an idle session pays 8 bytes for it.
#[derive(Debug, Clone, Copy)]
pub(super) struct CommandPace {
    /// When the pace would next be "empty": each command pushes it one interval further.
    theoretical_arrival: Instant,
    interval: Duration,
    /// How far ahead of now `theoretical_arrival` may run: the burst.
    tolerance: Duration,
}

impl CommandPace {
    pub(super) fn new(budgets: &Budgets) -> Self {
        let interval = budgets.command_interval();
        Self {
            theoretical_arrival: Instant::now(),
            interval,
            tolerance: interval * budgets.command_burst.saturating_sub(1),
        }
    }

    /// When the next command may be read: None if now.
    pub(super) fn wait_until(&self, now: Instant) -> Option<Instant> {
        let earliest = self.theoretical_arrival.checked_sub(self.tolerance)?;
        (earliest > now).then_some(earliest)
    }

    /// Counts a client frame of `bytes` read at `now`: one command per started KiB, so a
    /// frame of 10 000 ids costs what 80 small commands do (its parsing and the distributor's
    /// work grow with its size).
    pub(super) fn spend(&mut self, now: Instant, bytes: usize) {
        let units = u32::try_from(1 + bytes / 1024).unwrap_or(u32::MAX);
        self.theoretical_arrival =
            self.theoretical_arrival.max(now) + self.interval.saturating_mul(units);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(rate: u32, burst: u32) -> CommandPace {
        CommandPace::new(&Budgets {
            max_sessions: 1,
            max_sessions_per_ip: 1,
            max_total_subscriptions: 1,
            max_subscriptions_per_ip: 1,
            command_rate: rate,
            command_burst: burst,
        })
    }

    #[test]
    fn the_pace_allows_a_burst_then_the_rate_and_charges_large_frames_by_size() {
        let mut pace = pace(10, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(pace.wait_until(start), None, "within the burst");
            pace.spend(start, 20);
        }
        let next = pace.wait_until(start).expect("the burst is spent");
        assert_eq!(next - start, Duration::from_millis(100), "one interval");
        assert_eq!(pace.wait_until(next), None);
        // A 10 KiB frame costs 11 commands: 1.1 s before the next one.
        pace.spend(next, 10 * 1024);
        let after_large = pace.wait_until(next).expect("paced");
        assert_eq!(after_large - next, Duration::from_millis(1100));
        // Idle time refills the burst, never beyond it.
        let later = after_large + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(pace.wait_until(later), None);
            pace.spend(later, 1);
        }
        assert!(pace.wait_until(later).is_some());
    }
}
