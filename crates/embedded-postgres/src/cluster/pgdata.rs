//! The cluster on disk (`pgdata`): initdb for a new one, and for an existing
//! one the major-version check against the binaries and the removal of a
//! stale `postmaster.pid`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use tokio::process::Command;

use super::StartContext;
use super::bins::Bins;
use super::log::{self, LOG_TAIL_LINES};
use crate::error::EmbeddedError;
use crate::filesystem::remove_dir_if_exists;
use crate::host_user::RunAs;
use crate::{HELPER_TIMEOUT, PGDATA_DIR, SUPERUSER};

/// Limit for one initdb run.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);

/// initdb for a new cluster; version and stale-lock checks for an old one.
pub(super) async fn prepare_cluster(
    ctx: &StartContext,
    run_as: &RunAs,
    bins: &Bins,
    existing_version: Option<&str>,
) -> Result<(), EmbeddedError> {
    match existing_version {
        Some(data_version) => {
            let bin_version = binary_version(&bins.postgres).await?;
            if bin_version != data_version {
                return Err(EmbeddedError::VersionMismatch {
                    dir: ctx.dir.clone(),
                    data_version: data_version.to_owned(),
                    bin_dir: bins.dir.clone(),
                    bin_version,
                });
            }
            clear_stale_pidfile(&ctx.pgdata, &ctx.dir)
        }
        None => initdb(run_as, bins, &ctx.dir, &ctx.pgdata, ctx.ephemeral).await,
    }
}

/// Runs initdb into a temporary dir and renames it into place, so that a
/// half-made cluster never sits at `pgdata`.
async fn initdb(
    run_as: &RunAs,
    bins: &Bins,
    dir: &Path,
    pgdata: &Path,
    ephemeral: bool,
) -> Result<(), EmbeddedError> {
    remove_abandoned_initdb_dirs(dir);
    let tmp = dir.join(format!("{PGDATA_DIR}.init-{:016x}", rand::random::<u64>()));
    let started = Instant::now();
    // C.UTF-8 gives Unicode-aware upper()/lower(); fall back to plain C where
    // that locale is missing.
    for (attempt, locale) in ["--locale=C.UTF-8", "--no-locale"].into_iter().enumerate() {
        let mut cmd = run_as.command(&bins.initdb);
        cmd.arg("-D")
            .arg(&tmp)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", locale]);
        if ephemeral {
            cmd.arg("--no-sync");
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(INITDB_TIMEOUT, cmd.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => return Err(EmbeddedError::io("run", &bins.initdb, e)),
            Err(_) => {
                remove_dir_if_exists(&tmp);
                return Err(EmbeddedError::InitdbFailed {
                    dir: dir.to_path_buf(),
                    status: format!("timed out after {} s", INITDB_TIMEOUT.as_secs()),
                    output: String::new(),
                });
            }
        };
        if output.status.success() {
            break;
        }
        remove_dir_if_exists(&tmp);
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        if attempt == 0 && text.contains("locale") {
            tracing::debug!(output = %text, "initdb with C.UTF-8 failed; retrying without a locale");
            continue;
        }
        return Err(EmbeddedError::InitdbFailed {
            dir: dir.to_path_buf(),
            status: output.status.to_string(),
            output: log::last_lines(&text, LOG_TAIL_LINES),
        });
    }
    match fs::rename(&tmp, pgdata) {
        Ok(()) => {
            tracing::debug!(pgdata = %pgdata.display(), elapsed = ?started.elapsed(), "initdb done");
            Ok(())
        }
        // Another process initialised the same dir at the same time; its
        // server will hold the lock and ours will say so.
        Err(_) if pgdata.join("PG_VERSION").is_file() => {
            remove_dir_if_exists(&tmp);
            Ok(())
        }
        Err(e) => {
            remove_dir_if_exists(&tmp);
            Err(EmbeddedError::io(
                "move the new cluster into place at",
                pgdata,
                e,
            ))
        }
    }
}

/// Removes `pgdata.init-*` dirs left by an initdb that was killed (its owner
/// died or its start was cancelled). Young ones may belong to an initdb that
/// another process runs right now, so only those older than twice the initdb
/// timeout go.
fn remove_abandoned_initdb_dirs(dir: &Path) {
    let prefix = format!("{PGDATA_DIR}.init-");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let abandoned = entry.file_name().to_string_lossy().starts_with(&prefix)
            && entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age > 2 * INITDB_TIMEOUT)
            });
        if abandoned {
            tracing::warn!(dir = %entry.path().display(), "removing the remains of an interrupted initdb");
            remove_dir_if_exists(&entry.path());
        }
    }
}

