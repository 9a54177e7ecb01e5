//! `steady`: C clients × S subscriptions over P products; writers send U updates/s for T
//! seconds; latency p50/p90/p99/p99.9/max of every delivery, deliveries/s, and the
//! correctness counters (expected vs received, duplicates, order violations).
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

use super::{
    ClientPool, Common, Meter, Outcome, check_fd_budget, counter_failures, create_products,
};
use crate::clock;
use crate::proto::ProductBody;
use crate::record::{self, Shared};
use crate::rest::Rest;
use crate::stats::LatencyHist;
use crate::svg::Series;
use crate::target::Target;
use crate::ws::Connector;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

struct WriterResult {
    sent: u64,
    errors: u64,
    skipped_ticks: u64,
    rtt: LatencyHist,
}

pub async fn run(target: &Target, args: &SteadyArgs, common: &Common) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    if let Err(e) = check_fd_budget(args.clients, common) {
        out.failures.push(e);
        return Ok(out);
    }
    let p = args.products.max(1);
    let ids = create_products(
        target,
        p,
        8,
        &format!("{}: create {p} products", target.name),
    )
    .await?;
    let mut subscribers = vec![0u64; p];
    let mut sets = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let mut idx: Vec<usize> = (0..args.subs).map(|j| (i * args.subs + j) % p).collect();
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
        Connector::spread_for(args.clients),
        shared.clone(),
        common,
    );
    let connect = pool
        .add(sets, &format!("{}: connect {}", target.name, args.clients))
        .await;
    if connect.failed > 0 {
        out.failures.push(format!(
            "{} of {} connections failed ({:?})",
            connect.failed, args.clients, connect.first_error
        ));
        pool.close_all(Duration::from_secs(20)).await;
        out.result = json!({ "connect": connect });
        return Ok(out);
    }
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let sessions = crate::rest::stats_sessions(target).await;
    let _ = record::drain(pool.records());
    let received0 = shared.received.load(Ordering::Acquire);

    let expected = Arc::new(AtomicU64::new(0));
    let subscribers = Arc::new(subscribers);
    let ids = Arc::new(ids);
    let w = args.writers.clamp(1, p);
    let per_writer_rate = args.rate as f64 / w as f64;
    let period = Duration::from_secs_f64(1.0 / per_writer_rate.max(0.001));
    let meter = Meter::start(target);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let max_per_writer = (per_writer_rate * args.duration as f64).ceil() as u64 + 1;
    let mut tasks = Vec::new();
    for wi in 0..w {
        let (target, expected, subscribers, ids) = (
            target.clone(),
            expected.clone(),
            subscribers.clone(),
            ids.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (wi..ids.len()).step_by(w).collect();
            let mut versions = vec![0i64; mine.len()];
            let mut rest = Rest::new(&target);
            let mut res = WriterResult {
                sent: 0,
                errors: 0,
                skipped_ticks: 0,
                rtt: LatencyHist::new(),
            };
            // Stagger writers across one period so their requests interleave evenly.
            let first = tokio::time::Instant::now() + period.mul_f64(wi as f64 / w as f64);
            let mut tick = tokio::time::interval_at(first, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut next = 0usize;
            let mut last_tick = None;
            for n in 0..max_per_writer {
                let t = tick.tick().await;
                if let Some(prev) = last_tick {
                    let gap: Duration = t - prev;
                    res.skipped_ticks +=
                        (gap.as_secs_f64() / period.as_secs_f64()).round() as u64 - 1;
                }
                last_tick = Some(t);
                if Instant::now() >= deadline {
                    break;
                }
                let k = next;
                next = (next + 1) % mine.len();
                versions[k] += 1;
                let t0 = clock::now_ns();
                let update = n * w as u64 + wi as u64;
                match rest
                    .put_product(ids[mine[k]], &ProductBody::bench(update, versions[k], t0))
                    .await
                {
                    Ok(s) if s.is_success() => {
                        res.rtt.record(clock::now_ns() - t0);
                        res.sent += 1;
                        expected.fetch_add(subscribers[mine[k]], Ordering::AcqRel);
                    }
                    _ => {
                        // The version was not committed; reuse it so the next one is not
                        // seen as a gap.
                        versions[k] -= 1;
                        res.errors += 1;
                    }
                }
            }
            res
        }));
    }
    let pb = crate::progress::timed(
        args.duration,
        format!("{}: steady {}/s", target.name, args.rate),
    );
    while Instant::now() < deadline {
        pb.set_position(start.elapsed().as_secs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut rtt = LatencyHist::new();
    let (mut sent, mut write_errors, mut skipped) = (0, 0, 0);
    for t in tasks {
        let r = t.await?;
        sent += r.sent;
        write_errors += r.errors;
        skipped += r.skipped_ticks;
        rtt.merge(&r.rtt);
    }
    let writing_s = start.elapsed().as_secs_f64();
    pb.set_message(format!("{}: draining", target.name));
    let want = expected.load(Ordering::Acquire);
    let drain_deadline = Instant::now() + Duration::from_millis(args.drain_timeout_ms);
    while shared.received.load(Ordering::Acquire) - received0 < want
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let active_s = start.elapsed().as_secs_f64();
    let cost = meter.stop(target);
    pb.finish_and_clear();
    let (samples, counters) = record::drain(pool.records());
    let dropped = shared.dropped.load(Ordering::Relaxed);
    pool.close_all(Duration::from_secs(30)).await;

    let mut hist = LatencyHist::new();
    for s in &samples {
        hist.record(s.lat_ns);
    }
    let lat = hist.summary();
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
        "connect": connect, "sessions_reported": sessions,
        "updates_sent": sent, "write_errors": write_errors,
        "expected": want, "received": counters.received, "missing": missing,
        "counters": counters, "dropped_connections": dropped,
        "latency_ms": lat, "put_rtt_ms": rtt.summary(),
        "deliveries_per_s": deliveries_per_s,
        "cost": cost,
        "server_cpu_us_per_delivery": server_us,
        "server_cpu_us_per_update": cost.server_cpu_s.and_then(|c| super::ratio(c * 1e6, sent as f64)),
        "client_cpu_us_per_delivery": super::ratio(cost.client_cpu_s * 1e6, counters.received as f64),
    });
    Ok(out)
}
