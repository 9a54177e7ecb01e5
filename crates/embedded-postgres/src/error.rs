//! [`EmbeddedError`]: everything that can go wrong starting or stopping a
//! cluster, each as one line that says what to do about it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// The data dir is a symbolic link.
    #[error(
        "data dir {} is a symbolic link; the embedded PostgreSQL does not follow one there (another local user could point it at any dir): pass the real path, or remove the link",
        .dir.display()
    )]
    DataDirIsSymlink {
        /// The data dir as given.
        dir: PathBuf,
    },
    /// Something in the data dir is a symbolic link.
    #[error(
        "{} is a symbolic link; the embedded PostgreSQL never writes or removes files through one (it could point at any file or cluster on the machine): remove the link (check who made it), or use a new data dir",
        .path.display()
    )]
    SymlinkInDataDir {
        /// The link.
        path: PathBuf,
    },
    /// The data dir, or something in it, belongs to a user that is not trusted with it.
    #[error(
        "{} is owned by uid {owner}, not by {expected}; another local user may have made it to take over the embedded PostgreSQL: remove it (after checking what is in it), or use a new data dir",
        .path.display()
    )]
    ForeignOwner {
        /// The data dir or the entry.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Who may own it, in words.
        expected: String,
    },
    /// The data dir is writable by users other than its owner.
    #[error(
        "data dir {} is writable by users other than its owner (mode {mode:04o}), so others may have put files in it: check what is in it, then `chmod 700` it, or use a new data dir",
        .dir.display()
    )]
    WritableByOthers {
        /// The data dir.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
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
    pub(crate) fn io(action: &'static str, path: &Path, error: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            error,
        }
    }
}
