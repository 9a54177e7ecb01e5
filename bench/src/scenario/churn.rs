//! `churn`: K workers loop connect → subscribe(1024 ids) → unsubscribe → close for a fixed
//! time per round; ops/s per round and the server's RSS after each round (drift = leak
//! suspicion), and `sessions` returning to its start value between rounds.
//!
//! Each op waits for both acks, so an op proves the server did the work, and closes with
//! the WebSocket close handshake so the server ends up holding TIME_WAIT. Sockets rotate
//! over `--source-ips` loopback addresses because the client's side of closed sockets
//! still consumes ports of the ~28k ephemeral range.

use super::{Common, Outcome, create_products, lock, wait_sessions};
use crate::svg::Series;
use crate::target::Target;
use crate::ws::{self, Connector};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct ChurnArgs {
    /// Rounds (RSS is sampled after each).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per round.
    #[arg(long, default_value_t = 10)]
    pub round_secs: u64,
    /// Products subscribed and unsubscribed per op.
    #[arg(long, default_value_t = 1024)]
    pub ids: usize,
    /// Concurrent workers (connections in flight).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Loopback source addresses to spread sockets over.
    #[arg(long, default_value_t = 4)]
    pub source_ips: usize,
    /// Idle time after each round before sampling RSS.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Maximum ops per round (a bound besides time).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_ops: u64,
}

pub async fn run(target: &Target, args: &ChurnArgs, common: &Common) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let ids = Arc::new(
        create_products(
            target,
            args.ids.max(1),
            8,
            &format!("{}: create {} products", target.name, args.ids),
        )
        .await?,
    );
    let mut connector = Connector::new(target, args.source_ips);
    connector.timeout = common.connect_timeout;
    let connector = Arc::new(connector);
    let sessions0 = crate::rest::stats_sessions(target).await;
    let index = Arc::new(AtomicUsize::new(0));
    let mut rounds = Vec::new();
    let mut rss_points = Vec::new();
    let mut ops_points = Vec::new();
    let mut total_errors = 0;
    let rss0 = target.sample();
    for round in 1..=args.rounds {
        let ops = Arc::new(AtomicU64::new(0));
        let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let first_error: Arc<Mutex<Option<String>>> = Arc::default();
        let meter = super::Meter::start(target);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(args.round_secs);
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (connector, ids, index, ops, errors, first_error) = (
                connector.clone(),
                ids.clone(),
                index.clone(),
                ops.clone(),
                errors.clone(),
                first_error.clone(),
            );
            let (max_ops, ack) = (args.max_ops, common.ack_timeout);
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline && ops.load(Ordering::Relaxed) < max_ops {
                    let i = index.fetch_add(1, Ordering::Relaxed);
                    match one_op(&connector, i, &ids, ack).await {
                        Ok(()) => {
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            *lock(&errors).entry(e.kind().to_owned()).or_default() += 1;
                            lock(&first_error).get_or_insert_with(|| e.to_string());
                            // Back off so a refusing server does not turn this into a
                            // busy loop.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
        let pb = crate::progress::timed(
            args.round_secs,
            format!("{}: churn round {round}/{}", target.name, args.rounds),
        );
        while Instant::now() < deadline {
            pb.set_position(start.elapsed().as_secs());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for t in tasks {
            t.await?;
        }
        let secs = start.elapsed().as_secs_f64();
        let cost = meter.stop(target);
        pb.finish_and_clear();
        let sessions_after = match sessions0 {
            Some(s0) => wait_sessions(target, s0, Duration::from_secs(10)).await,
            None => None,
        };
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        let sample = target.sample();
        let n = ops.load(Ordering::Relaxed);
        let errs = lock(&errors).clone();
        let err_total: u64 = errs.values().sum();
        total_errors += err_total;
        if err_total > 0 {
            out.failures.push(format!(
                "round {round}: {err_total} failed ops {errs:?}, first: {:?}",
                lock(&first_error)
            ));
        }
        if let (Some(s0), Some(sa)) = (sessions0, sessions_after) {
            if sa != s0 {
                out.failures.push(format!(
                    "round {round}: server reports {sa} sessions after the round (started at {s0})"
                ));
            }
        }
        let ops_s = n as f64 / secs;
        ops_points.push((round as f64, ops_s));
        if let Some(s) = sample {
            rss_points.push((round as f64, s.rss_kib as f64 / 1024.0));
        }
        out.summary.push(format!(
            "round {round}: {n} ops in {secs:.1} s = {ops_s:.0} ops/s, errors {err_total}, server rss {} KiB, server cpu {} µs/op, machine {:.0}% busy",
            sample.map_or("?".into(), |s| s.rss_kib.to_string()),
            cost.server_cpu_s.map_or("?".into(), |c| format!("{:.0}", c * 1e6 / n.max(1) as f64)),
            cost.machine_busy_pct
        ));
        rounds.push(json!({
            "round": round, "ops": n, "secs": secs, "ops_per_s": ops_s, "errors": errs,
            "server_rss_kib_after": sample.map(|s| s.rss_kib), "server_fds_after": sample.map(|s| s.fds),
            "sessions_after": sessions_after, "cost": cost,
            "server_cpu_us_per_op": cost.server_cpu_s.map(|c| c * 1e6 / n.max(1) as f64),
        }));
    }
    let rss_first = rss_points.first().map(|p| p.1);
    let rss_last = rss_points.last().map(|p| p.1);
    let drift_mib = match (rss_first, rss_last) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    out.summary.push(format!(
        "RSS before {} KiB; after round 1 {} MiB, after round {} {} MiB: drift {} MiB",
        rss0.map_or("?".into(), |s| s.rss_kib.to_string()),
        rss_first.map_or("?".into(), |v| format!("{v:.1}")),
        args.rounds,
        rss_last.map_or("?".into(), |v| format!("{v:.1}")),
        drift_mib.map_or("?".into(), |v| format!("{v:+.2}"))
    ));
    out.series.push(Series {
        name: "ops/s".into(),
        points: ops_points,
        dash: 0,
        group: 0,
    });
    out.result = json!({
        "ids_per_op": args.ids, "concurrency": args.concurrency, "round_secs": args.round_secs,
        "source_ips": connector.sources(),
        "server_rss_kib_before": rss0.map(|s| s.rss_kib),
        "rss_drift_mib_round1_to_last": drift_mib,
        "rss_mib_by_round": rss_points,
        "failed_ops": total_errors,
        "rounds": rounds,
    });
    Ok(out)
}

async fn one_op(
    connector: &Connector,
    index: usize,
    ids: &[u64],
    ack: Duration,
) -> Result<(), ws::WsError> {
    let mut socket = connector.connect(index).await?;
    ws::subscribe(&mut socket, ids, ack).await?;
    ws::unsubscribe(&mut socket, ids, ack).await?;
    ws::close(&mut socket, Duration::from_secs(5)).await;
    Ok(())
}
