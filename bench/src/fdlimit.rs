//! Open-file limit of this (client) process.
//!
//! Every WebSocket is one file descriptor on each side, and the client and the server
//! count against their own process's `RLIMIT_NOFILE`. The soft limit is often 1024 while
//! the hard limit here is ~20 000, so we raise soft to hard at start, and scenarios check
//! their connection count against it up front instead of failing mid-run with `EMFILE`.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors the tool needs beyond its WebSockets: stdio, REST connections, the
/// runtime's epoll/eventfds, /proc reads, Postgres connections in `writes`.
pub const RESERVED_FDS: u64 = 64;

/// Soft and hard limits after raising.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

impl FdLimit {
    /// How many WebSocket connections this process can hold at once.
    pub fn max_connections(&self) -> u64 {
        self.soft.saturating_sub(RESERVED_FDS)
    }
}

/// Raises the soft limit to the hard limit and returns both. Failure to raise is not
/// fatal: the run goes on with the old limit, which `max_connections` then reports.
pub fn raise() -> FdLimit {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return FdLimit {
            soft: 1024,
            hard: 1024,
        };
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return FdLimit { soft: hard, hard };
    }
    FdLimit { soft, hard }
}

/// True when an I/O error means "this process is out of file descriptors".
pub fn is_fd_exhaustion(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(code) if code == nix::errno::Errno::EMFILE as i32 || code == nix::errno::Errno::ENFILE as i32
    )
}
