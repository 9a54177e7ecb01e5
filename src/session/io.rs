//! The byte stream under a session's WebSocket, and the session's side of the direct lane.
//!
//! On plain TCP (an HTTP/1.1 upgrade without TLS) the distributor writes changes straight into
//! the socket while the lane is open (`distributor::outbox`). Every write the session makes here
//! — a queued change, a reply, a ping, the pong tungstenite answers with, a close frame — first
//! closes the lane and finishes what the distributor left half-written (its tail), so bytes
//! never interleave and nothing overtakes anything. TLS and HTTP/2 streams have no lane: their
//! frames need per-connection encryption or stream framing, so they go through the session.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::distributor::LaneGate;
use crate::metrics::{Metrics, Transport};
use crate::protocol::Frame;
use crate::serve::PlainStream;

/// What carries the WebSocket.
#[derive(Debug)]
enum Stream {
    /// Plain TCP, shared with the distributor's direct lane.
    Plain(PlainStream),
    /// TLS or an HTTP/2 stream, through hyper.
    Upgraded(TokioIo<Upgraded>),
}

/// Frames gathered into one system call.
const GATHER: usize = 64;

/// The session's side of a plain connection's direct lane.
#[derive(Debug)]
struct Lane {
    gate: LaneGate<Frame>,
    /// Counts a tail as delivered when its last byte is written: the distributor counted
    /// nothing for a change it wrote only in part, since the session may be evicted first.
    metrics: Metrics,
}

/// A session's byte stream; see the module doc.
#[derive(Debug)]
pub(super) struct SessionIo {
    stream: Stream,
    lane: Option<Lane>,
    /// The first pending frame is the distributor's tail.
    tail_first: bool,
    /// Pre-built frames to write before anything else, in order: the rest of a frame the
    /// distributor wrote in part, then the session's own ([`Self::enqueue`]). Kept here, not in
    /// a future, so that a write cut short (eviction, shutdown) resumes where it stopped when
    /// the close frame follows.
    pending: VecDeque<Frame>,
    /// Bytes of the first pending frame already written.
    written: usize,
}

impl SessionIo {
    /// A plain connection whose outbox can write into its socket through `gate`.
    pub(super) fn plain(stream: PlainStream, gate: LaneGate<Frame>, metrics: Metrics) -> Self {
        Self::new(Stream::Plain(stream), Some(Lane { gate, metrics }))
    }

    /// A connection without a direct lane.
    pub(super) fn upgraded(stream: TokioIo<Upgraded>) -> Self {
        Self::new(Stream::Upgraded(stream), None)
    }

    fn new(stream: Stream, lane: Option<Lane>) -> Self {
        Self {
            stream,
            lane,
            tail_first: false,
            pending: VecDeque::new(),
            written: 0,
        }
    }

    /// True if the distributor may write into this stream's socket.
    pub(super) fn has_lane(&self) -> bool {
        self.lane.is_some()
    }

    /// Queues a pre-built frame; the next flush writes it. Closes the lane.
    pub(super) fn enqueue(&mut self, frame: Frame) {
        self.close_lane();
        self.pending.push_back(frame);
    }

    /// Hands writing back to the distributor if nothing of the session's is left to write;
    /// true if the lane is open. The caller must have flushed tungstenite's buffer.
    pub(super) fn try_open_lane(&mut self) -> bool {
        self.pending.is_empty() && self.lane.as_ref().is_some_and(|lane| lane.gate.try_open())
    }

    /// Frees the queue's buffer while idle.
    pub(super) fn release_idle_memory(&mut self) {
        if self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
    }

    /// Closes the lane before a write of the session's own, taking over any tail.
    fn close_lane(&mut self) {
        if let Some(lane) = &self.lane
            && let Some((tail, written)) = lane.gate.close()
        {
            // The lane was open, so nothing of ours was pending: the tail goes first.
            self.pending.push_front(tail);
            self.written = written;
            self.tail_first = true;
        }
    }

    /// Writes every pending frame, gathering up to [`GATHER`] per call.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); GATHER];
            let mut count = 0;
            for (i, frame) in self.pending.iter().take(GATHER).enumerate() {
                let skip = if i == 0 { self.written } else { 0 };
                slices[i] = io::IoSlice::new(&frame.wire()[skip..]);
                count += 1;
            }
            let mut n =
                ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while n > 0 {
                let Some(front) = self.pending.front() else {
                    break;
                };
                let left = front.wire().len() - self.written;
                if n >= left {
                    n -= left;
                    if let Some(frame) = self.pending.pop_front()
                        && std::mem::take(&mut self.tail_first)
                        && let Some(lane) = &self.lane
                    {
                        lane.metrics
                            .delivered(Transport::WebSocket, 1, frame.wire().len());
                    }
                    self.written = 0;
                } else {
                    self.written += n;
                    n = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for SessionIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.close_lane();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.close_lane();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.close_lane();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.close_lane();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Upgraded(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Upgraded(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Upgraded(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Upgraded(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Upgraded(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Upgraded(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
