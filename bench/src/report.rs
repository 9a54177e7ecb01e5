//! The results file: one JSON document per scenario run (all targets side by side), the
//! machine it ran on, the exact command, and pass/fail with reasons; plus writing the SVG.

use crate::fdlimit::FdLimit;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub mem_total_kib: u64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name")
                        .and_then(|r| r.split_once(':'))
                        .map(|(_, v)| v.trim().to_owned())
                })
                .unwrap_or_default(),
            mem_total_kib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// One target's part of a run.
#[derive(Debug, Serialize)]
pub struct TargetRun {
    pub name: String,
    pub base_url: String,
    pub pid: Option<u32>,
    /// Scenario-specific measurements (see each scenario module's doc).
    pub result: serde_json::Value,
    /// Why this target failed the scenario's correctness checks (empty = passed).
    pub failures: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub scenario: String,
    pub started_unix_s: u64,
    pub command: Vec<String>,
    /// Free text from `--note`, e.g. which server commit state was measured.
    pub note: Option<String>,
    pub machine: Machine,
    pub client_fd_limit: FdLimit,
    /// Busy share of all cores in the second before the run started (other work on the
    /// machine: builds, tests). Above ~10 % the figures are disturbed.
    pub background_busy_pct: f64,
    pub targets: Vec<TargetRun>,
    pub passed: bool,
}

/// Writes `<dir>/<stem>.json` (and `<stem>.svg` if given); returns the paths written.
pub fn write(
    dir: &Path,
    stem: &str,
    report: &RunReport,
    svg: Option<&str>,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    let json_path = dir.join(format!("{stem}.json"));
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(&json_path, json + "\n")?;
    out.push(json_path);
    if let Some(svg) = svg {
        let p = dir.join(format!("{stem}.svg"));
        std::fs::write(&p, svg)?;
        out.push(p);
    }
    Ok(out)
}
