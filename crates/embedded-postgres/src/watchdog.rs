//! The watchdog: the `/bin/sh` processes that run `postgres` in the foreground
//! and stop it when the owning process goes away (see "Why a watchdog" in the
//! crate docs). It owns the two shell scripts, the pipe whose closing is the
//! stop signal, and the grace periods between SIGINT and SIGQUIT.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, ChildStdout, Command};

use crate::HELPER_TIMEOUT;
use crate::error::EmbeddedError;
use crate::host_user::RunAs;

/// Seconds between SIGINT and SIGQUIT for a persistent cluster (crash
/// recovery after SIGQUIT costs time, so it gets a long fast shutdown).
const PERSISTENT_GRACE_SECS: u64 = 60;
/// Seconds between SIGINT and SIGQUIT for an ephemeral cluster.
const EPHEMERAL_GRACE_SECS: u64 = 10;

/// Seconds between SIGINT and SIGQUIT for this kind of cluster.
pub(crate) fn grace_secs(ephemeral: bool) -> u64 {
    if ephemeral {
        EPHEMERAL_GRACE_SECS
    } else {
        PERSISTENT_GRACE_SECS
    }
}

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

/// The watchdog child and the write end of its stdin pipe.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
    pipe: Option<File>,
}

impl Watchdog {
    /// Tells the inner script to start the server.
    pub(crate) fn send_start(&mut self) -> io::Result<()> {
        match self.pipe.as_mut() {
            Some(pipe) => pipe.write_all(b"start\n"),
            None => Ok(()),
        }
    }

    /// The watchdog's stdout, where the inner script prints the postmaster's
    /// pid once it has forked it (once only).
    pub(crate) fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The watchdog's exit status if it has exited.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits briefly for the watchdog to exit and describes its status.
    pub(crate) async fn exit_status_now(&mut self) -> String {
        match tokio::time::timeout(HELPER_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("watchdog status unknown: {e}"),
            Err(_) => "watchdog did not report the server's pid".to_owned(),
        }
    }

    /// Closes the pipe and lets the watchdog shut the server down on its own
    /// (tokio reaps the child in the background).
    pub(crate) fn detach(&mut self) {
        drop(self.pipe.take());
    }

    /// Closes the pipe and waits at most `limit` for the watchdog to exit.
    /// `None` on timeout.
    pub(crate) async fn finish(mut self, limit: Duration) -> Option<io::Result<ExitStatus>> {
        drop(self.pipe.take());
        tokio::time::timeout(limit, self.child.wait()).await.ok()
    }
}

/// Starts the watchdog: `/bin/sh` running [`OUTER_SCRIPT`], which runs
/// [`INNER_SCRIPT`] as the user that runs PostgreSQL. The server itself starts
/// only when [`Watchdog::send_start`] is called.
pub(crate) fn spawn(
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
    cmd.args(run_as.runuser_prefix());
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
