//! Gives the heap memory that closed connections freed back to the operating system. glibc
//! keeps what its threads free in per-thread arenas, so after a wave of disconnects the process
//! would stay at its peak size for good (BENCHMARKS.md: +55 MiB kept after 10 000 idle
//! connections closed). This task watches the session count and, once it has fallen to half of
//! its peak, asks glibc to return the free pages.
//!
//! Imports `distributor` (the session count) and `shutdown`.

use std::time::Duration;

use crate::distributor::DistributorHandle;
use crate::distributor::FrameBytes;
use crate::shutdown::Shutdown;

/// How often the session count is read (an atomic load: it costs the distributor nothing).
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Fewer closed sessions than this free too little (a few MiB) to be worth a trim, which walks
/// and locks every arena in turn.
const MIN_SESSIONS_CLOSED: usize = 256;

/// True when enough sessions have closed since the peak that a trim is worth it.
fn worth_trimming(peak: usize, now: usize) -> bool {
    peak >= now + MIN_SESSIONS_CLOSED && now <= peak / 2
}

/// Runs until shutdown.
pub async fn run_trimmer<F: FrameBytes>(distributor: DistributorHandle<F>, shutdown: Shutdown) {
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peak = 0;
    // A trim waits one more tick once it is due: the distributor counts a session gone a
    // moment before its task and connection have freed everything they hold.
    let mut due = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let stats = distributor.stats();
        peak = peak.max(stats.sessions);
        let worth = worth_trimming(peak, stats.sessions);
        if worth && !due {
            due = true;
            continue;
        }
        due = false;
        if worth {
            // The walk takes milliseconds on a large heap: not on a runtime worker.
            let released = tokio::task::spawn_blocking(release_free_heap)
                .await
                .unwrap_or(false);
            tracing::debug!(
                peak,
                sessions = stats.sessions,
                released,
                "returned freed heap to the OS"
            );
            peak = stats.sessions;
        }
    }
}

/// Asks glibc to return free pages of every arena; true if any were released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "malloc_trim is glibc's, reachable only through FFI"
)]
fn release_free_heap() -> bool {
    // SAFETY: malloc_trim has no preconditions; it only takes glibc's own arena locks.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Other allocators have no such call (and most return memory on their own).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_large_share_of_sessions_closed() {
        assert!(worth_trimming(10_000, 0));
        assert!(worth_trimming(10_000, 5_000));
        assert!(!worth_trimming(10_000, 5_001), "not yet half");
        assert!(!worth_trimming(300, 100), "too few closed to matter");
        assert!(worth_trimming(512, 256));
        assert!(!worth_trimming(0, 0));
    }
}
