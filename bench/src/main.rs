//! `rowcast-bench`: runs one scenario against one or more targets side by side and writes
//! `<out-dir>/<scenario>[-<tag>].json` and `.svg`. See BENCHMARKS.md for the commands.
//!
//! Exit status: 0 = every target passed the scenario's correctness checks; 2 = a
//! correctness counter was non-zero or a connection failed; 1 = the run itself failed.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rowcast_bench::report::{self, Machine, RunReport, TargetRun};
use rowcast_bench::scenario::{self, Common, Outcome};
use rowcast_bench::svg::{Chart, Series};
use rowcast_bench::target::Target;
use rowcast_bench::tls::Trust;
use rowcast_bench::{clock, fdlimit, progress};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load and latency benchmark for rowcast's REST + WebSocket protocol"
)]
struct Cli {
    /// Server to measure, `NAME=URL[,pid=PID]` (repeatable; targets run one after another
    /// in the same invocation). Default: rowcast=http://127.0.0.1:8080.
    #[arg(long = "target", global = true)]
    targets: Vec<String>,
    /// Pid of the first target's server (else found from its listening port).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Also start the in-memory floor server (a sibling `floor-server` binary) and measure
    /// it as target `floor` in the same run.
    #[arg(long, global = true)]
    floor: bool,
    /// Path of the floor-server binary (default: next to this executable).
    #[arg(long, global = true)]
    floor_bin: Option<PathBuf>,
    /// Start the floor with TLS, serving this PEM certificate chain (needs --floor-tls-key;
    /// the floor target is then `https://`, trusted by --tls-ca or --tls-insecure).
    #[arg(long, global = true, requires = "floor_tls_key")]
    floor_tls_cert: Option<PathBuf>,
    /// PEM key of --floor-tls-cert.
    #[arg(long, global = true, requires = "floor_tls_cert")]
    floor_tls_key: Option<PathBuf>,
    /// Trust the CA certificate(s) in this PEM file for every https/wss target that does not
    /// name its own (`,ca=PEM` in the target spec).
    #[arg(long, global = true, conflicts_with = "tls_insecure")]
    tls_ca: Option<PathBuf>,
    /// Accept any certificate from https/wss targets without their own `,ca=` (benchmarks
    /// against throw-away certificates only; signatures are still checked).
    #[arg(long, global = true)]
    tls_insecure: bool,
    /// WebSocket path on every target.
    #[arg(long, global = true, default_value = "/websocket")]
    ws_path: String,
    /// Where results go.
    #[arg(long, global = true, default_value = "results")]
    out_dir: PathBuf,
    /// Suffix for result file names (`fanout-<tag>.json`).
    #[arg(long, global = true)]
    tag: Option<String>,
    /// Free text stored in the results, e.g. the server commit state measured.
    #[arg(long, global = true)]
    note: Option<String>,
    /// Receivers connecting at once.
    #[arg(long, global = true, default_value_t = 200)]
    connect_concurrency: usize,
    /// Per-connection bound on TCP connect + WebSocket handshake.
    #[arg(long, global = true, default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// Bound on waiting for a subscribe/unsubscribe ack.
    #[arg(long, global = true, default_value_t = 10_000)]
    ack_timeout_ms: u64,
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// N clients on one product; per update: first/median/p99/last delivery latency.
    Fanout(scenario::fanout::FanoutArgs),
    /// C clients × S subs over P products at U updates/s: latency percentiles, deliveries/s, 0/0/0.
    Steady(scenario::steady::SteadyArgs),
    /// N idle subscribed connections: server RSS per connection, RSS after close.
    Conns(scenario::conns::ConnsArgs),
    /// connect + subscribe(1024) + unsubscribe + disconnect in a loop: ops/s, RSS drift.
    Churn(scenario::churn::ChurnArgs),
    /// Postgres commits/s: no trigger vs bare pg_notify vs rowcast's earlier (unordered) and current trigger.
    Writes(scenario::writes::WritesArgs),
    /// Honest clients (as in steady) + a REST reader through a quiet phase, then one phase per
    /// attack: do hostile clients slow down or starve honest ones?
    Hostile(scenario::hostile::HostileArgs),
    /// C keep-alive connections PUT back to back: server CPU per PUT (user/system), round trip.
    Puts(scenario::puts::PutsArgs),
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Self::Fanout(_) => "fanout",
            Self::Steady(_) => "steady",
            Self::Conns(_) => "conns",
            Self::Churn(_) => "churn",
            Self::Writes(_) => "writes",
            Self::Hostile(_) => "hostile",
            Self::Puts(_) => "puts",
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    clock::init();
    let cli = Cli::parse();
    progress::set_quiet(cli.quiet);
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("rowcast-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A floor server this run started; stopped when dropped (`kill_on_drop`).
struct Floor {
    _child: tokio::process::Child,
}

async fn start_floor(cli: &Cli) -> anyhow::Result<(Floor, String)> {
    let bin = match &cli.floor_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("floor-server"),
    };
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let scheme = match (&cli.floor_tls_cert, &cli.floor_tls_key) {
        (Some(cert), Some(key)) => {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            "https"
        }
        _ => "http",
    };
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let pid = child.id().context("floor-server exited at once")?;
    let stdout = child.stdout.take().context("floor-server stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("floor-server did not report its address within 10 s")??
        .context("floor-server closed stdout")?;
    let addr = line
        .strip_prefix("listening on ")
        .context("unexpected floor-server banner")?
        .trim()
        .to_owned();
    Ok((
        Floor { _child: child },
        format!("floor={scheme}://{addr},pid={pid}"),
    ))
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let fd = fdlimit::raise();
    let common = Common {
        connect_concurrency: cli.connect_concurrency,
        ack_timeout: Duration::from_millis(cli.ack_timeout_ms),
        connect_timeout: Duration::from_millis(cli.connect_timeout_ms),
        max_client_conns: fd.max_connections(),
    };
    progress::note(format!(
        "client RLIMIT_NOFILE soft {} hard {} → at most {} connections from this process",
        fd.soft,
        fd.hard,
        fd.max_connections()
    ));
    let idle0 = rowcast_bench::procstat::MachineCpu::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let background_busy_pct = idle0.busy_since(&rowcast_bench::procstat::MachineCpu::now()) * 100.0;
    if background_busy_pct > 10.0 {
        progress::note(format!(
            "warning: machine already {background_busy_pct:.0}% busy before the run: figures will be disturbed"
        ));
    }
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = cli.scenario.name();
    let mut runs = Vec::new();
    let mut chart_series = Vec::new();

    if let Scenario::Writes(args) = &cli.scenario {
        let out = scenario::writes::run(args).await?;
        let safe_url = redact(&args.database_url);
        print_outcome("postgres", &out);
        chart_series.extend(out.series.clone());
        runs.push(TargetRun {
            name: "postgres".into(),
            base_url: safe_url,
            pid: None,
            result: out.result,
            failures: out.failures,
        });
    } else {
        let mut specs = cli.targets.clone();
        let mut _floor = None;
        if cli.floor {
            let (f, spec) = start_floor(&cli).await?;
            _floor = Some(f);
            specs.push(spec);
        }
        if specs.is_empty() {
            specs.push("rowcast=http://127.0.0.1:8080".into());
        }
        let trust = match (&cli.tls_ca, cli.tls_insecure) {
            (Some(ca), _) => Some(Trust::Ca(ca.clone())),
            (None, true) => Some(Trust::Insecure),
            (None, false) => None,
        };
        for (i, spec) in specs.iter().enumerate() {
            let mut target = Target::parse_with(spec, &cli.ws_path, trust.as_ref())?;
            if i == 0 && target.pid.is_none() {
                target.pid = cli.server_pid;
            }
            if target.resolve_pid().is_none() {
                progress::note(format!(
                    "{}: server pid unknown (not local, or not visible): CPU/RSS will be missing",
                    target.name
                ));
            }
            progress::note(format!(
                "── {name} against {} ({}, pid {:?})",
                target.name, target.base_url, target.pid
            ));
            let out = match &cli.scenario {
                Scenario::Fanout(a) => scenario::fanout::run(&target, a, &common).await,
                Scenario::Steady(a) => scenario::steady::run(&target, a, &common).await,
                Scenario::Conns(a) => scenario::conns::run(&target, a, &common).await,
                Scenario::Churn(a) => scenario::churn::run(&target, a, &common).await,
                Scenario::Hostile(a) => scenario::hostile::run(&target, a, &common).await,
                Scenario::Puts(a) => scenario::puts::run(&target, a, &common).await,
                Scenario::Writes(_) => unreachable!("handled above"),
            };
            let out = out.unwrap_or_else(|e| Outcome {
                failures: vec![format!("scenario aborted: {e:#}")],
                ..Default::default()
            });
            print_outcome(&target.name, &out);
            for s in &out.series {
                chart_series.push(Series {
                    name: format!("{} {}", target.name, s.name),
                    group: i,
                    ..s.clone()
                });
            }
            runs.push(TargetRun {
                name: target.name.clone(),
                base_url: target.base_url.clone(),
                pid: target.pid,
                result: out.result,
                failures: out.failures,
            });
        }
    }

    let passed = runs.iter().all(|r| r.failures.is_empty());
    let chart = chart_for(&cli.scenario, chart_series);
    let report = RunReport {
        scenario: name.to_owned(),
        started_unix_s,
        command: std::env::args().collect(),
        note: cli.note.clone(),
        machine: Machine::read(),
        client_fd_limit: fd,
        background_busy_pct,
        targets: runs,
        passed,
    };
    let stem = match &cli.tag {
        Some(t) => format!("{name}-{t}"),
        None => name.to_owned(),
    };
    let mut paths = report::write(&cli.out_dir, &stem, &report, Some(&chart.render()))?;
    if name == "fanout" {
        let table = scenario::fanout::markdown(&report.targets);
        println!("\n{table}");
        let md = cli.out_dir.join(format!("{stem}.md"));
        std::fs::write(&md, &table).with_context(|| format!("write {}", md.display()))?;
        paths.push(md);
    }
    for p in paths {
        progress::note(format!("wrote {}", p.display()));
    }
    progress::note(if passed {
        "PASS: all correctness counters zero"
    } else {
        "FAIL: see failures above"
    });
    Ok(passed)
}

fn print_outcome(target: &str, out: &Outcome) {
    for l in &out.summary {
        println!("[{target}] {l}");
    }
    for f in &out.failures {
        println!("[{target}] FAILURE: {f}");
    }
}

fn chart_for(scenario: &Scenario, series: Vec<Series>) -> Chart {
    if let Scenario::Hostile(a) = scenario {
        return Chart {
            title: "hostile: honest p99 latency per phase (solid: WebSocket delivery, light: REST read)"
                .into(),
            x_label: "phase (quiet, then one attack each)".into(),
            y_label: "ms".into(),
            x_categories: Some(a.phase_names()),
            bars: true,
            series,
            ..Default::default()
        };
    }
    let (title, x, y, x_log, y_log, cats) = match scenario.name() {
        "fanout" => (
            "fanout: send → delivery latency per update (p50 over updates)",
            "subscribers of one product",
            "ms",
            true,
            true,
            None,
        ),
        "steady" => (
            "steady: send → delivery latency",
            "percentile",
            "ms",
            false,
            true,
            Some(
                scenario::steady::CATEGORIES
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
            ),
        ),
        "conns" => (
            "conns: server RSS growth with idle connections",
            "connections",
            "MiB",
            false,
            false,
            None,
        ),
        "churn" => (
            "churn: connect + subscribe(1024) + unsubscribe + close",
            "round",
            "ops/s",
            false,
            false,
            None,
        ),
        "puts" => (
            "puts: REST PUTs per second, back to back over keep-alive connections",
            "round",
            "PUTs/s",
            false,
            false,
            None,
        ),
        _ => (
            "writes: UPDATE commits/s by trigger variant",
            "writers",
            "commits/s",
            true,
            false,
            None,
        ),
    };
    Chart {
        title: title.into(),
        x_label: x.into(),
        y_label: y.into(),
        x_log,
        y_log,
        x_categories: cats,
        bars: false,
        series,
    }
}

/// Drops any password from a Postgres URL before it is written to results.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            let user = cred.split(':').next().unwrap_or_default();
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
