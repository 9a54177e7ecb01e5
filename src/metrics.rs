//! `Metrics`: this App's Prometheus registry and the handles the hot paths record into.
//!
//! Each `App` builds its own recorder with `PrometheusBuilder::build_recorder()` and keeps it
//! here, instead of installing a process-global one: tests run several Apps in one process in
//! parallel, and a global recorder would mix their numbers. Because nothing is global, the
//! `metrics` macros (`counter!`…) are not used; handles are registered once on the recorder and
//! cloned into whoever records (listener, feed, session, SSE, request middleware). A handle is
//! an `Arc` around an atomic, so recording is lock-free.
//!
//! Two kinds of numbers end up in `/metrics`:
//! - **recorded as they happen** (this module's methods): messages and bytes written per
//!   transport, subscription starts by kind (live, resume, snapshot, reset), the commit→dispatch
//!   lag histogram, REST request latency by route, method and status;
//! - **copied at scrape time** from state that already has one owner (the distributor's `Stats`,
//!   the listener's `ListenerStatus`, the transport's write timeouts, the history reader's
//!   `HistoryStats`) by `health::metrics`, with [`Metrics::counter`] / [`Metrics::gauge`]:
//!   counting the same event twice in two places would let them disagree.
//!
//! Imports nothing of ours.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::time::Instant;

/// Metadata is ignored by the Prometheus recorder; one value serves every registration.
const METADATA: Metadata<'static> = Metadata::new("rowcast", Level::INFO, Some("rowcast"));

/// Buckets for the commit→dispatch lag: sub-millisecond when all is well, seconds while the
/// listener catches up after a reconnect.
const LAG_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];
/// Buckets for REST latency: a primary-key read is ~1 ms, a page of 1000 rows tens of ms.
const REQUEST_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Window over which `/stats` averages changes per second: long enough to smooth bursts, short
/// enough that the dashboard's counter follows a load change within seconds.
const RATE_WINDOW_SECONDS: u64 = 5;

/// How a subscriber's stream began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// A plain subscribe: changes from now on.
    Live,
    /// `since`: replayed from the changelog.
    Resume,
    /// `snapshot: true`: the rows first.
    Snapshot,
    /// `since` older than the changelog keeps: a reset and a snapshot.
    Reset,
}

/// Which transport wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `/websocket`.
    WebSocket,
    /// `/products/events`.
    Sse,
}

