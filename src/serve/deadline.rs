//! The write deadline every connection's byte stream carries: how long the peer may leave the
//! bytes the server has for it unaccepted before the connection is given up (`--write-timeout`).
//!
//! Without it a reader that sends a request and then never reads (a zero TCP window) holds its
//! connection and everything queued for it forever: hyper stops polling a response body while
//! the socket is full, so an SSE stream cannot even notice that it was evicted or that the server
//! is stopping. The deadline sits under hyper and TLS, on the TCP stream itself, so it covers
//! every connection the same way: REST responses, SSE streams, HTTP/2 connections as a whole, and
//! HTTP/1.1 WebSockets (their upgraded stream is this one). When it expires the write fails with
//! [`io::ErrorKind::TimedOut`]; hyper then drops the connection, and with it the response body
//! (an SSE stream's drop guard disconnects it from the distributor), and a WebSocket session
//! ends as after any failed write.
//!
//! The timer is armed only while a write cannot proceed (the first `Pending`) and dropped at the
//! next write that moves bytes, so an idle or flowing connection pays one pointer, not a timer.
//! "Moves bytes" is the kernel's notion of writable: a socket becomes writable again only once a
//! good part of its send buffer has drained (Linux wakes writers when a third of it is free), so
//! a peer that reads a few bytes now and then does not keep re-arming it. A flush that returns at once proves nothing (a TCP stream's flush
//! always does) and leaves the deadline as it is.
//!
//! It does not see one HTTP/2 stream whose window the peer keeps at zero while the connection
//! still moves (see `sse`). Imports nothing of ours.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

/// Armed (`Some`) from the first write that could not proceed until one that does.
#[derive(Debug, Default)]
pub(super) struct WriteDeadline(Option<Pin<Box<Sleep>>>);

/// The error a write returns once the peer has accepted nothing for the whole timeout.
#[derive(Debug, thiserror::Error)]
#[error("the peer accepted no data for {}", humantime::format_duration(*.0))]
pub(super) struct WriteTimedOut(Duration);

impl WriteDeadline {
    /// Passes a write's result through: a completed write disarms the deadline, a blocked one
    /// arms it (or keeps waiting on it), and a blocked one past `timeout` becomes
    /// `Err(TimedOut)`, after calling `on_expiry` once.
    pub(super) fn after_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        timeout: Duration,
        written: Poll<io::Result<R>>,
        on_expiry: impl FnOnce(),
    ) -> Poll<io::Result<R>> {
        if written.is_ready() {
            self.0 = None;
            return written;
        }
        self.after_block(cx, timeout, on_expiry)
    }

    /// Like [`Self::after_write`] for a flush, except that a flush that completes leaves the
    /// deadline armed: it moved no bytes of its own.
    pub(super) fn after_flush(
        &mut self,
        cx: &mut Context<'_>,
        timeout: Duration,
        flushed: Poll<io::Result<()>>,
        on_expiry: impl FnOnce(),
    ) -> Poll<io::Result<()>> {
        if flushed.is_ready() {
            return flushed;
        }
        self.after_block(cx, timeout, on_expiry)
    }

    fn after_block<R>(
        &mut self,
        cx: &mut Context<'_>,
        timeout: Duration,
        on_expiry: impl FnOnce(),
    ) -> Poll<io::Result<R>> {
        let timer = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        // Polled on every blocked attempt, so the waker of whoever is waiting now is the one
        // woken when the deadline passes.
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Disarmed, not kept expired: hyper and the WebSocket session give the connection up at
        // the first error, so each count is one full timeout without progress.
        self.0 = None;
        on_expiry();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            WriteTimedOut(timeout),
        )))
    }

    /// True while a blocked write is being timed.
    #[cfg(test)]
    pub(super) fn is_armed(&self) -> bool {
        self.0.is_some()
    }
}
