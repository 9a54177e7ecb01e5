//! What the server process costs, read from /proc: CPU time (utime and stime from
//! `/proc/<pid>/stat`, kept apart: user space is the server's own work, system time mostly
//! the socket writes and on loopback the receivers' TCP path, the same for every server), resident memory (`VmRSS` from `/proc/<pid>/status`) and open
//! descriptors; plus the whole machine's busy time from `/proc/stat`, which shows when a
//! run is bound by the 2 shared cores rather than by the server.
//!
//! Also finds a server's pid from its listening port (`/proc/net/tcp*` → socket inode →
//! the process holding that inode), so `--server-pid` is optional for local servers.

use std::fs;
use std::path::Path;

/// A point-in-time reading of one process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcSample {
    /// utime + stime, in seconds (resolution: one clock tick, 10 ms here).
    pub cpu_s: f64,
    /// utime alone: CPU spent in user space, seconds.
    pub user_s: f64,
    /// stime alone: CPU spent in the kernel on the process's behalf, seconds.
    pub sys_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Open file descriptors (0 if unreadable).
    pub fds: u64,
}

/// Clock ticks per second for `/proc/<pid>/stat`; 100 on every Linux we run on, asked of
/// the kernel anyway.
fn clk_tck() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Reads CPU, RSS and fd count of `pid`. `None` if the process is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    let tck = clk_tck();
    let rss_kib = rss_kib(pid)?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcSample {
        cpu_s: ticks.total() as f64 / tck,
        user_s: ticks.user as f64 / tck,
        sys_s: ticks.sys as f64 / tck,
        rss_kib,
        fds,
    })
}

/// Resident memory of `pid` in KiB (`VmRSS`; 0 for a kernel thread or zombie that has none),
/// reading only `/proc/<pid>/status`: cheap enough to poll every 100 ms while a `sample` also
/// lists every open descriptor. `None` if the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_status_kib(&status, "VmRSS:").unwrap_or(0))
}

/// This process (the load client).
pub fn sample_self() -> ProcSample {
    sample(std::process::id()).unwrap_or_default()
}

/// CPU time of one process in clock ticks, as `/proc/<pid>/stat` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatTicks {
    /// utime (field 14): user mode.
    user: u64,
    /// stime (field 15): kernel mode.
    sys: u64,
}

impl StatTicks {
    fn total(self) -> u64 {
        self.user + self.sys
    }
}

/// utime and stime in ticks. The command name (field 2) may contain spaces and parens, so
/// fields are counted from the last ')'.
fn parse_stat_ticks(stat: &str) -> Option<StatTicks> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': field 3 (state) is index 0, so utime (field 14) is index 11.
    let user: u64 = fields.nth(11)?.parse().ok()?;
    let sys: u64 = fields.next()?.parse().ok()?;
    Some(StatTicks { user, sys })
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Summed utime + stime (seconds) of every process whose command name is `comm`, e.g.
/// all `postgres` backends: where the database's share of the 2 cores goes. Processes that
/// exit inside a window take their CPU with them, so this is a lower bound.
pub fn cpu_of_comm(comm: &str) -> f64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0.0;
    };
    let ticks: u64 = dir
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let open = stat.find('(').unwrap_or(0);
            let close = stat.rfind(')').unwrap_or(0);
            close > open && &stat[open + 1..close] == comm
        })
        .filter_map(|stat| parse_stat_ticks(&stat).map(StatTicks::total))
        .sum();
    ticks as f64 / clk_tck()
}

/// Whole-machine CPU counters from the first line of /proc/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub fn now() -> Self {
        let Ok(text) = fs::read_to_string("/proc/stat") else {
            return Self::default();
        };
        let Some(line) = text.lines().next() else {
            return Self::default();
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        // idle + iowait are not busy.
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Self {
            busy: total.saturating_sub(idle),
            total,
        }
    }

    /// Busy fraction of all cores between `self` and `later`, 0..=1.
    pub fn busy_since(&self, later: &Self) -> f64 {
        let dt = later.total.saturating_sub(self.total);
        if dt == 0 {
            return 0.0;
        }
        later.busy.saturating_sub(self.busy) as f64 / dt as f64
    }
}

/// The pid of the process listening on TCP `port` (IPv4 or IPv6), if this user may see it.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let inodes: Vec<u64> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .flat_map(|t| listening_inodes(&t, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(Path::new("/proc").join(&name).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                if wanted.iter().any(|w| link.as_os_str() == w.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Inodes of sockets in state LISTEN (0A) on `port` in one /proc/net/tcp* table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (p == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_survives_spaces_in_comm() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 1 1 1";
        let t = parse_stat_ticks(stat).unwrap();
        assert_eq!(t, StatTicks { user: 7, sys: 3 });
        assert_eq!(t.total(), 10);
    }

    /// A full-length line shaped like the kernel's: utime is field 14 and stime field 15,
    /// told apart; cutime/cstime (16, 17: waited-for children) are not counted.
    #[test]
    fn stat_user_and_system_are_fields_14_and_15() {
        let stat = concat!(
            "1234 (rowcast) S 1 1234 1234 0 -1 4194560 52001 0 3 0 4567 891 11 22 20 0 ",
            "9 0 123456 987654321 12345 18446744073709551615 1 1 0 0 0 0 0 4096 17610 ",
            "0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n",
        );
        assert_eq!(
            parse_stat_ticks(stat),
            Some(StatTicks {
                user: 4567,
                sys: 891
            })
        );
        // Truncated or garbled lines are refused, not misread.
        assert_eq!(parse_stat_ticks("1 (x) S 1 2 3"), None);
        assert_eq!(
            parse_stat_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 u 3 0 0"),
            None
        );
        assert_eq!(parse_stat_ticks("no parens at all"), None);
    }

    #[test]
    fn status_rss() {
        let status = "Name:\tx\nVmRSS:\t  1234 kB\nThreads:\t2\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(1234));
    }

    #[test]
    fn listen_table() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5555 1\n   1: 0100007F:1F90 0100007F:9999 01 00000000:00000000 00:00000000 00000000     0        0 6666 1\n";
        assert_eq!(listening_inodes(t, 8080), vec![5555]);
    }

    #[test]
    fn self_sample_is_readable() {
        // Burn a little user time so utime is not zero at a 10 ms tick.
        let t0 = std::time::Instant::now();
        let mut x = 1u64;
        while t0.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let s = sample_self();
        assert!(s.rss_kib > 0);
        assert!(s.fds > 0);
        assert!(s.user_s > 0.0, "{s:?}");
        assert!((s.cpu_s - (s.user_s + s.sys_s)).abs() < 1e-9, "{s:?}");
    }
}
