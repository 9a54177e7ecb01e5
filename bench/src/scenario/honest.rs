//! The honest population `steady` measures and `hostile` protects: C WebSocket clients × S
//! subscriptions over P products, W writers offering U updates/s, and the exact count of
//! deliveries those updates owe.
//!
//! Client i subscribes products (i·S + j) mod P for j < S, so subscribers spread evenly
//! (C·S/P per product). Writer w owns the products with index ≡ w (mod W) and updates them
//! in turn at U/W per second; because one writer owns a product, its updates are
//! serialised, so per-product versions increase in commit order and any inversion a client
//! sees is the server's. `expected` = Σ over successful updates of that product's
//! subscriber count.
//!
//! The rate is open-loop with skipped ticks: a writer that falls behind skips ticks rather
//! than bursting, and the achieved rate is reported next to the offered one.
//!
//! [`Writers`] keeps each writer's per-product versions between runs, so a scenario may write
//! in several windows (`hostile`'s phases) and receivers still see every product's versions
//! rise by one: a window never restarts a version and so never looks like a reorder.

use super::{ClientPool, Common, ConnectReport, Outcome, check_fd_budget, create_products};
use crate::clock;
use crate::proto::ProductBody;
use crate::record::{self, Counters, Shared};
use crate::rest::Rest;
use crate::stats::{LatencyHist, Summary};
use crate::target::Target;
use crate::ws::Connector;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How many receivers, subscriptions each and products (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub clients: usize,
    pub subs: usize,
    pub products: usize,
}

/// The subscribed receivers and what they subscribed.
#[derive(Debug)]
pub struct Population {
    /// Product ids, in creation order.
    pub ids: Arc<Vec<u64>>,
    /// Subscribers of `ids[i]`.
    pub subscribers: Arc<Vec<u64>>,
    pub pool: ClientPool,
    pub shared: Arc<Shared>,
    pub connect: ConnectReport,
}

impl Population {
    /// Everything before the first measured window: checks that this process can hold
    /// `sockets` connections (the receivers and whatever else the scenario opens), creates
    /// the products, connects and subscribes the receivers, lets them settle for `settle`,
    /// reads the server's session count (None: no `/stats`) and discards what arrived
    /// meanwhile. `Ok(None)`, with the reason in `out.failures`, when it cannot start.
    pub async fn start(
        target: &Target,
        layout: Layout,
        sockets: usize,
        settle: Duration,
        common: &Common,
        out: &mut Outcome,
    ) -> anyhow::Result<Option<(Self, Option<u64>)>> {
        if let Err(e) = check_fd_budget(sockets, common) {
            out.failures.push(e);
            return Ok(None);
        }
        let population = Self::connect(target, layout, common).await?;
        let c = &population.connect;
        if c.failed > 0 {
            out.failures.push(format!(
                "{} of {} connections failed ({:?})",
                c.failed, c.requested, c.first_error
            ));
            out.result = json!({ "connect": c });
            population.pool.close_all(Duration::from_secs(20)).await;
            return Ok(None);
        }
        tokio::time::sleep(settle).await;
        let sessions = crate::rest::stats_sessions(target).await;
        let _ = population.take();
        Ok(Some((population, sessions)))
    }

    async fn connect(target: &Target, layout: Layout, common: &Common) -> anyhow::Result<Self> {
        let Layout {
            clients,
            subs,
            products,
        } = layout;
        let p = products.max(1);
        let ids = create_products(
            target,
            p,
            8,
            &format!("{}: create {p} products", target.name),
        )
        .await?;
        let mut subscribers = vec![0u64; p];
        let mut sets = Vec::with_capacity(clients);
        for i in 0..clients {
            let mut idx: Vec<usize> = (0..subs).map(|j| (i * subs + j) % p).collect();
            idx.sort_unstable();
            idx.dedup();
            for &x in &idx {
                subscribers[x] += 1;
            }
            sets.push(idx.into_iter().map(|x| ids[x]).collect::<Vec<u64>>());
        }
        let shared = Shared::new(0);
        let mut pool = ClientPool::new(
            target,
            Connector::spread_for(clients),
            shared.clone(),
            common,
        );
        let connect = pool
            .add(sets, &format!("{}: connect {clients}", target.name))
            .await;
        Ok(Self {
            ids: Arc::new(ids),
            subscribers: Arc::new(subscribers),
            pool,
            shared,
            connect,
        })
    }

    /// Deliveries received so far (by every receiver, since the start).
    pub fn received(&self) -> u64 {
        self.shared.received.load(Ordering::Acquire)
    }