/// This App's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    dispatch_lag: Histogram,
    /// Indexed by `Transport as usize`: what sessions and streams wrote, counted as they write.
    messages: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    /// The same plus what the distributor wrote on the direct lane, copied at scrape time
    /// ([`Metrics::publish_delivered`]).
    messages_published: [Counter; 2],
    bytes_published: [Counter; 2],
    /// Indexed by `StartKind as usize`.
    starts: [Counter; 4],
    conflated: Counter,
    /// Read back by `/stats` too, so a plain atomic (copied into the registry at scrape time).
    commands_throttled: AtomicU64,
    rate: Mutex<Rate>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric described.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("rowcast_dispatch_lag_seconds".to_owned()),
                &LAG_BUCKETS,
            )
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full("rowcast_http_request_duration_seconds".to_owned()),
                    &REQUEST_BUCKETS,
                )
            })
            // Only an empty bucket list is refused, and both lists above are constants.
            .expect("bucket lists are not empty")
            .build_recorder();
        for (name, unit, help) in DESCRIPTIONS {
            recorder.describe_counter(name.into(), unit, help.into());
        }
        let handle = recorder.handle();
        let counter = |name: &'static str, label: (&'static str, &'static str)| {
            recorder.register_counter(
                &Key::from_parts(name, vec![Label::new(label.0, label.1)]),
                &METADATA,
            )
        };
        let messages_published = [
            counter(
                "rowcast_messages_delivered_total",
                ("transport", "websocket"),
            ),
            counter("rowcast_messages_delivered_total", ("transport", "sse")),
        ];
        let bytes_published = [
            counter("rowcast_bytes_sent_total", ("transport", "websocket")),
            counter("rowcast_bytes_sent_total", ("transport", "sse")),
        ];
        let starts = [
            counter("rowcast_subscription_starts_total", ("kind", "live")),
            counter("rowcast_subscription_starts_total", ("kind", "resume")),
            counter("rowcast_subscription_starts_total", ("kind", "snapshot")),
            counter("rowcast_subscription_starts_total", ("kind", "reset")),
        ];
        let conflated = recorder.register_counter(
            &Key::from_name("rowcast_changes_conflated_total"),
            &METADATA,
        );
        let dispatch_lag =
            recorder.register_histogram(&Key::from_name("rowcast_dispatch_lag_seconds"), &METADATA);
        Self(Arc::new(Inner {
            recorder,
            handle,
            dispatch_lag,
            messages: [AtomicU64::new(0), AtomicU64::new(0)],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            messages_published,
            bytes_published,
            starts,
            conflated,
            commands_throttled: AtomicU64::new(0),
            rate: Mutex::new(Rate::default()),
        }))
    }

    /// A counter by name and labels, for values copied at scrape time (`Counter::absolute`).
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.0
            .recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    /// A gauge by name and labels.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        self.0
            .recorder
            .register_gauge(&key(name, labels), &METADATA)
    }

    /// A notification's change(s) entered the distributor `lag` after it arrived.
    pub fn observe_dispatch_lag(&self, lag: Duration) {
        self.0.dispatch_lag.record(lag.as_secs_f64());
    }

    /// One change entered the distributor (for the changes-per-second average).
    pub fn change_dispatched(&self) {
        self.0
            .rate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(Instant::now());
    }

    /// Average changes dispatched per second over the last few whole seconds.
    pub fn changes_per_second(&self) -> f64 {
        self.0
            .rate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .per_second(Instant::now())
    }

    /// `count` messages totalling `bytes` were written to a client.
    pub fn delivered(&self, transport: Transport, count: usize, bytes: usize) {
        self.0.messages[transport as usize].fetch_add(count as u64, Ordering::Relaxed);
        self.0.bytes[transport as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Copies the delivery totals into the registry, adding the changes the distributor wrote
    /// straight into WebSockets (`direct_messages`, `direct_bytes`: its running totals).
    pub fn publish_delivered(&self, direct_messages: u64, direct_bytes: u64) {
        let inner = &self.0;
        for transport in [Transport::WebSocket, Transport::Sse] {
            let i = transport as usize;
            let (extra_messages, extra_bytes) = match transport {
                Transport::WebSocket => (direct_messages, direct_bytes),
                Transport::Sse => (0, 0),
            };
            inner.messages_published[i]
                .absolute(inner.messages[i].load(Ordering::Relaxed) + extra_messages);
            inner.bytes_published[i].absolute(inner.bytes[i].load(Ordering::Relaxed) + extra_bytes);
        }
    }

    /// A subscriber's stream began.
    pub fn subscription_started(&self, kind: StartKind) {
        self.0.starts[kind as usize].increment(1);
    }

    /// `count` superseded versions were skipped for a client that had stopped reading.
    pub fn changes_conflated(&self, count: u64) {
        self.0.conflated.increment(count);
    }

    /// A session waited before reading its next command (`--command-rate`).
    pub fn command_throttled(&self) {
        self.0.commands_throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// Times sessions waited before reading a command, since start.
    pub fn commands_throttled(&self) -> u64 {
        self.0.commands_throttled.load(Ordering::Relaxed)
    }

    /// A REST request finished. `route` is the matched route template (bounded cardinality).
    pub fn request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let labels = vec![
            Label::new("route", route.to_owned()),
            Label::new("method", method.to_owned()),
            Label::new("status", status.to_string()),
        ];
        self.0
            .recorder
            .register_histogram(
                &Key::from_parts("rowcast_http_request_duration_seconds", labels),
                &METADATA,
            )
            .record(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        self.0.handle.render()
    }

    /// Folds recorded histogram samples into their buckets; run periodically so samples do not
    /// pile up between scrapes.
    pub fn run_upkeep(&self) {
        self.0.handle.run_upkeep();
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(key, value)| Label::new(*key, *value))
            .collect::<Vec<_>>(),
    )
}

/// Help lines. (`describe_counter` serves every kind: the recorder keeps one table.)
const DESCRIPTIONS: [(&str, Option<Unit>, &str); 28] = [
    (
        "rowcast_sessions",
        None,
        "Connected subscriber sessions (WebSocket and SSE).",
    ),
    (
        "rowcast_subscriptions",
        None,
        "(session, product) subscription pairs.",
    ),
    (
        "rowcast_products_with_subscribers",
        None,
        "Products with at least one subscriber.",
    ),
    (
        "rowcast_all_subscribers",
        None,
        "Sessions subscribed to every product (\"all\":true).",
    ),
    (
        "rowcast_changes_received_total",
        None,
        "Changes the listener received, by source (notification: read when notified; changelog: \
         read at a reconnect or health tick; reader: handed over by this instance's replication reader).",
    ),
    (
        "rowcast_changes_published_total",
        None,
        "Changes handed to the distributor.",
    ),
    (
        "rowcast_messages_queued_total",
        None,
        "Messages put into session outboxes.",
    ),
    (
        "rowcast_messages_waiting",
        None,
        "Messages waiting in all outboxes.",
    ),
    (
        "rowcast_messages_delivered_total",
        None,
        "Messages written to clients, by transport.",
    ),
    (
        "rowcast_bytes_sent_total",
        Some(Unit::Bytes),
        "Message bytes written to clients (payload, without framing), by transport.",
    ),
    (
        "rowcast_queue_overflows_total",
        None,
        "Outbox overflows by slow-client policy: sessions evicted (disconnect) or changes left to a changelog read (conflate).",
    ),
    (
        "rowcast_changes_conflated_total",
        None,
        "Superseded versions skipped for clients that had stopped reading (each newer version sent says so).",
    ),
    (
        "rowcast_budget_refusals_total",
        None,
        "Sessions and subscribes refused by a budget, by what was refused (sessions, subscriptions) and whose budget (connection, address, server).",
    ),
    (
        "rowcast_commands_throttled_total",
        None,
        "Times a session waited before reading its next command because it sent faster than --command-rate.",
    ),
    (
        "rowcast_stream_resets_total",
        None,
        "Times every subscription was restarted from a snapshot because the changelog could not fill a gap (pruned during an outage, or the database's history rewound).",
    ),
    (
        "rowcast_listener_failed_attempts",
        None,
        "Consecutive failed LISTEN connection or catch-up attempts (0 while healthy); reconnects back off exponentially with it.",
    ),
    (
        "rowcast_listener_connected",
        None,
        "1 while LISTEN is active on a healthy connection.",
    ),
    (
        "rowcast_listener_reconnects_total",
        None,
        "LISTEN connections replaced after a failure.",
    ),
    (
        "rowcast_listener_payloads_skipped_total",
        None,
        "Notifications whose payload was not a product change.",
    ),
    (
        "rowcast_last_seq",
        None,
        "Seq of the last change published.",
    ),
    (
        "rowcast_dispatch_lag_seconds",
        Some(Unit::Seconds),
        "From a notification's arrival at the listener to its change entering the distributor.",
    ),
    (
        "rowcast_http_request_duration_seconds",
        Some(Unit::Seconds),
        "HTTP request latency (to the response head) by route, method and status.",
    ),
    (
        "rowcast_subscription_starts_total",
        None,
        "Subscriber streams begun, by kind: live, resume (since), snapshot, reset.",
    ),
    (
        "rowcast_history_reads_refused_total",
        None,
        "Replay and snapshot reads refused because the history queue was full or no history connection came free in time (each ended a WebSocket with 1013 or an event stream with history_busy).",
    ),
    (
        "rowcast_history_reads_waiting",
        None,
        "Replay and snapshot reads waiting for a history connection.",
    ),
    (
        "rowcast_history_reads_running",
        None,
        "Replay and snapshot reads holding a history connection.",
    ),
    (
        "rowcast_changes_per_second",
        None,
        "Changes dispatched per second, averaged over the last 5 s.",
    ),
    (
        "rowcast_write_timeouts_total",
        None,
        "Connections closed because the peer accepted no data within --write-timeout (it had stopped reading).",
    ),
];

/// Changes per whole second for the last few seconds.
#[derive(Debug, Default)]
struct Rate {
    origin: Option<Instant>,
    /// (second since origin, changes in it), oldest first.
    seconds: VecDeque<(u64, u64)>,
}

impl Rate {
    fn second(&mut self, now: Instant) -> u64 {
        now.duration_since(*self.origin.get_or_insert(now))
            .as_secs()
    }

    fn add(&mut self, now: Instant) {
        let second = self.second(now);
        match self.seconds.back_mut() {
            Some((last, count)) if *last == second => *count += 1,
            _ => self.seconds.push_back((second, 1)),
        }
        while self
            .seconds
            .front()
            .is_some_and(|(first, _)| first + RATE_WINDOW_SECONDS < second)
        {
            self.seconds.pop_front();
        }
    }

    /// Sum over the last `RATE_WINDOW_SECONDS` complete seconds, divided by the window.
    fn per_second(&mut self, now: Instant) -> f64 {
        let current = self.second(now);
        let total: u64 = self
            .seconds
            .iter()
            .filter(|(second, _)| *second < current && second + RATE_WINDOW_SECONDS >= current)
            .map(|(_, count)| count)
            .sum();
        total as f64 / RATE_WINDOW_SECONDS as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_averages_complete_seconds_in_the_window() {
        let start = Instant::now();
        let mut rate = Rate::default();
        for _ in 0..10 {
            rate.add(start);
        }
        rate.add(start + Duration::from_millis(1500));
        // Second 0 holds 10, second 1 holds 1; at 2.1 s both are complete.
        let per_second = rate.per_second(start + Duration::from_millis(2100));
        assert!((per_second - 11.0 / 5.0).abs() < 1e-9, "{per_second}");
        assert_eq!(rate.per_second(start + Duration::from_secs(60)), 0.0);
    }

    #[test]
    fn separate_instances_do_not_share_numbers() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.delivered(Transport::WebSocket, 3, 30);
        a.publish_delivered(0, 0);
        b.publish_delivered(0, 0);
        assert!(
            a.render()
                .contains("rowcast_messages_delivered_total{transport=\"websocket\"} 3")
        );
        assert!(
            b.render()
                .contains("rowcast_messages_delivered_total{transport=\"websocket\"} 0")
        );
    }
}
