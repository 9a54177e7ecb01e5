//! The `rowcast` binary as a child process, as an operator runs it: on free ports, waited for
//! until it serves, stopped with SIGTERM. For the tests that need a real process (signals, a
//! restart on the same port, a browser); everything else runs rowcast in-process (`TestApp`).

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How long a freshly started rowcast may take to serve (it may first start a cluster).
const START_LIMIT: Duration = Duration::from_secs(60);

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where a child's log goes: the test's own stderr when `TEST_LOG` is set, nowhere otherwise.
pub fn test_log() -> Stdio {
    if std::env::var_os("TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

/// The `rowcast` binary listening on `127.0.0.1:port`, killed when dropped. It does not inherit
/// `DATABASE_URL` (the caller sets one or lets it run its private cluster); its log goes to
/// [`test_log`] unless the caller redirects stderr.
pub fn rowcast(port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rowcast"));
    command
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(test_log())
        .kill_on_drop(true);
    command
}

/// Polls `url` with `http` until it answers 200; fails if `child` exits first or after 60 s.
pub async fn wait_until_serving(child: &mut Child, http: &reqwest::Client, url: &str) {
    let deadline = tokio::time::Instant::now() + START_LIMIT;
    loop {
        assert!(child.try_wait().unwrap().is_none(), "rowcast exited early");
        let up = http.get(url).send().await.is_ok_and(|r| r.status() == 200);
        if up {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rowcast not serving {url} within {START_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `signal` to `child`.
pub fn send_signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    kill(pid, signal).unwrap();
}

/// Sends SIGTERM and waits for the exit; fails if that takes longer than `limit`.
pub async fn terminate_and_wait(child: &mut Child, limit: Duration) -> ExitStatus {
    send_signal(child, Signal::SIGTERM);
    tokio::time::timeout(limit, child.wait())
        .await
        .unwrap_or_else(|_| panic!("rowcast exits within {limit:?} of SIGTERM"))
        .unwrap()
}
