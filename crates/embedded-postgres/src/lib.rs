//! A private PostgreSQL cluster owned by this process ("embedded default").
//!
//! When rowcast starts without `DATABASE_URL` it runs its own cluster so that a
//! single command gives a working server; the integration tests start one
//! throw-away cluster per test process the same way
//! ([`EmbeddedPostgres::start_ephemeral`]).
//!
//! # What this module owns
//!
//! A *data dir* (given by the caller, or created under a parent for ephemeral
//! clusters) laid out as:
//!
//! ```text
//! <data_dir>/            mode 0700; owned by `postgres` when rowcast runs as root
//!     pgdata/            the cluster (PGDATA), made by `initdb -U postgres --auth=trust -E UTF8`
//!     postgres.log       the server's stderr (postgres.log.old after 10 MiB)
//!     .s.PGSQL.5432      the Unix socket; the server listens on nothing else
//! ```
//!
//! The server never opens a TCP port (`listen_addresses=''`), so it cannot clash
//! with a system PostgreSQL on 5432. Authentication is `trust` over the socket,
//! which is why the data dir is mode 0700: only its owner (and root) can reach
//! the socket.
//!
//! # Root
//!
//! PostgreSQL refuses to run as root. When the effective uid is 0, `initdb` and
//! `postgres` run as Debian's `postgres` user through `runuser -u postgres`, and
//! the data dir is chowned to that user. Every parent of the data dir must then
//! be traversable by `postgres`: a dir under `/root` is not, so pass one under
//! `/tmp` or `/var/tmp` (or another world-traversable place).
//!
//! # Why a watchdog
//!
//! The cluster must not outlive its owner, even when the owner dies without
//! running destructors (SIGKILL, `panic = "abort"`, a test harness exiting with
//! the cluster in a `static`, which Rust never drops). So `postgres` does not run
//! as a daemon: it runs in the foreground under a small `/bin/sh` watchdog whose
//! stdin is a pipe whose only write end this process holds. When this process
//! ends, however it ends, the kernel closes that pipe; the watchdog's `read`
//! sees end-of-file, sends SIGINT (fast shutdown) to `postgres`, escalates to
//! SIGQUIT (immediate shutdown) after a grace period, waits for it, and, for an
//! ephemeral cluster, deletes the whole data dir. If `postgres` dies on its own,
//! the watchdog exits too. [`EmbeddedPostgres::stop`] uses the same path: it
//! closes the pipe and waits for the watchdog to exit. The watchdog runs in its
//! own process group so that a Ctrl-C in a terminal reaches rowcast (which then
//! shuts down gracefully and stops the cluster) but not the server directly.
//!
//! The watchdog is started before `initdb` runs, so an ephemeral dir is removed
//! even if the owner is killed while the cluster is being created.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// Name of the cluster's superuser role.
const SUPERUSER: &str = "postgres";
/// OS user that runs the server when this process runs as root.
const OS_USER: &str = "postgres";
/// Port number; with no TCP listener it only names the socket file.
const PORT: u16 = 5432;
const PGDATA_DIR: &str = "pgdata";
const LOG_FILE: &str = "postgres.log";
const OLD_LOG_FILE: &str = "postgres.log.old";
const LOG_ROTATE_BYTES: u64 = 10 * 1024 * 1024;
/// Socket file name PostgreSQL creates for [`PORT`].
const SOCKET_FILE: &str = ".s.PGSQL.5432";
/// `sizeof(sun_path) - 1` on Linux.
const MAX_SOCKET_PATH: usize = 107;
const EPHEMERAL_PREFIX: &str = "rowcast-pg-";
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds between SIGINT and SIGQUIT in the watchdog.
const PERSISTENT_GRACE_SECS: u64 = 60;
const EPHEMERAL_GRACE_SECS: u64 = 10;
const LOG_TAIL_LINES: usize = 20;
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Outer watchdog script; runs as the current user (root or not).
///
/// `$1` is a dir to delete when everything has exited ("" for none), the rest
/// is the inner watchdog command (possibly prefixed by `runuser`). Its stdin,
/// the owner's pipe, is inherited by the inner script. The removal is retried
/// because an `initdb` orphaned by the owner's death may still be writing
/// into the dir for a moment.
const OUTER_SCRIPT: &str = r#"rmdir=$1
shift
"$@"
st=$?
if [ -n "$rmdir" ]; then
  n=0
  while [ -e "$rmdir" ] && [ "$n" -lt 10 ]; do
    rm -rf -- "$rmdir" 2>/dev/null && break
    n=$((n + 1))
    sleep 1
  done
