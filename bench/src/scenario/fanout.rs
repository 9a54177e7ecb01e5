//! `fanout`: N clients subscribed to one product; R sequential updates; for each update the
//! send→delivery latency of the first, median, p99 and last receiver.
//!
//! Sizes are swept in ascending order on one growing pool (100 → 1 000 → 10 000 reuses the
//! first 100 connections). Updates are sequential: update k+1 is sent only when update k
//! reached every receiver (or its timeout passed), so each update's spread is its own.
//!
//! "Send" is the moment the writer starts the `PUT`, so latency includes the REST handler
//! and the commit; the `PUT` round trip is reported beside it. For rowcast the path is
//! PUT → Postgres commit → trigger → LISTEN → distributor → sessions; for the floor server
//! the PUT fans out directly, which is why it is the floor.
//!
//! Cost: server CPU over the update window ÷ deliveries = server CPU per delivery (the
//! REST + database work of each update is included, amortised over N deliveries), also
//! split into user space (utime: the server's own work, what a faster server saves) and
//! system (stime: socket writes and, on loopback, the receivers' TCP path — about the same
//! for every server).

use super::{ClientPool, Common, Meter, Outcome, check_fd_budget, counter_failures};
use crate::clock;
use crate::proto::ProductBody;
use crate::record::{self, Shared};
use crate::rest::Rest;
use crate::stats::{self, LatencyHist};
use crate::svg::Series;
use crate::target::Target;
use crate::ws::Connector;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Subscriber counts to sweep, ascending (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub subscribers: Vec<usize>,
    /// Updates per size.
    #[arg(long, default_value_t = 50)]
    pub updates: usize,
    /// Give up waiting for one update's deliveries after this long.
    #[arg(long, default_value_t = 10_000)]
    pub update_timeout_ms: u64,
    /// Pause between updates (lets the server and clients go idle, so each update starts
    /// from the same state).
    #[arg(long, default_value_t = 20)]
    pub gap_ms: u64,
    /// Pause after connecting before the first update of a size.
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,
}

