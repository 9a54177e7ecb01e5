//! `hostile`: do hostile clients slow down or starve honest ones?
//!
//! An honest population (`honest`: C clients × S subscriptions over P products, writers at
//! U updates/s, exact correctness counters) and one honest REST reader (`GET
//! /products/{id}`, closed loop, paced at `--rest-rate`) run through a series of phases:
//! first `quiet`, then one phase per attack (`attacks`), one attack at a time. Each phase:
//!
//! 1. the attack starts and runs `--attack-lead-ms` alone, so the measured window sees it
//!    established (the quiet phase waits the same);
//! 2. the writers write for `--phase-secs`; then the bench waits (bounded) for every
//!    delivery those writes owe, with the attack still running;
//! 3. the window's honest figures are taken: delivery latency, correctness counters
//!    (missing, duplicates, order, unexpected, error frames, dropped connections), REST
//!    latency and errors, server CPU, server RSS at start/end and its peak (sampled every
//!    100 ms);
//! 4. the attack is stopped (its sockets dropped) and the bench waits until the server's
//!    session count is back to what it was with only the honest clients (bounded by
//!    `--settle-timeout-ms`; servers without `/stats` skip this), then `--settle-ms`, so a
//!    phase does not bleed into the next.
//!
//! Writers keep their per-product versions across phases (see `honest::Writers`), so the
//! counters are exact per phase: every update a phase wrote is owed, and waited for, in
//! that phase.
//!
//! Pass/fail: only the honest correctness counters and honest connections. Attackers being
//! refused is the point, and latency is a figure to compare (`p99 ×quiet`), not a verdict;
//! refused honest PUTs and REST reads are reported beside it.

pub mod attacks;

use super::honest::{Layout, Population, Writers};
use super::{Common, Cost, Meter, Outcome, counter_failures, lock, ratio};
use crate::clock;
use crate::record::Counters;
use crate::rest::Rest;
use crate::stats::{LatencyHist, Summary};
use crate::svg::Series;
use crate::target::Target;
use crate::ws::Connector;
use attacks::{Attack, AttackSizes, Ctx, TallySnapshot};
use hyper::Method;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, clap::Args)]
pub struct HostileArgs {
    /// Honest clients (WebSocket connections).
    #[arg(long, default_value_t = 2000)]
    pub clients: usize,
    /// Subscriptions per honest client.
    #[arg(long, default_value_t = 10)]
    pub subs: usize,
    /// Honest products the subscriptions spread over.
    #[arg(long, default_value_t = 1000)]
    pub products: usize,
    /// Offered honest updates per second (all writers together).
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Concurrent honest writer connections.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Honest REST reads per second (`GET /products/{id}` on one keep-alive connection; a
    /// slow answer delays the next, it never queues).
    #[arg(long, default_value_t = 50)]
    pub rest_rate: u64,
    /// Seconds of honest writing in each phase.
    #[arg(long, default_value_t = 10)]
    pub phase_secs: u64,
    /// Attacks, one phase each after `quiet`, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Attack::ALL)]
    pub attacks: Vec<Attack>,
    /// How long an attack runs before the phase's measured window opens.
    #[arg(long, default_value_t = 1000)]
    pub attack_lead_ms: u64,
    /// After a phase's writing stops, wait at most this long for outstanding deliveries.
    #[arg(long, default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Pause after connecting, and after each phase once the session count is back.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Longest wait after a phase for the server's session count to return to the honest one.
    #[arg(long, default_value_t = 15_000)]
    pub settle_timeout_ms: u64,
    #[command(flatten)]
    pub sizes: AttackSizes,
}

impl HostileArgs {
    /// `quiet`, then the attacks in order: the phases of a run.
    pub fn phase_names(&self) -> Vec<String> {
        std::iter::once("quiet")
            .chain(self.attacks.iter().map(|a| a.name()))
            .map(str::to_owned)
            .collect()
    }
}

/// One phase's figures (all honest ones are for the measured window only).
#[derive(Debug, serde::Serialize)]
struct PhaseReport {
    phase: String,
    honest: HonestWindow,
    rest: ProbeSummary,
    server: ServerWindow,
    cost: Cost,
    /// None in the quiet phase.
    attack: Option<TallySnapshot>,
    /// Attacker tasks that did not end within 10 s of the stop and were aborted.
    attack_tasks_aborted: usize,
    /// `/stats` sessions after the settle wait (None: no `/stats`).
    sessions_after_settle: Option<u64>,
    honest_p99_vs_quiet: Option<f64>,
    rest_p99_vs_quiet: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
struct HonestWindow {
    latency_ms: Summary,
    updates_sent: u64,
    achieved_rate: f64,
    /// PUTs refused or failed (their versions are reused, so the counters stay exact).
    write_errors: u64,
    put_rtt_ms: Summary,
    expected: u64,
    received: u64,
    missing: i64,
    counters: Counters,
    dropped_connections: u64,
}

#[derive(Debug, serde::Serialize)]
struct ServerWindow {
    rss_kib_start: Option<u64>,
    rss_kib_end: Option<u64>,
    /// Highest VmRSS seen by the 100 ms sampler during the window.
    rss_kib_peak: Option<u64>,
    cpu_s: Option<f64>,
    /// CPU over the window as a share of one core.
    cpu_pct: Option<f64>,
}

pub async fn run(target: &Target, args: &HostileArgs, common: &Common) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    // Attacks run one at a time, so the largest one counts; the REST reader is one more.
    let attack_sockets = args
        .attacks
        .iter()
        .map(|a| a.sockets(&args.sizes))
        .max()
        .unwrap_or(0);
    let sockets = args.clients + attack_sockets + args.writers + 1;
    let layout = Layout {
        clients: args.clients,
        subs: args.subs,
        products: args.products,
    };
    let settle = Duration::from_millis(args.settle_ms);
    let Some((population, sessions0)) =
        Population::start(target, layout, sockets, settle, common, &mut out).await?
    else {
        return Ok(out);
    };
    let mut writers = Writers::new(target, &population, args.writers);
    let mut connector = Connector::new(target, 1);
    connector.timeout = common.connect_timeout;
    let env = Env {
        target,
        args,
        memory: RssWatch::start(target.pid),
        probe: RestProbe::start(target, population.ids.clone(), args.rest_rate),
        ctx: Arc::new(Ctx {
            target: target.clone(),
            connector,
            honest_ids: population.ids.clone(),
            sizes: args.sizes.clone(),
            connect_timeout: common.connect_timeout,
            ack_timeout: common.ack_timeout,
        }),
        attackers: AttackRuntime::new()?,
        population: &population,
        sessions0,
    };
    let mut phases = Vec::new();
    for attack in std::iter::once(None).chain(args.attacks.iter().copied().map(Some)) {
        let phase = env.phase(attack, &mut writers).await?;
        let mut fails = Vec::new();
        counter_failures(
            &phase.honest.counters,
            phase.honest.missing,
            phase.honest.dropped_connections,
            &mut fails,
        );
        out.failures
            .extend(fails.into_iter().map(|f| format!("{}: {f}", phase.phase)));
        phases.push(phase);
    }
    drop(env);
    population.pool.close_all(Duration::from_secs(30)).await;

