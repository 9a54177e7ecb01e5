//! The six scenarios and what they share: the client pool (thousands of subscribed
//! receivers, each one task), the cost meter (server CPU/RSS, client CPU, machine busy
//! beside every figure), and the `Outcome` each scenario hands back to `main`.
//!
//! Every loop here is bounded: connects and acks by per-connection timeouts, timed runs by
//! a deadline and a maximum count, waits for deliveries by a drain timeout.

pub mod churn;
pub mod conns;
pub mod fanout;
pub mod honest;
pub mod hostile;
pub mod puts;
pub mod steady;
pub mod writes;
mod writes_replication;

use crate::procstat::{self, MachineCpu, ProcSample};
use crate::record::{ConnRecord, Shared, SharedRecord};
use crate::svg::Series;
use crate::target::Target;
use crate::ws::{self, Connector};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// What a scenario returns for one target.
#[derive(Debug, Default)]
pub struct Outcome {
    pub result: serde_json::Value,
    /// Correctness failures (non-zero counters, failed connections, …). Empty = pass.
    pub failures: Vec<String>,
    /// Plot lines for this target (names are prefixed with the target name by `main`).
    pub series: Vec<Series>,
    /// Human-readable lines for the terminal.
    pub summary: Vec<String>,
}

/// Settings every scenario that opens receivers shares.
#[derive(Debug, Clone)]
pub struct Common {
    pub connect_concurrency: usize,
    pub ack_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_client_conns: u64,
}

/// Resource use over one measured window.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Cost {
    pub wall_s: f64,
    /// Server utime+stime over the window (None: pid unknown).
    pub server_cpu_s: Option<f64>,
    /// The user-space part of it (utime): the server's own work.
    pub server_user_s: Option<f64>,
    /// The kernel part of it (stime): socket writes, and on loopback the receivers' TCP path.
    pub server_sys_s: Option<f64>,
    pub server_rss_kib_before: Option<u64>,
    pub server_rss_kib_after: Option<u64>,
    pub server_fds_after: Option<u64>,
    pub client_cpu_s: f64,
    pub client_rss_kib_after: u64,
    /// Busy share of all cores (server + client + Postgres + anything else), 0..100.
    pub machine_busy_pct: f64,
    /// CPU of all local `postgres` processes over the window (a lower bound: backends that
    /// exit take theirs along).
    pub postgres_cpu_s: f64,
}

/// Starts measuring at `start`, reports at `stop`.
#[derive(Debug)]
pub struct Meter {
    server: Option<ProcSample>,
    client: ProcSample,
    machine: MachineCpu,
    postgres: f64,
    t0: Instant,
}

impl Meter {
    pub fn start(target: &Target) -> Self {
        Self {
            server: target.sample(),
            client: procstat::sample_self(),
            machine: MachineCpu::now(),
            postgres: procstat::cpu_of_comm("postgres"),
            t0: Instant::now(),
        }
    }

    pub fn stop(&self, target: &Target) -> Cost {
        let server = target.sample();
        let client = procstat::sample_self();
        let server_delta = |f: fn(&ProcSample) -> f64| match (&self.server, &server) {
            (Some(a), Some(b)) => Some(f(b) - f(a)),
            _ => None,
        };
        Cost {
            wall_s: self.t0.elapsed().as_secs_f64(),
            server_cpu_s: server_delta(|s| s.cpu_s),
            server_user_s: server_delta(|s| s.user_s),
            server_sys_s: server_delta(|s| s.sys_s),
            server_rss_kib_before: self.server.map(|s| s.rss_kib),
            server_rss_kib_after: server.map(|s| s.rss_kib),
            server_fds_after: server.map(|s| s.fds),
            client_cpu_s: client.cpu_s - self.client.cpu_s,
            client_rss_kib_after: client.rss_kib,
            machine_busy_pct: self.machine.busy_since(&MachineCpu::now()) * 100.0,
            postgres_cpu_s: (procstat::cpu_of_comm("postgres") - self.postgres).max(0.0),
        }
    }
}