fi
exit "$st"
"#;

/// Inner watchdog script; runs as the user that runs PostgreSQL.
///
/// `$1` is the postgres binary, `$2` the grace period in seconds, the rest the
/// server's arguments. It waits for the line `start` on stdin (the owner sends
/// it once the cluster exists), starts the server with stdout and stderr going
/// to the log, prints the server's pid, and then watches both the pipe and the
/// server.
const INNER_SCRIPT: &str = r#"pg=$1
grace=$2
shift 2
exec 3<&0 </dev/null
IFS= read -r go <&3 || exit 0
[ "$go" = start ] || exit 0
"$pg" "$@" </dev/null >&2 3<&- &
pid=$!
echo "$pid"
exec >&2
(
  while IFS= read -r line <&3; do :; done
  kill -INT "$pid" 2>/dev/null || exit 0
  n=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$n" -ge "$grace" ]; then
      echo "rowcast watchdog: postgres did not stop within ${grace}s of SIGINT, sending SIGQUIT" >&2
      kill -QUIT "$pid" 2>/dev/null
      exit 0
    fi
    n=$((n + 1))
    sleep 1
  done
) &
watcher=$!
exec 3<&-
wait "$pid"
st=$?
kill "$watcher" 2>/dev/null
exit "$st"
"#;

/// Errors from starting or stopping the embedded cluster.
///
/// Every message is one line that says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// No PostgreSQL server installation was found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found; install them with `apt-get install postgresql`"
    )]
    BinariesNotFound,
    /// The caller named a bin dir that lacks the server binaries.
    #[error("PostgreSQL server binaries (initdb, postgres) not found in the given bin dir {}", .dir.display())]
    BinDirInvalid {
        /// The dir that was given.
        dir: PathBuf,
    },
    /// Running as root but there is no `postgres` OS user to run the server as.
    #[error(
        "rowcast runs as root, so PostgreSQL must run as the `postgres` system user, but {reason}; install the server with `apt-get install postgresql` (it creates that user) or run rowcast as a non-root user"
    )]
    NoPostgresUser {
        /// Why the user could not be used.
        reason: String,
    },
    /// Running as root but `runuser` is missing.
    #[error(
        "rowcast runs as root and needs `runuser` (util-linux) to start PostgreSQL as the `postgres` user, but it was not found; install it with `apt-get install util-linux`"
    )]
    RunuserNotFound,
    /// Running as root and the `postgres` user cannot reach the data dir.
    #[error(
        "data dir {} is not reachable by the `postgres` user that PostgreSQL runs as when rowcast runs as root (every parent dir must be traversable by it, and dirs under /root are not); use a dir under /tmp or /var/tmp",
        .dir.display()
    )]
    NotAccessible {
        /// The data dir.
        dir: PathBuf,
    },
    /// The data dir holds files that are not ours.
    #[error(
        "data dir {} already holds other files (such as {entry:?}); the embedded PostgreSQL needs a dir of its own: a new one, an empty one, or one it used before",
        .dir.display()
    )]
    DirNotDedicated {
        /// The data dir.
        dir: PathBuf,
        /// One entry that is not ours.
        entry: String,
    },
    /// `pgdata` exists but is not a PostgreSQL cluster.
    #[error(
        "{} exists but is not a PostgreSQL data directory (it has no PG_VERSION); move it away so that a new cluster can be created",
        .dir.display()
    )]
    NotACluster {
        /// The `pgdata` dir.
        dir: PathBuf,
    },
    /// The socket path inside the data dir would be too long for `sun_path`.
    #[error(
        "data dir {} is too long for the PostgreSQL Unix socket inside it ({len} bytes with the socket name; at most {max}); use a shorter path",
        .dir.display()
    )]
    PathTooLong {
        /// The data dir.
        dir: PathBuf,
        /// Length of the socket path.
        len: usize,
        /// Longest allowed socket path.
        max: usize,
    },
    /// A file system or process operation failed.
    #[error("could not {action} {}: {error}", .path.display())]
    Io {
        /// What was being done, e.g. "create dir".
        action: &'static str,
        /// The file or program involved.
        path: PathBuf,
        /// The OS error.
        error: io::Error,
    },
    /// `initdb` failed.
    #[error("initdb failed to create a cluster in {} ({status}): {output}", .dir.display())]
    InitdbFailed {
        /// Where the cluster was being created.
        dir: PathBuf,
        /// Exit status, or "timed out".
        status: String,
        /// The last lines of initdb's output.
        output: String,
    },
    /// The existing cluster was made by another major version.
    #[error(
        "data dir {} holds a PostgreSQL {data_version} cluster but the server binaries in {} are PostgreSQL {bin_version}; install PostgreSQL {data_version} (or pass its bin dir) or use another data dir",
        .dir.display(),
        .bin_dir.display()
    )]
    VersionMismatch {
        /// The data dir.
        dir: PathBuf,
        /// Major version in `pgdata/PG_VERSION`.
        data_version: String,
        /// The bin dir that was chosen.
        bin_dir: PathBuf,
        /// Major version of those binaries.
        bin_version: String,
    },
    /// Another server (probably another rowcast) is using the data dir.
    #[error(
        "data dir {} is already in use by another running PostgreSQL server (postmaster pid {pid}), most likely another rowcast process using the same data dir; stop that process or use another data dir",
        .dir.display()
    )]
    AlreadyRunning {
        /// The data dir.
        dir: PathBuf,
        /// The other postmaster's pid, as recorded in `postmaster.pid`.
        pid: String,
    },
    /// The server exited while starting.
    #[error("embedded PostgreSQL failed to start ({status}); last lines of {}: {tail}", .log.display())]
    StartFailed {
        /// How the watchdog exited.
        status: String,
        /// The server log.
        log: PathBuf,
        /// The last lines of the log from this start.
        tail: String,
    },
    /// The server did not accept connections in time.
    #[error(
        "embedded PostgreSQL did not accept connections within {} s ({last_error}); last lines of {}: {tail}",
        .waited.as_secs(),
        .log.display()
    )]
    StartTimeout {
        /// How long we waited.
        waited: Duration,
        /// The last connection error.
        last_error: String,
        /// The server log.
        log: PathBuf,
        /// The last lines of the log from this start.
        tail: String,
    },
    /// The server did not stop in time.
    #[error(
        "embedded PostgreSQL (data dir {}) did not shut down within {} s; its watchdog keeps trying",
        .dir.display(),
        .waited.as_secs()
    )]
    StopTimeout {
        /// The data dir.
        dir: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The server had exited with an error by the time it was stopped.
    #[error("embedded PostgreSQL (data dir {}) exited with {status}; see {}", .dir.display(), .log.display())]
    ExitedWithError {
        /// The data dir.
        dir: PathBuf,
        /// How the watchdog exited.
        status: String,
        /// The server log.
        log: PathBuf,
    },
}