    let quiet = (
        phases[0].honest.latency_ms.p99_ms,
        phases[0].rest.latency_ms.p99_ms,
    );
    for p in &mut phases {
        p.honest_p99_vs_quiet = ratio(p.honest.latency_ms.p99_ms, quiet.0);
        p.rest_p99_vs_quiet = ratio(p.rest.latency_ms.p99_ms, quiet.1);
    }
    out.summary = table(args, &phases);
    let bars = |name: &str, dash, value: fn(&PhaseReport) -> f64| Series {
        name: name.into(),
        points: phases
            .iter()
            .enumerate()
            .map(|(i, p)| (i as f64, value(p)))
            .collect(),
        dash,
        group: 0,
    };
    out.series = vec![
        bars("delivery p99", 0, |p| p.honest.latency_ms.p99_ms),
        bars("REST p99", 1, |p| p.rest.latency_ms.p99_ms),
    ];
    let mut sizes = serde_json::to_value(&args.sizes)?;
    // The token itself never goes into results.
    sizes["ops_token_given"] = json!(args.sizes.ops_token.is_some());
    out.result = json!({
        "clients": args.clients, "subs_per_client": args.subs, "products": args.products,
        "writers": writers.count(), "offered_rate": args.rate, "rest_rate": args.rest_rate,
        "phase_secs": args.phase_secs, "attack_lead_ms": args.attack_lead_ms,
        "attacks": args.attacks, "attack_sizes": sizes,
        "connect": population.connect, "sessions_reported": sessions0,
        "phases": phases,
    });
    Ok(out)
}

/// What every phase shares.
struct Env<'a> {
    target: &'a Target,
    args: &'a HostileArgs,
    population: &'a Population,
    memory: RssWatch,
    probe: RestProbe,
    ctx: Arc<Ctx>,
    attackers: AttackRuntime,
    sessions0: Option<u64>,
}

/// The runtime attacker tasks run on (see `attacks`), shut down without blocking when
/// dropped (a runtime may not be dropped, blocking, inside another one).
#[derive(Debug)]
struct AttackRuntime {
    handle: tokio::runtime::Handle,
    /// Taken only by `drop`.
    runtime: Option<tokio::runtime::Runtime>,
}

