//! Latency summaries. Whole-run distributions go through an HDR histogram (3 significant
//! digits, 1 µs .. 60 s); per-update fan-out statistics (first/median/p99/last receiver)
//! are exact, from the sorted samples of that update.

use hdrhistogram::Histogram;

/// Percentiles of one distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Summary {
    pub count: u64,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

const NS_PER_MS: f64 = 1_000_000.0;

/// An HDR histogram of nanosecond latencies.
#[derive(Debug)]
pub struct LatencyHist(Histogram<u64>);

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    pub fn new() -> Self {
        // Bounds are constants that satisfy the constructor's rules (low ≥ 1, high ≥ 2·low,
        // sigfig ≤ 5), so it cannot fail.
        #[allow(clippy::unwrap_used)]
        let h = Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
        Self(h)
    }

    /// Records `ns`, clamped into the histogram's range (sub-µs counts as 1 µs).
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1_000));
    }

    pub fn summary(&self) -> Summary {
        let h = &self.0;
        if h.is_empty() {
            return Summary::default();
        }
        let q = |p: f64| h.value_at_quantile(p) as f64 / NS_PER_MS;
        Summary {
            count: h.len(),
            min_ms: h.min() as f64 / NS_PER_MS,
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: h.max() as f64 / NS_PER_MS,
            mean_ms: h.mean() / NS_PER_MS,
        }
    }
}

/// Exact summary of a slice of nanosecond values (sorted in place).
pub fn exact(values: &mut [u64]) -> Summary {
    if values.is_empty() {
        return Summary::default();
    }
    values.sort_unstable();
    let n = values.len();
    let at = |p: f64| values[((p * n as f64).ceil() as usize).clamp(1, n) - 1] as f64 / NS_PER_MS;
    Summary {
        count: n as u64,
        min_ms: values[0] as f64 / NS_PER_MS,
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: values[n - 1] as f64 / NS_PER_MS,
        mean_ms: values.iter().map(|&v| v as f64).sum::<f64>() / n as f64 / NS_PER_MS,
    }
}

impl LatencyHist {
    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &LatencyHist) {
        // Same bounds on both sides (one constructor), so `add` cannot fail.
        let _ = self.0.add(&other.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_percentiles() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1_000_000).collect();
        let s = exact(&mut v);
        assert_eq!(s.p50_ms, 500.0);
        assert_eq!(s.p99_ms, 990.0);
        assert_eq!(s.max_ms, 1000.0);
        assert_eq!(s.min_ms, 1.0);
    }

    #[test]
    fn hist_close_to_exact() {
        let mut h = LatencyHist::new();
        for i in 1..=10_000u64 {
            h.record(i * 1_000);
        }
        let s = h.summary();
        assert!((s.p50_ms - 5.0).abs() < 0.01, "{s:?}");
        assert!((s.p999_ms - 9.99).abs() < 0.02, "{s:?}");
    }
}