impl EmbeddedError {
    fn io(action: &'static str, path: &Path, error: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Optional settings for [`EmbeddedPostgres::start_with`] and
/// [`EmbeddedPostgres::start_ephemeral_with`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    bin_dir: Option<PathBuf>,
    start_timeout: Duration,
    settings: Vec<(String, String)>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            bin_dir: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            settings: Vec::new(),
        }
    }
}

impl EmbeddedOptions {
    /// The defaults: binaries found automatically, 30 s start timeout.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Use the `initdb` and `postgres` in `dir` instead of searching
    /// (the newest `/usr/lib/postgresql/*/bin`, then `PATH`).
    #[must_use]
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// How long to wait for the server to accept connections (default 30 s;
    /// crash recovery of a large persistent cluster may need more).
    #[must_use]
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// An extra server setting, passed as `-c name=value` (after ours, so it
    /// wins).
    #[must_use]
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }
}

/// A running private PostgreSQL cluster; see the module docs.
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
    /// `data_dir` is created if missing; it must be new, empty, or one used
    /// before by this module. Data is kept (normal fsync). When running as
    /// root, pass a dir under `/tmp` or `/var/tmp`, not under `/root` (see the
    /// module docs). A second process starting the same dir gets
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
        let dir = canonicalize(&abs)?;
        if created.last().is_none_or(|last| *last != abs) {
            check_dedicated(&dir)?;
        }
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
        url_for(&self.data_dir, dbname)
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
            drop(watchdog.pipe.take());
            tracing::debug!(
                data_dir = %self.data_dir.display(),
                "embedded PostgreSQL dropped without stop(); shutting it down in the background"
            );
        }
    }
}