impl AttackRuntime {
    fn new() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("attacker")
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for AttackRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Env<'_> {
    /// One phase: see the module doc for its steps.
    async fn phase(
        &self,
        attack: Option<Attack>,
        writers: &mut Writers,
    ) -> anyhow::Result<PhaseReport> {
        let (target, args, population) = (self.target, self.args, self.population);
        let name = attack.map_or("quiet", Attack::name);
        crate::progress::note(format!("  {}: phase {name}", target.name));
        let meter = Meter::start(target);
        let rss_start = self.memory.reset();
        let running = attack.map(|a| attacks::launch(a, &self.ctx, self.attackers.handle()));
        tokio::time::sleep(Duration::from_millis(args.attack_lead_ms)).await;

        let received0 = population.received();
        let dropped0 = population.dropped();
        let _ = self.probe.take();
        let wrote = writers
            .run(
                args.rate,
                Duration::from_secs(args.phase_secs),
                format!("{}: {name}", target.name),
            )
            .await?;
        population
            .drain(
                received0,
                wrote.expected,
                Duration::from_millis(args.drain_timeout_ms),
            )
            .await;
        let (latency, counters) = population.take();
        let dropped = population.dropped() - dropped0;
        let rest = self.probe.take();
        let cost = meter.stop(target);
        let (rss_end, rss_peak) = (self.memory.now(), self.memory.peak());

        let (tally, aborted) = match running {
            Some(r) => {
                let (t, aborted) = r.stop(Duration::from_secs(10)).await;
                (Some(t), aborted)
            }
            None => (None, 0),
        };
        let sessions_after_settle = match self.sessions0 {
            Some(want) => {
                let timeout = Duration::from_millis(args.settle_timeout_ms);
                let got = super::wait_sessions(target, want, timeout).await;
                if got.is_some_and(|g| g != want) {
                    crate::progress::note(format!(
                        "  {}: after {name}, {got:?} sessions (not {want}) after {timeout:?}; going on",
                        target.name
                    ));
                }
                got
            }
            None => None,
        };
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;

        Ok(PhaseReport {
            phase: name.to_owned(),
            honest: HonestWindow {
                latency_ms: latency,
                updates_sent: wrote.sent,
                achieved_rate: wrote.sent as f64 / wrote.writing_s.max(1e-9),
                write_errors: wrote.errors,
                put_rtt_ms: wrote.rtt.summary(),
                expected: wrote.expected,
                received: counters.received,
                missing: wrote.expected as i64 - counters.received as i64,
                counters,
                dropped_connections: dropped,
            },
            rest,
            server: ServerWindow {
                rss_kib_start: rss_start,
                rss_kib_end: rss_end,
                rss_kib_peak: rss_peak,
                cpu_s: cost.server_cpu_s,
                cpu_pct: cost
                    .server_cpu_s
                    .and_then(|c| ratio(c * 100.0, cost.wall_s)),
            },
            cost,
            attack: tally,
            attack_tasks_aborted: aborted,
            sessions_after_settle,
            honest_p99_vs_quiet: None,
            rest_p99_vs_quiet: None,
        })
    }
}

