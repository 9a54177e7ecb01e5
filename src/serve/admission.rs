//! Admission: who may hold a connection (a global limit and one per client address, with
//! exempt prefixes) and the transport counters operators read. A connection's ticket
//! ([`ConnectionGuard`]) travels inside its byte stream ([`Guarded`]), so an upgraded WebSocket
//! counts for as long as it is open; the same stream carries the connection's write deadline
//! (`deadline`), which reaches its timeout and counter through the ticket instead of holding
//! copies. Imports `config`.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::deadline::WriteDeadline;
use crate::config::{Hardening, IpPrefix};

/// Connection-level counters for `/stats`, shared by every listener. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TransportStats(pub(super) Arc<Counters>);

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) open: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) tls_failures: AtomicU64,
    pub(super) tls_timeouts: AtomicU64,
    pub(super) header_timeouts: AtomicU64,
    pub(super) write_timeouts: AtomicU64,
    pub(super) ws_http1: AtomicU64,
    pub(super) ws_http2: AtomicU64,
}

/// What `/stats` shows under `transport`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransportSnapshot {
    /// Connections open now (WebSockets included), on all listeners.
    pub connections_open: u64,
    /// Connections closed at once because a connection limit was reached.
    pub connections_refused: u64,
    /// TLS handshakes that failed (bad client hello, no common version or suite, …).
    pub tls_handshake_failures: u64,
    /// TLS handshakes that did not finish within `--tls-handshake-timeout`.
    pub tls_handshake_timeouts: u64,
    /// Connections closed because no complete request arrived within `--header-read-timeout`.
    pub header_read_timeouts: u64,
    /// Connections closed because the peer accepted none of the data the server had for it
    /// within `--write-timeout` (a client that stopped reading).
    pub write_timeouts: u64,
    /// WebSockets accepted over HTTP/1.1 (Upgrade).
    pub websocket_upgrades_http1: u64,
    /// WebSockets accepted over HTTP/2 (extended CONNECT).
    pub websocket_upgrades_http2: u64,
}

impl TransportStats {
    /// The counters now.
    pub fn snapshot(&self) -> TransportSnapshot {
        let c = &self.0;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TransportSnapshot {
            connections_open: get(&c.open),
            connections_refused: get(&c.refused),
            tls_handshake_failures: get(&c.tls_failures),
            tls_handshake_timeouts: get(&c.tls_timeouts),
            header_read_timeouts: get(&c.header_timeouts),
            write_timeouts: get(&c.write_timeouts),
            websocket_upgrades_http1: get(&c.ws_http1),
            websocket_upgrades_http2: get(&c.ws_http2),
        }
    }

    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Admission and timeouts shared by every listener: one client address has one budget whether
/// it comes over HTTP or HTTPS.
#[derive(Debug, Clone)]
pub struct Connections(pub(super) Arc<ConnectionsInner>);

#[derive(Debug)]
pub(super) struct ConnectionsInner {
    pub(super) global: Arc<Semaphore>,
    pub(super) per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub(super) max_per_ip: usize,
    pub(super) exempt: Vec<IpPrefix>,
    pub(super) header_read_timeout: Duration,
    pub(super) write_timeout: Duration,
    pub(super) stats: TransportStats,
}

impl Connections {
    /// Limits and timeouts from the configuration.
    pub fn new(hardening: &Hardening) -> Self {
        Self(Arc::new(ConnectionsInner {
            global: Arc::new(Semaphore::new(hardening.max_connections)),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: hardening.max_connections_per_ip,
            exempt: hardening.per_ip_limit_exempt.clone(),
            header_read_timeout: hardening.header_read_timeout,
            write_timeout: hardening.write_timeout,
            stats: TransportStats::default(),
        }))
    }

    /// The counters, for `/stats`.
    pub fn stats(&self) -> TransportStats {
        self.0.stats.clone()
    }

