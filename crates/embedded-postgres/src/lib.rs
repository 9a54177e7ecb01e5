//! A private PostgreSQL cluster owned by this process (rowcast's "embedded default").
//!
//! When rowcast starts without `DATABASE_URL` it runs its own cluster so that a
//! single command gives a working server; the integration tests start one
//! throw-away cluster per test process the same way
//! ([`EmbeddedPostgres::start_ephemeral`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), rowcast_embedded_postgres::EmbeddedError> {
//! use rowcast_embedded_postgres::EmbeddedPostgres;
//!
//! let cluster = EmbeddedPostgres::start(std::path::Path::new("/var/tmp/myapp-pg")).await?;
//! let url = cluster.url("postgres"); // hand it to sqlx, tokio-postgres or psql
//! # let _ = url;
//! cluster.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What this crate owns
//!
//! A *data dir* (given by the caller, or created under a parent for ephemeral
//! clusters) laid out as:
//!
//! ```text
//! <data_dir>/            mode 0700 from creation; owned by `postgres` when rowcast runs as root
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
//!
//! # Modules
//!
//! - `cluster`: the [`EmbeddedPostgres`] handle; finding the binaries, initdb,
//!   starting the server and waiting for it, the connection URL, stopping.
//! - `watchdog`: the `/bin/sh` processes that tie the server's life to ours.
//! - `host_user`: who runs PostgreSQL (ourselves, or `postgres` when we are root).
//! - `filesystem`: creating the data dir, its ownership and permissions, and the
//!   checks that keep us from touching a dir that is not ours, or one another
//!   local user prepared (symlinks, foreign owners, group or world write).
//! - `error` and `options`: the public [`EmbeddedError`] and [`EmbeddedOptions`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cluster;
mod error;
mod filesystem;
mod host_user;
mod options;
mod watchdog;

use std::time::Duration;

pub use cluster::EmbeddedPostgres;
pub use error::EmbeddedError;
pub use options::EmbeddedOptions;

/// Name of the cluster's superuser role.
const SUPERUSER: &str = "postgres";
/// Port number; with no TCP listener it only names the socket file.
const PORT: u16 = 5432;
/// The cluster inside the data dir (PGDATA).
const PGDATA_DIR: &str = "pgdata";
/// The server's stderr, inside the data dir.
const LOG_FILE: &str = "postgres.log";
/// Socket file name PostgreSQL creates for [`PORT`].
const SOCKET_FILE: &str = ".s.PGSQL.5432";
/// Limit for a helper program (`runuser` checks, `postgres --version`, the
/// watchdog reporting the postmaster pid).
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// Compiles the README's example as a doctest, so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