/// The terminal table: one line per phase.
fn table(args: &HostileArgs, phases: &[PhaseReport]) -> Vec<String> {
    let mib = |k: Option<u64>| k.map_or("?".to_owned(), |k| format!("{:.0}", k as f64 / 1024.0));
    let times = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}"));
    let pct = |cpu_s: f64, wall_s: f64| {
        ratio(cpu_s * 100.0, wall_s).map_or("?".to_owned(), |c| format!("{c:.0}"))
    };
    let mut lines = vec![
        format!(
            "hostile: {} honest clients × {} subs over {} products @ {}/s, REST reads @ {}/s, {} s per phase",
            args.clients, args.subs, args.products, args.rate, args.rest_rate, args.phase_secs
        ),
        format!(
            "{:<10} {:>22} {:>6} {:>15} {:>6} {:>11} {:>6} {:>23} {:>17} {:>5} {:>6} {:>5} {:>19}  attack refusals",
            "phase",
            "delivery p50/p99/max",
            "×quiet",
            "REST p50/p99",
            "×quiet",
            "PUT ok/err",
            "GETerr",
            "miss/dup/ord/unx/err/dr",
            "RSS MiB st/end/pk",
            "cpu%",
            "bench%",
            "pg%",
            "attack req/ok/ref",
        ),
    ];
    for p in phases {
        let h = &p.honest;
        let c = &h.counters;
        let a = p.attack.clone().unwrap_or_default();
        let mut top: Vec<(&String, &u64)> = a.outcomes.iter().collect();
        top.sort_by(|x, y| y.1.cmp(x.1));
        let top: Vec<String> = top
            .iter()
            .take(4)
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        lines.push(format!(
            "{:<10} {:>22} {:>6} {:>15} {:>6} {:>11} {:>6} {:>23} {:>17} {:>5} {:>6} {:>5} {:>19}  {}",
            p.phase,
            format!(
                "{:.1}/{:.1}/{:.0} ms",
                h.latency_ms.p50_ms, h.latency_ms.p99_ms, h.latency_ms.max_ms
            ),
            times(p.honest_p99_vs_quiet),
            format!(
                "{:.1}/{:.1} ms",
                p.rest.latency_ms.p50_ms, p.rest.latency_ms.p99_ms
            ),
            times(p.rest_p99_vs_quiet),
            format!("{}/{}", h.updates_sent, h.write_errors),
            p.rest.errors.values().sum::<u64>(),
            format!(
                "{}/{}/{}/{}/{}/{}",
                h.missing,
                c.duplicates,
                c.order_violations,
                c.unexpected,
                c.error_frames + c.parse_errors,
                h.dropped_connections
            ),
            format!(
                "{}/{}/{}",
                mib(p.server.rss_kib_start),
                mib(p.server.rss_kib_end),
                mib(p.server.rss_kib_peak)
            ),
            p.server
                .cpu_pct
                .map_or("?".to_owned(), |c| format!("{c:.0}")),
            pct(p.cost.client_cpu_s, p.cost.wall_s),
            pct(p.cost.postgres_cpu_s, p.cost.wall_s),
            format!("{}/{}/{}", a.requests, a.ok, a.refused),
            top.join(" "),
        ));
    }
    lines
}

/// Samples the server's VmRSS every 100 ms and keeps the peak since the last `reset`.
#[derive(Debug)]
struct RssWatch {
    pid: Option<u32>,
    peak: Arc<AtomicU64>,
    task: Option<JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: Option<u32>) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let task = pid.map(|pid| {
            let peak = peak.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tick.tick().await;
                    if let Some(kib) = crate::procstat::rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
            })
        });
        Self { pid, peak, task }
    }

    fn now(&self) -> Option<u64> {
        self.pid.and_then(crate::procstat::rss_kib)
    }

    /// Starts a new peak from the RSS now, which it returns.
    fn reset(&self) -> Option<u64> {
        let now = self.now();
        self.peak.store(now.unwrap_or(0), Ordering::Relaxed);
        now
    }

    /// Highest RSS since `reset` (including now).
    fn peak(&self) -> Option<u64> {
        let now = self.now()?;
        Some(self.peak.fetch_max(now, Ordering::Relaxed).max(now))
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The honest REST reader's figures for one window.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct ProbeSummary {
    latency_ms: Summary,
    /// 2xx answers.
    ok: u64,
    /// Everything else, by `http_<status>` or client error kind.
    errors: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct ProbeWindow {
    hist: LatencyHist,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

/// The honest REST reader: `GET /products/{id}` over the honest products in turn, at most
/// `rate` per second, each after the previous answer (missed ticks are skipped).
#[derive(Debug)]
struct RestProbe {
    window: Arc<Mutex<ProbeWindow>>,
    task: JoinHandle<()>,
}

impl RestProbe {
    fn start(target: &Target, ids: Arc<Vec<u64>>, rate: u64) -> Self {
        let window = Arc::new(Mutex::new(ProbeWindow::default()));
        let mut rest = Rest::new(target);
        let w = window.clone();
        let task = tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            for i in 0.. {
                tick.tick().await;
                let Some(id) = ids.get(i % ids.len().max(1)) else {
                    return;
                };
                let t0 = clock::now_ns();
                let r = rest
                    .request(Method::GET, &format!("/products/{id}"), None)
                    .await;
                let took = clock::now_ns() - t0;
                let mut w = lock(&w);
                match r {
                    Ok((s, _)) if s.is_success() => {
                        w.hist.record(took);
                        w.ok += 1;
                    }
                    Ok((s, _)) => *w.errors.entry(format!("http_{}", s.as_u16())).or_default() += 1,
                    Err(e) => *w.errors.entry(e.kind().to_owned()).or_default() += 1,
                }
            }
        });
        Self { window, task }
    }

    /// The figures since the last call.
    fn take(&self) -> ProbeSummary {
        let w = std::mem::take(&mut *lock(&self.window));
        ProbeSummary {
            latency_ms: w.hist.summary(),
            ok: w.ok,
            errors: w.errors,
        }
    }
}

impl Drop for RestProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
