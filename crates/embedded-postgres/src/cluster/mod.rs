//! The cluster: the [`EmbeddedPostgres`] handle and its life. Starting one
//! (data dir prepared by `filesystem`, watchdog spawned, then initdb or the
//! checks of an existing cluster, then the server), its connection URL, and
//! stopping it. The submodules own finding the binaries (`bins`), the cluster
//! on disk (`pgdata`: initdb, versions, stale lock files), the server's
//! command line and readiness (`server`), its log (`log`) and the URL (`url`).

mod bins;
mod log;
mod pgdata;
mod server;
mod url;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::EmbeddedError;
use crate::filesystem::{
    self, absolute, canonicalize, check_existing, create_dirs, create_unique_dir, prepare_dirs,
    remove_dir_if_exists,
};
use crate::host_user::RunAs;
use crate::options::EmbeddedOptions;
use crate::watchdog::{self, Watchdog};
use crate::{LOG_FILE, PGDATA_DIR, SOCKET_FILE};

/// `sizeof(sun_path) - 1` on Linux.
const MAX_SOCKET_PATH: usize = 107;

/// A running private PostgreSQL cluster; see the crate docs.
///
/// Dropping it without [`stop`](Self::stop) still shuts the cluster down (and
/// deletes an ephemeral one), in the background.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    log_file: PathBuf,
    ephemeral: bool,
    postmaster_pid: u32,
    stop_timeout: Duration,
    watchdog: Option<Watchdog>,
}

impl EmbeddedPostgres {
    /// Starts (initialising if the dir is new) a cluster whose data lives in
    /// `data_dir`; listens only on a Unix socket inside `data_dir` (no TCP
    /// port, so it never clashes with a system PostgreSQL on 5432). Waits until
    /// it accepts connections (at most 30 s).
    ///
    /// `data_dir` is created if missing (mode 0700); it must be new, empty, or
    /// one used before by this crate, and an existing one must not be a
    /// symlink, hold symlinks, be owned by another user than this process's or
    /// the server's, or be writable by group or others. Data is kept (normal fsync). When running as
    /// root, pass a dir under `/tmp` or `/var/tmp`, not under `/root` (see the
    /// crate docs). A second process starting the same dir gets
    /// [`EmbeddedError::AlreadyRunning`].
    ///
    /// # Errors
    ///
    /// No server binaries, an unusable data dir, initdb or server failure
    /// (the error carries the last lines of `postgres.log`), or no readiness
    /// within the timeout; see [`EmbeddedError`]. Nothing is left running.
    pub async fn start(data_dir: &Path) -> Result<Self, EmbeddedError> {
        Self::start_with(data_dir, &EmbeddedOptions::default()).await
    }

    /// [`start`](Self::start) with options.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    pub async fn start_with(
        data_dir: &Path,
        options: &EmbeddedOptions,
    ) -> Result<Self, EmbeddedError> {
        let run_as = RunAs::detect()?;
        let abs = absolute(data_dir)?;
        let created = create_dirs(&abs)?;
        // A dir we did not just create (0700) is checked as given, before any link in it
        // is resolved.
        if created.last().is_none_or(|last| *last != abs) {
            check_existing(&run_as, &abs)?;
        }
        let dir = canonicalize(&abs)?;
        prepare_dirs(&run_as, &created, &dir)?;
        launch(dir, false, &run_as, options).await
    }

    /// Starts a throw-away cluster in a fresh dir `rowcast-pg-<random>` under
    /// `parent` (created if missing): initdb `--no-sync`, server with
    /// `fsync=off`, `synchronous_commit=off`, `full_page_writes=off`. The whole
    /// dir is removed when the cluster is stopped or dropped, or when this
    /// process dies. When running as root, `parent` must be traversable by the
    /// `postgres` user (e.g. under `/tmp`, not `/root`).
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start); the new dir is removed again.
    pub async fn start_ephemeral(parent: &Path) -> Result<Self, EmbeddedError> {
        Self::start_ephemeral_with(parent, &EmbeddedOptions::default()).await
    }

    /// [`start_ephemeral`](Self::start_ephemeral) with options.
    ///
    /// # Errors
    ///
    /// As for [`start_ephemeral`](Self::start_ephemeral).
    pub async fn start_ephemeral_with(
        parent: &Path,
        options: &EmbeddedOptions,
    ) -> Result<Self, EmbeddedError> {
        let run_as = RunAs::detect()?;
        let abs_parent = absolute(parent)?;
        let mut created = create_dirs(&abs_parent)?;
        let parent = canonicalize(&abs_parent)?;
        let dir = create_unique_dir(&parent)?;
        created.push(dir.clone());
        let prepared = prepare_dirs(&run_as, &created, &dir);
        let result = match prepared {
            Ok(()) => launch(dir.clone(), true, &run_as, options).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            // The watchdog removes the dir once it was spawned; this covers the
            // errors before that.
            remove_dir_if_exists(&dir);
        }
        result
    }

    /// A connection URL for database `dbname`, as the superuser `postgres`,
    /// over the Unix socket (trust auth):
    ///
    /// `postgres:///DB?host=/abs/data/dir&port=5432&user=postgres&sslmode=disable`
    ///
    /// It parses in sqlx 0.8 (`PgConnectOptions::from_str`), tokio-postgres 0.7
    /// (`Config::from_str`) and libpq/psql. The host is in the query rather
    /// than the authority so that no client ever tries TCP: tokio-postgres
    /// would try `localhost:5432` first for `postgres://postgres@localhost/DB?host=/dir`.
    /// The port is explicit because sqlx would otherwise take `PGPORT` from
    /// the environment. Non-ASCII and reserved bytes are percent-encoded.
    pub fn url(&self, dbname: &str) -> String {
        url::url_for(&self.data_dir, dbname)
    }

    /// The data dir (absolute, symlinks resolved); also the socket dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (`<data_dir>/postgres.log`).
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The postmaster's process id.
    pub fn postmaster_pid(&self) -> u32 {
        self.postmaster_pid
    }

    /// Whether this cluster is deleted when stopped.
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// Fast shutdown (the watchdog sends SIGINT to the postmaster, then SIGQUIT
    /// after 60 s, or 10 s for an ephemeral cluster), and waits for it to exit
    /// (bounded); an ephemeral cluster's dir is gone when this returns `Ok`.
    ///
    /// # Errors
    ///
    /// [`EmbeddedError::StopTimeout`] if the server has not exited within the
    /// grace period plus 15 s (the watchdog keeps at it);
    /// [`EmbeddedError::ExitedWithError`] if the server had died (crashed or
    /// was killed) before it was stopped.
    pub async fn stop(mut self) -> Result<(), EmbeddedError> {
        let Some(watchdog) = self.watchdog.take() else {
            return Ok(());
        };
        let status = watchdog.finish(self.stop_timeout).await;
        let Some(status) = status else {
            return Err(EmbeddedError::StopTimeout {
                dir: self.data_dir.clone(),
                waited: self.stop_timeout,
            });
        };
        if self.ephemeral {
            match fs::remove_dir_all(&self.data_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(EmbeddedError::io(
                        "remove ephemeral data dir",
                        &self.data_dir,
                        e,
                    ));
                }
            }
        }
        match status {
            Ok(status) if status.success() => {
                tracing::info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL stopped");
                Ok(())
            }
            Ok(status) => Err(EmbeddedError::ExitedWithError {
                dir: self.data_dir.clone(),
                status: status.to_string(),
                log: self.log_file.clone(),
            }),
            Err(e) => Err(EmbeddedError::io(
                "wait for the PostgreSQL watchdog of",
                &self.data_dir,
                e,
            )),
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            // Closing the pipe makes the watchdog shut the server down (and
            // delete an ephemeral dir); it runs on without us. Tokio reaps the
            // child in the background.
            watchdog.detach();
            tracing::debug!(
                data_dir = %self.data_dir.display(),
                "embedded PostgreSQL dropped without stop(); shutting it down in the background"
            );
        }
    }
}