    /// Admits a connection from `ip`, or None if a limit is reached.
    pub(super) fn admit(&self, ip: IpAddr) -> Option<ConnectionGuard> {
        let inner = &self.0;
        let permit = inner.global.clone().try_acquire_owned().ok()?;
        let ip = ip.to_canonical();
        let counted = inner.max_per_ip > 0 && !inner.exempt.iter().any(|net| net.contains(ip));
        if counted {
            let mut per_ip = lock(&inner.per_ip);
            let open = per_ip.entry(ip).or_insert(0);
            if *open >= inner.max_per_ip {
                return None;
            }
            *open += 1;
        }
        TransportStats::bump(&inner.stats.0.open);
        Some(ConnectionGuard {
            connections: self.clone(),
            ip: counted.then_some(ip),
            _permit: permit,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map is only ever changed by one-line updates that cannot panic halfway; a poisoned
    // lock still holds consistent counts.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One admitted connection; gives its slots back when dropped (when the connection, or the
/// WebSocket it became, is closed).
#[derive(Debug)]
pub(super) struct ConnectionGuard {
    connections: Connections,
    ip: Option<IpAddr>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let inner = &self.connections.0;
        inner.stats.0.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            let mut per_ip = lock(&inner.per_ip);
            if let Some(open) = per_ip.get_mut(&ip) {
                *open -= 1;
                if *open == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// A connection's byte stream with what the server holds it to: its admission ticket and its
/// write deadline.
#[derive(Debug)]
pub(super) struct Guarded<T> {
    io: T,
    guard: ConnectionGuard,
    deadline: WriteDeadline,
}

impl<T> Guarded<T> {
    pub(super) fn new(io: T, guard: ConnectionGuard) -> Self {
        Self {
            io,
            guard,
            deadline: WriteDeadline::default(),
        }
    }

    /// The stream inside.
    pub(super) fn get_ref(&self) -> &T {
        &self.io
    }
}

/// The deadline expired: counted for `/stats`, and said once in the connection's span.
fn write_timed_out(inner: &ConnectionsInner) {
    TransportStats::bump(&inner.stats.0.write_timeouts);
    tracing::debug!(
        timeout = %humantime::format_duration(inner.write_timeout),
        "the peer accepted no data within the write timeout; closing"
    );
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        let inner = &this.guard.connections.0;
        this.deadline
            .after_write(cx, inner.write_timeout, written, || write_timed_out(inner))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        let inner = &this.guard.connections.0;
        this.deadline
            .after_write(cx, inner.write_timeout, written, || write_timed_out(inner))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        let inner = &this.guard.connections.0;
        this.deadline
            .after_flush(cx, inner.write_timeout, flushed, || write_timed_out(inner))
    }

    // A TCP shutdown never waits; a TLS close_notify goes through `poll_write` above.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;

    fn connections(args: &[&str]) -> Connections {
        let cli = <crate::config::Cli as clap::Parser>::try_parse_from(
            std::iter::once("rowcast").chain(args.iter().copied()),
        )
        .unwrap();
        Connections::new(&cli.config.hardening)
    }

    #[test]
    fn per_address_limit_counts_until_guards_drop_and_spares_exempt_addresses() {
        let limits = connections(&["--max-connections-per-ip", "2"]);
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        let first = limits.admit(remote).unwrap();
        let _second = limits.admit(remote).unwrap();
        assert!(limits.admit(remote).is_none());
        assert!(limits.admit("192.0.2.8".parse().unwrap()).is_some());
        // The same address as IPv4-mapped IPv6 is the same client.
        assert!(limits.admit("::ffff:192.0.2.7".parse().unwrap()).is_none());
        drop(first);
        assert!(limits.admit(remote).is_some());
        // Loopback is exempt by default.
        let local: Vec<_> = (0..5)
            .map(|_| limits.admit("127.0.0.1".parse().unwrap()).unwrap())
            .collect();
        assert_eq!(local.len(), 5);
        assert_eq!(limits.stats().snapshot().connections_open, 6);
    }

    fn guarded(limits: &Connections, pipe_bytes: usize) -> (Guarded<DuplexStream>, DuplexStream) {
        let (server, peer) = tokio::io::duplex(pipe_bytes);
        let ticket = limits.admit("127.0.0.1".parse().unwrap()).unwrap();
        (Guarded::new(server, ticket), peer)
    }

    #[tokio::test]
    async fn a_write_the_peer_leaves_unread_past_the_write_timeout_fails_and_is_counted() {
        let limits = connections(&["--write-timeout", "50ms"]);
        let (mut stream, _peer) = guarded(&limits, 64);
        // The pipe takes 64 bytes; the peer never reads the rest.
        let err = stream.write_all(&[7; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            err.to_string().contains("accepted no data for 50ms"),
            "{err}"
        );
        assert_eq!(limits.stats().snapshot().write_timeouts, 1);
        assert!(!stream.deadline.is_armed(), "each expiry counts once");
    }

    #[tokio::test]
    async fn a_write_that_proceeds_disarms_the_deadline_and_a_flush_does_not() {
        let limits = connections(&["--write-timeout", "1h"]);
        let (mut stream, mut peer) = guarded(&limits, 64);
        stream.write_all(&[1; 64]).await.unwrap();
        assert!(
            !stream.deadline.is_armed(),
            "writes that proceed need no timer"
        );
        // The pipe is full: the next write blocks, and is abandoned after its first attempt.
        let blocked = tokio::time::timeout(Duration::from_millis(20), stream.write(&[2; 8])).await;
        assert!(blocked.is_err());
        assert!(stream.deadline.is_armed());
        stream.flush().await.unwrap();
        assert!(
            stream.deadline.is_armed(),
            "a flush moves no bytes of its own"
        );
        peer.read_exact(&mut [0; 64]).await.unwrap();
        assert_eq!(stream.write(&[3; 8]).await.unwrap(), 8);
        assert!(!stream.deadline.is_armed());
        assert_eq!(limits.stats().snapshot().write_timeouts, 0);
    }

    #[test]
    fn an_idle_connection_pays_one_pointer_for_its_deadline() {
        assert_eq!(
            std::mem::size_of::<WriteDeadline>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn global_limit_applies_to_everyone() {
        let limits = connections(&["--max-connections", "1", "--per-ip-limit-exempt"]);
        let held = limits.admit("127.0.0.1".parse().unwrap()).unwrap();
        assert!(limits.admit("192.0.2.1".parse().unwrap()).is_none());
        drop(held);
        assert!(limits.admit("192.0.2.1".parse().unwrap()).is_some());
    }
}