/// The watchdog child and the write end of its stdin pipe.
#[derive(Debug)]
struct Watchdog {
    child: Child,
    pipe: Option<File>,
}

impl Watchdog {
    /// Closes the pipe and waits at most `limit` for the watchdog to exit.
    /// `None` on timeout.
    async fn finish(mut self, limit: Duration) -> Option<io::Result<ExitStatus>> {
        drop(self.pipe.take());
        tokio::time::timeout(limit, self.child.wait()).await.ok()
    }
}

/// Who runs `initdb` and `postgres`.
#[derive(Debug, Clone)]
enum RunAs {
    /// This process's own user (not root).
    CurrentUser,
    /// The `postgres` user, via `runuser`, because we are root.
    Postgres {
        uid: u32,
        gid: u32,
        runuser: PathBuf,
    },
}

impl RunAs {
    fn detect() -> Result<Self, EmbeddedError> {
        if effective_uid()? != 0 {
            return Ok(Self::CurrentUser);
        }
        let (uid, gid) = lookup_os_user(OS_USER)?;
        let runuser = find_runuser().ok_or(EmbeddedError::RunuserNotFound)?;
        Ok(Self::Postgres { uid, gid, runuser })
    }

    /// A command that runs `program` as the right user, with a neutral
    /// working dir and locale.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = match self {
            Self::CurrentUser => Command::new(program),
            Self::Postgres { runuser, .. } => {
                let mut cmd = Command::new(runuser);
                cmd.arg("-u").arg(OS_USER).arg("--").arg(program);
                cmd
            }
        };
        cmd.current_dir("/").env("LC_ALL", "C").stdin(Stdio::null());
        cmd
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
    if matches!(run_as, RunAs::Postgres { .. }) {
        check_accessible(run_as, &dir).await?;
    }
    let pgdata = dir.join(PGDATA_DIR);
    let log_file = dir.join(LOG_FILE);
    let (log, log_reader, log_offset) = open_log(&dir, &log_file)?;
    let grace = if ephemeral {
        EPHEMERAL_GRACE_SECS
    } else {
        PERSISTENT_GRACE_SECS
    };
    let stop_timeout = Duration::from_secs(grace + 15);

    // Find the binaries before spawning the watchdog, so that the common
    // "not installed" error needs no cleanup.
    let existing_version = cluster_version(&pgdata)?;
    let bins = locate_bins(options.bin_dir.as_deref(), existing_version.as_deref())?;

    let server_args = server_args(&pgdata, &dir, ephemeral, options);
    let mut watchdog = spawn_watchdog(
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

    let prepared = prepare_cluster(&ctx, run_as, &bins, existing_version.as_deref()).await;
    if let Err(e) = prepared {
        abort(watchdog, stop_timeout).await;
        return Err(e);
    }
    match start_server(&mut watchdog, &ctx, options).await {
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

/// initdb for a new cluster; version and stale-lock checks for an old one.
async fn prepare_cluster(
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

/// Tells the watchdog to start the server, then waits until the server is
/// ours and accepts connections. Returns the postmaster pid.
async fn start_server(
    watchdog: &mut Watchdog,
    ctx: &StartContext,
    options: &EmbeddedOptions,
) -> Result<u32, EmbeddedError> {
    let started = Instant::now();
    let stdout = watchdog.child.stdout.take();
    if let Some(pipe) = watchdog.pipe.as_mut() {
        pipe.write_all(b"start\n")
            .map_err(|e| EmbeddedError::io("signal the PostgreSQL watchdog for", &ctx.dir, e))?;
    }
    let failed = |status: String, ctx: &StartContext| {
        let tail = log_tail(&ctx.log_reader, ctx.log_offset);
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
        let status = exit_status_now(&mut watchdog.child).await;
        return Err(failed(status, ctx));
    };

    let url = url_for(&ctx.dir, "postgres");
    let pidfile = ctx.pgdata.join("postmaster.pid");
    let mut last_error = String::from("server not started yet");
    loop {
        match watchdog.child.try_wait() {
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
            let tail = log_tail(&ctx.log_reader, ctx.log_offset);
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

/// Waits briefly for the watchdog to exit and describes its status.
async fn exit_status_now(child: &mut Child) -> String {
    match tokio::time::timeout(HELPER_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        Ok(Err(e)) => format!("watchdog status unknown: {e}"),
        Err(_) => "watchdog did not report the server's pid".to_owned(),
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
fn server_args(
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

fn spawn_watchdog(
    run_as: &RunAs,
    postgres: &Path,
    grace: u64,
    server_args: &[OsString],
    remove_dir: Option<&PathBuf>,
    log: File,
) -> Result<Watchdog, EmbeddedError> {
    let sh = Path::new("/bin/sh");
    let mut cmd = Command::new(sh);
    cmd.arg("-c").arg(OUTER_SCRIPT).arg("rowcast-pg-watchdog");
    cmd.arg(remove_dir.map_or_else(OsString::new, |d| d.as_os_str().to_owned()));
    if let RunAs::Postgres { runuser, .. } = run_as {
        cmd.arg(runuser).arg("-u").arg(OS_USER).arg("--");
    }
    cmd.arg(sh)
        .arg("-c")
        .arg(INNER_SCRIPT)
        .arg("rowcast-pg-inner");
    cmd.arg(postgres).arg(grace.to_string()).args(server_args);
    cmd.current_dir("/")
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        // Own process group: a terminal's Ctrl-C goes to rowcast, which then
        // stops the cluster, instead of killing the server underneath it.
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd
        .spawn()
        .map_err(|e| EmbeddedError::io("start the PostgreSQL watchdog", sh, e))?;
    let pipe = match child.stdin.take() {
        Some(stdin) => {
            let fd = stdin
                .into_owned_fd()
                .map_err(|e| EmbeddedError::io("take the watchdog pipe of", sh, e))?;
            Some(File::from(fd))
        }
        None => None,
    };
    Ok(Watchdog { child, pipe })
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
            output: last_lines(&text, LOG_TAIL_LINES),
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
fn cluster_version(pgdata: &Path) -> Result<Option<String>, EmbeddedError> {
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

#[derive(Debug, Clone)]
struct Bins {
    dir: PathBuf,
    initdb: PathBuf,
    postgres: PathBuf,
}

fn bins_in(dir: &Path) -> Option<Bins> {
    let initdb = dir.join("initdb");
    let postgres = dir.join("postgres");
    (initdb.is_file() && postgres.is_file()).then(|| Bins {
        dir: dir.to_path_buf(),
        initdb,
        postgres,
    })
}

/// The override if given; else the bin dir matching an existing cluster's
/// version; else the newest `/usr/lib/postgresql/*/bin`; else `PATH`.
fn locate_bins(
    override_dir: Option<&Path>,
    want_version: Option<&str>,
) -> Result<Bins, EmbeddedError> {
    if let Some(dir) = override_dir {
        return bins_in(dir).ok_or_else(|| EmbeddedError::BinDirInvalid {
            dir: dir.to_path_buf(),
        });
    }
    let root = Path::new("/usr/lib/postgresql");
    if let Some(bins) = want_version.and_then(|v| bins_in(&root.join(v).join("bin"))) {
        return Ok(bins);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let key: Option<Vec<u32>> = name.to_str()?.split('.').map(|p| p.parse().ok()).collect();
            Some((key?, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some(bins) = versions.iter().rev().find_map(|(_, dir)| bins_in(dir)) {
        return Ok(bins);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let initdb = dir.join("initdb");
        if !initdb.is_file() {
            continue;
        }
        // /usr/local/bin/initdb may be a symlink into the real bin dir.
        let real_dir = fs::canonicalize(&initdb)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        if let Some(bins) = real_dir
            .as_deref()
            .and_then(bins_in)
            .or_else(|| bins_in(&dir))
        {
            return Ok(bins);
        }
    }
    Err(EmbeddedError::BinariesNotFound)
}

fn find_runuser() -> Option<PathBuf> {
    let fixed = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    let path = std::env::var_os("PATH").unwrap_or_default();
    fixed
        .into_iter()
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("runuser"))
        .find(|p| p.is_file())
}

/// Effective uid from `/proc/self/status` (no `unsafe` libc call), falling
/// back to `id -u`.
fn effective_uid() -> Result<u32, EmbeddedError> {
    if let Some(uid) = fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(parse_effective_uid)
    {
        return Ok(uid);
    }
    let output = std::process::Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| EmbeddedError::io("run", Path::new("id"), e))?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            EmbeddedError::io(
                "find the effective uid with",
                Path::new("id -u"),
                io::Error::new(io::ErrorKind::InvalidData, "unexpected output"),
            )
        })
}

/// The second field of the `Uid:` line (real, effective, saved, fs).
fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// uid and gid of an OS user, from `/etc/passwd`.
fn lookup_os_user(name: &str) -> Result<(u32, u32), EmbeddedError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(|e| EmbeddedError::NoPostgresUser {
        reason: format!("/etc/passwd could not be read ({e})"),
    })?;
    parse_passwd(&passwd, name).ok_or_else(|| EmbeddedError::NoPostgresUser {
        reason: format!("there is no `{name}` user in /etc/passwd"),
    })
}

fn parse_passwd(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

/// Absolute and lexically normalised (`.` and `..` resolved), so that
/// [`create_dirs`] only ever touches dirs below the first existing ancestor.
fn absolute(path: &Path) -> Result<PathBuf, EmbeddedError> {
    let abs = std::path::absolute(path).map_err(|e| EmbeddedError::io("resolve", path, e))?;
    let mut normal = PathBuf::new();
    for component in abs.components() {
        match component {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    Ok(normal)
}

fn canonicalize(path: &Path) -> Result<PathBuf, EmbeddedError> {
    fs::canonicalize(path).map_err(|e| EmbeddedError::io("resolve", path, e))
}

/// Creates `path` and its missing parents; returns the dirs it created,
/// outermost first.
fn create_dirs(path: &Path) -> Result<Vec<PathBuf>, EmbeddedError> {
    let missing: Vec<&Path> = path.ancestors().take_while(|p| !p.exists()).collect();
    let mut created = Vec::new();
    for dir in missing.into_iter().rev() {
        match fs::create_dir(dir) {
            Ok(()) => created.push(dir.to_path_buf()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(EmbeddedError::io("create dir", dir, e)),
        }
    }
    Ok(created)
}

fn create_unique_dir(parent: &Path) -> Result<PathBuf, EmbeddedError> {
    let mut last_error = None;
    for _ in 0..16 {
        let dir = parent.join(format!("{EPHEMERAL_PREFIX}{:016x}", rand::random::<u64>()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(EmbeddedError::io("create dir in", parent, e)),
        }
    }
    Err(EmbeddedError::io(
        "create a uniquely named dir in",
        parent,
        last_error.unwrap_or_else(|| io::ErrorKind::AlreadyExists.into()),
    ))
}

/// Refuses a data dir that holds anything but what this module puts there,
/// so that a mistyped path (`/tmp`, `$HOME`) is never chowned or chmodded.
fn check_dedicated(dir: &Path) -> Result<(), EmbeddedError> {
    let entries = fs::read_dir(dir).map_err(|e| EmbeddedError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| EmbeddedError::io("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with(PGDATA_DIR)
            || name.starts_with(LOG_FILE)
            || name.starts_with(".s.PGSQL.")
            || name == "lost+found";
        if !ours {
            return Err(EmbeddedError::DirNotDedicated {
                dir: dir.to_path_buf(),
                entry: name.into_owned(),
            });
        }
    }
    Ok(())
}

/// Permissions: the data dir is 0700 (trust auth: whoever reaches the socket
/// is superuser) and, as root, owned by `postgres`; parents we created are
/// 0755 so that `postgres` can traverse them whatever the umask.
fn prepare_dirs(run_as: &RunAs, created: &[PathBuf], dir: &Path) -> Result<(), EmbeddedError> {
    if let RunAs::Postgres { .. } = run_as {
        for parent in created.iter().filter(|p| p.as_path() != dir) {
            set_mode(parent, 0o755)?;
        }
    }
    set_mode(dir, 0o700)?;
    if let RunAs::Postgres { uid, gid, .. } = run_as {
        std::os::unix::fs::chown(dir, Some(*uid), Some(*gid))
            .map_err(|e| EmbeddedError::io("give the postgres user the dir", dir, e))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), EmbeddedError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| EmbeddedError::io("set permissions of", path, e))
}

/// As root: checks that `postgres` can write the data dir (and so traverse
/// all its parents).
async fn check_accessible(run_as: &RunAs, dir: &Path) -> Result<(), EmbeddedError> {
    let mut cmd = run_as.command(Path::new("/bin/sh"));
    cmd.args([
        "-c",
        r#"test -d "$1" && test -w "$1" && test -x "$1""#,
        "rowcast-pg-check",
    ])
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    match tokio::time::timeout(HELPER_TIMEOUT, cmd.status()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(_)) => Err(EmbeddedError::NotAccessible {
            dir: dir.to_path_buf(),
        }),
        Ok(Err(e)) => Err(EmbeddedError::io("run runuser to check", dir, e)),
        Err(_) => Err(EmbeddedError::io(
            "run runuser to check",
            dir,
            io::ErrorKind::TimedOut.into(),
        )),
    }
}

/// Opens the log for appending (rotating a large one) and returns it with a
/// read handle and its current length, where this start's lines begin.
fn open_log(dir: &Path, log_file: &Path) -> Result<(File, File, u64), EmbeddedError> {
    if fs::metadata(log_file).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let old = dir.join(OLD_LOG_FILE);
        if let Err(e) = fs::rename(log_file, &old) {
            tracing::warn!(error = %e, log = %log_file.display(), "could not rotate the PostgreSQL log");
        }
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|e| EmbeddedError::io("open the PostgreSQL log", log_file, e))?;
    let reader = File::open(log_file)
        .map_err(|e| EmbeddedError::io("read the PostgreSQL log", log_file, e))?;
    let offset = file.metadata().map_or(0, |m| m.len());
    Ok((file, reader, offset))
}

/// The last lines written to the log since `offset`, joined into one line.
fn log_tail(mut file: &File, offset: u64) -> String {
    let mut read = || -> io::Result<String> {
        let len = file.metadata()?.len();
        let start = offset.max(len.saturating_sub(64 * 1024)).min(len);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "(the log is empty)".to_owned(),
        Ok(text) => last_lines(&text, LOG_TAIL_LINES),
        Err(e) => format!("(the log could not be read: {e})"),
    }
}

/// The last `n` non-empty lines of `text`, joined with " | ".
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn remove_dir_if_exists(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "could not remove dir"),
    }
}

fn url_for(dir: &Path, dbname: &str) -> String {
    format!(
        "postgres:///{}?host={}&port={PORT}&user={SUPERUSER}&sslmode=disable",
        percent_encode(dbname.as_bytes(), false),
        percent_encode(dir.as_os_str().as_bytes(), true),
    )
}

/// Percent-encodes all but unreserved bytes (and `/` when `keep_slash`).
/// Never emits `+`, which sqlx's query parser would read as a space.
fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t1000\t1000\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
        assert!(
            parse_effective_uid(&fs::read_to_string("/proc/self/status").unwrap_or_default())
                .is_some()
        );
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(parse_passwd(passwd, "postgres"), Some((101, 104)));
        assert_eq!(parse_passwd(passwd, "postgre"), None);
    }

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

    #[test]
    fn url_encodes_the_socket_dir_and_db_name() {
        let url = url_for(Path::new("/tmp/a b+c,d&e"), "my db/x");
        assert_eq!(
            url,
            "postgres:///my%20db%2Fx?host=/tmp/a%20b%2Bc%2Cd%26e&port=5432&user=postgres&sslmode=disable"
        );
    }

    #[test]
    fn url_parses_in_tokio_postgres_as_only_the_socket() {
        let url = url_for(Path::new("/tmp/a b+c"), "app");
        let config: tokio_postgres::Config = url.parse().expect("test: url parses");
        assert_eq!(
            config.get_hosts(),
            &[tokio_postgres::config::Host::Unix(PathBuf::from(
                "/tmp/a b+c"
            ))]
        );
        assert_eq!(config.get_ports(), &[5432]);
        assert_eq!(config.get_user(), Some("postgres"));
        assert_eq!(config.get_dbname(), Some("app"));
    }

    #[test]
    fn guc_list_quoting() {
        assert_eq!(
            quote_guc_list_item(Path::new("/tmp/a \"b\",c")),
            OsString::from("\"/tmp/a \"\"b\"\",c\"")
        );
    }

    #[test]
    fn last_lines_joins_into_one_line() {
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(last_lines("", 2), "");
    }

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

    #[test]
    fn paths_are_normalised_lexically() {
        assert_eq!(
            absolute(Path::new("/a/./b/../c/")).ok(),
            Some(PathBuf::from("/a/c"))
        );
        assert!(absolute(Path::new("rel")).is_ok_and(|p| p.is_absolute()));
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
