//! What each receiving client saw: counters that prove correctness and the latency
//! samples, kept per connection behind an uncontended mutex so the coordinator can drain
//! them between phases of a run.
//!
//! Correctness rules, per connection:
//! - a change for a product this connection did not subscribe to → `unexpected`;
//! - with a server `seq`: seq must strictly increase (equal → `duplicates`, lower →
//!   `order_violations`);
//! - always: the bench's per-product version (`unitsAvailable`) must increase
//!   (equal → `duplicates`, lower → `order_violations`, skipped numbers → `gaps`).
//!   A gap is only an error if the missing update was actually committed, which the
//!   scenario checks globally as `expected − received`.

use crate::clock;
use crate::proto::{BenchName, ServerFrame};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub received: u64,
    pub duplicates: u64,
    pub order_violations: u64,
    pub gaps: u64,
    pub unexpected: u64,
    /// Changes not written by this bench (no `bench:` name): someone else's traffic.
    pub foreign: u64,
    pub error_frames: u64,
    pub parse_errors: u64,
    /// Changes that carried a server `seq`.
    pub with_seq: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.order_violations += o.order_violations;
        self.gaps += o.gaps;
        self.unexpected += o.unexpected;
        self.foreign += o.foreign;
        self.error_frames += o.error_frames;
        self.parse_errors += o.parse_errors;
        self.with_seq += o.with_seq;
    }
}

/// One delivery: which bench update, and send → receive latency.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub update: u64,
    pub lat_ns: u64,
}

/// Run-wide state all receivers update.
#[derive(Debug, Default)]
pub struct Shared {
    pub received: AtomicU64,
    /// Connections the server closed (or that failed) while the run expected them open.
    pub dropped: AtomicU64,
    /// Fan-out tracking: deliveries per update number, and how many make it complete.
    pub per_update: Vec<AtomicU32>,
    pub expected_per_update: AtomicU32,
    pub update_complete: Notify,
}

impl Shared {
    pub fn new(tracked_updates: usize) -> Arc<Self> {
        Arc::new(Self {
            per_update: (0..tracked_updates).map(|_| AtomicU32::new(0)).collect(),
            ..Default::default()
        })
    }

    /// Deliveries so far of fan-out update `u`.
    pub fn delivered(&self, u: u64) -> u32 {
        self.per_update
            .get(u as usize)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }
}

/// One connection's view.
#[derive(Debug, Default)]
pub struct ConnRecord {
    /// Subscribed product ids (sorted) and the last version seen for each.
    subs: Vec<(u64, i64)>,
    last_seq: Option<u64>,
    pub counters: Counters,
    pub samples: Vec<Sample>,
}

impl ConnRecord {
    pub fn new(mut ids: Vec<u64>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        Self {
            subs: ids.into_iter().map(|id| (id, i64::MIN)).collect(),
            ..Default::default()
        }
    }

    /// Handles one text frame received at `now_ns`.
    pub fn on_text(&mut self, text: &str, now_ns: u64, shared: &Shared) {
        let Ok(frame) = ServerFrame::parse(text) else {
            self.counters.parse_errors += 1;
            return;
        };
        match frame.kind.as_ref() {
            "change" => {}
            "error" => {
                self.counters.error_frames += 1;
                return;
            }
            _ => return,
        }
        let Some(product) = frame.product else {
            self.counters.parse_errors += 1;
            return;
        };
        let Some(name) = BenchName::parse(&product.product_name) else {
            self.counters.foreign += 1;
            return;
        };
        self.counters.received += 1;
        shared.received.fetch_add(1, Ordering::Relaxed);
        let mut duplicate = false;
        if let Some(seq) = frame.seq {
            self.counters.with_seq += 1;
            match self.last_seq {
                Some(last) if seq == last => duplicate = true,
                Some(last) if seq < last => self.counters.order_violations += 1,
                _ => {}
            }
            self.last_seq = Some(self.last_seq.map_or(seq, |l| l.max(seq)));
        }
        match self.subs.binary_search_by_key(&product.id, |s| s.0) {
            Err(_) => self.counters.unexpected += 1,
            Ok(i) => {
                let last = &mut self.subs[i].1;
                let v = product.units_available;
                if *last == i64::MIN || v == *last + 1 {
                    *last = v;
                } else if v == *last {
                    duplicate = true;
                } else if v < *last {
                    // Counted once even if seq also caught it.
                    if frame.seq.is_none() {
                        self.counters.order_violations += 1;
                    }
                } else {
                    self.counters.gaps += 1;
                    *last = v;
                }
            }
        }
        if duplicate {
            self.counters.duplicates += 1;
        }
        self.samples.push(Sample {
            update: name.update,
            lat_ns: now_ns.saturating_sub(name.sent_ns),
        });
        if let Some(c) = shared.per_update.get(name.update as usize) {
            let n = c.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= shared.expected_per_update.load(Ordering::Acquire) {
                shared.update_complete.notify_one();
            }
        }
    }
}