pub async fn run(target: &Target, args: &FanoutArgs, common: &Common) -> anyhow::Result<Outcome> {
    let mut sizes = args.subscribers.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let max = sizes.last().copied().unwrap_or(0);
    let mut out = Outcome::default();
    if let Err(e) = check_fd_budget(max, common) {
        out.failures.push(e);
        return Ok(out);
    }
    let mut rest = Rest::new(target);
    let product = rest
        .create_product(&ProductBody {
            manufacturer: "rowcast-bench".into(),
            price_per_unit: "1.50".into(),
            units_available: 0,
            product_name: "rowcast-bench fanout".into(),
        })
        .await?;
    let shared = Shared::new(sizes.len() * args.updates);
    let mut pool = ClientPool::new(target, Connector::spread_for(max), shared.clone(), common);
    let mut rows = Vec::new();
    let mut lines: HashMap<&str, Vec<(f64, f64)>> = HashMap::new();
    let mut version = 0i64;

    for (k, &n) in sizes.iter().enumerate() {
        let add = n.saturating_sub(pool.len());
        let connect = pool
            .add(
                vec![vec![product]; add],
                &format!("{}: connect {n}", target.name),
            )
            .await;
        let ready = pool.len() - (connect.failed);
        if connect.failed > 0 {
            out.failures.push(format!(
                "{n} subscribers: {} of {add} connections failed ({:?})",
                connect.failed, connect.first_error
            ));
            rows.push(json!({ "subscribers": n, "connect": connect }));
            break;
        }
        shared
            .expected_per_update
            .store(ready as u32, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        let sessions = crate::rest::stats_sessions(target).await;
        let _ = record::drain(pool.records());

        let meter = Meter::start(target);
        let mut rtt = LatencyHist::new();
        let (mut write_errors, mut timeouts, mut sent) = (0u64, 0u64, 0u64);
        let pb = crate::progress::bar(
            args.updates as u64,
            format!("{}: fanout to {n}", target.name),
        );
        for r in 0..args.updates {
            let update = (k * args.updates + r) as u64;
            version += 1;
            let t0 = clock::now_ns();
            match rest
                .put_product(product, &ProductBody::bench(update, version, t0))
                .await
            {
                Ok(s) if s.is_success() => {
                    sent += 1;
                    rtt.record(clock::now_ns() - t0);
                }
                _ => {
                    write_errors += 1;
                    continue;
                }
            }
            let deadline = Instant::now() + Duration::from_millis(args.update_timeout_ms);
            while (shared.delivered(update) as usize) < ready {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    timeouts += 1;
                    break;
                }
                let _ = tokio::time::timeout(left, shared.update_complete.notified()).await;
            }
            pb.inc(1);
            tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
        }
        pb.finish_and_clear();
        // The gap after the last update is idle time for everyone; the meter keeps it in
        // wall time but CPU is what we divide.
        let cost = meter.stop(target);
        let (samples, counters) = record::drain(pool.records());

        let mut by_update: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut all = LatencyHist::new();
        for s in &samples {
            by_update.entry(s.update).or_default().push(s.lat_ns);
            all.record(s.lat_ns);
        }
        let (mut first, mut median, mut p99, mut last) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for v in by_update.values_mut() {
            let s = stats::exact(v);
            first.push((s.min_ms * 1e6) as u64);
            median.push((s.p50_ms * 1e6) as u64);
            p99.push((s.p99_ms * 1e6) as u64);
            last.push((s.max_ms * 1e6) as u64);
        }
        let (first, median, p99, last) = (
            stats::exact(&mut first),
            stats::exact(&mut median),
            stats::exact(&mut p99),
            stats::exact(&mut last),
        );
        let expected = sent * ready as u64;
        let missing = expected as i64 - counters.received as i64;
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        let mut fails = Vec::new();
        counter_failures(&counters, missing, dropped, &mut fails);
        if write_errors > 0 {
            fails.push(format!("{write_errors} PUTs failed"));
        }
        out.failures
            .extend(fails.iter().map(|f| format!("{n} subscribers: {f}")));
        let per_delivery = |cpu: f64| super::ratio(cpu * 1e6, counters.received as f64);
        let server_us = cost.server_cpu_s.and_then(per_delivery);
        let server_user_us = cost.server_user_s.and_then(per_delivery);
        let server_sys_us = cost.server_sys_s.and_then(per_delivery);
        let per_server_cpu_s = cost
            .server_cpu_s
            .and_then(|c| super::ratio(counters.received as f64, c));
        let client_us = per_delivery(cost.client_cpu_s);
        out.summary.push(format!(
            "{n:>6} subs: last p50 {:>8.3} ms max {:>8.3} | median p50 {:>8.3} | first p50 {:>7.3} | put rtt p50 {:>6.3} ms | server {} µs/delivery (user {} + sys {}), {} deliveries/server CPU-s, client {} µs/delivery, rss {} KiB | {}",
            last.p50_ms,
            last.max_ms,
            median.p50_ms,
            first.p50_ms,
            rtt.summary().p50_ms,
            fmt_opt(server_us),
            fmt_opt(server_user_us),
            fmt_opt(server_sys_us),
            per_server_cpu_s.map_or("?".into(), |v| format!("{v:.0}")),
            fmt_opt(client_us),
            cost.server_rss_kib_after.map_or("?".into(), |v| v.to_string()),
            if fails.is_empty() { "ok 0/0/0".to_owned() } else { fails.join("; ") }
        ));
        for (name, s) in [
            ("first", first),
            ("median", median),
            ("p99", p99),
            ("last", last),
        ] {
            lines.entry(name).or_default().push((n as f64, s.p50_ms));
        }
        rows.push(json!({
            "subscribers": n,
            "ready": ready,
            "sessions_reported": sessions,
            "connect": connect,
            "updates_sent": sent,
            "update_timeouts": timeouts,
            "write_errors": write_errors,
            "expected": expected,
            "missing": missing,
            "counters": counters,
            "dropped_connections": dropped,
            "per_update_ms": {
                "doc": "for each update: latency of its first/median/p99/last receiver; summarised over updates (p50 = typical update, max = worst update)",
                "first": first, "median": median, "p99": p99, "last": last,
            },
            "all_deliveries_ms": all.summary(),
            "put_rtt_ms": rtt.summary(),
            "cost": cost,
            "server_cpu_us_per_delivery": server_us,
            "server_user_us_per_delivery": server_user_us,
            "server_sys_us_per_delivery": server_sys_us,
            "client_cpu_us_per_delivery": client_us,
            "deliveries_per_server_cpu_s": per_server_cpu_s,
        }));
    }
    pool.close_all(Duration::from_secs(20)).await;
    // p99 sits between median and last and would only crowd the plot; it is in the JSON.
    for (dash, name) in ["last", "median", "first"].into_iter().enumerate() {
        if let Some(points) = lines.remove(name) {
            out.series.push(Series {
                name: name.to_owned(),
                points,
                dash: dash as u8,
                group: 0,
            });
        }
    }
    out.result = json!({ "product_id": product, "sizes": rows });
    Ok(out)
}

