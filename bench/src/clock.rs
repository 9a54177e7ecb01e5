//! The one clock every latency is measured with: nanoseconds since this process's start,
//! from the monotonic clock.
//!
//! Writers and receivers run in the same process, so a send time written into a product
//! (see `proto::BenchName`) can be compared with a receive time without any cross-machine
//! clock agreement. Wall-clock time is never used for latencies (it can step).

use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Fixes the epoch; call once at start so the first measured sample does not pay for it.
pub fn init() {
    EPOCH.get_or_init(Instant::now);
}

/// Monotonic nanoseconds since `init` (or since the first call).
pub fn now_ns() -> u64 {
    // u64 nanoseconds overflow after 584 years of uptime.
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