/// A connection's record, shared between its task and the coordinator.
pub type SharedRecord = Arc<Mutex<ConnRecord>>;

/// Takes every record's samples and counters so far, leaving them empty.
pub fn drain(records: &[SharedRecord]) -> (Vec<Sample>, Counters) {
    let mut samples = Vec::new();
    let mut counters = Counters::default();
    for r in records {
        // A poisoned lock means a receiver panicked mid-update; its data is still the
        // best we have, so take it.
        let mut g = r.lock().unwrap_or_else(|p| p.into_inner());
        samples.append(&mut g.samples);
        counters.add(&std::mem::take(&mut g.counters));
    }
    (samples, counters)
}

/// Receive timestamp for a frame that just arrived.
pub fn stamp() -> u64 {
    clock::now_ns()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: u64, version: i64, update: u64, seq: Option<u64>) -> String {
        let seq = seq.map(|s| format!(",\"seq\":{s}")).unwrap_or_default();
        format!(
            r#"{{"type":"change"{seq},"action":"UPDATE","product":{{"productId":{id},"unitsAvailable":{version},"productName":"bench:{update}:0"}}}}"#
        )
    }

    #[test]
    fn counts_duplicates_order_and_unexpected() {
        let shared = Shared::new(0);
        let mut r = ConnRecord::new(vec![1, 2]);
        r.on_text(&change(1, 1, 0, None), 10, &shared);
        r.on_text(&change(1, 2, 1, None), 10, &shared);
        r.on_text(&change(1, 2, 1, None), 10, &shared); // duplicate
        r.on_text(&change(1, 1, 0, None), 10, &shared); // out of order
        r.on_text(&change(2, 5, 2, None), 10, &shared); // first seen: fine
        r.on_text(&change(2, 7, 3, None), 10, &shared); // gap
        r.on_text(&change(3, 1, 4, None), 10, &shared); // not subscribed
        let c = r.counters;
        assert_eq!(
            (
                c.received,
                c.duplicates,
                c.order_violations,
                c.gaps,
                c.unexpected
            ),
            (7, 1, 1, 1, 1)
        );
        assert_eq!(shared.received.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn seq_orders_across_products() {
        let shared = Shared::new(0);
        let mut r = ConnRecord::new(vec![1, 2]);
        r.on_text(&change(1, 1, 0, Some(10)), 0, &shared);
        r.on_text(&change(2, 1, 1, Some(9)), 0, &shared); // older seq on another product
        r.on_text(&change(2, 2, 2, Some(11)), 0, &shared);
        r.on_text(&change(2, 2, 2, Some(11)), 0, &shared); // duplicate (seq and version)
        let c = r.counters;
        assert_eq!((c.order_violations, c.duplicates, c.with_seq), (1, 1, 4));
    }

    #[test]
    fn fanout_tracking_notifies_on_completion() {
        let shared = Shared::new(3);
        shared.expected_per_update.store(2, Ordering::Release);
        let mut a = ConnRecord::new(vec![1]);
        let mut b = ConnRecord::new(vec![1]);
        a.on_text(&change(1, 1, 2, None), 50, &shared);
        b.on_text(&change(1, 1, 2, None), 60, &shared);
        assert_eq!(shared.delivered(2), 2);
        assert_eq!(a.samples[0].lat_ns, 50);
    }

    #[test]
    fn foreign_and_errors() {
        let shared = Shared::new(0);
        let mut r = ConnRecord::new(vec![1]);
        r.on_text(
            r#"{"type":"change","action":"INSERT","product":{"productId":1,"productName":"x"}}"#,
            0,
            &shared,
        );
        r.on_text(r#"{"type":"error","error":"e","message":"m"}"#, 0, &shared);
        r.on_text("not json", 0, &shared);
        let c = r.counters;
        assert_eq!(
            (c.foreign, c.error_frames, c.parse_errors, c.received),
            (1, 1, 1, 0)
        );
    }
}
