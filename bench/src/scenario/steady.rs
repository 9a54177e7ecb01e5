//! `steady`: C clients × S subscriptions over P products; writers send U updates/s for T
//! seconds; latency p50/p90/p99/p99.9/max of every delivery, deliveries/s, and the
//! correctness counters (expected vs received, duplicates, order violations). The layout of
//! subscriptions and writers is `honest`'s (shared with `hostile`).

use super::honest::{Layout, Population, Writers};
use super::{Common, Meter, Outcome, counter_failures};
use crate::svg::Series;
use crate::target::Target;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct SteadyArgs {
    /// Clients (WebSocket connections).
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Subscriptions per client.
    #[arg(long, default_value_t = 10)]
    pub subs: usize,
    /// Products the subscriptions spread over.
    #[arg(long, default_value_t = 1000)]
    pub products: usize,
    /// Offered updates per second (all writers together).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Concurrent writer connections.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// After writing stops, wait at most this long for outstanding deliveries.
    #[arg(long, default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Pause after connecting before writing starts.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
}

pub const CATEGORIES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

pub async fn run(target: &Target, args: &SteadyArgs, common: &Common) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let p = args.products.max(1);
    let layout = Layout {
        clients: args.clients,
        subs: args.subs,
        products: p,
    };
    let settle = Duration::from_millis(args.settle_ms);
    let Some((population, sessions)) =
        Population::start(target, layout, args.clients, settle, common, &mut out).await?
    else {
        return Ok(out);
    };
    let received0 = population.received();

    let mut writers = Writers::new(target, &population, args.writers);
    let w = writers.count();
    let meter = Meter::start(target);
    let start = Instant::now();
    let wrote = writers
        .run(
            args.rate,
            Duration::from_secs(args.duration),
            format!("{}: steady {}/s", target.name, args.rate),
        )
        .await?;
    let (sent, write_errors, skipped) = (wrote.sent, wrote.errors, wrote.skipped_ticks);
    let writing_s = wrote.writing_s;
    let want = wrote.expected;
    population
        .drain(
            received0,
            want,
            Duration::from_millis(args.drain_timeout_ms),
        )
        .await;
    let active_s = start.elapsed().as_secs_f64();
    let cost = meter.stop(target);
    let (lat, counters) = population.take();
    let dropped = population.dropped();
    population.pool.close_all(Duration::from_secs(30)).await;

    let missing = want as i64 - counters.received as i64;
    let mut fails = Vec::new();
    counter_failures(&counters, missing, dropped, &mut fails);
    if write_errors > 0 {
        fails.push(format!("{write_errors} PUTs failed"));
    }
    out.failures.extend(fails.iter().cloned());
    let deliveries_per_s = counters.received as f64 / active_s;
    let server_us = cost
        .server_cpu_s
        .and_then(|c| super::ratio(c * 1e6, counters.received as f64));
    out.summary.push(format!(
        "{}×{} over {} @ {}/s (achieved {:.0}/s): p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} ms | {:.0} deliveries/s | expected {} received {} dup {} order {} | server cpu {} µs/delivery ({} µs/update), postgres {:.0} µs/update, rss {} KiB | machine {:.0}% busy",
        args.clients,
        args.subs,
        p,
        args.rate,
        sent as f64 / writing_s,
        lat.p50_ms,
        lat.p90_ms,
        lat.p99_ms,
        lat.p999_ms,
        lat.max_ms,
        deliveries_per_s,
        want,
        counters.received,
        counters.duplicates,
        counters.order_violations,
        super::fanout::fmt_opt(server_us),
        super::fanout::fmt_opt(cost.server_cpu_s.and_then(|c| super::ratio(c * 1e6, sent as f64))),
        cost.postgres_cpu_s * 1e6 / sent.max(1) as f64,
        cost.server_rss_kib_after.map_or("?".into(), |v| v.to_string()),
        cost.machine_busy_pct,
    ));
    out.series.push(Series {
        name: "latency".into(),
        points: [lat.p50_ms, lat.p90_ms, lat.p99_ms, lat.p999_ms, lat.max_ms]
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64, *v))
            .collect(),
        dash: 0,
        group: 0,
    });
    out.result = json!({
        "clients": args.clients, "subs_per_client": args.subs, "products": p, "writers": w,
        "offered_rate": args.rate, "achieved_rate": sent as f64 / writing_s, "skipped_ticks": skipped,
        "duration_s": args.duration, "writing_s": writing_s, "active_s_incl_drain": active_s,
        "connect": population.connect, "sessions_reported": sessions,
        "updates_sent": sent, "write_errors": write_errors,
        "expected": want, "received": counters.received, "missing": missing,
        "counters": counters, "dropped_connections": dropped,
        "latency_ms": lat, "put_rtt_ms": wrote.rtt.summary(),
        "deliveries_per_s": deliveries_per_s,
        "cost": cost,
        "server_cpu_us_per_delivery": server_us,
        "server_cpu_us_per_update": cost.server_cpu_s.and_then(|c| super::ratio(c * 1e6, sent as f64)),
        "client_cpu_us_per_delivery": super::ratio(cost.client_cpu_s * 1e6, counters.received as f64),
    });
    Ok(out)
}