/// Result of adding clients to a pool.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConnectReport {
    pub requested: usize,
    pub ready: usize,
    pub failed: usize,
    /// Failures by kind (see `ws::WsError::kind`); `client_fd_limit` means this process hit
    /// RLIMIT_NOFILE, not the server.
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub secs: f64,
}

#[derive(Debug, Default)]
struct Phase {
    ready: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<BTreeMap<String, u64>>,
    first_error: Mutex<Option<String>>,
}

impl Phase {
    fn fail(&self, e: &ws::WsError) {
        *lock(&self.errors).entry(e.kind().to_owned()).or_default() += 1;
        lock(&self.first_error).get_or_insert_with(|| e.to_string());
        self.failed.fetch_add(1, Ordering::AcqRel);
    }
}

/// Locks a mutex whose holders never panic while holding it; if one did, its data is
/// still the best available, so poisoning is ignored.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Long-lived subscribed receivers, one task each.
#[derive(Debug)]
pub struct ClientPool {
    connector: Arc<Connector>,
    pub shared: Arc<Shared>,
    records: Vec<SharedRecord>,
    handles: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    limit: Arc<Semaphore>,
    ack_timeout: Duration,
}

impl ClientPool {
    pub fn new(target: &Target, spread: usize, shared: Arc<Shared>, common: &Common) -> Self {
        let mut connector = Connector::new(target, spread);
        connector.timeout = common.connect_timeout;
        Self {
            connector: Arc::new(connector),
            shared,
            records: Vec::new(),
            handles: Vec::new(),
            stop: watch::channel(false).0,
            limit: Arc::new(Semaphore::new(common.connect_concurrency.max(1))),
            ack_timeout: common.ack_timeout,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn records(&self) -> &[SharedRecord] {
        &self.records
    }

    /// Opens one receiver per id set, subscribes it, and waits until every one is ready or
    /// has failed (each step is bounded by the connect/ack timeouts).
    pub async fn add(&mut self, id_sets: Vec<Vec<u64>>, label: &str) -> ConnectReport {
        let n = id_sets.len();
        let phase = Arc::new(Phase::default());
        let start = Instant::now();
        let pb = crate::progress::bar(n as u64, label.to_owned());
        for ids in id_sets {
            let index = self.records.len();
            let rec: SharedRecord = Arc::new(Mutex::new(ConnRecord::new(ids.clone())));
            self.records.push(rec.clone());
            let task = client_task(ClientTask {
                connector: self.connector.clone(),
                index,
                ids,
                rec,
                shared: self.shared.clone(),
                phase: phase.clone(),
                limit: self.limit.clone(),
                stop: self.stop.subscribe(),
                ack_timeout: self.ack_timeout,
            });
            self.handles.push(tokio::spawn(task));
        }
        // Bounded twice over: every task ends its connect phase within its timeouts, and
        // this wait gives up after a generous deadline anyway.
        let deadline = start
            + Duration::from_secs(60)
            + self.ack_timeout
            + Duration::from_millis(20 * n as u64);
        loop {
            let done = phase.ready.load(Ordering::Acquire) + phase.failed.load(Ordering::Acquire);
            pb.set_position(done as u64);
            if done >= n || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pb.finish_and_clear();
        let ready = phase.ready.load(Ordering::Acquire);
        let failed = n - ready.min(n);
        ConnectReport {
            requested: n,
            ready,
            failed,
            errors: lock(&phase.errors).clone(),
            first_error: lock(&phase.first_error).clone(),
            secs: start.elapsed().as_secs_f64(),
        }
    }

    /// Asks every receiver to close politely and waits (bounded) for them.
    pub async fn close_all(self, timeout: Duration) -> usize {
        let _ = self.stop.send(true);
        let n = self.handles.len();
        let all = futures_util::future::join_all(self.handles);
        if tokio::time::timeout(timeout, all).await.is_err() {
            crate::progress::note(format!(
                "  some of {n} receivers did not close within {timeout:?}"
            ));
        }
        n
    }
}

struct ClientTask {
    connector: Arc<Connector>,
    index: usize,
    ids: Vec<u64>,
    rec: SharedRecord,
    shared: Arc<Shared>,
    phase: Arc<Phase>,
    limit: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    ack_timeout: Duration,
}

async fn client_task(t: ClientTask) {
    let ClientTask {
        connector,
        index,
        ids,
        rec,
        shared,
        phase,
        limit,
        mut stop,
        ack_timeout,
    } = t;
    // The semaphore is never closed, so acquiring only waits.
    let Ok(permit) = limit.acquire_owned().await else {
        return;
    };
    let mut socket = match connector.connect(index).await {
        Ok(s) => s,
        Err(e) => {
            phase.fail(&e);
            return;
        }
    };
    if let Err(e) = ws::subscribe(&mut socket, &ids, ack_timeout).await {
        phase.fail(&e);
        return;
    }
    drop(permit);
    phase.ready.fetch_add(1, Ordering::AcqRel);
    loop {
        tokio::select! {
            biased;
            msg = socket.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let now = crate::record::stamp();
                    lock(&rec).on_text(&text, now, &shared);
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    if !*stop.borrow() {
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => {
                ws::close(&mut socket, Duration::from_secs(5)).await;
                return;
            }
        }
    }
}

/// Polls `/stats` until `sessions` equals `want` or `timeout` passes; returns the last
/// value seen (None if the server has no such stat).
pub async fn wait_sessions(target: &Target, want: u64, timeout: Duration) -> Option<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = crate::rest::stats_sessions(target).await;
        if s.is_none_or(|s| s == want) || Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates `n` products over `parallel` REST connections; returns their ids in order.
pub async fn create_products(
    target: &Target,
    n: usize,
    parallel: usize,
    label: &str,
) -> anyhow::Result<Vec<u64>> {
    use crate::proto::ProductBody;
    let parallel = parallel.clamp(1, n.max(1));
    let pb = crate::progress::bar(n as u64, label.to_owned());
    let mut tasks = Vec::new();
    for w in 0..parallel {
        let target = target.clone();
        let pb = pb.clone();
        tasks.push(tokio::spawn(async move {
            let mut rest = crate::rest::Rest::new(&target);
            let mut out = Vec::new();
            for i in (w..n).step_by(parallel) {
                let body = ProductBody {
                    manufacturer: "rowcast-bench".into(),
                    price_per_unit: "1.50".into(),
                    units_available: 0,
                    product_name: format!("rowcast-bench setup {i}"),
                };
                out.push((i, rest.create_product(&body).await?));
                pb.inc(1);
            }
            Ok::<_, crate::rest::RestError>(out)
        }));
    }
    let mut ids = vec![0; n];
    for t in tasks {
        for (i, id) in t.await?? {
            ids[i] = id;
        }
    }
    pb.finish_and_clear();
    Ok(ids)
}

/// Fails early, with the reason, when this process cannot hold `conns` sockets.
pub fn check_fd_budget(conns: usize, common: &Common) -> Result<(), String> {
    if conns as u64 > common.max_client_conns {
        return Err(format!(
            "client fd limit: this process may hold {} connections (RLIMIT_NOFILE soft limit minus {} reserved), {} requested; \
             raise the hard limit (ulimit -Hn) or run fewer",
            common.max_client_conns,
            crate::fdlimit::RESERVED_FDS,
            conns
        ));
    }
    Ok(())
}

/// Appends a failure line for each non-zero correctness counter.
pub fn counter_failures(
    c: &crate::record::Counters,
    missing: i64,
    dropped: u64,
    failures: &mut Vec<String>,
) {
    let checks = [
        ("missing deliveries (expected − received)", missing),
        ("duplicates", c.duplicates as i64),
        ("order violations", c.order_violations as i64),
        ("changes for unsubscribed products", c.unexpected as i64),
        ("error frames", c.error_frames as i64),
        ("unparseable frames", c.parse_errors as i64),
        ("connections dropped by the server", dropped as i64),
    ];
    for (what, n) in checks {
        if n != 0 {
            failures.push(format!("{what}: {n}"));
        }
    }
}

/// `a / b`, or None when b is zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}
