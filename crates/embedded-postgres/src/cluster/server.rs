//! The server: its command line (socket only, our settings, then the
//! caller's), telling the watchdog to start it, and waiting until it is ours
//! and accepts connections, or saying why it did not.

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, BufReader};

use super::{StartContext, log, url};
use crate::error::EmbeddedError;
use crate::options::EmbeddedOptions;
use crate::watchdog::Watchdog;
use crate::{HELPER_TIMEOUT, PORT};

/// How often readiness is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Tells the watchdog to start the server, then waits until the server is
/// ours and accepts connections. Returns the postmaster pid.
pub(super) async fn start_server(
    watchdog: &mut Watchdog,
    ctx: &StartContext,
    options: &EmbeddedOptions,
) -> Result<u32, EmbeddedError> {
    let started = Instant::now();
    let stdout = watchdog.take_stdout();
    watchdog
        .send_start()
        .map_err(|e| EmbeddedError::io("signal the PostgreSQL watchdog for", &ctx.dir, e))?;
    let failed = |status: String, ctx: &StartContext| {
        let tail = log::log_tail(&ctx.log_reader, ctx.log_offset);
        classify_start_failure(ctx, status, tail)
    };

    // The inner watchdog prints the postmaster's pid once it has forked it.
    let mut pid_line = String::new();
    if let Some(stdout) = stdout {
        let mut reader = BufReader::new(stdout);
        match tokio::time::timeout(HELPER_TIMEOUT, reader.read_line(&mut pid_line)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(EmbeddedError::io(
                    "read the postmaster pid from the watchdog of",
                    &ctx.dir,
                    e,
                ));
            }
            Err(_) => pid_line.clear(),
        }
    }
    let Ok(pid) = pid_line.trim().parse::<u32>() else {
        let status = watchdog.exit_status_now().await;
        return Err(failed(status, ctx));
    };

    let url = url::url_for(&ctx.dir, "postgres");
    let pidfile = ctx.pgdata.join("postmaster.pid");
    let mut last_error = String::from("server not started yet");
    loop {
        match watchdog.try_wait() {
            Ok(Some(status)) => return Err(failed(status.to_string(), ctx)),
            Ok(None) => {}
            Err(e) => {
                return Err(EmbeddedError::io(
                    "check the PostgreSQL watchdog of",
                    &ctx.dir,
                    e,
                ));
            }
        }
        // The lock file names our pid only if our postmaster won the data dir;
        // otherwise the socket may belong to somebody else's server.
        if postmaster_ready(&pidfile, pid) {
            match probe(&url).await {
                Ok(()) => return Ok(pid),
                Err(e) => last_error = e,
            }
        }
        if started.elapsed() >= options.start_timeout {
            let tail = log::log_tail(&ctx.log_reader, ctx.log_offset);
            return Err(EmbeddedError::StartTimeout {
                waited: options.start_timeout,
                last_error,
                log: ctx.log_file.clone(),
                tail,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Turns a failed start into [`EmbeddedError::AlreadyRunning`] when the log
/// says the data dir is locked by another postmaster.
fn classify_start_failure(ctx: &StartContext, status: String, tail: String) -> EmbeddedError {
    if tail.contains("lock file \"postmaster.pid\" already exists") {
        let pid = tail
            .split("Is another postmaster (PID ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap_or("unknown")
            .to_owned();
        return EmbeddedError::AlreadyRunning {
            dir: ctx.dir.clone(),
            pid,
        };
    }
    EmbeddedError::StartFailed {
        status,
        log: ctx.log_file.clone(),
        tail,
    }
}

/// Whether `postmaster.pid` names `pid` and (PostgreSQL 10+) says "ready".
fn postmaster_ready(pidfile: &Path, pid: u32) -> bool {
    let Ok(contents) = fs::read_to_string(pidfile) else {
        return false;
    };
    let lines: Vec<&str> = contents.lines().collect();
    let ours = lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == Some(pid);
    // Line 8 is the postmaster status; older servers do not write it.
    let ready = lines.get(7).is_none_or(|status| status.trim() == "ready");
    ours && ready
}

/// One connection and `SELECT 1` through the URL we hand out.
async fn probe(url: &str) -> Result<(), String> {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let query = async move {
            let result = client.simple_query("SELECT 1").await;
            drop(client);
            result
        };
        let (result, _) = tokio::join!(query, connection);
        result.map(drop)
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("last connection error: {e}")),
        Err(_) => Err("connection attempt timed out".to_owned()),
    }
}

/// The server's command line after the binary.
pub(super) fn server_args(
    pgdata: &Path,
    dir: &Path,
    ephemeral: bool,
    options: &EmbeddedOptions,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "-D".into(),
        pgdata.into(),
        "-p".into(),
        PORT.to_string().into(),
    ];
    let mut socket_dirs = OsString::from("unix_socket_directories=");
    socket_dirs.push(quote_guc_list_item(dir));
    args.extend(["-c".into(), socket_dirs]);
    let mut settings: Vec<(&str, &str)> = vec![
        ("listen_addresses", ""),
        ("unix_socket_permissions", "0777"),
        ("max_connections", "200"),
        ("cluster_name", "rowcast"),
        ("logging_collector", "off"),
        // Logical decoding, so rowcast's `--source replication` works out of the box: a little
        // more WAL per write (row identities, invalidations) in exchange. Senders and slots for
        // several deployments or parallel tests on one cluster (each holds one of each).
        ("wal_level", "logical"),
        ("max_wal_senders", "64"),
        ("max_replication_slots", "64"),
    ];
    if ephemeral {
        settings.extend([
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
        ]);
    }
    settings.extend(
        options
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    for (name, value) in settings {
        args.push("-c".into());
        args.push(format!("{name}={value}").into());
    }
    args
}

/// Quotes a dir for a GUC list such as `unix_socket_directories`, which
/// splits on commas and whitespace unless double-quoted (`""` inside quotes).
fn quote_guc_list_item(dir: &Path) -> OsString {
    let mut bytes = vec![b'"'];
    for &b in dir.as_os_str().as_bytes() {
        if b == b'"' {
            bytes.push(b'"');
        }
        bytes.push(b);
    }
    bytes.push(b'"');
    std::os::unix::ffi::OsStringExt::from_vec(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guc_list_quoting() {
        assert_eq!(
            quote_guc_list_item(Path::new("/tmp/a \"b\",c")),
            OsString::from("\"/tmp/a \"\"b\"\",c\"")
        );
    }

    #[test]
    fn logical_decoding_is_on_and_options_come_last() {
        let options = EmbeddedOptions::new().setting("max_replication_slots", "3");
        let args: Vec<String> = server_args(Path::new("/d"), Path::new("/s"), false, &options)
            .into_iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.iter().any(|arg| arg == "wal_level=logical"),
            "{args:?}"
        );
        let ours = args
            .iter()
            .position(|arg| arg == "max_replication_slots=64");
        let theirs = args.iter().position(|arg| arg == "max_replication_slots=3");
        assert!(ours < theirs, "the caller's settings win: {args:?}");
    }

    #[test]
    fn ready_needs_our_pid() {
        let dir = std::env::temp_dir().join(format!(
            "rowcast-embedded-unit-{:016x}",
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).expect("test: create dir");
        let pidfile = dir.join("postmaster.pid");
        fs::write(&pidfile, "42\n/d\n1\n5432\n/s\n\n 1 2\nready   \n").expect("test: write");
        assert!(postmaster_ready(&pidfile, 42));
        assert!(!postmaster_ready(&pidfile, 43));
        fs::write(&pidfile, "42\n/d\n1\n5432\n/s\n\n 1 2\nstarting\n").expect("test: write");
        assert!(!postmaster_ready(&pidfile, 42));
        fs::remove_dir_all(&dir).expect("test: cleanup");
    }
}