/// Everything after the data dir exists: spawn the watchdog, initdb if
/// needed, start the server and wait for it.
async fn launch(
    dir: PathBuf,
    ephemeral: bool,
    run_as: &RunAs,
    options: &EmbeddedOptions,
) -> Result<EmbeddedPostgres, EmbeddedError> {
    let socket_len = dir.as_os_str().len() + 1 + SOCKET_FILE.len();
    if socket_len > MAX_SOCKET_PATH {
        return Err(EmbeddedError::PathTooLong {
            dir,
            len: socket_len,
            max: MAX_SOCKET_PATH,
        });
    }
    if run_as.is_other_user() {
        filesystem::check_accessible(run_as, &dir).await?;
    }
    let pgdata = dir.join(PGDATA_DIR);
    let log_file = dir.join(LOG_FILE);
    let (log, log_reader, log_offset) = log::open_log(&dir, &log_file)?;
    let grace = watchdog::grace_secs(ephemeral);
    let stop_timeout = Duration::from_secs(grace + 15);

    // Find the binaries before spawning the watchdog, so that the common
    // "not installed" error needs no cleanup.
    let existing_version = pgdata::cluster_version(&pgdata)?;
    let bins = bins::locate_bins(options.bin_dir.as_deref(), existing_version.as_deref())?;

    let server_args = server::server_args(&pgdata, &dir, ephemeral, options);
    let mut watchdog = watchdog::spawn(
        run_as,
        &bins.postgres,
        grace,
        &server_args,
        ephemeral.then_some(&dir),
        log,
    )?;
    let ctx = StartContext {
        dir,
        pgdata,
        log_file,
        log_reader,
        log_offset,
        ephemeral,
    };

    let prepared = pgdata::prepare_cluster(&ctx, run_as, &bins, existing_version.as_deref()).await;
    if let Err(e) = prepared {
        abort(watchdog, stop_timeout).await;
        return Err(e);
    }
    match server::start_server(&mut watchdog, &ctx, options).await {
        Ok(pid) => {
            tracing::info!(data_dir = %ctx.dir.display(), pid, ephemeral, "embedded PostgreSQL ready");
            Ok(EmbeddedPostgres {
                data_dir: ctx.dir,
                log_file: ctx.log_file,
                ephemeral,
                postmaster_pid: pid,
                stop_timeout,
                watchdog: Some(watchdog),
            })
        }
        Err(e) => {
            abort(watchdog, stop_timeout).await;
            Err(e)
        }
    }
}

/// What the steps of a start share.
#[derive(Debug)]
struct StartContext {
    dir: PathBuf,
    pgdata: PathBuf,
    log_file: PathBuf,
    /// Read handle on the log: it stays readable after the watchdog has
    /// deleted a failed ephemeral cluster's dir.
    log_reader: File,
    log_offset: u64,
    ephemeral: bool,
}

/// Stops a watchdog whose server never became ready.
async fn abort(watchdog: Watchdog, limit: Duration) {
    if watchdog.finish(limit).await.is_none() {
        tracing::warn!("embedded PostgreSQL watchdog did not exit after a failed start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_and_start_future_are_send_and_sync() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let fut = EmbeddedPostgres::start(Path::new("/nonexistent"));
        send(&fut);
        let fut = EmbeddedPostgres::start_ephemeral(Path::new("/nonexistent"));
        send(&fut);
        let _ = send_sync::<EmbeddedPostgres>;
    }
}