pub fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| format!("{v:.2}"))
}

/// The cost side of a fanout run as a Markdown table, one row per target and size, targets
/// side by side: deliveries per server CPU-second and server µs per delivery, all of it and
/// split into user space (the server's own work) and system (kernel: socket writes and, on
/// loopback, the receivers' TCP path). Written beside the JSON as `<stem>.md`.
pub fn markdown(targets: &[crate::report::TargetRun]) -> String {
    let num = |v: Option<&serde_json::Value>, digits: usize| {
        v.and_then(serde_json::Value::as_f64)
            .map_or_else(|| "?".to_owned(), |v| format!("{v:.digits$}"))
    };
    let mut out = String::from(
        "| server | subscribers | deliveries per server CPU-s | server µs per delivery | **user-space** µs per delivery | system µs per delivery | send → last delivery p50 (ms) |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for t in targets {
        let sizes = t.result.get("sizes").and_then(serde_json::Value::as_array);
        for row in sizes.into_iter().flatten() {
            let last_p50 = row
                .get("per_update_ms")
                .and_then(|p| p.get("last"))
                .and_then(|l| l.get("p50_ms"));
            out.push_str(&format!(
                "| {} ({}) | {} | {} | {} | {} | {} | {} |\n",
                t.name,
                t.base_url.split("://").next().unwrap_or_default(),
                num(row.get("subscribers"), 0),
                num(row.get("deliveries_per_server_cpu_s"), 0),
                num(row.get("server_cpu_us_per_delivery"), 2),
                num(row.get("server_user_us_per_delivery"), 2),
                num(row.get("server_sys_us_per_delivery"), 2),
                num(last_p50, 1),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_one_row_per_target_and_size_with_the_cpu_split() {
        let run = crate::report::TargetRun {
            name: "floor".into(),
            base_url: "https://127.0.0.1:1".into(),
            pid: Some(1),
            result: json!({"sizes": [
                {"subscribers": 100, "deliveries_per_server_cpu_s": 125000.4,
                 "server_cpu_us_per_delivery": 8.0, "server_user_us_per_delivery": 2.004,
                 "server_sys_us_per_delivery": 5.996, "per_update_ms": {"last": {"p50_ms": 1.26}}},
                {"subscribers": 1000, "server_cpu_us_per_delivery": null},
            ]}),
            failures: vec![],
        };
        let md = markdown(&[run]);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 4, "{md}");
        assert_eq!(
            lines[2],
            "| floor (https) | 100 | 125000 | 8.00 | 2.00 | 6.00 | 1.3 |"
        );
        assert_eq!(lines[3], "| floor (https) | 1000 | ? | ? | ? | ? | ? |");
    }
}
