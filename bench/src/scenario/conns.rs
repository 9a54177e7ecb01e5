//! `conns`: N idle, subscribed WebSocket connections; the server's RSS before, at each
//! tenth of N, and after all close → bytes of server memory per idle connection, and
//! how much stays after they are gone.
//!
//! RSS is what the kernel charges the process (VmRSS), so allocator caching counts: the
//! "after close" figure shows memory the allocator kept, not necessarily a leak; `churn`
//! is the leak test. Each step waits `--settle-ms` so lazily-allocated buffers and the
//! server's bookkeeping have caught up before sampling.

use super::{ClientPool, Common, Outcome, check_fd_budget, create_products, wait_sessions};
use crate::procstat;
use crate::record::{self, Shared};
use crate::svg::Series;
use crate::target::Target;
use crate::ws::Connector;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct ConnsArgs {
    /// Idle connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Products each connection subscribes to.
    #[arg(long, default_value_t = 1)]
    pub subs: usize,
    /// Steps to open them in (RSS is sampled after each).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Wait after each step before sampling RSS.
    #[arg(long, default_value_t = 1500)]
    pub settle_ms: u64,
}

pub async fn run(target: &Target, args: &ConnsArgs, common: &Common) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    if let Err(e) = check_fd_budget(args.connections, common) {
        out.failures.push(e);
        return Ok(out);
    }
    let Some(pid) = target.pid else {
        out.failures.push(
            "conns needs the server pid (--server-pid or a local listening port) to read its RSS"
                .into(),
        );
        return Ok(out);
    };
    let ids = create_products(target, args.subs.max(1), 4, "create products").await?;
    let settle = Duration::from_millis(args.settle_ms);
    let sessions0 = crate::rest::stats_sessions(target).await;
    tokio::time::sleep(settle).await;
    let before = procstat::sample(pid).unwrap_or_default();
    let client_before = procstat::sample_self();
    let shared = Shared::new(0);
    let mut pool = ClientPool::new(
        target,
        Connector::spread_for(args.connections),
        shared.clone(),
        common,
    );
    let steps = args.steps.clamp(1, args.connections.max(1));
    let mut points = vec![(0.0, 0.0)];
    let mut step_rows = Vec::new();
    let mut failed = 0;
    for s in 1..=steps {
        let n = args.connections * s / steps;
        let add = n - pool.len();
        let rep = pool
            .add(
                vec![ids.clone(); add],
                &format!("{}: open {n}", target.name),
            )
            .await;
        failed += rep.failed;
        if rep.failed > 0 {
            out.failures.push(format!(
                "step to {n}: {} connections failed ({:?}; by kind {:?})",
                rep.failed, rep.first_error, rep.errors
            ));
            break;
        }
        tokio::time::sleep(settle).await;
        let now = procstat::sample(pid).unwrap_or_default();
        let grown_kib = now.rss_kib.saturating_sub(before.rss_kib);
        points.push((n as f64, grown_kib as f64 / 1024.0));
        step_rows.push(json!({ "connections": n, "server_rss_kib": now.rss_kib, "server_fds": now.fds, "connect_s": rep.secs }));
    }
    let open = pool.len() - failed;
    let at_peak = procstat::sample(pid).unwrap_or_default();
    let client_peak = procstat::sample_self();
    let sessions_peak = crate::rest::stats_sessions(target).await;
    let (_, counters) = record::drain(pool.records());
    let dropped = shared.dropped.load(std::sync::atomic::Ordering::Relaxed);
    pool.close_all(Duration::from_secs(60)).await;
    let sessions_after = match sessions0 {
        Some(s0) => wait_sessions(target, s0, Duration::from_secs(15)).await,
        None => None,
    };
    tokio::time::sleep(settle * 2).await;
    let after = procstat::sample(pid).unwrap_or_default();

    let per_conn = |kib: u64| (open > 0).then(|| kib as f64 * 1024.0 / open as f64);
    let bytes_per_conn = per_conn(at_peak.rss_kib.saturating_sub(before.rss_kib));
    let client_bytes_per_conn = per_conn(client_peak.rss_kib.saturating_sub(client_before.rss_kib));
    if let (Some(s0), Some(sp)) = (sessions0, sessions_peak) {
        if sp != s0 + open as u64 {
            out.failures.push(format!(
                "server reported {sp} sessions with {open} open (started at {s0})"
            ));
        }
    }
    if let (Some(s0), Some(sa)) = (sessions0, sessions_after) {
        if sa != s0 {
            out.failures.push(format!(
                "server still reports {sa} sessions 15 s after all closed (started at {s0})"
            ));
        }
    }
    if dropped > 0 {
        out.failures.push(format!(
            "{dropped} idle connections were closed by the server"
        ));
    }
    if counters.error_frames > 0 {
        out.failures
            .push(format!("{} error frames", counters.error_frames));
    }
    out.summary.push(format!(
        "{open} idle conns: server RSS {} → {} KiB ({} bytes/conn), fds {} → {}; after close {} KiB (+{} KiB kept); client {} bytes/conn; sessions {:?}→{:?}→{:?}",
        before.rss_kib,
        at_peak.rss_kib,
        bytes_per_conn.map_or("?".into(), |b| format!("{b:.0}")),
        before.fds,
        at_peak.fds,
        after.rss_kib,
        after.rss_kib as i64 - before.rss_kib as i64,
        client_bytes_per_conn.map_or("?".into(), |b| format!("{b:.0}")),
        sessions0,
        sessions_peak,
        sessions_after,
    ));
    out.series.push(Series {
        name: "RSS growth".into(),
        points,
        dash: 0,
        group: 0,
    });
    out.result = json!({
        "connections": args.connections, "open": open, "subs_per_conn": args.subs,
        "server_before": before, "server_peak": at_peak, "server_after_close": after,
        "server_bytes_per_conn": bytes_per_conn,
        "server_kib_kept_after_close": after.rss_kib as i64 - before.rss_kib as i64,
        "client_bytes_per_conn": client_bytes_per_conn,
        "sessions": { "before": sessions0, "peak": sessions_peak, "after_close": sessions_after },
        "dropped_connections": dropped,
        "steps": step_rows,
    });
    Ok(out)
}