    /// Connections the server dropped so far (since the start).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until `want` deliveries have arrived since `received0`.
    pub async fn drain(&self, received0: u64, want: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.received() - received0 < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Takes every receiver's samples and counters since the last call: the latency summary
    /// and the counters of that window.
    pub fn take(&self) -> (Summary, Counters) {
        let (samples, counters) = record::drain(self.pool.records());
        let mut hist = LatencyHist::new();
        for s in &samples {
            hist.record(s.lat_ns);
        }
        (hist.summary(), counters)
    }
}

/// What the writers did in one window.
#[derive(Debug, Default)]
pub struct WriteReport {
    /// Successful PUTs.
    pub sent: u64,
    /// PUTs that failed or were not 2xx (their versions were reused).
    pub errors: u64,
    pub skipped_ticks: u64,
    /// Deliveries the successful PUTs owe: Σ subscribers of each updated product.
    pub expected: u64,
    pub rtt: LatencyHist,
    pub writing_s: f64,
}

/// One writer's products and where each of their versions stands.
#[derive(Debug)]
struct WriterState {
    index: usize,
    /// Indexes into the product ids this writer owns.
    mine: Vec<usize>,
    versions: Vec<i64>,
    /// Next of `mine` to update.
    next: usize,
    /// Updates attempted so far: numbers this writer's updates uniquely.
    attempts: u64,
    rest: Rest,
}

/// The writers of one population; see the module doc.
#[derive(Debug)]
pub struct Writers {
    states: Vec<WriterState>,
    ids: Arc<Vec<u64>>,
    subscribers: Arc<Vec<u64>>,
}

impl Writers {
    /// `writers` writers (clamped to 1..=products) over the population's products.
    pub fn new(target: &Target, population: &Population, writers: usize) -> Self {
        let p = population.ids.len();
        let w = writers.clamp(1, p.max(1));
        let states = (0..w)
            .map(|index| {
                let mine: Vec<usize> = (index..p).step_by(w).collect();
                WriterState {
                    index,
                    versions: vec![0; mine.len()],
                    mine,
                    next: 0,
                    attempts: 0,
                    rest: Rest::new(target),
                }
            })
            .collect();
        Self {
            states,
            ids: population.ids.clone(),
            subscribers: population.subscribers.clone(),
        }
    }

    pub fn count(&self) -> usize {
        self.states.len()
    }

    /// Offers `rate` updates/s (all writers together) for `duration`, with a progress bar
    /// labelled `label`; returns what was written once every writer has stopped.
    pub async fn run(
        &mut self,
        rate: u64,
        duration: Duration,
        label: String,
    ) -> anyhow::Result<WriteReport> {
        let w = self.states.len();
        let per_writer_rate = rate as f64 / w as f64;
        let period = Duration::from_secs_f64(1.0 / per_writer_rate.max(0.001));
        let start = Instant::now();
        let deadline = start + duration;
        let max_per_writer = (per_writer_rate * duration.as_secs_f64()).ceil() as u64 + 1;
        let mut tasks = Vec::with_capacity(w);
        for state in self.states.drain(..) {
            let (ids, subscribers) = (self.ids.clone(), self.subscribers.clone());
            tasks.push(tokio::spawn(write_window(WriteWindow {
                state,
                ids,
                subscribers,
                writers: w,
                period,
                deadline,
                max_updates: max_per_writer,
            })));
        }
        let pb = crate::progress::timed(duration.as_secs(), label);
        while Instant::now() < deadline {
            pb.set_position(start.elapsed().as_secs());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        pb.finish_and_clear();
        let mut report = WriteReport::default();
        for t in tasks {
            let (state, r) = t.await?;
            self.states.push(state);
            report.sent += r.sent;
            report.errors += r.errors;
            report.skipped_ticks += r.skipped_ticks;
            report.expected += r.expected;
            report.rtt.merge(&r.rtt);
        }
        report.writing_s = start.elapsed().as_secs_f64();
        Ok(report)
    }
}

struct WriteWindow {
    state: WriterState,
    ids: Arc<Vec<u64>>,
    subscribers: Arc<Vec<u64>>,
    writers: usize,
    period: Duration,
    deadline: Instant,
    max_updates: u64,
}

/// One writer's loop for one window; hands its state back for the next window.
async fn write_window(win: WriteWindow) -> (WriterState, WriteReport) {
    let WriteWindow {
        mut state,
        ids,
        subscribers,
        writers: w,
        period,
        deadline,
        max_updates,
    } = win;
    let mut res = WriteReport::default();
    if state.mine.is_empty() {
        return (state, res);
    }
    // Stagger writers across one period so their requests interleave evenly.
    let first = tokio::time::Instant::now() + period.mul_f64(state.index as f64 / w as f64);
    let mut tick = tokio::time::interval_at(first, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_tick = None;
    for _ in 0..max_updates {
        let t = tick.tick().await;
        if let Some(prev) = last_tick {
            let gap: Duration = t - prev;
            res.skipped_ticks += (gap.as_secs_f64() / period.as_secs_f64()).round() as u64 - 1;
        }
        last_tick = Some(t);
        if Instant::now() >= deadline {
            break;
        }
        let k = state.next;
        state.next = (state.next + 1) % state.mine.len();
        state.versions[k] += 1;
        let t0 = clock::now_ns();
        let update = state.attempts * w as u64 + state.index as u64;
        state.attempts += 1;
        let product = state.mine[k];
        match state
            .rest
            .put_product(
                ids[product],
                &ProductBody::bench(update, state.versions[k], t0),
            )
            .await
        {
            Ok(s) if s.is_success() => {
                res.rtt.record(clock::now_ns() - t0);
                res.sent += 1;
                res.expected += subscribers[product];
            }
            _ => {
                // The version was not committed; reuse it so the next one is not seen as
                // a gap.
                state.versions[k] -= 1;
                res.errors += 1;
            }
        }
    }
    (state, res)
}