/// The major version in `pgdata/PG_VERSION`, or `None` for a new cluster.
/// An empty leftover `pgdata` is removed; a non-empty one without
/// `PG_VERSION` is refused.
pub(super) fn cluster_version(pgdata: &Path) -> Result<Option<String>, EmbeddedError> {
    let version_file = pgdata.join("PG_VERSION");
    match fs::read_to_string(&version_file) {
        Ok(v) => return Ok(Some(v.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(EmbeddedError::io("read", &version_file, e)),
    }
    match fs::remove_dir(pgdata) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(_) => Err(EmbeddedError::NotACluster {
            dir: pgdata.to_path_buf(),
        }),
    }
}

/// Major version of a `postgres` binary, from `postgres --version`
/// ("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)" gives "15").
async fn binary_version(postgres: &Path) -> Result<String, EmbeddedError> {
    let mut cmd = Command::new(postgres);
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(HELPER_TIMEOUT, cmd.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(EmbeddedError::io("run", postgres, e)),
        Err(_) => {
            return Err(EmbeddedError::io(
                "run",
                postgres,
                io::ErrorKind::TimedOut.into(),
            ));
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    parse_major_version(&text).ok_or_else(|| {
        EmbeddedError::io(
            "understand the version printed by",
            postgres,
            io::Error::new(io::ErrorKind::InvalidData, text.trim().to_owned()),
        )
    })
}

fn parse_major_version(text: &str) -> Option<String> {
    let version = text
        .split("(PostgreSQL)")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    if major >= 10 {
        Some(major.to_string())
    } else {
        // 9.6 and older: the first two numbers are the major version.
        let minor: u32 = parts.next()?.parse().ok()?;
        Some(format!("{major}.{minor}"))
    }
}

/// Handles a `postmaster.pid` left by a server that is gone.
///
/// PostgreSQL itself ignores a lock file whose pid is dead and refuses one
/// whose pid is alive. After a reboot or in a container the pid is often
/// alive but reused by an unrelated process, which would block the start
/// forever: such a file is removed. A live postgres in this data dir gives
/// [`EmbeddedError::AlreadyRunning`].
fn clear_stale_pidfile(pgdata: &Path, dir: &Path) -> Result<(), EmbeddedError> {
    let pidfile = pgdata.join("postmaster.pid");
    let contents = match fs::read_to_string(&pidfile) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(EmbeddedError::io("read", &pidfile, e)),
    };
    let pid = contents
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i64>().ok())
        .map(i64::unsigned_abs);
    let stale = match pid {
        // Empty or garbled: a crash while writing it, unless a server is
        // writing it right now.
        None => fs::metadata(&pidfile)
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age > Duration::from_secs(10))
            }),
        Some(pid) => {
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            if !proc_dir.exists() {
                // Dead: PostgreSQL takes over the lock itself.
                return Ok(());
            }
            let comm = fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
            if matches!(comm.trim(), "postgres" | "postmaster") {
                // A postmaster's working dir is its data dir.
                match fs::read_link(proc_dir.join("cwd")) {
                    Ok(cwd) if cwd != pgdata => true,
                    _ => {
                        return Err(EmbeddedError::AlreadyRunning {
                            dir: dir.to_path_buf(),
                            pid: pid.to_string(),
                        });
                    }
                }
            } else {
                true
            }
        }
    };
    if stale {
        tracing::warn!(pidfile = %pidfile.display(), ?pid, "removing stale postmaster.pid");
        match fs::remove_file(&pidfile) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(EmbeddedError::io("remove stale", &pidfile, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_versions() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n")
                .as_deref(),
            Some("15")
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 17beta1\n").as_deref(),
            Some("17")
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 9.6.24\n").as_deref(),
            Some("9.6")
        );
        assert_eq!(parse_major_version("nonsense"), None);
    }
}
