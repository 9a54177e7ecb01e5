//! `puts`: what one REST write costs the server. C keep-alive connections each replace their own
//! products back to back (`PUT /products/{id}`, a new `unitsAvailable` every time) for a timed
//! window after a warm-up; reported per round: PUTs per second, the round trip's p50/p99, and
//! the server's CPU per PUT split into user and system time (utime/stime of the server process
//! over the window), beside PostgreSQL's CPU per PUT (every `postgres` process).
//!
//! No subscribers: this is the write path alone. The server's share includes everything a
//! write makes it do — HTTP, JSON, the statement, and receiving its own change back from the
//! database (rowcast's listener; the Node baseline's LISTEN client).

use super::{Common, Meter, Outcome, create_products};
use crate::proto::ProductBody;
use crate::rest::Rest;
use crate::stats::LatencyHist;
use crate::svg::Series;
use crate::target::Target;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct PutsArgs {
    /// Keep-alive connections, each with one PUT in flight.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Products written (spread over the connections; each connection writes only its own).
    #[arg(long, default_value_t = 256)]
    pub products: usize,
    /// Seconds per measured round.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Unmeasured seconds first (statement caches, pools, page cache).
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Measured rounds; the summary gives each and the median.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// What the connections did in one window.
#[derive(Debug, Default)]
struct Driven {
    ok: u64,
    /// Non-2xx answers by status, and client-side failures by kind.
    refused: BTreeMap<String, u64>,
    first_error: Option<String>,
    rtt: LatencyHist,
}

impl Driven {
    fn merge(&mut self, other: Driven) {
        self.ok += other.ok;
        for (k, v) in other.refused {
            *self.refused.entry(k).or_default() += v;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.rtt.merge(&other.rtt);
    }
}

pub async fn run(target: &Target, args: &PutsArgs, _common: &Common) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let connections = args.connections.max(1);
    let n = args.products.max(connections);
    let ids = Arc::new(
        create_products(
            target,
            n,
            8,
            &format!("{}: create {n} products", target.name),
        )
        .await?,
    );
    drive(
        target,
        &ids,
        connections,
        Duration::from_secs(args.warmup_secs),
        0,
    )
    .await?;
    let mut rounds = Vec::new();
    let mut per_put = Vec::new();
    let mut points = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let meter = Meter::start(target);
        let driven = drive(
            target,
            &ids,
            connections,
            Duration::from_secs(args.secs),
            round as i64 * 1_000_000,
        )
        .await?;
        let cost = meter.stop(target);
        let puts = driven.ok.max(1) as f64;
        let us = |s: Option<f64>| s.map(|s| s * 1e6 / puts);
        let rtt = driven.rtt.summary();
        let refused: u64 = driven.refused.values().sum();
        if refused > 0 {
            out.failures.push(format!(
                "round {round}: {refused} PUTs not answered 2xx {:?}, first: {:?}",
                driven.refused, driven.first_error
            ));
        }
        let rate = driven.ok as f64 / cost.wall_s;
        out.summary.push(format!(
            "round {round}: {} PUTs in {:.1} s = {rate:.0}/s; server CPU per PUT {} µs (user {}, system {}); postgres {:.0} µs; round trip p50 {:.3} ms p99 {:.3} ms; machine {:.0}% busy",
            driven.ok,
            cost.wall_s,
            fmt_us(us(cost.server_cpu_s)),
            fmt_us(us(cost.server_user_s)),
            fmt_us(us(cost.server_sys_s)),
            cost.postgres_cpu_s * 1e6 / puts,
            rtt.p50_ms,
            rtt.p99_ms,
            cost.machine_busy_pct,
        ));
        if let Some(cpu) = us(cost.server_cpu_s) {
            per_put.push(cpu);
        }
        points.push((round as f64, rate));
        rounds.push(json!({
            "round": round, "puts": driven.ok, "puts_per_s": rate, "refused": driven.refused,
            "server_cpu_us_per_put": us(cost.server_cpu_s),
            "server_user_us_per_put": us(cost.server_user_s),
            "server_sys_us_per_put": us(cost.server_sys_s),
            "postgres_cpu_us_per_put": cost.postgres_cpu_s * 1e6 / puts,
            "round_trip": rtt, "cost": cost,
        }));
    }
    per_put.sort_by(f64::total_cmp);
    let median = per_put.get(per_put.len() / 2).copied();
    out.summary.push(format!(
        "median server CPU per PUT over {} rounds: {} µs",
        per_put.len(),
        fmt_us(median)
    ));
    out.series.push(Series {
        name: "PUTs/s".into(),
        points,
        dash: 0,
        group: 0,
    });
    out.result = json!({
        "connections": connections, "products": n, "secs": args.secs,
        "warmup_secs": args.warmup_secs,
        "median_server_cpu_us_per_put": median,
        "rounds": rounds,
    });
    Ok(out)
}

fn fmt_us(value: Option<f64>) -> String {
    value.map_or_else(|| "?".to_owned(), |v| format!("{v:.1}"))
}

/// Every connection PUTs its share of `ids` back to back until `duration` has passed.
/// `units_base` makes each round's values new, so every PUT is a real change.
async fn drive(
    target: &Target,
    ids: &Arc<Vec<u64>>,
    connections: usize,
    duration: Duration,
    units_base: i64,
) -> anyhow::Result<Driven> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (target, ids) = (target.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mine: Vec<u64> = ids.iter().skip(c).step_by(connections).copied().collect();
            let mut rest = Rest::new(&target);
            let mut driven = Driven::default();
            let mut body = ProductBody {
                manufacturer: "rowcast-bench".into(),
                price_per_unit: "1.50".into(),
                units_available: 0,
                product_name: format!("rowcast-bench puts {c}"),
            };
            let mut k: i64 = 0;
            while Instant::now() < deadline {
                let id = mine[usize::try_from(k).unwrap_or(0) % mine.len()];
                body.units_available = units_base + k;
                k += 1;
                let sent = Instant::now();
                match rest.put_product(id, &body).await {
                    Ok(status) if status.is_success() => {
                        driven.ok += 1;
                        driven.rtt.record(sent.elapsed().as_nanos() as u64);
                    }
                    Ok(status) => {
                        *driven
                            .refused
                            .entry(status.as_str().to_owned())
                            .or_default() += 1;
                    }
                    Err(e) => {
                        *driven.refused.entry(e.kind().to_owned()).or_default() += 1;
                        driven.first_error.get_or_insert_with(|| e.to_string());
                        // A refusing server must not turn this into a busy loop.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            driven
        }));
    }
    let mut all = Driven::default();
    for task in tasks {
        all.merge(task.await?);
    }
    Ok(all)
}
